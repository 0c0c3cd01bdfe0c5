//! `arbiter`: turns decisions (from `inputs`) into commands (`outputs[0]`) when they are
//! inside the autonomy bounds of the current mode, and into escalations (`outputs[1]`) when
//! they are not. Each command's idempotency key is the id of the decision it came from, so a
//! device receiving a command twice (at-least-once delivery) can drop the repeat.
//!
//! The bounds are the node's `[autonomy.<mode>]` for its current mode (`Ctx::mode`).
//! Decisions with action `none` (nothing to do) are skipped; any other decision taken after
//! its deadline (`route: "expired"`, stale input) or with a risk outside [0, 1] is escalated,
//! whatever the bounds; one that missed its deadline (`met: false`) is judged by mode safe's
//! bounds, whatever the mode; one that names no action is refused with a `decision_refused` event. Only this node's own resolutions
//! (from its desk, on `autonomy.resolutions_stream`) are acted on. Resolutions of escalations
//! (`strata.resolution/1`, appended by the node's escalation desk to `autonomy.resolutions_stream`,
//! `decisions` by default) become commands too: the escalated action if an operator approved it,
//! the safe default otherwise; their idempotency key is the escalation's id.
//!
//! Command (`strata.command/1`): `{"key": "<decision id>", "action": "alert", "risk": 0.6}`.
//! Escalation (`strata.escalation/1`): `{"id": "<decision id>", "action": "stop", "risk": 0.9,
//! "mode": "full", "reason": "risk 0.90 > risk_max 0.70"}`.

use strata_core::config::ActorSpec;
use strata_core::log::Draft;
use strata_core::mode::{judge, Verdict};
use strata_core::node::escalate::RESOLUTION_TYPE;
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, PayloadType, StreamName};

pub const COMMAND_TYPE: &str = "strata.command/1";
pub const ESCALATION_TYPE: &str = "strata.escalation/1";

pub struct Arbiter {
    commands: StreamName,
    escalations: StreamName,
}

impl Arbiter {
    pub fn from_spec(spec: &ActorSpec) -> Result<Arbiter, String> {
        if !spec.params.is_empty() {
            let keys: Vec<&String> = spec.params.keys().collect();
            return Err(format!("the arbiter takes no params (its bounds are [autonomy]); got {keys:?}"));
        }
        if spec.inputs.is_empty() {
            return Err("inputs: at least one decisions stream is required".into());
        }
        Ok(Arbiter { commands: crate::output(spec, 0, "the commands")?, escalations: crate::output(spec, 1, "the escalations")? })
    }
}

impl Behaviour for Arbiter {
    type State = ();

    async fn start(&self, _: &mut Ctx) -> Result<(), ActorError> {
        Ok(())
    }

    async fn handle(&self, ctx: &mut Ctx, _: &mut (), input: &Envelope) -> Result<(), ActorError> {
        let Ok(decision) = serde_json::from_slice::<serde_json::Value>(&input.payload) else { return Ok(()) };
        if input.payload_type.as_str() == RESOLUTION_TYPE {
            // Only this node's desk resolves this node's escalations: another node's
            // resolutions, replicated into an input here, are its own arbiter's to act on.
            if &input.id.origin != ctx.node() || input.id.stream != ctx.config().autonomy.resolutions_stream {
                return Ok(());
            }
            // An operator (or the timeout) resolved an escalation: act on it, keyed by the
            // escalation so a repeat is recognisable.
            let (Some(key), Some(action)) = (decision["escalation"].as_str(), decision["action"].as_str()) else { return Ok(()) };
            let doc = serde_json::json!({ "key": key, "action": action, "risk": decision["risk"], "resolution": decision["outcome"] });
            let draft = Draft::new(Kind::Command, PayloadType::new(COMMAND_TYPE)?, doc.to_string().into_bytes());
            return ctx.emit(&self.commands, draft);
        }
        // A decision that names no action is not acted on as if it were a harmless one.
        let Some(action) = decision.get("action").and_then(|a| a.as_str()) else {
            ctx.source().event(serde_json::json!({"event": "decision_refused", "decision": input.id.to_string(), "reason": "it names no action"}));
            return Ok(());
        };
        if action == "none" {
            return Ok(());
        }
        let risk = decision.get("risk").and_then(|r| r.as_f64()).unwrap_or(1.0);
        let key = input.id.to_string();
        let mode = ctx.mode();
        // Taken after its deadline (a backlog handled late, e.g. after a restart): the input
        // is stale, so it is not acted on without an operator.
        let verdict = if decision.get("route").and_then(|r| r.as_str()) == Some("expired") {
            Verdict::Escalate("decided after its deadline (expired): not acted on autonomously".into())
        } else if decision.get("met").and_then(|m| m.as_bool()) == Some(false) {
            // Decided, but after its deadline (e.g. a fallback that ran late): its input may
            // be stale, so it is judged by the narrowest bounds (mode safe's: a late alert
            // still goes out, a late stop waits for an operator), whatever the mode. Not all
            // escalated: under overload, late harmless decisions would fill the desk.
            match judge(&ctx.config().autonomy, strata_core::mode::Mode::Safe, action, risk) {
                Verdict::Autonomous => Verdict::Autonomous,
                Verdict::Escalate(why) => Verdict::Escalate(format!("decided after its deadline (missed), judged by the bounds of mode safe: {why}")),
            }
        } else {
            judge(&ctx.config().autonomy, mode, action, risk)
        };
        let (stream, draft) = match verdict {
            Verdict::Autonomous => {
                let doc = serde_json::json!({ "key": key, "action": action, "risk": risk });
                (&self.commands, Draft::new(Kind::Command, PayloadType::new(COMMAND_TYPE)?, doc.to_string().into_bytes()))
            }
            Verdict::Escalate(reason) => {
                let doc = serde_json::json!({ "id": key, "action": action, "risk": risk, "mode": mode, "reason": reason });
                (&self.escalations, Draft::new(Kind::Escalation, PayloadType::new(ESCALATION_TYPE)?, doc.to_string().into_bytes()))
            }
        };
        ctx.emit(stream, draft)
    }
}
