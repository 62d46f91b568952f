//! The payment processor behind automated collections, as a trait, and a
//! simulated processor for tests and the demo.
//!
//! The simulation is deterministic by token: `tok_fail…` always declines,
//! `tok_retry<N>…` declines its first N attempts and then succeeds, any
//! other token succeeds; on top of that an optional latency and a seeded
//! random decline rate make the demo lifelike. Charges are idempotent by
//! key, as real processors' are: a retried charge with the same key
//! returns the first outcome.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use o2c_money::Money;

/// One charge of a mandate.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Same key → same outcome (at most one real charge).
    pub idempotency_key: String,
    pub token: String,
    pub amount: Money,
    /// 1-based attempt of the session.
    pub attempt: u32,
}

/// The processor's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money taken; the processor's reference.
    Succeeded(String),
    /// Declined, with the processor's reason.
    Declined(String),
}

/// A payment processor.
pub trait Processor: Send + Sync {
    fn charge(&self, charge: Charge) -> Pin<Box<dyn Future<Output = ChargeOutcome> + Send + '_>>;
}

/// Settings of the simulated processor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimulatedSettings {
    /// Added to every charge.
    pub latency_ms: u64,
    /// Share of charges (percent) declined at random, besides the tokens.
    pub random_decline_percent: u32,
    /// Seed of the random declines, so a run can be replayed.
    pub seed: u64,
}

impl Default for SimulatedSettings {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            random_decline_percent: 0,
            seed: 1,
        }
    }
}

/// A processor that takes no real money.
pub struct Simulated {
    settings: SimulatedSettings,
    // Outcomes by idempotency key, and the random generator's state.
    state: Mutex<(HashMap<String, ChargeOutcome>, u64)>,
}

/// Most outcomes the simulation remembers for idempotency.
const REMEMBERED_CHARGES: usize = 100_000;

impl Simulated {
    pub fn new(settings: SimulatedSettings) -> Self {
        let seed = settings.seed;
        Self {
            settings,
            state: Mutex::new((HashMap::new(), seed)),
        }
    }

    fn decide(&self, charge: &Charge, random: u64) -> ChargeOutcome {
        let token = charge.token.as_str();
        if token.starts_with("tok_fail") {
            return ChargeOutcome::Declined("insufficient funds".into());
        }
        if let Some(rest) = token.strip_prefix("tok_retry") {
            let declines: u32 = rest
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0);
            if charge.attempt <= declines {
                return ChargeOutcome::Declined("temporarily declined".into());
            }
        }
        if self.settings.random_decline_percent > 0
            && random % 100 < u64::from(self.settings.random_decline_percent)
        {
            return ChargeOutcome::Declined("declined by issuer".into());
        }
        ChargeOutcome::Succeeded(format!("sim_{}", charge.idempotency_key))
    }
}

impl Processor for Simulated {
    fn charge(&self, charge: Charge) -> Pin<Box<dyn Future<Output = ChargeOutcome> + Send + '_>> {
        Box::pin(async move {
            if self.settings.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
            }
            let Ok(mut state) = self.state.lock() else {
                return ChargeOutcome::Declined("processor unavailable".into());
            };
            let (remembered, rng) = &mut *state;
            if let Some(outcome) = remembered.get(&charge.idempotency_key) {
                return outcome.clone();
            }
            // splitmix64
            *rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let outcome = self.decide(&charge, z ^ (z >> 31));
            if remembered.len() >= REMEMBERED_CHARGES {
                remembered.clear();
            }
            remembered.insert(charge.idempotency_key.clone(), outcome.clone());
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(token: &str, attempt: u32) -> Charge {
        Charge {
            idempotency_key: format!("{token}-{attempt}"),
            token: token.into(),
            amount: Money::parse("10", "EUR").unwrap(),
            attempt,
        }
    }

    #[tokio::test]
    async fn tokens_decide_deterministically() {
        let p = Simulated::new(SimulatedSettings::default());
        assert!(matches!(
            p.charge(charge("tok_ok", 1)).await,
            ChargeOutcome::Succeeded(_)
        ));
        assert!(matches!(
            p.charge(charge("tok_fail", 5)).await,
            ChargeOutcome::Declined(_)
        ));
        assert!(matches!(
            p.charge(charge("tok_retry2x", 2)).await,
            ChargeOutcome::Declined(_)
        ));
        assert!(matches!(
            p.charge(charge("tok_retry2x", 3)).await,
            ChargeOutcome::Succeeded(_)
        ));
    }

    #[tokio::test]
    async fn a_retried_charge_returns_the_first_outcome() {
        let p = Simulated::new(SimulatedSettings {
            random_decline_percent: 50,
            ..Default::default()
        });
        for attempt in 1..20 {
            let first = p.charge(charge("tok_any", attempt)).await;
            assert_eq!(p.charge(charge("tok_any", attempt)).await, first);
        }
    }
}
