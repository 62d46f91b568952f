//! Service-to-service identity and the caller's context.
//!
//! Every internal call carries a short-lived token signed with the
//! deployment's shared secret (HS256 JWT, `aud = iss = o2c-internal`): who
//! calls (`sub`, the calling process), for which tenant (`tenant`, absent
//! for a service's own background work such as event delivery), and for
//! which user. A backend served with [`Access::Internal`](crate::serve::Access)
//! refuses a call without a valid token (UNAUTHENTICATED), so a client cannot
//! bypass the gateway, and [`crate::fields::tenant_id`] refuses a request
//! for another tenant than the token's (PERMISSION_DENIED): tenancy is
//! enforced by the owning service, not only at the gateway.
//!
//! The verified context is kept in a task-local ([`current`]) for the
//! duration of the call; outgoing calls made while handling it carry the
//! same tenant and user and the remaining deadline (`grpc-timeout`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::codegen::http;

/// Issuer and audience of internal tokens.
pub const INTERNAL: &str = "o2c-internal";
/// Lifetime of a minted internal token.
pub const TOKEN_TTL_SECS: u64 = 60;
/// Shortest shared secret accepted.
pub const MIN_SECRET_LENGTH: usize = 32;

/// Who a call is made for, as verified on the way in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The tenant the call acts for; `None` for a service's own work.
    pub tenant: Option<String>,
    /// The end user or API key behind the call, if any.
    pub user: Option<String>,
    /// When the original caller stops waiting.
    pub deadline: Option<tokio::time::Instant>,
}

impl CallContext {
    /// A service's own work for no tenant in particular: delivering events
    /// (the only calls a backend takes without a tenant).
    pub fn service() -> Self {
        Self {
            tenant: None,
            user: Some("service".into()),
            deadline: None,
        }
    }

    /// Work for `tenant` that no caller asked for (collections,
    /// reconciliation).
    pub fn for_tenant(tenant: &str, user: &str) -> Self {
        Self {
            tenant: Some(tenant.to_owned()),
            user: Some(user.to_owned()),
            deadline: None,
        }
    }
}

/// The one method a backend takes without a tenant: event delivery, whose
/// batches mix tenants (each event names its own).
pub const TENANTLESS_PATHS: &[&str] = &["/o2c.events.v1.EventsService/Deliver"];

tokio::task_local! {
    static CALL: CallContext;
}

/// The context of the call being handled, if any.
pub fn current() -> Option<CallContext> {
    CALL.try_with(Clone::clone).ok()
}

/// Runs `future` as the handling of a call made in `context`.
pub async fn scope<F: std::future::Future>(context: CallContext, future: F) -> F::Output {
    CALL.scope(context, future).await
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    user: Option<String>,
}

struct Signer {
    /// SHA-256 of the secret, to tell a second install of the same one.
    secret_sha256: [u8; 32],
    service: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

static SIGNER: OnceLock<Signer> = OnceLock::new();

/// Why internal authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("internal_auth_secret must be at least {MIN_SECRET_LENGTH} characters")]
    ShortSecret,
    #[error("a different internal_auth_secret is already installed in this process")]
    Conflict,
}

/// Installs the deployment's shared secret for this process (`service` names
/// the caller in tokens). Installing the same secret again is a no-op; a
/// different one is refused, since every service of a process shares it.
pub fn install(secret: &str, service: &str) -> Result<(), AuthSetupError> {
    if secret.len() < MIN_SECRET_LENGTH {
        return Err(AuthSetupError::ShortSecret);
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[INTERNAL]);
    validation.set_audience(&[INTERNAL]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = 5;
    use sha2::Digest;
    let secret_sha256: [u8; 32] = sha2::Sha256::digest(secret.as_bytes()).into();
    let installed = SIGNER.get_or_init(|| Signer {
        secret_sha256,
        service: service.to_owned(),
        encoding: EncodingKey::from_secret(secret.as_bytes()),
        decoding: DecodingKey::from_secret(secret.as_bytes()),
        validation,
    });
    if installed.secret_sha256 == secret_sha256 {
        Ok(())
    } else {
        Err(AuthSetupError::Conflict)
    }
}

/// Whether this process signs and checks internal calls.
pub fn installed() -> bool {
    SIGNER.get().is_some()
}

/// A fresh random secret (for the all-in-one process, which needs no one
/// else to know it).
pub fn random_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mint_with(signer: &Signer, context: &CallContext) -> Option<String> {
    let now = now_secs();
    let claims = Claims {
        iss: INTERNAL.into(),
        aud: INTERNAL.into(),
        sub: signer.service.clone(),
        iat: now,
        exp: now + TOKEN_TTL_SECS,
        tenant: context.tenant.clone(),
        user: context.user.clone(),
    };
    match jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &signer.encoding) {
        Ok(token) => Some(token),
        Err(error) => {
            tracing::error!(%error, "minting an internal token failed");
            None
        }
    }
}

fn verify_with(signer: &Signer, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
    jsonwebtoken::decode::<Claims>(token, &signer.decoding, &signer.validation).map(|t| t.claims)
}

/// A token for an outgoing call made in `context` (None when this process
/// has no secret installed). A token minted for the same tenant and user
/// is reused for the first half of its lifetime: signing is not per call.
pub fn mint(context: &CallContext) -> Option<String> {
    let signer = SIGNER.get()?;
    let key = (context.tenant.clone(), context.user.clone());
    let now = now_secs();
    if let Some(token) = MINTED.get(&key, now) {
        return Some(token);
    }
    let token = mint_with(signer, context)?;
    MINTED.put(key, token.clone(), now + TOKEN_TTL_SECS / 2);
    Some(token)
}

/// Values that hold until a time (Unix seconds), such as tokens for their
/// lifetime, so a token is signed or checked once rather than on every
/// call. Bounded: when [`TokenMemo::CAPACITY`] entries are held, it starts
/// again empty.
pub struct TokenMemo<K, V> {
    entries: Mutex<HashMap<K, (V, u64)>>,
}

impl<K: Eq + Hash, V: Clone> Default for TokenMemo<K, V> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash, V: Clone> TokenMemo<K, V> {
    /// Most entries held.
    pub const CAPACITY: usize = 4096;

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, u64)>> {
        // Every change is one insert or a clear: consistent whatever a
        // panicking holder did.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key` if it still holds at `now`.
    pub fn get<Q>(&self, key: &Q, now: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries()
            .get(key)
            .filter(|(_, until)| now < *until)
            .map(|(value, _)| value.clone())
    }

    /// Keeps `value` for `key` until `until` (exclusive).
    pub fn put(&self, key: K, value: V, until: u64) {
        let mut entries = self.entries();
        if entries.len() >= Self::CAPACITY {
            entries.clear();
        }
        entries.insert(key, (value, until));
    }
}

type Minted = TokenMemo<(Option<String>, Option<String>), String>;

/// Tokens minted by this process, by tenant and user.
static MINTED: LazyLock<Minted> = LazyLock::new(TokenMemo::default);
/// Tokens this process verified, until they expire.
static VERIFIED: LazyLock<TokenMemo<String, Claims>> = LazyLock::new(TokenMemo::default);

/// Parses a `grpc-timeout` header value (`100m`, `5S`, …).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline a request's `grpc-timeout` sets, from now.
pub fn deadline_of(headers: &http::HeaderMap) -> Option<tokio::time::Instant> {
    let timeout = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)?;
    Some(tokio::time::Instant::now() + timeout)
}

/// Verifies the internal token of an incoming request.
pub fn verify_request(headers: &http::HeaderMap) -> Result<CallContext, tonic::Status> {
    let Some(signer) = SIGNER.get() else {
        return Err(tonic::Status::unauthenticated(
            "internal calls are not configured",
        ));
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| tonic::Status::unauthenticated("an internal service token is required"))?;
    let now = now_secs();
    let claims = match VERIFIED.get(token, now) {
        Some(claims) => claims,
        None => {
            let claims = verify_with(signer, token).map_err(|error| {
                tracing::warn!(%error, "internal token refused");
                tonic::Status::unauthenticated("invalid internal service token")
            })?;
            // Until it expires; past that the full check (with its
            // leeway) decides again.
            VERIFIED.put(token.to_owned(), claims.clone(), claims.exp);
            claims
        }
    };
    Ok(CallContext {
        tenant: claims.tenant,
        user: claims.user,
        deadline: deadline_of(headers),
    })
}

/// Paths that stay open: health checks and reflection.
pub fn is_open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// Requires a valid internal token on every call but health and
/// reflection, and runs the call in its verified [`CallContext`].
#[derive(Debug, Clone, Copy, Default)]
pub struct InternalAuthLayer;

impl<S> tower::Layer<S> for InternalAuthLayer {
    type Service = InternalAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InternalAuth { inner }
    }
}

/// The service [`InternalAuthLayer`] wraps.
#[derive(Debug, Clone)]
pub struct InternalAuth<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for InternalAuth<S>
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
        if is_open_path(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match verify_request(request.headers()) {
            Ok(context)
                if context.tenant.is_none()
                    && !TENANTLESS_PATHS.contains(&request.uri().path()) =>
            {
                Box::pin(async move {
                    Ok(tonic::Status::permission_denied(
                        "a call for no tenant may only deliver events",
                    )
                    .into_http())
                })
            }
            Ok(context) => {
                let future = self.inner.call(request);
                Box::pin(scope(context, future))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The secret of this crate's unit tests (one per process).
#[cfg(test)]
pub(crate) const TEST_SECRET: &str = "0123456789abcdef0123456789abcdef-test";

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = TEST_SECRET;

    fn headers(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers.insert("grpc-timeout", "1500m".parse().unwrap());
        headers
    }

    #[test]
    fn a_memo_holds_a_value_until_its_time_and_starts_again_when_full() {
        let memo: TokenMemo<String, u32> = TokenMemo::default();
        memo.put("a".into(), 1, 100);
        assert_eq!(memo.get("a", 99), Some(1));
        assert_eq!(memo.get("a", 100), None);
        assert_eq!(memo.get("b", 0), None);
        let capacity = TokenMemo::<String, u32>::CAPACITY;
        for n in 0..capacity {
            memo.put(n.to_string(), 2, 100);
        }
        // Full at the last put: emptied, then that one kept.
        assert_eq!(memo.get("a", 0), None);
        assert_eq!(memo.get(&(capacity - 1).to_string(), 0), Some(2));
    }

    #[test]
    fn a_minted_token_is_reused_for_the_same_caller_and_not_for_another() {
        install(SECRET, "test").unwrap();
        let acme = CallContext::for_tenant("acme", "u1");
        let first = mint(&acme).unwrap();
        assert_eq!(mint(&acme), Some(first.clone()));
        let other = mint(&CallContext::for_tenant("globex", "u1")).unwrap();
        assert_ne!(other, first);
        // Each verifies as its own caller, the second time from memory.
        for _ in 0..2 {
            let context = verify_request(&headers(&other)).unwrap();
            assert_eq!(context.tenant.as_deref(), Some("globex"));
            assert_eq!(context.user.as_deref(), Some("u1"));
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_tenant_user_and_deadline() {
        install(SECRET, "test").unwrap();
        let token = mint(&CallContext {
            tenant: Some("acme".into()),
            user: Some("ana".into()),
            deadline: None,
        })
        .unwrap();
        let context = verify_request(&headers(&token)).unwrap();
        assert_eq!(context.tenant.as_deref(), Some("acme"));
        assert_eq!(context.user.as_deref(), Some("ana"));
        let left = context.deadline.unwrap() - tokio::time::Instant::now();
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000));
    }

    #[test]
    fn tokens_of_another_secret_no_token_and_expired_tokens_are_refused() {
        install(SECRET, "test").unwrap();
        assert!(matches!(
            install("another-secret-of-at-least-32-characters!", "test"),
            Err(AuthSetupError::Conflict)
        ));
        assert!(matches!(
            install("short", "test"),
            Err(AuthSetupError::ShortSecret)
        ));
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                iss: INTERNAL.into(),
                aud: INTERNAL.into(),
                sub: "intruder".into(),
                iat: now_secs(),
                exp: now_secs() + 60,
                tenant: Some("acme".into()),
                user: None,
            },
            &EncodingKey::from_secret(b"not-the-deployment-secret-at-all-xx"),
        )
        .unwrap();
        let refused = verify_request(&headers(&forged)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                iss: INTERNAL.into(),
                aud: INTERNAL.into(),
                sub: "test".into(),
                iat: now_secs() - 600,
                exp: now_secs() - 300,
                tenant: None,
                user: None,
            },
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let refused = verify_request(&headers(&expired)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let refused = verify_request(&http::HeaderMap::new()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("5s"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
