//! The public gRPC API: the order-to-cash workflow over the internal
//! services. The only module of the gateway that knows prost types.
//!
//! # Idempotency across services
//! A multi-step call first claims its key in the gateway's database with
//! the request it carries, then calls each service with a key derived from
//! the client's (`<key>#<step>`). Every step is idempotent downstream, so a
//! retry of an interrupted call redoes the same steps and gets the same
//! results; the final response is stored and replayed afterwards.

mod convert;

use o2c_kit::client::TracedChannel;
use o2c_kit::error::from_upstream;
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Claim};
use o2c_kit::{ApiError, proto_money};
use o2c_money::Money;
use o2c_money::ids::{CustomerId, InvoiceId, OrderId};
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::customer::v1 as customer_pb;
use o2c_proto::customer::v1::customer_service_client::CustomerServiceClient;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_server::GatewayService;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient;
use o2c_proto::payments::v1 as payments_pb;
use o2c_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use prost::Message;
use sea_orm::DatabaseConnection;
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Response, Status};

use crate::domain;
use crate::storage;

/// Metadata key naming the caller's tenant.
pub const TENANT_METADATA_KEY: &str = "x-tenant-id";
/// Most allocations one payment may carry.
pub const MAX_ALLOCATIONS: usize = 100;

/// Clients of the internal services.
#[derive(Clone)]
pub struct Upstream {
    pub customer: CustomerServiceClient<TracedChannel>,
    pub credit: CreditServiceClient<TracedChannel>,
    pub invoicing: InvoicingServiceClient<TracedChannel>,
    pub payments: PaymentsServiceClient<TracedChannel>,
}

/// Serves `o2c.gateway.v1.GatewayService`.
#[derive(Clone)]
pub struct GatewayApi {
    db: DatabaseConnection,
    up: Upstream,
}

impl GatewayApi {
    pub fn new(db: DatabaseConnection, up: Upstream) -> Self {
        Self { db, up }
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

/// The tenant named in the call's metadata.
fn tenant<T>(request: &Request<T>) -> Result<String, Status> {
    let value = request
        .metadata()
        .get(TENANT_METADATA_KEY)
        .ok_or_else(|| Status::unauthenticated(format!("missing {TENANT_METADATA_KEY} metadata")))?
        .to_str()
        .map_err(|_| Status::unauthenticated(format!("{TENANT_METADATA_KEY} is not text")))?;
    fields::tenant_id(TENANT_METADATA_KEY, value).map_err(|_| {
        Status::unauthenticated(format!(
            "{TENANT_METADATA_KEY} must be 1 to {} letters, digits, '_' or '-'",
            fields::MAX_TENANT_ID_LENGTH
        ))
    })
}

fn client_key(key: &str) -> Result<(), ApiError> {
    idempotency::validate_key(key)?;
    if key.len() > domain::MAX_CLIENT_KEY_LENGTH {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!("at most {} characters", domain::MAX_CLIENT_KEY_LENGTH),
        ));
    }
    Ok(())
}

fn derived(key: &str, step: &str) -> String {
    format!("{key}#{step}")
}

fn upstream(service: &'static str) -> impl Fn(Status) -> ApiError {
    move |status| from_upstream(service, status)
}

/// A required sub-message of an upstream response.
fn present<T>(value: Option<T>, what: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::Internal(format!("upstream response without {what}")))
}

impl GatewayApi {
    async fn customer(
        &self,
        tenant: &str,
        id: CustomerId,
    ) -> Result<customer_pb::Customer, ApiError> {
        let response = self
            .up
            .customer
            .clone()
            .get_customer(customer_pb::GetCustomerRequest {
                tenant_id: tenant.to_owned(),
                customer_id: id.to_string(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => ApiError::not_found("customer", id),
                _ => from_upstream("customer", status),
            })?;
        present(response.into_inner().customer, "customer")
    }

    async fn invoice(
        &self,
        tenant: &str,
        id: InvoiceId,
    ) -> Result<invoicing_pb::Invoice, ApiError> {
        let response = self
            .up
            .invoicing
            .clone()
            .get_invoice(invoicing_pb::GetInvoiceRequest {
                tenant_id: tenant.to_owned(),
                invoice_id: id.to_string(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => ApiError::not_found("invoice", id),
                _ => from_upstream("invoicing", status),
            })?;
        present(response.into_inner().invoice, "invoice")
    }

    async fn claim<R: Message + Default>(
        &self,
        scope: &str,
        key: &str,
        request: &[u8],
    ) -> Result<Claim<R>, ApiError> {
        idempotency::claim(&self.db, scope, key, request).await
    }

    /// Finishes a claimed call: stores the response, or releases a fresh
    /// claim when the request was refused before any effect.
    async fn finish<R: Message>(
        &self,
        scope: &str,
        key: &str,
        result: Result<R, Failure>,
    ) -> Result<R, Status> {
        match result {
            Ok(response) => {
                idempotency::complete(&self.db, scope, key, &response).await?;
                Ok(response)
            }
            Err(Failure::Refused(error)) => {
                idempotency::release(&self.db, scope, key).await?;
                Err(error.into())
            }
            Err(Failure::Interrupted(error)) => Err(error.into()),
        }
    }
}

/// How a claimed call failed.
enum Failure {
    /// Refused before any effect: the key may be reused for a corrected
    /// request.
    Refused(ApiError),
    /// Stopped after effects began: a retry with the same request resumes.
    Interrupted(ApiError),
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure::Interrupted(error)
    }
}

fn refused(error: ApiError) -> Failure {
    Failure::Refused(error)
}

#[tonic::async_trait]
impl GatewayService for GatewayApi {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::CreateCustomerResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let created = self
            .up
            .customer
            .clone()
            .create_customer(customer_pb::CreateCustomerRequest {
                idempotency_key: derived(&request.idempotency_key, "create"),
                tenant_id: tenant,
                legal_name: request.legal_name,
                country_code: request.country_code,
                currency_code: request.currency_code,
                external_ids: Vec::new(),
                contacts: Vec::new(),
            })
            .await
            .map_err(upstream("customer"))?;
        let customer = present(created.into_inner().customer, "customer")?;
        Ok(Response::new(pb::CreateCustomerResponse {
            customer: Some(convert::customer(customer)),
        }))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<CustomerId>("customer_id", &request.get_ref().customer_id)?;
        let customer = self.customer(&tenant, id).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(convert::customer(customer)),
        }))
    }

    async fn link_credit_account(
        &self,
        request: Request<pb::LinkCreditAccountRequest>,
    ) -> Result<Response<pb::LinkCreditAccountResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let customer_id = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.check(fields::slug("agency", &request.agency));
        v.check(fields::text(
            "agency_reference",
            &request.agency_reference,
            64,
        ));
        v.finish()?;
        let Some(customer_id) = customer_id else {
            return Err(missing().into());
        };
        // The claim pins the request without keeping the reference in clear.
        let mut pinned = request.clone();
        pinned.agency_reference = hex::encode(Sha256::digest(
            format!("{tenant}\0{}", request.agency_reference).as_bytes(),
        ));
        let scope = format!("{tenant}/gateway.LinkCreditAccount");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &pinned.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let customer = self.customer(&tenant, customer_id).await.map_err(refused)?;
            let opened = self
                .up
                .credit
                .clone()
                .open_credit_account(credit_pb::OpenCreditAccountRequest {
                    idempotency_key: derived(key, "open"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    currency_code: customer.currency_code.clone(),
                })
                .await
                .map_err(upstream("credit"))?;
            let account = present(opened.into_inner().credit_account, "credit account")?;
            let linked = self
                .up
                .customer
                .clone()
                .link_credit_account(customer_pb::LinkCreditAccountRequest {
                    idempotency_key: derived(key, "link"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    credit_account_id: account.credit_account_id,
                    agency: request.agency.clone(),
                    agency_reference: request.agency_reference.clone(),
                })
                .await
                .map_err(|status| {
                    // A bad reference is the request's fault; opening the
                    // account is harmless to redo with a corrected one.
                    let error = from_upstream("customer", status);
                    match error {
                        ApiError::InvalidArgument(_) => Failure::Refused(error),
                        other => Failure::Interrupted(other),
                    }
                })?;
            let customer = present(linked.into_inner().customer, "customer")?;
            Ok(pb::LinkCreditAccountResponse {
                customer: Some(convert::customer(customer)),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn set_credit_limit(
        &self,
        request: Request<pb::SetCreditLimitRequest>,
    ) -> Result<Response<pb::SetCreditLimitResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let customer_id = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.finish()?;
        let Some(customer_id) = customer_id else {
            return Err(missing().into());
        };
        let updated = self
            .up
            .credit
            .clone()
            .set_credit_limit(credit_pb::SetCreditLimitRequest {
                idempotency_key: derived(&request.idempotency_key, "limit"),
                tenant_id: tenant,
                customer_id: customer_id.to_string(),
                credit_limit: request.credit_limit,
                reason: request.reason,
            })
            .await
            .map_err(upstream("credit"))?;
        let account = present(updated.into_inner().credit_account, "credit account")?;
        Ok(Response::new(pb::SetCreditLimitResponse {
            exposure: account.exposure.map(convert::exposure),
        }))
    }

    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let customer_id = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        let reference = v.check(fields::optional_text(
            "client_reference",
            &request.client_reference,
            domain::MAX_CLIENT_REFERENCE_LENGTH,
        ));
        v.finish()?;
        let (Some(customer_id), Some(amount), Some(reference)) = (customer_id, amount, reference)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/gateway.PlaceOrder");
        let key = &request.idempotency_key;
        let claim = self.claim(&scope, key, &request.encode_to_vec()).await?;
        let fresh = match claim {
            Claim::Done(response) => return Ok(Response::new(response)),
            Claim::Fresh => true,
            Claim::Resumed => false,
        };
        let result = async {
            if fresh {
                let customer = self.customer(&tenant, customer_id).await.map_err(refused)?;
                if customer.currency_code != amount.currency().code() {
                    return Err(refused(ApiError::invalid(
                        "amount.currency_code",
                        format!("must be the customer's currency {}", customer.currency_code),
                    )));
                }
            }
            let order =
                storage::order_for_key(&self.db, &tenant, key, customer_id, &reference, amount)
                    .await?;
            let checked = self
                .up
                .credit
                .clone()
                .check_and_reserve(credit_pb::CheckAndReserveRequest {
                    idempotency_key: derived(key, "reserve"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    order_id: order.id.to_string(),
                    amount: Some(proto_money::to_proto(&amount)),
                })
                .await
                .map_err(upstream("credit"))?;
            let decision = present(checked.into_inner().decision, "decision")?;
            let (status, reasons) = convert::decision(&decision)?;
            let reservation =
                (!decision.reservation_id.is_empty()).then_some(decision.reservation_id.as_str());
            let order = storage::record_decision(
                &self.db,
                &tenant,
                order.id,
                status,
                &reasons,
                reservation,
            )
            .await?;
            tracing::info!(order = %order.id, status = status.code(), ?reasons, "order placed");
            Ok(pb::PlaceOrderResponse {
                order: Some(convert::order(&order)),
                exposure: decision.exposure.map(convert::exposure),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<OrderId>("order_id", &request.get_ref().order_id)?;
        let order = storage::get(&self.db, &tenant, id).await?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(convert::order(&order)),
        }))
    }

    async fn invoice_order(
        &self,
        request: Request<pb::InvoiceOrderRequest>,
    ) -> Result<Response<pb::InvoiceOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let order_id = v.check(fields::id::<OrderId>("order_id", &request.order_id));
        if !(0..=domain::MAX_NET_DAYS).contains(&request.net_days) {
            v.check::<()>(Err(ApiError::invalid(
                "net_days",
                format!("0 to {}", domain::MAX_NET_DAYS),
            )));
        }
        v.finish()?;
        let Some(order_id) = order_id else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/gateway.InvoiceOrder");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &request.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let order = storage::get(&self.db, &tenant, order_id)
                .await
                .map_err(refused)?;
            if !order.status.can_invoice() {
                return Err(refused(ApiError::FailedPrecondition(format!(
                    "order {} is {}; only approved orders can be invoiced",
                    order.id,
                    order.status.code()
                ))));
            }
            let reservation_id = order.reservation_id.clone().ok_or_else(|| {
                ApiError::Internal(format!("approved order {} has no reservation", order.id))
            })?;
            let terms = if request.net_days == 0 {
                invoicing_pb::PaymentTerms {
                    kind: invoicing_pb::PaymentTermsKind::DueOnReceipt as i32,
                    net_days: 0,
                }
            } else {
                invoicing_pb::PaymentTerms {
                    kind: invoicing_pb::PaymentTermsKind::Net as i32,
                    net_days: request.net_days,
                }
            };
            let description = if order.client_reference.is_empty() {
                format!("Order {}", order.id)
            } else {
                format!("Order {}", order.client_reference)
            };
            let issued = self
                .up
                .invoicing
                .clone()
                .issue_invoice(invoicing_pb::IssueInvoiceRequest {
                    idempotency_key: derived(key, "invoice"),
                    tenant_id: tenant.clone(),
                    customer_id: order.customer_id.to_string(),
                    order_id: order.id.to_string(),
                    currency_code: order.amount.currency().code().to_owned(),
                    lines: vec![invoicing_pb::InvoiceLine {
                        description,
                        quantity: "1".into(),
                        unit_price: Some(proto_money::to_proto(&order.amount)),
                        tax_rate_percent: "0".into(),
                        line_total: None,
                    }],
                    payment_terms: Some(terms),
                    issue_date: String::new(),
                })
                .await
                .map_err(upstream("invoicing"))?;
            let invoice = present(issued.into_inner().invoice, "invoice")?;
            self.up
                .credit
                .clone()
                .convert_reservation(credit_pb::ConvertReservationRequest {
                    idempotency_key: derived(key, "convert"),
                    tenant_id: tenant.clone(),
                    reservation_id,
                    invoice_id: invoice.invoice_id.clone(),
                    invoice_amount: invoice.total.clone(),
                })
                .await
                .map_err(upstream("credit"))?;
            let order =
                storage::record_invoice(&self.db, &tenant, order.id, &invoice.invoice_id).await?;
            Ok(pb::InvoiceOrderResponse {
                order: Some(convert::order(&order)),
                invoice: Some(convert::invoice(invoice)),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn get_invoice(
        &self,
        request: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::GetInvoiceResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<InvoiceId>("invoice_id", &request.get_ref().invoice_id)?;
        let invoice = self.invoice(&tenant, id).await?;
        Ok(Response::new(pb::GetInvoiceResponse {
            invoice: Some(convert::invoice(invoice)),
        }))
    }

    async fn record_payment(
        &self,
        request: Request<pb::RecordPaymentRequest>,
    ) -> Result<Response<pb::RecordPaymentResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let customer_id = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        if !matches!(
            pb::PaymentMethod::try_from(request.method),
            Ok(pb::PaymentMethod::BankTransfer
                | pb::PaymentMethod::Card
                | pb::PaymentMethod::DirectDebit)
        ) {
            v.check::<()>(Err(ApiError::invalid(
                "method",
                "BANK_TRANSFER, CARD or DIRECT_DEBIT",
            )));
        }
        if request.allocations.len() > MAX_ALLOCATIONS {
            v.check::<()>(Err(ApiError::invalid(
                "allocations",
                format!("at most {MAX_ALLOCATIONS}"),
            )));
        }
        let mut allocations: Vec<(InvoiceId, Money)> = Vec::new();
        for (index, allocation) in request.allocations.iter().enumerate() {
            let invoice = v.check(fields::id::<InvoiceId>(
                &format!("allocations[{index}].invoice_id"),
                &allocation.invoice_id,
            ));
            let value = v.check(proto_money::parse_positive(
                &format!("allocations[{index}].amount"),
                allocation.amount.as_ref(),
            ));
            if let (Some(invoice), Some(value)) = (invoice, value) {
                if allocations.iter().any(|(id, _)| *id == invoice) {
                    v.check::<()>(Err(ApiError::invalid(
                        format!("allocations[{index}].invoice_id"),
                        "each invoice at most once",
                    )));
                }
                allocations.push((invoice, value));
            }
        }
        v.finish()?;
        let (Some(customer_id), Some(amount)) = (customer_id, amount) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/gateway.RecordPayment");
        let key = &request.idempotency_key;
        let claim = self.claim(&scope, key, &request.encode_to_vec()).await?;
        let fresh = match claim {
            Claim::Done(response) => return Ok(Response::new(response)),
            Claim::Fresh => true,
            Claim::Resumed => false,
        };
        let result = async {
            if fresh {
                self.customer(&tenant, customer_id).await.map_err(refused)?;
                for (index, (invoice_id, value)) in allocations.iter().enumerate() {
                    let field = format!("allocations[{index}]");
                    let invoice = self.invoice(&tenant, *invoice_id).await.map_err(|e| match e {
                        ApiError::NotFound(m) => refused(ApiError::NotFound(format!("{field}.invoice_id: {m}"))),
                        other => refused(other),
                    })?;
                    if invoice.customer_id != customer_id.to_string() {
                        return Err(refused(ApiError::NotFound(format!(
                            "{field}.invoice_id: invoice {invoice_id} not found for customer {customer_id}"
                        ))));
                    }
                    let open = proto_money::parse(&format!("{field}.amount"), invoice.amount_open.as_ref())
                        .map_err(|e| ApiError::Internal(format!("invoice open amount: {e}")))?;
                    if open.currency() != value.currency() {
                        return Err(refused(ApiError::invalid(
                            format!("{field}.amount.currency_code"),
                            format!("must be the invoice currency {}", open.currency()),
                        )));
                    }
                    if value.minor_units() > open.minor_units() {
                        return Err(refused(ApiError::FailedPrecondition(format!(
                            "{field}: {value} exceeds the open amount {open} of invoice {invoice_id}"
                        ))));
                    }
                }
            }
            let recorded = self
                .up
                .payments
                .clone()
                .record_payment(payments_pb::RecordPaymentRequest {
                    idempotency_key: derived(key, "payment"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    amount: Some(proto_money::to_proto(&amount)),
                    method: request.method,
                    reference: request.reference.clone(),
                    allocations: allocations
                        .iter()
                        .map(|(invoice, value)| payments_pb::Allocation {
                            invoice_id: invoice.to_string(),
                            amount: Some(proto_money::to_proto(value)),
                        })
                        .collect(),
                })
                .await
                .map_err(|status| {
                    let error = from_upstream("payments", status);
                    match error {
                        ApiError::InvalidArgument(_) if fresh => Failure::Refused(error),
                        other => Failure::Interrupted(other),
                    }
                })?;
            let payment = present(recorded.into_inner().payment, "payment")?;
            let mut invoices = Vec::new();
            for (invoice_id, value) in &allocations {
                let applied = self
                    .up
                    .invoicing
                    .clone()
                    .apply_payment(invoicing_pb::ApplyPaymentRequest {
                        idempotency_key: derived(key, &format!("apply:{invoice_id}")),
                        tenant_id: tenant.clone(),
                        invoice_id: invoice_id.to_string(),
                        payment_id: payment.payment_id.clone(),
                        amount: Some(proto_money::to_proto(value)),
                    })
                    .await
                    .map_err(upstream("invoicing"))?;
                self.up
                    .credit
                    .clone()
                    .settle_receivable(credit_pb::SettleReceivableRequest {
                        idempotency_key: derived(key, &format!("settle:{invoice_id}")),
                        tenant_id: tenant.clone(),
                        invoice_id: invoice_id.to_string(),
                        amount: Some(proto_money::to_proto(value)),
                    })
                    .await
                    .map_err(upstream("credit"))?;
                invoices.push(convert::invoice(present(applied.into_inner().invoice, "invoice")?));
            }
            let exposure = self
                .up
                .credit
                .clone()
                .get_exposure(credit_pb::GetExposureRequest {
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                })
                .await;
            // A customer without a credit account has no exposure to show.
            let exposure = match exposure {
                Ok(response) => response.into_inner().exposure.map(convert::exposure),
                Err(status) if status.code() == Code::NotFound => None,
                Err(status) => return Err(from_upstream("credit", status).into()),
            };
            Ok(pb::RecordPaymentResponse {
                payment_id: payment.payment_id,
                invoices,
                unapplied: payment.unapplied,
                exposure,
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn get_customer_exposure(
        &self,
        request: Request<pb::GetCustomerExposureRequest>,
    ) -> Result<Response<pb::GetCustomerExposureResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<CustomerId>("customer_id", &request.get_ref().customer_id)?;
        let response = self
            .up
            .credit
            .clone()
            .get_exposure(credit_pb::GetExposureRequest {
                tenant_id: tenant,
                customer_id: id.to_string(),
            })
            .await
            .map_err(upstream("credit"))?;
        Ok(Response::new(pb::GetCustomerExposureResponse {
            exposure: response.into_inner().exposure.map(convert::exposure),
        }))
    }
}
