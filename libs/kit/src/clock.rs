//! Where services read the time: injected, so tests can move it.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The current time.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock, to the microsecond: the precision PostgreSQL keeps,
/// so a row built in memory is the row a later read returns.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        use chrono::SubsecRound;
        Utc::now().trunc_subsecs(6)
    })
}
