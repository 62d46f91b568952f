//! The credit service's own database: accounts, the ledger of reservations
//! and receivables, decisions, holds, limit changes, alerts and risk data.
//!
//! # No over-commit
//! Approval and reservation are one conditional statement per account:
//! `UPDATE credit_accounts SET reserved = reserved + :amount, … WHERE id =
//! :id AND limit - reserved - receivable >= :amount` (and, for a member of a
//! group, first the same on the parent's group exposure). The database
//! evaluates the condition against the latest committed row while holding
//! its write lock (PostgreSQL re-checks the WHERE after waiting for a
//! concurrent writer; SQLite admits one writer at a time), so no
//! interleaving of concurrent checks can approve past a limit. Rows are
//! always locked parent first, then child, so group updates cannot deadlock.
//!
//! A batch of credit checks (`batch`) decides set-wise instead: it reads
//! its accounts without locks, decides each order in memory with the same
//! condition ([`fits`]), and writes each account once, guarded by the
//! version it read; the write fails as a whole when one changed since.
//! Members of groups are left to the conditional statement above.
//!
//! # An order is checked once
//! `credit_checked_orders` has a row per order checked into a reservation
//! or a hold, inserted with it ([`claim_order`], a batch's write): two
//! transactions deciding the same order at once cannot both commit.

pub mod batch;
pub mod cache;
pub mod check;
pub mod entities;
pub mod migrations;
pub mod risk;

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use o2c_money::Currency;
use o2c_money::ids::{CreditAccountId, CustomerId, DecisionId, ReservationId};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use crate::domain::{AccountState, CreditError, Exposure, Group, Outcome, Reason};
use entities::{
    account, alert, checked_order, decision, hold, limit_change, receivable, reservation,
};

pub const STATE_OPEN: &str = "OPEN";
pub const STATE_CONVERTED: &str = "CONVERTED";
pub const STATE_RELEASED: &str = "RELEASED";
pub const STATE_EXPIRED: &str = "EXPIRED";
pub const HOLD_OPEN: &str = "OPEN";
pub const HOLD_RELEASED: &str = "RELEASED";
pub const HOLD_REJECTED: &str = "REJECTED";
pub const CHANGE_APPLIED: &str = "APPLIED";
pub const CHANGE_PENDING: &str = "PENDING_APPROVAL";
pub const CHANGE_REJECTED: &str = "REJECTED";
pub const SOURCE_MANUAL: &str = "MANUAL";
pub const SOURCE_CALCULATED: &str = "CALCULATED";

/// A stored account with its exposure and controls.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: CreditAccountId,
    pub tenant_id: String,
    pub exposure: Exposure,
    pub parent_account_id: Option<String>,
    pub limit_source: String,
    pub limit_valid_until: Option<NaiveDate>,
    pub next_review_date: Option<NaiveDate>,
    pub group_exposure_minor: i64,
    pub blocked: bool,
    pub max_order_minor: Option<i64>,
    pub risk_class: Option<String>,
    pub expiry_alerted_for: Option<NaiveDate>,
    pub review_alerted_for: Option<NaiveDate>,
}

pub(crate) fn corrupt(what: &str, value: &str) -> ApiError {
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
        parent_account_id: row.parent_account_id,
        limit_source: row.limit_source,
        limit_valid_until: row.limit_valid_until,
        next_review_date: row.next_review_date,
        group_exposure_minor: row.group_exposure_minor,
        blocked: row.blocked,
        max_order_minor: row.max_order_minor,
        risk_class: row.risk_class,
        expiry_alerted_for: row.expiry_alerted_for,
        review_alerted_for: row.review_alerted_for,
    })
}

/// Opens the account, or returns the customer's existing account: a
/// customer has one account per tenant. An existing account in another
/// currency is refused. A parent must exist in the same tenant and
/// currency and not itself belong to a group.
pub async fn open_account(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    currency: Currency,
    parent: Option<CustomerId>,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    if let Some(existing) = find_account(conn, tenant_id, customer_id).await? {
        if existing.exposure.currency != currency {
            return Err(CreditError::AccountExists(customer_id).into());
        }
        return Ok(existing);
    }
    let parent_account_id = match parent {
        None => None,
        Some(parent) if parent == customer_id => {
            return Err(CreditError::Parent("a customer cannot be its own parent").into());
        }
        Some(parent) => {
            let parent =
                find_account(conn, tenant_id, parent)
                    .await?
                    .ok_or(CreditError::Parent(
                        "the parent customer has no credit account",
                    ))?;
            if parent.exposure.currency != currency {
                return Err(
                    CreditError::Parent("the parent account is in another currency").into(),
                );
            }
            if parent.parent_account_id.is_some() {
                return Err(CreditError::Parent("the parent itself belongs to a group").into());
            }
            Some(parent.id.to_string())
        }
    };
    let id = CreditAccountId::new();
    let parent_id = parent_account_id.clone();
    let result = account::Entity::insert(account::ActiveModel {
        id: Set(id.to_string()),
        tenant_id: Set(tenant_id.to_owned()),
        customer_id: Set(customer_id.to_string()),
        currency_code: Set(currency.code().to_owned()),
        parent_account_id: Set(parent_account_id),
        limit_minor: Set(0),
        limit_source: Set(SOURCE_MANUAL.to_owned()),
        limit_valid_until: Set(None),
        next_review_date: Set(None),
        reserved_minor: Set(0),
        receivable_minor: Set(0),
        group_exposure_minor: Set(0),
        blocked: Set(false),
        max_order_minor: Set(None),
        risk_class: Set(None),
        expiry_alerted_for: Set(None),
        review_alerted_for: Set(None),
        version: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec(conn)
    .await;
    match result {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            return Err(ApiError::Aborted(format!(
                "credit account of customer {customer_id} opened concurrently; retry"
            )));
        }
        Err(error) => return Err(error.into()),
    }
    // The parent now has a member, which its row does not show: its
    // version changes, so that a credit lane that remembers it as it was
    // (`grpc::batch::Remembered`) reads it again, and leaves its orders to
    // be decided one by one as a parent's are.
    if let Some(parent) = parent_id {
        shift_group(conn, &parent, 0, now).await?;
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

/// The members of a group: the parent's children.
pub async fn children(
    conn: &impl ConnectionTrait,
    parent: &Account,
) -> Result<Vec<Account>, ApiError> {
    account::Entity::find()
        .filter(account::Column::ParentAccountId.eq(parent.id.to_string()))
        .order_by_asc(account::Column::Id)
        .all(conn)
        .await?
        .into_iter()
        .map(to_account)
        .collect()
}

/// Everything the policy needs about `account` right now.
pub async fn policy_state(
    conn: &impl ConnectionTrait,
    account: &Account,
) -> Result<AccountState, ApiError> {
    let oldest = receivable::Entity::find()
        .filter(receivable::Column::AccountId.eq(account.id.to_string()))
        .filter(receivable::Column::OpenMinor.gt(0))
        .filter(receivable::Column::DueDate.is_not_null())
        .order_by_asc(receivable::Column::DueDate)
        .one(conn)
        .await?;
    let parent = match &account.parent_account_id {
        Some(parent) => Some(account_by_id(conn, parent).await?),
        None => None,
    };
    Ok(account_state(
        account,
        oldest.and_then(|r| r.due_date),
        parent.as_ref(),
    ))
}

/// What the policy looks at for `account`, given the due date of its
/// oldest open receivable and, for a member of a group, its parent.
pub fn account_state(
    account: &Account,
    oldest_open_due: Option<NaiveDate>,
    parent: Option<&Account>,
) -> AccountState {
    let group = match parent {
        Some(parent) => Some(Group {
            limit_minor: parent.exposure.limit_minor,
            exposure_minor: parent.group_exposure_minor,
        }),
        // A parent's own orders count against its group too.
        None if account.group_exposure_minor != account.exposure.total_minor() => Some(Group {
            limit_minor: account.exposure.limit_minor,
            exposure_minor: account.group_exposure_minor,
        }),
        None => None,
    };
    AccountState {
        exposure: account.exposure,
        blocked: account.blocked,
        max_order_minor: account.max_order_minor,
        limit_valid_until: account.limit_valid_until,
        oldest_open_due,
        group,
    }
}

/// Whether `amount_minor` fits on `account`, which belongs to no group as
/// a member: the condition [`try_reserve`]'s statement checks, for a caller
/// that decides in memory and writes the account guarded by the version
/// it decided on.
pub fn fits(account: &Account, amount_minor: i64) -> bool {
    let limit = i128::from(account.exposure.limit_minor);
    let amount = i128::from(amount_minor);
    limit
        - i128::from(account.exposure.reserved_minor)
        - i128::from(account.exposure.receivable_minor)
        >= amount
        && limit - i128::from(account.group_exposure_minor) >= amount
}

/// What a limit change sets.
#[derive(Debug, Clone)]
pub struct LimitUpdate {
    pub limit_minor: i64,
    pub source: &'static str,
    pub valid_until: Option<NaiveDate>,
    pub next_review_date: Option<NaiveDate>,
    pub reason: String,
    pub actor: String,
}

/// A stored limit change.
pub type LimitChange = limit_change::Model;

/// Records a limit change: APPLIED (and applied) or PENDING_APPROVAL.
pub async fn record_limit_change(
    conn: &impl ConnectionTrait,
    account: &Account,
    update: &LimitUpdate,
    apply: bool,
    now: DateTime<Utc>,
) -> Result<(LimitChange, Account), ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    limit_change::Entity::insert(limit_change::ActiveModel {
        id: Set(id.clone()),
        tenant_id: Set(account.tenant_id.clone()),
        account_id: Set(account.id.to_string()),
        customer_id: Set(account.exposure.customer_id.to_string()),
        status: Set(if apply {
            CHANGE_APPLIED
        } else {
            CHANGE_PENDING
        }
        .to_owned()),
        before_minor: Set(account.exposure.limit_minor),
        after_minor: Set(update.limit_minor),
        source: Set(update.source.to_owned()),
        valid_until: Set(update.valid_until),
        next_review_date: Set(update.next_review_date),
        reason: Set(update.reason.clone()),
        requested_by: Set(update.actor.clone()),
        requested_at: Set(now),
        decided_by: Set(apply.then(|| update.actor.clone())),
        decided_at: Set(apply.then_some(now)),
        decision_reason: Set(None),
    })
    .exec(conn)
    .await?;
    let account = if apply {
        apply_limit(conn, account, update, now).await?
    } else {
        account.clone()
    };
    let change = limit_change::Entity::find_by_id(id.clone())
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("limit change {id} vanished")))?;
    Ok((change, account))
}

async fn apply_limit(
    conn: &impl ConnectionTrait,
    account: &Account,
    update: &LimitUpdate,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    account::Entity::update_many()
        .col_expr(account::Column::LimitMinor, Expr::value(update.limit_minor))
        .col_expr(account::Column::LimitSource, Expr::value(update.source))
        .col_expr(
            account::Column::LimitValidUntil,
            Expr::value(update.valid_until),
        )
        .col_expr(
            account::Column::NextReviewDate,
            Expr::value(update.next_review_date),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.eq(account.id.to_string()))
        .exec(conn)
        .await?;
    account_by_id(conn, &account.id.to_string()).await
}

pub async fn get_limit_change(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<LimitChange, ApiError> {
    limit_change::Entity::find_by_id(id.to_owned())
        .filter(limit_change::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("limit change", id))
}

/// Approves (applying it) or rejects a pending change, exactly once.
pub async fn decide_limit_change(
    conn: &impl ConnectionTrait,
    change: &LimitChange,
    approve: bool,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(LimitChange, Account), ApiError> {
    if change.status != CHANGE_PENDING {
        return Err(
            CreditError::LimitChangeNotPending(if change.status == CHANGE_APPLIED {
                "applied"
            } else {
                "rejected"
            })
            .into(),
        );
    }
    if change.requested_by == actor {
        return Err(CreditError::SameApprover(actor.to_owned()).into());
    }
    let result = limit_change::Entity::update_many()
        .col_expr(
            limit_change::Column::Status,
            Expr::value(if approve {
                CHANGE_APPLIED
            } else {
                CHANGE_REJECTED
            }),
        )
        .col_expr(
            limit_change::Column::DecidedBy,
            Expr::value(Some(actor.to_owned())),
        )
        .col_expr(limit_change::Column::DecidedAt, Expr::value(Some(now)))
        .col_expr(
            limit_change::Column::DecisionReason,
            Expr::value(Some(reason.to_owned())),
        )
        .filter(limit_change::Column::Id.eq(change.id.clone()))
        .filter(limit_change::Column::Status.eq(CHANGE_PENDING))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(ApiError::Aborted(
            "limit change decided concurrently".into(),
        ));
    }
    let account = account_by_id(conn, &change.account_id).await?;
    let account = if approve {
        let source = if change.source == SOURCE_CALCULATED {
            SOURCE_CALCULATED
        } else {
            SOURCE_MANUAL
        };
        let update = LimitUpdate {
            limit_minor: change.after_minor,
            source,
            valid_until: change.valid_until,
            next_review_date: change.next_review_date,
            reason: change.reason.clone(),
            actor: actor.to_owned(),
        };
        apply_limit(conn, &account, &update, now).await?
    } else {
        account
    };
    let change = get_limit_change(conn, &change.tenant_id, &change.id).await?;
    Ok((change, account))
}

/// Newest first, strictly before `before` when given.
pub async fn list_limit_changes(
    conn: &impl ConnectionTrait,
    account: &Account,
    before: Option<String>,
    limit: u64,
) -> Result<Vec<LimitChange>, ApiError> {
    let mut query = limit_change::Entity::find()
        .filter(limit_change::Column::AccountId.eq(account.id.to_string()));
    if let Some(before) = before {
        query = query.filter(limit_change::Column::Id.lt(before));
    }
    Ok(query
        .order_by_desc(limit_change::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Blocks/unblocks and sets the maximum order value.
pub async fn set_controls(
    conn: &impl ConnectionTrait,
    account: &Account,
    blocked: bool,
    max_order_minor: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    account::Entity::update_many()
        .col_expr(account::Column::Blocked, Expr::value(blocked))
        .col_expr(account::Column::MaxOrderMinor, Expr::value(max_order_minor))
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.eq(account.id.to_string()))
        .exec(conn)
        .await?;
    account_by_id(conn, &account.id.to_string()).await
}

/// Reserves `amount_minor` on `account` if and only if it fits under its
/// limit and, for a group member, under the parent's limit for the group:
/// Ok(Ok(the account as it is now)) when reserved, Ok(Err(reason)) when
/// refused.
pub async fn try_reserve(
    conn: &impl ConnectionTrait,
    account: &Account,
    amount_minor: i64,
    now: DateTime<Utc>,
) -> Result<Result<Account, Reason>, ApiError> {
    if let Some(parent) = &account.parent_account_id {
        let grew = account::Entity::update_many()
            .col_expr(
                account::Column::GroupExposureMinor,
                Expr::col(account::Column::GroupExposureMinor).add(amount_minor),
            )
            .col_expr(
                account::Column::Version,
                Expr::col(account::Column::Version).add(1),
            )
            .col_expr(account::Column::UpdatedAt, Expr::value(now))
            .filter(account::Column::Id.eq(parent.clone()))
            .filter(
                Expr::col(account::Column::LimitMinor)
                    .sub(Expr::col(account::Column::GroupExposureMinor))
                    .gte(amount_minor),
            )
            .exec(conn)
            .await?;
        if grew.rows_affected != 1 {
            return Ok(Err(Reason::GroupLimitExceeded));
        }
    }
    let reserved = account::Entity::update_many()
        .col_expr(
            account::Column::ReservedMinor,
            Expr::col(account::Column::ReservedMinor).add(amount_minor),
        )
        .col_expr(
            account::Column::GroupExposureMinor,
            Expr::col(account::Column::GroupExposureMinor).add(amount_minor),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.eq(account.id.to_string()))
        .filter(
            Expr::col(account::Column::LimitMinor)
                .sub(Expr::col(account::Column::ReservedMinor))
                .sub(Expr::col(account::Column::ReceivableMinor))
                .gte(amount_minor),
        )
        .filter(
            Expr::col(account::Column::LimitMinor)
                .sub(Expr::col(account::Column::GroupExposureMinor))
                .gte(amount_minor),
        )
        .exec_with_returning(conn)
        .await?;
    if let Some(row) = reserved.into_iter().next() {
        return to_account(row).map(Ok);
    }
    if let Some(parent) = &account.parent_account_id {
        // Undo our own group increment; still in this transaction.
        shift_group(conn, parent, -amount_minor, now).await?;
    }
    Ok(Err(Reason::OverLimit))
}

/// Whether `account`, and for a member of a group its parent's limit and
/// group exposure, are still as `state` was taken on them; locks those
/// rows (parent first) for the caller's transaction, so they stay so until
/// it ends.
pub async fn still_as_read(
    conn: &impl ConnectionTrait,
    account: &Account,
    state: &AccountState,
) -> Result<bool, ApiError> {
    let touch = || {
        account::Entity::update_many().col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version),
        )
    };
    if let (Some(parent), Some(group)) = (&account.parent_account_id, state.group) {
        let held = touch()
            .filter(account::Column::Id.eq(parent.clone()))
            .filter(account::Column::LimitMinor.eq(group.limit_minor))
            .filter(account::Column::GroupExposureMinor.eq(group.exposure_minor))
            .exec(conn)
            .await?;
        if held.rows_affected != 1 {
            return Ok(false);
        }
    }
    let held = touch()
        .filter(account::Column::Id.eq(account.id.to_string()))
        .filter(account::Column::Version.eq(account.exposure.version))
        .exec(conn)
        .await?;
    Ok(held.rows_affected == 1)
}

async fn shift_group(
    conn: &impl ConnectionTrait,
    account_id: &str,
    delta: i64,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    account::Entity::update_many()
        .col_expr(
            account::Column::GroupExposureMinor,
            Expr::col(account::Column::GroupExposureMinor).add(delta),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.eq(account_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// Moves amounts between the running sums (parent's group sum first).
pub async fn adjust(
    conn: &impl ConnectionTrait,
    account_id: &str,
    reserved_delta: i64,
    receivable_delta: i64,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    let current = account_by_id(conn, account_id).await?;
    let total_delta = reserved_delta + receivable_delta;
    if let Some(parent) = &current.parent_account_id
        && total_delta != 0
    {
        shift_group(conn, parent, total_delta, now).await?;
    }
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
            account::Column::GroupExposureMinor,
            Expr::col(account::Column::GroupExposureMinor).add(total_delta),
        )
        .col_expr(
            account::Column::Version,
            Expr::col(account::Column::Version).add(1),
        )
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
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

pub(crate) fn to_reservation(row: reservation::Model) -> Result<Reservation, ApiError> {
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

/// The row of a new open reservation of `amount_minor` on `account`.
pub fn reservation_row(
    account: &Account,
    order_id: &str,
    amount_minor: i64,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> reservation::Model {
    reservation::Model {
        id: ReservationId::new().to_string(),
        tenant_id: account.tenant_id.clone(),
        account_id: account.id.to_string(),
        customer_id: account.exposure.customer_id.to_string(),
        order_id: order_id.to_owned(),
        amount_minor,
        state: STATE_OPEN.to_owned(),
        invoice_id: None,
        created_at: now,
        expires_at,
        resolved_at: None,
    }
}

/// Records a reservation made by [`try_reserve`].
pub async fn insert_reservation(
    conn: &impl ConnectionTrait,
    account: &Account,
    order_id: &str,
    amount_minor: i64,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<Reservation, ApiError> {
    let row = reservation_row(account, order_id, amount_minor, now, expires_at);
    let result = reservation::Entity::insert(reservation::ActiveModel::from(row.clone()))
        .exec_without_returning(conn)
        .await;
    match result {
        // What was written is what is returned: no second read.
        Ok(_) => to_reservation(row),
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            Err(CreditError::OrderAlreadyReserved(order_id.to_owned()).into())
        }
        Err(error) => Err(error.into()),
    }
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
        STATE_EXPIRED => "expired",
        _ => "unknown",
    }
}

fn require_open(reservation: &Reservation) -> Result<(), ApiError> {
    if reservation.state == STATE_OPEN {
        Ok(())
    } else {
        Err(CreditError::ReservationNotOpen(state_name(&reservation.state)).into())
    }
}

/// Moves an open reservation to `state` exactly once.
async fn resolve(
    conn: &impl ConnectionTrait,
    reservation: &Reservation,
    state: &str,
    invoice_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let result = reservation::Entity::update_many()
        .col_expr(reservation::Column::State, Expr::value(state))
        .col_expr(
            reservation::Column::InvoiceId,
            Expr::value(invoice_id.map(str::to_owned)),
        )
        .col_expr(reservation::Column::ResolvedAt, Expr::value(Some(now)))
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

/// An invoice as the invoicing service reported it, in minor units of the
/// account currency.
#[derive(Debug, Clone)]
pub struct InvoiceState {
    pub invoice_id: String,
    /// The order whose reservation the invoice turns into a receivable.
    pub order_id: Option<String>,
    pub total_minor: i64,
    pub open_minor: i64,
    pub due_date: Option<NaiveDate>,
}

/// What [`sync_receivable`] did.
#[derive(Debug)]
pub struct Synced {
    pub account: Account,
    /// The order's reservation, when this invoice converted it.
    pub converted: Option<Reservation>,
    /// Whether anything changed (false for a snapshot already known).
    pub changed: bool,
}

/// The open reservation of `order_id` on `account`, if any.
async fn open_reservation_of_order(
    conn: &impl ConnectionTrait,
    account: &Account,
    order_id: &str,
) -> Result<Option<Reservation>, ApiError> {
    reservation::Entity::find()
        .filter(reservation::Column::TenantId.eq(account.tenant_id.clone()))
        .filter(reservation::Column::OrderId.eq(order_id))
        .filter(reservation::Column::AccountId.eq(account.id.to_string()))
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .one(conn)
        .await?
        .map(to_reservation)
        .transpose()
}

/// Brings the receivable of an invoice of `account` up to date.
///
/// The first report of an order's invoice converts the order's open
/// reservation (all of it is released; the invoice's open amount becomes
/// the receivable); a standalone invoice, or one whose reservation is gone,
/// becomes a receivable of its own. Afterwards the open amount only falls:
/// an issued invoice's open amount never rises, so a report no lower than
/// the recorded amount is stale or repeated and changes nothing. A
/// concurrent report of the same invoice makes this one fail with ABORTED
/// (the caller retries and then sees it).
pub async fn sync_receivable(
    conn: &impl ConnectionTrait,
    account: &Account,
    invoice: &InvoiceState,
    now: DateTime<Utc>,
) -> Result<Synced, ApiError> {
    let raced = || ApiError::Aborted("receivable changed concurrently; retry".into());
    let existing =
        receivable::Entity::find_by_id((account.tenant_id.clone(), invoice.invoice_id.clone()))
            .one(conn)
            .await?;
    if let Some(row) = existing {
        if invoice.open_minor >= row.open_minor || row.account_id != account.id.to_string() {
            return Ok(Synced {
                account: account.clone(),
                converted: None,
                changed: false,
            });
        }
        let result = receivable::Entity::update_many()
            .col_expr(
                receivable::Column::OpenMinor,
                Expr::value(invoice.open_minor),
            )
            .filter(receivable::Column::TenantId.eq(account.tenant_id.clone()))
            .filter(receivable::Column::InvoiceId.eq(invoice.invoice_id.clone()))
            .filter(receivable::Column::OpenMinor.eq(row.open_minor))
            .exec(conn)
            .await?;
        if result.rows_affected != 1 {
            return Err(raced());
        }
        let account = adjust(
            conn,
            &row.account_id,
            0,
            invoice.open_minor - row.open_minor,
            now,
        )
        .await?;
        return Ok(Synced {
            account,
            converted: None,
            changed: true,
        });
    }
    let reservation = match &invoice.order_id {
        Some(order_id) => open_reservation_of_order(conn, account, order_id).await?,
        None => None,
    };
    let released_minor = match &reservation {
        Some(reservation) => {
            resolve(
                conn,
                reservation,
                STATE_CONVERTED,
                Some(&invoice.invoice_id),
                now,
            )
            .await
            .map_err(|_| raced())?;
            reservation.amount_minor
        }
        None => 0,
    };
    let inserted = receivable::Entity::insert(receivable::ActiveModel {
        tenant_id: Set(account.tenant_id.clone()),
        invoice_id: Set(invoice.invoice_id.clone()),
        account_id: Set(account.id.to_string()),
        reservation_id: Set(reservation.as_ref().map(|r| r.id.to_string())),
        amount_minor: Set(invoice.total_minor),
        open_minor: Set(invoice.open_minor),
        due_date: Set(invoice.due_date),
        dunning_level: Set(0),
        created_at: Set(now),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if o2c_kit::db::is_unique_violation(&error) => return Err(raced()),
        Err(error) => return Err(error.into()),
    }
    let updated = adjust(
        conn,
        &account.id.to_string(),
        -released_minor,
        invoice.open_minor,
        now,
    )
    .await?;
    let converted = match reservation {
        Some(reservation) => Some(get_reservation(conn, &account.tenant_id, reservation.id).await?),
        None => None,
    };
    Ok(Synced {
        account: updated,
        converted,
        changed: true,
    })
}

/// Releases an open reservation (order cancelled) or expires it.
pub async fn release(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    reservation: &Reservation,
    state: &'static str,
    now: DateTime<Utc>,
) -> Result<(Reservation, Account), ApiError> {
    require_open(reservation)?;
    resolve(conn, reservation, state, None, now).await?;
    let account = adjust(
        conn,
        &reservation.account_id,
        -reservation.amount_minor,
        0,
        now,
    )
    .await?;
    let updated = get_reservation(conn, tenant_id, reservation.id).await?;
    Ok((updated, account))
}

/// Sets an open reservation's amount (the caller has reserved or released
/// the difference).
pub async fn set_reservation_amount(
    conn: &impl ConnectionTrait,
    reservation: &Reservation,
    amount_minor: i64,
) -> Result<(), ApiError> {
    let result = reservation::Entity::update_many()
        .col_expr(reservation::Column::AmountMinor, Expr::value(amount_minor))
        .filter(reservation::Column::Id.eq(reservation.id.to_string()))
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .filter(reservation::Column::AmountMinor.eq(reservation.amount_minor))
        .exec(conn)
        .await?;
    if result.rows_affected == 1 {
        Ok(())
    } else {
        Err(ApiError::Aborted(
            "reservation changed concurrently; retry".into(),
        ))
    }
}

/// Open reservations past their expiry, oldest first, at most `limit`.
pub async fn expired_reservations(
    conn: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<(String, Reservation)>, ApiError> {
    let rows = reservation::Entity::find()
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .filter(reservation::Column::ExpiresAt.lt(now))
        .order_by_asc(reservation::Column::ExpiresAt)
        .limit(limit)
        .all(conn)
        .await?;
    rows.into_iter()
        .map(|row| {
            let tenant = row.tenant_id.clone();
            to_reservation(row).map(|r| (tenant, r))
        })
        .collect()
}

/// What a decision records.
pub struct DecisionRecord<'a> {
    pub tenant_id: &'a str,
    pub customer_id: CustomerId,
    pub order_id: &'a str,
    /// The client's reference, on the first check of an order only.
    pub client_reference: &'a str,
    pub amount_minor: i64,
    pub currency: Currency,
    pub outcome: Outcome,
    pub reasons: &'a [Reason],
    pub reservation_id: Option<ReservationId>,
    pub hold_id: Option<String>,
    /// The inputs the policy saw, as JSON.
    pub inputs_json: String,
    pub now: DateTime<Utc>,
}

/// A stored decision.
pub type Decision = decision::Model;

/// Stores a documented decision.
pub async fn insert_decision(
    conn: &impl ConnectionTrait,
    record: &DecisionRecord<'_>,
) -> Result<Decision, ApiError> {
    let row = decision_row(record);
    decision::Entity::insert(decision::ActiveModel::from(row.clone()))
        .exec_without_returning(conn)
        .await?;
    // What was written is what is returned: no second read.
    Ok(row)
}

/// The row documenting a decision.
pub fn decision_row(record: &DecisionRecord<'_>) -> Decision {
    decision::Model {
        id: DecisionId::new().to_string(),
        tenant_id: record.tenant_id.to_owned(),
        customer_id: record.customer_id.to_string(),
        order_id: record.order_id.to_owned(),
        client_reference: record.client_reference.to_owned(),
        amount_minor: record.amount_minor,
        currency_code: record.currency.code().to_owned(),
        outcome: record.outcome.code().to_owned(),
        reasons: Reason::join(record.reasons),
        reservation_id: record.reservation_id.map(|r| r.to_string()),
        hold_id: record.hold_id.clone(),
        inputs_json: record.inputs_json.clone(),
        policy_version: crate::domain::POLICY_VERSION.to_owned(),
        created_at: record.now,
    }
}

/// Decisions of a customer or an order, newest first.
pub async fn list_decisions(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: Option<CustomerId>,
    order_id: Option<&str>,
    before: Option<String>,
    limit: u64,
) -> Result<Vec<Decision>, ApiError> {
    let mut query = decision::Entity::find().filter(decision::Column::TenantId.eq(tenant_id));
    if let Some(customer) = customer_id {
        query = query.filter(decision::Column::CustomerId.eq(customer.to_string()));
    }
    if let Some(order) = order_id {
        query = query.filter(decision::Column::OrderId.eq(order));
    }
    if let Some(before) = before {
        query = query.filter(decision::Column::Id.lt(before));
    }
    Ok(query
        .order_by_desc(decision::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// A stored hold.
pub type Hold = hold::Model;

/// The row of a new open hold of an order.
pub fn hold_row(
    account: &Account,
    order_id: &str,
    amount_minor: i64,
    reasons: &[Reason],
    now: DateTime<Utc>,
) -> Hold {
    hold::Model {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: account.tenant_id.clone(),
        account_id: account.id.to_string(),
        customer_id: account.exposure.customer_id.to_string(),
        order_id: order_id.to_owned(),
        amount_minor,
        reasons: Reason::join(reasons),
        state: HOLD_OPEN.to_owned(),
        created_at: now,
        resolved_at: None,
        resolved_by: None,
        resolution_reason: None,
        reservation_id: None,
    }
}

pub async fn insert_hold(
    conn: &impl ConnectionTrait,
    account: &Account,
    order_id: &str,
    amount_minor: i64,
    reasons: &[Reason],
    now: DateTime<Utc>,
) -> Result<Hold, ApiError> {
    let row = hold_row(account, order_id, amount_minor, reasons, now);
    let inserted = hold::Entity::insert(hold::ActiveModel::from(row.clone()))
        .exec_without_returning(conn)
        .await;
    match inserted {
        // What was written is what is returned: no second read.
        Ok(_) => Ok(row),
        Err(error) if o2c_kit::db::is_unique_violation(&error) => {
            Err(CreditError::OrderHeld(order_id.to_owned()).into())
        }
        Err(error) => Err(error.into()),
    }
}

/// The row that marks `order_id` as checked.
pub fn checked_order_row(
    tenant_id: &str,
    order_id: &str,
    now: DateTime<Utc>,
) -> checked_order::Model {
    checked_order::Model {
        tenant_id: tenant_id.to_owned(),
        order_id: order_id.to_owned(),
        created_at: now,
    }
}

/// Marks `order_id` as checked, the first time it is checked into a
/// reservation or a hold. Aborted when another transaction marked it
/// first: it checked the order while this one did (a retry is answered
/// with what that check made of it).
pub async fn claim_order(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    order_id: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let row = checked_order_row(tenant_id, order_id, now);
    match checked_order::Entity::insert(checked_order::ActiveModel::from(row))
        .exec_without_returning(conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if o2c_kit::db::is_unique_violation(&error) => Err(ApiError::Aborted(format!(
            "order {order_id} was checked concurrently; retry"
        ))),
        Err(error) => Err(error.into()),
    }
}

pub async fn get_hold(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Hold, ApiError> {
    hold::Entity::find_by_id(id.to_owned())
        .filter(hold::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("hold", id))
}

/// What an order was checked into before, if anything: a reservation (in
/// any state) or a hold. One statement asks both ([`batch::orders_checked`]
/// for one order).
pub async fn order_checked(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    order_id: &str,
) -> Result<Option<CreditError>, ApiError> {
    Ok(batch::orders_checked(conn, tenant_id, &[order_id])
        .await?
        .remove(order_id))
}

/// How many orders of the account were ever held (a risk factor).
pub async fn count_holds(conn: &impl ConnectionTrait, account_id: &str) -> Result<i64, ApiError> {
    let count = hold::Entity::find()
        .filter(hold::Column::AccountId.eq(account_id))
        .count(conn)
        .await?;
    Ok(i64::try_from(count).unwrap_or(i64::MAX))
}

/// Filters of the hold queue.
#[derive(Debug, Clone, Default)]
pub struct HoldFilter {
    pub customer_id: Option<CustomerId>,
    pub reason: Option<Reason>,
    pub state: &'static str,
}

/// Holds, oldest first, strictly after `after` when given.
pub async fn list_holds(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    filter: &HoldFilter,
    after: Option<String>,
    limit: u64,
) -> Result<Vec<Hold>, ApiError> {
    let mut query = hold::Entity::find()
        .filter(hold::Column::TenantId.eq(tenant_id))
        .filter(hold::Column::State.eq(filter.state));
    if let Some(customer) = filter.customer_id {
        query = query.filter(hold::Column::CustomerId.eq(customer.to_string()));
    }
    if let Some(reason) = filter.reason {
        // Reason codes are not substrings of one another.
        query = query.filter(hold::Column::Reasons.contains(reason.code()));
    }
    if let Some(after) = after {
        query = query.filter(hold::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(hold::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Moves an open hold to RELEASED or REJECTED exactly once.
pub async fn resolve_hold(
    conn: &impl ConnectionTrait,
    hold: &Hold,
    state: &'static str,
    actor: &str,
    reason: &str,
    reservation_id: Option<ReservationId>,
    now: DateTime<Utc>,
) -> Result<Hold, ApiError> {
    let result = hold::Entity::update_many()
        .col_expr(hold::Column::State, Expr::value(state))
        .col_expr(hold::Column::ResolvedAt, Expr::value(Some(now)))
        .col_expr(
            hold::Column::ResolvedBy,
            Expr::value(Some(actor.to_owned())),
        )
        .col_expr(
            hold::Column::ResolutionReason,
            Expr::value(Some(reason.to_owned())),
        )
        .col_expr(
            hold::Column::ReservationId,
            Expr::value(reservation_id.map(|r| r.to_string())),
        )
        .filter(hold::Column::Id.eq(hold.id.clone()))
        .filter(hold::Column::State.eq(HOLD_OPEN))
        .exec(conn)
        .await?;
    if result.rows_affected != 1 {
        return Err(CreditError::HoldNotOpen("no longer open").into());
    }
    get_hold(conn, &hold.tenant_id, &hold.id).await
}

/// Updates the reasons an open hold is held for (after a failed re-check).
pub async fn update_hold_reasons(
    conn: &impl ConnectionTrait,
    hold: &Hold,
    reasons: &[Reason],
) -> Result<(), ApiError> {
    hold::Entity::update_many()
        .col_expr(hold::Column::Reasons, Expr::value(Reason::join(reasons)))
        .filter(hold::Column::Id.eq(hold.id.clone()))
        .exec(conn)
        .await?;
    Ok(())
}

/// A stored alert.
pub type Alert = alert::Model;

/// What raises an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    ExposureThreshold,
    HoldCreated,
    LimitExpired,
    ReviewDue,
    LimitChangePending,
    Dunning,
    CollectionFailed,
}

impl AlertKind {
    pub fn code(self) -> &'static str {
        match self {
            AlertKind::ExposureThreshold => "EXPOSURE_THRESHOLD",
            AlertKind::HoldCreated => "HOLD_CREATED",
            AlertKind::LimitExpired => "LIMIT_EXPIRED",
            AlertKind::ReviewDue => "REVIEW_DUE",
            AlertKind::LimitChangePending => "LIMIT_CHANGE_PENDING",
            AlertKind::Dunning => "DUNNING",
            AlertKind::CollectionFailed => "COLLECTION_FAILED",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        [
            AlertKind::ExposureThreshold,
            AlertKind::HoldCreated,
            AlertKind::LimitExpired,
            AlertKind::ReviewDue,
            AlertKind::LimitChangePending,
            AlertKind::Dunning,
            AlertKind::CollectionFailed,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }
}

/// The row of a new alert about `account`.
pub fn alert_row(
    account: &Account,
    kind: AlertKind,
    threshold_percent: i32,
    message: String,
    order_id: Option<&str>,
    now: DateTime<Utc>,
) -> Alert {
    alert::Model {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: account.tenant_id.clone(),
        customer_id: account.exposure.customer_id.to_string(),
        kind: kind.code().to_owned(),
        threshold_percent,
        message,
        order_id: order_id.map(str::to_owned),
        raised_at: now,
        acknowledged_by: None,
        acknowledged_at: None,
    }
}

pub async fn insert_alert(
    conn: &impl ConnectionTrait,
    account: &Account,
    kind: AlertKind,
    threshold_percent: i32,
    message: String,
    order_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Alert, ApiError> {
    let row = alert_row(account, kind, threshold_percent, message, order_id, now);
    insert_alert_row(conn, &row).await?;
    // What was written is what is returned: no second read.
    Ok(row)
}

/// Stores an alert built by [`alert_row`].
pub async fn insert_alert_row(conn: &impl ConnectionTrait, row: &Alert) -> Result<(), ApiError> {
    alert::Entity::insert(alert::ActiveModel::from(row.clone()))
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

/// Alerts, newest first, strictly before `before` when given.
pub async fn list_alerts(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: Option<CustomerId>,
    unacknowledged_only: bool,
    before: Option<String>,
    limit: u64,
) -> Result<Vec<Alert>, ApiError> {
    let mut query = alert::Entity::find().filter(alert::Column::TenantId.eq(tenant_id));
    if let Some(customer) = customer_id {
        query = query.filter(alert::Column::CustomerId.eq(customer.to_string()));
    }
    if unacknowledged_only {
        query = query.filter(alert::Column::AcknowledgedBy.is_null());
    }
    if let Some(before) = before {
        query = query.filter(alert::Column::Id.lt(before));
    }
    Ok(query
        .order_by_desc(alert::Column::Id)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Acknowledges an alert (again: no change).
pub async fn acknowledge_alert(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Alert, ApiError> {
    alert::Entity::update_many()
        .col_expr(
            alert::Column::AcknowledgedBy,
            Expr::value(Some(actor.to_owned())),
        )
        .col_expr(alert::Column::AcknowledgedAt, Expr::value(Some(now)))
        .filter(alert::Column::Id.eq(id))
        .filter(alert::Column::TenantId.eq(tenant_id))
        .filter(alert::Column::AcknowledgedBy.is_null())
        .exec(conn)
        .await?;
    alert::Entity::find_by_id(id.to_owned())
        .filter(alert::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("alert", id))
}

/// Accounts whose limit expired before `today` or whose review is due by
/// `review_by`, and that were not alerted for that date yet.
pub async fn accounts_needing_date_alerts(
    conn: &impl ConnectionTrait,
    today: NaiveDate,
    review_by: NaiveDate,
    limit: u64,
) -> Result<Vec<Account>, ApiError> {
    let expired = Expr::col(account::Column::LimitValidUntil).lt(today).and(
        Expr::col(account::Column::ExpiryAlertedFor)
            .is_null()
            .or(Expr::col(account::Column::ExpiryAlertedFor)
                .ne(Expr::col(account::Column::LimitValidUntil))),
    );
    let review = Expr::col(account::Column::NextReviewDate)
        .lte(review_by)
        .and(
            Expr::col(account::Column::ReviewAlertedFor)
                .is_null()
                .or(Expr::col(account::Column::ReviewAlertedFor)
                    .ne(Expr::col(account::Column::NextReviewDate))),
        );
    account::Entity::find()
        .filter(expired.or(review))
        .order_by_asc(account::Column::Id)
        .limit(limit)
        .all(conn)
        .await?
        .into_iter()
        .map(to_account)
        .collect()
}

/// Remembers that the date alerts of `account` were raised.
pub async fn mark_date_alerts(
    conn: &impl ConnectionTrait,
    account: &Account,
    expiry_for: Option<NaiveDate>,
    review_for: Option<NaiveDate>,
) -> Result<(), ApiError> {
    let mut update =
        account::Entity::update_many().filter(account::Column::Id.eq(account.id.to_string()));
    if let Some(date) = expiry_for {
        update = update.col_expr(account::Column::ExpiryAlertedFor, Expr::value(Some(date)));
    }
    if let Some(date) = review_for {
        update = update.col_expr(account::Column::ReviewAlertedFor, Expr::value(Some(date)));
    }
    if expiry_for.is_some() || review_for.is_some() {
        update.exec(conn).await?;
    }
    Ok(())
}

/// Records the risk class of the latest score on the account.
pub async fn set_risk_class(
    conn: &impl ConnectionTrait,
    account: &Account,
    class: &str,
) -> Result<(), ApiError> {
    account::Entity::update_many()
        .col_expr(
            account::Column::RiskClass,
            Expr::value(Some(class.to_owned())),
        )
        .filter(account::Column::Id.eq(account.id.to_string()))
        .exec(conn)
        .await?;
    Ok(())
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

/// Open receivables past due, with the dunning level they were last
/// alerted at, at most `limit`.
pub async fn overdue_receivables(
    conn: &impl ConnectionTrait,
    today: NaiveDate,
    limit: u64,
) -> Result<Vec<receivable::Model>, ApiError> {
    Ok(receivable::Entity::find()
        .filter(receivable::Column::OpenMinor.gt(0))
        .filter(receivable::Column::DueDate.lt(today))
        .order_by_asc(receivable::Column::DueDate)
        .limit(limit)
        .all(conn)
        .await?)
}

/// Records that a receivable reached dunning `level` (only upwards).
pub async fn raise_dunning_level(
    conn: &impl ConnectionTrait,
    row: &receivable::Model,
    level: i32,
) -> Result<bool, ApiError> {
    let result = receivable::Entity::update_many()
        .col_expr(receivable::Column::DunningLevel, Expr::value(level))
        .filter(receivable::Column::TenantId.eq(row.tenant_id.clone()))
        .filter(receivable::Column::InvoiceId.eq(row.invoice_id.clone()))
        .filter(receivable::Column::DunningLevel.lt(level))
        .exec(conn)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Accounts of a tenant by id, strictly after `after`.
pub async fn list_accounts(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    after: Option<String>,
    limit: u64,
) -> Result<Vec<Account>, ApiError> {
    let mut query = account::Entity::find().filter(account::Column::TenantId.eq(tenant_id));
    if let Some(after) = after {
        query = query.filter(account::Column::Id.gt(after));
    }
    query
        .order_by_asc(account::Column::Id)
        .limit(limit)
        .all(conn)
        .await?
        .into_iter()
        .map(to_account)
        .collect()
}

/// The account's receivables and open reservations.
pub async fn ledger(
    conn: &impl ConnectionTrait,
    account: &Account,
) -> Result<(Vec<receivable::Model>, Vec<Reservation>), ApiError> {
    let receivables = receivable::Entity::find()
        .filter(receivable::Column::AccountId.eq(account.id.to_string()))
        .order_by_asc(receivable::Column::InvoiceId)
        .all(conn)
        .await?;
    let reservations = reservation::Entity::find()
        .filter(reservation::Column::AccountId.eq(account.id.to_string()))
        .filter(reservation::Column::State.eq(STATE_OPEN))
        .order_by_asc(reservation::Column::Id)
        .all(conn)
        .await?
        .into_iter()
        .map(to_reservation)
        .collect::<Result<_, _>>()?;
    Ok((receivables, reservations))
}
