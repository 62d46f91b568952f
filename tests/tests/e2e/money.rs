//! The money side through the gateway: early-payment discounts, cash
//! application oldest due first, unapplied cash and refunds, credit notes,
//! write-offs, cancellation, aging — with credit exposure following every
//! path.

use o2c_proto::gateway::v1 as pb;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_testkit::Backend;
use tonic::{Code, Request};

use super::{amount, as_tenant, assert_ledger_consistent, eur, exposure, key, onboard, run_suite};

type Gateway =
    o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient<tonic::transport::Channel>;

/// Places and invoices an order of `value`; returns the invoice.
async fn sold(
    g: &mut Gateway,
    customer: &str,
    value: &str,
    terms: Option<invoicing_pb::PaymentTerms>,
) -> pb::Invoice {
    let order = g
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.into(),
            client_reference: String::new(),
            amount: eur(value),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);
    g.invoice_order(as_tenant(pb::InvoiceOrderRequest {
        idempotency_key: key(),
        order_id: order.order_id,
        net_days: 30,
        payment_terms: terms,
    }))
    .await
    .unwrap()
    .into_inner()
    .invoice
    .unwrap()
}

fn pay(
    customer: &str,
    value: &str,
    allocations: Vec<(&str, &str)>,
) -> Request<pb::RecordPaymentRequest> {
    as_tenant(pb::RecordPaymentRequest {
        idempotency_key: key(),
        customer_id: customer.into(),
        amount: eur(value),
        method: pb::PaymentMethod::BankTransfer as i32,
        reference: "remittance".into(),
        allocations: allocations
            .into_iter()
            .map(|(invoice, value)| pb::PaymentAllocation {
                invoice_id: invoice.into(),
                amount: eur(value),
            })
            .collect(),
    })
}

async fn money(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let g = &mut s.gateway;
    let customer = onboard(g, "10000.00").await;

    // 2/10 net 30: 980.00 within ten days settles 1,000.00, in credit too.
    let two_ten = Some(invoicing_pb::PaymentTerms {
        kind: invoicing_pb::PaymentTermsKind::Net as i32,
        net_days: 30,
        discount_percent: "2".into(),
        discount_days: 10,
    });
    let discounted = sold(g, &customer, "1000.00", two_ten).await;
    assert_eq!(amount(&discounted.discount_amount), "20.00");
    let paid = g
        .record_payment(pay(
            &customer,
            "980.00",
            vec![(&discounted.invoice_id, "980.00")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&paid.discount_taken), "20.00");
    assert_eq!(paid.invoices[0].status(), pb::InvoiceStatus::Paid);
    assert_eq!(amount(&paid.exposure.unwrap().receivables), "0.00");

    // Not instructed: oldest due first; the rest stays as unapplied cash.
    let older = sold(g, &customer, "300.00", None).await;
    let newer = sold(g, &customer, "500.00", None).await;
    let auto = g
        .record_payment(pay(&customer, "900.00", vec![]))
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<_> = auto
        .invoices
        .iter()
        .map(|i| (i.invoice_id.clone(), i.status()))
        .collect();
    assert_eq!(
        statuses,
        [
            (older.invoice_id.clone(), pb::InvoiceStatus::Paid),
            (newer.invoice_id.clone(), pb::InvoiceStatus::Paid)
        ]
    );
    assert_eq!(amount(&auto.unapplied), "100.00", "an overpayment is kept");
    assert_eq!(amount(&auto.exposure.clone().unwrap().receivables), "0.00");

    // Part of it is refunded (audited, analyst named), the rest applied later.
    let refund = as_tenant(pb::RefundPaymentRequest {
        idempotency_key: key(),
        payment_id: auto.payment_id.clone(),
        amount: eur("40.00"),
        reason: "customer asked".into(),
    });
    let refunded = g.refund_payment(refund).await.unwrap().into_inner();
    assert_eq!(amount(&refunded.unapplied), "60.00");
    assert_eq!(refunded.refund.unwrap().actor, "analyst-1");
    let later = sold(g, &customer, "250.00", None).await;
    let applied = g
        .apply_unapplied_cash(as_tenant(pb::ApplyUnappliedCashRequest {
            idempotency_key: key(),
            payment_id: auto.payment_id.clone(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: later.invoice_id.clone(),
                amount: eur("60.00"),
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&applied.unapplied), "0.00");
    assert_eq!(amount(&applied.invoices[0].amount_open), "190.00");
    let too_much = g
        .apply_unapplied_cash(as_tenant(pb::ApplyUnappliedCashRequest {
            idempotency_key: key(),
            payment_id: auto.payment_id.clone(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: discounted.invoice_id.clone(),
                amount: eur("1.00"),
            }],
        }))
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::FailedPrecondition);

    // A credit note lowers the receivable; the excess is account credit.
    let noted = g
        .issue_credit_note(as_tenant(pb::IssueCreditNoteRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            invoice_id: later.invoice_id.clone(),
            amount: eur("200.00"),
            reason: "damaged".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let note = noted.credit_note.unwrap();
    assert_eq!(amount(&note.applied_to_invoice), "190.00");
    assert_eq!(amount(&note.account_credit), "10.00");
    assert_eq!(amount(&noted.exposure.unwrap().receivables), "0.00");
    // Account credit can be paid out, within the limit and never below zero.
    let payout = as_tenant(pb::PayOutAccountCreditRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        amount: eur("6.00"),
        reason: "customer asked".into(),
    });
    let paid_out = g.pay_out_account_credit(payout).await.unwrap().into_inner();
    assert_eq!(amount(&paid_out.balance), "4.00");
    let overdraw = as_tenant(pb::PayOutAccountCreditRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        amount: eur("4.01"),
        reason: "too much".into(),
    });
    assert_eq!(
        g.pay_out_account_credit(overdraw).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let balances = g
        .get_account_credit(as_tenant(pb::GetAccountCreditRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!(
        balances
            .iter()
            .map(|b| b.amount.as_str())
            .collect::<Vec<_>>(),
        ["4.00"]
    );

    // A write-off and a cancellation lower it too.
    let doubtful = sold(g, &customer, "700.00", None).await;
    g.record_payment(pay(
        &customer,
        "100.00",
        vec![(&doubtful.invoice_id, "100.00")],
    ))
    .await
    .unwrap();
    let written = g
        .write_off_invoice(as_tenant(pb::WriteOffInvoiceRequest {
            idempotency_key: key(),
            invoice_id: doubtful.invoice_id.clone(),
            reason: "insolvency".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&written.written_off), "600.00");
    let mistake = sold(g, &customer, "80.00", None).await;
    let cancelled = g
        .cancel_invoice(as_tenant(pb::CancelInvoiceRequest {
            idempotency_key: key(),
            invoice_id: mistake.invoice_id.clone(),
            reason: "wrong customer".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.invoice.unwrap().status(),
        pb::InvoiceStatus::Cancelled
    );
    assert_eq!(amount(&exposure(g, &customer).await.receivables), "0.00");

    // Aging and lists.
    let open_one = sold(g, &customer, "45.00", None).await;
    let aging = g
        .get_aging(as_tenant(pb::GetAgingRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .aging
        .unwrap();
    let current = &aging.currencies[0].buckets[0];
    assert_eq!(
        (current.bucket.as_str(), amount(&current.amount)),
        ("current", "45.00")
    );
    let listed = g
        .list_invoices(as_tenant(pb::ListInvoicesRequest {
            customer_id: customer.clone(),
            open_only: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .invoices;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].invoice_id, open_one.invoice_id);

    // A standalone invoice is exposure too; a draft only once finalized.
    let fee = |value: &str| invoicing_pb::InvoiceLine {
        description: "service fee".into(),
        quantity: "1".into(),
        unit_price: eur(value),
        tax_rate_percent: "19".into(),
        line_total: None,
    };
    let net14 = Some(invoicing_pb::PaymentTerms {
        kind: invoicing_pb::PaymentTermsKind::Net as i32,
        net_days: 14,
        ..Default::default()
    });
    let standalone = g
        .issue_invoice(as_tenant(pb::IssueInvoiceRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            lines: vec![fee("100.00")],
            payment_terms: net14.clone(),
            draft: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&standalone.invoice.unwrap().total), "119.00");
    assert_eq!(amount(&standalone.exposure.unwrap().receivables), "164.00");
    let draft = g
        .issue_invoice(as_tenant(pb::IssueInvoiceRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            lines: vec![fee("10.00")],
            payment_terms: net14,
            draft: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        amount(&draft.exposure.unwrap().receivables),
        "164.00",
        "a draft owes nothing"
    );
    let finalized = g
        .finalize_invoice(as_tenant(pb::FinalizeInvoiceRequest {
            idempotency_key: key(),
            invoice_id: draft.invoice.unwrap().invoice_id,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(finalized.invoice.unwrap().status(), pb::InvoiceStatus::Open);
    assert_eq!(amount(&finalized.exposure.unwrap().receivables), "175.90");

    // A mandate: the next invoice (due on receipt) is collected by itself.
    let mandate = g
        .create_mandate(as_tenant(pb::CreateMandateRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            method: pb::PaymentMethod::DirectDebit as i32,
            processor_token: "tok_sepa_acme".into(),
            last4: "4321".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    assert_eq!(mandate.last4, "4321");
    let order = g
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: String::new(),
            amount: eur("55.00"),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let invoiced = g
        .invoice_order(as_tenant(pb::InvoiceOrderRequest {
            idempotency_key: key(),
            order_id: order.order_id,
            net_days: 0,
            payment_terms: None,
        }))
        .await
        .unwrap()
        .into_inner();
    let session = invoiced.collection.expect("a collection is scheduled");
    let collected = o2c_testkit::eventually(std::time::Duration::from_secs(20), || {
        let mut g = g.clone();
        let customer = customer.clone();
        let id = session.session_id.clone();
        async move {
            let sessions = g
                .list_payment_sessions(as_tenant(pb::ListPaymentSessionsRequest {
                    customer_id: customer,
                    ..Default::default()
                }))
                .await
                .ok()?
                .into_inner()
                .sessions;
            sessions.into_iter().find(|s| {
                s.session_id == id && s.state() == o2c_proto::payments::v1::SessionState::Succeeded
            })
        }
    })
    .await
    .expect("the collection succeeds before the deadline");
    assert_eq!(collected.attempts.len(), 1);
    let paid = g
        .get_invoice(as_tenant(pb::GetInvoiceRequest {
            invoice_id: invoiced.invoice.unwrap().invoice_id,
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(paid.status(), pb::InvoiceStatus::Paid);
    assert_ledger_consistent(&mut s.credit, &customer).await;
    super::assert_reconciled(&mut s.gateway, &customer).await;
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_on_sqlite() {
    money(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_on_postgres_with_redis() {
    money(Backend::Postgres).await;
}
