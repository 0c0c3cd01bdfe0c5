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
    key: StreamKey,
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
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Desk {
    async fn open(config: &NodeConfig, log: Log, publish: Publish, events: super::decide::EventSink) -> Result<Desk, LogError> {
        let a = &config.autonomy;
        let consumer = Name::new(DESK).expect("valid name");
        let key = log.local_key(&a.escalations_stream);
        let cursor = log.register_consumer(&consumer, &key).await?;
        let snap_key = log.local_key(&snapshot_stream(&consumer));
        let resolved_above = match log.stream(&snap_key) {
            Some(info) if info.last > 0 => log
                .read(&snap_key, info.last, 1)?
                .pop()
                .and_then(|e| serde_json::from_slice::<Snapshot>(&e.payload).ok())
                .map(|s| s.resolved.into_iter().filter(|&seq| seq > cursor).collect())
                .unwrap_or_default(),
            _ => BTreeSet::new(),
        };
        Ok(Desk {
            node: config.node.id.clone(),
            log,
            publish,
            events,
            consumer,
            key,
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
            self.pending.insert(seq, pending);
            // The oldest not displaced yet: several may arrive in one batch, and each
            // displaced one stays pending until it is resolved.
            if self.pending.len() - displaced.len() > self.pending_max {
                if let Some(&oldest) = self.pending.keys().find(|s| !displaced.iter().any(|(d, _)| d == *s)) {
                    displaced.push((oldest, "displaced"));
                }
            }
        }
        displaced
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
        // The cursor moves over every escalation resolved without a hole below it.
        while resolved_above.remove(&(cursor + 1)) {
            cursor += 1;
        }
        let draft = Draft::new(Kind::Decision, PayloadType::new(RESOLUTION_TYPE).expect("valid"), doc.to_string().into_bytes());
        let snapshot = serde_json::to_vec(&Snapshot { resolved: resolved_above.clone() }).expect("serialises");
        let snapshot = Draft::new(Kind::Event, PayloadType::new("strata.snapshot/1").expect("valid"), snapshot);
        let cursors = if cursor > self.cursor { vec![(self.key.clone(), cursor)] } else { Vec::new() };
        let appended =
            self.log.commit_atomically(vec![(self.resolutions.clone(), draft), (snapshot_stream(&self.consumer), snapshot)], &self.consumer, cursors).await?;
        if let Some(e) = appended.first() {
            (self.publish)(e);
        }
        self.cursor = cursor;
        self.resolved_above = resolved_above;
        self.pending.remove(&seq);
        (self.events)(json!({"event": "escalation_resolved", "id": p.id, "outcome": outcome, "action": action, "by": by, "waited_ms": waited_ms}));
        tracing::warn!(id = p.id, outcome, action, by, waited_ms, "escalation resolved");
        let r = Resolved { node: self.node.to_string(), id: p.id, outcome: outcome.to_owned(), action, now: true };
        while self.recent.len() >= self.recent_max {
            self.recent.pop_front();
        }
        self.recent.push_back(Resolved { now: false, ..r.clone() });
        Ok(r)
    }

    async fn answer(&mut self, payload: &[u8]) -> Option<Value> {
        let resolve: Resolve = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return Some(json!({"node": self.node.as_str(), "error": format!("malformed resolution: {e}")})),
        };
        if let Some(seq) = self.pending.values().find(|p| p.id == resolve.id).map(|p| p.seq) {
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

    fn pending_json(&self) -> Value {
        let now = unix_ms();
        Value::Array(
            self.pending
                .values()
                .map(|p| json!({"id": p.id, "action": p.action, "risk": p.risk, "waiting_ms": now.saturating_sub(p.opened_unix_ms)}))
                .collect(),
        )
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
    let mut requests = match transport.serve(&resolve_key(&config.node.id), config.autonomy.approvals_queue_len_max, crate::bus::accept_all()).await {
        Ok(r) => r,
        Err(e) => return format!("cannot serve approvals: {e}"),
    };
    let (log, key) = (desk.log.clone(), desk.key.clone());
    let a = &config.autonomy;
    // Longest wait for new escalations between timeout checks.
    let (batch_len_max, idle_wait) = (a.escalation_batch_len_max, Duration::from_millis(a.escalation_check_interval_ms));
    loop {
        let from = desk.read_to + 1;
        tokio::select! {
            batch = log.tail(&key, from, batch_len_max, idle_wait) => {
                match batch {
                    Ok(batch) => {
                        for (seq, outcome) in desk.take(batch) {
                            if let Err(e) = desk.resolve(seq, outcome, "desk").await {
                                tracing::error!(error = %e, "cannot record a resolution");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read escalations");
                        tokio::time::sleep(idle_wait).await;
                    }
                }
            }
            request = requests.recv() => {
                let Some(mut request) = request else { return "its queue of approvals closed".into() };
                let payload = std::mem::take(&mut request.payload);
                if let Some(reply) = desk.answer(&payload).await {
                    let _ = request.responder.reply(reply.to_string().into_bytes()).await;
                }
            }
        }
        let now = unix_ms();
        let due: Vec<u64> = desk.pending.values().filter(|p| now >= p.opened_unix_ms.saturating_add(desk.timeout_ms)).map(|p| p.seq).collect();
        for seq in due {
            if let Err(e) = desk.resolve(seq, "timed_out", "timeout").await {
                tracing::error!(error = %e, "cannot record a resolution");
            }
        }
        *pending.lock().unwrap_or_else(|p| p.into_inner()) = desk.pending_json();
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
        let log = Log::new(Arc::new(MemStore::new(NodeId::new("edge-1").unwrap(), Incarnation::from_raw(7), Limits::default(), Vec::new())));
        let esc = crate::model::StreamName::new("escalations").unwrap();
        for id in ids {
            log.append_durable(esc.clone(), escalation(id)).await.unwrap();
        }
        log
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
