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

mod collections {
    use super::*;
    use o2c_proto::credit::v1 as credit_pb;
    use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
    use o2c_proto::invoicing::v1 as invoicing_pb;
    use o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient;
    use std::sync::{Arc, Mutex};

    struct World {
        payments: PaymentsServiceClient<Channel>,
        credit: CreditServiceClient<Channel>,
        invoicing: InvoicingServiceClient<Channel>,
        collector: o2c_payments::collector::Collector,
        clock: Arc<Mutex<chrono::DateTime<chrono::Utc>>>,
        _served: Vec<Served>,
        _dbs: Vec<TestDatabase>,
    }

    impl World {
        fn advance_days(&self, days: i64) {
            *self.clock.lock().unwrap() += chrono::Duration::days(days);
        }
        fn today(&self) -> chrono::NaiveDate {
            self.clock.lock().unwrap().date_naive()
        }
    }

    async fn world(backend: Backend) -> Option<World> {
        let (credit_db, invoicing_db, payments_db) = (
            o2c_testkit::database(backend, "credit").await?,
            o2c_testkit::database(backend, "invoicing").await?,
            o2c_testkit::database(backend, "payments").await?,
        );
        let settings = |url: &str| {
            let mut s = o2c_kit::settings::ServiceSettings::local("svc", 0);
            s.database_url = url.to_owned();
            s
        };
        let credit = o2c_testkit::serve(
            o2c_credit::SERVICE_NAME,
            o2c_credit::build(
                &settings(&credit_db.url),
                None,
                &o2c_credit::CreditSettings::default(),
            )
            .await
            .unwrap(),
        )
        .await;
        let invoicing = o2c_testkit::serve(
            o2c_invoicing::SERVICE_NAME,
            o2c_invoicing::build(&settings(&invoicing_db.url))
                .await
                .unwrap(),
        )
        .await;
        let clock = Arc::new(Mutex::new(chrono::Utc::now()));
        let reader = clock.clone();
        let policy = o2c_payments::PaymentsSettings {
            invoicing_url: invoicing.url(),
            credit_url: credit.url(),
            ..Default::default()
        };
        let built = o2c_payments::build_with(
            &settings(&payments_db.url),
            &policy,
            Arc::new(move || *reader.lock().unwrap()),
            Arc::new(o2c_payments::domain::processor::Simulated::new(
                Default::default(),
            )),
        )
        .await
        .unwrap();
        let payments = o2c_testkit::serve(o2c_payments::SERVICE_NAME, built.routes).await;
        Some(World {
            payments: PaymentsServiceClient::new(payments.channel().await),
            credit: CreditServiceClient::new(credit.channel().await),
            invoicing: InvoicingServiceClient::new(invoicing.channel().await),
            collector: built.collector,
            clock,
            _served: vec![credit, invoicing, payments],
            _dbs: vec![credit_db, invoicing_db, payments_db],
        })
    }

    /// A customer with credit, an invoiced order of 100.00 due in 30 days,
    /// and a mandate with `token`.
    async fn sold(w: &mut World, token: &str) -> (String, String) {
        let customer = uuid::Uuid::now_v7().to_string();
        w.credit
            .open_credit_account(credit_pb::OpenCreditAccountRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                currency_code: "EUR".into(),
                parent_customer_id: String::new(),
            })
            .await
            .unwrap();
        w.credit
            .set_credit_limit(credit_pb::SetCreditLimitRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                credit_limit: eur("1000.00"),
                reason: "test".into(),
                actor: "analyst".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let order = uuid::Uuid::now_v7().to_string();
        let decision = w
            .credit
            .check_and_reserve(credit_pb::CheckAndReserveRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                order_id: order.clone(),
                amount: eur("100.00"),
                client_reference: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .decision
            .unwrap();
        let invoice = w
            .invoicing
            .issue_invoice(invoicing_pb::IssueInvoiceRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                order_id: order,
                currency_code: "EUR".into(),
                lines: vec![invoicing_pb::InvoiceLine {
                    description: "goods".into(),
                    quantity: "1".into(),
                    unit_price: eur("100.00"),
                    tax_rate_percent: "0".into(),
                    line_total: None,
                }],
                payment_terms: Some(invoicing_pb::PaymentTerms {
                    kind: invoicing_pb::PaymentTermsKind::Net as i32,
                    net_days: 30,
                    ..Default::default()
                }),
                issue_date: w.today().format("%Y-%m-%d").to_string(),
                draft: false,
            })
            .await
            .unwrap()
            .into_inner()
            .invoice
            .unwrap();
        let synced = w
            .credit
            .sync_receivable(credit_pb::SyncReceivableRequest {
                tenant_id: TENANT.into(),
                invoice: Some(invoice.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            synced.converted.unwrap().reservation_id,
            decision.reservation_id
        );
        w.payments
            .create_mandate(pb::CreateMandateRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                method: pb::PaymentMethod::DirectDebit as i32,
                processor_token: token.into(),
                last4: "4242".into(),
                currency_code: "EUR".into(),
            })
            .await
            .unwrap();
        let session = w
            .payments
            .schedule_collection(pb::ScheduleCollectionRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("100.00"),
                due_date: invoice.due_date,
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(session.state(), pb::SessionState::Scheduled);
        (customer, session.session_id)
    }

    async fn session(w: &mut World, id: &str) -> pb::PaymentSession {
        w.payments
            .get_payment_session(pb::GetPaymentSessionRequest {
                tenant_id: TENANT.into(),
                session_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap()
    }

    async fn receivables(w: &mut World, customer: &str) -> String {
        w.credit
            .get_exposure(credit_pb::GetExposureRequest {
                tenant_id: TENANT.into(),
                customer_id: customer.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .exposure
            .unwrap()
            .receivables
            .unwrap()
            .amount
    }

    async fn retried_then_collected(backend: Backend) {
        let Some(mut w) = world(backend).await else {
            return;
        };
        let (customer, id) = sold(&mut w, "tok_retry2_acme").await;
        // Nothing happens before the due date.
        assert_eq!(w.collector.run_once().await.unwrap().attempted, 0);
        w.advance_days(30);
        w.collector.run_once().await.unwrap();
        assert_eq!(
            session(&mut w, &id).await.state(),
            pb::SessionState::Retrying
        );
        w.advance_days(1);
        w.collector.run_once().await.unwrap();
        w.advance_days(3);
        let pass = w.collector.run_once().await.unwrap();
        assert_eq!((pass.collected, pass.applied), (1, 1));
        let done = session(&mut w, &id).await;
        assert_eq!(done.state(), pb::SessionState::Succeeded);
        let outcomes: Vec<_> = done.attempts.iter().map(|a| a.succeeded).collect();
        assert_eq!(outcomes, [false, false, true]);
        assert!(!done.payment_id.is_empty());
        assert_eq!(
            receivables(&mut w, &customer).await,
            "0.00",
            "credit follows"
        );
        // A further pass changes nothing.
        assert_eq!(w.collector.run_once().await.unwrap(), Default::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retried_then_collected_sqlite() {
        retried_then_collected(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retried_then_collected_postgres() {
        retried_then_collected(Backend::Postgres).await;
    }

    async fn final_failure_alerts(backend: Backend) {
        let Some(mut w) = world(backend).await else {
            return;
        };
        let (customer, id) = sold(&mut w, "tok_fail_globex").await;
        for days in [30, 1, 3, 7] {
            w.advance_days(days);
            w.collector.run_once().await.unwrap();
        }
        let failed = session(&mut w, &id).await;
        assert_eq!(failed.state(), pb::SessionState::Failed);
        assert_eq!(
            failed.attempts.len(),
            4,
            "the first attempt and three retries"
        );
        assert_eq!(receivables(&mut w, &customer).await, "100.00");
        let alerts = w
            .credit
            .list_alerts(credit_pb::ListAlertsRequest {
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .alerts;
        assert_eq!(
            alerts
                .iter()
                .filter(|a| a.kind() == credit_pb::AlertKind::CollectionFailed)
                .count(),
            1
        );
        // Reported once.
        w.collector.run_once().await.unwrap();
        let again = w
            .credit
            .list_alerts(credit_pb::ListAlertsRequest {
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .alerts;
        assert_eq!(again.len(), alerts.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn final_failure_alerts_sqlite() {
        final_failure_alerts(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn final_failure_alerts_postgres() {
        final_failure_alerts(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mandates_never_take_card_numbers() {
        let Some(mut w) = world(Backend::Sqlite).await else {
            return;
        };
        let request = pb::CreateMandateRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: uuid::Uuid::now_v7().to_string(),
            method: pb::PaymentMethod::Card as i32,
            processor_token: "4111 1111 1111 1111".into(),
            last4: "1111".into(),
            currency_code: "EUR".into(),
        };
        let status = w
            .payments
            .create_mandate(request.clone())
            .await
            .unwrap_err();
        assert_invalid(&status, "processor_token");
        let status = w
            .payments
            .create_mandate(pb::CreateMandateRequest {
                processor_token: "tok_ok".into(),
                last4: "11a1".into(),
                ..request.clone()
            })
            .await
            .unwrap_err();
        assert_invalid(&status, "last4");
        let mandate = w
            .payments
            .create_mandate(pb::CreateMandateRequest {
                processor_token: "tok_secret_abc".into(),
                ..request
            })
            .await
            .unwrap()
            .into_inner()
            .mandate
            .unwrap();
        assert_eq!(mandate.last4, "1111");
        assert!(
            !format!("{mandate:?}").contains("tok_secret"),
            "the token is never echoed"
        );
    }
}
