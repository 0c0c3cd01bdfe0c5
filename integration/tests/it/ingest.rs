//! A foreign client (the official Zenoh Python binding) puts JSON readings on an edge.

use std::time::Duration;

use strata_integration::{free_port, repo_root, status, zenoh_session, NodeProc};

use crate::replication::{serial, wait_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_readings_are_appended_and_bad_ones_rejected() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (port, parent) = (free_port(), free_port());
    let config = format!(
        "[node]\nid = \"edge-1\"\ntier = \"edge\"\ndata_dir = \"{{data_dir}}\"\n\
         [zenoh]\nmode = \"peer\"\nlisten = [\"tcp/127.0.0.1:{port}\"]\nconnect = [\"tcp/127.0.0.1:{parent}\"]\n\
         [ingest]\nstreams = [\"readings/**\"]\n"
    );
    let mut edge = NodeProc::new(dir.path(), "edge-1", &config);
    edge.start();
    let view = zenoh_session(&format!("tcp/127.0.0.1:{port}")).await;
    assert!(wait_async(Duration::from_secs(30), || async { status(&view, "edge-1").await.is_some() }).await, "{}", edge.log_text());

    let script = repo_root().join("integration/scripts/ingest_readings.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([&format!("tcp/127.0.0.1:{port}"), "readings/py", "100"])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python client failed (is eclipse-zenoh==1.10.2 installed? `make deps` installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let counted = || async {
        let doc = status(&view, "edge-1").await.unwrap_or_default();
        let r = &doc["replication"];
        let rejected: u64 = r["ingest_rejected"].as_object().map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
        (r["ingest_accepted"].as_u64().unwrap_or(0), rejected, doc)
    };
    let ok = wait_async(Duration::from_secs(30), || async { matches!(counted().await, (100, 7, _)) }).await;
    let (accepted, rejected, doc) = counted().await;
    assert!(ok, "accepted {accepted}, rejected {rejected}: {doc:#}\n{}", edge.log_text());
    let reasons = &doc["replication"]["ingest_rejected"];
    for reason in ["not_json", "missing_value", "bad_value", "unknown_field", "not_an_object"] {
        assert_eq!(reasons[reason], 1, "{reason}: {reasons}");
    }
    // One over ingest.payload_bytes_max, one over the protocol's largest message (4 MiB): the
    // transport refuses that one unread, and it is still reported as a rejection.
    assert_eq!(reasons["too_large"], 2, "{reasons}");
    assert!(edge.log_text().contains("message larger than the protocol's largest refused unread"), "{}", edge.log_text());
    let stream = doc["streams"].as_array().unwrap().iter().find(|s| s["stream"] == "readings/py").unwrap().clone();
    assert_eq!((stream["count"].as_u64(), stream["last"].as_u64()), (Some(100), Some(100)));
    assert!(edge.is_running(), "the node keeps running after bad input");
    assert!(edge.log_text().contains("ingest message rejected"), "rejections are logged");
    report!("python ingest: 100 appended, 7 rejected ({reasons}), node still running");
    assert_eq!(edge.terminate(Duration::from_secs(20)), Some(0));
}
