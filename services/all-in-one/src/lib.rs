//! All six services in one process, each on its own port with its own
//! database, so a newcomer can run the suite with one command. Tests use
//! [`start`] the same way, on port 0.

pub mod demo;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use o2c_kit::settings::{CommonSettings, ServiceSettings, SettingsError};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;

/// Settings of the all-in-one binary. Each service has its own section
/// (`O2C_CREDIT__DATABASE_URL=postgres://…` moves credit to PostgreSQL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub gateway: ServiceSettings,
    pub customer: ServiceSettings,
    pub credit: ServiceSettings,
    pub invoicing: ServiceSettings,
    pub payments: ServiceSettings,
    pub crm_sync: ServiceSettings,
    #[serde(flatten)]
    pub common: CommonSettings,
    /// The credit policy (thresholds, authority, reservation time-to-live).
    pub credit_policy: o2c_credit::CreditSettings,
    /// Payment limits (refunds) and automated collection.
    pub payments_policy: o2c_payments::PaymentsSettings,
    /// Invoicing limits (payouts of account credit).
    pub invoicing_policy: o2c_invoicing::InvoicingSettings,
    /// Deadline of each internal call.
    pub call_timeout_ms: u64,
    /// How often the gateway reconciles every tenant (0: only on request).
    pub reconcile_interval_ms: u64,
    /// Calls to credit's check the gateway keeps in flight per tenant and
    /// user; orders that arrive meanwhile go in one call.
    pub credit_checks_in_flight: usize,
    /// Who may call the gateway (JWT issuers, the bootstrap admin key) and
    /// the tenants' request budgets.
    pub auth: o2c_gateway::auth::AuthSettings,
    /// Seed a demo tenant with a customer, an order, an invoice and a
    /// payment once everything is up.
    pub seed_demo: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gateway: ServiceSettings::local("gateway", o2c_gateway::DEFAULT_PORT),
            customer: ServiceSettings::local("customer", o2c_customer::DEFAULT_PORT),
            credit: ServiceSettings::local("credit", o2c_credit::DEFAULT_PORT),
            invoicing: ServiceSettings::local("invoicing", o2c_invoicing::DEFAULT_PORT),
            payments: ServiceSettings::local("payments", o2c_payments::DEFAULT_PORT),
            crm_sync: ServiceSettings::local("crm-sync", o2c_crm_sync::DEFAULT_PORT),
            common: CommonSettings::default(),
            credit_policy: o2c_credit::CreditSettings::default(),
            payments_policy: o2c_payments::PaymentsSettings::default(),
            invoicing_policy: o2c_invoicing::InvoicingSettings::default(),
            call_timeout_ms: o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS,
            reconcile_interval_ms: 600_000,
            credit_checks_in_flight: o2c_gateway::grpc::checks::IN_FLIGHT,
            auth: o2c_gateway::auth::AuthSettings::default(),
            seed_demo: false,
        }
    }
}

impl Settings {
    /// Every service on 127.0.0.1:0 with databases from `database_url(name)`.
    pub fn ephemeral(database_url: impl Fn(&str) -> String) -> Self {
        let on = |name: &str| ServiceSettings {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url(name),
            shutdown_grace_ms: 5_000,
        };
        Self {
            gateway: on("gateway"),
            customer: on("customer"),
            credit: on("credit"),
            invoicing: on("invoicing"),
            payments: on("payments"),
            crm_sync: on("crm_sync"),
            common: CommonSettings::default(),
            credit_policy: o2c_credit::CreditSettings::default(),
            payments_policy: o2c_payments::PaymentsSettings::default(),
            invoicing_policy: o2c_invoicing::InvoicingSettings::default(),
            call_timeout_ms: o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS,
            reconcile_interval_ms: 600_000,
            credit_checks_in_flight: o2c_gateway::grpc::checks::IN_FLIGHT,
            auth: o2c_gateway::auth::AuthSettings::default(),
            seed_demo: false,
        }
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        self.gateway.validate("gateway.")?;
        self.customer.validate("customer.")?;
        self.credit.validate("credit.")?;
        self.invoicing.validate("invoicing.")?;
        self.payments.validate("payments.")?;
        self.crm_sync.validate("crm_sync.")?;
        self.common.validate()?;
        o2c_kit::standalone::Extra::validate(&self.credit_policy)?;
        o2c_kit::standalone::Extra::validate(&self.payments_policy)?;
        o2c_kit::standalone::Extra::validate(&self.invoicing_policy)?;
        self.auth.validate()?;
        o2c_gateway::grpc::checks::validate_in_flight(
            "credit_checks_in_flight",
            self.credit_checks_in_flight,
        )?;
        o2c_kit::settings::validate_call_timeout("call_timeout_ms", self.call_timeout_ms)
    }
}

/// The addresses the services actually listen on.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub gateway: SocketAddr,
    pub customer: SocketAddr,
    pub credit: SocketAddr,
    pub invoicing: SocketAddr,
    pub payments: SocketAddr,
    pub crm_sync: SocketAddr,
}

/// A running suite.
pub struct Suite {
    pub addresses: Addresses,
    /// The credit service's batcher of credit checks: how they were
    /// decided and where their time went.
    pub credit_batches: std::sync::Arc<o2c_credit::grpc::Batcher>,
    /// How the gateway's PlaceOrder checks went to credit: alone, or
    /// together in one call.
    pub gateway_checks: o2c_gateway::grpc::checks::GatewayChecks,
    stop: watch::Sender<bool>,
    /// The services' background loops, stopped after the servers.
    background: std::sync::Arc<o2c_kit::background::Background>,
    /// How long their passes may take to finish then.
    grace: Duration,
    servers: Vec<(
        &'static str,
        JoinHandle<Result<(), o2c_kit::serve::ServeError>>,
    )>,
}

async fn bind(name: &str, settings: &ServiceSettings) -> anyhow::Result<TcpListener> {
    TcpListener::bind(settings.listen_addr)
        .await
        .with_context(|| format!("{name}: binding {}", settings.listen_addr))
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Binds every listener, connects and migrates every database, then
/// serves all six services. Returns once all of them accept calls.
pub async fn start(settings: &Settings) -> anyhow::Result<Suite> {
    settings.validate()?;
    // The services of this process sign and check their calls to each
    // other with one secret: the configured one, else a random one (no one
    // outside the process needs to know it).
    match &settings.common.internal_auth_secret {
        Some(secret) => o2c_kit::auth::install(secret.expose(), "o2c")?,
        None if o2c_kit::auth::installed() => {}
        None => o2c_kit::auth::install(&o2c_kit::auth::random_secret()?, "o2c")?,
    }
    let listeners = [
        ("gateway", bind("gateway", &settings.gateway).await?),
        ("customer", bind("customer", &settings.customer).await?),
        ("credit", bind("credit", &settings.credit).await?),
        ("invoicing", bind("invoicing", &settings.invoicing).await?),
        ("payments", bind("payments", &settings.payments).await?),
        ("crm-sync", bind("crm-sync", &settings.crm_sync).await?),
    ];
    let addr = |i: usize| listeners[i].1.local_addr();
    let addresses = Addresses {
        gateway: addr(0)?,
        customer: addr(1)?,
        credit: addr(2)?,
        invoicing: addr(3)?,
        payments: addr(4)?,
        crm_sync: addr(5)?,
    };
    let call_timeout_ms = settings.call_timeout_ms;
    let gateway_upstreams = o2c_gateway::Upstreams {
        customer_url: url(addresses.customer),
        credit_url: url(addresses.credit),
        invoicing_url: url(addresses.invoicing),
        payments_url: url(addresses.payments),
        crm_sync_url: url(addresses.crm_sync),
        call_timeout_ms,
        reconcile_interval_ms: settings.reconcile_interval_ms,
        credit_checks_in_flight: settings.credit_checks_in_flight,
        auth: settings.auth.clone(),
    };
    let crm_upstreams = o2c_crm_sync::Upstreams {
        customer_url: url(addresses.customer),
        call_timeout_ms,
    };
    let mut credit_policy = settings.credit_policy.clone();
    credit_policy.event_subscribers = [("crm-sync".to_owned(), url(addresses.crm_sync))]
        .into_iter()
        .collect();
    let subscribers = |names: &[(&str, SocketAddr)]| {
        names
            .iter()
            .map(|(name, address)| ((*name).to_owned(), url(*address)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let payments_policy = o2c_payments::PaymentsSettings {
        invoicing_url: url(addresses.invoicing),
        credit_url: url(addresses.credit),
        call_timeout_ms,
        event_subscribers: subscribers(&[
            ("invoicing", addresses.invoicing),
            ("crm-sync", addresses.crm_sync),
        ]),
        ..settings.payments_policy.clone()
    };
    let invoicing_policy = o2c_invoicing::InvoicingSettings {
        event_subscribers: subscribers(&[
            ("credit", addresses.credit),
            ("payments", addresses.payments),
            ("crm-sync", addresses.crm_sync),
        ]),
        ..settings.invoicing_policy.clone()
    };
    // The services' background loops stop with the suite (after its
    // servers: `Suite::stop`).
    let background = std::sync::Arc::new(o2c_kit::background::Background::new());
    let (credit_batches, gateway_checks, routes) = background
        .scope(async {
            let (credit_routes, credit_batches) = o2c_credit::build_running(
                &settings.credit,
                settings.common.redis_url.as_deref(),
                &credit_policy,
            )
            .await?;
            let (gateway_routes, gateway_checks) = o2c_gateway::build_with_checks(
                &settings.gateway,
                &gateway_upstreams,
                settings.common.redis_url.as_deref(),
            )
            .await?;
            let routes: [(&'static str, &'static str, Routes, &ServiceSettings); 6] = [
                (
                    "gateway",
                    o2c_gateway::SERVICE_NAME,
                    gateway_routes,
                    &settings.gateway,
                ),
                (
                    "customer",
                    o2c_customer::SERVICE_NAME,
                    o2c_customer::build_configured(
                        &settings.customer,
                        &o2c_customer::CustomerSettings {
                            event_subscribers: subscribers(&[("crm-sync", addresses.crm_sync)]),
                            ..o2c_customer::CustomerSettings::default()
                        },
                    )
                    .await?,
                    &settings.customer,
                ),
                (
                    "credit",
                    o2c_credit::SERVICE_NAME,
                    credit_routes,
                    &settings.credit,
                ),
                (
                    "invoicing",
                    o2c_invoicing::SERVICE_NAME,
                    o2c_invoicing::build_configured(
                        &settings.invoicing,
                        &invoicing_policy,
                        o2c_kit::clock::system_clock(),
                    )
                    .await?,
                    &settings.invoicing,
                ),
                (
                    "payments",
                    o2c_payments::SERVICE_NAME,
                    o2c_payments::build(&settings.payments, &payments_policy).await?,
                    &settings.payments,
                ),
                (
                    "crm-sync",
                    o2c_crm_sync::SERVICE_NAME,
                    o2c_crm_sync::build(&settings.crm_sync, &crm_upstreams).await?,
                    &settings.crm_sync,
                ),
            ];
            anyhow::Ok((credit_batches, gateway_checks, routes))
        })
        .await?;
    let (stop, stopped) = watch::channel(false);
    let mut servers = Vec::new();
    for ((name, service_name, routes, service), (_, listener)) in routes.into_iter().zip(listeners)
    {
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let grace = Duration::from_millis(service.shutdown_grace_ms);
        // The gateway is the public door and checks callers itself; the
        // others take calls from services of this process only.
        let access = if name == "gateway" {
            o2c_kit::serve::Access::Public {
                web_origins: settings.auth.browser_origins.clone(),
            }
        } else {
            o2c_kit::serve::Access::Internal
        };
        let handle = tokio::spawn(o2c_kit::serve::serve(
            service_name,
            access,
            listener,
            routes,
            shutdown,
            grace,
        ));
        servers.push((name, handle));
    }
    Ok(Suite {
        addresses,
        credit_batches,
        gateway_checks,
        stop,
        servers,
        background,
        grace: Duration::from_millis(
            [
                &settings.gateway,
                &settings.customer,
                &settings.credit,
                &settings.invoicing,
                &settings.payments,
                &settings.crm_sync,
            ]
            .iter()
            .map(|service| service.shutdown_grace_ms)
            .max()
            .unwrap_or_default(),
        ),
    })
}

impl Suite {
    /// Asks every service to stop (health first, then in-flight calls
    /// finish) and waits for all of them, then stops their background
    /// loops (each finishes the pass it is in, within the largest of the
    /// services' shutdown graces).
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let Suite {
            servers,
            background,
            grace,
            ..
        } = self;
        let served = Self::wait(servers).await;
        background.stop(grace).await;
        served
    }

    /// The services' background loops, to watch them ([`Background::running`]
    /// is 0 once [`Suite::stop`] returned).
    ///
    /// [`Background::running`]: o2c_kit::background::Background::running
    pub fn background(&self) -> std::sync::Arc<o2c_kit::background::Background> {
        std::sync::Arc::clone(&self.background)
    }

    /// Waits until every server has ended (after [`Suite::stop`] or a
    /// failure of one of them).
    async fn wait(
        servers: Vec<(
            &'static str,
            JoinHandle<Result<(), o2c_kit::serve::ServeError>>,
        )>,
    ) -> anyhow::Result<()> {
        let mut first_error = None;
        for (name, handle) in servers {
            let outcome = match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(anyhow::anyhow!("{name}: {error}")),
                Err(join) => Err(anyhow::anyhow!("{name} task: {join}")),
            };
            if let Err(error) = outcome {
                tracing::error!(%error, "service ended with an error");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs until `shutdown` resolves, then stops everything.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        shutdown.await;
        self.stop().await
    }
}
