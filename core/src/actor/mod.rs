//! The integrator API: actors that consume streams from the durable log and produce streams.
//!
//! An integrator writes a [`Behaviour`]: how to build its state (possibly from a snapshot),
//! what to do with each input envelope, and optionally what to do on a timer. The runtime
//! ([`Host`], a ractor actor under a [`Supervisor`](crate::supervise::Supervisor)) does the
//! rest:
//!
//! - it feeds the actor its inputs from the log through its cursors, in bounded batches;
//! - after a batch, it writes the outputs the handler emitted **and** the cursor in one atomic
//!   log write, then publishes the outputs: a crashed and restarted actor continues exactly
//!   after the last batch it finished, with no output lost or repeated. The next batch is
//!   handled while that write is made durable (so an fsync does not delay the handler), but
//!   the next write is queued only once the previous one is durable;
//! - a snapshot saved with [`Ctx::save_snapshot`] is written in that same write and handed back
//!   to [`Behaviour::start`] after a restart, so state is rebuilt without replaying history;
//! - its mailbox only ever holds its own poll and timer messages: nothing from the network
//!   reaches it except through the log.
//!
//! Effects outside the log (a device command, an HTTP call) happen at least once: key them by
//! [`Ctx::input_id`] so the receiver can drop repeats.
//!
//! A handler that fails (an error or a panic) fails the actor, and its supervisor restarts it
//! into the same input. One that fails on the same input `supervision.input_failures_max`
//! times in a row (a poison input: a reading it cannot parse, a bug it meets on one value)
//! has that input passed over by the next instance, which records an `input_failed_passed`
//! event naming the record, the failures and the last error; without that, one bad record
//! would restart the actor until its supervisor, and then the node, gave up, and the node
//! would meet it again at every start. An error that is not the input's fault and that a
//! restart should cure is returned as a [`Retry`]: it does not count. Every restart counts
//! towards the node's restart intensity (`supervision.restarts_max` in `restart_window_ms`,
//! shared by all its actors).
//!
//! A kind is registered by name in a [`Registry`], so a config can say
//! `[[actors]] kind = "threshold" name = "..." inputs = [...] params = {...}`.
//!
//! # Example: a threshold alarm
//!
//! ```no_run
//! use strata_core::actor::{ActorError, Behaviour, Ctx, Registry};
//! use strata_core::config::ActorSpec;
//! use strata_core::log::Draft;
//! use strata_core::{Envelope, Kind, PayloadType, StreamName};
//!
//! /// Emits an alarm on `outputs[0]` when a reading's value exceeds `limit`.
//! struct Threshold {
//!     limit: f64,
//!     alarms: StreamName,
//! }
//!
//! impl Behaviour for Threshold {
//!     /// How many alarms so far (kept in a snapshot).
//!     type State = u64;
//!
//!     async fn start(&self, ctx: &mut Ctx) -> Result<u64, ActorError> {
//!         Ok(ctx.snapshot().map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())))
//!     }
//!
//!     async fn handle(&self, ctx: &mut Ctx, alarms: &mut u64, input: &Envelope) -> Result<(), ActorError> {
//!         let reading: serde_json::Value = serde_json::from_slice(&input.payload)?;
//!         if reading["value"].as_f64().is_some_and(|v| v > self.limit) {
//!             *alarms += 1;
//!             let alarm = serde_json::json!({ "reading": input.id.to_string(), "alarms": *alarms });
//!             let draft = Draft::new(Kind::Event, PayloadType::new("example.alarm/1")?, alarm.to_string().into_bytes());
//!             ctx.emit(&self.alarms, draft)?;
//!             ctx.save_snapshot(alarms.to_le_bytes().to_vec());
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn register(registry: &mut Registry) {
//!     // Called at `strata check` and at every (re)start: bad params fail early and clearly.
//!     registry.register("threshold", |spec: &ActorSpec| -> Result<Threshold, String> {
//!         let limit = spec.params.get("limit").and_then(|v| v.as_float()).ok_or("limit: a number is required")?;
//!         let alarms = spec.outputs.first().cloned().ok_or("outputs: one stream for the alarms is required")?;
//!         Ok(Threshold { limit, alarms })
//!     });
//! }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};

use crate::config::{ActorSpec, Name, NodeConfig, StreamRef};
use crate::log::{Draft, Log, LogError, StreamKey};
use crate::mode::Mode;
use crate::model::{Envelope, EnvelopeId, Kind, NodeId, PayloadType, StreamName};
use crate::supervise::ChildSpec;

/// What a handler may fail with; the actor then fails and its supervisor decides.
pub type ActorError = Box<dyn std::error::Error + Send + Sync>;

/// A handler error that is not the input's fault and that a restart should cure (a
/// connection task that ended, a client that cannot take a message now): it fails the actor
/// like any error, but does not count towards passing the input over
/// (`supervision.input_failures_max`). `Err(Retry("...".into()).into())`.
#[derive(Debug)]
pub struct Retry(pub String);

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Retry {}

/// An actor's behaviour. Implementations are built per (re)start by their kind's factory.
pub trait Behaviour: Send + Sync + Sized + 'static {
    type State: Send + 'static;

    /// Builds the state, from [`Ctx::snapshot`] if the actor saved one.
    fn start(&self, ctx: &mut Ctx) -> impl Future<Output = Result<Self::State, ActorError>> + Send;

    /// Handles one input envelope. Outputs go through [`Ctx::emit`]. Failing (or panicking)
    /// restarts the actor into the same input; after `supervision.input_failures_max` failures
    /// on it, that input is passed over (see the module's docs).
    fn handle(&self, ctx: &mut Ctx, state: &mut Self::State, input: &Envelope) -> impl Future<Output = Result<(), ActorError>> + Send;

    /// Called every [`Behaviour::tick_interval`], for sources (sensors) and timers.
    fn tick(&self, _ctx: &mut Ctx, _state: &mut Self::State) -> impl Future<Output = Result<(), ActorError>> + Send {
        async { Ok(()) }
    }

    fn tick_interval(&self) -> Option<Duration> {
        None
    }
}

/// Publishes envelopes appended by actors (the node's replicator).
pub type Publish = Arc<dyn Fn(&Envelope) + Send + Sync>;

/// Appends a JSON event to the node's `events` stream (bounded queue; never blocks).
pub type NodeEvents = Arc<dyn Fn(serde_json::Value) + Send + Sync>;

/// What actors report about themselves in `strata status` (`reports`, by actor name): a
/// bridge's connection state and rejection counters, for example.
pub type Reports = Arc<std::sync::Mutex<BTreeMap<String, serde_json::Value>>>;

/// An owned handle for an actor's own tasks that take data in from outside the node (a
/// bridge's connection, a device poller): they append to the actor's outputs directly, each
/// append durable before it returns, and report status and events. See [`Ctx::source`].
#[derive(Clone)]
pub struct Source {
    name: Name,
    log: Log,
    publish: Publish,
    outputs: Vec<StreamName>,
    events: Option<NodeEvents>,
    reports: Reports,
}

impl Source {
    /// Appends `draft` to `stream` (one of the actor's outputs) and returns once it is durable
    /// (then it is also published): only then may the data be acknowledged to its sender.
    /// Concurrent appends share a group commit.
    pub async fn append(&self, stream: &StreamName, draft: Draft) -> Result<Envelope, ActorError> {
        if !self.outputs.contains(stream) {
            return Err(format!("actor {}: {stream:?} is not one of its outputs {:?}", self.name, self.outputs).into());
        }
        let envelope = self.log.append_durable(stream.clone(), draft).await?;
        (self.publish)(&envelope);
        Ok(envelope)
    }

    /// Records `doc` (a JSON object; `"actor"` is added) on the node's `events` stream.
    pub fn event(&self, mut doc: serde_json::Value) {
        if let (Some(events), serde_json::Value::Object(map)) = (&self.events, &mut doc) {
            map.insert("actor".into(), serde_json::Value::String(self.name.to_string()));
            events(doc);
        }
    }

    /// Sets what `strata status` shows for this actor (under `reports.<actor name>`).
    pub fn report(&self, doc: serde_json::Value) {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).insert(self.name.to_string(), doc);
    }

    pub fn log(&self) -> &Log {
        &self.log
    }
}

/// What the runtime gives an actor.
pub struct Ctx {
    node: NodeId,
    name: Name,
    config: Arc<NodeConfig>,
    mode: tokio::sync::watch::Receiver<Mode>,
    decider: Option<Arc<crate::node::decide::Decider>>,
    log: Log,
    outputs: Vec<StreamName>,
    emitted: Vec<(StreamName, Draft)>,
    snapshot: Option<Vec<u8>>,
    save: Option<Vec<u8>>,
    input: Option<EnvelopeId>,
    publish: Publish,
    events: Option<NodeEvents>,
    reports: Reports,
}

impl Ctx {
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The node's whole config (tier, routing, autonomy bounds, ...).
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The node's current degraded mode (its autonomy bounds are `config().autonomy`).
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Cross-tier decisions: serve a capability to other nodes, or have a decision taken by
    /// the tier that can still meet its deadline ([`Decider::decide`](crate::node::decide::Decider::decide)).
    /// `None` outside a node (then every decision is local).
    pub fn decider(&self) -> Option<&Arc<crate::node::decide::Decider>> {
        self.decider.as_ref()
    }

    /// Read access to the log (this node's and its replicas' streams).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The id of the input being handled: the idempotency key of its effects.
    pub fn input_id(&self) -> Option<&EnvelopeId> {
        self.input.as_ref()
    }

    /// Queues `draft` for the output stream `stream` (one of the actor's `outputs`). It is
    /// appended with the batch's cursor, atomically, after the handler returns. A payload over
    /// `log.payload_bytes_max` is refused here, as the handler's error: the log would refuse
    /// the whole write, and the actor would fail on it at every restart without the input
    /// ever being passed over.
    pub fn emit(&mut self, stream: &StreamName, mut draft: Draft) -> Result<(), ActorError> {
        if !self.outputs.contains(stream) {
            return Err(format!("actor {}: {stream:?} is not one of its outputs {:?}", self.name, self.outputs).into());
        }
        let max = self.log.payload_bytes_max();
        if draft.payload.len() > max {
            return Err(format!("actor {}: an output of {} bytes for {stream} is over log.payload_bytes_max {max}", self.name, draft.payload.len()).into());
        }
        if let Some(input) = &self.input {
            // Trace: the output names its cause.
            draft.trace.parent.get_or_insert(input.seq.get());
        }
        self.emitted.push((stream.clone(), draft));
        Ok(())
    }

    /// A handle for the actor's own tasks that take data in from outside (see [`Source`]).
    pub fn source(&self) -> Source {
        Source {
            name: self.name.clone(),
            log: self.log.clone(),
            publish: self.publish.clone(),
            outputs: self.outputs.clone(),
            events: self.events.clone(),
            reports: self.reports.clone(),
        }
    }

    /// The snapshot saved before the last restart, in [`Behaviour::start`].
    pub fn snapshot(&self) -> Option<&[u8]> {
        self.snapshot.as_deref()
    }

    /// Saves a snapshot of the state, written with the next commit (the latest one wins).
    pub fn save_snapshot(&mut self, bytes: Vec<u8>) {
        self.save = Some(bytes);
    }
}

/// The stream holding an actor's snapshots.
pub fn snapshot_stream(actor: &Name) -> StreamName {
    StreamName::new(format!("{}{actor}", crate::log::SNAPSHOTS_PREFIX)).expect("actor names are valid stream segments")
}

const SNAPSHOT_TYPE: &str = "strata.snapshot/1";

/// Arguments of a [`Host`].
pub struct HostArgs<B> {
    pub behaviour: B,
    pub spec: ActorSpec,
    pub config: Arc<NodeConfig>,
    pub mode: tokio::sync::watch::Receiver<Mode>,
    pub log: Log,
    pub publish: Publish,
    pub decider: Option<Arc<crate::node::decide::Decider>>,
    pub events: Option<NodeEvents>,
    pub reports: Reports,
    /// Kept by the child spec across the actor's restarts.
    pub failures: InputFailures,
}

/// The input record an actor's handler last failed on and how many times in a row, kept by
/// its child spec across restarts: a record that fails it `supervision.input_failures_max`
/// times is passed over by the next instance. One record at a time: a failure on another
/// record starts the count again.
#[derive(Clone, Default)]
pub struct InputFailures(Arc<FailuresInner>);

#[derive(Default)]
struct FailuresInner {
    /// Whether `failing` holds a record: read for every record handled, so that the usual
    /// case (nothing failing) takes no lock. One actor instance at a time uses it.
    any: std::sync::atomic::AtomicBool,
    failing: std::sync::Mutex<Option<Failing>>,
}

struct Failing {
    key: StreamKey,
    seq: u64,
    failures: u32,
    since: Instant,
    error: String,
}

impl InputFailures {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Failing>> {
        self.0.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn any(&self) -> bool {
        self.0.any.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The handler failed on `key`'s record `seq` with `error`.
    fn failed(&self, key: &StreamKey, seq: u64, error: String) {
        let mut failing = self.lock();
        match failing.as_mut() {
            Some(f) if f.key == *key && f.seq == seq => {
                f.failures = f.failures.saturating_add(1);
                f.error = error;
            }
            _ => *failing = Some(Failing { key: key.clone(), seq, failures: 1, since: Instant::now(), error }),
        }
        self.0.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The handler took `key`'s record `seq`, or it was passed over: its failures are over.
    fn clear(&self, key: &StreamKey, seq: u64) {
        if !self.any() {
            return;
        }
        let mut failing = self.lock();
        if failing.as_ref().is_some_and(|f| f.key == *key && f.seq == seq) {
            *failing = None;
            self.0.any.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// If the handler failed on `key`'s record `seq` at least `max` times (0: never), those
    /// failures, how long since the first, and the last error.
    fn to_pass(&self, key: &StreamKey, seq: u64, max: u32) -> Option<(u32, Duration, String)> {
        if max == 0 || !self.any() {
            return None;
        }
        let failing = self.lock();
        let f = failing.as_ref().filter(|f| max > 0 && f.key == *key && f.seq == seq && f.failures >= max)?;
        Some((f.failures, f.since.elapsed(), f.error.clone()))
    }
}

/// The text of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str)).unwrap_or("(a payload that is not text)")
}

pub enum HostMsg {
    Poll,
    Tick,
}

pub struct HostState<B: Behaviour> {
    behaviour: B,
    state: B::State,
    ctx: Ctx,
    inputs: Vec<StreamRef>,
    publish: Publish,
    /// The last write queued and not yet known durable (its task publishes it once durable).
    in_flight: Option<tokio::task::JoinHandle<Result<(), crate::log::LogError>>>,
    /// Per input, the last seq handled and queued for commit (ahead of the durable cursor
    /// while a write is in flight).
    handled_to: BTreeMap<StreamKey, u64>,
    /// Per received input waiting at a gap: the gap and since when.
    at_gap: BTreeMap<StreamKey, (RangeInclusive<u64>, Instant)>,
    /// Per input waiting at records it cannot read: those seqs and since when.
    at_damage: BTreeMap<StreamKey, (RangeInclusive<u64>, Instant)>,
    /// Per input, the last seq of the damaged records it just passed over: damage right
    /// after them (a region longer than one look) is passed without a new wait.
    passed_damage: BTreeMap<StreamKey, u64>,
    /// The input the handler last failed on, across restarts.
    failures: InputFailures,
}

/// Runs one [`Behaviour`] as a ractor actor.
pub struct Host<B>(std::marker::PhantomData<fn() -> B>);

impl<B> Default for Host<B> {
    fn default() -> Self {
        Host(std::marker::PhantomData)
    }
}

impl<B: Behaviour> HostState<B> {
    /// The input streams, resolved to keys: every incarnation of each referenced stream.
    fn input_keys(&self) -> Vec<StreamKey> {
        let log = &self.ctx.log;
        let mut keys = Vec::new();
        for input in &self.inputs {
            match &input.origin {
                // Its own stream in every incarnation, oldest first: what an earlier one held
                // and the actor had not handled yet is still to be handled. Earlier ones it
                // never held are left out (no cursor is kept for them).
                Some(origin) if origin != log.node() => {
                    keys.extend(log.streams().into_iter().filter(|i| &i.origin == origin && i.stream == input.stream).map(|i| i.key()))
                }
                _ => {
                    let own = log.own_keys(&input.stream);
                    let current = own.len() - 1;
                    keys.extend(own.into_iter().enumerate().filter(|(n, key)| *n == current || log.stream(key).is_some()).map(|(_, key)| key));
                }
            }
        }
        keys
    }

    /// Queues emitted outputs, the snapshot and `cursors` as one atomic write. It is not
    /// awaited here: the next batch is handled while it is made durable (an fsync must not
    /// delay decisions). The next write is queued only after this one is durable, and its
    /// outputs are published as soon as it is durable.
    async fn commit(&mut self, cursors: Vec<(StreamKey, u64)>) -> Result<(), ActorError> {
        let mut outputs = std::mem::take(&mut self.ctx.emitted);
        if let Some(bytes) = self.ctx.save.take() {
            let draft = Draft::new(Kind::Event, PayloadType::new(SNAPSHOT_TYPE).expect("valid"), bytes);
            outputs.push((snapshot_stream(&self.ctx.name), draft));
        }
        if outputs.is_empty() && cursors.is_empty() {
            return Ok(());
        }
        // A failed write must stop the actor before anything after it is written.
        self.settle().await?;
        for (key, seq) in &cursors {
            self.handled_to.insert(key.clone(), *seq);
        }
        let ticket = self.ctx.log.commit_atomically_queued(outputs, &self.ctx.name, cursors).await?;
        // Published as soon as durable, not when the next batch settles it.
        let publish = self.publish.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let appended = ticket.await?;
            for envelope in &appended {
                if !envelope.id.stream.as_str().starts_with(crate::log::SNAPSHOTS_PREFIX) {
                    publish(envelope);
                }
            }
            Ok(())
        }));
        Ok(())
    }

    /// Waits until the queued write (if any) is durable and published.
    async fn settle(&mut self) -> Result<(), ActorError> {
        let Some(task) = self.in_flight.take() else { return Ok(()) };
        match task.await {
            Ok(result) => result.map_err(Into::into),
            Err(e) => Err(format!("the write of actor {} was lost: {e}", self.ctx.name).into()),
        }
    }

    /// The input `key`, its cursor at `cursor`, has nothing to read: if that is because of a
    /// gap, waits for it (`replication.consumer_gap_wait_ms`, measured across polls) and then
    /// moves the cursor past it, recording what was passed over. Returns whether it moved.
    async fn pass_gap_if_waited(&mut self, key: &StreamKey, cursor: u64) -> Result<bool, ActorError> {
        let Some(gap) = self.ctx.log.next_gap(key, cursor + 1) else {
            self.at_gap.remove(key);
            return Ok(false);
        };
        // Records may have arrived since the read, with a new gap past them: then the actor is
        // not at that gap yet. Below the first gap every seq is held or was removed by
        // retention, and nothing new can arrive there (a held record can still be removed,
        // and is then counted as expired), so this look is not overtaken.
        if !self.ctx.log.read_in_order(key, cursor + 1, 1)?.is_empty() {
            self.at_gap.remove(key);
            return Ok(false);
        }
        // Any change of the gap (replay brought some of it, at either end) restarts the wait.
        let now = Instant::now();
        let since = match self.at_gap.get(key) {
            Some((seen, since)) if *seen == gap => *since,
            _ => {
                self.at_gap.insert(key.clone(), (gap.clone(), now));
                now
            }
        };
        let waited = now.duration_since(since);
        if waited < Duration::from_millis(self.ctx.config.replication.consumer_gap_wait_ms) {
            return Ok(false);
        }
        // Looked at again just before passing: what replay brought meanwhile restarts the wait
        // (a record arriving between this look and the commit is still passed over).
        if self.ctx.log.next_gap(key, cursor + 1).as_ref() != Some(&gap) {
            self.at_gap.remove(key);
            return Ok(false);
        }
        self.at_gap.remove(key);
        self.commit(vec![(key.clone(), *gap.end())]).await?;
        let passed = format!("{}..={}", gap.start(), gap.end());
        tracing::warn!(actor = %self.ctx.name, stream = %key, %passed, "replay brought none of these records in time; the actor goes on after them");
        self.record_passed("input_gap_passed", key, &gap, waited, serde_json::json!({}));
        Ok(true)
    }

    /// Records, as a node event, that the cursor of `key` went past `passed` without handling
    /// those records (`event`, after `waited`, with the fields of `extra`).
    fn record_passed(&self, event: &str, key: &StreamKey, passed: &RangeInclusive<u64>, waited: Duration, extra: serde_json::Value) {
        let Some(events) = &self.ctx.events else { return };
        let mut doc = serde_json::json!({
            "event": event,
            "actor": self.ctx.name.to_string(),
            "stream": key.to_string(),
            "from": passed.start(),
            "to": passed.end(),
            "waited_ms": waited.as_millis() as u64,
        });
        if let (Some(doc), serde_json::Value::Object(extra)) = (doc.as_object_mut(), extra) {
            doc.extend(extra);
        }
        events(doc);
    }

    /// When reading `key` from `from` failed with `error` because the records there are
    /// damaged for good: the last seq to pass over ([`Log::damaged_to`], at most
    /// `supervision.input_batch_len_max` seqs per poll). Otherwise (any other error) `None`.
    /// The range found is reused while the same failure lasts.
    fn damaged_from(&self, key: &StreamKey, from: u64, error: &LogError, reuse: bool) -> Result<Option<u64>, ActorError> {
        if let Some((damaged, _)) = self.at_damage.get(key).filter(|(d, _)| reuse && *d.start() == from) {
            if matches!(error, LogError::CorruptRecord { .. } | LogError::Corrupt { .. }) {
                return Ok(Some(*damaged.end()));
            }
        }
        Ok(self.ctx.log.damaged_to(key, from, error, self.ctx.config.supervision.input_batch_len_max as u64)?)
    }

    /// Input `key` cannot be read at `damaged` (records RocksDB or the decoder fails on):
    /// after the same failure for `replication.consumer_gap_wait_ms` (a fault that goes away,
    /// a read error of a moment, is waited out), moves the cursor past them. Waiting longer
    /// would not repair them (the local copy is the damaged one, and replication counts them
    /// as present), and failing would restart the actor into the same read for good.
    /// Recorded as an `input_damaged_passed` event and an error line. Returns whether it moved.
    async fn pass_damaged_if_waited(&mut self, key: &StreamKey, damaged: RangeInclusive<u64>, error: &LogError) -> Result<bool, ActorError> {
        let now = Instant::now();
        let since = match self.at_damage.get(key) {
            Some((seen, since)) if *seen == damaged => *since,
            _ => {
                tracing::error!(actor = %self.ctx.name, stream = %key, seqs = ?damaged, %error, "input records cannot be read; the actor goes on after them unless this clears");
                self.at_damage.insert(key.clone(), (damaged.clone(), now));
                now
            }
        };
        let waited = now.duration_since(since);
        // Right after damage just passed over (a region longer than one look): no new wait.
        // A record that does not decode right there counts as such too.
        let continues = self.passed_damage.get(key).is_some_and(|&end| end.checked_add(1) == Some(*damaged.start()));
        if waited < Duration::from_millis(self.ctx.config.replication.consumer_gap_wait_ms) && !continues {
            return Ok(false);
        }
        // Looked at again before passing: if the damage changed while waiting (part of it
        // reads again), the wait starts over for what it is now.
        if !continues && self.damaged_from(key, *damaged.start(), error, false)? != Some(*damaged.end()) {
            self.at_damage.remove(key);
            return Ok(false);
        }
        self.at_damage.remove(key);
        self.passed_damage.insert(key.clone(), *damaged.end());
        self.at_gap.remove(key);
        self.commit(vec![(key.clone(), *damaged.end())]).await?;
        let passed = format!("{}..={}", damaged.start(), damaged.end());
        tracing::error!(actor = %self.ctx.name, stream = %key, %passed, %error, "input records cannot be read; the actor went on after them");
        self.record_passed("input_damaged_passed", key, &damaged, waited, serde_json::json!({"error": error.to_string()}));
        Ok(true)
    }

    /// One pass over the inputs; returns how many records were handled.
    async fn poll(&mut self) -> Result<usize, ActorError> {
        let mut handled = 0;
        for key in self.input_keys() {
            let durable = match self.ctx.log.cursor(&self.ctx.name, &key) {
                Some(c) => c,
                None => self.ctx.log.register_consumer(&self.ctx.name, &key).await?,
            };
            // Past what is durable: the batches whose write is still queued.
            let cursor = durable.max(self.handled_to.get(&key).copied().unwrap_or(0));
            // In order, up to the next gap: a received record past a gap waits for replay to
            // fill it, so the cursor never passes a record not yet handled.
            let batch_len = self.ctx.config.supervision.input_batch_len_max;
            let read = match self.ctx.log.read_in_order(&key, cursor + 1, batch_len) {
                // RocksDB fails the whole read at a damaged block, maybe past good records:
                // one at a time, those are handled first.
                Err(LogError::Corrupt { .. }) if batch_len > 1 => self.ctx.log.read_in_order(&key, cursor + 1, 1),
                read => read,
            };
            let batch = match read {
                Ok(batch) => batch,
                Err(e) => {
                    let Some(to) = self.damaged_from(&key, cursor + 1, &e, true)? else { return Err(e.into()) };
                    if self.pass_damaged_if_waited(&key, cursor + 1..=to, &e).await? {
                        handled += 1;
                    }
                    continue;
                }
            };
            self.at_damage.remove(&key);
            self.passed_damage.remove(&key);
            if batch.is_empty() {
                if self.pass_gap_if_waited(&key, cursor).await? {
                    handled += 1;
                }
                continue;
            }
            self.at_gap.remove(&key);
            // Above restarts_max, the supervisor would give up before the pass.
            let sv = &self.ctx.config.supervision;
            let failures_max = sv.input_failures_max.min(sv.restarts_max);
            let mut last = cursor;
            let mut passed = None;
            for envelope in &batch {
                let seq = envelope.id.seq.get();
                last = seq;
                handled += 1;
                if let Some(failed) = self.failures.to_pass(&key, seq, failures_max) {
                    // The batch ends here, so the pass is written before anything after it is
                    // handled: a failure further on must not bring this input back (the count
                    // follows only the last input failed on).
                    passed = Some((seq, failed));
                    break;
                }
                self.ctx.input = Some(envelope.id.clone());
                let attempt = std::panic::AssertUnwindSafe(self.behaviour.handle(&mut self.ctx, &mut self.state, envelope));
                match futures::FutureExt::catch_unwind(attempt).await {
                    Ok(Ok(())) => self.failures.clear(&key, seq),
                    Ok(Err(e)) => {
                        if e.downcast_ref::<Retry>().is_none() {
                            self.failures.failed(&key, seq, e.to_string());
                        }
                        return Err(e);
                    }
                    // Counted, then the panic goes on to fail the actor as before.
                    Err(panic) => {
                        self.failures.failed(&key, seq, format!("panicked: {}", panic_text(panic.as_ref())));
                        std::panic::resume_unwind(panic);
                    }
                }
            }
            self.ctx.input = None;
            self.commit(vec![(key.clone(), last)]).await?;
            if let Some((seq, (failures, waited, error))) = passed {
                // Recorded once the pass is durable: a write that fails leaves the record to be
                // passed again, with its count, and no event claiming it was.
                self.settle().await?;
                self.failures.clear(&key, seq);
                tracing::error!(actor = %self.ctx.name, stream = %key, seq, failures, %error, "the handler failed on this input every time; the actor goes on after it");
                self.record_passed("input_failed_passed", &key, &(seq..=seq), waited, serde_json::json!({"failures": failures, "error": error}));
            }
        }
        Ok(handled)
    }
}

impl<B: Behaviour> Actor for Host<B> {
    type Msg = HostMsg;
    type State = HostState<B>;
    type Arguments = HostArgs<B>;

    async fn pre_start(&self, myself: ActorRef<HostMsg>, args: HostArgs<B>) -> Result<HostState<B>, ActorProcessingErr> {
        let HostArgs { behaviour, spec, config, mode, log, publish, decider, events, reports, failures } = args;
        // A barrier: writes are made durable in queue order, so once this empty write is
        // durable, so is any write a previous instance queued before it failed. Only then
        // are the snapshot and the cursors read: nothing is handled twice.
        log.commit_atomically(Vec::new(), &spec.name, Vec::new()).await?;
        let snapshot = log.latest_own(&snapshot_stream(&spec.name))?.map(|e| e.payload);
        let mut ctx = Ctx {
            node: log.node().clone(),
            name: spec.name.clone(),
            config,
            mode,
            decider,
            log,
            outputs: spec.outputs.clone(),
            emitted: Vec::new(),
            snapshot,
            save: None,
            input: None,
            publish: publish.clone(),
            events,
            reports,
        };
        let state = behaviour.start(&mut ctx).await?;
        ctx.snapshot = None;
        if !spec.inputs.is_empty() {
            myself.send_message(HostMsg::Poll)?;
        }
        if let Some(every) = behaviour.tick_interval() {
            myself.send_after(every, || HostMsg::Tick);
        }
        Ok(HostState {
            behaviour,
            state,
            ctx,
            inputs: spec.inputs,
            publish,
            in_flight: None,
            handled_to: BTreeMap::new(),
            at_gap: BTreeMap::new(),
            at_damage: BTreeMap::new(),
            passed_damage: BTreeMap::new(),
            failures,
        })
    }

    async fn handle(&self, myself: ActorRef<HostMsg>, msg: HostMsg, s: &mut HostState<B>) -> Result<(), ActorProcessingErr> {
        match msg {
            HostMsg::Poll => {
                let mut commits = s.ctx.log.store().commits();
                commits.borrow_and_update();
                if s.poll().await? == 0 {
                    // Nothing new: make the last batch durable and published, then wait
                    // (bounded) for the next write to the log.
                    s.settle().await?;
                    let idle_wait = Duration::from_millis(s.ctx.config.supervision.input_idle_wait_ms);
                    let _ = tokio::time::timeout(idle_wait, commits.changed()).await;
                }
                myself.send_message(HostMsg::Poll)?;
            }
            HostMsg::Tick => {
                s.behaviour.tick(&mut s.ctx, &mut s.state).await?;
                s.commit(Vec::new()).await?;
                if let Some(every) = s.behaviour.tick_interval() {
                    myself.send_after(every, || HostMsg::Tick);
                }
            }
        }
        Ok(())
    }

    /// An orderly stop makes the last batch's write durable (and published) first.
    async fn post_stop(&self, _: ActorRef<HostMsg>, s: &mut HostState<B>) -> Result<(), ActorProcessingErr> {
        s.settle().await?;
        Ok(())
    }
}

/// Where actors of a node run: its log and how to publish.
#[derive(Clone)]
pub struct ActorEnv {
    pub config: Arc<NodeConfig>,
    /// The node's mode, as the mode machine updates it.
    pub mode: tokio::sync::watch::Receiver<Mode>,
    pub log: Log,
    pub publish: Publish,
    /// Cross-tier decisions (none outside a node, e.g. in unit tests: everything is local).
    pub decider: Option<Arc<crate::node::decide::Decider>>,
    /// The node's `events` stream (none outside a node).
    pub events: Option<NodeEvents>,
    pub reports: Reports,
}

impl ActorEnv {
    /// An environment whose mode stays `mode` (for tests and tools without a node).
    pub fn fixed(config: Arc<NodeConfig>, mode: Mode, log: Log, publish: Publish) -> ActorEnv {
        ActorEnv { config, mode: tokio::sync::watch::channel(mode).1, log, publish, decider: None, events: None, reports: Reports::default() }
    }
}

type Factory = Arc<dyn Fn(&ActorSpec, &ActorEnv) -> Result<ChildSpec, String> + Send + Sync>;
type Check = Arc<dyn Fn(&ActorSpec) -> Result<(), String> + Send + Sync>;

/// Actor kinds by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<String, (Check, Factory)>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `kind`: `make` builds the behaviour from a spec (checking its params) at
    /// each start; `strata check` calls it too, so bad params are reported before running.
    pub fn register<B, F, E>(&mut self, kind: &str, make: F)
    where
        B: Behaviour,
        F: Fn(&ActorSpec) -> Result<B, E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let make = Arc::new(make);
        let check_make = make.clone();
        let check: Check = Arc::new(move |spec| check_make(spec).map(|_| ()).map_err(|e| e.to_string()));
        let factory: Factory = Arc::new(move |spec: &ActorSpec, env: &ActorEnv| {
            make(spec).map_err(|e| e.to_string())?;
            let (spec, env, make) = (spec.clone(), env.clone(), make.clone());
            let failures = InputFailures::default();
            Ok(ChildSpec {
                name: spec.name.to_string(),
                restart: spec.restart,
                start: Arc::new(move |parent: ActorCell| {
                    let (spec, env, make, failures) = (spec.clone(), env.clone(), make.clone(), failures.clone());
                    Box::pin(async move {
                        let behaviour = make(&spec).map_err(|e| e.to_string())?;
                        let args = HostArgs {
                            behaviour,
                            spec,
                            config: env.config,
                            mode: env.mode,
                            log: env.log,
                            publish: env.publish,
                            decider: env.decider,
                            events: env.events,
                            reports: env.reports,
                            failures,
                        };
                        Actor::spawn_linked(None, Host::<B>::default(), args, parent).await.map(|(r, _)| r.get_cell()).map_err(|e| e.to_string())
                    })
                }),
            })
        });
        self.kinds.insert(kind.to_owned(), (check, factory));
    }

    pub fn kinds(&self) -> Vec<&str> {
        self.kinds.keys().map(String::as_str).collect()
    }

    /// Checks `spec`: a known kind whose factory accepts its params. The error names the
    /// key (`kind` or `params`) and the problem.
    pub fn check(&self, spec: &ActorSpec) -> Result<(), (&'static str, String)> {
        let Some((check, _)) = self.kinds.get(spec.kind.as_str()) else {
            return Err(("kind", format!("unknown actor kind {:?} (known: {})", spec.kind.as_str(), self.kinds().join(", "))));
        };
        check(spec).map_err(|e| ("params", e))
    }

    /// The child spec that runs `spec` in `env`.
    pub fn child(&self, spec: &ActorSpec, env: &ActorEnv) -> Result<ChildSpec, String> {
        let (_, factory) = self.kinds.get(spec.kind.as_str()).ok_or_else(|| format!("unknown actor kind {:?}", spec.kind.as_str()))?;
        factory(spec, env)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::supervise::{policy::Policy, Supervisor, SupervisorArgs, SupervisorMsg};

    /// Counts its inputs in its snapshot and records each input's payload.
    struct Count(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Behaviour for Count {
        type State = u64;

        async fn start(&self, ctx: &mut Ctx) -> Result<u64, ActorError> {
            Ok(ctx.snapshot().map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes"))))
        }

        async fn handle(&self, ctx: &mut Ctx, count: &mut u64, input: &Envelope) -> Result<(), ActorError> {
            self.0.lock().unwrap().push(input.payload.clone());
            *count += 1;
            ctx.save_snapshot(count.to_le_bytes().to_vec());
            Ok(())
        }
    }

    async fn start(log: &Log, seen: &Arc<Mutex<Vec<Vec<u8>>>>) -> ActorRef<SupervisorMsg> {
        let config = NodeConfig::parse(
            "t.toml".as_ref(),
            "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[zenoh]\nconnect = [\"tcp/127.0.0.1:7448\"]\n[[actors]]\nkind = \"count\"\nname = \"count\"\ninputs = [\"in\"]\n",
        )
        .unwrap();
        let mut registry = Registry::new();
        let s = seen.clone();
        registry.register("count", move |_: &crate::config::ActorSpec| Ok::<_, String>(Count(s.clone())));
        let env = ActorEnv::fixed(Arc::new(config.clone()), Mode::Full, log.clone(), Arc::new(|_| {}));
        let child = registry.child(&config.actors[0], &env).unwrap();
        let policy = Policy {
            strategy: crate::config::Strategy::OneForOne,
            restarts_max: 0,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            jitter_pct: 0,
            child_shutdown_timeout: Duration::from_secs(5),
        };
        let args = SupervisorArgs { name: "root".into(), policy, children: vec![child], events: Arc::new(|_| {}) };
        Actor::spawn(None, Supervisor, args).await.unwrap().0
    }

    async fn wait_for(log: &Log, key: &StreamKey, seq: u64) {
        let (consumer, t0) = (Name::new("count").unwrap(), std::time::Instant::now());
        while log.cursor(&consumer, key).is_none_or(|c| c < seq) {
            assert!(t0.elapsed() < Duration::from_secs(60), "cursor of {key} stuck at {:?}, waiting for {seq}", log.cursor(&consumer, key));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// After the store moved on to a new incarnation (left open under `sync = interval` when
    /// the machine restarted), an actor reading its own node's stream handles what the earlier
    /// incarnation held and it had not handled yet, then the new records, each once, and
    /// starts from the snapshot it saved under the earlier incarnation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_actor_goes_on_across_a_new_incarnation_of_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("edge-1").unwrap();
        let open = |boot: &str| crate::log::tests::open_in_boot(dir.path(), &node, boot);
        let input = StreamName::new("in").unwrap();
        let append = |log: &Log, n: u8| {
            let (log, input) = (log.clone(), input.clone());
            async move { log.append_durable(input, Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), vec![n])).await.unwrap() }
        };
        let seen = Arc::new(Mutex::new(Vec::new()));

        let log = open("boot-1");
        for n in 1..=3 {
            append(&log, n).await;
        }
        let sup = start(&log, &seen).await;
        wait_for(&log, &log.local_key(&input), 3).await;
        crate::supervise::shutdown(&sup, Duration::from_secs(10)).await;
        for n in 4..=5 {
            append(&log, n).await;
        }
        crate::log::tests::crash_committer(&log).await;
        drop(log);

        let log = open("boot-2");
        let old = log.own_keys(&input)[0].clone();
        assert_ne!(old, log.local_key(&input), "a new incarnation");
        append(&log, 6).await;
        let sup = start(&log, &seen).await;
        wait_for(&log, &old, 5).await;
        wait_for(&log, &log.local_key(&input), 1).await;
        crate::supervise::shutdown(&sup, Duration::from_secs(10)).await;
        assert_eq!(*seen.lock().unwrap(), (1..=6).map(|n| vec![n]).collect::<Vec<_>>(), "each once, the earlier incarnation's first");
        let count = log.latest_own(&snapshot_stream(&Name::new("count").unwrap())).unwrap().unwrap().payload;
        assert_eq!(u64::from_le_bytes(count.try_into().unwrap()), 6, "the count went on from the earlier incarnation's snapshot");
    }
}
