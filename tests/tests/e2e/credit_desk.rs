//! The credit analysts' desk through the gateway: holds, alerts (live and
//! listed), limit approvals, controls, amendments, cancellation, scoring
//! and groups.

use std::time::Duration;

use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::gateway::v1 as pb;
use o2c_testkit::Backend;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

use super::{
    amount, as_tenant, as_user, assert_ledger_consistent, eur, exposure, key, onboard, run_suite,
};

async fn desk(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let mut alerts = s
        .gateway
        .stream_alerts(as_tenant(pb::StreamAlertsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let g = &mut s.gateway;
    let customer = onboard(g, "1000.00").await;
    let place = |value: &str| pb::PlaceOrderRequest {
        idempotency_key: key(),
        customer_id: customer.clone(),
        client_reference: String::new(),
        amount: eur(value),
    };
    let first = g
        .place_order(as_tenant(place("900.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let held = g
        .place_order(as_tenant(place("300.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(held.status(), pb::OrderStatus::Held);

    // Operators see it live: the 80 % crossing and the new hold.
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), alerts.next())
            .await
            .expect("a live alert before the deadline")
            .unwrap()
            .unwrap();
        kinds.push(next.alert.unwrap().kind());
    }
    assert_eq!(
        kinds,
        [
            credit_pb::AlertKind::ExposureThreshold,
            credit_pb::AlertKind::HoldCreated
        ]
    );

    let profile = g
        .get_credit_profile(as_tenant(pb::GetCreditProfileRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.open_holds.len(), 1);
    let hold = profile.open_holds[0].clone();
    assert_eq!(hold.order_id, held.order_id);

    // Analyst operations name the user: no credential, no call.
    let anonymous = Request::new(pb::ReleaseHoldRequest {
        idempotency_key: key(),
        hold_id: hold.hold_id.clone(),
        reason: "x".into(),
        raise_limit_to: None,
    });
    let anonymous = g.release_hold(anonymous).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let released = g
        .release_hold(as_user(
            pb::ReleaseHoldRequest {
                idempotency_key: key(),
                hold_id: hold.hold_id.clone(),
                reason: "good payer, raise".into(),
                raise_limit_to: eur("1300.00"),
            },
            "analyst-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.order.unwrap().status(), pb::OrderStatus::Approved);
    let order = g
        .get_order(as_tenant(pb::GetOrderRequest {
            order_id: held.order_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);

    // Amend down and cancel: the reservation follows.
    let amended = g
        .amend_order(as_tenant(pb::AmendOrderRequest {
            idempotency_key: key(),
            order_id: first.order_id.clone(),
            amount: eur("500.00"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&amended.order.unwrap().amount), "500.00");
    let too_far = g
        .amend_order(as_tenant(pb::AmendOrderRequest {
            idempotency_key: key(),
            order_id: first.order_id.clone(),
            amount: eur("1100.00"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        too_far.decision.unwrap().decision(),
        credit_pb::Decision::Hold
    );
    assert_eq!(amount(&too_far.order.unwrap().amount), "500.00");
    let cancelled = g
        .cancel_order(as_tenant(pb::CancelOrderRequest {
            idempotency_key: key(),
            order_id: first.order_id.clone(),
            reason: "customer changed mind".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(cancelled.status(), pb::OrderStatus::Cancelled);
    assert_eq!(amount(&exposure(g, &customer).await.reserved), "300.00");

    // A raise above authority waits for a second user.
    let pending = g
        .set_credit_limit(as_user(
            pb::SetCreditLimitRequest {
                idempotency_key: key(),
                customer_id: customer.clone(),
                credit_limit: eur("200000.00"),
                reason: "expansion".into(),
                ..Default::default()
            },
            "analyst-1",
        ))
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(
        pending.status(),
        credit_pb::LimitChangeStatus::PendingApproval
    );
    let decide = |user: &str| {
        as_user(
            pb::DecideLimitChangeRequest {
                idempotency_key: key(),
                limit_change_id: pending.limit_change_id.clone(),
                approve: true,
                reason: "ok".into(),
            },
            user,
        )
    };
    assert_eq!(
        g.decide_limit_change(decide("analyst-1"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let applied = g
        .decide_limit_change(decide("head-of-credit"))
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap();
    assert_eq!(applied.status(), credit_pb::LimitChangeStatus::Applied);
    let audit = g
        .list_limit_changes(as_tenant(pb::ListLimitChangesRequest {
            customer_id: customer.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(
        audit.len(),
        3,
        "onboarding, the raise to release the hold, the approved raise"
    );

    // A blocked account blocks new orders.
    g.set_account_controls(as_user(
        pb::SetAccountControlsRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            blocked: true,
            max_order_value: None,
            reason: "fraud check".into(),
        },
        "analyst-1",
    ))
    .await
    .unwrap();
    let blocked = g
        .place_order(as_tenant(place("10.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(blocked.status(), pb::OrderStatus::Blocked);
    assert_eq!(blocked.reasons, ["ACCOUNT_BLOCKED"]);
    let decisions = g
        .list_decisions(as_tenant(pb::ListDecisionsRequest {
            order_id: blocked.order_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].decision(), credit_pb::Decision::Block);

    // Scoring from facts, explained factor by factor.
    let score = g
        .update_risk_facts(as_tenant(pb::UpdateRiskFactsRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            relationship_since: "2015-01-01".into(),
            annual_volume: eur("120000.00"),
            disputes: 0,
            write_offs: 1,
            broken_promises: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    let explained = g
        .explain_score(as_tenant(pb::ExplainScoreRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!(explained.score, score.score);
    assert!(
        explained
            .factors
            .iter()
            .any(|f| f.name == "write_offs" && f.points == -15)
    );

    // A group: a subsidiary under this customer.
    let subsidiary = g
        .create_customer(as_tenant(pb::CreateCustomerRequest {
            idempotency_key: key(),
            legal_name: "Subsidiary GmbH".into(),
            country_code: "DE".into(),
            currency_code: "EUR".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    g.link_credit_account(as_tenant(pb::LinkCreditAccountRequest {
        idempotency_key: key(),
        customer_id: subsidiary.customer_id.clone(),
        agency: "dnb".into(),
        agency_reference: "SUB-000123".into(),
        parent_customer_id: customer.clone(),
    }))
    .await
    .unwrap();
    let group = g
        .get_group_exposure(as_tenant(pb::GetGroupExposureRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    assert_eq!(group.members.len(), 2);
    assert!(group.consistent);

    let listed = g
        .list_alerts(as_tenant(pb::ListAlertsRequest {
            customer_id: customer.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert!(
        listed
            .iter()
            .any(|a| a.kind() == credit_pb::AlertKind::LimitChangePending)
    );
    let acked = g
        .acknowledge_alert(as_user(
            pb::AcknowledgeAlertRequest {
                idempotency_key: key(),
                alert_id: listed[0].alert_id.clone(),
            },
            "analyst-1",
        ))
        .await
        .unwrap()
        .into_inner()
        .alert
        .unwrap();
    assert_eq!(acked.acknowledged_by, "analyst-1");
    assert_ledger_consistent(&mut s.credit, &customer).await;
    super::assert_reconciled(&mut s.gateway, &customer).await;
    s.suite.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_desk_on_sqlite() {
    desk(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_desk_on_postgres_with_redis() {
    desk(Backend::Postgres).await;
}
