//! What one forwarding hop costs on each way a service can call another:
//! a bare gRPC forwarder (built into the suite benchmark, `suite/hop.rs`)
//! in front of a trivial echo service, its upstream calls made over
//! 1. tonic's `Channel` (a tower `Buffer` task, then hyper's client task,
//!    which spawns a task per call for its answer);
//! 2. hyper-util's client over HTTP/2 (hyper's tasks, no `Buffer`);
//! 3. the kit's HTTP/2 channel alone (`o2c_kit::client::H2Channel`:
//!    HTTP/2 driven with `h2` from the caller's task);
//! 4. the kit's channel as every service calls another
//!    (`o2c_kit::client::channel`: the same with its retries and trace
//!    propagation on top).
//!
//! One client at a time, in interleaved blocks of 100 calls; each hop's
//! cost is its p50 less the echo's direct p50, printed with its ratio to
//! the hop on tonic's `Channel` measured in the same run.
//!
//! `cargo bench -p o2c-tests --bench transport` (`O2C_BENCH_ROUNDS`, 30).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "suite/hop.rs"]
#[allow(dead_code)]
mod hop;
#[path = "suite/load.rs"]
#[allow(dead_code)]
mod load;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use o2c_proto::common::v1::Money;
use o2c_proto::credit::v1::CheckAndReserveRequest;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-util's client, HTTP/2 only, sending to one address.
#[derive(Clone)]
struct Hyper {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
    authority: http::uri::Authority,
}

impl tower::Service<http::Request<tonic::body::Body>> for Hyper {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let client = self.client.clone();
        let mut uri = http::uri::Parts::from(request.uri().clone());
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        Box::pin(async move {
            *request.uri_mut() = http::Uri::from_parts(uri)?;
            Ok(client.request(request).await?)
        })
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rounds: usize = std::env::var("O2C_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let echo = hop::echo().await.unwrap();
    let tonic_hop = hop::echo_forwarder(channel(echo).await).await.unwrap();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let hyper_hop = hop::echo_forwarder(Hyper {
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(connector),
        authority: echo.to_string().parse().unwrap(),
    })
    .await
    .unwrap();
    let h2_hop = hop::echo_forwarder(
        o2c_kit::client::H2Channel::lazy(
            &format!("http://{echo}"),
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let kit_hop = hop::echo_forwarder(
        o2c_kit::client::channel(&format!("http://{echo}"), Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    let kinds = [
        ("echo, direct", echo),
        ("hop on tonic's Channel", tonic_hop),
        ("hop on hyper-util's client", hyper_hop),
        ("hop on the kit's H2Channel alone", h2_hop),
        ("hop on the kit's channel", kit_hop),
    ];
    let mut clients = Vec::new();
    for (_, addr) in kinds {
        clients.push(hop::Client::new(channel(addr).await));
    }
    let mut samples = vec![Vec::new(); kinds.len()];
    let mut n = 0u64;
    // Three rounds of warm-up, not counted.
    for round in 0..rounds + 3 {
        for (kind, client) in clients.iter_mut().enumerate() {
            for _ in 0..100 {
                n += 1;
                let check = CheckAndReserveRequest {
                    idempotency_key: format!("transport-{n}"),
                    tenant_id: "bench".into(),
                    customer_id: "01JD7XQ5K8Y0ZB3N2M4P6R8T0V".into(),
                    order_id: format!("transport-{n}"),
                    amount: Some(Money {
                        amount: "125.00".into(),
                        currency_code: "EUR".into(),
                    }),
                    client_reference: String::new(),
                };
                let started = Instant::now();
                let answer = client.check(check).await.unwrap();
                let elapsed = started.elapsed();
                assert_eq!(
                    answer.decision.map(|d| d.order_id),
                    Some(format!("transport-{n}"))
                );
                if round >= 3 {
                    samples[kind].push(elapsed);
                }
            }
        }
    }
    let measured: Vec<_> = samples.iter_mut().map(|s| load::percentiles(s)).collect();
    let direct = measured[0].p50;
    let tonic = measured[1].p50 - direct;
    println!(
        "transport benchmark: {} rounds of 100 calls a kind, one at a time",
        rounds
    );
    for ((name, _), load::Percentiles { p50, p99, .. }) in kinds.iter().zip(measured) {
        let hop = p50 - direct;
        println!(
            "  {name:<33} p50 {p50:>7.1} µs  p99 {p99:>7.1} µs  hop {hop:>6.1} µs  \
             ÷ tonic's hop {:.2}",
            hop / tonic
        );
    }
}
