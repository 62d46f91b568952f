//! Per-tenant request budgets: a token bucket per tenant, kept in Redis so
//! every gateway replica spends from the same one. Redis refills and spends
//! in one script on its own clock, so replicas need not agree on the time.
//! When Redis cannot be reached each replica falls back to a bucket of its
//! own (the limit then holds per replica) rather than refusing everyone or
//! letting everyone through.
//!
//! A replica takes tokens from the shared bucket in leases of up to
//! [`LEASE_SPAN`] of the tenant's budget (one token for budgets under 20
//! calls per second) and spends them locally, so a busy tenant's calls do
//! not each wait for Redis. Leased tokens are already spent from the shared
//! bucket, so replicas together never admit more than it allows; a lease
//! unused for [`LEASE_LIFETIME`] lapses. One call per replica and tenant
//! fetches the next lease; the others take a single token meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use o2c_kit::ApiError;
use o2c_kit::settings::SettingsError;

/// A budget: `per_second` calls sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Budget {
    pub per_second: f64,
    pub burst: f64,
}

/// The budgets of all tenants.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateLimitSettings {
    /// Every tenant's budget unless listed in `tenants`.
    pub default: Budget,
    /// Budgets of particular tenants.
    pub tenants: BTreeMap<String, Budget>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            default: Budget {
                per_second: 200.0,
                burst: 400.0,
            },
            tenants: BTreeMap::new(),
        }
    }
}

impl RateLimitSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        let check = |key: String, budget: &Budget| {
            if budget.per_second > 0.0
                && budget.per_second <= 1_000_000.0
                && budget.burst >= 1.0
                && budget.burst <= 10_000_000.0
            {
                Ok(())
            } else {
                Err(SettingsError::Invalid {
                    key,
                    reason: "per_second 0 to 1000000 (exclusive of 0), burst 1 to 10000000".into(),
                })
            }
        };
        check("auth.rate_limit.default".into(), &self.default)?;
        for (tenant, budget) in &self.tenants {
            check(format!("auth.rate_limit.tenants.{tenant}"), budget)?;
        }
        Ok(())
    }

    fn budget(&self, tenant: &str) -> Budget {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }
}

/// Refill, then take up to `ARGV[3]` tokens, as many as there are. Returns
/// `{tokens taken, milliseconds until a token}`.
const SPEND: &str = r"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - at) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  allowed = math.min(want, math.floor(tokens))
  tokens = tokens - allowed
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
";

struct LocalBucket {
    tokens: f64,
    at: Instant,
}

/// The share of a tenant's per-second budget a replica leases at a time.
pub const LEASE_SPAN: Duration = Duration::from_millis(50);
/// How long leased tokens stay spendable.
pub const LEASE_LIFETIME: Duration = Duration::from_secs(1);

/// Tokens leased from the shared bucket, not spent yet.
struct Lease {
    tokens: u64,
    taken_at: Instant,
    /// A call is fetching the next lease: the others take one token each
    /// meanwhile, so concurrent calls do not each lease (and strand) a
    /// span of the budget.
    fetching: bool,
}

/// Ends a lease fetch however the fetching call ends (also when it is
/// cancelled mid-way), keeping what it brought.
struct Fetching<'a> {
    limiter: &'a RateLimiter,
    tenant: &'a str,
    brought: u64,
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.limiter.keep_leased(self.tenant, self.brought);
    }
}

fn lease_size(budget: Budget) -> u64 {
    (budget.per_second * LEASE_SPAN.as_secs_f64())
        .min(budget.burst)
        .floor()
        .max(1.0) as u64
}

/// How often a limiter without a Redis connection tries to make one.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(5);

/// Spends from tenants' budgets.
pub struct RateLimiter {
    settings: RateLimitSettings,
    redis_url: Option<String>,
    /// The shared connection, once made (it reconnects by itself after).
    redis: std::sync::RwLock<Option<redis::aio::ConnectionManager>>,
    /// When making it was last tried; held while one call tries.
    connecting: tokio::sync::Mutex<Option<Instant>>,
    script: redis::Script,
    local: Mutex<HashMap<String, LocalBucket>>,
    leases: Mutex<HashMap<String, Lease>>,
}

impl RateLimiter {
    /// A limiter sharing its buckets through `redis_url` (local buckets
    /// only without one, or while Redis is unreachable).
    pub fn new(settings: RateLimitSettings, redis_url: Option<&str>) -> Self {
        Self {
            settings,
            redis_url: redis_url.map(str::to_owned),
            redis: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(None),
            script: redis::Script::new(SPEND),
            local: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// The shared connection, (re)connecting at most every
    /// [`RECONNECT_EVERY`].
    async fn shared(&self) -> Option<redis::aio::ConnectionManager> {
        let url = self.redis_url.as_deref()?;
        if let Some(manager) = self.redis.read().ok().and_then(|made| made.clone()) {
            return Some(manager);
        }
        // While one call connects, the others do not wait for it: they
        // spend from the local bucket.
        let mut tried = self.connecting.try_lock().ok()?;
        if tried.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return None;
        }
        *tried = Some(Instant::now());
        match o2c_kit::cache::connect(url).await {
            Ok(manager) => {
                if let Ok(mut made) = self.redis.write() {
                    *made = Some(manager.clone());
                }
                Some(manager)
            }
            Err(error) => {
                tracing::warn!(%error, "rate limits kept per replica: Redis unreachable");
                None
            }
        }
    }

    /// Spends one call of `tenant`'s budget, or says how long to wait.
    pub async fn spend(&self, tenant: &str) -> Result<(), ApiError> {
        if self.spend_leased(tenant) {
            return Ok(());
        }
        let budget = self.settings.budget(tenant);
        let outcome = match self.shared().await {
            Some(mut redis) => {
                let mut fetching = self.start_fetch(tenant).then_some(Fetching {
                    limiter: self,
                    tenant,
                    brought: 0,
                });
                let want = if fetching.is_some() {
                    lease_size(budget)
                } else {
                    1
                };
                let shared: Result<(u64, i64), redis::RedisError> = self
                    .script
                    .key(format!("o2c:gateway:rate:{tenant}"))
                    .arg(budget.per_second)
                    .arg(budget.burst)
                    .arg(want)
                    .invoke_async(&mut redis)
                    .instrument(o2c_kit::cache::span("EVALSHA"))
                    .await;
                match shared {
                    Ok((taken, wait_ms)) => {
                        // One for this call; the rest for the next ones.
                        if let Some(fetching) = fetching.as_mut() {
                            fetching.brought = taken.saturating_sub(1);
                        }
                        Some((taken >= 1, wait_ms))
                    }
                    // The manager reconnects by itself; meanwhile, locally.
                    Err(error) => {
                        tracing::warn!(%error, "shared rate limit unavailable; limiting per replica");
                        None
                    }
                }
            }
            None => None,
        };
        let (allowed, wait_ms) = match outcome {
            Some(outcome) => outcome,
            None => self.spend_locally(tenant, budget),
        };
        // The shared bucket was empty, but a call that fetched a lease
        // meanwhile may have brought back a token this call can have.
        if allowed || self.spend_leased(tenant) {
            Ok(())
        } else {
            let wait = Duration::from_millis(u64::try_from(wait_ms.max(1)).unwrap_or(1));
            Err(ApiError::ResourceExhausted {
                message: format!(
                    "tenant {tenant} is over its budget of {} calls per second; retry in {} ms",
                    budget.per_second,
                    wait.as_millis()
                ),
                retry_after: wait,
            })
        }
    }

    /// Spends a leased token of `tenant`'s, if one is left and fresh.
    fn spend_leased(&self, tenant: &str) -> bool {
        let Ok(mut leases) = self.leases.lock() else {
            return false;
        };
        match leases.get_mut(tenant) {
            Some(lease) if lease.tokens > 0 && lease.taken_at.elapsed() < LEASE_LIFETIME => {
                lease.tokens -= 1;
                true
            }
            _ => false,
        }
    }

    /// True when no other call of this replica is fetching `tenant`'s next
    /// lease: this one does.
    fn start_fetch(&self, tenant: &str) -> bool {
        let Ok(mut leases) = self.leases.lock() else {
            return false;
        };
        let lease = leases.entry(tenant.to_owned()).or_insert(Lease {
            tokens: 0,
            taken_at: Instant::now(),
            fetching: false,
        });
        !std::mem::replace(&mut lease.fetching, true)
    }

    /// Ends a fetch, keeping the `tokens` it brought.
    fn keep_leased(&self, tenant: &str, tokens: u64) {
        let Ok(mut leases) = self.leases.lock() else {
            return;
        };
        let Some(lease) = leases.get_mut(tenant) else {
            return;
        };
        lease.fetching = false;
        if tokens == 0 {
            return;
        }
        if lease.taken_at.elapsed() >= LEASE_LIFETIME {
            lease.tokens = 0;
        }
        lease.tokens += tokens;
        lease.taken_at = Instant::now();
    }

    fn spend_locally(&self, tenant: &str, budget: Budget) -> (bool, i64) {
        let Ok(mut buckets) = self.local.lock() else {
            return (true, 0);
        };
        let now = Instant::now();
        let bucket = buckets.entry(tenant.to_owned()).or_insert(LocalBucket {
            tokens: budget.burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * budget.per_second;
        bucket.tokens = (bucket.tokens + refill).min(budget.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            (true, 0)
        } else {
            let wait = ((1.0 - bucket.tokens) * 1000.0 / budget.per_second).ceil();
            (false, wait as i64)
        }
    }
}
