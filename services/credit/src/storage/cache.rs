//! The Redis cache of exposure snapshots.
//!
//! Redis is never the authority: decisions read the database. The cache
//! serves `GetExposure`. Every write is versioned (a Lua script keeps the
//! higher version), so a slow writer can never replace a newer snapshot
//! with an older one; entries also expire, bounding how long a missed
//! update can linger. Every Redis failure is logged and treated as a miss.
//!
//! A batch of credit checks answers before its cache write lands (it writes
//! while its callers read their answers). So that a caller never reads a
//! snapshot older than an answer it got, the cache first notes the versions
//! it is about to write ([`ExposureCache::begin_writes`]), and reads a
//! customer with a noted version from the database until Redis has taken
//! a write of that version or a newer one (a failed write leaves the note).
//! This holds for reads served by the same process (up to
//! [`MAX_NOTED_WRITES`] notes); another replica may serve the older
//! snapshot until the write lands (typically well under a millisecond;
//! Redis commands time out after 250 ms), as it may after a failed write
//! until the entry expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// The newest version of each key that may have been answered already
    /// but is not known to be in Redis; reads of these keys go to the
    /// database. Kept only when a Redis is configured.
    writing: Arc<Mutex<HashMap<String, i64>>>,
    configured: bool,
}

/// Most keys [`ExposureCache::begin_writes`] keeps noted (Redis away for
/// long while many customers change); past that it forgets them all, and
/// those customers may be served their older snapshots until they expire.
pub const MAX_NOTED_WRITES: usize = 100_000;

impl ExposureCache {
    /// A cache on `redis`; None: no Redis configured, no cache.
    pub fn new(redis: Option<ConnectionManager>) -> Self {
        let configured = redis.is_some();
        Self::with(redis, configured)
    }

    fn with(redis: Option<ConnectionManager>, configured: bool) -> Self {
        Self {
            redis: std::sync::Arc::new(std::sync::RwLock::new(redis)),
            script: redis::Script::new(PUT_IF_NEWER),
            writing: Arc::default(),
            configured,
        }
    }

    /// A cache on Redis at `url`. When Redis cannot be reached now, the
    /// service starts without the cache and keeps trying in the background
    /// for as long as the cache is in use (the task ends once every clone
    /// is dropped, as when the service stops); once connected, the manager
    /// reconnects by itself after failures.
    pub async fn connect(url: &str) -> Self {
        Self::connect_every(url, std::time::Duration::from_millis(RECONNECT_INTERVAL_MS)).await
    }

    /// [`Self::connect`], trying again every `interval`.
    async fn connect_every(url: &str, interval: std::time::Duration) -> Self {
        match o2c_kit::cache::connect(url).await {
            Ok(connection) => Self::new(Some(connection)),
            Err(error) => {
                tracing::warn!(%error, "Redis unreachable; exposure reads go to the database until it is back");
                let cache = Self::with(None, true);
                let slot = Arc::downgrade(&cache.redis);
                let url = url.to_owned();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(interval);
                    loop {
                        ticker.tick().await;
                        if slot.strong_count() == 0 {
                            return;
                        }
                        if let Ok(connection) = o2c_kit::cache::connect(&url).await {
                            let Some(slot) = slot.upgrade() else {
                                return;
                            };
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

    fn writing(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // Every change is one insert or removal: consistent whatever a
        // panicking holder did.
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `exposures` are about to be written ([`Self::put_all`]
    /// ends it): until then, their customers are read from the database.
    /// Call it before answering for them.
    pub fn begin_writes(&self, tenant_id: &str, exposures: &[Exposure]) {
        // Noted even while Redis is away: it may be back before a write
        // lands.
        if exposures.is_empty() || !self.configured {
            return;
        }
        let mut writing = self.writing();
        if writing.len() >= MAX_NOTED_WRITES {
            tracing::warn!(
                noted = writing.len(),
                "too many exposure snapshots not yet in the cache; forgetting which"
            );
            writing.clear();
        }
        for exposure in exposures {
            let version = writing
                .entry(Self::key(tenant_id, &exposure.customer_id.to_string()))
                .or_insert(exposure.version);
            *version = (*version).max(exposure.version);
        }
    }

    /// The cached snapshot, or None on a miss, while a newer snapshot of
    /// the customer is being written, or on any failure.
    pub async fn get(&self, tenant_id: &str, customer_id: &str) -> Option<Exposure> {
        let mut redis = self.connection()?;
        let key = Self::key(tenant_id, customer_id);
        if self.writing().contains_key(&key) {
            return None;
        }
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
    /// cached: one pipelined round trip. When Redis took them, ends the
    /// notes of [`Self::begin_writes`] up to these versions; otherwise the
    /// notes stay, and reads of those customers keep going to the database
    /// (whose read writes the snapshot again).
    pub async fn put_all(&self, tenant_id: &str, exposures: &[Exposure]) {
        if exposures.is_empty() || !self.write_all(tenant_id, exposures).await {
            return;
        }
        let mut writing = self.writing();
        if writing.is_empty() {
            return;
        }
        for exposure in exposures {
            let key = Self::key(tenant_id, &exposure.customer_id.to_string());
            if writing
                .get(&key)
                .is_some_and(|noted| *noted <= exposure.version)
            {
                writing.remove(&key);
            }
        }
    }

    /// Whether Redis took the write.
    async fn write_all(&self, tenant_id: &str, exposures: &[Exposure]) -> bool {
        let Some(mut redis) = self.connection() else {
            return false;
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
        match result {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "exposure cache write failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use o2c_money::ids::CustomerId;

    fn snapshot(customer: CustomerId, version: i64) -> Exposure {
        Exposure {
            customer_id: customer,
            currency: o2c_money::Currency::from_code("EUR").unwrap(),
            limit_minor: 50_000,
            reserved_minor: version * 100,
            receivable_minor: 0,
            version,
        }
    }

    #[tokio::test]
    async fn a_customer_whose_newer_snapshot_is_being_written_is_not_read_from_the_cache() {
        let Some(url) = o2c_testkit::redis_url().await else {
            return;
        };
        let cache = ExposureCache::connect(&url).await;
        assert!(cache.enabled());
        let tenant = format!("t-{}", uuid::Uuid::new_v4());
        let (customer, other) = (CustomerId::new(), CustomerId::new());
        let id = customer.to_string();
        cache
            .put_all(&tenant, &[snapshot(customer, 5), snapshot(other, 1)])
            .await;
        assert_eq!(cache.get(&tenant, &id).await, Some(snapshot(customer, 5)));

        // Version 6 is answered for before it reaches Redis: the cached 5
        // is not served meanwhile; another customer still is.
        cache.begin_writes(&tenant, &[snapshot(customer, 6)]);
        assert_eq!(cache.get(&tenant, &id).await, None);
        assert_eq!(
            cache.get(&tenant, &other.to_string()).await,
            Some(snapshot(other, 1))
        );
        // A later write of the same customer begins before the first ends:
        // ending the first does not end the second.
        cache.begin_writes(&tenant, &[snapshot(customer, 7)]);
        cache.put_all(&tenant, &[snapshot(customer, 6)]).await;
        assert_eq!(cache.get(&tenant, &id).await, None);
        cache.put_all(&tenant, &[snapshot(customer, 7)]).await;
        assert_eq!(cache.get(&tenant, &id).await, Some(snapshot(customer, 7)));
    }

    #[tokio::test]
    async fn a_note_stays_until_redis_has_taken_the_write() {
        // A Redis that is configured but not there: every write fails.
        let cache = ExposureCache::connect("redis://127.0.0.1:1").await;
        assert!(!cache.enabled());
        let customer = CustomerId::new();
        let key = ExposureCache::key("t1", &customer.to_string());
        cache.begin_writes("t1", &[snapshot(customer, 3)]);
        cache.put_all("t1", &[snapshot(customer, 3)]).await;
        assert_eq!(cache.writing().get(&key), Some(&3));

        // No Redis configured at all: nothing to note.
        let none = ExposureCache::new(None);
        none.begin_writes("t1", &[snapshot(customer, 3)]);
        assert!(none.writing().is_empty());
    }

    #[tokio::test]
    async fn the_reconnect_task_of_an_unreachable_redis_ends_with_the_cache() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::Duration;
        // Not Redis: it takes each connection and closes it at once,
        // counting them, so every try to connect fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        let closing = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        let cache = ExposureCache::connect_every(&url, Duration::from_millis(10)).await;
        assert!(!cache.enabled());
        let clone = cache.clone();
        drop(cache);
        let so_far = tries.load(Ordering::SeqCst);
        let trying = o2c_testkit::eventually(Duration::from_secs(10), || async {
            (tries.load(Ordering::SeqCst) >= so_far + 2).then_some(())
        })
        .await;
        assert!(trying.is_some(), "it keeps trying while a clone is in use");
        drop(clone);
        let ended = o2c_testkit::eventually(Duration::from_secs(10), || async {
            (tasks() == before).then_some(())
        })
        .await;
        assert!(ended.is_some(), "the task ends once the cache is gone");
        closing.abort();
    }
}
