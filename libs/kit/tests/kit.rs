//! The service kit end to end: a real server on 127.0.0.1:0 with health,
//! reflection and graceful shutdown; layered settings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// No service of its own: the kit adds health and reflection to any
/// `Routes`.
fn routes() -> tonic::service::Routes {
    tonic::service::Routes::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_before_the_server_stops() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(o2c_kit::serve::serve(
        "o2c.test.v1.TestService",
        o2c_kit::serve::Access::Open,
        listener,
        routes(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "o2c.test.v1.TestService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    stop.send(()).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status change before the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // Once its last call is gone the server stops without waiting out
    // the 30 s grace period.
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stopped once in-flight calls ended")
        .unwrap()
        .unwrap();
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own error type.
fn settings_layer_defaults_file_and_environment() {
    let dir = tempfile_dir();
    let file = dir.join("settings.toml");
    std::fs::write(
        &file,
        "listen_addr = \"127.0.0.1:7000\"\ndatabase_url = \"sqlite://from-file.db\"\nshutdown_grace_ms = 1000\n",
    )
    .unwrap();
    let defaults = o2c_kit::settings::ServiceSettings::local("svc", 1);
    figment::Jail::expect_with(|jail| {
        jail.set_env("O2C_SHUTDOWN_GRACE_MS", "2500");
        let loaded = o2c_kit::settings::load(defaults.clone(), Some(&file)).unwrap();
        assert_eq!(loaded.listen_addr.port(), 7000, "file over defaults");
        assert_eq!(loaded.database_url, "sqlite://from-file.db");
        assert_eq!(loaded.shutdown_grace_ms, 2500, "environment over file");

        jail.set_env("O2C_SHUTDOWN_GRACE_MS", "soon");
        let error = o2c_kit::settings::load(defaults.clone(), Some(&file)).unwrap_err();
        assert!(
            error
                .to_string()
                .to_lowercase()
                .contains("shutdown_grace_ms"),
            "{error}"
        );

        let mut bad = defaults.clone();
        bad.database_url = "mysql://x".into();
        let error = bad.validate("credit.").unwrap_err();
        assert!(error.to_string().contains("credit.database_url"), "{error}");
        Ok(())
    });
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("o2c-kit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_service_fails_fast_after_bounded_retries() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let channel =
        o2c_kit::client::channel(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5))
            .unwrap();
    let mut health = HealthClient::new(channel);
    let started = std::time::Instant::now();
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_millis(o2c_kit::client::RETRY_BUDGET_MS + 1_000),
        "gave up after {:?}",
        started.elapsed()
    );
}

/// The health service, answering UNAVAILABLE to its first `fail` calls.
#[derive(Clone)]
struct Flaky<S> {
    inner: S,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    fail: usize,
}

impl<S> tonic::server::NamedService for Flaky<S> {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl<S> tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for Flaky<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call < self.fail {
            let response = tonic::Status::unavailable("warming up").into_http();
            return Box::pin(async move { Ok(response) });
        }
        let future = self.inner.call(request);
        Box::pin(future)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_answer_is_retried_within_bounds() {
    for (fail, succeeds) in [(2, true), (3, false)] {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flaky = Flaky {
            inner: health,
            calls: calls.clone(),
            fail,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(flaky)
                .serve_with_incoming(o2c_kit::serve::incoming(listener)),
        );
        let channel =
            o2c_kit::client::channel(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
        let outcome = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        assert_eq!(outcome.is_ok(), succeeds, "{fail} failures: {outcome:?}");
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            usize::try_from(o2c_kit::client::RETRY_ATTEMPTS)
                .unwrap()
                .min(fail + 1),
            "attempts are bounded"
        );
        server.abort();
    }
}

/// A consumer that counts the events it applied.
#[derive(Clone, Default)]
struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[tonic::async_trait]
impl o2c_kit::outbox::Consumer for Counting {
    const NAME: &'static str = "counting";
    type Applied = ();

    async fn apply(
        &self,
        _txn: &sea_orm::DatabaseTransaction,
        _event: &o2c_proto::events::v1::Event,
    ) -> Result<(), o2c_kit::ApiError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A SQLite database in memory with the outbox and inbox tables.
async fn events_database() -> sea_orm::DatabaseConnection {
    use sea_orm_migration::MigrationTrait;
    let db = o2c_kit::db::connect("sqlite::memory:").await.unwrap();
    let manager = sea_orm_migration::SchemaManager::new(&db);
    o2c_kit::outbox::Migration.up(&manager).await.unwrap();
    o2c_kit::outbox::InboxIndex.up(&manager).await.unwrap();
    db
}

/// A backlog of three full batches reaches the consumer in one interval of
/// the relay (an hour here): passes run back to back while batches are full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_drains_a_backlog_within_one_interval() {
    let counting = Counting::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let inbox = o2c_kit::outbox::Inbox::new(events_database().await, counting.clone());
    tokio::spawn(o2c_kit::serve::serve(
        "o2c.events.v1.EventsService",
        o2c_kit::serve::Access::Open,
        listener,
        tonic::service::Routes::new(inbox.into_server()),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let producer = events_database().await;
    let backlog = 3 * o2c_kit::outbox::BATCH as usize;
    let events = (0..backlog)
        .map(|_| o2c_proto::events::v1::Event {
            tenant_id: "t".into(),
            ..Default::default()
        })
        .collect();
    o2c_kit::outbox::record_all(
        &producer,
        &["counting".to_owned()],
        events,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let subscribers = [("counting".to_owned(), format!("http://{addr}"))]
        .into_iter()
        .collect();
    let relay =
        o2c_kit::outbox::Relay::new(producer, &subscribers, Duration::from_secs(5)).unwrap();
    relay.clone().spawn(Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while relay.pending("counting").await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {backlog} delivered",
            counting.0.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each applied once.
    assert_eq!(
        counting.0.load(std::sync::atomic::Ordering::Relaxed),
        backlog
    );
}
