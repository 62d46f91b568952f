//! A CRM's view through the connector, kept current by credit's events
//! (transactional outbox → relay → idempotent consumer).

use std::time::Duration;

use o2c_proto::crm_sync::v1 as crm_pb;
use o2c_proto::gateway::v1 as pb;
use o2c_testkit::Backend;

use super::{TENANT, as_tenant, eur, key, run_suite};

async fn status_until(
    crm: &mut o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient<
        super::Internal,
    >,
    expected: impl Fn(&crm_pb::CreditStatus) -> bool,
) -> crm_pb::CreditStatus {
    o2c_testkit::eventually(Duration::from_secs(15), || {
        let mut crm = crm.clone();
        let expected = &expected;
        async move {
            let status = crm
                .get_credit_status(crm_pb::GetCreditStatusRequest {
                    tenant_id: TENANT.into(),
                    crm_system: "hubspot".into(),
                    external_id: "hs-42".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status?;
            expected(&status).then_some(status)
        }
    })
    .await
    .expect("the CRM view catches up before the deadline")
}

async fn crm_follows_credit(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let pushed = s
        .crm
        .upsert_customer(crm_pb::UpsertCustomerRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "hs-42".into(),
            legal_name: "Fjord Foods AS".into(),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let customer = pushed.customer_id;
    s.gateway
        .link_credit_account(as_tenant(pb::LinkCreditAccountRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            agency: "dnb".into(),
            agency_reference: "FJORD-0042".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    s.gateway
        .set_credit_limit(as_tenant(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            credit_limit: eur("1000.00"),
            reason: "onboarding".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let status = status_until(&mut s.crm, |st| {
        st.credit_limit
            .as_ref()
            .is_some_and(|m| m.amount == "1000.00")
    })
    .await;
    assert_eq!(status.customer_id, customer);
    s.gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: String::new(),
            amount: eur("400.00"),
        }))
        .await
        .unwrap();
    let status = status_until(&mut s.crm, |st| {
        st.reserved.as_ref().is_some_and(|m| m.amount == "400.00")
    })
    .await;
    assert_eq!(status.available.unwrap().amount, "600.00");
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_follows_credit_on_sqlite() {
    crm_follows_credit(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_follows_credit_on_postgres() {
    crm_follows_credit(Backend::Postgres).await;
}
