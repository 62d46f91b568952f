//! `o2c.crm_sync.v1.CrmSyncService` on the gateway: the door for CRMs
//! (role CRM_CONNECTOR). Each call is passed to the connector with the
//! tenant of the CRM's credential, whatever `tenant_id` the request names:
//! a CRM cannot reach another tenant's records.

use o2c_kit::client::TracedChannel;
use o2c_kit::error::from_upstream;
use o2c_proto::crm_sync::v1 as pb;
use o2c_proto::crm_sync::v1::crm_sync_service_client::CrmSyncServiceClient;
use o2c_proto::crm_sync::v1::crm_sync_service_server::CrmSyncService;
use tonic::{Request, Response, Status};

pub struct CrmDoor {
    crm: CrmSyncServiceClient<TracedChannel>,
}

impl CrmDoor {
    pub fn new(crm: CrmSyncServiceClient<TracedChannel>) -> Self {
        Self { crm }
    }
}

fn tenant() -> Result<String, Status> {
    o2c_kit::auth::current()
        .and_then(|context| context.tenant)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

fn passed<T>(result: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    result.map_err(|status| Status::from(from_upstream("crm-sync", status)))
}

#[tonic::async_trait]
impl CrmSyncService for CrmDoor {
    async fn upsert_customer(
        &self,
        request: Request<pb::UpsertCustomerRequest>,
    ) -> Result<Response<pb::UpsertCustomerResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().upsert_customer(request).await)
    }

    async fn record_interaction(
        &self,
        request: Request<pb::RecordInteractionRequest>,
    ) -> Result<Response<pb::RecordInteractionResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().record_interaction(request).await)
    }

    async fn list_interactions(
        &self,
        request: Request<pb::ListInteractionsRequest>,
    ) -> Result<Response<pb::ListInteractionsResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().list_interactions(request).await)
    }

    async fn get_credit_status(
        &self,
        request: Request<pb::GetCreditStatusRequest>,
    ) -> Result<Response<pb::GetCreditStatusResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().get_credit_status(request).await)
    }

    async fn list_customer_invoices(
        &self,
        request: Request<pb::ListCustomerInvoicesRequest>,
    ) -> Result<Response<pb::ListCustomerInvoicesResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().list_customer_invoices(request).await)
    }

    async fn list_customer_payments(
        &self,
        request: Request<pb::ListCustomerPaymentsRequest>,
    ) -> Result<Response<pb::ListCustomerPaymentsResponse>, Status> {
        let mut request = request.into_inner();
        request.tenant_id = tenant()?;
        passed(self.crm.clone().list_customer_payments(request).await)
    }
}
