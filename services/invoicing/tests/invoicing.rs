//! The invoicing service over real gRPC on 127.0.0.1:0, against a fresh
//! SQLite or PostgreSQL database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use o2c_proto::common::v1::Money;
use o2c_proto::invoicing::v1 as pb;
use o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient;
use o2c_testkit::{Backend, Served, TestDatabase, assert_invalid};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "tenant-a";

struct Harness {
    client: InvoicingServiceClient<Channel>,
    served: Served,
    _db: TestDatabase,
}

async fn start(backend: Backend) -> Option<Harness> {
    let db = o2c_testkit::database(backend, "invoicing").await?;
    let mut service = o2c_kit::settings::ServiceSettings::local("invoicing", 0);
    service.database_url = db.url.clone();
    let routes = o2c_invoicing::build(&service).await.unwrap();
    let served = o2c_testkit::serve(o2c_invoicing::SERVICE_NAME, routes).await;
    let client = InvoicingServiceClient::new(served.channel().await);
    Some(Harness {
        client,
        served,
        _db: db,
    })
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

fn line(quantity: &str, price: &str, tax: &str) -> pb::InvoiceLine {
    pb::InvoiceLine {
        description: "Pallet of widgets".into(),
        quantity: quantity.into(),
        unit_price: eur(price),
        tax_rate_percent: tax.into(),
        line_total: None,
    }
}

fn issue_request() -> pb::IssueInvoiceRequest {
    pb::IssueInvoiceRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: uuid::Uuid::now_v7().to_string(),
        order_id: uuid::Uuid::now_v7().to_string(),
        currency_code: "EUR".into(),
        lines: vec![line("2", "10.00", "19"), line("1.5", "0.33", "19")],
        payment_terms: Some(pb::PaymentTerms {
            kind: pb::PaymentTermsKind::Net as i32,
            net_days: 30,
        }),
        issue_date: "2026-12-04".into(),
    }
}

fn amount(m: &Option<Money>) -> &str {
    &m.as_ref().unwrap().amount
}

async fn apply(
    client: &mut InvoicingServiceClient<Channel>,
    invoice: &str,
    payment: &str,
    value: &str,
) -> Result<pb::Invoice, tonic::Status> {
    client
        .apply_payment(pb::ApplyPaymentRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: invoice.into(),
            payment_id: payment.into(),
            amount: eur(value),
        })
        .await
        .map(|r| r.into_inner().invoice.unwrap())
}

async fn lifecycle(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let request = issue_request();
    let issued = h
        .client
        .issue_invoice(request.clone())
        .await
        .unwrap()
        .into_inner();
    let invoice = issued.invoice.clone().unwrap();
    // 2 x 10.00 + 19 % = 23.80; 1.5 x 0.33 = 0.495 -> 0.50 + 0.10 tax = 0.60.
    assert_eq!(amount(&invoice.lines[0].line_total), "23.80");
    assert_eq!(amount(&invoice.lines[1].line_total), "0.60");
    assert_eq!(amount(&invoice.total), "24.40");
    assert_eq!(invoice.due_date, "2027-01-03");
    assert_eq!(invoice.status(), pb::InvoiceStatus::Open);
    assert_eq!(
        h.client
            .issue_invoice(request.clone())
            .await
            .unwrap()
            .into_inner(),
        issued
    );

    // One invoice per order.
    let again = pb::IssueInvoiceRequest {
        idempotency_key: key(),
        ..request.clone()
    };
    assert_eq!(
        h.client.issue_invoice(again).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let first = uuid::Uuid::now_v7().to_string();
    let partly = apply(&mut h.client, &invoice.invoice_id, &first, "20.00")
        .await
        .unwrap();
    assert_eq!(partly.status(), pb::InvoiceStatus::PartiallyPaid);
    assert_eq!(amount(&partly.amount_open), "4.40");
    // The same payment is never applied twice.
    let twice = apply(&mut h.client, &invoice.invoice_id, &first, "1.00")
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    let second = uuid::Uuid::now_v7().to_string();
    let over = apply(&mut h.client, &invoice.invoice_id, &second, "4.41")
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition);
    let paid = apply(&mut h.client, &invoice.invoice_id, &second, "4.40")
        .await
        .unwrap();
    assert_eq!(paid.status(), pb::InvoiceStatus::Paid);
    assert_eq!(amount(&paid.amount_open), "0.00");

    let other_tenant = h
        .client
        .get_invoice(pb::GetInvoiceRequest {
            tenant_id: "tenant-b".into(),
            invoice_id: invoice.invoice_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other_tenant.code(), Code::NotFound);
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
    type Change = Box<dyn Fn(&mut pb::IssueInvoiceRequest)>;
    let cases: Vec<(&str, Change)> = vec![
        ("customer_id", Box::new(|r| r.customer_id = "c1".into())),
        (
            "currency_code",
            Box::new(|r| r.currency_code = "eur".into()),
        ),
        ("lines", Box::new(|r| r.lines.clear())),
        (
            "lines[0].quantity",
            Box::new(|r| r.lines[0].quantity = "0".into()),
        ),
        (
            "lines[0].quantity",
            Box::new(|r| r.lines[0].quantity = "abc".into()),
        ),
        (
            "lines[1].unit_price.amount",
            Box::new(|r| r.lines[1].unit_price = eur("-1.00")),
        ),
        (
            "lines[0].unit_price.currency_code",
            Box::new(|r| r.lines[0].unit_price.as_mut().unwrap().currency_code = "USD".into()),
        ),
        (
            "lines[0].tax_rate_percent",
            Box::new(|r| r.lines[0].tax_rate_percent = "120".into()),
        ),
        (
            "lines[0].description",
            Box::new(|r| r.lines[0].description.clear()),
        ),
        ("payment_terms", Box::new(|r| r.payment_terms = None)),
        (
            "payment_terms.kind",
            Box::new(|r| r.payment_terms.as_mut().unwrap().kind = 0),
        ),
        (
            "payment_terms.net_days",
            Box::new(|r| r.payment_terms.as_mut().unwrap().net_days = 0),
        ),
        (
            "issue_date",
            Box::new(|r| r.issue_date = "04.12.2026".into()),
        ),
    ];
    let template = issue_request();
    for (field, change) in cases {
        let mut request = template.clone();
        request.idempotency_key = key();
        change(&mut request);
        assert_invalid(&h.client.issue_invoice(request).await.unwrap_err(), field);
    }
    // Nothing was issued: the order can still be invoiced once.
    let issued = h
        .client
        .issue_invoice(template)
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    let status = apply(&mut h.client, &issued.invoice_id, "not-a-payment", "1.00")
        .await
        .unwrap_err();
    assert_invalid(&status, "payment_id");
    let unknown = apply(
        &mut h.client,
        &uuid::Uuid::now_v7().to_string(),
        &uuid::Uuid::now_v7().to_string(),
        "1.00",
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
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
