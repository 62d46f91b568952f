//! The credit service: credit accounts and limits, the credit check at
//! order entry with its atomic reservation, the reservation → receivable
//! ledger, and real-time exposure (cached in Redis when configured).
//!
//! # Layout
//! - `domain/`: exposure arithmetic and the policy (no I/O).
//! - `storage/`: the ledger tables, the atomic reservation, the cache.
//! - `grpc/`: `o2c.credit.v1.CreditService`, the only prost-aware code.

pub mod domain;
pub mod grpc;
pub mod storage;

use std::future::Future;

use o2c_kit::settings::ServiceSettings;
use o2c_kit::standalone::{BinarySettings, NoExtra};
use o2c_proto::credit::v1::credit_service_server::CreditServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

use storage::cache::ExposureCache;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.credit.v1.CreditService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50052;

/// Settings of the standalone binary (`O2C_REDIS_URL` enables the cache).
pub type Settings = BinarySettings<NoExtra>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("credit", DEFAULT_PORT, NoExtra {})
}

/// Connects to the database (and Redis when `redis_url` is set), applies
/// migrations and returns the routes. An unreachable Redis only disables
/// the cache: it is never needed for a decision.
pub async fn build(service: &ServiceSettings, redis_url: Option<&str>) -> anyhow::Result<Routes> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("credit database {}: {e}", service.database_url))?;
    let redis = match redis_url {
        Some(url) => match o2c_kit::cache::connect(url).await {
            Ok(connection) => Some(connection),
            Err(error) => {
                tracing::warn!(%error, "Redis unreachable; exposure reads go to the database");
                None
            }
        },
        None => None,
    };
    let api = grpc::CreditApi::new(db, ExposureCache::new(redis));
    Ok(Routes::new(CreditServiceServer::new(api)))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    redis_url: Option<String>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = build(&service, redis_url.as_deref()).await?;
    o2c_kit::serve::run(SERVICE_NAME, &service, listener, routes, shutdown).await?;
    Ok(())
}
