//! Decision requests across tiers: the node-runtime side of [`route`](crate::route).
//!
//! A node that serves a capability (an inference actor with `serve = true`) registers a
//! [`Service`] with [`Decider::serve`]: it declares the queryable
//! `strata/decide/<capability>/<node>` and the liveliness token
//! `strata/serves/<capability>/<tier>/<node>`. Every node watches those tokens, so it knows who
//! serves what, and probes each server every `routing.probe_interval_ms` to keep its latency
//! estimates fresh.
//!
//! [`Decider::decide`] takes one decision before a deadline: it plans with
//! [`route::plan`](crate::route::plan) (candidates: the servers that are alive *and* whose tier
//! the current degraded mode counts as reachable, so a returning tier is used again only after
//! the mode's `recover_hold_ms`), sends a Zenoh query with the planned timeout, and falls back to
//! the caller's local decision when no answer comes in time. A request whose deadline already
//! passed is never sent: it yields a `deadline_miss` event. The [`Outcome`] says which tier
//! decided, why, the estimated and the actual latency, and whether the deadline was met; the
//! caller records it on its `decisions` stream.
//!
//! On the wire a request carries a relative budget (`budget_us`: how long the requester waits
//! for it), never an absolute time; the server counts it from the request's arrival.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::bus::{AliveChange, AliveWatch, BoxFut, BusError, Transport};
use crate::config::{Name, NodeConfig};
use crate::mode::Mode;
use crate::model::{MonoClock, MonoTime, NodeId, Priority, Tier};
use crate::route::{self, Candidate, Estimator, Policy, Route, Target};

/// Key of the queryable of `node` for `capability`.
pub fn decide_key(capability: &str, node: &NodeId) -> String {
    format!("strata/decide/{capability}/{node}")
}

/// Liveliness token saying that `node` on `tier` serves `capability`.
pub fn serves_key(capability: &str, tier: Tier, node: &NodeId) -> String {
    format!("strata/serves/{capability}/{tier}/{node}")
}

const SERVES_ALL: &str = "strata/serves/**";
/// Room in a decision request for what is not its input (id, capability, budget, JSON).
const REQUEST_FRAME_BYTES: usize = 64 * 1024;

fn parse_serves(key: &str) -> Option<Target> {
    let mut parts = key.strip_prefix("strata/serves/")?.split('/');
    let (capability, tier, node) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let tier = match tier {
        "edge" => Tier::Edge,
        "fog" => Tier::Fog,
        "cloud" => Tier::Cloud,
        _ => return None,
    };
    Some(Target { tier, node: NodeId::new(node).ok()?, capability: capability.to_owned() })
}

/// A decision request as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    /// The requester's id for it (e.g. the envelope id of the input).
    pub id: String,
    pub capability: String,
    /// How long the requester waits for the answer from when it sends the request, in µs:
    /// the time left before the deadline less the safety margin and the fallback's time. The
    /// server counts it from the request's arrival.
    pub budget_us: u64,
    /// A latency probe: answer as usual, but it decides nothing.
    #[serde(default)]
    pub probe: bool,
    /// What to decide about (capability-specific JSON).
    pub input: Value,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub node: String,
    pub tier: Tier,
    /// The decision (capability-specific JSON), or why there is none.
    #[serde(flatten)]
    pub result: AnswerResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerResult {
    Decision(Value),
    Error(String),
}

/// What serves a capability on this node.
pub trait Service: Send + Sync + 'static {
    /// Decides `request` (a probe must be answered like any request, with no side effect).
    fn answer<'a>(&'a self, request: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>>;
}

/// How one decision was taken; recorded on the `decisions` stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub request: String,
    pub capability: String,
    /// The budget the request started with, in µs.
    pub deadline_us: u64,
    /// `remote` (a remote tier answered), `local` (planned local), `fallback` (a remote was
    /// asked and did not answer in time), `expired` (the deadline had passed: not sent).
    pub route: &'static str,
    /// The tier and node that decided.
    pub tier: Tier,
    pub node: String,
    pub reason: String,
    /// The p95 latency the plan expected of the remote, in µs.
    pub estimate_us: Option<u64>,
    /// From the start of the request to the decision, in µs.
    pub latency_us: u64,
    pub met: bool,
    pub fallback: bool,
}

/// Counters, for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DecideCounters {
    /// Decided by each tier (this node's own tier for local, fallback and expired outcomes).
    pub cloud: u64,
    pub fog: u64,
    pub edge: u64,
    pub remote: u64,
    pub local: u64,
    pub fallback: u64,
    pub expired: u64,
    pub met: u64,
    pub missed: u64,
    pub served: u64,
    /// Requests answered with an error: malformed, the service failed or ran out of time, or
    /// the budget ran out while the request waited (those counted in `serve_expired` too).
    pub serve_refused: u64,
    /// Requests whose budget ran out while they waited to be served: not served.
    pub serve_expired: u64,
    /// Decision servers' announcements (liveliness) dropped because their queue was full; the
    /// servers were read again after each drop.
    pub servers_dropped: u64,
    /// Decision servers announced while `routing.servers_max` were tracked: not taken.
    pub servers_refused: u64,
}

/// Where node events go (the node's bounded `events` queue).
pub type EventSink = Arc<dyn Fn(Value) + Send + Sync>;

pub struct Decider {
    transport: Arc<dyn Transport>,
    node: NodeId,
    tier: Tier,
    policy: Policy,
    probe_interval: Duration,
    /// A probe's timeout: its capability's deadline (`routing.deadline_ms`), else this.
    probe_timeout: Duration,
    deadlines: BTreeMap<String, Duration>,
    /// Servers with a probe in flight.
    probing: Mutex<BTreeSet<Target>>,
    serve_queue_len_max: usize,
    /// Largest decision request served: a reading's largest payload (more than any input an
    /// actor sends) and room for the rest.
    request_bytes_max: usize,
    servers_max: usize,
    clock: MonoClock,
    mode: watch::Receiver<Mode>,
    /// Lock order: `servers` before `estimator` (both are held together when planning).
    estimator: Mutex<Estimator>,
    servers: Mutex<BTreeSet<Target>>,
    counters: Mutex<DecideCounters>,
    events: EventSink,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Keeps a capability served; dropping it stops serving (queryable and token undeclared).
pub struct ServeGuard {
    _token: Box<dyn std::any::Any + Send + Sync>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Whether mode `mode` counts `tier` as reachable from a node on `own`.
fn tier_allowed(own: Tier, mode: Mode, tier: Tier) -> bool {
    match tier {
        t if t <= own => true,
        Tier::Cloud => mode == Mode::Full,
        _ => mode >= Mode::NoCloud,
    }
}

impl Decider {
    /// Starts watching servers and probing them.
    pub async fn start(config: &NodeConfig, transport: Arc<dyn Transport>, mode: watch::Receiver<Mode>, events: EventSink) -> Result<Arc<Decider>, BusError> {
        let r = &config.routing;
        let decider = Arc::new(Decider {
            transport,
            node: config.node.id.clone(),
            tier: config.node.tier,
            policy: Policy::from_config(r),
            probe_interval: Duration::from_millis(r.probe_interval_ms),
            probe_timeout: Duration::from_millis(r.default_deadline_ms),
            deadlines: r.deadline_ms.iter().map(|(c, ms)| (c.to_string(), Duration::from_millis(*ms))).collect(),
            probing: Mutex::new(BTreeSet::new()),
            serve_queue_len_max: r.serve_queue_len_max,
            request_bytes_max: config.log.payload_bytes_max.saturating_add(REQUEST_FRAME_BYTES),
            servers_max: r.servers_max,
            clock: MonoClock::new(),
            mode,
            estimator: Mutex::new(Estimator::new(r.estimate_samples_max)),
            servers: Mutex::new(BTreeSet::new()),
            counters: Mutex::new(DecideCounters::default()),
            events,
            tasks: Mutex::new(Vec::new()),
        });
        let query_timeout = Duration::from_millis(config.replication.replay_timeout_ms);
        let mut alive =
            AliveWatch::open(decider.transport.clone(), SERVES_ALL, config.replication.peer_events_queue_len_max, decider.probe_interval, query_timeout)
                .await?;
        let weak = Arc::downgrade(&decider);
        let watch = tokio::spawn(async move {
            while let Some(change) = alive.next().await {
                let Some(d) = weak.upgrade() else { return };
                let mut servers = d.servers.lock().unwrap_or_else(|p| p.into_inner());
                let gone: Vec<Target> = match change {
                    AliveChange::One(event) => {
                        let Some(target) = parse_serves(&event.key) else { continue };
                        if target.node == d.node {
                            continue;
                        }
                        if event.alive {
                            if servers.len() < d.servers_max || servers.contains(&target) {
                                servers.insert(target);
                            } else {
                                d.counters.lock().unwrap_or_else(|p| p.into_inner()).servers_refused += 1;
                            }
                            continue;
                        }
                        servers.remove(&target);
                        vec![target]
                    }
                    // A server that went and came back within the dropped changes keeps its
                    // estimates (the whole set cannot show it); its probes refresh them.
                    AliveChange::All { alive, dropped } => {
                        d.counters.lock().unwrap_or_else(|p| p.into_inner()).servers_dropped += dropped;
                        let mut now: BTreeSet<Target> = alive.iter().filter_map(|k| parse_serves(k)).filter(|t| t.node != d.node).collect();
                        // Those already tracked first, then others up to the bound.
                        if now.len() > d.servers_max {
                            let (kept, new): (BTreeSet<Target>, BTreeSet<Target>) = now.into_iter().partition(|t| servers.contains(t));
                            let room = d.servers_max.saturating_sub(kept.len());
                            d.counters.lock().unwrap_or_else(|p| p.into_inner()).servers_refused += new.len().saturating_sub(room) as u64;
                            now = kept.into_iter().take(d.servers_max).chain(new.into_iter().take(room)).collect();
                        }
                        let gone: Vec<Target> = servers.difference(&now).cloned().collect();
                        tracing::warn!(
                            dropped,
                            servers = now.len(),
                            "decision servers' announcements dropped (queue full; raise replication.peer_events_queue_len_max): the servers were read again"
                        );
                        *servers = now;
                        gone
                    }
                };
                drop(servers);
                // A returning server starts from fresh estimates (probes fill them).
                let mut estimator = d.estimator.lock().unwrap_or_else(|p| p.into_inner());
                for target in &gone {
                    estimator.forget(target);
                }
            }
        });
        let weak = Arc::downgrade(&decider);
        let every = decider.probe_interval;
        let probe = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(d) = weak.upgrade() else { return };
                let servers: Vec<Target> = d.servers.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
                for target in servers {
                    // One probe per server at a time: a probe waits up to its capability's
                    // deadline, and new ones piling up on a slow server would take its places.
                    if !d.probing.lock().unwrap_or_else(|p| p.into_inner()).insert(target.clone()) {
                        continue;
                    }
                    let d = d.clone();
                    tokio::spawn(async move {
                        d.probe(target.clone()).await;
                        d.probing.lock().unwrap_or_else(|p| p.into_inner()).remove(&target);
                    });
                }
            }
        });
        decider.tasks.lock().unwrap_or_else(|p| p.into_inner()).extend([watch, probe]);
        Ok(decider)
    }

    /// Stops watching and probing.
    pub fn stop(&self) {
        for task in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
    }

    pub fn counters(&self) -> DecideCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Latency estimates of every server known, for status.
    pub fn estimates(&self) -> Value {
        let servers: Vec<Target> = self.servers.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let estimator = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
        let rows: Vec<Value> = servers
            .iter()
            .map(|t| {
                let s = estimator.summary(t);
                json!({"capability": t.capability, "tier": t.tier, "node": t.node.as_str(),
                       "p50_us": s.map(|s| s.p50_us), "p95_us": s.map(|s| s.p95_us), "samples": s.map_or(0, |s| s.samples)})
            })
            .collect();
        Value::Array(rows)
    }

    /// Serves `capability` with `service` until the guard is dropped. A request's budget holds
    /// a serving place at most that long; one over [`BUDGET_US_MAX`] is refused.
    pub async fn serve(self: &Arc<Self>, capability: &Name, service: Arc<dyn Service>) -> Result<ServeGuard, BusError> {
        let accept = crate::bus::accept_bodies_up_to(self.request_bytes_max);
        let mut requests = self.transport.serve(&decide_key(capability.as_str(), &self.node), self.serve_queue_len_max, accept).await?;
        let token = self.transport.declare_alive(&serves_key(capability.as_str(), self.tier, &self.node)).await?;
        let (node, tier) = (self.node.to_string(), self.tier);
        let permits = Arc::new(Semaphore::new(self.serve_queue_len_max));
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            // `requests` lives in this task: aborting it undeclares the queryable.
            while let Some(mut request) = requests.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (service, node, weak) = (service.clone(), node.clone(), weak.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    // The budget runs from the request's arrival: the time it waited in the
                    // queue and for a place is spent. Past it the requester has given up, so a
                    // request that waited it out is not served (under overload the places go
                    // to requests that can still be of use), and a service that hangs must not
                    // hold one of the places for ever.
                    let waited = request.received.elapsed();
                    let (result, expired) = match serde_json::from_slice::<DecisionRequest>(&request.payload) {
                        // No config makes a deadline over a day: a broken or hostile requester
                        // must not hold a place for ages.
                        Ok(req) if req.budget_us > BUDGET_US_MAX => (
                            AnswerResult::Error(format!(
                                "the request's budget of {} µs is over a day ({BUDGET_US_MAX} µs), longer than any deadline a config allows",
                                req.budget_us
                            )),
                            false,
                        ),
                        Ok(req) => match Duration::from_micros(req.budget_us).checked_sub(waited).filter(|left| !left.is_zero()) {
                            None => (
                                AnswerResult::Error(format!(
                                    "the request's budget of {} µs ran out while it waited {} µs to be served",
                                    req.budget_us,
                                    us(waited)
                                )),
                                true,
                            ),
                            Some(left) => match tokio::time::timeout(left, service.answer(&req)).await {
                                Ok(Ok(decision)) => (AnswerResult::Decision(decision), false),
                                Ok(Err(e)) => (AnswerResult::Error(e), false),
                                Err(_) => (AnswerResult::Error(format!("no answer within the request's budget of {} µs", req.budget_us)), false),
                            },
                        },
                        Err(e) => (AnswerResult::Error(format!("malformed decision request: {e}")), false),
                    };
                    if let Some(d) = weak.upgrade() {
                        let mut c = d.counters.lock().unwrap_or_else(|p| p.into_inner());
                        match result {
                            AnswerResult::Decision(_) => c.served += 1,
                            AnswerResult::Error(_) => c.serve_refused += 1,
                        }
                        c.serve_expired += u64::from(expired);
                    }
                    let answer = Answer { node, tier, result };
                    let _ = request.responder.reply(serde_json::to_vec(&answer).expect("answers serialise")).await;
                });
            }
        });
        Ok(ServeGuard { _token: token, task })
    }

    /// Sends `request` to `target` and waits at most `timeout` for a decision.
    async fn ask(&self, target: &Target, request: &DecisionRequest, timeout: Duration) -> Result<Value, NotAnswered> {
        let payload = serde_json::to_vec(request).expect("requests serialise");
        let key = decide_key(&target.capability, &target.node);
        // The whole exchange, sending included, is bounded: a congested link must not hold
        // the decision past its timeout.
        let exchange = async {
            let mut replies = self.transport.request(&key, "", payload, timeout, 1).await.ok()?;
            replies.recv().await
        };
        let bytes = tokio::time::timeout(timeout, exchange).await.ok().flatten().ok_or(NotAnswered::NoAnswer)?;
        match serde_json::from_slice::<Answer>(&bytes).map_err(|_| NotAnswered::NoAnswer)?.result {
            // A decision is a JSON object (the actor adds its own fields to it); anything else
            // from a peer is no answer, and the local fallback decides.
            AnswerResult::Decision(v) if v.is_object() => Ok(v),
            AnswerResult::Decision(v) => {
                tracing::warn!(node = %target.node, decision = %v, "a decision that is not a JSON object was ignored");
                Err(NotAnswered::NoAnswer)
            }
            AnswerResult::Error(e) => {
                tracing::debug!(node = %target.node, error = e, "a decision request was refused");
                Err(NotAnswered::Refused(e))
            }
        }
    }

    async fn probe(&self, target: Target) {
        // As long as a request of that capability may wait: with a shorter timeout, a tier
        // slower than it would be recorded as faster than it is.
        let timeout = self.deadlines.get(&target.capability).copied().unwrap_or(self.probe_timeout);
        let request = DecisionRequest {
            id: format!("probe@{}", self.node),
            capability: target.capability.clone(),
            budget_us: us(timeout),
            probe: true,
            input: Value::Null,
        };
        let start = self.clock.now();
        // A refused probe counts as no answer: a server that refuses is of no use to ask.
        let answered = self.ask(&target, &request, timeout).await.is_ok();
        let now = self.clock.now();
        // Only a server still known: a probe in flight when it left must not revive it. Lock
        // order everywhere: `servers` before `estimator`.
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if !servers.contains(&target) {
            return;
        }
        let mut e = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
        if answered {
            e.observe(&target, now, us(now.saturating_since(start)));
        } else {
            e.timed_out(&target, now, us(timeout));
        }
    }

    /// The clock deadlines of [`Decider::decide`] are on.
    pub fn now(&self) -> MonoTime {
        self.clock.now()
    }

    /// Takes one decision about `input` for `capability` by `deadline` (on [`Decider::now`]'s
    /// clock): asks the tier the router picks, or uses `local` (the caller's own decision,
    /// already computed) when that is the plan or no answer came in time. `priority` and
    /// `local_load` (0..=1, how busy the caller is) go to the router ([`route::Ask`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn decide(
        &self,
        capability: &str,
        id: &str,
        input: &Value,
        deadline: MonoTime,
        started: MonoTime,
        priority: Priority,
        local_load: f64,
        local: Value,
    ) -> (Value, Outcome) {
        let now = self.clock.now();
        let deadline_us = us(deadline.saturating_since(started));
        let budget_us = us(deadline.saturating_since(now));
        let candidates: Vec<Candidate> = {
            let mode = *self.mode.borrow();
            let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            let estimator = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
            servers
                .iter()
                .filter(|t| t.capability == capability)
                .map(|t| Candidate { target: t.clone(), reachable: tier_allowed(self.tier, mode, t.tier), summary: estimator.summary(t) })
                .collect()
        };
        let plan = route::plan_ask(self.tier, &route::Ask { budget_us, priority, local_load }, &candidates, &self.policy);
        let mut outcome = Outcome {
            request: id.to_owned(),
            capability: capability.to_owned(),
            deadline_us,
            route: "local",
            tier: self.tier,
            node: self.node.to_string(),
            reason: plan.reason,
            estimate_us: None,
            latency_us: 0,
            met: false,
            fallback: false,
        };
        let mut decision = local;
        match plan.route {
            Route::Expired => {
                outcome.route = "expired";
                (self.events)(json!({"event": "deadline_miss", "request": id, "capability": capability,
                                     "deadline_us": deadline_us, "late_us": us(now.saturating_since(deadline))}));
            }
            Route::Local => {}
            Route::Remote { target, timeout_us, estimate_us } => {
                outcome.estimate_us = Some(estimate_us);
                // The server is given what this node waits for (the budget less the margin
                // and the fallback's time), not the whole budget: an answer later than that
                // arrives after the fallback decided.
                let request =
                    DecisionRequest { id: id.to_owned(), capability: capability.to_owned(), budget_us: timeout_us, probe: false, input: input.clone() };
                let timeout = Duration::from_micros(timeout_us);
                let mut asked = vec![target];
                if let Some((hedge, _)) = plan.hedge {
                    asked.push(hedge);
                }
                let (tx, mut rx) = mpsc::channel(asked.len());
                let sent = self.clock.now();
                // Both (with hedging) are asked at once; the first answer wins.
                let senders: Vec<_> = asked.iter().map(|_| tx.clone()).collect();
                drop(tx);
                // Each ask reports once, answered or not.
                let asks = asked.iter().zip(senders).map(|(t, tx)| {
                    let request = &request;
                    async move {
                        let answer = self.ask(t, request, timeout).await;
                        let _ = tx.try_send((t.clone(), answer, self.clock.now()));
                    }
                });
                let all = futures::future::join_all(asks);
                tokio::pin!(all);
                // The first decision, and the servers that refused meanwhile.
                let (mut first, mut refused) = (None, Vec::new());
                let take = |report: (Target, Result<Value, NotAnswered>, MonoTime), first: &mut Option<_>, refused: &mut Vec<_>| match report {
                    (t, Ok(v), at) => *first = Some((t, v, at)),
                    (t, Err(NotAnswered::Refused(e)), _) => refused.push((t, e)),
                    (_, Err(NotAnswered::NoAnswer), _) => {}
                };
                let mut reported = 0;
                while reported < asked.len() && first.is_none() {
                    tokio::select! {
                        Some(report) = rx.recv() => {
                            reported += 1;
                            take(report, &mut first, &mut refused);
                        }
                        _ = &mut all => {
                            while let Ok(report) = rx.try_recv() {
                                if first.is_none() {
                                    take(report, &mut first, &mut refused);
                                }
                            }
                            break;
                        }
                    }
                }
                {
                    // Only servers still tracked: one that went meanwhile must come back with
                    // fresh estimates (its probes fill them), not with this sample.
                    let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
                    let mut e = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
                    for t in asked.iter().filter(|t| servers.contains(*t)) {
                        match &first {
                            Some((winner, _, at)) if winner == t => e.observe(t, *at, us(at.saturating_since(sent))),
                            // The loser of a hedge is not known to be slow: no sample.
                            Some(_) => {}
                            // Refused or not answered: of no use for this decision, counted
                            // as a timeout (a server that refuses everything must not stay the
                            // router's choice, each decision paying a round trip before its
                            // fallback).
                            None => e.timed_out(t, self.clock.now(), timeout_us),
                        }
                    }
                }
                match first {
                    Some((winner, v, _)) => {
                        outcome.route = "remote";
                        outcome.tier = winner.tier;
                        outcome.node = winner.node.to_string();
                        decision = v;
                    }
                    None => {
                        outcome.route = "fallback";
                        outcome.fallback = true;
                        match refused.first() {
                            Some((t, e)) => {
                                let _ = write!(outcome.reason, "; refused by {} {}: {e}: local fallback", t.tier, t.node);
                            }
                            None => outcome.reason.push_str("; no answer in time: local fallback"),
                        }
                    }
                }
            }
        }
        let done = self.clock.now();
        outcome.latency_us = us(done.saturating_since(started));
        outcome.met = outcome.route != "expired" && done <= deadline;
        {
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            *match outcome.tier {
                Tier::Cloud => &mut c.cloud,
                Tier::Fog => &mut c.fog,
                Tier::Edge => &mut c.edge,
            } += 1;
            match outcome.route {
                "remote" => c.remote += 1,
                "fallback" => c.fallback += 1,
                "expired" => c.expired += 1,
                _ => c.local += 1,
            }
            if outcome.met {
                c.met += 1;
            } else {
                c.missed += 1;
            }
        }
        if !outcome.met && outcome.route != "expired" {
            (self.events)(json!({"event": "deadline_miss", "request": id, "capability": capability, "route": outcome.route,
                                 "deadline_us": deadline_us, "late_us": outcome.latency_us.saturating_sub(deadline_us)}));
        }
        (decision, outcome)
    }
}

impl Drop for Decider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why [`Decider::ask`] brought no decision.
#[derive(Debug, Clone, PartialEq)]
enum NotAnswered {
    /// None in time (lost, slow, unreachable), or one that was not a decision.
    NoAnswer,
    /// The server answered that it cannot decide on this request, and why.
    Refused(String),
}

/// Longest budget a decision request is served with: a day, the longest deadline a config
/// allows (`routing.deadline_ms`).
pub const BUDGET_US_MAX: u64 = crate::config::DAY_MS * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A current-thread runtime, its clock paused or not.
    fn runtime(paused: bool) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(paused).build().unwrap()
    }

    /// `fog-1` and `edge-1` linked on a simulated network of `seed`.
    fn linked(seed: u64) -> (crate::bus::sim::SimNet, NodeId, NodeId) {
        let net = crate::bus::sim::SimNet::new(seed, crate::bus::sim::Faults::NONE);
        let (fog, edge) = (NodeId::new("fog-1").unwrap(), NodeId::new("edge-1").unwrap());
        net.link(&fog, &edge);
        (net, fog, edge)
    }

    fn config(text: &str) -> NodeConfig {
        NodeConfig::parse(std::path::Path::new("t.toml"), text).unwrap()
    }

    /// The decider of `node` (with `config`, in mode full) on `net`, its events to `events`.
    async fn decider_on(net: &crate::bus::sim::SimNet, node: &NodeId, config: &NodeConfig, events: EventSink) -> Arc<Decider> {
        let (_, mode) = watch::channel(Mode::Full);
        Decider::start(config, net.attach(node), mode, events).await.unwrap()
    }

    /// Sends `request` to `server`'s `inspect` capability from `asker`; its answer, if any came
    /// within `timeout`.
    async fn ask_inspect(asker: &dyn Transport, server: &NodeId, request: &DecisionRequest, timeout: Duration) -> Option<AnswerResult> {
        let mut replies = asker.request(&decide_key("inspect", server), "", serde_json::to_vec(request).unwrap(), timeout, 1).await.unwrap();
        replies.recv().await.map(|bytes| serde_json::from_slice::<Answer>(&bytes).unwrap().result)
    }

    /// `fog-1` serving `capability` with `service`, and `edge-1` (its `[routing]` lines after
    /// `routing`) asking it, linked on a simulated network of `seed`, both in mode full.
    async fn fog_serving_edge(seed: u64, capability: &str, service: Arc<dyn Service>, routing: &str) -> (Arc<Decider>, ServeGuard, Arc<Decider>) {
        let (net, fog, edge) = linked(seed);
        let (_, mode) = watch::channel(Mode::Full);
        let server = Decider::start(&config("[node]\nid = \"fog-1\"\ntier = \"fog\"\n"), net.attach(&fog), mode.clone(), Arc::new(|_| {})).await.unwrap();
        let guard = server.serve(&Name::new(capability).unwrap(), service).await.unwrap();
        let edge_config = config(&format!("[node]\nid = \"edge-1\"\ntier = \"edge\"\n[routing]\n{routing}"));
        let decider = Decider::start(&edge_config, net.attach(&edge), mode, Arc::new(|_| {})).await.unwrap();
        (server, guard, decider)
    }

    /// A service that never answers holds a serving place only for the request's budget, and
    /// a request's budget runs from its arrival: with one place, a second request that waited
    /// out its budget for the place is refused without calling the service, and a third that
    /// still has time when the place frees is served (on a paused clock, over the simulated
    /// network).
    #[test]
    fn a_hung_service_holds_a_place_for_the_budget_and_queued_requests_spend_theirs() {
        struct Hangs(std::sync::atomic::AtomicU32);
        impl Service for Hangs {
            fn answer<'a>(&'a self, req: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if req.id == "c" {
                    return Box::pin(std::future::ready(Ok(json!({"action": "log"}))));
                }
                Box::pin(std::future::pending())
            }
        }
        let runtime = runtime(true);
        runtime.block_on(async {
            let (net, fog, edge) = linked(1);
            let mut config = config("[node]\nid = \"fog-1\"\ntier = \"fog\"\n");
            config.routing.serve_queue_len_max = 1;
            let decider = decider_on(&net, &fog, &config, Arc::new(|_| {})).await;
            let service = Arc::new(Hangs(std::sync::atomic::AtomicU32::new(0)));
            let _guard = decider.serve(&Name::new("inspect").unwrap(), service.clone()).await.unwrap();
            let asker = net.attach(&edge);
            let started = tokio::time::Instant::now();
            let ask = async |id: &str, after_ms: u64, budget_us: u64| {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                let request = DecisionRequest { id: id.into(), capability: "inspect".into(), budget_us, probe: false, input: Value::Null };
                (ask_inspect(&*asker, &fog, &request, Duration::from_secs(60)).await.expect("an answer"), started.elapsed())
            };
            // The second and the third come once the first holds the place, one after the other
            // (the queue in front of the place holds one).
            let ((first, t1), (second, t2), (third, t3)) = tokio::join!(ask("a", 0, 100_000), ask("b", 10, 50_000), ask("c", 20, 500_000));
            assert_eq!(first, AnswerResult::Error("no answer within the request's budget of 100000 µs".into()));
            let AnswerResult::Error(second) = second else { panic!("the second was served: {second:?}") };
            assert!(second.starts_with("the request's budget of 50000 µs ran out while it waited "), "{second}");
            assert_eq!(third, AnswerResult::Decision(json!({"action": "log"})));
            // 100 ms for the first; the second is refused when the place frees, and the third
            // answered at once.
            for t in [t1, t2, t3] {
                assert_eq!(t.as_millis() / 10, 10, "{:?}", [t1, t2, t3]);
            }
            assert_eq!(service.0.load(std::sync::atomic::Ordering::Relaxed), 2, "the expired request did not reach the service");
            let c = decider.counters();
            assert_eq!((c.served, c.serve_refused, c.serve_expired), (1, 2, 1), "{c:?}");
            // A budget over a day (no config makes one) is refused at once: held for its budget,
            // it would keep the place for ages.
            let (over, _) = ask("d", 0, BUDGET_US_MAX + 1).await;
            let AnswerResult::Error(over) = over else { panic!("served: {over:?}") };
            assert!(over.contains("is over a day"), "{over}");
            assert_eq!(service.0.load(std::sync::atomic::Ordering::Relaxed), 2, "it did not reach the service");
            let (fits, _) = ask("c", 0, BUDGET_US_MAX).await;
            assert_eq!(fits, AnswerResult::Decision(json!({"action": "log"})));
            decider.stop();
        });
    }

    /// A decision request larger than a reading's largest payload and its frame is refused
    /// before it is queued (a queue of N requests holds N bodies); one within is served.
    #[test]
    fn a_decision_request_larger_than_a_reading_is_refused_unqueued() {
        struct Answers;
        impl Service for Answers {
            fn answer<'a>(&'a self, _: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
                Box::pin(std::future::ready(Ok(json!({"action": "log"}))))
            }
        }
        let runtime = runtime(true);
        runtime.block_on(async {
            let (net, fog, edge) = linked(4);
            let mut config = config("[node]\nid = \"fog-1\"\ntier = \"fog\"\n");
            config.log.payload_bytes_max = 1000;
            let decider = decider_on(&net, &fog, &config, Arc::new(|_| {})).await;
            let _guard = decider.serve(&Name::new("inspect").unwrap(), Arc::new(Answers)).await.unwrap();
            let asker = net.attach(&edge);
            let ask = async |input_len: usize| {
                let input = Value::String("x".repeat(input_len));
                let request = DecisionRequest { id: "r".into(), capability: "inspect".into(), budget_us: 100_000, probe: false, input };
                ask_inspect(&*asker, &fog, &request, Duration::from_secs(1)).await
            };
            assert_eq!(ask(1000).await, Some(AnswerResult::Decision(json!({"action": "log"}))));
            assert_eq!(ask(1000 + REQUEST_FRAME_BYTES).await, None, "refused: no answer");
            assert_eq!(decider.counters().served, 1);
            decider.stop();
        });
    }

    /// A decision about input taken before the node started (a backlog read after a restart,
    /// 10 minutes old, with a 20 ms budget) is expired, and its lateness is the real one: the
    /// clock reaches back before its own start. It used to start at zero, so the input's start
    /// was cut to the node's and the miss read as a few ms late.
    #[test]
    fn lateness_of_input_older_than_the_node_is_counted_in_full() {
        let runtime = runtime(false);
        runtime.block_on(async {
            let (net, _, edge) = linked(3);
            let config = config("[node]\nid = \"edge-1\"\ntier = \"edge\"\n");
            let events = Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = events.clone();
            let decider = decider_on(&net, &edge, &config, Arc::new(move |e| sink.lock().unwrap().push(e))).await;
            let age = Duration::from_secs(600);
            let started = MonoTime::from_micros(decider.now().as_micros().saturating_sub(us(age)));
            let deadline = started.saturating_add(Duration::from_millis(20));
            let (_, outcome) = decider.decide("anomaly", "r", &Value::Null, deadline, started, Priority::NORMAL, 0.0, json!({"action": "log"})).await;
            assert_eq!((outcome.route, outcome.deadline_us, outcome.met), ("expired", 20_000, false));
            let events = events.lock().unwrap().clone();
            let late_us = events.iter().find(|e| e["event"] == "deadline_miss").and_then(|e| e["late_us"].as_u64()).expect("a deadline_miss event");
            assert!(late_us >= us(age) - 20_000, "late by the input's age less the budget: {late_us} µs; {events:?}");
            decider.stop();
        });
    }

    /// A peer's answer whose decision is not a JSON object (the actor adds fields to it, which
    /// would panic) counts as no answer; an object is taken.
    #[test]
    fn a_decision_that_is_not_an_object_is_no_answer() {
        let runtime = runtime(true);
        runtime.block_on(async {
            let (net, fog, edge) = linked(2);
            let config = config("[node]\nid = \"edge-1\"\ntier = \"edge\"\n");
            let decider = decider_on(&net, &edge, &config, Arc::new(|_| {})).await;
            let server = net.attach(&fog);
            let mut requests = server.serve(&decide_key("inspect", &fog), 4, crate::bus::accept_all()).await.unwrap();
            let target = Target { tier: Tier::Fog, node: fog.clone(), capability: "inspect".into() };
            let request = DecisionRequest { id: "r".into(), capability: "inspect".into(), budget_us: 100_000, probe: false, input: Value::Null };
            for (decision, taken) in [
                (json!(5), Err(NotAnswered::NoAnswer)),
                (json!(["stop"]), Err(NotAnswered::NoAnswer)),
                (json!({"action": "stop"}), Ok(json!({"action": "stop"}))),
            ] {
                let answer = async {
                    let mut r = requests.recv().await.unwrap();
                    let bytes =
                        serde_json::to_vec(&Answer { node: "fog-1".into(), tier: Tier::Fog, result: AnswerResult::Decision(decision.clone()) }).unwrap();
                    r.responder.reply(bytes).await.unwrap();
                };
                let (got, ()) = tokio::join!(decider.ask(&target, &request, Duration::from_secs(1)), answer);
                assert_eq!(got, taken, "{decision}");
            }
            decider.stop();
        });
    }

    /// Beyond `routing.servers_max`, announced decision servers are not taken, and counted;
    /// one that goes frees a place (on a paused clock, over the simulated network).
    #[test]
    fn decision_servers_beyond_the_bound_are_not_taken() {
        let runtime = runtime(true);
        runtime.block_on(async {
            let (net, peer, edge) = linked(3);
            let mut config = config("[node]\nid = \"edge-1\"\ntier = \"edge\"\n");
            config.routing.servers_max = 2;
            let decider = decider_on(&net, &edge, &config, Arc::new(|_| {})).await;
            let announcer = net.attach(&peer);
            let mut tokens = Vec::new();
            for capability in ["a", "b", "c", "d"] {
                tokens.push(announcer.declare_alive(&serves_key(capability, Tier::Fog, &peer)).await.unwrap());
            }
            let tracked = || decider.servers.lock().unwrap().iter().map(|t| t.capability.clone()).collect::<Vec<_>>();
            for _ in 0..100 {
                if decider.counters().servers_refused == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!((tracked(), decider.counters().servers_refused), (vec!["a".to_owned(), "b".to_owned()], 2));
            tokens.remove(0);
            let e = announcer.declare_alive(&serves_key("e", Tier::Fog, &peer)).await.unwrap();
            for _ in 0..100 {
                if tracked() == ["b", "e"] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(tracked(), ["b", "e"], "a went: its place is taken by the next announced");
            drop((tokens, e));
            decider.stop();
        });
    }

    /// A probe waits as long as a request of its capability may (`routing.deadline_ms`): a
    /// server that takes 200 ms is estimated at 200 ms, not at the 100 ms default deadline a
    /// shorter probe would record (over the simulated network, in real time: the decider's
    /// clock is the machine's; only a lower bound is asserted).
    #[test]
    fn probes_wait_as_long_as_their_capabilitys_deadline() {
        struct Slow;
        impl Service for Slow {
            fn answer<'a>(&'a self, _: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(json!({"action": "none"}))
                })
            }
        }
        let runtime = runtime(false);
        runtime.block_on(async {
            let (server, _guard, decider) = fog_serving_edge(4, "slow", Arc::new(Slow), "probe_interval_ms = 100\ndeadline_ms = { slow = 500 }\n").await;
            let p50 = || decider.estimates().as_array().and_then(|rows| rows.first().cloned()).and_then(|r| r["p50_us"].as_u64());
            for _ in 0..300 {
                if decider.estimates()[0]["samples"].as_u64().unwrap_or(0) >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let p50 = p50().expect("probed");
            assert!(p50 >= 200_000, "estimated {p50} µs for a server that takes 200 ms");
            decider.stop();
            server.stop();
        });
    }

    /// A server has one probe in flight at a time: probes to a server that does not answer
    /// do not pile up at every tick and take its serving places (on a paused clock).
    #[test]
    fn probes_do_not_pile_up_on_a_silent_server() {
        struct Counts(Arc<std::sync::atomic::AtomicU64>);
        impl Service for Counts {
            fn answer<'a>(&'a self, _: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Box::pin(std::future::pending())
            }
        }
        let runtime = runtime(true);
        runtime.block_on(async {
            let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (server, _guard, decider) =
                fog_serving_edge(5, "slow", Arc::new(Counts(asked.clone())), "probe_interval_ms = 10\ndeadline_ms = { slow = 1000 }\n").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1, "one probe in 500 ms of 10 ms ticks, while it waits its 1 s");
            decider.stop();
            server.stop();
        });
    }

    /// A server that refuses a request (its service cannot decide on that input) is of no use
    /// for that decision: it falls back, and its reason names the refusal (it used to
    /// say "no answer in time"). The refusal counts as a timeout in the server's estimate, so
    /// that a server refusing everything stops being asked: here, after a few refusals, the
    /// router decides locally without a round trip.
    #[test]
    fn a_refused_request_falls_back_at_once_naming_the_refusal() {
        struct Refuses;
        impl Service for Refuses {
            fn answer<'a>(&'a self, req: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
                let answer = if req.probe { Ok(json!({"action": "none"})) } else { Err("cannot decide on this input".to_owned()) };
                Box::pin(std::future::ready(answer))
            }
        }
        let runtime = runtime(true);
        runtime.block_on(async {
            let (server, _guard, decider) =
                fog_serving_edge(6, "inspect", Arc::new(Refuses), "probe_interval_ms = 1000\ndeadline_ms = { inspect = 1000 }\n").await;
            let samples = || decider.estimates().as_array().and_then(|rows| rows.first().cloned()).and_then(|r| r["samples"].as_u64()).unwrap_or(0);
            for _ in 0..300 {
                if samples() >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(samples() >= 3, "probed: {}", decider.estimates());
            let mut routes = Vec::new();
            for n in 0..20 {
                let now = decider.now();
                let deadline = now.saturating_add(Duration::from_millis(1000));
                let (_, outcome) =
                    decider.decide("inspect", &format!("r{n}"), &Value::Null, deadline, now, Priority::NORMAL, 0.0, json!({"action": "log"})).await;
                assert_eq!(outcome.tier, Tier::Edge, "{outcome:?}");
                if outcome.route == "fallback" {
                    assert!(outcome.reason.ends_with("; refused by fog fog-1: cannot decide on this input: local fallback"), "{}", outcome.reason);
                }
                routes.push(outcome.route);
            }
            assert_eq!(routes[0], "fallback", "asked first: {routes:?}");
            assert_eq!(routes.last(), Some(&"local"), "then no longer asked: {routes:?}");
            decider.stop();
            server.stop();
        });
    }

    #[test]
    fn serves_keys_round_trip_and_bad_ones_are_ignored() {
        let node = NodeId::new("fog-1").unwrap();
        let t = parse_serves(&serves_key("anomaly", Tier::Fog, &node)).unwrap();
        assert_eq!(t, Target { tier: Tier::Fog, node, capability: "anomaly".into() });
        assert_eq!(parse_serves("strata/serves/anomaly/moon/fog-1"), None);
        assert_eq!(parse_serves("strata/serves/anomaly/fog/fog-1/extra"), None);
        assert_eq!(parse_serves("strata/alive/fog/fog-1"), None);
    }

    #[test]
    fn the_mode_decides_which_tiers_count_as_reachable() {
        use Tier::*;
        assert!(tier_allowed(Edge, Mode::Full, Cloud) && tier_allowed(Edge, Mode::Full, Fog));
        assert!(!tier_allowed(Edge, Mode::NoCloud, Cloud) && tier_allowed(Edge, Mode::NoCloud, Fog));
        assert!(!tier_allowed(Edge, Mode::Isolated, Fog) && !tier_allowed(Edge, Mode::Safe, Fog));
        assert!(tier_allowed(Fog, Mode::Full, Cloud) && !tier_allowed(Fog, Mode::NoCloud, Cloud));
    }

    #[test]
    fn answers_and_requests_have_a_stable_wire_form() {
        let a = Answer { node: "fog-1".into(), tier: Tier::Fog, result: AnswerResult::Decision(json!({"anomaly": true})) };
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(text, r#"{"node":"fog-1","tier":"fog","decision":{"anomaly":true}}"#);
        assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), a);
        let r: Result<DecisionRequest, _> = serde_json::from_str(r#"{"id":"x","capability":"anomaly","budget_us":5,"input":1,"extra":0}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `extra`"));
    }
}
