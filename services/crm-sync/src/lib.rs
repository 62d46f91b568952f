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

use o2c_kit::settings::{CommonSettings, ServiceSettings, SettingsError};
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

/// Settings of the standalone binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    #[serde(flatten)]
    pub common: CommonSettings,
    #[serde(flatten)]
    pub upstreams: Upstreams,
}

impl o2c_kit::standalone::BinarySettings for Settings {
    fn service(&self) -> &ServiceSettings {
        &self.service
    }
    fn common(&self) -> &CommonSettings {
        &self.common
    }
    fn validate_more(&self) -> Result<(), SettingsError> {
        if self.upstreams.call_timeout_ms == 0 || self.upstreams.call_timeout_ms > 60_000 {
            return Err(SettingsError::Invalid {
                key: "call_timeout_ms".into(),
                reason: "1 to 60000".into(),
            });
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            service: ServiceSettings::local("crm-sync", DEFAULT_PORT),
            common: CommonSettings::default(),
            upstreams: Upstreams::default(),
        }
    }
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
    Ok(Routes::new(CrmSyncServiceServer::new(
        grpc::CrmSyncApi::new(db, customers),
    )))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    upstreams: Upstreams,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = build(&service, &upstreams).await?;
    o2c_kit::serve::serve(
        SERVICE_NAME,
        listener,
        routes,
        shutdown,
        Duration::from_millis(service.shutdown_grace_ms),
    )
    .await?;
    Ok(())
}
