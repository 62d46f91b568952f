//! State crosses between services as events (transactional outbox → relay
//! → idempotent consumer), so the order-to-cash flow converges even when
//! its orchestrator, the gateway, stops half-way: here the gateway is
//! bypassed after the order, and invoicing, payments, credit and the CRM
//! view still come to agree.

use std::time::Duration;

use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::crm_sync::v1 as crm_pb;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_proto::payments::v1 as payments_pb;
use o2c_testkit::Backend;

use super::{Running, TENANT, amount, as_tenant, assert_ledger_consistent, eur, key, run_suite};

const WAIT: Duration = Duration::from_secs(20);

/// Polls credit until `customer`'s exposure satisfies `expected`.
async fn credit_until(
    s: &Running,
    customer: &str,
    expected: impl Fn(&credit_pb::Exposure) -> bool,
) -> credit_pb::Exposure {
    o2c_testkit::eventually(WAIT, || {
        let mut credit = s.credit.clone();
        let expected = &expected;
        async move {
            let exposure = credit
                .get_exposure(credit_pb::GetExposureRequest {
                    tenant_id: TENANT.into(),
                    customer_id: customer.into(),
                })
                .await
                .ok()?
                .into_inner()
                .exposure?;
            expected(&exposure).then_some(exposure)
        }
    })
    .await
    .expect("credit catches up before the deadline")
}

async fn payment_until(
    s: &Running,
    payment_id: &str,
    expected: impl Fn(&payments_pb::Payment) -> bool,
) -> payments_pb::Payment {
    o2c_testkit::eventually(WAIT, || {
        let mut payments = s.payments.clone();
        let expected = &expected;
        async move {
            let payment = payments
                .get_payment(payments_pb::GetPaymentRequest {
                    tenant_id: TENANT.into(),
                    payment_id: payment_id.into(),
                })
                .await
                .ok()?
                .into_inner()
                .payment?;
            expected(&payment).then_some(payment)
        }
    })
    .await
    .expect("payments catches up before the deadline")
}

fn record_payment(
    customer: &str,
    value: &str,
    allocations: Vec<payments_pb::Allocation>,
) -> payments_pb::RecordPaymentRequest {
    payments_pb::RecordPaymentRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.into(),
        amount: eur(value),
        method: payments_pb::PaymentMethod::BankTransfer as i32,
        reference: "remittance 2026-12".into(),
        allocations,
    }
}

async fn converges_without_the_gateway(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    // A CRM-linked customer with credit, and an order through the gateway.
    let customer = s
        .crm
        .upsert_customer(crm_pb::UpsertCustomerRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "hs-77".into(),
            legal_name: "Nordlicht Logistik GmbH".into(),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer_id;
    s.gateway
        .link_credit_account(as_tenant(pb::LinkCreditAccountRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            agency: "creditreform".into(),
            agency_reference: "DE-7700-1234".into(),
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
    let order = s
        .gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: String::new(),
            amount: eur("300.00"),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);

    // The gateway stops after invoicing issued the invoice: credit is never
    // called, yet the invoice's event converts the order's reservation.
    let invoice = s
        .invoicing
        .issue_invoice(invoicing_pb::IssueInvoiceRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            order_id: order.order_id.clone(),
            currency_code: "EUR".into(),
            lines: vec![invoicing_pb::InvoiceLine {
                description: "Pallets".into(),
                quantity: "3".into(),
                unit_price: eur("100.00"),
                tax_rate_percent: "0".into(),
                line_total: None,
            }],
            payment_terms: Some(invoicing_pb::PaymentTerms {
                kind: invoicing_pb::PaymentTermsKind::Net as i32,
                net_days: 30,
                ..Default::default()
            }),
            issue_date: String::new(),
            draft: false,
        })
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    let e = credit_until(&s, &customer, |e| amount(&e.receivables) == "300.00").await;
    assert_eq!(amount(&e.reserved), "0.00");

    // A payment of another customer allocated to this customer's invoice
    // is refused: a payment settles only its payer's invoices. The money
    // goes back to that payment's unapplied cash.
    let stranger = s
        .payments
        .record_payment(record_payment(
            &uuid::Uuid::now_v7().to_string(),
            "10.00",
            vec![payments_pb::Allocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("10.00"),
            }],
        ))
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    payment_until(&s, &stranger.payment_id, |p| {
        p.allocations.is_empty() && amount(&p.unapplied) == "10.00"
    })
    .await;

    // A payment recorded in payments only: its event applies it to the
    // invoice, whose event lowers the receivable in credit.
    let paid = s
        .payments
        .record_payment(record_payment(
            &customer,
            "300.00",
            vec![payments_pb::Allocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("300.00"),
            }],
        ))
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    let e = credit_until(&s, &customer, |e| amount(&e.receivables) == "0.00").await;
    assert_eq!(amount(&e.available), "1000.00");
    let settled = s
        .invoicing
        .get_invoice(invoicing_pb::GetInvoiceRequest {
            tenant_id: TENANT.into(),
            invoice_id: invoice.invoice_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(settled.status(), invoicing_pb::InvoiceStatus::Paid);
    assert_eq!(amount(&settled.amount_paid), "300.00", "applied once");

    // A second payment for the same, now paid, invoice: invoicing refuses
    // it and the money returns to unapplied cash, never lost.
    let second = s
        .payments
        .record_payment(record_payment(
            &customer,
            "120.00",
            vec![payments_pb::Allocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("120.00"),
            }],
        ))
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert_eq!(amount(&second.unapplied), "0.00");
    let returned = payment_until(&s, &second.payment_id, |p| {
        p.allocations.is_empty() && amount(&p.unapplied) == "120.00"
    })
    .await;
    assert_eq!(amount(&returned.amount), "120.00");

    // The CRM view: the invoice paid, both payments with what they paid.
    let crm = o2c_testkit::eventually(WAIT, || {
        let mut crm = s.crm.clone();
        async move {
            let invoices = crm
                .list_customer_invoices(crm_pb::ListCustomerInvoicesRequest {
                    tenant_id: TENANT.into(),
                    crm_system: "hubspot".into(),
                    external_id: "hs-77".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .invoices;
            let payments = crm
                .list_customer_payments(crm_pb::ListCustomerPaymentsRequest {
                    tenant_id: TENANT.into(),
                    crm_system: "hubspot".into(),
                    external_id: "hs-77".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .payments;
            let done = invoices.len() == 1
                && invoices[0].status == "PAID"
                && payments.len() == 2
                && payments[0].applied.is_empty()
                && amount(&payments[0].unapplied) == "120.00";
            done.then_some((invoices, payments))
        }
    })
    .await
    .expect("the CRM view catches up before the deadline");
    let (invoices, payments) = crm;
    assert_eq!(invoices[0].invoice_id, invoice.invoice_id);
    assert_eq!(amount(&invoices[0].open), "0.00");
    assert_eq!(payments[1].payment_id, paid.payment_id);
    assert_eq!(payments[1].applied.len(), 1);
    assert_eq!(amount(&payments[1].applied[0].amount), "300.00");
    assert_eq!(payments[1].method, "BANK_TRANSFER");

    // A page of one, then the next.
    let first = s
        .crm
        .list_customer_payments(crm_pb::ListCustomerPaymentsRequest {
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "hs-77".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.payments.len(), 1);
    let next = s
        .crm
        .list_customer_payments(crm_pb::ListCustomerPaymentsRequest {
            tenant_id: TENANT.into(),
            crm_system: "hubspot".into(),
            external_id: "hs-77".into(),
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.payments[0].payment_id, paid.payment_id);

    // Money agrees everywhere. Only the gateway's own order record, which
    // follows its own calls and not the events, still shows the order as
    // approved and not invoiced: reconciliation says so.
    assert_ledger_consistent(&mut s.credit, &customer).await;
    let report = s
        .gateway
        .reconcile(as_tenant(pb::ReconcileRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let found: Vec<_> = report
        .differences
        .iter()
        .map(|d| (d.kind(), d.credit_value.as_str(), d.owner_value.as_str()))
        .collect();
    assert_eq!(
        found,
        [(
            pb::DifferenceKind::Reservation,
            "no open reservation",
            "300.00"
        )]
    );
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_without_the_gateway_on_sqlite() {
    converges_without_the_gateway(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_without_the_gateway_on_postgres() {
    converges_without_the_gateway(Backend::Postgres).await;
}

/// A customer created on the platform with a CRM's external id becomes
/// readable by that CRM through the connector: crm-sync links it from the
/// customer service's `CustomerChanged` event.
async fn crm_links_follow_customer_events(backend: Backend) {
    let Some(s) = run_suite(backend).await else {
        return;
    };
    let mut customers =
        o2c_proto::customer::v1::customer_service_client::CustomerServiceClient::new(
            super::internal(s.suite.addresses.customer),
        );
    let created = customers
        .create_customer(o2c_proto::customer::v1::CreateCustomerRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            legal_name: "Brennerei Alpen AG".into(),
            country_code: "AT".into(),
            currency_code: "EUR".into(),
            external_ids: vec![o2c_proto::customer::v1::ExternalId {
                system: "salesforce".into(),
                value: "SF-0001".into(),
            }],
            contacts: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    let listed = o2c_testkit::eventually(WAIT, || {
        let mut crm = s.crm.clone();
        async move {
            crm.list_customer_invoices(crm_pb::ListCustomerInvoicesRequest {
                tenant_id: TENANT.into(),
                crm_system: "salesforce".into(),
                external_id: "SF-0001".into(),
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await
    .expect("crm-sync links the record before the deadline");
    assert!(listed.into_inner().invoices.is_empty());
    // The link is to the right customer: an upsert from that CRM finds it.
    let mut crm = s.crm.clone();
    let upserted = crm
        .upsert_customer(crm_pb::UpsertCustomerRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            crm_system: "salesforce".into(),
            external_id: "SF-0001".into(),
            legal_name: "Brennerei Alpen AG".into(),
            country_code: "AT".into(),
            currency_code: "EUR".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upserted.customer_id, created.customer_id);
    assert!(!upserted.created);
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_links_follow_customer_events_on_sqlite() {
    crm_links_follow_customer_events(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_links_follow_customer_events_on_postgres() {
    crm_links_follow_customer_events(Backend::Postgres).await;
}
