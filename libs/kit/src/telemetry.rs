//! One `tracing` set-up for every binary: env filter (`RUST_LOG`), text or
//! JSON lines, and, when an endpoint is configured, an OpenTelemetry layer
//! exporting spans over OTLP/gRPC. W3C trace context is the propagator.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::LogFormat;

/// Telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    #[error("log_level: {0}")]
    Level(#[from] tracing_subscriber::filter::ParseError),
}

/// Flushes and shuts down span export when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    // None when no OTLP endpoint is configured.
    provider: Option<SdkTracerProvider>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flushing spans failed: {error}");
        }
        if let Some(meters) = self.meters.take()
            && let Err(error) = meters.shutdown()
        {
            eprintln!("flushing metrics failed: {error}");
        }
    }
}

impl TelemetryGuard {
    /// Exports the spans ended so far and the metrics recorded so far
    /// (tests, and before a planned stop).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(%error, "flushing spans failed");
        }
        if let Some(meters) = &self.meters
            && let Err(error) = meters.force_flush()
        {
            tracing::warn!(%error, "flushing metrics failed");
        }
    }
}

/// Sets `key` on the current span (an attribute of the exported span):
/// for facts worth querying traces by, never personal data or secrets.
pub fn annotate(key: &'static str, value: impl Into<String>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    tracing::Span::current().set_attribute(key, value.into());
}

/// The current span's W3C trace context as a message carries it:
/// `(traceparent, tracestate)`, each empty when there is none.
pub fn current_trace_context() -> (String, String) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut carrier = std::collections::HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MapInjector(&mut carrier))
    });
    (
        carrier.remove("traceparent").unwrap_or_default(),
        carrier.remove("tracestate").unwrap_or_default(),
    )
}

/// Makes `span` continue the trace a message carried (see
/// [`current_trace_context`]); an absent or malformed `traceparent` leaves
/// it the root of a new trace.
pub fn continue_trace(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&ContextExtractor {
            traceparent,
            tracestate,
        })
    });
    let _ = span.set_parent(parent);
}

struct MapInjector<'a>(&'a mut std::collections::HashMap<String, String>);

impl opentelemetry::propagation::Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct ContextExtractor<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl opentelemetry::propagation::Extractor for ContextExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" if !self.traceparent.is_empty() => Some(self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The log filter unless `log_level` or `RUST_LOG` says otherwise.
pub const DEFAULT_LOG_LEVEL: &str = "info,sqlx=warn,h2=warn,tower=warn,hyper=warn";

/// JSON log lines that carry the OpenTelemetry trace and span ids of the
/// span the event happened in, so a log line leads to its trace:
/// `{"timestamp", "level", "target", "message", "fields", "span",
/// "trace_id", "span_id"}`.
/// Pair it with [`DispatchCapture`] in the same subscriber: the formatter
/// reads span ids through the dispatcher, which a formatter is not given.
#[derive(Clone, Default)]
pub struct JsonWithTraceIds {
    dispatch: std::sync::Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl JsonWithTraceIds {
    /// The layer that hands this formatter its dispatcher.
    pub fn capture(&self) -> DispatchCapture {
        DispatchCapture(self.dispatch.clone())
    }
}

/// Remembers the dispatcher it is registered with (see [`JsonWithTraceIds`]).
pub struct DispatchCapture(std::sync::Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DispatchCapture {
    fn on_register_dispatch(&self, dispatch: &tracing::Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonWithTraceIds
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt;
        use serde_json::Value;
        let mut fields = serde_json::Map::new();
        event.record(&mut JsonFields(&mut fields));
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(metadata.level().to_string()));
        line.insert("target".into(), Value::String(metadata.target().to_owned()));
        if let Some(message) = fields.remove("message") {
            line.insert("message".into(), message);
        }
        line.insert("fields".into(), Value::Object(fields));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), Value::String(span.name().to_owned()));
            let context = self
                .dispatch
                .get()
                .and_then(tracing::dispatcher::WeakDispatch::upgrade)
                .and_then(|dispatch| {
                    tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)
                });
            let ids = context
                .map(|context| context.span().span_context().clone())
                .unwrap_or_else(opentelemetry::trace::SpanContext::empty_context);
            if ids.is_valid() {
                line.insert("trace_id".into(), Value::String(ids.trace_id().to_string()));
                line.insert("span_id".into(), Value::String(ids.span_id().to_string()));
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            serde_json::Value::String(format!("{value:?}")),
        );
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(
            field.name().to_owned(),
            serde_json::Value::String(value.to_owned()),
        );
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// Installs the global subscriber for `service_name`: the log filter from
/// `log_level` (else `RUST_LOG`, else [`DEFAULT_LOG_LEVEL`]), text or JSON
/// lines, and spans exported over OTLP/gRPC when `otlp_endpoint` is set.
/// Spans get trace ids even without an endpoint, so JSON lines carry them.
pub fn init(
    service_name: &'static str,
    otlp_endpoint: Option<&str>,
    format: LogFormat,
    log_level: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = match log_level {
        Some(level) => EnvFilter::try_new(level)?,
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_LEVEL))
        }
    };
    let provider = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_resource(Resource::builder().with_service_name(service_name).build())
                .with_batch_exporter(exporter)
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            Some(provider)
        }
        None => None,
    };
    let meters = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                .with_resource(Resource::builder().with_service_name(service_name).build())
                .with_periodic_exporter(exporter)
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            Some(meters)
        }
        None => None,
    };
    // Without an endpoint, spans still get ids (for the log lines) and are
    // dropped when they end.
    let tracer = match &provider {
        Some(provider) => provider.tracer(service_name),
        None => SdkTracerProvider::builder().build().tracer(service_name),
    };
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_opentelemetry::layer().with_tracer(tracer));
    match format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init()?,
        LogFormat::Json => {
            let json = JsonWithTraceIds::default();
            registry
                .with(json.capture())
                .with(tracing_subscriber::fmt::layer().event_format(json))
                .try_init()?
        }
    }
    Ok(TelemetryGuard { provider, meters })
}

/// Records a gauge through the global OpenTelemetry meter (a no-op until a
/// meter provider is installed).
pub fn gauge(
    meter: &'static str,
    name: &'static str,
    value: u64,
    attributes: &[(&'static str, String)],
) {
    use opentelemetry::KeyValue;
    let gauge = opentelemetry::global::meter(meter).u64_gauge(name).build();
    let attributes: Vec<KeyValue> = attributes
        .iter()
        .map(|(k, v)| KeyValue::new(*k, v.clone()))
        .collect();
    gauge.record(value, &attributes);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{TraceContextExt, TracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_their_span() {
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let json = JsonWithTraceIds::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(json.capture())
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(json)
                    .with_writer(move || SinkWriter(sink.clone())),
            );
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("grpc.server");
            let _entered = span.enter();
            tracing::info!(
                customer_count = 3_u64,
                outcome = "APPROVE",
                "credit decision"
            );
            let context = span.context();
            let ids = context.span().span_context().clone();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "credit decision");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"], "grpc.server");
        assert_eq!(line["fields"]["customer_count"], 3);
        assert_eq!(line["fields"]["outcome"], "APPROVE");
        assert_eq!(line["trace_id"], trace_id.as_str());
        assert_eq!(line["span_id"], span_id.as_str());
        assert_eq!(trace_id.len(), 32);
    }

    struct SinkWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
