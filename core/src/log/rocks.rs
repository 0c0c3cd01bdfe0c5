//! The RocksDB [`Store`]: the only code in Strata that knows RocksDB.
//!
//! Column families: `log` (records, keyed `origin | incarnation | stream | seq`), `cursors`
//! (`consumer | stream key` → seq), `watermarks` (stream key → figures), `meta` (format
//! version, incarnation, node id).
//!
//! One committer thread takes operations from the group-commit hand-off in batches, plans
//! them ([`Core::plan`]) and writes each batch as one `WriteBatch`. A `WriteBatch` is
//! atomic, and a stream's figures are written in the same batch as its records, so after a
//! crash the store is exactly as of some batch boundary: no hole in any seq.
//!
//! Under `sync = "always"` the commit is a two-stage pipeline. The committer writes a batch
//! without syncing, stages its state ([`Core::stage`]) and passes it to the syncer thread;
//! the syncer fsyncs the WAL once for every batch written so far (`SyncWAL`), and only then
//! makes their state current and completes the producers' tickets. So the next batch is
//! planned and written while the previous one's fsync runs. WAL order is write order, one
//! thread writes, and RocksDB recovers a prefix of the WAL: what a crash keeps is a prefix
//! of batches, which holds every acknowledged one. Nothing written but not yet synced is
//! readable (reads stop at the durable state). A failed WAL sync stops the store: what was
//! in flight and everything after is refused until it is reopened, since after a failed
//! fsync nobody can say what reached the disk.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, Write as _};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, ErrorKind, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use strata_sync::handoff::{Completer, Handoff};

use crate::codec::Limits;
use crate::config::{LogSection, Name, RetentionRule, SyncPolicy};
use crate::model::{Envelope, Incarnation, NodeId, Tier};

use super::core::{decode_records, parse_stats_entry, Backend, Cf, Core, Plan, Sink, STORE_FORMAT_OLDEST, STORE_FORMAT_VERSION};
use super::keys::{parse_cursor_key, record_seq, stream_prefix};
use super::{LogError, Op, OpOutcome, Pending, PendingInner, Store, StreamInfo, StreamKey};

const META_FORMAT: &[u8] = b"format_version";
const META_INCARNATION: &[u8] = b"incarnation";
const META_NODE: &[u8] = b"node_id";
/// The incarnations this store had before its current one, oldest first (8 bytes each).
const META_EARLIER_INCARNATIONS: &[u8] = b"earlier_incarnations";
/// Whether the store is open for writing, and under which sync policy: [`OPEN_SYNCED`],
/// [`OPEN_UNSYNCED`], or [`CLOSED`] once closed with everything synced.
const META_OPEN: &[u8] = b"open";
const CLOSED: u8 = 0;
/// Open with `sync = always`: nothing acknowledged can be lost, closed cleanly or not.
const OPEN_SYNCED: u8 = 1;
/// Open with `sync = interval` or `never`, followed by the machine's boot id. Found so at the
/// next open after the machine restarted (a power loss, a kernel crash), acknowledged records
/// may have been lost with the page cache, and their seqs must not be handed out again. In
/// the same boot only the process died: RocksDB had handed every acknowledged write to the
/// kernel, which keeps it.
const OPEN_UNSYNCED: u8 = 2;
/// A periodic WAL sync failed: what it held may never reach the disk (the kernel may drop
/// pages it failed to write), even in the same boot. The next open goes on under a new
/// incarnation.
const SYNC_FAILED: u8 = 3;
/// Linux's id of the current boot, new at every boot.
const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
const LOCK_FILE: &str = "strata.lock";

/// How a store is opened; see `[log]` in `configs/reference.toml`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub sync: SyncPolicy,
    pub sync_interval_ms: u64,
    pub commit_batch_len_max: usize,
    pub commit_linger_us: u64,
    pub commit_wait_adaptive: bool,
    pub commit_wait_us_max: u64,
    pub commit_spin_us: u64,
    pub commit_queue_len_max: usize,
    pub commit_unsynced_batches_max: usize,
    pub limits: Limits,
    pub memtable_bytes: usize,
    pub block_cache_bytes: usize,
    pub retention: Vec<RetentionRule>,
    pub sweep_records_max: u64,
    pub wal_files_reused: usize,
    pub present_ranges_max: usize,
    pub info_log_files_max: usize,
    pub info_log_file_bytes_max: usize,
    /// Tests only: the id of "this boot", in place of the machine's (to act out a restart).
    #[doc(hidden)]
    pub boot_id: Option<String>,
}

impl StoreOptions {
    pub fn from_config(log: &LogSection) -> StoreOptions {
        StoreOptions {
            sync: log.sync,
            sync_interval_ms: log.sync_interval_ms,
            commit_batch_len_max: log.commit_batch_len_max,
            commit_linger_us: log.commit_linger_us,
            commit_wait_adaptive: log.commit_wait_adaptive,
            commit_wait_us_max: log.commit_wait_us_max,
            commit_spin_us: log.commit_spin_us,
            commit_queue_len_max: log.commit_queue_len_max,
            commit_unsynced_batches_max: log.commit_unsynced_batches_max,
            limits: Limits { max_payload_bytes: log.payload_bytes_max },
            memtable_bytes: log.memtable_bytes,
            block_cache_bytes: log.block_cache_bytes,
            retention: with_snapshot_rule(&log.retention, log.snapshot_bytes_max),
            sweep_records_max: log.sweep_records_max,
            wal_files_reused: log.wal_files_reused,
            present_ranges_max: log.present_ranges_max,
            info_log_files_max: log.info_log_files_max,
            info_log_file_bytes_max: log.info_log_file_bytes_max,
            boot_id: None,
        }
    }
}

/// The configured rules, then one for actor snapshots (`snapshots/**`, `snapshot_bytes_max`);
/// a configured rule matching snapshots comes first and wins.
fn with_snapshot_rule(rules: &[RetentionRule], snapshot_bytes_max: u64) -> Vec<RetentionRule> {
    let mut rules = rules.to_vec();
    rules.push(RetentionRule {
        streams: crate::config::StreamPattern::new(format!("{}**", super::SNAPSHOTS_PREFIX)).expect("valid pattern"),
        bytes_max: Some(snapshot_bytes_max),
        age_s_max: None,
        keep_until_acked: Vec::new(),
    });
    rules
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::from_config(&LogSection::default())
    }
}

pub struct RocksStore {
    path: PathBuf,
    node: NodeId,
    incarnation: Incarnation,
    /// `log.payload_bytes_max` within the ceiling (fixed at open).
    payload_bytes_max: usize,
    /// The incarnations before `incarnation`, oldest first.
    earlier: Vec<Incarnation>,
    /// Replaced as a whole when a read-only store is refreshed.
    db: RwLock<Arc<DB>>,
    core: Arc<Mutex<Core>>,
    handoff: Handoff<Op, OpOutcome>,
    commits: tokio::sync::watch::Sender<u64>,
    threads: Mutex<Threads>,
    /// Held for the store's lifetime: other processes cannot open it for writing.
    _lock: Option<File>,
    /// Opened with [`RocksStore::open_read_only`].
    read_only: bool,
    /// Set once [`Store::close`] has made everything queued durable, or the committer thread
    /// panicked (nothing more will be written either way).
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// A read-only store's files as listed just before it was last opened.
    listed: Mutex<Option<Listing>>,
}

/// The files of a store, as a read-only store listed them just before opening it.
struct Listing {
    /// Name, length and modification time of each file, but table files (a new one comes
    /// with a write to the MANIFEST) and RocksDB's info logs (not data).
    files: Vec<(std::ffi::OsString, u64, SystemTime)>,
    /// When the files were listed.
    at: SystemTime,
}

/// How long a store's files must have been left alone before a listing is trusted to show the
/// next write: a write sets a file's modification time from a coarse clock (a few ms on
/// Linux, 2 s on FAT), so a write soon after a listing may leave the time it listed; and a
/// reused WAL file keeps its length, so its time is all that shows a write.
const FILES_QUIET: Duration = Duration::from_secs(3);

impl Listing {
    /// The store's files now, or `None` if they cannot be listed (the store is then opened
    /// again at each refresh, as without a listing).
    fn take(path: &Path, at: SystemTime) -> Option<Listing> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).ok()? {
            let entry = entry.ok()?;
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.ends_with(".sst") || text.starts_with("LOG") {
                continue;
            }
            let meta = entry.metadata().ok()?;
            files.push((name, meta.len(), meta.modified().ok()?));
        }
        files.sort();
        Some(Listing { files, at })
    }

    /// Nothing was written since `earlier` was taken, and an open just after it saw
    /// everything: the same files, unchanged, and the newest written `FILES_QUIET` before it.
    fn unchanged_since(&self, earlier: &Listing) -> bool {
        let newest = self.files.iter().map(|f| f.2).max();
        self.files == earlier.files && newest.is_some_and(|t| t + FILES_QUIET <= earlier.at)
    }
}

#[derive(Default)]
struct Threads {
    committer: Option<JoinHandle<()>>,
    syncer: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Set by the `sync = interval` thread when a sync failed ([`on_periodic_sync_failure`]).
    sync_failed: Arc<std::sync::atomic::AtomicBool>,
}

fn lock_core(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

struct DbBackend<'a>(&'a DB);

impl Backend for DbBackend<'_> {
    fn scan(&self, prefix: &[u8], from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        scan(self.0, prefix, from, to, limit).map_err(|e| read_error(self.0.path(), e))
    }
}

fn cf(db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
    db.cf_handle(cf.name()).expect("column families are created at open")
}

/// See [`Backend::scan`](super::core::Backend::scan).
fn scan(db: &DB, prefix: &[u8], from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, rocksdb::Error> {
    let mut start = prefix.to_vec();
    start.extend_from_slice(&from.to_be_bytes());
    // RocksDB itself stops at the bound, without reading past it where it can tell from a
    // table's index.
    let mut end = prefix.to_vec();
    match to.checked_add(1) {
        Some(after) => end.extend_from_slice(&after.to_be_bytes()),
        None => end.extend_from_slice(&[0xFF; 9]),
    }
    let mut read = rocksdb::ReadOptions::default();
    read.set_iterate_upper_bound(end);
    let mut out = Vec::new();
    let mut records = db.iterator_cf_opt(cf(db, Cf::Log), read, IteratorMode::From(&start, Direction::Forward));
    // The limit and `to` are checked before the next step: a read of n records, or up to the
    // stream's last, does not fail on an unreadable block just past them.
    while out.len() < limit {
        let Some(item) = records.next() else { break };
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        if let Some(seq) = record_seq(prefix, &k) {
            out.push((seq.get(), v.into_vec()));
            if seq.get() >= to {
                break;
            }
        }
    }
    Ok(out)
}

/// Whether `seq` lies in one of `gaps` (ascending, disjoint).
fn in_gaps(seq: u64, gaps: &[RangeInclusive<u64>]) -> bool {
    let i = gaps.partition_point(|g| *g.end() < seq);
    gaps.get(i).is_some_and(|g| g.contains(&seq))
}

/// How many of `records` (ascending seqs) follow on from `expect` without a hole, where the
/// ranges in `gaps` are holes that are known and skipped.
fn present_prefix(records: &[(u64, Vec<u8>)], mut expect: u64, gaps: &[RangeInclusive<u64>]) -> usize {
    for (i, (seq, _)) in records.iter().enumerate() {
        while let Some(gap) = gaps.iter().find(|g| g.contains(&expect)) {
            expect = gap.end().saturating_add(1);
        }
        if *seq != expect {
            return i;
        }
        expect = seq.saturating_add(1);
    }
    records.len()
}

fn db_options(opts: &StoreOptions) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Built without compression libraries (see Cargo.toml): say so, or RocksDB asks for Snappy.
    o.set_compression_type(DBCompressionType::None);
    o.set_write_buffer_size(opts.memtable_bytes);
    o.set_max_write_buffer_number(2);
    // All column families' memtables together stay within two memtables' worth.
    o.set_db_write_buffer_size(opts.memtable_bytes * 2);
    o.set_atomic_flush(true);
    // WAL files are reused instead of created: an fsync of a file whose size did not change
    // need not write its inode, which made a synced batch of 64 records about 1.7x as fast here.
    // Records of a reused file carry its log number, so recovery (and a read-only open) stops
    // at the old records beyond the new end. Readers on a running node are RocksDB read-only
    // instances, opened again at each refresh: a secondary instance following a reused live WAL
    // fails ("missing start of fragmented record", RocksDB 10.4.2).
    o.set_recycle_log_file_num(opts.wal_files_reused);
    o.set_max_background_jobs(2);
    o.set_keep_log_file_num(opts.info_log_files_max);
    o.set_max_log_file_size(opts.info_log_file_bytes_max);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&Cache::new_lru_cache(opts.block_cache_bytes));
    o.set_block_based_table_factory(&table);
    o
}

fn descriptors(o: &Options) -> Vec<ColumnFamilyDescriptor> {
    Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), o.clone())).collect()
}

/// Classifies a RocksDB error while reading records: data RocksDB finds damaged (a table
/// block failing its checksum) is `Corrupt`, and stays so at every read; anything else is `Io`.
fn read_error(path: &Path, e: rocksdb::Error) -> LogError {
    match e.kind() {
        ErrorKind::Corruption => LogError::Corrupt { path: path.to_owned(), detail: e.into_string() },
        _ => LogError::Io { path: path.to_owned(), detail: e.into_string() },
    }
}

/// Classifies a RocksDB error at open.
fn open_error(path: &Path, e: rocksdb::Error) -> LogError {
    let detail = e.clone().into_string();
    match e.kind() {
        ErrorKind::Corruption => LogError::Corrupt { path: path.to_owned(), detail },
        // RocksDB's own message for its LOCK file held elsewhere ("While lock file: <path>/LOCK:
        // ..."); matching a bare "lock" would take any error under a path like /srv/blocks.
        _ if detail.contains("While lock file") => LogError::Locked { path: path.to_owned(), holder: detail },
        _ => LogError::Io { path: path.to_owned(), detail },
    }
}

fn take_lock(path: &Path) -> Result<File, LogError> {
    let io = |e: std::io::Error| LogError::Io { path: path.to_owned(), detail: format!("lock file: {e}") };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path.join(LOCK_FILE)).map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "unknown process".to_owned(),
            pid => format!("pid {pid}"),
        };
        return Err(LogError::Locked { path: path.to_owned(), holder });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

impl RocksStore {
    /// Opens (creating if needed) the store of node `node` at `path`, for writing.
    pub fn open(path: &Path, node: &NodeId, opts: StoreOptions) -> Result<RocksStore, LogError> {
        if path.is_file() {
            return Err(LogError::PathIsFile { path: path.to_owned() });
        }
        std::fs::create_dir_all(path).map_err(|e| LogError::Io { path: path.to_owned(), detail: format!("cannot create the directory: {e}") })?;
        let lock = take_lock(path)?;
        let o = db_options(&opts);
        let db = DB::open_cf_descriptors(&o, path, descriptors(&o)).map_err(|e| open_error(path, e))?;
        let io = |e: rocksdb::Error| LogError::Io { path: path.to_owned(), detail: e.into_string() };

        let meta = cf(&db, Cf::Meta);
        // The incarnation, the earlier ones and the open marker as found.
        let (incarnation, earlier, open) = match read_meta(&db, path)? {
            Some(Meta { node: found_node, incarnation, format, earlier, open }) => {
                if found_node != node.as_str() {
                    return Err(LogError::WrongNode { path: path.to_owned(), found: found_node, expected: node.to_string() });
                }
                if format < STORE_FORMAT_VERSION {
                    // Older records stay readable; new ones are written in this build's form.
                    let mut wo = WriteOptions::default();
                    wo.set_sync(true);
                    db.put_cf_opt(meta, META_FORMAT, STORE_FORMAT_VERSION.to_be_bytes(), &wo).map_err(io)?;
                    tracing::info!(path = %path.display(), from = format, to = STORE_FORMAT_VERSION, "store format upgraded");
                }
                (incarnation, earlier, open)
            }
            None => {
                if db.iterator_cf(cf(&db, Cf::Log), IteratorMode::Start).next().is_some() {
                    return Err(LogError::Corrupt { path: path.to_owned(), detail: "records present but no meta".into() });
                }
                let incarnation = Incarnation::random();
                let mut batch = WriteBatch::default();
                batch.put_cf(meta, META_FORMAT, STORE_FORMAT_VERSION.to_be_bytes());
                batch.put_cf(meta, META_INCARNATION, incarnation.get().to_be_bytes());
                batch.put_cf(meta, META_NODE, node.as_str().as_bytes());
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.write_opt(batch, &wo).map_err(io)?;
                (incarnation, Vec::new(), None)
            }
        };

        let (incarnation, earlier) = mark_open(&db, path, incarnation, earlier, open.as_deref(), &opts)?;

        let mut core = Core::new(node.clone(), incarnation, opts.limits, opts.retention.clone());
        core.sweep_records_max = opts.sweep_records_max;
        core.present_ranges_max = opts.present_ranges_max;
        load_state(&db, path, &mut core)?;
        let store = RocksStore {
            path: path.to_owned(),
            node: node.clone(),
            incarnation,
            earlier,
            db: RwLock::new(Arc::new(db)),
            payload_bytes_max: core.limits.max_payload_bytes.min(crate::codec::PAYLOAD_BYTES_CEILING),
            core: Arc::new(Mutex::new(core)),
            handoff: Handoff::new(opts.commit_queue_len_max),
            commits: tokio::sync::watch::channel(0).0,
            threads: Mutex::new(Threads::default()),
            _lock: Some(lock),
            read_only: false,
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            listed: Mutex::new(None),
        };
        store.start_threads(&opts);
        Ok(store)
    }

    /// Opens an existing store for reading only, while its node may be running (a RocksDB
    /// read-only instance: no lock taken, nothing written in the store's directory). It sees
    /// the store as it was when opened; [`RocksStore::refresh`] opens it again to see more.
    /// Operations that write fail with `Closed`.
    pub fn open_read_only(path: &Path) -> Result<RocksStore, LogError> {
        if path.is_file() {
            return Err(LogError::PathIsFile { path: path.to_owned() });
        }
        if !path.join("CURRENT").is_file() {
            return Err(LogError::NotAStore { path: path.to_owned() });
        }
        let listed = Listing::take(path, SystemTime::now());
        let db = open_reader(path)?;
        let Meta { node, incarnation, earlier, .. } = read_meta(&db, path)?.ok_or_else(|| LogError::NotAStore { path: path.to_owned() })?;
        let node = NodeId::new(node).map_err(|e| LogError::Corrupt { path: path.to_owned(), detail: format!("meta node_id: {e}") })?;
        let mut core = Core::new(node.clone(), incarnation, Limits::default(), Vec::new());
        load_state(&db, path, &mut core)?;
        let handoff = Handoff::new(1);
        handoff.close();
        Ok(RocksStore {
            path: path.to_owned(),
            node,
            incarnation,
            earlier,
            db: RwLock::new(Arc::new(db)),
            payload_bytes_max: core.limits.max_payload_bytes.min(crate::codec::PAYLOAD_BYTES_CEILING),
            core: Arc::new(Mutex::new(core)),
            handoff,
            commits: tokio::sync::watch::channel(0).0,
            threads: Mutex::new(Threads::default()),
            _lock: None,
            read_only: true,
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            listed: Mutex::new(listed),
        })
    }

    /// For a read-only store: opens it again, to see what the writer has written since, unless
    /// nothing was written since the last open (listing the store's files costs far less than
    /// opening it: an open opens every table file). Returns whether it opened the store again.
    pub fn refresh(&self) -> Result<bool, LogError> {
        self.refresh_at(SystemTime::now())
    }

    /// [`RocksStore::refresh`], the files listed at `now` (tests move the clock instead of
    /// waiting).
    pub(crate) fn refresh_at(&self, now: SystemTime) -> Result<bool, LogError> {
        if !self.read_only {
            return Ok(false);
        }
        let listing = Listing::take(&self.path, now);
        let mut listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(new), Some(old)) = (&listing, &*listed) {
            if new.unchanged_since(old) {
                return Ok(false);
            }
        }
        let db = open_reader(&self.path)?;
        let mut core = Core::new(self.node.clone(), self.incarnation, Limits::default(), Vec::new());
        load_state(&db, &self.path, &mut core)?;
        {
            let mut current = lock_core(&self.core);
            *self.db.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(db);
            *current = core;
        }
        *listed = listing;
        self.commits.send_modify(|n| *n += 1);
        Ok(true)
    }

    fn db(&self) -> Arc<DB> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and compactions RocksDB is running on this store, plus column families with
    /// a flush or a compaction waiting: 0 once its background work has caught up. A benchmark
    /// waits for 0 before timing another store on the same disk and CPUs.
    pub fn background_jobs(&self) -> u64 {
        let db = self.db();
        let int = |value: Result<Option<u64>, rocksdb::Error>| value.ok().flatten().unwrap_or(0);
        let running: u64 = BACKGROUND_RUNNING.iter().map(|&name| int(db.property_int_value(name))).sum();
        let waiting: u64 = Cf::ALL
            .iter()
            .flat_map(|&c| BACKGROUND_WAITING.iter().map(move |name| (c, name)))
            .map(|(c, name)| int(db.property_int_value_cf(cf(&db, c), *name)))
            .sum();
        running + waiting
    }

    /// What a failed periodic WAL sync does ([`on_periodic_sync_failure`]), for tests.
    #[cfg(test)]
    pub(crate) fn fail_a_periodic_sync(&self) {
        let flag = self.threads.lock().unwrap_or_else(|p| p.into_inner()).sync_failed.clone();
        on_periodic_sync_failure(&self.db(), &flag, "injected by a test");
    }

    fn start_threads(&self, opts: &StoreOptions) {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let periodic_sync_failed = threads.sync_failed.clone();
        let committer = Committer {
            periodic_sync_failed: periodic_sync_failed.clone(),
            db: self.db(),
            core: self.core.clone(),
            handoff: self.handoff.clone(),
            commits: self.commits.clone(),
            batch_max: opts.commit_batch_len_max,
            linger: Duration::from_micros(opts.commit_linger_us),
            adaptive: opts.commit_wait_adaptive,
            wait_max: Duration::from_micros(opts.commit_wait_us_max),
            spin: Duration::from_micros(opts.commit_spin_us),
            sync: opts.sync == SyncPolicy::Always,
            unsynced_max: opts.commit_unsynced_batches_max.max(1),
        };
        let (handoff, path, closed, commits) = (self.handoff.clone(), self.path.clone(), self.closed.clone(), self.commits.clone());
        let run = move || {
            let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.run())) else { return };
            // A bug, not an IO error: still, nobody may wait for an answer that cannot come.
            // The operations it held resolve as abandoned; the queued ones, and any submitted
            // from now on, are refused.
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            let error = LogError::Io { path, detail: format!("the committer thread panicked ({what}); the store refuses writes until it is reopened") };
            tracing::error!(%error, "the committer stopped");
            handoff.close();
            while let Some(queued) = handoff.take_batch(1024) {
                for (_, done) in queued {
                    done.complete(Err(error.clone()));
                }
            }
            // Tailing readers are told: nothing more will come.
            closed.store(true, std::sync::atomic::Ordering::SeqCst);
            commits.send_modify(|n| *n += 1);
        };
        threads.committer = Some(std::thread::Builder::new().name("strata-commit".into()).spawn(run).expect("spawn the committer thread"));
        if opts.sync == SyncPolicy::Interval {
            let (stop, stopped) = mpsc::channel::<()>();
            let db = self.db();
            let every = Duration::from_millis(opts.sync_interval_ms);
            let handle = std::thread::Builder::new()
                .name("strata-sync".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        if let Err(e) = db.flush_wal(true) {
                            on_periodic_sync_failure(&db, &periodic_sync_failed, &e.into_string());
                        }
                    }
                })
                .expect("spawn the WAL sync thread");
            threads.syncer = Some((stop, handle));
        }
    }
}

/// A periodic WAL sync failed: what it held may never reach the disk, though a later sync
/// succeeds (the kernel may drop pages it failed to write). The store is not marked closed
/// cleanly at its end, and is marked as having failed a sync ([`SYNC_FAILED`]), so that the
/// next open moves to a new incarnation even in the same boot. The mark is synced with its
/// write if RocksDB still takes one; if it does not, nothing more is acknowledged either.
fn on_periodic_sync_failure(db: &DB, flag: &std::sync::atomic::AtomicBool, error: &str) {
    tracing::error!(error, "periodic WAL sync failed");
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    // Flushed to a table file of its own as well: in the WAL it would come after the writes
    // that may be lost, and a recovery that stops at them would lose the mark too.
    let marked = db.put_cf_opt(cf(db, Cf::Meta), META_OPEN, [SYNC_FAILED], &wo).and_then(|()| db.flush_cf(cf(db, Cf::Meta)));
    if let Err(e) = marked {
        tracing::error!(error = %e, "could not mark the store as having failed a WAL sync");
    }
}

/// What `meta` holds.
struct Meta {
    node: String,
    incarnation: Incarnation,
    /// Oldest first.
    earlier: Vec<Incarnation>,
    format: u32,
    /// [`META_OPEN`] as stored (its first byte, then the boot id for [`OPEN_UNSYNCED`]); `None`
    /// in a store written before it was kept.
    open: Option<Vec<u8>>,
}

/// The id of the machine's current boot, if it can be known.
fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_FILE).ok().map(|id| id.trim().to_owned()).filter(|id| !id.is_empty())
}

/// Marks the store open for writing under `opts.sync` (`earlier` and `open` as `meta` holds
/// them), and returns its incarnation and the earlier ones. A store found still open from a run under `sync = interval` or `never`, in
/// an earlier boot of the machine (a power loss, a kernel crash), may have lost records it had
/// acknowledged, and perhaps already sent to other nodes: their seqs would be handed out
/// again to different records, which the other nodes would take as duplicates. It goes on
/// under a new incarnation instead; what survived stays readable under the old one. A process
/// that only crashed lost nothing (see [`OPEN_UNSYNCED`]): the incarnation stays.
fn mark_open(
    db: &DB,
    path: &Path,
    incarnation: Incarnation,
    mut earlier: Vec<Incarnation>,
    open: Option<&[u8]>,
    opts: &StoreOptions,
) -> Result<(Incarnation, Vec<Incarnation>), LogError> {
    let io = |e: rocksdb::Error| LogError::Io { path: path.to_owned(), detail: e.into_string() };
    let boot = opts.boot_id.clone().or_else(boot_id);
    let mut batch = WriteBatch::default();
    let mut current = incarnation;
    // Left open without every write synced, and the machine restarted since (or its boot
    // cannot be known): what was acknowledged last may be gone. A value this build does not
    // know (a later build's) is taken as the worst case. A store written before the marker
    // was kept has none: whatever happened before cannot be known, and it is not moved.
    let boot_bytes = boot.as_deref().unwrap_or("").as_bytes();
    let (lost, unsynced_before) = match open {
        None => (false, false),
        Some([CLOSED]) | Some([OPEN_SYNCED]) => (false, false),
        Some([OPEN_UNSYNCED, id @ ..]) => (boot.is_none() || id != boot_bytes, true),
        Some(_) => (true, true),
    };
    if lost {
        current = loop {
            let fresh = Incarnation::random();
            if fresh != incarnation && !earlier.contains(&fresh) {
                break fresh;
            }
        };
        earlier.push(incarnation);
        let history: Vec<u8> = earlier.iter().flat_map(|i| i.get().to_be_bytes()).collect();
        batch.put_cf(cf(db, Cf::Meta), META_EARLIER_INCARNATIONS, history);
        batch.put_cf(cf(db, Cf::Meta), META_INCARNATION, current.get().to_be_bytes());
        let why = match open {
            Some([SYNC_FAILED]) => "a WAL sync of the store's last run failed",
            _ => "the store was left open under sync = interval or never and the machine restarted since",
        };
        tracing::warn!(path = %path.display(), was = %incarnation, now = %current,
            "{why}: records acknowledged last may be lost, so its streams go on under a new incarnation");
    }
    // Under `always` after an unsynced run of this boot that crashed, its writes are not known
    // to be on disk until this run is closed cleanly (RocksDB's recovery flushes them to
    // synced table files at open, but that is its default, not a promise): the marker stays
    // "unsynced" until then.
    let open = match opts.sync {
        SyncPolicy::Always if lost || !unsynced_before => vec![OPEN_SYNCED],
        _ => [&[OPEN_UNSYNCED][..], boot_bytes].concat(),
    };
    batch.put_cf(cf(db, Cf::Meta), META_OPEN, open);
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).map_err(io)?;
    Ok((current, earlier))
}

/// Reads `meta`, checking that this build reads its format version.
fn read_meta(db: &DB, path: &Path) -> Result<Option<Meta>, LogError> {
    let meta = cf(db, Cf::Meta);
    let get = |k: &[u8]| db.get_cf(meta, k).map_err(|e| LogError::Io { path: path.to_owned(), detail: e.into_string() });
    let corrupt = |what: &str| LogError::Corrupt { path: path.to_owned(), detail: format!("meta {what} is unreadable") };
    let Some(format) = get(META_FORMAT)? else { return Ok(None) };
    let format = u32::from_be_bytes(format.as_slice().try_into().map_err(|_| corrupt("format_version"))?);
    if !(STORE_FORMAT_OLDEST..=STORE_FORMAT_VERSION).contains(&format) {
        return Err(LogError::IncompatibleFormat { path: path.to_owned(), found: format, oldest: STORE_FORMAT_OLDEST, newest: STORE_FORMAT_VERSION });
    }
    let inc = get(META_INCARNATION)?.ok_or_else(|| corrupt("incarnation"))?;
    let inc = Incarnation::from_raw(u64::from_be_bytes(inc.as_slice().try_into().map_err(|_| corrupt("incarnation"))?));
    let node = get(META_NODE)?.ok_or_else(|| corrupt("node_id"))?;
    let node = String::from_utf8(node).map_err(|_| corrupt("node_id"))?;
    let earlier = match get(META_EARLIER_INCARNATIONS)? {
        None => Vec::new(),
        Some(bytes) if bytes.len() % 8 == 0 => {
            bytes.chunks_exact(8).map(|b| Incarnation::from_raw(u64::from_be_bytes(b.try_into().expect("8 bytes")))).collect()
        }
        Some(_) => return Err(corrupt("earlier_incarnations")),
    };
    // Read as it is: a value this build does not know is judged by `mark_open`.
    let open = get(META_OPEN)?;
    Ok(Some(Meta { node, incarnation: inc, earlier, format, open }))
}

fn load_state(db: &DB, path: &Path, core: &mut Core) -> Result<(), LogError> {
    let corrupt = |detail: String| LogError::Corrupt { path: path.to_owned(), detail };
    let io = |e: rocksdb::Error| LogError::Io { path: path.to_owned(), detail: e.into_string() };
    for item in db.iterator_cf(cf(db, Cf::Watermarks), IteratorMode::Start) {
        let (k, v) = item.map_err(io)?;
        let (key, stats) = parse_stats_entry(&k, &v).map_err(|e| corrupt(format!("watermarks entry: {e}")))?;
        core.load_stream(key, stats, &DbBackend(db))?;
    }
    for item in db.iterator_cf(cf(db, Cf::Cursors), IteratorMode::Start) {
        let (k, v) = item.map_err(io)?;
        let (consumer, key) = parse_cursor_key(&k).ok_or_else(|| corrupt("unreadable cursor key".into()))?;
        let seq = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("unreadable cursor value".into()))?);
        core.load_cursor(consumer, key, seq);
    }
    Ok(())
}

struct Committer {
    /// Set by the `sync = interval` thread when a sync failed: the store is then never marked
    /// closed cleanly.
    periodic_sync_failed: Arc<std::sync::atomic::AtomicBool>,
    db: Arc<DB>,
    core: Arc<Mutex<Core>>,
    handoff: Handoff<Op, OpOutcome>,
    commits: tokio::sync::watch::Sender<u64>,
    batch_max: usize,
    linger: Duration,
    adaptive: bool,
    /// Longest adaptive wait for a batch to fill, whatever the write time (`commit_wait_us_max`).
    wait_max: Duration,
    spin: Duration,
    sync: bool,
    unsynced_max: usize,
}

/// A `WriteBatch` as the planner's sink.
struct BatchSink<'a> {
    /// The column families' handles, in [`Cf::ALL`] order (looked up once, not per record).
    cfs: [&'a rocksdb::ColumnFamily; 4],
    batch: WriteBatch,
}

impl<'a> BatchSink<'a> {
    /// A sink with room for about `ops` records (growing the batch's buffer as it fills
    /// copies it again at each doubling).
    fn new(db: &'a DB, ops: usize) -> BatchSink<'a> {
        BatchSink { cfs: Cf::ALL.map(|c| cf(db, c)), batch: WriteBatch::with_capacity_bytes(ops * RECORD_BYTES_GUESS) }
    }
}

/// Bytes a small record takes in a `WriteBatch`: its key, a 100-byte payload and the
/// envelope's header.
const RECORD_BYTES_GUESS: usize = 256;

impl Sink for BatchSink<'_> {
    fn put(&mut self, c: Cf, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.cfs[c as usize], key, value);
    }

    fn delete(&mut self, c: Cf, key: &[u8]) {
        self.batch.delete_cf(self.cfs[c as usize], key);
    }
}

/// A batch being gathered: its operations are planned as they are taken from the hand-off,
/// so planning overlaps the producers' return instead of following it.
struct Gathering<'a> {
    db: &'a DB,
    core: &'a Mutex<Core>,
    sink: BatchSink<'a>,
    plan: Plan,
    completers: Vec<Completer<OpOutcome>>,
}

impl<'a> Gathering<'a> {
    /// A batch expected to hold about `ops` operations.
    fn new(db: &'a DB, core: &'a Mutex<Core>, ops: usize) -> Gathering<'a> {
        Gathering { db, core, sink: BatchSink::new(db, ops), plan: Plan::default(), completers: Vec::with_capacity(ops) }
    }

    fn add(&mut self, items: Vec<(Op, Completer<OpOutcome>)>) {
        if items.is_empty() {
            return;
        }
        let (ops, completers): (Vec<Op>, Vec<Completer<OpOutcome>>) = items.into_iter().unzip();
        self.completers.extend(completers);
        lock_core(self.core).plan_more(&mut self.plan, ops, &DbBackend(self.db), &mut self.sink);
    }

    fn len(&self) -> usize {
        self.completers.len()
    }
}

/// A batch written to the WAL, waiting for its sync.
struct Written {
    number: u64,
    plan: Plan,
    completers: Vec<Completer<OpOutcome>>,
}

/// Why a store stopped accepting writes; shared by the committer and the syncer.
type Stopped = Arc<Mutex<Option<LogError>>>;

fn stopped(s: &Stopped) -> Option<LogError> {
    s.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn resolve(completers: Vec<Completer<OpOutcome>>, results: Vec<OpOutcome>) {
    for (done, result) in completers.into_iter().zip(results) {
        done.complete(result);
    }
}

fn refuse(completers: Vec<Completer<OpOutcome>>, error: &LogError) {
    for done in completers {
        done.complete(Err(error.clone()));
    }
}

/// Moving average of a duration (7/8 old, 1/8 new).
fn average(avg: Duration, sample: Duration) -> Duration {
    if avg.is_zero() {
        sample
    } else {
        (avg * 7 + sample) / 8
    }
}

impl Committer {
    fn run(self) {
        let stop: Stopped = Arc::new(Mutex::new(None));
        let gate = Arc::new(SyncGate::default());
        let syncer = self.sync.then(|| {
            let (tx, rx) = mpsc::sync_channel::<Written>(self.unsynced_max);
            let syncer = Syncer {
                db: self.db.clone(),
                core: self.core.clone(),
                commits: self.commits.clone(),
                adaptive: self.adaptive,
                wait_max: self.wait_max,
                stop: stop.clone(),
                gate: gate.clone(),
            };
            let handle = std::thread::Builder::new().name("strata-sync-wal".into()).spawn(move || syncer.run(rx)).expect("spawn the WAL syncer thread");
            SyncerThread { tx: Some(tx), handle: Some(handle) }
        });
        // Pipelined, the syncer makes batches durable (`wo`); a batch written while the syncer
        // is idle and nothing else waits is written with its sync (`wo_sync`).
        let wo = WriteOptions::default();
        let mut wo_sync = WriteOptions::default();
        wo_sync.set_sync(true);
        // Size of the last batch and a moving average of how long writing one takes.
        let mut last_len = 0usize;
        let mut write_time = Duration::ZERO;
        let mut number = 0u64;
        loop {
            // Adaptive group commit: the producers acknowledged by the last batch are about to
            // append again. Wait until as many are queued, so that they share one sync instead
            // of alternating half batches: first spin, planning each arrival at once (arrivals
            // that keep coming keep it taking: planning them is work, not idling), then sleep
            // for the rest, until at most half a batch commit after the start. Ending the
            // taking at that bound too was measured slower for one producer with 1,024 in flight.
            let expected = last_len.min(self.batch_max);
            let mut batch = Gathering::new(&self.db, &self.core, expected.max(1));
            if self.adaptive && expected > 1 {
                let now = Instant::now();
                let deadline = now + (write_time / 2).min(self.wait_max);
                let spin_until = (now + self.spin).min(deadline);
                let taken = self.handoff.take_spinning(self.batch_max, expected, spin_until, |lot| batch.add(lot));
                if taken < expected {
                    batch.add(self.handoff.take_batch_until(self.batch_max - taken, expected - taken, deadline));
                }
            }
            if batch.len() == 0 {
                match self.handoff.take_batch(self.batch_max) {
                    Some(b) => batch.add(b),
                    None => break,
                }
            }
            if !self.linger.is_zero() && batch.len() < self.batch_max {
                std::thread::sleep(self.linger);
                batch.add(self.handoff.try_take_batch(self.batch_max - batch.len()));
            }
            last_len = batch.len();
            let Gathering { mut sink, plan, completers, .. } = batch;
            if let Some(error) = stopped(&stop) {
                refuse(completers, &error);
                continue;
            }
            lock_core(&self.core).finish(&plan, &mut sink);
            // Nothing else to write and no sync running: write with the sync, saving the
            // hand-over to the syncer (a thread wake-up) when there is nothing to overlap.
            let inline = match &syncer {
                Some(_) if self.handoff.is_empty() => gate.try_inline(),
                _ => None,
            };
            // The syncer may have failed a sync since the check above; it stops the store
            // while holding the gate, so with the gate held this is the last word.
            if inline.is_some() {
                if let Some(error) = stopped(&stop) {
                    refuse(completers, &error);
                    continue;
                }
            }
            let started = Instant::now();
            let written = self.db.write_opt(sink.batch, if inline.is_some() { &wo_sync } else { &wo });
            if let Err(e) = written {
                // Written with its sync, the failure may be the sync's: the WAL's state is
                // unknown, so the store stops, as when the syncer's sync fails.
                let error = if inline.is_some() {
                    sync_failed(&self.db, e, &stop)
                } else {
                    let error = LogError::Io { path: self.db.path().to_owned(), detail: format!("batch write failed: {}", e.into_string()) };
                    tracing::error!(%error, "group commit failed; its operations are refused");
                    error
                };
                refuse(completers, &error);
                continue;
            }
            number += 1;
            write_time = average(write_time, started.elapsed());
            // The right to sync inline, if taken, is held until the batch is applied (end of match).
            match (&syncer, inline) {
                (Some(SyncerThread { tx: Some(tx), .. }), None) => {
                    lock_core(&self.core).stage(&plan, number);
                    gate.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Waits while `unsynced_max` batches are already waiting for their sync.
                    if let Err(mpsc::SendError(w)) = tx.send(Written { number, plan, completers }) {
                        // The syncer is gone (it panicked): this batch is written but will
                        // never be synced or applied, so the store stops, and the next batches
                        // are refused before they are written.
                        let error = stopped(&stop).unwrap_or_else(|| {
                            let error = LogError::Io {
                                path: self.db.path().to_owned(),
                                detail: "the WAL sync thread stopped; the store refuses writes until it is reopened".into(),
                            };
                            tracing::error!(%error, "the WAL sync thread stopped; the store stops accepting writes");
                            *stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
                            error
                        });
                        refuse(w.completers, &error);
                    }
                }
                // Durable already: written with its sync, or no sync is asked for.
                _ => {
                    let results = lock_core(&self.core).apply(plan);
                    self.commits.send_modify(|n| *n += 1);
                    resolve(completers, results);
                }
            }
        }
        // Dropping the syncer's thread waits for it to sync what it holds.
        drop(syncer);
        if let Some(error) = stopped(&stop) {
            tracing::warn!(%error, "the store stopped on an error: it is not marked closed cleanly");
            return;
        }
        if self.periodic_sync_failed.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("a periodic WAL sync failed: the store is not marked closed cleanly");
            return;
        }
        // Everything acknowledged is synced: the next open goes on under this incarnation.
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let closed = self.db.flush_wal(true).and_then(|()| self.db.put_cf_opt(cf(&self.db, Cf::Meta), META_OPEN, [CLOSED], &wo));
        if let Err(e) = closed {
            tracing::error!(error = %e, "final WAL sync failed; the store is not marked closed cleanly");
        }
        // A periodic sync that failed meanwhile: its mark must not stay overwritten.
        if self.periodic_sync_failed.load(std::sync::atomic::Ordering::SeqCst) {
            on_periodic_sync_failure(&self.db, &self.periodic_sync_failed, "failed while the store closed");
        }
    }
}

/// The syncer's thread and the channel to it. Dropped, also while the committer unwinds from
/// a panic, it closes the channel and waits for the syncer to finish what it holds, so the
/// database is released when the committer's thread ends.
struct SyncerThread {
    tx: Option<mpsc::SyncSender<Written>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for SyncerThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("the WAL syncer thread panicked");
            }
        }
    }
}

/// Who syncs: the syncer, or the committer itself when no batch waits for the syncer.
#[derive(Default)]
struct SyncGate {
    /// Held while syncing and applying.
    syncing: Mutex<()>,
    /// Batches handed to the syncer and not yet applied.
    queued: std::sync::atomic::AtomicUsize,
}

impl SyncGate {
    /// The right to sync and apply on the committer's thread: only when the syncer is idle
    /// and holds no batch, so batches are still applied in the order they were written.
    fn try_inline(&self) -> Option<MutexGuard<'_, ()>> {
        let guard = match self.syncing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        (self.queued.load(std::sync::atomic::Ordering::SeqCst) == 0).then_some(guard)
    }
}

/// RocksDB properties (of the whole store) counting flushes and compactions running.
pub const BACKGROUND_RUNNING: [&str; 2] = ["rocksdb.num-running-flushes", "rocksdb.num-running-compactions"];
/// RocksDB properties (of each column family) that are 1 while a flush or a compaction waits.
pub const BACKGROUND_WAITING: [&str; 2] = ["rocksdb.mem-table-flush-pending", "rocksdb.compaction-pending"];

/// Times a read-only open is tried when a file vanished under it.
const READER_OPEN_ATTEMPTS: u32 = 50;

/// A RocksDB read-only instance of the store at `path`. Opening reads the MANIFEST, opens every
/// table file and replays the WAL files. A flush or compaction finishing meanwhile in a running
/// node deletes files that the MANIFEST just read still names: that open fails with "No such
/// file or directory" and is tried again.
fn open_reader(path: &Path) -> Result<DB, LogError> {
    let mut o = db_options(&StoreOptions::default());
    o.create_if_missing(false);
    o.create_missing_column_families(false);
    // Every table file opened at once: one the writer deletes later stays readable (its
    // descriptor is open).
    o.set_max_open_files(-1);
    let names: Vec<&str> = Cf::ALL.iter().map(|c| c.name()).collect();
    let mut attempt = 1;
    loop {
        match DB::open_cf_for_read_only(&o, path, &names, false) {
            Ok(db) => return Ok(db),
            Err(e) if attempt < READER_OPEN_ATTEMPTS && e.as_ref().contains("No such file or directory") => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(open_error(path, e)),
        }
    }
}

/// Stops the store after a failed WAL sync; returns the error to refuse operations with.
fn sync_failed(db: &DB, e: rocksdb::Error, stop: &Stopped) -> LogError {
    let error =
        LogError::Io { path: db.path().to_owned(), detail: format!("WAL sync failed: {}; the store refuses writes until it is reopened", e.into_string()) };
    tracing::error!(%error, "WAL sync failed; the store stops accepting writes");
    *stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
    error
}

/// The second stage of the commit pipeline under `sync = "always"`.
struct Syncer {
    db: Arc<DB>,
    core: Arc<Mutex<Core>>,
    commits: tokio::sync::watch::Sender<u64>,
    adaptive: bool,
    /// Longest adaptive wait for more written batches, whatever a sync takes.
    wait_max: Duration,
    stop: Stopped,
    gate: Arc<SyncGate>,
}

impl Syncer {
    fn run(self, rx: mpsc::Receiver<Written>) {
        // Operations in the last sync and a moving average of how long one sync takes.
        let mut last_ops = 0usize;
        let mut sync_time = Duration::ZERO;
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut ops = group[0].completers.len();
            // Adaptive group commit: the producers acknowledged by the last sync are about to
            // append again. Wait (at most half a sync) until as many are written, so that N
            // producers share one fsync instead of alternating half groups.
            let deadline = Instant::now() + (sync_time / 2).min(self.wait_max);
            loop {
                while let Ok(w) = rx.try_recv() {
                    ops += w.completers.len();
                    group.push(w);
                }
                if !self.adaptive || ops >= last_ops {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(w) => {
                        ops += w.completers.len();
                        group.push(w);
                    }
                    Err(_) => break,
                }
            }
            last_ops = ops;
            let batches = group.len();
            let _syncing = self.gate.syncing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(error) = stopped(&self.stop) {
                for w in group {
                    refuse(w.completers, &error);
                }
                self.gate.queued.fetch_sub(batches, std::sync::atomic::Ordering::SeqCst);
                continue;
            }
            let started = Instant::now();
            let synced = self.db.flush_wal(true);
            sync_time = average(sync_time, started.elapsed());
            match synced {
                Ok(()) => {
                    let mut outcomes = Vec::with_capacity(group.len());
                    {
                        let mut core = lock_core(&self.core);
                        for w in group {
                            outcomes.push((w.completers, core.apply_staged(w.plan, w.number)));
                        }
                    }
                    self.commits.send_modify(|n| *n += 1);
                    for (completers, results) in outcomes {
                        resolve(completers, results);
                    }
                }
                Err(e) => {
                    let error = sync_failed(&self.db, e, &self.stop);
                    for w in group {
                        refuse(w.completers, &error);
                    }
                }
            }
            self.gate.queued.fetch_sub(batches, std::sync::atomic::Ordering::SeqCst);
        }
        if stopped(&self.stop).is_none() {
            if let Err(e) = self.db.flush_wal(true) {
                tracing::error!(error = %e, "final WAL sync failed");
            }
        }
    }
}

impl Store for RocksStore {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    fn payload_bytes_max(&self) -> usize {
        self.payload_bytes_max
    }

    fn earlier_incarnations(&self) -> Vec<Incarnation> {
        self.earlier.clone()
    }

    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending, LogError>> + Send + '_>> {
        Box::pin(async move {
            match self.handoff.submit(op).await {
                Ok(ticket) => Ok(Pending(PendingInner::Waiting(ticket))),
                Err(_) => Err(LogError::Closed),
            }
        })
    }

    fn read(&self, key: &StreamKey, from: u64, limit: usize) -> Result<Vec<Envelope>, LogError> {
        // Read the durable state first: whatever the scan finds past its highest seq, or in one
        // of its gaps (a received record filling a gap), is written but not yet synced.
        // A read-only instance also needs where the stream starts.
        let (last, gaps, first) = {
            let core = lock_core(&self.core);
            let first = self.read_only.then(|| core.info(key).map_or(1, |i| i.first));
            (core.readable_last(key), core.gaps(key, usize::MAX), first)
        };
        if from > last {
            return Ok(Vec::new());
        }
        let limit = limit.min(usize::try_from((last - from).saturating_add(1)).unwrap_or(usize::MAX));
        let (db, prefix) = (self.db(), stream_prefix(key));
        // Scanned records that are not readable yet are left out; scanning goes on past them
        // until `limit` readable records are found or there are no more.
        let mut records = Vec::new();
        let mut next = from;
        while records.len() < limit && next <= last {
            let want = limit - records.len();
            let chunk = scan(&db, &prefix, next, last, want).map_err(|e| read_error(&self.path, e))?;
            let (scanned, highest) = (chunk.len(), chunk.last().map(|(seq, _)| *seq));
            records.extend(chunk.into_iter().filter(|(seq, _)| *seq <= last && !in_gaps(*seq, &gaps)));
            match highest.and_then(|h| h.checked_add(1)) {
                Some(after) if scanned == want => next = after,
                _ => break,
            }
        }
        if let Some(first) = first {
            // A read-only instance catches up with the writer's files in steps. Between two
            // steps a record can be missing below newer ones (its WAL file was deleted after a
            // flush this instance has not seen yet). Stop before the first record missing that
            // the writer does not report as a gap: a follower (`strata log tail --follow`) then
            // reads it after the next refresh instead of skipping it.
            let present = present_prefix(&records, from.max(first), &gaps);
            records.truncate(present);
        }
        decode_records(key, &records)
    }

    fn streams(&self) -> Vec<StreamInfo> {
        lock_core(&self.core).infos()
    }

    fn stream(&self, key: &StreamKey) -> Option<StreamInfo> {
        lock_core(&self.core).info(key)
    }

    fn gaps(&self, key: &StreamKey, max: usize) -> Vec<RangeInclusive<u64>> {
        lock_core(&self.core).gaps(key, max)
    }

    fn cursor(&self, consumer: &Name, key: &StreamKey) -> Option<u64> {
        lock_core(&self.core).cursor(consumer, key)
    }

    fn durable_by(&self, key: &StreamKey, seq: u64) -> Option<std::time::Instant> {
        lock_core(&self.core).durable_by(key, seq)
    }

    fn record_ack(&self, tier: Tier, key: &StreamKey, watermark: u64) {
        lock_core(&self.core).record_ack(tier, key, watermark)
    }

    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    fn close(&self) {
        self.handoff.close();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(committer) = threads.committer.take() {
            if committer.join().is_err() {
                tracing::error!(path = %self.path.display(), "the committer thread panicked");
            }
        }
        if let Some((stop, handle)) = threads.syncer.take() {
            drop(stop);
            let _ = handle.join();
        }
        if !self.read_only {
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // Wakes tailing readers, which then see it closed.
        self.commits.send_modify(|n| *n += 1);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_jobs_reads_properties_rocksdb_knows_and_reaches_zero_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { memtable_bytes: 64 * 1024, ..StoreOptions::default() };
        let store = RocksStore::open(dir.path(), &NodeId::new("n1").unwrap(), opts).unwrap();
        // An unknown property reads as `None`, which `background_jobs` would count as 0
        // forever: every name it reads must be one RocksDB answers.
        let db = store.db();
        for name in BACKGROUND_RUNNING {
            assert!(db.property_int_value(name).unwrap().is_some(), "{name} is not a RocksDB property");
        }
        for c in Cf::ALL {
            for name in BACKGROUND_WAITING {
                assert!(db.property_int_value_cf(cf(&db, c), name).unwrap().is_some(), "{name} is not a column family property");
            }
        }
        // Enough to fill several 64 KiB memtables (a memtable switches at the write after it
        // filled), then wait (bounded) for the flushes.
        for lot in 0u32..40 {
            let mut batch = WriteBatch::default();
            for i in 0u32..100 {
                batch.put_cf(cf(&db, Cf::Log), (lot * 100 + i).to_be_bytes(), [7u8; 100]);
            }
            db.write(batch).unwrap();
        }
        let tables = || std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sst")).count();
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.background_jobs() > 0 || tables() == 0 {
            assert!(Instant::now() < deadline, "background work did not finish: {} jobs, {} table files", store.background_jobs(), tables());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(store.background_jobs(), 0);
    }

    #[test]
    fn a_reader_stops_before_an_unreported_hole_and_steps_over_reported_gaps() {
        let records = |seqs: &[u64]| seqs.iter().map(|&s| (s, Vec::new())).collect::<Vec<_>>();
        assert_eq!(present_prefix(&records(&[1, 2, 3]), 1, &[]), 3);
        assert_eq!(present_prefix(&records(&[1, 2, 5, 6]), 1, &[]), 2, "3 and 4 are missing, not reported");
        assert_eq!(present_prefix(&records(&[1, 2, 5, 6]), 1, &[3..=4]), 4, "3..=4 is a reported gap");
        assert_eq!(present_prefix(&records(&[1, 2, 5, 8]), 1, &[3..=4]), 3);
        assert_eq!(present_prefix(&records(&[4, 5]), 2, &[]), 0, "the first record read is past a hole");
        assert_eq!(present_prefix(&records(&[4, 5]), 4, &[]), 2, "reading from 4 (records below it expired)");
        assert_eq!(present_prefix(&records(&[7]), 1, &[1..=3, 4..=6]), 1, "adjacent gaps");
        assert_eq!(present_prefix(&[], 1, &[]), 0);
    }

    #[test]
    fn in_gaps_finds_a_seq_in_any_of_the_ranges_and_nowhere_else() {
        let gaps = [3..=4, 7..=7, 10..=12];
        let inside: Vec<u64> = (0..15).filter(|&s| in_gaps(s, &gaps)).collect();
        assert_eq!(inside, [3, 4, 7, 10, 11, 12]);
        assert!(!in_gaps(5, &[]));
    }
}
