//! A service's background loops (outbox relays, inbox pruning, credit's
//! maintenance, payment collection, the gateway's reconciliation) and how
//! they stop with the service.
//!
//! A loop started with [`every`] while a service is built inside
//! [`Background::scope`] (each service's `run`, and the all-in-one
//! `Suite`) ends when that [`Background`] stops, or is dropped: the pass it
//! is in finishes (a pass that would go on, such as a relay draining a
//! backlog, asks [`stopping`] between its steps), and no new one starts. A
//! loop started outside any scope (a test that builds a service and keeps
//! it for the rest of its run) runs for as long as its tokio runtime.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

type Loops = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// What a loop started in a scope needs of its [`Background`].
#[derive(Clone)]
struct Scope {
    stopping: watch::Receiver<bool>,
    loops: Loops,
}

tokio::task_local! {
    static SCOPE: Scope;
    /// Within a pass of a scoped loop: its Background's stop signal.
    static PASS: watch::Receiver<bool>;
}

/// Whether the [`Background`] of the loop whose pass calls this has been
/// asked to stop (false outside such a pass): a pass made of several steps
/// ends early between them.
pub fn stopping() -> bool {
    PASS.try_with(|stop| *stop.borrow()).unwrap_or(false)
}

/// When a loop's first pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// As soon as the loop starts.
    Now,
    /// One interval after it starts (to let the other services come up).
    AfterInterval,
}

/// The loops of one service (or of every service of the all-in-one
/// process), to stop together.
#[derive(Debug)]
pub struct Background {
    stop: watch::Sender<bool>,
    loops: Loops,
}

impl Default for Background {
    fn default() -> Self {
        Self::new()
    }
}

impl Background {
    pub fn new() -> Self {
        Self {
            stop: watch::Sender::new(false),
            loops: Loops::default(),
        }
    }

    /// Runs `future` (a service's build) so that the loops it starts with
    /// [`every`] stop with this.
    pub async fn scope<F: Future>(&self, future: F) -> F::Output {
        let scope = Scope {
            stopping: self.stop.subscribe(),
            loops: Arc::clone(&self.loops),
        };
        SCOPE.scope(scope, future).await
    }

    /// Stops every loop started in its scope and waits until each has
    /// finished the pass it was in, for at most `grace`; a pass still
    /// running then is abandoned, as a crash would cut it short (the
    /// passes of every loop here are idempotent, and the next start
    /// finishes what one left: outbox delivery is at least once, payment
    /// collection keys everything by session and attempt).
    pub async fn stop(&self, grace: Duration) {
        self.stop.send_replace(true);
        let mut loops =
            std::mem::take(&mut *self.loops.lock().unwrap_or_else(PoisonError::into_inner));
        let deadline = tokio::time::Instant::now() + grace;
        for handle in &mut loops {
            if tokio::time::timeout_at(deadline, &mut *handle)
                .await
                .is_err()
            {
                tracing::warn!("a background pass outlived the shutdown grace; abandoning it");
                handle.abort();
                // Ends at the pass's next await.
                let _ = handle.await;
            }
        }
        // Kept, ended, for `running`.
        self.loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(loops);
    }

    /// How many loops started in its scope are still running.
    pub fn running(&self) -> usize {
        self.loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|handle| !handle.is_finished())
            .count()
    }
}

/// Runs `pass` every `interval` (after each pass ends, a pass that overran
/// its interval delays the next rather than bunching them), the first one
/// as `first` says, until the [`Background`] whose scope this was called in
/// stops or is dropped, or for as long as the runtime outside any scope.
pub fn every<F, Fut>(interval: Duration, first: First, mut pass: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let scope = SCOPE.try_with(Scope::clone).ok();
    let mut stopping = scope.as_ref().map(|s| s.stopping.clone());
    let handle = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if first == First::AfterInterval {
            // An interval's first tick is at once.
            ticker.tick().await;
        }
        loop {
            match stopping.as_mut() {
                // Stopped, or its Background is gone.
                Some(stopping) => {
                    tokio::select! {
                        biased;
                        _ = stopping.wait_for(|stop| *stop) => return,
                        _ = ticker.tick() => {}
                    }
                }
                None => {
                    ticker.tick().await;
                }
            }
            match &stopping {
                Some(stopping) => PASS.scope(stopping.clone(), pass()).await,
                None => pass().await,
            }
        }
    });
    if let Some(scope) = scope {
        scope
            .loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Polls `done` every millisecond for up to ten seconds.
    async fn until(mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn counting(
        passes: &Arc<AtomicU64>,
    ) -> impl FnMut() -> std::future::Ready<()> + Send + 'static {
        let passes = Arc::clone(passes);
        move || {
            passes.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        }
    }

    #[tokio::test]
    async fn a_loop_started_in_a_scope_stops_with_its_background() {
        let background = Background::new();
        let passes = Arc::new(AtomicU64::new(0));
        background
            .scope(async { every(Duration::from_millis(1), First::Now, counting(&passes)) })
            .await;
        assert_eq!(background.running(), 1);
        until(|| passes.load(Ordering::SeqCst) >= 3).await;
        background.stop(Duration::from_secs(10)).await;
        assert_eq!(background.running(), 0);
        let stopped_at = passes.load(Ordering::SeqCst);
        // Ten more intervals: no pass starts after the stop.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(passes.load(Ordering::SeqCst), stopped_at);
    }

    #[tokio::test]
    async fn the_pass_in_progress_finishes_before_the_stop_returns() {
        let background = Background::new();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicU64::new(0));
        let (mut started_tx, mut released) = (Some(started_tx), Some(released));
        let done = Arc::clone(&finished);
        background
            .scope(async {
                every(Duration::from_millis(1), First::Now, move || {
                    let (started_tx, released, done) =
                        (started_tx.take(), released.take(), Arc::clone(&done));
                    async move {
                        if let (Some(started_tx), Some(released)) = (started_tx, released) {
                            let _ = started_tx.send(());
                            let _ = released.await;
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .await;
        started.await.unwrap();
        let stopping = tokio::spawn(async move {
            background.stop(Duration::from_secs(10)).await;
            background
        });
        // The stop waits for the pass it caught.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stopping.is_finished());
        release.send(()).unwrap();
        let background = stopping.await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(background.running(), 0);
    }

    #[tokio::test]
    async fn a_pass_that_outlives_the_grace_is_abandoned() {
        let background = Background::new();
        let started = Arc::new(AtomicU64::new(0));
        let pass_started = Arc::clone(&started);
        background
            .scope(async {
                every(Duration::from_millis(1), First::Now, move || {
                    pass_started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>()
                })
            })
            .await;
        until(|| started.load(Ordering::SeqCst) == 1).await;
        assert_eq!(background.running(), 1);
        background.stop(Duration::from_millis(20)).await;
        assert_eq!(background.running(), 0);
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_pass_sees_its_background_stopping() {
        let background = Background::new();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let (steps, ended) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut started_tx = Some(started_tx);
        let (counted, pass_ended) = (Arc::clone(&steps), Arc::clone(&ended));
        background
            .scope(async {
                every(Duration::from_millis(1), First::Now, move || {
                    let (started_tx, counted, pass_ended) = (
                        started_tx.take(),
                        Arc::clone(&counted),
                        Arc::clone(&pass_ended),
                    );
                    async move {
                        assert!(!stopping());
                        if let Some(started_tx) = started_tx {
                            let _ = started_tx.send(());
                        }
                        // A pass of many steps, as a relay draining a backlog.
                        while !stopping() {
                            counted.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                        }
                        // Ended by itself, not abandoned.
                        pass_ended.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .await;
        started.await.unwrap();
        assert!(!stopping(), "outside a pass");
        background.stop(Duration::from_secs(10)).await;
        assert_eq!(background.running(), 0);
        assert!(steps.load(Ordering::SeqCst) > 0);
        assert_eq!(ended.load(Ordering::SeqCst), 1, "the pass was abandoned");
    }

    #[tokio::test]
    async fn a_loop_started_outside_any_scope_keeps_running() {
        let background = Background::new();
        let passes = Arc::new(AtomicU64::new(0));
        every(
            Duration::from_millis(1),
            First::AfterInterval,
            counting(&passes),
        );
        assert_eq!(background.running(), 0);
        background.stop(Duration::from_secs(1)).await;
        let before = passes.load(Ordering::SeqCst);
        until(|| passes.load(Ordering::SeqCst) > before + 2).await;
    }
}
