//! The replication protocol: one instance per node, over any [`Transport`] and any
//! [`Store`](crate::log::Store) behind a [`Log`].
//!
//! - **Publish**: [`Replicator::append`] appends to the local log and, once durable,
//!   publishes the envelope live on `strata/s/<origin>/<stream>`.
//! - **Receive**: for each configured subscription, live samples are decoded, checked
//!   (the key's origin and stream must be the envelope's: otherwise `spoofed`), and inserted
//!   (idempotent). Inserts are pipelined: the receiver does not wait for each to be durable.
//! - **Heads**: every `ack_interval_ms` the node publishes what it holds (per stream, its
//!   durable watermark) on `strata/heads/<node>`. An origin takes the heads of others as
//!   acknowledgements (per tier, for `keep_until_acked`); a subscriber learns from them who
//!   holds more than it does.
//! - **Replay**: a periodic check (every `replay_check_interval_ms`), or a liveliness token
//!   coming back and that node's first heads after it, start replay: a request to
//!   `strata/replay/<origin>/<stream>` naming one holder (the origin if alive and ahead of us, else the
//!   holder with the most) and one missing range, answered from that holder's log in batches
//!   of at most `replay_batch_len_max`, up to 16 batches' worth of seqs from the first record
//!   it holds in the range (stepping over records it cannot decode or read), or an empty batch; the
//!   requester asks next from above the first unbroken run it holds from the range's start.
//!   A holder that answers with nothing, or not with the range's start, is passed over for
//!   that range; one that does not answer, until the pass ends or nobody else is left. When no
//!   holder is left to ask for a range and one of them answered it with nothing, the missing
//!   ranges above it are asked for; when none did (the rest did not answer), the check stops
//!   there. The next check goes on where this one stopped; a check that goes on and reaches
//!   its goal makes a second pass from the watermark with the requests it has left. A gap is
//!   replayed only once it outlived one check, so records still in flight are not fetched
//!   twice.
//! - **Liveliness**: the node holds `strata/alive/<tier>/<node>` and tracks every other
//!   node's token ([`Replicator::presence`]).
//!
//! Shutdown: [`Replicator::stop`] ends every task; what is in flight is either durable or
//! will be replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::ingest::{self, READING_TYPE};
use super::wire::{self, Head, Heads, ReplayBatch, ReplayParams, HEADS_PER_MESSAGE_MAX, MESSAGE_BYTES_MAX};
use super::{keys, AliveChange, AliveWatch, BusError, Overflow, Request, Transport};
use crate::codec::{self, Limits};
use crate::config::{NodeConfig, ReplicationSection, StreamPattern};
use crate::log::{Draft, InsertManyTicket, Inserted, Log, LogError, StreamKey};
use crate::model::{Envelope, Kind, NodeId, PayloadType, StreamName, Tier};

/// Most batches one replay request is answered with; the requester asks again for more.
/// Part of the protocol, not a node's setting: the server caps a request's range with it and
/// the requester expects at most this many replies.
const REPLAY_BATCHES_PER_REQUEST: u64 = 16;

/// The protocol's settings, from the node config: its `[replication]` section as it is, and
/// what it needs of the rest.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: NodeId,
    pub tier: Tier,
    pub replication: ReplicationSection,
    pub ingest_streams: Vec<StreamPattern>,
    pub ingest_payload_bytes_max: usize,
    pub limits: Limits,
}

impl Settings {
    pub fn from_config(c: &NodeConfig) -> Settings {
        Settings {
            node: c.node.id.clone(),
            tier: c.node.tier,
            replication: c.replication.clone(),
            ingest_streams: c.ingest.streams.clone(),
            ingest_payload_bytes_max: c.ingest.payload_bytes_max,
            limits: Limits { max_payload_bytes: c.log.payload_bytes_max },
        }
    }

    fn subscribed(&self, key: &StreamKey) -> bool {
        key.origin != self.node && self.replication.subscribe.iter().any(|s| s.matches(&key.origin, &key.stream))
    }
}

/// Counters of the protocol, for status and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub publish_dropped: AtomicU64,
    pub live_received: AtomicU64,
    pub live_frames: AtomicU64,
    pub live_stored: AtomicU64,
    pub live_duplicates: AtomicU64,
    /// Received records not stored because too many disjoint ranges were pending above their
    /// stream's watermark (`log.present_ranges_max`): replay brings them again, in order.
    pub live_deferred: AtomicU64,
    pub live_dropped: AtomicU64,
    /// Heads messages dropped because their receive queue was full (in messages or bytes).
    pub heads_dropped: AtomicU64,
    /// Liveliness changes dropped because their queue was full: the presence table is read
    /// again in full (see [`super::AliveWatch`]).
    pub presence_dropped: AtomicU64,
    pub malformed: AtomicU64,
    pub spoofed: AtomicU64,
    pub replay_requests: AtomicU64,
    /// Replay requests after which the holder was passed over: it answered with nothing of the
    /// range asked for (it does not hold it, or RocksDB failed to read its copy), or not with
    /// the range's start, or not at all (the answer was lost or timed out).
    pub replay_stalled: AtomicU64,
    pub replay_received: AtomicU64,
    pub replay_stored: AtomicU64,
    /// Replayed records not stored, as `live_deferred`: asked for again.
    pub replay_deferred: AtomicU64,
    pub replay_served_requests: AtomicU64,
    /// Replay requests naming this node that were dropped because `request_queue_len_max`
    /// others were waiting: each ended unanswered, and its sender asks another holder, or
    /// this one again at its next check.
    pub replay_requests_dropped: AtomicU64,
    pub replay_served_records: AtomicU64,
    /// Records this node could not decode, and regions RocksDB could not read (a table block
    /// failing its checksum, counted once), while serving a replay: stepped over, so that the
    /// requester gets what lies above them (another holder may have them).
    pub replay_served_damaged: AtomicU64,
    pub ingest_accepted: AtomicU64,
    pub insert_errors: AtomicU64,
    pub live_lag: LatencyHistogram,
}

/// Latencies in µs, in buckets four per power of two (about 19% wide): enough for p50/p99
/// of replication lag without storing samples.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const LATENCY_BUCKETS: usize = 4 * 40;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        if us < 2 {
            return 0;
        }
        let log2 = 63 - us.leading_zeros() as usize;
        let frac = ((us >> log2.saturating_sub(2)) & 3) as usize;
        (log2 * 4 + frac).min(LATENCY_BUCKETS - 1)
    }

    /// Upper bound of a bucket, in µs.
    fn upper(bucket: usize) -> u64 {
        let (log2, frac) = (bucket / 4, (bucket % 4) as u64);
        if log2 < 2 {
            return 1u64 << (log2 + 1);
        }
        (4 + frac + 1) << (log2 - 2)
    }

    pub fn record(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::upper(i);
                }
            }
            0
        };
        if count == 0 {
            return LatencySnapshot::default();
        }
        LatencySnapshot { count, p50_us: quantile(0.5), p99_us: quantile(0.99) }
    }
}

/// p50/p99 of a [`LatencyHistogram`] (bucket upper bounds, so within about 19% above).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencySnapshot {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// A snapshot of [`Counters`] and ingest rejections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub published: u64,
    /// Durable records not published live because the publish queue was full (subscribers
    /// repair them by replay).
    pub publish_dropped: u64,
    pub live_received: u64,
    /// Live frames among the samples received (each several records of one stream).
    pub live_frames: u64,
    pub live_stored: u64,
    pub live_duplicates: u64,
    pub live_deferred: u64,
    pub live_dropped: u64,
    pub heads_dropped: u64,
    pub presence_dropped: u64,
    pub malformed: u64,
    pub spoofed: u64,
    pub replay_requests: u64,
    pub replay_stalled: u64,
    pub replay_received: u64,
    pub replay_stored: u64,
    pub replay_deferred: u64,
    pub replay_served_requests: u64,
    pub replay_requests_dropped: u64,
    pub replay_served_records: u64,
    pub replay_served_damaged: u64,
    pub ingest_accepted: u64,
    pub ingest_rejected: BTreeMap<String, u64>,
    pub insert_errors: u64,
    /// Live records: from the origin's HLC time of the record to its being durable here.
    /// Compares two machines' wall clocks: meaningful only as far as they are synchronised.
    pub live_lag_us: LatencySnapshot,
}

/// What this node knows of another node's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Presence {
    pub tier: Tier,
    pub alive: bool,
    /// When the token last appeared or disappeared, in ms since this node started.
    pub since_ms: u64,
}

#[derive(Default)]
struct State {
    /// Other nodes' holdings of the streams we subscribe to: key -> holder -> watermark.
    holders: BTreeMap<StreamKey, BTreeMap<NodeId, u64>>,
    /// Highest seq seen live per stream (a target even before any heads arrive).
    seen_live: BTreeMap<StreamKey, u64>,
    /// The replay target each stream had at the last check: replayed at the next one if
    /// still missing, so that records in flight are not fetched twice.
    last_target: BTreeMap<StreamKey, u64>,
    /// Where the next check's replay of a stream goes on when the last one stopped before its
    /// goal (holes nobody fills must not keep ranges above them from ever being asked for);
    /// absent: at the watermark.
    replay_resume: BTreeMap<StreamKey, Resume>,
    presence: BTreeMap<NodeId, Presence>,
    /// Acknowledgements of our own streams: key -> tier -> best watermark.
    acks: BTreeMap<StreamKey, BTreeMap<Tier, u64>>,
    ingest_rejected: BTreeMap<String, u64>,
    /// Ingest messages the transport refused unread for being over the protocol's largest
    /// message (counted there, reported as `too_large` rejections).
    ingest_oversized: Option<Arc<AtomicU64>>,
    /// Replay now, without waiting for a gap to outlive a check.
    urgent: bool,
    /// Nodes that came back (liveliness) and whose heads have not arrived since: their first
    /// heads start an urgent check too (the token usually comes first, so the check it starts
    /// does not know yet what the node holds).
    returned: BTreeSet<NodeId>,
}

struct Shared {
    settings: Settings,
    log: Log,
    transport: Arc<dyn Transport>,
    state: Mutex<State>,
    counters: Counters,
    wake: Notify,
    /// Signalled when another tier acknowledges more of our own streams, or a node goes
    /// away (a handover stops waiting for a tier it can no longer reach).
    acked: Notify,
    started: Instant,
    /// Encoded local records waiting to be published live, with their key.
    outbox: mpsc::Sender<Outgoing>,
    /// Bytes of the records in `outbox`.
    outbox_bytes: std::sync::atomic::AtomicUsize,
}

/// What the publisher task is handed.
enum Outgoing {
    Record(String, Vec<u8>),
    /// Answered once everything queued before it is published (an orderly stop).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A running replication protocol. Dropping it (or [`Replicator::stop`]) ends its tasks.
pub struct Replicator {
    shared: Arc<Shared>,
    tasks: Mutex<JoinSet<()>>,
    _token: Box<dyn std::any::Any + Send + Sync>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    /// Declares everything on the transport and starts the protocol's tasks.
    pub async fn start(settings: Settings, log: Log, transport: Arc<dyn Transport>) -> Result<Replicator, BusError> {
        let (outbox, outgoing) = mpsc::channel(settings.replication.publish_queue_len_max.max(1));
        let shared = Arc::new(Shared {
            outbox,
            outbox_bytes: std::sync::atomic::AtomicUsize::new(0),
            settings,
            log,
            transport,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            wake: Notify::new(),
            acked: Notify::new(),
            started: Instant::now(),
        });
        let s = &shared.settings;
        let t = &shared.transport;
        let mut tasks = JoinSet::new();

        for sub in &s.replication.subscribe {
            let origin = sub.origin().map_or("*".to_owned(), |o| o.to_string());
            let keyexpr = format!("strata/s/{origin}/{}", sub.stream_pattern().as_str());
            let incoming = t.subscribe(&keyexpr, s.replication.live_queue_len_max, s.replication.live_queue_bytes_max, Overflow::Drop).await?;
            tasks.spawn(receive_live(shared.clone(), incoming));
        }
        let heads = t.subscribe(keys::HEADS_ALL, s.replication.peer_events_queue_len_max, s.replication.live_queue_bytes_max, Overflow::Drop).await?;
        tasks.spawn(receive_heads(shared.clone(), heads));
        let requests = t.serve(keys::REPLAY_ALL, s.replication.request_queue_len_max, replay_requests_for(s.node.clone())).await?;
        tasks.spawn(serve_replay(shared.clone(), requests));
        let check = Duration::from_millis(s.replication.ack_interval_ms);
        let query_timeout = Duration::from_millis(s.replication.replay_timeout_ms);
        let alive = AliveWatch::open(t.clone(), keys::ALIVE_ALL, s.replication.peer_events_queue_len_max, check, query_timeout).await?;
        tasks.spawn(watch_presence(shared.clone(), alive));
        if !s.ingest_streams.is_empty() {
            let ingest = t.subscribe(keys::INGEST_ALL, s.replication.live_queue_len_max, s.replication.live_queue_bytes_max, Overflow::Block).await?;
            tasks.spawn(receive_ingest(shared.clone(), ingest));
        }
        tasks.spawn(publish_heads(shared.clone()));
        tasks.spawn(publish_live(shared.clone(), outgoing));
        tasks.spawn(drive_replay(shared.clone()));
        let token = t.declare_alive(&keys::alive(s.tier, &s.node)).await?;
        Ok(Replicator { shared, tasks: Mutex::new(tasks), _token: token })
    }

    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// Appends to this node's stream `stream` and, once durable, publishes it live.
    pub async fn append(&self, stream: StreamName, draft: Draft) -> Result<Envelope, LogError> {
        let ticket = self.shared.log.append(stream, draft).await?;
        let envelope = ticket.await?;
        publish(&self.shared, &envelope);
        Ok(envelope)
    }

    /// Publishes an envelope already appended to the local log (for producers that keep
    /// several appends in flight with [`Log::append`]).
    pub fn publish(&self, envelope: &Envelope) {
        publish(&self.shared, envelope);
    }

    pub fn counters(&self) -> CounterSnapshot {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            published: get(&c.published),
            publish_dropped: get(&c.publish_dropped),
            live_received: get(&c.live_received),
            live_frames: get(&c.live_frames),
            live_stored: get(&c.live_stored),
            live_duplicates: get(&c.live_duplicates),
            live_deferred: get(&c.live_deferred),
            live_dropped: get(&c.live_dropped),
            heads_dropped: get(&c.heads_dropped),
            presence_dropped: get(&c.presence_dropped),
            malformed: get(&c.malformed),
            spoofed: get(&c.spoofed),
            replay_requests: get(&c.replay_requests),
            replay_stalled: get(&c.replay_stalled),
            replay_received: get(&c.replay_received),
            replay_stored: get(&c.replay_stored),
            replay_deferred: get(&c.replay_deferred),
            replay_served_requests: get(&c.replay_served_requests),
            replay_requests_dropped: get(&c.replay_requests_dropped),
            replay_served_records: get(&c.replay_served_records),
            replay_served_damaged: get(&c.replay_served_damaged),
            ingest_accepted: get(&c.ingest_accepted),
            ingest_rejected: {
                let st = lock(&self.shared.state);
                let mut rejected = st.ingest_rejected.clone();
                let oversized = st.ingest_oversized.as_ref().map_or(0, |n| n.load(Ordering::Relaxed));
                if oversized > 0 {
                    let reason = ingest::Rejection::TooLarge { len: 0, max: 0 }.reason().to_owned();
                    *rejected.entry(reason).or_insert(0) += oversized;
                }
                rejected
            },
            insert_errors: get(&c.insert_errors),
            live_lag_us: c.live_lag.snapshot(),
        }
    }

    /// Every other node seen through liveliness.
    pub fn presence(&self) -> BTreeMap<NodeId, Presence> {
        lock(&self.shared.state).presence.clone()
    }

    /// For each of our own streams, the best watermark acknowledged per tier.
    pub fn acks(&self) -> BTreeMap<StreamKey, BTreeMap<Tier, u64>> {
        lock(&self.shared.state).acks.clone()
    }

    /// What other nodes hold of the streams we subscribe to.
    pub fn holders(&self) -> BTreeMap<StreamKey, BTreeMap<NodeId, u64>> {
        lock(&self.shared.state).holders.clone()
    }

    /// Runs a replay check now.
    pub fn poke(&self) {
        lock(&self.shared.state).urgent = true;
        self.shared.wake.notify_one();
    }

    /// The watermark of each of this node's own streams, of every incarnation: what the others
    /// should hold.
    pub fn own_watermarks(&self) -> BTreeMap<StreamKey, u64> {
        self.shared.log.streams().into_iter().filter(|i| i.origin == self.shared.settings.node).map(|i| (i.key(), i.watermark)).collect()
    }

    /// Records up to `goal` (per own stream, a watermark) that a tier acknowledging the stream
    /// does not hold yet: per stream, the largest shortfall over those tiers, summed. Tiers
    /// that never acknowledged a stream (they do not replicate it) count for nothing; with
    /// `reachable_only`, neither do tiers with no live node.
    pub fn short_of(&self, goal: &BTreeMap<StreamKey, u64>, reachable_only: bool) -> u64 {
        let st = lock(&self.shared.state);
        let reachable: BTreeSet<Tier> = st.presence.values().filter(|p| p.alive).map(|p| p.tier).collect();
        let counts = |tier: &Tier| !reachable_only || reachable.contains(tier);
        goal.iter()
            .map(|(key, watermark)| {
                st.acks
                    .get(key)
                    .map_or(0, |by_tier| by_tier.iter().filter(|(tier, _)| counts(tier)).map(|(_, &acked)| watermark.saturating_sub(acked)).max().unwrap_or(0))
            })
            .sum()
    }

    /// Records of this node's own streams that a reachable tier acknowledging them does not
    /// hold yet (what an orderly stop waits for).
    pub fn unacknowledged(&self) -> u64 {
        self.short_of(&self.own_watermarks(), true)
    }

    /// Orderly stop: publishes what is queued, announces this node's final heads, waits (at
    /// most `shutdown_handover`) until every reachable tier that replicates our streams has
    /// acknowledged all of it, replaying to them meanwhile, then ends every task. Call it once
    /// this node's producers have stopped: what they write later is published directly, but
    /// nobody can replay it from a stopped node.
    pub async fn stop(&self) {
        // Publish what is queued first: a stopping node's last records go out live, not only
        // when it comes back and a subscriber asks for them. 0: not waited for at all.
        let flush_wait = Duration::from_millis(self.shared.settings.replication.shutdown_flush_ms);
        let (done, flushed) = tokio::sync::oneshot::channel();
        let flush = async {
            if self.shared.outbox.send(Outgoing::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        };
        let queued = || self.shared.outbox.max_capacity() - self.shared.outbox.capacity();
        let left = if flush_wait.is_zero() { queued() > 0 } else { tokio::time::timeout(flush_wait, flush).await.is_err() };
        if left {
            tracing::warn!(queued = queued(), "records queued for live publication were not all published before stopping; subscribers will replay them");
        }
        self.hand_over().await;
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.shutdown().await;
    }

    /// Waits until the reachable tiers hold everything of ours, or `shutdown_handover` passed.
    /// A record lost live (dropped, or still in flight when the link went quiet) is found by
    /// the subscribers from our heads, published now rather than at the next tick, and replayed
    /// from us while we wait (once it outlived one of their replay checks: one to two
    /// `replay_check_interval_ms`).
    async fn hand_over(&self) {
        let shared = &self.shared;
        let limit = Duration::from_millis(shared.settings.replication.shutdown_handover_ms);
        if limit.is_zero() {
            return;
        }
        publish_heads_now(shared);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let acked = shared.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let short = self.unacknowledged();
            if short == 0 {
                tracing::info!(waited_ms = started.elapsed().as_millis() as u64, "every reachable tier holds this node's records");
                return;
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                tracing::warn!(
                    records = short,
                    handover_ms = limit.as_millis() as u64,
                    "stopping with records that a reachable tier has not acknowledged; it will replay them when this node is back"
                );
                return;
            }
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Queues a durable local record for live publication; never waits. With the queue full it
/// is not published live (counted): subscribers find the gap and replay it.
fn publish(shared: &Shared, envelope: &Envelope) {
    match codec::encode(envelope, &shared.settings.limits) {
        Ok(bytes) => {
            let key = keys::stream(&envelope.id.origin, &envelope.id.stream);
            let len = bytes.len();
            let queued = shared.outbox_bytes.fetch_add(len, Ordering::Relaxed);
            if queued + len > shared.settings.replication.publish_queue_bytes_max && queued > 0 {
                shared.outbox_bytes.fetch_sub(len, Ordering::Relaxed);
                shared.counters.publish_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let sent = shared.outbox.try_send(Outgoing::Record(key, bytes));
            if sent.is_err() {
                shared.outbox_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            match sent {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    shared.counters.publish_dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The replicator stopped (the node is shutting down and its actors write their
                // last records): publish directly while the transport is still open.
                Err(mpsc::error::TrySendError::Closed(Outgoing::Record(key, bytes))) => {
                    shared.transport.publish(&key, bytes);
                    shared.counters.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(Outgoing::Flush(_))) => {}
            }
        }
        Err(e) => tracing::error!(id = %envelope.id, error = %e, "cannot encode an appended envelope"),
    }
}

/// Publishes queued records: what waits for the same stream goes out as live frames of at
/// most `live_frame_bytes_max` bytes, a record alone as itself. Nothing waits to fill a frame,
/// so a lone record goes out at once; under load, frames form while the last ones are sent.
async fn publish_live(shared: Arc<Shared>, mut outgoing: mpsc::Receiver<Outgoing>) {
    let (frame_max, round_max) = (shared.settings.replication.live_frame_bytes_max, shared.settings.replication.publish_round_len_max);
    let mut round = Vec::new();
    while outgoing.recv_many(&mut round, round_max).await > 0 {
        // Group by stream, keeping each stream's order.
        let mut streams: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        let mut flushes = Vec::new();
        for item in round.drain(..) {
            let (key, bytes) = match item {
                Outgoing::Record(key, bytes) => {
                    shared.outbox_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                    (key, bytes)
                }
                Outgoing::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
            };
            match streams.iter_mut().find(|(k, _)| *k == key) {
                Some((_, records)) => records.push(bytes),
                None => streams.push((key, vec![bytes])),
            }
        }
        for (key, records) in streams {
            let n = records.len() as u64;
            let mut frame: Vec<Vec<u8>> = Vec::new();
            let mut frame_bytes = wire::LIVE_FRAME_OVERHEAD;
            for record in records {
                let len = record.len() + wire::LIVE_FRAME_RECORD_OVERHEAD;
                if !frame.is_empty() && frame_bytes + len > frame_max {
                    send_frame(&shared, &key, std::mem::take(&mut frame));
                    frame_bytes = wire::LIVE_FRAME_OVERHEAD;
                }
                frame_bytes += len;
                frame.push(record);
            }
            send_frame(&shared, &key, frame);
            shared.counters.published.fetch_add(n, Ordering::Relaxed);
        }
        // Everything queued before a flush request was in this round or an earlier one.
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn send_frame(shared: &Shared, key: &str, mut records: Vec<Vec<u8>>) {
    let payload = match records.len() {
        0 => return,
        1 => records.pop().expect("one record"),
        _ => wire::encode_live_frame(&records),
    };
    shared.transport.publish(key, payload);
}

/// Awaits queued live insert batches in order, counting what they did.
async fn settle_inserts(shared: Arc<Shared>, mut tickets: mpsc::Receiver<(InsertManyTicket, Vec<u64>)>) {
    let c = &shared.counters;
    while let Some((ticket, origin_unix_us)) = tickets.recv().await {
        let results = match ticket.await {
            Ok(r) => r,
            Err(e) => {
                c.insert_errors.fetch_add(origin_unix_us.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, "storing received envelopes failed");
                continue;
            }
        };
        let now = unix_us();
        for (result, origin_us) in results.into_iter().zip(origin_unix_us) {
            match result {
                Ok(Inserted::Stored { .. }) => {
                    c.live_stored.fetch_add(1, Ordering::Relaxed);
                    c.live_lag.record(now.saturating_sub(origin_us));
                }
                Ok(Inserted::Duplicate { .. }) => {
                    c.live_duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Inserted::Deferred { .. }) => {
                    c.live_deferred.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Inserted::Own) => {}
                Err(e) => {
                    c.insert_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "storing a received envelope failed");
                }
            }
        }
    }
}

/// Decodes and checks an envelope received on `key` (live) or by replay (`None`).
fn accept(shared: &Shared, key: Option<&str>, bytes: &[u8]) -> Option<Envelope> {
    let c = &shared.counters;
    let envelope = match codec::decode(bytes, &shared.settings.limits) {
        Ok(e) => e,
        Err(e) => {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "malformed envelope received");
            return None;
        }
    };
    if envelope.id.seq.get() > crate::log::SEQ_MAX {
        // The store would refuse it; refused here, it also does not count as seen live (which
        // would have the node ask for replay up to it at every check).
        c.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = %envelope.id, "envelope with a seq above SEQ_MAX received");
        return None;
    }
    if let Some(key) = key {
        let named = keys::parse_stream(key);
        if named != Some((envelope.id.origin.as_str(), envelope.id.stream.as_str())) {
            c.spoofed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, id = %envelope.id, "envelope names another origin or stream than its key: rejected as spoofed");
            return None;
        }
    }
    Some(envelope)
}

async fn receive_live(shared: Arc<Shared>, mut incoming: super::Incoming<super::Sample>) {
    let s = &shared.settings;
    let (batch_len_max, batch_bytes_max) = (s.replication.live_batch_len_max, s.replication.live_batch_bytes_max);
    let (tx, rx) = mpsc::channel(s.replication.insert_batches_in_flight_max);
    let settle = tokio::spawn(settle_inserts(shared.clone(), rx));
    let mut reported_drops = 0;
    while let Some(first) = incoming.recv().await {
        // Take what is already waiting too: one insert operation for the lot.
        let mut bytes = first.payload.len();
        let mut samples = vec![first];
        while samples.len() < batch_len_max && bytes < batch_bytes_max {
            match incoming.try_recv() {
                Some(s) => {
                    bytes += s.payload.len();
                    samples.push(s);
                }
                None => break,
            }
        }
        let dropped = incoming.dropped();
        if dropped != reported_drops {
            shared.counters.live_dropped.fetch_add(dropped - reported_drops, Ordering::Relaxed);
            reported_drops = dropped;
        }
        let mut records = Vec::with_capacity(samples.len());
        let mut origin_us = Vec::with_capacity(samples.len());
        // A sample is one envelope or a live frame of several of one stream.
        let mut envelopes = Vec::with_capacity(samples.len());
        for sample in samples {
            if sample.payload.first() == Some(&wire::LIVE_FRAME_VERSION) {
                match wire::decode_live_frame(&sample.payload) {
                    Ok(records) => {
                        shared.counters.live_frames.fetch_add(1, Ordering::Relaxed);
                        envelopes.extend(records.into_iter().map(|r| (sample.key.clone(), r)));
                    }
                    Err(e) => {
                        shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(key = sample.key, error = %e, "malformed live frame received");
                    }
                }
            } else {
                envelopes.push((sample.key, sample.payload));
            }
        }
        shared.counters.live_received.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
        {
            let mut st = lock(&shared.state);
            for (key, payload) in envelopes {
                let Some(envelope) = accept(&shared, Some(&key), &payload) else { continue };
                let key = StreamKey::of(&envelope.id);
                if !shared.settings.subscribed(&key) {
                    continue;
                }
                origin_us.push(envelope.hlc.unix_us());
                let seen = st.seen_live.entry(key).or_insert(0);
                *seen = (*seen).max(envelope.id.seq.get());
                records.push(envelope);
            }
        }
        if records.is_empty() {
            continue;
        }
        match shared.log.insert_remote_many(records).await {
            Ok(ticket) => {
                if tx.send((ticket, origin_us)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot queue received envelopes; stopping live reception");
                break;
            }
        }
    }
    drop(tx);
    let _ = settle.await;
}

async fn receive_heads(shared: Arc<Shared>, mut incoming: super::Incoming<super::Sample>) {
    let mut reported_drops = 0;
    while let Some(sample) = incoming.recv().await {
        let dropped = incoming.dropped();
        if dropped != reported_drops {
            shared.counters.heads_dropped.fetch_add(dropped - reported_drops, Ordering::Relaxed);
            reported_drops = dropped;
        }
        let heads: Heads = match wire::decode::<Heads>(&sample.payload) {
            // A node sends its heads in messages of at most this many entries; more is a
            // forged or broken message, refused whole.
            Ok(h) if h.heads.len() > HEADS_PER_MESSAGE_MAX => {
                shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = sample.key, entries = h.heads.len(), max = HEADS_PER_MESSAGE_MAX, "heads message with too many entries");
                continue;
            }
            Ok(h) => h,
            Err(e) => {
                shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = sample.key, error = %e, "malformed heads");
                continue;
            }
        };
        if sample.key != keys::heads(&heads.node) {
            shared.counters.spoofed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if heads.node == shared.settings.node {
            continue;
        }
        let mut acked_more = false;
        let mut st = lock(&shared.state);
        // The tier an acknowledgement counts for is the one the node is alive as (its
        // liveliness token, which the access control ties to its tier), not the one its heads
        // claim: an edge claiming to be the cloud would let `keep_until_acked` remove records
        // the cloud never got. Until its token is seen, its acknowledgements wait.
        let alive_as = st.presence.get(&heads.node).filter(|p| p.alive).map(|p| p.tier);
        let acks_trusted = alive_as == Some(heads.tier);
        if alive_as.is_some_and(|tier| tier != heads.tier) {
            shared.counters.spoofed.fetch_add(1, Ordering::Relaxed);
        }
        for head in heads.heads {
            let key = head.key();
            // Of this node's own streams, also an earlier incarnation's (see `Log::own_keys`).
            if key.origin == shared.settings.node {
                if !acks_trusted {
                    continue;
                }
                // An acknowledgement counts only for a stream this node has, and only up to
                // what it appended: retention trusts it (`keep_until_acked`), so a broken or
                // forged peer must not make records look replicated before they are, nor fill
                // the table with streams that do not exist.
                let Some(last) = shared.log.stream(&key).map(|i| i.last) else { continue };
                let watermark = head.watermark.min(last);
                let acked = st.acks.entry(key.clone()).or_default().entry(heads.tier).or_insert(0);
                acked_more |= watermark > *acked;
                *acked = (*acked).max(watermark);
                shared.log.record_ack(heads.tier, &key, watermark);
            } else if shared.settings.subscribed(&key) {
                // The checks replay what is still missing once it outlived one (no wake-up
                // per heads message: a check then ran at every peer's heads, so that a gap
                // was "old" after a few ms and a hole nobody fills was asked for many
                // times a second). A node's first heads after it came back are urgent (below).
                st.holders.entry(key).or_default().insert(heads.node.clone(), head.watermark);
            }
        }
        // The first heads of a node that came back: catch up on what it holds now.
        let returned = st.returned.remove(&heads.node);
        if returned {
            st.urgent = true;
        }
        drop(st);
        if returned {
            shared.wake.notify_one();
        }
        if acked_more {
            shared.acked.notify_waiters();
        }
    }
}

async fn publish_heads(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.settings.replication.ack_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        publish_heads_now(&shared);
    }
}

/// Publishes what this node holds, per stream, in as many messages as needed.
fn publish_heads_now(shared: &Shared) {
    let heads: Vec<Head> = shared
        .log
        .streams()
        .into_iter()
        .filter(|i| i.watermark > 0)
        .map(|i| Head { origin: i.origin, incarnation: i.incarnation, stream: i.stream, watermark: i.watermark })
        .collect();
    for chunk in heads.chunks(HEADS_PER_MESSAGE_MAX) {
        let message = Heads { node: shared.settings.node.clone(), tier: shared.settings.tier, heads: chunk.to_vec() };
        shared.transport.publish(&keys::heads(&shared.settings.node), wire::encode(&message));
    }
}

async fn watch_presence(shared: Arc<Shared>, mut watch: AliveWatch) {
    while let Some(change) = watch.next().await {
        let since_ms = shared.started.elapsed().as_millis() as u64;
        let (came, went) = {
            let mut st = lock(&shared.state);
            match change {
                AliveChange::One(event) => {
                    let Some((tier, node)) = keys::parse_alive(&event.key) else { continue };
                    if node == shared.settings.node {
                        continue;
                    }
                    tracing::info!(%node, %tier, alive = event.alive, "liveliness");
                    if event.alive {
                        st.returned.insert(node.clone());
                    }
                    st.presence.insert(node, Presence { tier, alive: event.alive, since_ms });
                    (event.alive, !event.alive)
                }
                // A node that went and came back within the dropped changes is alive before
                // and after: it is not among `came`, and no catch-up is started for it (the
                // next checks replay what its heads show missing).
                AliveChange::All { alive, dropped } => {
                    shared.counters.presence_dropped.fetch_add(dropped, Ordering::Relaxed);
                    let alive: BTreeMap<NodeId, Tier> = alive.iter().filter_map(|k| keys::parse_alive(k)).map(|(tier, node)| (node, tier)).collect();
                    let (came, went) = reconcile_presence(&mut st.presence, &alive, &shared.settings.node, since_ms);
                    st.returned.extend(came.iter().cloned());
                    tracing::warn!(
                        dropped,
                        alive = alive.len(),
                        came = came.len(),
                        went = went.len(),
                        "liveliness changes dropped (queue full; raise replication.peer_events_queue_len_max): the liveliness table was read again"
                    );
                    (!came.is_empty(), !went.is_empty())
                }
            }
        };
        if came {
            // A node came back (a partition healed, a process restarted): catch up now.
            lock(&shared.state).urgent = true;
            shared.wake.notify_one();
        }
        if went {
            shared.acked.notify_waiters();
        }
    }
}

/// Makes `presence` agree with the set of nodes `alive` now (`me` aside); returns the nodes
/// that came back and those that went away.
fn reconcile_presence(presence: &mut BTreeMap<NodeId, Presence>, alive: &BTreeMap<NodeId, Tier>, me: &NodeId, since_ms: u64) -> (Vec<NodeId>, Vec<NodeId>) {
    let (mut came, mut went) = (Vec::new(), Vec::new());
    for (node, tier) in alive {
        if node == me {
            continue;
        }
        let known = presence.get(node).is_some_and(|p| p.alive && p.tier == *tier);
        if !known {
            presence.insert(node.clone(), Presence { tier: *tier, alive: true, since_ms });
            came.push(node.clone());
        }
    }
    for (node, p) in presence.iter_mut() {
        if p.alive && !alive.contains_key(node) {
            *p = Presence { tier: p.tier, alive: false, since_ms };
            went.push(node.clone());
        }
    }
    (came, went)
}

async fn receive_ingest(shared: Arc<Shared>, mut incoming: super::Incoming<super::Sample>) {
    let s = &shared.settings;
    lock(&shared.state).ingest_oversized = Some(incoming.oversized.clone());
    let mut last_log = Instant::now() - Duration::from_secs(10);
    while let Some(sample) = incoming.recv().await {
        match ingest::validate(&sample.key, &sample.payload, &s.ingest_streams, s.ingest_payload_bytes_max) {
            Ok((stream, payload)) => {
                let draft = Draft::new(Kind::Reading, PayloadType::new(READING_TYPE).expect("valid"), payload);
                match shared.log.append(stream, draft).await {
                    Ok(ticket) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            match ticket.await {
                                // Accepted once durable: the log may still refuse it (the
                                // reading as stored can be longer than as sent, e.g. `1e15`).
                                Ok(envelope) => {
                                    shared.counters.ingest_accepted.fetch_add(1, Ordering::Relaxed);
                                    publish(&shared, &envelope);
                                }
                                Err(e) => {
                                    let reason = if matches!(e, LogError::Encode(_)) { "too_large" } else { "not_stored" };
                                    *lock(&shared.state).ingest_rejected.entry(reason.to_owned()).or_insert(0) += 1;
                                    tracing::error!(error = %e, "an ingested reading was not stored");
                                }
                            }
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "cannot append an ingested reading"),
                }
            }
            Err(rejection) => {
                *lock(&shared.state).ingest_rejected.entry(rejection.reason().to_owned()).or_insert(0) += 1;
                // Rate-limited: at most one line per second about rejected input.
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    tracing::warn!(key = sample.key, reason = %rejection, "ingest message rejected");
                }
            }
        }
    }
}

/// What [`read_serving`] found.
struct Served {
    /// Readable records, in seq order.
    records: Vec<Envelope>,
    /// Where to read on.
    next: u64,
    /// Nothing held at or above `next`.
    exhausted: bool,
    /// The first seq held at or after `from`, readable or not.
    first: Option<u64>,
    /// Records stepped over because they cannot be decoded, and regions RocksDB cannot read.
    damaged: u64,
}

/// Up to `want` records of `key` held in `from..=to`, for a replay. A record that cannot be
/// decoded (damaged bytes) is stepped over, and counts against `want`, so that what lies above
/// it is still served: the requester sees the gap and may get that record from another holder.
/// A region RocksDB itself cannot read (a table block that fails its checksum) is stepped over
/// the same way, counted once per `want` seqs looked at: [`Log::readable_after`] finds where
/// reading works again, one read per seq, at most `want` seqs at a time, and never past `span`
/// seqs from the first record held in the range (the request's span, as `serve_replay` caps it).
fn read_serving(log: &Log, key: &StreamKey, from: u64, to: u64, want: usize, span: u64) -> Result<Served, LogError> {
    let mut to = to;
    match log.read(key, from, want) {
        Err(LogError::CorruptRecord { .. } | LogError::Corrupt { .. }) => {}
        Err(e) => return Err(e),
        Ok(records) => {
            let (first, last) = (records.first().map(|e| e.id.seq.get()), records.last().map(|e| e.id.seq.get()));
            let next = last.map_or(from, |l| l.saturating_add(1));
            return Ok(Served { exhausted: records.is_empty() || last == Some(u64::MAX), records, next, first, damaged: 0 });
        }
    }
    // One record at a time, to step over the damaged ones.
    let mut served = Served { records: Vec::new(), next: from, exhausted: false, first: None, damaged: 0 };
    while served.records.len() + (served.damaged as usize) < want && served.next <= to {
        let seq = match log.read(key, served.next, 1) {
            Ok(mut one) => {
                let Some(e) = one.pop() else {
                    served.exhausted = true;
                    break;
                };
                let seq = e.id.seq.get();
                if seq > to {
                    served.next = seq;
                    break;
                }
                served.records.push(e);
                seq
            }
            Err(LogError::CorruptRecord { seq, .. }) if seq > to => {
                served.next = seq;
                break;
            }
            Err(LogError::CorruptRecord { seq, .. }) if seq >= served.next => {
                served.damaged += 1;
                seq
            }
            Err(LogError::Corrupt { .. }) => {
                // The read landed on the first record held from here (past what retention
                // removed or a gap), in a damaged block: the answer's span counts from it, as
                // from any first record held, so one request reads at most that many seqs.
                let Some(start) = log.next_held(key, served.next) else {
                    // Nothing held from here: the read ran past the stream (into another's
                    // damaged block), which is not this stream's damage.
                    served.exhausted = true;
                    break;
                };
                if start > to {
                    served.next = start;
                    break;
                }
                let first = *served.first.get_or_insert(start);
                // The request's span counts from the first record held; no look goes past it.
                to = to.min(first.saturating_add(span - 1));
                served.damaged += 1;
                // At most `want` seqs looked at per region found (one read each).
                let window = to.min(start.saturating_add(want as u64 - 1));
                served.next = match log.readable_after(key, start, window)? {
                    Some(after) => after,
                    // All of the window unreadable: go on after it (past the range: what was
                    // read goes out).
                    None => window.saturating_add(1),
                };
                continue;
            }
            Err(e) => return Err(e),
        };
        served.first.get_or_insert(seq);
        match seq.checked_add(1) {
            Some(after) => served.next = after,
            None => {
                served.exhausted = true;
                break;
            }
        }
    }
    Ok(served)
}

/// Which replay requests this node queues: those naming it as the holder. Every node receives
/// every request; the others (and malformed ones, such as one with a body: a replay request
/// has none) end at once here, so their requesters do not wait for this node's queue, and
/// they take none of its places.
fn replay_requests_for(node: NodeId) -> super::Accept {
    Arc::new(move |key, params, body_len| match ReplayParams::parse(params) {
        Ok(p) => p.holder == node && body_len == 0,
        Err(e) => {
            tracing::debug!(key, params, error = e, "bad replay request");
            false
        }
    })
}

async fn serve_replay(shared: Arc<Shared>, mut requests: super::Incoming<Request>) {
    let (mut reported_drops, mut logged_at) = (0, None::<Instant>);
    while let Some(mut request) = requests.recv().await {
        let dropped = requests.dropped();
        if dropped != reported_drops {
            shared.counters.replay_requests_dropped.fetch_add(dropped - reported_drops, Ordering::Relaxed);
            // Logged at the 1st, 2nd, 4th… drop and at least once a minute while they go on:
            // an operator sees it without a flood.
            let crossed = (reported_drops + 1).next_power_of_two() <= dropped;
            if crossed || logged_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                logged_at = Some(Instant::now());
                tracing::warn!(
                    dropped,
                    "replay requests naming this node dropped (queue full; raise replication.request_queue_len_max); their senders ask again"
                );
            }
            reported_drops = dropped;
        }
        let Some((origin, stream)) = keys::parse_replay(&request.key) else { continue };
        let params = match ReplayParams::parse(&request.params) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(key = request.key, params = request.params, error = e, "bad replay request");
                continue;
            }
        };
        if params.holder != shared.settings.node {
            continue; // another holder answers
        }
        let (Ok(origin), Ok(stream)) = (NodeId::new(origin), StreamName::new(stream)) else { continue };
        let key = StreamKey { origin, incarnation: params.incarnation, stream };
        shared.counters.replay_served_requests.fetch_add(1, Ordering::Relaxed);
        let batch_len = shared.settings.replication.replay_batch_len_max as u64;
        // One request is answered with at most this many seqs' worth of records, counted from
        // the first record held in the range (not from its start): a range that begins in a
        // hole this holder cannot fill (records its retention removed) still gets what lies
        // above the hole, and the requester asks again from there.
        let span = batch_len * REPLAY_BATCHES_PER_REQUEST;
        // Nothing is held above SEQ_MAX; a larger `to` (a broken or forged request) would
        // leave reading past the end of the range with nowhere to go.
        let mut to = params.to.min(crate::log::SEQ_MAX);
        let mut capped = false;
        let mut from = params.from;
        // Whether a batch went out; if none did (nothing held in the range, or the read
        // failed first), one empty batch says so: the requester then asks another holder for
        // the range, and does not take this one for silent.
        let (mut answered, mut damaged) = (false, 0);
        // Records read per round follow what fits in one message (large records: few), so a
        // round never reads much more than it sends. The first round guesses from the
        // stream's average record.
        let average = shared.log.stream(&key).map_or(1, |i| (i.bytes / i.count.max(1)).max(1));
        let mut fit = (MESSAGE_BYTES_MAX as u64 / average).clamp(1, batch_len);
        // One answer is at most this many messages: the requester's queue holds one more (an
        // empty answer), and what does not fit in it is lost on the way. Records of just over
        // half a message go one per message, so a cap on bytes alone would let twice as many
        // out.
        let mut replies = 0;
        while from <= to {
            let want = (to - from + 1).min(batch_len).min(fit) as usize;
            let served = match read_serving(&shared.log, &key, from, to, want, span) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(%key, error = %e, "replay read failed");
                    break;
                }
            };
            damaged += served.damaged;
            if !capped {
                if let Some(first) = served.first {
                    capped = true;
                    to = to.min(first.saturating_add(span - 1));
                }
            }
            let (records, next) = (served.records, served.next);
            if records.is_empty() {
                if served.exhausted {
                    break;
                }
                from = next; // past a run of damaged records
                continue;
            }
            let mut batch = ReplayBatch { records: Vec::with_capacity(records.len()) };
            let mut size = 0;
            for envelope in records.iter().filter(|e| e.id.seq.get() <= to) {
                // What this node holds it serves, whatever its own limit says now (a record
                // stored under a larger one); the receiver applies its own.
                let Ok(bytes) = codec::encode(envelope, &codec::Limits::STORED) else { break };
                size += bytes.len() + wire::REPLY_RECORD_OVERHEAD;
                if size > MESSAGE_BYTES_MAX - wire::REPLY_FRAMING_BYTES && !batch.records.is_empty() {
                    break;
                }
                batch.records.push(wire::ByteVec(bytes));
            }
            let sent = batch.records.len() as u64;
            if sent == 0 {
                break;
            }
            shared.counters.replay_served_records.fetch_add(sent, Ordering::Relaxed);
            answered = true;
            if request.responder.reply(wire::encode(&batch)).await.is_err() {
                break;
            }
            fit = if sent < records.len() as u64 { sent } else { fit.saturating_mul(2).min(batch_len) };
            replies += 1;
            if replies == REPLAY_BATCHES_PER_REQUEST {
                break; // the requester asks again from what it still misses
            }
            if sent < records.len() as u64 {
                from = records[sent as usize].id.seq.get();
            } else if served.exhausted {
                break;
            } else {
                from = next;
            }
        }
        if !answered {
            let _ = request.responder.reply(wire::encode(&ReplayBatch { records: Vec::new() })).await;
        }
        if damaged > 0 {
            shared.counters.replay_served_damaged.fetch_add(damaged, Ordering::Relaxed);
            tracing::error!(%key, damaged, from = params.from, to = params.to, "records this node holds cannot be read; replay stepped over them");
        }
    }
}

async fn drive_replay(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.settings.replication.replay_check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.wake.notified() => {}
        }
        check_and_replay(&shared).await;
    }
}

/// One pass over every stream we could be missing something of.
async fn check_and_replay(shared: &Arc<Shared>) {
    let (work, urgent) = {
        let mut st = lock(&shared.state);
        let urgent = std::mem::take(&mut st.urgent);
        let keys: BTreeSet<StreamKey> = st.holders.keys().chain(st.seen_live.keys()).cloned().collect();
        let mut work = Vec::new();
        for key in keys {
            let mine = shared.log.stream(&key).map_or(0, |i| i.watermark);
            let best_holder = st.holders.get(&key).and_then(|h| h.values().max().copied()).unwrap_or(0);
            let seen = st.seen_live.get(&key).copied().unwrap_or(0);
            // A peer may announce more than a seq can be (`SEQ_MAX`): nothing above it exists.
            let target = best_holder.max(seen).min(crate::log::SEQ_MAX);
            let previous = st.last_target.insert(key.clone(), target).unwrap_or(0);
            // Only what was already missing at the last check, unless it is urgent.
            let goal = if urgent { target } else { previous.min(target) };
            if goal > mine {
                work.push((key, goal));
            } else {
                st.replay_resume.remove(&key);
            }
        }
        (work, urgent)
    };
    if urgent && !work.is_empty() {
        tracing::info!(streams = work.len(), "catching up after a node came back");
    }
    // A holder that did not answer for one stream is not asked for the next ones in this
    // check: a busy or slow holder (often the origin, asked first) would otherwise cost one
    // replay timeout per stream, and every stream after them would wait behind those.
    let mut silent = Vec::new();
    for (key, goal) in work {
        replay_stream(shared, &key, goal, &mut silent).await;
    }
}

/// Picks who to ask for `key` beyond our watermark `mine`: the origin if it is alive and
/// holds more, else the live holder holding most; never one of `skip`.
fn choose_holder(shared: &Shared, key: &StreamKey, mine: u64, skip: &[NodeId]) -> Option<NodeId> {
    let st = lock(&shared.state);
    let eligible = |n: &NodeId| st.presence.get(n).is_some_and(|p| p.alive) && !skip.contains(n);
    let holders = st.holders.get(key);
    let origin_holds = holders.and_then(|h| h.get(&key.origin)).copied().unwrap_or(0).max(st.seen_live.get(key).copied().unwrap_or(0));
    if eligible(&key.origin) && origin_holds > mine {
        return Some(key.origin.clone());
    }
    holders?.iter().filter(|(n, wm)| **wm > mine && eligible(n)).max_by_key(|(_, wm)| **wm).map(|(n, _)| n.clone())
}

/// The first range of seqs this node misses of `key` at or above `from` and up to `goal`: a
/// gap below the highest seq held, else what lies above it.
fn next_missing(shared: &Shared, key: &StreamKey, from: u64, goal: u64) -> Option<RangeInclusive<u64>> {
    let (watermark, last) = shared.log.stream(key).map_or((0, 0), |i| (i.watermark, i.last));
    let from = from.max(watermark.saturating_add(1));
    if from > goal {
        return None;
    }
    if let Some(gap) = shared.log.next_gap(key, from) {
        let start = from.max(*gap.start());
        return (start <= goal).then(|| start..=(*gap.end()).min(goal));
    }
    let start = from.max(last.saturating_add(1));
    (start <= goal).then_some(start..=goal)
}

/// Where a stream's replay goes on, and who it passes over there.
#[derive(Debug, Clone, Default)]
struct Resume {
    /// Ranges are asked for from here (0: from the watermark).
    from: u64,
    /// The start of the range `stuck` is about; another range starts with nobody passed over.
    stuck_at: u64,
    /// Holders that answered that range with nothing (they do not hold it, or not its
    /// start): the others are asked for it instead. When none is left, no holder asked
    /// has that range now (records removed by retention at their origin before this node got
    /// them, say): the missing ranges above it are asked for next, so that such a hole does
    /// not keep back what a holder has above it.
    stuck: Vec<NodeId>,
    /// Holders that did not answer at all (timed out, or the answer was lost): not asked again
    /// until the pass over the missing ranges ends or nobody else is left, so that one silent
    /// holder costs one timeout, not one per range.
    silent: Vec<NodeId>,
}

/// One check's replay of `key` up to `goal`, at most `replay_requests_per_check_max`
/// requests, passing over the holders of `silent_in_check` (those that did not answer for an
/// earlier stream of this check) until nobody else is left, and adding to it those that do
/// not answer for this one. A check that stops before the goal (out of requests, nobody left
/// to ask, an error) leaves the next one to go on where it stopped, passing over the same
/// holders for the same range; one that started there and reaches the goal goes on at the
/// watermark with the requests left (still passing over the silent holders).
async fn replay_stream(shared: &Arc<Shared>, key: &StreamKey, goal: u64, silent_in_check: &mut Vec<NodeId>) {
    let stored = lock(&shared.state).replay_resume.remove(key);
    let resumed_above = stored.as_ref().is_some_and(|r| r.from > 0);
    let mut resume = stored.unwrap_or_default();
    let passed_over_before = resume.silent.clone();
    // Passed over, but asked as a last resort (`replay_from`): a range that only they can
    // serve would otherwise wait as long as they do not answer for another stream.
    let mut borrowed: Vec<NodeId> = silent_in_check.iter().filter(|n| !resume.silent.contains(n)).cloned().collect();
    resume.silent.extend(borrowed.iter().cloned());
    let (mut requests, mut timed_out) = (0, Vec::new());
    let (mut at, mut done) = replay_from(shared, key, goal, resume, &mut requests, &mut timed_out, &mut borrowed).await;
    if done && resumed_above {
        let again = Resume { silent: at.silent, ..Resume::default() };
        (at, done) = replay_from(shared, key, goal, again, &mut requests, &mut timed_out, &mut borrowed).await;
    }
    for n in &timed_out {
        if !silent_in_check.contains(n) {
            silent_in_check.push(n.clone());
        }
    }
    if !done {
        // Passed over in the next check too: those this stream itself found silent, not those
        // passed over here only because another stream did.
        at.silent.retain(|n| passed_over_before.contains(n) || timed_out.contains(n));
        lock(&shared.state).replay_resume.insert(key.clone(), at);
    }
}

/// Asks for the missing ranges of `key` from `at.from` up to `goal`, counting requests in
/// `requests` and the holders that did not answer in `timed_out`, passing over `borrowed`
/// (among `at.silent`) until nobody else is left; returns where it stopped and whether
/// nothing up to `goal` is missing above
/// where it started (then only the silent holders matter).
async fn replay_from(
    shared: &Arc<Shared>,
    key: &StreamKey,
    goal: u64,
    at: Resume,
    requests: &mut usize,
    timed_out: &mut Vec<NodeId>,
    borrowed: &mut Vec<NodeId>,
) -> (Resume, bool) {
    let settings = &shared.settings;
    let Resume { mut from, mut stuck_at, mut stuck, mut silent } = at;
    loop {
        let Some(range) = next_missing(shared, key, from, goal) else {
            return (Resume { from, stuck_at, stuck, silent }, true);
        };
        if *range.start() != stuck_at {
            stuck.clear();
            stuck_at = *range.start();
        }
        let mine = shared.log.stream(key).map_or(0, |i| i.watermark);
        let skip: Vec<NodeId> = stuck.iter().chain(&silent).cloned().collect();
        let Some(holder) = choose_holder(shared, key, mine, &skip) else {
            // Nobody else: those passed over only because another stream found them silent
            // are asked after all (once).
            if !borrowed.is_empty() {
                silent.retain(|n| !borrowed.contains(n));
                borrowed.clear();
                continue;
            }
            if stuck.is_empty() {
                // Nobody (else) to ask: the next check asks the silent ones again.
                return (Resume { from, stuck_at, stuck, silent: Vec::new() }, false);
            }
            from = range.end().saturating_add(1);
            stuck.clear();
            continue;
        };
        // Bounded: at most this many requests per check (moving past a range costs none).
        if *requests == settings.replication.replay_requests_per_check_max {
            return (Resume { from, stuck_at, stuck, silent }, false);
        }
        *requests += 1;
        // The holder caps what it sends (`serve_replay`); what is left is asked for next.
        let params = ReplayParams { incarnation: key.incarnation, from: *range.start(), to: *range.end(), holder: holder.clone() };
        shared.counters.replay_requests.fetch_add(1, Ordering::Relaxed);
        let replies = shared
            .transport
            .request(
                &keys::replay(&key.origin, &key.stream),
                &params.to_params(),
                Vec::new(),
                Duration::from_millis(settings.replication.replay_timeout_ms),
                REPLAY_BATCHES_PER_REQUEST as usize + 1,
            )
            .await;
        let mut replies = match replies {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %e, "replay request failed");
                return (Resume { from, stuck_at, stuck, silent }, false);
            }
        };
        let mut answered = false;
        let mut tickets = Vec::new();
        while let Some(bytes) = replies.recv().await {
            let batch: ReplayBatch = match wire::decode(&bytes) {
                Ok(b) => b,
                Err(_) => {
                    shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            answered = true;
            let mut records = Vec::with_capacity(batch.records.len());
            for record in batch.records {
                let Some(envelope) = accept(shared, None, &record.0) else { continue };
                // Only what was asked for: any node can answer a replay query, and a record
                // stored ahead of its origin would make the origin's own copy a "duplicate".
                if StreamKey::of(&envelope.id) != *key || !range.contains(&envelope.id.seq.get()) {
                    shared.counters.spoofed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                records.push(envelope);
            }
            shared.counters.replay_received.fetch_add(records.len() as u64, Ordering::Relaxed);
            let seqs: Vec<u64> = records.iter().map(|e| e.id.seq.get()).collect();
            match shared.log.insert_remote_many(records).await {
                Ok(t) => tickets.push((seqs, t)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot queue replayed envelopes");
                    return (Resume { from, stuck_at, stuck, silent }, false);
                }
            }
        }
        // The seqs of the range now held thanks to this answer (stored, or held already).
        let (mut held, mut failed) = (Vec::new(), false);
        for (seqs, t) in tickets {
            let results = match t.await {
                Ok(r) => r,
                Err(e) => {
                    // Every record of the batch, and of each batch after it that fails too,
                    // as on the live path; those that were stored are counted as such.
                    shared.counters.insert_errors.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                    tracing::error!(error = %e, "storing replayed envelopes failed");
                    failed = true;
                    continue;
                }
            };
            for (seq, r) in seqs.into_iter().zip(results) {
                match r {
                    Ok(Inserted::Stored { .. }) => {
                        shared.counters.replay_stored.fetch_add(1, Ordering::Relaxed);
                        held.push(seq);
                    }
                    Ok(Inserted::Duplicate { .. }) => held.push(seq),
                    Ok(Inserted::Deferred { .. }) => {
                        shared.counters.replay_deferred.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Inserted::Own) => {}
                    Err(e) => {
                        shared.counters.insert_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "storing a replayed envelope failed");
                    }
                }
            }
        }
        if failed {
            return (Resume { from, stuck_at, stuck, silent }, false);
        }
        match first_run(held, &range) {
            // The holder lacks the start of the range (its retention removed it, or its copy
            // has a gap there): the others are asked for that part; moving past it, if none has
            // it, costs no request.
            Some(run) if run.start() > range.start() => {
                shared.counters.replay_stalled.fetch_add(1, Ordering::Relaxed);
                stuck.push(holder);
            }
            // Go on above the first unbroken run held: what broke it (a batch lost on the way,
            // a record deferred or not stored, a gap in the holder's copy) is asked for next.
            Some(run) => {
                from = run.end().saturating_add(1);
                stuck.clear();
            }
            None if answered => {
                tracing::debug!(%key, from = range.start(), to = range.end(), %holder, "the holder has nothing of the range; asking another, if any");
                shared.counters.replay_stalled.fetch_add(1, Ordering::Relaxed);
                stuck.push(holder);
            }
            None => {
                tracing::debug!(%key, from = range.start(), to = range.end(), %holder, "the holder did not answer; not asking it again until this pass ends or nobody else is left");
                shared.counters.replay_stalled.fetch_add(1, Ordering::Relaxed);
                timed_out.push(holder.clone());
                silent.push(holder);
            }
        }
    }
}

/// The first unbroken run of `held` seqs within `range`.
fn first_run(mut held: Vec<u64>, range: &RangeInclusive<u64>) -> Option<RangeInclusive<u64>> {
    held.retain(|s| range.contains(s));
    held.sort_unstable();
    held.dedup();
    let start = *held.first()?;
    let mut end = start;
    for &s in &held[1..] {
        if s != end + 1 {
            break;
        }
        end = s;
    }
    Some(start..=end)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{first_run, read_serving, reconcile_presence, LatencyHistogram, LogError, Presence};
    use crate::model::{NodeId, Tier};

    /// A table block of the only copy fails its checksum (a bad disk): a replay from that
    /// holder steps over the records RocksDB cannot read and serves the ones above and below.
    #[tokio::test]
    async fn replay_serving_steps_over_a_table_block_rocksdb_cannot_read() {
        use crate::log::{Draft, Log, RocksStore, StoreOptions};
        use crate::model::{Kind, PayloadType, StreamName};
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("edge-1").unwrap();
        let stream = StreamName::new("readings/a").unwrap();
        let open = || Log::new(Arc::new(RocksStore::open(dir.path(), &node, StoreOptions::default()).unwrap()));
        let log = open();
        for i in 0..300u32 {
            let payload = format!("{{\"value\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).into_bytes();
            log.append_durable(stream.clone(), Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), payload)).await.unwrap();
        }
        let key = log.local_key(&stream);
        log.close();
        drop(log);
        // The second data block.
        crate::log::tests::damage_table_blocks(dir.path(), &[5_000]);
        let log = open();
        assert!(matches!(log.read(&key, 1, 300), Err(LogError::Corrupt { .. })), "a plain read fails at the damaged block");

        // As `serve_replay` calls it: batches of 64 from 1 to 300.
        let (mut from, mut held, mut damaged) = (1, Vec::new(), 0);
        while from <= 300 {
            let served = read_serving(&log, &key, from, 300, 64, 64 * 16).unwrap();
            damaged += served.damaged;
            held.extend(served.records.iter().map(|e| e.id.seq.get()));
            if served.exhausted {
                break;
            }
            from = served.next;
        }
        assert_eq!(damaged, 1, "one unreadable region");
        // Four seqs per look, fewer than the damaged block holds: the looks chain over it, each
        // answer's span counted from where it started, and the same records come out.
        let (mut from, mut held4, mut damaged4) = (1, Vec::new(), 0);
        while from <= 300 {
            let served = read_serving(&log, &key, from, 300, 4, 4 * 16).unwrap();
            assert!(served.first.is_some() || served.exhausted, "a span to count from: {from}");
            damaged4 += served.damaged;
            held4.extend(served.records.iter().map(|e| e.id.seq.get()));
            if served.exhausted {
                break;
            }
            from = served.next;
        }
        assert_eq!(held4, held);
        assert!(damaged4 > 1, "one count per look: {damaged4}");
        let missing: Vec<u64> = (1..=300).filter(|s| !held.contains(s)).collect();
        assert!(!missing.is_empty() && missing.len() < 150, "{missing:?}");
        assert!(missing.windows(2).all(|w| w[1] == w[0] + 1), "one run, the damaged block's records: {missing:?}");
        assert!(held.contains(&1) && held.contains(&300), "below and above it are served");
        for seq in [missing[0] - 1, missing[missing.len() - 1] + 1] {
            assert!(log.read(&key, seq, 1).is_ok(), "{seq} is readable alone");
        }
        assert!(log.read(&key, missing[missing.len() - 1], 1).is_err(), "the last one stepped over is not");
    }

    /// After dropped liveliness changes, the table is made to agree with who is alive now.
    #[test]
    fn presence_agrees_with_the_set_alive_after_a_drop() {
        let id = |s: &str| NodeId::new(s).unwrap();
        let at = |tier, alive| Presence { tier, alive, since_ms: 1 };
        let mut presence = BTreeMap::from([
            (id("fog-1"), at(Tier::Fog, true)),      // went unreported
            (id("cloud-1"), at(Tier::Cloud, false)), // came back unreported
            (id("edge-2"), at(Tier::Edge, true)),    // unchanged
            (id("edge-3"), at(Tier::Edge, false)),   // still gone
        ]);
        let alive = BTreeMap::from([(id("cloud-1"), Tier::Cloud), (id("edge-2"), Tier::Edge), (id("fog-2"), Tier::Fog), (id("me"), Tier::Edge)]);
        let (came, went) = reconcile_presence(&mut presence, &alive, &id("me"), 7);
        assert_eq!(came, [id("cloud-1"), id("fog-2")]);
        assert_eq!(went, [id("fog-1")]);
        let table: Vec<(String, bool, u64)> = presence.iter().map(|(n, p)| (n.to_string(), p.alive, p.since_ms)).collect();
        assert_eq!(
            table,
            [("cloud-1".into(), true, 7), ("edge-2".into(), true, 1), ("edge-3".into(), false, 1), ("fog-1".into(), false, 7), ("fog-2".into(), true, 7)],
            "only what changed has a new time, and this node is not in its own table"
        );
    }

    #[test]
    fn replay_goes_on_above_the_first_unbroken_run_held() {
        assert_eq!(first_run(vec![], &(1..=10)), None);
        assert_eq!(first_run(vec![12, 11], &(1..=10)), None, "outside the range asked");
        assert_eq!(first_run(vec![5, 3, 4, 4, 8, 9], &(1..=10)), Some(3..=5), "6 and 7 are missing: ask again from 6");
        assert_eq!(first_run(vec![1, 2, 3], &(2..=10)), Some(2..=3));
        assert_eq!(first_run(vec![u64::MAX - 1, u64::MAX], &(1..=u64::MAX)), Some(u64::MAX - 1..=u64::MAX));
    }

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(us * 10);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 1000);
        assert!((5000..=6000).contains(&s.p50_us), "{s:?}");
        assert!((9900..=12000).contains(&s.p99_us), "{s:?}");
        assert_eq!(LatencyHistogram::default().snapshot().count, 0);
        // Every value falls in a bucket whose upper bound is above it.
        for us in [0, 1, 2, 3, 5, 7, 8, 100, 12345, 1 << 30] {
            assert!(LatencyHistogram::upper(LatencyHistogram::bucket(us)) > us || us == 0, "{us}");
        }
    }
}
