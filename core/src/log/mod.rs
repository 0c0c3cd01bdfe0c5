//! Durable streams: Strata's buffer and its memory.
//!
//! Every stream a node produces, and every stream it receives from another node, lives in
//! its store. [`Log`] is the handle the rest of the runtime uses; behind it a [`Store`] is
//! either [`RocksStore`] (RocksDB; the only code in Strata that knows RocksDB) or
//! [`MemStore`] (in memory, for pure and simulation tests). Both share the same planning
//! code ([`core`]), so they agree on seqs, watermarks, cursors and retention.
//!
//! Guarantees:
//! - [`Log::append`] assigns the next seq of a local stream with no holes, whatever the
//!   number of concurrent producers, and its ticket resolves only once the record is durable
//!   under the configured [`SyncPolicy`](crate::config::SyncPolicy). Seqs are assigned by the
//!   committer when it writes a batch, so a failed write consumes no seq.
//! - Group commit: appends, remote inserts and cursor commits queued while a write is in
//!   progress go into the next `WriteBatch`; under `sync = "always"` every batch written
//!   while a WAL sync runs shares the next sync (a two-stage pipeline, see [`RocksStore`]).
//! - Reads see durable records only: nothing a crash could take back is ever handed out.
//! - [`Log::insert_remote`] is idempotent and keeps the per-`(origin, incarnation, stream)`
//!   watermark; gaps are reported as ranges ([`Log::gaps`]).
//! - Retention ([`Log::sweep`]) counts records it removes before a registered consumer read
//!   them as `expired`.
//!
//! Backpressure: the queue to the committer holds `log.commit_queue_len_max` operations;
//! producers wait when it is full. Shutdown: [`Log::close`] refuses new operations, the
//! committer finishes what is queued, and the store is flushed.

pub(crate) mod core;
pub(crate) mod keys;
mod memory;
pub mod ranges;
mod rocks;
pub mod show;
#[cfg(test)]
pub(crate) mod tests;

/// Streams of actor snapshots: `snapshots/<actor>`. Retention always keeps the latest.
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";

use std::future::Future;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::codec::{DecodeError, EncodeError};
use crate::config::Name;
use crate::model::{Envelope, EnvelopeId, Incarnation, Kind, NodeId, PayloadType, Priority, Seq, StreamName, Tier, Trace};

pub use memory::MemStore;
pub use rocks::{RocksStore, StoreOptions, BACKGROUND_RUNNING, BACKGROUND_WAITING};

/// Identifies one stream's history: `(origin, incarnation, stream)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StreamKey {
    pub origin: NodeId,
    pub incarnation: Incarnation,
    pub stream: StreamName,
}

impl StreamKey {
    pub fn of(id: &EnvelopeId) -> StreamKey {
        StreamKey { origin: id.origin.clone(), incarnation: id.incarnation, stream: id.stream.clone() }
    }
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.origin, self.stream, self.incarnation)
    }
}

/// What a producer appends; the store fills in the id (origin, incarnation, stream, seq)
/// and the HLC timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub kind: Kind,
    pub payload_type: PayloadType,
    pub payload: Vec<u8>,
    pub priority: Priority,
    pub trace: Trace,
    pub budget_us: Option<u64>,
}

impl Draft {
    /// A draft with normal priority, no trace and no deadline.
    pub fn new(kind: Kind, payload_type: PayloadType, payload: Vec<u8>) -> Draft {
        Draft { kind, payload_type, payload, priority: Priority::NORMAL, trace: Trace::default(), budget_us: None }
    }
}

/// What [`Log::insert_remote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Inserted {
    /// Stored; the stream's watermark is now `watermark`.
    Stored { watermark: u64 },
    /// Already stored (or below the watermark): nothing changed.
    Duplicate { watermark: u64 },
    /// Not stored because too many disjoint ranges are pending above the watermark
    /// (`log.present_ranges_max`); replay will bring it again, in order.
    Deferred { watermark: u64 },
    /// The envelope is one of this store's own local records: ignored.
    Own,
}

/// Per-stream figures, as `strata log ls` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub origin: NodeId,
    pub incarnation: Incarnation,
    pub stream: StreamName,
    /// True for this store's own streams (origin and incarnation are the store's).
    pub local: bool,
    /// True for this node's streams of any incarnation: `local` ones, and those of an earlier
    /// incarnation ([`Log::own_keys`]), which no longer grow.
    pub own: bool,
    /// Lowest seq still stored (0 if none).
    pub first: u64,
    /// Highest seq stored (0 if none).
    pub last: u64,
    pub count: u64,
    pub bytes: u64,
    /// Every seq up to here was received (and stored, unless retention removed it).
    pub watermark: u64,
    /// Seqs missing between the watermark and `last` (in the gaps replay is to fill): a replica
    /// whose figure stays above 0 is waiting for records no holder has supplied yet.
    pub missing: u64,
    /// Records retention removed before every registered consumer had read them.
    pub expired: u64,
    /// Records retention removed in all.
    pub removed: u64,
}

impl StreamInfo {
    pub fn key(&self) -> StreamKey {
        StreamKey { origin: self.origin.clone(), incarnation: self.incarnation, stream: self.stream.clone() }
    }
}

/// What one retention sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub removed: u64,
    pub removed_bytes: u64,
    pub expired: u64,
    /// Streams where the sweep stopped at its per-sweep bound; the next sweep continues.
    pub unfinished: u64,
    /// Streams where removal by age stopped at a record that cannot be decoded (its age is
    /// unknown): that record and the ones after it stay until it is repaired or removed.
    pub unreadable: u64,
    /// The first such record and why it cannot be decoded.
    pub first_unreadable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LogError {
    #[error("{path}: is a file, not a store directory")]
    PathIsFile { path: PathBuf },
    #[error("{path}: no store here (no RocksDB files)")]
    NotAStore { path: PathBuf },
    #[error("{path}: store is locked by another running process ({holder})")]
    Locked { path: PathBuf, holder: String },
    #[error("{path}: store was written with format version {found}; this build reads versions {oldest} to {newest}")]
    IncompatibleFormat { path: PathBuf, found: u32, oldest: u32, newest: u32 },
    #[error("{path}: store belongs to node {found:?}, not {expected:?}")]
    WrongNode { path: PathBuf, found: String, expected: String },
    #[error("{path}: store is corrupted: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("record {key} is corrupted: {error}")]
    CorruptRecord { key: String, seq: u64, error: DecodeError },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream {stream} is full: seq would overflow")]
    SeqOverflow { stream: String },
    #[error("record {record} is refused: its seq is above the highest a stream may hold ({max})", max = SEQ_MAX)]
    SeqOutOfRange { record: String },
    #[error("the log is closed")]
    Closed,
}

/// One operation for the committer (used through [`Log`]).
#[doc(hidden)]
#[derive(Debug)]
pub enum Op {
    Append {
        stream: StreamName,
        draft: Draft,
    },
    Insert {
        envelope: Envelope,
    },
    InsertMany {
        records: Vec<Envelope>,
    },
    Cursor {
        consumer: Name,
        key: StreamKey,
        seq: u64,
    },
    Sweep {
        now_unix_ms: u64,
    },
    /// Appends and cursor commits written in one `WriteBatch`: all or nothing.
    Atomic {
        ops: Vec<Op>,
    },
}

#[doc(hidden)]
#[derive(Debug)]
pub enum OpResult {
    Appended(Envelope),
    Inserted(Inserted),
    InsertedMany(Vec<Result<Inserted, LogError>>),
    Cursor,
    Swept(SweepReport),
    Atomic(Vec<OpResult>),
}

#[doc(hidden)]
pub type OpOutcome = Result<OpResult, LogError>;

/// The backend interface behind [`Log`]. Implemented by [`RocksStore`] and [`MemStore`].
pub trait Store: Send + Sync + 'static {
    fn node(&self) -> &NodeId;
    fn incarnation(&self) -> Incarnation;
    /// The largest payload an append takes (`log.payload_bytes_max`, at most
    /// [`crate::codec::PAYLOAD_BYTES_CEILING`]).
    fn payload_bytes_max(&self) -> usize;
    /// The incarnations this store had before its current one, oldest first (see
    /// [`Log::own_keys`]).
    fn earlier_incarnations(&self) -> Vec<Incarnation> {
        Vec::new()
    }
    /// Queues `op`; resolves once it is queued (its order is then fixed) to the pending
    /// result, which resolves once the op is durable.
    #[doc(hidden)]
    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending, LogError>> + Send + '_>>;
    /// Up to `limit` records of `key` from seq `from` on, in seq order, stopping before a
    /// record that cannot be decoded; a read that starts at one returns its
    /// [`LogError::CorruptRecord`].
    fn read(&self, key: &StreamKey, from: u64, limit: usize) -> Result<Vec<Envelope>, LogError>;
    fn streams(&self) -> Vec<StreamInfo>;
    fn stream(&self, key: &StreamKey) -> Option<StreamInfo>;
    fn gaps(&self, key: &StreamKey, max: usize) -> Vec<RangeInclusive<u64>>;
    /// Last seq `consumer` committed for `key`; `None` if it never committed one.
    fn cursor(&self, consumer: &Name, key: &StreamKey) -> Option<u64>;
    /// See [`Log::durable_by`].
    fn durable_by(&self, key: &StreamKey, seq: u64) -> Option<std::time::Instant>;
    /// Records that nodes of `tier` hold `key` up to `watermark` (for `keep_until_acked`).
    fn record_ack(&self, tier: Tier, key: &StreamKey, watermark: u64);
    /// A counter bumped after every durable batch (for tailing readers).
    fn commits(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Refuses new operations and waits until queued ones are durable.
    fn close(&self);
    /// [`Store::close`] has returned: nothing more will be written. A read-only store is
    /// never closed.
    fn is_closed(&self) -> bool;
}

/// The result of a queued operation; resolves once it is durable.
pub struct Pending(PendingInner);

enum PendingInner {
    Ready(Option<OpOutcome>),
    Waiting(strata_sync::handoff::Ticket<OpOutcome>),
}

impl Future for Pending {
    type Output = OpOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OpOutcome> {
        match &mut self.0 {
            PendingInner::Ready(r) => Poll::Ready(r.take().expect("Pending polled after completion")),
            PendingInner::Waiting(t) => Pin::new(t).poll(cx).map(|r| r.unwrap_or(Err(LogError::Closed))),
        }
    }
}

/// An append whose seq is fixed; resolves once it is durable.
pub struct AppendTicket(Pending);

impl Future for AppendTicket {
    type Output = Result<Envelope, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r? {
            OpResult::Appended(envelope) => Ok(envelope),
            other => unreachable!("append answered with {other:?}"),
        })
    }
}

/// A queued atomic write; resolves with the appended envelopes once durable.
pub struct AtomicTicket(Pending);

impl Future for AtomicTicket {
    type Output = Result<Vec<Envelope>, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r? {
            OpResult::Atomic(results) => Ok(results
                .into_iter()
                .filter_map(|r| match r {
                    OpResult::Appended(e) => Some(e),
                    _ => None,
                })
                .collect()),
            other => unreachable!("atomic answered with {other:?}"),
        })
    }
}

/// Queued remote inserts; resolves once they are durable, with one result per record.
pub struct InsertManyTicket(Pending);

impl Future for InsertManyTicket {
    type Output = Result<Vec<Result<Inserted, LogError>>, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r? {
            OpResult::InsertedMany(i) => Ok(i),
            other => unreachable!("insert answered with {other:?}"),
        })
    }
}

/// A queued remote insert; resolves once it is durable.
pub struct InsertTicket(Pending);

impl Future for InsertTicket {
    type Output = Result<Inserted, LogError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r? {
            OpResult::Inserted(i) => Ok(i),
            other => unreachable!("insert answered with {other:?}"),
        })
    }
}

/// The handle to a node's durable log. Cheap to clone.
#[derive(Clone)]
pub struct Log {
    store: Arc<dyn Store>,
}

impl Log {
    pub fn new(store: Arc<dyn Store>) -> Log {
        Log { store }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn node(&self) -> &NodeId {
        self.store.node()
    }

    pub fn incarnation(&self) -> Incarnation {
        self.store.incarnation()
    }

    /// The largest payload an append takes (`log.payload_bytes_max`).
    pub fn payload_bytes_max(&self) -> usize {
        self.store.payload_bytes_max()
    }

    /// The key of this node's own stream `stream`, where it appends.
    pub fn local_key(&self, stream: &StreamName) -> StreamKey {
        StreamKey { origin: self.node().clone(), incarnation: self.incarnation(), stream: stream.clone() }
    }

    /// The keys of this node's own stream `stream` in every incarnation the store had, oldest
    /// first, the current one ([`Log::local_key`]) last. A store not closed cleanly under
    /// `sync = interval` or `never` opens under a new incarnation (acknowledged records may
    /// have been lost, and their seqs must not be reused); what it held stays under the old
    /// keys, and a reader of its own streams reads those too.
    pub fn own_keys(&self, stream: &StreamName) -> Vec<StreamKey> {
        let mut keys: Vec<StreamKey> = self
            .store
            .earlier_incarnations()
            .into_iter()
            .map(|incarnation| StreamKey { origin: self.node().clone(), incarnation, stream: stream.clone() })
            .collect();
        keys.push(self.local_key(stream));
        keys
    }

    /// The last record of this node's own stream `stream`, in the newest incarnation that
    /// holds one (an actor's latest snapshot).
    pub fn latest_own(&self, stream: &StreamName) -> Result<Option<Envelope>, LogError> {
        for key in self.own_keys(stream).iter().rev() {
            if let Some(info) = self.stream(key).filter(|i| i.last > 0) {
                return Ok(self.read(key, info.last, 1)?.pop());
            }
        }
        Ok(None)
    }

    /// Queues an append to this node's stream `stream`. Resolves once queued (waiting while
    /// the commit queue is full), to a ticket that resolves with the stored envelope (its seq
    /// assigned) once it is durable. Appends queued one after another get increasing seqs.
    pub async fn append(&self, stream: StreamName, draft: Draft) -> Result<AppendTicket, LogError> {
        Ok(AppendTicket(self.store.submit(Op::Append { stream, draft }).await?))
    }

    /// [`Log::append`] and wait until durable.
    pub async fn append_durable(&self, stream: StreamName, draft: Draft) -> Result<Envelope, LogError> {
        self.append(stream, draft).await?.await
    }

    /// Stores an envelope received from another node under its origin key; idempotent.
    /// Resolves once durable.
    pub async fn insert_remote(&self, envelope: Envelope) -> Result<Inserted, LogError> {
        self.insert_remote_queued(envelope).await?.await
    }

    /// Queues an insert (waiting while the commit queue is full) and returns a ticket that
    /// resolves once it is durable: a receiver can keep many inserts in flight.
    pub async fn insert_remote_queued(&self, envelope: Envelope) -> Result<InsertTicket, LogError> {
        Ok(InsertTicket(self.store.submit(Op::Insert { envelope }).await?))
    }

    /// Queues many received envelopes as one operation (they share one group-commit batch).
    pub async fn insert_remote_many(&self, records: Vec<Envelope>) -> Result<InsertManyTicket, LogError> {
        Ok(InsertManyTicket(self.store.submit(Op::InsertMany { records }).await?))
    }

    /// Records that `consumer` finished every record of `key` up to `seq`. Cursor commits
    /// share group-commit batches with appends. Resolves once durable.
    pub async fn commit_cursor(&self, consumer: &Name, key: &StreamKey, seq: u64) -> Result<(), LogError> {
        let op = Op::Cursor { consumer: consumer.clone(), key: key.clone(), seq };
        match self.store.submit(op).await?.await? {
            OpResult::Cursor => Ok(()),
            other => unreachable!("cursor answered with {other:?}"),
        }
    }

    /// Registers `consumer` on `key` (cursor 0) unless it already has a cursor, so that
    /// retention counts what it has not read as expired.
    pub async fn register_consumer(&self, consumer: &Name, key: &StreamKey) -> Result<u64, LogError> {
        match self.cursor(consumer, key) {
            Some(seq) => Ok(seq),
            None => self.commit_cursor(consumer, key, 0).await.map(|()| 0),
        }
    }

    /// Appends `outputs` to this node's streams and commits `consumer`'s cursors, all in one
    /// write: either everything is durable or nothing is. A handler's outputs and its input
    /// cursor move together, so a restarted actor neither loses nor repeats outputs.
    /// Resolves with the appended envelopes once durable.
    pub async fn commit_atomically(
        &self,
        outputs: Vec<(StreamName, Draft)>,
        consumer: &Name,
        cursors: Vec<(StreamKey, u64)>,
    ) -> Result<Vec<Envelope>, LogError> {
        self.commit_atomically_queued(outputs, consumer, cursors).await?.await
    }

    /// [`Log::commit_atomically`], resolving once the write is queued; the ticket resolves
    /// once it is durable. Writes are made durable in the order they were queued.
    pub async fn commit_atomically_queued(
        &self,
        outputs: Vec<(StreamName, Draft)>,
        consumer: &Name,
        cursors: Vec<(StreamKey, u64)>,
    ) -> Result<AtomicTicket, LogError> {
        let mut ops: Vec<Op> = outputs.into_iter().map(|(stream, draft)| Op::Append { stream, draft }).collect();
        ops.extend(cursors.into_iter().map(|(key, seq)| Op::Cursor { consumer: consumer.clone(), key, seq }));
        Ok(AtomicTicket(self.store.submit(Op::Atomic { ops }).await?))
    }

    /// Applies the configured retention rules at wall-clock time `now_unix_ms`.
    pub async fn sweep(&self, now_unix_ms: u64) -> Result<SweepReport, LogError> {
        match self.store.submit(Op::Sweep { now_unix_ms }).await?.await? {
            OpResult::Swept(r) => Ok(r),
            other => unreachable!("sweep answered with {other:?}"),
        }
    }

    pub fn read(&self, key: &StreamKey, from: u64, limit: usize) -> Result<Vec<Envelope>, LogError> {
        self.store.read(key, from, limit)
    }

    /// The lowest seq in `bad+1..=to` from which `key` reads again (a record, a damaged
    /// record, or nothing held at or above), when a read from `bad` finds data RocksDB reports
    /// damaged ([`LogError::Corrupt`], a table block failing its checksum); `None` if none
    /// does. One read per seq, so no readable record is passed over (a damaged block holds
    /// tens of records); the caller bounds the work with `to`. Any other error ends the search.
    pub fn readable_after(&self, key: &StreamKey, bad: u64, to: u64) -> Result<Option<u64>, LogError> {
        let mut seq = bad;
        while seq < to {
            seq += 1;
            match self.read(key, seq, 1) {
                Ok(_) | Err(LogError::CorruptRecord { .. }) => return Ok(Some(seq)),
                Err(LogError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// When reading `key` from `from` failed with `error` because the records there are
    /// damaged for good (bytes that do not decode, or a table block RocksDB finds damaged):
    /// the last seq of that damage, never past the next gap (records not received yet) nor the
    /// highest seq held, and at most `window` seqs from the first record held (one read each).
    /// `None` for any other error. What a consumer that cannot handle those records passes over.
    pub fn damaged_to(&self, key: &StreamKey, from: u64, error: &LogError, window: u64) -> Result<Option<u64>, LogError> {
        if !matches!(error, LogError::CorruptRecord { .. } | LogError::Corrupt { .. }) {
            return Ok(None);
        }
        let Some(last) = self.stream(key).map(|i| i.last) else { return Ok(None) };
        let end = self.next_gap(key, from).map_or(last, |gap| gap.start().saturating_sub(1).min(last));
        Ok(match error {
            LogError::CorruptRecord { seq, .. } if (from..=end).contains(seq) => Some(*seq),
            LogError::Corrupt { .. } if from <= end => {
                // The read landed on the first record held from `from` (past what retention
                // removed), in a damaged block; it and at most `window` seqs from it.
                let Some(start) = self.next_held(key, from).filter(|&s| s <= end) else { return Ok(None) };
                let window = end.min(start.saturating_add(window.max(1) - 1));
                Some(self.readable_after(key, start, window)?.map_or(window, |after| after - 1))
            }
            _ => None,
        })
    }

    /// Records of `key` from `from`, in seq order, stopping before the first gap: what a
    /// consumer that must handle every record once, in order, reads. A received record past a
    /// gap waits there until replay fills the gap ([`Log::next_gap`] says which); a plain
    /// [`Log::read`] would return it at once, and a cursor committed after it would pass over
    /// the gap for good. Records retention removed are not a gap: reading continues after them.
    pub fn read_in_order(&self, key: &StreamKey, from: u64, limit: usize) -> Result<Vec<Envelope>, LogError> {
        let Some(info) = self.store.stream(key) else { return Ok(Vec::new()) };
        // The highest seq first, then the gaps: a record arriving in between, past a new gap,
        // is above that bound.
        let end = info.last.saturating_add(1);
        let stop = self.next_gap(key, from).map_or(end, |gap| (*gap.start()).min(end));
        if stop <= from {
            return Ok(Vec::new());
        }
        let limit = limit.min(usize::try_from(stop - from).unwrap_or(usize::MAX));
        let mut records = match self.store.read(key, from, limit) {
            // Retention removed everything up to the gap, and the first record past it is
            // damaged: nothing to read in order here (the gap comes first).
            Err(LogError::CorruptRecord { seq, .. }) if seq >= stop => Vec::new(),
            Err(LogError::Corrupt { .. }) if self.next_held(key, from).is_none_or(|held| held >= stop) => Vec::new(),
            read => read?,
        };
        // Retention may have removed records from `from` on: the read then starts later and
        // can reach past the gap.
        records.retain(|e| e.id.seq.get() < stop);
        Ok(records)
    }

    /// The first seq at or after `from` that `key` holds: past what retention removed and past
    /// a gap `from` falls in (a read from `from` lands there). `None` when nothing is held from
    /// `from` on (a read from there runs past the stream, into whatever the store holds next).
    pub fn next_held(&self, key: &StreamKey, from: u64) -> Option<u64> {
        let info = self.store.stream(key).filter(|i| i.count > 0)?;
        let from = from.max(info.first);
        let held = match self.next_gap(key, from) {
            Some(gap) if *gap.start() <= from => gap.end().saturating_add(1),
            _ => from,
        };
        (held <= info.last).then_some(held)
    }

    /// The first gap of `key` (seqs missing below a received record) that ends at or after
    /// `from`.
    pub fn next_gap(&self, key: &StreamKey, from: u64) -> Option<RangeInclusive<u64>> {
        self.store.gaps(key, usize::MAX).into_iter().find(|g| *g.end() >= from)
    }

    /// Like [`Log::read`], but waits up to `wait` for records if there are none yet.
    /// Returns an empty batch if none arrived in time, and `Closed` once the store is closed
    /// with nothing more to read (nothing more can come).
    pub async fn tail(&self, key: &StreamKey, from: u64, limit: usize, wait: Duration) -> Result<Vec<Envelope>, LogError> {
        let mut commits = self.store.commits();
        let now = tokio::time::Instant::now();
        // A wait too long to add to the clock is as good as a year.
        let deadline = now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        loop {
            // Mark the current value seen before reading, so no commit slips between.
            commits.borrow_and_update();
            let batch = self.store.read(key, from, limit)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if self.store.is_closed() {
                return Err(LogError::Closed);
            }
            match tokio::time::timeout_at(deadline, commits.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(LogError::Closed),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    pub fn streams(&self) -> Vec<StreamInfo> {
        self.store.streams()
    }

    pub fn stream(&self, key: &StreamKey) -> Option<StreamInfo> {
        self.store.stream(key)
    }

    pub fn gaps(&self, key: &StreamKey, max: usize) -> Vec<RangeInclusive<u64>> {
        self.store.gaps(key, max)
    }

    pub fn cursor(&self, consumer: &Name, key: &StreamKey) -> Option<u64> {
        self.store.cursor(consumer, key)
    }

    /// An instant on the monotonic clock by which record `seq` of this node's own stream
    /// `key` was durable, so that its age is at least `elapsed()`: what a deadline counted
    /// from the record's append may trust. Its HLC timestamp is not: peers' clocks move the
    /// HLC ahead (up to its accepted drift), so `now - hlc` can read a stale record as
    /// fresh. A record durable before this store was opened gets the instant it was opened.
    /// Under `sync = "interval"` or `"never"`, durable means written (not yet synced): the
    /// instant is still no earlier than the record's append.
    /// `None` for another node's (or incarnation's) stream and for a record not durable yet.
    pub fn durable_by(&self, key: &StreamKey, seq: u64) -> Option<std::time::Instant> {
        self.store.durable_by(key, seq)
    }

    pub fn record_ack(&self, tier: Tier, key: &StreamKey, watermark: u64) {
        self.store.record_ack(tier, key, watermark)
    }

    pub fn close(&self) {
        self.store.close()
    }
}

/// Highest seq a stream may hold: one below `u64::MAX`, so that the seq after any stored one
/// exists (watermarks, scans and replay ranges count on it). A received envelope above it is
/// refused ([`LogError::SeqOutOfRange`]); it can only come from a broken or forged peer.
pub const SEQ_MAX: u64 = u64::MAX - 1;

/// The seq after `last` for a stream, or an overflow error.
pub(crate) fn next_seq(last: u64, stream: &StreamName) -> Result<Seq, LogError> {
    last.checked_add(1).filter(|&s| s <= SEQ_MAX).and_then(Seq::new).ok_or_else(|| LogError::SeqOverflow { stream: stream.to_string() })
}
