//! A CRM's view through the connector, reached through the gateway with a
//! CRM_CONNECTOR credential, kept current by credit's events
//! (transactional outbox → relay → idempotent consumer).

use std::time::Duration;

use o2c_proto::crm_sync::v1 as crm_pb;
use o2c_proto::gateway::v1 as pb;
use o2c_testkit::Backend;

use super::{as_tenant, eur, key, run_suite};

type CrmDoor = o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient<
    tonic::transport::Channel,
>;

/// A token of the suite's tenant for a CRM.
fn crm_token() -> String {
    super::jwt_with(serde_json::json!({
        "sub": "hubspot-sync",
        "o2c_roles": ["crm_connector"],
    }))
}

async fn status_until(
    crm: &mut CrmDoor,
    expected: impl Fn(&crm_pb::CreditStatus) -> bool,
) -> crm_pb::CreditStatus {
    o2c_testkit::eventually(Duration::from_secs(15), || {
        let mut crm = crm.clone();
        let expected = &expected;
        async move {
            let status = crm
                .get_credit_status(super::with_token(
                    crm_pb::GetCreditStatusRequest {
                        // The credential's tenant applies, not this.
                        tenant_id: "ignored".into(),
                        crm_system: "hubspot".into(),
                        external_id: "hs-42".into(),
                    },
                    &crm_token(),
                ))
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
    let mut door = CrmDoor::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.suite.addresses.gateway))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let upsert = crm_pb::UpsertCustomerRequest {
        idempotency_key: key(),
        tenant_id: String::new(),
        crm_system: "hubspot".into(),
        external_id: "hs-42".into(),
        legal_name: "Fjord Foods AS".into(),
        country_code: "DE".into(),
        currency_code: "EUR".into(),
    };
    // Only a CRM credential opens this door.
    let refused = door
        .upsert_customer(as_tenant(upsert.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let pushed = door
        .upsert_customer(super::with_token(upsert, &crm_token()))
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
    let status = status_until(&mut door, |st| {
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
    let status = status_until(&mut door, |st| {
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
