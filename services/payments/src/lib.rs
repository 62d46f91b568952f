//! The payments service: receipts and cash application. Whatever a payment
//! does not allocate stays on it as unapplied cash; nothing is dropped.
//!
//! # Layout
//! - `domain/`: allocation rules and card-number screening (no I/O).
//! - `storage/`: the service's own database (entities, migrations, queries).
//! - `grpc/`: `o2c.payments.v1.PaymentsService`, the only prost-aware code.

pub mod domain;
pub mod grpc;
pub mod storage;

use std::future::Future;

use o2c_kit::settings::ServiceSettings;
use o2c_kit::standalone::{BinarySettings, NoExtra};
use o2c_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.payments.v1.PaymentsService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50054;

/// Settings of the standalone binary.
pub type Settings = BinarySettings<NoExtra>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("payments", DEFAULT_PORT, NoExtra {})
}

/// Connects to the database, applies migrations and returns the routes.
pub async fn build(service: &ServiceSettings) -> anyhow::Result<Routes> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("payments database {}: {e}", service.database_url))?;
    Ok(Routes::new(PaymentsServiceServer::new(
        grpc::PaymentsApi::new(db),
    )))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = build(&service).await?;
    o2c_kit::serve::run(SERVICE_NAME, &service, listener, routes, shutdown).await?;
    Ok(())
}
