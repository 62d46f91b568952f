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

/// A health server on `listener` that counts the connections it accepts,
/// until `stop` resolves.
fn counted_health_server(
    listener: tokio::net::TcpListener,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    use tokio_stream::StreamExt;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |tcp| {
        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tcp
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop),
    )
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

/// Concurrent calls share one connection; a service that restarted on
/// the same address is reached again on a new one, without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_concurrent_calls_and_a_restart_is_reconnected() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = counted_health_server(listener, accepted.clone(), async move {
        let _ = stopped.await;
    });
    let channel =
        o2c_kit::client::channel(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut health = HealthClient::new(channel.clone());
            tokio::spawn(async move { health.check(check()).await })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");

    // The service stops (its connection closes with it) and starts again
    // on the same address.
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let _server = counted_health_server(listener, accepted.clone(), async move {
        let _ = stopped.await;
    });
    let answer = HealthClient::new(channel.clone())
        .check(check())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
}

/// A peer that takes every connection, holds it open and never sends a
/// byte; with the number of connections it took.
async fn silent_peer() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (addr, accepted)
}

/// A peer that takes the connection and never answers: the call ends
/// DEADLINE_EXCEEDED at its deadline (not retried past it), and once the
/// connection has failed a PING it is dropped, so a later call connects
/// anew instead of waiting on the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_calls_out_and_its_connection_is_dropped() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = silent_peer().await;
    let timeout = Duration::from_millis(300);
    let channel = o2c_kit::client::channel(&format!("http://{addr}"), timeout).unwrap();
    let started = std::time::Instant::now();
    let status = HealthClient::new(channel.clone())
        .check(check())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "ended after {took:?}, its deadline {timeout:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // The PING gets no answer within the connect timeout; calls made until
    // then still use (and time out on) the same connection.
    let patience = Duration::from_millis(o2c_kit::client::CONNECT_TIMEOUT_MS);
    let deadline = std::time::Instant::now() + patience * 5;
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead connection was kept"
        );
        let status = HealthClient::new(channel.clone())
            .check(check())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    }
    assert!(
        started.elapsed() >= patience,
        "dropped before the PING's patience ran out"
    );
}

/// A call its caller gives up on before the channel's deadline has the
/// connection checked too: a silent peer's connection is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_by_its_caller_has_a_silent_connection_replaced() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = silent_peer().await;
    // The channel would wait 60 s; the caller gives up after 300 ms.
    let channel =
        o2c_kit::client::channel(&format!("http://{addr}"), Duration::from_secs(60)).unwrap();
    let patience = Duration::from_millis(o2c_kit::client::CONNECT_TIMEOUT_MS);
    let deadline = std::time::Instant::now() + patience * 5;
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead connection was kept"
        );
        let mut health = HealthClient::new(channel.clone());
        let given_up =
            tokio::time::timeout(Duration::from_millis(300), health.check(check())).await;
        assert!(given_up.is_err(), "a silent peer answered: {given_up:?}");
    }
}

/// A message of `size` bytes, asked for by size.
#[derive(Clone, PartialEq, prost::Message)]
struct Blob {
    #[prost(uint32, tag = "1")]
    size: u32,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

/// Answers every call with a [`Blob`] of the size asked.
#[derive(Clone)]
struct Blobs;

struct Sized;

impl tonic::server::UnaryService<Blob> for Sized {
    type Response = Blob;
    type Future = std::future::Ready<Result<tonic::Response<Blob>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Blob>) -> Self::Future {
        let size = request.into_inner().size as usize;
        std::future::ready(Ok(tonic::Response::new(Blob {
            size: 0,
            data: vec![7; size],
        })))
    }
}

impl tonic::server::NamedService for Blobs {
    const NAME: &'static str = "test.Blobs";
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for Blobs {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20);
            Ok(grpc.unary(Sized, request).await)
        })
    }
}

/// Answers larger than the stream and connection windows arrive whole, one
/// after another on one connection: what was read is given back to the
/// peer's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_larger_than_the_flow_control_windows_arrive_whole() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Blobs)
            .serve_with_incoming(o2c_kit::serve::incoming(listener)),
    );
    let channel =
        o2c_kit::client::channel(&format!("http://{addr}"), Duration::from_secs(10)).unwrap();
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(16 << 20);
    // 3 × 3 MiB: more than the 2 MiB stream window each, more than the
    // 5 MiB connection window together.
    for size in [3 << 20, 3 << 20, 3 << 20, 10] {
        client.ready().await.unwrap();
        let blob: Blob = client
            .unary(
                tonic::Request::new(Blob {
                    size,
                    data: Vec::new(),
                }),
                tonic::codegen::http::uri::PathAndQuery::from_static("/test.Blobs/Get"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(blob.data.len(), size as usize);
        assert!(blob.data.iter().all(|&b| b == 7));
    }
}

/// An answer that stops midway (its head and part of its message sent,
/// the connection alive) ends DEADLINE_EXCEEDED at the call's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_stalls_midway_ends_at_the_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        let (_request, mut respond) = connection.accept().await.unwrap().unwrap();
        let head = tonic::codegen::http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let mut stream = respond.send_response(head, false).unwrap();
        // A message announced as 100 bytes long, and 10 of them.
        let mut part = vec![0u8, 0, 0, 0, 100];
        part.extend([1u8; 10]);
        stream.send_data(bytes::Bytes::from(part), false).unwrap();
        // Drives the connection (it answers PINGs) and never finishes.
        while connection.accept().await.is_some() {}
        drop(stream);
    });
    let timeout = Duration::from_millis(500);
    let channel = o2c_kit::client::channel(&format!("http://{addr}"), timeout).unwrap();
    let started = std::time::Instant::now();
    let status = HealthClient::new(channel).check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "ended after {took:?}, its deadline {timeout:?}"
    );
}
