//! The public gRPC API: the order-to-cash workflow over the internal
//! services. The only module of the gateway that knows prost types.
//!
//! # Idempotency across services
//! A multi-step call first claims its key in the gateway's database with
//! the request it carries, then calls each service with a key derived from
//! the client's (`<key>#<step>`). Every step is idempotent downstream, so a
//! retry of an interrupted call redoes the same steps and gets the same
//! results; the final response is stored and replayed afterwards.

pub mod admin;
pub mod checks;
mod convert;
pub mod crm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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
use tonic::{Code, Request, Response, Status};

use crate::domain::{self, OrderStatus};
use crate::storage;
use crate::storage::journal::Journal;

/// Most allocations one payment may carry.
pub const MAX_ALLOCATIONS: usize = 100;

/// Clients of the internal services.
#[derive(Clone)]
pub struct Upstream {
    pub customer: CustomerServiceClient<TracedChannel>,
    pub credit: CreditServiceClient<TracedChannel>,
    /// The credit service without a per-call deadline, for live streams.
    pub alerts: CreditServiceClient<TracedChannel>,
    pub invoicing: InvoicingServiceClient<TracedChannel>,
    pub payments: PaymentsServiceClient<TracedChannel>,
}

/// Serves `o2c.gateway.v1.GatewayService`.
#[derive(Clone)]
pub struct GatewayApi {
    db: DatabaseConnection,
    up: Upstream,
    /// Writes placed orders behind the PlaceOrder calls.
    journal: Journal,
    /// PlaceOrder's credit checks, those of concurrent orders sent together.
    checks: checks::GatewayChecks,
    /// Each customer's currency, which never changes (nor does a customer
    /// go away): an order needs the customer service once per customer.
    currencies: Arc<Mutex<HashMap<(String, CustomerId), String>>>,
}

/// Customers whose currency the gateway remembers; past that it forgets
/// them all and starts again.
const MAX_REMEMBERED_CUSTOMERS: usize = 100_000;
/// Credit decisions read per page when rebuilding an order.
const DECISION_PAGE_SIZE: i32 = 100;
/// Pages of decisions read at most when rebuilding an order.
const MAX_DECISION_PAGES: usize = 10;

/// The order a credit check placed, as its decision records it.
fn placed_order(decision: &credit_pb::CreditDecision) -> Result<storage::Order, ApiError> {
    let (status, reasons) = convert::decision(decision)?;
    let malformed = |what: &str| ApiError::Internal(format!("credit decision with invalid {what}"));
    let id = decision
        .order_id
        .parse::<OrderId>()
        .map_err(|_| malformed("order_id"))?;
    let customer_id = decision
        .customer_id
        .parse::<CustomerId>()
        .map_err(|_| malformed("customer_id"))?;
    let amount = proto_money::parse_positive("amount", decision.amount.as_ref())
        .map_err(|_| malformed("amount"))?;
    let created_at = chrono::DateTime::parse_from_rfc3339(&decision.decided_at)
        .map_err(|_| malformed("decided_at"))?
        .with_timezone(&chrono::Utc);
    let set = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    Ok(storage::Order {
        id,
        customer_id,
        client_reference: decision.client_reference.clone(),
        amount,
        status,
        reasons,
        reservation_id: set(&decision.reservation_id),
        hold_id: set(&decision.hold_id),
        invoice_id: None,
        created_at,
    })
}

impl GatewayApi {
    /// The API on `db`, writing placed orders behind through `journal` (a
    /// pool with asynchronous commits, on PostgreSQL), with at most
    /// `checks_in_flight` credit checks in flight per caller context
    /// ([`checks`]).
    pub fn new(
        db: DatabaseConnection,
        journal: DatabaseConnection,
        up: Upstream,
        checks_in_flight: usize,
    ) -> Self {
        Self {
            journal: Journal::start(journal),
            checks: checks::CreditChecks::new(up.credit.clone(), checks_in_flight),
            db,
            up,
            currencies: Arc::default(),
        }
    }
}

impl GatewayApi {
    /// PlaceOrder's credit checks: how they went to credit so far, and
    /// how many wait now.
    pub fn credit_checks(&self) -> checks::GatewayChecks {
        self.checks.clone()
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

/// The tenant of the authenticated caller (see [`crate::auth`]).
fn tenant<T>(_request: &Request<T>) -> Result<String, Status> {
    o2c_kit::auth::current()
        .and_then(|context| context.tenant)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The user behind the call (a JWT's subject or `key:<id>`), kept in the
/// credit audit.
fn user<T>(_request: &Request<T>) -> Result<String, Status> {
    o2c_kit::auth::current()
        .and_then(|context| context.user)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
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
    /// The tenant's order `id`: from the gateway's rows once its journal
    /// wrote it, else rebuilt from its credit decision.
    async fn order(&self, tenant: &str, id: OrderId) -> Result<storage::Order, ApiError> {
        match storage::get(&self.db, tenant, id).await {
            Err(ApiError::NotFound(_)) => {}
            found => return found,
        }
        self.journal.flush().await;
        match storage::get(&self.db, tenant, id).await {
            Err(ApiError::NotFound(_)) => {}
            found => return found,
        }
        // Only orders placed with derived ids are written behind; any
        // other id was written before its PlaceOrder answered.
        if !domain::is_placed_id(id) {
            return Err(ApiError::not_found("order", id));
        }
        // Placed through another replica that has not written it yet, or
        // one that stopped before it did.
        let placement = self.placement(tenant, id).await?;
        let order = placed_order(&placement)?;
        storage::insert_if_absent(&self.db, vec![storage::row(tenant, "", &order)]).await?;
        tracing::info!(order = %id, "order rebuilt from its credit decision");
        storage::get(&self.db, tenant, id).await
    }

    /// Writes `change` to the tenant's order `id`, read just before. On
    /// PostgreSQL the journal commits asynchronously, so a crash of the
    /// database can lose an order's row after it was read: then the row is
    /// rebuilt as [`Self::order`] does and `change` written once more. The
    /// rebuilt row is the order as read: every change to an order commits
    /// synchronously, which makes the row's own commit, earlier in the
    /// log, durable too; a row that was lost had not changed since it was
    /// placed (on one primary: ARCHITECTURE, "Placing an order").
    async fn change_order<F, Fut>(
        &self,
        tenant: &str,
        id: OrderId,
        change: F,
    ) -> Result<storage::Order, ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<storage::Order, ApiError>>,
    {
        match change().await {
            Err(ApiError::NotFound(_)) => {
                tracing::warn!(order = %id, "order's row missing after it was read; rebuilding it");
                self.order(tenant, id).await?;
                change().await
            }
            changed => changed,
        }
    }

    /// The credit decision that placed order `id` (its first), NOT_FOUND
    /// when credit never decided on it.
    async fn placement(
        &self,
        tenant: &str,
        id: OrderId,
    ) -> Result<credit_pb::CreditDecision, ApiError> {
        let mut credit = self.up.credit.clone();
        let mut oldest = None;
        let mut page_token = String::new();
        // Decisions come newest first; an order has one per check and
        // amendment, so a few pages at most.
        for _ in 0..MAX_DECISION_PAGES {
            let page = credit
                .list_decisions(credit_pb::ListDecisionsRequest {
                    tenant_id: tenant.to_owned(),
                    customer_id: String::new(),
                    order_id: id.to_string(),
                    page_size: DECISION_PAGE_SIZE,
                    page_token,
                })
                .await
                .map_err(upstream("credit"))?
                .into_inner();
            if let Some(last) = page.decisions.into_iter().last() {
                oldest = Some(last);
            }
            if page.next_page_token.is_empty() {
                return oldest.ok_or_else(|| ApiError::not_found("order", id));
            }
            page_token = page.next_page_token;
        }
        Err(ApiError::Internal(format!(
            "order {id} has more than {} credit decisions",
            MAX_DECISION_PAGES * DECISION_PAGE_SIZE as usize
        )))
    }

    /// The currency of the tenant's customer `id` (NOT_FOUND when there is
    /// no such customer), from memory after the first ask.
    async fn customer_currency(&self, tenant: &str, id: CustomerId) -> Result<String, ApiError> {
        let key = (tenant.to_owned(), id);
        let remembered = self
            .currencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(currency) = remembered {
            return Ok(currency);
        }
        let currency = self.customer(tenant, id).await?.currency_code;
        let mut currencies = self
            .currencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if currencies.len() >= MAX_REMEMBERED_CUSTOMERS {
            currencies.clear();
        }
        currencies.insert(key, currency.clone());
        Ok(currency)
    }

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
        if !request.parent_customer_id.is_empty() {
            v.check(fields::id::<CustomerId>(
                "parent_customer_id",
                &request.parent_customer_id,
            ));
        }
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
        pinned.agency_reference = idempotency::pin_secret(&tenant, &request.agency_reference);
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
                    parent_customer_id: request.parent_customer_id.clone(),
                })
                .await
                .map_err(|status| {
                    let error = from_upstream("credit", status);
                    match error {
                        ApiError::InvalidArgument(_) => Failure::Refused(error),
                        other => Failure::Interrupted(other),
                    }
                })?;
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
        let actor = user(&request)?;
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
                actor,
                valid_until: request.valid_until,
                next_review_date: request.next_review_date,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        let account = present(updated.credit_account, "credit account")?;
        Ok(Response::new(pb::SetCreditLimitResponse {
            exposure: account.exposure.map(convert::exposure),
            change: updated.change,
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
        let key = &request.idempotency_key;
        // The customer first: a refusal leaves nothing behind, and the key
        // stays free for a corrected request.
        let currency = self.customer_currency(&tenant, customer_id).await?;
        if currency != amount.currency().code() {
            return Err(ApiError::invalid(
                "amount.currency_code",
                format!("must be the customer's currency {currency}"),
            )
            .into());
        }
        // The order id follows from the tenant and the key, so a retry asks
        // credit about the same order under the same key and gets the
        // decision it made the first time; a different request under the
        // key is refused there. Credit's decision is the durable record of
        // the order; the gateway's row follows (`storage::journal`).
        let order_id = domain::order_id_for(&tenant, key);
        let checked = self
            .checks
            .check(credit_pb::CheckAndReserveRequest {
                idempotency_key: derived(key, "reserve"),
                tenant_id: tenant.clone(),
                customer_id: customer_id.to_string(),
                order_id: order_id.to_string(),
                amount: Some(proto_money::to_proto(&amount)),
                client_reference: reference,
            })
            .await
            .map_err(upstream("credit"))?;
        let decision = present(checked.decision, "decision")?;
        let order = placed_order(&decision)?;
        self.journal
            .record(storage::row(&tenant, key, &order))
            .await?;
        tracing::info!(order = %order.id, status = order.status.code(), reasons = ?order.reasons, "order placed");
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(convert::order(&order)),
            exposure: decision.exposure.map(convert::exposure),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<OrderId>("order_id", &request.get_ref().order_id)?;
        let order = self.order(&tenant, id).await?;
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
            let order = self.order(&tenant, order_id).await.map_err(refused)?;
            if !order.status.can_invoice() {
                return Err(refused(ApiError::FailedPrecondition(format!(
                    "order {} is {}; only approved orders can be invoiced",
                    order.id,
                    order.status.code()
                ))));
            }
            if order.reservation_id.is_none() {
                return Err(Failure::Interrupted(ApiError::Internal(format!(
                    "approved order {} has no reservation",
                    order.id
                ))));
            }
            let terms = if let Some(terms) = request.payment_terms.clone() {
                terms
            } else if request.net_days == 0 {
                invoicing_pb::PaymentTerms {
                    kind: invoicing_pb::PaymentTermsKind::DueOnReceipt as i32,
                    ..Default::default()
                }
            } else {
                invoicing_pb::PaymentTerms {
                    kind: invoicing_pb::PaymentTermsKind::Net as i32,
                    net_days: request.net_days,
                    ..Default::default()
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
                    draft: false,
                })
                .await
                .map_err(upstream("invoicing"))?;
            let invoice = present(issued.into_inner().invoice, "invoice")?;
            // Converts the order's reservation now; the invoice's event
            // would do it too, should this call be lost.
            self.sync_receivable(&tenant, &invoice).await?;
            let order = self
                .change_order(&tenant, order.id, || {
                    storage::record_invoice(&self.db, &tenant, order.id, &invoice.invoice_id)
                })
                .await?;
            let collection = self
                .schedule_collection(&tenant, key, order.customer_id, &invoice)
                .await?;
            Ok(pb::InvoiceOrderResponse {
                order: Some(convert::order(&order)),
                invoice: Some(convert::invoice(invoice)),
                collection,
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
        let allocations = v.check(allocations(&request.allocations));
        v.finish()?;
        let (Some(customer_id), Some(amount), Some(instructed)) =
            (customer_id, amount, allocations)
        else {
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
                self.precheck(&tenant, customer_id, &instructed)
                    .await
                    .map_err(refused)?;
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
                    allocations: to_payment_allocations(&instructed),
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
            let applied = if instructed.is_empty() {
                self.auto_apply(&tenant, key, customer_id, &payment).await?
            } else {
                instructed
            };
            let (invoices, discount) = self
                .apply_allocations(
                    &tenant,
                    key,
                    &payment.payment_id,
                    &applied,
                    amount.currency(),
                )
                .await?;
            // Money came in: holds that now pass are released.
            self.recheck_holds(&tenant, key, customer_id).await?;
            let unapplied = self.unapplied(&tenant, &payment.payment_id).await?;
            Ok(pb::RecordPaymentResponse {
                payment_id: payment.payment_id,
                invoices,
                unapplied,
                exposure: self.exposure_of(&tenant, customer_id).await?,
                discount_taken: Some(proto_money::to_proto(&discount)),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn apply_unapplied_cash(
        &self,
        request: Request<pb::ApplyUnappliedCashRequest>,
    ) -> Result<Response<pb::ApplyUnappliedCashResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let payment_id = v.check(fields::id::<o2c_money::ids::PaymentId>(
            "payment_id",
            &request.payment_id,
        ));
        let allocations = v.check(allocations(&request.allocations));
        if request.allocations.is_empty() {
            v.check::<()>(Err(ApiError::invalid("allocations", "at least one")));
        }
        v.finish()?;
        let (Some(payment_id), Some(allocations)) = (payment_id, allocations) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/gateway.ApplyUnappliedCash");
        let key = &request.idempotency_key;
        let claim = self.claim(&scope, key, &request.encode_to_vec()).await?;
        let fresh = match claim {
            Claim::Done(response) => return Ok(Response::new(response)),
            Claim::Fresh => true,
            Claim::Resumed => false,
        };
        let result = async {
            let payment = self
                .payment(&tenant, &payment_id.to_string())
                .await
                .map_err(refused)?;
            let customer_id: CustomerId = payment
                .customer_id
                .parse()
                .map_err(|_| ApiError::Internal("payments sent an invalid customer id".into()))?;
            if fresh {
                self.precheck(&tenant, customer_id, &allocations)
                    .await
                    .map_err(refused)?;
            }
            self.up
                .payments
                .clone()
                .apply_unapplied_cash(payments_pb::ApplyUnappliedCashRequest {
                    idempotency_key: derived(key, "unapplied"),
                    tenant_id: tenant.clone(),
                    payment_id: payment.payment_id.clone(),
                    allocations: to_payment_allocations(&allocations),
                })
                .await
                .map_err(|status| {
                    let error = from_upstream("payments", status);
                    match error {
                        ApiError::InvalidArgument(_) | ApiError::FailedPrecondition(_) if fresh => {
                            Failure::Refused(error)
                        }
                        other => Failure::Interrupted(other),
                    }
                })?;
            let currency = allocations
                .first()
                .map(|(_, m)| m.currency())
                .ok_or_else(missing)?;
            let (invoices, _) = self
                .apply_allocations(&tenant, key, &payment.payment_id, &allocations, currency)
                .await?;
            self.recheck_holds(&tenant, key, customer_id).await?;
            Ok(pb::ApplyUnappliedCashResponse {
                invoices,
                unapplied: self.unapplied(&tenant, &payment.payment_id).await?,
                exposure: self.exposure_of(&tenant, customer_id).await?,
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> Result<Response<pb::RefundPaymentResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let refunded = self
            .up
            .payments
            .clone()
            .refund_payment(payments_pb::RefundPaymentRequest {
                idempotency_key: derived(&request.idempotency_key, "refund"),
                tenant_id: tenant,
                payment_id: request.payment_id,
                amount: request.amount,
                reason: request.reason,
                actor,
            })
            .await
            .map_err(upstream("payments"))?
            .into_inner();
        Ok(Response::new(pb::RefundPaymentResponse {
            refund: refunded.refund,
            unapplied: refunded.payment.and_then(|p| p.unapplied),
        }))
    }

    async fn list_invoices(
        &self,
        request: Request<pb::ListInvoicesRequest>,
    ) -> Result<Response<pb::ListInvoicesResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .invoicing
            .clone()
            .list_invoices(invoicing_pb::ListInvoicesRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                status: request.status,
                open_only: request.open_only,
                overdue_only: request.overdue_only,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("invoicing"))?
            .into_inner();
        Ok(Response::new(pb::ListInvoicesResponse {
            invoices: listed.invoices.into_iter().map(convert::invoice).collect(),
            next_page_token: listed.next_page_token,
        }))
    }

    async fn get_aging(
        &self,
        request: Request<pb::GetAgingRequest>,
    ) -> Result<Response<pb::GetAgingResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        if !request.customer_id.is_empty() {
            // A customer of another tenant is unknown here, not empty.
            let id = fields::id::<CustomerId>("customer_id", &request.customer_id)?;
            self.customer(&tenant, id).await?;
        }
        let aging = self
            .up
            .invoicing
            .clone()
            .get_aging(invoicing_pb::GetAgingRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
            })
            .await
            .map_err(upstream("invoicing"))?
            .into_inner();
        Ok(Response::new(pb::GetAgingResponse { aging: Some(aging) }))
    }

    async fn issue_credit_note(
        &self,
        request: Request<pb::IssueCreditNoteRequest>,
    ) -> Result<Response<pb::IssueCreditNoteResponse>, Status> {
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
        let scope = format!("{tenant}/gateway.IssueCreditNote");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &request.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let issued = self
                .up
                .invoicing
                .clone()
                .issue_credit_note(invoicing_pb::IssueCreditNoteRequest {
                    idempotency_key: derived(key, "note"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    invoice_id: request.invoice_id.clone(),
                    amount: request.amount.clone(),
                    reason: request.reason.clone(),
                })
                .await
                .map_err(|status| Failure::Refused(from_upstream("invoicing", status)))?
                .into_inner();
            let note = present(issued.credit_note.clone(), "credit note")?;
            if let Some(invoice) = &issued.invoice {
                self.sync_receivable(&tenant, invoice).await?;
            }
            self.recheck_holds(&tenant, key, customer_id).await?;
            Ok(pb::IssueCreditNoteResponse {
                credit_note: Some(note),
                invoice: issued.invoice.map(convert::invoice),
                exposure: self.exposure_of(&tenant, customer_id).await?,
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn write_off_invoice(
        &self,
        request: Request<pb::WriteOffInvoiceRequest>,
    ) -> Result<Response<pb::WriteOffInvoiceResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let scope = format!("{tenant}/gateway.WriteOffInvoice");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &request.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let written = self
                .up
                .invoicing
                .clone()
                .write_off_invoice(invoicing_pb::WriteOffInvoiceRequest {
                    idempotency_key: derived(key, "write-off"),
                    tenant_id: tenant.clone(),
                    invoice_id: request.invoice_id.clone(),
                    reason: request.reason.clone(),
                })
                .await
                .map_err(|status| Failure::Refused(from_upstream("invoicing", status)))?
                .into_inner();
            let invoice = present(written.invoice, "invoice")?;
            self.sync_receivable(&tenant, &invoice).await?;
            let customer_id = customer_of(&invoice)?;
            Ok(pb::WriteOffInvoiceResponse {
                exposure: self.exposure_of(&tenant, customer_id).await?,
                invoice: Some(convert::invoice(invoice)),
                written_off: written.written_off,
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn issue_invoice(
        &self,
        request: Request<pb::IssueInvoiceRequest>,
    ) -> Result<Response<pb::IssueInvoiceResponse>, Status> {
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
        let scope = format!("{tenant}/gateway.IssueInvoice");
        let key = &request.idempotency_key;
        let claim = self.claim(&scope, key, &request.encode_to_vec()).await?;
        let fresh = match claim {
            Claim::Done(response) => return Ok(Response::new(response)),
            Claim::Fresh => true,
            Claim::Resumed => false,
        };
        let result = async {
            let customer = self.customer(&tenant, customer_id).await.map_err(refused)?;
            let issued = self
                .up
                .invoicing
                .clone()
                .issue_invoice(invoicing_pb::IssueInvoiceRequest {
                    idempotency_key: derived(key, "invoice"),
                    tenant_id: tenant.clone(),
                    customer_id: customer_id.to_string(),
                    order_id: String::new(),
                    currency_code: customer.currency_code.clone(),
                    lines: request.lines.clone(),
                    payment_terms: request.payment_terms.clone(),
                    issue_date: String::new(),
                    draft: request.draft,
                })
                .await
                .map_err(|status| {
                    let error = from_upstream("invoicing", status);
                    match error {
                        ApiError::InvalidArgument(_) if fresh => Failure::Refused(error),
                        other => Failure::Interrupted(other),
                    }
                })?
                .into_inner();
            let invoice = present(issued.invoice, "invoice")?;
            if !request.draft {
                self.record_receivable(&tenant, key, customer_id, &invoice)
                    .await?;
            }
            Ok(pb::IssueInvoiceResponse {
                exposure: self.exposure_of(&tenant, customer_id).await?,
                invoice: Some(convert::invoice(invoice)),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn finalize_invoice(
        &self,
        request: Request<pb::FinalizeInvoiceRequest>,
    ) -> Result<Response<pb::FinalizeInvoiceResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let scope = format!("{tenant}/gateway.FinalizeInvoice");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &request.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let finalized = self
                .up
                .invoicing
                .clone()
                .finalize_invoice(invoicing_pb::FinalizeInvoiceRequest {
                    idempotency_key: derived(key, "finalize"),
                    tenant_id: tenant.clone(),
                    invoice_id: request.invoice_id.clone(),
                })
                .await
                .map_err(|status| Failure::Refused(from_upstream("invoicing", status)))?
                .into_inner();
            let invoice = present(finalized.invoice, "invoice")?;
            let customer_id = customer_of(&invoice)?;
            self.record_receivable(&tenant, key, customer_id, &invoice)
                .await?;
            Ok(pb::FinalizeInvoiceResponse {
                exposure: self.exposure_of(&tenant, customer_id).await?,
                invoice: Some(convert::invoice(invoice)),
            })
        }
        .await;
        Ok(Response::new(self.finish(&scope, key, result).await?))
    }

    async fn get_account_credit(
        &self,
        request: Request<pb::GetAccountCreditRequest>,
    ) -> Result<Response<pb::GetAccountCreditResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<CustomerId>("customer_id", &request.get_ref().customer_id)?;
        self.customer(&tenant, id).await?;
        let found = self
            .up
            .invoicing
            .clone()
            .get_account_credit(invoicing_pb::GetAccountCreditRequest {
                tenant_id: tenant,
                customer_id: id.to_string(),
            })
            .await
            .map_err(upstream("invoicing"))?
            .into_inner();
        Ok(Response::new(pb::GetAccountCreditResponse {
            balances: found.balances,
        }))
    }

    async fn pay_out_account_credit(
        &self,
        request: Request<pb::PayOutAccountCreditRequest>,
    ) -> Result<Response<pb::PayOutAccountCreditResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let id = fields::id::<CustomerId>("customer_id", &request.customer_id)?;
        self.customer(&tenant, id).await?;
        let paid = self
            .up
            .invoicing
            .clone()
            .pay_out_account_credit(invoicing_pb::PayOutAccountCreditRequest {
                idempotency_key: derived(&request.idempotency_key, "payout"),
                tenant_id: tenant,
                customer_id: request.customer_id,
                amount: request.amount,
                reason: request.reason,
                actor,
            })
            .await
            .map_err(upstream("invoicing"))?
            .into_inner();
        Ok(Response::new(pb::PayOutAccountCreditResponse {
            payout_id: paid.payout_id,
            balance: paid.balance,
        }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let only = if request.customer_id.is_empty() {
            None
        } else {
            Some(fields::id::<CustomerId>(
                "customer_id",
                &request.customer_id,
            )?)
        };
        Ok(Response::new(self.reconcile_tenant(&tenant, only).await?))
    }

    async fn create_mandate(
        &self,
        request: Request<pb::CreateMandateRequest>,
    ) -> Result<Response<pb::CreateMandateResponse>, Status> {
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
        let customer = self.customer(&tenant, customer_id).await?;
        let created = self
            .up
            .payments
            .clone()
            .create_mandate(payments_pb::CreateMandateRequest {
                idempotency_key: derived(&request.idempotency_key, "mandate"),
                tenant_id: tenant,
                customer_id: customer_id.to_string(),
                method: request.method,
                processor_token: request.processor_token,
                last4: request.last4,
                currency_code: customer.currency_code,
            })
            .await
            .map_err(upstream("payments"))?
            .into_inner();
        Ok(Response::new(pb::CreateMandateResponse {
            mandate: created.mandate,
        }))
    }

    async fn list_payment_sessions(
        &self,
        request: Request<pb::ListPaymentSessionsRequest>,
    ) -> Result<Response<pb::ListPaymentSessionsResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .payments
            .clone()
            .list_payment_sessions(payments_pb::ListPaymentSessionsRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("payments"))?
            .into_inner();
        Ok(Response::new(pb::ListPaymentSessionsResponse {
            sessions: listed.sessions,
            next_page_token: listed.next_page_token,
        }))
    }

    async fn cancel_invoice(
        &self,
        request: Request<pb::CancelInvoiceRequest>,
    ) -> Result<Response<pb::CancelInvoiceResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let scope = format!("{tenant}/gateway.CancelInvoice");
        let key = &request.idempotency_key;
        if let Claim::Done(response) = self.claim(&scope, key, &request.encode_to_vec()).await? {
            return Ok(Response::new(response));
        }
        let result = async {
            let cancelled = self
                .up
                .invoicing
                .clone()
                .cancel_invoice(invoicing_pb::CancelInvoiceRequest {
                    idempotency_key: derived(key, "cancel"),
                    tenant_id: tenant.clone(),
                    invoice_id: request.invoice_id.clone(),
                    reason: request.reason.clone(),
                })
                .await
                .map_err(|status| Failure::Refused(from_upstream("invoicing", status)))?
                .into_inner();
            let invoice = present(cancelled.invoice, "invoice")?;
            self.sync_receivable(&tenant, &invoice).await?;
            let customer_id = customer_of(&invoice)?;
            self.recheck_holds(&tenant, key, customer_id).await?;
            Ok(pb::CancelInvoiceResponse {
                exposure: self.exposure_of(&tenant, customer_id).await?,
                invoice: Some(convert::invoice(invoice)),
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

    async fn amend_order(
        &self,
        request: Request<pb::AmendOrderRequest>,
    ) -> Result<Response<pb::AmendOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let order_id = v.check(fields::id::<OrderId>("order_id", &request.order_id));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        v.finish()?;
        let (Some(order_id), Some(amount)) = (order_id, amount) else {
            return Err(missing().into());
        };
        let order = self.order(&tenant, order_id).await?;
        if order.status != OrderStatus::Approved {
            return Err(ApiError::FailedPrecondition(format!(
                "order {} is {}; only approved, not yet invoiced orders can be amended",
                order.id,
                order.status.code()
            ))
            .into());
        }
        let reservation_id = order.reservation_id.clone().ok_or_else(|| {
            ApiError::Internal(format!("approved order {} has no reservation", order.id))
        })?;
        let amended = self
            .up
            .credit
            .clone()
            .amend_reservation(credit_pb::AmendReservationRequest {
                idempotency_key: derived(&request.idempotency_key, "amend"),
                tenant_id: tenant.clone(),
                reservation_id,
                new_amount: Some(proto_money::to_proto(&amount)),
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        let decision = present(amended.decision, "decision")?;
        let order = if decision.decision() == credit_pb::Decision::Approve {
            self.change_order(&tenant, order.id, || {
                storage::set_amount(&self.db, &tenant, order.id, amount)
            })
            .await?
        } else {
            order
        };
        Ok(Response::new(pb::AmendOrderResponse {
            order: Some(convert::order(&order)),
            decision: Some(decision),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        v.check(client_key(&request.idempotency_key));
        let order_id = v.check(fields::id::<OrderId>("order_id", &request.order_id));
        let reason = v.check(fields::optional_text("reason", &request.reason, 500));
        v.finish()?;
        let (Some(order_id), Some(reason)) = (order_id, reason) else {
            return Err(missing().into());
        };
        let order = self.order(&tenant, order_id).await?;
        let reason = if reason.is_empty() {
            "cancelled by the client".to_owned()
        } else {
            reason
        };
        match (order.status, &order.reservation_id, &order.hold_id) {
            (OrderStatus::Cancelled, _, _) => {}
            (OrderStatus::Approved, Some(reservation), _) => {
                self.up
                    .credit
                    .clone()
                    .release_reservation(credit_pb::ReleaseReservationRequest {
                        idempotency_key: derived(&request.idempotency_key, "release"),
                        tenant_id: tenant.clone(),
                        reservation_id: reservation.clone(),
                        reason: reason.clone(),
                    })
                    .await
                    .map_err(upstream("credit"))?;
            }
            (OrderStatus::Held, _, Some(hold)) => {
                self.up
                    .credit
                    .clone()
                    .reject_hold(credit_pb::RejectHoldRequest {
                        idempotency_key: derived(&request.idempotency_key, "reject"),
                        tenant_id: tenant.clone(),
                        hold_id: hold.clone(),
                        actor: "client".into(),
                        reason: reason.clone(),
                    })
                    .await
                    .map_err(upstream("credit"))?;
            }
            (status, _, _) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "order {} is {}; only approved or held orders can be cancelled",
                    order.id,
                    status.code()
                ))
                .into());
            }
        }
        let order = self
            .change_order(&tenant, order.id, || {
                storage::set_status(&self.db, &tenant, order.id, OrderStatus::Cancelled)
            })
            .await?;
        Ok(Response::new(pb::CancelOrderResponse {
            order: Some(convert::order(&order)),
        }))
    }

    async fn get_credit_profile(
        &self,
        request: Request<pb::GetCreditProfileRequest>,
    ) -> Result<Response<pb::GetCreditProfileResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<CustomerId>("customer_id", &request.get_ref().customer_id)?;
        let mut credit = self.up.credit.clone();
        let account = credit
            .get_credit_account(credit_pb::GetCreditAccountRequest {
                tenant_id: tenant.clone(),
                customer_id: id.to_string(),
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner()
            .credit_account;
        let holds = credit
            .list_holds(credit_pb::ListHoldsRequest {
                tenant_id: tenant,
                customer_id: id.to_string(),
                reason: 0,
                state: credit_pb::HoldState::Open as i32,
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner()
            .holds;
        Ok(Response::new(pb::GetCreditProfileResponse {
            credit_account: account,
            open_holds: holds,
        }))
    }

    async fn get_group_exposure(
        &self,
        request: Request<pb::GetGroupExposureRequest>,
    ) -> Result<Response<pb::GetGroupExposureResponse>, Status> {
        let tenant = tenant(&request)?;
        let id = fields::id::<CustomerId>("customer_id", &request.get_ref().customer_id)?;
        let group = self
            .up
            .credit
            .clone()
            .get_group_exposure(credit_pb::GetGroupExposureRequest {
                tenant_id: tenant,
                customer_id: id.to_string(),
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::GetGroupExposureResponse {
            group: Some(group),
        }))
    }

    async fn decide_limit_change(
        &self,
        request: Request<pb::DecideLimitChangeRequest>,
    ) -> Result<Response<pb::DecideLimitChangeResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let decided = self
            .up
            .credit
            .clone()
            .decide_limit_change(credit_pb::DecideLimitChangeRequest {
                idempotency_key: derived(&request.idempotency_key, "decide"),
                tenant_id: tenant,
                limit_change_id: request.limit_change_id,
                approve: request.approve,
                reason: request.reason,
                actor,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::DecideLimitChangeResponse {
            change: decided.change,
        }))
    }

    async fn list_limit_changes(
        &self,
        request: Request<pb::ListLimitChangesRequest>,
    ) -> Result<Response<pb::ListLimitChangesResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .credit
            .clone()
            .list_limit_changes(credit_pb::ListLimitChangesRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ListLimitChangesResponse {
            changes: listed.changes,
            next_page_token: listed.next_page_token,
        }))
    }

    async fn set_account_controls(
        &self,
        request: Request<pb::SetAccountControlsRequest>,
    ) -> Result<Response<pb::SetAccountControlsResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let set = self
            .up
            .credit
            .clone()
            .set_account_controls(credit_pb::SetAccountControlsRequest {
                idempotency_key: derived(&request.idempotency_key, "controls"),
                tenant_id: tenant,
                customer_id: request.customer_id,
                blocked: request.blocked,
                max_order_value: request.max_order_value,
                reason: request.reason,
                actor,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::SetAccountControlsResponse {
            credit_account: set.credit_account,
        }))
    }

    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .credit
            .clone()
            .list_decisions(credit_pb::ListDecisionsRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                order_id: request.order_id,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ListDecisionsResponse {
            decisions: listed.decisions,
            next_page_token: listed.next_page_token,
        }))
    }

    async fn list_holds(
        &self,
        request: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .credit
            .clone()
            .list_holds(credit_pb::ListHoldsRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                reason: request.reason,
                state: request.state,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ListHoldsResponse {
            holds: listed.holds,
            next_page_token: listed.next_page_token,
        }))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let released = self
            .up
            .credit
            .clone()
            .release_hold(credit_pb::ReleaseHoldRequest {
                idempotency_key: derived(&request.idempotency_key, "release"),
                tenant_id: tenant.clone(),
                hold_id: request.hold_id,
                actor,
                reason: request.reason,
                raise_limit_to: request.raise_limit_to,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        let hold = present(released.hold, "hold")?;
        let order = self.apply_hold(&tenant, &hold).await?;
        Ok(Response::new(pb::ReleaseHoldResponse {
            hold: Some(hold),
            decision: released.decision,
            order: order.as_ref().map(convert::order),
        }))
    }

    async fn reject_hold(
        &self,
        request: Request<pb::RejectHoldRequest>,
    ) -> Result<Response<pb::RejectHoldResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let rejected = self
            .up
            .credit
            .clone()
            .reject_hold(credit_pb::RejectHoldRequest {
                idempotency_key: derived(&request.idempotency_key, "reject"),
                tenant_id: tenant.clone(),
                hold_id: request.hold_id,
                actor,
                reason: request.reason,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        let hold = present(rejected.hold, "hold")?;
        let order = self.apply_hold(&tenant, &hold).await?;
        Ok(Response::new(pb::RejectHoldResponse {
            hold: Some(hold),
            order: order.as_ref().map(convert::order),
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let listed = self
            .up
            .credit
            .clone()
            .list_alerts(credit_pb::ListAlertsRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
                unacknowledged_only: request.unacknowledged_only,
                page_size: request.page_size,
                page_token: request.page_token,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: listed.alerts,
            next_page_token: listed.next_page_token,
        }))
    }

    async fn acknowledge_alert(
        &self,
        request: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = user(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let acknowledged = self
            .up
            .credit
            .clone()
            .acknowledge_alert(credit_pb::AcknowledgeAlertRequest {
                idempotency_key: derived(&request.idempotency_key, "ack"),
                tenant_id: tenant,
                alert_id: request.alert_id,
                actor,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::AcknowledgeAlertResponse {
            alert: acknowledged.alert,
        }))
    }

    type StreamAlertsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::StreamAlertsResponse, Status>> + Send>,
    >;

    async fn stream_alerts(
        &self,
        request: Request<pb::StreamAlertsRequest>,
    ) -> Result<Response<Self::StreamAlertsStream>, Status> {
        let tenant = tenant(&request)?;
        // A live stream has no deadline: use a channel without one.
        let upstream_stream = self
            .up
            .alerts
            .clone()
            .stream_alerts(credit_pb::StreamAlertsRequest { tenant_id: tenant })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        let stream = tokio_stream::StreamExt::map(upstream_stream, |item| {
            item.map(|r| pb::StreamAlertsResponse {
                alert: r.alert,
                missed: r.missed,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn update_risk_facts(
        &self,
        request: Request<pb::UpdateRiskFactsRequest>,
    ) -> Result<Response<pb::UpdateRiskFactsResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let updated = self
            .up
            .credit
            .clone()
            .update_risk_facts(credit_pb::UpdateRiskFactsRequest {
                idempotency_key: derived(&request.idempotency_key, "facts"),
                tenant_id: tenant,
                customer_id: request.customer_id,
                relationship_since: request.relationship_since,
                annual_volume: request.annual_volume,
                disputes: request.disputes,
                write_offs: request.write_offs,
                broken_promises: request.broken_promises,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::UpdateRiskFactsResponse {
            score: updated.score,
        }))
    }

    async fn score_customer(
        &self,
        request: Request<pb::ScoreCustomerRequest>,
    ) -> Result<Response<pb::ScoreCustomerResponse>, Status> {
        let tenant = tenant(&request)?;
        let actor = if request.get_ref().apply_limit {
            user(&request)?
        } else {
            String::new()
        };
        let request = request.into_inner();
        client_key(&request.idempotency_key)?;
        let scored = self
            .up
            .credit
            .clone()
            .score_customer(credit_pb::ScoreCustomerRequest {
                idempotency_key: derived(&request.idempotency_key, "score"),
                tenant_id: tenant,
                customer_id: request.customer_id,
                apply_limit: request.apply_limit,
                actor,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ScoreCustomerResponse {
            score: scored.score,
            change: scored.change,
        }))
    }

    async fn explain_score(
        &self,
        request: Request<pb::ExplainScoreRequest>,
    ) -> Result<Response<pb::ExplainScoreResponse>, Status> {
        let tenant = tenant(&request)?;
        let request = request.into_inner();
        let explained = self
            .up
            .credit
            .clone()
            .explain_score(credit_pb::ExplainScoreRequest {
                tenant_id: tenant,
                customer_id: request.customer_id,
            })
            .await
            .map_err(upstream("credit"))?
            .into_inner();
        Ok(Response::new(pb::ExplainScoreResponse {
            score: explained.score,
        }))
    }
}

/// Validates payment allocations: invoice ids, positive amounts, each
/// invoice once, at most MAX_ALLOCATIONS.
fn allocations(requested: &[pb::PaymentAllocation]) -> Result<Vec<(InvoiceId, Money)>, ApiError> {
    let mut v = Violations::default();
    if requested.len() > MAX_ALLOCATIONS {
        v.check::<()>(Err(ApiError::invalid(
            "allocations",
            format!("at most {MAX_ALLOCATIONS}"),
        )));
    }
    let mut allocations: Vec<(InvoiceId, Money)> = Vec::new();
    for (index, allocation) in requested.iter().enumerate() {
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
    Ok(allocations)
}

/// The customer an invoice from the invoicing service belongs to.
fn customer_of(invoice: &invoicing_pb::Invoice) -> Result<CustomerId, ApiError> {
    invoice
        .customer_id
        .parse()
        .map_err(|_| ApiError::Internal("invoicing sent an invalid customer id".into()))
}

fn to_payment_allocations(allocations: &[(InvoiceId, Money)]) -> Vec<payments_pb::Allocation> {
    allocations
        .iter()
        .map(|(invoice, value)| payments_pb::Allocation {
            invoice_id: invoice.to_string(),
            amount: Some(proto_money::to_proto(value)),
        })
        .collect()
}

impl GatewayApi {
    /// Compares credit's ledger with invoicing's invoices and the gateway's
    /// orders for one customer or every customer of the tenant.
    pub async fn reconcile_tenant(
        &self,
        tenant: &str,
        only: Option<CustomerId>,
    ) -> Result<pb::ReconcileResponse, ApiError> {
        // Orders placed just before are compared too.
        self.journal.flush().await;
        let mut customers = Vec::new();
        match only {
            Some(customer) => customers.push(customer),
            None => {
                let mut token = String::new();
                loop {
                    let page = self
                        .up
                        .credit
                        .clone()
                        .list_credit_accounts(credit_pb::ListCreditAccountsRequest {
                            tenant_id: tenant.to_owned(),
                            page_size: 100,
                            page_token: token.clone(),
                        })
                        .await
                        .map_err(|status| from_upstream("credit", status))?
                        .into_inner();
                    for account in &page.credit_accounts {
                        if let Ok(id) = account.customer_id.parse() {
                            customers.push(id);
                        }
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
            }
        }
        let mut differences = Vec::new();
        for customer in &customers {
            differences.extend(self.reconcile_customer(tenant, *customer).await?);
        }
        o2c_kit::telemetry::gauge(
            "o2c-gateway",
            "o2c.reconciliation.differences",
            differences.len() as u64,
            &[("tenant", tenant.to_owned())],
        );
        if differences.is_empty() {
            tracing::info!(tenant, customers = customers.len(), "reconciliation clean");
        } else {
            tracing::error!(
                tenant,
                customers = customers.len(),
                differences = differences.len(),
                "reconciliation found differences"
            );
        }
        Ok(pb::ReconcileResponse {
            customers_checked: i32::try_from(customers.len()).unwrap_or(i32::MAX),
            differences,
        })
    }

    async fn reconcile_customer(
        &self,
        tenant: &str,
        customer: CustomerId,
    ) -> Result<Vec<pb::Difference>, ApiError> {
        let difference = |kind: pb::DifferenceKind,
                          reference: &str,
                          credit: String,
                          owner: String| pb::Difference {
            customer_id: customer.to_string(),
            kind: kind as i32,
            reference: reference.to_owned(),
            credit_value: credit,
            owner_value: owner,
        };
        let ledger = self
            .up
            .credit
            .clone()
            .get_ledger(credit_pb::GetLedgerRequest {
                tenant_id: tenant.to_owned(),
                customer_id: customer.to_string(),
            })
            .await
            .map_err(|status| from_upstream("credit", status))?
            .into_inner();
        let mut found = Vec::new();
        if !ledger.consistent {
            let total = ledger
                .exposure
                .as_ref()
                .and_then(|e| e.total.as_ref())
                .map(|m| m.amount.clone())
                .unwrap_or_default();
            found.push(difference(
                pb::DifferenceKind::ExposureLedger,
                "",
                total,
                "ledger sum differs".into(),
            ));
        }
        // Invoicing's open amounts, every invoice of the customer.
        let mut open: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        let mut token = String::new();
        loop {
            let page = self
                .up
                .invoicing
                .clone()
                .list_invoices(invoicing_pb::ListInvoicesRequest {
                    tenant_id: tenant.to_owned(),
                    customer_id: customer.to_string(),
                    page_size: 100,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|status| from_upstream("invoicing", status))?
                .into_inner();
            for invoice in page.invoices {
                if invoice.status() == invoicing_pb::InvoiceStatus::Draft {
                    continue;
                }
                let amount = invoice.amount_open.map(|m| m.amount).unwrap_or_default();
                open.insert(invoice.invoice_id, amount);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let zero = |amount: &str| {
            amount
                .trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
        };
        for receivable in &ledger.receivables {
            let credit_open = receivable
                .open
                .as_ref()
                .map(|m| m.amount.clone())
                .unwrap_or_default();
            match open.remove(&receivable.invoice_id) {
                Some(owner_open) if owner_open == credit_open => {}
                Some(owner_open) => found.push(difference(
                    pb::DifferenceKind::Receivable,
                    &receivable.invoice_id,
                    credit_open,
                    owner_open,
                )),
                None => found.push(difference(
                    pb::DifferenceKind::Receivable,
                    &receivable.invoice_id,
                    credit_open,
                    "no such invoice".into(),
                )),
            }
        }
        for (invoice, owner_open) in open {
            if !zero(&owner_open) {
                found.push(difference(
                    pb::DifferenceKind::Receivable,
                    &invoice,
                    "no receivable".into(),
                    owner_open,
                ));
            }
        }
        // Approved, not yet invoiced orders ↔ open reservations.
        let mut approved =
            storage::orders_in_status(&self.db, tenant, customer, OrderStatus::Approved).await?;
        // An order whose row this gateway does not have yet (another
        // replica placed it, or the journal gave it up) is rebuilt from its
        // credit decision first, so it is compared rather than reported.
        let known: std::collections::HashSet<String> =
            approved.iter().map(|o| o.id.to_string()).collect();
        let mut rebuilt = false;
        for reservation in &ledger.open_reservations {
            let Ok(id) = reservation.order_id.parse::<OrderId>() else {
                continue;
            };
            if known.contains(&reservation.order_id) || !domain::is_placed_id(id) {
                continue;
            }
            match self.order(tenant, id).await {
                Ok(_) => rebuilt = true,
                Err(ApiError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        if rebuilt {
            approved = storage::orders_in_status(&self.db, tenant, customer, OrderStatus::Approved)
                .await?;
        }
        let mut reservations: std::collections::HashMap<String, String> = ledger
            .open_reservations
            .iter()
            .map(|r| {
                (
                    r.reservation_id.clone(),
                    r.amount
                        .as_ref()
                        .map(|m| m.amount.clone())
                        .unwrap_or_default(),
                )
            })
            .collect();
        for order in &approved {
            let ordered = order.amount.amount_string();
            match order
                .reservation_id
                .as_ref()
                .and_then(|r| reservations.remove(r))
            {
                Some(reserved) if reserved == ordered => {}
                Some(reserved) => found.push(difference(
                    pb::DifferenceKind::Reservation,
                    &order.id.to_string(),
                    reserved,
                    ordered,
                )),
                None => found.push(difference(
                    pb::DifferenceKind::Reservation,
                    &order.id.to_string(),
                    "no open reservation".into(),
                    ordered,
                )),
            }
        }
        for (reservation, reserved) in reservations {
            found.push(difference(
                pb::DifferenceKind::Reservation,
                &reservation,
                reserved,
                "no approved order".into(),
            ));
        }
        Ok(found)
    }

    /// Makes a standalone invoice exposure in credit, and schedules its
    /// collection when the customer has a mandate.
    async fn record_receivable(
        &self,
        tenant: &str,
        key: &str,
        customer_id: CustomerId,
        invoice: &invoicing_pb::Invoice,
    ) -> Result<(), ApiError> {
        self.sync_receivable(tenant, invoice).await?;
        self.schedule_collection(tenant, key, customer_id, invoice)
            .await?;
        Ok(())
    }

    /// Schedules the invoice's collection when the customer has an active
    /// mandate (none: nothing to do).
    async fn schedule_collection(
        &self,
        tenant: &str,
        key: &str,
        customer_id: CustomerId,
        invoice: &invoicing_pb::Invoice,
    ) -> Result<Option<payments_pb::PaymentSession>, ApiError> {
        let scheduled = self
            .up
            .payments
            .clone()
            .schedule_collection(payments_pb::ScheduleCollectionRequest {
                idempotency_key: derived(key, "collect"),
                tenant_id: tenant.to_owned(),
                customer_id: customer_id.to_string(),
                invoice_id: invoice.invoice_id.clone(),
                amount: invoice.total.clone(),
                due_date: invoice.due_date.clone(),
            })
            .await;
        match scheduled {
            Ok(response) => Ok(response.into_inner().session),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(from_upstream("payments", status)),
        }
    }

    /// Checks instructed allocations against the invoices: the customer's,
    /// same currency, at most what is open.
    async fn precheck(
        &self,
        tenant: &str,
        customer_id: CustomerId,
        allocations: &[(InvoiceId, Money)],
    ) -> Result<(), ApiError> {
        for (index, (invoice_id, value)) in allocations.iter().enumerate() {
            let field = format!("allocations[{index}]");
            let invoice = self
                .invoice(tenant, *invoice_id)
                .await
                .map_err(|e| match e {
                    ApiError::NotFound(m) => ApiError::NotFound(format!("{field}.invoice_id: {m}")),
                    other => other,
                })?;
            if invoice.customer_id != customer_id.to_string() {
                return Err(ApiError::NotFound(format!(
                    "{field}.invoice_id: invoice {invoice_id} not found for customer {customer_id}"
                )));
            }
            let open = proto_money::parse(&format!("{field}.amount"), invoice.amount_open.as_ref())
                .map_err(|e| ApiError::Internal(format!("invoice open amount: {e}")))?;
            if open.currency() != value.currency() {
                return Err(ApiError::invalid(
                    format!("{field}.amount.currency_code"),
                    format!("must be the invoice currency {}", open.currency()),
                ));
            }
            if value.minor_units() > open.minor_units() {
                return Err(ApiError::FailedPrecondition(format!(
                    "{field}: {value} exceeds the open amount {open} of invoice {invoice_id}"
                )));
            }
        }
        Ok(())
    }

    async fn payment(
        &self,
        tenant: &str,
        payment_id: &str,
    ) -> Result<payments_pb::Payment, ApiError> {
        let found = self
            .up
            .payments
            .clone()
            .get_payment(payments_pb::GetPaymentRequest {
                tenant_id: tenant.to_owned(),
                payment_id: payment_id.to_owned(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => ApiError::not_found("payment", payment_id),
                _ => from_upstream("payments", status),
            })?;
        present(found.into_inner().payment, "payment")
    }

    async fn unapplied(
        &self,
        tenant: &str,
        payment_id: &str,
    ) -> Result<Option<o2c_proto::common::v1::Money>, ApiError> {
        Ok(self.payment(tenant, payment_id).await?.unapplied)
    }

    async fn exposure_of(
        &self,
        tenant: &str,
        customer_id: CustomerId,
    ) -> Result<Option<pb::Exposure>, ApiError> {
        let exposure = self
            .up
            .credit
            .clone()
            .get_exposure(credit_pb::GetExposureRequest {
                tenant_id: tenant.to_owned(),
                customer_id: customer_id.to_string(),
            })
            .await;
        // A customer without a credit account has no exposure to show.
        match exposure {
            Ok(response) => Ok(response.into_inner().exposure.map(convert::exposure)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(from_upstream("credit", status)),
        }
    }

    /// Allocates an unallocated payment to the customer's open invoices,
    /// oldest due first. A retry reuses what an earlier attempt allocated.
    async fn auto_apply(
        &self,
        tenant: &str,
        key: &str,
        customer_id: CustomerId,
        payment: &payments_pb::Payment,
    ) -> Result<Vec<(InvoiceId, Money)>, ApiError> {
        let current = self.payment(tenant, &payment.payment_id).await?;
        let parse = |a: &payments_pb::Allocation| -> Result<(InvoiceId, Money), ApiError> {
            Ok((
                a.invoice_id.parse().map_err(|_| {
                    ApiError::Internal("payments sent an invalid invoice id".into())
                })?,
                proto_money::parse("amount", a.amount.as_ref())
                    .map_err(|e| ApiError::Internal(format!("payments sent {e}")))?,
            ))
        };
        if !current.allocations.is_empty() {
            return current.allocations.iter().map(parse).collect();
        }
        let mut remaining = proto_money::parse("unapplied", current.unapplied.as_ref())
            .map_err(|e| ApiError::Internal(format!("payments sent {e}")))?;
        let open = self
            .up
            .invoicing
            .clone()
            .list_invoices(invoicing_pb::ListInvoicesRequest {
                tenant_id: tenant.to_owned(),
                customer_id: customer_id.to_string(),
                open_only: true,
                page_size: i32::try_from(MAX_ALLOCATIONS).unwrap_or(100),
                ..Default::default()
            })
            .await
            .map_err(|status| from_upstream("invoicing", status))?
            .into_inner()
            .invoices;
        let mut chosen = Vec::new();
        for invoice in open {
            if !remaining.is_positive() {
                break;
            }
            let Ok(owed) = proto_money::parse("amount_open", invoice.amount_open.as_ref()) else {
                continue;
            };
            if owed.currency() != remaining.currency() || !owed.is_positive() {
                continue;
            }
            let take = if owed.minor_units() < remaining.minor_units() {
                owed
            } else {
                remaining
            };
            remaining = remaining
                .checked_sub(&take)
                .map_err(|e| ApiError::Internal(format!("allocation arithmetic: {e}")))?;
            let id = invoice
                .invoice_id
                .parse()
                .map_err(|_| ApiError::Internal("invoicing sent an invalid invoice id".into()))?;
            chosen.push((id, take));
        }
        if chosen.is_empty() {
            return Ok(chosen);
        }
        self.up
            .payments
            .clone()
            .apply_unapplied_cash(payments_pb::ApplyUnappliedCashRequest {
                idempotency_key: derived(key, "auto"),
                tenant_id: tenant.to_owned(),
                payment_id: payment.payment_id.clone(),
                allocations: to_payment_allocations(&chosen),
            })
            .await
            .map_err(|status| from_upstream("payments", status))?;
        Ok(chosen)
    }

    /// Applies a payment's allocations to the invoices and brings their
    /// receivables in credit up to date (the payment's event would too).
    async fn apply_allocations(
        &self,
        tenant: &str,
        key: &str,
        payment_id: &str,
        allocations: &[(InvoiceId, Money)],
        currency: o2c_money::Currency,
    ) -> Result<(Vec<pb::Invoice>, Money), ApiError> {
        let mut invoices = Vec::new();
        let mut discount_total = Money::zero(currency);
        for (invoice_id, value) in allocations {
            let applied = self
                .up
                .invoicing
                .clone()
                .apply_payment(invoicing_pb::ApplyPaymentRequest {
                    idempotency_key: derived(key, &format!("apply:{invoice_id}")),
                    tenant_id: tenant.to_owned(),
                    invoice_id: invoice_id.to_string(),
                    payment_id: payment_id.to_owned(),
                    amount: Some(proto_money::to_proto(value)),
                })
                .await
                .map_err(upstream("invoicing"))?
                .into_inner();
            let discount = match &applied.discount_taken {
                Some(m) => proto_money::parse("discount_taken", Some(m))
                    .map_err(|e| ApiError::Internal(format!("invoicing sent {e}")))?,
                None => Money::zero(value.currency()),
            };
            discount_total = discount_total
                .checked_add(&discount)
                .map_err(|e| ApiError::Internal(format!("discount arithmetic: {e}")))?;
            let invoice = present(applied.invoice, "invoice")?;
            // A paid invoice also re-scores the customer in credit.
            self.sync_receivable(tenant, &invoice).await?;
            invoices.push(convert::invoice(invoice));
        }
        Ok((invoices, discount_total))
    }

    /// Brings credit's receivable of `invoice` up to date at once, so the
    /// caller's next read sees it. The invoice's own event does the same
    /// later (credit keeps whichever is lower), so nothing is lost if this
    /// call is. A customer without a credit account has nothing to track.
    async fn sync_receivable(
        &self,
        tenant: &str,
        invoice: &invoicing_pb::Invoice,
    ) -> Result<(), ApiError> {
        self.up
            .credit
            .clone()
            .sync_receivable(credit_pb::SyncReceivableRequest {
                tenant_id: tenant.to_owned(),
                invoice: Some(invoice.clone()),
            })
            .await
            .map_err(|status| from_upstream("credit", status))?;
        Ok(())
    }

    /// Mirrors a resolved hold on its order: released → approved with the
    /// reservation; rejected → rejected.
    async fn apply_hold(
        &self,
        tenant: &str,
        hold: &credit_pb::Hold,
    ) -> Result<Option<storage::Order>, ApiError> {
        let Ok(order_id) = hold.order_id.parse::<OrderId>() else {
            return Ok(None);
        };
        let order = match self.order(tenant, order_id).await {
            Ok(order) => order,
            Err(ApiError::NotFound(_)) => return Ok(None),
            Err(error) => return Err(error),
        };
        let order = match hold.state() {
            credit_pb::HoldState::Released if order.status == OrderStatus::Held => {
                self.change_order(tenant, order.id, || {
                    storage::record_decision(
                        &self.db,
                        tenant,
                        order.id,
                        OrderStatus::Approved,
                        &[],
                        Some(hold.reservation_id.as_str()),
                        None,
                    )
                })
                .await?
            }
            credit_pb::HoldState::Rejected if order.status == OrderStatus::Held => {
                self.change_order(tenant, order.id, || {
                    storage::set_status(&self.db, tenant, order.id, OrderStatus::Rejected)
                })
                .await?
            }
            _ => order,
        };
        Ok(Some(order))
    }

    /// Re-checks the customer's holds after money came in and approves the
    /// orders whose holds were released.
    async fn recheck_holds(
        &self,
        tenant: &str,
        key: &str,
        customer: CustomerId,
    ) -> Result<(), ApiError> {
        let rechecked = self
            .up
            .credit
            .clone()
            .recheck_holds(credit_pb::RecheckHoldsRequest {
                idempotency_key: derived(key, "recheck"),
                tenant_id: tenant.to_owned(),
                customer_id: customer.to_string(),
            })
            .await;
        let released = match rechecked {
            Ok(response) => response.into_inner().released,
            // No credit account: nothing can be on hold.
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            Err(status) => return Err(from_upstream("credit", status)),
        };
        for hold in &released {
            self.apply_hold(tenant, hold).await?;
        }
        Ok(())
    }
}
