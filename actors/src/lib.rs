//! The standard actor kinds of Strata, registered by name for `[[actors]]` in node configs:
//!
//! | kind        | inputs     | outputs                      | does |
//! |-------------|------------|------------------------------|------|
//! | `sensor`    | -          | readings                     | emits readings from a seeded generator at `rate_hz` |
//! | `inference` | readings   | decisions                    | scores readings with a model (`ewma`: streaming z-score; `onnx`: a window model run with tract) |
//! | `arbiter`   | decisions  | commands, escalations        | acts within the autonomy bounds, escalates the rest |
//! | `chaos`     | -          | -                            | fails on purpose every `every_ms` (drills, demos) |
//!
//! Each kind checks its `params` when the config is checked (`strata check`), with errors that
//! name the parameter. They are also the reference for integrators: each is a plain
//! [`strata_core::Behaviour`].

pub mod arbiter;
pub mod chaos;
pub mod inference;
pub mod sensor;

use serde::de::DeserializeOwned;
use strata_core::config::ActorSpec;
use strata_core::Registry;

/// A registry with every standard kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("sensor", sensor::Sensor::from_spec);
    r.register("inference", inference::Inference::from_spec);
    r.register("arbiter", arbiter::Arbiter::from_spec);
    r.register("chaos", chaos::Chaos::from_spec);
    r
}

/// Parses a kind's `params` table into its typed parameters (unknown keys refused).
pub fn params<P: DeserializeOwned>(spec: &ActorSpec) -> Result<P, String> {
    spec.params()
}

/// The `i`th output of `spec`, or an error naming what it is for.
pub fn output(spec: &ActorSpec, i: usize, what: &str) -> Result<strata_core::StreamName, String> {
    spec.outputs.get(i).cloned().ok_or_else(|| format!("outputs[{i}]: a stream for {what} is required"))
}
