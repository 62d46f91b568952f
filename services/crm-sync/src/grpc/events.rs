//! The connector's event consumer: applies credit's events to its own
//! projection, each event exactly once and in the order delivered.

use o2c_kit::ApiError;
use o2c_proto::events::v1 as pb;
use o2c_proto::events::v1::events_service_server::EventsService;
use sea_orm::{DatabaseConnection, TransactionTrait};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::storage::{self, CreditStatus};

/// Serves `o2c.events.v1.EventsService` for the connector.
#[derive(Clone)]
pub struct EventsApi {
    db: DatabaseConnection,
}

impl EventsApi {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    async fn apply(&self, event: &pb::Event) -> Result<(), ApiError> {
        let now = chrono::Utc::now();
        let txn = self.db.begin().await?;
        if !o2c_kit::outbox::first_delivery(&txn, &event.event_id, now).await? {
            // A redelivery: its effect is already committed.
            return Ok(());
        }
        match &event.body {
            Some(pb::event::Body::ExposureChanged(changed)) => {
                let amount = |m: &Option<o2c_proto::common::v1::Money>| {
                    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
                };
                let currency = changed
                    .credit_limit
                    .as_ref()
                    .map(|m| m.currency_code.clone())
                    .unwrap_or_default();
                storage::upsert_credit_status(
                    &txn,
                    CreditStatus {
                        tenant_id: event.tenant_id.clone(),
                        customer_id: changed.customer_id.clone(),
                        currency_code: currency,
                        credit_limit: amount(&changed.credit_limit),
                        reserved: amount(&changed.reserved),
                        receivables: amount(&changed.receivables),
                        available: amount(&changed.available),
                        version: changed.version,
                        updated_at: now,
                    },
                )
                .await?;
            }
            // Events this consumer does not use are acknowledged.
            None => {}
        }
        txn.commit().await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl EventsService for EventsApi {
    async fn deliver(
        &self,
        request: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverResponse>, Status> {
        for event in &request.get_ref().events {
            self.apply(event)
                .instrument(o2c_kit::outbox::consumer_span(event))
                .await?;
        }
        Ok(Response::new(pb::DeliverResponse {}))
    }
}
