//! An in-memory network for deterministic simulation of the replication protocol.
//!
//! Nodes attach to a [`SimNet`] and get a [`Transport`]. Links between nodes can be cut
//! and healed; a message between two nodes is delivered only if they are connected through
//! links that are up (like Zenoh routing through a fog router). Under a seeded [`Faults`]
//! schedule every message may be dropped, duplicated or delayed (which reorders). Delivery
//! happens in tokio tasks that sleep for the delay, so on a current-thread runtime with paused
//! time the whole run is a function of the seed.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::{keys, Accept, AliveEvent, BoxFut, BusError, ByteBudget, Incoming, Overflow, Request, Responder, Sample, Transport, Weighed};
use crate::model::NodeId;

/// Fault probabilities (0.0..=1.0) and the delay range of every delivered message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    pub delay_max: Duration,
}

impl Faults {
    pub const NONE: Faults = Faults { drop: 0.0, duplicate: 0.0, delay_max: Duration::ZERO };
}

/// Message counts, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub unreachable: u64,
}

/// Where a publication goes: a subscription's queue, its byte bound, its drop count, its node.
type SubTarget = (mpsc::Sender<Sample>, Option<Arc<ByteBudget>>, Arc<AtomicU64>, Arc<AtomicU64>, NodeId);
/// A server a request goes to: its queue, drop counter, filter and node.
type ServerTarget = (mpsc::Sender<Request>, Arc<AtomicU64>, Option<Accept>, NodeId);

struct Sub<T> {
    owner: NodeId,
    pattern: String,
    tx: mpsc::Sender<T>,
    dropped: Arc<AtomicU64>,
    /// Samples over [`super::wire::MESSAGE_BYTES_MAX`] refused (subscriptions), as Zenoh's
    /// transport counts them.
    oversized: Arc<AtomicU64>,
    /// The queue's bound in bytes, for subscriptions.
    budget: Option<Arc<ByteBudget>>,
    /// Which requests a server takes.
    accept: Option<Accept>,
    id: u64,
}

struct State {
    rng: StdRng,
    faults: Faults,
    nodes: BTreeSet<NodeId>,
    /// Undirected links that exist (`up` or not).
    links: BTreeMap<(NodeId, NodeId), bool>,
    subs: Vec<Sub<Sample>>,
    servers: Vec<Sub<Request>>,
    watchers: Vec<Sub<AliveEvent>>,
    /// Liveliness tokens: key -> (owner, guard id).
    tokens: BTreeMap<String, (NodeId, u64)>,
    /// Which token keys each watcher currently sees (so changes become events).
    seen: BTreeMap<u64, BTreeSet<String>>,
    next_id: u64,
    stats: NetStats,
}

impl State {
    fn reachable(&self, a: &NodeId, b: &NodeId) -> bool {
        if a == b {
            return true;
        }
        if !self.nodes.contains(a) || !self.nodes.contains(b) {
            return false;
        }
        let mut seen = BTreeSet::from([a.clone()]);
        let mut todo = VecDeque::from([a.clone()]);
        while let Some(n) = todo.pop_front() {
            for ((x, y), up) in &self.links {
                if !up {
                    continue;
                }
                let other = if *x == n {
                    y
                } else if *y == n {
                    x
                } else {
                    continue;
                };
                if other == b {
                    return true;
                }
                if self.nodes.contains(other) && seen.insert(other.clone()) {
                    todo.push_back(other.clone());
                }
            }
        }
        false
    }

    /// How many copies to deliver and after which delays, per the fault schedule.
    fn plan(&mut self) -> Vec<Duration> {
        self.stats.sent += 1;
        if self.rng.gen_bool(self.faults.drop) {
            self.stats.dropped += 1;
            return Vec::new();
        }
        let copies = if self.rng.gen_bool(self.faults.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let max = self.faults.delay_max.as_micros() as u64;
        (0..copies).map(|_| Duration::from_micros(if max == 0 { 0 } else { self.rng.gen_range(0..=max) })).collect()
    }

    /// Sends liveliness events to every watcher whose view changed.
    fn refresh_liveliness(&mut self) {
        for w in &self.watchers {
            let visible: BTreeSet<String> = self
                .tokens
                .iter()
                .filter(|(key, (owner, _))| keys::matches(&w.pattern, key) && self.reachable(&w.owner, owner))
                .map(|(k, _)| k.clone())
                .collect();
            let before = self.seen.entry(w.id).or_default();
            let changes = before.difference(&visible).map(|k| (k, false)).chain(visible.difference(before).map(|k| (k, true)));
            for (key, alive) in changes {
                if w.tx.try_send(AliveEvent { key: key.clone(), alive }).is_err() {
                    w.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            *before = visible;
        }
    }
}

/// The shared in-memory network.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
}

impl SimNet {
    pub fn new(seed: u64, faults: Faults) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                faults,
                nodes: BTreeSet::new(),
                links: BTreeMap::new(),
                subs: Vec::new(),
                servers: Vec::new(),
                watchers: Vec::new(),
                tokens: BTreeMap::new(),
                seen: BTreeMap::new(),
                next_id: 0,
                stats: NetStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches (or re-attaches after [`SimNet::detach`]) a node.
    pub fn attach(&self, node: &NodeId) -> Arc<SimTransport> {
        let mut s = self.lock();
        s.nodes.insert(node.clone());
        s.refresh_liveliness();
        Arc::new(SimTransport { node: node.clone(), net: self.clone() })
    }

    /// A node crashed: its subscriptions, servers and tokens vanish.
    pub fn detach(&self, node: &NodeId) {
        let mut s = self.lock();
        s.nodes.remove(node);
        s.subs.retain(|x| &x.owner != node);
        s.servers.retain(|x| &x.owner != node);
        s.watchers.retain(|x| &x.owner != node);
        s.tokens.retain(|_, (owner, _)| owner != node);
        s.refresh_liveliness();
    }

    fn link_key(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
        if a <= b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        }
    }

    pub fn link(&self, a: &NodeId, b: &NodeId) {
        self.set_link(a, b, true);
    }

    pub fn cut(&self, a: &NodeId, b: &NodeId) {
        self.set_link(a, b, false);
    }

    pub fn heal(&self, a: &NodeId, b: &NodeId) {
        self.set_link(a, b, true);
    }

    fn set_link(&self, a: &NodeId, b: &NodeId, up: bool) {
        let mut s = self.lock();
        s.links.insert(SimNet::link_key(a, b), up);
        s.refresh_liveliness();
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }
}

/// One node's view of a [`SimNet`].
pub struct SimTransport {
    node: NodeId,
    net: SimNet,
}

/// Unregisters a subscription, server or token when dropped.
struct SimGuard {
    net: SimNet,
    id: u64,
}

impl Drop for SimGuard {
    fn drop(&mut self) {
        let mut s = self.net.lock();
        let id = self.id;
        s.subs.retain(|x| x.id != id);
        s.servers.retain(|x| x.id != id);
        s.watchers.retain(|x| x.id != id);
        let had_token = s.tokens.len();
        s.tokens.retain(|_, (_, t)| *t != id);
        if s.tokens.len() != had_token {
            s.refresh_liveliness();
        }
    }
}

/// Sends one copy of `item` per planned delay, each in its own task.
fn deliver<T: Weighed + Send + 'static>(
    delays: Vec<Duration>,
    tx: mpsc::Sender<T>,
    budget: Option<Arc<ByteBudget>>,
    item: T,
    dropped: Arc<AtomicU64>,
    clone: impl Fn(&T) -> T,
) {
    let n = delays.len();
    if n == 0 {
        return;
    }
    let mut items: Vec<T> = Vec::with_capacity(n);
    for _ in 1..n {
        items.push(clone(&item));
    }
    items.push(item);
    for (delay, item) in delays.into_iter().zip(items) {
        let (tx, dropped, budget) = (tx.clone(), dropped.clone(), budget.clone());
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            super::offer(&tx, budget.as_deref(), &dropped, item);
        });
    }
}

struct SimResponder {
    net: SimNet,
    from: NodeId,
    to: NodeId,
    tx: mpsc::Sender<Vec<u8>>,
    /// The request's timeout.
    deadline: tokio::time::Instant,
}

/// Keeps a reply stream open until `deadline`, as a request or reply lost on the way does.
fn hold_until(deadline: tokio::time::Instant, tx: mpsc::Sender<Vec<u8>>) {
    tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        drop(tx);
    });
}

impl Responder for SimResponder {
    fn reply(&mut self, payload: Vec<u8>) -> BoxFut<'_, Result<(), BusError>> {
        let mut s = self.net.lock();
        if s.reachable(&self.from, &self.to) {
            let delays = s.plan();
            s.stats.delivered += delays.len() as u64;
            drop(s);
            if delays.is_empty() {
                hold_until(self.deadline, self.tx.clone());
            }
            deliver(delays, self.tx.clone(), None, payload, Arc::new(AtomicU64::new(0)), Clone::clone);
        } else {
            s.stats.unreachable += 1;
            drop(s);
            hold_until(self.deadline, self.tx.clone());
        }
        Box::pin(async { Ok(()) })
    }
}

impl SimTransport {
    /// Adds a bounded queue of `T` for `keyexpr` to the list `list` picks.
    fn register<T: Weighed>(
        &self,
        list: impl FnOnce(&mut State) -> &mut Vec<Sub<T>>,
        keyexpr: &str,
        capacity: usize,
        budget: Option<Arc<ByteBudget>>,
        accept: Option<Accept>,
    ) -> Incoming<T> {
        let mut s = self.net.lock();
        let (tx, rx) = mpsc::channel(capacity);
        let (dropped, oversized) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let id = s.next_id;
        s.next_id += 1;
        let sub = Sub { owner: self.node.clone(), pattern: keyexpr.to_owned(), tx, dropped: dropped.clone(), oversized: oversized.clone(), budget, accept, id };
        list(&mut s).push(sub);
        Incoming::new(rx, dropped, Box::new(SimGuard { net: self.net.clone(), id })).with_oversized(oversized)
    }
}

impl Transport for SimTransport {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn publish(&self, key: &str, payload: Vec<u8>) {
        let mut s = self.net.lock();
        let targets: Vec<SubTarget> = s
            .subs
            .iter()
            .filter(|sub| keys::matches(&sub.pattern, key))
            .map(|sub| (sub.tx.clone(), sub.budget.clone(), sub.dropped.clone(), sub.oversized.clone(), sub.owner.clone()))
            .collect();
        for (tx, budget, dropped, oversized, owner) in targets {
            if !s.reachable(&self.node, &owner) {
                s.stats.unreachable += 1;
                continue;
            }
            // As Zenoh's transport does: refused unread, counted.
            if payload.len() > super::wire::MESSAGE_BYTES_MAX {
                dropped.fetch_add(1, Ordering::Relaxed);
                oversized.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let delays = s.plan();
            s.stats.delivered += delays.len() as u64;
            deliver(delays, tx, budget, Sample { key: key.to_owned(), payload: payload.clone() }, dropped, Clone::clone);
        }
    }

    // The simulated queues drop when full whatever `overflow` says: ingest is not simulated.
    fn subscribe(&self, keyexpr: &str, capacity: usize, bytes_max: usize, _overflow: Overflow) -> BoxFut<'_, Result<Incoming<Sample>, BusError>> {
        let budget = ByteBudget::new(bytes_max);
        let incoming = self.register(|s| &mut s.subs, keyexpr, capacity, Some(budget.clone()), None);
        Box::pin(async move { Ok(incoming.with_budget(budget)) })
    }

    fn serve(&self, keyexpr: &str, capacity: usize, accept: Accept) -> BoxFut<'_, Result<Incoming<Request>, BusError>> {
        let incoming = self.register(|s| &mut s.servers, keyexpr, capacity, None, Some(accept));
        Box::pin(async move { Ok(incoming) })
    }

    fn request(&self, key: &str, params: &str, payload: Vec<u8>, timeout: Duration, capacity: usize) -> BoxFut<'_, Result<mpsc::Receiver<Vec<u8>>, BusError>> {
        // Like a Zenoh query, the reply stream ends once every server reached is done with the
        // request (its responder dropped, its replies delivered), or at the timeout. A request
        // or reply lost on the way holds it open until the timeout.
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, mut replies) = mpsc::channel(capacity);
        let mut s = self.net.lock();
        let servers: Vec<ServerTarget> = s
            .servers
            .iter()
            .filter(|srv| keys::matches(&srv.pattern, key))
            .map(|srv| (srv.tx.clone(), srv.dropped.clone(), srv.accept.clone(), srv.owner.clone()))
            .collect();
        for (srv, dropped, accept, owner) in servers {
            if !s.reachable(&self.node, &owner) {
                s.stats.unreachable += 1;
                continue;
            }
            let delays = s.plan();
            s.stats.delivered += delays.len() as u64;
            // A request is not duplicated: one copy, after the first planned delay.
            let Some(&delay) = delays.first() else {
                hold_until(deadline, tx.clone());
                continue;
            };
            let responder = SimResponder { net: self.net.clone(), from: owner.clone(), to: self.node.clone(), tx: tx.clone(), deadline };
            let request = Request {
                key: key.to_owned(),
                params: params.to_owned(),
                payload: payload.clone(),
                responder: Box::new(responder),
                received: tokio::time::Instant::now(),
            };
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut request = request;
                request.received = tokio::time::Instant::now();
                // As Zenoh's transport does: a body over the largest message is refused.
                let body_len = request.payload.len();
                if body_len > super::wire::MESSAGE_BYTES_MAX || !accept.is_none_or(|a| a(&request.key, &request.params, body_len)) {
                    return;
                }
                // Counted before the refused request (and its responder) is dropped.
                if let Err(refused) = srv.try_send(request) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    drop(refused);
                }
            });
        }
        drop(s);
        drop(tx);
        let (out, rx) = mpsc::channel(capacity);
        tokio::spawn(async move {
            // Into the requester's queue as they come (full, or over the largest message: the
            // reply is lost, as with Zenoh's transport); at the timeout, what already arrived is
            // passed on and the stream ends.
            let forward = async {
                while let Some(reply) = replies.recv().await {
                    if reply.len() <= super::wire::MESSAGE_BYTES_MAX {
                        let _ = out.try_send(reply);
                    }
                }
            };
            if tokio::time::timeout_at(deadline, forward).await.is_err() {
                replies.close();
                while let Ok(reply) = replies.try_recv() {
                    if reply.len() <= super::wire::MESSAGE_BYTES_MAX {
                        let _ = out.try_send(reply);
                    }
                }
            }
        });
        Box::pin(async move { Ok(rx) })
    }

    fn declare_alive(&self, key: &str) -> BoxFut<'_, Result<Box<dyn Any + Send + Sync>, BusError>> {
        let mut s = self.net.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.tokens.insert(key.to_owned(), (self.node.clone(), id));
        s.refresh_liveliness();
        let guard = SimGuard { net: self.net.clone(), id };
        Box::pin(async move { Ok(Box::new(guard) as Box<dyn Any + Send + Sync>) })
    }

    fn watch_alive(&self, keyexpr: &str, capacity: usize) -> BoxFut<'_, Result<Incoming<AliveEvent>, BusError>> {
        let incoming = self.register(|s| &mut s.watchers, keyexpr, capacity, None, None);
        self.net.lock().refresh_liveliness();
        Box::pin(async move { Ok(incoming) })
    }

    fn alive_now(&self, keyexpr: &str, _timeout: Duration) -> BoxFut<'_, Result<BTreeSet<String>, BusError>> {
        let s = self.net.lock();
        let alive = s.tokens.iter().filter(|(key, (owner, _))| keys::matches(keyexpr, key) && s.reachable(&self.node, owner)).map(|(k, _)| k.clone()).collect();
        Box::pin(async move { Ok(alive) })
    }
}
