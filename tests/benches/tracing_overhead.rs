//! Throughput with every span exported (100 % sampling, OTLP/gRPC to a
//! real receiver in this process) ÷ throughput with tracing off, measured
//! in the same run, in off-on-on-off phases so machine noise and the
//! database's growth hit both alike.
//!
//! `cargo bench -p o2c-tests --bench tracing_overhead` (PostgreSQL and Redis
//! when they answer, as in production; SQLite otherwise, said in the
//! output). Goal: ratio ≥ 0.85. `O2C_BENCH_PHASE_SECS` (default 3),
//! `O2C_BENCH_WARMUP_SECS` (default 10) and `O2C_BENCH_CLIENTS` (default 8)
//! tune it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use o2c_all_in_one::{Settings, start};
use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Default)]
struct Receiver(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let phase = Duration::from_secs(env("O2C_BENCH_PHASE_SECS", 3));
    let clients = env("O2C_BENCH_CLIENTS", 8);

    // A receiver, and a span pipeline that can be switched on and off.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(o2c_kit::serve::incoming(listener)),
    );
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("http://{addr}"))
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("o2c-bench");
    let (switch, handle) = tracing_subscriber::reload::Layer::new(None);
    tracing_subscriber::registry()
        .with(switch)
        .with(tracing_subscriber::EnvFilter::new(
            "info,sqlx=warn,h2=warn,tower=warn,hyper=warn",
        ))
        .init();

    // The suite: PostgreSQL and Redis when they answer.
    let dir = tempfile::tempdir().unwrap();
    let mut databases = Vec::new();
    let postgres = o2c_testkit::database(o2c_testkit::Backend::Postgres, "bench").await;
    let backend = if postgres.is_some() {
        "PostgreSQL + Redis"
    } else {
        "SQLite (PostgreSQL not found)"
    };
    drop(postgres);
    let mut urls = std::collections::HashMap::new();
    for name in [
        "gateway",
        "customer",
        "credit",
        "invoicing",
        "payments",
        "crm_sync",
    ] {
        let url = match o2c_testkit::database(o2c_testkit::Backend::Postgres, name).await {
            Some(db) => {
                let url = db.url.clone();
                databases.push(db);
                url
            }
            None => format!(
                "sqlite://{}",
                dir.path().join(format!("{name}.db")).display()
            ),
        };
        urls.insert(name.to_owned(), url);
    }
    let mut settings = Settings::ephemeral(|name| urls[name].clone());
    settings.common.redis_url = o2c_testkit::redis_url().await;
    settings.auth.jwt_issuers = vec![o2c_tests::identity::issuer()];
    settings.auth.rate_limit.default.per_second = 1_000_000.0;
    settings.auth.rate_limit.default.burst = 1_000_000.0;
    let suite = start(&settings).await.unwrap();
    let token = o2c_tests::identity::token(serde_json::json!({
        "sub": "bench", "o2c_tenant": "bench", "o2c_roles": ["platform_client", "credit_analyst"],
    }));
    let credential: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let channel = Channel::from_shared(format!("http://{}", suite.addresses.gateway))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let authorized = move |mut request: Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", credential.clone());
        Ok(request)
    };
    let gateway = GatewayServiceClient::with_interceptor(channel, authorized);

    // One customer per client, with room for every order.
    let mut customers = Vec::new();
    for n in 0..clients {
        let mut g = gateway.clone();
        let customer = g
            .create_customer(pb::CreateCustomerRequest {
                idempotency_key: format!("c-{n}"),
                legal_name: format!("Bench {n}"),
                country_code: "DE".into(),
                currency_code: "EUR".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .customer
            .unwrap()
            .customer_id;
        g.link_credit_account(pb::LinkCreditAccountRequest {
            idempotency_key: format!("l-{n}"),
            customer_id: customer.clone(),
            agency: "dnb".into(),
            agency_reference: format!("BENCH{n:05}"),
            parent_customer_id: String::new(),
        })
        .await
        .unwrap();
        g.set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: format!("s-{n}"),
            customer_id: customer.clone(),
            credit_limit: Some(Money {
                amount: "99000.00".into(),
                currency_code: "EUR".into(),
            }),
            reason: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        customers.push(customer);
    }

    let sequence = Arc::new(AtomicU64::new(0));
    let run = |seconds: Duration| {
        let gateway = gateway.clone();
        let customers = customers.clone();
        let sequence = sequence.clone();
        async move {
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicU64::new(0));
            let mut workers = Vec::new();
            for customer in customers {
                let mut g = gateway.clone();
                let (stop, done, sequence) = (stop.clone(), done.clone(), sequence.clone());
                workers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = sequence.fetch_add(1, Ordering::Relaxed);
                        g.place_order(pb::PlaceOrderRequest {
                            idempotency_key: format!("o-{n}"),
                            customer_id: customer.clone(),
                            client_reference: String::new(),
                            amount: Some(Money {
                                amount: "1.00".into(),
                                currency_code: "EUR".into(),
                            }),
                        })
                        .await
                        .unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            let started = Instant::now();
            tokio::time::sleep(seconds).await;
            stop.store(true, Ordering::Relaxed);
            for worker in workers {
                worker.await.unwrap();
            }
            done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
        }
    };

    // Warm up past the early fall in throughput (a fresh database slows
    // sharply over its first seconds of orders, then steadies), then off,
    // on, on, off, twice: this order cancels what steady drift remains.
    run(Duration::from_secs(env("O2C_BENCH_WARMUP_SECS", 10))).await;
    let results = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    for (round, traced) in [false, true, true, false, false, true, true, false]
        .into_iter()
        .enumerate()
    {
        handle
            .modify(|layer| {
                *layer = traced.then(|| tracing_opentelemetry::layer().with_tracer(tracer.clone()));
            })
            .unwrap();
        let rate = run(phase).await;
        println!(
            "phase {round}: tracing {:<3} {rate:>8.1} orders/s",
            if traced { "on" } else { "off" }
        );
        let mut results = results.lock().unwrap();
        if traced {
            results.1.push(rate);
        } else {
            results.0.push(rate);
        }
    }
    handle.modify(|layer| *layer = None).unwrap();
    let _ = provider.force_flush();
    let (off, on) = results.lock().unwrap().clone();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ratio = mean(&on) / mean(&off);
    println!(
        "\ntracing overhead on {backend}, {clients} clients, {}s phases: \
         off {:.1} orders/s, 100% traced {:.1} orders/s; ratio {ratio:.3} (goal >= 0.85); \
         {} spans received",
        phase.as_secs(),
        mean(&off),
        mean(&on),
        receiver.0.load(Ordering::Relaxed)
    );
    suite.stop().await.unwrap();
    drop(databases);
}
