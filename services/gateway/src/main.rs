//! `o2c-gateway`: the gateway service on its own.

/// mimalloc: about a tenth more orders a second than the system allocator
/// in the benchmark (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
