//! `o2c-crm-sync`: the crm-sync service on its own.

/// mimalloc: about a tenth more orders a second than the system allocator
/// in the benchmark (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
