//! Database connection. PostgreSQL in production; SQLite files as the
//! embedded default. Each service connects only to its own database.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, SqlErr};
use sea_orm_migration::MigratorTrait;

/// Connections per PostgreSQL pool.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// A pooled connection idle at least this long is pinged before it is
/// handed out (a server, proxy or firewall may have dropped it meanwhile);
/// one in use since is handed out at once. Pinging on every checkout, the
/// pool's default, costs a round trip per statement outside a transaction
/// and per transaction. The price: after a database restart, each pooled
/// connection used within this time fails one statement (up to one
/// request per connection answers UNAVAILABLE, which callers retry; every
/// mutation is idempotent) before the pool replaces it.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(10);
/// PostgreSQL plans every execution of a prepared statement with its
/// values (`plan_cache_mode = force_custom_plan` for our sessions). Its
/// default keeps a generic plan after five executions, made with the
/// statistics of the moment and kept until the table is next analyzed: a
/// lookup by `(scope, key) IN (…)` planned while a fresh table held a few
/// rows searched the index by `scope` alone and filtered every row of it,
/// so a credit check grew slower with every row until autovacuum came by
/// (the benchmark's throughput fell to a third within a minute). A custom
/// plan sees the table's current size each time, at the price of planning
/// each execution: tens of microseconds of the server's time for the
/// statements we send. (It still uses the statistics of the last
/// `ANALYZE`: indexes searched by a few ids put the id first, so a scope
/// the statistics do not know yet cannot lead the search;
/// `idempotency::KeyFirst`.) Statements that planning costs as much as
/// running go through a [`connect_fixed_plans`] pool instead.
pub const PLAN_CACHE_MODE: &str = "force_custom_plan";
/// How long a call waits for a pooled connection before failing Unavailable.
pub const ACQUIRE_TIMEOUT_MS: u64 = 5_000;
/// The same for SQLite's single connection, where queueing behind other
/// writers is the normal case under load.
pub const SQLITE_ACQUIRE_TIMEOUT_MS: u64 = 30_000;

/// Connects to `url` and applies the service's migrations.
///
/// SQLite gets one connection: SQLite admits one writer at a time anyway,
/// and a single connection makes every transaction serializable without
/// `SQLITE_BUSY` upgrades between a read and a write in one transaction.
pub async fn connect_and_migrate<M: MigratorTrait>(url: &str) -> Result<DatabaseConnection, DbErr> {
    let db = connect(url).await?;
    M::up(&db, None).await?;
    Ok(db)
}

/// Connects to `url`, creating a missing SQLite file and its directory.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let sqlite = url.starts_with("sqlite:");
    let url = if sqlite {
        prepare_sqlite(url)?
    } else {
        url.to_owned()
    };
    let mut options = pool_options(url, PLAN_CACHE_MODE, &[]);
    if sqlite {
        options
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_millis(SQLITE_ACQUIRE_TIMEOUT_MS));
    } else {
        options.max_connections(POSTGRES_MAX_CONNECTIONS);
    }
    let db = Database::connect(options).await?;
    if sqlite {
        // WAL lets readers of other processes (sqlite3 shell, backups) work
        // while we write; it persists in the file.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}

/// Connections of a [`connect_async_commit`] pool.
pub const ASYNC_COMMIT_MAX_CONNECTIONS: u32 = 2;

/// A second, small pool to the PostgreSQL database at `url` whose commits
/// do not wait for their WAL to reach the disk (`synchronous_commit = off`
/// for its sessions, PostgreSQL's asynchronous commit): a crash can lose
/// its last commits, but never half-apply one. For copies of what is
/// durable elsewhere, whose loss costs a rebuild. A write there is one
/// round trip and no flush, where a transaction that turns the setting off
/// for itself costs four round trips. None for SQLite, whose single
/// connection serves every write.
pub async fn connect_async_commit(url: &str) -> Result<Option<DatabaseConnection>, DbErr> {
    second_pool(
        url,
        PLAN_CACHE_MODE,
        &[("synchronous_commit", "off")],
        ASYNC_COMMIT_MAX_CONNECTIONS,
    )
    .await
}

/// Connections of a [`connect_fixed_plans`] pool.
pub const FIXED_PLANS_MAX_CONNECTIONS: u32 = 8;

/// A second pool to the PostgreSQL database at `url`, for a few hot
/// statements of a fixed shape that reach every table they touch through
/// an index, by the ids they name, and that cost as much to plan as to run
/// (a set-wise batch of credit checks). Its sessions keep the generic plan
/// of a prepared statement from its first execution on
/// (`plan_cache_mode = force_generic_plan`) and plan no sequential scan
/// where an index serves (`enable_seqscan = off`). The second is what makes
/// the first safe: a plan made once, with the statistics of the moment,
/// still reaches rows through the indexes after the tables grew, where a
/// plan made while a table held a few rows may scan it, and scan it again
/// for every row of another (`a_batch_stays_on_its_indexes_under_a_generic_plan_postgres`
/// in credit's tests). A table without a usable index is still scanned.
/// None for SQLite, which plans in process.
pub async fn connect_fixed_plans(url: &str) -> Result<Option<DatabaseConnection>, DbErr> {
    second_pool(
        url,
        "force_generic_plan",
        &[("enable_seqscan", "off")],
        FIXED_PLANS_MAX_CONNECTIONS,
    )
    .await
}

/// A pool of at most `max` connections to the PostgreSQL database at
/// `url`, none kept while idle, whose sessions have `plan_cache_mode` and
/// `settings`; None for SQLite.
async fn second_pool(
    url: &str,
    plan_cache_mode: &'static str,
    settings: &'static [(&'static str, &'static str)],
    max: u32,
) -> Result<Option<DatabaseConnection>, DbErr> {
    if url.starts_with("sqlite:") {
        return Ok(None);
    }
    let mut options = pool_options(url.to_owned(), plan_cache_mode, settings);
    options.min_connections(0).max_connections(max);
    Database::connect(options).await.map(Some)
}

/// What every pool of ours has: its timeouts, [`PING_AFTER_IDLE`], and on
/// PostgreSQL `plan_cache_mode` plus `settings` for each session.
fn pool_options(
    url: String,
    plan_cache_mode: &'static str,
    settings: &'static [(&'static str, &'static str)],
) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
        .connect_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
        .test_before_acquire_if_idle_for(PING_AFTER_IDLE)
        .sqlx_logging(false)
        .map_sqlx_postgres_opts(move |options| {
            options.options(
                [("plan_cache_mode", plan_cache_mode)]
                    .iter()
                    .chain(settings)
                    .copied(),
            )
        });
    options
}

fn prepare_sqlite(url: &str) -> Result<String, DbErr> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_owned());
    }
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| DbErr::Custom(format!("creating {}: {e}", dir.display())))?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}

/// True when `error` is a unique-constraint violation (a lost race).
pub fn is_unique_violation(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Creates the table of `entity` as the entity declares it (columns,
/// primary key, uniques). Used by the first migration of each table; later
/// changes get explicit `alter table` migrations.
pub async fn create_table_for<E: sea_orm::EntityTrait>(
    manager: &sea_orm_migration::SchemaManager<'_>,
    entity: E,
) -> Result<(), DbErr> {
    let schema = sea_orm::Schema::new(manager.get_database_backend());
    manager
        .create_table(
            schema
                .create_table_from_entity(entity)
                .if_not_exists()
                .to_owned(),
        )
        .await?;
    for mut index in schema.create_index_from_entity(entity) {
        manager
            .create_index(index.if_not_exists().to_owned())
            .await?;
    }
    Ok(())
}

/// Drops the table of `entity`.
pub async fn drop_table_for<E: sea_orm::EntityTrait>(
    manager: &sea_orm_migration::SchemaManager<'_>,
    entity: E,
) -> Result<(), DbErr> {
    manager
        .drop_table(sea_orm::sea_query::Table::drop().table(entity).to_owned())
        .await
}

/// Adds `definition` (of `column`) to `entity`'s table unless the table has
/// it already: each service's first migration creates tables from today's
/// entities, so a new database has every column and only older ones need
/// it added.
pub async fn add_column_if_missing<E: sea_orm::EntityTrait>(
    manager: &sea_orm_migration::SchemaManager<'_>,
    entity: E,
    column: E::Column,
    mut definition: sea_orm::sea_query::ColumnDef,
) -> Result<(), DbErr> {
    use sea_orm::IdenStatic;
    if manager
        .has_column(entity.table_name(), column.as_str())
        .await?
    {
        return Ok(());
    }
    manager
        .alter_table(
            sea_orm::sea_query::Table::alter()
                .table(entity)
                .add_column(&mut definition)
                .to_owned(),
        )
        .await
}

/// Drops `column` from `entity`'s table (undoes [`add_column_if_missing`]).
pub async fn drop_column_for<E: sea_orm::EntityTrait>(
    manager: &sea_orm_migration::SchemaManager<'_>,
    entity: E,
    column: E::Column,
) -> Result<(), DbErr> {
    manager
        .alter_table(
            sea_orm::sea_query::Table::alter()
                .table(entity)
                .drop_column(column)
                .to_owned(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_create_mode() {
        assert_eq!(
            prepare_sqlite("sqlite://x.db").unwrap(),
            "sqlite://x.db?mode=rwc"
        );
        assert_eq!(
            prepare_sqlite("sqlite://x.db?mode=ro").unwrap(),
            "sqlite://x.db?mode=ro"
        );
        assert_eq!(
            prepare_sqlite("sqlite::memory:").unwrap(),
            "sqlite::memory:"
        );
    }
}
