//! Statements that serve a whole batch of credit checks at once: each reads
//! or writes the rows of every order in the batch, so a batch of any size
//! costs the same handful of round trips (see `grpc::batch`).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use o2c_money::ids::CustomerId;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{
    Alias, CaseStatement, ExprTrait, Func, LockBehavior, LockType, Query, UnionType,
};
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use super::entities::{account, alert, decision, hold, receivable, reservation};
use super::{Account, Alert, Decision, Hold, to_account};
use crate::domain::CreditError;

/// The accounts of `customers` that are not members of a group, by
/// customer, each row locked for the caller's transaction (on PostgreSQL;
/// SQLite admits one writer at a time). A row another transaction holds
/// is skipped rather than waited for, so a batch never waits for a lock
/// while holding others and is never part of a deadlock. A customer
/// missing here has no account, is a member of a group, or was busy: its
/// checks are decided one by one.
pub async fn lock_accounts(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customers: &[CustomerId],
) -> Result<HashMap<CustomerId, Account>, ApiError> {
    if customers.is_empty() {
        return Ok(HashMap::new());
    }
    account::Entity::find()
        .filter(account::Column::TenantId.eq(tenant_id))
        .filter(account::Column::CustomerId.is_in(customers.iter().map(ToString::to_string)))
        .filter(account::Column::ParentAccountId.is_null())
        .order_by_asc(account::Column::Id)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .all(conn)
        .await?
        .into_iter()
        .map(|row| to_account(row).map(|a| (a.exposure.customer_id, a)))
        .collect()
}

/// What each of `orders` was checked into before, by order: a reservation
/// (in any state, which tells more than a hold) or a hold. One statement
/// asks for all.
pub async fn orders_checked(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    orders: &[&str],
) -> Result<HashMap<String, CreditError>, ApiError> {
    if orders.is_empty() {
        return Ok(HashMap::new());
    }
    let kind = Alias::new("kind");
    let mut reserved = Query::select()
        .column(reservation::Column::OrderId)
        .expr_as(Expr::val("reserved"), kind.clone())
        .from(reservation::Entity)
        .and_where(reservation::Column::TenantId.eq(tenant_id))
        .and_where(reservation::Column::OrderId.is_in(orders.iter().copied()))
        .to_owned();
    let held = Query::select()
        .column(hold::Column::OrderId)
        .expr_as(Expr::val("held"), kind)
        .from(hold::Entity)
        .and_where(hold::Column::TenantId.eq(tenant_id))
        .and_where(hold::Column::OrderId.is_in(orders.iter().copied()))
        .to_owned();
    let query = reserved.union(UnionType::All, held).to_owned();
    let mut checked = HashMap::new();
    for row in conn.query_all(&query).await? {
        let order: String = row.try_get("", "order_id")?;
        let kind: String = row.try_get("", "kind")?;
        // A reservation tells more than a hold (one released into it).
        if kind == "reserved" {
            checked.insert(order.clone(), CreditError::OrderAlreadyReserved(order));
        } else if !checked.contains_key(&order) {
            checked.insert(order.clone(), CreditError::OrderHeld(order));
        }
    }
    Ok(checked)
}

/// The due date of the oldest open receivable of each of `accounts` that
/// has one, by account id.
pub async fn oldest_open_due(
    conn: &impl ConnectionTrait,
    accounts: &[String],
) -> Result<HashMap<String, NaiveDate>, ApiError> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Option<NaiveDate>)> = receivable::Entity::find()
        .select_only()
        .column(receivable::Column::AccountId)
        .column_as(
            Expr::from(Func::min(Expr::col(receivable::Column::DueDate))),
            "due",
        )
        .filter(receivable::Column::AccountId.is_in(accounts.iter().cloned()))
        .filter(receivable::Column::OpenMinor.gt(0))
        .filter(receivable::Column::DueDate.is_not_null())
        .group_by(receivable::Column::AccountId)
        .into_tuple()
        .all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(account, due)| due.map(|due| (account, due)))
        .collect())
}

/// Writes each account's exposure and version as a batch left them, in one
/// statement, provided each row still has the version it was read with
/// (paired with it here). Err when one changed meanwhile, which the row
/// lock rules out on PostgreSQL: the caller rolls back.
pub async fn write_accounts(
    conn: &impl ConnectionTrait,
    accounts: &[(i64, &Account)],
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let (mut reserved, mut group, mut version, mut read) = (
        CaseStatement::new(),
        CaseStatement::new(),
        CaseStatement::new(),
        CaseStatement::new(),
    );
    for (read_version, account) in accounts {
        let id = account.id.to_string();
        reserved = reserved.case(
            account::Column::Id.eq(id.clone()),
            account.exposure.reserved_minor,
        );
        group = group.case(
            account::Column::Id.eq(id.clone()),
            account.group_exposure_minor,
        );
        version = version.case(account::Column::Id.eq(id.clone()), account.exposure.version);
        read = read.case(account::Column::Id.eq(id), *read_version);
    }
    let written = account::Entity::update_many()
        .col_expr(account::Column::ReservedMinor, reserved.into())
        .col_expr(account::Column::GroupExposureMinor, group.into())
        .col_expr(account::Column::Version, version.into())
        .col_expr(account::Column::UpdatedAt, Expr::value(now))
        .filter(account::Column::Id.is_in(accounts.iter().map(|(_, a)| a.id.to_string())))
        .filter(ExprTrait::eq(
            Expr::col(account::Column::Version),
            Into::<Expr>::into(read),
        ))
        .exec(conn)
        .await?;
    if written.rows_affected != accounts.len() as u64 {
        return Err(ApiError::Aborted(
            "an account changed while a batch of credit checks held it".into(),
        ));
    }
    Ok(())
}

/// The rows a batch of credit checks adds.
#[derive(Debug, Default)]
pub struct Rows {
    pub reservations: Vec<reservation::Model>,
    pub holds: Vec<Hold>,
    pub alerts: Vec<Alert>,
    pub decisions: Vec<Decision>,
}

/// Inserts `rows`, one statement per table. A reservation or hold of an
/// order that another transaction checked meanwhile fails it with a unique
/// violation: the caller rolls back.
pub async fn insert_rows(conn: &impl ConnectionTrait, rows: Rows) -> Result<(), ApiError> {
    reservation::Entity::insert_many(
        rows.reservations
            .into_iter()
            .map(reservation::ActiveModel::from),
    )
    .exec_without_returning(conn)
    .await?;
    hold::Entity::insert_many(rows.holds.into_iter().map(hold::ActiveModel::from))
        .exec_without_returning(conn)
        .await?;
    alert::Entity::insert_many(rows.alerts.into_iter().map(alert::ActiveModel::from))
        .exec_without_returning(conn)
        .await?;
    decision::Entity::insert_many(rows.decisions.into_iter().map(decision::ActiveModel::from))
        .exec_without_returning(conn)
        .await?;
    Ok(())
}
