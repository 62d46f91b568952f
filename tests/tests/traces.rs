//! One trace per order: the suite exports its spans over OTLP/gRPC to a
//! real receiver (the opentelemetry-proto collector service, served here),
//! while a client runs two orders through the gateway, each under a root
//! span of its own. Each order's trace holds the gateway's, credit's,
//! invoicing's and payments' server spans and the event consumers' spans
//! (the asynchronous hops, crm-sync among them), every span's parent is in
//! the same trace, database statements and Redis commands appear as spans,
//! and the credit decision is on its span. Its own test binary: telemetry
//! installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use o2c_all_in_one::{Settings, start};
use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A real OTLP/gRPC trace receiver that keeps what it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A real OTLP/gRPC metrics receiver that keeps the metric names and the
/// attribute sets it is sent.
#[derive(Clone, Default)]
struct Metrics(Arc<Mutex<Vec<Point>>>);

/// A metric's name and one data point's attributes.
type Point = (String, Vec<(String, String)>);

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        let mut seen = self.0.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    let points: Vec<Vec<opentelemetry_proto::tonic::common::v1::KeyValue>> =
                        match &metric.data {
                            Some(Data::Sum(sum)) => sum
                                .data_points
                                .iter()
                                .map(|p| p.attributes.clone())
                                .collect(),
                            Some(Data::Gauge(gauge)) => gauge
                                .data_points
                                .iter()
                                .map(|p| p.attributes.clone())
                                .collect(),
                            Some(Data::Histogram(histogram)) => histogram
                                .data_points
                                .iter()
                                .map(|p| p.attributes.clone())
                                .collect(),
                            _ => Vec::new(),
                        };
                    for attributes in points {
                        let attributes = attributes
                            .iter()
                            .map(|kv| {
                                let value = kv
                                    .value
                                    .as_ref()
                                    .and_then(|v| v.value.as_ref())
                                    .map(|v| match v {
                                        Value::StringValue(s) => s.clone(),
                                        Value::IntValue(i) => i.to_string(),
                                        other => format!("{other:?}"),
                                    })
                                    .unwrap_or_default();
                                (kv.key.clone(), value)
                            })
                            .collect();
                        seen.push((metric.name.clone(), attributes));
                    }
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

/// Carries the current span's context and the caller's token.
#[derive(Clone)]
struct Client(String);

impl Interceptor for Client {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let mut request = o2c_kit::client::TracePropagation.call(request)?;
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.0).parse().unwrap(),
        );
        Ok(request)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_order_is_one_trace_across_every_service() {
    let receiver = Receiver::default();
    let metrics = Metrics::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(metrics.clone()))
            .serve_with_incoming(o2c_kit::serve::incoming(listener)),
    );
    let telemetry = o2c_kit::telemetry::init(
        "o2c-traces-test",
        Some(&format!("http://{addr}")),
        o2c_kit::settings::LogFormat::Text,
        None,
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::ephemeral(|name| {
        format!(
            "sqlite://{}",
            dir.path().join(format!("{name}.db")).display()
        )
    });
    settings.auth.jwt_issuers = vec![o2c_tests::identity::issuer()];
    // Redis too when it runs (always under CI=true), for its spans.
    let redis = o2c_testkit::redis_url().await;
    settings.common.redis_url = redis.clone();
    // The periodic reconciliation runs too (nobody calls the RPC here).
    settings.reconcile_interval_ms = 200;
    let suite = start(&settings).await.unwrap();
    let token = o2c_tests::identity::token(serde_json::json!({
        "sub": "ana", "o2c_tenant": "t1", "o2c_roles": ["platform_client", "credit_analyst"],
    }));
    let channel = Channel::from_shared(format!("http://{}", suite.addresses.gateway))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut gateway = GatewayServiceClient::with_interceptor(channel, Client(token));

    // Onboarding, outside the orders' traces.
    let customer = gateway
        .create_customer(pb::CreateCustomerRequest {
            idempotency_key: "c".into(),
            legal_name: "Traced GmbH".into(),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap()
        .customer_id;
    gateway
        .link_credit_account(pb::LinkCreditAccountRequest {
            idempotency_key: "l".into(),
            customer_id: customer.clone(),
            agency: "dnb".into(),
            agency_reference: "DE31554017".into(),
            parent_customer_id: String::new(),
        })
        .await
        .unwrap();
    gateway
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: "s".into(),
            customer_id: customer.clone(),
            credit_limit: eur("10000.00"),
            reason: "onboarding".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Two orders, each under its own root span.
    let mut traces = Vec::new();
    for n in 0..2 {
        let root = tracing::info_span!("order", order.number = n);
        let trace_id = root.context().span().span_context().trace_id();
        let mut g = gateway.clone();
        let customer = customer.clone();
        async move {
            let order = g
                .place_order(pb::PlaceOrderRequest {
                    idempotency_key: format!("o-{n}"),
                    customer_id: customer.clone(),
                    client_reference: format!("PO-{n}"),
                    amount: eur("100.00"),
                })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            let invoice = g
                .invoice_order(pb::InvoiceOrderRequest {
                    idempotency_key: format!("i-{n}"),
                    order_id: order.order_id,
                    net_days: 30,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .invoice
                .unwrap();
            g.record_payment(pb::RecordPaymentRequest {
                idempotency_key: format!("p-{n}"),
                customer_id: customer,
                amount: eur("100.00"),
                method: pb::PaymentMethod::BankTransfer as i32,
                reference: format!("PO-{n}"),
                allocations: vec![pb::PaymentAllocation {
                    invoice_id: invoice.invoice_id,
                    amount: eur("100.00"),
                }],
            })
            .await
            .unwrap();
        }
        .instrument(root)
        .await;
        traces.push(trace_id.to_bytes().to_vec());
    }
    assert_ne!(traces[0], traces[1], "one trace per order");

    // The asynchronous hops land later: export until every consumer of
    // both orders' events has reported, or the deadline passes.
    let consumers = ["credit", "invoicing", "crm-sync"];
    let complete = o2c_testkit::eventually(Duration::from_secs(30), || {
        telemetry.flush();
        let spans = receiver.0.lock().unwrap().clone();
        let traces = traces.clone();
        async move {
            let done = traces.iter().all(|trace| {
                consumers.iter().all(|consumer| {
                    spans.iter().any(|s| {
                        &s.trace_id == trace
                            && s.name == "event.consume"
                            && attribute(s, "messaging.consumer").as_deref() == Some(*consumer)
                    })
                })
            });
            done.then_some(spans)
        }
    })
    .await
    .expect("every event consumer's span reaches the receiver");

    for trace in &traces {
        let in_trace: Vec<&Span> = complete.iter().filter(|s| &s.trace_id == trace).collect();
        let ids: HashSet<&Vec<u8>> = in_trace.iter().map(|s| &s.span_id).collect();
        let roots: Vec<&&Span> = in_trace
            .iter()
            .filter(|s| s.parent_span_id.is_empty())
            .collect();
        assert_eq!(roots.len(), 1, "one root per order");
        assert_eq!(roots[0].name, "order");
        for span in &in_trace {
            if !span.parent_span_id.is_empty() {
                assert!(
                    ids.contains(&span.parent_span_id),
                    "{} has its parent in the same trace",
                    span.name
                );
            }
        }
        let services: HashSet<String> = in_trace
            .iter()
            .filter_map(|s| attribute(s, "rpc.service"))
            .collect();
        for service in [
            "o2c.gateway.v1.GatewayService",
            "o2c.credit.v1.CreditService",
            "o2c.invoicing.v1.InvoicingService",
            "o2c.payments.v1.PaymentsService",
        ] {
            assert!(services.contains(service), "{service} in {services:?}");
        }
        // Each hop is a child of the one that caused it: a service's server
        // span under the gateway's, a consumer's span under the producer's.
        let by_id: HashMap<&Vec<u8>, &&Span> = in_trace.iter().map(|s| (&s.span_id, s)).collect();
        let parent_of = |s: &Span| by_id.get(&s.parent_span_id).map(|p| Span::clone(p));
        for span in in_trace.iter().filter(|s| {
            attribute(s, "rpc.service").as_deref() == Some("o2c.credit.v1.CreditService")
        }) {
            let mut up = parent_of(span);
            let mut through_gateway = false;
            while let Some(parent) = up {
                if attribute(&parent, "rpc.service").as_deref()
                    == Some("o2c.gateway.v1.GatewayService")
                {
                    through_gateway = true;
                }
                up = parent_of(&parent);
            }
            assert!(
                through_gateway,
                "credit's {} descends from a gateway call",
                span.name
            );
        }
        // A consumer's span hangs under the span that recorded the event:
        // a service's handler, or another consumer (a payment applied by
        // invoicing's consumer changes the invoice, whose event credit
        // consumes), and so up to the gateway.
        for span in in_trace.iter().filter(|s| s.name == "event.consume") {
            let mut up = parent_of(span);
            let mut reaches_gateway = false;
            while let Some(parent) = up {
                if attribute(&parent, "rpc.service").as_deref()
                    == Some("o2c.gateway.v1.GatewayService")
                {
                    reaches_gateway = true;
                }
                up = parent_of(&parent);
            }
            assert!(
                reaches_gateway,
                "an asynchronous hop descends from the order's call"
            );
        }
        // Database statements and Redis commands are spans of the call
        // that made them.
        let systems: HashSet<String> = in_trace
            .iter()
            .filter_map(|s| attribute(s, "db.system"))
            .collect();
        assert!(systems.contains("sqlite"), "{systems:?}");
        if redis.is_some() {
            assert!(systems.contains("redis"), "{systems:?}");
        }
        let decision = in_trace
            .iter()
            .find(|s| attribute(s, "credit.decision").is_some())
            .expect("the credit decision is on a span");
        assert_eq!(
            attribute(decision, "credit.decision").as_deref(),
            Some("APPROVE")
        );
        assert_eq!(attribute(decision, "credit.reasons").as_deref(), Some(""));
    }

    // Concurrent orders: those that arrive while another's check is at
    // credit wait, and go to credit together in one call
    // (`gateway::grpc::checks`). Each still has a trace of its own, with
    // credit's decision of it under the gateway's call. Bursts of orders
    // until one was sent together (the first, almost always).
    let counts = suite.gateway_checks.counts();
    let began = std::time::Instant::now();
    let mut burst = Vec::new();
    let mut round = 0;
    while counts.batched() == 0 {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "concurrent orders' checks go to credit together"
        );
        let mut placed = Vec::new();
        for n in 0..8 {
            let root = tracing::info_span!("order", order.number = 100 + round * 8 + n);
            burst.push(
                root.context()
                    .span()
                    .span_context()
                    .trace_id()
                    .to_bytes()
                    .to_vec(),
            );
            let mut g = gateway.clone();
            let request = pb::PlaceOrderRequest {
                idempotency_key: format!("burst-{round}-{n}"),
                customer_id: customer.clone(),
                client_reference: String::new(),
                amount: eur("1.00"),
            };
            placed.push(tokio::spawn(
                async move { g.place_order(request).await.unwrap() }.instrument(root),
            ));
        }
        for order in placed {
            order.await.unwrap();
        }
        round += 1;
    }
    let decided = |spans: &[Span], trace: &Vec<u8>| {
        spans
            .iter()
            .find(|s| &s.trace_id == trace && attribute(s, "credit.decision").is_some())
            .cloned()
    };
    let spans = o2c_testkit::eventually(Duration::from_secs(30), || {
        telemetry.flush();
        let spans = receiver.0.lock().unwrap().clone();
        // Each order's decision, and its gateway call's span (the parent
        // the decision is walked up to).
        let all = burst.iter().all(|trace| {
            decided(&spans, trace).is_some()
                && spans.iter().any(|s| {
                    &s.trace_id == trace
                        && attribute(s, "rpc.service").as_deref()
                            == Some("o2c.gateway.v1.GatewayService")
                })
        });
        async move { all.then_some(spans) }
    })
    .await
    .expect("every concurrent order's credit decision reaches the receiver");
    let by_id: HashMap<&Vec<u8>, &Span> = spans.iter().map(|s| (&s.span_id, s)).collect();
    let mut together = 0;
    for trace in &burst {
        let decision = decided(&spans, trace).unwrap();
        assert_eq!(
            attribute(&decision, "credit.decision").as_deref(),
            Some("APPROVE")
        );
        if attribute(&decision, "batched").as_deref() == Some("BoolValue(true)") {
            together += 1;
        }
        let mut up = by_id.get(&decision.parent_span_id).copied();
        let mut through_gateway = false;
        while let Some(parent) = up {
            assert_eq!(&parent.trace_id, trace, "its parents are in its trace");
            through_gateway |= attribute(parent, "rpc.service").as_deref()
                == Some("o2c.gateway.v1.GatewayService");
            up = by_id.get(&parent.parent_span_id).copied();
        }
        assert!(
            through_gateway,
            "credit's decision of a concurrent order descends from its gateway call"
        );
    }
    assert!(
        together >= 1,
        "an order sent to credit with others was decided under its own span"
    );

    // The same run's metrics reached the receiver over OTLP: RPC rate,
    // errors and duration; decisions by outcome; utilisation; outbox lag;
    // cache lookups (with Redis).
    telemetry.flush();
    let seen = metrics.0.lock().unwrap().clone();
    let has = |name: &str, key: &str, value: &str| {
        seen.iter().any(|(metric, attributes)| {
            metric == name && attributes.iter().any(|(k, v)| k == key && v == value)
        })
    };
    assert!(
        has("rpc.server.duration", "rpc.method", "PlaceOrder"),
        "{seen:?}"
    );
    assert!(has("rpc.server.duration", "rpc.grpc.status_code", "0"));
    assert!(has("o2c.credit.decisions", "outcome", "APPROVE"));
    assert!(
        seen.iter()
            .any(|(m, _)| m == "o2c.credit.exposure.utilisation")
    );
    assert!(has("o2c.outbox.pending", "subscriber", "crm-sync"));
    assert!(has("o2c.outbox.lag", "subscriber", "credit"));
    if redis.is_some() {
        assert!(has("o2c.cache.lookups", "cache", "credit.exposure"));
    }
    // The periodic reconciliation runs on its own clock (every 200 ms):
    // wait for a pass that saw the tenant's orders to be exported.
    let reconciled = o2c_testkit::eventually(Duration::from_secs(10), || {
        telemetry.flush();
        let seen = metrics.0.lock().unwrap().clone();
        async move {
            seen.iter()
                .any(|(metric, attributes)| {
                    metric == "o2c.reconciliation.differences"
                        && attributes.iter().any(|(k, v)| k == "tenant" && v == "t1")
                })
                .then_some(())
        }
    })
    .await;
    assert!(reconciled.is_some(), "the periodic reconciliation ran");
    suite.stop().await.unwrap();
}
