//! The invoicing service's own database: invoices, lines, applied
//! payments, credit notes.
//!
//! Every change of what an invoice owes is one guarded statement
//! (`WHERE total - paid - credited - written_off - discount >= :amount`),
//! so concurrent payments and credit notes can never settle more than the
//! invoice total.

pub mod entities;
pub mod migrations;

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, InvoiceId};
use o2c_money::{Currency, Money};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use crate::domain::{self, Due, InvoiceError, Line, PaymentTerms, Status};
use entities::{applied_payment, credit_balance, credit_note, invoice, line, payout};
use sea_orm::sea_query::OnConflict;

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
    pub draft: bool,
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
    pub credited: Money,
    pub written_off: Money,
    pub discount_taken: Money,
    pub status: Status,
    pub issue_date: NaiveDate,
    pub due_date: NaiveDate,
    pub terms: PaymentTerms,
}

impl Invoice {
    /// What is still owed.
    pub fn open(&self) -> Result<Money, ApiError> {
        if !self.status.is_open() {
            return Ok(Money::zero(self.currency));
        }
        [
            &self.paid,
            &self.credited,
            &self.written_off,
            &self.discount_taken,
        ]
        .into_iter()
        .try_fold(self.total, |rest, part| rest.checked_sub(part))
        .map_err(|e| ApiError::Internal(format!("invoice {} amounts: {e}", self.id)))
    }

    /// The discount a payment on `today` may take, if inside the window.
    pub fn discount_available(&self, today: NaiveDate) -> Result<Option<Money>, ApiError> {
        match (
            self.terms.discount,
            self.terms.discount_date(self.issue_date),
        ) {
            (Some(discount), Some(until))
                if today <= until && self.discount_taken.is_zero() && self.status.is_open() =>
            {
                let open = self.open()?;
                Ok(Some(
                    domain::discount_amount(open, discount).map_err(field_error)?,
                ))
            }
            _ => Ok(None),
        }
    }
}

fn field_error(error: InvoiceError) -> ApiError {
    ApiError::Internal(error.to_string())
}

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

fn wrong_state(status: Status) -> ApiError {
    let name = match status {
        Status::Draft => "a draft",
        Status::Open => "open",
        Status::PartiallyPaid => "partially paid",
        Status::Paid => "paid",
        Status::Cancelled => "cancelled",
        Status::WrittenOff => "written off",
    };
    ApiError::FailedPrecondition(InvoiceError::WrongState(name).to_string())
}

fn terms_columns(terms: PaymentTerms) -> (&'static str, i32, Option<String>, i32) {
    let (kind, days) = match terms.due {
        Due::OnReceipt => ("DUE_ON_RECEIPT", 0),
        Due::Net(days) => ("NET", days),
        Due::EndOfMonthPlus(days) => ("END_OF_MONTH_PLUS", days),
    };
    let (percent, discount_days) = match terms.discount {
        Some(d) => (Some(d.percent.to_string()), d.days),
        None => (None, 0),
    };
    (
        kind,
        i32::try_from(days).unwrap_or(i32::MAX),
        percent,
        i32::try_from(discount_days).unwrap_or(i32::MAX),
    )
}

pub async fn insert(conn: &impl ConnectionTrait, new: &NewInvoice) -> Result<Invoice, ApiError> {
    let (kind, net_days, discount_percent, discount_days) = terms_columns(new.terms);
    let inserted = invoice::Entity::insert(invoice::ActiveModel {
        id: Set(new.id.to_string()),
        tenant_id: Set(new.tenant_id.clone()),
        customer_id: Set(new.customer_id.to_string()),
        order_id: Set(new.order_id.clone()),
        currency_code: Set(new.currency.code().to_owned()),
        total_minor: Set(new.total.minor_units()),
        paid_minor: Set(0),
        credited_minor: Set(0),
        written_off_minor: Set(0),
        discount_taken_minor: Set(0),
        status: Set(if new.draft {
            Status::Draft
        } else {
            Status::Open
        }
        .code()
        .to_owned()),
        issue_date: Set(new.issue_date),
        due_date: Set(new.terms.due_date(new.issue_date)),
        terms_kind: Set(kind.to_owned()),
        net_days: Set(net_days),
        discount_percent: Set(discount_percent),
        discount_days: Set(discount_days),
        created_at: Set(Utc::now()),
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

fn terms_of(row: &invoice::Model) -> Result<PaymentTerms, ApiError> {
    let days = || {
        domain::net_days(row.net_days).map_err(|_| corrupt("net days", &row.net_days.to_string()))
    };
    let due = match row.terms_kind.as_str() {
        "DUE_ON_RECEIPT" => Due::OnReceipt,
        "NET" => Due::Net(days()?),
        "END_OF_MONTH_PLUS" => Due::EndOfMonthPlus(days()?),
        other => return Err(corrupt("terms", other)),
    };
    let discount = match &row.discount_percent {
        Some(percent) => Some(
            domain::discount(percent, row.discount_days)
                .map_err(|_| corrupt("discount", percent))?,
        ),
        None => None,
    };
    Ok(PaymentTerms { due, discount })
}

fn to_domain(row: invoice::Model, lines: Vec<line::Model>) -> Result<Invoice, ApiError> {
    let currency = Currency::from_code(&row.currency_code)
        .map_err(|_| corrupt("currency", &row.currency_code))?;
    let money = |minor: i64| {
        Money::from_minor_units(minor, currency).map_err(|_| corrupt("amount", &minor.to_string()))
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
        terms: terms_of(&row)?,
        tenant_id: row.tenant_id,
        order_id: row.order_id,
        currency,
        lines,
        total: money(row.total_minor)?,
        paid: money(row.paid_minor)?,
        credited: money(row.credited_minor)?,
        written_off: money(row.written_off_minor)?,
        discount_taken: money(row.discount_taken_minor)?,
        status: Status::from_code(&row.status).ok_or_else(|| corrupt("status", &row.status))?,
        issue_date: row.issue_date,
        due_date: row.due_date,
    })
}

fn open_expr() -> sea_orm::sea_query::SimpleExpr {
    Expr::col(invoice::Column::TotalMinor)
        .sub(Expr::col(invoice::Column::PaidMinor))
        .sub(Expr::col(invoice::Column::CreditedMinor))
        .sub(Expr::col(invoice::Column::WrittenOffMinor))
        .sub(Expr::col(invoice::Column::DiscountTakenMinor))
}

/// Re-reads the invoice under our row lock and stores the status its
/// amounts imply.
async fn restatus(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
) -> Result<Invoice, ApiError> {
    let mut updated = get(conn, tenant_id, id).await?;
    let settled = updated.total.minor_units() - updated.open()?.minor_units();
    updated.status = Status::of(
        updated.total.minor_units(),
        settled,
        updated.paid.minor_units(),
    );
    invoice::Entity::update_many()
        .col_expr(invoice::Column::Status, Expr::value(updated.status.code()))
        .filter(invoice::Column::Id.eq(id.to_string()))
        .exec(conn)
        .await?;
    Ok(updated)
}

/// Applies `amount` of `payment_id` to the invoice: at most once per
/// payment, never beyond the open amount; paying the open amount less the
/// early-payment discount inside its window settles the invoice. Returns
/// the invoice and the discount taken.
pub async fn apply_payment(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
    payment_id: &str,
    amount: Money,
    today: NaiveDate,
) -> Result<(Invoice, Money), ApiError> {
    let current = get(conn, tenant_id, id).await?;
    if amount.currency() != current.currency {
        return Err(ApiError::invalid(
            "amount.currency_code",
            format!("must be the invoice currency {}", current.currency),
        ));
    }
    // The gateway applies a payment as it records it, and the payment's
    // event applies it again: the second finds the first.
    let earlier = applied_payment::Entity::find_by_id((id.to_string(), payment_id.to_owned()))
        .one(conn)
        .await?;
    if let Some(earlier) = earlier {
        if earlier.amount_minor != amount.minor_units() {
            return Err(ApiError::AlreadyExists(
                InvoiceError::PaymentAlreadyApplied(payment_id.to_owned()).to_string(),
            ));
        }
        let discount = Money::from_minor_units(earlier.discount_minor, current.currency)
            .map_err(|e| ApiError::Internal(format!("stored discount: {e}")))?;
        return Ok((current, discount));
    }
    if !current.status.is_open() {
        return Err(wrong_state(current.status));
    }
    let open = current.open()?;
    let discount = match current.discount_available(today)? {
        Some(discount) if open.checked_sub(&discount).is_ok_and(|due| due == amount) => discount,
        _ => Money::zero(current.currency),
    };
    let inserted = applied_payment::Entity::insert(applied_payment::ActiveModel {
        invoice_id: Set(id.to_string()),
        payment_id: Set(payment_id.to_owned()),
        tenant_id: Set(tenant_id.to_owned()),
        amount_minor: Set(amount.minor_units()),
        discount_minor: Set(discount.minor_units()),
        applied_at: Set(Utc::now()),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(ApiError::Aborted(format!(
                "payment {payment_id} is being applied concurrently; retry"
            )));
        }
        Err(error) => return Err(error.into()),
    }
    let (amount_minor, discount_minor) = (amount.minor_units(), discount.minor_units());
    let result = invoice::Entity::update_many()
        .col_expr(
            invoice::Column::PaidMinor,
            Expr::col(invoice::Column::PaidMinor).add(amount_minor),
        )
        .col_expr(
            invoice::Column::DiscountTakenMinor,
            Expr::col(invoice::Column::DiscountTakenMinor).add(discount_minor),
        )
        .filter(invoice::Column::Id.eq(id.to_string()))
        .filter(open_expr().gte(amount_minor + discount_minor))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::FailedPrecondition(
            InvoiceError::PaymentExceedsOpen { amount, open }.to_string(),
        ));
    }
    Ok((restatus(conn, tenant_id, id).await?, discount))
}

/// Draft → open, issued `issue_date` (due date recomputed).
pub async fn finalize(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
    issue_date: NaiveDate,
) -> Result<Invoice, ApiError> {
    let current = get(conn, tenant_id, id).await?;
    if current.status != Status::Draft {
        return Err(wrong_state(current.status));
    }
    let result = invoice::Entity::update_many()
        .col_expr(invoice::Column::Status, Expr::value(Status::Open.code()))
        .col_expr(invoice::Column::IssueDate, Expr::value(issue_date))
        .col_expr(
            invoice::Column::DueDate,
            Expr::value(current.terms.due_date(issue_date)),
        )
        .filter(invoice::Column::Id.eq(id.to_string()))
        .filter(invoice::Column::Status.eq(Status::Draft.code()))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::Aborted(
            "invoice changed concurrently; retry".into(),
        ));
    }
    get(conn, tenant_id, id).await
}

/// Cancels a draft, or an open invoice nothing settled yet; returns what
/// stopped being receivable.
pub async fn cancel(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
) -> Result<(Invoice, Money), ApiError> {
    let current = get(conn, tenant_id, id).await?;
    let released = match current.status {
        Status::Draft => Money::zero(current.currency),
        Status::Open => current.total,
        other => return Err(wrong_state(other)),
    };
    let result = invoice::Entity::update_many()
        .col_expr(
            invoice::Column::Status,
            Expr::value(Status::Cancelled.code()),
        )
        .filter(invoice::Column::Id.eq(id.to_string()))
        .filter(invoice::Column::Status.eq(current.status.code()))
        .filter(invoice::Column::PaidMinor.eq(0))
        .filter(invoice::Column::CreditedMinor.eq(0))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::Aborted(
            "invoice changed concurrently; retry".into(),
        ));
    }
    Ok((get(conn, tenant_id, id).await?, released))
}

/// Writes off what is open; returns the amount written off.
pub async fn write_off(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: InvoiceId,
) -> Result<(Invoice, Money), ApiError> {
    let current = get(conn, tenant_id, id).await?;
    if !current.status.is_open() {
        return Err(wrong_state(current.status));
    }
    let open = current.open()?;
    let result = invoice::Entity::update_many()
        .col_expr(
            invoice::Column::WrittenOffMinor,
            Expr::col(invoice::Column::WrittenOffMinor).add(open.minor_units()),
        )
        .col_expr(
            invoice::Column::Status,
            Expr::value(Status::WrittenOff.code()),
        )
        .filter(invoice::Column::Id.eq(id.to_string()))
        .filter(open_expr().eq(open.minor_units()))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::Aborted(
            "invoice changed concurrently; retry".into(),
        ));
    }
    Ok((get(conn, tenant_id, id).await?, open))
}

/// A stored credit note.
pub type CreditNote = credit_note::Model;

/// Issues a credit note: up to the invoice's open amount reduces it; the
/// rest (or all of it, without an open invoice) is account credit.
pub async fn issue_credit_note(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    invoice_id: Option<InvoiceId>,
    amount: Money,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(CreditNote, Option<Invoice>), ApiError> {
    let mut applied = Money::zero(amount.currency());
    if let Some(id) = invoice_id {
        let current = get(conn, tenant_id, id).await?;
        if current.customer_id != customer_id {
            return Err(ApiError::not_found("invoice of customer", id));
        }
        if current.currency != amount.currency() {
            return Err(ApiError::invalid(
                "amount.currency_code",
                format!("must be the invoice currency {}", current.currency),
            ));
        }
        if current.status == Status::Draft || current.status == Status::Cancelled {
            return Err(wrong_state(current.status));
        }
        let open = current.open()?;
        applied = if open.minor_units() < amount.minor_units() {
            open
        } else {
            amount
        };
        if applied.is_positive() {
            let result = invoice::Entity::update_many()
                .col_expr(
                    invoice::Column::CreditedMinor,
                    Expr::col(invoice::Column::CreditedMinor).add(applied.minor_units()),
                )
                .filter(invoice::Column::Id.eq(id.to_string()))
                .filter(open_expr().gte(applied.minor_units()))
                .exec(conn)
                .await?;
            if result.rows_affected != 1 {
                return Err(ApiError::Aborted(
                    "invoice changed concurrently; retry".into(),
                ));
            }
        }
    }
    let account_credit = amount
        .checked_sub(&applied)
        .map_err(|e| ApiError::Internal(format!("credit note amounts: {e}")))?;
    if account_credit.is_positive() {
        credit_balance::Entity::insert(credit_balance::ActiveModel {
            tenant_id: Set(tenant_id.to_owned()),
            customer_id: Set(customer_id.to_string()),
            currency_code: Set(amount.currency().code().to_owned()),
            balance_minor: Set(account_credit.minor_units()),
        })
        .on_conflict(
            OnConflict::columns([
                credit_balance::Column::TenantId,
                credit_balance::Column::CustomerId,
                credit_balance::Column::CurrencyCode,
            ])
            .value(
                credit_balance::Column::BalanceMinor,
                Expr::col((credit_balance::Entity, credit_balance::Column::BalanceMinor))
                    .add(account_credit.minor_units()),
            )
            .to_owned(),
        )
        .exec(conn)
        .await?;
    }
    let note_id = uuid::Uuid::now_v7().to_string();
    let note = credit_note::Entity::insert(credit_note::ActiveModel {
        id: Set(note_id),
        tenant_id: Set(tenant_id.to_owned()),
        customer_id: Set(customer_id.to_string()),
        invoice_id: Set(invoice_id.map(|i| i.to_string())),
        currency_code: Set(amount.currency().code().to_owned()),
        amount_minor: Set(amount.minor_units()),
        applied_minor: Set(applied.minor_units()),
        account_credit_minor: Set(account_credit.minor_units()),
        reason: Set(reason.to_owned()),
        issued_at: Set(now),
    })
    .exec_with_returning(conn)
    .await?;
    let invoice = match invoice_id {
        Some(id) if applied.is_positive() => Some(restatus(conn, tenant_id, id).await?),
        Some(id) => Some(get(conn, tenant_id, id).await?),
        None => None,
    };
    Ok((note, invoice))
}

/// Filters of an invoice list.
#[derive(Debug, Clone, Default)]
pub struct InvoiceFilter {
    pub customer_id: Option<CustomerId>,
    pub status: Option<Status>,
    pub open_only: bool,
    /// Due strictly before this date (and open).
    pub due_before: Option<NaiveDate>,
}

/// Invoices, oldest due first, `limit` from `offset`.
pub async fn list(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    filter: &InvoiceFilter,
    offset: u64,
    limit: u64,
) -> Result<Vec<Invoice>, ApiError> {
    let mut query = invoice::Entity::find().filter(invoice::Column::TenantId.eq(tenant_id));
    if let Some(customer) = filter.customer_id {
        query = query.filter(invoice::Column::CustomerId.eq(customer.to_string()));
    }
    if let Some(status) = filter.status {
        query = query.filter(invoice::Column::Status.eq(status.code()));
    }
    if filter.open_only || filter.due_before.is_some() {
        query = query.filter(
            invoice::Column::Status.is_in([Status::Open.code(), Status::PartiallyPaid.code()]),
        );
    }
    if let Some(before) = filter.due_before {
        query = query.filter(invoice::Column::DueDate.lt(before));
    }
    let rows = query
        .order_by_asc(invoice::Column::DueDate)
        .order_by_asc(invoice::Column::Id)
        .offset(offset)
        .limit(limit)
        .all(conn)
        .await?;
    let mut invoices = Vec::with_capacity(rows.len());
    for row in rows {
        let lines = line::Entity::find()
            .filter(line::Column::InvoiceId.eq(row.id.clone()))
            .order_by_asc(line::Column::LineNo)
            .all(conn)
            .await?;
        invoices.push(to_domain(row, lines)?);
    }
    Ok(invoices)
}

/// Every open invoice (for aging), customer optional.
pub async fn open_invoices(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: Option<CustomerId>,
) -> Result<Vec<invoice::Model>, ApiError> {
    let mut query = invoice::Entity::find()
        .filter(invoice::Column::TenantId.eq(tenant_id))
        .filter(invoice::Column::Status.is_in([Status::Open.code(), Status::PartiallyPaid.code()]));
    if let Some(customer) = customer_id {
        query = query.filter(invoice::Column::CustomerId.eq(customer.to_string()));
    }
    Ok(query
        .order_by_asc(invoice::Column::DueDate)
        .all(conn)
        .await?)
}

/// What an open row still owes, in minor units.
pub fn open_minor(row: &invoice::Model) -> i64 {
    row.total_minor
        - row.paid_minor
        - row.credited_minor
        - row.written_off_minor
        - row.discount_taken_minor
}

/// The customer's account credit balances (minor units, by currency).
pub async fn account_credit(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
) -> Result<Vec<(String, i64)>, ApiError> {
    Ok(credit_balance::Entity::find()
        .filter(credit_balance::Column::TenantId.eq(tenant_id))
        .filter(credit_balance::Column::CustomerId.eq(customer_id.to_string()))
        .order_by_asc(credit_balance::Column::CurrencyCode)
        .all(conn)
        .await?
        .into_iter()
        .map(|b| (b.currency_code, b.balance_minor))
        .collect())
}

/// Pays out `amount` of account credit, never below zero; returns the
/// payout id and the balance left.
pub async fn pay_out(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    amount: Money,
    reason: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<(String, Money), ApiError> {
    let currency = amount.currency().code();
    let result = credit_balance::Entity::update_many()
        .col_expr(
            credit_balance::Column::BalanceMinor,
            Expr::col(credit_balance::Column::BalanceMinor).sub(amount.minor_units()),
        )
        .filter(credit_balance::Column::TenantId.eq(tenant_id))
        .filter(credit_balance::Column::CustomerId.eq(customer_id.to_string()))
        .filter(credit_balance::Column::CurrencyCode.eq(currency))
        .filter(credit_balance::Column::BalanceMinor.gte(amount.minor_units()))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::FailedPrecondition(format!(
            "a payout of {amount} exceeds the customer's account credit in {currency}"
        )));
    }
    let id = uuid::Uuid::now_v7().to_string();
    payout::Entity::insert(payout::ActiveModel {
        id: Set(id.clone()),
        tenant_id: Set(tenant_id.to_owned()),
        customer_id: Set(customer_id.to_string()),
        currency_code: Set(currency.to_owned()),
        amount_minor: Set(amount.minor_units()),
        reason: Set(reason.to_owned()),
        actor: Set(actor.to_owned()),
        paid_at: Set(now),
    })
    .exec(conn)
    .await?;
    let left = account_credit(conn, tenant_id, customer_id)
        .await?
        .into_iter()
        .find(|(code, _)| code == currency)
        .map_or(0, |(_, minor)| minor);
    let left = Money::from_minor_units(left, amount.currency())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((id, left))
}
