//! The doors: backends take calls from services of the deployment only,
//! and each owning service refuses a request for another tenant than the
//! one its caller acts for, whoever forwarded it.

use o2c_kit::auth::CallContext;
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_testkit::Backend;
use tonic::{Code, Request};

use super::{TENANT, onboard, run_suite};

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn backends_refuse_callers_that_bypass_the_gateway(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "1000.00").await;
    let read = || credit_pb::GetExposureRequest {
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
    };
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", s.suite.addresses.credit))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut direct = CreditServiceClient::new(channel);

    // No token: refused before anything is read.
    let refused = direct.get_exposure(read()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A token signed with another secret: refused.
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJvMmMtaW50ZXJuYWwiLCJhdWQiOiJvMmMtaW50ZXJuYWwiLCJzdWIiOiJ4IiwiaWF0IjoxLCJleHAiOjQxMDI0NDQ4MDAsInRlbmFudCI6ImFjbWUtZXUifQ.c2lnbmF0dXJlLW9mLWFub3RoZXIta2V5";
    let refused = direct
        .get_exposure(bearer(read(), forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A genuine token acting for another tenant: credit itself refuses
    // the request for this tenant's customer.
    let other = o2c_kit::auth::mint(&CallContext {
        tenant: Some("someone-else".into()),
        ..Default::default()
    })
    .unwrap();
    let refused = direct
        .get_exposure(bearer(read(), &other))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let write = credit_pb::CheckAndReserveRequest {
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: "sneaky".into(),
        amount: super::eur("10.00"),
    };
    let refused = direct
        .check_and_reserve(bearer(write, &other))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The same token for its own tenant passes.
    let own = o2c_kit::auth::mint(&CallContext {
        tenant: Some(TENANT.into()),
        ..Default::default()
    })
    .unwrap();
    let exposure = direct
        .get_exposure(bearer(read(), &own))
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap();
    assert_eq!(
        exposure.reserved.unwrap().amount,
        "0.00",
        "nothing was reserved by the refused write"
    );
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_refuse_bypassing_callers_on_sqlite() {
    backends_refuse_callers_that_bypass_the_gateway(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_refuse_bypassing_callers_on_postgres() {
    backends_refuse_callers_that_bypass_the_gateway(Backend::Postgres).await;
}
