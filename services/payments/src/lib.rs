//! The payments service: receipts and cash application. Whatever a payment
//! does not allocate stays on it as unapplied cash; nothing is dropped.
//!
//! # Layout
//! - `domain/`: allocation rules and card-number screening (no I/O).
//! - `storage/`: the service's own database (entities, migrations, queries).
//! - `grpc/`: `o2c.payments.v1.PaymentsService`, the only prost-aware code.

pub mod collector;
pub mod domain;
pub mod grpc;
pub mod storage;

use std::future::Future;

use o2c_kit::settings::{CurrencyLimits, ServiceSettings, SettingsError};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.payments.v1.PaymentsService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50054;

/// Payment operating limits, automated collection and the services the
/// collector calls.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PaymentsSettings {
    /// Largest single refund, per currency (major units); currencies not
    /// listed cannot be refunded through the API.
    pub refund_limit: std::collections::BTreeMap<String, String>,
    /// Delay before each retry of a declined collection; after the last,
    /// the session fails and an alert is raised.
    pub collection_retry_schedule_ms: Vec<u64>,
    /// How often due collections are attempted.
    pub collection_interval_ms: u64,
    /// The simulated processor (the only one shipped).
    pub processor: domain::processor::SimulatedSettings,
    pub invoicing_url: String,
    pub credit_url: String,
    /// Deadline of each call to another service.
    pub call_timeout_ms: u64,
    /// Services that receive payments' events (name → address of their
    /// `o2c.events.v1.EventsService`): `invoicing` and `crm-sync` take
    /// `PaymentChanged`.
    pub event_subscribers: std::collections::BTreeMap<String, String>,
    /// How often the outbox relay delivers.
    pub relay_interval_ms: u64,
}

impl Default for PaymentsSettings {
    fn default() -> Self {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        Self {
            refund_limit: o2c_kit::settings::default_currency_limits("10000"),
            collection_retry_schedule_ms: vec![DAY_MS, 3 * DAY_MS, 7 * DAY_MS],
            collection_interval_ms: 60_000,
            processor: domain::processor::SimulatedSettings::default(),
            invoicing_url: "http://127.0.0.1:50053".into(),
            credit_url: "http://127.0.0.1:50052".into(),
            call_timeout_ms: o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS,
            event_subscribers: [
                ("invoicing".to_owned(), "http://127.0.0.1:50053".to_owned()),
                ("crm-sync".to_owned(), "http://127.0.0.1:50055".to_owned()),
            ]
            .into_iter()
            .collect(),
            relay_interval_ms: 250,
        }
    }
}

impl PaymentsSettings {
    /// The refund limits, validated.
    pub fn refund_limits(&self) -> Result<CurrencyLimits, SettingsError> {
        CurrencyLimits::parse("refund_limit", &self.refund_limit)
    }
}

impl Extra for PaymentsSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        self.refund_limits()?;
        o2c_kit::settings::validate_call_timeout("call_timeout_ms", self.call_timeout_ms)?;
        let invalid = |key: &str, reason: &str| SettingsError::Invalid {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if self.collection_retry_schedule_ms.len() > 20
            || self.collection_retry_schedule_ms.iter().any(|d| *d < 1_000)
        {
            return Err(invalid(
                "collection_retry_schedule_ms",
                "at most 20 delays, each at least 1000",
            ));
        }
        if self.collection_interval_ms < 100 {
            return Err(invalid("collection_interval_ms", "at least 100"));
        }
        if self.processor.random_decline_percent > 100 {
            return Err(invalid("processor.random_decline_percent", "0 to 100"));
        }
        Ok(())
    }
}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<PaymentsSettings>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("payments", DEFAULT_PORT, PaymentsSettings::default())
}

/// A built service: its routes, its collector and its event relay.
pub struct Built {
    pub routes: Routes,
    pub collector: collector::Collector,
    pub relay: o2c_kit::outbox::Relay,
}

/// Connects to the database, applies migrations, and builds the service on
/// `clock` with `processor`.
pub async fn build_with(
    service: &ServiceSettings,
    payments: &PaymentsSettings,
    clock: o2c_kit::clock::Clock,
    processor: std::sync::Arc<dyn domain::processor::Processor>,
) -> anyhow::Result<Built> {
    o2c_kit::standalone::Extra::validate(payments)?;
    let limits = payments.refund_limits()?;
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("payments database {}: {e}", service.database_url))?;
    let timeout = std::time::Duration::from_millis(payments.call_timeout_ms);
    let relay = o2c_kit::outbox::Relay::new(db.clone(), &payments.event_subscribers, timeout)?;
    let events = grpc::PaymentEvents::new(relay.subscriber_names());
    let collector = collector::Collector {
        db: db.clone(),
        events: events.clone(),
        processor,
        invoicing: o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient::new(
            o2c_kit::client::channel(&payments.invoicing_url, timeout)?,
        ),
        credit: o2c_proto::credit::v1::credit_service_client::CreditServiceClient::new(
            o2c_kit::client::channel(&payments.credit_url, timeout)?,
        ),
        retry_schedule_ms: payments.collection_retry_schedule_ms.clone(),
        clock: clock.clone(),
    };
    let api = grpc::PaymentsApi::new(db.clone(), limits, clock, events);
    Ok(Built {
        routes: Routes::new(PaymentsServiceServer::new(api.clone()))
            .add_service(o2c_kit::outbox::Inbox::new(db, api).into_server()),
        collector,
        relay,
    })
}

/// Builds the service on the system clock and the simulated processor, and
/// starts the collector.
pub async fn build(
    service: &ServiceSettings,
    payments: &PaymentsSettings,
) -> anyhow::Result<Routes> {
    let processor = std::sync::Arc::new(domain::processor::Simulated::new(
        payments.processor.clone(),
    ));
    let built = build_with(service, payments, o2c_kit::clock::system_clock(), processor).await?;
    built.relay.clone().spawn(std::time::Duration::from_millis(
        payments.relay_interval_ms.max(10),
    ));
    let interval = std::time::Duration::from_millis(payments.collection_interval_ms);
    let collector = std::sync::Arc::new(built.collector);
    o2c_kit::background::every(interval, o2c_kit::background::First::Now, move || {
        let collector = std::sync::Arc::clone(&collector);
        async move {
            match collector.run_once().await {
                Ok(pass) if pass == collector::Pass::default() => {}
                Ok(pass) => tracing::info!(?pass, "collection pass"),
                Err(error) => {
                    tracing::warn!(%error, "collection pass failed; retrying next interval")
                }
            }
        }
    });
    Ok(built.routes)
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    payments: PaymentsSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_run(
        SERVICE_NAME,
        &service,
        listener,
        build(&service, &payments),
        shutdown,
    )
    .await
}
