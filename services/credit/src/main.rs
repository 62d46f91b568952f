//! `o2c-credit`: the credit service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-credit",
        o2c_credit::default_settings(),
        |settings, listener, shutdown| {
            o2c_credit::run(
                settings.service,
                settings.common.redis_url,
                settings.extra,
                listener,
                shutdown,
            )
        },
    )
    .await
}
