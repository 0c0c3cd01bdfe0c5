//! `inference`: scores the readings of its inputs with a [`Model`] and emits a decision on
//! `outputs[0]` for each anomaly (or for every reading with `emit_all = true`).
//!
//! Models: `ewma` — a streaming z-score against an exponentially weighted mean and variance
//! (cheap, edge-sized). Its state is snapshotted with each batch, so a restarted actor scores
//! the next reading exactly as the old one would have.
//!
//! Decision payload (`strata.decision/1`): `{"input": "<reading id>", "capability": "anomaly",
//! "model": "ewma-zscore/1", "tier": "edge", "anomaly": true, "score": 9.1, "risk": 0.6,
//! "action": "alert", "label": "anomaly"}` (`label`: the reading's ground truth, if any).

use serde::{Deserialize, Serialize};
use strata_core::config::ActorSpec;
use strata_core::log::Draft;
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, PayloadType, StreamName};

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
    capability: String,
    model: Box<dyn Model>,
    emit_all: bool,
    out: StreamName,
}

impl Inference {
    pub fn from_spec(spec: &ActorSpec) -> Result<Inference, String> {
        let p: InferenceParams = crate::params(spec)?;
        let model: Box<dyn Model> = match p.model.as_str() {
            "ewma" => {
                if !(p.alpha > 0.0 && p.alpha <= 1.0) {
                    return Err(format!("alpha: {} is not in (0, 1]", p.alpha));
                }
                if p.z_threshold <= 0.0 {
                    return Err(format!("z_threshold: {} must be > 0", p.z_threshold));
                }
                Box::new(Ewma { alpha: p.alpha, z_threshold: p.z_threshold, warmup: p.warmup })
            }
            other => return Err(format!("model: unknown model {other:?} (known: ewma)")),
        };
        if spec.inputs.is_empty() {
            return Err("inputs: at least one readings stream is required".into());
        }
        Ok(Inference { capability: p.capability, model, emit_all: p.emit_all, out: crate::output(spec, 0, "the decisions")? })
    }
}

impl Behaviour for Inference {
    type State = ModelState;

    async fn start(&self, ctx: &mut Ctx) -> Result<ModelState, ActorError> {
        Ok(match ctx.snapshot() {
            Some(bytes) => serde_json::from_slice(bytes)?,
            None => ModelState::default(),
        })
    }

    async fn handle(&self, ctx: &mut Ctx, state: &mut ModelState, input: &Envelope) -> Result<(), ActorError> {
        let reading: serde_json::Value = match serde_json::from_slice(&input.payload) {
            Ok(v) => v,
            Err(_) => return Ok(()), // not JSON: not a reading this model can score
        };
        let Some(value) = reading.get("value").and_then(|v| v.as_f64()) else { return Ok(()) };
        let score = self.model.score(state, value);
        ctx.save_snapshot(serde_json::to_vec(state)?);
        if !score.anomaly && !self.emit_all {
            return Ok(());
        }
        let doc = serde_json::json!({
            "input": input.id.to_string(),
            "capability": self.capability,
            "model": self.model.version(),
            "tier": ctx.config().node.tier,
            "anomaly": score.anomaly,
            "score": score.score,
            "risk": score.risk,
            "action": if score.anomaly { "alert" } else { "log" },
            "label": reading.get("label"),
        });
        let draft = Draft::new(Kind::Decision, PayloadType::new(DECISION_TYPE)?, doc.to_string().into_bytes());
        ctx.emit(&self.out, draft)
    }
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
