//! The README's run command, as a user runs it: the `o2c` binary with
//! `--demo` on fresh SQLite files, answering through the gateway, then
//! stopping cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_answers_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("o2c-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_o2c"));
    command
        .arg("--demo")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for service in [
        "GATEWAY",
        "CUSTOMER",
        "CREDIT",
        "INVOICING",
        "PAYMENTS",
        "CRM_SYNC",
    ] {
        command.env(format!("O2C_{service}__LISTEN_ADDR"), "127.0.0.1:0");
    }
    let mut child = command.spawn().unwrap();

    // Read the banner on a thread; wait for it with a deadline.
    let stdout = child.stdout.take().unwrap();
    let (lines, banner) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut gateway = None;
    let mut customer_id = None;
    let mut api_key = None;
    while customer_id.is_none() {
        let line = banner
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo banner before the deadline");
        if let Some(addr) = line.trim().strip_prefix("gateway") {
            gateway = Some(addr.trim().to_owned());
        }
        if let Some((_, key)) = line.split_once("its API key (client and analyst): ") {
            api_key = Some(key.trim().to_owned());
        }
        if line.contains("GetCustomerExposure") {
            let start = line.find("\"customer_id\":\"").unwrap() + "\"customer_id\":\"".len();
            customer_id = Some(line[start..start + 36].to_owned());
        }
    }
    let (gateway, customer_id, api_key) =
        (gateway.unwrap(), customer_id.unwrap(), api_key.unwrap());

    let mut client = GatewayServiceClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::GetCustomerExposureRequest { customer_id });
    request.metadata_mut().insert(
        "authorization",
        format!("ApiKey {api_key}").parse().unwrap(),
    );
    let exposure = client
        .get_customer_exposure(request)
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap();
    // Seeded: a 12,000.00 order invoiced and 5,000.00 of it paid.
    assert_eq!(exposure.receivables.unwrap().amount, "7000.00");
    assert_eq!(exposure.credit_limit.unwrap().amount, "50000.00");
    for name in [
        "gateway",
        "customer",
        "credit",
        "invoicing",
        "payments",
        "crm-sync",
    ] {
        assert!(
            dir.join("data").join(format!("{name}.db")).exists(),
            "{name}.db"
        );
    }

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "o2c did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "o2c exited with {exit}");
    std::fs::remove_dir_all(&dir).unwrap();
}
