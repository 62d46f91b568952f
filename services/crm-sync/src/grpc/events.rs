//! The connector's event consumer: applies the events of credit,
//! invoicing and payments to its own projections, each exactly once and in
//! the order delivered.

use std::collections::HashMap;

use o2c_kit::ApiError;
use o2c_proto::events::v1 as pb;
use sea_orm::DatabaseTransaction;
use tracing::Instrument;

use o2c_proto::crm_sync::v1 as crm_pb;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_proto::payments::v1 as payments_pb;
use prost::Message;

use crate::storage::{self, Activity, CreditStatus};

fn malformed(event: &pb::Event) -> ApiError {
    ApiError::Internal(format!("event {} has no body", event.event_id))
}

fn invoice_record(invoice: &invoicing_pb::Invoice) -> crm_pb::InvoiceRecord {
    let status = invoice.status().as_str_name();
    crm_pb::InvoiceRecord {
        invoice_id: invoice.invoice_id.clone(),
        order_id: invoice.order_id.clone(),
        total: invoice.total.clone(),
        open: invoice.amount_open.clone(),
        status: status
            .strip_prefix("INVOICE_STATUS_")
            .unwrap_or(status)
            .to_owned(),
        issue_date: invoice.issue_date.clone(),
        due_date: invoice.due_date.clone(),
    }
}

fn payment_record(payment: &payments_pb::Payment) -> Result<crm_pb::PaymentRecord, ApiError> {
    let method = payment.method().as_str_name();
    let currency = payment
        .amount
        .as_ref()
        .map(|m| m.currency_code.clone())
        .unwrap_or_default();
    let mut refunded = o2c_money::Money::zero(
        o2c_money::Currency::from_code(&currency)
            .map_err(|e| ApiError::Internal(format!("payment {}: {e}", payment.payment_id)))?,
    );
    for refund in &payment.refunds {
        let amount = o2c_kit::proto_money::parse("refund", refund.amount.as_ref())?;
        refunded = refunded
            .checked_add(&amount)
            .map_err(|e| ApiError::Internal(format!("payment {}: {e}", payment.payment_id)))?;
    }
    Ok(crm_pb::PaymentRecord {
        payment_id: payment.payment_id.clone(),
        amount: payment.amount.clone(),
        unapplied: payment.unapplied.clone(),
        method: method
            .strip_prefix("PAYMENT_METHOD_")
            .unwrap_or(method)
            .to_owned(),
        received_at: payment.received_at.clone(),
        applied: payment
            .allocations
            .iter()
            .map(|a| crm_pb::AppliedAmount {
                invoice_id: a.invoice_id.clone(),
                amount: a.amount.clone(),
            })
            .collect(),
        refunded: Some(o2c_kit::proto_money::to_proto(&refunded)),
    })
}

/// The credit status an `ExposureChanged` event reports.
fn credit_status(
    event: &pb::Event,
    changed: &pb::ExposureChanged,
    now: chrono::DateTime<chrono::Utc>,
) -> CreditStatus {
    let amount = |m: &Option<o2c_proto::common::v1::Money>| {
        m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
    };
    CreditStatus {
        tenant_id: event.tenant_id.clone(),
        customer_id: changed.customer_id.clone(),
        currency_code: changed
            .credit_limit
            .as_ref()
            .map(|m| m.currency_code.clone())
            .unwrap_or_default(),
        credit_limit: amount(&changed.credit_limit),
        reserved: amount(&changed.reserved),
        receivables: amount(&changed.receivables),
        available: amount(&changed.available),
        version: changed.version,
        updated_at: now,
    }
}

/// The connector's [`o2c_kit::outbox::Consumer`].
#[derive(Clone, Default)]
pub struct EventsApi;

#[tonic::async_trait]
impl o2c_kit::outbox::Consumer for EventsApi {
    const NAME: &'static str = "crm-sync";

    type Applied = ();

    /// Credit statuses are versioned, so only the newest of each customer
    /// in a delivery matters: they are stored in one statement, and every
    /// other event is applied in order.
    async fn apply_all(
        &self,
        txn: &DatabaseTransaction,
        events: &[&pb::Event],
    ) -> Result<Vec<()>, ApiError> {
        let now = chrono::Utc::now();
        let mut newest: HashMap<(&str, &str), CreditStatus> = HashMap::new();
        for event in events {
            let span = o2c_kit::outbox::consumer_span(event, Self::NAME);
            match &event.body {
                Some(pb::event::Body::ExposureChanged(changed)) => {
                    let status = credit_status(event, changed, now);
                    let key = (event.tenant_id.as_str(), changed.customer_id.as_str());
                    if newest
                        .get(&key)
                        .is_none_or(|seen| seen.version < status.version)
                    {
                        newest.insert(key, status);
                    }
                }
                _ => self.apply(txn, event).instrument(span).await?,
            }
        }
        storage::upsert_credit_statuses(txn, newest.into_values().collect()).await?;
        Ok(vec![(); events.len()])
    }

    async fn apply(&self, txn: &DatabaseTransaction, event: &pb::Event) -> Result<(), ApiError> {
        let now = chrono::Utc::now();
        match &event.body {
            Some(pb::event::Body::ExposureChanged(changed)) => {
                storage::upsert_credit_statuses(txn, vec![credit_status(event, changed, now)])
                    .await?;
            }
            Some(pb::event::Body::InvoiceChanged(changed)) => {
                let Some(invoice) = &changed.invoice else {
                    return Err(malformed(event));
                };
                storage::upsert_activity(
                    txn,
                    Activity::Invoice,
                    &event.tenant_id,
                    &invoice.invoice_id,
                    &invoice.customer_id,
                    invoice_record(invoice).encode_to_vec(),
                    now,
                )
                .await?;
            }
            Some(pb::event::Body::PaymentChanged(changed)) => {
                let Some(payment) = &changed.payment else {
                    return Err(malformed(event));
                };
                storage::upsert_activity(
                    txn,
                    Activity::Payment,
                    &event.tenant_id,
                    &payment.payment_id,
                    &payment.customer_id,
                    payment_record(payment)?.encode_to_vec(),
                    now,
                )
                .await?;
            }
            Some(pb::event::Body::CustomerChanged(changed)) => {
                let Some(customer) = &changed.customer else {
                    return Err(malformed(event));
                };
                let Ok(customer_id) = customer.customer_id.parse() else {
                    return Err(ApiError::Internal(format!(
                        "customer event {} names an invalid customer",
                        event.event_id
                    )));
                };
                // Each CRM external id the platform knows links the CRM's
                // record to the customer, as an upsert from that CRM would.
                for external in &customer.external_ids {
                    storage::save_link(
                        txn,
                        &event.tenant_id,
                        &external.system,
                        &external.value,
                        customer_id,
                    )
                    .await?;
                }
            }
            // Events this consumer does not use are acknowledged.
            _ => {}
        }
        Ok(())
    }
}
