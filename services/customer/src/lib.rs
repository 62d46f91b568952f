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

use std::future::Future;
use std::time::Duration;

use o2c_kit::settings::{CommonSettings, ServiceSettings};
use o2c_proto::customer::v1::customer_service_server::CustomerServiceServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.customer.v1.CustomerService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50051;

/// Settings of the standalone binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    #[serde(flatten)]
    pub common: CommonSettings,
}

impl o2c_kit::standalone::BinarySettings for Settings {
    fn service(&self) -> &ServiceSettings {
        &self.service
    }
    fn common(&self) -> &CommonSettings {
        &self.common
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            service: ServiceSettings::local("customer", DEFAULT_PORT),
            common: CommonSettings::default(),
        }
    }
}

/// Connects to the database, applies migrations and returns the routes.
pub async fn build(service: &ServiceSettings) -> anyhow::Result<Routes> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("customer database {}: {e}", service.database_url))?;
    Ok(Routes::new(CustomerServiceServer::new(
        grpc::CustomerApi::new(db),
    )))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = build(&service).await?;
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
