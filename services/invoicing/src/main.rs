//! `o2c-invoicing`: the invoicing service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-invoicing",
        o2c_invoicing::default_settings(),
        |settings, listener, shutdown| {
            o2c_invoicing::run(settings.service, settings.extra, listener, shutdown)
        },
    )
    .await
}
