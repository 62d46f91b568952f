//! The suite's metrics, recorded through the global OpenTelemetry meter
//! (exported over OTLP when `otlp_endpoint` is set; no-ops otherwise).
//! Instruments are made on first use, after `telemetry::init` has
//! installed the meter provider. Attributes are codes, never personal data.

use std::sync::LazyLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};

fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter("o2c")
}

static RPC_DURATION: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("rpc.server.duration")
        .with_unit("ms")
        .with_description("Duration of each RPC served, by service, method and gRPC status")
        .build()
});

/// One RPC served: its rate, errors (`rpc.grpc.status_code` not 0) and
/// duration in one histogram.
pub fn rpc(service: &str, method: &str, status_code: i64, took: Duration) {
    RPC_DURATION.record(
        took.as_secs_f64() * 1000.0,
        &[
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
            KeyValue::new("rpc.grpc.status_code", status_code),
        ],
    );
}

static BATCH_STEP: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("o2c.credit.batch.step.duration")
        .with_unit("ms")
        .with_description(
            "Time of each step of a set-wise batch of credit checks: per check for queued and \
             answer, per batch for begin, lock, read, decide, write and commit",
        )
        .build()
});

/// One step of a set-wise batch of credit checks (`step`: queued, begin,
/// lock, read, decide, write, commit or answer).
pub fn credit_batch_step(step: &'static str, took: Duration) {
    BATCH_STEP.record(took.as_secs_f64() * 1000.0, &[KeyValue::new("step", step)]);
}

static DECISIONS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    meter()
        .u64_counter("o2c.credit.decisions")
        .with_description("Credit decisions by outcome and reason codes")
        .build()
});

/// A credit decision (`reasons`: the joined reason codes, empty when none).
pub fn credit_decision(outcome: &'static str, reasons: String) {
    DECISIONS.add(
        1,
        &[
            KeyValue::new("outcome", outcome),
            KeyValue::new("reasons", reasons),
        ],
    );
}

static BATCHED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    meter()
        .u64_counter("o2c.credit.checks.batched")
        .with_description(
            "Credit checks by how their batch decided them: together (set-wise) or one_by_one",
        )
        .build()
});

/// `n` credit checks decided on `path` (`together` or `one_by_one`).
pub fn credit_checks_batched(path: &'static str, n: u64) {
    BATCHED.add(n, &[KeyValue::new("path", path)]);
}

static UTILISATION: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("o2c.credit.exposure.utilisation")
        .with_unit("%")
        .with_description("Exposure as a share of the credit limit, after each change")
        .build()
});

/// A customer's exposure after a change, as a percentage of the limit.
pub fn exposure_utilisation(percent: f64) {
    UTILISATION.record(percent, &[]);
}

static OUTBOX_PENDING: LazyLock<Gauge<u64>> = LazyLock::new(|| {
    meter()
        .u64_gauge("o2c.outbox.pending")
        .with_description("Events waiting in a producer's outbox, per subscriber")
        .build()
});

static OUTBOX_LAG: LazyLock<Gauge<u64>> = LazyLock::new(|| {
    meter()
        .u64_gauge("o2c.outbox.lag")
        .with_unit("ms")
        .with_description("Age of the oldest event waiting for a subscriber")
        .build()
});

/// The state of one subscriber's queue in an outbox.
pub fn outbox(subscriber: &str, pending: u64, oldest: Duration) {
    let attributes = [KeyValue::new("subscriber", subscriber.to_owned())];
    OUTBOX_PENDING.record(pending, &attributes);
    OUTBOX_LAG.record(
        u64::try_from(oldest.as_millis()).unwrap_or(u64::MAX),
        &attributes,
    );
}

static CACHE_LOOKUPS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    meter()
        .u64_counter("o2c.cache.lookups")
        .with_description("Cache lookups by result (hit, miss, error): the hit ratio")
        .build()
});

/// One lookup in `cache` with its `result` (`hit`, `miss` or `error`).
pub fn cache_lookup(cache: &'static str, result: &'static str) {
    CACHE_LOOKUPS.add(
        1,
        &[
            KeyValue::new("cache", cache),
            KeyValue::new("result", result),
        ],
    );
}

static COLLECTIONS: LazyLock<Counter<u64>> = LazyLock::new(|| {
    meter()
        .u64_counter("o2c.payments.collections")
        .with_description("Automated collection attempts by outcome")
        .build()
});

/// One collection attempt: `collected`, `declined` (retried) or `failed`.
pub fn collection(outcome: &'static str) {
    COLLECTIONS.add(1, &[KeyValue::new("outcome", outcome)]);
}

/// Records [`rpc`] for every call a server answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    R: 'static,
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
        let path = request.uri().path().to_owned();
        let started = std::time::Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            if !crate::auth::is_open_path(&path) {
                let (service, method) = path
                    .trim_start_matches('/')
                    .split_once('/')
                    .unwrap_or((path.as_str(), ""));
                // An error answered at once carries its status in the
                // headers; a reply's status follows in the trailers (OK).
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    Err(_) => 2,
                };
                rpc(service, method, code, started.elapsed());
            }
            result
        })
    }
}
