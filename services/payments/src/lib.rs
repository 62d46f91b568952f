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

use o2c_kit::settings::{ServiceSettings, SettingsError};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.payments.v1.PaymentsService";
/// Port the service listens on by default.
pub const DEFAULT_PORT: u16 = 50054;

/// Payment operating limits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PaymentsSettings {
    /// Largest single refund, per currency (major units); currencies not
    /// listed cannot be refunded through the API.
    pub refund_limit: std::collections::BTreeMap<String, String>,
}

impl Default for PaymentsSettings {
    fn default() -> Self {
        Self {
            refund_limit: [
                ("EUR", "10000"),
                ("USD", "10000"),
                ("GBP", "10000"),
                ("CHF", "10000"),
            ]
            .into_iter()
            .map(|(c, a)| (c.to_owned(), a.to_owned()))
            .collect(),
        }
    }
}

impl PaymentsSettings {
    /// The refund limits in minor units, validated.
    pub fn refund_limits(
        &self,
    ) -> Result<std::collections::HashMap<&'static str, i64>, SettingsError> {
        let mut limits = std::collections::HashMap::new();
        for (code, amount) in &self.refund_limit {
            let key = format!("refund_limit.{code}");
            let invalid = |reason: String| SettingsError::Invalid {
                key: key.clone(),
                reason,
            };
            let currency = o2c_money::Currency::from_code(&code.to_uppercase())
                .map_err(|e| invalid(e.to_string()))?;
            let amount =
                o2c_money::Money::parse_in(amount, currency).map_err(|e| invalid(e.to_string()))?;
            if amount.is_negative() {
                return Err(invalid("must not be negative".into()));
            }
            limits.insert(currency.code(), amount.minor_units());
        }
        Ok(limits)
    }
}

impl Extra for PaymentsSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        self.refund_limits().map(|_| ())
    }
}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<PaymentsSettings>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("payments", DEFAULT_PORT, PaymentsSettings::default())
}

/// Connects to the database, applies migrations and returns the routes.
pub async fn build(
    service: &ServiceSettings,
    payments: &PaymentsSettings,
) -> anyhow::Result<Routes> {
    let limits = payments.refund_limits()?;
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("payments database {}: {e}", service.database_url))?;
    Ok(Routes::new(PaymentsServiceServer::new(
        grpc::PaymentsApi::new(db, limits),
    )))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    payments: PaymentsSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = build(&service, &payments).await?;
    o2c_kit::serve::run(SERVICE_NAME, &service, listener, routes, shutdown).await?;
    Ok(())
}
