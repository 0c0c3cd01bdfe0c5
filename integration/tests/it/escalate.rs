//! Issue #6, acceptance 3: decisions above the `Isolated` mode's risk bound, taken while the
//! edge is isolated, become escalations; `strata approve` and `strata deny` resolve them from
//! another process over Zenoh; an unanswered one times out to the safe default. Every outcome is
//! on the `decisions` and `events` streams, and the arbiter turns each into a command.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use strata_integration::{free_port, payloads, status, strata_bin, zenoh_session, NodeProc};

use crate::replication::{serial, wait_async};

const TIMEOUT_MS: u64 = 4000;

fn edge_config(port: u16, parent: u16) -> String {
    format!(
        r#"[node]
id = "edge-1"
tier = "edge"
data_dir = "{{data_dir}}"
[zenoh]
mode = "peer"
listen = ["tcp/127.0.0.1:{port}"]
connect = ["tcp/127.0.0.1:{parent}"]
[ingest]
streams = ["readings/**"]
[autonomy]
escalation_timeout_ms = {TIMEOUT_MS}
[[actors]]
kind = "inference"
name = "anomaly-local"
inputs = ["readings/line-3"]
outputs = ["decisions"]
params = {{ capability = "anomaly", model = "ewma", route = true }}
[[actors]]
kind = "arbiter"
name = "arbiter"
inputs = ["decisions"]
outputs = ["commands", "escalations"]
"#
    )
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(strata_bin()).args(args).output().expect("run strata");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn pending(view: &zenoh::Session) -> Vec<Value> {
    status(view, "edge-1").await.and_then(|d| d["escalations_pending"].as_array().cloned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalations_are_approved_denied_or_time_out_to_the_safe_default() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The parent port has no listener: the edge is isolated throughout.
    let (port, parent) = (free_port(), free_port());
    let mut edge = NodeProc::new(dir.path(), "edge-1", &edge_config(port, parent));
    edge.start();
    let endpoint = format!("tcp/127.0.0.1:{port}");
    let view = zenoh_session(&endpoint).await;
    let up = wait_async(Duration::from_secs(30), || async { status(&view, "edge-1").await.is_some_and(|d| d["mode"] == "isolated") }).await;
    assert!(up, "the edge did not come up isolated\n{}", edge.log_text());

    let ingest = "strata/ingest/readings/line-3";
    for i in 0..60 {
        let value = 20.0 + ((i * 7) % 5) as f64 * 0.1;
        view.put(ingest, format!("{{\"value\": {value}}}")).await.unwrap();
    }
    let mut ids: Vec<String> = Vec::new();
    for n in 1..=3 {
        // A reading far outside what the model learnt: anomaly, risk 1.0, action `stop`,
        // above the isolated bound (risk_max 0.4): an escalation.
        view.put(ingest, "{\"value\": 1000.0}").await.unwrap();
        let is_new = |p: &Value| !ids.iter().any(|id| p["id"] == id.as_str());
        let seen = wait_async(Duration::from_secs(20), || async { pending(&view).await.iter().any(is_new) }).await;
        let waiting = pending(&view).await;
        assert!(seen, "escalation {n} is not pending: {waiting:?}\n{}", edge.log_text());
        let id = waiting.iter().find(|p| is_new(p)).map(|p| p["id"].as_str().unwrap().to_owned()).unwrap();
        match n {
            1 => {
                let (code, out, err) = cli(&["approve", &id, "--connect", &endpoint, "--by", "ops-anna"]);
                assert_eq!(code, 0, "approve: {out}{err}");
                assert!(out.contains("approved; action stop"), "{out}");
                // Approving twice (a retry after a lost answer) says it already was: exit 0.
                let (code, out, err) = cli(&["approve", &id, "--connect", &endpoint, "--timeout-ms", "1500"]);
                assert_eq!(code, 0, "{out}{err}");
                assert!(out.contains("was already approved; action stop"), "{out}");
                // Denying it then says what already happened: exit 1.
                let (code, _, err) = cli(&["deny", &id, "--connect", &endpoint, "--timeout-ms", "1500"]);
                assert_eq!(code, 1);
                assert!(err.contains("already resolved: approved"), "{err}");
            }
            2 => {
                let (code, out, err) = cli(&["deny", &id, "--connect", &endpoint, "--by", "ops-anna"]);
                assert_eq!(code, 0, "deny: {out}{err}");
                assert!(out.contains("denied; action hold"), "{out}");
            }
            _ => {}
        }
        ids.push(id);
    }
    // The third is left alone: it times out to the safe default.
    let timed_out = wait_async(Duration::from_millis(TIMEOUT_MS + 10_000), || async { pending(&view).await.is_empty() }).await;
    assert!(timed_out, "escalation 3 did not time out\n{}", edge.log_text());
    let (code, _, err) = cli(&["approve", "edge-1/decisions@0#999", "--connect", &endpoint, "--timeout-ms", "1500"]);
    assert_eq!(code, 1);
    assert!(err.contains("no answer through") && err.contains("no node reachable there holds escalation"), "{err}");

    // Everything is on the durable streams once the arbiter has acted on the last resolution.
    let commands_done =
        wait_async(Duration::from_secs(20), || async { payloads(&edge.data_dir, "commands").iter().filter(|c| c["resolution"].is_string()).count() == 3 })
            .await;
    assert!(commands_done, "the arbiter did not act on the resolutions\n{}", edge.log_text());
    assert_eq!(edge.terminate(Duration::from_secs(20)), Some(0));

    let escalations = payloads(&edge.data_dir, "escalations");
    assert_eq!(escalations.len(), 3, "{escalations:?}");
    for e in &escalations {
        assert_eq!((e["mode"].as_str(), e["action"].as_str()), (Some("isolated"), Some("stop")), "{e}");
        assert!(e["reason"].as_str().unwrap().contains("risk_max 0.40 of mode isolated"), "{e}");
    }
    let decisions = payloads(&edge.data_dir, "decisions");
    let resolutions: Vec<(String, String, String)> = decisions
        .iter()
        .filter(|d| d["escalation"].is_string())
        .map(|d| (d["escalation"].as_str().unwrap().into(), d["outcome"].as_str().unwrap().into(), d["action"].as_str().unwrap().into()))
        .collect();
    let expected: Vec<(String, String, String)> =
        ids.iter().zip([("approved", "stop"), ("denied", "hold"), ("timed_out", "hold")]).map(|(id, (o, a))| (id.clone(), o.into(), a.into())).collect();
    assert_eq!(resolutions, expected);
    let by: Vec<&str> = decisions.iter().filter_map(|d| d["by"].as_str()).collect();
    assert_eq!(by, ["ops-anna", "ops-anna", "timeout"]);
    // The decisions that escalated were taken locally (no other tier) and say so.
    let escalated: Vec<&Value> = decisions.iter().filter(|d| d["input"].is_string() && d["action"] == "stop").collect();
    assert_eq!(escalated.len(), 3);
    assert!(escalated.iter().all(|d| d["route"] == "local" && d["tier"] == "edge" && d["met"] == true), "{escalated:?}");

    let commands = payloads(&edge.data_dir, "commands");
    let acted: Vec<(String, String)> =
        commands.iter().filter(|c| c["resolution"].is_string()).map(|c| (c["key"].as_str().unwrap().into(), c["action"].as_str().unwrap().into())).collect();
    assert_eq!(acted, expected.iter().map(|(id, _, a)| (id.clone(), a.clone())).collect::<Vec<_>>());

    let events = payloads(&edge.data_dir, "events");
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    let outcomes: Vec<&str> = events.iter().filter(|e| e["event"] == "escalation_resolved").filter_map(|e| e["outcome"].as_str()).collect();
    assert_eq!(count("escalation_opened"), 3);
    assert_eq!(outcomes, ["approved", "denied", "timed_out"]);
    report!(
        "escalations: 3 raised while isolated; approved -> stop, denied -> hold, timed out after {TIMEOUT_MS} ms -> hold; \
         {} decisions, {} commands, {} events recorded",
        decisions.len(),
        commands.len(),
        events.len()
    );
}
