//! The CRM connector: third-party CRMs push customers and interactions in
//! and read credit data out through it. It owns only its links and
//! interactions; customer master data stays with the customer service.
//!
//! # Layout
//! - `domain/`: interaction kinds and paging limits (no I/O).
//! - `storage/`: the connector's own database.
//! - `grpc/`: `o2c.crm_sync.v1.CrmSyncService`, the only prost-aware code.

pub mod domain;
pub mod grpc;
pub mod storage;

use std::future::Future;
use std::time::Duration;

use o2c_kit::settings::{ServiceSettings, SettingsError, validate_call_timeout};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::crm_sync::v1::crm_sync_service_server::CrmSyncServiceServer;
use o2c_proto::customer::v1::customer_service_client::CustomerServiceClient;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.crm_sync.v1.CrmSyncService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50055;

/// Where the connector finds the services it calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Upstreams {
    pub customer_url: String,
    /// Deadline of each call to another service.
    pub call_timeout_ms: u64,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            customer_url: "http://127.0.0.1:50051".into(),
            call_timeout_ms: o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS,
        }
    }
}

impl Extra for Upstreams {
    fn validate(&self) -> Result<(), SettingsError> {
        validate_call_timeout("call_timeout_ms", self.call_timeout_ms)
    }
}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<Upstreams>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("crm-sync", DEFAULT_PORT, Upstreams::default())
}

/// Connects to the database, applies migrations and returns the routes.
pub async fn build(service: &ServiceSettings, upstreams: &Upstreams) -> anyhow::Result<Routes> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("crm-sync database {}: {e}", service.database_url))?;
    let timeout = Duration::from_millis(upstreams.call_timeout_ms);
    let customers =
        CustomerServiceClient::new(o2c_kit::client::channel(&upstreams.customer_url, timeout)?);
    let events = o2c_kit::outbox::Inbox::new(db.clone(), grpc::events::EventsApi).into_server();
    Ok(Routes::new(CrmSyncServiceServer::new(grpc::CrmSyncApi::new(
        db, customers,
    )))
    .add_service(events))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    upstreams: Upstreams,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_run(
        SERVICE_NAME,
        &service,
        listener,
        build(&service, &upstreams),
        shutdown,
    )
    .await
}
