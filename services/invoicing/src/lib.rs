//! The invoicing service: invoices with lines, taxes and payment terms, due
//! dates, and the payments applied to them.
//!
//! # Layout
//! - `domain/`: line arithmetic, terms, due dates, status (no I/O).
//! - `storage/`: the service's own database (entities, migrations, queries).
//! - `grpc/`: `o2c.invoicing.v1.InvoicingService`, the only prost-aware code.

pub mod domain;
pub mod grpc;
pub mod storage;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use o2c_kit::settings::{CurrencyLimits, ServiceSettings, SettingsError};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::invoicing::v1::invoicing_service_server::InvoicingServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.invoicing.v1.InvoicingService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50053;

/// Invoicing operating limits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct InvoicingSettings {
    /// Largest single payout of account credit, per currency (major
    /// units); currencies not listed cannot be paid out through the API.
    pub payout_limit: std::collections::BTreeMap<String, String>,
    /// Services that receive invoicing's events (name → address of their
    /// `o2c.events.v1.EventsService`): `credit` and `crm-sync` take
    /// `InvoiceChanged`, `payments` takes `AllocationRefused`.
    pub event_subscribers: BTreeMap<String, String>,
    /// How often the outbox relay delivers.
    pub relay_interval_ms: u64,
}

impl Default for InvoicingSettings {
    fn default() -> Self {
        let local = |name: &str, port: u16| (name.to_owned(), format!("http://127.0.0.1:{port}"));
        Self {
            payout_limit: o2c_kit::settings::default_currency_limits("10000"),
            event_subscribers: [
                local("credit", 50052),
                local("payments", 50054),
                local("crm-sync", 50055),
            ]
            .into_iter()
            .collect(),
            relay_interval_ms: 250,
        }
    }
}

impl InvoicingSettings {
    /// The payout limits, validated.
    pub fn payout_limits(&self) -> Result<CurrencyLimits, SettingsError> {
        CurrencyLimits::parse("payout_limit", &self.payout_limit)
    }
}

impl Extra for InvoicingSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        self.payout_limits().map(|_| ())
    }
}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<InvoicingSettings>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("invoicing", DEFAULT_PORT, InvoicingSettings::default())
}

/// Connects to the database, applies migrations and returns the routes of
/// a service that sends its events to no one (a service on its own, as in
/// tests); [`build_configured`] names the subscribers.
pub async fn build(service: &ServiceSettings) -> anyhow::Result<Routes> {
    build_with(service, o2c_kit::clock::system_clock()).await
}

/// As [`build`], reading the time from `clock` (tests move it).
pub async fn build_with(
    service: &ServiceSettings,
    clock: o2c_kit::clock::Clock,
) -> anyhow::Result<Routes> {
    let alone = InvoicingSettings {
        event_subscribers: BTreeMap::new(),
        ..InvoicingSettings::default()
    };
    build_configured(service, &alone, clock).await
}

/// As [`build`], with `settings` and `clock`.
pub async fn build_configured(
    service: &ServiceSettings,
    settings: &InvoicingSettings,
    clock: o2c_kit::clock::Clock,
) -> anyhow::Result<Routes> {
    let limits = settings.payout_limits()?;
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("invoicing database {}: {e}", service.database_url))?;
    let relay = o2c_kit::outbox::Relay::new(
        db.clone(),
        &settings.event_subscribers,
        Duration::from_millis(o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS),
    )?;
    let api = grpc::InvoicingApi::new(db.clone(), clock, limits, relay.subscriber_names());
    relay.spawn(Duration::from_millis(settings.relay_interval_ms.max(10)));
    Ok(Routes::new(InvoicingServiceServer::new(api.clone()))
        .add_service(o2c_kit::outbox::Inbox::new(db, api).into_server()))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    settings: InvoicingSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_run(
        SERVICE_NAME,
        &service,
        listener,
        build_configured(&service, &settings, o2c_kit::clock::system_clock()),
        shutdown,
    )
    .await
}
