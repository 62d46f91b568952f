//! Idempotent mutations.
//!
//! Every mutating request carries an idempotency key. The first successful
//! response is stored under (scope, key) together with the encoded request:
//! a replay returns the stored response; the same key with a different
//! request is refused with INVALID_ARGUMENT on `idempotency_key` and changes
//! nothing. Failed requests store nothing, so they can be retried.
//!
//! Local mutations use [`begin`] and [`commit`]: the record is written in the same database
//! transaction as the effect, so the two commit or vanish together.
//! Orchestrations that call other services (the gateway) use [`claim`] and
//! [`complete`]: the claim pins the request to the key before any remote
//! effect, and every remote step is itself idempotent under a derived key,
//! so a retry after a crash finishes the same work instead of repeating it.

use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, DatabaseTransaction, QueryTrait, TransactionTrait};

use crate::ApiError;
use crate::db::is_unique_violation;

/// Longest accepted idempotency key.
pub const MAX_KEY_LENGTH: usize = 200;
/// Attempts when a concurrent request with the same key wins the race.
const MAX_ATTEMPTS: usize = 3;

pub mod entity {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        // The tenant and operation, e.g. "t1/credit.CheckAndReserve".
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        // The encoded request: a replay must match it byte for byte.
        pub request: Vec<u8>,
        // The encoded first response; None while a claim is in progress.
        pub response: Option<Vec<u8>>,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// Checks the key's shape; the error names the field.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.trim().is_empty() {
        return Err(ApiError::invalid("idempotency_key", "required"));
    }
    if key.len() > MAX_KEY_LENGTH {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!("at most {MAX_KEY_LENGTH} characters"),
        ));
    }
    Ok(())
}

/// What an idempotency record keeps of a secret field (an agency
/// reference, a processor token): a tenant-salted SHA-256, so a replay with
/// the same secret matches and the secret itself is never stored.
pub fn pin_secret(tenant_id: &str, secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{tenant_id}\0{secret}").as_bytes()))
}

fn reused() -> ApiError {
    ApiError::invalid("idempotency_key", "already used with a different request")
}

fn decode<R: prost::Message + Default>(bytes: &[u8]) -> Result<R, ApiError> {
    R::decode(bytes).map_err(|e| ApiError::Internal(format!("stored response undecodable: {e}")))
}

/// The stored record of `key`, with its response once there is one.
fn record(
    scope: &str,
    key: &str,
    request: &[u8],
    response: Option<Vec<u8>>,
) -> entity::ActiveModel {
    entity::ActiveModel {
        scope: Set(scope.to_owned()),
        key: Set(key.to_owned()),
        request: Set(request.to_vec()),
        response: Set(response),
        created_at: Set(chrono::Utc::now()),
    }
}

/// The answer to a request whose key another request holds right now.
pub fn concurrent() -> ApiError {
    ApiError::Aborted("concurrent requests with the same idempotency key; retry".into())
}

/// The outcome of [`begin`].
pub enum Begun<R> {
    /// The key was used before with this request: return this response.
    Replay(R),
    /// First use: do the work inside this transaction, then [`commit`].
    Fresh(DatabaseTransaction),
}

/// Starts an idempotent mutation: returns the stored response on a replay,
/// or a transaction to do the work in.
pub async fn begin<R>(
    db: &DatabaseConnection,
    scope: &str,
    key: &str,
    request: &[u8],
) -> Result<Begun<R>, ApiError>
where
    R: prost::Message + Default,
{
    validate_key(key)?;
    let txn = db.begin().await?;
    match stored::<R>(&txn, scope, key, request).await? {
        Some(response) => {
            txn.rollback().await?;
            Ok(Begun::Replay(response))
        }
        None => Ok(Begun::Fresh(txn)),
    }
}

/// Records `response` under (scope, key) in `txn` and commits both. When a
/// concurrent request with the same key committed first, ours is rolled
/// back and theirs is returned, so every caller sees one outcome.
pub async fn commit<R>(
    db: &DatabaseConnection,
    txn: DatabaseTransaction,
    scope: &str,
    key: &str,
    request: &[u8],
    response: R,
) -> Result<R, ApiError>
where
    R: prost::Message + Default,
{
    let stored_record = record(scope, key, request, Some(response.encode_to_vec()));
    match entity::Entity::insert(stored_record).exec(&txn).await {
        Ok(_) => {
            txn.commit().await?;
            Ok(response)
        }
        Err(error) if is_unique_violation(&error) => {
            txn.rollback().await?;
            stored::<R>(db, scope, key, request)
                .await?
                .ok_or_else(concurrent)
        }
        Err(error) => Err(error.into()),
    }
}

/// The stored response for (scope, key), checking the request matches.
/// The response recorded for `key` as read in `conn` (a transaction the
/// caller already holds, where several requests share one commit), or
/// None when the key is new; as [`begin`] it refuses a different request
/// under the same key.
pub async fn stored_in<R>(
    conn: &impl ConnectionTrait,
    scope: &str,
    key: &str,
    request: &[u8],
) -> Result<Option<R>, ApiError>
where
    R: prost::Message + Default,
{
    stored(conn, scope, key, request).await
}

/// What was recorded for one key: the request, and its response once
/// there is one.
#[derive(Debug, Clone)]
pub struct Recorded {
    request: Vec<u8>,
    response: Option<Vec<u8>>,
}

impl From<entity::Model> for Recorded {
    fn from(row: entity::Model) -> Self {
        Self {
            request: row.request,
            response: row.response,
        }
    }
}

impl Recorded {
    /// The key and record in a row of [`recorded_query`].
    pub fn from_row(row: &sea_orm::QueryResult) -> Result<(String, Self), DbErr> {
        Ok((
            row.try_get("", "key")?,
            Self {
                request: row.try_get("", "request")?,
                response: row.try_get("", "response")?,
            },
        ))
    }

    /// A record of `response` to `request`.
    pub fn of<R: prost::Message>(request: &[u8], response: &R) -> Self {
        Self {
            request: request.to_vec(),
            response: Some(response.encode_to_vec()),
        }
    }

    /// The response to replay for `request`; as [`stored_in`] it refuses a
    /// different request under the same key.
    pub fn replay<R: prost::Message + Default>(&self, request: &[u8]) -> Result<R, ApiError> {
        if self.request != request {
            return Err(reused());
        }
        match &self.response {
            Some(bytes) => decode(bytes),
            None => Err(ApiError::Aborted(
                "a request with this idempotency key is in progress".into(),
            )),
        }
    }
}

/// The records of `keys` in `scope` as read in `conn`, by key: what
/// [`stored_in`] finds for each, in one statement for a batch of requests.
pub async fn recorded_in(
    conn: &impl ConnectionTrait,
    scope: &str,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, Recorded>, ApiError> {
    if keys.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    conn.query_all(&recorded_query(scope, keys))
        .await?
        .iter()
        .map(|row| Recorded::from_row(row).map_err(ApiError::from))
        .collect()
}

/// The query [`recorded_in`] runs: one `(key, request, response)` row per
/// key recorded, for a caller that reads other rows in the same statement
/// (a `UNION` with rows of that shape) and takes these apart with
/// [`Recorded::from_row`].
pub fn recorded_query(scope: &str, keys: &[&str]) -> sea_orm::sea_query::SelectStatement {
    sea_orm::sea_query::Query::select()
        .columns([
            entity::Column::Key,
            entity::Column::Request,
            entity::Column::Response,
        ])
        .from(entity::Entity)
        .and_where(entity::Column::Scope.eq(scope))
        .and_where(entity::Column::Key.is_in(keys.iter().copied()))
        .to_owned()
}

/// Records `response` for `key` in `conn`, the caller's transaction, which
/// the caller commits. A concurrent request that recorded the key first
/// makes this fail with [`is_unique_violation`] on the returned error's
/// cause: the caller rolls back and answers with [`stored_in`] afterwards.
pub async fn record_in<R>(
    conn: &impl ConnectionTrait,
    scope: &str,
    key: &str,
    request: &[u8],
    response: &R,
) -> Result<(), DbErr>
where
    R: prost::Message + Default,
{
    record_all_in(conn, scope, &[(key, request, response.encode_to_vec())]).await
}

/// Records the response of each `(key, request, response)` in `scope` in
/// one statement, in `conn`, the caller's transaction: [`record_in`] for a
/// batch of requests sharing one commit. A concurrent request that recorded
/// one of the keys first fails the whole statement with
/// [`is_unique_violation`]; the caller rolls back and decides again.
pub async fn record_all_in(
    conn: &impl ConnectionTrait,
    scope: &str,
    records: &[(&str, &[u8], Vec<u8>)],
) -> Result<(), DbErr> {
    match insert_all(scope, records) {
        Some(insert) => conn.execute(&insert).await.map(|_| ()),
        None => Ok(()),
    }
}

/// The statement [`record_all_in`] runs, for a caller that runs it as part
/// of a larger one (None when there is nothing to record).
pub fn insert_all(
    scope: &str,
    records: &[(&str, &[u8], Vec<u8>)],
) -> Option<sea_orm::sea_query::InsertStatement> {
    if records.is_empty() {
        return None;
    }
    Some(
        entity::Entity::insert_many(
            records.iter().map(|(key, request, response)| {
                record(scope, key, request, Some(response.clone()))
            }),
        )
        .into_query(),
    )
}

async fn stored<R>(
    conn: &impl ConnectionTrait,
    scope: &str,
    key: &str,
    request: &[u8],
) -> Result<Option<R>, ApiError>
where
    R: prost::Message + Default,
{
    match entity::Entity::find_by_id((scope.to_owned(), key.to_owned()))
        .one(conn)
        .await?
    {
        Some(found) => Recorded::from(found).replay(request).map(Some),
        None => Ok(None),
    }
}

/// The state of a claimed key.
#[derive(Debug)]
pub enum Claim<R> {
    /// First use of the key: do the work, then [`complete`] (or
    /// [`release`] if it fails before any effect).
    Fresh,
    /// An earlier attempt with this very request stopped midway: redo the
    /// work (every step is idempotent), then [`complete`].
    Resumed,
    /// Done before: return this response.
    Done(R),
}

/// What an existing record of `key` means for a claim of `request`.
async fn claimed<R, C>(
    conn: &C,
    scope: &str,
    key: &str,
    request: &[u8],
) -> Result<Option<Claim<R>>, ApiError>
where
    R: prost::Message + Default,
    C: ConnectionTrait,
{
    let Some(found) = entity::Entity::find_by_id((scope.to_owned(), key.to_owned()))
        .one(conn)
        .await?
    else {
        return Ok(None);
    };
    if found.request != request {
        return Err(reused());
    }
    Ok(Some(match found.response {
        Some(bytes) => Claim::Done(decode(&bytes)?),
        None => Claim::Resumed,
    }))
}

/// Pins `request` to (scope, key) before any remote effect.
pub async fn claim<R, C>(
    conn: &C,
    scope: &str,
    key: &str,
    request: &[u8],
) -> Result<Claim<R>, ApiError>
where
    R: prost::Message + Default,
    C: ConnectionTrait,
{
    validate_key(key)?;
    for _ in 0..MAX_ATTEMPTS {
        if let Some(found) = claimed(conn, scope, key, request).await? {
            return Ok(found);
        }
        match entity::Entity::insert(record(scope, key, request, None))
            .exec(conn)
            .await
        {
            Ok(_) => return Ok(Claim::Fresh),
            Err(error) if is_unique_violation(&error) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(concurrent())
}

/// Stores the response of a claimed key.
pub async fn complete<R, C>(conn: &C, scope: &str, key: &str, response: &R) -> Result<(), ApiError>
where
    R: prost::Message,
    C: ConnectionTrait,
{
    entity::Entity::update_many()
        .col_expr(
            entity::Column::Response,
            Expr::value(Some(response.encode_to_vec())),
        )
        .filter(entity::Column::Scope.eq(scope))
        .filter(entity::Column::Key.eq(key))
        .exec(conn)
        .await?;
    Ok(())
}

/// Forgets a claim whose work failed before any remote effect, so the
/// caller may correct the request and reuse the key.
pub async fn release<C>(conn: &C, scope: &str, key: &str) -> Result<(), ApiError>
where
    C: ConnectionTrait,
{
    entity::Entity::delete_many()
        .filter(entity::Column::Scope.eq(scope))
        .filter(entity::Column::Key.eq(key))
        .filter(entity::Column::Response.is_null())
        .exec(conn)
        .await?;
    Ok(())
}

/// The migration creating `idempotency_keys`; every service includes it.
pub struct Migration;

impl sea_orm_migration::MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000000_idempotency_keys"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for Migration {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        crate::db::create_table_for(manager, entity::Entity).await
    }

    async fn down(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        crate::db::drop_table_for(manager, entity::Entity).await
    }
}

/// Puts the key before the scope in `idempotency_keys`' primary key on
/// PostgreSQL. A lookup is by scope and a few keys; with the scope first,
/// statistics taken while a scope was new (a new tenant, a fresh database)
/// had the planner search the index by scope alone and filter every key
/// of it, a cost that grew with every key of the scope until the table was
/// next analyzed (the benchmark caught reads of 22,000 entries for nine
/// keys). With the key first the index is searched by the keys, whatever
/// the statistics say. SQLite's planner prefers the index that matches
/// more columns by itself: nothing changes there.
pub struct KeyFirst;

impl sea_orm_migration::MigrationName for KeyFirst {
    fn name(&self) -> &str {
        "m20261205_000010_idempotency_key_first"
    }
}

impl KeyFirst {
    async fn primary_key(
        manager: &sea_orm_migration::SchemaManager<'_>,
        columns: &str,
    ) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "ALTER TABLE idempotency_keys DROP CONSTRAINT \"pk-idempotency_keys\", \
                 ADD CONSTRAINT \"pk-idempotency_keys\" PRIMARY KEY ({columns})"
            ))
            .await
            .map(|_| ())
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for KeyFirst {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        Self::primary_key(manager, "key, scope").await
    }

    async fn down(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        Self::primary_key(manager, "scope, key").await
    }
}
