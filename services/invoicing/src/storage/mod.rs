//! The invoicing service's own database: invoices, lines, applied payments.

pub mod entities;
pub mod migrations;

use chrono::NaiveDate;
use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, InvoiceId};
use o2c_money::{Currency, Money};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ConnectionTrait, QueryOrder};

use crate::domain::{InvoiceError, Line, PaymentTerms, Status};
use entities::{applied_payment, invoice, line};

/// A validated invoice ready to be stored.
#[derive(Debug, Clone)]
pub struct NewInvoice {
    pub id: InvoiceId,
    pub tenant_id: String,
    pub customer_id: CustomerId,
    pub order_id: Option<String>,
    pub currency: Currency,
    pub lines: Vec<Line>,
    pub total: Money,
    pub issue_date: NaiveDate,
    pub terms: PaymentTerms,
}

/// A stored invoice.
#[derive(Debug, Clone)]
pub struct Invoice {
    pub id: InvoiceId,
    pub tenant_id: String,
    pub customer_id: CustomerId,
    pub order_id: Option<String>,
    pub currency: Currency,
    pub lines: Vec<Line>,
    pub total: Money,
    pub paid: Money,
    pub status: Status,
    pub issue_date: NaiveDate,
    pub due_date: NaiveDate,
    pub terms: PaymentTerms,
}

impl Invoice {
    pub fn open(&self) -> Result<Money, ApiError> {
        self.total
            .checked_sub(&self.paid)
            .map_err(|e| ApiError::Internal(format!("invoice {} amounts: {e}", self.id)))
    }
}

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

pub async fn insert(conn: &impl ConnectionTrait, new: &NewInvoice) -> Result<Invoice, ApiError> {
    let (terms_kind, net_days) = match new.terms {
        PaymentTerms::DueOnReceipt => ("DUE_ON_RECEIPT", 0),
        PaymentTerms::Net(days) => ("NET", i32::try_from(days).unwrap_or(i32::MAX)),
    };
    let inserted = invoice::Entity::insert(invoice::ActiveModel {
        id: Set(new.id.to_string()),
        tenant_id: Set(new.tenant_id.clone()),
        customer_id: Set(new.customer_id.to_string()),
        order_id: Set(new.order_id.clone()),
        currency_code: Set(new.currency.code().to_owned()),
        total_minor: Set(new.total.minor_units()),
        paid_minor: Set(0),
        status: Set(Status::Open.code().to_owned()),
        issue_date: Set(new.issue_date),
        due_date: Set(new.terms.due_date(new.issue_date)),
        terms_kind: Set(terms_kind.to_owned()),
        net_days: Set(net_days),
        created_at: Set(chrono::Utc::now()),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(ApiError::AlreadyExists(
                InvoiceError::OrderAlreadyInvoiced(new.order_id.clone().unwrap_or_default())
                    .to_string(),
            ));
        }
        Err(error) => return Err(error.into()),
    }
    let rows: Vec<line::ActiveModel> = new
        .lines
        .iter()
        .enumerate()
        .map(|(index, l)| line::ActiveModel {
            invoice_id: Set(new.id.to_string()),
            line_no: Set(i32::try_from(index + 1).unwrap_or(i32::MAX)),
            description: Set(l.description.clone()),
            quantity: Set(l.quantity.to_string()),
            unit_price_minor: Set(l.unit_price.minor_units()),
            tax_rate_percent: Set(l.tax_rate_percent.to_string()),
            total_minor: Set(l.total.minor_units()),
        })
        .collect();
    line::Entity::insert_many(rows).exec(conn).await?;
    get(conn, &new.tenant_id, new.id).await
}

pub async fn get(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
) -> Result<Invoice, ApiError> {
    let row = invoice::Entity::find_by_id(id.to_string())
        .filter(invoice::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("invoice", id))?;
    let lines = line::Entity::find()
        .filter(line::Column::InvoiceId.eq(id.to_string()))
        .order_by_asc(line::Column::LineNo)
        .all(conn)
        .await?;
    to_domain(row, lines)
}

fn to_domain(row: invoice::Model, lines: Vec<line::Model>) -> Result<Invoice, ApiError> {
    let currency = Currency::from_code(&row.currency_code)
        .map_err(|_| corrupt("currency", &row.currency_code))?;
    let money = |minor: i64| {
        Money::from_minor_units(minor, currency).map_err(|_| corrupt("amount", &minor.to_string()))
    };
    let terms = match row.terms_kind.as_str() {
        "DUE_ON_RECEIPT" => PaymentTerms::DueOnReceipt,
        "NET" => PaymentTerms::net(row.net_days)
            .map_err(|_| corrupt("net days", &row.net_days.to_string()))?,
        other => return Err(corrupt("terms", other)),
    };
    let lines = lines
        .into_iter()
        .map(|l| {
            Ok(Line {
                description: l.description,
                quantity: l
                    .quantity
                    .parse()
                    .map_err(|_| corrupt("quantity", &l.quantity))?,
                unit_price: money(l.unit_price_minor)?,
                tax_rate_percent: l
                    .tax_rate_percent
                    .parse()
                    .map_err(|_| corrupt("tax rate", &l.tax_rate_percent))?,
                total: money(l.total_minor)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Invoice {
        id: row.id.parse().map_err(|_| corrupt("invoice id", &row.id))?,
        customer_id: row
            .customer_id
            .parse()
            .map_err(|_| corrupt("customer id", &row.customer_id))?,
        tenant_id: row.tenant_id,
        order_id: row.order_id,
        currency,
        lines,
        total: money(row.total_minor)?,
        paid: money(row.paid_minor)?,
        status: Status::from_code(&row.status).ok_or_else(|| corrupt("status", &row.status))?,
        issue_date: row.issue_date,
        due_date: row.due_date,
        terms,
    })
}

/// Applies `amount` of `payment_id` to the invoice: at most once per
/// payment, never beyond the open amount.
pub async fn apply_payment(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
    payment_id: &str,
    amount: Money,
) -> Result<Invoice, ApiError> {
    let current = get(conn, tenant_id, id).await?;
    if amount.currency() != current.currency {
        return Err(ApiError::invalid(
            "amount.currency_code",
            format!("must be the invoice currency {}", current.currency),
        ));
    }
    let inserted = applied_payment::Entity::insert(applied_payment::ActiveModel {
        invoice_id: Set(id.to_string()),
        payment_id: Set(payment_id.to_owned()),
        tenant_id: Set(tenant_id.to_owned()),
        amount_minor: Set(amount.minor_units()),
        applied_at: Set(chrono::Utc::now()),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(ApiError::AlreadyExists(
                InvoiceError::PaymentAlreadyApplied(payment_id.to_owned()).to_string(),
            ));
        }
        Err(error) => return Err(error.into()),
    }
    let amount_minor = amount.minor_units();
    let result = invoice::Entity::update_many()
        .col_expr(
            invoice::Column::PaidMinor,
            Expr::col(invoice::Column::PaidMinor).add(amount_minor),
        )
        .filter(invoice::Column::Id.eq(id.to_string()))
        .filter(
            Expr::col(invoice::Column::TotalMinor)
                .sub(Expr::col(invoice::Column::PaidMinor))
                .gte(amount_minor),
        )
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::FailedPrecondition(
            InvoiceError::PaymentExceedsOpen {
                amount,
                open: current.open()?,
            }
            .to_string(),
        ));
    }
    // Re-read under our row lock: the status follows what is paid now,
    // including concurrent applications that committed before ours.
    let mut updated = get(conn, tenant_id, id).await?;
    updated.status = Status::of(updated.total.minor_units(), updated.paid.minor_units());
    invoice::Entity::update_many()
        .col_expr(invoice::Column::Status, Expr::value(updated.status.code()))
        .filter(invoice::Column::Id.eq(id.to_string()))
        .exec(conn)
        .await?;
    Ok(updated)
}
