//! API keys: `o2c_<key id>_<secret>`, 32 hex digits of id and 64 of
//! random secret. The gateway keeps the id, the tenant, the roles and the
//! SHA-256 of the secret; the whole key is shown once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{DatabaseConnection, QueryOrder, QuerySelect};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Principal, Role};
use crate::storage::entities::api_key;
use o2c_kit::ApiError;

/// How long a verified key is trusted without reading it again: a
/// revocation takes effect on every replica within this time.
pub const CACHE_FOR: Duration = Duration::from_secs(5);
/// The tenant of bootstrap admin keys.
pub const PLATFORM_TENANT: &str = "platform";

/// The parts of a well-formed key: (id, secret).
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("o2c_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 32) && hex(secret, 64)).then_some((id, secret))
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new key: (id, whole key).
pub fn generate() -> Result<(String, String), ApiError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| ApiError::Internal(format!("no randomness for a key: {e}")))?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let key = format!("o2c_{id}_{}", hex::encode(secret));
    Ok((id, key))
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant_id: String,
    pub roles: Vec<Role>,
    pub label: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

fn record(row: &api_key::Model) -> KeyRecord {
    KeyRecord {
        id: row.id.clone(),
        tenant_id: row.tenant_id.clone(),
        roles: row.roles.split(',').filter_map(Role::from_code).collect(),
        label: row.label.clone(),
        created_by: row.created_by.clone(),
        created_at: row.created_at,
        expires_at: row.expires_at,
    }
}

/// The gateway's keys, with a short cache of verified ones.
pub struct KeyStore {
    db: DatabaseConnection,
    /// Verified rows, and ids known not to exist (`None`), with when they
    /// were read: a flood of made-up keys costs one query per id per
    /// [`CACHE_FOR`], not one per call.
    cache: Mutex<HashMap<String, (Option<api_key::Model>, Instant)>>,
}

/// Most entries the key cache holds before it is cleared.
pub const CACHE_ENTRIES: usize = 100_000;

impl KeyStore {
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn row(&self, id: &str) -> Result<Option<api_key::Model>, ApiError> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(id).cloned())
            .filter(|(_, at)| at.elapsed() < CACHE_FOR)
            .map(|(row, _)| row);
        if let Some(row) = cached {
            return Ok(row);
        }
        let row = api_key::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(id.to_owned(), (row.clone(), Instant::now()));
        }
        Ok(row)
    }

    fn forget(&self, id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(id);
        }
    }

    /// The caller `key` names, if it is a live key.
    pub async fn verify(&self, key: &str) -> Result<Principal, ApiError> {
        let refused = || ApiError::Unauthenticated("unknown, revoked or expired API key".into());
        let (id, secret) = parse(key).ok_or_else(refused)?;
        let row = self.row(id).await?.ok_or_else(refused)?;
        let matches: bool = digest(secret)
            .as_bytes()
            .ct_eq(row.secret_sha256.as_bytes())
            .into();
        if !matches || row.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(refused());
        }
        Ok(Principal {
            tenant: row.tenant_id.clone(),
            subject: format!("key:{}", row.id),
            roles: record(&row).roles,
        })
    }

    /// Records `key` (whole) for `tenant` with `roles`.
    pub async fn insert(
        &self,
        key: &str,
        tenant: &str,
        roles: &[Role],
        label: &str,
        created_by: &str,
    ) -> Result<KeyRecord, ApiError> {
        let (id, secret) =
            parse(key).ok_or_else(|| ApiError::Internal("malformed generated key".into()))?;
        let row = api_key::ActiveModel {
            id: Set(id.to_owned()),
            tenant_id: Set(tenant.to_owned()),
            roles: Set(roles.iter().map(|r| r.code()).collect::<Vec<_>>().join(",")),
            label: Set(label.to_owned()),
            secret_sha256: Set(digest(secret)),
            created_by: Set(created_by.to_owned()),
            created_at: Set(Utc::now()),
            expires_at: Set(None),
        };
        let inserted = api_key::Entity::insert(row)
            .exec_with_returning(&self.db)
            .await?;
        self.forget(id);
        Ok(record(&inserted))
    }

    /// Records the bootstrap admin key unless it is already there.
    pub async fn ensure_bootstrap(&self, key: &str) -> Result<(), ApiError> {
        let (id, _) =
            parse(key).ok_or_else(|| ApiError::invalid("bootstrap_admin_key", "malformed"))?;
        if api_key::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .is_none()
        {
            self.insert(
                key,
                PLATFORM_TENANT,
                &[Role::Admin],
                "bootstrap",
                "settings",
            )
            .await?;
        }
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, ApiError> {
        api_key::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .map(|row| record(&row))
            .ok_or_else(|| ApiError::not_found("API key", id))
    }

    /// A tenant's keys, newest first, strictly before `before`.
    pub async fn list(
        &self,
        tenant: &str,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyRecord>, ApiError> {
        let mut query = api_key::Entity::find().filter(api_key::Column::TenantId.eq(tenant));
        if let Some(before) = before {
            query = query.filter(api_key::Column::Id.lt(before));
        }
        Ok(query
            .order_by_desc(api_key::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .iter()
            .map(record)
            .collect())
    }

    /// Ends `id` at `at` (now: revoked), keeping an earlier end.
    pub async fn expire(&self, id: &str, at: DateTime<Utc>) -> Result<KeyRecord, ApiError> {
        let current = self.get(id).await?;
        if current.expires_at.is_none_or(|end| end > at) {
            api_key::Entity::update_many()
                .col_expr(api_key::Column::ExpiresAt, Expr::value(Some(at)))
                .filter(api_key::Column::Id.eq(id))
                .exec(&self.db)
                .await?;
        }
        self.forget(id);
        self.get(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_malformed_ones_do_not() {
        let (id, key) = generate().unwrap();
        let (parsed_id, secret) = parse(&key).unwrap();
        assert_eq!(parsed_id, id);
        assert_eq!(secret.len(), 64);
        let (_, other) = generate().unwrap();
        assert_ne!(key, other, "random");
        for bad in [
            "",
            "o2c_",
            "o2c_abc_def",
            &key[..key.len() - 1],
            &key.replace("o2c_", "o3c_"),
            &format!("{key}0"),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
