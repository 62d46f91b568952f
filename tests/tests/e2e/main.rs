//! The order-to-cash spine through the gateway only, with all six services
//! running on 127.0.0.1:0 over real gRPC: on SQLite, and on PostgreSQL with
//! Redis (a fresh database per service per run).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use o2c_all_in_one::{Settings, Suite, start};
use o2c_proto::common::v1::Money;
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use o2c_testkit::{Backend, TestDatabase, assert_invalid};
use tonic::transport::Channel;
use tonic::{Code, Request};

mod credit_desk;
mod crm;
mod events;
mod money;
mod orders;
mod security;

pub const TENANT: &str = "acme-eu";

/// Calls as a service of the deployment acting for the suite's tenant
/// (with the process's internal token).
#[derive(Clone)]
pub struct ForTenant;

impl tonic::service::Interceptor for ForTenant {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let token =
            o2c_kit::auth::mint(&o2c_kit::auth::CallContext::for_tenant(TENANT, "e2e")).unwrap();
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Ok(request)
    }
}

pub type Internal = tonic::service::interceptor::InterceptedService<Channel, ForTenant>;

pub fn internal(addr: std::net::SocketAddr) -> Internal {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    tonic::service::interceptor::InterceptedService::new(channel, ForTenant)
}

pub struct Running {
    pub suite: Suite,
    pub gateway: GatewayServiceClient<Channel>,
    // The backends take calls from services of the deployment only: the
    // tests reach them as one (with the process's internal token).
    pub credit: CreditServiceClient<Internal>,
    pub invoicing:
        o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient<Internal>,
    pub crm: o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient<Internal>,
    pub payments: o2c_proto::payments::v1::payments_service_client::PaymentsServiceClient<Internal>,
    _databases: Vec<TestDatabase>,
}

pub async fn run_suite(backend: Backend) -> Option<Running> {
    let names = [
        "gateway",
        "customer",
        "credit",
        "invoicing",
        "payments",
        "crm_sync",
    ];
    let mut databases = Vec::new();
    for name in names {
        databases.push(o2c_testkit::database(backend, name).await?);
    }
    let urls: Vec<(String, String)> = names
        .iter()
        .zip(&databases)
        .map(|(n, d)| ((*n).to_owned(), d.url.clone()))
        .collect();
    let mut settings = Settings::ephemeral(|name| {
        urls.iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.clone())
            .unwrap()
    });
    if backend == Backend::Postgres {
        settings.common.redis_url = Some(o2c_testkit::redis_url().await?);
    }
    settings.auth.jwt_issuers = vec![issuer()];
    settings.auth.browser_origins = vec![CONSOLE_ORIGIN.into()];
    // Collect due payments promptly so tests can watch them happen.
    settings.payments_policy.collection_interval_ms = 200;
    let suite = start(&settings).await.unwrap();
    let connect = |addr: std::net::SocketAddr| async move {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let gateway = GatewayServiceClient::new(connect(suite.addresses.gateway).await);
    let credit = CreditServiceClient::new(internal(suite.addresses.credit));
    let invoicing = o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient::new(
        internal(suite.addresses.invoicing),
    );
    let crm = o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient::new(
        internal(suite.addresses.crm_sync),
    );
    let payments = o2c_proto::payments::v1::payments_service_client::PaymentsServiceClient::new(
        internal(suite.addresses.payments),
    );
    Some(Running {
        suite,
        gateway,
        credit,
        invoicing,
        crm,
        payments,
        _databases: databases,
    })
}

pub fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

pub use o2c_tests::identity::issuer;

/// The operator console's origin, allowed to call from a browser.
pub const CONSOLE_ORIGIN: &str = "https://console.test.example";

/// A token of the suite's tenant ("analyst-1", client and analyst);
/// `claims` override or add claims.
pub fn jwt_with(claims: serde_json::Value) -> String {
    let mut all = serde_json::json!({
        "sub": "analyst-1",
        "o2c_tenant": TENANT,
        "o2c_roles": ["platform_client", "credit_analyst"],
    });
    if let (Some(all), Some(extra)) = (all.as_object_mut(), claims.as_object()) {
        for (k, v) in extra {
            all.insert(k.clone(), v.clone());
        }
    }
    o2c_tests::identity::token(all)
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A call as `user` of the suite's tenant, client and analyst.
pub fn as_user<T>(message: T, user: &str) -> Request<T> {
    with_token(message, &jwt_with(serde_json::json!({ "sub": user })))
}

/// A call as "analyst-1" of the suite's tenant, client and analyst.
pub fn as_tenant<T>(message: T) -> Request<T> {
    as_user(message, "analyst-1")
}

pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn amount(m: &Option<Money>) -> &str {
    &m.as_ref().unwrap().amount
}

/// Creates a customer with a linked credit account and `limit`.
pub async fn onboard(gateway: &mut GatewayServiceClient<Channel>, limit: &str) -> String {
    let customer = gateway
        .create_customer(as_tenant(pb::CreateCustomerRequest {
            idempotency_key: key(),
            legal_name: "Müller Maschinenbau GmbH".into(),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    let linked = gateway
        .link_credit_account(as_tenant(pb::LinkCreditAccountRequest {
            idempotency_key: key(),
            customer_id: customer.customer_id.clone(),
            agency: "creditreform".into(),
            agency_reference: "DE-4471-1190-22".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert!(!linked.credit_account_id.is_empty());
    assert_eq!(linked.agency_reference_last4, "9022");
    gateway
        .set_credit_limit(as_tenant(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            customer_id: customer.customer_id.clone(),
            credit_limit: eur(limit),
            reason: "onboarding".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    customer.customer_id
}

pub async fn exposure(gateway: &mut GatewayServiceClient<Channel>, customer: &str) -> pb::Exposure {
    gateway
        .get_customer_exposure(as_tenant(pb::GetCustomerExposureRequest {
            customer_id: customer.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap()
}

/// Reconciliation across the services finds nothing for `customer`.
pub async fn assert_reconciled(gateway: &mut GatewayServiceClient<Channel>, customer: &str) {
    let report = gateway
        .reconcile(as_tenant(pb::ReconcileRequest {
            customer_id: customer.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.customers_checked, 1);
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

pub async fn assert_ledger_consistent(credit: &mut CreditServiceClient<Internal>, customer: &str) {
    let check = credit
        .recompute_exposure(credit_pb::RecomputeExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(check.consistent, "{check:?}");
}

async fn spine(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "1000.00").await;

    let place = pb::PlaceOrderRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        client_reference: "PO-1".into(),
        amount: eur("400.00"),
    };
    let placed = s
        .gateway
        .place_order(as_tenant(place.clone()))
        .await
        .unwrap()
        .into_inner();
    let order = placed.order.unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);
    assert_eq!(amount(&placed.exposure.unwrap().reserved), "400.00");

    // A retried call returns the same order, reserving nothing more.
    let replayed = s
        .gateway
        .place_order(as_tenant(place))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.order.unwrap().order_id, order.order_id);
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "400.00"
    );

    let held = s
        .gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: "PO-2".into(),
            amount: eur("700.00"),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(held.status(), pb::OrderStatus::Held);
    assert_eq!(held.reasons, ["OVER_LIMIT"]);

    // A held order cannot be invoiced.
    let refused = s
        .gateway
        .invoice_order(as_tenant(pb::InvoiceOrderRequest {
            idempotency_key: key(),
            order_id: held.order_id.clone(),
            net_days: 30,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let invoiced = s
        .gateway
        .invoice_order(as_tenant(pb::InvoiceOrderRequest {
            idempotency_key: key(),
            order_id: order.order_id.clone(),
            net_days: 30,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(invoiced.order.unwrap().status(), pb::OrderStatus::Invoiced);
    let invoice = invoiced.invoice.unwrap();
    assert_eq!(invoice.status(), pb::InvoiceStatus::Open);
    assert_eq!(amount(&invoice.total), "400.00");
    assert_ne!(invoice.due_date, invoice.issue_date);
    let e = exposure(&mut s.gateway, &customer).await;
    assert_eq!(amount(&e.reserved), "0.00");
    assert_eq!(amount(&e.receivables), "400.00");

    // Pay 450 against the 400 invoice: 50 stays as unapplied cash.
    let paid = s
        .gateway
        .record_payment(as_tenant(pb::RecordPaymentRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            amount: eur("450.00"),
            method: pb::PaymentMethod::BankTransfer as i32,
            reference: "REMITTANCE PO-1".into(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("400.00"),
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&paid.unapplied), "50.00");
    assert_eq!(paid.invoices[0].status(), pb::InvoiceStatus::Paid);
    // The payment freed credit: the held 700.00 order now passes and is
    // released automatically, so its reservation is all that is owed.
    let e = paid.exposure.unwrap();
    assert_eq!(amount(&e.receivables), "0.00");
    assert_eq!(amount(&e.reserved), "700.00");
    assert_eq!(amount(&e.available), "300.00");
    let released = s
        .gateway
        .get_order(as_tenant(pb::GetOrderRequest {
            order_id: held.order_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(released.status(), pb::OrderStatus::Approved);

    let read = s
        .gateway
        .get_invoice(as_tenant(pb::GetInvoiceRequest {
            invoice_id: invoice.invoice_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(read.status(), pb::InvoiceStatus::Paid);
    assert_eq!(amount(&read.amount_open), "0.00");
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.total),
        "700.00"
    );
    assert_ledger_consistent(&mut s.credit, &customer).await;
    assert_reconciled(&mut s.gateway, &customer).await;
    // Every background loop runs in the suite's scope, to stop with it:
    // the outbox relays of customer, credit, invoicing and payments, the
    // inbox pruning of credit, invoicing, payments and crm-sync, credit's
    // maintenance, payment collection and the gateway's reconciliation.
    let background = s.suite.background();
    assert_eq!(background.running(), 11);
    s.suite.stop().await.unwrap();
    // Each finished its pass and ended with the suite.
    assert_eq!(background.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spine_on_sqlite() {
    spine(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spine_on_postgres_with_redis() {
    spine(Backend::Postgres).await;
}

/// Every spine RPC refuses bad input with the field named, and a refused
/// call changes nothing.
async fn bad_input(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let g = &mut s.gateway;
    let customer = onboard(g, "1000.00").await;
    let unknown = uuid::Uuid::now_v7().to_string();

    // CreateCustomer.
    let good = pb::CreateCustomerRequest {
        idempotency_key: key(),
        legal_name: "Acme".into(),
        country_code: "FR".into(),
        currency_code: "EUR".into(),
    };
    for (field, change) in [
        (
            "idempotency_key",
            pb::CreateCustomerRequest {
                idempotency_key: String::new(),
                ..good.clone()
            },
        ),
        (
            "legal_name",
            pb::CreateCustomerRequest {
                legal_name: " ".into(),
                ..good.clone()
            },
        ),
        (
            "country_code",
            pb::CreateCustomerRequest {
                country_code: "France".into(),
                ..good.clone()
            },
        ),
        (
            "currency_code",
            pb::CreateCustomerRequest {
                currency_code: "EURO".into(),
                ..good.clone()
            },
        ),
        (
            "currency_code",
            pb::CreateCustomerRequest {
                currency_code: String::new(),
                ..good.clone()
            },
        ),
    ] {
        assert_invalid(
            &g.create_customer(as_tenant(change)).await.unwrap_err(),
            field,
        );
    }
    let status = g
        .create_customer(Request::new(good.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "no tenant, no access");

    // LinkCreditAccount.
    let link = pb::LinkCreditAccountRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        agency: "dnb".into(),
        agency_reference: "12345678".into(),
        ..Default::default()
    };
    for (field, change) in [
        (
            "customer_id",
            pb::LinkCreditAccountRequest {
                customer_id: "x".into(),
                ..link.clone()
            },
        ),
        (
            "agency",
            pb::LinkCreditAccountRequest {
                agency: "D&B".into(),
                ..link.clone()
            },
        ),
        (
            "agency_reference",
            pb::LinkCreditAccountRequest {
                agency_reference: "12!".into(),
                ..link.clone()
            },
        ),
    ] {
        assert_invalid(
            &g.link_credit_account(as_tenant(change)).await.unwrap_err(),
            field,
        );
    }
    let status = g
        .link_credit_account(as_tenant(pb::LinkCreditAccountRequest {
            customer_id: unknown.clone(),
            ..link.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // SetCreditLimit.
    let limit = pb::SetCreditLimitRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        credit_limit: eur("5.00"),
        reason: "test".into(),
        ..Default::default()
    };
    for (field, change) in [
        (
            "credit_limit.amount",
            pb::SetCreditLimitRequest {
                credit_limit: eur("-5.00"),
                ..limit.clone()
            },
        ),
        (
            "credit_limit.amount",
            pb::SetCreditLimitRequest {
                credit_limit: eur("5.001"),
                ..limit.clone()
            },
        ),
        (
            "credit_limit.currency_code",
            pb::SetCreditLimitRequest {
                credit_limit: Some(Money {
                    amount: "5".into(),
                    currency_code: "ABC".into(),
                }),
                ..limit.clone()
            },
        ),
        (
            "credit_limit.currency_code",
            pb::SetCreditLimitRequest {
                credit_limit: Some(Money {
                    amount: "5".into(),
                    currency_code: "USD".into(),
                }),
                ..limit.clone()
            },
        ),
        (
            "credit_limit",
            pb::SetCreditLimitRequest {
                credit_limit: None,
                ..limit.clone()
            },
        ),
    ] {
        assert_invalid(
            &g.set_credit_limit(as_tenant(change)).await.unwrap_err(),
            field,
        );
    }
    let status = g
        .set_credit_limit(as_tenant(pb::SetCreditLimitRequest {
            customer_id: unknown.clone(),
            ..limit.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // PlaceOrder.
    let place = pb::PlaceOrderRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        client_reference: String::new(),
        amount: eur("10.00"),
    };
    for (field, change) in [
        (
            "idempotency_key",
            pb::PlaceOrderRequest {
                idempotency_key: "k".repeat(151),
                ..place.clone()
            },
        ),
        (
            "customer_id",
            pb::PlaceOrderRequest {
                customer_id: String::new(),
                ..place.clone()
            },
        ),
        (
            "amount",
            pb::PlaceOrderRequest {
                amount: None,
                ..place.clone()
            },
        ),
        (
            "amount.amount",
            pb::PlaceOrderRequest {
                amount: eur("-10.00"),
                ..place.clone()
            },
        ),
        (
            "amount.amount",
            pb::PlaceOrderRequest {
                amount: eur("1e3"),
                ..place.clone()
            },
        ),
        (
            "amount.currency_code",
            pb::PlaceOrderRequest {
                amount: Some(Money {
                    amount: "1".into(),
                    currency_code: "QQQ".into(),
                }),
                ..place.clone()
            },
        ),
        (
            "amount.currency_code",
            pb::PlaceOrderRequest {
                amount: Some(Money {
                    amount: "1".into(),
                    currency_code: "USD".into(),
                }),
                ..place.clone()
            },
        ),
    ] {
        assert_invalid(&g.place_order(as_tenant(change)).await.unwrap_err(), field);
    }
    let status = g
        .place_order(as_tenant(pb::PlaceOrderRequest {
            customer_id: unknown.clone(),
            ..place.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A refused PlaceOrder left its key free: the corrected request works.
    let reuse = key();
    let wrong = pb::PlaceOrderRequest {
        idempotency_key: reuse.clone(),
        amount: Some(Money {
            amount: "1".into(),
            currency_code: "USD".into(),
        }),
        ..place.clone()
    };
    assert_invalid(
        &g.place_order(as_tenant(wrong)).await.unwrap_err(),
        "amount.currency_code",
    );
    let fixed = pb::PlaceOrderRequest {
        idempotency_key: reuse.clone(),
        ..place.clone()
    };
    let order = g
        .place_order(as_tenant(fixed))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);
    // But an accepted key cannot be reused for another request.
    let other = pb::PlaceOrderRequest {
        idempotency_key: reuse,
        amount: eur("11.00"),
        ..place.clone()
    };
    assert_invalid(
        &g.place_order(as_tenant(other)).await.unwrap_err(),
        "idempotency_key",
    );

    // InvoiceOrder.
    let invoice = pb::InvoiceOrderRequest {
        idempotency_key: key(),
        order_id: order.order_id.clone(),
        net_days: 30,
        ..Default::default()
    };
    for (field, change) in [
        (
            "order_id",
            pb::InvoiceOrderRequest {
                order_id: "nope".into(),
                ..invoice.clone()
            },
        ),
        (
            "net_days",
            pb::InvoiceOrderRequest {
                net_days: -1,
                ..invoice.clone()
            },
        ),
        (
            "net_days",
            pb::InvoiceOrderRequest {
                net_days: 366,
                ..invoice.clone()
            },
        ),
    ] {
        assert_invalid(
            &g.invoice_order(as_tenant(change)).await.unwrap_err(),
            field,
        );
    }
    let status = g
        .invoice_order(as_tenant(pb::InvoiceOrderRequest {
            order_id: unknown.clone(),
            ..invoice.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let issued = g
        .invoice_order(as_tenant(invoice))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();

    // RecordPayment.
    let pay = pb::RecordPaymentRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        amount: eur("5.00"),
        method: pb::PaymentMethod::BankTransfer as i32,
        reference: String::new(),
        allocations: vec![pb::PaymentAllocation {
            invoice_id: issued.invoice_id.clone(),
            amount: eur("5.00"),
        }],
    };
    let allocation = |invoice_id: &str, value: &str| {
        vec![pb::PaymentAllocation {
            invoice_id: invoice_id.into(),
            amount: eur(value),
        }]
    };
    for (field, change) in [
        (
            "amount.amount",
            pb::RecordPaymentRequest {
                amount: eur("0.00"),
                ..pay.clone()
            },
        ),
        (
            "method",
            pb::RecordPaymentRequest {
                method: 0,
                ..pay.clone()
            },
        ),
        (
            "allocations[0].invoice_id",
            pb::RecordPaymentRequest {
                allocations: allocation("bad", "5.00"),
                ..pay.clone()
            },
        ),
        (
            "allocations[0].amount.amount",
            pb::RecordPaymentRequest {
                allocations: allocation(&issued.invoice_id, "-1"),
                ..pay.clone()
            },
        ),
        (
            "allocations",
            pb::RecordPaymentRequest {
                allocations: allocation(&issued.invoice_id, "6.00"),
                ..pay.clone()
            },
        ),
        (
            "reference",
            pb::RecordPaymentRequest {
                reference: "card 4111 1111 1111 1111".into(),
                ..pay.clone()
            },
        ),
    ] {
        assert_invalid(
            &g.record_payment(as_tenant(change)).await.unwrap_err(),
            field,
        );
    }
    let status = g
        .record_payment(as_tenant(pb::RecordPaymentRequest {
            allocations: allocation(&unknown, "5.00"),
            ..pay.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = g
        .record_payment(as_tenant(pb::RecordPaymentRequest {
            allocations: allocation(&issued.invoice_id, "10.01"),
            amount: eur("20.00"),
            ..pay.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "more than the open amount"
    );

    // Nothing refused above left a trace.
    let e = exposure(g, &customer).await;
    assert_eq!(amount(&e.credit_limit), "1000.00");
    assert_eq!(amount(&e.reserved), "0.00");
    assert_eq!(amount(&e.receivables), "10.00");
    let read = g
        .get_invoice(as_tenant(pb::GetInvoiceRequest {
            invoice_id: issued.invoice_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(amount(&read.amount_paid), "0.00");

    // Reads of unknown or malformed ids.
    assert_eq!(
        g.get_customer(as_tenant(pb::GetCustomerRequest {
            customer_id: unknown.clone()
        }))
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_invalid(
        &g.get_order(as_tenant(pb::GetOrderRequest {
            order_id: "1".into(),
        }))
        .await
        .unwrap_err(),
        "order_id",
    );
    assert_eq!(
        g.get_invoice(as_tenant(pb::GetInvoiceRequest {
            invoice_id: unknown
        }))
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_ledger_consistent(&mut s.credit, &customer).await;
    assert_reconciled(&mut s.gateway, &customer).await;
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_changes_nothing_on_sqlite() {
    bad_input(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_changes_nothing_on_postgres() {
    bad_input(Backend::Postgres).await;
}

/// Effects that bypass the workflow show up as differences.
async fn reconciliation_finds_what_bypassed_the_flow(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "1000.00").await;
    let order = s
        .gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: String::new(),
            amount: eur("100.00"),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let invoice = s
        .gateway
        .invoice_order(as_tenant(pb::InvoiceOrderRequest {
            idempotency_key: key(),
            order_id: order.order_id,
            net_days: 30,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_reconciled(&mut s.gateway, &customer).await;
    // A receivable told to credit only: invoicing never issued it.
    let phantom = o2c_proto::invoicing::v1::Invoice {
        invoice_id: uuid::Uuid::now_v7().to_string(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        currency_code: "EUR".into(),
        total: eur("40.00"),
        amount_open: eur("40.00"),
        status: o2c_proto::invoicing::v1::InvoiceStatus::Open as i32,
        due_date: invoice.due_date.clone(),
        ..Default::default()
    };
    s.credit
        .sync_receivable(credit_pb::SyncReceivableRequest {
            tenant_id: TENANT.into(),
            invoice: Some(phantom),
        })
        .await
        .unwrap();
    // A reservation made in credit only: no order stands behind it.
    s.credit
        .check_and_reserve(credit_pb::CheckAndReserveRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            order_id: "phantom".into(),
            amount: eur("5.00"),
            client_reference: String::new(),
        })
        .await
        .unwrap();
    let report = s
        .gateway
        .reconcile(as_tenant(pb::ReconcileRequest {
            customer_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut found: Vec<_> = report
        .differences
        .iter()
        .map(|d| (d.kind(), d.credit_value.clone(), d.owner_value.clone()))
        .collect();
    found.sort_by_key(|d| d.0 as i32);
    assert_eq!(
        found,
        [
            (
                pb::DifferenceKind::Receivable,
                "40.00".to_owned(),
                "no such invoice".to_owned()
            ),
            (
                pb::DifferenceKind::Reservation,
                "5.00".to_owned(),
                "no approved order".to_owned()
            ),
        ]
    );
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finds_differences_on_sqlite() {
    reconciliation_finds_what_bypassed_the_flow(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finds_differences_on_postgres() {
    reconciliation_finds_what_bypassed_the_flow(Backend::Postgres).await;
}
