//! Issue #7, acceptance 5: an integrator's own actor (`actors/examples/threshold.rs`, written
//! from the rustdoc example and `configs/README.md`) is registered, configured and run in a
//! node, next to a standard kind.

use std::process::{Command, Stdio};
use std::time::Duration;

use strata_core::config::Name;
use strata_core::log::{RocksStore, Store, StreamKey};
use strata_core::StreamName;
use strata_integration::{free_port, payloads, strata_bin, wait_until};

const LIMIT: f64 = 21.0;

#[test]
fn the_example_threshold_actor_runs_in_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("edge-9");
    let config = dir.path().join("edge-9.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"edge-9\"\ntier = \"edge\"\ndata_dir = \"{}\"\n\
             [zenoh]\nmode = \"peer\"\nlisten = [\"tcp/127.0.0.1:{}\"]\nconnect = [\"tcp/127.0.0.1:{}\"]\n\
             [[actors]]\nkind = \"sensor\"\nname = \"line-3\"\noutputs = [\"readings/line-3\"]\nparams = {{ rate_hz = 200, seed = 5 }}\n\
             [[actors]]\nkind = \"threshold\"\nname = \"overheat\"\ninputs = [\"readings/line-3\"]\noutputs = [\"alarms\"]\nparams = {{ limit = {LIMIT} }}\n",
            data_dir.display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let example = strata_bin().parent().unwrap().join("examples/threshold");
    assert!(example.exists(), "{} not built (`cargo build --workspace --all-targets` builds examples)", example.display());
    let mut child = Command::new(&example).arg(&config).stderr(Stdio::null()).spawn().unwrap();
    let alarms = || if data_dir.exists() { RocksStore::open_read_only(&data_dir).ok().map(|_| payloads(&data_dir, "alarms").len()).unwrap_or(0) } else { 0 };
    let raised = wait_until(Duration::from_secs(60), || alarms() >= 20);
    // SAFETY: a plain syscall on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(raised, "the threshold actor raised {} alarms", alarms());
    assert_eq!(status.code(), Some(0));

    // Exactly the readings above the limit, up to where the actor's cursor stands.
    let store = RocksStore::open_read_only(&data_dir).unwrap();
    let key = StreamKey { origin: store.node().clone(), incarnation: store.incarnation(), stream: StreamName::new("readings/line-3").unwrap() };
    let cursor = store.cursor(&Name::new("overheat").unwrap(), &key).unwrap();
    drop(store);
    let readings = payloads(&data_dir, "readings/line-3");
    let above: Vec<f64> = readings[..cursor as usize].iter().filter_map(|r| r["value"].as_f64()).filter(|&v| v > LIMIT).collect();
    let alarms = payloads(&data_dir, "alarms");
    let values: Vec<f64> = alarms.iter().map(|a| a["value"].as_f64().unwrap()).collect();
    assert_eq!(values, above);
    assert_eq!(alarms.last().unwrap()["alarms"].as_u64(), Some(above.len() as u64), "the count in the snapshot-backed state");
    report!("example threshold actor: {} readings handled, {} above {LIMIT}, {} alarms", cursor, above.len(), alarms.len());
}
