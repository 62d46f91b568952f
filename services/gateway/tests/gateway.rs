//! The gateway on its own over real gRPC on 127.0.0.1:0 with its real
//! database: tenancy at the door, its own order store, and fast
//! UNAVAILABLE when the services behind it are down. The full workflow
//! with every service is tested in the workspace's `tests/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use o2c_testkit::{Backend, assert_invalid};
use tonic::{Code, Request};

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
    let upstreams = o2c_gateway::Upstreams {
        customer_url: down.clone(),
        credit_url: down.clone(),
        invoicing_url: down.clone(),
        payments_url: down,
        call_timeout_ms: 2_000,
        reconcile_interval_ms: 0,
    };
    let routes = o2c_gateway::build(&service, &upstreams).await.unwrap();
    let served = o2c_testkit::serve(o2c_gateway::SERVICE_NAME, routes).await;
    let mut client = GatewayServiceClient::new(served.channel().await);

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

    let mut with_tenant = Request::new(request.clone());
    with_tenant
        .metadata_mut()
        .insert("x-tenant-id", "t1".parse().unwrap());
    let started = Instant::now();
    let status = client.place_order(with_tenant).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );

    // The gateway's own store answers without the others.
    let mut get = Request::new(pb::GetOrderRequest {
        order_id: uuid::Uuid::now_v7().to_string(),
    });
    get.metadata_mut()
        .insert("x-tenant-id", "t1".parse().unwrap());
    assert_eq!(
        client.get_order(get).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut bad = Request::new(pb::GetOrderRequest {
        order_id: "o-1".into(),
    });
    bad.metadata_mut()
        .insert("x-tenant-id", "t1".parse().unwrap());
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
        async move {
            let mut get = Request::new(pb::GetCustomerRequest {
                customer_id: uuid::Uuid::now_v7().to_string(),
            });
            get.metadata_mut()
                .insert("x-tenant-id", "t1".parse().unwrap());
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

    let mut bad_tenant = Request::new(pb::GetOrderRequest {
        order_id: "o-1".into(),
    });
    bad_tenant
        .metadata_mut()
        .insert("x-tenant-id", "not a tenant!".parse().unwrap());
    assert_eq!(
        client.get_order(bad_tenant).await.unwrap_err().code(),
        Code::Unauthenticated
    );
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
