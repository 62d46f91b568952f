//! `o2c-payments`: the payments service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-payments",
        |settings: o2c_payments::Settings, listener, shutdown| {
            o2c_payments::run(settings.service, listener, shutdown)
        },
    )
    .await
}
