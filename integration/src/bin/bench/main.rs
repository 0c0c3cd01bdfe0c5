//! Strata's benchmarks: each prints figures next to a baseline measured in the same run,
//! and the ratio.
//!
//!     cargo run --release -p strata-integration --bin bench -- log [--seconds S]
//!
//! `log`: appends of 100-byte payloads with `sync = always` group commit, against raw
//! RocksDB (one `put` + WAL sync per record; a `WriteBatch` of the same size + WAL sync).
//! The figures depend on the disk's fsync latency; the ratios are what to compare. Raw and
//! Strata run in alternating slices of a few hundred ms, so that both meet the same disk, and
//! each slice starts once every store's flushes and compactions have finished. For
//! comparison it also prints raw RocksDB with new WAL files (RocksDB's default) and raw
//! RocksDB writing records as large as Strata stores them.
//! `STRATA_BENCH_WORKERS` sets the worker threads of the producers' tokio runtime
//! (default 2), `STRATA_BENCH_MEMTABLE_BYTES` the memtables on both sides.
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
mod sketches;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use strata_core::log::{Draft, Log, RocksStore, StoreOptions, BACKGROUND_RUNNING, BACKGROUND_WAITING};
use strata_core::{Kind, NodeId, PayloadType, StreamName};

const PAYLOAD_BYTES: usize = 100;

/// The raw baselines' key: this prefix, then the record's seq (u64 big-endian).
const RAW_KEY_PREFIX: &[u8] = b"edge-1/readings/bench/";

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

/// How a raw store gets its WAL files.
#[derive(Clone, Copy, PartialEq)]
enum Wal {
    /// Reused once flushed, as the Strata store does (`recycle_log_file_num`): the baseline.
    Reused,
    /// A new file each time, RocksDB's default: what a program with default options gets.
    New,
}

/// Worker threads of the producers' tokio runtime: 2 (this machine's vCPUs, as a node's
/// runtime has), or `STRATA_BENCH_WORKERS` to see what another runtime gives.
fn producer_workers() -> Result<usize> {
    match std::env::var("STRATA_BENCH_WORKERS") {
        Err(_) => Ok(2),
        Ok(v) => v.parse().ok().filter(|&n| n >= 1).with_context(|| format!("STRATA_BENCH_WORKERS={v:?} is not a number of threads (at least 1)")),
    }
}

/// Memtable size of the Strata store and of the raw stores alike: the store's default
/// (`log.memtable_bytes`), or `STRATA_BENCH_MEMTABLE_BYTES` to see what another size does.
fn memtable_bytes() -> Result<usize> {
    match std::env::var("STRATA_BENCH_MEMTABLE_BYTES") {
        Err(_) => Ok(StoreOptions::default().memtable_bytes),
        Ok(v) => v.parse().with_context(|| format!("STRATA_BENCH_MEMTABLE_BYTES={v:?} is not a number of bytes")),
    }
}

fn raw_options(wal: Wal, memtable_bytes: usize) -> Options {
    // As close as raw RocksDB gets to the store's own settings (see core/src/log/rocks.rs).
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_compression_type(rocksdb::DBCompressionType::None);
    o.set_write_buffer_size(memtable_bytes);
    o.set_max_write_buffer_number(2);
    o.set_max_background_jobs(2);
    if wal == Wal::Reused {
        o.set_recycle_log_file_num(4);
    }
    o
}

/// A raw RocksDB store written in `WriteBatch`es of `batch` records of `value_bytes` bytes,
/// each batch WAL-synced.
struct RawStore {
    db: DB,
    wo: WriteOptions,
    /// Each record's key: this prefix, then its seq (u64 big-endian).
    key_prefix: Vec<u8>,
    value: Vec<u8>,
    batch: usize,
    seq: u64,
    _dir: tempfile::TempDir,
}

impl RawStore {
    /// A store with the Strata store's settings.
    fn open(batch: usize, value_bytes: usize) -> Result<RawStore> {
        RawStore::open_with(batch, value_bytes, Wal::Reused)
    }

    fn open_with(batch: usize, value_bytes: usize, wal: Wal) -> Result<RawStore> {
        let dir = tempfile::tempdir()?;
        let db = DB::open(&raw_options(wal, memtable_bytes()?), dir.path())?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        Ok(RawStore { db, wo, key_prefix: RAW_KEY_PREFIX.to_vec(), value: vec![7u8; value_bytes], batch, seq: 0, _dir: dir })
    }

    /// A store with the Strata store's settings whose records are as large as Strata stores
    /// the bench's appends: keys of `key_bytes` (seq included) and values of `value_bytes`.
    fn open_sized(batch: usize, key_bytes: usize, value_bytes: usize) -> Result<RawStore> {
        let mut store = RawStore::open(batch, value_bytes)?;
        store.key_prefix = vec![b'k'; key_bytes.saturating_sub(8)];
        Ok(store)
    }

    /// RocksDB's flushes and compactions running or waiting on this store (its one column
    /// family), read from the properties `RocksStore::background_jobs` reads.
    fn background_jobs(&self) -> u64 {
        BACKGROUND_RUNNING.iter().chain(&BACKGROUND_WAITING).map(|&name| self.db.property_int_value(name).ok().flatten().unwrap_or(0)).sum()
    }

    /// Writes batches for `slice`; returns the records written and the time taken.
    fn run(&mut self, slice: Duration) -> Result<(u64, Duration)> {
        let (start, first) = (Instant::now(), self.seq);
        while start.elapsed() < slice {
            self.write(self.batch)?;
        }
        Ok((self.seq - first, start.elapsed()))
    }

    /// Writes the next `records` records as one `WriteBatch` + WAL sync.
    fn write(&mut self, records: usize) -> Result<()> {
        let mut wb = WriteBatch::default();
        for _ in 0..records {
            self.seq += 1;
            let mut key = self.key_prefix.clone();
            key.extend_from_slice(&self.seq.to_be_bytes());
            wb.put(&key, &self.value);
        }
        self.db.write_opt(wb, &self.wo)?;
        Ok(())
    }
}

/// Raw RocksDB: three stores in the same directory tree written at once, each with
/// `WriteBatch`es of 1024 `value_bytes`-byte records + WAL sync; records/s of the slowest.
/// What three durable hops on one disk can do at best.
fn three_stores_ceiling(value_bytes: usize, budget: Duration) -> Result<f64> {
    let rates = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let (records, elapsed) = RawStore::open(1024, value_bytes)?.run(budget)?;
                    Ok(rate(records, elapsed))
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().expect("writer thread")).collect::<Result<Vec<f64>>>()
    })?;
    Ok(rates.into_iter().fold(f64::INFINITY, f64::min))
}

/// A Strata log appended to by the benchmark's producers.
struct StrataLog {
    log: Log,
    store: Arc<RocksStore>,
    stream: StreamName,
    dir: tempfile::TempDir,
}

impl StrataLog {
    fn open() -> Result<StrataLog> {
        let dir = tempfile::tempdir()?;
        let store = RocksStore::open(dir.path(), &NodeId::new("bench")?, StoreOptions { memtable_bytes: memtable_bytes()?, ..StoreOptions::default() })?;
        let store = Arc::new(store);
        Ok(StrataLog { log: Log::new(store.clone()), store, stream: StreamName::new("readings/bench")?, dir })
    }

    /// Group-commit batches written so far.
    fn commits(&self) -> u64 {
        *self.log.store().commits().borrow()
    }

    /// `producers` tasks, each appending and waiting for its own acknowledgement, for
    /// `slice`. Returns the records acknowledged and the time taken.
    async fn producers(&self, producers: usize, slice: Duration) -> Result<(u64, Duration)> {
        let (log, stream) = (self.log.clone(), self.stream.clone());
        each_awaiting(producers, slice, move || {
            let (log, stream) = (log.clone(), stream.clone());
            async move {
                log.append_durable(stream, draft()).await?;
                Ok(())
            }
        })
        .await
    }

    /// One producer keeping up to `in_flight` appends outstanding for `slice`, then waiting
    /// for those still outstanding. Returns the records acknowledged and the time taken.
    async fn pipelined(&self, in_flight: usize, slice: Duration) -> Result<(u64, Duration)> {
        let mut pending = VecDeque::with_capacity(in_flight);
        let start = Instant::now();
        let mut total = 0u64;
        let mut last_seq = 0;
        while start.elapsed() < slice {
            while pending.len() < in_flight {
                pending.push_back(self.log.append(self.stream.clone(), draft()).await?);
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
        Ok((total, start.elapsed()))
    }
}

/// `n` tokio tasks, each calling `append` and awaiting it, again and again for `slice`.
/// Returns the calls completed and the time taken.
async fn each_awaiting<F, Fut>(n: usize, slice: Duration, append: F) -> Result<(u64, Duration)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let append = append.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while start.elapsed() < slice {
                    append().await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed()))
}

impl Drop for StrataLog {
    fn drop(&mut self) {
        self.log.close();
    }
}

/// The benchmark's payload type, validated once as a producer would hold it.
static PAYLOAD_TYPE: std::sync::LazyLock<PayloadType> = std::sync::LazyLock::new(|| PayloadType::new("bench/1").expect("valid"));

fn draft() -> Draft {
    Draft::new(Kind::Reading, PAYLOAD_TYPE.clone(), vec![7u8; PAYLOAD_BYTES])
}

/// Encoding one appended envelope (the committer does it for every append): Strata's
/// encoder against `bincode::serde`, which writes the same bytes.
fn bench_encode(rt: &tokio::runtime::Runtime) -> Result<()> {
    let envelope = rt.block_on(async {
        let log = StrataLog::open()?;
        anyhow::Ok(log.log.append_durable(log.stream.clone(), draft()).await?)
    })?;
    let limits = strata_core::codec::Limits::default();
    /// ns per call of `encode`, over 2 M calls writing into `out`.
    fn time(out: &mut Vec<u8>, mut encode: impl FnMut(&mut Vec<u8>) -> Result<()>) -> Result<f64> {
        let rounds = 2_000_000u32;
        let start = Instant::now();
        for _ in 0..rounds {
            encode(out)?;
        }
        Ok(start.elapsed().as_nanos() as f64 / f64::from(rounds))
    }
    let mut ours = Vec::new();
    let strata = time(&mut ours, |out| Ok(strata_core::codec::encode_into(&envelope, &limits, out)?))?;
    let mut out = Vec::new();
    let serde = time(&mut out, |out| {
        out.clear();
        out.push(strata_core::codec::FORMAT_VERSION);
        bincode::serde::encode_into_std_write(&envelope, out, bincode::config::standard())?;
        Ok(())
    })?;
    anyhow::ensure!(out == ours, "bincode::serde wrote other bytes than Strata's encoder");
    println!("encode: {} bytes per envelope; strata {strata:.1} ns, bincode::serde {serde:.1} ns (same bytes); ratio {:.2}", ours.len(), strata / serde);
    let mut record = Vec::new();
    let stored = time(&mut record, |out| Ok(strata_core::codec::encode_record_into(&envelope, &limits, out)?))?;
    println!("encode as the log stores it (without what the key says): {} bytes, {stored:.1} ns", record.len());
    // Decoding, as every received envelope and every record read back is decoded.
    let mut decoded = None;
    let strata = time(&mut Vec::new(), |_| {
        decoded = Some(strata_core::codec::decode(&ours, &limits)?);
        Ok(())
    })?;
    anyhow::ensure!(decoded.as_ref() == Some(&envelope), "Strata's decoder gave another envelope");
    let mut theirs = None;
    let serde = time(&mut Vec::new(), |_| {
        let (e, _): (strata_core::Envelope, usize) = bincode::serde::decode_from_slice(&ours[1..], bincode::config::standard())?;
        theirs = Some(e);
        Ok(())
    })?;
    anyhow::ensure!(theirs.as_ref() == Some(&envelope), "bincode::serde decoded another envelope");
    println!("decode: strata {strata:.1} ns, bincode::serde {serde:.1} ns (same envelope); ratio {:.2}", strata / serde);
    let id = envelope.id.clone();
    let stored = time(&mut Vec::new(), |_| {
        decoded = Some(strata_core::codec::decode_record(&id, &record, &limits)?);
        Ok(())
    })?;
    anyhow::ensure!(decoded.as_ref() == Some(&envelope), "the stored record decoded to another envelope");
    println!("decode as the log stores it: {stored:.1} ns");
    Ok(())
}

/// RocksDB's own group commit for comparison: `n` threads each writing one record with
/// `sync` and waiting for it (RocksDB gathers concurrent writers into write groups), against
/// the raw batch of `n`, in alternating slices like [`round`].
fn bench_rocksdb_group(budget: Duration) -> Result<()> {
    for n in [1usize, 8, 64] {
        let mut raw = RawStore::open(n, PAYLOAD_BYTES)?;
        let threads = RawStore::open(1, PAYLOAD_BYTES)?;
        let next = std::sync::atomic::AtomicU64::new(0);
        let slice = budget / SLICES;
        let (mut raw_total, mut group_total) = ((0, Duration::ZERO), (0, Duration::ZERO));
        for _ in 0..SLICES {
            let (records, elapsed) = raw.run(slice)?;
            raw_total = (raw_total.0 + records, raw_total.1 + elapsed);
            let start = Instant::now();
            let written = std::thread::scope(|s| {
                let writers: Vec<_> = (0..n)
                    .map(|_| {
                        s.spawn(|| {
                            let mut written = 0u64;
                            while start.elapsed() < slice {
                                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let mut key = RAW_KEY_PREFIX.to_vec();
                                key.extend_from_slice(&seq.to_be_bytes());
                                threads.db.put_opt(&key, &threads.value, &threads.wo)?;
                                written += 1;
                            }
                            anyhow::Ok(written)
                        })
                    })
                    .collect();
                writers.into_iter().map(|w| w.join().expect("writer thread")).sum::<Result<u64>>()
            })?;
            group_total = (group_total.0 + written, group_total.1 + start.elapsed());
        }
        let (r, g) = (rate(raw_total.0, raw_total.1), rate(group_total.0, group_total.1));
        println!("rocksdb group commit, {n} threads each put + sync: {g:.0} rec/s; raw batch of {n}: {r:.0} rec/s; ratio {:.2}", g / r);
    }
    Ok(())
}

/// Slices per side in one round.
const SLICES: u32 = 10;

/// Records/s of one round (see [`round`]).
struct Round {
    /// Raw RocksDB with the store's settings: the baseline.
    raw: f64,
    /// Raw RocksDB creating a new WAL file each time (RocksDB's default).
    raw_new_wal: f64,
    /// Raw RocksDB with the store's settings, writing records as large as Strata stores the
    /// bench's appends (key and value): what the same batches cost the disk, so that Strata's
    /// ratio to it is what its group commit costs beyond the bytes of the stored envelope.
    raw_as_stored: f64,
    strata: f64,
    /// Strata's mean group-commit batch size.
    avg_batch: f64,
}

/// Bytes of the key and of the value under which the Strata store keeps one of the bench's
/// appends (see `core/src/log/keys.rs`: origin and stream each with a length byte,
/// incarnation and seq as u64).
fn stored_sizes(rt: &tokio::runtime::Runtime) -> Result<(usize, usize)> {
    let log = StrataLog::open()?;
    let envelope = rt.block_on(log.log.append_durable(log.stream.clone(), draft()))?;
    let mut value = Vec::new();
    strata_core::codec::encode_record_into(&envelope, &Default::default(), &mut value)?;
    let key = 1 + log.log.node().as_str().len() + 8 + 1 + log.stream.as_str().len() + 8;
    Ok((key, value.len()))
}

/// One round: fresh raw stores (`WriteBatch`es of `batch` records; WAL files reused as the
/// Strata store does, new ones as by default, and records as large as Strata stores them) and
/// a fresh Strata log, run in `SLICES` alternating slices each, `budget` in all per side, so
/// that all see the same disk: fsync latency drifts by tens of percent within seconds on
/// shared machines, and slices of a few hundred ms spread that drift over every side.
fn round(
    rt: &tokio::runtime::Runtime,
    batch: usize,
    stored: (usize, usize),
    budget: Duration,
    strata: impl AsyncFn(&StrataLog, Duration) -> Result<(u64, Duration)>,
) -> Result<Round> {
    let mut raw = RawStore::open(batch, PAYLOAD_BYTES)?;
    let mut raw_new_wal = RawStore::open_with(batch, PAYLOAD_BYTES, Wal::New)?;
    let mut raw_as_stored = RawStore::open_sized(batch, stored.0, stored.1)?;
    let log = StrataLog::open()?;
    let slice = budget / SLICES;
    let mut totals = [(0, Duration::ZERO); 4];
    let mut add = |i: usize, (n, t): (u64, Duration)| totals[i] = (totals[i].0 + n, totals[i].1 + t);
    for _ in 0..SLICES {
        settle(&[&raw, &raw_new_wal, &raw_as_stored], &log)?;
        add(0, raw.run(slice)?);
        settle(&[&raw, &raw_new_wal, &raw_as_stored], &log)?;
        add(1, raw_new_wal.run(slice)?);
        settle(&[&raw, &raw_new_wal, &raw_as_stored], &log)?;
        add(2, raw_as_stored.run(slice)?);
        settle(&[&raw, &raw_new_wal, &raw_as_stored], &log)?;
        add(3, rt.block_on(strata(&log, slice))?);
    }
    let [raw, raw_new_wal, raw_as_stored, strata] = totals.map(|(n, t)| rate(n, t));
    Ok(Round { raw, raw_new_wal, raw_as_stored, strata, avg_batch: totals[3].0 as f64 / log.commits().max(1) as f64 })
}

/// Longest [`settle`] waits.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Waits until no store of a round has a flush or a compaction running or waiting, so that
/// each slice is timed with the CPUs and the disk free of the other sides' background work.
/// Each side still pays the background work its own writes start during its slice.
fn settle(raws: &[&RawStore], log: &StrataLog) -> Result<()> {
    let start = Instant::now();
    while raws.iter().map(|r| r.background_jobs()).sum::<u64>() + log.store.background_jobs() > 0 {
        anyhow::ensure!(start.elapsed() < SETTLE_MAX, "the stores' flushes and compactions did not finish within {SETTLE_MAX:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Median of a few values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `rounds` rounds (see [`round`]); the median of each figure.
fn measure(
    rt: &tokio::runtime::Runtime,
    rounds: usize,
    batch: usize,
    stored: (usize, usize),
    budget: Duration,
    strata: impl AsyncFn(&StrataLog, Duration) -> Result<(u64, Duration)>,
) -> Result<Round> {
    let mut all = Vec::new();
    for _ in 0..rounds {
        all.push(round(rt, batch, stored, budget, &strata)?);
    }
    let of = |f: fn(&Round) -> f64| median(all.iter().map(f).collect());
    Ok(Round {
        raw: of(|r| r.raw),
        raw_new_wal: of(|r| r.raw_new_wal),
        raw_as_stored: of(|r| r.raw_as_stored),
        strata: of(|r| r.strata),
        avg_batch: of(|r| r.avg_batch),
    })
}

fn bench_log(budget: Duration) -> Result<()> {
    let workers = producer_workers()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    let pipelined = async |log: &StrataLog, slice| log.pipelined(1024, slice).await;
    // For profiling one case: STRATA_BENCH_ONLY=pipelined or producers:N, e.g. under perf
    // record; STRATA_BENCH_ONLY=encode times the envelope encoder alone; rocksdb-group
    // measures RocksDB's own group commit (concurrent writers, each put + sync);
    // sketches four bare group commits over raw RocksDB next to Strata (bench/sketches.rs);
    // reader-open what opening a read-only reader costs (each `log tail --follow` refresh).
    match std::env::var("STRATA_BENCH_ONLY").ok().as_deref() {
        Some("encode") => return bench_encode(&rt),
        Some("rocksdb-group") => return bench_rocksdb_group(budget),
        Some("sketches") => return sketches::bench_sketches(&rt, budget),
        Some("reader-open") => return bench_reader_open(&rt, budget),
        Some("pipelined-alone") => {
            // Strata alone, no raw slices: a profile of this run is Strata's own.
            let log = StrataLog::open()?;
            let (n, t) = rt.block_on(log.pipelined(1024, budget))?;
            println!("pipelined alone: {:.0} rec/s, avg batch {:.1}", rate(n, t), n as f64 / log.commits().max(1) as f64);
            return Ok(());
        }
        Some("pipelined") => {
            let r = round(&rt, 1024, stored_sizes(&rt)?, budget, pipelined)?;
            println!(
                "pipelined: {:.0} rec/s, avg batch {:.1}; raw batch of 1024: {:.0} rec/s; ratio {:.2}; to raw as stored {:.2}",
                r.strata,
                r.avg_batch,
                r.raw,
                r.strata / r.raw,
                r.strata / r.raw_as_stored
            );
            return Ok(());
        }
        Some(only) => {
            let producers: usize = only
                .strip_prefix("producers:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("STRATA_BENCH_ONLY={only:?}: expected pipelined, producers:N, encode, rocksdb-group, sketches or reader-open"))?;
            let r = round(&rt, producers, stored_sizes(&rt)?, budget, async |log: &StrataLog, slice| log.producers(producers, slice).await)?;
            println!(
                "{producers} producers: {:.0} rec/s, avg batch {:.1}; raw batch of {producers}: {:.0} rec/s; ratio {:.2}; to raw as stored {:.2}",
                r.strata,
                r.avg_batch,
                r.raw,
                r.strata / r.raw,
                r.strata / r.raw_as_stored
            );
            return Ok(());
        }
        None => {}
    }
    let rounds = 3;
    println!(
        "bench log: {PAYLOAD_BYTES}-byte payloads, sync = always; each figure is the median of {rounds} rounds, each round \
         {SLICES} alternating slices of raw and strata, {:.1} s of each in all; before each slice, every store's flushes and \
         compactions have finished",
        budget.as_secs_f64()
    );
    println!(
        "baseline: raw RocksDB on the same disk in the same run (WriteBatch of N records + WAL sync; N = 1 is put + sync), \
         with the store's settings: WAL files reused, as the store does, and {} MiB memtables on both sides; \
         Strata's producers are tasks on a tokio runtime of {workers} worker threads",
        memtable_bytes()? as f64 / (1024.0 * 1024.0)
    );
    let stored = stored_sizes(&rt)?;
    println!("for comparison only: raw RocksDB creating a new WAL file each time (RocksDB's default), and Strata's ratio to it");
    println!(
        "and raw RocksDB with the store's settings writing records as large as the store keeps one append ({}-byte keys, \
         {}-byte values, against {}-byte keys and {PAYLOAD_BYTES}-byte values in the baseline): Strata's ratio to it is what its \
         group commit costs beyond the bytes of the stored envelope",
        stored.0,
        stored.1,
        RAW_KEY_PREFIX.len() + 8
    );
    println!();
    println!(
        "{:<44} {:>11} {:>10} {:>11} {:>7} {:>7}   {:>13} {:>7}   {:>15} {:>7}",
        "case", "strata/s", "avg batch", "raw/s", "ratio", "target", "raw new WAL/s", "ratio", "raw as stored/s", "ratio"
    );
    let mut ok = true;
    let mut put_sync = Vec::new();
    let mut report = |label: &str, r: &Round, target: f64, base: &str| {
        let ratio = r.strata / r.raw;
        ok &= ratio >= target;
        let mark = if ratio >= target { "" } else { "  BELOW TARGET" };
        println!(
            "{label:<44} {:>11.0} {:>10.1} {:>11.0} {ratio:>7.3} {target:>7.2}   {:>13.0} {:>7.3}   {:>15.0} {:>7.3}  (raw {base}){mark}",
            r.strata,
            r.avg_batch,
            r.raw,
            r.raw_new_wal,
            r.strata / r.raw_new_wal,
            r.raw_as_stored,
            r.strata / r.raw_as_stored
        );
    };
    for producers in [1usize, 8, 64] {
        let r = measure(&rt, rounds, producers, stored, budget, async |log: &StrataLog, slice| log.producers(producers, slice).await)?;
        if producers == 1 {
            put_sync.push(r.raw);
        }
        let base = if producers == 1 { "put + sync".to_owned() } else { format!("batch of {producers}") };
        report(&format!("(a) {producers} producers, each awaiting its ack"), &r, 0.8, &base);
    }
    let r = measure(&rt, rounds, 1024, stored, budget, pipelined)?;
    report("(b) 1 producer, 1024 appends in flight", &r, 0.5, "batch of 1024");
    if let Some(p) = put_sync.first() {
        println!("(b) against one put + sync per record: x{:.1}", r.strata / p);
    }
    println!("bench log: {}", if ok { "every ratio meets its target" } else { "SOME RATIO BELOW TARGET" });
    Ok(())
}

/// What a read-only reader's open costs (`strata log ls`, and each refresh of
/// `log tail --follow`): a store filled for `budget` by one producer with 1,024 appends in
/// flight, then the median of 20 opens, while the writer is stopped and while it appends, and
/// of 20 refreshes that find nothing new.
fn bench_reader_open(rt: &tokio::runtime::Runtime, budget: Duration) -> Result<()> {
    let log = StrataLog::open()?;
    let (records, _) = rt.block_on(log.pipelined(1024, budget))?;
    let path = log.dir.path().to_owned();
    let files =
        |ext: &str| std::fs::read_dir(&path).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == ext)).count()).unwrap_or(0);
    let opens = |n: usize| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..n {
            let start = Instant::now();
            let reader = RocksStore::open_read_only(&path)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            drop(reader);
        }
        Ok(median(times))
    };
    let busy = {
        let (log, stream) = (log.log.clone(), log.stream.clone());
        rt.spawn(async move {
            for _ in 0..200_000 {
                log.append_durable(stream.clone(), draft()).await?;
            }
            anyhow::Ok(())
        })
    };
    let appending = opens(20)?;
    busy.abort();
    let _ = rt.block_on(busy);
    let quiet = opens(20)?;
    println!(
        "reader open: store of {records} records ({} table files, {} WAL files): median {quiet:.1} ms idle, {appending:.1} ms while a producer appends",
        files("sst"),
        files("log")
    );
    // A refresh of a store nobody wrote to since the reader opened it lists the files and does
    // not open it again, once they have been left alone a few seconds.
    std::thread::sleep(Duration::from_secs(4));
    let reader = RocksStore::open_read_only(&path)?;
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let opened = reader.refresh()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(!opened, "a refresh opened a store nobody writes to");
    }
    println!("reader refresh, nothing written since its open: median {:.3} ms (files listed, store not opened again)", median(times));
    Ok(())
}
