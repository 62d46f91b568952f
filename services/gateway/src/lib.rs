//! The gateway: the one entry for platform clients. It runs the
//! order-to-cash workflow by calling the owning services over gRPC, and
//! keeps only the order workflow state in its own database.
//!
//! # Layout
//! - `domain/`: order states and limits (no I/O).
//! - `storage/`: the gateway's own database (orders, idempotency claims).
//! - `grpc/`: `o2c.gateway.v1.GatewayService`, the only prost-aware code.

pub mod auth;
pub mod domain;
pub mod grpc;
pub mod storage;

use std::future::Future;
use std::time::Duration;

use o2c_kit::client::channel;
use o2c_kit::settings::{ServiceSettings, SettingsError, validate_call_timeout};
use o2c_kit::standalone::{BinarySettings, Extra};
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::customer::v1::customer_service_client::CustomerServiceClient;
use o2c_proto::gateway::v1::gateway_service_server::GatewayServiceServer;
use o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient;
use o2c_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::Routes;

/// The fully qualified gRPC service name (for health checks).
pub const SERVICE_NAME: &str = "o2c.gateway.v1.GatewayService";
/// Port the gateway listens on by default.
pub const DEFAULT_PORT: u16 = 50050;

/// Where the gateway finds the services it calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Upstreams {
    pub customer_url: String,
    pub credit_url: String,
    pub invoicing_url: String,
    pub payments_url: String,
    /// The CRM connector, which CRMs reach through the gateway.
    pub crm_sync_url: String,
    /// Deadline of each call to another service.
    pub call_timeout_ms: u64,
    /// How often every tenant is reconciled (0: only on request).
    pub reconcile_interval_ms: u64,
    /// Calls to credit's check each tenant and user keeps in flight at
    /// most; orders that arrive meanwhile go to credit in one call
    /// ([`grpc::checks`]). 1 makes the largest batches; more can serve a
    /// tenant from several credit replicas or lanes at once.
    pub credit_checks_in_flight: usize,
    /// Who may call, and how much.
    pub auth: auth::AuthSettings,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            customer_url: "http://127.0.0.1:50051".into(),
            credit_url: "http://127.0.0.1:50052".into(),
            invoicing_url: "http://127.0.0.1:50053".into(),
            payments_url: "http://127.0.0.1:50054".into(),
            crm_sync_url: "http://127.0.0.1:50055".into(),
            call_timeout_ms: o2c_kit::client::DEFAULT_CALL_TIMEOUT_MS,
            reconcile_interval_ms: 600_000,
            credit_checks_in_flight: grpc::checks::IN_FLIGHT,
            auth: auth::AuthSettings::default(),
        }
    }
}

impl Extra for Upstreams {
    fn validate(&self) -> Result<(), SettingsError> {
        validate_call_timeout("call_timeout_ms", self.call_timeout_ms)?;
        grpc::checks::validate_in_flight("credit_checks_in_flight", self.credit_checks_in_flight)?;
        self.auth.validate()
    }
}

/// Settings of the standalone binary.
pub type Settings = BinarySettings<Upstreams>;

/// Defaults of the standalone binary.
pub fn default_settings() -> Settings {
    Settings::local("gateway", DEFAULT_PORT, Upstreams::default())
}

/// The periodic reconciliation: every tenant that placed orders, each in
/// its own tenant's call context (the services refuse anything else).
pub struct Reconciler {
    api: grpc::GatewayApi,
    db: sea_orm::DatabaseConnection,
}

impl Reconciler {
    /// One pass; returns each tenant with the number of differences found
    /// (also logged and recorded as the `o2c.reconciliation.differences`
    /// gauge by the reconciliation itself).
    pub async fn run_once(&self) -> Result<Vec<(String, usize)>, o2c_kit::ApiError> {
        let mut found = Vec::new();
        for tenant in storage::tenants(&self.db).await? {
            let context = o2c_kit::auth::CallContext::for_tenant(&tenant, "reconciler");
            let report =
                o2c_kit::auth::scope(context, self.api.reconcile_tenant(&tenant, None)).await?;
            found.push((tenant, report.differences.len()));
        }
        Ok(found)
    }
}

/// Largest request the gateway decodes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Connects to the database, applies migrations and returns the routes,
/// every one behind the gateway's authentication, roles and rate limits
/// (shared through Redis at `redis_url` when set).
pub async fn build(
    service: &ServiceSettings,
    upstreams: &Upstreams,
    redis_url: Option<&str>,
) -> anyhow::Result<Routes> {
    Ok(build_with_checks(service, upstreams, redis_url).await?.0)
}

/// [`build`], also handing out PlaceOrder's credit checks
/// ([`grpc::checks`]): how they went to credit, and how many wait.
pub async fn build_with_checks(
    service: &ServiceSettings,
    upstreams: &Upstreams,
    redis_url: Option<&str>,
) -> anyhow::Result<(Routes, grpc::checks::GatewayChecks)> {
    let db =
        o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>(&service.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("gateway database {}: {e}", service.database_url))?;
    let timeout = Duration::from_millis(upstreams.call_timeout_ms);
    let up = grpc::Upstream {
        customer: CustomerServiceClient::new(channel(&upstreams.customer_url, timeout)?),
        credit: CreditServiceClient::new(channel(&upstreams.credit_url, timeout)?),
        alerts: CreditServiceClient::new(o2c_kit::client::streaming_channel(
            &upstreams.credit_url,
        )?),
        invoicing: InvoicingServiceClient::new(channel(&upstreams.invoicing_url, timeout)?),
        payments: PaymentsServiceClient::new(channel(&upstreams.payments_url, timeout)?),
    };
    let keys = std::sync::Arc::new(auth::keys::KeyStore::new(db.clone()));
    if let Some(key) = &upstreams.auth.bootstrap_admin_key {
        keys.ensure_bootstrap(key.expose())
            .await
            .map_err(|e| anyhow::anyhow!("bootstrap admin key: {e}"))?;
    }
    let authenticator = auth::Authenticator::new(keys.clone(), &upstreams.auth)
        .map_err(|e| anyhow::anyhow!("auth settings: {e}"))?;
    let guard = auth::GatewayAuthLayer::new(
        authenticator,
        auth::limit::RateLimiter::new(upstreams.auth.rate_limit.clone(), redis_url),
    );
    let journal = o2c_kit::db::connect_async_commit(&service.database_url)
        .await
        .map_err(|e| anyhow::anyhow!("gateway database {}: {e}", service.database_url))?
        .unwrap_or_else(|| db.clone());
    let api = grpc::GatewayApi::new(db.clone(), journal, up, upstreams.credit_checks_in_flight);
    if upstreams.reconcile_interval_ms > 0 {
        let reconciler = Reconciler {
            api: api.clone(),
            db,
        };
        let interval = Duration::from_millis(upstreams.reconcile_interval_ms);
        let reconciler = std::sync::Arc::new(reconciler);
        // Not at once: let the services come up first.
        o2c_kit::background::every(
            interval,
            o2c_kit::background::First::AfterInterval,
            move || {
                let reconciler = std::sync::Arc::clone(&reconciler);
                async move {
                    if let Err(error) = reconciler.run_once().await {
                        tracing::warn!(%error, "reconciliation pass failed; retrying next interval");
                    }
                }
            },
        );
    }
    let checks = api.credit_checks();
    let gateway = GatewayServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin = o2c_proto::gateway::v1::admin_service_server::AdminServiceServer::new(
        grpc::admin::AdminApi::new(keys),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let crm = o2c_proto::crm_sync::v1::crm_sync_service_server::CrmSyncServiceServer::new(
        grpc::crm::CrmDoor::new(
            o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient::new(channel(
                &upstreams.crm_sync_url,
                timeout,
            )?),
        ),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let routes = Routes::new(auth::Guarded::new(&guard, gateway))
        .add_service(auth::Guarded::new(&guard, admin))
        .add_service(auth::Guarded::new(&guard, crm));
    Ok((routes, checks))
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    service: ServiceSettings,
    upstreams: Upstreams,
    redis_url: Option<String>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    o2c_kit::serve::build_and_serve(
        SERVICE_NAME,
        o2c_kit::serve::Access::Public {
            web_origins: upstreams.auth.browser_origins.clone(),
        },
        listener,
        build(&service, &upstreams, redis_url.as_deref()),
        shutdown,
        Duration::from_millis(service.shutdown_grace_ms),
    )
    .await
}
