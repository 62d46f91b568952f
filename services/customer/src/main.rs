//! `o2c-customer`: the customer service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    o2c_kit::standalone::main(
        "o2c-customer",
        |settings: o2c_customer::Settings, listener, shutdown| {
            o2c_customer::run(settings.service, listener, shutdown)
        },
    )
    .await
}
