//! The credit service's own database: the ledger of accounts,
//! reservations, receivables, decisions and limit changes.
//!
//! # No over-commit
//! Approval and reservation are one statement:
//! `UPDATE credit_accounts SET reserved = reserved + :amount, version =
//! version + 1 WHERE id = :id AND limit - reserved - receivable >= :amount`.
//! The database evaluates the condition against the latest committed row
//! while holding its write lock (PostgreSQL re-checks the WHERE after
//! waiting for a concurrent writer; SQLite admits one writer at a time), so
//! no interleaving of concurrent checks can approve past the limit.

pub mod cache;
pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::Currency;
use o2c_money::ids::{CreditAccountId, CustomerId, DecisionId, ReservationId};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ConnectionTrait, QuerySelect};

use crate::domain::{CreditError, Exposure, Outcome, Reason};
use entities::{account, decision, limit_change, receivable, reservation};

pub const STATE_OPEN: &str = "OPEN";
pub const STATE_CONVERTED: &str = "CONVERTED";
pub const STATE_RELEASED: &str = "RELEASED";

/// A stored account with its exposure.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: CreditAccountId,
    pub tenant_id: String,
    pub exposure: Exposure,
}

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

fn to_account(row: account::Model) -> Result<Account, ApiError> {
    Ok(Account {
        id: row.id.parse().map_err(|_| corrupt("account id", &row.id))?,
        exposure: Exposure {
            customer_id: row
                .customer_id
                .parse()
                .map_err(|_| corrupt("customer id", &row.customer_id))?,
            currency: Currency::from_code(&row.currency_code)
                .map_err(|_| corrupt("currency", &row.currency_code))?,
            limit_minor: row.limit_minor,
            reserved_minor: row.reserved_minor,
            receivable_minor: row.receivable_minor,
            version: row.version,
        },
        tenant_id: row.tenant_id,
    })
}

/// Opens the account, or returns the customer's existing account: a
/// customer has one account per tenant. An existing account in another
/// currency is refused.
pub async fn open_account(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    currency: Currency,
) -> Result<Account, ApiError> {
    if let Some(existing) = find_account(conn, tenant_id, customer_id).await? {
        if existing.exposure.currency != currency {
            return Err(CreditError::AccountExists(customer_id).into());
        }
        return Ok(existing);
    }
    let now = chrono::Utc::now();
    let id = CreditAccountId::new();
    let result = account::Entity::insert(account::ActiveModel {
        id: Set(id.to_string()),
        tenant_id: Set(tenant_id.to_owned()),
        customer_id: Set(customer_id.to_string()),
        currency_code: Set(currency.code().to_owned()),
        limit_minor: Set(0),
        reserved_minor: Set(0),
        receivable_minor: Set(0),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec(conn)
    .await;
    match result {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(CreditError::AccountExists(customer_id).into());
        }
        Err(error) => return Err(error.into()),
    }
    require_account(conn, tenant_id, customer_id).await
}

/// The customer's account, if any.
pub async fn find_account(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
) -> Result<Option<Account>, ApiError> {
    account::Entity::find()
        .filter(account::Column::TenantId.eq(tenant_id))
        .filter(account::Column::CustomerId.eq(customer_id.to_string()))
        .one(conn)
        .await?
        .map(to_account)
        .transpose()
}

/// The customer's account, or NotFound.
pub async fn require_account(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
) -> Result<Account, ApiError> {
    find_account(conn, tenant_id, customer_id)
        .await?
        .ok_or_else(|| ApiError::not_found("credit account of customer", customer_id))
}

pub async fn account_by_id(conn: &impl ConnectionTrait, id: &str) -> Result<Account, ApiError> {
    account::Entity::find_by_id(id.to_owned())
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("account {id} vanished")))
        .and_then(to_account)
}

/// Sets the limit and audits the change.
pub async fn set_limit(
    conn: &impl ConnectionTrait,
    account: &Account,
    limit_minor: i64,
    reason: &str,
) -> Result<Account, ApiError> {
    let now = chrono::Utc::now();
    let before = account::Entity::find_by_id(account.id.to_string())
        .lock_exclusive()
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("credit account", account.id))?;
    account::Entity::update_many()
        .col_expr(account::Column::LimitMinor, Expr::value(limit_minor))
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.eq(account.id.to_string()))
        .exec(conn)
        .await?;
    limit_change::Entity::insert(limit_change::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        tenant_id: Set(account.tenant_id.clone()),
        account_id: Set(account.id.to_string()),
        before_minor: Set(before.limit_minor),
        after_minor: Set(limit_minor),
        reason: Set(reason.to_owned()),
        created_at: Set(now),
    })
    .exec(conn)
    .await?;
    account_by_id(conn, &account.id.to_string()).await
}

/// Reserves `amount_minor` if and only if it fits under the limit, in one
/// atomic statement. Returns whether it was reserved.
pub async fn try_reserve(
    conn: &impl ConnectionTrait,
    account_id: CreditAccountId,
    amount_minor: i64,
) -> Result<bool, ApiError> {
    let result = account::Entity::update_many()
        .col_expr(
            account::Column::ReservedMinor,
            Expr::col(account::Column::ReservedMinor).add(amount_minor),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(account::Column::Id.eq(account_id.to_string()))
        .filter(
            Expr::col(account::Column::LimitMinor)
                .sub(Expr::col(account::Column::ReservedMinor))
                .sub(Expr::col(account::Column::ReceivableMinor))
                .gte(amount_minor),
        )
        .exec(conn)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Moves amounts between the running sums and bumps the version.
async fn adjust(
    conn: &impl ConnectionTrait,
    account_id: &str,
    reserved_delta: i64,
    receivable_delta: i64,
) -> Result<Account, ApiError> {
    account::Entity::update_many()
        .col_expr(
            account::Column::ReservedMinor,
            Expr::col(account::Column::ReservedMinor).add(reserved_delta),
        )
        .col_expr(
            account::Column::ReceivableMinor,
            Expr::col(account::Column::ReceivableMinor).add(receivable_delta),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(account::Column::Id.eq(account_id))
        .exec(conn)
        .await?;
    account_by_id(conn, account_id).await
}

/// A stored reservation.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub id: ReservationId,
    pub account_id: String,
    pub customer_id: CustomerId,
    pub order_id: String,
    pub amount_minor: i64,
    pub state: String,
    pub invoice_id: Option<String>,
}

fn to_reservation(row: reservation::Model) -> Result<Reservation, ApiError> {
    Ok(Reservation {
        id: row
            .id
            .parse()
            .map_err(|_| corrupt("reservation id", &row.id))?,
        customer_id: row
            .customer_id
            .parse()
            .map_err(|_| corrupt("customer id", &row.customer_id))?,
        account_id: row.account_id,
        order_id: row.order_id,
        amount_minor: row.amount_minor,
        state: row.state,
        invoice_id: row.invoice_id,
    })
}

/// Records a reservation made by [`try_reserve`].
pub async fn insert_reservation(
    conn: &impl ConnectionTrait,
    account: &Account,
    order_id: &str,
    amount_minor: i64,
) -> Result<Reservation, ApiError> {
    let id = ReservationId::new();
    let result = reservation::Entity::insert(reservation::ActiveModel {
        id: Set(id.to_string()),
        tenant_id: Set(account.tenant_id.clone()),
        account_id: Set(account.id.to_string()),
        customer_id: Set(account.exposure.customer_id.to_string()),
        order_id: Set(order_id.to_owned()),
        amount_minor: Set(amount_minor),
        state: Set(STATE_OPEN.to_owned()),
        invoice_id: Set(None),
        created_at: Set(chrono::Utc::now()),
        resolved_at: Set(None),
    })
    .exec(conn)
    .await;
    match result {
        Ok(_) => get_reservation(conn, &account.tenant_id, id).await,
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            Err(CreditError::OrderAlreadyReserved(order_id.to_owned()).into())
        }
        Err(error) => Err(error.into()),
    }
}

/// Whether `order_id` already holds a reservation (in any state).
pub async fn order_has_reservation(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    order_id: &str,
) -> Result<bool, ApiError> {
    Ok(reservation::Entity::find()
        .filter(reservation::Column::TenantId.eq(tenant_id))
        .filter(reservation::Column::OrderId.eq(order_id))
        .one(conn)
        .await?
        .is_some())
}

pub async fn get_reservation(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: ReservationId,
) -> Result<Reservation, ApiError> {
    reservation::Entity::find_by_id(id.to_string())
        .filter(reservation::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("reservation", id))
        .and_then(to_reservation)
}

fn state_name(state: &str) -> &'static str {
    match state {
        STATE_OPEN => "open",
        STATE_CONVERTED => "converted",
        STATE_RELEASED => "released",
        _ => "unknown",
    }
}

/// Moves an open reservation to `state` exactly once.
async fn resolve(
    conn: &impl ConnectionTrait,
    reservation: &Reservation,
    state: &str,
    invoice_id: Option<&str>,
) -> Result<(), ApiError> {
    let result = reservation::Entity::update_many()
        .col_expr(reservation::Column::State, Expr::value(state))
        .col_expr(
            reservation::Column::InvoiceId,
            Expr::value(invoice_id.map(str::to_owned)),
        )
        .col_expr(
            reservation::Column::ResolvedAt,
            Expr::value(Some(chrono::Utc::now())),
        )
        .filter(reservation::Column::Id.eq(reservation.id.to_string()))
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .exec(conn)
        .await?;
    if result.rows_affected == 1 {
        Ok(())
    } else {
        Err(CreditError::ReservationNotOpen("no longer open").into())
    }
}

/// Converts an open reservation into a receivable of `invoice_minor`
/// (at most the reservation); the rest of the reservation is released.
pub async fn convert(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    reservation: &Reservation,
    invoice_id: &str,
    invoice_minor: i64,
) -> Result<(Reservation, Account), ApiError> {
    if reservation.state != STATE_OPEN {
        return Err(CreditError::ReservationNotOpen(state_name(&reservation.state)).into());
    }
    resolve(conn, reservation, STATE_CONVERTED, Some(invoice_id)).await?;
    let inserted = receivable::Entity::insert(receivable::ActiveModel {
        tenant_id: Set(tenant_id.to_owned()),
        invoice_id: Set(invoice_id.to_owned()),
        account_id: Set(reservation.account_id.clone()),
        reservation_id: Set(Some(reservation.id.to_string())),
        amount_minor: Set(invoice_minor),
        open_minor: Set(invoice_minor),
        created_at: Set(chrono::Utc::now()),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(CreditError::ReceivableExists(invoice_id.to_owned()).into());
        }
        Err(error) => return Err(error.into()),
    }
    let account = adjust(
        conn,
        &reservation.account_id,
        -reservation.amount_minor,
        invoice_minor,
    )
    .await?;
    let updated = get_reservation(conn, tenant_id, reservation.id).await?;
    Ok((updated, account))
}

/// Releases an open reservation.
pub async fn release(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    reservation: &Reservation,
) -> Result<(Reservation, Account), ApiError> {
    if reservation.state != STATE_OPEN {
        return Err(CreditError::ReservationNotOpen(state_name(&reservation.state)).into());
    }
    resolve(conn, reservation, STATE_RELEASED, None).await?;
    let account = adjust(conn, &reservation.account_id, -reservation.amount_minor, 0).await?;
    let updated = get_reservation(conn, tenant_id, reservation.id).await?;
    Ok((updated, account))
}

/// Lowers the open receivable of `invoice_id` by `amount_minor`, refusing
/// to go below zero.
pub async fn settle(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    invoice_id: &str,
    amount: o2c_money::Money,
) -> Result<Account, ApiError> {
    let row = receivable::Entity::find_by_id((tenant_id.to_owned(), invoice_id.to_owned()))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("receivable for invoice", invoice_id))?;
    let owner = account_by_id(conn, &row.account_id).await?;
    if owner.exposure.currency != amount.currency() {
        return Err(CreditError::CurrencyMismatch {
            given: amount.currency(),
            account: owner.exposure.currency,
        }
        .into());
    }
    let amount_minor = amount.minor_units();
    let result = receivable::Entity::update_many()
        .col_expr(
            receivable::Column::OpenMinor,
            Expr::col(receivable::Column::OpenMinor).sub(amount_minor),
        )
        .filter(receivable::Column::TenantId.eq(tenant_id))
        .filter(receivable::Column::InvoiceId.eq(invoice_id))
        .filter(receivable::Column::OpenMinor.gte(amount_minor))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(CreditError::SettlementExceedsOpen {
            amount,
            open: owner
                .exposure
                .money(row.open_minor)
                .map_err(CreditError::from)?,
        }
        .into());
    }
    adjust(conn, &row.account_id, 0, -amount_minor).await
}

/// What a decision records.
pub struct DecisionRecord<'a> {
    pub tenant_id: &'a str,
    pub customer_id: CustomerId,
    pub order_id: &'a str,
    pub amount_minor: i64,
    pub currency: Currency,
    pub outcome: Outcome,
    pub reasons: &'a [Reason],
    pub reservation_id: Option<ReservationId>,
    /// Exposure the decision was taken against (None without an account).
    pub inputs: Option<&'a Exposure>,
}

/// Stores a documented decision and returns its id.
pub async fn insert_decision(
    conn: &impl ConnectionTrait,
    record: &DecisionRecord<'_>,
) -> Result<DecisionId, ApiError> {
    let id = DecisionId::new();
    decision::Entity::insert(decision::ActiveModel {
        id: Set(id.to_string()),
        tenant_id: Set(record.tenant_id.to_owned()),
        customer_id: Set(record.customer_id.to_string()),
        order_id: Set(record.order_id.to_owned()),
        amount_minor: Set(record.amount_minor),
        currency_code: Set(record.currency.code().to_owned()),
        outcome: Set(record.outcome.code().to_owned()),
        reasons: Set(record
            .reasons
            .iter()
            .map(|r| r.code())
            .collect::<Vec<_>>()
            .join(",")),
        reservation_id: Set(record.reservation_id.map(|r| r.to_string())),
        limit_minor: Set(record.inputs.map(|e| e.limit_minor)),
        exposure_minor: Set(record.inputs.map(|e| e.total_minor())),
        policy_version: Set(crate::domain::POLICY_VERSION.to_owned()),
        created_at: Set(chrono::Utc::now()),
    })
    .exec(conn)
    .await?;
    Ok(id)
}

/// The account's exposure recomputed from the ledger rows.
pub async fn recompute(
    conn: &impl ConnectionTrait,
    account: &Account,
) -> Result<Exposure, ApiError> {
    let reservations = reservation::Entity::find()
        .filter(reservation::Column::AccountId.eq(account.id.to_string()))
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .all(conn)
        .await?;
    let receivables = receivable::Entity::find()
        .filter(receivable::Column::AccountId.eq(account.id.to_string()))
        .all(conn)
        .await?;
    Ok(Exposure {
        reserved_minor: reservations.iter().map(|r| r.amount_minor).sum(),
        receivable_minor: receivables.iter().map(|r| r.open_minor).sum(),
        ..account.exposure
    })
}
