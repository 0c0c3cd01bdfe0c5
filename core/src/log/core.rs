//! The planning half of the log, shared by every backend: turns a batch of operations into
//! the writes to make and the results to hand back, against the in-memory state of the
//! streams (seqs, watermarks, figures, cursors, acknowledgements). No IO: the backend reads
//! records through [`Backend::scan`] and applies the writes itself, atomically, and only
//! then is the staged state made current ([`Core::apply`]). A failed write leaves the state
//! as it was, so it consumes no seq.
//!
//! With `sync = "always"` the RocksDB backend pipelines: a batch is written (not yet
//! fsync'd) and [`Core::stage`]d, so the next batch is planned on top of it while the WAL
//! sync of the previous one runs; [`Core::apply_staged`] makes it current once synced. The
//! current state (what readers see: figures, watermarks, the highest readable seq) is only
//! ever durable state.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The per-stream maps, with a faster hasher than std's (one lookup per operation at least).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use serde::{Deserialize, Serialize};

use crate::codec::{self, Limits};
use crate::config::{Name, RetentionRule};
use crate::model::{EnvelopeId, HlcTime, Incarnation, NodeId, Seq, Tier};

use super::keys::{self, cursor_key, record_key, record_key_into, stream_prefix};
use super::ranges::{Insert, Watermark};
use super::{next_seq, Inserted, LogError, Op, OpOutcome, OpResult, StreamInfo, StreamKey, SweepReport};
use crate::model::Envelope;

/// Version of the store layout (keys, column families, record and stats values), kept in
/// `meta`. Version 2 stores records without what their key says
/// ([`codec::encode_record_into`]); version 1 stored whole envelopes, which this build still
/// reads, so it opens a version 1 store and marks it version 2 (records of both forms then
/// live side by side). An older build refuses a version 2 store by name.
pub(crate) const STORE_FORMAT_VERSION: u32 = 2;
/// Oldest store layout this build reads.
pub(crate) const STORE_FORMAT_OLDEST: u32 = 1;

/// Most records one retention sweep removes unless the store is told otherwise
/// (`log.sweep_records_max`, [`Core::sweep_records_max`]); the next sweep continues.
pub(crate) const SWEEP_RECORDS_DEFAULT: u64 = 100_000;

/// Most disjoint ranges of received records kept above a stream's watermark unless the store
/// is told otherwise (`log.present_ranges_max`, [`Core::present_ranges_max`]).
pub(crate) const PRESENT_RANGES_DEFAULT: usize = 1024;

/// Records read per scan while sweeping or rebuilding state.
const SCAN_CHUNK: usize = 1024;

/// Column families; the discriminant is the index in [`Cf::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Cf {
    Log,
    Cursors,
    Watermarks,
    Meta,
}

impl Cf {
    pub(crate) const ALL: [Cf; 4] = [Cf::Log, Cf::Cursors, Cf::Watermarks, Cf::Meta];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Cursors => "cursors",
            Cf::Watermarks => "watermarks",
            Cf::Meta => "meta",
        }
    }
}

/// Where a plan's writes go: a RocksDB `WriteBatch`, or a list for the in-memory store.
pub(crate) trait Sink {
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]);
    fn delete(&mut self, cf: Cf, key: &[u8]);
}

#[derive(Debug)]
pub(crate) enum Write {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

impl Sink for Vec<Write> {
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.push(Write::Put(cf, key.to_vec(), value.to_vec()));
    }

    fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.push(Write::Delete(cf, key.to_vec()));
    }
}

/// Reads a backend needs to offer the planner.
pub(crate) trait Backend {
    /// `(seq, value)` of the records of the stream with `prefix`, `from` <= seq <= `to`, in
    /// seq order, at most `limit`. A scan that reaches `to` reads nothing past it: not the
    /// next stream's records, whose table block may be damaged.
    fn scan(&self, prefix: &[u8], from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, LogError>;
}

/// A stream's figures as persisted in the `watermarks` column family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredStats {
    pub watermark: u64,
    pub first: u64,
    pub count: u64,
    pub bytes: u64,
    pub expired: u64,
    pub removed: u64,
}

const STATS_VERSION: u8 = 1;

impl StoredStats {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATS_VERSION];
        bincode::serde::encode_into_std_write(self, &mut out, bincode::config::standard()).expect("encoding into a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<StoredStats, String> {
        match bytes.split_first() {
            Some((&STATS_VERSION, body)) => {
                let config = bincode::config::standard().with_limit::<256>();
                match bincode::serde::decode_from_slice::<StoredStats, _>(body, config) {
                    Ok((stats, used)) if used == body.len() => Ok(stats),
                    Ok(_) => Err("trailing bytes".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Some((v, _)) => Err(format!("unknown stats version {v}")),
            None => Err("empty stats value".into()),
        }
    }
}

/// One stream's live state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub wm: Watermark,
    pub first: u64,
    pub count: u64,
    pub bytes: u64,
    pub expired: u64,
    pub removed: u64,
}

impl Entry {
    fn stats(&self) -> StoredStats {
        StoredStats { watermark: self.wm.get(), first: self.first, count: self.count, bytes: self.bytes, expired: self.expired, removed: self.removed }
    }

    fn add(&mut self, seq: u64, len: usize) {
        if self.first == 0 || seq < self.first {
            self.first = seq;
        }
        // Saturating: figures read from a damaged store must not stop the committer.
        self.count = self.count.saturating_add(1);
        self.bytes = self.bytes.saturating_add(len as u64);
    }
}

/// Buffers reused across the ops of one batch.
#[derive(Default)]
struct Scratch {
    key: Vec<u8>,
    value: Vec<u8>,
    /// The last HLC timestamp given to an append of this lot, if the HLC has not seen it.
    stamp: Option<uhlc::Timestamp>,
    /// The stream whose record key `key` holds.
    key_of: Option<StreamKey>,
}

impl Scratch {
    /// Sets `key` to the record key of `seq` in `stream`, keeping the stream's prefix when
    /// the previous record was of the same stream (the usual case in a batch).
    fn set_key(&mut self, stream: &StreamKey, seq: u64) {
        match &self.key_of {
            Some(of) if of == stream => {
                self.key.truncate(self.key.len() - 8);
                self.key.extend_from_slice(&seq.to_be_bytes());
            }
            _ => {
                record_key_into(&mut self.key, stream, seq);
                self.key_of = Some(stream.clone());
            }
        }
    }
}

pub(crate) struct Core {
    pub node: NodeId,
    pub incarnation: Incarnation,
    pub limits: Limits,
    /// Most records one sweep removes.
    pub sweep_records_max: u64,
    /// Most disjoint ranges of received records kept above a stream's watermark.
    pub present_ranges_max: usize,
    hlc: uhlc::HLC,
    streams: Map<StreamKey, Entry>,
    cursors: Map<StreamKey, BTreeMap<Name, u64>>,
    /// Each consumer's last cursor written, durable or not yet: what retention compares with.
    /// A sweep written after a cursor commit is durable only if that commit is (the WAL keeps
    /// their order), so records the consumer has handled are not counted as expired while its
    /// commit waits for its sync.
    cursors_written: Map<StreamKey, BTreeMap<Name, u64>>,
    acks: Map<StreamKey, BTreeMap<Tier, u64>>,
    retention: Vec<RetentionRule>,
    /// Written but not yet durable: each stream's state after the last staged batch that
    /// touched it, tagged with that batch's number. Planning reads it before `streams`.
    pending: Map<StreamKey, (u64, Entry)>,
    /// When this process saw its own streams' records become durable (see
    /// [`Core::durable_by`]).
    durable_times: Map<StreamKey, DurableTimes>,
    /// When this core was made: what it loaded from disk was durable by then.
    created: Instant,
}

/// Most batches whose durable instant is kept per stream; older records get the instant of
/// the newest batch let go (a bound on their age, not their own).
const DURABLE_TIMES_MAX: usize = 256;

/// The instants at which one stream's batches became durable, on the monotonic clock.
struct DurableTimes {
    /// Every record up to this seq was durable by this instant.
    floor: (u64, Instant),
    /// (highest seq of a batch, when it became durable), in seq order.
    recent: std::collections::VecDeque<(u64, Instant)>,
}

/// Results of one batch (its writes went to a [`Sink`]), and the state to make current
/// once they are written.
#[derive(Default)]
pub(crate) struct Plan {
    pub results: Vec<OpOutcome>,
    staged: Map<StreamKey, Entry>,
    cursors: Vec<(Name, StreamKey, u64)>,
}

impl Core {
    pub(crate) fn new(node: NodeId, incarnation: Incarnation, limits: Limits, retention: Vec<RetentionRule>) -> Core {
        let id = uhlc::ID::try_from(codec::own_clock_id(incarnation.get())).expect("non-zero id");
        Core {
            node,
            incarnation,
            limits,
            sweep_records_max: SWEEP_RECORDS_DEFAULT,
            present_ranges_max: PRESENT_RANGES_DEFAULT,
            hlc: uhlc::HLCBuilder::new().with_id(id).build(),
            streams: Map::default(),
            cursors: Map::default(),
            cursors_written: Map::default(),
            acks: Map::default(),
            retention,
            pending: Map::default(),
            durable_times: Map::default(),
            created: Instant::now(),
        }
    }

    /// An instant (monotonic) by which record `seq` of this node's own stream `key` was
    /// durable: the age of a record read back is at least its `elapsed()`. Unlike its HLC
    /// timestamp, which peers' clocks move ahead (up to the HLC's accepted drift), so that
    /// `now - hlc` can read a stale record as fresh. `None` for other nodes' streams and for
    /// a record not durable yet. A record of an earlier incarnation of this store was durable
    /// before the store was opened.
    pub(crate) fn durable_by(&self, key: &StreamKey, seq: u64) -> Option<Instant> {
        if key.origin != self.node || seq > self.readable_last(key) {
            return None;
        }
        let Some(times) = self.durable_times.get(key) else { return Some(self.created) };
        if seq <= times.floor.0 {
            return Some(times.floor.1);
        }
        let at = times.recent.partition_point(|(last, _)| *last < seq);
        times.recent.get(at).map(|(_, t)| *t)
    }

    /// Restores a stream from its persisted stats, re-reading what lies above its
    /// watermark (received out of order before a restart). This node's streams of the current
    /// incarnation are appended without holes, so nothing lies above theirs: they are not
    /// scanned, and a damaged table block past them cannot fail the open. (Those of earlier
    /// incarnations are: a store from before own records were refused in every incarnation
    /// may hold some received above the watermark.)
    pub(crate) fn load_stream(&mut self, key: StreamKey, stats: StoredStats, backend: &dyn Backend) -> Result<(), LogError> {
        let mut wm = Watermark::new(stats.watermark);
        let prefix = stream_prefix(&key);
        // Saturating: a store written before seqs were bounded may hold `u64::MAX`.
        let mut from = stats.watermark.saturating_add(1);
        // (Not for this node's own streams of this incarnation: see above.)
        if key.origin != self.node || key.incarnation != self.incarnation {
            loop {
                let chunk = backend.scan(&prefix, from, u64::MAX, SCAN_CHUNK)?;
                let Some(&(last, _)) = chunk.last() else { break };
                for (seq, _) in &chunk {
                    wm.insert(*seq);
                }
                // A store written before seqs were bounded may end at `u64::MAX`.
                let Some(next) = last.checked_add(1) else { break };
                from = next;
            }
        }
        let entry = Entry { wm, first: stats.first, count: stats.count, bytes: stats.bytes, expired: stats.expired, removed: stats.removed };
        self.streams.insert(key, entry);
        Ok(())
    }

    pub(crate) fn load_cursor(&mut self, consumer: Name, key: StreamKey, seq: u64) {
        self.cursors_written.entry(key.clone()).or_default().insert(consumer.clone(), seq);
        self.cursors.entry(key).or_default().insert(consumer, seq);
    }

    /// The lowest cursor on `key`, counting cursors written and not yet durable and those
    /// planned so far in this batch.
    fn slowest_reader(&self, plan: &Plan, key: &StreamKey) -> Option<u64> {
        let mut cursors = self.cursors_written.get(key).cloned().unwrap_or_default();
        for (consumer, _, seq) in plan.cursors.iter().filter(|(_, k, _)| k == key) {
            cursors.insert(consumer.clone(), *seq);
        }
        cursors.values().min().copied()
    }

    fn note_cursors_written(&mut self, plan: &Plan) {
        for (consumer, key, seq) in &plan.cursors {
            self.cursors_written.entry(key.clone()).or_default().insert(consumer.clone(), *seq);
        }
    }

    fn entry<'a>(&'a self, staged: &'a mut Map<StreamKey, Entry>, key: &StreamKey) -> &'a mut Entry {
        if !staged.contains_key(key) {
            let base = self.pending.get(key).map(|(_, e)| e).or_else(|| self.streams.get(key));
            staged.insert(key.clone(), base.cloned().unwrap_or_default());
        }
        staged.get_mut(key).expect("inserted above")
    }

    /// Plans a batch, writing into `sink`. Never fails as a whole: each op gets its own
    /// result.
    pub(crate) fn plan(&self, ops: Vec<Op>, backend: &dyn Backend, sink: &mut dyn Sink) -> Plan {
        let mut plan = Plan::default();
        self.plan_more(&mut plan, ops, backend, sink);
        self.finish(&plan, sink);
        plan
    }

    /// Adds `ops` to a batch being planned (a batch may be planned in several parts as its
    /// operations arrive); [`Core::finish`] completes it.
    pub(crate) fn plan_more(&self, plan: &mut Plan, ops: Vec<Op>, backend: &dyn Backend, sink: &mut dyn Sink) {
        let mut scratch = Scratch::default();
        plan.results.reserve(ops.len());
        for op in ops {
            let result = self.plan_op(plan, sink, &mut scratch, backend, op);
            plan.results.push(result);
        }
        self.settle_stamps(&mut scratch);
    }

    /// The HLC timestamp of the next append of a lot. The clock is read for the first one
    /// only (a read costs about as much as encoding the record); the next ones take the
    /// following logical ticks, which is what the HLC gives when asked faster than its
    /// clock advances. [`Core::settle_stamps`] then moves the HLC past the last one given.
    fn next_stamp(&self, scratch: &mut Scratch) -> uhlc::Timestamp {
        let stamp = match scratch.stamp {
            None => self.hlc.new_timestamp(),
            Some(last) => uhlc::Timestamp::new(uhlc::NTP64(last.get_time().0.saturating_add(1)), *last.get_id()),
        };
        scratch.stamp = Some(stamp);
        stamp
    }

    /// Makes the HLC's next timestamps come after those [`Core::next_stamp`] gave.
    fn settle_stamps(&self, scratch: &mut Scratch) {
        if let Some(last) = scratch.stamp.take() {
            // At most one logical tick per record of the lot ahead of the clock: far inside
            // the HLC's accepted drift, so this cannot be refused.
            let _ = self.hlc.update_with_timestamp(&last);
        }
    }

    /// Writes the figures of every stream the batch touched, in the same batch.
    pub(crate) fn finish(&self, plan: &Plan, sink: &mut dyn Sink) {
        for (key, entry) in &plan.staged {
            sink.put(Cf::Watermarks, &stream_prefix(key), &entry.stats().encode());
        }
    }

    fn plan_op(&self, plan: &mut Plan, sink: &mut dyn Sink, scratch: &mut Scratch, backend: &dyn Backend, op: Op) -> OpOutcome {
        {
            let result = match op {
                Op::Append { stream, draft } => self.plan_append(plan, sink, scratch, stream, draft),
                Op::Insert { envelope } => self.plan_insert(plan, sink, scratch, envelope),
                Op::InsertMany { records } => {
                    // One failed record fails only itself: the others are still inserted.
                    let results = records.iter().map(|envelope| self.plan_insert_one(plan, sink, scratch, envelope)).collect();
                    Ok(OpResult::InsertedMany(results))
                }
                Op::Cursor { consumer, key, seq } => {
                    sink.put(Cf::Cursors, &cursor_key(&consumer, &key), &seq.to_be_bytes());
                    plan.cursors.push((consumer, key, seq));
                    Ok(OpResult::Cursor)
                }
                Op::Sweep { now_unix_ms } => self.plan_sweep(plan, sink, now_unix_ms, backend).map(OpResult::Swept),
                Op::Atomic { ops } => self.plan_atomic(plan, sink, scratch, backend, ops),
            };
            result
        }
    }

    /// Appends and cursor commits that must be written all together or not at all. Appends
    /// are checked first (the only way one can fail is a payload over the limit), so a refused
    /// group writes nothing.
    fn plan_atomic(&self, plan: &mut Plan, sink: &mut dyn Sink, scratch: &mut Scratch, backend: &dyn Backend, ops: Vec<Op>) -> OpOutcome {
        let max = self.limits.max_payload_bytes.min(codec::PAYLOAD_BYTES_CEILING);
        for op in &ops {
            match op {
                Op::Append { draft, .. } if draft.payload.len() > max => {
                    return Err(codec::EncodeError::PayloadTooLarge { len: draft.payload.len(), max }.into());
                }
                Op::Append { .. } | Op::Cursor { .. } => {}
                other => panic!("only appends and cursor commits may be atomic, not {other:?}"),
            }
        }
        let results = ops.into_iter().map(|op| self.plan_op(plan, sink, scratch, backend, op)).collect::<Result<Vec<_>, _>>()?;
        Ok(OpResult::Atomic(results))
    }

    fn plan_append(&self, plan: &mut Plan, sink: &mut dyn Sink, scratch: &mut Scratch, stream: crate::model::StreamName, draft: super::Draft) -> OpOutcome {
        let key = StreamKey { origin: self.node.clone(), incarnation: self.incarnation, stream };
        let entry = self.entry(&mut plan.staged, &key);
        let seq = next_seq(entry.wm.get(), &key.stream)?;
        scratch.set_key(&key, seq.get());
        // The key's parts move into the envelope, not clones: each clone or drop here is an
        // atomic on a count that the producer's thread also changes (it drops the envelope);
        // in a profile at 1,024 in flight, these atomics took most of the planning's samples.
        let StreamKey { origin, incarnation, stream } = key;
        let envelope = Envelope {
            id: EnvelopeId { origin, incarnation, stream, seq },
            kind: draft.kind,
            hlc: HlcTime::from_uhlc(self.next_stamp(scratch)),
            budget_us: draft.budget_us,
            priority: draft.priority,
            trace: draft.trace,
            payload_type: draft.payload_type,
            payload: draft.payload,
        };
        if let Err(e) = codec::encode_record_into(&envelope, &self.limits, &mut scratch.value) {
            // Refused (over the size limits): a stream it would have started is not created
            // empty either (checked on this path only: appends are the hot path).
            let key = StreamKey::of(&envelope.id);
            let new = !self.pending.contains_key(&key) && !self.streams.contains_key(&key);
            if new && plan.staged.get(&key).is_some_and(|e| e.count == 0 && e.wm.get() == 0) {
                plan.staged.remove(&key);
            }
            return Err(e.into());
        }
        let inserted = entry.wm.insert(seq.get());
        assert_eq!(inserted, Insert::New, "local seqs have no gaps");
        entry.add(seq.get(), scratch.value.len());
        sink.put(Cf::Log, &scratch.key, &scratch.value);
        Ok(OpResult::Appended(envelope))
    }

    fn plan_insert(&self, plan: &mut Plan, sink: &mut dyn Sink, scratch: &mut Scratch, envelope: Envelope) -> OpOutcome {
        self.plan_insert_one(plan, sink, scratch, &envelope).map(OpResult::Inserted)
    }

    fn plan_insert_one(&self, plan: &mut Plan, sink: &mut dyn Sink, scratch: &mut Scratch, envelope: &Envelope) -> Result<Inserted, LogError> {
        let key = StreamKey::of(&envelope.id);
        // This node's own records, of any incarnation: a copy from elsewhere adds nothing (and
        // seqs an earlier incarnation lost stay lost, not filled from a peer's copy).
        if key.origin == self.node {
            return Ok(Inserted::Own);
        }
        // Keep causality: our next timestamps come after what we received. A remote clock
        // far ahead is refused by uhlc; the envelope is still stored.
        self.settle_stamps(scratch);
        let _ = self.hlc.update_with_timestamp(envelope.hlc.as_uhlc());
        let seq = envelope.id.seq.get();
        if seq > super::SEQ_MAX {
            return Err(LogError::SeqOutOfRange { record: envelope.id.to_string() });
        }
        let known = plan.staged.contains_key(&key) || self.pending.contains_key(&key) || self.streams.contains_key(&key);
        let entry = self.entry(&mut plan.staged, &key);
        match entry.wm.check(seq, self.present_ranges_max) {
            Insert::Duplicate => return Ok(Inserted::Duplicate { watermark: entry.wm.get() }),
            Insert::TooFragmented => return Ok(Inserted::Deferred { watermark: entry.wm.get() }),
            Insert::New => {}
        }
        scratch.set_key(&key, seq);
        if let Err(e) = codec::encode_record_into(envelope, &self.limits, &mut scratch.value) {
            // Refused (over the size limits): a stream it would have started is not created
            // empty either.
            if !known {
                plan.staged.remove(&key);
            }
            return Err(e.into());
        }
        let entry = self.entry(&mut plan.staged, &key);
        entry.wm.insert(seq);
        entry.add(seq, scratch.value.len());
        let watermark = entry.wm.get();
        sink.put(Cf::Log, &scratch.key, &scratch.value);
        Ok(Inserted::Stored { watermark })
    }

    fn plan_sweep(&self, plan: &mut Plan, sink: &mut dyn Sink, now_unix_ms: u64, backend: &dyn Backend) -> Result<SweepReport, LogError> {
        let mut report = SweepReport::default();
        let mut keys: Vec<StreamKey> = self.streams.keys().chain(self.pending.keys()).chain(plan.staged.keys()).cloned().collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let Some(rule) = self.retention.iter().find(|r| r.streams.matches(&key.stream)) else { continue };
            let mut upper = self.entry(&mut plan.staged, &key).wm.get();
            if key.stream.as_str().starts_with(super::SNAPSHOTS_PREFIX) {
                // An actor's latest snapshot is its state: never removed.
                upper = upper.saturating_sub(1);
            }
            // Only this node's own streams (of every incarnation) wait for acknowledgements
            // (only they get any): the origin keeps its records until the named tiers hold
            // them, and a replica's copy goes by size and age alone, or it would never go.
            let own = key.origin == self.node;
            for tier in rule.keep_until_acked.iter().filter(|_| own) {
                let acked = self.acks.get(&key).and_then(|a| a.get(tier)).copied().unwrap_or(0);
                upper = upper.min(acked);
            }
            let slowest_reader = self.slowest_reader(plan, &key);
            let age_cutoff_ms = rule.age_s_max.map(|s| now_unix_ms.saturating_sub(s.saturating_mul(1000)));
            let prefix = stream_prefix(&key);
            let entry = self.entry(&mut plan.staged, &key);
            let mut from = entry.first.max(1);
            'stream: while from <= upper {
                let chunk = match backend.scan(&prefix, from, upper, SCAN_CHUNK) {
                    Ok(chunk) => chunk,
                    // A table block RocksDB finds damaged, or a read that failed: as with a
                    // record that does not decode, this stream keeps it and what follows; the
                    // others are swept. Not an error for the whole sweep: what was already
                    // removed in it is in the batch, and must be reported.
                    Err(e) => {
                        report.unreadable += 1;
                        report.first_unreadable.get_or_insert_with(|| format!("{key} from #{from}: {e}"));
                        break 'stream;
                    }
                };
                if chunk.is_empty() {
                    break;
                }
                for (seq, value) in chunk {
                    if seq > upper {
                        break 'stream;
                    }
                    if report.removed >= self.sweep_records_max {
                        report.unfinished += 1;
                        break 'stream;
                    }
                    let too_big = rule.bytes_max.is_some_and(|max| entry.bytes > max);
                    let too_old = match age_cutoff_ms {
                        Some(_) if too_big => true,
                        Some(cutoff) => match decode_record(&key, seq, &value) {
                            Ok(envelope) => envelope.hlc.unix_ms() < cutoff,
                            Err(e) => {
                                // Its age is unknown: it stays, and so does what follows it in
                                // this stream (the log is removed in seq order). The other
                                // streams are swept as usual.
                                report.unreadable += 1;
                                report.first_unreadable.get_or_insert_with(|| e.to_string());
                                break 'stream;
                            }
                        },
                        None => false,
                    };
                    if !too_big && !too_old {
                        break 'stream;
                    }
                    sink.delete(Cf::Log, &record_key(&key, seq));
                    // Saturating: figures read from a damaged store must not stop the committer.
                    entry.count = entry.count.saturating_sub(1);
                    entry.bytes = entry.bytes.saturating_sub(value.len() as u64);
                    entry.removed = entry.removed.saturating_add(1);
                    // Past a gap, the next record kept is further on. Saturating: a damaged
                    // store's figures may reach `u64::MAX`.
                    entry.first = entry.wm.next_present(seq.saturating_add(1));
                    report.removed += 1;
                    report.removed_bytes += value.len() as u64;
                    if slowest_reader.is_some_and(|c| c < seq) {
                        entry.expired = entry.expired.saturating_add(1);
                        report.expired += 1;
                    }
                    let Some(next) = seq.checked_add(1) else { break 'stream };
                    from = next;
                }
            }
            if entry.count == 0 {
                entry.first = 0;
            }
        }
        Ok(report)
    }

    /// Makes a written plan's state current; returns the results to hand back.
    pub(crate) fn apply(&mut self, plan: Plan) -> Vec<OpOutcome> {
        debug_assert!(self.pending.is_empty(), "apply is for unpipelined backends");
        self.note_cursors_written(&plan);
        self.apply_staged(plan, 0)
    }

    /// Batch `batch` is written but not yet durable: the next batches are planned on top of
    /// it. Batches are staged, and later applied, in the order they were written.
    pub(crate) fn stage(&mut self, plan: &Plan, batch: u64) {
        for (key, entry) in &plan.staged {
            self.pending.insert(key.clone(), (batch, entry.clone()));
        }
        self.note_cursors_written(plan);
    }

    /// Staged batch `batch` is durable: makes its state current (a later staged batch's state
    /// stays pending). Returns the results to hand back.
    pub(crate) fn apply_staged(&mut self, plan: Plan, batch: u64) -> Vec<OpOutcome> {
        let now = Instant::now();
        for (key, entry) in plan.staged {
            if self.pending.get(&key).is_some_and(|(b, _)| *b == batch) {
                self.pending.remove(&key);
            }
            if key.origin == self.node && key.incarnation == self.incarnation {
                if !self.durable_times.contains_key(&key) {
                    // Its first batch in this process: what it held before was durable when
                    // this core was made.
                    let before = self.streams.get(&key).map_or(0, |e| e.wm.last());
                    self.durable_times.insert(key.clone(), DurableTimes { floor: (before, self.created), recent: Default::default() });
                }
                let times = self.durable_times.get_mut(&key).expect("inserted above");
                let last = entry.wm.last();
                if last > times.recent.back().map_or(times.floor.0, |(s, _)| *s) {
                    if times.recent.len() == DURABLE_TIMES_MAX {
                        times.floor = times.recent.pop_front().expect("full");
                    }
                    times.recent.push_back((last, now));
                }
            }
            self.streams.insert(key, entry);
        }
        for (consumer, key, seq) in plan.cursors {
            self.cursors.entry(key).or_default().insert(consumer, seq);
        }
        plan.results
    }

    pub(crate) fn info(&self, key: &StreamKey) -> Option<StreamInfo> {
        let e = self.streams.get(key)?;
        Some(StreamInfo {
            origin: key.origin.clone(),
            incarnation: key.incarnation,
            stream: key.stream.clone(),
            local: key.origin == self.node && key.incarnation == self.incarnation,
            own: key.origin == self.node,
            first: e.first,
            last: e.wm.last(),
            count: e.count,
            bytes: e.bytes,
            watermark: e.wm.get(),
            missing: e.wm.missing(),
            expired: e.expired,
            removed: e.removed,
        })
    }

    pub(crate) fn infos(&self) -> Vec<StreamInfo> {
        let mut keys: Vec<&StreamKey> = self.streams.keys().collect();
        keys.sort();
        keys.into_iter().filter_map(|k| self.info(k)).collect()
    }

    /// Highest durable seq of a stream (0: none); reads never go past it, so nothing is seen
    /// that a crash could take back.
    pub(crate) fn readable_last(&self, key: &StreamKey) -> u64 {
        self.streams.get(key).map_or(0, |e| e.wm.last())
    }

    pub(crate) fn gaps(&self, key: &StreamKey, max: usize) -> Vec<std::ops::RangeInclusive<u64>> {
        self.streams.get(key).map(|e| e.wm.gaps(max)).unwrap_or_default()
    }

    pub(crate) fn cursor(&self, consumer: &Name, key: &StreamKey) -> Option<u64> {
        self.cursors.get(key)?.get(consumer).copied()
    }

    pub(crate) fn record_ack(&mut self, tier: Tier, key: &StreamKey, watermark: u64) {
        let acked = self.acks.entry(key.clone()).or_default().entry(tier).or_insert(0);
        *acked = (*acked).max(watermark);
    }
}

/// Decodes scanned records in seq order, up to the first one that cannot be decoded: a reader
/// gets every record before a damaged one, and a read that starts at it gets its error, which
/// names it (a tail, a replay or a consumer then stops there, not a whole batch earlier).
pub(crate) fn decode_records(key: &StreamKey, records: &[(u64, Vec<u8>)]) -> Result<Vec<Envelope>, LogError> {
    let mut out = Vec::with_capacity(records.len());
    for (seq, value) in records {
        match decode_record(key, *seq, value) {
            Ok(envelope) => out.push(envelope),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Decodes one stored record, naming it on failure. Read within [`Limits::STORED`], not the
/// configured limit: lowering `log.payload_bytes_max` must not make what is kept unreadable.
pub(crate) fn decode_record(key: &StreamKey, seq: u64, value: &[u8]) -> Result<Envelope, LogError> {
    let corrupt = |error| LogError::CorruptRecord { key: format!("{key}#{seq}"), seq, error };
    let id = EnvelopeId {
        origin: key.origin.clone(),
        incarnation: key.incarnation,
        stream: key.stream.clone(),
        seq: Seq::new(seq).ok_or_else(|| corrupt(codec::DecodeError::Malformed("record key holds seq 0".into())))?,
    };
    let envelope = codec::decode_record(&id, value, &Limits::STORED).map_err(corrupt)?;
    // A record in the older form holds its own id: it must be its key.
    if envelope.id != id {
        return Err(LogError::CorruptRecord {
            key: format!("{key}#{seq}"),
            seq,
            error: codec::DecodeError::Malformed(format!("record holds envelope {}", envelope.id)),
        });
    }
    Ok(envelope)
}

/// Parses a `watermarks` entry.
pub(crate) fn parse_stats_entry(k: &[u8], v: &[u8]) -> Result<(StreamKey, StoredStats), String> {
    let (key, rest) = keys::parse_stream_prefix(k).ok_or("unreadable stream key")?;
    if !rest.is_empty() {
        return Err("unreadable stream key".into());
    }
    Ok((key, StoredStats::decode(v)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamPattern;
    use crate::model::{Kind, PayloadType, StreamName};

    type Data = BTreeMap<(u8, Vec<u8>), Vec<u8>>;

    fn write(data: &mut Data, writes: Vec<Write>) {
        for w in writes {
            match w {
                Write::Put(cf, k, v) => data.insert((cf as u8, k), v),
                Write::Delete(cf, k) => data.remove(&(cf as u8, k)),
            };
        }
    }

    fn swept(outcome: &OpOutcome) -> &SweepReport {
        match outcome {
            Ok(OpResult::Swept(report)) => report,
            other => panic!("not a sweep report: {other:?}"),
        }
    }

    /// A reader that handled every record commits its cursor; a sweep planned while that
    /// commit is written but not yet synced (pipelined), or in the same batch, must not count
    /// what it handled as expired.
    /// Figures read from a damaged store (or an old one, whose seqs were not bounded) at the
    /// top of their range saturate: they never overflow and stop the committer.
    #[test]
    fn stored_figures_at_their_limit_saturate() {
        let mut entry = Entry { count: u64::MAX, bytes: u64::MAX, ..Entry::default() };
        entry.add(1, 10);
        assert_eq!((entry.count, entry.bytes), (u64::MAX, u64::MAX), "saturates, never panics");
    }

    #[test]
    fn a_cursor_written_but_not_yet_durable_counts_for_retention() {
        let bytes_max = RetentionRule { streams: StreamPattern::new("**").unwrap(), bytes_max: Some(1), age_s_max: None, keep_until_acked: vec![] };
        let mut core = Core::new(NodeId::new("edge-1").unwrap(), Incarnation::from_raw(7), Limits::default(), vec![bytes_max]);
        let stream = StreamName::new("r").unwrap();
        let key = StreamKey { origin: core.node.clone(), incarnation: core.incarnation, stream: stream.clone() };
        let reader = Name::new("reader").unwrap();
        let cursor = |seq| Op::Cursor { consumer: reader.clone(), key: key.clone(), seq };
        let append = || Op::Append { stream: stream.clone(), draft: super::super::Draft::new(Kind::Reading, PayloadType::new("t/1").unwrap(), vec![1; 10]) };
        let sweep = || Op::Sweep { now_unix_ms: 0 };
        let mut data = Data::new();

        let mut writes = Vec::new();
        let plan = core.plan(vec![cursor(0), append(), append(), append(), append()], &data, &mut writes);
        write(&mut data, writes);
        core.apply(plan);

        // The cursor commit is written and staged (its sync runs); the sweep comes next.
        let mut writes = Vec::new();
        let commit = core.plan(vec![cursor(3)], &data, &mut writes);
        write(&mut data, writes);
        core.stage(&commit, 1);
        let plan = core.plan(vec![sweep()], &data, &mut Vec::<Write>::new());
        assert_eq!((swept(&plan.results[0]).removed, swept(&plan.results[0]).expired), (4, 1), "only seq 4 was not handled");
        assert_eq!(core.cursor(&reader, &key), Some(0), "the durable cursor is still the old one");

        // In the same batch as the sweep, ahead of it.
        let plan = core.plan(vec![cursor(4), sweep()], &data, &mut Vec::<Write>::new());
        assert_eq!((swept(&plan.results[1]).removed, swept(&plan.results[1]).expired), (4, 0));
    }

    /// A read that fails during a sweep (here for the second stream) does not make the whole
    /// sweep an error: the first stream's removals are in the batch already, so they are
    /// reported (and counted as expired), and the failed stream is reported as unreadable.
    #[test]
    fn a_read_error_in_a_sweep_still_reports_what_it_removed() {
        struct FailsFor(Data, Vec<u8>);
        impl Backend for FailsFor {
            fn scan(&self, prefix: &[u8], from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
                if prefix == self.1 {
                    return Err(LogError::Io { path: "/store".into(), detail: "read failed".into() });
                }
                self.0.scan(prefix, from, to, limit)
            }
        }
        let bytes_max = RetentionRule { streams: StreamPattern::new("**").unwrap(), bytes_max: Some(1), age_s_max: None, keep_until_acked: vec![] };
        let mut core = Core::new(NodeId::new("edge-1").unwrap(), Incarnation::from_raw(7), Limits::default(), vec![bytes_max]);
        let (a, b) = (StreamName::new("a").unwrap(), StreamName::new("b").unwrap());
        let (node, incarnation) = (core.node.clone(), core.incarnation);
        let key = move |stream: &StreamName| StreamKey { origin: node.clone(), incarnation, stream: stream.clone() };
        let reader = Name::new("reader").unwrap();
        let append = |stream: &StreamName| Op::Append {
            stream: stream.clone(),
            draft: super::super::Draft::new(Kind::Reading, PayloadType::new("t/1").unwrap(), vec![1; 10]),
        };
        let mut ops = vec![Op::Cursor { consumer: reader.clone(), key: key(&a), seq: 0 }];
        ops.extend([&a, &a, &a, &b, &b].map(append));
        let mut data = Data::new();
        let mut writes = Vec::new();
        let plan = core.plan(ops, &data, &mut writes);
        write(&mut data, writes);
        core.apply(plan);

        let failing = FailsFor(data, keys::stream_prefix(&key(&b)));
        let mut writes = Vec::new();
        let plan = core.plan(vec![Op::Sweep { now_unix_ms: 0 }], &failing, &mut writes);
        let report = swept(&plan.results[0]);
        assert_eq!((report.removed, report.expired, report.unreadable), (3, 3, 1), "{report:?}");
        assert_eq!(report.first_unreadable, Some(format!("{} from #1: /store: read failed", key(&b))), "{report:?}");
        assert_eq!(writes.iter().filter(|w| matches!(w, Write::Delete(Cf::Log, _))).count(), 3);
    }
}
