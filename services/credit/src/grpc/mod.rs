//! The gRPC face of the credit service: the only module that knows prost
//! types. Validates requests, runs each mutation idempotently in one
//! database transaction, refreshes the exposure cache after commit, and
//! maps every error to a status.

use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::Money;
use o2c_money::ids::{CustomerId, InvoiceId, ReservationId};
use o2c_proto::credit::v1 as pb;
use o2c_proto::credit::v1::credit_service_server::CreditService;
use prost::Message;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::domain::{self, CreditError, Exposure, Outcome, Reason};
use crate::storage::{self, Account, DecisionRecord, Reservation, cache::ExposureCache};

/// Longest order id accepted from callers.
pub const MAX_ORDER_ID_LENGTH: usize = 100;
/// Longest reason text on limit changes and releases.
pub const MAX_REASON_LENGTH: usize = 500;

/// Serves `o2c.credit.v1.CreditService`.
#[derive(Clone)]
pub struct CreditApi {
    db: DatabaseConnection,
    cache: ExposureCache,
}

impl CreditApi {
    pub fn new(db: DatabaseConnection, cache: ExposureCache) -> Self {
        Self { db, cache }
    }
}

impl From<CreditError> for ApiError {
    fn from(error: CreditError) -> Self {
        let message = error.to_string();
        match error {
            CreditError::AccountExists(_) => ApiError::AlreadyExists(message),
            CreditError::NoAccount(_) => ApiError::NotFound(message),
            CreditError::CurrencyMismatch { .. } => {
                ApiError::invalid("amount.currency_code", message)
            }
            CreditError::OrderAlreadyReserved(_) => ApiError::AlreadyExists(message),
            CreditError::ReservationNotOpen(_) => ApiError::FailedPrecondition(message),
            CreditError::InvoiceExceedsReservation { .. } => ApiError::FailedPrecondition(message),
            CreditError::ReceivableExists(_) => ApiError::AlreadyExists(message),
            CreditError::SettlementExceedsOpen { .. } => ApiError::FailedPrecondition(message),
            CreditError::Money(_) => ApiError::Internal(message),
        }
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

fn same_currency(field: &str, amount: &Money, account: &Account) -> Result<(), ApiError> {
    if amount.currency() == account.exposure.currency {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("{field}.currency_code"),
            format!(
                "must be the credit account currency {}",
                account.exposure.currency
            ),
        ))
    }
}

fn money(exposure: &Exposure, minor: i64) -> Result<o2c_proto::common::v1::Money, ApiError> {
    let value = exposure.money(minor).map_err(CreditError::from)?;
    Ok(proto_money::to_proto(&value))
}

fn exposure_to_proto(exposure: &Exposure) -> Result<pb::Exposure, ApiError> {
    Ok(pb::Exposure {
        customer_id: exposure.customer_id.to_string(),
        credit_limit: Some(money(exposure, exposure.limit_minor)?),
        reserved: Some(money(exposure, exposure.reserved_minor)?),
        receivables: Some(money(exposure, exposure.receivable_minor)?),
        total: Some(money(exposure, exposure.total_minor())?),
        available: Some(money(exposure, exposure.available_minor())?),
        version: exposure.version,
    })
}

fn account_to_proto(account: &Account) -> Result<pb::CreditAccount, ApiError> {
    Ok(pb::CreditAccount {
        credit_account_id: account.id.to_string(),
        tenant_id: account.tenant_id.clone(),
        customer_id: account.exposure.customer_id.to_string(),
        currency_code: account.exposure.currency.code().to_owned(),
        exposure: Some(exposure_to_proto(&account.exposure)?),
    })
}

fn reservation_to_proto(
    reservation: &Reservation,
    exposure: &Exposure,
) -> Result<pb::Reservation, ApiError> {
    let state = match reservation.state.as_str() {
        storage::STATE_OPEN => pb::ReservationState::Open,
        storage::STATE_CONVERTED => pb::ReservationState::Converted,
        storage::STATE_RELEASED => pb::ReservationState::Released,
        _ => pb::ReservationState::Unspecified,
    };
    Ok(pb::Reservation {
        reservation_id: reservation.id.to_string(),
        customer_id: reservation.customer_id.to_string(),
        order_id: reservation.order_id.clone(),
        amount: Some(money(exposure, reservation.amount_minor)?),
        state: state as i32,
        invoice_id: reservation.invoice_id.clone().unwrap_or_default(),
    })
}

fn outcome_to_proto(outcome: Outcome) -> pb::Decision {
    match outcome {
        Outcome::Approve => pb::Decision::Approve,
        Outcome::Hold => pb::Decision::Hold,
        Outcome::Block => pb::Decision::Block,
    }
}

fn reason_to_proto(reason: Reason) -> pb::ReasonCode {
    match reason {
        Reason::OverLimit => pb::ReasonCode::OverLimit,
        Reason::NoCreditAccount => pb::ReasonCode::NoCreditAccount,
    }
}

impl CreditApi {
    async fn begin<R: Message + Default>(
        &self,
        scope: &str,
        key: &str,
        bytes: &[u8],
    ) -> Result<Begun<R>, ApiError> {
        idempotency::begin(&self.db, scope, key, bytes).await
    }
}

#[tonic::async_trait]
impl CreditService for CreditApi {
    async fn open_credit_account(
        &self,
        request: Request<pb::OpenCreditAccountRequest>,
    ) -> Result<Response<pb::OpenCreditAccountResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let currency = v.check(proto_money::parse_currency(
            "currency_code",
            &request.currency_code,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(currency)) = (tenant, customer, currency) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.OpenCreditAccount");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account = storage::open_account(&txn, &tenant, customer, currency).await?;
        let response = pb::OpenCreditAccountResponse {
            credit_account: Some(account_to_proto(&account)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        self.cache.put(&tenant, &account.exposure).await;
        Ok(Response::new(response))
    }

    async fn set_credit_limit(
        &self,
        request: Request<pb::SetCreditLimitRequest>,
    ) -> Result<Response<pb::SetCreditLimitResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let limit = v.check(proto_money::parse(
            "credit_limit",
            request.credit_limit.as_ref(),
        ));
        if let Some(limit) = &limit
            && limit.is_negative()
        {
            v.check::<()>(Err(ApiError::invalid(
                "credit_limit.amount",
                "must not be negative",
            )));
        }
        let reason = v.check(fields::optional_text(
            "reason",
            &request.reason,
            MAX_REASON_LENGTH,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(limit), Some(reason)) =
            (tenant, customer, limit, reason)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.SetCreditLimit");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account = storage::require_account(&txn, &tenant, customer).await?;
        same_currency("credit_limit", &limit, &account)?;
        let account = storage::set_limit(&txn, &account, limit.minor_units(), &reason).await?;
        let response = pb::SetCreditLimitResponse {
            credit_account: Some(account_to_proto(&account)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        self.cache.put(&tenant, &account.exposure).await;
        Ok(Response::new(response))
    }

    async fn check_and_reserve(
        &self,
        request: Request<pb::CheckAndReserveRequest>,
    ) -> Result<Response<pb::CheckAndReserveResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let order = v.check(fields::text(
            "order_id",
            &request.order_id,
            MAX_ORDER_ID_LENGTH,
        ));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(order), Some(amount)) =
            (tenant, customer, order, amount)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.CheckAndReserve");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let amount_minor = amount.minor_units();
        // An order is checked once; changing its amount is an amendment.
        if storage::order_has_reservation(&txn, &tenant, &order).await? {
            return Err(ApiError::from(CreditError::OrderAlreadyReserved(order)).into());
        }
        let account = storage::find_account(&txn, &tenant, customer).await?;
        let (decision, after) = match account {
            None => {
                let (outcome, reasons) = domain::decide(None, amount_minor);
                let id = storage::insert_decision(
                    &txn,
                    &DecisionRecord {
                        tenant_id: &tenant,
                        customer_id: customer,
                        order_id: &order,
                        amount_minor,
                        currency: amount.currency(),
                        outcome,
                        reasons: &reasons,
                        reservation_id: None,
                        inputs: None,
                    },
                )
                .await?;
                let decision = pb::CreditDecision {
                    decision_id: id.to_string(),
                    decision: outcome_to_proto(outcome) as i32,
                    reasons: reasons.iter().map(|r| reason_to_proto(*r) as i32).collect(),
                    reservation_id: String::new(),
                    exposure: None,
                    policy_version: domain::POLICY_VERSION.to_owned(),
                };
                (decision, None)
            }
            Some(account) => {
                same_currency("amount", &amount, &account)?;
                let reserved = storage::try_reserve(&txn, account.id, amount_minor).await?;
                let reservation = if reserved {
                    Some(storage::insert_reservation(&txn, &account, &order, amount_minor).await?)
                } else {
                    None
                };
                let after = storage::account_by_id(&txn, &account.id.to_string()).await?;
                // The exposure the decision was taken against: what it was
                // just before our own reservation.
                let mut inputs = after.exposure;
                if reserved {
                    inputs.reserved_minor -= amount_minor;
                }
                let (outcome, reasons) = domain::decide(Some(&inputs), amount_minor);
                if (outcome == Outcome::Approve) != reserved {
                    return Err(ApiError::Internal(format!(
                        "policy and atomic reservation disagree for account {}",
                        account.id
                    ))
                    .into());
                }
                let id = storage::insert_decision(
                    &txn,
                    &DecisionRecord {
                        tenant_id: &tenant,
                        customer_id: customer,
                        order_id: &order,
                        amount_minor,
                        currency: amount.currency(),
                        outcome,
                        reasons: &reasons,
                        reservation_id: reservation.as_ref().map(|r| r.id),
                        inputs: Some(&inputs),
                    },
                )
                .await?;
                let decision = pb::CreditDecision {
                    decision_id: id.to_string(),
                    decision: outcome_to_proto(outcome) as i32,
                    reasons: reasons.iter().map(|r| reason_to_proto(*r) as i32).collect(),
                    reservation_id: reservation.map(|r| r.id.to_string()).unwrap_or_default(),
                    exposure: Some(exposure_to_proto(&after.exposure)?),
                    policy_version: domain::POLICY_VERSION.to_owned(),
                };
                (decision, Some(after.exposure))
            }
        };
        tracing::info!(
            decision = ?pb::Decision::try_from(decision.decision).unwrap_or_default(),
            reasons = ?decision.reasons,
            "credit decision"
        );
        let response = pb::CheckAndReserveResponse {
            decision: Some(decision),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        if let Some(after) = after {
            self.cache.put(&tenant, &after).await;
        }
        Ok(Response::new(response))
    }

    async fn convert_reservation(
        &self,
        request: Request<pb::ConvertReservationRequest>,
    ) -> Result<Response<pb::ConvertReservationResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let reservation_id = v.check(fields::id::<ReservationId>(
            "reservation_id",
            &request.reservation_id,
        ));
        let invoice = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        let amount = v.check(proto_money::parse_positive(
            "invoice_amount",
            request.invoice_amount.as_ref(),
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(reservation_id), Some(invoice), Some(amount)) =
            (tenant, reservation_id, invoice, amount)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ConvertReservation");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let reservation = storage::get_reservation(&txn, &tenant, reservation_id).await?;
        let account = storage::account_by_id(&txn, &reservation.account_id).await?;
        same_currency("invoice_amount", &amount, &account)?;
        if amount.minor_units() > reservation.amount_minor {
            return Err(ApiError::from(CreditError::InvoiceExceedsReservation {
                invoice: amount,
                reserved: account
                    .exposure
                    .money(reservation.amount_minor)
                    .map_err(|e| ApiError::from(CreditError::from(e)))?,
            })
            .into());
        }
        let (reservation, account) = storage::convert(
            &txn,
            &tenant,
            &reservation,
            &invoice.to_string(),
            amount.minor_units(),
        )
        .await?;
        let response = pb::ConvertReservationResponse {
            reservation: Some(reservation_to_proto(&reservation, &account.exposure)?),
            exposure: Some(exposure_to_proto(&account.exposure)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        self.cache.put(&tenant, &account.exposure).await;
        Ok(Response::new(response))
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let reservation_id = v.check(fields::id::<ReservationId>(
            "reservation_id",
            &request.reservation_id,
        ));
        v.check(fields::optional_text(
            "reason",
            &request.reason,
            MAX_REASON_LENGTH,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(reservation_id)) = (tenant, reservation_id) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ReleaseReservation");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let reservation = storage::get_reservation(&txn, &tenant, reservation_id).await?;
        let (reservation, account) = storage::release(&txn, &tenant, &reservation).await?;
        let response = pb::ReleaseReservationResponse {
            reservation: Some(reservation_to_proto(&reservation, &account.exposure)?),
            exposure: Some(exposure_to_proto(&account.exposure)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        self.cache.put(&tenant, &account.exposure).await;
        Ok(Response::new(response))
    }

    async fn settle_receivable(
        &self,
        request: Request<pb::SettleReceivableRequest>,
    ) -> Result<Response<pb::SettleReceivableResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let invoice = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(invoice), Some(amount)) = (tenant, invoice, amount) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.SettleReceivable");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account = storage::settle(&txn, &tenant, &invoice.to_string(), amount).await?;
        let response = pb::SettleReceivableResponse {
            exposure: Some(exposure_to_proto(&account.exposure)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        self.cache.put(&tenant, &account.exposure).await;
        Ok(Response::new(response))
    }

    async fn get_exposure(
        &self,
        request: Request<pb::GetExposureRequest>,
    ) -> Result<Response<pb::GetExposureResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.finish()?;
        let (Some(tenant), Some(customer)) = (tenant, customer) else {
            return Err(missing().into());
        };
        let exposure = match self.cache.get(&tenant, &customer.to_string()).await {
            Some(cached) => cached,
            None => {
                let account = storage::require_account(&self.db, &tenant, customer).await?;
                self.cache.put(&tenant, &account.exposure).await;
                account.exposure
            }
        };
        Ok(Response::new(pb::GetExposureResponse {
            exposure: Some(exposure_to_proto(&exposure)?),
        }))
    }

    async fn recompute_exposure(
        &self,
        request: Request<pb::RecomputeExposureRequest>,
    ) -> Result<Response<pb::RecomputeExposureResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.finish()?;
        let (Some(tenant), Some(customer)) = (tenant, customer) else {
            return Err(missing().into());
        };
        // One transaction so counters and ledger are read at one instant.
        let txn = sea_orm::TransactionTrait::begin(&self.db)
            .await
            .map_err(ApiError::from)?;
        let account = storage::require_account(&txn, &tenant, customer).await?;
        let recomputed = storage::recompute(&txn, &account).await?;
        txn.commit().await.map_err(ApiError::from)?;
        let consistent = recomputed == account.exposure;
        if !consistent {
            tracing::error!(
                customer = %customer,
                stored = ?account.exposure,
                ledger = ?recomputed,
                "stored exposure differs from the ledger"
            );
        }
        Ok(Response::new(pb::RecomputeExposureResponse {
            stored: Some(exposure_to_proto(&account.exposure)?),
            recomputed: Some(exposure_to_proto(&recomputed)?),
            consistent,
        }))
    }
}
