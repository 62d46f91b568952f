//! Load generators: closed loop (N clients, each sending its next request
//! when the last one answered) and open loop (requests on a fixed
//! schedule, whatever the answers do), and latency summaries.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What a closed-loop run did.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub rate: f64,
    pub failed: u64,
}

/// Runs `clients` loops of `call(sequence number)` for `duration`.
pub async fn closed<F, Fut>(clients: usize, duration: Duration, call: F) -> Closed
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (stop, ok, failed, call) = (stop.clone(), ok.clone(), failed.clone(), call.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
                match call(n).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("  request failed: {status}");
                        }
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    Closed {
        rate: ok as f64 / elapsed,
        failed: failed.load(Ordering::Relaxed),
    }
}

/// Latency percentiles of a sample, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[index].as_secs_f64() * 1e6
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// What an open-loop run did.
#[derive(Debug)]
pub struct Open {
    pub offered: f64,
    pub scheduled: u64,
    pub ok: u64,
    /// Answered, but later than the latency objective after their
    /// scheduled start.
    pub late: u64,
    /// Failed, timed out, or never sent because too many were in flight.
    pub dropped: u64,
    /// From the scheduled start (so a stalled generator or a queue in
    /// front of the server counts against the server, not hidden).
    pub latency: Percentiles,
    /// How far behind its schedule the generator itself fell at worst.
    pub generator_lag: Duration,
}

/// Sends `call(n)` at `rate` per second for `duration`, each request on its
/// own schedule, with at most `max_in_flight` outstanding.
pub async fn open<F, Fut>(
    rate: f64,
    duration: Duration,
    objective: Duration,
    max_in_flight: usize,
    call: F,
) -> Open
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Duration>>();
    let start = Instant::now() + Duration::from_millis(50);
    let mut dropped = 0;
    let mut lag = Duration::ZERO;
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        lag = lag.max(Instant::now().saturating_duration_since(due));
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        let (tx, call) = (tx.clone(), call.clone());
        tokio::spawn(async move {
            let result = call(n).await;
            let elapsed = Instant::now().saturating_duration_since(due);
            drop(permit);
            let _ = tx.send(result.ok().map(|()| elapsed));
        });
    }
    drop(tx);
    let mut latencies = Vec::new();
    while let Some(outcome) = rx.recv().await {
        match outcome {
            Some(latency) => latencies.push(latency),
            None => dropped += 1,
        }
    }
    let late = latencies.iter().filter(|l| **l > objective).count() as u64;
    Open {
        offered: rate,
        scheduled: total,
        ok: latencies.len() as u64,
        late,
        dropped,
        latency: percentiles(&mut latencies),
        generator_lag: lag,
    }
}
