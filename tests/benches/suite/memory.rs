//! Idle resident memory of each service binary and of the all-in-one
//! binary, each started as its own process on PostgreSQL (and Redis where
//! the service uses it), as deployed: release builds of the real binaries,
//! read from `/proc/<pid>/status` once the service answers health checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// Service binaries, each with the settings section of the all-in-one.
pub const SERVICES: [(&str, &str); 6] = [
    ("o2c-customer", "customer"),
    ("o2c-credit", "credit"),
    ("o2c-invoicing", "invoicing"),
    ("o2c-payments", "payments"),
    ("o2c-crm-sync", "crm_sync"),
    ("o2c-gateway", "gateway"),
];
pub const ALL_IN_ONE: &str = "o2c";

/// Where `cargo build --release` puts binaries: beside this benchmark's
/// own `deps` directory.
pub fn binaries() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

/// Builds the binaries (a no-op when they are up to date). This benchmark
/// is named in the same build so that cargo resolves the same features for
/// both and the binaries reuse the dependencies the benchmark was built
/// with, instead of a second optimized build of them all.
pub fn build(workspace: &Path) -> std::io::Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    // What cargo adds to a benchmark's environment would make the inner
    // build's fingerprints differ from those of a build started from a
    // shell, and so rebuild every dependency each time: leave it out.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name == "RUST_RECURSION_COUNT"
            || name == "RUSTUP_TOOLCHAIN_SOURCE"
        {
            command.env_remove(name.as_ref());
        }
    }
    // Cargo also put the target directory's library paths first.
    let target = binaries()
        .and_then(|dir| dir.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| workspace.join("target"));
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let kept: Vec<_> = std::env::split_paths(&paths)
            .filter(|path| !path.starts_with(&target))
            .collect();
        if kept.is_empty() {
            command.env_remove("LD_LIBRARY_PATH");
        } else if let Ok(joined) = std::env::join_paths(kept) {
            command.env("LD_LIBRARY_PATH", joined);
        }
    }
    command.current_dir(workspace).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "o2c-tests",
        "--bench",
        "suite",
        "--bins",
    ]);
    for package in [
        "o2c-customer",
        "o2c-credit",
        "o2c-invoicing",
        "o2c-payments",
        "o2c-crm-sync",
        "o2c-gateway",
        "o2c-all-in-one",
    ] {
        command.args(["-p", package]);
    }
    Ok(command.status()?.success())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn serving(port: u16, process: &mut Process) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!("exited with {status}"));
        }
        let up = async {
            let channel =
                tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            Some(answer.into_inner().status == ServingStatus::Serving as i32)
        };
        if up.await == Some(true) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err("not serving after 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `binary` with `env`, waits until `port` serves, then returns
/// the highest resident set seen over a 2 s idle window, in MiB.
pub async fn idle_rss(
    dir: &Path,
    binary: &str,
    env: &[(String, String)],
    port: u16,
) -> Result<f64, String> {
    let child = Command::new(dir.join(binary))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("O2C_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{binary}: {e}"))?;
    let mut process = Process(child);
    serving(port, &mut process)
        .await
        .map_err(|e| format!("{binary}: {e}"))?;
    let pid = process.0.id();
    let mut highest = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        highest = highest.max(rss_kib(pid).ok_or_else(|| format!("{binary}: no VmRSS"))?);
    }
    Ok(highest as f64 / 1024.0)
}

/// The environment of one service binary.
pub fn service_env(
    database_url: &str,
    redis_url: &str,
    secret: &str,
) -> std::io::Result<(Vec<(String, String)>, u16)> {
    let port = free_port()?;
    Ok((
        vec![
            ("O2C_LISTEN_ADDR".into(), format!("127.0.0.1:{port}")),
            ("O2C_DATABASE_URL".into(), database_url.into()),
            ("O2C_REDIS_URL".into(), redis_url.into()),
            ("O2C_INTERNAL_AUTH_SECRET".into(), secret.into()),
        ],
        port,
    ))
}

/// The environment of the all-in-one binary, every service on its own
/// database; returns the gateway's port (the last one up).
pub fn all_in_one_env(
    database_url: impl Fn(&str) -> String,
    redis_url: &str,
) -> std::io::Result<(Vec<(String, String)>, u16)> {
    let mut env = vec![("O2C_REDIS_URL".to_owned(), redis_url.to_owned())];
    let mut gateway = 0;
    for (_, section) in SERVICES {
        let port = free_port()?;
        if section == "gateway" {
            gateway = port;
        }
        let key = section.to_uppercase();
        env.push((
            format!("O2C_{key}__LISTEN_ADDR"),
            format!("127.0.0.1:{port}"),
        ));
        env.push((format!("O2C_{key}__DATABASE_URL"), database_url(section)));
    }
    Ok((env, gateway))
}
