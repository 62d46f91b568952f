//! `o2c`: every O2C service in one process.
//!
//! `o2c [--demo] [--config FILE]`. Each service keeps its own port and
//! database (SQLite files under `./data` by default).

/// mimalloc, not glibc's allocator: under load the suite spent a fifth of
/// its CPU in glibc's malloc and free (ARCHITECTURE, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    // The demo makes its tenant's key with an admin key; without one
    // configured, a fresh one nobody else ever sees.
    let made_admin_key = settings.seed_demo && settings.auth.bootstrap_admin_key.is_none();
    if made_admin_key {
        settings.auth.bootstrap_admin_key = Some(o2c_kit::settings::Secret::new(
            o2c_gateway::auth::keys::generate()?.1,
        ));
    }
    settings.validate()?;
    let _telemetry = telemetry::init(
        "o2c-all-in-one",
        settings.common.otlp_endpoint.as_deref(),
        settings.common.log_format,
        settings.common.log_level.as_deref(),
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
        let admin_key = settings
            .auth
            .bootstrap_admin_key
            .as_ref()
            .map(|key| key.expose().to_owned())
            .unwrap_or_default();
        match demo::seed(a.gateway, &admin_key, made_admin_key).await {
            Ok(seeded) => {
                println!(
                    "\nDemo tenant '{}' seeded; its API key (client and analyst): {}\nTry:",
                    demo::DEMO_TENANT,
                    seeded.api_key
                );
                println!(
                    "  grpcurl -plaintext -H 'authorization: ApiKey {}' -d '{{\"customer_id\":\"{}\"}}' {} o2c.gateway.v1.GatewayService/GetCustomerExposure",
                    seeded.api_key, seeded.customer_id, a.gateway
                );
                println!(
                    "  grpcurl -plaintext -H 'authorization: ApiKey {}' -d '{{\"order_id\":\"{}\"}}' {} o2c.gateway.v1.GatewayService/GetOrder",
                    seeded.api_key, seeded.held_order_id, a.gateway
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
