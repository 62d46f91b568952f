//! The customer service over real gRPC on 127.0.0.1:0, against a fresh
//! SQLite or PostgreSQL database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use o2c_proto::customer::v1 as pb;
use o2c_proto::customer::v1::customer_service_client::CustomerServiceClient;
use o2c_testkit::{Backend, Served, TestDatabase, assert_invalid};
use sea_orm::{Database, EntityTrait};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "tenant-a";
const REFERENCE: &str = "DE99887766554433";

struct Harness {
    client: CustomerServiceClient<Channel>,
    served: Served,
    db: TestDatabase,
}

async fn start(backend: Backend) -> Option<Harness> {
    let db = o2c_testkit::database(backend, "customer").await?;
    let mut service = o2c_kit::settings::ServiceSettings::local("customer", 0);
    service.database_url = db.url.clone();
    let routes = o2c_customer::build(&service).await.unwrap();
    let served = o2c_testkit::serve(o2c_customer::SERVICE_NAME, routes).await;
    let client = CustomerServiceClient::new(served.channel().await);
    Some(Harness { client, served, db })
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn new_customer() -> pb::CreateCustomerRequest {
    pb::CreateCustomerRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        legal_name: "Nordlicht Logistik AG".into(),
        country_code: "DE".into(),
        currency_code: "EUR".into(),
        external_ids: vec![pb::ExternalId {
            system: "salesforce".into(),
            value: format!("001-{}", uuid::Uuid::new_v4()),
        }],
        contacts: vec![pb::Contact {
            name: "Ada Berg".into(),
            email: "ada@nordlicht.example".into(),
            phone: "+49 30 1234".into(),
        }],
    }
}

async fn lifecycle(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let request = new_customer();
    let created = h
        .client
        .create_customer(request.clone())
        .await
        .unwrap()
        .into_inner();
    let customer = created.customer.clone().unwrap();
    assert_eq!(customer.contacts.len(), 1);
    assert_eq!(customer.external_ids, request.external_ids);

    // Replay returns the same customer; nothing new is created.
    let replay = h
        .client
        .create_customer(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, created);

    let found = h
        .client
        .find_customer_by_external_id(pb::FindCustomerByExternalIdRequest {
            tenant_id: TENANT.into(),
            external_id: request.external_ids.first().cloned(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(found.customer_id, customer.customer_id);

    // The external id names one customer of the tenant.
    let mut duplicate = new_customer();
    duplicate.external_ids = request.external_ids.clone();
    let status = h.client.create_customer(duplicate).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Another tenant cannot see it.
    let status = h
        .client
        .get_customer(pb::GetCustomerRequest {
            tenant_id: "tenant-b".into(),
            customer_id: customer.customer_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Linking stores the reference only as a hash and its last four.
    let account = uuid::Uuid::now_v7().to_string();
    let link = pb::LinkCreditAccountRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.customer_id.clone(),
        credit_account_id: account.clone(),
        agency: "dnb".into(),
        agency_reference: REFERENCE.into(),
    };
    let linked = h
        .client
        .link_credit_account(link.clone())
        .await
        .unwrap()
        .into_inner();
    let credit = linked.customer.clone().unwrap().credit_account.unwrap();
    assert_eq!(credit.credit_account_id, account);
    assert_eq!(credit.reference_last4, "4433");
    assert!(!format!("{linked:?}").contains(REFERENCE));
    assert_eq!(
        h.client
            .link_credit_account(link.clone())
            .await
            .unwrap()
            .into_inner(),
        linked
    );

    let other_account = pb::LinkCreditAccountRequest {
        idempotency_key: key(),
        credit_account_id: uuid::Uuid::now_v7().to_string(),
        ..link.clone()
    };
    let status = h
        .client
        .link_credit_account(other_account)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let conn = Database::connect(&h.db.url).await.unwrap();
    let rows = o2c_customer::storage::entities::customer::Entity::find()
        .all(&conn)
        .await
        .unwrap();
    assert!(
        !format!("{rows:?}").contains(REFERENCE),
        "reference stored in clear"
    );
    let keys = o2c_kit::idempotency::entity::Entity::find()
        .all(&conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for row in keys {
        let stored = [row.request, row.response.unwrap_or_default()].concat();
        assert!(
            !stored
                .windows(REFERENCE.len())
                .any(|w| w == REFERENCE.as_bytes()),
            "reference kept in the idempotency record"
        );
    }
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_sqlite() {
    lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_postgres() {
    lifecycle(Backend::Postgres).await;
}

async fn bad_input(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    type Change = Box<dyn Fn(&mut pb::CreateCustomerRequest)>;
    let cases: Vec<(&str, Change)> = vec![
        ("tenant_id", Box::new(|r| r.tenant_id = "bad tenant".into())),
        ("idempotency_key", Box::new(|r| r.idempotency_key.clear())),
        ("legal_name", Box::new(|r| r.legal_name = "x".repeat(201))),
        ("country_code", Box::new(|r| r.country_code = "de".into())),
        (
            "currency_code",
            Box::new(|r| r.currency_code = "XAU".into()),
        ),
        (
            "external_ids[0].system",
            Box::new(|r| r.external_ids[0].system = "Sales Force".into()),
        ),
        (
            "contacts[0].email",
            Box::new(|r| r.contacts[0].email = "not-an-email".into()),
        ),
        ("contacts[0].name", Box::new(|r| r.contacts[0].name.clear())),
    ];
    for (field, change) in cases {
        let mut request = new_customer();
        change(&mut request);
        assert_invalid(&h.client.create_customer(request).await.unwrap_err(), field);
    }
    let conn = Database::connect(&h.db.url).await.unwrap();
    let rows = o2c_customer::storage::entities::customer::Entity::find()
        .all(&conn)
        .await
        .unwrap();
    assert!(rows.is_empty(), "refused requests created {rows:?}");

    let status = h
        .client
        .link_credit_account(pb::LinkCreditAccountRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: uuid::Uuid::now_v7().to_string(),
            credit_account_id: uuid::Uuid::now_v7().to_string(),
            agency: "dnb".into(),
            agency_reference: REFERENCE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_sqlite() {
    bad_input(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_postgres() {
    bad_input(Backend::Postgres).await;
}
