//! Test support: a fresh database per test (SQLite file or PostgreSQL
//! database) and the shared Redis.
//!
//! PostgreSQL and Redis come from `O2C_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `O2C_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`). When one is unreachable, tests that
//! need it fail under `CI=true` and are skipped (with a message) otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::{ConnectionTrait, Database};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database made for one test. SQLite files are deleted with it;
/// PostgreSQL databases are dropped by a later run once stale.
pub struct TestDatabase {
    pub url: String,
    // Keeps the SQLite directory alive for the test's duration.
    _dir: Option<tempfile::TempDir>,
}

/// Age after which leftover test databases on PostgreSQL are dropped.
const STALE_AFTER_SECS: u64 = 3 * 3600;
const DATABASE_PREFIX: &str = "o2c_test_";

/// Whether this run is CI (`CI=true`), where a missing service fails a test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Option<TestDatabase> {
    if in_ci() {
        panic!("{what} is required when CI=true but is unavailable: {error}");
    }
    eprintln!("SKIPPED: {what} unavailable ({error}); set CI=true to make this fatal");
    None
}

/// The PostgreSQL server URL used to create test databases.
pub fn postgres_admin_url() -> String {
    std::env::var("O2C_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis URL tests use.
pub fn redis_url_setting() -> String {
    std::env::var("O2C_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh, empty database on `backend`, or None when PostgreSQL is absent
/// outside CI.
pub async fn database(backend: Backend, name: &str) -> Option<TestDatabase> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join(format!("{name}.db"));
            Some(TestDatabase {
                url: format!("sqlite://{}", path.display()),
                _dir: Some(dir),
            })
        }
        Backend::Postgres => postgres_database(name).await,
    }
}

async fn postgres_database(name: &str) -> Option<TestDatabase> {
    let admin_url = postgres_admin_url();
    let admin =
        match tokio::time::timeout(Duration::from_secs(5), Database::connect(&admin_url)).await {
            Ok(Ok(db)) => db,
            Ok(Err(error)) => return unavailable("PostgreSQL", &error),
            Err(_) => return unavailable("PostgreSQL", &"connection timed out"),
        };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    drop_stale(&admin, now).await;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(20)
        .collect();
    let database = format!(
        "{DATABASE_PREFIX}{now}_{safe}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
        .await
        .expect("create test database");
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(admin_url.clone());
    Some(TestDatabase {
        url: format!("{base}/{database}"),
        _dir: None,
    })
}

async fn drop_stale(admin: &sea_orm::DatabaseConnection, now: u64) {
    let Ok(rows) = admin
        .query_all_raw(sea_orm::Statement::from_string(
            admin.get_database_backend(),
            format!("SELECT datname FROM pg_database WHERE datname LIKE '{DATABASE_PREFIX}%'"),
        ))
        .await
    else {
        return;
    };
    for row in rows {
        let Ok(name) = row.try_get::<String>("", "datname") else {
            continue;
        };
        let created = name
            .trim_start_matches(DATABASE_PREFIX)
            .split('_')
            .next()
            .and_then(|s| s.parse::<u64>().ok());
        if created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_SECS) {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
}

/// The Redis URL when Redis answers, None when absent outside CI.
pub async fn redis_url() -> Option<String> {
    let url = redis_url_setting();
    let ping = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Some(url),
        Ok(Err(error)) => unavailable("Redis", &error).map(|_| url),
        Err(_) => unavailable("Redis", &"connection timed out").map(|_| url),
    }
}

/// Polls `check` until it returns Some or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A service served on 127.0.0.1:0 for one test.
pub struct Served {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), o2c_kit::serve::ServeError>>,
}

impl Served {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel to the service.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to the service under test")
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
    }
}

/// Serves `routes` (named `service_name`) through the real service kit on
/// 127.0.0.1:0.
pub async fn serve(service_name: &'static str, routes: tonic::service::Routes) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(o2c_kit::serve::serve(
        service_name,
        o2c_kit::serve::Access::Open,
        listener,
        routes,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    Served { addr, stop, handle }
}

/// The field paths of an InvalidArgument status's violations.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    o2c_kit::error::field_violations(status)
}

/// Asserts `status` is InvalidArgument naming `field` among its violations.
#[track_caller]
pub fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let fields = violated_fields(status);
    assert!(
        fields.iter().any(|f| f == field),
        "expected a violation on {field:?}, got {fields:?} ({})",
        status.message()
    );
}

/// The database URL for `backend`, panicking outside CI skip rules; None
/// means "skip this test" (PostgreSQL absent and not in CI).
pub async fn database_url(backend: Backend, name: &str) -> Option<(String, TestDatabase)> {
    let database = database(backend, name).await?;
    Some((database.url.clone(), database))
}

/// splitmix64: seeded, dependency-free choices a failing run can replay.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
