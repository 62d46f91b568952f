//! The raw database baseline: the least a durable reservation can cost on
//! this PostgreSQL. One transaction per reservation: a conditional update
//! (`exposure = exposure + $amount` where `exposure + $amount <=
//! credit_limit`) and, when it matched, one `INSERT` of the reservation row,
//! through the same driver (sqlx under sea-orm) and pool size the services
//! use.

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
    TransactionTrait,
};

pub struct Raw {
    db: DatabaseConnection,
}

pub const AMOUNT: i64 = 100;

impl Raw {
    /// `accounts` accounts with room for every reservation.
    pub async fn setup(url: &str, accounts: usize, clients: usize) -> Result<Self, DbErr> {
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(clients as u32)
            .min_connections(clients as u32)
            // As pgbench: no ping before each transaction (the suite's
            // pools ping only connections idle for a while).
            .test_before_acquire(false)
            .sqlx_logging(false);
        let db = Database::connect(options).await?;
        db.execute_unprepared(
            "CREATE TABLE account (
                id BIGINT PRIMARY KEY,
                exposure BIGINT NOT NULL,
                credit_limit BIGINT NOT NULL);
             CREATE TABLE reservation (
                id UUID PRIMARY KEY,
                account_id BIGINT NOT NULL REFERENCES account (id),
                amount BIGINT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now());",
        )
        .await?;
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO account SELECT g, 0, 9000000000000 FROM generate_series(0, $1) g",
            [(accounts as i64 - 1).into()],
        ))
        .await?;
        Ok(Self { db })
    }

    /// Writes every dirty buffer of the server out now (`CHECKPOINT`), so a
    /// timed phase does not pay for a checkpoint the phases before it made
    /// due (at default settings one comes every 1 GB of WAL, under this
    /// load about once a minute). Err when the role may not: the phases
    /// then run without.
    pub async fn checkpoint(&self) -> Result<(), DbErr> {
        self.db.execute_unprepared("CHECKPOINT").await.map(|_| ())
    }

    /// One reservation of [`AMOUNT`] on `account`; true when it fit.
    pub async fn reserve(&self, account: i64) -> Result<bool, DbErr> {
        let txn = self.db.begin().await?;
        let updated = txn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE account SET exposure = exposure + $1 \
                 WHERE id = $2 AND exposure + $1 <= credit_limit",
                [AMOUNT.into(), account.into()],
            ))
            .await?;
        let fit = updated.rows_affected() == 1;
        if fit {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO reservation (id, account_id, amount) VALUES ($1, $2, $3)",
                [uuid::Uuid::new_v4().into(), account.into(), AMOUNT.into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(fit)
    }
}
