//! The `main` of every single-service binary: load and validate settings,
//! start telemetry, bind, serve until SIGTERM/Ctrl-C.

use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::settings::{self, CommonSettings, ServiceSettings, SettingsError};

/// Resolves when the process is asked to stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Settings a service adds to the shared ones.
pub trait Extra: Serialize + DeserializeOwned {
    /// Checks beyond what deserialising does.
    fn validate(&self) -> Result<(), SettingsError> {
        Ok(())
    }
}

/// For services that need nothing beyond the shared settings.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NoExtra {}

impl Extra for NoExtra {}

/// Settings of a single-service binary: where it listens and stores, the
/// shared observability and cache settings, and its own `extra` ones. All
/// are flat keys (`O2C_DATABASE_URL`, `O2C_REDIS_URL`, `O2C_CUSTOMER_URL`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BinarySettings<X> {
    #[serde(flatten)]
    pub service: ServiceSettings,
    #[serde(flatten)]
    pub common: CommonSettings,
    #[serde(flatten)]
    pub extra: X,
}

impl<X> BinarySettings<X> {
    /// Defaults of service `name`: 127.0.0.1:`port`, `data/<name>.db`.
    pub fn local(name: &str, port: u16, extra: X) -> Self {
        Self {
            service: ServiceSettings::local(name, port),
            common: CommonSettings::default(),
            extra,
        }
    }
}

/// Runs one service binary named `binary` from `defaults` with `run`.
pub async fn main<X, F, Fut>(
    binary: &'static str,
    defaults: BinarySettings<X>,
    run: F,
) -> anyhow::Result<()>
where
    X: Extra,
    F: FnOnce(BinarySettings<X>, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = settings::load(defaults, settings::config_path_from_args().as_deref())?;
    settings.service.validate("")?;
    settings.common.validate()?;
    settings.extra.validate()?;
    let Some(secret) = settings
        .common
        .internal_auth_secret
        .as_ref()
        .map(settings::Secret::expose)
    else {
        anyhow::bail!(
            "internal_auth_secret is required: set O2C_INTERNAL_AUTH_SECRET to the same secret \
             (at least {} characters) for every service of the deployment",
            crate::auth::MIN_SECRET_LENGTH
        );
    };
    crate::auth::install(secret, binary)?;
    let _telemetry = crate::telemetry::init(
        binary,
        settings.common.otlp_endpoint.as_deref(),
        settings.common.log_format,
        settings.common.log_level.as_deref(),
    )?;
    let addr = settings.service.listen_addr;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "{binary} listening");
    run(settings, listener, Box::pin(crate::shutdown::signal())).await
}
