//! The continuum bus: how nodes exchange streams over Zenoh, and how they repair what the
//! network lost.
//!
//! - [`Transport`] is the little that Strata needs from a network: best-effort live
//!   publication, bounded subscriptions, request/reply, liveliness. [`ZenohTransport`] is the
//!   real one (the only code in Strata that knows Zenoh); [`sim::SimNet`] is an in-memory
//!   network with seeded faults (drop, duplicate, reorder, delay, partition) for
//!   deterministic simulation.
//! - [`replicator`] is the replication protocol, written once against [`Transport`] and
//!   [`Log`](crate::log::Log): live samples are stored idempotently; every node publishes its
//!   *heads* (per stream: the watermark it holds), which are both acknowledgements for the
//!   origin's retention and the signal that someone holds more than we do; gaps are repaired by
//!   replay queries answered from a holder's RocksDB log, in bounded batches, until closed.
//!
//! Backpressure: live samples go into a bounded queue and are dropped when it is full (Zenoh
//! `CongestionControl::Drop` on the publisher side too); replay repairs them, so overload
//! never loses data and never blocks producers. Every queue here is bounded by a config field.

pub mod ingest;
pub mod replicator;
pub mod sim;
#[cfg(test)]
mod sim_tests;
pub mod wire;
mod zenoh;

use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::model::{NodeId, StreamName, Tier};

pub use self::zenoh::{observer, query_json, query_status, zenoh_config, ZenohTransport};

/// A boxed future, for object-safe async trait methods.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BusError {
    #[error("zenoh: {0}")]
    Zenoh(String),
    #[error("invalid key expression {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("the transport is closed")]
    Closed,
}

/// A publication received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub key: String,
    pub payload: Vec<u8>,
}

/// What a full subscription queue does with the next sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop it and count it: for replicated streams, which replay repairs.
    Drop,
    /// Hold the network until there is room: for ingest from devices, which nothing would
    /// repair. The sender sees backpressure (Zenoh `Block` publishers wait).
    Block,
}

/// A liveliness change: a token appeared (`alive`) or disappeared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliveEvent {
    pub key: String,
    pub alive: bool,
}

/// Answers one request; dropping it ends the reply stream.
pub trait Responder: Send {
    fn reply(&mut self, payload: Vec<u8>) -> BoxFut<'_, Result<(), BusError>>;
}

/// Which requests a [`Transport::serve`]r takes, from their key, parameters and body length
/// in bytes; it runs on the transport's own thread, so it must be quick and never block.
pub type Accept = Arc<dyn Fn(&str, &str, usize) -> bool + Send + Sync>;

/// Takes every request (whose body is within [`wire::MESSAGE_BYTES_MAX`]: a transport refuses
/// a larger one itself).
pub fn accept_all() -> Accept {
    Arc::new(|_, _, _| true)
}

/// Takes requests whose body is at most `max` bytes. A server whose requests are small says
/// so: its queue of N requests then holds at most N such bodies, not N of the largest
/// message a peer may send.
pub fn accept_bodies_up_to(max: usize) -> Accept {
    Arc::new(move |_, _, body_len| body_len <= max)
}

/// Largest body of a control request (status; an operator's approval or denial, a few
/// names): far above what one holds.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 64 * 1024;

/// A request received by a [`Transport::serve`]r.
pub struct Request {
    pub key: String,
    pub params: String,
    /// The request's body (empty if none).
    pub payload: Vec<u8>,
    pub responder: Box<dyn Responder>,
    /// When it arrived (before any queue): a server charges the time it waited to the
    /// request's budget.
    pub received: tokio::time::Instant,
}

/// How many bytes an item takes in a receive queue.
pub trait Weighed {
    fn weight(&self) -> usize;
}

impl Weighed for Sample {
    fn weight(&self) -> usize {
        self.key.len() + self.payload.len()
    }
}

impl Weighed for Request {
    fn weight(&self) -> usize {
        self.key.len() + self.params.len() + self.payload.len()
    }
}

impl Weighed for AliveEvent {
    fn weight(&self) -> usize {
        self.key.len()
    }
}

impl Weighed for Vec<u8> {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A receive queue's bound in bytes, shared by the side that queues (a Zenoh callback) and the
/// [`Incoming`] that takes items out: the bytes of items queued and not yet received.
pub struct ByteBudget {
    queued: AtomicUsize,
    max: usize,
    freed: tokio::sync::Notify,
    /// The receiving side is gone: nobody will give bytes back.
    closed: std::sync::atomic::AtomicBool,
}

impl ByteBudget {
    pub fn new(max: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget { queued: AtomicUsize::new(0), max, freed: tokio::sync::Notify::new(), closed: Default::default() })
    }

    /// The receiving side is gone: a taker blocked in [`ByteBudget::take_blocking`] returns
    /// `false` instead of waiting for bytes that will never come back.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.freed.notify_waiters();
    }

    /// Reserves `n` bytes if they fit, or if nothing is reserved (one item larger than the
    /// whole bound still gets through alone, so a queue never refuses an item for good).
    pub fn try_take(&self, n: usize) -> bool {
        self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_add(n).filter(|&t| q == 0 || t <= self.max)).is_ok()
    }

    /// Blocks this (non-async) thread until `n` bytes fit ([`ByteBudget::try_take`]) and
    /// reserves them; `false` once the receiving side is gone.
    pub fn take_blocking(&self, n: usize) -> bool {
        loop {
            // Registered before the look, so a release (or a close) between the look and the
            // wait wakes it.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            if self.try_take(n) {
                return true;
            }
            futures::executor::block_on(tokio::task::unconstrained(freed));
        }
    }

    /// Releases `n` bytes reserved earlier.
    pub fn give_back(&self, n: usize) {
        // Saturating: a release without its reservation (a bug) must not wrap the count and
        // make every later sample look too large.
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)));
        self.freed.notify_waiters();
    }

    /// Bytes reserved now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// A bounded stream of incoming items, plus what keeps the declaration alive and a count of
/// items dropped because the queue was full (in items, or in bytes when it has a
/// [`ByteBudget`]) or because they were too large to take.
pub struct Incoming<T> {
    rx: mpsc::Receiver<T>,
    pub dropped: Arc<AtomicU64>,
    /// Of `dropped`, the items refused for being larger than the protocol's largest message
    /// ([`wire::MESSAGE_BYTES_MAX`]), whatever room the queue had.
    pub oversized: Arc<AtomicU64>,
    budget: Option<Arc<ByteBudget>>,
    _guard: Box<dyn Any + Send + Sync>,
}

impl<T: Weighed> Incoming<T> {
    pub fn new(rx: mpsc::Receiver<T>, dropped: Arc<AtomicU64>, guard: Box<dyn Any + Send + Sync>) -> Incoming<T> {
        Incoming { rx, dropped, oversized: Arc::default(), budget: None, _guard: guard }
    }

    /// Items too large to take are counted in `oversized` (and in `dropped`).
    pub fn with_oversized(mut self, oversized: Arc<AtomicU64>) -> Incoming<T> {
        self.oversized = oversized;
        self
    }

    /// The queue is also bounded in bytes by `budget`, which its sender reserves from.
    pub fn with_budget(mut self, budget: Arc<ByteBudget>) -> Incoming<T> {
        self.budget = Some(budget);
        self
    }

    fn released(&self, item: T) -> T {
        if let Some(budget) = &self.budget {
            budget.give_back(item.weight());
        }
        item
    }

    pub async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await?;
        Some(self.released(item))
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let item = self.rx.try_recv().ok()?;
        Some(self.released(item))
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Whether the sending side is gone (nothing more will come).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }
}

impl<T> Drop for Incoming<T> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.close();
        }
    }
}

/// Queues `item` for an [`Incoming`] without waiting: when it is full in items or in bytes
/// (`budget`), the item is dropped and counted. Returns whether it was queued.
pub fn offer<T: Weighed>(tx: &mpsc::Sender<T>, budget: Option<&ByteBudget>, dropped: &AtomicU64, item: T) -> bool {
    let n = item.weight();
    if budget.is_some_and(|b| !b.try_take(n)) {
        dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if tx.try_send(item).is_err() {
        if let Some(b) = budget {
            b.give_back(n);
        }
        dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// What Strata needs from a network. Key expressions use Zenoh's syntax (`*` one chunk,
/// `**` any chunks).
pub trait Transport: Send + Sync + 'static {
    fn node(&self) -> &NodeId;
    /// Live publication: never blocks; may be dropped under congestion or partition.
    fn publish(&self, key: &str, payload: Vec<u8>);
    /// Samples published on keys matching `keyexpr`, in a queue of `capacity` samples and
    /// `bytes_max` bytes (key and payload; a larger sample is taken when the queue is empty);
    /// when it is full, `overflow` says whether new samples are dropped (and counted) or the
    /// network is made to wait. A payload over [`wire::MESSAGE_BYTES_MAX`] is dropped.
    fn subscribe(&self, keyexpr: &str, capacity: usize, bytes_max: usize, overflow: Overflow) -> BoxFut<'_, Result<Incoming<Sample>, BusError>>;
    /// Requests on keys matching `keyexpr` that `accept` takes (given their key, parameters and
    /// body length), in a queue of `capacity` (full: refused and counted); one whose body is
    /// over [`wire::MESSAGE_BYTES_MAX`] is refused whatever `accept` says. A request refused
    /// either way ends at once for this server, as one answered with nothing: its requester
    /// does not wait for it until the timeout.
    fn serve(&self, keyexpr: &str, capacity: usize, accept: Accept) -> BoxFut<'_, Result<Incoming<Request>, BusError>>;
    /// Sends a request (with an optional body, `payload`) to every server of `key`; the
    /// replies arrive on the returned queue of `capacity` (a reply over
    /// [`wire::MESSAGE_BYTES_MAX`] is dropped), which closes when all servers finished or
    /// `timeout` passed.
    fn request(&self, key: &str, params: &str, payload: Vec<u8>, timeout: Duration, capacity: usize) -> BoxFut<'_, Result<mpsc::Receiver<Vec<u8>>, BusError>>;
    /// Declares a liveliness token, held until the returned guard is dropped.
    fn declare_alive(&self, key: &str) -> BoxFut<'_, Result<Box<dyn Any + Send + Sync>, BusError>>;
    /// Liveliness tokens matching `keyexpr`: the ones present now, then every change, in a
    /// queue of `capacity` (full: the change is dropped and counted). [`AliveWatch`] repairs
    /// what such a drop loses.
    fn watch_alive(&self, keyexpr: &str, capacity: usize) -> BoxFut<'_, Result<Incoming<AliveEvent>, BusError>>;
    /// The keys of the liveliness tokens matching `keyexpr` that this node sees now, as
    /// gathered within `timeout`.
    fn alive_now(&self, keyexpr: &str, timeout: Duration) -> BoxFut<'_, Result<BTreeSet<String>, BusError>>;
}

/// What an [`AliveWatch`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliveChange {
    /// One token appeared or went away.
    One(AliveEvent),
    /// Changes were dropped (the queue was full; `dropped` of them since the last report), so
    /// here is every token alive now: any other is gone.
    All { alive: BTreeSet<String>, dropped: u64 },
}

/// A liveliness watch that repairs itself. A change that finds the queue full is dropped, and
/// liveliness does not send it again: a node would count a peer as present (or gone) until
/// that peer changes again. After a drop the watch hands out the changes queued before it
/// (older than the dropped ones; at most as many as were queued when it saw the drop, so a
/// steady stream of changes cannot put the repair off), then asks who is alive now
/// ([`Transport::alive_now`], within `query_timeout`) and reports that whole set. It looks at
/// the drop count at each change and at least every `check`; a failed or incomplete query is
/// tried again after `check`.
///
/// A peer that went away and came back within the dropped changes is alive before and after:
/// the whole set cannot show it, so its return is not reported as one.
pub struct AliveWatch {
    transport: Arc<dyn Transport>,
    keyexpr: String,
    incoming: Incoming<AliveEvent>,
    check: Duration,
    query_timeout: Duration,
    /// Drops already repaired.
    repaired: u64,
    /// Once a drop is seen: how many queued changes are still handed out before the query.
    before_query: Option<usize>,
    /// Queries failed in a row (for the warning's rate).
    failures: u32,
}

impl AliveWatch {
    pub async fn open(transport: Arc<dyn Transport>, keyexpr: &str, capacity: usize, check: Duration, query_timeout: Duration) -> Result<AliveWatch, BusError> {
        let incoming = transport.watch_alive(keyexpr, capacity).await?;
        Ok(AliveWatch { transport, keyexpr: keyexpr.to_owned(), incoming, check, query_timeout, repaired: 0, before_query: None, failures: 0 })
    }

    /// Changes dropped so far (repaired or about to be).
    pub fn dropped(&self) -> u64 {
        self.incoming.dropped()
    }

    /// The next change; `None` once the transport closed the watch.
    pub async fn next(&mut self) -> Option<AliveChange> {
        loop {
            let dropped = self.incoming.dropped();
            if dropped != self.repaired {
                // A full queue refuses the newest changes: what it held is older than what was
                // lost, so it goes first, and the set alive now last.
                let queued = self.before_query.get_or_insert_with(|| self.incoming.len());
                if *queued > 0 {
                    *queued -= 1;
                    if let Some(event) = self.incoming.try_recv() {
                        return Some(AliveChange::One(event));
                    }
                }
                match self.transport.alive_now(&self.keyexpr, self.query_timeout).await {
                    Ok(alive) => {
                        let newly = dropped - self.repaired;
                        self.repaired = dropped;
                        self.before_query = None;
                        self.failures = 0;
                        return Some(AliveChange::All { alive, dropped: newly });
                    }
                    Err(_) if self.incoming.is_closed() => return None,
                    Err(e) => {
                        // Changes queued meanwhile are handed out before the next try, so the
                        // table keeps following them while the query fails.
                        self.before_query = None;
                        self.failures += 1;
                        // One line per run of failures (the first, then every hundredth).
                        if self.failures % 100 == 1 {
                            tracing::warn!(key = self.keyexpr, error = %e, failures = self.failures, "cannot ask who is alive after dropped liveliness changes; trying again");
                        }
                        tokio::time::sleep(self.check).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                event = self.incoming.recv() => return event.map(AliveChange::One),
                // A drop counted just after its change was taken is noticed too.
                () = tokio::time::sleep(self.check) => {}
            }
        }
    }
}

/// Key expressions of the Strata protocol.
pub mod keys {
    use super::*;

    /// Live publications of `origin`'s stream.
    pub fn stream(origin: &NodeId, stream: &StreamName) -> String {
        format!("strata/s/{origin}/{stream}")
    }

    /// The origin and stream of a live publication key.
    pub fn parse_stream(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix("strata/s/")?.split_once('/')
    }

    pub fn replay(origin: &NodeId, stream: &StreamName) -> String {
        format!("strata/replay/{origin}/{stream}")
    }

    pub fn parse_replay(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix("strata/replay/")?.split_once('/')
    }

    pub const REPLAY_ALL: &str = "strata/replay/**";

    pub fn heads(node: &NodeId) -> String {
        format!("strata/heads/{node}")
    }

    pub const HEADS_ALL: &str = "strata/heads/*";

    pub fn alive(tier: Tier, node: &NodeId) -> String {
        format!("strata/alive/{tier}/{node}")
    }

    pub const ALIVE_ALL: &str = "strata/alive/**";

    /// `(tier, node)` of a liveliness key.
    pub fn parse_alive(key: &str) -> Option<(Tier, NodeId)> {
        let (tier, node) = key.strip_prefix("strata/alive/")?.split_once('/')?;
        let tier = match tier {
            "edge" => Tier::Edge,
            "fog" => Tier::Fog,
            "cloud" => Tier::Cloud,
            _ => return None,
        };
        Some((tier, NodeId::new(node).ok()?))
    }

    pub fn ingest(stream: &StreamName) -> String {
        format!("strata/ingest/{stream}")
    }

    pub const INGEST_ALL: &str = "strata/ingest/**";

    pub const STATUS_ALL: &str = "strata/status/*";

    pub fn status(node: &NodeId) -> String {
        format!("strata/status/{node}")
    }

    /// Whether `key` (no wildcards) matches `pattern` (Zenoh `*` and `**` chunks).
    pub fn matches(pattern: &str, key: &str) -> bool {
        let p: Vec<&str> = pattern.split('/').collect();
        let k: Vec<&str> = key.split('/').collect();
        crate::config::segments_match(&p, &k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_budget_takes_what_fits_and_frees_on_give_back() {
        let b = ByteBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41), "60 + 41 > 100");
        assert!(b.try_take(40));
        assert_eq!(b.queued(), 100);
        b.give_back(60);
        assert!(b.try_take(50));
        b.give_back(1000);
        assert_eq!(b.queued(), 0, "saturates");
        assert!(b.try_take(150), "alone, an item larger than the bound gets through");
        assert!(!b.try_take(1));
    }

    #[test]
    fn take_blocking_waits_until_bytes_are_given_back() {
        let b = ByteBudget::new(10);
        assert!(b.try_take(8));
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.take_blocking(5))
        };
        // The waiter cannot proceed until the 8 bytes go back; a bounded wait for it to block.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        b.give_back(8);
        while !waiter.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the waiter was not woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(waiter.join().unwrap());
        assert_eq!(b.queued(), 5);
        // Closed (its Incoming dropped): a blocked taker gives up instead of waiting forever.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.take_blocking(10))
        };
        b.close();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !waiter.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the waiter was not released by close");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!waiter.join().unwrap());
    }

    /// A subscription's queue holds at most `bytes_max` bytes of samples not yet received:
    /// beyond that samples are dropped and counted, and receiving makes room again.
    #[tokio::test]
    async fn a_subscription_is_bounded_in_bytes() {
        let net = sim::SimNet::new(1, sim::Faults::NONE);
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let (ta, tb) = (net.attach(&a), net.attach(&b));
        net.link(&a, &b);
        let mut incoming = tb.subscribe("t/**", 1000, 10_000, Overflow::Drop).await.unwrap();
        for _ in 0..5 {
            ta.publish("t/x", vec![0; 4000]);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while incoming.dropped() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "dropped {}", incoming.dropped());
            tokio::task::yield_now().await;
        }
        assert_eq!(incoming.recv().await.map(|s| s.payload.len()), Some(4000));
        assert_eq!(incoming.recv().await.map(|s| s.payload.len()), Some(4000));
        assert!(incoming.try_recv().is_none(), "two fit in 10,000 bytes (with their keys), the other three were dropped");
        assert_eq!(incoming.dropped(), 3);
        ta.publish("t/x", vec![0; 4000]);
        assert_eq!(incoming.recv().await.map(|s| s.payload.len()), Some(4000), "receiving made room");
    }

    /// Node `a` watches `alive/**` in a queue of `capacity`; `b` (returned) declares tokens.
    async fn watched(capacity: usize) -> (sim::SimNet, Arc<sim::SimTransport>, AliveWatch) {
        let net = sim::SimNet::new(1, sim::Faults::NONE);
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let (ta, tb) = (net.attach(&a), net.attach(&b));
        net.link(&a, &b);
        let watch = AliveWatch::open(ta, "alive/**", capacity, Duration::from_secs(1), Duration::from_secs(1)).await.unwrap();
        (net, tb, watch)
    }

    async fn next(watch: &mut AliveWatch) -> Option<AliveChange> {
        tokio::time::timeout(Duration::from_secs(30), watch.next()).await.expect("a change within 30 s")
    }

    /// A liveliness change that finds the queue full is lost, and liveliness does not send it
    /// again; the watch hands out what was queued, then the whole set alive now.
    #[tokio::test]
    async fn an_alive_watch_reads_the_whole_set_again_after_dropped_changes() {
        let (_net, tb, mut watch) = watched(1).await;
        let mut tokens = Vec::new();
        for i in 0..5 {
            tokens.push(tb.declare_alive(&format!("alive/{i}")).await.unwrap());
        }
        let keys = |r: std::ops::Range<usize>| r.map(|i| format!("alive/{i}")).collect::<BTreeSet<_>>();
        assert_eq!(next(&mut watch).await, Some(AliveChange::One(AliveEvent { key: "alive/0".into(), alive: true })), "what was queued first");
        assert_eq!(next(&mut watch).await, Some(AliveChange::All { alive: keys(0..5), dropped: 4 }), "then everything alive");
        tokens.truncate(2);
        assert_eq!(next(&mut watch).await, Some(AliveChange::One(AliveEvent { key: "alive/2".into(), alive: false })));
        assert_eq!(next(&mut watch).await, Some(AliveChange::All { alive: keys(0..2), dropped: 2 }), "the two gone unreported are gone");
        // Read as they come, changes go one by one again.
        for i in [1, 0] {
            drop(tokens.pop());
            assert_eq!(next(&mut watch).await, Some(AliveChange::One(AliveEvent { key: format!("alive/{i}"), alive: false })));
        }
        let quiet = tokio::time::timeout(Duration::from_millis(50), watch.next()).await;
        assert!(quiet.is_err(), "nothing dropped, nothing to report: {quiet:?}");
    }

    /// Changes that keep coming after a drop do not put the repair off: only those queued
    /// when the drop was seen go before the query.
    #[tokio::test]
    async fn an_alive_watch_repairs_before_changes_queued_after_the_drop() {
        let (_net, tb, mut watch) = watched(2).await;
        let up = |i: usize| AliveChange::One(AliveEvent { key: format!("alive/{i}"), alive: true });
        let mut tokens = Vec::new();
        for i in 0..3 {
            tokens.push(tb.declare_alive(&format!("alive/{i}")).await.unwrap());
        }
        assert_eq!(next(&mut watch).await, Some(up(0)), "two queued, one dropped");
        tokens.push(tb.declare_alive("alive/3").await.unwrap());
        assert_eq!(next(&mut watch).await, Some(up(1)));
        let all = (0..4).map(|i| format!("alive/{i}")).collect();
        assert_eq!(next(&mut watch).await, Some(AliveChange::All { alive: all, dropped: 1 }), "before the change queued after the drop");
        assert_eq!(next(&mut watch).await, Some(up(3)), "which comes after, and agrees");
    }
}
