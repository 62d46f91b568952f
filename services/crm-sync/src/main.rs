//! `o2c-crm-sync`: the CRM connector on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-crm-sync",
        |settings: o2c_crm_sync::Settings, listener, shutdown| {
            o2c_crm_sync::run(settings.service, settings.upstreams, listener, shutdown)
        },
    )
    .await
}
