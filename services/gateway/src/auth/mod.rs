//! Who may call the gateway, and how much.
//!
//! Every call carries a credential: a JWT from a configured issuer
//! (`authorization: Bearer …`) or an API key (`authorization: ApiKey …` or
//! `x-api-key`). [`GatewayAuthLayer`] authenticates it, checks the role the
//! method needs ([`required_roles`]), spends one token of the tenant's rate
//! budget ([`limit::RateLimiter`]), and runs the call in the caller's
//! [`o2c_kit::auth::CallContext`] (tenant, user, deadline), which the
//! handlers read and every internal call carries on.

pub mod jwt;
pub mod keys;
pub mod limit;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::codegen::http;

use o2c_kit::ApiError;
use o2c_kit::auth::CallContext;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Customers, orders, invoices, payments.
    PlatformClient,
    /// Limits, holds, alerts, limit approvals, scores, reconciliation.
    CreditAnalyst,
    /// A CRM syncing through the connector.
    CrmConnector,
    /// API keys.
    Admin,
}

impl Role {
    pub fn code(self) -> &'static str {
        match self {
            Role::PlatformClient => "platform_client",
            Role::CreditAnalyst => "credit_analyst",
            Role::CrmConnector => "crm_connector",
            Role::Admin => "admin",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "platform_client" => Some(Role::PlatformClient),
            "credit_analyst" => Some(Role::CreditAnalyst),
            "crm_connector" => Some(Role::CrmConnector),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    /// The user (JWT `sub`) or the key (`key:<id>`), kept in audits.
    pub subject: String,
    pub roles: Vec<Role>,
}

const CLIENT: &[Role] = &[Role::PlatformClient];
const ANALYST: &[Role] = &[Role::CreditAnalyst];
const CLIENT_OR_ANALYST: &[Role] = &[Role::PlatformClient, Role::CreditAnalyst];
const ADMIN: &[Role] = &[Role::Admin];
const CRM: &[Role] = &[Role::CrmConnector];

/// The roles that may call `path` (`/package.Service/Method`); `None` for
/// a method this gateway does not know, which nobody may call.
pub fn required_roles(path: &str) -> Option<&'static [Role]> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match service {
        "o2c.gateway.v1.AdminService" => Some(ADMIN),
        "o2c.crm_sync.v1.CrmSyncService" => Some(CRM),
        "o2c.gateway.v1.GatewayService" => Some(match method {
            // What an analyst looks at besides the desk.
            "GetCustomer"
            | "GetOrder"
            | "GetInvoice"
            | "ListInvoices"
            | "GetAging"
            | "GetCustomerExposure"
            | "GetCreditProfile"
            | "GetAccountCredit"
            | "ListPaymentSessions" => CLIENT_OR_ANALYST,
            "CreateCustomer"
            | "LinkCreditAccount"
            | "PlaceOrder"
            | "AmendOrder"
            | "CancelOrder"
            | "InvoiceOrder"
            | "IssueInvoice"
            | "FinalizeInvoice"
            | "CancelInvoice"
            | "IssueCreditNote"
            | "RecordPayment"
            | "ApplyUnappliedCash"
            | "RefundPayment"
            | "PayOutAccountCredit"
            | "CreateMandate" => CLIENT,
            "SetCreditLimit" | "DecideLimitChange" | "ListLimitChanges" | "SetAccountControls"
            | "ListDecisions" | "ListHolds" | "ReleaseHold" | "RejectHold" | "ListAlerts"
            | "AcknowledgeAlert" | "StreamAlerts" | "UpdateRiskFacts" | "ScoreCustomer"
            | "ExplainScore" | "GetGroupExposure" | "WriteOffInvoice" | "Reconcile" => ANALYST,
            _ => return None,
        }),
        _ => None,
    }
}

/// How callers authenticate and how much they may call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuthSettings {
    /// Issuers whose JWTs are accepted.
    pub jwt_issuers: Vec<jwt::IssuerSettings>,
    /// An admin API key (`o2c_<id>_<secret>`) to create the first keys with;
    /// recorded (hashed) at start. Keep it in a secret store.
    #[serde(skip_serializing)]
    pub bootstrap_admin_key: Option<o2c_kit::settings::Secret>,
    /// Per-tenant request budgets.
    pub rate_limit: limit::RateLimitSettings,
    /// Origins whose pages may call the gateway from a browser (gRPC-Web),
    /// e.g. `https://console.example.com`; the same credentials apply.
    pub browser_origins: Vec<String>,
}

impl AuthSettings {
    pub fn validate(&self) -> Result<(), o2c_kit::settings::SettingsError> {
        for (index, issuer) in self.jwt_issuers.iter().enumerate() {
            jwt::Verifier::new(issuer).map_err(|reason| {
                o2c_kit::settings::SettingsError::Invalid {
                    key: format!("auth.jwt_issuers[{index}]"),
                    reason,
                }
            })?;
        }
        if let Some(key) = &self.bootstrap_admin_key
            && keys::parse(key.expose()).is_none()
        {
            return Err(o2c_kit::settings::SettingsError::Invalid {
                key: "auth.bootstrap_admin_key".into(),
                reason: "must be o2c_<32 hex>_<64 hex>".into(),
            });
        }
        for (index, origin) in self.browser_origins.iter().enumerate() {
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && origin.parse::<http::HeaderValue>().is_ok();
            if !valid {
                return Err(o2c_kit::settings::SettingsError::Invalid {
                    key: format!("auth.browser_origins[{index}]"),
                    reason: "an origin: scheme://host[:port], no path".into(),
                });
            }
        }
        self.rate_limit.validate()
    }
}

/// Authenticates credentials.
pub struct Authenticator {
    keys: Arc<keys::KeyStore>,
    issuers: Vec<jwt::Verifier>,
    /// Bearer tokens verified before, until their `exp`: a client's calls
    /// with one token check its signature and claims once.
    verified: o2c_kit::auth::TokenMemo<String, Principal>,
}

impl Authenticator {
    pub fn new(keys: Arc<keys::KeyStore>, settings: &AuthSettings) -> Result<Self, String> {
        let issuers = settings
            .jwt_issuers
            .iter()
            .map(jwt::Verifier::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys,
            issuers,
            verified: o2c_kit::auth::TokenMemo::default(),
        })
    }

    /// The caller a request's credential names.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, ApiError> {
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        match (authorization, api_key) {
            (Some(value), _) if value.starts_with("Bearer ") => {
                let token = value.trim_start_matches("Bearer ").trim();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if let Some(principal) = self.verified.get(token, now) {
                    return Ok(principal);
                }
                let (principal, exp) = jwt::verify_any_until(&self.issuers, token)?;
                // Until `exp` only: past it the full check (with its
                // leeway) decides again.
                self.verified.put(token.to_owned(), principal.clone(), exp);
                Ok(principal)
            }
            (Some(value), _) if value.starts_with("ApiKey ") => {
                self.keys
                    .verify(value.trim_start_matches("ApiKey ").trim())
                    .await
            }
            (None, Some(key)) => self.keys.verify(key.trim()).await,
            (Some(_), _) => Err(ApiError::Unauthenticated(
                "authorization must be `Bearer <JWT>` or `ApiKey <key>`".into(),
            )),
            (None, None) => Err(ApiError::Unauthenticated(
                "a credential is required: authorization: Bearer <JWT> or ApiKey <key>".into(),
            )),
        }
    }
}

/// Authenticates, authorizes and meters every call to the services it
/// wraps (the gateway's own: health and reflection are outside it).
#[derive(Clone)]
pub struct GatewayAuthLayer {
    auth: Arc<Authenticator>,
    limiter: Arc<limit::RateLimiter>,
}

impl GatewayAuthLayer {
    pub fn new(auth: Authenticator, limiter: limit::RateLimiter) -> Self {
        Self {
            auth: Arc::new(auth),
            limiter: Arc::new(limiter),
        }
    }

    async fn admit(&self, path: &str, headers: &http::HeaderMap) -> Result<CallContext, ApiError> {
        let mut principal = self.auth.authenticate(headers).await?;
        // ADMIN manages every tenant's keys, so only the platform's own
        // principals hold it, however a credential was issued.
        if principal.tenant != keys::PLATFORM_TENANT {
            principal.roles.retain(|role| *role != Role::Admin);
        }
        let allowed = required_roles(path).unwrap_or(&[]);
        if !principal.roles.iter().any(|role| allowed.contains(role)) {
            return Err(ApiError::PermissionDenied(format!(
                "{path} needs one of the roles {}",
                allowed
                    .iter()
                    .map(|r| r.code())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        self.limiter.spend(&principal.tenant).await?;
        Ok(CallContext {
            tenant: Some(principal.tenant),
            user: Some(principal.subject),
            deadline: o2c_kit::auth::deadline_of(headers),
        })
    }
}

impl<S> tower::Layer<S> for GatewayAuthLayer {
    type Service = GatewayAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GatewayAuth {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service [`GatewayAuthLayer`] wraps.
#[derive(Clone)]
pub struct GatewayAuth<S> {
    layer: GatewayAuthLayer,
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for GatewayAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let layer = self.layer.clone();
        // The service that was made ready serves this call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            match layer.admit(&path, request.headers()).await {
                Ok(context) => o2c_kit::auth::scope(context, inner.call(request)).await,
                Err(error) => {
                    if matches!(error, ApiError::Unauthenticated(_)) {
                        tracing::info!(%path, %error, "call refused");
                    }
                    Ok(tonic::Status::from(error).into_http())
                }
            }
        })
    }
}

/// Adds the gateway's auth to a named tonic service.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: GatewayAuth<S>,
}

impl<S> Guarded<S> {
    pub fn new(layer: &GatewayAuthLayer, inner: S) -> Self {
        Self {
            inner: tower::Layer::layer(layer, inner),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Guarded<S>
where
    GatewayAuth<S>: tower::Service<http::Request<B>>,
{
    type Response = <GatewayAuth<S> as tower::Service<http::Request<B>>>::Response;
    type Error = <GatewayAuth<S> as tower::Service<http::Request<B>>>::Error;
    type Future = <GatewayAuth<S> as tower::Service<http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_method_has_roles_and_unknown_ones_have_none() {
        let proto = include_str!("../../../../proto/o2c/gateway/v1/gateway.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert!(methods.len() > 30);
        for method in methods {
            let path = format!("/o2c.gateway.v1.GatewayService/{method}");
            let roles = required_roles(&path).unwrap_or_else(|| panic!("{method} has no roles"));
            assert!(!roles.contains(&Role::Admin), "{method}");
        }
        assert_eq!(required_roles("/o2c.gateway.v1.GatewayService/Nope"), None);
        assert_eq!(
            required_roles("/o2c.credit.v1.CreditService/GetExposure"),
            None
        );
        assert_eq!(
            required_roles("/o2c.gateway.v1.AdminService/CreateApiKey"),
            Some(ADMIN)
        );
    }
}
