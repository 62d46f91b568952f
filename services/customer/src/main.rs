//! `o2c-customer`: the customer service on its own.

/// mimalloc, not glibc's allocator: under load the suite spent a fifth of
/// its CPU in glibc's malloc and free (ARCHITECTURE, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
