//! `inference`: scores the readings of its inputs with a [`Model`] and emits a decision on
//! `outputs[0]` for each anomaly (or for every reading with `emit_all = true`).
//!
//! Models: `ewma` — a streaming z-score against an exponentially weighted mean and variance
//! (cheap, edge-sized). Its state is snapshotted with each batch, so a restarted actor scores
//! the next reading exactly as the old one would have.
//!
//! Across tiers:
//! - `serve = true`: the actor also serves its capability to other nodes (decision requests
//!   over Zenoh), scoring each request's `{"value": ..}` with its current model state (learnt
//!   from its inputs) without learning from it.
//! - `route = true`: for each reading, the decision is taken by the tier the router picks for
//!   the capability's deadline (`routing.deadline_ms`, counted from when the reading was
//!   appended if it is this node's own), with the local model as the fallback. The router also
//!   gets the reading's priority and the actor's load (its backlog as a share of one input
//!   batch). Every outcome is emitted, with how it was routed (see
//!   [`strata_core::node::decide::Outcome`]).
//!
//! Decision payload (`strata.decision/1`): `{"input": "<reading id>", "capability": "anomaly",
//! "model": "ewma-zscore/1", "tier": "edge", "node": "edge-1", "anomaly": true, "score": 9.1,
//! "risk": 0.6, "action": "alert", "label": "anomaly"}` (`label`: the reading's ground truth, if
//! any; `action`: `none` for a normal reading, `alert` for an anomaly, `stop` when its risk is
//! at least 0.75), plus the routing outcome fields with `route = true`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use strata_core::bus::BoxFut;
use strata_core::config::{ActorSpec, Name};
use strata_core::actor::INPUT_BATCH_LEN_MAX;
use strata_core::log::{Draft, StreamKey};
use strata_core::node::decide::{DecisionRequest, ServeGuard, Service};
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, MonoTime, NodeId, PayloadType, StreamName, Tier};

pub const DECISION_TYPE: &str = "strata.decision/1";

/// What a model says about one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub anomaly: bool,
    /// Model-specific strength (for `ewma`, the z-score).
    pub score: f64,
    /// 0.0..=1.0.
    pub risk: f64,
}

/// A streaming anomaly model.
pub trait Model: Send + Sync + 'static {
    /// Name and version, recorded in every decision.
    fn version(&self) -> &'static str;
    /// Scores `value` and learns from it.
    fn score(&self, state: &mut ModelState, value: f64) -> Score;
}

/// The learned state of a model (serialised in the actor's snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub count: u64,
    pub mean: f64,
    pub var: f64,
}

/// Streaming z-score with exponentially weighted mean and variance. Anomalous values do not
/// update the statistics, so a burst of anomalies does not hide the next one.
pub struct Ewma {
    pub alpha: f64,
    pub z_threshold: f64,
    pub warmup: u64,
}

impl Model for Ewma {
    fn version(&self) -> &'static str {
        "ewma-zscore/1"
    }

    fn score(&self, s: &mut ModelState, x: f64) -> Score {
        if s.count == 0 {
            s.count = 1;
            s.mean = x;
            return Score { anomaly: false, score: 0.0, risk: 0.0 };
        }
        let sd = s.var.sqrt().max(1e-9);
        let z = (x - s.mean).abs() / sd;
        let anomaly = s.count >= self.warmup && z > self.z_threshold;
        if !anomaly {
            let d = x - s.mean;
            s.mean += self.alpha * d;
            s.var = (1.0 - self.alpha) * (s.var + self.alpha * d * d);
            s.count += 1;
        }
        let risk = if anomaly { (z / (4.0 * self.z_threshold)).clamp(0.0, 1.0) } else { 0.0 };
        Score { anomaly, score: z, risk }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceParams {
    /// The capability served, e.g. `anomaly`. Required.
    pub capability: String,
    /// `ewma`. Required.
    pub model: String,
    /// EWMA smoothing factor in (0, 1]. Default 0.05.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// |z| above which a value is an anomaly. Default 4.
    #[serde(default = "d_z")]
    pub z_threshold: f64,
    /// Values learnt before any is called an anomaly. Default 30.
    #[serde(default = "d_warmup")]
    pub warmup: u64,
    /// Emit a decision for every reading, not only anomalies. Default false.
    #[serde(default)]
    pub emit_all: bool,
    /// Serve the capability to other nodes. Default false.
    #[serde(default)]
    pub serve: bool,
    /// Have each decision taken by the tier the router picks (local model as fallback); every
    /// outcome is emitted. Default false.
    #[serde(default)]
    pub route: bool,
}

fn d_alpha() -> f64 {
    0.05
}
fn d_z() -> f64 {
    4.0
}
fn d_warmup() -> u64 {
    30
}

pub struct Inference {
    capability: Name,
    model: Arc<dyn Model>,
    emit_all: bool,
    serve: bool,
    route: bool,
    out: StreamName,
}

/// The actor's state: the model's, shared with the service that answers other nodes.
pub struct InferenceState {
    model: ModelState,
    shared: Arc<Mutex<ModelState>>,
    _serving: Option<ServeGuard>,
}

/// Action for a score.
fn action(score: &Score) -> &'static str {
    match score {
        s if !s.anomaly => "none",
        s if s.risk >= 0.75 => "stop",
        _ => "alert",
    }
}

fn decision(model: &dyn Model, score: &Score, tier: Tier, node: &NodeId) -> Value {
    json!({"model": model.version(), "tier": tier, "node": node.as_str(), "anomaly": score.anomaly,
           "score": score.score, "risk": score.risk, "action": action(score)})
}

/// Answers decision requests from other nodes with the actor's current model state.
struct Served {
    model: Arc<dyn Model>,
    state: Arc<Mutex<ModelState>>,
    tier: Tier,
    node: NodeId,
}

impl Service for Served {
    fn answer<'a>(&'a self, request: &'a DecisionRequest) -> BoxFut<'a, Result<Value, String>> {
        Box::pin(async move {
            let value = match (&request.input, request.probe) {
                (_, true) => 0.0,
                (input, false) => input.get("value").and_then(Value::as_f64).ok_or("input: a numeric \"value\" is required")?,
            };
            // Score against a copy: answering teaches the model nothing.
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let score = self.model.score(&mut state, value);
            Ok(decision(self.model.as_ref(), &score, self.tier, &self.node))
        })
    }
}

impl Inference {
    pub fn from_spec(spec: &ActorSpec) -> Result<Inference, String> {
        let p: InferenceParams = crate::params(spec)?;
        let model: Arc<dyn Model> = match p.model.as_str() {
            "ewma" => {
                if !(p.alpha > 0.0 && p.alpha <= 1.0) {
                    return Err(format!("alpha: {} is not in (0, 1]", p.alpha));
                }
                if p.z_threshold <= 0.0 {
                    return Err(format!("z_threshold: {} must be > 0", p.z_threshold));
                }
                Arc::new(Ewma { alpha: p.alpha, z_threshold: p.z_threshold, warmup: p.warmup })
            }
            other => return Err(format!("model: unknown model {other:?} (known: ewma)")),
        };
        if spec.inputs.is_empty() {
            return Err("inputs: at least one readings stream is required".into());
        }
        let capability = Name::new(p.capability.as_str()).map_err(|e| format!("capability: {e}"))?;
        Ok(Inference { capability, model, emit_all: p.emit_all, serve: p.serve, route: p.route, out: crate::output(spec, 0, "the decisions")? })
    }
}

impl Behaviour for Inference {
    type State = InferenceState;

    async fn start(&self, ctx: &mut Ctx) -> Result<InferenceState, ActorError> {
        let model = match ctx.snapshot() {
            Some(bytes) => serde_json::from_slice(bytes)?,
            None => ModelState::default(),
        };
        let shared = Arc::new(Mutex::new(model.clone()));
        let serving = match (self.serve, ctx.decider()) {
            (true, Some(decider)) => {
                let served = Served { model: self.model.clone(), state: shared.clone(), tier: ctx.config().node.tier, node: ctx.node().clone() };
                Some(decider.serve(&self.capability, Arc::new(served)).await?)
            }
            _ => None,
        };
        Ok(InferenceState { model, shared, _serving: serving })
    }

    async fn handle(&self, ctx: &mut Ctx, state: &mut InferenceState, input: &Envelope) -> Result<(), ActorError> {
        let reading: Value = match serde_json::from_slice(&input.payload) {
            Ok(v) => v,
            Err(_) => return Ok(()), // not JSON: not a reading this model can score
        };
        let Some(value) = reading.get("value").and_then(|v| v.as_f64()) else { return Ok(()) };
        let score = self.model.score(&mut state.model, value);
        ctx.save_snapshot(serde_json::to_vec(&state.model)?);
        if self.serve {
            state.shared.lock().unwrap_or_else(|p| p.into_inner()).clone_from(&state.model);
        }
        let local = decision(self.model.as_ref(), &score, ctx.config().node.tier, ctx.node());
        let mut doc = match ctx.decider().filter(|_| self.route).cloned() {
            Some(decider) => {
                let routing = &ctx.config().routing;
                let budget_ms = routing.deadline_ms.get(&self.capability).copied().unwrap_or(routing.default_deadline_ms);
                // A reading of this node: its deadline runs from when it was appended (same
                // machine, same clock). Another node's: from when it is handled here.
                let age_us = if &input.id.origin == ctx.node() { unix_us().saturating_sub(input.hlc.unix_us()) } else { 0 };
                let now = decider.now();
                let started = MonoTime::from_micros(now.as_micros().saturating_sub(age_us));
                let deadline = started.saturating_add(Duration::from_millis(budget_ms));
                let id = input.id.to_string();
                // Load: how far behind this actor is, as a share of what it can take in one
                // batch (a full batch waiting or more: saturated).
                let last = ctx.log().stream(&StreamKey::of(&input.id)).map_or(0, |i| i.last);
                let load = (last.saturating_sub(input.id.seq.get()) as f64 / INPUT_BATCH_LEN_MAX as f64).min(1.0);
                let (mut doc, outcome) =
                    decider.decide(self.capability.as_str(), &id, &json!({"value": value}), deadline, started, input.priority, load, local).await;
                if let (Value::Object(d), Value::Object(o)) = (&mut doc, serde_json::to_value(&outcome)?) {
                    d.extend(o);
                }
                doc
            }
            None if score.anomaly || self.emit_all => local,
            None => return Ok(()),
        };
        doc["input"] = json!(input.id.to_string());
        doc["capability"] = json!(self.capability.as_str());
        doc["label"] = reading.get("label").cloned().unwrap_or(Value::Null);
        let draft = Draft::new(Kind::Decision, PayloadType::new(DECISION_TYPE)?, doc.to_string().into_bytes());
        ctx.emit(&self.out, draft)
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensor::SensorParams;

    #[test]
    fn ewma_finds_the_injected_anomalies() {
        let sensor: SensorParams = toml::from_str("rate_hz = 100\nseed = 3\nanomaly_rate = 0.01").unwrap();
        let model = Ewma { alpha: 0.05, z_threshold: 4.0, warmup: 30 };
        let mut state = ModelState::default();
        let (mut tp, mut fp, mut fneg) = (0, 0, 0);
        for n in 0..20_000 {
            let s = sensor.sample(n);
            let score = model.score(&mut state, s.value);
            if n < 30 {
                continue;
            }
            match (score.anomaly, s.anomaly) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fneg += 1,
                _ => {}
            }
        }
        let recall = tp as f64 / (tp + fneg) as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        assert!(recall > 0.8 && precision > 0.8, "recall {recall:.3} precision {precision:.3} (tp {tp} fp {fp} fn {fneg})");
    }
}
