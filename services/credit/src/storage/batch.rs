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
    Alias, CaseStatement, CommonTableExpression, ExprTrait, Func, InsertStatement, Query,
    SelectStatement, SubQueryStatement, UnionType, UpdateStatement, WithClause, WithQuery,
};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Iterable, QueryTrait};

use super::entities::{account, alert, checked_order, decision, hold, receivable, reservation};
use super::{Account, Alert, Decision, Hold, to_account};
use crate::domain::CreditError;

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

/// Everything a batch of credit checks decides on, in one statement and so
/// in one snapshot, without locks: the accounts of `customers` in
/// `tenant_id` that neither belong to a group as members nor have members
/// (a customer missing there has no account or is in a group: its checks
/// are decided one by one, since a member's check changes its parent's
/// row), the idempotency records of `keys` in `scope`, what each of
/// `orders` was checked into before ([`orders_checked`]), and the due date
/// of the oldest open receivable of each of those accounts. What commits
/// after that snapshot and bears on a decision changes an account's
/// version (an exposure, a limit, a control, a receivable), which fails
/// the batch's write ([`write_all`]) for every account it decided an order
/// on, or collides with a row the write inserts (an idempotency key, a
/// checked order, a reservation, a hold).
///
/// One `UNION ALL`: the accounts' rows first (their columns give the
/// union its column types), then each other kind of row with the account
/// columns empty.
pub async fn read_all(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customers: &[CustomerId],
    scope: &str,
    keys: &[&str],
    orders: &[&str],
) -> Result<(HashMap<CustomerId, Account>, Found), ApiError> {
    let mut found = Found::default();
    if customers.is_empty() && keys.is_empty() && orders.is_empty() {
        return Ok((HashMap::new(), found));
    }
    // Members and parents of groups are left out below rather than here:
    // the unique index on (customer, tenant) serves this alone, whatever
    // the planner's statistics say about `parent_account_id`.
    let accounts_of = |query: &mut SelectStatement| {
        query
            .from(account::Entity)
            .and_where(account::Column::TenantId.eq(tenant_id))
            .and_where(
                account::Column::CustomerId.is_in(customers.iter().map(ToString::to_string)),
            );
    };
    let no_due = || Expr::val(Option::<NaiveDate>::None);
    let no_bytes = || Expr::val(Option::<Vec<u8>>::None);
    // Every other kind of row leaves the account's columns and
    // `has_members` empty.
    let no_account = |query: &mut SelectStatement| {
        for _ in 0..=account::Column::iter().count() {
            query.expr(Expr::cust("NULL"));
        }
    };
    // `IS NOT NULL` says what the equality implies, so that a plan that
    // hashes the members once per read (rather than probing per account)
    // reads the members' index entries, not every account's.
    let member = Alias::new("member");
    let has_members = Query::select()
        .expr(Expr::val(1))
        .from_as(account::Entity, member.clone())
        .and_where(
            Expr::col((member.clone(), account::Column::ParentAccountId))
                .equals((account::Entity, account::Column::Id)),
        )
        .and_where(Expr::col((member, account::Column::ParentAccountId)).is_not_null())
        .to_owned();
    let mut query = Query::select();
    query
        .expr_as(Expr::col(account::Column::Id), Alias::new(KEY))
        .expr_as(no_bytes(), Alias::new("request"))
        .expr_as(no_bytes(), Alias::new("response"))
        .expr_as(Expr::val(ACCOUNT), Alias::new(KIND))
        .expr_as(no_due(), Alias::new(DUE))
        .columns(account::Column::iter())
        .expr_as(Expr::exists(has_members), Alias::new(HAS_MEMBERS));
    accounts_of(&mut query);
    let mut recorded = idempotency::recorded_query(scope, keys);
    recorded
        .expr_as(Expr::val(KEY), Alias::new(KIND))
        .expr_as(no_due(), Alias::new(DUE));
    let (mut reserved, mut held) = checked_queries(tenant_id, orders);
    reserved.expr_as(no_due(), Alias::new(DUE));
    held.expr_as(no_due(), Alias::new(DUE));
    let mut ids = Query::select();
    ids.column(account::Column::Id);
    accounts_of(&mut ids);
    let mut due = Query::select()
        .expr_as(Expr::col(receivable::Column::AccountId), Alias::new(KEY))
        .expr_as(no_bytes(), Alias::new("request"))
        .expr_as(no_bytes(), Alias::new("response"))
        .expr_as(Expr::val(DUE), Alias::new(KIND))
        .expr_as(
            Func::min(Expr::col(receivable::Column::DueDate)),
            Alias::new(DUE),
        )
        .from(receivable::Entity)
        .and_where(Expr::col(receivable::Column::AccountId).in_subquery(ids))
        .and_where(receivable::Column::OpenMinor.gt(0))
        .and_where(receivable::Column::DueDate.is_not_null())
        .group_by_col(receivable::Column::AccountId)
        .to_owned();
    for other in [&mut recorded, &mut reserved, &mut held, &mut due] {
        no_account(other);
    }
    query
        .union(UnionType::All, recorded)
        .union(UnionType::All, reserved)
        .union(UnionType::All, held)
        .union(UnionType::All, due);
    let mut accounts = HashMap::new();
    for row in conn.query_all(&query).await? {
        let kind: String = row.try_get("", KIND)?;
        if kind == ACCOUNT {
            let account = to_account(account::Model::from_query_result(&row, "")?)?;
            let has_members: bool = row.try_get("", HAS_MEMBERS)?;
            if account.parent_account_id.is_none() && !has_members {
                accounts.insert(account.exposure.customer_id, account);
            }
        } else if kind == KEY {
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
    Ok((accounts, found))
}

/// What [`read_all`] found besides the accounts.
#[derive(Debug, Default)]
pub struct Found {
    /// Idempotency records, by key.
    pub recorded: HashMap<String, idempotency::Recorded>,
    /// What each order was checked into before, by order.
    pub checked: HashMap<String, CreditError>,
    /// The oldest open due date, by account id.
    pub oldest_due: HashMap<String, NaiveDate>,
}

/// The column telling what a row of [`read_all`] is: an account
/// ([`ACCOUNT`]), an idempotency record ([`KEY`]), a reservation, a hold or
/// an account's oldest due date ([`DUE`], also the column that date is in).
const KIND: &str = "kind";
const ACCOUNT: &str = "account";
/// Whether an account is the parent of a group.
const HAS_MEMBERS: &str = "has_members";
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
/// inserts (idempotency records, events). An account a batch decided
/// orders on without changing it (holds, blocks) is written as read, so
/// that it is guarded all the same. Err when an account changed since it
/// was read, or another transaction inserted one of the same keys, checked
/// orders, reservations or holds first (on PostgreSQL a database error
/// from the statement; on SQLite `Aborted` for an account).
///
/// On PostgreSQL this is one statement, whatever the batch holds, and it
/// needs no transaction around it: the update and every insert are
/// data-modifying CTEs, each of which runs exactly once, and the final
/// `SELECT` fails the statement, and so undoes all of them, unless the
/// update wrote every account. (The update waits for a row another
/// transaction is writing and then checks the version of the row that
/// transaction left.) A batch's writes thus cost one round trip, commit
/// included. SQLite has no such CTEs, and runs in process: one statement
/// each there, in the caller's transaction, which rolls back on Err.
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
                with.cte(cte(update, written.clone()));
                // Not a constant in the `ELSE`, which PostgreSQL would
                // fold (and fail) when planning.
                let expected = accounts.len();
                select
                    .expr_as(
                        Expr::cust(format!(
                            "CASE WHEN COUNT(*) = {expected} THEN COUNT(*) \
                             ELSE CAST('credit accounts changed since read: ' || COUNT(*) AS BIGINT) END"
                        )),
                        written.clone(),
                    )
                    .from(written);
            }
            None => {
                select.expr_as(Expr::val(0i64), written);
            }
        }
        for (i, insert) in inserts.into_iter().enumerate() {
            with.cte(cte(insert, Alias::new(format!("insert_{i}"))));
        }
        // Not `WithClause::query`, which copies every CTE and its values.
        let mut statement = WithQuery::new();
        statement.with_clause(with).query(select);
        match conn.query_one(&statement).await? {
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

/// A CTE named `name` of `query`, built in place: the `.to_owned()` that
/// sea-query's examples end a chain of its `&mut Self` builders with
/// copies the statement, values and all.
fn cte(query: impl Into<SubQueryStatement>, name: Alias) -> CommonTableExpression {
    let mut cte = CommonTableExpression::new();
    cte.query(query).table_name(name);
    cte
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
    /// One per order checked into a reservation or a hold.
    pub checked: Vec<checked_order::Model>,
    pub reservations: Vec<reservation::Model>,
    pub holds: Vec<Hold>,
    pub alerts: Vec<Alert>,
    pub decisions: Vec<Decision>,
}

impl Rows {
    /// One insert per table that has rows. An order that another
    /// transaction checked meanwhile fails it with a unique violation.
    fn inserts(self) -> Vec<InsertStatement> {
        fn insert<A: ActiveModelTrait>(
            rows: impl ExactSizeIterator<Item = A>,
        ) -> Option<InsertStatement> {
            (rows.len() > 0).then(|| A::Entity::insert_many(rows).into_query())
        }
        [
            insert(
                self.checked
                    .into_iter()
                    .map(checked_order::ActiveModel::from),
            ),
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
