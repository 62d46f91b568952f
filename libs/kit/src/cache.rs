//! The optional Redis connection. Redis only caches; it is never the
//! authority for a decision, so every user of it must work when it is down.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Timeout of one Redis command: a slow cache must not slow a decision.
pub const COMMAND_TIMEOUT_MS: u64 = 250;
/// Timeout of (re)connecting.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// The client span of one Redis command (`operation`: HGET, EVALSHA, …).
pub fn span(operation: &'static str) -> tracing::Span {
    tracing::info_span!(
        "redis",
        otel.kind = "client",
        db.system = "redis",
        db.operation = operation,
        cache.hit = tracing::field::Empty,
    )
}

/// Connects to Redis at `url`. The manager reconnects by itself after
/// failures; commands fail fast (and callers fall back) meanwhile.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
        .set_response_timeout(Some(Duration::from_millis(COMMAND_TIMEOUT_MS)))
        .set_number_of_retries(1);
    ConnectionManager::new_with_config(client, config).await
}
