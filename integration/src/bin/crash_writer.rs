//! Child process of the crash test (`integration/tests/it/crash.rs`): opens a store and
//! appends from several tasks until killed, printing `ack <seq> <producer> <n>` for every
//! append whose durability was acknowledged, and `start <next seq>` once the store is open.
//! Producers `0..producers` each wait for their own acknowledgement; one more keeps
//! `IN_FLIGHT` appends outstanding. Batches are kept small, so batches are written while
//! earlier ones wait for their WAL sync (the commit pipeline) when the kill comes.
//!
//!     crash_writer <store dir> <producers> [always|interval]
//!
//! `start <next seq> <incarnation>` says where it goes on. With `interval` (the log's
//! `sync = "interval"`, 100 ms) an acknowledged append is not synced yet, but a kill of the
//! process alone loses nothing: the kernel has it.
//!
//! Each payload is self-checking (see `strata_integration::crash_payload`), so a reader can
//! tell an intact record from a torn one without knowing what was sent.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use strata_core::log::{Draft, Log, RocksStore, StoreOptions};
use strata_core::{Kind, NodeId, PayloadType, StreamName};
use strata_integration::crash_payload;

/// Appends the pipelined producer keeps outstanding.
const IN_FLIGHT: usize = 256;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: crash_writer <store dir> <producers>")?;
    let producers: u8 = args.next().context("producers")?.parse().context("producers")?;
    let sync = match args.next().as_deref() {
        None | Some("always") => strata_core::config::SyncPolicy::Always,
        Some("interval") => strata_core::config::SyncPolicy::Interval,
        Some(other) => anyhow::bail!("sync policy {other:?}: always or interval"),
    };
    let node = NodeId::new("crash-node")?;
    // The smallest memtable: memtables are flushed and the WAL switches to a new file every
    // few hundred KiB, so kills also land during flushes and right after a switch.
    let opts = StoreOptions { sync, sync_interval_ms: 100, commit_batch_len_max: 32, memtable_bytes: 64 * 1024, ..StoreOptions::default() };
    let store = RocksStore::open(path.as_ref(), &node, opts)?;
    let log = Log::new(Arc::new(store));
    let stream = StreamName::new("crash/test")?;
    let next = log.stream(&log.local_key(&stream)).map_or(0, |i| i.last) + 1;
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    writeln!(out.lock().unwrap(), "start {next} {}", log.incarnation())?;
    out.lock().unwrap().flush()?;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (log, stream, out) = (log.clone(), stream.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let draft = Draft::new(Kind::Reading, PayloadType::new("crash/1").unwrap(), crash_payload(p, n));
                let env = log.append_durable(stream.clone(), draft).await.expect("append");
                let mut out = out.lock().unwrap();
                writeln!(out, "ack {} {p} {n}", env.id.seq).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    let (log, stream, out) = (log.clone(), stream.clone(), out.clone());
    tasks.push(tokio::spawn(async move {
        let mut in_flight = std::collections::VecDeque::new();
        for n in 0u64.. {
            let draft = Draft::new(Kind::Reading, PayloadType::new("crash/1").unwrap(), crash_payload(producers, n));
            in_flight.push_back(log.append(stream.clone(), draft).await.expect("append"));
            if in_flight.len() >= IN_FLIGHT {
                let env = in_flight.pop_front().expect("non-empty").await.expect("append");
                let mut out = out.lock().unwrap();
                writeln!(out, "ack {} {producers} {}", env.id.seq, n + 1 - IN_FLIGHT as u64).unwrap();
                out.flush().unwrap();
            }
        }
    }));
    for t in tasks {
        t.await?;
    }
    Ok(())
}
