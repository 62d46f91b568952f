//! The Redis cache of exposure snapshots.
//!
//! Redis is never the authority: decisions read the database. The cache
//! serves `GetExposure`. Every write is versioned (a Lua script keeps the
//! higher version), so a slow writer can never replace a newer snapshot
//! with an older one; entries also expire, bounding how long a missed
//! update can linger. Every Redis failure is logged and treated as a miss.

use redis::aio::ConnectionManager;
use tracing::Instrument;

use crate::domain::Exposure;

/// How long a snapshot lives without being refreshed.
pub const ENTRY_TTL_MS: u64 = 60_000;

const PUT_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// How often a service that started while Redis was down tries again.
pub const RECONNECT_INTERVAL_MS: u64 = 1_000;

#[derive(Clone)]
pub struct ExposureCache {
    // None when no Redis is configured, or until it is first reached.
    redis: std::sync::Arc<std::sync::RwLock<Option<ConnectionManager>>>,
    script: redis::Script,
}

impl ExposureCache {
    pub fn new(redis: Option<ConnectionManager>) -> Self {
        Self {
            redis: std::sync::Arc::new(std::sync::RwLock::new(redis)),
            script: redis::Script::new(PUT_IF_NEWER),
        }
    }

    /// A cache on Redis at `url`. When Redis cannot be reached now, the
    /// service starts without the cache and keeps trying in the background;
    /// once connected, the manager reconnects by itself after failures.
    pub async fn connect(url: &str) -> Self {
        match o2c_kit::cache::connect(url).await {
            Ok(connection) => Self::new(Some(connection)),
            Err(error) => {
                tracing::warn!(%error, "Redis unreachable; exposure reads go to the database until it is back");
                let cache = Self::new(None);
                let slot = cache.redis.clone();
                let url = url.to_owned();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(
                        RECONNECT_INTERVAL_MS,
                    ));
                    loop {
                        ticker.tick().await;
                        if let Ok(connection) = o2c_kit::cache::connect(&url).await {
                            if let Ok(mut guard) = slot.write() {
                                *guard = Some(connection);
                            }
                            tracing::info!("Redis reached; exposure cache enabled");
                            return;
                        }
                    }
                });
                cache
            }
        }
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.redis.read().ok().and_then(|guard| guard.clone())
    }

    pub fn enabled(&self) -> bool {
        self.connection().is_some()
    }

    fn key(tenant_id: &str, exposure_customer: &str) -> String {
        format!("o2c:credit:exposure:{tenant_id}:{exposure_customer}")
    }

    /// The cached snapshot, or None on a miss or any failure.
    pub async fn get(&self, tenant_id: &str, customer_id: &str) -> Option<Exposure> {
        let mut redis = self.connection()?;
        let key = Self::key(tenant_id, customer_id);
        let span = o2c_kit::cache::span("HGET");
        let read = redis::cmd("HGET")
            .arg(&key)
            .arg("value")
            .query_async::<Option<String>>(&mut redis)
            .instrument(span.clone())
            .await;
        match read {
            Ok(value) => {
                let found = value.as_deref().and_then(Exposure::from_cache_value);
                span.record("cache.hit", found.is_some());
                o2c_kit::metrics::cache_lookup(
                    "credit.exposure",
                    if found.is_some() { "hit" } else { "miss" },
                );
                found
            }
            Err(error) => {
                o2c_kit::metrics::cache_lookup("credit.exposure", "error");
                tracing::warn!(%error, "exposure cache read failed; using the database");
                None
            }
        }
    }

    /// Stores `exposure` unless a newer version is already cached.
    pub async fn put(&self, tenant_id: &str, exposure: &Exposure) {
        self.put_all(tenant_id, std::slice::from_ref(exposure))
            .await
    }

    /// Stores each of `exposures` unless a newer version of it is already
    /// cached: one pipelined round trip.
    pub async fn put_all(&self, tenant_id: &str, exposures: &[Exposure]) {
        if exposures.is_empty() {
            return;
        }
        let Some(mut redis) = self.connection() else {
            return;
        };
        let invocations: Vec<redis::ScriptInvocation<'_>> = exposures
            .iter()
            .map(|exposure| {
                let mut invocation = self.script.prepare_invoke();
                invocation
                    .key(Self::key(tenant_id, &exposure.customer_id.to_string()))
                    .arg(exposure.version)
                    .arg(exposure.to_cache_value())
                    .arg(ENTRY_TTL_MS);
                invocation
            })
            .collect();
        let mut pipe = redis::pipe();
        // Loading is idempotent and cheap; it spares a NOSCRIPT round trip
        // after a Redis restart.
        pipe.load_script(&self.script).ignore();
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        let result = pipe
            .query_async::<()>(&mut redis)
            .instrument(o2c_kit::cache::span("EVALSHA"))
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "exposure cache write failed");
        }
    }
}
