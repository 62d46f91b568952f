//! The gRPC face of the CRM connector: the only module that knows prost
//! types. Customer master data is owned by the customer service; the
//! connector calls it and keeps only its own links and interactions.

pub mod events;

use o2c_kit::ApiError;
use o2c_kit::client::TracedChannel;
use o2c_kit::error::from_upstream;
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_money::ids::{CustomerId, InteractionId};
use o2c_proto::crm_sync::v1 as pb;
use o2c_proto::crm_sync::v1::crm_sync_service_server::CrmSyncService;
use o2c_proto::customer::v1 as customer_pb;
use o2c_proto::customer::v1::customer_service_client::CustomerServiceClient;
use prost::Message;
use sea_orm::DatabaseConnection;
use tonic::{Code, Request, Response, Status};

use crate::domain::{self, InteractionKind};
use crate::storage::{self, Interaction};

/// Serves `o2c.crm_sync.v1.CrmSyncService`.
#[derive(Clone)]
pub struct CrmSyncApi {
    db: DatabaseConnection,
    customers: CustomerServiceClient<TracedChannel>,
}

impl CrmSyncApi {
    pub fn new(db: DatabaseConnection, customers: CustomerServiceClient<TracedChannel>) -> Self {
        Self { db, customers }
    }
}

impl CrmSyncApi {
    /// A page of a CRM record's invoices or payments, newest first.
    async fn activity<R: Message + Default>(
        &self,
        kind: storage::Activity,
        tenant: &str,
        system: &str,
        external: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<R>, String), ApiError> {
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", tenant));
        let system = v.check(fields::slug("crm_system", system));
        let external = v.check(fields::text("external_id", external, 200));
        let size = v.check(domain::page_size(page_size).ok_or_else(|| {
            ApiError::invalid("page_size", format!("0 to {}", domain::MAX_PAGE_SIZE))
        }));
        let before = if page_token.is_empty() {
            Some(None)
        } else {
            v.check(
                uuid::Uuid::parse_str(page_token)
                    .map(|_| Some(page_token))
                    .map_err(|_| ApiError::invalid("page_token", "not a token this API issued")),
            )
        };
        v.finish()?;
        let (Some(tenant), Some(system), Some(external), Some(size), Some(before)) =
            (tenant, system, external, size, before)
        else {
            return Err(missing());
        };
        let customer = storage::find_link(&self.db, &tenant, &system, &external)
            .await?
            .ok_or_else(|| ApiError::not_found("CRM record", format!("{system}:{external}")))?;
        let rows = storage::list_activity(&self.db, kind, &tenant, customer, before, size).await?;
        let next = if rows.len() as u64 == size {
            rows.last().map(|(id, _)| id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let records = rows
            .iter()
            .map(|(id, bytes)| {
                R::decode(bytes.as_slice())
                    .map_err(|e| ApiError::Internal(format!("stored record {id}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, next))
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

fn kind_from_proto(kind: i32) -> Result<InteractionKind, ApiError> {
    match pb::InteractionKind::try_from(kind) {
        Ok(pb::InteractionKind::Call) => Ok(InteractionKind::Call),
        Ok(pb::InteractionKind::Email) => Ok(InteractionKind::Email),
        Ok(pb::InteractionKind::Dispute) => Ok(InteractionKind::Dispute),
        Ok(pb::InteractionKind::PromiseToPay) => Ok(InteractionKind::PromiseToPay),
        _ => Err(ApiError::invalid(
            "kind",
            "CALL, EMAIL, DISPUTE or PROMISE_TO_PAY",
        )),
    }
}

fn kind_to_proto(kind: InteractionKind) -> pb::InteractionKind {
    match kind {
        InteractionKind::Call => pb::InteractionKind::Call,
        InteractionKind::Email => pb::InteractionKind::Email,
        InteractionKind::Dispute => pb::InteractionKind::Dispute,
        InteractionKind::PromiseToPay => pb::InteractionKind::PromiseToPay,
    }
}

fn to_proto(interaction: &Interaction) -> pb::Interaction {
    pb::Interaction {
        interaction_id: interaction.id.to_string(),
        customer_id: interaction.customer_id.to_string(),
        crm_system: interaction.crm_system.clone(),
        kind: kind_to_proto(interaction.kind) as i32,
        summary: interaction.summary.clone(),
        occurred_at: interaction
            .occurred_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

impl CrmSyncApi {
    async fn find_by_external_id(
        &self,
        tenant: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<CustomerId>, ApiError> {
        let found = self
            .customers
            .clone()
            .find_customer_by_external_id(customer_pb::FindCustomerByExternalIdRequest {
                tenant_id: tenant.to_owned(),
                external_id: Some(customer_pb::ExternalId {
                    system: system.to_owned(),
                    value: external_id.to_owned(),
                }),
            })
            .await;
        match found {
            Ok(response) => {
                let customer = response.into_inner().customer.ok_or_else(|| {
                    ApiError::Internal("customer service sent no customer".into())
                })?;
                fields::id("customer_id", &customer.customer_id)
                    .map(Some)
                    .map_err(|_| ApiError::Internal("customer service sent an invalid id".into()))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(from_upstream("customer", status)),
        }
    }
}

#[tonic::async_trait]
impl CrmSyncService for CrmSyncApi {
    async fn upsert_customer(
        &self,
        request: Request<pb::UpsertCustomerRequest>,
    ) -> Result<Response<pb::UpsertCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let system = v.check(fields::slug("crm_system", &request.crm_system));
        let external = v.check(fields::text("external_id", &request.external_id, 200));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(system), Some(external)) = (tenant, system, external) else {
            return Err(missing().into());
        };
        if let Some(customer) = storage::find_link(&self.db, &tenant, &system, &external).await? {
            return Ok(Response::new(pb::UpsertCustomerResponse {
                customer_id: customer.to_string(),
                created: false,
            }));
        }
        if let Some(customer) = self
            .find_by_external_id(&tenant, &system, &external)
            .await?
        {
            storage::save_link(&self.db, &tenant, &system, &external, customer).await?;
            return Ok(Response::new(pb::UpsertCustomerResponse {
                customer_id: customer.to_string(),
                created: false,
            }));
        }
        // The customer service validates the master data and names the
        // offending field; its idempotency key is derived from ours.
        let created = self
            .customers
            .clone()
            .create_customer(customer_pb::CreateCustomerRequest {
                idempotency_key: format!("crm-sync:{}", request.idempotency_key),
                tenant_id: tenant.clone(),
                legal_name: request.legal_name.clone(),
                country_code: request.country_code.clone(),
                currency_code: request.currency_code.clone(),
                external_ids: vec![customer_pb::ExternalId {
                    system: system.clone(),
                    value: external.clone(),
                }],
                contacts: Vec::new(),
            })
            .await;
        let (customer, was_created) = match created {
            Ok(response) => {
                let customer = response.into_inner().customer.ok_or_else(|| {
                    ApiError::Internal("customer service sent no customer".into())
                })?;
                let id: CustomerId =
                    fields::id("customer_id", &customer.customer_id).map_err(|_| {
                        ApiError::Internal("customer service sent an invalid id".into())
                    })?;
                (id, true)
            }
            // A concurrent push created it first.
            Err(status) if status.code() == Code::AlreadyExists => {
                match self
                    .find_by_external_id(&tenant, &system, &external)
                    .await?
                {
                    Some(id) => (id, false),
                    None => return Err(from_upstream("customer", status).into()),
                }
            }
            Err(status) => return Err(from_upstream("customer", status).into()),
        };
        storage::save_link(&self.db, &tenant, &system, &external, customer).await?;
        Ok(Response::new(pb::UpsertCustomerResponse {
            customer_id: customer.to_string(),
            created: was_created,
        }))
    }

    async fn record_interaction(
        &self,
        request: Request<pb::RecordInteractionRequest>,
    ) -> Result<Response<pb::RecordInteractionResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let system = v.check(fields::slug("crm_system", &request.crm_system));
        let kind = v.check(kind_from_proto(request.kind));
        let summary = v.check(fields::text(
            "summary",
            &request.summary,
            domain::MAX_SUMMARY_LENGTH,
        ));
        let occurred_at = if request.occurred_at.is_empty() {
            Some(chrono::Utc::now())
        } else {
            v.check(
                chrono::DateTime::parse_from_rfc3339(&request.occurred_at)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .map_err(|_| ApiError::invalid("occurred_at", "an RFC 3339 timestamp")),
            )
        };
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (
            Some(tenant),
            Some(customer),
            Some(system),
            Some(kind),
            Some(summary),
            Some(occurred_at),
        ) = (tenant, customer, system, kind, summary, occurred_at)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/crm_sync.RecordInteraction");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        // The customer must exist (and belong to the tenant).
        self.customers
            .clone()
            .get_customer(customer_pb::GetCustomerRequest {
                tenant_id: tenant.clone(),
                customer_id: customer.to_string(),
            })
            .await
            .map_err(|status| from_upstream("customer", status))?;
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let interaction = Interaction {
            id: InteractionId::new(),
            customer_id: customer,
            crm_system: system,
            kind,
            summary,
            occurred_at,
        };
        storage::insert_interaction(&txn, &tenant, &interaction).await?;
        let response = pb::RecordInteractionResponse {
            interaction: Some(to_proto(&interaction)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn list_interactions(
        &self,
        request: Request<pb::ListInteractionsRequest>,
    ) -> Result<Response<pb::ListInteractionsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let page_size = v.check(domain::page_size(request.page_size).ok_or_else(|| {
            ApiError::invalid("page_size", format!("0 to {}", domain::MAX_PAGE_SIZE))
        }));
        let before = if request.page_token.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<InteractionId>("page_token", &request.page_token).map(Some))
        };
        v.finish()?;
        let (Some(tenant), Some(customer), Some(page_size), Some(before)) =
            (tenant, customer, page_size, before)
        else {
            return Err(missing().into());
        };
        let page =
            storage::list_interactions(&self.db, &tenant, customer, before, page_size).await?;
        let next_page_token = if page.len() as u64 == page_size {
            page.last().map(|i| i.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListInteractionsResponse {
            interactions: page.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn list_customer_invoices(
        &self,
        request: Request<pb::ListCustomerInvoicesRequest>,
    ) -> Result<Response<pb::ListCustomerInvoicesResponse>, Status> {
        let r = request.into_inner();
        let (records, next_page_token) = self
            .activity(
                storage::Activity::Invoice,
                &r.tenant_id,
                &r.crm_system,
                &r.external_id,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListCustomerInvoicesResponse {
            invoices: records,
            next_page_token,
        }))
    }

    async fn list_customer_payments(
        &self,
        request: Request<pb::ListCustomerPaymentsRequest>,
    ) -> Result<Response<pb::ListCustomerPaymentsResponse>, Status> {
        let r = request.into_inner();
        let (records, next_page_token) = self
            .activity(
                storage::Activity::Payment,
                &r.tenant_id,
                &r.crm_system,
                &r.external_id,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListCustomerPaymentsResponse {
            payments: records,
            next_page_token,
        }))
    }

    async fn get_credit_status(
        &self,
        request: Request<pb::GetCreditStatusRequest>,
    ) -> Result<Response<pb::GetCreditStatusResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let system = v.check(fields::slug("crm_system", &request.crm_system));
        let external = v.check(fields::text("external_id", &request.external_id, 200));
        v.finish()?;
        let (Some(tenant), Some(system), Some(external)) = (tenant, system, external) else {
            return Err(missing().into());
        };
        let customer = storage::find_link(&self.db, &tenant, &system, &external)
            .await?
            .ok_or_else(|| ApiError::not_found("CRM record", format!("{system}:{external}")))?;
        let status = storage::credit_status(&self.db, &tenant, customer)
            .await?
            .ok_or_else(|| ApiError::not_found("credit status of customer", customer))?;
        let money = |amount: &str| o2c_proto::common::v1::Money {
            amount: amount.to_owned(),
            currency_code: status.currency_code.clone(),
        };
        Ok(Response::new(pb::GetCreditStatusResponse {
            status: Some(pb::CreditStatus {
                customer_id: status.customer_id.clone(),
                credit_limit: Some(money(&status.credit_limit)),
                reserved: Some(money(&status.reserved)),
                receivables: Some(money(&status.receivables)),
                available: Some(money(&status.available)),
                version: status.version,
                updated_at: status
                    .updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            }),
        }))
    }
}
