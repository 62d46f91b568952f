//! The credit service: credit accounts, limits (audited, with approval
//! above authority), group limits, risk scoring, the credit check at order
//! entry with its atomic reservation, the hold queue, alerts, and
//! real-time exposure (cached in Redis when configured).
//!
//! # Layout
//! - `domain/`: exposure arithmetic, the policy, thresholds, authority and
//!   the risk scorecard (no I/O).
//! - `storage/`: the ledger tables, the atomic reservation, the check as a
//!   unit of work, risk data, the cache.
//! - `grpc/`: `o2c.credit.v1.CreditService`, the only prost-aware code, and
//!   the periodic maintenance (reservation expiry, date alerts).

pub mod domain;
pub mod grpc;
pub mod storage;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use o2c_kit::settings::{CurrencyLimits, ServiceSettings, SettingsError};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::credit::v1::credit_service_server::CreditServiceServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use grpc::{Clock, Maintenance, system_clock};
use storage::cache::ExposureCache;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.credit.v1.CreditService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50052;

/// The credit policy and operating limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreditSettings {
    /// The dunning ladder: days past due → reminder, hold or block.
    pub dunning_levels: Vec<domain::DunningLevel>,
    /// Exposure shares of the limit (percent) that raise an alert when
    /// crossed upwards.
    pub alert_thresholds_percent: Vec<u32>,
    /// Days ahead of a limit's next review date that raise an alert.
    pub review_notice_days: i64,
    /// How long an unresolved reservation lives before it is released.
    pub reservation_ttl_ms: u64,
    /// How often reservations are expired and date alerts raised.
    pub maintenance_interval_ms: u64,
    /// The largest limit one user may set alone, per currency (major
    /// units); raising a limit above it needs a second user's approval.
    /// Currencies not listed always need one.
    pub limit_authority: BTreeMap<String, String>,
    /// Alerts buffered for live streams; a consumer further behind skips
    /// ahead and is told how many it missed.
    pub alert_stream_buffer: usize,
    /// Services that receive credit events (name → address of their
    /// `o2c.events.v1.EventsService`).
    pub event_subscribers: BTreeMap<String, String>,
    /// How often the outbox relay delivers.
    pub relay_interval_ms: u64,
    /// Batches of credit checks a tenant may have deciding at once on
    /// PostgreSQL, each for its own share of the customers (on SQLite,
    /// which writes one transaction at a time, always one).
    pub check_lanes: usize,
}

impl Default for CreditSettings {
    fn default() -> Self {
        Self {
            dunning_levels: domain::default_dunning_levels(),
            alert_thresholds_percent: vec![80, 100],
            review_notice_days: 14,
            reservation_ttl_ms: 7 * 24 * 3600 * 1000,
            maintenance_interval_ms: 60_000,
            limit_authority: o2c_kit::settings::default_currency_limits("100000"),
            alert_stream_buffer: grpc::DEFAULT_ALERT_STREAM_BUFFER,
            event_subscribers: [("crm-sync".to_owned(), "http://127.0.0.1:50055".to_owned())]
                .into_iter()
                .collect(),
            relay_interval_ms: 250,
            check_lanes: grpc::DEFAULT_CHECK_LANES,
        }
    }
}

impl CreditSettings {
    /// The validated configuration the service runs with.
    pub fn config(&self, clock: Clock) -> Result<grpc::Config, SettingsError> {
        let invalid = |key: &str, reason: String| SettingsError::Invalid {
            key: key.to_owned(),
            reason,
        };
        let ascending = self
            .dunning_levels
            .windows(2)
            .all(|pair| pair[0].days_past_due < pair[1].days_past_due);
        if !ascending
            || self
                .dunning_levels
                .iter()
                .any(|l| !(1..=3650).contains(&l.days_past_due))
        {
            return Err(invalid(
                "dunning_levels",
                "days_past_due 1 to 3650, strictly ascending".into(),
            ));
        }
        if !(0..=365).contains(&self.review_notice_days) {
            return Err(invalid("review_notice_days", "0 to 365".into()));
        }
        let mut thresholds = self.alert_thresholds_percent.clone();
        thresholds.sort_unstable();
        thresholds.dedup();
        if thresholds.iter().any(|t| *t == 0 || *t > 1_000) {
            return Err(invalid("alert_thresholds_percent", "each 1 to 1000".into()));
        }
        if self.reservation_ttl_ms < 60_000 {
            return Err(invalid("reservation_ttl_ms", "at least 60000".into()));
        }
        if !(1..=1_000_000).contains(&self.alert_stream_buffer) {
            return Err(invalid("alert_stream_buffer", "1 to 1000000".into()));
        }
        if !(1..=64).contains(&self.check_lanes) {
            return Err(invalid("check_lanes", "1 to 64".into()));
        }
        if self.maintenance_interval_ms < 100 {
            return Err(invalid("maintenance_interval_ms", "at least 100".into()));
        }
        let authority = CurrencyLimits::parse("limit_authority", &self.limit_authority)?;
        let ttl_ms = i64::try_from(self.reservation_ttl_ms)
            .map_err(|_| invalid("reservation_ttl_ms", "too large".into()))?;
        Ok(grpc::Config {
            policy: domain::Policy {
                dunning_levels: self.dunning_levels.clone(),
                alert_thresholds_percent: thresholds,
                review_notice_days: self.review_notice_days,
            },
            reservation_ttl: chrono::Duration::milliseconds(ttl_ms),
            authority,
            check_lanes: self.check_lanes,
            clock,
        })
    }
}

impl Extra for CreditSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        self.config(system_clock()).map(|_| ())
    }
}

/// Settings of the standalone binary (`O2C_REDIS_URL` enables the cache).
pub type Settings = BinarySettings<CreditSettings>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("credit", DEFAULT_PORT, CreditSettings::default())
}

/// A built service: its routes, its maintenance and its event relay.
pub struct Built {
    pub routes: Routes,
    pub maintenance: Maintenance,
    pub relay: o2c_kit::outbox::Relay,
    /// How credit checks were decided (set-wise or one by one).
    pub batches: std::sync::Arc<grpc::Batcher>,
}

/// Connects to the database (and Redis when `redis_url` is set), applies
/// migrations, and builds the service on `clock`. An unreachable Redis only
/// disables the cache: it is never needed for a decision.
pub async fn build_with(
    service: &ServiceSettings,
    redis_url: Option<&str>,
    credit: &CreditSettings,
    clock: Clock,
) -> anyhow::Result<Built> {
    let config = credit.config(clock)?;
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("credit database {}: {e}", service.database_url))?;
    let batch_db = o2c_kit::db::connect_fixed_plans(&service.database_url)
        .await
        .map_err(|e| anyhow::anyhow!("credit database {}: {e}", service.database_url))?;
    let cache = match redis_url {
        Some(url) => ExposureCache::connect(url).await,
        None => ExposureCache::new(None),
    };
    let relay = o2c_kit::outbox::Relay::new(
        db.clone(),
        &credit.event_subscribers,
        Duration::from_millis(o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS),
    )?;
    let db_for_events = db.clone();
    let api = grpc::CreditApi::new(
        db,
        batch_db,
        cache,
        config,
        grpc::AlertHub::new(credit.alert_stream_buffer),
        relay.subscriber_names(),
    );
    Ok(Built {
        relay,
        batches: api.batches(),
        maintenance: Maintenance::new(api.clone()),
        routes: Routes::new(CreditServiceServer::new(api.clone()))
            .add_service(o2c_kit::outbox::Inbox::new(db_for_events, api).into_server()),
    })
}

/// Builds the service on the system clock and starts its maintenance loop
/// and event relay.
pub async fn build(
    service: &ServiceSettings,
    redis_url: Option<&str>,
    credit: &CreditSettings,
) -> anyhow::Result<Routes> {
    build_running(service, redis_url, credit)
        .await
        .map(|(routes, _)| routes)
}

/// [`build`], also returning the batcher of its credit checks (whose
/// [`grpc::Batcher::timings`] tell where their time goes).
pub async fn build_running(
    service: &ServiceSettings,
    redis_url: Option<&str>,
    credit: &CreditSettings,
) -> anyhow::Result<(Routes, std::sync::Arc<grpc::Batcher>)> {
    let built = build_with(service, redis_url, credit, system_clock()).await?;
    built
        .relay
        .clone()
        .spawn(Duration::from_millis(credit.relay_interval_ms.max(10)));
    let interval = Duration::from_millis(credit.maintenance_interval_ms);
    let maintenance = std::sync::Arc::new(built.maintenance);
    o2c_kit::background::every(interval, o2c_kit::background::First::Now, move || {
        let maintenance = std::sync::Arc::clone(&maintenance);
        async move {
            match maintenance.run_once().await {
                Ok((0, 0)) => {}
                Ok((expired, alerts)) => tracing::info!(expired, alerts, "credit maintenance"),
                Err(error) => {
                    tracing::warn!(%error, "credit maintenance failed; retrying next interval")
                }
            }
        }
    });
    Ok((built.routes, built.batches))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    redis_url: Option<String>,
    credit: CreditSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_run(
        SERVICE_NAME,
        &service,
        listener,
        build(&service, redis_url.as_deref(), &credit),
        shutdown,
    )
    .await
}
