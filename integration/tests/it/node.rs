//! Issue #5, acceptance 3 and 4: `strata run configs/edge.toml` stops in order on SIGTERM and
//! loses no committed cursor to `kill -9`; `strata status` lists a running 3-node continuum
//! with its actors and lags.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use strata_core::config::Name;
use strata_core::log::{RocksStore, Store, StreamKey};
use strata_core::StreamName;
use strata_integration::{free_port, held_watermark, payloads, repo_root, strata_bin, wait_until, NodeProc};

/// The example configs with their fixed ports replaced by free ones and `data_dir` by the
/// test's: `[(id, text)]` for edge, fog, cloud.
fn example_configs() -> Vec<(&'static str, String)> {
    let ports = [("7447", free_port()), ("7448", free_port()), ("7449", free_port())];
    [("edge-1", "edge"), ("fog-1", "fog"), ("cloud-1", "cloud")]
        .into_iter()
        .map(|(id, file)| {
            let mut text = std::fs::read_to_string(repo_root().join(format!("configs/{file}.toml"))).unwrap();
            for (fixed, port) in ports {
                text = text.replace(&format!("127.0.0.1:{fixed}"), &format!("127.0.0.1:{port}"));
            }
            // The model files are relative to the repository root (where the README runs them).
            let text = text.replace("onnx_path = \"configs/", &format!("onnx_path = \"{}/configs/", repo_root().display()));
            (id, text.replace(&format!("data_dir = \"data/{id}\""), "data_dir = \"{data_dir}\""))
        })
        .collect()
}

/// The committed cursor of `consumer` on the edge's `readings/line-3`, read from a
/// read-only view of the store (0 if none yet).
fn cursor(data_dir: &Path, consumer: &str) -> Option<u64> {
    let store = RocksStore::open_read_only(data_dir).ok()?;
    let key = StreamKey { origin: store.node().clone(), incarnation: store.incarnation(), stream: StreamName::new("readings/line-3").unwrap() };
    store.cursor(&Name::new(consumer).unwrap(), &key)
}

fn wait_cursor_past(node: &NodeProc, consumer: &str, past: u64) -> u64 {
    let mut seen = 0;
    let ok = wait_until(Duration::from_secs(30), || {
        seen = cursor(&node.data_dir, consumer).unwrap_or(0);
        seen > past
    });
    assert!(ok, "{consumer}'s cursor stayed at {seen} (wanted > {past})\n{}", node.log_text());
    seen
}

#[test]
fn strata_run_edge_stops_in_order_and_keeps_cursors_through_kill_9() {
    let _serial = crate::replication::serial();
    let dir = tempfile::tempdir().unwrap();
    let (id, text) = example_configs().remove(0);
    let mut edge = NodeProc::new(dir.path(), id, &text);
    edge.start();
    let first = wait_cursor_past(&edge, "anomaly-local", 200);

    // SIGTERM: orderly stop within the shutdown timeout (5 s per child), exit 0.
    let t0 = Instant::now();
    assert_eq!(edge.terminate(Duration::from_secs(20)), Some(0), "SIGTERM must exit 0\n{}", edge.log_text());
    let took = t0.elapsed();
    let log = edge.log_text();
    assert!(log.contains("node stopped"), "{log}");
    let after_term = cursor(&edge.data_dir, "anomaly-local").unwrap();
    assert!(after_term >= first);
    let events = payloads(&edge.data_dir, "events");
    let stopped: Vec<&str> = events.iter().filter(|e| e["event"] == "child_stopped").map(|e| e["child"].as_str().unwrap()).collect();
    assert_eq!(stopped, ["arbiter", "anomaly-local", "line-3"], "children stop in reverse start order");
    report!("SIGTERM: exit 0 after {took:?}; cursor {after_term}; events {}", events.len());

    // It reopens cleanly and continues after its cursor.
    edge.start();
    let resumed = wait_cursor_past(&edge, "anomaly-local", after_term);

    // kill -9: every cursor committed before it survives.
    let before_kill = cursor(&edge.data_dir, "anomaly-local").unwrap();
    edge.kill9();
    let after_kill = cursor(&edge.data_dir, "anomaly-local").unwrap();
    assert!(after_kill >= before_kill, "kill -9 lost a committed cursor: {before_kill} -> {after_kill}");
    edge.start();
    let again = wait_cursor_past(&edge, "anomaly-local", after_kill);
    assert_eq!(edge.terminate(Duration::from_secs(20)), Some(0), "{}", edge.log_text());

    // Decisions and commands were produced once per input, through all of it.
    let repeats = |stream: &str, field: &str| {
        let docs = payloads(&edge.data_dir, stream);
        let keys: std::collections::HashSet<&str> = docs.iter().map(|d| d[field].as_str().unwrap()).collect();
        (docs.len(), docs.len() - keys.len())
    };
    let (n, decided_twice) = repeats("decisions", "input");
    let (m, commanded_twice) = repeats("commands", "key");
    assert_eq!((decided_twice, commanded_twice), (0, 0), "a reading was decided twice or a command issued twice");
    report!("cursors: {first} -> SIGTERM {after_term} -> {resumed}; kill -9 at {before_kill} (after: {after_kill}) -> {again}; {n} decisions, {m} commands, no repeats");
}

#[test]
fn status_lists_a_running_three_node_continuum() {
    let _serial = crate::replication::serial();
    let dir = tempfile::tempdir().unwrap();
    let configs = example_configs();
    let fog_endpoint = configs[1].1.lines().find(|l| l.starts_with("listen")).unwrap().split('"').nth(1).unwrap().to_owned();
    let mut nodes: Vec<NodeProc> = configs.iter().map(|(id, text)| NodeProc::new(dir.path(), id, text)).collect();
    for n in nodes.iter_mut().rev() {
        n.start();
    }
    let status = |json: bool| {
        let mut c = Command::new(strata_bin());
        c.args(["status", "--connect", &fog_endpoint, "--timeout-ms", "1000"]);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    // Wait until all three answer with running actors and the cloud has acknowledged readings.
    let mut docs = Vec::new();
    let ok = wait_until(Duration::from_secs(40), || {
        let out = status(true);
        docs = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_default();
        let ids: Vec<&str> = docs.iter().filter_map(|d| d["node"].as_str()).collect();
        let running = docs.iter().all(|d| d["actors"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|a| a["state"] == "running")));
        let acked = docs.iter().any(|d| {
            d["node"] == "edge-1"
                && d["streams"].as_array().into_iter().flatten().any(|s| s["stream"] == "readings/line-3" && s["acked"]["cloud"].as_u64().is_some())
        });
        let full = docs.iter().all(|d| d["mode"] == "full");
        ids == ["cloud-1", "edge-1", "fog-1"] && running && acked && full
    });
    let logs: String = nodes.iter().map(|n| format!("--- {}\n{}", n.id, n.log_text())).collect();
    assert!(ok, "status never showed all three nodes running and acked: {docs:#?}\n{logs}");
    let out = status(false);
    let table = String::from_utf8_lossy(&out.stdout);
    report!("{table}");
    assert!(out.status.success());
    for needle in ["edge-1", "fog-1", "cloud-1", "line-3:running/0", "anomaly-local:running/0", "anomaly-fog:running/0", "anomaly-cloud:running/0", "cloud:"] {
        assert!(table.contains(needle), "{needle:?} missing from\n{table}");
    }
    for n in nodes.iter_mut() {
        assert_eq!(n.terminate(Duration::from_secs(20)), Some(0), "{}", n.log_text());
    }
    // The edge stopped first and handed its records over: the fog and the cloud hold all of
    // its readings and events, down to the events of its own actors stopping.
    let edge_events = payloads(&nodes[0].data_dir, "events");
    assert!(edge_events.last().is_some_and(|e| e["event"] == "child_stopped"), "the edge's last event: {:?}", edge_events.last());
    for stream in ["events", "readings/line-3"] {
        let produced = held_watermark(&nodes[0].data_dir, "edge-1", stream);
        assert!(produced > 0, "the edge wrote no {stream}");
        for n in &nodes[1..] {
            assert_eq!(held_watermark(&n.data_dir, "edge-1", stream), produced, "{} misses edge-1's last {stream}\n{}", n.id, nodes[0].log_text());
        }
    }
    // The edge started isolated and rose to `full` once fog and cloud had been back for the
    // hold time; both changes are events.
    let events = payloads(&nodes[0].data_dir, "events");
    let modes: Vec<(&str, &str)> =
        events.iter().filter(|e| e["event"] == "mode_changed").map(|e| (e["from"].as_str().unwrap(), e["to"].as_str().unwrap())).collect();
    assert_eq!(modes.first().map(|m| m.0), Some("isolated"), "{modes:?}");
    assert_eq!(modes.last().map(|m| m.1), Some("full"), "{modes:?}");
}

#[test]
fn a_root_past_its_restart_intensity_records_the_incident_and_exits_non_zero() {
    let _serial = crate::replication::serial();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[node]\nid = \"edge-9\"\ntier = \"edge\"\ndata_dir = \"{{data_dir}}\"\n\
         [zenoh]\nlisten = [\"tcp/127.0.0.1:{}\"]\n\
         [supervision]\nrestarts_max = 3\nrestart_window_ms = 60000\nbackoff_base_ms = 10\nbackoff_max_ms = 10\n\
         [[actors]]\nkind = \"sensor\"\nname = \"s\"\noutputs = [\"readings/s\"]\nparams = {{ rate_hz = 10 }}\n\
         [[actors]]\nkind = \"chaos\"\nname = \"chaos\"\nparams = {{ every_ms = 50 }}\n",
        free_port()
    );
    let mut node = NodeProc::new(dir.path(), "edge-9", &config);
    node.start();
    let code = node.wait_exit(Duration::from_secs(30));
    let log = node.log_text();
    assert_eq!(code, Some(1), "exit code after the root gave up\n{log}");
    assert!(log.contains("the root supervisor gave up"), "{log}");
    let events = payloads(&node.data_dir, "events");
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    let escalated: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "escalated").collect();
    report!("events: {} exits, {} restarts scheduled, escalated: {}", count("child_exited"), count("restart_scheduled"), escalated[0]["reason"]);
    assert_eq!(count("child_exited"), 4, "three restarts, then the 4th failure escalates");
    assert_eq!(count("restart_scheduled"), 3);
    assert_eq!(escalated.len(), 1);
    assert!(escalated[0]["reason"].as_str().unwrap().contains("more than 3 restarts in 60000 ms"), "{escalated:?}");
    assert!(events.iter().any(|e| e["event"] == "child_stopped" && e["child"] == "s"), "the sensor was stopped: {events:?}");
}
