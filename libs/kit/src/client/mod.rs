//! Calling other services: lazily connected channels with a per-call
//! deadline, and W3C trace-context injection so the callee continues the
//! caller's trace.
//!
//! Unary calls go over [`h2::H2Channel`], an HTTP/2 connection driven from
//! the caller's task; server streams over tonic's `Channel`.

use std::time::Duration;

use opentelemetry::propagation::Injector;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub mod h2;

pub use self::h2::H2Channel;

/// Deadline for any one internal call unless the caller sets a shorter one.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5_000;
/// How long establishing a connection to another service may take.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

/// A channel to another service with trace propagation on every call and
/// retries of failed connections.
pub type TracedChannel = InterceptedService<RetryChannel, TracePropagation>;

/// The address of another service was not a valid URI.
#[derive(Debug, thiserror::Error)]
#[error("invalid service address {url:?}: {source}")]
pub struct InvalidAddress {
    url: String,
    source: BoxError,
}

/// A channel to `url` (e.g. `http://127.0.0.1:50052`). It connects on first
/// use and reconnects by itself, so services can start in any order.
pub fn channel(url: &str, call_timeout: Duration) -> Result<TracedChannel, InvalidAddress> {
    let channel = H2Channel::lazy(url, Duration::from_millis(CONNECT_TIMEOUT_MS), call_timeout)
        .map_err(|source| InvalidAddress {
            url: url.to_owned(),
            source,
        })?;
    Ok(InterceptedService::new(
        RetryChannel {
            transport: Transport::H2(channel),
        },
        TracePropagation,
    ))
}

/// A channel for long-lived server streams: connect timeout, no per-call
/// deadline.
pub fn streaming_channel(url: &str) -> Result<TracedChannel, InvalidAddress> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| InvalidAddress {
        url: url.to_owned(),
        source: source.into(),
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(InterceptedService::new(
        RetryChannel::new(channel),
        TracePropagation,
    ))
}

/// Puts the caller's context on every internal call: the current span's
/// `traceparent`/`tracestate`, an internal token for the tenant and user
/// being served ([`crate::auth`]), and what is left of the original
/// caller's deadline as `grpc-timeout` (the channel's own timeout still
/// caps it).
#[derive(Debug, Clone, Copy, Default)]
pub struct TracePropagation;

impl Interceptor for TracePropagation {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
        });
        // No context, no token: a call made outside any caller's context
        // (a forgotten scope) is refused by the callee instead of acting
        // for every tenant.
        let call = crate::auth::current();
        if let Some(token) = call.as_ref().and_then(crate::auth::mint)
            && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(deadline) = call.and_then(|c| c.deadline) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(tonic::Status::deadline_exceeded(
                    "the caller's deadline has passed",
                ));
            }
            request.set_timeout(left);
        }
        Ok(request)
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Attempts of one call when the connection fails before an answer.
pub const RETRY_ATTEMPTS: u32 = 3;
/// First retry delay; each next one doubles, plus up to 100 % jitter.
pub const RETRY_BASE_MS: u64 = 25;
/// No retry starts after this much time has passed since the first try.
pub const RETRY_BUDGET_MS: u64 = 1_000;

/// A channel that retries a call whose connection failed (refused, reset,
/// timed out connecting) or that was answered UNAVAILABLE, with bounded,
/// jittered backoff.
///
/// Every internal call is a read or carries an idempotency key, so a retry
/// of a request that did reach the service has no second effect; any other
/// answer is returned as it is.
#[derive(Debug, Clone)]
pub struct RetryChannel {
    transport: Transport,
}

/// How a [`RetryChannel`] reaches its service.
#[derive(Debug, Clone)]
enum Transport {
    /// Unary calls ([`channel`]).
    H2(H2Channel),
    /// Server streams ([`streaming_channel`]).
    Tonic(Channel),
}

impl RetryChannel {
    /// Retries over tonic's `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            transport: Transport::Tonic(channel),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// When the retry after `attempt` starts: after its jittered backoff, or
/// at `deadline` if that comes first (the attempt then ends at once,
/// DEADLINE_EXCEEDED).
fn retry_at(attempt: u32, deadline: Option<tokio::time::Instant>) -> tokio::time::Instant {
    let after_backoff = tokio::time::Instant::now() + jittered(attempt);
    deadline.map_or(after_backoff, |deadline| after_backoff.min(deadline))
}

fn jittered(attempt: u32) -> Duration {
    let base = RETRY_BASE_MS.saturating_mul(1 << attempt.min(10));
    let jitter =
        u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(base.max(1))).unwrap_or(0);
    Duration::from_millis(base + jitter)
}

impl tower::Service<http::Request<tonic::body::Body>> for RetryChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is awaited per attempt inside the call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let transport = self.transport.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // Unary requests are one small message: keep it to resend.
            let bytes = body.collect().await.map_err(BoxError::from)?.to_bytes();
            let method = parts
                .extensions
                .get::<tonic::GrpcMethod<'static>>()
                .cloned();
            let started = tokio::time::Instant::now();
            // One deadline for every attempt: a retry does not start the
            // caller's time afresh.
            let deadline = match &transport {
                Transport::H2(channel) => Some(channel.deadline(&parts.headers)),
                Transport::Tonic(_) => None,
            };
            let mut attempt = 0;
            loop {
                let outcome = match &transport {
                    Transport::H2(channel) => {
                        let deadline = deadline.unwrap_or_else(|| channel.deadline(&parts.headers));
                        channel.send(&parts, bytes.clone(), deadline).await
                    }
                    Transport::Tonic(channel) => {
                        let mut request = http::Request::new(tonic::body::Body::new(
                            http_body_util::Full::new(bytes.clone()),
                        ));
                        *request.method_mut() = parts.method.clone();
                        *request.uri_mut() = parts.uri.clone();
                        *request.version_mut() = parts.version;
                        *request.headers_mut() = parts.headers.clone();
                        if let Some(method) = &method {
                            request.extensions_mut().insert(method.clone());
                        }
                        match channel.clone().ready_oneshot().await {
                            Ok(mut ready) => tower::Service::call(&mut ready, request).await,
                            Err(error) => Err(error),
                        }
                        .map_err(BoxError::from)
                    }
                };
                match outcome {
                    // An answer of UNAVAILABLE (the service's own dependency is
                    // down, or it is shutting down) is retried like a failed
                    // connection; any other answer is final.
                    Ok(response)
                        if response
                            .headers()
                            .get("grpc-status")
                            .is_some_and(|s| s == "14")
                            && attempt + 1 < RETRY_ATTEMPTS
                            && started.elapsed() < Duration::from_millis(RETRY_BUDGET_MS) =>
                    {
                        attempt += 1;
                        tracing::debug!(attempt, "internal call answered UNAVAILABLE; retrying");
                        tokio::time::sleep_until(retry_at(attempt - 1, deadline)).await;
                    }
                    Ok(response) => return Ok(response),
                    Err(error) => {
                        attempt += 1;
                        let spent = started.elapsed();
                        // The channel's own verdicts other than UNAVAILABLE
                        // (past the deadline, a request no connection would
                        // take) are final.
                        let settled = error
                            .downcast_ref::<tonic::Status>()
                            .is_some_and(|s| s.code() != tonic::Code::Unavailable);
                        if attempt >= RETRY_ATTEMPTS
                            || spent >= Duration::from_millis(RETRY_BUDGET_MS)
                            || settled
                        {
                            return Err(error);
                        }
                        tracing::debug!(attempt, %error, "internal call failed to connect; retrying");
                        tokio::time::sleep_until(retry_at(attempt - 1, deadline)).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{self, CallContext};

    #[tokio::test]
    async fn calls_made_for_a_caller_carry_its_tenant_and_what_is_left_of_its_deadline() {
        auth::install(auth::TEST_SECRET, "client-test").unwrap();
        let context = CallContext {
            tenant: Some("acme".into()),
            user: Some("ana".into()),
            deadline: Some(tokio::time::Instant::now() + Duration::from_millis(800)),
        };
        let request = auth::scope(context, async {
            TracePropagation.call(tonic::Request::new(())).unwrap()
        })
        .await;
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_grpc_timeout)
            .unwrap();
        assert!(
            timeout <= Duration::from_millis(800) && timeout > Duration::from_millis(500),
            "{timeout:?}"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            request
                .metadata()
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
        let verified = auth::verify_request(&headers).unwrap();
        assert_eq!(verified.tenant.as_deref(), Some("acme"));
        assert_eq!(verified.user.as_deref(), Some("ana"));
    }

    #[tokio::test]
    async fn a_retry_starts_after_its_backoff_but_never_past_the_deadline() {
        let now = tokio::time::Instant::now();
        let base = Duration::from_millis(RETRY_BASE_MS);
        for attempt in 0..4 {
            let unbounded = retry_at(attempt, None);
            assert!(unbounded >= now + base * (1 << attempt), "{attempt}");
            assert!(unbounded <= tokio::time::Instant::now() + base * (2 << attempt));
            let deadline = now + Duration::from_millis(5);
            assert_eq!(retry_at(attempt, Some(deadline)), deadline, "{attempt}");
            let far = now + Duration::from_secs(60);
            assert!(retry_at(attempt, Some(far)) < far, "{attempt}");
        }
    }

    #[tokio::test]
    async fn a_caller_whose_deadline_passed_is_not_called_for() {
        let context = CallContext {
            deadline: Some(tokio::time::Instant::now()),
            ..Default::default()
        };
        let refused = auth::scope(context, async {
            TracePropagation.call(tonic::Request::new(())).unwrap_err()
        })
        .await;
        assert_eq!(refused.code(), tonic::Code::DeadlineExceeded);
    }
}
