//! The `main` of every single-service binary: load and validate settings,
//! start telemetry, bind, serve until SIGTERM/Ctrl-C.

use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::settings::{self, CommonSettings, ServiceSettings, SettingsError};

/// Resolves when the process is asked to stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Settings of a single-service binary.
pub trait BinarySettings: Serialize + DeserializeOwned + Default {
    fn service(&self) -> &ServiceSettings;
    fn common(&self) -> &CommonSettings;
    /// Checks beyond the shared ones.
    fn validate_more(&self) -> Result<(), SettingsError> {
        Ok(())
    }
}

/// Runs one service binary named `binary` with `run`.
pub async fn main<T, F, Fut>(binary: &'static str, run: F) -> anyhow::Result<()>
where
    T: BinarySettings,
    F: FnOnce(T, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings: T = settings::load(T::default(), settings::config_path_from_args().as_deref())?;
    settings.service().validate("")?;
    settings.common().validate()?;
    settings.validate_more()?;
    let _telemetry = crate::telemetry::init(
        binary,
        settings.common().otlp_endpoint.as_deref(),
        settings.common().log_format,
    )?;
    let addr = settings.service().listen_addr;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "{binary} listening");
    run(settings, listener, Box::pin(crate::shutdown::signal())).await
}
