//! `o2c`: every O2C service in one process.
//!
//! `o2c [--demo] [--config FILE]`. Each service keeps its own port and
//! database (SQLite files under `./data` by default).

use o2c_all_in_one::{Settings, demo, start};
use o2c_kit::{settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut settings: Settings = settings::load(
        Settings::default(),
        settings::config_path_from_args().as_deref(),
    )?;
    if std::env::args().any(|arg| arg == "--demo") {
        settings.seed_demo = true;
    }
    settings.validate()?;
    let _telemetry = telemetry::init(
        "o2c-all-in-one",
        settings.common.otlp_endpoint.as_deref(),
        settings.common.log_format,
    )?;
    let suite = start(&settings).await?;
    let a = suite.addresses;
    tracing::info!(
        gateway = %a.gateway, customer = %a.customer, credit = %a.credit,
        invoicing = %a.invoicing, payments = %a.payments, crm_sync = %a.crm_sync,
        "all services up"
    );
    println!("\nO2C Credit Cloud is running (all-in-one).");
    println!("  gateway    {}", a.gateway);
    println!(
        "  customer   {}   credit {}   invoicing {}",
        a.customer, a.credit, a.invoicing
    );
    println!("  payments   {}   crm-sync {}", a.payments, a.crm_sync);
    if settings.seed_demo {
        match demo::seed(a.gateway).await {
            Ok(seeded) => {
                println!("\nDemo tenant '{}' seeded. Try:", demo::DEMO_TENANT);
                println!(
                    "  grpcurl -plaintext -H 'x-tenant-id: {}' -d '{{\"customer_id\":\"{}\"}}' {} o2c.gateway.v1.GatewayService/GetCustomerExposure",
                    demo::DEMO_TENANT,
                    seeded.customer_id,
                    a.gateway
                );
                println!(
                    "  grpcurl -plaintext -H 'x-tenant-id: {}' -d '{{\"order_id\":\"{}\"}}' {} o2c.gateway.v1.GatewayService/GetOrder",
                    demo::DEMO_TENANT,
                    seeded.held_order_id,
                    a.gateway
                );
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "seeding demo data failed");
            }
        }
    } else {
        println!(
            "\nTry: grpcurl -plaintext {} list   (start with --demo for sample data)",
            a.gateway
        );
    }
    println!("\nCtrl-C or SIGTERM stops it.\n");
    suite.run_until(shutdown::signal()).await
}
