//! `o2c-gateway`: the gateway service on its own.

/// mimalloc, not glibc's allocator: under load the suite spent a fifth of
/// its CPU in glibc's malloc and free (ARCHITECTURE, "Performance").
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
