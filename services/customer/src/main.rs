//! `o2c-customer`: the customer service on its own.

use anyhow::Context;
use o2c_kit::{settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: o2c_customer::Settings = settings::load(
        o2c_customer::Settings::default(),
        settings::config_path_from_args().as_deref(),
    )?;
    settings.service.validate("")?;
    settings.common.validate()?;
    let _telemetry = telemetry::init(
        "o2c-customer",
        settings.common.otlp_endpoint.as_deref(),
        settings.common.log_format,
    )?;
    let listener = tokio::net::TcpListener::bind(settings.service.listen_addr)
        .await
        .with_context(|| format!("binding {}", settings.service.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "customer service listening");
    o2c_customer::run(settings.service, listener, shutdown::signal()).await
}
