//! Crash safety of the durable log: `kill -9` a writer at random moments and check that
//! every acknowledged append survived, intact, with no hole in the seqs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use strata_core::log::{Log, RocksStore, StoreOptions};
use strata_core::{NodeId, StreamName};
use strata_integration::{check_crash_payload, helper_bin};

/// Kills per run; `STRATA_CRASH_CYCLES` raises it.
fn cycles() -> usize {
    std::env::var("STRATA_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

#[test]
fn kill_9_loses_no_acknowledged_append() {
    kill_9_cycles("always", cycles());
}

/// Under `sync = "interval"` an acknowledged append may not be synced yet, but a crash of the
/// process alone (the machine goes on) loses none, and the store keeps its incarnation (only a
/// restart of the machine may lose records, and moves it to a new one).
#[test]
fn kill_9_under_sync_interval_loses_nothing_and_keeps_the_incarnation() {
    kill_9_cycles("interval", 3);
}

fn kill_9_cycles(sync: &str, cycles: usize) {
    let _serial = crate::replication::serial();
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("STRATA_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    report!("crash test seed {seed} (STRATA_SEED={seed} replays the kill schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node = NodeId::new("crash-node").unwrap();
    let stream = StreamName::new("crash/test").unwrap();

    // seq -> (producer, n) for every acknowledged append, over all cycles.
    let mut acked: BTreeMap<u64, (u8, u64)> = BTreeMap::new();
    let mut stored_last = 0u64;
    let mut incarnations = std::collections::BTreeSet::new();
    for cycle in 0..cycles {
        let mut child = Command::new(helper_bin("crash_writer")).arg(dir.path()).arg("4").arg(sync).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        // Let it get going, then kill it at a random moment.
        let run_ms = rng.gen_range(30..300);
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(run_ms));
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(60));

        let mut start = None;
        for line in &lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["start", next, incarnation] => {
                    start = Some(next.parse::<u64>().unwrap());
                    incarnations.insert(incarnation.to_string());
                }
                ["ack", seq, p, n] => {
                    let prev = acked.insert(seq.parse().unwrap(), (p.parse().unwrap(), n.parse().unwrap()));
                    assert!(prev.is_none(), "seq {seq} acknowledged twice");
                }
                _ => panic!("unexpected line from the writer: {line:?}"),
            }
        }
        if let Some(start) = start {
            assert_eq!(start, stored_last + 1, "cycle {cycle}: the writer resumes right after the last stored seq");
        }

        // Reopen and check the whole stream.
        let store = RocksStore::open(dir.path(), &node, StoreOptions::default()).unwrap();
        let log = Log::new(Arc::new(store));
        let key = log.local_key(&stream);
        let last = log.stream(&key).map_or(0, |i| i.last);
        let mut expect = 1;
        let mut from = 1;
        loop {
            let batch = log.read(&key, from, 4096).unwrap();
            if batch.is_empty() {
                break;
            }
            for env in &batch {
                assert_eq!(env.id.seq.get(), expect, "hole before seq {}", env.id.seq);
                expect += 1;
            }
            from = batch.last().unwrap().id.seq.get() + 1;
        }
        assert_eq!(expect - 1, last, "the stream's last seq matches its records");
        stored_last = last;
        log.close();
    }

    // Final verdict over every cycle.
    let store = RocksStore::open(dir.path(), &node, StoreOptions::default()).unwrap();
    let log = Log::new(Arc::new(store));
    let key = log.local_key(&stream);
    let mut present: BTreeMap<u64, Option<(u8, u64)>> = BTreeMap::new();
    let mut from = 1;
    loop {
        let batch = log.read(&key, from, 4096).unwrap();
        let Some(last) = batch.last() else { break };
        from = last.id.seq.get() + 1;
        for env in batch {
            present.insert(env.id.seq.get(), check_crash_payload(&env.payload));
        }
    }
    let torn = present.values().filter(|v| v.is_none()).count();
    let lost = acked.iter().filter(|(seq, who)| present.get(seq) != Some(&Some(**who))).count();
    report!(
        "crash test (sync = {sync}, seed {seed}): {cycles} kills, appended {} / acknowledged {} / lost {lost} (must be 0) / torn {torn} (must be 0)",
        present.len(),
        acked.len()
    );
    assert!(acked.len() > 100, "the writer acknowledged too little to mean anything: {}", acked.len());
    assert_eq!(lost, 0);
    assert_eq!(torn, 0);
    assert_eq!(incarnations.len(), 1, "a crash of the process alone keeps the store's incarnation: {incarnations:?}");
    assert!(log.store().earlier_incarnations().is_empty());
}
