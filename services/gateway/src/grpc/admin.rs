//! `o2c.gateway.v1.AdminService`: API keys. Creating and rotating are not
//! replayed by idempotency key, since a replay would have to keep the
//! secret it showed; a retried creation makes a second key, which the
//! admin can revoke. Revoking is idempotent by nature.

use std::sync::Arc;

use o2c_kit::ApiError;
use o2c_kit::fields::{self, Violations};
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use crate::auth::Role;
use crate::auth::keys::{self, KeyRecord, KeyStore};

/// Longest grace of a rotated key.
pub const MAX_GRACE_SECONDS: i32 = 7 * 24 * 3600;

pub struct AdminApi {
    keys: Arc<KeyStore>,
}

impl AdminApi {
    pub fn new(keys: Arc<KeyStore>) -> Self {
        Self { keys }
    }
}

fn admin() -> Result<String, Status> {
    o2c_kit::auth::current()
        .and_then(|c| c.user)
        .ok_or_else(|| Status::unauthenticated("no caller"))
}

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::PlatformClient => pb::Role::PlatformClient,
        Role::CreditAnalyst => pb::Role::CreditAnalyst,
        Role::CrmConnector => pb::Role::CrmConnector,
        Role::Admin => pb::Role::Admin,
    }
}

fn role_from_proto(value: i32) -> Option<Role> {
    match pb::Role::try_from(value).ok()? {
        pb::Role::PlatformClient => Some(Role::PlatformClient),
        pb::Role::CreditAnalyst => Some(Role::CreditAnalyst),
        pb::Role::CrmConnector => Some(Role::CrmConnector),
        pb::Role::Admin => Some(Role::Admin),
        pb::Role::Unspecified => None,
    }
}

fn rfc3339(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn to_proto(key: &KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        key_id: key.id.clone(),
        tenant_id: key.tenant_id.clone(),
        roles: key.roles.iter().map(|r| role_to_proto(*r) as i32).collect(),
        label: key.label.clone(),
        created_at: rfc3339(key.created_at),
        expires_at: key.expires_at.map(rfc3339).unwrap_or_default(),
        created_by: key.created_by.clone(),
    }
}

fn key_id(value: &str) -> Result<String, ApiError> {
    if value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_owned())
    } else {
        Err(ApiError::invalid("key_id", "32 hexadecimal digits"))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let admin = admin()?;
        let request = request.into_inner();
        let mut v = Violations::default();
        // An admin acts on any tenant's keys: checked as a name only.
        let tenant = v.check(tenant_name(&request.tenant_id));
        let label = v.check(fields::text("label", &request.label, 100));
        let mut roles = Vec::new();
        for (index, value) in request.roles.iter().enumerate() {
            match role_from_proto(*value) {
                Some(role) if !roles.contains(&role) => roles.push(role),
                Some(_) => {}
                None => {
                    v.check::<()>(Err(ApiError::invalid(
                        format!("roles[{index}]"),
                        "PLATFORM_CLIENT, CREDIT_ANALYST, CRM_CONNECTOR or ADMIN",
                    )));
                }
            }
        }
        if request.roles.is_empty() {
            v.check::<()>(Err(ApiError::invalid("roles", "at least one")));
        }
        if roles.contains(&Role::Admin) && request.tenant_id != keys::PLATFORM_TENANT {
            v.check::<()>(Err(ApiError::invalid(
                "roles",
                format!("ADMIN only for the tenant {}", keys::PLATFORM_TENANT),
            )));
        }
        v.finish()?;
        let (Some(tenant), Some(label)) = (tenant, label) else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let (_, secret) = keys::generate()?;
        let key = self
            .keys
            .insert(&secret, &tenant, &roles, &label, &admin)
            .await?;
        tracing::info!(key = %key.id, tenant = %tenant, admin = %admin, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(to_proto(&key)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(tenant_name(&request.tenant_id));
        let size = v.check(fields::page_size("page_size", request.page_size));
        let before = if request.page_token.is_empty() {
            Some(None)
        } else {
            v.check(
                key_id(&request.page_token)
                    .map(Some)
                    .map_err(|_| ApiError::invalid("page_token", "not a token this API issued")),
            )
        };
        v.finish()?;
        let (Some(tenant), Some(size), Some(before)) = (tenant, size, before) else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let keys = self.keys.list(&tenant, before.as_deref(), size).await?;
        let next_page_token = if keys.len() as u64 == size {
            keys.last().map(|k| k.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        let admin = admin()?;
        let request = request.into_inner();
        let mut v = Violations::default();
        let id = v.check(key_id(&request.key_id));
        if !(0..=MAX_GRACE_SECONDS).contains(&request.grace_seconds) {
            v.check::<()>(Err(ApiError::invalid(
                "grace_seconds",
                format!("0 to {MAX_GRACE_SECONDS}"),
            )));
        }
        v.finish()?;
        let Some(id) = id else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let old = self.keys.get(&id).await?;
        let now = chrono::Utc::now();
        if old.expires_at.is_some_and(|end| end <= now) {
            return Err(ApiError::FailedPrecondition(format!("key {id} has ended")).into());
        }
        let (_, secret) = keys::generate()?;
        let key = self
            .keys
            .insert(&secret, &old.tenant_id, &old.roles, &old.label, &admin)
            .await?;
        let replaced = self
            .keys
            .expire(
                &id,
                now + chrono::Duration::seconds(i64::from(request.grace_seconds)),
            )
            .await?;
        tracing::info!(old = %id, new = %key.id, admin = %admin, "API key rotated");
        Ok(Response::new(pb::RotateApiKeyResponse {
            key: Some(to_proto(&key)),
            secret,
            replaced: Some(to_proto(&replaced)),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let admin = admin()?;
        let request = request.into_inner();
        let mut v = Violations::default();
        let id = v.check(key_id(&request.key_id));
        let reason = v.check(fields::text("reason", &request.reason, 500));
        v.finish()?;
        let (Some(id), Some(reason)) = (id, reason) else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let key = self.keys.expire(&id, chrono::Utc::now()).await?;
        tracing::info!(key = %id, admin = %admin, %reason, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key: Some(to_proto(&key)),
        }))
    }
}

/// A tenant id checked for form only (admins manage every tenant's keys).
fn tenant_name(value: &str) -> Result<String, ApiError> {
    fields::tenant_id_format("tenant_id", value)
}
