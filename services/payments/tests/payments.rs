//! The payments service over real gRPC on 127.0.0.1:0, against a fresh
//! SQLite or PostgreSQL database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use o2c_proto::common::v1::Money;
use o2c_proto::payments::v1 as pb;
use o2c_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use o2c_testkit::{Backend, Served, TestDatabase, assert_invalid};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "tenant-a";

struct Harness {
    client: PaymentsServiceClient<Channel>,
    served: Served,
    db: TestDatabase,
}

async fn start(backend: Backend) -> Option<Harness> {
    let db = o2c_testkit::database(backend, "payments").await?;
    let mut service = o2c_kit::settings::ServiceSettings::local("payments", 0);
    service.database_url = db.url.clone();
    let routes = o2c_payments::build(&service, &o2c_payments::PaymentsSettings::default())
        .await
        .unwrap();
    let served = o2c_testkit::serve(o2c_payments::SERVICE_NAME, routes).await;
    let client = PaymentsServiceClient::new(served.channel().await);
    Some(Harness { client, served, db })
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

fn allocation(value: &str) -> pb::Allocation {
    pb::Allocation {
        invoice_id: uuid::Uuid::now_v7().to_string(),
        amount: eur(value),
    }
}

fn payment() -> pb::RecordPaymentRequest {
    pb::RecordPaymentRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: uuid::Uuid::now_v7().to_string(),
        amount: eur("100.00"),
        method: pb::PaymentMethod::BankTransfer as i32,
        reference: "REMITTANCE 42".into(),
        allocations: vec![allocation("60.00"), allocation("30.00")],
    }
}

async fn lifecycle(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let request = payment();
    let recorded = h
        .client
        .record_payment(request.clone())
        .await
        .unwrap()
        .into_inner();
    let p = recorded.payment.clone().unwrap();
    assert_eq!(
        p.unapplied.as_ref().unwrap().amount,
        "10.00",
        "the rest is kept, not lost"
    );
    assert_eq!(p.allocations.len(), 2);
    assert_eq!(
        h.client
            .record_payment(request.clone())
            .await
            .unwrap()
            .into_inner(),
        recorded
    );

    let read = h
        .client
        .get_payment(pb::GetPaymentRequest {
            tenant_id: TENANT.into(),
            payment_id: p.payment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(read, p);
    let other = h
        .client
        .get_payment(pb::GetPaymentRequest {
            tenant_id: "tenant-b".into(),
            payment_id: p.payment_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
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
    type Change = Box<dyn Fn(&mut pb::RecordPaymentRequest)>;
    let cases: Vec<(&str, Change)> = vec![
        ("customer_id", Box::new(|r| r.customer_id.clear())),
        ("amount.amount", Box::new(|r| r.amount = eur("0"))),
        ("method", Box::new(|r| r.method = 0)),
        ("method", Box::new(|r| r.method = 99)),
        (
            "allocations",
            Box::new(|r| r.allocations.push(allocation("10.01"))),
        ),
        (
            "allocations",
            Box::new(|r| {
                let again = r.allocations[0].clone();
                r.allocations.push(again)
            }),
        ),
        (
            "allocations",
            Box::new(|r| r.allocations[0].amount.as_mut().unwrap().currency_code = "USD".into()),
        ),
        (
            "allocations[1].invoice_id",
            Box::new(|r| r.allocations[1].invoice_id = "inv-1".into()),
        ),
        (
            "reference",
            Box::new(|r| r.reference = "4111-1111-1111-1111".into()),
        ),
    ];
    for (field, change) in cases {
        let mut request = payment();
        change(&mut request);
        assert_invalid(&h.client.record_payment(request).await.unwrap_err(), field);
    }
    let conn = sea_orm::Database::connect(&h.db.url).await.unwrap();
    let stored = <o2c_payments::storage::entities::payment::Entity as sea_orm::EntityTrait>::find()
        .all(&conn)
        .await
        .unwrap();
    assert!(
        stored.is_empty(),
        "refused payments were stored: {stored:?}"
    );
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
