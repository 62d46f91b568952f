//! Calling other services: lazily connected channels with a per-call
//! deadline, and W3C trace-context injection so the callee continues the
//! caller's trace.

use std::time::Duration;

use opentelemetry::propagation::Injector;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Deadline for any one internal call unless the caller sets a shorter one.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5_000;
/// How long establishing a connection to another service may take.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

/// A channel to another service with trace propagation on every call.
pub type TracedChannel = InterceptedService<Channel, TracePropagation>;

/// The address of another service was not a valid URI.
#[derive(Debug, thiserror::Error)]
#[error("invalid service address {url:?}: {source}")]
pub struct InvalidAddress {
    url: String,
    source: tonic::transport::Error,
}

/// A channel to `url` (e.g. `http://127.0.0.1:50052`). It connects on first
/// use and reconnects by itself, so services can start in any order.
pub fn channel(url: &str, call_timeout: Duration) -> Result<TracedChannel, InvalidAddress> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| InvalidAddress {
        url: url.to_owned(),
        source,
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .timeout(call_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, TracePropagation))
}

/// A channel for long-lived server streams: connect timeout, no per-call
/// deadline.
pub fn streaming_channel(url: &str) -> Result<TracedChannel, InvalidAddress> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| InvalidAddress {
        url: url.to_owned(),
        source,
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, TracePropagation))
}

/// Injects the current span's context as `traceparent`/`tracestate`.
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
