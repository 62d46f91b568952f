//! The payments service's own database: receipts and their allocations.

pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, PaymentId};
use o2c_money::{Currency, Money};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder};

use crate::domain::Allocation;
use entities::{allocation, payment};

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
    pub received_at: chrono::DateTime<chrono::Utc>,
}

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
        received_at: row.received_at,
        tenant_id: row.tenant_id,
    })
}
