//! The gateway on its own over real gRPC on 127.0.0.1:0 with its real
//! database: credentials and roles at the door, per-tenant rate limits,
//! its own order store, and fast UNAVAILABLE when the services behind it
//! are down. The full workflow with every service is tested in the
//! workspace's `tests/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use o2c_gateway::auth::jwt::{IssuerSettings, KeySettings};
use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::admin_service_client::AdminServiceClient;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use o2c_testkit::{Backend, assert_invalid};
use tonic::transport::Channel;
use tonic::{Code, Request};

const ISSUER: &str = "https://idp.gateway.test";
const AUDIENCE: &str = "o2c-gateway";
const SECRET: &str = "gateway-test-issuer-secret-0123456789";

fn admin_key() -> String {
    // Fixed so runs are reproducible; random in any real deployment.
    format!("o2c_{}_{}", "a".repeat(32), "b".repeat(64))
}

fn upstreams(down: &str) -> o2c_gateway::Upstreams {
    let mut upstreams = o2c_gateway::Upstreams {
        customer_url: down.to_owned(),
        credit_url: down.to_owned(),
        invoicing_url: down.to_owned(),
        payments_url: down.to_owned(),
        call_timeout_ms: 2_000,
        reconcile_interval_ms: 0,
        ..Default::default()
    };
    upstreams.auth.bootstrap_admin_key = Some(o2c_kit::settings::Secret::new(admin_key()));
    upstreams.auth.jwt_issuers = vec![IssuerSettings {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        keys: vec![KeySettings {
            kid: Some("k1".into()),
            algorithm: "HS256".into(),
            key: SECRET.into(),
        }],
        tenant_claim: "o2c_tenant".into(),
        roles_claim: "o2c_roles".into(),
        tenants: vec![],
        platform: false,
    }];
    upstreams
}

fn authorized<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", credential.parse().unwrap());
    request
}

/// A key of `tenant` with `roles`, made through the admin API.
async fn key_of(channel: &Channel, tenant: &str, roles: &[pb::Role]) -> (String, String) {
    let created = AdminServiceClient::new(channel.clone())
        .create_api_key(authorized(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.into(),
                roles: roles.iter().map(|r| *r as i32).collect(),
                label: "test".into(),
            },
            &format!("ApiKey {}", admin_key()),
        ))
        .await
        .unwrap()
        .into_inner();
    (
        created.key.unwrap().key_id,
        format!("ApiKey {}", created.secret),
    )
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// A bearer token: the issuer's defaults overridden by `claims`.
fn bearer(claims: serde_json::Value, header: jsonwebtoken::Header, secret: &str) -> String {
    let mut all = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "ana", "exp": now() + 300,
        "o2c_tenant": "t1", "o2c_roles": ["platform_client"],
    });
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    let token = jsonwebtoken::encode(
        &header,
        &all,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    format!("Bearer {token}")
}

fn hs256() -> jsonwebtoken::Header {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    header
}

fn unknown_order() -> pb::GetOrderRequest {
    pb::GetOrderRequest {
        order_id: uuid::Uuid::now_v7().to_string(),
    }
}

/// An address nothing listens on.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

async fn gateway_with_services_down(backend: Backend) {
    let Some(db) = o2c_testkit::database(backend, "gateway").await else {
        return;
    };
    let mut service = o2c_kit::settings::ServiceSettings::local("gateway", 0);
    service.database_url = db.url.clone();
    let down = closed_port().await;
    let upstream_addr = down.trim_start_matches("http://").to_owned();
    let routes = o2c_gateway::build(&service, &upstreams(&down), None)
        .await
        .unwrap();
    let served = o2c_testkit::serve(o2c_gateway::SERVICE_NAME, routes).await;
    let channel = served.channel().await;
    let mut client = GatewayServiceClient::new(channel.clone());
    let (_, key) = key_of(&channel, "t1", &[pb::Role::PlatformClient]).await;

    let request = pb::PlaceOrderRequest {
        idempotency_key: "k-1".into(),
        customer_id: uuid::Uuid::now_v7().to_string(),
        client_reference: String::new(),
        amount: Some(Money {
            amount: "10.00".into(),
            currency_code: "EUR".into(),
        }),
    };
    let status = client
        .place_order(Request::new(request.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let with_tenant = authorized(request.clone(), &key);
    let started = Instant::now();
    let status = client.place_order(with_tenant).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );

    // The gateway's own store answers without the others.
    let get = authorized(unknown_order(), &key);
    assert_eq!(
        client.get_order(get).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad = authorized(
        pb::GetOrderRequest {
            order_id: "o-1".into(),
        },
        &key,
    );
    assert_invalid(&client.get_order(bad).await.unwrap_err(), "order_id");
    // The service comes back on the same address: the gateway recovers by
    // itself (lazy reconnect), no restart needed.
    let addr: std::net::SocketAddr = upstream_addr.parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut customer_settings = o2c_kit::settings::ServiceSettings::local("customer", 0);
    let customer_db = o2c_testkit::database(backend, "customer").await.unwrap();
    customer_settings.database_url = customer_db.url.clone();
    let routes = o2c_customer::build(&customer_settings).await.unwrap();
    let (stop_customer, stopped) = tokio::sync::oneshot::channel::<()>();
    let customer_server = tokio::spawn(o2c_kit::serve::serve(
        o2c_customer::SERVICE_NAME,
        o2c_kit::serve::Access::Open,
        listener,
        routes,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let recovered = o2c_testkit::eventually(Duration::from_secs(15), || {
        let mut client = client.clone();
        let key = key.clone();
        async move {
            let get = authorized(
                pb::GetCustomerRequest {
                    customer_id: uuid::Uuid::now_v7().to_string(),
                },
                &key,
            );
            match client.get_customer(get).await {
                Err(status) if status.code() == Code::Unavailable => None,
                other => Some(other.map(|_| ()).map_err(|s| s.code())),
            }
        }
    })
    .await
    .expect("the gateway reaches the service again");
    assert_eq!(recovered, Err(Code::NotFound), "answered by the service");
    let _ = stop_customer.send(());
    customer_server.await.unwrap().unwrap();

    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_down_sqlite() {
    gateway_with_services_down(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_down_postgres() {
    gateway_with_services_down(Backend::Postgres).await;
}

/// The bad-credentials suite: every way in without a valid credential is
/// UNAUTHENTICATED, a valid one without the role is PERMISSION_DENIED.
async fn credentials(backend: Backend) {
    let Some(db) = o2c_testkit::database(backend, "gateway").await else {
        return;
    };
    let mut service = o2c_kit::settings::ServiceSettings::local("gateway", 0);
    service.database_url = db.url.clone();
    let routes = o2c_gateway::build(&service, &upstreams(&closed_port().await), None)
        .await
        .unwrap();
    let served = o2c_testkit::serve(o2c_gateway::SERVICE_NAME, routes).await;
    let channel = served.channel().await;
    let mut client = GatewayServiceClient::new(channel.clone());
    let caller = client.clone();
    let call = |credential: String| {
        let mut client = caller.clone();
        async move {
            let mut request = Request::new(unknown_order());
            if !credential.is_empty() {
                request
                    .metadata_mut()
                    .insert("authorization", credential.parse().unwrap());
            }
            client.get_order(request).await.unwrap_err().code()
        }
    };
    // A valid token reaches the handler (the order does not exist).
    assert_eq!(
        call(bearer(serde_json::json!({}), hs256(), SECRET)).await,
        Code::NotFound
    );

    let unauthenticated = [
        ("no credential", String::new()),
        ("unknown scheme", "Basic dXNlcjpwYXNz".to_owned()),
        ("alg none", {
            // header {"alg":"none","typ":"JWT"} . claims . no signature
            let claims = serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now() + 300,
                "o2c_tenant": "t1", "o2c_roles": ["platform_client"],
            });
            format!(
                "Bearer {}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(claims.to_string().as_bytes())
            )
        }),
        (
            "expired",
            bearer(serde_json::json!({ "exp": now() - 120 }), hs256(), SECRET),
        ),
        (
            "not valid yet",
            bearer(serde_json::json!({ "nbf": now() + 600 }), hs256(), SECRET),
        ),
        (
            "wrong audience",
            bearer(
                serde_json::json!({ "aud": "someone-else" }),
                hs256(),
                SECRET,
            ),
        ),
        (
            "wrong issuer",
            bearer(
                serde_json::json!({ "iss": "https://evil.example" }),
                hs256(),
                SECRET,
            ),
        ),
        (
            "unknown signing key",
            bearer(
                serde_json::json!({}),
                hs256(),
                "a-different-secret-of-enough-length-0123",
            ),
        ),
        (
            "unknown key id",
            bearer(
                serde_json::json!({}),
                {
                    let mut header = hs256();
                    header.kid = Some("k9".into());
                    header
                },
                SECRET,
            ),
        ),
        (
            "algorithm not allowed for the key",
            bearer(
                serde_json::json!({}),
                jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
                SECRET,
            ),
        ),
        ("malformed API key", "ApiKey o2c_123".to_owned()),
        (
            "unknown API key",
            format!("ApiKey o2c_{}_{}", "c".repeat(32), "d".repeat(64)),
        ),
    ];
    for (case, credential) in unauthenticated {
        assert_eq!(call(credential).await, Code::Unauthenticated, "{case}");
    }

    // API keys: revoked at once; rotated with a grace, then replaced.
    let (id, key) = key_of(&channel, "t1", &[pb::Role::PlatformClient]).await;
    assert_eq!(call(key.clone()).await, Code::NotFound, "a live key");
    let mut admin = AdminServiceClient::new(channel.clone());
    let admin_credential = format!("ApiKey {}", admin_key());
    let rotated = admin
        .rotate_api_key(authorized(
            pb::RotateApiKeyRequest {
                key_id: id.clone(),
                grace_seconds: 3600,
            },
            &admin_credential,
        ))
        .await
        .unwrap()
        .into_inner();
    let new_key = format!("ApiKey {}", rotated.secret);
    assert_eq!(
        call(key.clone()).await,
        Code::NotFound,
        "old key in its grace"
    );
    assert_eq!(
        call(new_key.clone()).await,
        Code::NotFound,
        "the replacement"
    );
    assert!(!rotated.replaced.unwrap().expires_at.is_empty());
    admin
        .revoke_api_key(authorized(
            pb::RevokeApiKeyRequest {
                key_id: id,
                reason: "leaked in a log".into(),
            },
            &admin_credential,
        ))
        .await
        .unwrap();
    assert_eq!(call(key).await, Code::Unauthenticated, "revoked");
    assert_eq!(
        call(new_key.clone()).await,
        Code::NotFound,
        "replacement lives"
    );
    // Secrets are never listed.
    let listed = admin
        .list_api_keys(authorized(
            pb::ListApiKeysRequest {
                tenant_id: "t1".into(),
                ..Default::default()
            },
            &admin_credential,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 2);
    assert!(!format!("{listed:?}").contains(&new_key["ApiKey o2c_".len() + 33..]));

    // Roles: a client may not work the hold queue, nor administer keys; an
    // admin key may not place orders.
    let holds = client
        .list_holds(authorized(pb::ListHoldsRequest::default(), &new_key))
        .await
        .unwrap_err();
    assert_eq!(holds.code(), Code::PermissionDenied, "{holds:?}");
    let keys = admin
        .list_api_keys(authorized(
            pb::ListApiKeysRequest {
                tenant_id: "t1".into(),
                ..Default::default()
            },
            &new_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(keys.code(), Code::PermissionDenied);
    let order = client
        .get_order(authorized(unknown_order(), &admin_credential))
        .await
        .unwrap_err();
    assert_eq!(order.code(), Code::PermissionDenied);
    // Requests over the gateway's size limit are refused before any work.
    let huge = client
        .create_customer(authorized(
            pb::CreateCustomerRequest {
                idempotency_key: "huge".into(),
                legal_name: "x".repeat(2 * 1024 * 1024),
                country_code: "DE".into(),
                currency_code: "EUR".into(),
            },
            &new_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
    // ADMIN belongs to the platform only: a tenant's token claiming it,
    // or the platform's tenant claimed by a tenant issuer, gets nothing;
    // and no key of a tenant can be made with it.
    let tenant_admin = bearer(
        serde_json::json!({ "o2c_roles": ["admin"] }),
        hs256(),
        SECRET,
    );
    let refused = admin
        .list_api_keys(authorized(
            pb::ListApiKeysRequest {
                tenant_id: "t2".into(),
                ..Default::default()
            },
            &tenant_admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let posing = bearer(
        serde_json::json!({ "o2c_tenant": "platform", "o2c_roles": ["admin"] }),
        hs256(),
        SECRET,
    );
    assert_eq!(call(posing).await, Code::Unauthenticated);
    let escalation = admin
        .create_api_key(authorized(
            pb::CreateApiKeyRequest {
                tenant_id: "t1".into(),
                roles: vec![pb::Role::Admin as i32],
                label: "escalate".into(),
            },
            &admin_credential,
        ))
        .await
        .unwrap_err();
    assert_invalid(&escalation, "roles");
    // A token whose roles are unknown has none.
    let nobody = bearer(
        serde_json::json!({ "o2c_roles": ["root"] }),
        hs256(),
        SECRET,
    );
    assert_eq!(call(nobody).await, Code::PermissionDenied);
    served.stop().await;
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_sqlite() {
    credentials(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_postgres() {
    credentials(Backend::Postgres).await;
}

/// A tenant's budget holds across gateway replicas sharing Redis, and the
/// refusal says how long to wait.
async fn rate_limits(redis: Option<String>) {
    let Some(db) = o2c_testkit::database(Backend::Sqlite, "gateway").await else {
        return;
    };
    let mut service = o2c_kit::settings::ServiceSettings::local("gateway", 0);
    service.database_url = db.url.clone();
    let mut settings = upstreams(&closed_port().await);
    // One call per 10 s sustained, three at once, for tenant "tight" only.
    let tenant = format!("tight-{}", uuid::Uuid::new_v4().simple());
    settings.auth.rate_limit.tenants.insert(
        tenant.clone(),
        o2c_gateway::auth::limit::Budget {
            per_second: 0.1,
            burst: 3.0,
        },
    );
    settings.auth.rate_limit.default = o2c_gateway::auth::limit::Budget {
        per_second: 40.0,
        burst: 4.0,
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let routes = o2c_gateway::build(&service, &settings, redis.as_deref())
            .await
            .unwrap();
        replicas.push(o2c_testkit::serve(o2c_gateway::SERVICE_NAME, routes).await);
    }
    let token = bearer(serde_json::json!({ "o2c_tenant": tenant }), hs256(), SECRET);
    let other = bearer(
        serde_json::json!({ "o2c_tenant": "roomy" }),
        hs256(),
        SECRET,
    );
    let mut answers = Vec::new();
    for n in 0..6 {
        // Alternate replicas: with Redis they spend from one bucket.
        let mut client = GatewayServiceClient::new(replicas[n % 2].channel().await);
        let answer = client
            .get_order(authorized(unknown_order(), &token))
            .await
            .unwrap_err();
        answers.push(answer);
    }
    let codes: Vec<Code> = answers.iter().map(|s| s.code()).collect();
    let shared = redis.is_some();
    let expected_allowed = if shared { 3 } else { 6 };
    assert_eq!(
        codes.iter().filter(|c| **c == Code::NotFound).count(),
        expected_allowed,
        "{codes:?}"
    );
    if shared {
        let refused = answers
            .iter()
            .find(|s| s.code() == Code::ResourceExhausted)
            .unwrap();
        use tonic_types::StatusExt;
        let retry = refused.get_details_retry_info().unwrap();
        let delay = retry.retry_delay.unwrap();
        assert!(
            delay > Duration::from_secs(1) && delay <= Duration::from_secs(10),
            "{delay:?}"
        );
    }
    // A busier tenant's replicas lease tokens from Redis several at a time
    // (40 calls per second: two per 50 ms lease), yet together admit no
    // more than the shared bucket allows: its burst of 4 plus what refilled
    // meanwhile.
    if shared {
        let busy = format!("busy-{}", uuid::Uuid::new_v4().simple());
        let token = bearer(serde_json::json!({ "o2c_tenant": busy }), hs256(), SECRET);
        let mut clients = Vec::new();
        for replica in &replicas {
            clients.push(GatewayServiceClient::new(replica.channel().await));
        }
        let started = std::time::Instant::now();
        let mut admitted = 0;
        for n in 0..24 {
            let code = clients[n % 2]
                .get_order(authorized(unknown_order(), &token))
                .await
                .unwrap_err()
                .code();
            if code == Code::NotFound {
                admitted += 1;
            }
        }
        let refilled = (started.elapsed().as_secs_f64() * 40.0).ceil() as usize;
        assert!(
            (2..=4 + refilled).contains(&admitted),
            "{admitted} admitted; burst 4 + {refilled} refilled"
        );
    }
    // Another tenant is not affected.
    let mut client = GatewayServiceClient::new(replicas[0].channel().await);
    assert_eq!(
        client
            .get_order(authorized(unknown_order(), &other))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for replica in replicas {
        replica.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_shared_through_redis() {
    let Some(redis) = o2c_testkit::redis_url().await else {
        return;
    };
    rate_limits(Some(redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_without_redis_holds_per_replica() {
    rate_limits(None).await;
}
