//! Where the machine's CPU went during a benchmark's phase, read from
//! Linux's `/proc`: this process (the suite and the benchmark's clients),
//! PostgreSQL's processes when they run on this machine, and what stayed
//! idle. Every count is in the kernel's clock ticks, so each share is a
//! ratio of two counts read at the same moments; no tick rate is assumed.

use std::time::Duration;

/// The counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// This process's user and system ticks.
    process: u64,
    /// The user and system ticks of every process named `postgres`.
    postgres: u64,
    /// Ticks of all CPUs together, and those spent idle (or waiting for
    /// I/O with nothing else to run).
    total: u64,
    idle: u64,
    /// CPUs that `total` adds up (the `cpuN` lines).
    cpus: u64,
}

/// Reads the counters; None where `/proc` does not tell them.
pub fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user).
    let total = cpu.iter().take(8).sum();
    let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?.1;
    let mut postgres = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        // A process may end between the listing and the read.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((name, used)) = ticks(&stat)
            && name == "postgres"
        {
            postgres += used;
        }
    }
    let cpus = stat
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count() as u64;
    Some(Sample {
        cpus,
        process,
        postgres,
        total,
        idle,
    })
}

/// The command name and user + system ticks of a `/proc/PID/stat` line.
fn ticks(stat: &str) -> Option<(&str, u64)> {
    // The name is in parentheses and may hold spaces; the fields after it
    // start with the state (field 3); utime and stime are fields 14 and 15.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// A phase's use of the machine, as `    CPU: …` (empty when `/proc` did
/// not tell): cores used by this process and by PostgreSQL, each also per
/// unit of work at `rate` a second, and the share of the machine left idle.
pub fn describe(before: Option<Sample>, after: Option<Sample>, rate: f64, unit: &str) -> String {
    let (Some(before), Some(after)) = (before, after) else {
        return String::new();
    };
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return String::new();
    }
    // The machine's CPUs, which `total` counts, rather than those this
    // process may use.
    let cores = after.cpus.max(1) as f64;
    let share = |ticks: u64| ticks as f64 / total as f64;
    let process = share(after.process.saturating_sub(before.process)) * cores;
    let postgres = share(after.postgres.saturating_sub(before.postgres)) * cores;
    let idle = share(after.idle.saturating_sub(before.idle));
    let per = |used: f64| Duration::from_secs_f64(used / rate.max(f64::MIN_POSITIVE));
    format!(
        "    CPU: this process {process:.2} cores ({:.0} µs per {unit}), PostgreSQL {postgres:.2} \
         ({:.0} µs), idle {:.0} % of the machine",
        per(process).as_secs_f64() * 1e6,
        per(postgres).as_secs_f64() * 1e6,
        idle * 100.0
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_ticks() {
        let line = "4242 (tokio rt (x)) S 1 2 3 4 5 6 7 8 9 10 31 17 0 0 20 0 4 0 100";
        assert_eq!(ticks(line), Some(("tokio rt (x)", 48)));
        assert_eq!(ticks("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn this_process_is_counted_as_it_works() {
        let before = sample().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        loop {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            let after = sample().unwrap();
            if after.process > before.process {
                assert!(after.total > before.total);
                assert!(after.cpus >= 1, "no cpuN lines");
                let line = describe(Some(before), Some(after), 100.0, "call");
                assert!(line.starts_with("    CPU: this process "), "{line}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no ticks counted");
        }
    }
}
