//! `o2c-customer`: the customer service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-customer",
        o2c_customer::default_settings(),
        |settings, listener, shutdown| {
            o2c_customer::run(settings.service, settings.extra, listener, shutdown)
        },
    )
    .await
}
