//! The CRM connector over real gRPC on 127.0.0.1:0 with the real customer
//! service behind it, each on its own fresh database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use o2c_proto::crm_sync::v1 as pb;
use o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient;
use o2c_testkit::{Backend, Served, TestDatabase, assert_invalid};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "tenant-a";

struct Harness {
    client: CrmSyncServiceClient<Channel>,
    crm: Served,
    customer: Served,
    _dbs: (TestDatabase, TestDatabase),
}

async fn start(backend: Backend) -> Option<Harness> {
    let customer_db = o2c_testkit::database(backend, "customer").await?;
    let crm_db = o2c_testkit::database(backend, "crm").await?;
    let mut settings = o2c_kit::settings::ServiceSettings::local("customer", 0);
    settings.database_url = customer_db.url.clone();
    let customer = o2c_testkit::serve(
        o2c_customer::SERVICE_NAME,
        o2c_customer::build(&settings).await.unwrap(),
    )
    .await;
    settings.database_url = crm_db.url.clone();
    let upstreams = o2c_crm_sync::Upstreams {
        customer_url: customer.url(),
        ..Default::default()
    };
    let crm = o2c_testkit::serve(
        o2c_crm_sync::SERVICE_NAME,
        o2c_crm_sync::build(&settings, &upstreams).await.unwrap(),
    )
    .await;
    let client = CrmSyncServiceClient::new(crm.channel().await);
    Some(Harness {
        client,
        crm,
        customer,
        _dbs: (customer_db, crm_db),
    })
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn upsert(external_id: &str) -> pb::UpsertCustomerRequest {
    pb::UpsertCustomerRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        crm_system: "hubspot".into(),
        external_id: external_id.into(),
        legal_name: "Fjord Foods AS".into(),
        country_code: "NO".into(),
        currency_code: "NOK".into(),
    }
}

async fn sync(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let first = h
        .client
        .upsert_customer(upsert("hs-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let second = h
        .client
        .upsert_customer(upsert("hs-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.created);
    assert_eq!(
        second.customer_id, first.customer_id,
        "one external id, one customer"
    );

    // Master-data validation happens in the customer service, field named.
    let mut bad = upsert("hs-2");
    bad.country_code = "Norway".into();
    assert_invalid(
        &h.client.upsert_customer(bad).await.unwrap_err(),
        "country_code",
    );

    let mut recorded = Vec::new();
    for i in 0..5 {
        let interaction = h
            .client
            .record_interaction(pb::RecordInteractionRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: first.customer_id.clone(),
                crm_system: "hubspot".into(),
                kind: pb::InteractionKind::PromiseToPay as i32,
                summary: format!("promised to pay invoice {i} by Friday"),
                occurred_at: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .interaction
            .unwrap();
        recorded.push(interaction.interaction_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .client
            .list_interactions(pb::ListInteractionsRequest {
                tenant_id: TENANT.into(),
                customer_id: first.customer_id.clone(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.interactions.len() <= 2);
        seen.extend(page.interactions.into_iter().map(|i| i.interaction_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    recorded.reverse();
    assert_eq!(seen, recorded, "newest first, each exactly once");

    let unknown = h
        .client
        .record_interaction(pb::RecordInteractionRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: uuid::Uuid::now_v7().to_string(),
            crm_system: "hubspot".into(),
            kind: pb::InteractionKind::Call as i32,
            summary: "called".into(),
            occurred_at: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad_kind = h
        .client
        .record_interaction(pb::RecordInteractionRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: first.customer_id.clone(),
            crm_system: "hubspot".into(),
            kind: 0,
            summary: String::new(),
            occurred_at: "yesterday".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&bad_kind, "kind");
    assert_invalid(&bad_kind, "summary");
    assert_invalid(&bad_kind, "occurred_at");
    h.crm.stop().await;
    h.customer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sqlite() {
    sync(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_postgres() {
    sync(Backend::Postgres).await;
}

async fn events_apply_once_and_in_version_order(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let customer = h
        .client
        .upsert_customer(upsert("hs-9"))
        .await
        .unwrap()
        .into_inner()
        .customer_id;
    let mut events = o2c_proto::events::v1::events_service_client::EventsServiceClient::new(
        h.crm.channel().await,
    );
    let event = |id: &str, version: i64, reserved: &str| o2c_proto::events::v1::Event {
        event_id: id.into(),
        tenant_id: TENANT.into(),
        aggregate_type: "credit_account".into(),
        aggregate_id: customer.clone(),
        body: Some(o2c_proto::events::v1::event::Body::ExposureChanged(
            o2c_proto::events::v1::ExposureChanged {
                customer_id: customer.clone(),
                credit_limit: Some(o2c_proto::common::v1::Money {
                    amount: "100.00".into(),
                    currency_code: "NOK".into(),
                }),
                reserved: Some(o2c_proto::common::v1::Money {
                    amount: reserved.into(),
                    currency_code: "NOK".into(),
                }),
                receivables: Some(o2c_proto::common::v1::Money {
                    amount: "0.00".into(),
                    currency_code: "NOK".into(),
                }),
                available: Some(o2c_proto::common::v1::Money {
                    amount: "0.00".into(),
                    currency_code: "NOK".into(),
                }),
                version,
            },
        )),
        ..Default::default()
    };
    let newer = event(&uuid::Uuid::now_v7().to_string(), 5, "50.00");
    let older = event(&uuid::Uuid::now_v7().to_string(), 3, "30.00");
    // Delivered, redelivered, then a stale one: the view keeps version 5.
    for batch in [vec![newer.clone()], vec![newer.clone(), older]] {
        events
            .deliver(o2c_proto::events::v1::DeliverRequest { events: batch })
            .await
            .unwrap();
    }
    let status = h
        .client
        .get_credit_status(pb::GetCreditStatusRequest {
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "hs-9".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.version, 5);
    assert_eq!(status.reserved.unwrap().amount, "50.00");
    // A delivery applies in order up to an event that fails: the events
    // before it stay applied, the rest do not; the relay's retry from the
    // failing event on (here without it) applies the rest once.
    let broken = o2c_proto::events::v1::Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        tenant_id: TENANT.into(),
        body: Some(o2c_proto::events::v1::event::Body::InvoiceChanged(
            Default::default(),
        )),
        ..Default::default()
    };
    let six = event(&uuid::Uuid::now_v7().to_string(), 6, "60.00");
    let seven = event(&uuid::Uuid::now_v7().to_string(), 7, "70.00");
    let failed = events
        .deliver(o2c_proto::events::v1::DeliverRequest {
            events: vec![six.clone(), broken, seven.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    let status_now = |mut client: CrmSyncServiceClient<Channel>| async move {
        client
            .get_credit_status(pb::GetCreditStatusRequest {
                tenant_id: TENANT.into(),
                crm_system: "hubspot".into(),
                external_id: "hs-9".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    };
    let status = status_now(h.client.clone()).await;
    assert_eq!(
        (status.version, status.reserved.unwrap().amount.as_str()),
        (6, "60.00")
    );
    events
        .deliver(o2c_proto::events::v1::DeliverRequest {
            events: vec![six, seven.clone(), seven],
        })
        .await
        .unwrap();
    let status = status_now(h.client.clone()).await;
    assert_eq!(
        (status.version, status.reserved.unwrap().amount.as_str()),
        (7, "70.00")
    );
    // Two new statuses of one customer in one delivery, newer first: the
    // newer stays.
    events
        .deliver(o2c_proto::events::v1::DeliverRequest {
            events: vec![
                event(&uuid::Uuid::now_v7().to_string(), 9, "90.00"),
                event(&uuid::Uuid::now_v7().to_string(), 8, "80.00"),
            ],
        })
        .await
        .unwrap();
    let status = status_now(h.client.clone()).await;
    assert_eq!(
        (status.version, status.reserved.unwrap().amount.as_str()),
        (9, "90.00")
    );
    let unknown = h
        .client
        .get_credit_status(pb::GetCreditStatusRequest {
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    h.crm.stop().await;
    h.customer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_apply_once_sqlite() {
    events_apply_once_and_in_version_order(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_apply_once_postgres() {
    events_apply_once_and_in_version_order(Backend::Postgres).await;
}
