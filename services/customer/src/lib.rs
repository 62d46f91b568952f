//! The customer service: onboarding, contacts, external ids, and the secure
//! link to a customer's credit account.
//!
//! # Layout
//! - `domain/`: what a valid customer and agency reference are (no I/O).
//! - `storage/`: the service's own database (entities, migrations, queries).
//! - `grpc/`: `o2c.customer.v1.CustomerService`, the only prost-aware code.

pub mod domain;
pub mod grpc;
pub mod storage;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use o2c_kit::settings::ServiceSettings;
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::customer::v1::customer_service_server::CustomerServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.customer.v1.CustomerService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50051;

/// Where the customer service's events go.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct CustomerSettings {
    /// Services that receive customer events (name → address of their
    /// `o2c.events.v1.EventsService`): `crm-sync` takes `CustomerChanged`.
    pub event_subscribers: BTreeMap<String, String>,
    /// How often the outbox relay delivers.
    pub relay_interval_ms: u64,
}

impl Default for CustomerSettings {
    fn default() -> Self {
        Self {
            event_subscribers: [("crm-sync".to_owned(), "http://127.0.0.1:50055".to_owned())]
                .into_iter()
                .collect(),
            relay_interval_ms: 250,
        }
    }
}

impl Extra for CustomerSettings {}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<CustomerSettings>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("customer", DEFAULT_PORT, CustomerSettings::default())
}

/// Connects to the database, applies migrations and returns the routes of
/// a service that sends its events to no one (a service on its own, as in
/// tests); [`build_configured`] names the subscribers.
pub async fn build(service: &ServiceSettings) -> anyhow::Result<Routes> {
    let alone = CustomerSettings {
        event_subscribers: BTreeMap::new(),
        ..CustomerSettings::default()
    };
    build_configured(service, &alone).await
}

/// As [`build`], delivering events as `settings` say.
pub async fn build_configured(
    service: &ServiceSettings,
    settings: &CustomerSettings,
) -> anyhow::Result<Routes> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("customer database {}: {e}", service.database_url))?;
    let relay = o2c_kit::outbox::Relay::new(
        db.clone(),
        &settings.event_subscribers,
        Duration::from_millis(o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS),
    )?;
    let api = grpc::CustomerApi::new(db, relay.subscriber_names());
    relay.spawn(Duration::from_millis(settings.relay_interval_ms.max(10)));
    Ok(Routes::new(CustomerServiceServer::new(api)))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    settings: CustomerSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_run(
        SERVICE_NAME,
        &service,
        listener,
        build_configured(&service, &settings),
        shutdown,
    )
    .await
}
