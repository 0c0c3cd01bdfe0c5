//! `chaos`: fails on purpose, for drills and demos — every `every_ms` it panics
//! (`fail = "panic"`, the default) or returns an error (`fail = "error"`), so an operator can
//! watch the supervisor restart it, back off, and escalate when the failures are too frequent.
//! It has no inputs and no outputs.

use std::time::Duration;

use serde::Deserialize;
use strata_core::config::ActorSpec;
use strata_core::{ActorError, Behaviour, Ctx, Envelope};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosParams {
    /// Time from (re)start to the failure, in ms. Required, at least 1.
    pub every_ms: u64,
    /// `panic` or `error`. Default `panic`.
    #[serde(default = "d_fail")]
    pub fail: String,
}

fn d_fail() -> String {
    "panic".into()
}

pub struct Chaos {
    every: Duration,
    panic: bool,
}

impl Chaos {
    pub fn from_spec(spec: &ActorSpec) -> Result<Chaos, String> {
        let p: ChaosParams = crate::params(spec)?;
        if p.every_ms == 0 {
            return Err("every_ms: must be at least 1".into());
        }
        let panic = match p.fail.as_str() {
            "panic" => true,
            "error" => false,
            other => return Err(format!("fail: {other:?} is not \"panic\" or \"error\"")),
        };
        if !spec.inputs.is_empty() || !spec.outputs.is_empty() {
            return Err("a chaos actor has no inputs and no outputs".into());
        }
        Ok(Chaos { every: Duration::from_millis(p.every_ms), panic })
    }
}

impl Behaviour for Chaos {
    type State = ();

    async fn start(&self, _: &mut Ctx) -> Result<(), ActorError> {
        Ok(())
    }

    async fn handle(&self, _: &mut Ctx, _: &mut (), _: &Envelope) -> Result<(), ActorError> {
        Ok(())
    }

    async fn tick(&self, ctx: &mut Ctx, _: &mut ()) -> Result<(), ActorError> {
        if self.panic {
            panic!("chaos actor {}: failing on purpose", ctx.name());
        }
        Err(format!("chaos actor {}: failing on purpose", ctx.name()).into())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.every)
    }
}
