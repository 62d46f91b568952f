//! Serving one gRPC service: health (`grpc.health.v1`), reflection (v1 and
//! v1alpha, since older grpcurl speaks only v1alpha), W3C trace-context
//! extraction, and graceful shutdown.
//!
//! Shutdown order: health turns NOT_SERVING first so balancers stop sending,
//! then the listener closes and in-flight calls finish, bounded by a grace
//! period.

use std::future::Future;
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Serving failed to start or the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Who may call a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Only other services of the deployment: every call but health and
    /// reflection needs a valid internal token ([`crate::auth`]).
    Internal,
    /// The public door (the gateway), which authenticates callers itself.
    /// It also speaks gRPC-Web (HTTP/1.1) for browsers, and answers CORS
    /// for pages served from `web_origins` (e.g. `https://console.example`).
    Public { web_origins: Vec<String> },
    /// Anyone, unchecked: a service on its own in a test.
    Open,
}

/// Packages whose services the public door serves.
pub const PUBLIC_PACKAGES: &[&str] = &["o2c.gateway.v1", "o2c.crm_sync.v1"];

/// The suite's descriptors with every service outside [`PUBLIC_PACKAGES`]
/// removed.
fn public_descriptors() -> Vec<u8> {
    use prost::Message;
    match prost_types::FileDescriptorSet::decode(o2c_proto::FILE_DESCRIPTOR_SET) {
        Ok(mut set) => {
            for file in &mut set.file {
                if !PUBLIC_PACKAGES.contains(&file.package()) {
                    file.service.clear();
                }
            }
            set.encode_to_vec()
        }
        // Generated at build time from our own protos: cannot fail to
        // decode; describe nothing rather than everything if it did.
        Err(error) => {
            tracing::error!(%error, "descriptor set undecodable; reflection serves nothing");
            Vec::new()
        }
    }
}

/// CORS for gRPC-Web calls from `origins` (none: no cross-origin calls).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<http::HeaderValue> = origins
        .iter()
        .filter_map(|origin| origin.parse().ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([http::Method::POST])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(3600))
}

/// Serves `routes` (the service named `service_name`, e.g.
/// `o2c.credit.v1.CreditService`) on `listener` until `shutdown` resolves.
pub async fn serve(
    service_name: &'static str,
    access: Access,
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;

    // The public door describes only its own services: the internal ones'
    // definitions stay out (their messages stay, the gateway's use them).
    let descriptors = match &access {
        Access::Public { .. } => public_descriptors(),
        _ => o2c_proto::FILE_DESCRIPTOR_SET.to_vec(),
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(service_name, ServingStatus::NotServing)
            .await;
        // Nobody listening means the server already ended.
        let _ = stopping_tx.send(true);
    });

    let mut server_stop = stopping_rx.clone();
    let web = match &access {
        Access::Public { web_origins } => Some(web_origins.clone()),
        _ => None,
    };
    let server = Server::builder()
        .trace_fn(request_span)
        .accept_http1(web.is_some())
        .layer(crate::metrics::RpcMetricsLayer)
        .layer(tower::util::option_layer(web.as_deref().map(cors)))
        .layer(tower::util::option_layer(
            web.is_some().then(tonic_web::GrpcWebLayer::new),
        ))
        .layer(tower::util::option_layer(
            (access == Access::Internal).then_some(crate::auth::InternalAuthLayer),
        ))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Replies go out at once: with Nagle's algorithm on, a reply
        // written in more than one segment waited for the caller's delayed
        // ACK (40 ms on Linux) before its last part left; measured by the
        // suite benchmark, where it cost a credit check 44 ms at p50.
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = server_stop.wait_for(|stopping| *stopping).await;
        });
    tokio::pin!(server);

    let mut stop = stopping_rx;
    tokio::select! {
        result = &mut server => return Ok(result?),
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    tracing::info!(service = service_name, "draining in-flight calls");
    match tokio::time::timeout(grace, server).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            tracing::warn!(
                service = service_name,
                grace_ms = grace.as_millis() as u64,
                "in-flight calls still running after the grace period; stopping anyway"
            );
            Ok(())
        }
    }
}

/// Builds a service with `build` and serves it to the other services of
/// the deployment only ([`Access::Internal`]), with the grace period from
/// its settings, until `shutdown` resolves; then stops the background
/// loops that `build` started ([`crate::background`]), letting each
/// finish its pass within a second grace period.
pub async fn build_and_run(
    service_name: &'static str,
    settings: &crate::settings::ServiceSettings,
    listener: TcpListener,
    build: impl Future<Output = anyhow::Result<Routes>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    build_and_serve(
        service_name,
        Access::Internal,
        listener,
        build,
        shutdown,
        Duration::from_millis(settings.shutdown_grace_ms),
    )
    .await
}

/// [`build_and_run`] with the given `access` and `grace`.
pub async fn build_and_serve(
    service_name: &'static str,
    access: Access,
    listener: TcpListener,
    build: impl Future<Output = anyhow::Result<Routes>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let background = crate::background::Background::new();
    let routes = background.scope(build).await?;
    let served = serve(service_name, access, listener, routes, shutdown, grace).await;
    background.stop(grace).await;
    Ok(served?)
}

/// The server span of one call, continuing the caller's trace.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    // An absent or malformed traceparent just starts a new trace.
    let _ = span.set_parent(parent);
    span
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// Accepted connections with `TCP_NODELAY` (tonic applies its own
/// `tcp_nodelay` default only to addresses it binds itself).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = accepted.next().await.unwrap().unwrap();
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn the_public_door_describes_its_own_services_only() {
        let set = prost_types::FileDescriptorSet::decode(public_descriptors().as_slice()).unwrap();
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for public in [
            "o2c.gateway.v1.GatewayService",
            "o2c.gateway.v1.AdminService",
            "o2c.crm_sync.v1.CrmSyncService",
        ] {
            assert!(
                services.iter().any(|s| s == public),
                "{public} in {services:?}"
            );
        }
        for internal in [
            "o2c.credit.v1.CreditService",
            "o2c.invoicing.v1.InvoicingService",
            "o2c.payments.v1.PaymentsService",
            "o2c.customer.v1.CustomerService",
            "o2c.events.v1.EventsService",
        ] {
            assert!(
                !services.iter().any(|s| s == internal),
                "{internal} is hidden"
            );
        }
        // The messages the public services use are still described.
        assert!(
            set.file
                .iter()
                .any(|f| f.package() == "o2c.credit.v1" && !f.message_type.is_empty())
        );
    }
}
