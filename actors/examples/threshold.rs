//! An integrator's own actor kind, run in a node next to the standard ones.
//!
//! `threshold` raises an alarm on `outputs[0]` for every reading whose `value` exceeds
//! `params.limit`, and counts its alarms in a snapshot (so a restarted instance continues the
//! count). This program is a complete node binary: the standard kinds plus `threshold`,
//! configured from a TOML file, stopped by SIGINT or SIGTERM.
//!
//! ```sh
//! cargo run -p strata-actors --example threshold -- my-node.toml
//! ```
//!
//! with, in `my-node.toml`:
//!
//! ```toml
//! [[actors]]
//! kind = "threshold"
//! name = "overheat"
//! inputs = ["readings/line-3"]
//! outputs = ["alarms"]
//! params = { limit = 25.0 }
//! ```

use std::process::ExitCode;

use serde::Deserialize;
use strata_core::config::ActorSpec;
use strata_core::log::Draft;
use strata_core::node::Node;
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, NodeConfig, PayloadType, Registry, StreamName};

/// Emits an alarm when a reading's value exceeds `limit`.
struct Threshold {
    limit: f64,
    alarms: StreamName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Values above this raise an alarm. Required.
    limit: f64,
}

impl Threshold {
    /// Checks the config's `params` and `outputs`; called at `strata check` and every start.
    fn from_spec(spec: &ActorSpec) -> Result<Threshold, String> {
        let p: Params = strata_actors::params(spec)?;
        if !p.limit.is_finite() {
            return Err(format!("limit: {} is not a finite number", p.limit));
        }
        Ok(Threshold { limit: p.limit, alarms: strata_actors::output(spec, 0, "the alarms")? })
    }
}

impl Behaviour for Threshold {
    /// Alarms raised so far.
    type State = u64;

    async fn start(&self, ctx: &mut Ctx) -> Result<u64, ActorError> {
        Ok(ctx.snapshot().and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes))
    }

    async fn handle(&self, ctx: &mut Ctx, alarms: &mut u64, input: &Envelope) -> Result<(), ActorError> {
        let Ok(reading) = serde_json::from_slice::<serde_json::Value>(&input.payload) else { return Ok(()) };
        let Some(value) = reading["value"].as_f64() else { return Ok(()) };
        if value > self.limit {
            *alarms += 1;
            let alarm = serde_json::json!({ "reading": input.id.to_string(), "value": value, "limit": self.limit, "alarms": *alarms });
            ctx.emit(&self.alarms, Draft::new(Kind::Event, PayloadType::new("example.alarm/1")?, alarm.to_string().into_bytes()))?;
            ctx.save_snapshot(alarms.to_le_bytes().to_vec());
        }
        Ok(())
    }
}

/// The standard kinds plus ours.
fn registry() -> Registry {
    let mut r = strata_actors::registry();
    r.register("threshold", Threshold::from_spec);
    r
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: threshold <node-config.toml>");
        return ExitCode::from(2);
    };
    let config = match NodeConfig::load(std::path::Path::new(&path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let node = match Node::start(config, &registry()).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("threshold: {e}");
            return ExitCode::from(1);
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    node.shutdown().await;
    ExitCode::SUCCESS
}
