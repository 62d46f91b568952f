//! Mandates, payment sessions and their attempts.

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use o2c_money::Money;
use o2c_money::ids::PaymentId;
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use super::entities::{allocation, attempt, mandate, payment, session};

pub const MANDATE_ACTIVE: &str = "ACTIVE";
pub const MANDATE_REVOKED: &str = "REVOKED";
pub const SCHEDULED: &str = "SCHEDULED";
pub const RETRYING: &str = "RETRYING";
pub const COLLECTED: &str = "COLLECTED";
pub const SUCCEEDED: &str = "SUCCEEDED";
pub const FAILED: &str = "FAILED";

pub type Mandate = mandate::Model;
pub type Session = session::Model;
pub type Attempt = attempt::Model;

pub struct NewMandate<'a> {
    pub tenant_id: &'a str,
    pub customer_id: &'a str,
    pub method: &'a str,
    pub token: &'a str,
    pub last4: &'a str,
    pub currency: &'a str,
}

pub async fn insert_mandate(
    conn: &impl ConnectionTrait,
    new: &NewMandate<'_>,
    now: DateTime<Utc>,
) -> Result<Mandate, ApiError> {
    Ok(mandate::Entity::insert(mandate::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        tenant_id: Set(new.tenant_id.to_owned()),
        customer_id: Set(new.customer_id.to_owned()),
        method: Set(new.method.to_owned()),
        processor_token: Set(new.token.to_owned()),
        last4: Set(new.last4.to_owned()),
        currency_code: Set(new.currency.to_owned()),
        status: Set(MANDATE_ACTIVE.to_owned()),
        created_at: Set(now),
    })
    .exec_with_returning(conn)
    .await?)
}

pub async fn get_mandate(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Mandate, ApiError> {
    mandate::Entity::find_by_id(id.to_owned())
        .filter(mandate::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("mandate", id))
}

/// The customer's newest active mandate in `currency`.
pub async fn active_mandate(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: &str,
    currency: &str,
) -> Result<Option<Mandate>, ApiError> {
    Ok(mandate::Entity::find()
        .filter(mandate::Column::TenantId.eq(tenant_id))
        .filter(mandate::Column::CustomerId.eq(customer_id))
        .filter(mandate::Column::CurrencyCode.eq(currency))
        .filter(mandate::Column::Status.eq(MANDATE_ACTIVE))
        .order_by_desc(mandate::Column::Id)
        .one(conn)
        .await?)
}

pub async fn revoke_mandate(
    conn: &impl ConnectionTrait,
    mandate: &Mandate,
) -> Result<Mandate, ApiError> {
    mandate::Entity::update_many()
        .col_expr(mandate::Column::Status, Expr::value(MANDATE_REVOKED))
        .filter(mandate::Column::Id.eq(mandate.id.clone()))
        .exec(conn)
        .await?;
    get_mandate(conn, &mandate.tenant_id, &mandate.id).await
}

/// Schedules the collection of an invoice; an invoice already scheduled
/// keeps its session.
pub async fn schedule(
    conn: &impl ConnectionTrait,
    mandate: &Mandate,
    invoice_id: &str,
    amount: Money,
    due: NaiveDate,
    now: DateTime<Utc>,
) -> Result<Session, ApiError> {
    if let Some(existing) = session::Entity::find()
        .filter(session::Column::TenantId.eq(mandate.tenant_id.clone()))
        .filter(session::Column::InvoiceId.eq(invoice_id))
        .one(conn)
        .await?
    {
        return Ok(existing);
    }
    let first_attempt = due.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or(now);
    Ok(session::Entity::insert(session::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        tenant_id: Set(mandate.tenant_id.clone()),
        customer_id: Set(mandate.customer_id.clone()),
        mandate_id: Set(mandate.id.clone()),
        invoice_id: Set(invoice_id.to_owned()),
        currency_code: Set(amount.currency().code().to_owned()),
        amount_minor: Set(amount.minor_units()),
        state: Set(SCHEDULED.to_owned()),
        scheduled_for: Set(due),
        next_attempt_at: Set(Some(first_attempt)),
        attempts: Set(0),
        payment_id: Set(None),
        last_failure: Set(None),
        failure_reported: Set(false),
        created_at: Set(now),
    })
    .exec_with_returning(conn)
    .await?)
}

pub async fn get_session(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<(Session, Vec<Attempt>), ApiError> {
    let found = session::Entity::find_by_id(id.to_owned())
        .filter(session::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("payment session", id))?;
    let attempts = attempt::Entity::find()
        .filter(attempt::Column::SessionId.eq(id))
        .order_by_asc(attempt::Column::Number)
        .all(conn)
        .await?;
    Ok((found, attempts))
}

/// A customer's sessions, newest first.
pub async fn list_sessions(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: &str,
    before: Option<String>,
    limit: u64,
) -> Result<Vec<Session>, ApiError> {
    let mut query = session::Entity::find()
        .filter(session::Column::TenantId.eq(tenant_id))
        .filter(session::Column::CustomerId.eq(customer_id));
    if let Some(before) = before {
        query = query.filter(session::Column::Id.lt(before));
    }
    Ok(query
        .order_by_desc(session::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Sessions whose next attempt is due.
pub async fn due(
    conn: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Session>, ApiError> {
    Ok(session::Entity::find()
        .filter(session::Column::State.is_in([SCHEDULED, RETRYING]))
        .filter(session::Column::NextAttemptAt.lte(now))
        .order_by_asc(session::Column::NextAttemptAt)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Sessions in `state`.
pub async fn in_state(
    conn: &impl ConnectionTrait,
    state: &str,
    limit: u64,
) -> Result<Vec<Session>, ApiError> {
    Ok(session::Entity::find()
        .filter(session::Column::State.eq(state))
        .order_by_asc(session::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Records an attempt and moves the session to `state` (only from where
/// it was, so a concurrent pass cannot record the same attempt twice).
#[allow(clippy::too_many_arguments)]
pub async fn record_attempt(
    conn: &impl ConnectionTrait,
    session: &Session,
    number: i32,
    failure: Option<&str>,
    state: &str,
    next_attempt_at: Option<DateTime<Utc>>,
    payment_id: Option<PaymentId>,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let moved = session::Entity::update_many()
        .col_expr(session::Column::State, Expr::value(state))
        .col_expr(session::Column::Attempts, Expr::value(number))
        .col_expr(session::Column::NextAttemptAt, Expr::value(next_attempt_at))
        .col_expr(
            session::Column::LastFailure,
            Expr::value(failure.map(str::to_owned)),
        )
        .col_expr(
            session::Column::PaymentId,
            Expr::value(payment_id.map(|p| p.to_string())),
        )
        .filter(session::Column::Id.eq(session.id.clone()))
        .filter(session::Column::State.eq(session.state.clone()))
        .filter(session::Column::Attempts.eq(session.attempts))
        .exec(conn)
        .await?;
    if moved.rows_affected != 1 {
        return Ok(false);
    }
    attempt::Entity::insert(attempt::ActiveModel {
        session_id: Set(session.id.clone()),
        number: Set(number),
        attempted_at: Set(now),
        succeeded: Set(failure.is_none()),
        failure_reason: Set(failure.map(str::to_owned)),
    })
    .exec(conn)
    .await?;
    Ok(true)
}

/// Moves a session between states (COLLECTED → SUCCEEDED, FAILED).
pub async fn set_state(
    conn: &impl ConnectionTrait,
    session: &Session,
    from: &str,
    to: &str,
) -> Result<bool, ApiError> {
    let moved = session::Entity::update_many()
        .col_expr(session::Column::State, Expr::value(to))
        .col_expr(
            session::Column::NextAttemptAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(session::Column::Id.eq(session.id.clone()))
        .filter(session::Column::State.eq(from))
        .exec(conn)
        .await?;
    Ok(moved.rows_affected == 1)
}

pub async fn mark_reported(conn: &impl ConnectionTrait, session: &Session) -> Result<(), ApiError> {
    session::Entity::update_many()
        .col_expr(session::Column::FailureReported, Expr::value(true))
        .filter(session::Column::Id.eq(session.id.clone()))
        .exec(conn)
        .await?;
    Ok(())
}

/// Failed sessions whose alert is not out yet.
pub async fn unreported_failures(
    conn: &impl ConnectionTrait,
    limit: u64,
) -> Result<Vec<Session>, ApiError> {
    Ok(session::Entity::find()
        .filter(session::Column::State.eq(FAILED))
        .filter(session::Column::FailureReported.eq(false))
        .limit(limit)
        .all(conn)
        .await?)
}

/// When the invoice no longer takes the money allocated to it (paid or
/// cancelled meanwhile), the allocation of `expected` becomes unapplied
/// cash on the payment: never lost. False when there is no such
/// allocation (already returned).
pub async fn unallocate(
    conn: &impl ConnectionTrait,
    payment_id: &str,
    invoice_id: &str,
    expected: Money,
) -> Result<bool, ApiError> {
    let Some(row) = allocation::Entity::find_by_id((payment_id.to_owned(), invoice_id.to_owned()))
        .one(conn)
        .await?
    else {
        return Ok(false);
    };
    if row.amount_minor != expected.minor_units() {
        // Not the allocation that was refused: leave it (loud, not
        // blocking every later event).
        tracing::error!(
            payment = %payment_id,
            invoice = %invoice_id,
            allocated_minor = row.amount_minor,
            refused = %expected,
            "refusal does not match the allocation on record; left as allocated"
        );
        return Ok(false);
    }
    allocation::Entity::delete_by_id((payment_id.to_owned(), invoice_id.to_owned()))
        .exec(conn)
        .await?;
    payment::Entity::update_many()
        .col_expr(
            payment::Column::UnappliedMinor,
            Expr::col(payment::Column::UnappliedMinor).add(row.amount_minor),
        )
        .filter(payment::Column::Id.eq(payment_id))
        .exec(conn)
        .await?;
    Ok(true)
}
