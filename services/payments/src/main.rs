//! `o2c-payments`: the payments service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-payments",
        o2c_payments::default_settings(),
        |settings, listener, shutdown| {
            o2c_payments::run(settings.service, settings.extra, listener, shutdown)
        },
    )
    .await
}
