//! The escalation desk: escalations wait here for an operator.
//!
//! The desk reads the node's `autonomy.escalations_stream` (the arbiter's escalations, a
//! durable stream) and keeps each one pending until it is resolved:
//!
//! - **approved** or **denied** by an operator: `strata approve <id>` / `strata deny <id>`
//!   send a Zenoh query on `strata/escalation/*` from any machine that reaches the node; the
//!   node holding the escalation answers whether it was resolved;
//! - **timed out** after `autonomy.escalation_timeout_ms` without an answer (measured from the
//!   escalation's own timestamp, so a restart does not reset the wait).
//!
//! Each resolution is appended to `autonomy.resolutions_stream` (by default `decisions`, where
//! the arbiter acts on it: the escalated action if approved, `autonomy.safe_default_action`
//! otherwise) and reported on the `events` stream. The resolution, the desk's cursor and the
//! set of out-of-order resolutions are written in one atomic log write, so after a crash every
//! escalation is resolved exactly once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::actor::{snapshot_stream, Publish};
use crate::bus::Transport;
use crate::config::{Name, NodeConfig};
use crate::log::{Draft, Log, LogError, StreamKey};
use crate::model::{Envelope, Kind, NodeId, PayloadType};

/// Payload type of a resolution on the resolutions stream.
pub const RESOLUTION_TYPE: &str = "strata.resolution/1";
/// The desk's consumer name (cursor and snapshot).
pub const DESK: &str = "escalation-desk";

pub fn resolve_key(node: &NodeId) -> String {
    format!("strata/escalation/{node}")
}

pub const RESOLVE_ALL: &str = "strata/escalation/*";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Deny,
}

/// An operator's answer, as sent by `strata approve` / `strata deny`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// The escalation's id (as in the escalation record).
    pub id: String,
    pub verdict: Verdict,
    /// Who answered (recorded).
    pub by: String,
}

/// The reply of the node that holds the escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub node: String,
    pub id: String,
    /// `approved`, `denied`, `timed_out`, or `displaced` (queue full).
    pub outcome: String,
    pub action: String,
    /// False if it had already been resolved before this answer (the outcome says how).
    pub now: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    id: String,
    action: String,
    risk: f64,
    opened_unix_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// Seqs above the cursor already resolved.
    resolved: BTreeSet<u64>,
}

struct Desk {
    node: NodeId,
    log: Log,
    publish: Publish,
    events: super::decide::EventSink,
    consumer: Name,
    /// The escalations stream this desk reads: this incarnation's, or an earlier one's.
    key: StreamKey,
    /// Where this desk's snapshot is written.
    snapshot: crate::model::StreamName,
    /// An earlier incarnation's desk has read every escalation of its stream (it is frozen).
    drained: bool,
    resolutions: crate::model::StreamName,
    timeout_ms: u64,
    safe_default: String,
    pending_max: usize,
    /// Resolutions remembered after the fact, to answer a late approve with what happened.
    recent_max: usize,
    cursor: u64,
    read_to: u64,
    resolved_above: BTreeSet<u64>,
    pending: BTreeMap<u64, Pending>,
    recent: VecDeque<Resolved>,
    /// How long a read failing on damaged escalation records is retried before they are
    /// taken as escalations that cannot be read (`replication.consumer_gap_wait_ms`).
    damage_wait: Duration,
    /// The damaged seqs the reads fail on, and since when.
    at_damage: Option<(RangeInclusive<u64>, std::time::Instant)>,
    /// The last damaged seq just taken: damage right after it (a region longer than one look,
    /// `autonomy.escalation_batch_len_max` seqs) is taken without a new wait.
    passed_damage: Option<u64>,
    batch_len_max: u64,
}

/// The action of an escalation whose record cannot be read (damaged, or not JSON): unknown,
/// so it cannot be approved, only denied or left to time out to the safe default.
const UNKNOWN_ACTION: &str = "?";

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The stream where the desk of an earlier incarnation's escalations (`incarnation`) keeps
/// its snapshot once the store has moved on to a later one.
fn earlier_snapshot_stream(consumer: &Name, incarnation: crate::model::Incarnation) -> crate::model::StreamName {
    crate::model::StreamName::new(format!("{}/{incarnation}", snapshot_stream(consumer))).expect("valid stream name")
}

impl Desk {
    /// The desk of this incarnation's escalations.
    async fn open(config: &NodeConfig, log: Log, publish: Publish, events: super::decide::EventSink) -> Result<Desk, LogError> {
        let consumer = Name::new(DESK).expect("valid name");
        let key = log.local_key(&config.autonomy.escalations_stream);
        let snapshot = snapshot_stream(&consumer);
        let sources = vec![log.local_key(&snapshot)];
        Desk::open_at(config, log, publish, events, key, snapshot, &sources).await
    }

    /// The desks of the escalations of the store's earlier incarnations (see
    /// [`Log::own_keys`]) not all read and resolved yet, oldest first. The store moved on
    /// after a crash (`sync = interval` or `never`); an escalation waiting then still waits for
    /// an operator, or for its timeout, measured from its own timestamp.
    async fn open_earlier(config: &NodeConfig, log: &Log, publish: &Publish, events: &super::decide::EventSink) -> Result<Vec<Desk>, LogError> {
        let consumer = Name::new(DESK).expect("valid name");
        let keys = log.own_keys(&config.autonomy.escalations_stream);
        let mut desks = Vec::new();
        for key in &keys[..keys.len() - 1] {
            let Some(info) = log.stream(key) else { continue };
            if log.cursor(&consumer, key).unwrap_or(0) >= info.last {
                continue;
            }
            // Its snapshot: written under its own incarnation while that was the current one,
            // then under later ones (the newest wins).
            let snapshot = earlier_snapshot_stream(&consumer, key.incarnation);
            let mut sources: Vec<StreamKey> = log.own_keys(&snapshot).into_iter().filter(|k| k.incarnation != key.incarnation).rev().collect();
            sources.push(StreamKey { stream: snapshot_stream(&consumer), ..key.clone() });
            desks.push(Desk::open_at(config, log.clone(), publish.clone(), events.clone(), key.clone(), snapshot, &sources).await?);
        }
        Ok(desks)
    }

    /// The desk of escalations `key`, its snapshot written to `snapshot_to` and read from the
    /// first of `sources` that holds one.
    async fn open_at(
        config: &NodeConfig,
        log: Log,
        publish: Publish,
        events: super::decide::EventSink,
        key: StreamKey,
        snapshot_to: crate::model::StreamName,
        sources: &[StreamKey],
    ) -> Result<Desk, LogError> {
        let a = &config.autonomy;
        let consumer = Name::new(DESK).expect("valid name");
        let cursor = log.register_consumer(&consumer, &key).await?;
        let held = sources.iter().find_map(|k| log.stream(k).filter(|i| i.last > 0).map(|i| (k, i.last)));
        let snapshot = match held {
            Some((snap_key, last)) => match log.read(snap_key, last, 1) {
                Ok(mut read) => read.pop().map(|e| serde_json::from_slice::<Snapshot>(&e.payload).map_err(|e| e.to_string())).transpose(),
                // Damaged for good: reported below. Anything else (a closed log, an I/O error)
                // fails the start, as before: it may pass, and nothing is resolved twice.
                Err(e @ (LogError::CorruptRecord { .. } | LogError::Corrupt { .. })) => Err(e.to_string()),
                Err(e) => return Err(e),
            },
            None => Ok(None),
        };
        let resolved_above = match snapshot {
            Ok(s) => s.map(|s| s.resolved.into_iter().filter(|&seq| seq > cursor).collect()).unwrap_or_default(),
            // Damaged: the escalations it said were resolved above the cursor (answered out of
            // order) will be resolved again. Starting is worth more than that, and it is said.
            Err(error) => {
                tracing::error!(%error, "the escalation desk's snapshot cannot be read; escalations resolved out of order before the restart may be resolved again");
                events(json!({"event": "snapshot_unreadable", "actor": DESK, "error": error}));
                BTreeSet::new()
            }
        };
        Ok(Desk {
            node: config.node.id.clone(),
            log,
            publish,
            events,
            consumer,
            key,
            snapshot: snapshot_to,
            drained: false,
            resolutions: a.resolutions_stream.clone(),
            timeout_ms: a.escalation_timeout_ms,
            safe_default: a.safe_default_action.to_string(),
            pending_max: a.pending_escalations_max,
            recent_max: a.resolutions_remembered_max,
            cursor,
            read_to: cursor,
            resolved_above,
            pending: BTreeMap::new(),
            recent: VecDeque::new(),
            damage_wait: Duration::from_millis(config.replication.consumer_gap_wait_ms),
            at_damage: None,
            passed_damage: None,
            batch_len_max: a.escalation_batch_len_max as u64,
        })
    }

    /// Takes the escalations appended since the last read.
    fn take(&mut self, batch: Vec<Envelope>) -> Vec<(u64, &'static str)> {
        let mut displaced = Vec::new();
        for e in batch {
            let seq = e.id.seq.get();
            self.read_to = seq;
            if self.resolved_above.contains(&seq) {
                continue;
            }
            let doc: Value = serde_json::from_slice(&e.payload).unwrap_or(Value::Null);
            let pending = Pending {
                seq,
                id: doc["id"].as_str().map_or_else(|| e.id.to_string(), str::to_owned),
                action: doc["action"].as_str().unwrap_or("?").to_owned(),
                risk: doc["risk"].as_f64().unwrap_or(f64::NAN),
                opened_unix_ms: e.hlc.unix_ms(),
            };
            (self.events)(json!({"event": "escalation_opened", "id": pending.id, "action": pending.action, "risk": pending.risk,
                                 "mode": doc["mode"], "reason": doc["reason"]}));
            tracing::warn!(id = pending.id, action = pending.action, reason = doc["reason"].as_str().unwrap_or(""), "escalation waiting for an operator");
            self.admit(pending, &mut displaced);
        }
        displaced
    }

    /// Makes `pending` wait; beyond `pending_max`, the oldest not displaced yet joins
    /// `displaced` (several may arrive at once, and each displaced one stays pending until it
    /// is resolved).
    fn admit(&mut self, pending: Pending, displaced: &mut Vec<(u64, &'static str)>) {
        self.pending.insert(pending.seq, pending);
        if self.pending.len() - displaced.len() > self.pending_max {
            if let Some(&oldest) = self.pending.keys().find(|s| !displaced.iter().any(|(d, _)| d == *s)) {
                displaced.push((oldest, "displaced"));
            }
        }
    }

    /// Reading escalations from `from` failed with `error`. If the records there are damaged
    /// for good (waiting cannot mend them, and retrying for ever would leave every escalation
    /// after them unread): once the same failure lasted `damage_wait`, each becomes an
    /// escalation whose action is unknown, pending like any other (an operator can deny it;
    /// unanswered, it times out to the safe default), and reading goes on after them. Returns
    /// the escalations displaced, or `None` while waiting, or for any other error.
    fn take_unreadable(&mut self, from: u64, error: &LogError) -> Result<Option<Vec<(u64, &'static str)>>, LogError> {
        let Some(to) = self.log.damaged_to(&self.key, from, error, self.batch_len_max)? else { return Ok(None) };
        // Seqs below the first held are gone (retention), not damaged.
        let Some(start) = self.log.next_held(&self.key, from).filter(|&s| s <= to) else { return Ok(None) };
        let now = std::time::Instant::now();
        let damaged = start..=to;
        let continues = self.passed_damage.is_some_and(|end| end.checked_add(1) == Some(start));
        match &self.at_damage {
            _ if continues => {}
            Some((seen, since)) if *seen == damaged && now.duration_since(*since) >= self.damage_wait => {}
            Some((seen, _)) if *seen == damaged => return Ok(None),
            _ => {
                tracing::error!(seqs = ?damaged, %error, "escalation records cannot be read; the desk goes on after them unless this clears");
                self.at_damage = Some((damaged, now));
                return Ok(None);
            }
        }
        self.at_damage = None;
        self.passed_damage = Some(to);
        let mut displaced = Vec::new();
        // Those resolved already (out of order, before a restart) are not opened again.
        let unresolved: Vec<u64> = (start..=to).filter(|s| !self.resolved_above.contains(s)).collect();
        // Their own timestamps cannot be read: they were opened no earlier than the record
        // before them, whose timestamp every restart reads alike, so that a restart does not
        // reset their wait (it may end a little early: towards the safe default). Without one
        // (the first record, or the one before unreadable too), from now.
        let before = start.checked_sub(1).filter(|&s| s >= 1).and_then(|s| self.log.read(&self.key, s, 1).ok()).and_then(|b| b.into_iter().next());
        let opened_unix_ms = before.filter(|e| e.id.seq.get() < start).map_or_else(unix_ms, |e| e.hlc.unix_ms());
        for seq in unresolved {
            let pending = Pending { seq, id: format!("{}#{seq}", self.key), action: UNKNOWN_ACTION.into(), risk: f64::NAN, opened_unix_ms };
            tracing::error!(id = pending.id, %error, "an escalation that cannot be read waits for an operator (deny) or its timeout (the safe default)");
            (self.events)(json!({"event": "escalation_opened", "id": pending.id, "action": pending.action, "unreadable": error.to_string()}));
            self.admit(pending, &mut displaced);
        }
        self.read_to = to;
        Ok(Some(displaced))
    }

    /// Resolves pending `seq` with `outcome`: one atomic write of the resolution, the cursor
    /// and the out-of-order set.
    async fn resolve(&mut self, seq: u64, outcome: &str, by: &str) -> Result<Resolved, LogError> {
        let Some(p) = self.pending.get(&seq).cloned() else {
            return Err(LogError::Io { path: format!("escalation #{seq}").into(), detail: "not pending (resolved already)".into() });
        };
        let action = if outcome == "approved" { p.action.clone() } else { self.safe_default.clone() };
        let waited_ms = unix_ms().saturating_sub(p.opened_unix_ms);
        let doc = json!({"escalation": p.id, "outcome": outcome, "action": action, "escalated_action": p.action,
                         "risk": p.risk, "by": by, "waited_ms": waited_ms});
        let mut resolved_above = self.resolved_above.clone();
        resolved_above.insert(seq);
        let mut cursor = self.cursor;
        // Escalations that retention removed before the desk resolved them are gone (the log
        // counts them as expired): the cursor moves over them, or it would wait there for
        // ever while the resolved ones above it piled up in every snapshot.
        let held_from = self.log.stream(&self.key).map_or(0, |i| if i.count > 0 { i.first } else { i.last.saturating_add(1) });
        if cursor.saturating_add(1) < held_from {
            cursor = held_from - 1;
        }
        // The cursor moves over every escalation resolved without a hole below it.
        while resolved_above.remove(&(cursor + 1)) {
            cursor += 1;
        }
        // One resolved below it (taken before retention removed it) is not kept.
        resolved_above.retain(|&s| s > cursor);
        let draft = Draft::new(Kind::Decision, PayloadType::new(RESOLUTION_TYPE).expect("valid"), doc.to_string().into_bytes());
        let snapshot = serde_json::to_vec(&Snapshot { resolved: resolved_above.clone() }).expect("serialises");
        let snapshot = Draft::new(Kind::Event, PayloadType::new("strata.snapshot/1").expect("valid"), snapshot);
        let cursors = if cursor > self.cursor { vec![(self.key.clone(), cursor)] } else { Vec::new() };
        let appended = self.log.commit_atomically(vec![(self.resolutions.clone(), draft), (self.snapshot.clone(), snapshot)], &self.consumer, cursors).await?;
        if let Some(e) = appended.first() {
            (self.publish)(e);
        }
        self.cursor = cursor;
        self.resolved_above = resolved_above;
        self.pending.remove(&seq);
        (self.events)(json!({"event": "escalation_resolved", "id": p.id, "outcome": outcome, "action": action, "by": by, "waited_ms": waited_ms}));
        tracing::warn!(id = p.id, outcome, action, by, waited_ms, "escalation resolved");
        let r = Resolved { node: self.node.to_string(), id: p.id, outcome: outcome.to_owned(), action, now: true };
        self.remember(Resolved { now: false, ..r.clone() });
        Ok(r)
    }

    /// Keeps `resolved` among the resolutions remembered for late answers.
    fn remember(&mut self, resolved: Resolved) {
        while self.recent.len() >= self.recent_max {
            self.recent.pop_front();
        }
        self.recent.push_back(resolved);
    }

    async fn answer(&mut self, payload: &[u8]) -> Option<Value> {
        let resolve: Resolve = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return Some(json!({"node": self.node.as_str(), "error": format!("malformed resolution: {e}")})),
        };
        if let Some(seq) = self.pending.values().find(|p| p.id == resolve.id).map(|p| p.seq) {
            if resolve.verdict == Verdict::Approve && self.pending[&seq].action == UNKNOWN_ACTION {
                let error = format!(
                    "escalation {} cannot be approved: its action is unknown (its record cannot be read, or names none); deny it, or it times out to the safe default",
                    resolve.id
                );
                return Some(json!({"node": self.node.as_str(), "error": error}));
            }
            let outcome = match resolve.verdict {
                Verdict::Approve => "approved",
                Verdict::Deny => "denied",
            };
            return Some(match self.resolve(seq, outcome, &resolve.by).await {
                Ok(r) => serde_json::to_value(r).expect("serialises"),
                Err(e) => json!({"node": self.node.as_str(), "error": format!("cannot record the resolution: {e}")}),
            });
        }
        // Not pending here: say what happened if it was ours, stay silent otherwise.
        self.recent.iter().rev().find(|r| r.id == resolve.id).map(|r| serde_json::to_value(r).expect("serialises"))
    }

    fn pending_json(&self) -> Vec<Value> {
        let now = unix_ms();
        self.pending.values().map(|p| json!({"id": p.id, "action": p.action, "risk": p.risk, "waiting_ms": now.saturating_sub(p.opened_unix_ms)})).collect()
    }

    /// Takes what a read of escalations from `from` gave. Returns false if the reader should
    /// wait before it reads again (the read failed).
    async fn handle_read(&mut self, from: u64, batch: Result<Vec<Envelope>, LogError>) -> bool {
        match batch {
            Ok(batch) => {
                self.at_damage = None;
                self.passed_damage = None;
                for (seq, outcome) in self.take(batch) {
                    if let Err(e) = self.resolve(seq, outcome, "desk").await {
                        tracing::error!(error = %e, "cannot record a resolution");
                    }
                }
                true
            }
            Err(e) => match self.take_unreadable(from, &e) {
                Ok(Some(displaced)) => {
                    for (seq, outcome) in displaced {
                        if let Err(e) = self.resolve(seq, outcome, "desk").await {
                            tracing::error!(error = %e, "cannot record a resolution");
                        }
                    }
                    true
                }
                Ok(None) => {
                    if self.at_damage.is_none() {
                        tracing::error!(error = %e, "cannot read escalations");
                    }
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read escalations");
                    false
                }
            },
        }
    }

    /// An earlier incarnation's desk: reads what its stream holds after what it read, until
    /// the end (the stream no longer grows) or a read that fails (tried again next time).
    async fn drain(&mut self, batch_len_max: usize) {
        while !self.drained {
            let from = self.read_to + 1;
            let batch = match self.log.read(&self.key, from, batch_len_max) {
                Err(LogError::Corrupt { .. }) if batch_len_max > 1 => self.log.read(&self.key, from, 1),
                batch => batch,
            };
            if matches!(&batch, Ok(b) if b.is_empty()) {
                self.drained = true;
            } else if !self.handle_read(from, batch).await {
                return;
            }
        }
    }

    /// Resolves the escalations that waited `autonomy.escalation_timeout_ms`.
    async fn time_out(&mut self) {
        let now = unix_ms();
        let due: Vec<u64> = self.pending.values().filter(|p| now >= p.opened_unix_ms.saturating_add(self.timeout_ms)).map(|p| p.seq).collect();
        for seq in due {
            if let Err(e) = self.resolve(seq, "timed_out", "timeout").await {
                tracing::error!(error = %e, "cannot record a resolution");
            }
        }
    }
}

/// An operator's answer: the desk holding the escalation pending (an earlier incarnation's, or
/// `current`) takes it; else `current` replies (what happened to one resolved lately, earlier
/// desks' included once they are done, or that the request is malformed). Escalations whose
/// timeout has passed are resolved to the safe default first: an answer that comes after it
/// is told so, and does not win over it (the desk's own check runs only between reads).
async fn answer_any(earlier: &mut [Desk], current: &mut Desk, payload: &[u8]) -> Option<Value> {
    for desk in earlier.iter_mut() {
        desk.time_out().await;
    }
    current.time_out().await;
    let Some(id) = serde_json::from_slice::<Resolve>(payload).ok().map(|r| r.id) else { return current.answer(payload).await };
    // Where it is pending; else, if not pending here either, the earlier desk that resolved it
    // lately (just above, perhaps, by its timeout), which tells what happened.
    let pending = earlier.iter().position(|d| d.pending.values().any(|p| p.id == id));
    let resolved = || earlier.iter().position(|d| d.recent.iter().any(|r| r.id == id));
    match pending.or_else(|| if current.pending.values().any(|p| p.id == id) { None } else { resolved() }) {
        Some(n) => earlier[n].answer(payload).await,
        None => current.answer(payload).await,
    }
}

/// Runs the desk until the task is aborted; returns why it could not go on if it ends
/// otherwise. `pending` is kept up to date for status.
pub async fn run(
    config: NodeConfig,
    log: Log,
    transport: Arc<dyn Transport>,
    publish: Publish,
    events: super::decide::EventSink,
    pending: Arc<std::sync::Mutex<Value>>,
) -> String {
    let mut desk = match Desk::open(&config, log, publish, events).await {
        Ok(d) => d,
        Err(e) => return format!("cannot start: {e}"),
    };
    let mut requests = match transport
        .serve(&resolve_key(&config.node.id), config.autonomy.approvals_queue_len_max, crate::bus::accept_bodies_up_to(crate::bus::CONTROL_REQUEST_BYTES_MAX))
        .await
    {
        Ok(r) => r,
        Err(e) => return format!("cannot serve approvals: {e}"),
    };
    let mut earlier = match Desk::open_earlier(&config, &desk.log, &desk.publish, &desk.events).await {
        Ok(d) => d,
        Err(e) => return format!("cannot start: {e}"),
    };
    let (log, key) = (desk.log.clone(), desk.key.clone());
    let a = &config.autonomy;
    // Longest wait for new escalations between timeout checks.
    let (batch_len_max, idle_wait) = (a.escalation_batch_len_max, Duration::from_millis(a.escalation_check_interval_ms));
    loop {
        for d in &mut earlier {
            d.drain(batch_len_max).await;
        }
        // An earlier incarnation's desk with nothing left: its resolutions are remembered by
        // this one's, for late answers.
        let mut n = 0;
        while n < earlier.len() {
            if earlier[n].drained && earlier[n].pending.is_empty() {
                for r in earlier.remove(n).recent {
                    desk.remember(r);
                }
            } else {
                n += 1;
            }
        }
        let from = desk.read_to + 1;
        tokio::select! {
            batch = log.tail(&key, from, batch_len_max, idle_wait) => {
                let batch = match batch {
                    // RocksDB fails the whole read at a damaged block, maybe past good
                    // records: one at a time, those are taken first.
                    Err(LogError::Corrupt { .. }) if batch_len_max > 1 => log.read(&key, from, 1),
                    // Nothing more can come, and nothing resolved could be recorded.
                    Err(LogError::Closed) => return "its log closed".into(),
                    batch => batch,
                };
                if !desk.handle_read(from, batch).await {
                    tokio::time::sleep(idle_wait).await;
                }
            }
            request = requests.recv() => {
                let Some(mut request) = request else { return "its queue of approvals closed".into() };
                let payload = std::mem::take(&mut request.payload);
                if let Some(reply) = answer_any(&mut earlier, &mut desk, &payload).await {
                    let _ = request.responder.reply(reply.to_string().into_bytes()).await;
                }
            }
        }
        let mut pending_json = Vec::new();
        for d in earlier.iter_mut().chain(std::iter::once(&mut desk)) {
            d.time_out().await;
            pending_json.extend(d.pending_json());
        }
        *pending.lock().unwrap_or_else(|p| p.into_inner()) = Value::Array(pending_json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Limits;
    use crate::log::MemStore;
    use crate::model::Incarnation;

    fn config(timeout_ms: u64) -> NodeConfig {
        let mut c =
            NodeConfig::parse(std::path::Path::new("t.toml"), "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[zenoh]\nconnect = [\"tcp/127.0.0.1:7448\"]\n")
                .unwrap();
        c.autonomy.escalation_timeout_ms = timeout_ms;
        c
    }

    fn escalation(id: &str) -> Draft {
        let doc = json!({"id": id, "action": "stop", "risk": 0.9, "mode": "isolated", "reason": "risk"});
        Draft::new(Kind::Escalation, PayloadType::new("strata.escalation/1").unwrap(), doc.to_string().into_bytes())
    }

    fn resolutions(log: &Log) -> Vec<Value> {
        let key = log.local_key(&crate::model::StreamName::new("decisions").unwrap());
        log.read(&key, 1, 100).unwrap().iter().map(|e| serde_json::from_slice(&e.payload).unwrap()).collect()
    }

    /// An in-memory log holding one escalation per id, in order.
    async fn log_with_escalations(ids: &[&str]) -> Log {
        store_with_escalations(ids, Vec::new()).await.1
    }

    /// The same, its store too (to damage records), with `retention`.
    async fn store_with_escalations(ids: &[&str], retention: Vec<crate::config::RetentionRule>) -> (Arc<MemStore>, Log) {
        let store = Arc::new(MemStore::new(NodeId::new("edge-1").unwrap(), Incarnation::from_raw(7), Limits::default(), retention));
        let log = Log::new(store.clone());
        let esc = crate::model::StreamName::new("escalations").unwrap();
        for id in ids {
            log.append_durable(esc.clone(), escalation(id)).await.unwrap();
        }
        (store, log)
    }

    fn recorded() -> (super::super::decide::EventSink, Arc<std::sync::Mutex<Vec<Value>>>) {
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        (Arc::new(move |e| sink.lock().unwrap().push(e)), events)
    }

    /// An escalation record damaged on disk does not stop the desk for good: once the read
    /// failed for `consumer_gap_wait_ms`, it is pending with an unknown action (it can be
    /// denied, not approved; unanswered it times out to the safe default), and the escalations
    /// after it are read. The desk used to retry the read for ever, leaving every later
    /// escalation unread and never timed out.
    #[tokio::test]
    async fn a_damaged_escalation_is_pending_with_an_unknown_action_after_the_wait() {
        for (wait_ms, taken) in [(0, true), (60_000, false)] {
            let (store, log) = store_with_escalations(&["a", "b", "c"], Vec::new()).await;
            let key = log.local_key(&crate::model::StreamName::new("escalations").unwrap());
            store.damage_record(&key, 2);
            let mut config = config(60_000);
            config.replication.consumer_gap_wait_ms = wait_ms;
            let (events, recorded) = recorded();
            let mut desk = Desk::open(&config, log.clone(), Arc::new(|_| {}), events).await.unwrap();
            assert!(desk.take(log.read(&key, 1, 10).unwrap()).is_empty(), "a, before the damage");
            // Later than a's timestamp, so that a wait from now would differ from one from a's.
            let a_at = log.read(&key, 1, 1).unwrap()[0].hlc.unix_ms();
            while unix_ms() <= a_at {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let error = log.read(&key, 2, 10).unwrap_err();
            assert_eq!(desk.take_unreadable(2, &error).unwrap(), None, "the wait starts");
            let second = desk.take_unreadable(2, &error).unwrap();
            if !taken {
                assert_eq!(second, None, "still waiting");
                assert_eq!(desk.read_to, 1);
                continue;
            }
            assert_eq!(second, Some(Vec::new()));
            assert_eq!(desk.read_to, 2, "reading goes on after it");
            desk.take(log.read(&key, 3, 10).unwrap());
            let damaged_id = format!("{key}#2");
            let pending: Vec<(&str, &str)> = desk.pending.values().map(|p| (p.id.as_str(), p.action.as_str())).collect();
            assert_eq!(pending, [("a", "stop"), (damaged_id.as_str(), "?"), ("c", "stop")]);
            // Its wait runs from a's timestamp (the record before it), which every restart
            // reads alike: a restart does not start it again.
            assert_eq!(desk.pending[&2].opened_unix_ms, a_at);
            let answer = |verdict| serde_json::to_vec(&Resolve { id: damaged_id.clone(), verdict, by: "ops".into() }).unwrap();
            let refused = desk.answer(&answer(Verdict::Approve)).await.unwrap();
            assert!(refused["error"].as_str().unwrap().contains("cannot be approved: its action is unknown"), "{refused}");
            let denied = desk.answer(&answer(Verdict::Deny)).await.unwrap();
            assert_eq!((denied["outcome"].as_str(), denied["action"].as_str()), (Some("denied"), Some("hold")), "{denied}");
            let opened = recorded.lock().unwrap().iter().filter(|e| e["event"] == "escalation_opened" && e["unreadable"].is_string()).count();
            assert_eq!(opened, 1, "{:?}", recorded.lock().unwrap());
            // After a restart (a and c still pending, so the cursor is below it), the denied
            // one is not opened a second time.
            drop(desk);
            let mut desk = Desk::open(&config, log.clone(), Arc::new(|_| {}), Arc::new(|_| {})).await.unwrap();
            desk.take(log.read(&key, 1, 10).unwrap());
            assert_eq!(desk.take_unreadable(2, &error).unwrap(), None);
            assert_eq!(desk.take_unreadable(2, &error).unwrap(), Some(Vec::new()));
            desk.take(log.read(&key, 3, 10).unwrap());
            assert_eq!(desk.pending.values().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["a", "c"], "resolved once only");
        }
    }

    /// Escalations that retention removed before the desk resolved them do not hold its
    /// cursor back: it moves over them, and the resolved ones above do not pile up in every
    /// snapshot. It used to stay below them for ever.
    #[tokio::test]
    async fn the_cursor_moves_over_escalations_retention_removed() {
        let rule = crate::config::RetentionRule {
            streams: crate::config::StreamPattern::new("escalations").unwrap(),
            bytes_max: None,
            age_s_max: Some(1),
            keep_until_acked: Vec::new(),
        };
        let (_store, log) = store_with_escalations(&["a", "b", "c"], vec![rule]).await;
        let mut desk = Desk::open(&config(60_000), log.clone(), Arc::new(|_| {}), Arc::new(|_| {})).await.unwrap();
        desk.take(log.read(&desk.key, 1, 10).unwrap());
        desk.resolve(2, "approved", "ops").await.unwrap();
        assert_eq!(desk.cursor, 0, "a is not resolved yet");
        let report = log.sweep(unix_ms() + 10_000).await.unwrap();
        assert_eq!(report.removed, 3, "{report:?}");
        log.append_durable(crate::model::StreamName::new("escalations").unwrap(), escalation("d")).await.unwrap();
        desk.take(log.read(&desk.key, 4, 10).unwrap());
        desk.resolve(4, "denied", "ops").await.unwrap();
        assert_eq!((desk.cursor, desk.resolved_above.len()), (4, 0), "past the removed ones, nothing left above");
        assert_eq!(log.cursor(&desk.consumer, &desk.key), Some(4));
        // Those taken before they were removed can still be resolved.
        desk.resolve(1, "denied", "ops").await.unwrap();
        assert_eq!(desk.cursor, 4);
    }

    /// A store left open under `sync = interval` when the machine restarted goes on under a
    /// new incarnation; the escalations of the earlier one that were waiting still wait (an
    /// operator can answer them), those resolved stay resolved, and each is resolved once
    /// across restarts.
    #[tokio::test]
    async fn escalations_of_an_earlier_incarnation_still_wait_and_are_resolved_once() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("edge-1").unwrap();
        // Each open as in a new boot of the machine (a power loss in between).
        let open = |boot: &str| crate::log::tests::open_in_boot(dir.path(), &node, boot);
        let (config, publish, events): (_, Publish, super::super::decide::EventSink) = (config(60_000), Arc::new(|_| {}), Arc::new(|_| {}));
        let approve = |id: &str| serde_json::to_vec(&Resolve { id: id.into(), verdict: Verdict::Approve, by: "ops".into() }).unwrap();
        let esc = crate::model::StreamName::new("escalations").unwrap();

        let log = open("boot-1");
        for id in ["a", "b", "c"] {
            log.append_durable(esc.clone(), escalation(id)).await.unwrap();
        }
        let mut desk = Desk::open(&config, log.clone(), publish.clone(), events.clone()).await.unwrap();
        desk.take(log.read(&desk.key, 1, 10).unwrap());
        assert_eq!(desk.answer(&approve("b")).await.unwrap()["outcome"], "approved");
        drop(desk);
        crate::log::tests::crash_committer(&log).await;
        drop(log);

        let log = open("boot-2");
        let old = StreamKey { incarnation: log.store().earlier_incarnations()[0], ..log.local_key(&esc) };
        let mut desk = Desk::open(&config, log.clone(), publish.clone(), events.clone()).await.unwrap();
        assert!(desk.key != old && desk.pending.is_empty() && desk.resolved_above.is_empty(), "this incarnation's desk starts empty");
        // The same id escalated again under the new incarnation, and resolved there.
        log.append_durable(esc.clone(), escalation("a")).await.unwrap();
        desk.take(log.read(&desk.key, 1, 10).unwrap());
        let mut earlier = Desk::open_earlier(&config, &log, &publish, &events).await.unwrap();
        assert_eq!(earlier.len(), 1);
        assert_eq!(earlier[0].key, old);
        earlier[0].drain(10).await;
        assert!(earlier[0].drained);
        let waiting = |d: &Desk| d.pending.values().map(|p| p.id.clone()).collect::<Vec<_>>();
        assert_eq!(waiting(&earlier[0]), ["a", "c"], "b was resolved before the crash");
        // Each answer goes to the desk holding it pending, the earliest first.
        assert_eq!(answer_any(&mut earlier, &mut desk, &approve("a")).await.unwrap()["now"], true);
        assert_eq!(log.cursor(&earlier[0].consumer, &old), Some(2), "a and b resolved: the old key's cursor moves");
        assert_eq!(answer_any(&mut earlier, &mut desk, &approve("a")).await.unwrap()["now"], true, "then the new one");
        assert!(desk.pending.is_empty());
        assert_eq!(answer_any(&mut earlier, &mut desk, b"{").await.unwrap()["error"].as_str().map(|e| e.starts_with("malformed")), Some(true));
        log.close();
        drop((earlier, desk, log));

        // Closed cleanly: same incarnation; only c still waits, once.
        let log = open("boot-3");
        let mut earlier = Desk::open_earlier(&config, &log, &publish, &events).await.unwrap();
        let d = &mut earlier[0];
        d.drain(10).await;
        assert_eq!(d.pending.values().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(d.answer(&approve("a")).await, None, "a's resolution is not remembered across a restart here, and it is not pending");
        d.resolve(3, "denied", "ops").await.unwrap();
        assert!(Desk::open_earlier(&config, &log, &publish, &events).await.unwrap().is_empty(), "nothing left to read or resolve");
        let resolved: Vec<String> = resolutions(&log).iter().map(|r| r["escalation"].as_str().unwrap().to_owned()).collect();
        assert_eq!(resolved, ["a", "a", "c"], "this incarnation's resolutions (b's is under the old one)");
    }

    /// An answer to an earlier incarnation's escalation whose timeout has passed is told it
    /// timed out, by the desk that resolved it, and is not taken by the current desk.
    #[tokio::test]
    async fn a_late_answer_to_an_earlier_incarnations_escalation_is_told_it_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("edge-1").unwrap();
        let open = |boot: &str| crate::log::tests::open_in_boot(dir.path(), &node, boot);
        let (config, publish, events): (_, Publish, super::super::decide::EventSink) = (config(1), Arc::new(|_| {}), Arc::new(|_| {}));
        let esc = crate::model::StreamName::new("escalations").unwrap();
        let log = open("boot-1");
        log.append_durable(esc.clone(), escalation("x")).await.unwrap();
        crate::log::tests::crash_committer(&log).await;
        drop(log);
        let log = open("boot-2");
        let mut desk = Desk::open(&config, log.clone(), publish.clone(), events.clone()).await.unwrap();
        let mut earlier = Desk::open_earlier(&config, &log, &publish, &events).await.unwrap();
        earlier[0].drain(10).await;
        let opened = earlier[0].pending.values().map(|p| p.opened_unix_ms).max().expect("x pending");
        while unix_ms() <= opened + 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let approve = serde_json::to_vec(&Resolve { id: "x".into(), verdict: Verdict::Approve, by: "ops".into() }).unwrap();
        let told = answer_any(&mut earlier, &mut desk, &approve).await.expect("told what happened");
        assert_eq!((told["outcome"].as_str(), told["now"].as_bool()), (Some("timed_out"), Some(false)), "{told}");
        log.close();
    }

    /// A desk snapshot that cannot be read does not stop the desk (and with it the node) from
    /// starting: it starts without it, and says so.
    #[tokio::test]
    async fn an_unreadable_desk_snapshot_is_reported_and_the_desk_starts() {
        let (store, log) = store_with_escalations(&["a", "b"], Vec::new()).await;
        let mut desk = Desk::open(&config(60_000), log.clone(), Arc::new(|_| {}), Arc::new(|_| {})).await.unwrap();
        desk.take(log.read(&desk.key, 1, 10).unwrap());
        desk.resolve(2, "approved", "ops").await.unwrap();
        let snap_key = log.local_key(&snapshot_stream(&desk.consumer));
        store.damage_record(&snap_key, log.stream(&snap_key).unwrap().last);
        let (events, recorded) = recorded();
        let desk = Desk::open(&config(60_000), log.clone(), Arc::new(|_| {}), events).await.expect("starts");
        assert!(desk.resolved_above.is_empty());
        let recorded = recorded.lock().unwrap().clone();
        assert!(recorded.iter().any(|e| e["event"] == "snapshot_unreadable" && e["actor"] == DESK), "{recorded:?}");
    }

    #[tokio::test]
    async fn out_of_order_resolutions_survive_a_restart_exactly_once() {
        let log = log_with_escalations(&["a", "b", "c"]).await;
        let publish: Publish = Arc::new(|_| {});
        let events: super::super::decide::EventSink = Arc::new(|_| {});
        let mut desk = Desk::open(&config(60_000), log.clone(), publish.clone(), events.clone()).await.unwrap();
        let batch = log.read(&desk.key, 1, 10).unwrap();
        assert!(desk.take(batch).is_empty());
        // "b" first: the cursor cannot move past "a".
        let r = desk.resolve(2, "approved", "ops").await.unwrap();
        assert_eq!((r.outcome.as_str(), r.action.as_str()), ("approved", "stop"));
        assert_eq!(desk.cursor, 0);
        drop(desk);
        // Restart: "b" is not pending again; "a" and "c" are.
        let mut desk = Desk::open(&config(60_000), log.clone(), publish.clone(), events.clone()).await.unwrap();
        let batch = log.read(&desk.key, desk.cursor + 1, 10).unwrap();
        desk.take(batch);
        assert_eq!(desk.pending.values().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        let r = desk.resolve(1, "denied", "ops").await.unwrap();
        assert_eq!(r.action, "hold", "denied: the safe default");
        assert_eq!(desk.cursor, 2, "a and b resolved: the cursor moves over both");
        let outcomes: Vec<(String, String)> =
            resolutions(&log).iter().map(|d| (d["escalation"].as_str().unwrap().into(), d["outcome"].as_str().unwrap().into())).collect();
        assert_eq!(outcomes, [("b".into(), "approved".into()), ("a".into(), "denied".into())]);
    }

    /// Beyond `pending_escalations_max`, the oldest are displaced (resolved with the safe
    /// default), each once, however many arrive in one batch.
    #[tokio::test]
    async fn a_batch_of_escalations_over_the_bound_displaces_each_oldest_once() {
        let log = log_with_escalations(&["a", "b", "c", "d", "e"]).await;
        let mut config = config(60_000);
        config.autonomy.pending_escalations_max = 2;
        let (publish, events): (Publish, super::super::decide::EventSink) = (Arc::new(|_| {}), Arc::new(|_| {}));
        let mut desk = Desk::open(&config, log.clone(), publish, events).await.unwrap();
        let batch = log.read(&desk.key, 1, 10).unwrap();
        let displaced = desk.take(batch);
        assert_eq!(displaced, [(1, "displaced"), (2, "displaced"), (3, "displaced")]);
        for (seq, outcome) in displaced {
            desk.resolve(seq, outcome, "desk").await.unwrap();
        }
        assert_eq!(desk.pending.values().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["d", "e"]);
        assert_eq!(desk.cursor, 3);
        let outcomes: Vec<String> = resolutions(&log).iter().map(|d| d["escalation"].as_str().unwrap().to_owned()).collect();
        assert_eq!(outcomes, ["a", "b", "c"]);
        assert!(desk.resolve(1, "approved", "ops").await.is_err(), "resolving one that is not pending is an error, not a panic");
    }

    /// An approval that comes after the escalation's timeout does not win over the safe
    /// default: the desk's timeout check runs between reads, and an answer arriving first used
    /// to be applied though the wait was over.
    #[tokio::test]
    async fn an_answer_after_the_timeout_is_told_it_timed_out() {
        let log = log_with_escalations(&["a", "b"]).await;
        let (publish, events): (Publish, super::super::decide::EventSink) = (Arc::new(|_| {}), Arc::new(|_| {}));
        let mut desk = Desk::open(&config(1), log.clone(), publish, events).await.unwrap();
        let batch = log.read(&desk.key, 1, 10).unwrap();
        desk.take(batch);
        let opened = desk.pending.values().map(|p| p.opened_unix_ms).max().unwrap();
        while unix_ms() <= opened + 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let approve = serde_json::to_vec(&Resolve { id: "a".into(), verdict: Verdict::Approve, by: "ops".into() }).unwrap();
        let told = answer_any(&mut [], &mut desk, &approve).await.unwrap();
        assert_eq!((told["outcome"].as_str(), told["now"].as_bool()), (Some("timed_out"), Some(false)), "{told}");
        let outcomes: Vec<Value> = resolutions(&log).iter().map(|r| r["outcome"].clone()).collect();
        assert_eq!(outcomes, ["timed_out", "timed_out"], "both waited out their timeout");
    }

    #[tokio::test]
    async fn a_late_answer_is_told_what_happened_within_the_resolutions_remembered() {
        let log = log_with_escalations(&["a", "b", "c"]).await;
        let mut config = config(60_000);
        config.autonomy.resolutions_remembered_max = 2;
        let (publish, events): (Publish, super::super::decide::EventSink) = (Arc::new(|_| {}), Arc::new(|_| {}));
        let mut desk = Desk::open(&config, log.clone(), publish, events).await.unwrap();
        let batch = log.read(&desk.key, 1, 10).unwrap();
        desk.take(batch);
        for seq in 1..=3 {
            desk.resolve(seq, "denied", "ops").await.unwrap();
        }
        let late = |id: &str| serde_json::to_vec(&Resolve { id: id.into(), verdict: Verdict::Approve, by: "late".into() }).unwrap();
        for id in ["b", "c"] {
            let told = desk.answer(&late(id)).await.unwrap_or_else(|| panic!("{id} is among the last 2 resolved"));
            assert_eq!((told["id"].as_str(), told["outcome"].as_str(), told["now"].as_bool()), (Some(id), Some("denied"), Some(false)));
        }
        assert_eq!(desk.answer(&late("a")).await, None, "a was resolved before the last 2: forgotten");
        assert_eq!(desk.recent.len(), 2);
    }
}
