//! The doors: backends take calls from services of the deployment only,
//! and each owning service refuses a request for another tenant than the
//! one its caller acts for, whoever forwarded it.

use o2c_kit::auth::CallContext;
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_testkit::Backend;
use tonic::{Code, Request};

use super::{TENANT, onboard, run_suite};

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn backends_refuse_callers_that_bypass_the_gateway(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "1000.00").await;
    let read = || credit_pb::GetExposureRequest {
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
    };
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", s.suite.addresses.credit))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut direct = CreditServiceClient::new(channel);

    // No token: refused before anything is read.
    let refused = direct.get_exposure(read()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A token signed with another secret: refused.
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJvMmMtaW50ZXJuYWwiLCJhdWQiOiJvMmMtaW50ZXJuYWwiLCJzdWIiOiJ4IiwiaWF0IjoxLCJleHAiOjQxMDI0NDQ4MDAsInRlbmFudCI6ImFjbWUtZXUifQ.c2lnbmF0dXJlLW9mLWFub3RoZXIta2V5";
    let refused = direct
        .get_exposure(bearer(read(), forged))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A genuine token acting for another tenant: credit itself refuses
    // the request for this tenant's customer.
    let other = o2c_kit::auth::mint(&CallContext {
        tenant: Some("someone-else".into()),
        ..Default::default()
    })
    .unwrap();
    let refused = direct
        .get_exposure(bearer(read(), &other))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let write = credit_pb::CheckAndReserveRequest {
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: "sneaky".into(),
        amount: super::eur("10.00"),
        client_reference: String::new(),
    };
    let refused = direct
        .check_and_reserve(bearer(write, &other))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A token for no tenant may only deliver events.
    let service = o2c_kit::auth::mint(&CallContext::service()).unwrap();
    let refused = direct
        .get_exposure(bearer(read(), &service))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The same token for its own tenant passes.
    let own = o2c_kit::auth::mint(&CallContext {
        tenant: Some(TENANT.into()),
        ..Default::default()
    })
    .unwrap();
    let exposure = direct
        .get_exposure(bearer(read(), &own))
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap();
    assert_eq!(
        exposure.reserved.unwrap().amount,
        "0.00",
        "nothing was reserved by the refused write"
    );
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_refuse_bypassing_callers_on_sqlite() {
    backends_refuse_callers_that_bypass_the_gateway(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_refuse_bypassing_callers_on_postgres() {
    backends_refuse_callers_that_bypass_the_gateway(Backend::Postgres).await;
}

/// Another tenant tries every read and write of the gateway with this
/// tenant's ids: nothing leaks, nothing changes.
async fn cross_tenant(backend: Backend) {
    use o2c_proto::gateway::v1 as pb;
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let g = &mut s.gateway;
    // Tenant A: a customer with an invoiced, partly paid order, an open
    // order near the limit (an alert), and a held order.
    let customer = onboard(g, "1000.00").await;
    let place = |amount: &str| pb::PlaceOrderRequest {
        idempotency_key: super::key(),
        customer_id: customer.clone(),
        client_reference: String::new(),
        amount: super::eur(amount),
    };
    let order = g
        .place_order(super::as_tenant(place("100.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let invoice = g
        .invoice_order(super::as_tenant(pb::InvoiceOrderRequest {
            idempotency_key: super::key(),
            order_id: order.order_id.clone(),
            net_days: 30,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    let payment = g
        .record_payment(super::as_tenant(pb::RecordPaymentRequest {
            idempotency_key: super::key(),
            customer_id: customer.clone(),
            amount: super::eur("80.00"),
            method: pb::PaymentMethod::BankTransfer as i32,
            reference: "A-1".into(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: super::eur("50.00"),
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    let open = g
        .place_order(super::as_tenant(place("850.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let held = g
        .place_order(super::as_tenant(place("5000.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(held.status(), pb::OrderStatus::Held);
    let profile = |g: &mut super::GatewayServiceClient<tonic::transport::Channel>| {
        let mut g = g.clone();
        let customer = customer.clone();
        async move {
            g.get_credit_profile(super::as_tenant(pb::GetCreditProfileRequest {
                customer_id: customer,
            }))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let before = profile(g).await;
    let hold_id = before.open_holds[0].hold_id.clone();
    let alerts = g
        .list_alerts(super::as_tenant(pb::ListAlertsRequest {
            customer_id: customer.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    let alert_id = alerts[0].alert_id.clone();

    // Tenant B, with every role a tenant can have.
    let intruder = super::jwt_with(serde_json::json!({
        "o2c_tenant": "intruder-b",
        "sub": "mallory",
        "o2c_roles": ["platform_client", "credit_analyst", "crm_connector"],
    }));
    macro_rules! as_b {
        ($message:expr) => {
            super::with_token($message, &intruder)
        };
    }
    macro_rules! refused {
        ($what:literal, $call:expr) => {{
            match $call.await {
                Ok(response) => panic!("{} answered another tenant: {:?}", $what, response),
                Err(status) => assert!(
                    matches!(status.code(), Code::NotFound | Code::PermissionDenied),
                    "{}: {status:?}",
                    $what
                ),
            }
        }};
    }
    macro_rules! empty {
        ($what:literal, $call:expr, $field:ident) => {{
            match $call.await {
                Ok(response) => assert!(
                    response.into_inner().$field.is_empty(),
                    "{} listed another tenant's data",
                    $what
                ),
                Err(status) => assert!(
                    matches!(status.code(), Code::NotFound | Code::PermissionDenied),
                    "{}: {status:?}",
                    $what
                ),
            }
        }};
    }
    let c = customer.clone();
    let k = super::key;
    let eur = super::eur;
    // Reads.
    refused!(
        "GetCustomer",
        g.get_customer(as_b!(pb::GetCustomerRequest {
            customer_id: c.clone()
        }))
    );
    refused!(
        "GetOrder",
        g.get_order(as_b!(pb::GetOrderRequest {
            order_id: order.order_id.clone()
        }))
    );
    refused!(
        "GetInvoice",
        g.get_invoice(as_b!(pb::GetInvoiceRequest {
            invoice_id: invoice.invoice_id.clone()
        }))
    );
    empty!(
        "ListInvoices",
        g.list_invoices(as_b!(pb::ListInvoicesRequest {
            customer_id: c.clone(),
            ..Default::default()
        })),
        invoices
    );
    refused!(
        "GetAging",
        g.get_aging(as_b!(pb::GetAgingRequest {
            customer_id: c.clone()
        }))
    );
    refused!(
        "GetCustomerExposure",
        g.get_customer_exposure(as_b!(pb::GetCustomerExposureRequest {
            customer_id: c.clone()
        }))
    );
    refused!(
        "GetCreditProfile",
        g.get_credit_profile(as_b!(pb::GetCreditProfileRequest {
            customer_id: c.clone()
        }))
    );
    refused!(
        "GetGroupExposure",
        g.get_group_exposure(as_b!(pb::GetGroupExposureRequest {
            customer_id: c.clone()
        }))
    );
    refused!(
        "GetAccountCredit",
        g.get_account_credit(as_b!(pb::GetAccountCreditRequest {
            customer_id: c.clone()
        }))
    );
    empty!(
        "ListPaymentSessions",
        g.list_payment_sessions(as_b!(pb::ListPaymentSessionsRequest {
            customer_id: c.clone(),
            ..Default::default()
        })),
        sessions
    );
    empty!(
        "ListDecisions",
        g.list_decisions(as_b!(pb::ListDecisionsRequest {
            customer_id: c.clone(),
            ..Default::default()
        })),
        decisions
    );
    empty!(
        "ListHolds",
        g.list_holds(as_b!(pb::ListHoldsRequest::default())),
        holds
    );
    empty!(
        "ListHolds of A",
        g.list_holds(as_b!(pb::ListHoldsRequest {
            customer_id: c.clone(),
            ..Default::default()
        })),
        holds
    );
    empty!(
        "ListAlerts",
        g.list_alerts(as_b!(pb::ListAlertsRequest::default())),
        alerts
    );
    empty!(
        "ListLimitChanges",
        g.list_limit_changes(as_b!(pb::ListLimitChangesRequest {
            customer_id: c.clone(),
            ..Default::default()
        })),
        changes
    );
    refused!(
        "ExplainScore",
        g.explain_score(as_b!(pb::ExplainScoreRequest {
            customer_id: c.clone()
        }))
    );
    let reconciled = g
        .reconcile(as_b!(pb::ReconcileRequest {
            customer_id: c.clone()
        }))
        .await;
    if let Ok(report) = reconciled {
        assert!(
            report.into_inner().differences.is_empty(),
            "Reconcile leaked"
        );
    }
    // Writes.
    refused!(
        "LinkCreditAccount",
        g.link_credit_account(as_b!(pb::LinkCreditAccountRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            agency: "dnb".into(),
            agency_reference: "DE99999999".into(),
            parent_customer_id: String::new()
        }))
    );
    refused!(
        "SetCreditLimit",
        g.set_credit_limit(as_b!(pb::SetCreditLimitRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            credit_limit: eur("99999.00"),
            reason: "x".into(),
            ..Default::default()
        }))
    );
    refused!(
        "PlaceOrder",
        g.place_order(as_b!(pb::PlaceOrderRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            client_reference: String::new(),
            amount: eur("1.00")
        }))
    );
    refused!(
        "AmendOrder",
        g.amend_order(as_b!(pb::AmendOrderRequest {
            idempotency_key: k(),
            order_id: open.order_id.clone(),
            amount: eur("1.00")
        }))
    );
    refused!(
        "CancelOrder",
        g.cancel_order(as_b!(pb::CancelOrderRequest {
            idempotency_key: k(),
            order_id: open.order_id.clone(),
            reason: "x".into()
        }))
    );
    refused!(
        "InvoiceOrder",
        g.invoice_order(as_b!(pb::InvoiceOrderRequest {
            idempotency_key: k(),
            order_id: open.order_id.clone(),
            net_days: 30,
            ..Default::default()
        }))
    );
    refused!(
        "RecordPayment",
        g.record_payment(as_b!(pb::RecordPaymentRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            amount: eur("10.00"),
            method: pb::PaymentMethod::BankTransfer as i32,
            reference: String::new(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("10.00")
            }]
        }))
    );
    refused!(
        "ApplyUnappliedCash",
        g.apply_unapplied_cash(as_b!(pb::ApplyUnappliedCashRequest {
            idempotency_key: k(),
            payment_id: payment.payment_id.clone(),
            allocations: vec![pb::PaymentAllocation {
                invoice_id: invoice.invoice_id.clone(),
                amount: eur("10.00")
            }]
        }))
    );
    refused!(
        "RefundPayment",
        g.refund_payment(as_b!(pb::RefundPaymentRequest {
            idempotency_key: k(),
            payment_id: payment.payment_id.clone(),
            amount: eur("10.00"),
            reason: "x".into()
        }))
    );
    refused!(
        "IssueInvoice",
        g.issue_invoice(as_b!(pb::IssueInvoiceRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            lines: vec![o2c_proto::invoicing::v1::InvoiceLine {
                description: "x".into(),
                quantity: "1".into(),
                unit_price: eur("1.00"),
                tax_rate_percent: "0".into(),
                line_total: None
            }],
            payment_terms: None,
            draft: false
        }))
    );
    refused!(
        "FinalizeInvoice",
        g.finalize_invoice(as_b!(pb::FinalizeInvoiceRequest {
            idempotency_key: k(),
            invoice_id: invoice.invoice_id.clone()
        }))
    );
    refused!(
        "CancelInvoice",
        g.cancel_invoice(as_b!(pb::CancelInvoiceRequest {
            idempotency_key: k(),
            invoice_id: invoice.invoice_id.clone(),
            reason: "x".into()
        }))
    );
    refused!(
        "WriteOffInvoice",
        g.write_off_invoice(as_b!(pb::WriteOffInvoiceRequest {
            idempotency_key: k(),
            invoice_id: invoice.invoice_id.clone(),
            reason: "x".into()
        }))
    );
    refused!(
        "IssueCreditNote",
        g.issue_credit_note(as_b!(pb::IssueCreditNoteRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            invoice_id: invoice.invoice_id.clone(),
            amount: eur("10.00"),
            reason: "x".into()
        }))
    );
    refused!(
        "PayOutAccountCredit",
        g.pay_out_account_credit(as_b!(pb::PayOutAccountCreditRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            amount: eur("1.00"),
            reason: "x".into()
        }))
    );
    refused!(
        "CreateMandate",
        g.create_mandate(as_b!(pb::CreateMandateRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            method: pb::PaymentMethod::DirectDebit as i32,
            processor_token: "tok_mallory".into(),
            last4: "4242".into()
        }))
    );
    refused!(
        "SetAccountControls",
        g.set_account_controls(as_b!(pb::SetAccountControlsRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            blocked: true,
            max_order_value: None,
            reason: "x".into()
        }))
    );
    refused!(
        "ReleaseHold",
        g.release_hold(as_b!(pb::ReleaseHoldRequest {
            idempotency_key: k(),
            hold_id: hold_id.clone(),
            reason: "x".into(),
            raise_limit_to: None
        }))
    );
    refused!(
        "RejectHold",
        g.reject_hold(as_b!(pb::RejectHoldRequest {
            idempotency_key: k(),
            hold_id: hold_id.clone(),
            reason: "x".into()
        }))
    );
    refused!(
        "AcknowledgeAlert",
        g.acknowledge_alert(as_b!(pb::AcknowledgeAlertRequest {
            idempotency_key: k(),
            alert_id: alert_id.clone()
        }))
    );
    refused!(
        "UpdateRiskFacts",
        g.update_risk_facts(as_b!(pb::UpdateRiskFactsRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            relationship_since: "2020-01-01".into(),
            annual_volume: eur("1.00"),
            disputes: 9,
            write_offs: 9,
            broken_promises: 9
        }))
    );
    refused!(
        "ScoreCustomer",
        g.score_customer(as_b!(pb::ScoreCustomerRequest {
            idempotency_key: k(),
            customer_id: c.clone(),
            apply_limit: true
        }))
    );

    // Nothing of A's changed.
    let after = profile(g).await;
    assert_eq!(after, before, "tenant A's credit profile is untouched");
    let unchanged = g
        .get_invoice(super::as_tenant(pb::GetInvoiceRequest {
            invoice_id: invoice.invoice_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(unchanged, invoice_after_payment(&payment));
    for (id, status) in [
        (&order.order_id, pb::OrderStatus::Invoiced),
        (&open.order_id, pb::OrderStatus::Approved),
        (&held.order_id, pb::OrderStatus::Held),
    ] {
        let current = g
            .get_order(super::as_tenant(pb::GetOrderRequest {
                order_id: id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        assert_eq!(current.status(), status, "order {id}");
    }
    let alerts_after = g
        .list_alerts(super::as_tenant(pb::ListAlertsRequest {
            customer_id: customer.clone(),
            unacknowledged_only: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert!(
        alerts_after.iter().any(|a| a.alert_id == alert_id),
        "alert still open"
    );
    super::assert_reconciled(g, &customer).await;
    s.suite.stop().await.unwrap();
}

/// The invoice as the payment left it (for the unchanged check).
fn invoice_after_payment(
    payment: &o2c_proto::gateway::v1::RecordPaymentResponse,
) -> o2c_proto::gateway::v1::Invoice {
    payment.invoices[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_and_changes_nothing_on_sqlite() {
    cross_tenant(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_and_changes_nothing_on_postgres() {
    cross_tenant(Backend::Postgres).await;
}

/// One HTTP/1.1 exchange with the gateway, as a browser makes it.
async fn http1(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response");
    let headers = String::from_utf8_lossy(&response[..split]).to_lowercase();
    (headers, response[split + 4..].to_vec())
}

/// A gRPC-Web call (application/grpc-web+proto) of `method` with `message`.
async fn grpc_web(
    addr: std::net::SocketAddr,
    method: &str,
    message: &impl prost::Message,
    authorization: Option<&str>,
) -> (String, String) {
    let payload = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut head = format!(
        "POST /o2c.gateway.v1.GatewayService/{method} HTTP/1.1\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
         Origin: {}",
        super::CONSOLE_ORIGIN
    );
    if let Some(value) = authorization {
        head.push_str(&format!("\r\nAuthorization: {value}"));
    }
    let (headers, body) = http1(addr, &head, &frame).await;
    (headers, String::from_utf8_lossy(&body).into_owned())
}

fn grpc_status(headers: &str, body: &str) -> Option<u32> {
    [headers, &body.to_lowercase()].iter().find_map(|text| {
        let at = text.find("grpc-status:")? + "grpc-status:".len();
        text[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// The console's browser reaches the gateway over gRPC-Web with the same
/// credentials and tenancy; CORS admits only the configured origin.
async fn browsers_speak_grpc_web(backend: Backend) {
    use o2c_proto::gateway::v1 as pb;
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "1000.00").await;
    let addr = s.suite.addresses.gateway;
    let get = pb::GetCustomerRequest {
        customer_id: customer.clone(),
    };
    let token = format!("Bearer {}", super::jwt_with(serde_json::json!({})));
    let (headers, body) = grpc_web(addr, "GetCustomer", &get, Some(&token)).await;
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("content-type: application/grpc-web"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!(
            "access-control-allow-origin: {}",
            super::CONSOLE_ORIGIN
        )),
        "{headers}"
    );
    assert!(body.contains(&customer), "the customer came back: {body:?}");
    assert_eq!(grpc_status(&headers, &body), Some(0));

    // No credential: UNAUTHENTICATED (16); another tenant: NOT_FOUND (5).
    let (headers, body) = grpc_web(addr, "GetCustomer", &get, None).await;
    assert_eq!(grpc_status(&headers, &body), Some(16), "{headers} {body}");
    let other = format!(
        "Bearer {}",
        super::jwt_with(serde_json::json!({ "o2c_tenant": "someone-else" }))
    );
    let (headers, body) = grpc_web(addr, "GetCustomer", &get, Some(&other)).await;
    assert_eq!(grpc_status(&headers, &body), Some(5), "{headers} {body}");
    assert!(!body.contains(&customer));

    // CORS preflight: the console's origin is allowed, another is not.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /o2c.gateway.v1.GatewayService/GetCustomer HTTP/1.1\r\n\
             Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization,content-type,x-grpc-web"
        )
    };
    let (headers, _) = http1(addr, &preflight(super::CONSOLE_ORIGIN), b"").await;
    assert!(
        headers.contains(&format!(
            "access-control-allow-origin: {}",
            super::CONSOLE_ORIGIN
        )),
        "{headers}"
    );
    assert!(headers.contains("authorization"), "{headers}");
    let (headers, _) = http1(addr, &preflight("https://evil.example"), b"").await;
    assert!(
        !headers.contains("access-control-allow-origin"),
        "{headers}"
    );
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_speak_grpc_web_on_sqlite() {
    browsers_speak_grpc_web(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_speak_grpc_web_on_postgres() {
    browsers_speak_grpc_web(Backend::Postgres).await;
}
