//! `o2c-gateway`: the gateway service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-gateway",
        o2c_gateway::default_settings(),
        |settings, listener, shutdown| {
            o2c_gateway::run(
                settings.service,
                settings.extra,
                settings.common.redis_url,
                listener,
                shutdown,
            )
        },
    )
    .await
}
