//! `o2c-gateway`: the gateway on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-gateway",
        |settings: o2c_gateway::Settings, listener, shutdown| {
            o2c_gateway::run(settings.service, settings.upstreams, listener, shutdown)
        },
    )
    .await
}
