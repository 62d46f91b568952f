//! `o2c-crm-sync`: the crm-sync service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-crm-sync",
        o2c_crm_sync::default_settings(),
        |settings, listener, shutdown| {
            o2c_crm_sync::run(settings.service, settings.extra, listener, shutdown)
        },
    )
    .await
}
