//! Statements that serve a whole batch of credit checks at once: each reads
//! or writes the rows of every order in the batch, so a batch of any size
//! costs the same handful of round trips (see `grpc::batch`).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use o2c_kit::idempotency;
use o2c_money::ids::CustomerId;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{
    Alias, CaseStatement, CommonTableExpression, ExprTrait, Func, InsertStatement, LockBehavior,
    LockType, Query, SelectStatement, UnionType, UpdateStatement, WithClause,
};
use sea_orm::{ConnectionTrait, DbBackend, QueryOrder, QuerySelect, QueryTrait};

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
    let (mut reserved, held) = checked_queries(tenant_id, orders);
    let query = reserved.union(UnionType::All, held).to_owned();
    let mut checked = HashMap::new();
    for row in conn.query_all(&query).await? {
        add_checked(&mut checked, &row)?;
    }
    Ok(checked)
}

/// What a batch reads once it holds its accounts' row locks, in one
/// statement: the idempotency records of `keys` in `scope`, what each of
/// `orders` was checked into before ([`orders_checked`]), and the due date
/// of the oldest open receivable of each of `accounts` that has one. Read
/// after the locks, it sees everything committed before them: a hold of one
/// of the orders by another replica, or an invoice that changed an account
/// together with its receivables.
pub async fn read_after_lock(
    conn: &impl ConnectionTrait,
    scope: &str,
    keys: &[&str],
    tenant_id: &str,
    orders: &[&str],
    accounts: &[String],
) -> Result<Found, ApiError> {
    let mut found = Found::default();
    if keys.is_empty() && orders.is_empty() && accounts.is_empty() {
        return Ok(found);
    }
    let no_due = || Expr::val(Option::<NaiveDate>::None);
    let (mut reserved, mut held) = checked_queries(tenant_id, orders);
    reserved.expr_as(no_due(), Alias::new(DUE));
    held.expr_as(no_due(), Alias::new(DUE));
    let mut query = idempotency::recorded_query(scope, keys)
        .expr_as(Expr::val(KEY), Alias::new(KIND))
        .expr_as(no_due(), Alias::new(DUE))
        .union(UnionType::All, reserved)
        .union(UnionType::All, held)
        .to_owned();
    if !accounts.is_empty() {
        let due = Query::select()
            .expr_as(Expr::col(receivable::Column::AccountId), Alias::new(KEY))
            .expr_as(Expr::val(Option::<Vec<u8>>::None), Alias::new("request"))
            .expr_as(Expr::val(Option::<Vec<u8>>::None), Alias::new("response"))
            .expr_as(Expr::val(DUE), Alias::new(KIND))
            .expr_as(
                Func::min(Expr::col(receivable::Column::DueDate)),
                Alias::new(DUE),
            )
            .from(receivable::Entity)
            .and_where(receivable::Column::AccountId.is_in(accounts.iter().cloned()))
            .and_where(receivable::Column::OpenMinor.gt(0))
            .and_where(receivable::Column::DueDate.is_not_null())
            .group_by_col(receivable::Column::AccountId)
            .to_owned();
        query.union(UnionType::All, due);
    }
    for row in conn.query_all(&query).await? {
        let kind: String = row.try_get("", KIND)?;
        if kind == KEY {
            let (key, record) = idempotency::Recorded::from_row(&row)?;
            found.recorded.insert(key, record);
        } else if kind == DUE {
            let account: String = row.try_get("", KEY)?;
            if let Some(due) = row.try_get::<Option<NaiveDate>>("", DUE)? {
                found.oldest_due.insert(account, due);
            }
        } else {
            add_checked(&mut found.checked, &row)?;
        }
    }
    Ok(found)
}

/// What [`read_after_lock`] found.
#[derive(Debug, Default)]
pub struct Found {
    /// Idempotency records, by key.
    pub recorded: HashMap<String, idempotency::Recorded>,
    /// What each order was checked into before, by order.
    pub checked: HashMap<String, CreditError>,
    /// The oldest open due date, by account id.
    pub oldest_due: HashMap<String, NaiveDate>,
}

/// The column telling what a row of [`read_after_lock`] is: an idempotency
/// record ([`KEY`]), a reservation, a hold or an account's oldest due date
/// ([`DUE`], also the column that date is in).
const KIND: &str = "kind";
const KEY: &str = "key";
const DUE: &str = "due";
const RESERVED: &str = "reserved";
const HELD: &str = "held";

/// The reservations and the holds of `orders`, in the shape of
/// [`idempotency::recorded_query`]'s rows (the order id as `key`, no
/// request or response) plus their [`KIND`].
fn checked_queries(tenant_id: &str, orders: &[&str]) -> (SelectStatement, SelectStatement) {
    (
        checked_query(
            reservation::Entity,
            reservation::Column::OrderId,
            reservation::Column::TenantId,
            RESERVED,
            tenant_id,
            orders,
        ),
        checked_query(
            hold::Entity,
            hold::Column::OrderId,
            hold::Column::TenantId,
            HELD,
            tenant_id,
            orders,
        ),
    )
}

/// One of [`checked_queries`]: the rows of `orders` in `entity`'s table.
fn checked_query<E: EntityTrait>(
    entity: E,
    order: E::Column,
    tenant: E::Column,
    kind: &str,
    tenant_id: &str,
    orders: &[&str],
) -> SelectStatement {
    Query::select()
        .expr_as(Expr::col(order), Alias::new(KEY))
        .expr_as(Expr::val(Option::<Vec<u8>>::None), Alias::new("request"))
        .expr_as(Expr::val(Option::<Vec<u8>>::None), Alias::new("response"))
        .expr_as(Expr::val(kind), Alias::new(KIND))
        .from(entity)
        .and_where(tenant.eq(tenant_id))
        .and_where(order.is_in(orders.iter().copied()))
        .to_owned()
}

/// Adds what a row of [`checked_queries`] tells to `checked`.
fn add_checked(
    checked: &mut HashMap<String, CreditError>,
    row: &sea_orm::QueryResult,
) -> Result<(), ApiError> {
    let order: String = row.try_get("", KEY)?;
    let kind: String = row.try_get("", KIND)?;
    // A reservation tells more than a hold (one released into it).
    if kind == RESERVED {
        checked.insert(order.clone(), CreditError::OrderAlreadyReserved(order));
    } else if !checked.contains_key(&order) {
        checked.insert(order.clone(), CreditError::OrderHeld(order));
    }
    Ok(())
}

/// Writes everything a set-wise batch decided: each account's exposure and
/// version as the batch left them, provided each row still has the version
/// it was read with (paired with it here), then `rows` and the `more`
/// inserts (idempotency records, events). Err when an account changed
/// meanwhile, which the row lock rules out on PostgreSQL: the caller rolls
/// back.
///
/// On PostgreSQL this is one statement, whatever the batch holds: the
/// update and every insert are data-modifying CTEs, each of which runs
/// exactly once whether or not the final `SELECT` (the count of accounts
/// written) reads it. A batch's writes thus cost one round trip rather than
/// one per table. SQLite has no such CTEs, and runs in process: one
/// statement each there.
pub async fn write_all(
    conn: &impl ConnectionTrait,
    accounts: &[(i64, &Account)],
    now: DateTime<Utc>,
    rows: Rows,
    more: Vec<InsertStatement>,
) -> Result<(), ApiError> {
    let update = accounts_update(accounts, now);
    let mut inserts = rows.inserts();
    inserts.extend(more);
    if update.is_none() && inserts.is_empty() {
        return Ok(());
    }
    let written = if conn.get_database_backend() == DbBackend::Postgres {
        let written = Alias::new("written");
        let mut with = WithClause::new();
        let mut select = Query::select();
        match update {
            Some(mut update) => {
                update.returning_col(account::Column::Id);
                with.cte(
                    CommonTableExpression::new()
                        .query(update)
                        .table_name(written.clone())
                        .to_owned(),
                );
                select
                    .expr_as(Expr::cust("COUNT(*)"), written.clone())
                    .from(written);
            }
            None => {
                select.expr_as(Expr::val(0i64), written);
            }
        }
        for (i, insert) in inserts.into_iter().enumerate() {
            with.cte(
                CommonTableExpression::new()
                    .query(insert)
                    .table_name(Alias::new(format!("insert_{i}")))
                    .to_owned(),
            );
        }
        match conn.query_one(&with.query(select)).await? {
            Some(row) => u64::try_from(row.try_get::<i64>("", "written")?).unwrap_or_default(),
            None => 0,
        }
    } else {
        let written = match update {
            Some(update) => conn.execute(&update).await?.rows_affected(),
            None => 0,
        };
        if written == accounts.len() as u64 {
            for insert in inserts {
                conn.execute(&insert).await?;
            }
        }
        written
    };
    if written != accounts.len() as u64 {
        return Err(ApiError::Aborted(
            "an account changed while a batch of credit checks held it".into(),
        ));
    }
    Ok(())
}

/// The update of [`write_all`] (None when no account changed).
fn accounts_update(accounts: &[(i64, &Account)], now: DateTime<Utc>) -> Option<UpdateStatement> {
    if accounts.is_empty() {
        return None;
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
    Some(
        account::Entity::update_many()
            .col_expr(account::Column::ReservedMinor, reserved.into())
            .col_expr(account::Column::GroupExposureMinor, group.into())
            .col_expr(account::Column::Version, version.into())
            .col_expr(account::Column::UpdatedAt, Expr::value(now))
            .filter(account::Column::Id.is_in(accounts.iter().map(|(_, a)| a.id.to_string())))
            .filter(ExprTrait::eq(
                Expr::col(account::Column::Version),
                Into::<Expr>::into(read),
            ))
            .into_query(),
    )
}

/// The rows a batch of credit checks adds.
#[derive(Debug, Default)]
pub struct Rows {
    pub reservations: Vec<reservation::Model>,
    pub holds: Vec<Hold>,
    pub alerts: Vec<Alert>,
    pub decisions: Vec<Decision>,
}

impl Rows {
    /// One insert per table that has rows. A reservation or hold of an
    /// order that another transaction checked meanwhile fails it with a
    /// unique violation: the caller rolls back.
    fn inserts(self) -> Vec<InsertStatement> {
        fn insert<A: ActiveModelTrait>(
            rows: impl ExactSizeIterator<Item = A>,
        ) -> Option<InsertStatement> {
            (rows.len() > 0).then(|| A::Entity::insert_many(rows).into_query())
        }
        [
            insert(
                self.reservations
                    .into_iter()
                    .map(reservation::ActiveModel::from),
            ),
            insert(self.holds.into_iter().map(hold::ActiveModel::from)),
            insert(self.alerts.into_iter().map(alert::ActiveModel::from)),
            insert(self.decisions.into_iter().map(decision::ActiveModel::from)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}
