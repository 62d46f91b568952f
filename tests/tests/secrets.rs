//! No secret, token or card number reaches the logs or the exported spans.
//!
//! One process-wide subscriber (so this is its own test binary): log lines
//! at the services' default level with the o2c crates at debug, and every
//! span exported through an OpenTelemetry pipeline into memory. A flow
//! with every kind of secret runs through the gateway; afterwards neither
//! the log text nor any exported span attribute contains one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use o2c_all_in_one::{Settings, start};
use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::admin_service_client::AdminServiceClient;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tonic::Request;
use tonic::transport::Channel;
use tracing_subscriber::layer::SubscriberExt;

const CARD: &str = "4111111111111111";
const TOKEN: &str = "tok_live_9f8e7d6c5b4a";
const AGENCY_REFERENCE: &str = "DE31554017";

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

fn with<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", credential.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_or_spans() {
    let logs = Buffer::default();
    let spans = Spans::default();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(
            "info,sqlx=warn,h2=warn,tower=warn,hyper=warn,\
             o2c_kit=debug,o2c_gateway=debug,o2c_customer=debug,o2c_credit=debug,\
             o2c_invoicing=debug,o2c_payments=debug,o2c_crm_sync=debug",
        ))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("secrets-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::ephemeral(|name| {
        format!(
            "sqlite://{}",
            dir.path().join(format!("{name}.db")).display()
        )
    });
    let admin_key = o2c_gateway::auth::keys::generate().unwrap().1;
    settings.auth.bootstrap_admin_key = Some(o2c_kit::settings::Secret::new(admin_key.clone()));
    settings.auth.jwt_issuers = vec![o2c_tests::identity::issuer()];
    let suite = start(&settings).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", suite.addresses.gateway))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // An API key made by the admin, and a JWT from the issuer.
    let created = AdminServiceClient::new(channel.clone())
        .create_api_key(with(
            pb::CreateApiKeyRequest {
                tenant_id: "t1".into(),
                roles: vec![pb::Role::PlatformClient as i32],
                label: "erp".into(),
            },
            &format!("ApiKey {admin_key}"),
        ))
        .await
        .unwrap()
        .into_inner();
    let api_key = created.secret;
    let jwt = o2c_tests::identity::token(serde_json::json!({
        "sub": "ana", "o2c_tenant": "t1", "o2c_roles": ["platform_client", "credit_analyst"],
    }));
    let mut gateway = GatewayServiceClient::new(channel);
    let customer = gateway
        .create_customer(with(
            pb::CreateCustomerRequest {
                idempotency_key: "c-1".into(),
                legal_name: "Secretive GmbH".into(),
                country_code: "DE".into(),
                currency_code: "EUR".into(),
            },
            &format!("ApiKey {api_key}"),
        ))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap()
        .customer_id;
    gateway
        .link_credit_account(with(
            pb::LinkCreditAccountRequest {
                idempotency_key: "l-1".into(),
                customer_id: customer.clone(),
                agency: "creditreform".into(),
                agency_reference: AGENCY_REFERENCE.into(),
                parent_customer_id: String::new(),
            },
            &format!("Bearer {jwt}"),
        ))
        .await
        .unwrap();
    gateway
        .create_mandate(with(
            pb::CreateMandateRequest {
                idempotency_key: "m-1".into(),
                customer_id: customer.clone(),
                method: pb::PaymentMethod::Card as i32,
                processor_token: TOKEN.into(),
                last4: "1111".into(),
            },
            &format!("Bearer {jwt}"),
        ))
        .await
        .unwrap();
    // Card numbers are refused where they do not belong, without echoing.
    let refused = gateway
        .record_payment(with(
            pb::RecordPaymentRequest {
                idempotency_key: "p-1".into(),
                customer_id: customer.clone(),
                amount: eur("10.00"),
                method: pb::PaymentMethod::Card as i32,
                reference: format!("card {CARD}"),
                allocations: vec![],
            },
            &format!("Bearer {jwt}"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(!refused.message().contains(CARD), "{refused:?}");
    // A refused credential is logged without itself.
    let wrong = gateway
        .get_customer(with(
            pb::GetCustomerRequest {
                customer_id: customer.clone(),
            },
            &format!("ApiKey {}", admin_key.replace('a', "b")),
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    suite.stop().await.unwrap();
    let _ = provider.force_flush();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let exported = spans.0.lock().unwrap().clone();
    assert!(text.contains("API key created"), "the logs were captured");
    assert!(
        exported.len() > 10,
        "spans were exported: {}",
        exported.len()
    );
    let mut attributes = String::new();
    for span in &exported {
        attributes.push_str(&span.name);
        for attribute in &span.attributes {
            attributes.push_str(&format!(" {}={}", attribute.key, attribute.value));
        }
        for event in span.events.iter() {
            attributes.push_str(&format!(" {}", event.name));
            for attribute in &event.attributes {
                attributes.push_str(&format!(" {}={}", attribute.key, attribute.value));
            }
        }
        attributes.push('\n');
    }
    let api_secret = &api_key["o2c_".len() + 33..];
    let admin_secret = &admin_key["o2c_".len() + 33..];
    for (what, secret) in [
        ("the API key's secret", api_secret),
        ("the admin key's secret", admin_secret),
        ("the bearer JWT", jwt.as_str()),
        ("any JWT (also internal tokens)", "eyJ"),
        ("the processor token", TOKEN),
        ("the card number", CARD),
        ("the agency reference", AGENCY_REFERENCE),
    ] {
        assert!(!text.contains(secret), "{what} is in the logs");
        assert!(
            !attributes.contains(secret),
            "{what} is in an exported span"
        );
    }
}
