//! The payments service's own database: receipts and their allocations.

pub mod collection;
pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, PaymentId};
use o2c_money::{Currency, Money};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder};

use crate::domain::Allocation;
use entities::{allocation, payment, refund};
use sea_orm::sea_query::ExprTrait;

/// How a payment arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    BankTransfer,
    Card,
    DirectDebit,
}

impl Method {
    pub fn code(self) -> &'static str {
        match self {
            Method::BankTransfer => "BANK_TRANSFER",
            Method::Card => "CARD",
            Method::DirectDebit => "DIRECT_DEBIT",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        match code {
            "BANK_TRANSFER" => Some(Method::BankTransfer),
            "CARD" => Some(Method::Card),
            "DIRECT_DEBIT" => Some(Method::DirectDebit),
            _ => None,
        }
    }
}

/// A validated receipt.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub id: PaymentId,
    pub tenant_id: String,
    pub customer_id: CustomerId,
    pub amount: Money,
    pub unapplied: Money,
    pub method: Method,
    pub reference: String,
    pub allocations: Vec<Allocation>,
}

/// A stored receipt.
#[derive(Debug, Clone)]
pub struct Payment {
    pub id: PaymentId,
    pub tenant_id: String,
    pub customer_id: CustomerId,
    pub amount: Money,
    pub unapplied: Money,
    pub method: Method,
    pub reference: String,
    pub allocations: Vec<Allocation>,
    pub refunds: Vec<Refund>,
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// A stored refund.
pub type Refund = refund::Model;

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

pub async fn insert(conn: &impl ConnectionTrait, new: &NewPayment) -> Result<Payment, ApiError> {
    payment::Entity::insert(payment::ActiveModel {
        id: Set(new.id.to_string()),
        tenant_id: Set(new.tenant_id.clone()),
        customer_id: Set(new.customer_id.to_string()),
        currency_code: Set(new.amount.currency().code().to_owned()),
        amount_minor: Set(new.amount.minor_units()),
        unapplied_minor: Set(new.unapplied.minor_units()),
        method: Set(new.method.code().to_owned()),
        reference: Set(new.reference.clone()),
        received_at: Set(chrono::Utc::now()),
    })
    .exec(conn)
    .await?;
    if !new.allocations.is_empty() {
        allocation::Entity::insert_many(new.allocations.iter().map(|a| allocation::ActiveModel {
            payment_id: Set(new.id.to_string()),
            invoice_id: Set(a.invoice_id.to_string()),
            amount_minor: Set(a.amount.minor_units()),
        }))
        .exec(conn)
        .await?;
    }
    get(conn, &new.tenant_id, new.id).await
}

pub async fn get(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: PaymentId,
) -> Result<Payment, ApiError> {
    let row = payment::Entity::find_by_id(id.to_string())
        .filter(payment::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("payment", id))?;
    let allocations = allocation::Entity::find()
        .filter(allocation::Column::PaymentId.eq(id.to_string()))
        .order_by_asc(allocation::Column::InvoiceId)
        .all(conn)
        .await?;
    let refunds = refund::Entity::find()
        .filter(refund::Column::PaymentId.eq(id.to_string()))
        .order_by_asc(refund::Column::Id)
        .all(conn)
        .await?;
    let currency = Currency::from_code(&row.currency_code)
        .map_err(|_| corrupt("currency", &row.currency_code))?;
    let money = |minor: i64| {
        Money::from_minor_units(minor, currency).map_err(|_| corrupt("amount", &minor.to_string()))
    };
    Ok(Payment {
        id,
        customer_id: row
            .customer_id
            .parse()
            .map_err(|_| corrupt("customer id", &row.customer_id))?,
        amount: money(row.amount_minor)?,
        unapplied: money(row.unapplied_minor)?,
        method: Method::from_code(&row.method).ok_or_else(|| corrupt("method", &row.method))?,
        reference: row.reference,
        allocations: allocations
            .into_iter()
            .map(|a| {
                Ok(Allocation {
                    invoice_id: a
                        .invoice_id
                        .parse()
                        .map_err(|_| corrupt("invoice id", &a.invoice_id))?,
                    amount: money(a.amount_minor)?,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        refunds,
        received_at: row.received_at,
        tenant_id: row.tenant_id,
    })
}

/// Moves `allocations` out of the payment's unapplied cash, never below
/// zero and never to an invoice this payment already went to.
pub async fn apply_unapplied(
    conn: &impl ConnectionTrait,
    payment: &Payment,
    allocations: &[Allocation],
) -> Result<Payment, ApiError> {
    let total: i64 = allocations.iter().map(|a| a.amount.minor_units()).sum();
    let result = payment::Entity::update_many()
        .col_expr(
            payment::Column::UnappliedMinor,
            Expr::col(payment::Column::UnappliedMinor).sub(total),
        )
        .filter(payment::Column::Id.eq(payment.id.to_string()))
        .filter(payment::Column::UnappliedMinor.gte(total))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::FailedPrecondition(format!(
            "allocations exceed the unapplied cash {}",
            payment.unapplied
        )));
    }
    for a in allocations {
        let inserted = allocation::Entity::insert(allocation::ActiveModel {
            payment_id: Set(payment.id.to_string()),
            invoice_id: Set(a.invoice_id.to_string()),
            amount_minor: Set(a.amount.minor_units()),
        })
        .exec(conn)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if o2c_kit::db::is_unique_violation(&error) => {
                return Err(ApiError::AlreadyExists(format!(
                    "payment {} already went to invoice {}",
                    payment.id, a.invoice_id
                )));
            }
            Err(error) => return Err(error.into()),
        }
    }
    get(conn, &payment.tenant_id, payment.id).await
}

/// Pays back `amount` of the payment's unapplied cash.
pub async fn refund(
    conn: &impl ConnectionTrait,
    payment: &Payment,
    amount: Money,
    reason: &str,
    actor: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Refund, Payment), ApiError> {
    let result = payment::Entity::update_many()
        .col_expr(
            payment::Column::UnappliedMinor,
            Expr::col(payment::Column::UnappliedMinor).sub(amount.minor_units()),
        )
        .filter(payment::Column::Id.eq(payment.id.to_string()))
        .filter(payment::Column::UnappliedMinor.gte(amount.minor_units()))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::FailedPrecondition(format!(
            "refund of {amount} exceeds the unapplied cash {}",
            payment.unapplied
        )));
    }
    let refund = refund::Entity::insert(refund::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        payment_id: Set(payment.id.to_string()),
        tenant_id: Set(payment.tenant_id.clone()),
        amount_minor: Set(amount.minor_units()),
        reason: Set(reason.to_owned()),
        actor: Set(actor.to_owned()),
        refunded_at: Set(now),
    })
    .exec_with_returning(conn)
    .await?;
    Ok((refund, get(conn, &payment.tenant_id, payment.id).await?))
}
