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
    clock: std::sync::Arc<std::sync::Mutex<chrono::DateTime<chrono::Utc>>>,
    _db: TestDatabase,
}

impl Harness {
    fn today(&self) -> chrono::NaiveDate {
        self.clock.lock().unwrap().date_naive()
    }

    fn advance_days(&self, days: i64) {
        *self.clock.lock().unwrap() += chrono::Duration::days(days);
    }
}

async fn start(backend: Backend) -> Option<Harness> {
    let db = o2c_testkit::database(backend, "invoicing").await?;
    let mut service = o2c_kit::settings::ServiceSettings::local("invoicing", 0);
    service.database_url = db.url.clone();
    let clock = std::sync::Arc::new(std::sync::Mutex::new(chrono::Utc::now()));
    let reader = clock.clone();
    let routes = o2c_invoicing::build_with(
        &service,
        std::sync::Arc::new(move || *reader.lock().unwrap()),
    )
    .await
    .unwrap();
    let served = o2c_testkit::serve(o2c_invoicing::SERVICE_NAME, routes).await;
    let client = InvoicingServiceClient::new(served.channel().await);
    Some(Harness {
        client,
        served,
        clock,
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
            ..Default::default()
        }),
        issue_date: "2026-12-04".into(),
        draft: false,
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

fn terms(
    kind: pb::PaymentTermsKind,
    days: i32,
    discount: &str,
    discount_days: i32,
) -> Option<pb::PaymentTerms> {
    Some(pb::PaymentTerms {
        kind: kind as i32,
        net_days: days,
        discount_percent: discount.into(),
        discount_days,
    })
}

fn simple(
    customer: &str,
    total: &str,
    terms: Option<pb::PaymentTerms>,
    issue_date: &str,
) -> pb::IssueInvoiceRequest {
    pb::IssueInvoiceRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.into(),
        order_id: String::new(),
        currency_code: "EUR".into(),
        lines: vec![line("1", total, "0")],
        payment_terms: terms,
        issue_date: issue_date.into(),
        draft: false,
    }
}

async fn issue(h: &mut Harness, request: pb::IssueInvoiceRequest) -> pb::Invoice {
    h.client
        .issue_invoice(request)
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap()
}

async fn terms_discounts_and_states(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let customer = uuid::Uuid::now_v7().to_string();
    let today = h.today().format("%Y-%m-%d").to_string();
    let two_ten = terms(pb::PaymentTermsKind::Net, 30, "2", 10);

    // 2/10 net 30: 980.00 inside the window settles 1,000.00.
    let early = issue(
        &mut h,
        simple(&customer, "1000.00", two_ten.clone(), &today),
    )
    .await;
    assert_eq!(amount(&early.discount_amount), "20.00");
    assert_eq!(
        early.discount_date,
        (h.today() + chrono::Duration::days(10))
            .format("%Y-%m-%d")
            .to_string()
    );
    let paid = h
        .client
        .apply_payment(pb::ApplyPaymentRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: early.invoice_id.clone(),
            payment_id: uuid::Uuid::now_v7().to_string(),
            amount: eur("980.00"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&paid.discount_taken), "20.00");
    let invoice = paid.invoice.unwrap();
    assert_eq!(invoice.status(), pb::InvoiceStatus::Paid);
    assert_eq!(amount(&invoice.amount_open), "0.00");

    // After the window the same payment leaves 20.00 open.
    let late = issue(&mut h, simple(&customer, "1000.00", two_ten, &today)).await;
    h.advance_days(11);
    let partly = apply(
        &mut h.client,
        &late.invoice_id,
        &uuid::Uuid::now_v7().to_string(),
        "980.00",
    )
    .await
    .unwrap();
    assert_eq!(partly.status(), pb::InvoiceStatus::PartiallyPaid);
    assert_eq!(amount(&partly.amount_open), "20.00");
    assert_eq!(amount(&partly.discount_taken), "0.00");

    // End of month + 15.
    let eom = issue(
        &mut h,
        simple(
            &customer,
            "10.00",
            terms(pb::PaymentTermsKind::EndOfMonthPlus, 15, "", 0),
            "2026-12-04",
        ),
    )
    .await;
    assert_eq!(eom.due_date, "2027-01-15");

    // Draft → open; cancel; write off; credit notes.
    let mut draft_request = simple(
        &customer,
        "50.00",
        terms(pb::PaymentTermsKind::Net, 14, "", 0),
        "",
    );
    draft_request.draft = true;
    let draft = issue(&mut h, draft_request).await;
    assert_eq!(draft.status(), pb::InvoiceStatus::Draft);
    assert_eq!(amount(&draft.amount_open), "0.00", "a draft owes nothing");
    let finalized = h
        .client
        .finalize_invoice(pb::FinalizeInvoiceRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: draft.invoice_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(finalized.status(), pb::InvoiceStatus::Open);
    assert_eq!(
        finalized.issue_date,
        h.today().format("%Y-%m-%d").to_string()
    );
    let cancelled = h
        .client
        .cancel_invoice(pb::CancelInvoiceRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: finalized.invoice_id.clone(),
            reason: "issued by mistake".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&cancelled.released), "50.00");
    assert_eq!(
        cancelled.invoice.unwrap().status(),
        pb::InvoiceStatus::Cancelled
    );
    let not_cancellable = h
        .client
        .cancel_invoice(pb::CancelInvoiceRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: late.invoice_id.clone(),
            reason: "too late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        not_cancellable.code(),
        Code::FailedPrecondition,
        "money was applied"
    );
    let written = h
        .client
        .write_off_invoice(pb::WriteOffInvoiceRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            invoice_id: late.invoice_id.clone(),
            reason: "small balance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&written.written_off), "20.00");
    assert_eq!(
        written.invoice.unwrap().status(),
        pb::InvoiceStatus::WrittenOff
    );

    let target = issue(
        &mut h,
        simple(
            &customer,
            "200.00",
            terms(pb::PaymentTermsKind::Net, 30, "", 0),
            "",
        ),
    )
    .await;
    let note = h
        .client
        .issue_credit_note(pb::IssueCreditNoteRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            invoice_id: target.invoice_id.clone(),
            amount: eur("300.00"),
            reason: "damaged goods".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let credit = note.credit_note.unwrap();
    assert_eq!(amount(&credit.applied_to_invoice), "200.00");
    assert_eq!(
        amount(&credit.account_credit),
        "100.00",
        "the excess is kept, never lost"
    );
    let settled = note.invoice.unwrap();
    assert_eq!(settled.status(), pb::InvoiceStatus::Paid);
    assert_eq!(amount(&settled.amount_credited), "200.00");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_discounts_and_states_sqlite() {
    terms_discounts_and_states(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_discounts_and_states_postgres() {
    terms_discounts_and_states(Backend::Postgres).await;
}

async fn aging_and_lists(backend: Backend) {
    let Some(mut h) = start(backend).await else {
        return;
    };
    let (a, b) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    let net30 = terms(pb::PaymentTermsKind::Net, 30, "", 0);
    let ago = |days: i64| {
        (h.today() - chrono::Duration::days(days))
            .format("%Y-%m-%d")
            .to_string()
    };
    // Issued N days ago, net 30: days past due = N - 30.
    for (customer, total, issued) in [
        (&a, "100.00", ago(10)),  // current
        (&a, "200.00", ago(45)),  // 15 past due
        (&a, "300.00", ago(80)),  // 50
        (&b, "400.00", ago(110)), // 80
        (&b, "500.00", ago(200)), // 170
    ] {
        issue(&mut h, simple(customer, total, net30.clone(), &issued)).await;
    }
    let portfolio = h
        .client
        .get_aging(pb::GetAgingRequest {
            tenant_id: TENANT.into(),
            customer_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let eur_aging = &portfolio.currencies[0];
    let buckets: Vec<_> = eur_aging
        .buckets
        .iter()
        .map(|b| (b.bucket.as_str(), amount(&b.amount), b.invoices))
        .collect();
    assert_eq!(
        buckets,
        [
            ("current", "100.00", 1),
            ("1-30", "200.00", 1),
            ("31-60", "300.00", 1),
            ("61-90", "400.00", 1),
            ("90+", "500.00", 1)
        ]
    );
    assert_eq!(amount(&eur_aging.total), "1500.00");
    let only_a = h
        .client
        .get_aging(pb::GetAgingRequest {
            tenant_id: TENANT.into(),
            customer_id: a.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&only_a.currencies[0].total), "600.00");

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .client
            .list_invoices(pb::ListInvoicesRequest {
                tenant_id: TENANT.into(),
                overdue_only: true,
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.invoices
                .iter()
                .map(|i| (amount(&i.total).to_owned(), i.days_past_due)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        [
            ("500.00".into(), 170),
            ("400.00".into(), 80),
            ("300.00".into(), 50),
            ("200.00".into(), 15)
        ],
        "overdue only, oldest due first"
    );
    let bad = h
        .client
        .list_invoices(pb::ListInvoicesRequest {
            tenant_id: TENANT.into(),
            page_size: 101,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&bad, "page_size");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aging_and_lists_sqlite() {
    aging_and_lists(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aging_and_lists_postgres() {
    aging_and_lists(Backend::Postgres).await;
}

/// ApplyPayment racing the payment's event for the same application: the
/// event's transaction (played here from outside) has written the
/// application but not committed when the call arrives. The call waits for
/// it and, once it commits, answers with that application instead of
/// ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_payment_meets_a_concurrent_application_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(mut h) = start(Backend::Postgres).await else {
        return;
    };
    let invoice = h
        .client
        .issue_invoice(issue_request())
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    let payment = uuid::Uuid::now_v7().to_string();
    let outside = sea_orm::Database::connect(&h._db.url).await.unwrap();
    let event = outside.begin().await.unwrap();
    event
        .execute_unprepared(&format!(
            "INSERT INTO invoice_applied_payments \
             (invoice_id, payment_id, tenant_id, amount_minor, discount_minor, applied_at) \
             VALUES ('{}', '{payment}', '{TENANT}', 1000, 0, now())",
            invoice.invoice_id
        ))
        .await
        .unwrap();
    let call = {
        let mut client = h.client.clone();
        let (invoice, payment) = (invoice.invoice_id.clone(), payment.clone());
        tokio::spawn(async move { apply(&mut client, &invoice, &payment, "10.00").await })
    };
    // Wait until the call's insert waits for the event's transaction.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting = outside
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    event.commit().await.unwrap();
    let answered = call.await.unwrap();
    assert!(answered.is_ok(), "{answered:?}");
    h.served.stop().await;
}
