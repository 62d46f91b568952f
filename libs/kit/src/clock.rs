//! Where services read the time: injected, so tests can move it.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The current time.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}
