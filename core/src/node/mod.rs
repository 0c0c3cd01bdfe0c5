//! A node: one store, one Zenoh session, one replication protocol and one supervision tree,
//! wired from a config.
//!
//! [`Node::start`] opens the RocksDB store (failing clearly if it is locked, of another node,
//! or of another format), opens the Zenoh session, starts replication, builds the root
//! supervisor with the config's `[[actors]]` (kinds from a [`Registry`]), retention sweeps
//! and the status queryable (`strata/status/<node_id>`, a JSON document any Zenoh client can
//! read). Every supervision event is appended to the node's `events` stream.
//!
//! [`Node::shutdown`] stops the node's own tasks (escalations, modes, retention, status) and
//! routing, then the actors (each finishes its handler and commits its cursor, within
//! `child_shutdown_timeout_ms`), writes the remaining events, hands its records over to the
//! tiers it reaches (replication stops last, within `replication.shutdown_handover_ms`) and
//! flushes the log. [`Node::failed`] resolves if the root supervisor gives up (restart
//! intensity exceeded): the process should then exit non-zero.

pub mod decide;
pub mod escalate;
pub mod incident;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;
use tokio::task::JoinSet;

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch};

use crate::actor::{ActorEnv, Registry};
use crate::bus::replicator::{Replicator, Settings};
use crate::bus::{keys, BusError, Transport, ZenohTransport};
use crate::config::NodeConfig;
use crate::log::{Draft, Log, LogError, RocksStore, StoreOptions};
use crate::mode::{Health, Mode, ModeMachine};
use crate::model::{Kind, MonoClock, PayloadType, StreamName};
use crate::supervise::{self, policy::Policy, Event, Supervisor, SupervisorArgs, SupervisorMsg};

/// The stream of supervision events (and later every other node event).
pub const EVENTS_STREAM: &str = "events";
/// Payload type of an event: the JSON of [`Event`] plus `node` and `at_unix_ms`.
pub const EVENT_TYPE: &str = "strata.event/1";
/// Name of the node's root supervisor in events.
pub const ROOT: &str = "root";

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Actors(String),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

pub struct Node {
    config: NodeConfig,
    log: Log,
    transport: Arc<ZenohTransport>,
    replicator: Arc<Replicator>,
    root: ActorRef<SupervisorMsg>,
    root_done: Option<tokio::task::JoinHandle<()>>,
    /// Set when the root supervisor gave up: the reason.
    fatal: watch::Receiver<Option<String>>,
    events_task: Option<tokio::task::JoinHandle<()>>,
    /// Tells the events task to append what is queued and end (some senders outlive the
    /// actors: the decider's, the node's own).
    events_finish: Option<tokio::sync::oneshot::Sender<()>>,
    events_dropped: Arc<std::sync::atomic::AtomicU64>,
    mode: watch::Receiver<Mode>,
    decider: Arc<decide::Decider>,
    /// The escalations waiting for an operator (JSON, for status).
    escalations: Arc<std::sync::Mutex<Value>>,
    /// What actors report about themselves (bridges: connection, counters).
    reports: crate::actor::Reports,
    tasks: JoinSet<()>,
    started: Instant,
    /// `security` in the status document: TLS on or off, the digest of the ACL applied.
    security: Value,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Starts the node of `config`; its actors' kinds come from `registry`.
    pub async fn start(config: NodeConfig, registry: &Registry) -> Result<Node, NodeError> {
        // Unknown kinds and bad params fail before anything is opened.
        for (i, spec) in config.actors.iter().enumerate() {
            registry.check(spec).map_err(|(key, e)| NodeError::Actors(format!("actors[{i}].{key}: {e}")))?;
        }
        // TLS files, the certificate's name and the continuum's configs are checked before
        // anything is opened.
        let security = crate::security::NodeSecurity::prepare(&config)?;
        let data_dir = config.node.data_dir();
        let store = RocksStore::open(&data_dir, &config.node.id, StoreOptions::from_config(&config.log))?;
        let log = Log::new(Arc::new(store));
        tracing::info!(node = %config.node.id, tier = %config.node.tier, incarnation = %log.incarnation(),
            data_dir = %data_dir.display(), "store open");
        let transport = match ZenohTransport::open(&config, &security).await {
            Ok(t) => Arc::new(t),
            Err(e) if config.zenoh.mode_for(config.node.tier) == crate::config::ZenohMode::Client => {
                return Err(NodeError::Bus(BusError::Zenoh(format!(
                    "{e} (a Zenoh client needs its router at start; use mode = \"peer\" for a node that must start while isolated)"
                ))))
            }
            Err(e) => return Err(e.into()),
        };
        let replicator = Arc::new(Replicator::start(Settings::from_config(&config), log.clone(), transport.clone() as Arc<dyn Transport>).await?);
        let (fatal_tx, fatal) = watch::channel(None);
        let fatal_tx = Arc::new(fatal_tx);
        let events_dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (events_tx, events_rx) = mpsc::channel(config.supervision.events_queue_len_max);
        let (events_finish, finish_events) = tokio::sync::oneshot::channel();
        let events_task = tokio::spawn(append_events(config.clone(), replicator.clone(), events_rx, finish_events));
        let mode_events = EventQueue { tx: events_tx.clone(), dropped: events_dropped.clone() };
        let incidents = Arc::new(std::sync::Mutex::new(incident::Incidents::new(unix_ms())));
        let sink: supervise::EventSink = {
            let queue = EventQueue { tx: events_tx, dropped: events_dropped.clone() };
            let (fatal_tx, incidents) = (fatal_tx.clone(), incidents.clone());
            Arc::new(move |event: Event| {
                if let Event::Escalated { supervisor, reason } = &event {
                    if supervisor == ROOT {
                        fatal_tx.send_replace(Some(reason.clone()));
                    }
                }
                queue.push(serde_json::to_value(&event).expect("events serialise"));
                if let Some(incident) = incidents.lock().unwrap_or_else(|p| p.into_inner()).on_supervision(&event, unix_ms()) {
                    queue.push(incident);
                }
            })
        };
        let machine = ModeMachine::new(config.node.tier, Duration::from_millis(config.modes.recover_hold_ms));
        let (mode_tx, mode) = watch::channel(machine.mode());
        let node_events: decide::EventSink = {
            let queue = mode_events.clone();
            Arc::new(move |event| queue.push(event))
        };
        let decider = decide::Decider::start(&config, transport.clone() as Arc<dyn Transport>, mode.clone(), node_events.clone()).await?;
        let publish: crate::actor::Publish = {
            let r = replicator.clone();
            Arc::new(move |e| r.publish(e))
        };
        let reports = crate::actor::Reports::default();
        let env = ActorEnv {
            config: Arc::new(config.clone()),
            mode: mode.clone(),
            log: log.clone(),
            publish: publish.clone(),
            decider: Some(decider.clone()),
            events: Some(node_events.clone()),
            reports: reports.clone(),
        };
        let children = config.actors.iter().map(|spec| registry.child(spec, &env)).collect::<Result<Vec<_>, _>>().map_err(NodeError::Actors)?;
        let args = SupervisorArgs { name: ROOT.into(), policy: Policy::from_config(&config.supervision), children, events: sink };
        let (root, handle) = Actor::spawn(None, Supervisor, args).await.map_err(|e| NodeError::Actors(format!("the actors failed to start: {e}")))?;
        let desk_fatal = fatal_tx.clone();
        let root_done = tokio::spawn(async move {
            let ended = handle.await;
            // The root ends on shutdown (reason recorded elsewhere) or when it gives up.
            if let Err(e) = ended {
                fatal_tx.send_replace(Some(format!("root supervisor panicked: {e}")));
            }
        });
        let mut node = Node {
            config,
            log,
            transport,
            replicator,
            root,
            root_done: Some(root_done),
            fatal,
            events_task: Some(events_task),
            events_finish: Some(events_finish),
            events_dropped,
            mode,
            decider,
            escalations: Arc::new(std::sync::Mutex::new(Value::Array(Vec::new()))),
            reports,
            tasks: JoinSet::new(),
            started: Instant::now(),
            security: security.status(),
        };
        let desk =
            escalate::run(node.config.clone(), node.log.clone(), node.transport.clone() as Arc<dyn Transport>, publish, node_events, node.escalations.clone());
        node.tasks.spawn(fail_node_if_it_ends("the escalation desk", desk, desk_fatal));
        node.start_modes(machine, mode_tx, mode_events, incidents);
        node.start_retention();
        node.start_status().await?;
        tracing::info!(node = %node.config.node.id, "node running");
        Ok(node)
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Retention sweeps: the configured rules and the built-in one for actor snapshots.
    fn start_retention(&mut self) {
        let log = self.log.clone();
        let every = Duration::from_millis(self.config.log.retention_check_interval_ms);
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match log.sweep(unix_ms()).await {
                    Ok(r) => {
                        if r.removed > 0 {
                            tracing::info!(removed = r.removed, expired = r.expired, "retention sweep");
                        }
                        if let Some(first) = &r.first_unreadable {
                            tracing::error!(streams = r.unreadable, first = %first, "retention stopped at records it could not read (damaged, or a read that failed); they and what follows them in their stream are kept");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
            }
        });
    }

    /// Re-evaluates the mode every `modes.check_interval_ms` from the liveliness table and
    /// local health (the root supervisor still running); each change is logged, published to
    /// the actors and appended to the `events` stream, with the incident it opens or closes.
    /// After a recovery to `full`, a `caught_up` event says when the other tiers had
    /// acknowledged everything this node produced before the recovery.
    fn start_modes(
        &mut self,
        mut machine: ModeMachine,
        mode_tx: watch::Sender<Mode>,
        events: EventQueue,
        incidents: Arc<std::sync::Mutex<incident::Incidents>>,
    ) {
        let (replicator, fatal) = (self.replicator.clone(), self.fatal.clone());
        let every = Duration::from_millis(self.config.modes.check_interval_ms);
        let catch_up_watch = Duration::from_millis(self.config.modes.catch_up_watch_ms);
        // The tiers' acknowledgements, which the catch-up is measured by, come this often.
        let ack_every = Duration::from_millis(self.config.replication.ack_interval_ms);
        self.tasks.spawn(async move {
            let clock = MonoClock::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Aborted with this task at shutdown, and when a new recovery starts another.
            let mut catching_up: Option<AbortOnDrop<()>> = None;
            loop {
                tick.tick().await;
                let reachable = replicator.presence().values().filter(|p| p.alive).map(|p| p.tier).collect();
                let health = Health { reachable, healthy: fatal.borrow().is_none() };
                let Some(t) = machine.observe(clock.now(), &health) else { continue };
                tracing::warn!(from = %t.from, to = %t.to, reason = %t.reason, "mode changed");
                mode_tx.send_replace(t.to);
                events.push(json!({ "event": "mode_changed", "from": t.from, "to": t.to, "reason": t.reason }));
                let behind_now = || behind(&replicator);
                let closed = incidents.lock().unwrap_or_else(|p| p.into_inner()).on_mode(&t, unix_ms(), behind_now);
                if let Some(incident) = closed {
                    let recovered = incident["event"] == "incident_closed";
                    events.push(incident);
                    if recovered {
                        drop(catching_up.take());
                        let (replicator, events) = (replicator.clone(), events.clone());
                        // Caught up: every acknowledging tier holds what this node had at the recovery.
                        let goal = replicator.own_watermarks();
                        catching_up = Some(AbortOnDrop(tokio::spawn(async move {
                            events.push(watch_catch_up(|| replicator.short_of(&goal, false), catch_up_watch, ack_every).await);
                        })));
                    }
                }
            }
        });
    }

    /// The node's current degraded mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    async fn start_status(&mut self) -> Result<(), NodeError> {
        let mut requests = self
            .transport
            .serve(
                &keys::status(&self.config.node.id),
                self.config.node.status_queue_len_max,
                crate::bus::accept_bodies_up_to(crate::bus::CONTROL_REQUEST_BYTES_MAX),
            )
            .await?;
        let (log, replicator, config, started) = (self.log.clone(), self.replicator.clone(), self.config.clone(), self.started);
        let (root, dropped, mode) = (self.root.clone(), self.events_dropped.clone(), self.mode.clone());
        let (decider, escalations, reports) = (self.decider.clone(), self.escalations.clone(), self.reports.clone());
        let security = self.security.clone();
        self.tasks.spawn(async move {
            let children_wait = Duration::from_millis(config.supervision.status_children_wait_ms);
            while let Some(mut request) = requests.recv().await {
                let actors = Listed { actors: supervise::children(&root, children_wait).await, waited: children_wait };
                let dropped = dropped.load(std::sync::atomic::Ordering::Relaxed);
                let mut doc = status(&config, &log, &replicator, started, *mode.borrow(), actors, dropped);
                decisions_status(&mut doc, &decider, &escalations, &reports);
                doc["security"] = security.clone();
                let _ = request.responder.reply(doc.to_string().into_bytes()).await;
            }
        });
        Ok(())
    }

    /// The status document served on `strata/status/<node_id>`.
    pub async fn status(&self) -> Value {
        let children_wait = Duration::from_millis(self.config.supervision.status_children_wait_ms);
        let actors = Listed { actors: supervise::children(&self.root, children_wait).await, waited: children_wait };
        let dropped = self.events_dropped.load(std::sync::atomic::Ordering::Relaxed);
        let mut doc = status(&self.config, &self.log, &self.replicator, self.started, self.mode(), actors, dropped);
        decisions_status(&mut doc, &self.decider, &self.escalations, &self.reports);
        doc["security"] = self.security.clone();
        doc
    }

    /// Cross-tier decisions: serving, routing and estimates.
    pub fn decider(&self) -> &Arc<decide::Decider> {
        &self.decider
    }

    /// The root supervisor (to ask for its children, or for tests).
    pub fn root(&self) -> &ActorRef<SupervisorMsg> {
        &self.root
    }

    /// Resolves with the reason once the node cannot go on: the root supervisor gave up
    /// (restart intensity exceeded, or it panicked; the incident is already on the `events`
    /// stream), or a part of the node such as the escalation desk stopped. The caller should
    /// [`Node::shutdown`] and exit non-zero.
    pub async fn failed(&self) -> String {
        let mut fatal = self.fatal.clone();
        let reason = match fatal.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Orderly shutdown: stop the node's tasks and routing, stop the actors (each finishes its handler and commits
    /// its cursor, or is killed after `child_shutdown_timeout_ms`), write the last events,
    /// hand this node's records over to the tiers it reaches (at most
    /// `replication.shutdown_handover_ms`), then flush and close the log.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        self.decider.stop();
        let per_child = Duration::from_millis(self.config.supervision.child_shutdown_timeout_ms);
        let all = per_child.saturating_mul(self.config.actors.len() as u32 + 1);
        supervise::shutdown(&self.root, all).await;
        if let Some(done) = self.root_done.take() {
            let _ = tokio::time::timeout(all, done).await;
        }
        // The actors are gone: the events task appends what is queued and ends.
        if let Some(finish) = self.events_finish.take() {
            let _ = finish.send(());
        }
        if let Some(mut events) = self.events_task.take() {
            let drain_wait = Duration::from_millis(self.config.supervision.events_drain_wait_ms);
            if tokio::time::timeout(drain_wait, &mut events).await.is_err() {
                // Ended here: it must not go on appending while replication stops and the log
                // closes (each of its appends would fail and be logged as an error).
                events.abort();
                tracing::warn!(waited_ms = drain_wait.as_millis() as u64, "the last events were not all appended before stopping");
            }
        }
        // Replication stops last: the actors' and the events' last records are published and
        // handed over while this node can still answer replays for them.
        self.replicator.stop().await;
        self.transport.close().await;
        let log = self.log.clone();
        // Closing joins the committer thread: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!(node = %self.config.node.id, "node stopped");
    }
}

/// A task that ends with its handle: dropped (its owner aborted), it is aborted too.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `part` of the node (the escalation desk) in a task of its own. If it ends or panics,
/// the node fails with the reason ([`Node::failed`]), as when the root supervisor gives up:
/// otherwise the node would go on without it (escalations would never time out to the safe
/// default) and only a log line would say so. Dropping (aborting) this future aborts it.
async fn fail_node_if_it_ends(what: &'static str, part: impl std::future::Future<Output = String> + Send + 'static, fatal: Arc<watch::Sender<Option<String>>>) {
    let mut task = AbortOnDrop(tokio::spawn(part));
    let why = match (&mut task.0).await {
        Ok(why) => why,
        Err(e) if e.is_panic() => e.to_string(),
        Err(_) => return,
    };
    tracing::error!(part = what, reason = why, "a part of the node stopped; the node fails");
    fatal.send_replace(Some(format!("{what} stopped: {why}")));
}

/// Watches the other tiers catch up after a recovery, looking every `every` at how many
/// records they still miss (`short_of`): a `caught_up` event once that is 0, a `catch_up_slow`
/// event if it is not after `watch`. Both give the records missed at the start and the time.
async fn watch_catch_up(short_of: impl Fn() -> u64, watch: Duration, every: Duration) -> Value {
    let start = tokio::time::Instant::now();
    let records = short_of();
    loop {
        let after_ms = start.elapsed().as_millis() as u64;
        if short_of() == 0 {
            return json!({"event": "caught_up", "records": records, "after_ms": after_ms});
        }
        if start.elapsed() > watch {
            return json!({"event": "catch_up_slow", "records": records, "after_ms": after_ms});
        }
        tokio::time::sleep(every).await;
    }
}

/// Records of this node's own streams that some acknowledging tier does not hold yet (per
/// stream, the largest gap over the tiers that acknowledge it).
fn behind(replicator: &Replicator) -> u64 {
    replicator.short_of(&replicator.own_watermarks(), false)
}

/// The bounded queue in front of the `events` stream: never blocks; counts what it drops.
#[derive(Clone)]
struct EventQueue {
    tx: mpsc::Sender<Value>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl EventQueue {
    fn push(&self, event: Value) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Appends node events (supervision, mode changes) to the `events` stream until every
/// sender is gone, or `finish` fires: then what is already queued is appended and it ends.
async fn append_events(config: NodeConfig, replicator: Arc<Replicator>, mut events: mpsc::Receiver<Value>, mut finish: tokio::sync::oneshot::Receiver<()>) {
    let stream = StreamName::new(EVENTS_STREAM).expect("valid stream name");
    let payload_type = PayloadType::new(EVENT_TYPE).expect("valid payload type");
    let append = |mut doc: Value| {
        doc["node"] = json!(config.node.id.as_str());
        doc["at_unix_ms"] = json!(unix_ms());
        let draft = Draft::new(Kind::Event, payload_type.clone(), doc.to_string().into_bytes());
        let (replicator, stream) = (replicator.clone(), stream.clone());
        async move {
            if let Err(e) = replicator.append(stream, draft).await {
                tracing::error!(error = %e, "cannot append an event to the events stream");
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(event) => append(event).await,
                None => return,
            },
            _ = &mut finish => break,
        }
    }
    while let Ok(event) = events.try_recv() {
        append(event).await;
    }
}

fn decisions_status(doc: &mut Value, decider: &decide::Decider, escalations: &std::sync::Mutex<Value>, reports: &crate::actor::Reports) {
    doc["reports"] = json!(*reports.lock().unwrap_or_else(|p| p.into_inner()));
    doc["decisions"] = serde_json::to_value(decider.counters()).expect("counters serialise");
    doc["estimates"] = decider.estimates();
    doc["escalations_pending"] = escalations.lock().unwrap_or_else(|p| p.into_inner()).clone();
}

/// The root supervisor's list of actors for a status document, or `None` if it did not answer
/// within `waited` (`supervision.status_children_wait_ms`).
struct Listed {
    actors: Option<Vec<supervise::ChildInfo>>,
    waited: Duration,
}

fn status(config: &NodeConfig, log: &Log, replicator: &Replicator, started: Instant, mode: Mode, listed: Listed, events_dropped: u64) -> Value {
    let acks = replicator.acks();
    let holders = replicator.holders();
    let streams: Vec<Value> = log
        .streams()
        .into_iter()
        .map(|i| {
            let key = i.key();
            let peers: serde_json::Map<String, Value> = holders
                .get(&key)
                .map(|h| h.iter().map(|(n, wm)| (n.to_string(), json!({"watermark": wm, "lag": i.watermark.saturating_sub(*wm)}))).collect())
                .unwrap_or_default();
            let acked: serde_json::Map<String, Value> =
                acks.get(&key).map(|a| a.iter().map(|(t, wm)| (t.to_string(), json!(wm))).collect()).unwrap_or_default();
            json!({
                "origin": i.origin.as_str(), "incarnation": i.incarnation.to_string(), "stream": i.stream.as_str(),
                "local": i.local, "own": i.own, "first": i.first, "last": i.last, "count": i.count, "bytes": i.bytes,
                "watermark": i.watermark, "missing": i.missing, "expired": i.expired, "acked": acked, "peers": peers,
            })
        })
        .collect();
    let presence: serde_json::Map<String, Value> =
        replicator.presence().into_iter().map(|(n, p)| (n.to_string(), serde_json::to_value(p).expect("presence serialises"))).collect();
    let mut doc = json!({
        "node": config.node.id.as_str(),
        "tier": config.node.tier,
        "incarnation": log.incarnation().to_string(),
        "uptime_ms": started.elapsed().as_millis() as u64,
        "mode": mode,
        "actors": listed.actors,
        "events_dropped": events_dropped,
        "streams": streams,
        "liveliness": presence,
        "replication": replicator.counters(),
    });
    if doc["actors"].is_null() {
        // Not "no actors": the supervisor did not say (busy, or stuck), which is worth seeing.
        doc["actors_unlisted_after_ms"] = json!(listed.waited.as_millis() as u64);
    }
    doc
}

/// `strata status`: one row per node: tier, mode, uptime, actors as `name:state/restarts`, streams,
/// decisions taken by each tier (`cloud/fog/edge`, with the share of deadlines met), escalations
/// waiting for an operator, and two lags in records: `unacked`, per tier, how far that tier's acknowledgement is behind
/// this node's own streams; `behind`, per origin, how far this node's copy is behind what the
/// origin holds (the largest over the streams).
pub fn status_table(docs: &[Value]) -> String {
    let or_dash = |m: std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.into_iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
        }
    };
    let rows: Vec<Vec<String>> = docs
        .iter()
        .map(|d| {
            let actors: Vec<String> = d["actors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| format!("{}:{}/{}", a["name"].as_str().unwrap_or("?"), a["state"].as_str().unwrap_or("?"), a["restarts"]))
                .collect();
            let mut unacked: std::collections::BTreeMap<String, u64> = Default::default();
            let mut behind: std::collections::BTreeMap<String, u64> = Default::default();
            let streams = d["streams"].as_array().map_or(&[][..], |v| v.as_slice());
            for s in streams {
                let watermark = s["watermark"].as_u64().unwrap_or(0);
                // This node's own streams, also of an earlier incarnation.
                if s["own"].as_bool().or(s["local"].as_bool()) == Some(true) {
                    for (tier, acked) in s["acked"].as_object().into_iter().flatten() {
                        let e = unacked.entry(tier.clone()).or_default();
                        *e = (*e).max(watermark.saturating_sub(acked.as_u64().unwrap_or(0)));
                    }
                } else if let Some(origin) = s["origin"].as_str() {
                    let holds = s["peers"][origin]["watermark"].as_u64().unwrap_or(watermark);
                    let e = behind.entry(origin.to_owned()).or_default();
                    *e = (*e).max(holds.saturating_sub(watermark));
                }
            }
            let n = |k: &str| d["decisions"][k].as_u64().unwrap_or(0);
            let decided = n("cloud") + n("fog") + n("edge");
            let decisions = if decided == 0 {
                "-".to_owned()
            } else {
                format!("{}/{}/{} {:.1}%", n("cloud"), n("fog"), n("edge"), 100.0 * n("met") as f64 / (n("met") + n("missed")).max(1) as f64)
            };
            let waiting = d["escalations_pending"].as_array().map_or(0, Vec::len);
            vec![
                d["node"].as_str().unwrap_or("?").to_owned(),
                d["tier"].as_str().unwrap_or("?").to_owned(),
                d["mode"].as_str().unwrap_or("?").to_owned(),
                format!("{:.1}s", d["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1000.0),
                match d["actors_unlisted_after_ms"].as_u64() {
                    Some(ms) => format!("? (no list in {ms} ms)"),
                    None if actors.is_empty() => "-".to_owned(),
                    None => actors.join(" "),
                },
                streams.len().to_string(),
                decisions,
                waiting.to_string(),
                or_dash(unacked),
                or_dash(behind),
            ]
        })
        .collect();
    let mut out = crate::log::show::table(
        &["node", "tier", "mode", "uptime", "actors (state/restarts)", "streams", "decided c/f/e met", "escalations", "unacked", "behind"],
        &rows,
    );
    // Device bridges: one line each, under the table.
    for d in docs {
        for (actor, r) in d["reports"].as_object().into_iter().flatten().filter(|(_, r)| r["bridge"].is_string()) {
            let pairs = |v: &Value| -> Vec<String> { v.as_object().into_iter().flatten().map(|(k, n)| format!("{k}:{n}")).collect() };
            let rejected = pairs(&r["rejected"]);
            out.push_str(&format!(
                "{}/{actor}: {} {} {} (reconnects {}) {}{}\n",
                d["node"].as_str().unwrap_or("?"),
                r["bridge"].as_str().unwrap_or("?"),
                r["peer"].as_str().unwrap_or("?"),
                if r["connected"] == true { "connected" } else { "DISCONNECTED" },
                r["reconnects"],
                pairs(&r["counters"]).join(" "),
                if rejected.is_empty() { String::new() } else { format!(" rejected {}", rejected.join(" ")) },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_shows_actors_unacked_and_behind() {
        let edge = json!({
            "node": "edge-1", "tier": "edge", "mode": "no_cloud", "uptime_ms": 1500,
            "actors": [{"name": "line-3", "state": "running", "restarts": 2}],
            "decisions": {"cloud": 5, "fog": 90, "edge": 5, "met": 99, "missed": 1},
            "escalations_pending": [{"id": "edge-1/decisions@1#7"}],
            "streams": [{"origin": "edge-1", "local": true, "watermark": 10, "acked": {"cloud": 7, "fog": 10}, "peers": {}}],
        });
        let cloud = json!({
            "node": "cloud-1", "tier": "cloud", "uptime_ms": 2000, "actors": [],
            "streams": [
                {"origin": "edge-1", "local": false, "watermark": 8, "acked": {}, "peers": {"edge-1": {"watermark": 10, "lag": 0}}},
                {"origin": "fog-1", "local": false, "watermark": 4, "acked": {}, "peers": {}},
            ],
        });
        let table = status_table(&[edge, cloud]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].starts_with("edge-1") && lines[1].contains("no_cloud  1.5s") && lines[1].contains("line-3:running/2"), "{table}");
        assert!(lines[1].contains("cloud:3 fog:0") && lines[1].trim_end().ends_with('-'), "{table}");
        assert!(lines[1].contains("5/90/5 99.0%       1 "), "decisions per tier, deadlines met, escalations waiting: {table}");
        assert!(lines[2].contains("edge-1:2 fog-1:0"), "{table}");
    }

    /// A part of the node that ends or panics fails the node with the reason; one aborted
    /// with the node's tasks does not, and is itself aborted.
    #[test]
    fn a_part_of_the_node_that_stops_fails_the_node() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let (tx, rx) = watch::channel(None);
            let tx = Arc::new(tx);
            fail_node_if_it_ends("the desk", async { "cannot serve approvals: no session".to_owned() }, tx.clone()).await;
            assert_eq!(rx.borrow().as_deref(), Some("the desk stopped: cannot serve approvals: no session"));
            tx.send_replace(None);
            fail_node_if_it_ends("the desk", async { panic!("boom") }, tx.clone()).await;
            let reason = rx.borrow().clone().unwrap();
            assert!(reason.starts_with("the desk stopped: ") && reason.contains("panicked") && reason.contains("boom"), "{reason}");
            tx.send_replace(None);
            let (held, gone) = tokio::sync::oneshot::channel::<()>();
            let part = async move {
                let _held = held;
                std::future::pending::<String>().await
            };
            let running = tokio::spawn(fail_node_if_it_ends("the desk", part, tx.clone()));
            tokio::task::yield_now().await;
            running.abort();
            assert!(gone.await.is_err(), "aborting the watcher aborts the part");
            assert_eq!(*rx.borrow(), None, "an aborted part does not fail the node");
        });
    }

    /// `modes.catch_up_watch_ms` bounds how long the catch-up after a recovery is watched: a
    /// shortfall that ends within it gives `caught_up`, one that does not gives
    /// `catch_up_slow`, each with the records missed at the start (on a paused clock).
    #[test]
    fn the_catch_up_watch_reports_caught_up_or_slow_by_its_bound() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let (watch, every) = (Duration::from_millis(1000), Duration::from_millis(50));
            // 40 records short, 4 fewer at every look: caught up at the tenth, 9 × 50 ms in.
            let left = std::sync::atomic::AtomicU64::new(44);
            let shrinking = || left.fetch_sub(4, std::sync::atomic::Ordering::Relaxed).saturating_sub(4);
            let event = watch_catch_up(shrinking, watch, every).await;
            assert_eq!(event, json!({"event": "caught_up", "records": 40, "after_ms": 450}));
            let event = watch_catch_up(|| 7, watch, every).await;
            assert_eq!(event["event"], "catch_up_slow", "{event}");
            assert_eq!(event["records"], 7);
            let after_ms = event["after_ms"].as_u64().unwrap();
            assert!((1000..=1050).contains(&after_ms), "reported after the watch's bound and within one look of it: {event}");
            // A shorter watch gives up sooner on the same shortfall.
            let event = watch_catch_up(|| 7, Duration::from_millis(200), every).await;
            assert_eq!((event["event"].as_str(), event["after_ms"].as_u64()), (Some("catch_up_slow"), Some(250)));
        });
    }

    #[test]
    fn status_table_lists_bridges_under_the_nodes() {
        let gateway = json!({
            "node": "gw-1", "tier": "edge", "uptime_ms": 10, "actors": [], "streams": [],
            "reports": {
                "plant": {"bridge": "mqtt", "peer": "mqtt://127.0.0.1:1883", "connected": false, "reconnects": 2,
                          "counters": {"accepted": 10}, "rejected": {"not_json": 1}},
                "other": {"note": "not a bridge"},
            },
        });
        let table = status_table(std::slice::from_ref(&gateway));
        let last = table.lines().last().unwrap();
        assert_eq!(last, "gw-1/plant: mqtt mqtt://127.0.0.1:1883 DISCONNECTED (reconnects 2) accepted:10 rejected not_json:1", "{table}");
        assert_eq!(table.lines().count(), 3, "{table}");
        // A supervisor that did not list its actors in time is shown as unknown, not as none.
        let mut unlisted = gateway;
        unlisted["actors"] = Value::Null;
        unlisted["actors_unlisted_after_ms"] = json!(500);
        let table = status_table(&[unlisted]);
        assert!(table.lines().nth(1).unwrap().contains("? (no list in 500 ms)"), "{table}");
    }
}
