//! Incidents: what failed, when it was detected, what the node did, and when acceptable
//! behaviour was restored — one `incident_opened` and one `incident_closed` event each, on the
//! `events` stream, next to the raw supervision and mode events they summarise.
//!
//! Two kinds:
//! - **reachability**: the mode dropped (a tier became unreachable, or local health failed).
//!   The node's reaction is the mode itself: routing only to tiers still reachable (else the
//!   local fallback) and the autonomy bounds of the lower mode. It closes when the mode is back
//!   to the best this node can be in (`full`), and says how much the other tiers were
//!   behind then; replication catches up by replay (triggered by the liveliness change) and a
//!   `caught_up` event says when it finished.
//! - **actor**: a supervised actor failed. The node's reaction is the supervisor's restart; it
//!   closes when the actor runs again.
//!
//! Incidents are numbered from 1 in each run of the node; both events carry the run's start
//! (`node_started_unix_ms`), so that (node, `node_started_unix_ms`, `incident`) names one
//! across restarts: a crash's incident, never closed, is not paired with the next run's.
//!
//! The tracker is pure (time is an argument); the node feeds it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::mode::{Mode, Transition};
use crate::supervise::Event;

#[derive(Debug, Clone)]
struct Open {
    id: u64,
    what: String,
    detected_unix_ms: u64,
}

/// Open incidents by key (`mode`, `actor:<name>`).
#[derive(Debug, Default)]
pub struct Incidents {
    next_id: u64,
    /// When this run of the node started.
    started_unix_ms: u64,
    open: BTreeMap<String, Open>,
}

impl Incidents {
    /// The tracker of a node run started at `started_unix_ms`.
    pub fn new(started_unix_ms: u64) -> Incidents {
        Incidents { started_unix_ms, ..Incidents::default() }
    }

    fn open(&mut self, key: String, what: String, did: String, now_unix_ms: u64) -> Option<Value> {
        if self.open.contains_key(&key) {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        let event = json!({"event": "incident_opened", "incident": id, "node_started_unix_ms": self.started_unix_ms, "what": what,
                           "detected_unix_ms": now_unix_ms, "did": did});
        self.open.insert(key, Open { id, what, detected_unix_ms: now_unix_ms });
        Some(event)
    }

    fn close(&mut self, key: &str, restored: String, now_unix_ms: u64) -> Option<Value> {
        let o = self.open.remove(key)?;
        Some(
            json!({"event": "incident_closed", "incident": o.id, "node_started_unix_ms": self.started_unix_ms, "what": o.what, "detected_unix_ms": o.detected_unix_ms,
                    "restored_unix_ms": now_unix_ms, "duration_ms": now_unix_ms.saturating_sub(o.detected_unix_ms), "restored": restored}),
        )
    }

    /// A mode change. `behind` says, at recovery, how many records the other tiers miss.
    pub fn on_mode(&mut self, t: &Transition, now_unix_ms: u64, behind: impl FnOnce() -> u64) -> Option<Value> {
        if t.to < t.from {
            let did = match t.to {
                Mode::Safe => "mode safe: only the safe actions of [autonomy.safe] without a human".to_owned(),
                m => format!("mode {m}: decisions routed to the tiers still reachable or taken locally; autonomy bounds of {m}"),
            };
            return self.open("mode".into(), format!("{} ({})", t.reason, t.to), did, now_unix_ms);
        }
        if t.to == Mode::Full {
            let behind = behind();
            return self.close("mode", format!("{}; replication behind by {behind} records, catching up by replay", t.reason), now_unix_ms);
        }
        None
    }

    /// A supervision event.
    pub fn on_supervision(&mut self, e: &Event, now_unix_ms: u64) -> Option<Value> {
        match e {
            Event::ChildExited { supervisor, child, failed: true, reason } => self.open(
                format!("actor:{child}"),
                format!("actor {child} failed: {reason}"),
                // A temporary actor is not restarted: its incident stays open (it is gone).
                format!("supervisor {supervisor} restarts it per its policy (a temporary actor is not restarted; the incident then stays open)"),
                now_unix_ms,
            ),
            Event::ChildStarted { child, restarts, .. } if *restarts > 0 => {
                self.close(&format!("actor:{child}"), format!("actor {child} running again (restart {restarts})"), now_unix_ms)
            }
            Event::Escalated { supervisor, reason } => self.open(
                format!("supervisor:{supervisor}"),
                format!("supervisor {supervisor} gave up: {reason}"),
                "children stopped; escalated to the parent (at the root: the process exits non-zero for its manager to restart)".into(),
                now_unix_ms,
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MonoTime;

    fn t(from: Mode, to: Mode, reason: &str) -> Transition {
        Transition { from, to, at: MonoTime::ZERO, reason: reason.into() }
    }

    #[test]
    fn a_reachability_incident_opens_once_and_closes_at_full() {
        let mut i = Incidents::new(500);
        let opened = i.on_mode(&t(Mode::Full, Mode::NoCloud, "degraded: reaches fog"), 1_000, || 0).unwrap();
        assert_eq!(opened["event"], "incident_opened");
        assert_eq!((opened["incident"].as_u64(), opened["node_started_unix_ms"].as_u64()), (Some(1), Some(500)), "{opened}");
        assert_eq!(opened["what"], "degraded: reaches fog (no_cloud)");
        assert!(opened["did"].as_str().unwrap().contains("autonomy bounds of no_cloud"));
        // Further down, then partly up: still the same incident.
        assert_eq!(i.on_mode(&t(Mode::NoCloud, Mode::Isolated, "degraded: reaches no other tier"), 2_000, || 0), None);
        assert_eq!(i.on_mode(&t(Mode::Isolated, Mode::NoCloud, "recovered"), 3_000, || 0), None);
        let closed = i.on_mode(&t(Mode::NoCloud, Mode::Full, "recovered: reaches fog, cloud for 3000 ms"), 7_500, || 42).unwrap();
        assert_eq!((closed["incident"].as_u64(), closed["duration_ms"].as_u64()), (Some(1), Some(6_500)));
        assert_eq!(closed["node_started_unix_ms"].as_u64(), Some(500), "{closed}");
        assert!(closed["restored"].as_str().unwrap().contains("behind by 42 records"));
        // The initial rise at start-up (isolated -> full) closes nothing and opens nothing.
        assert_eq!(i.on_mode(&t(Mode::Isolated, Mode::Full, "recovered"), 8_000, || 0), None);
    }

    #[test]
    fn an_actor_incident_closes_when_it_runs_again() {
        let mut i = Incidents::default();
        let exit = Event::ChildExited { supervisor: "root".into(), child: "line-3".into(), failed: true, reason: "panic".into() };
        assert_eq!(i.on_supervision(&exit, 10).unwrap()["what"], "actor line-3 failed: panic");
        let normal = Event::ChildExited { supervisor: "root".into(), child: "arbiter".into(), failed: false, reason: "stopped".into() };
        assert_eq!(i.on_supervision(&normal, 11), None);
        let first_start = Event::ChildStarted { supervisor: "root".into(), child: "line-3".into(), restarts: 0 };
        assert_eq!(i.on_supervision(&first_start, 12), None);
        let restarted = Event::ChildStarted { supervisor: "root".into(), child: "line-3".into(), restarts: 1 };
        let closed = i.on_supervision(&restarted, 110).unwrap();
        assert_eq!((closed["event"].as_str(), closed["duration_ms"].as_u64()), (Some("incident_closed"), Some(100)));
    }
}
