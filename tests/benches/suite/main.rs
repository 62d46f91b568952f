//! How fast and how lean the suite is, against the limits of this machine.
//! Every figure is a ratio of two things measured in the same run, so it
//! holds on a noisy machine:
//!
//! 1. durable credit reservations per second through the gateway (a
//!    `PlaceOrder` each, over 1,000 customers) ÷ raw reservation
//!    transactions per second on the same PostgreSQL at the same
//!    concurrency (goal ≥ 0.5);
//! 2. the same orders all on one customer ÷ spread (goal ≥ 0.8), and zero
//!    approvals over a limit;
//! 3. the gateway's cost: (gateway p50 − direct credit p50) for the credit
//!    check ÷ (bare forwarding hop p50 − direct echo p50), with the echo
//!    service and the bare tonic forwarder built in here (goal ≤ 1.2);
//!    beside it, the same ratio against that bare forwarder in front of
//!    credit's real check, since a hop there costs more than in front of
//!    the echo (the database's time grows with the gap between checks),
//!    and against the same bare forwarder calling over the kit's channel
//!    (`o2c_kit::client::channel`, as every service calls another);
//! 4. idle resident memory of each service binary (goal ≤ 25 MiB) and of
//!    the all-in-one binary (goal ≤ 80 MiB);
//! 5. open-loop load at fixed rates, counting dropped and late requests.
//!
//! Each timed phase also prints where the machine's CPU went
//! (`o2c_tests::cpu`): this process, PostgreSQL, idle.
//!
//! `cargo bench -p o2c-tests --bench suite`. Needs PostgreSQL and Redis
//! (`O2C_TEST_POSTGRES_URL`, `O2C_TEST_REDIS_URL`; the local defaults
//! otherwise). Tuning: `O2C_BENCH_CLIENTS` (16), `O2C_BENCH_CUSTOMERS`
//! (1000), `O2C_BENCH_PHASE_SECS` (4), `O2C_BENCH_WARMUP_SECS` (10),
//! `O2C_BENCH_LATENCY_ROUNDS` (20), `O2C_BENCH_OBJECTIVE_MS` (100),
//! `O2C_BENCH_MEMORY` (1; 0 skips building and starting the binaries),
//! `O2C_BENCH_CHECK_LANES` (credit's `check_lanes`, its default otherwise),
//! `O2C_BENCH_CHECKS_IN_FLIGHT` (the gateway's `credit_checks_in_flight`,
//! its default otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// mimalloc, not glibc's allocator: under load the suite spent a fifth of
/// its CPU in glibc's malloc and free (ARCHITECTURE, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod hop;
mod load;
mod memory;
mod raw;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use o2c_all_in_one::{Settings, start};
use o2c_proto::common::v1::Money;
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use o2c_testkit::Backend;
use o2c_tests::cpu;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

const TENANT: &str = "bench";
/// Every order is 1.00 EUR, as every raw reservation is 100 minor units.
const ORDER_AMOUNT: &str = "1.00";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `url` without TLS when it names this machine and sets no `sslmode`:
/// encryption over loopback protects nothing, and what it costs per round
/// trip is the transport's, not the suite's or PostgreSQL's. The raw
/// baseline and the suite connect alike.
fn plain_on_loopback(url: &str) -> String {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split(['/', '?']).next())
        .map(|authority| {
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host)
        })
        .unwrap_or_default();
    let loopback = ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|name| host == *name || host.starts_with(&format!("{name}:")));
    if !loopback || url.contains("sslmode=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
}

fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

/// A platform client's bearer token on every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A service of the deployment calling for the bench tenant, as the
/// gateway does (a fresh internal token per call).
#[derive(Clone)]
struct Internal;

impl Interceptor for Internal {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let context = o2c_kit::auth::CallContext::for_tenant(TENANT, "bench");
        let token = o2c_kit::auth::mint(&context)
            .ok_or_else(|| Status::internal("no internal auth secret installed"))?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("token is not ASCII"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

type Gateway = GatewayServiceClient<InterceptedService<Channel, Bearer>>;
type Credit = CreditServiceClient<InterceptedService<Channel, Internal>>;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Onboards a customer with a credit limit of `limit` EUR.
async fn onboard(gateway: &mut Gateway, name: &str, limit: &str) -> Result<String, Status> {
    let customer = gateway
        .create_customer(pb::CreateCustomerRequest {
            idempotency_key: format!("c-{name}"),
            legal_name: format!("Bench {name}"),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        })
        .await?
        .into_inner()
        .customer
        .ok_or_else(|| Status::internal("no customer"))?
        .customer_id;
    gateway
        .link_credit_account(pb::LinkCreditAccountRequest {
            idempotency_key: format!("l-{name}"),
            customer_id: customer.clone(),
            agency: "dnb".into(),
            agency_reference: format!("BENCH{name}"),
            parent_customer_id: String::new(),
        })
        .await?;
    gateway
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: format!("s-{name}"),
            customer_id: customer.clone(),
            credit_limit: eur(limit),
            reason: "bench".into(),
            ..Default::default()
        })
        .await?;
    Ok(customer)
}

/// Each step of credit's batches with its average, as `read 412, …`.
fn steps(t: &o2c_credit::grpc::Timings) -> String {
    t.averages()
        .iter()
        .map(|(step, micros)| format!("{step} {micros}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the credit checks' time went in a phase of `clients` closed
/// loops at `rate` orders a second: the steps of the set-wise batches on
/// average (per check for the wait in the queue and the answer after the
/// commit, per batch for the rest), and what is left of an order's time
/// (`clients ÷ rate`, by Little's law) outside credit's queue, batch and
/// answer: the gRPC hops, the gateway, credit's handler and the client.
fn print_batches(t: &o2c_credit::grpc::Timings, clients: usize, rate: f64) {
    let averages = t.averages();
    println!(
        "    credit batches: {} of {:.1} checks on average, {} without a read; µs: {}",
        t.batches(),
        t.checks as f64 / t.batches().max(1) as f64,
        t.reads_skipped,
        steps(t)
    );
    // The read's average is over the batches that read.
    let reads = t.batches().saturating_sub(t.reads_skipped);
    let in_credit: u64 = averages
        .iter()
        .map(|(step, micros)| {
            if *step == "read" {
                micros * reads / t.batches().max(1)
            } else {
                *micros
            }
        })
        .sum();
    let per_order = clients as f64 / rate.max(f64::MIN_POSITIVE) * 1e6;
    println!(
        "    an order's {:.0} µs: {} in credit's queue, batch and answer, {:.0} elsewhere",
        per_order,
        in_credit,
        per_order - in_credit as f64
    );
}

/// The machine's CPU over the phase that began at `before` and ran at
/// `rate` (`o2c_tests::cpu`), when `/proc` tells it.
fn print_cpu(before: Option<cpu::Sample>, rate: f64, unit: &str) {
    let line = cpu::describe(before, cpu::sample(), rate, unit);
    if !line.is_empty() {
        println!("{line}");
    }
}

/// One order of [`ORDER_AMOUNT`]; Ok only when approved.
async fn order(mut gateway: Gateway, customer: String, key: String) -> Result<(), Status> {
    let placed = gateway
        .place_order(pb::PlaceOrderRequest {
            idempotency_key: key,
            customer_id: customer,
            client_reference: String::new(),
            amount: eur(ORDER_AMOUNT),
        })
        .await?
        .into_inner();
    let status = placed.order.map(|o| o.status).unwrap_or_default();
    if status == pb::OrderStatus::Approved as i32 {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "order not approved: status {status}"
        )))
    }
}

fn minor(money: Option<&Money>) -> i64 {
    let amount = money.map(|m| m.amount.as_str()).unwrap_or("0");
    let (units, cents) = amount.split_once('.').unwrap_or((amount, "0"));
    units.parse::<i64>().unwrap() * 100 + format!("{cents:0<2}")[..2].parse::<i64>().unwrap()
}

async fn reserved_minor(gateway: &mut Gateway, customer: &str) -> (i64, i64) {
    let exposure = gateway
        .get_customer_exposure(pb::GetCustomerExposureRequest {
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap();
    (
        minor(exposure.reserved.as_ref()),
        minor(exposure.credit_limit.as_ref()),
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{} cores ({cpu}), {:.1} GiB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory as f64 / 1024.0 / 1024.0
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let clients = env("O2C_BENCH_CLIENTS", 16) as usize;
    let spread = env("O2C_BENCH_CUSTOMERS", 1000) as usize;
    let phase = Duration::from_secs(env("O2C_BENCH_PHASE_SECS", 4));
    let warmup = Duration::from_secs(env("O2C_BENCH_WARMUP_SECS", 10));
    let rounds = env("O2C_BENCH_LATENCY_ROUNDS", 20);
    let objective = Duration::from_millis(env("O2C_BENCH_OBJECTIVE_MS", 100));
    let with_memory = env("O2C_BENCH_MEMORY", 1) == 1;
    // `O2C_BENCH_LOG` (a filter such as `warn,sea_orm=info`) also prints
    // each span's time when it closes: where a request's time goes.
    let log = std::env::var("O2C_BENCH_LOG").ok();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            log.as_deref().unwrap_or("warn,sqlx=error"),
        ))
        .with_span_events(if log.is_some() {
            tracing_subscriber::fmt::format::FmtSpan::CLOSE
        } else {
            tracing_subscriber::fmt::format::FmtSpan::NONE
        })
        .with_writer(std::io::stderr)
        .init();
    let began = Instant::now();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    if with_memory {
        eprintln!("building the service binaries (release) for the memory figures…");
        assert!(
            memory::build(&workspace).unwrap(),
            "cargo build --release of the service binaries failed"
        );
    }

    // PostgreSQL and Redis, as in production: required.
    let redis_url = o2c_testkit::redis_url()
        .await
        .expect("the benchmark needs Redis (O2C_TEST_REDIS_URL)");
    let mut databases = Vec::new();
    let database = |name: &str| {
        let name = name.to_owned();
        async move {
            o2c_testkit::database(Backend::Postgres, &name)
                .await
                .expect("the benchmark needs PostgreSQL (O2C_TEST_POSTGRES_URL)")
        }
    };
    let raw_db = database("bench_raw").await;
    let (version, autovacuum) = {
        use sea_orm::ConnectionTrait;
        let db = sea_orm::Database::connect(&plain_on_loopback(&raw_db.url))
            .await
            .unwrap();
        let show = async |setting: &str| {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    format!("SHOW {setting}"),
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<String>("", setting).unwrap()
        };
        (show("server_version").await, show("autovacuum").await)
    };
    let transport = if plain_on_loopback(&raw_db.url).contains("sslmode=disable") {
        "no TLS on loopback"
    } else {
        "TLS as its URL says"
    };
    println!(
        "O2C suite benchmark: {}; PostgreSQL {version} ({transport}, autovacuum {autovacuum}), Redis; \
         {clients} clients, {spread} customers, {}s phases, each after VACUUM ANALYZE and a CHECKPOINT",
        machine(),
        phase.as_secs()
    );

    // The suite, in one process, each service on its own PostgreSQL database.
    let mut urls = HashMap::new();
    for name in [
        "gateway",
        "customer",
        "credit",
        "invoicing",
        "payments",
        "crm_sync",
    ] {
        let db = database(name).await;
        urls.insert(name.to_owned(), plain_on_loopback(&db.url));
        databases.push(db);
    }
    let mut settings = Settings::ephemeral(|name| urls[name].clone());
    settings.common.redis_url = Some(redis_url.clone());
    settings.auth.jwt_issuers = vec![o2c_tests::identity::issuer()];
    settings.auth.rate_limit.default.per_second = 1_000_000.0;
    settings.auth.rate_limit.default.burst = 1_000_000.0;
    settings.credit_policy.check_lanes = env(
        "O2C_BENCH_CHECK_LANES",
        settings.credit_policy.check_lanes as u64,
    ) as usize;
    settings.credit_checks_in_flight = env(
        "O2C_BENCH_CHECKS_IN_FLIGHT",
        settings.credit_checks_in_flight as u64,
    ) as usize;
    println!(
        "credit check lanes: {}; the gateway's calls to credit in flight per tenant and user: {}",
        settings.credit_policy.check_lanes, settings.credit_checks_in_flight
    );
    let suite = start(&settings).await.unwrap();
    let token = o2c_tests::identity::token(serde_json::json!({
        "sub": "bench", "o2c_tenant": TENANT,
        "o2c_roles": ["platform_client", "credit_analyst"],
    }));
    let gateway: Gateway = GatewayServiceClient::with_interceptor(
        channel(suite.addresses.gateway).await,
        Bearer(format!("Bearer {token}").parse().unwrap()),
    );
    let credit: Credit =
        CreditServiceClient::with_interceptor(channel(suite.addresses.credit).await, Internal);

    // Customers: `spread` for the spread workload, one hot one, and one
    // whose small limit a burst overruns.
    let onboarding = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (mut gateway, next) = (gateway.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= spread {
                    return made;
                }
                made.push((n, onboard(&mut gateway, &n.to_string(), "99000.00").await));
            }
        }));
    }
    let mut customers = vec![String::new(); spread];
    for worker in workers {
        for (n, customer) in worker.await.unwrap() {
            customers[n] = customer.unwrap();
        }
    }
    let customers = Arc::new(customers);
    let hot = onboard(&mut gateway.clone(), "hot", "99000.00")
        .await
        .unwrap();
    let burst = onboard(&mut gateway.clone(), "burst", "10.00")
        .await
        .unwrap();
    eprintln!(
        "onboarded {} customers in {:.1}s",
        spread + 2,
        onboarding.elapsed().as_secs_f64()
    );

    // 1 and 2, raw: the same reservations straight on PostgreSQL.
    let raw = Arc::new(
        raw::Raw::setup(&plain_on_loopback(&raw_db.url), spread, clients)
            .await
            .unwrap(),
    );
    let raw_run = |hot: bool| {
        let raw = raw.clone();
        load::closed(clients, phase, move |n| {
            let raw = raw.clone();
            async move {
                let account = if hot { 0 } else { (n % spread as u64) as i64 };
                match raw.reserve(account).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Status::failed_precondition("over the limit")),
                    Err(e) => Err(Status::unavailable(e.to_string())),
                }
            }
        })
    };
    // Before each phase every database is vacuumed and analyzed, as
    // autovacuum keeps a production server (this machine's PostgreSQL runs
    // without it, and planned the batch's reads on tables it had never
    // analyzed), then a checkpoint.
    let mut tidy = Vec::new();
    for url in std::iter::once(plain_on_loopback(&raw_db.url)).chain(urls.values().cloned()) {
        tidy.push(sea_orm::Database::connect(url).await.unwrap());
    }
    let tidy = Arc::new(tidy);
    let before_phase = || {
        let (raw, tidy) = (raw.clone(), tidy.clone());
        async move {
            use sea_orm::ConnectionTrait;
            for db in tidy.iter() {
                if let Err(error) = db.execute_unprepared("VACUUM ANALYZE").await {
                    eprintln!("  (no VACUUM ANALYZE before the phase: {error})");
                }
            }
            if let Err(error) = raw.checkpoint().await {
                eprintln!("  (no CHECKPOINT before the phase: {error})");
            }
        }
    };
    let mut raw_spread = Vec::new();
    let mut raw_hot = Vec::new();
    for hot in [false, true, true, false] {
        before_phase().await;
        let cpu_before = cpu::sample();
        let run = raw_run(hot).await;
        println!(
            "  raw PostgreSQL  {:<6} {:>8.1} reservations/s ({} failed)",
            if hot { "hot" } else { "spread" },
            run.rate,
            run.failed
        );
        print_cpu(cpu_before, run.rate, "reservation");
        if hot { &mut raw_hot } else { &mut raw_spread }.push(run.rate);
    }

    // 1 and 2 through the gateway, after a warm-up past a fresh
    // database's early fall; spread, hot, hot, spread cancels the drift.
    let hot_approved = Arc::new(AtomicU64::new(0));
    let suite_run = |on_hot: bool, duration: Duration| {
        let (gateway, customers, hot, hot_approved) = (
            gateway.clone(),
            customers.clone(),
            hot.clone(),
            hot_approved.clone(),
        );
        load::closed(clients, duration, move |n| {
            let customer = if on_hot {
                hot.clone()
            } else {
                customers[(n % customers.len() as u64) as usize].clone()
            };
            let (gateway, hot_approved) = (gateway.clone(), hot_approved.clone());
            async move {
                order(gateway, customer, format!("o-{n}")).await?;
                if on_hot {
                    hot_approved.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        })
    };
    before_phase().await;
    let warm = suite_run(false, warmup).await;
    println!(
        "  gateway  warm-up        {:>8.1} orders/s ({} not approved)",
        warm.rate, warm.failed
    );
    let mut suite_spread = Vec::new();
    let mut suite_hot = Vec::new();
    let mut not_approved = 0;
    for on_hot in [false, true, true, false] {
        before_phase().await;
        let before = suite.credit_batches.timings();
        let checks = suite.gateway_checks.counts();
        let checks_before = (checks.alone(), checks.batches(), checks.batched());
        let cpu_before = cpu::sample();
        let run = suite_run(on_hot, phase).await;
        not_approved += run.failed;
        println!(
            "  gateway  {:<6}        {:>8.1} orders/s ({} not approved)",
            if on_hot { "hot" } else { "spread" },
            run.rate,
            run.failed
        );
        print_cpu(cpu_before, run.rate, "order");
        print_batches(
            &suite.credit_batches.timings().since(&before),
            clients,
            run.rate,
        );
        let (batches, batched) = (
            checks.batches() - checks_before.1,
            checks.batched() - checks_before.2,
        );
        println!(
            "    the gateway's calls to credit: {} alone, {} together of {:.1} checks on average",
            checks.alone() - checks_before.0,
            batches,
            batched as f64 / batches.max(1) as f64
        );
        if on_hot {
            &mut suite_hot
        } else {
            &mut suite_spread
        }
        .push(run.rate);
    }

    // No approval over a limit: the hot customer's reservations are
    // exactly its approvals, and a burst far beyond a 10.00 limit gets
    // exactly ten 1.00 orders approved.
    let mut g = gateway.clone();
    let (hot_reserved, hot_limit) = reserved_minor(&mut g, &hot).await;
    let hot_expected = hot_approved.load(Ordering::Relaxed) as i64 * 100;
    let mut bursts = Vec::new();
    for n in 0..(clients * 4) {
        bursts.push(tokio::spawn(order(
            gateway.clone(),
            burst.clone(),
            format!("burst-{n}"),
        )));
    }
    let mut burst_approved = 0;
    for b in bursts {
        if b.await.unwrap().is_ok() {
            burst_approved += 1;
        }
    }
    let (burst_reserved, burst_limit) = reserved_minor(&mut g, &burst).await;
    let over_limit = i64::from(hot_reserved > hot_limit)
        + i64::from(hot_reserved != hot_expected)
        + (burst_reserved - burst_limit).max(0) / 100
        + (burst_approved - 10i64).max(0);
    println!(
        "  hot customer reserved {:.2} for {} approvals; burst of {}: {} approved, \
         reserved {:.2} of {:.2}",
        hot_reserved as f64 / 100.0,
        hot_approved.load(Ordering::Relaxed),
        clients * 4,
        burst_approved,
        burst_reserved as f64 / 100.0,
        burst_limit as f64 / 100.0
    );

    // 3: latency of one client at a time, in interleaved blocks.
    let echo = hop::echo().await.unwrap();
    let forwarder = hop::echo_forwarder(channel(echo).await).await.unwrap();
    let mut echo_direct = hop::Client::new(channel(echo).await);
    let mut echo_forwarded = hop::Client::new(channel(forwarder).await);
    let credit_forwarder = hop::forwarder(channel(suite.addresses.credit).await, hop::CREDIT_CHECK)
        .await
        .unwrap();
    let mut credit_forwarded = hop::Client::new(channel(credit_forwarder).await);
    // The same bare forwarder calling over the kit's channel, as every
    // service calls another (`o2c_kit::client::channel`).
    let kit_forwarder = hop::echo_forwarder(
        o2c_kit::client::channel(&format!("http://{echo}"), Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    let mut echo_kit_forwarded = hop::Client::new(channel(kit_forwarder).await);
    let mut samples: [Vec<Duration>; 8] = Default::default();
    let latency_began = suite.credit_batches.timings();
    let mut n = 0u64;
    for _ in 0..rounds {
        for (kind, bucket) in samples.iter_mut().enumerate() {
            for _ in 0..100 {
                n += 1;
                let customer = customers[(n % spread as u64) as usize].clone();
                let check = credit_pb::CheckAndReserveRequest {
                    idempotency_key: format!("direct-{n}"),
                    tenant_id: TENANT.into(),
                    customer_id: customer.clone(),
                    order_id: format!("direct-{n}"),
                    amount: eur(ORDER_AMOUNT),
                    client_reference: String::new(),
                };
                let started = Instant::now();
                match kind {
                    0 => {
                        credit.clone().check_and_reserve(check).await.unwrap();
                    }
                    1 => order(gateway.clone(), customer, format!("latency-{n}"))
                        .await
                        .unwrap(),
                    2 => {
                        echo_direct.check(check).await.unwrap();
                    }
                    3 => {
                        echo_forwarded.check(check).await.unwrap();
                    }
                    7 => {
                        echo_kit_forwarded.check(check).await.unwrap();
                    }
                    6 => {
                        let (metadata, _, ()) =
                            Internal.call(Request::new(())).unwrap().into_parts();
                        let request = Request::from_parts(metadata, Default::default(), check);
                        credit_forwarded.check_with(request).await.unwrap();
                    }
                    4 => {
                        credit
                            .clone()
                            .get_exposure(credit_pb::GetExposureRequest {
                                tenant_id: TENANT.into(),
                                customer_id: customer,
                            })
                            .await
                            .unwrap();
                    }
                    _ => {
                        gateway
                            .clone()
                            .get_customer_exposure(pb::GetCustomerExposureRequest {
                                customer_id: customer,
                            })
                            .await
                            .unwrap();
                    }
                }
                bucket.push(started.elapsed());
            }
        }
    }
    // One check at a time: a batch of one each, its steps as timed.
    let t = suite.credit_batches.timings().since(&latency_began);
    println!(
        "  latency phase's credit batches: {}, {} without a read; µs: {}",
        t.batches(),
        t.reads_skipped,
        steps(&t)
    );
    let [
        direct,
        through,
        echoed,
        forwarded,
        read_direct,
        read_through,
        check_forwarded,
        kit_forwarded,
    ] = samples.map(|mut s| load::percentiles(&mut s));
    let hop_cost = forwarded.p50 - echoed.p50;
    let order_cost = (through.p50 - direct.p50) / hop_cost;
    let read_cost = (read_through.p50 - read_direct.p50) / hop_cost;
    // The same bare hop in front of the real check: what any hop costs
    // there, the database's share of it included.
    let check_hop_cost = check_forwarded.p50 - direct.p50;
    let order_cost_on_check = (through.p50 - direct.p50) / check_hop_cost;
    // And the bare hop on the kit's own channel: the gateway's layers
    // against a hop over the same transport.
    let kit_hop_cost = kit_forwarded.p50 - echoed.p50;
    let order_cost_on_kit = (through.p50 - direct.p50) / kit_hop_cost;
    for (name, p) in [
        ("credit CheckAndReserve, direct", direct),
        ("gateway PlaceOrder", through),
        ("echo, direct", echoed),
        ("echo through a bare tonic forwarder", forwarded),
        ("credit GetExposure, direct", read_direct),
        ("gateway GetCustomerExposure", read_through),
        ("credit CheckAndReserve, bare forwarder", check_forwarded),
        ("echo through a bare kit-channel forwarder", kit_forwarded),
    ] {
        println!(
            "  latency {name:<41} p50 {:>8.0} µs  p99 {:>8.0} µs  max {:>8.0} µs",
            p.p50, p.p99, p.max
        );
    }

    // 5: open loop at fixed fractions of the closed-loop spread rate.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let closed_rate = mean(&suite_spread);
    let mut open = Vec::new();
    for fraction in [0.5, 0.9] {
        let rate = (closed_rate * fraction).max(1.0);
        let (gateway, customers) = (gateway.clone(), customers.clone());
        let run = load::open(rate, phase * 2, objective, 1024, move |n| {
            let mut gateway = gateway.clone();
            let customer = customers[(n % customers.len() as u64) as usize].clone();
            async move {
                let mut request = Request::new(pb::PlaceOrderRequest {
                    idempotency_key: format!("open-{fraction}-{n}"),
                    customer_id: customer,
                    client_reference: String::new(),
                    amount: eur(ORDER_AMOUNT),
                });
                request.set_timeout(Duration::from_secs(1));
                gateway.place_order(request).await.map(|_| ())
            }
        })
        .await;
        println!(
            "  open loop at {:>6.1}/s ({fraction} of closed): {} scheduled, {} answered, \
             {} late (> {} ms), {} dropped; p50 {:.0} µs p99 {:.0} µs max {:.0} µs; \
             generator behind by {} ms at worst",
            run.offered,
            run.scheduled,
            run.ok,
            run.late,
            objective.as_millis(),
            run.dropped,
            run.latency.p50,
            run.latency.p99,
            run.latency.max,
            run.generator_lag.as_millis()
        );
        open.push((fraction, run));
    }
    suite.stop().await.unwrap();

    // 4: idle memory of each binary as its own process.
    let mut rss = Vec::new();
    if with_memory {
        let dir = memory::binaries().unwrap();
        let secret = o2c_kit::auth::random_secret().unwrap();
        for (binary, section) in memory::SERVICES {
            let db = database(&format!("mem_{section}")).await;
            let (vars, port) = memory::service_env(&db.url, &redis_url, &secret).unwrap();
            let mib = memory::idle_rss(&dir, binary, &vars, port).await.unwrap();
            println!("  idle RSS {binary:<14} {mib:>6.1} MiB");
            rss.push((binary, mib));
            databases.push(db);
        }
        let mut aio = HashMap::new();
        for (_, section) in memory::SERVICES {
            let db = database(&format!("mem_aio_{section}")).await;
            aio.insert(section, db.url.clone());
            databases.push(db);
        }
        let (vars, port) = memory::all_in_one_env(|s| aio[s].clone(), &redis_url).unwrap();
        let mib = memory::idle_rss(&dir, memory::ALL_IN_ONE, &vars, port)
            .await
            .unwrap();
        println!("  idle RSS {:<14} {mib:>6.1} MiB", memory::ALL_IN_ONE);
        rss.push((memory::ALL_IN_ONE, mib));
    }

    // The figures.
    let reservations = closed_rate / mean(&raw_spread);
    let hot_ratio = mean(&suite_hot) / closed_rate;
    println!("\nfigures ({:.0}s in all):", began.elapsed().as_secs_f64());
    println!(
        "  1 reservations through the gateway ÷ raw PostgreSQL: {reservations:.3} \
         ({closed_rate:.1} ÷ {:.1}/s; goal >= 0.5, >= 1.0 by batching)",
        mean(&raw_spread)
    );
    println!(
        "  2 hot customer ÷ spread: {hot_ratio:.3} ({:.1} ÷ {closed_rate:.1}/s; goal >= 0.8); \
         raw PostgreSQL {:.3}; over-limit approvals: {over_limit}; not approved in the \
         timed phases: {not_approved}",
        mean(&suite_hot),
        mean(&raw_hot) / mean(&raw_spread)
    );
    println!(
        "  3 gateway cost ÷ bare hop, credit check: {order_cost:.2} \
         (({:.0} − {:.0}) ÷ ({:.0} − {:.0}) µs; goal <= 1.2); p99 gateway {:.0} µs, \
         bare hop {:.0} µs; pass-through read: {read_cost:.2}",
        through.p50, direct.p50, forwarded.p50, echoed.p50, through.p99, forwarded.p99
    );
    println!(
        "    beside it, the bare hop in front of credit's real check: {order_cost_on_check:.2} \
         (({:.0} − {:.0}) ÷ ({:.0} − {:.0}) µs); p99 through it {:.0} µs",
        through.p50, direct.p50, check_forwarded.p50, direct.p50, check_forwarded.p99
    );
    println!(
        "    and the bare hop over the kit's channel (as the gateway calls credit): \
         {order_cost_on_kit:.2} (({:.0} − {:.0}) ÷ ({:.0} − {:.0}) µs); that hop is {:.2} of \
         the tonic hop",
        through.p50,
        direct.p50,
        kit_forwarded.p50,
        echoed.p50,
        kit_hop_cost / hop_cost
    );
    for (binary, mib) in &rss {
        let goal = if *binary == memory::ALL_IN_ONE {
            80.0
        } else {
            25.0
        };
        println!(
            "  4 idle RSS {binary}: {mib:.1} MiB = {:.2} of the {goal:.0} MiB goal",
            mib / goal
        );
    }
    for (fraction, run) in &open {
        println!(
            "  5 open loop at {fraction} of closed ({:.1}/s): {:.2}% dropped, {:.2}% late",
            run.offered,
            100.0 * run.dropped as f64 / run.scheduled.max(1) as f64,
            100.0 * run.late as f64 / run.scheduled.max(1) as f64
        );
    }
    drop(databases);
    drop(raw_db);
}
