//! Strata's benchmarks: each prints figures next to a baseline measured in the same run,
//! and the ratio.
//!
//!     cargo run --release -p strata-integration --bin bench -- log [--seconds S]
//!
//! `log`: appends of 100-byte payloads with `sync = always` group commit, against raw
//! RocksDB (one `put` + WAL sync per record; a `WriteBatch` of the same size + WAL sync).
//! The figures depend on the disk's fsync latency; the ratios are what to compare.
//!
//!     cargo run --release -p strata-integration --bin bench -- bus
//!
//! `bus`: edge -> fog -> cloud replication of 100-byte readings, durable (`sync = always`) at
//! every hop, against raw Zenoh pub/sub over the same three-process topology (client ->
//! router -> router): throughput, end-to-end latency p50/p99 at a fixed 10 k msg/s, the
//! replay (catch-up) rate after a partition, and the throughput with security on (QUIC,
//! mutual TLS, the generated ACL) against plain Strata.
//!
//!     cargo run --release -p strata-integration --bin bench -- restart
//!
//! `restart`: a supervised actor's restart latency (failure to first record handled by the
//! new instance) p50/p99 over 1,000 restarts, without and with a 64 KiB snapshot to restore,
//! against a bare ractor spawn.
//!
//!     cargo run --release -p strata-integration --bin bench -- route [--seed N]
//!
//! `route`: one fixed 60 s scenario (steady load at 70% of capacity, a cloud latency spike,
//! the fog lost, recovery) replayed in virtual time against Strata's router and against the
//! static policies always-cloud, always-fog, always-edge: deadline-met ratio and utility (see
//! `strata_integration::routebench`).

mod bus;
mod restart;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use strata_core::log::{Draft, Log, RocksStore, StoreOptions};
use strata_core::{Kind, NodeId, PayloadType, StreamName};

const PAYLOAD_BYTES: usize = 100;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = flag(&args, "--seconds")?.unwrap_or(2.0);
    match args.first().map(String::as_str) {
        Some("log") => bench_log(Duration::from_secs_f64(seconds)),
        Some("bus") => bus::bench_bus(),
        Some("restart") => restart::bench_restart(),
        Some("route") => {
            let seed = flag(&args, "--seed")?.unwrap_or(1);
            let (runs, text) = strata_integration::routebench::report(seed);
            println!("route: scenario seed {seed}, 60 s virtual time\n{text}");
            println!("strata utility - best static policy: {:+.1} points", strata_integration::routebench::margin_over_static(&runs));
            Ok(())
        }
        _ => bail!("usage: bench log [--seconds S] | bench bus | bench restart | bench route [--seed N]"),
    }
}

/// The value after `name` in `args`, if present.
fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    args.iter()
        .position(|a| a == name)
        .map(|i| args.get(i + 1).with_context(|| format!("{name} needs a value"))?.parse::<T>().with_context(|| name.to_owned()))
        .transpose()
}

/// Records per second.
fn rate(records: u64, elapsed: Duration) -> f64 {
    records as f64 / elapsed.as_secs_f64()
}

fn raw_options() -> Options {
    // As close as raw RocksDB gets to the store's own settings (see core/src/log/rocks.rs).
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_compression_type(rocksdb::DBCompressionType::None);
    o.set_write_buffer_size(4 * 1024 * 1024);
    o.set_max_write_buffer_number(2);
    o.set_max_background_jobs(2);
    o
}

/// Raw RocksDB: `batch` records of 100 bytes per `WriteBatch`, each batch WAL-synced.
fn raw_batches(batch: usize, budget: Duration) -> Result<f64> {
    raw_batches_of(batch, PAYLOAD_BYTES, budget)
}

/// Raw RocksDB: three stores in the same directory tree written at once, each with
/// `WriteBatch`es of 1024 `value_bytes`-byte records + WAL sync; records/s of the slowest.
/// What three durable hops on one disk can do at best.
fn three_stores_ceiling(value_bytes: usize, budget: Duration) -> Result<f64> {
    let rates = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3).map(|_| s.spawn(|| raw_batches_of(1024, value_bytes, budget))).collect();
        writers.into_iter().map(|w| w.join().expect("writer thread")).collect::<Result<Vec<f64>>>()
    })?;
    Ok(rates.into_iter().fold(f64::INFINITY, f64::min))
}

fn raw_batches_of(batch: usize, value_bytes: usize, budget: Duration) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = DB::open(&raw_options(), dir.path())?;
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    let value = vec![7u8; value_bytes];
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < budget {
        let mut wb = WriteBatch::default();
        for _ in 0..batch {
            seq += 1;
            let mut key = b"edge-1/readings/bench/".to_vec();
            key.extend_from_slice(&seq.to_be_bytes());
            wb.put(&key, &value);
        }
        db.write_opt(wb, &wo)?;
    }
    Ok(rate(seq, start.elapsed()))
}

fn open_log(dir: &std::path::Path) -> Result<Log> {
    let store = RocksStore::open(dir, &NodeId::new("bench")?, StoreOptions::default())?;
    Ok(Log::new(Arc::new(store)))
}

fn draft() -> Draft {
    Draft::new(Kind::Reading, PayloadType::new("bench/1").expect("valid"), vec![7u8; PAYLOAD_BYTES])
}

/// Strata: `producers` tasks, each appending and waiting for its own acknowledgement.
/// Returns records/s and the mean group-commit batch size.
async fn strata_producers(producers: usize, budget: Duration) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let stream = StreamName::new("readings/bench")?;
    let commits = log.store().commits();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let (log, stream) = (log.clone(), stream.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < budget {
                    log.append_durable(stream.clone(), draft()).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = start.elapsed();
    let batches = *commits.borrow();
    log.close();
    Ok((rate(total, elapsed), total as f64 / batches.max(1) as f64))
}

/// Strata: one producer keeping up to `in_flight` appends outstanding.
async fn strata_pipelined(in_flight: usize, budget: Duration) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let stream = StreamName::new("readings/bench")?;
    let commits = log.store().commits();
    let mut pending = VecDeque::with_capacity(in_flight);
    let start = Instant::now();
    let mut total = 0u64;
    let mut last_seq = 0;
    while start.elapsed() < budget {
        while pending.len() < in_flight {
            pending.push_back(log.append(stream.clone(), draft()).await?);
        }
        let env = pending.pop_front().expect("non-empty").await?;
        assert!(env.id.seq.get() > last_seq, "acknowledged in seq order");
        last_seq = env.id.seq.get();
        total += 1;
    }
    for t in pending {
        t.await?;
        total += 1;
    }
    let elapsed = start.elapsed();
    let batches = *commits.borrow();
    log.close();
    Ok((rate(total, elapsed), total as f64 / batches.max(1) as f64))
}

/// Median of a few values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `raw` and `strata` alternately `rounds` times, so that both see the same disk
/// (fsync latency drifts over seconds on shared machines), and returns the medians.
fn paired(rounds: usize, mut raw: impl FnMut() -> Result<f64>, mut strata: impl FnMut() -> Result<(f64, f64)>) -> Result<(f64, f64, f64)> {
    let (mut r, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        r.push(raw()?);
        let (rate, batch) = strata()?;
        s.push(rate);
        b.push(batch);
    }
    Ok((median(r), median(s), median(b)))
}

fn bench_log(budget: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // For profiling one case: STRATA_BENCH_ONLY=pipelined or producers:N, e.g. under perf record.
    match std::env::var("STRATA_BENCH_ONLY").ok().as_deref() {
        Some("pipelined") => {
            let raw = raw_batches(1024, budget)?;
            let (r, avg) = rt.block_on(strata_pipelined(1024, budget))?;
            println!("pipelined: {r:.0} rec/s, avg batch {avg:.1}; raw batch of 1024: {raw:.0} rec/s; ratio {:.2}", r / raw);
            return Ok(());
        }
        Some(only) => {
            let producers: usize = only
                .strip_prefix("producers:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("STRATA_BENCH_ONLY={only:?}: expected pipelined or producers:N"))?;
            let raw = raw_batches(producers, budget)?;
            let (r, avg) = rt.block_on(strata_producers(producers, budget))?;
            println!("{producers} producers: {r:.0} rec/s, avg batch {avg:.1}; raw batch of {producers}: {raw:.0} rec/s; ratio {:.2}", r / raw);
            return Ok(());
        }
        None => {}
    }
    let rounds = 3;
    println!(
        "bench log: {PAYLOAD_BYTES}-byte payloads, sync = always; each figure is the median of {rounds} rounds of {:.1} s, \
         raw and strata alternating",
        budget.as_secs_f64()
    );
    println!("baseline: raw RocksDB on the same disk in the same run (WriteBatch of N records + WAL sync; N = 1 is put + sync)");
    println!();
    println!("{:<44} {:>11} {:>10} {:>11} {:>7} {:>7}", "case", "strata/s", "avg batch", "raw/s", "ratio", "target");
    let mut ok = true;
    let mut put_sync = Vec::new();
    let mut report = |label: &str, raw: f64, strata: f64, batch: f64, target: f64, base: &str| {
        let ratio = strata / raw;
        ok &= ratio >= target;
        let mark = if ratio >= target { "" } else { "  BELOW TARGET" };
        println!("{label:<44} {strata:>11.0} {batch:>10.1} {raw:>11.0} {ratio:>7.2} {target:>7.2}  (raw {base}){mark}");
    };
    for producers in [1usize, 8, 64] {
        let (raw, strata, batch) = paired(
            rounds,
            || raw_batches(producers, budget),
            || rt.block_on(strata_producers(producers, budget)),
        )?;
        if producers == 1 {
            put_sync.push(raw);
        }
        let base = if producers == 1 { "put + sync".to_owned() } else { format!("batch of {producers}") };
        report(&format!("(a) {producers} producers, each awaiting its ack"), raw, strata, batch, 0.8, &base);
    }
    let (raw, strata, batch) = paired(rounds, || raw_batches(1024, budget), || rt.block_on(strata_pipelined(1024, budget)))?;
    report("(b) 1 producer, 1024 appends in flight", raw, strata, batch, 0.5, "batch of 1024");
    if let Some(p) = put_sync.first() {
        println!("(b) against one put + sync per record: x{:.1}", strata / p);
    }
    println!("bench log: {}", if ok { "every ratio meets its target" } else { "SOME RATIO BELOW TARGET" });
    Ok(())
}
