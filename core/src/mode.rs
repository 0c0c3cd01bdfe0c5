//! Degraded modes and autonomy bounds. Pure: no IO, no clock reads; time is an argument.
//!
//! The mode says what the node can count on: `Full` (the cloud is reachable), `NoCloud` (the
//! fog but not the cloud), `Isolated` (neither), `Safe` (local health failed: even local
//! inference cannot be trusted). Going down is immediate; going up needs the better state to
//! hold continuously for `recover_hold_ms` (hysteresis), so a flapping link does not flap the
//! mode. Every change is a [`Transition`] for the `events` stream.
//!
//! Autonomy bounds map each mode to the action classes allowed without a human and the highest
//! risk allowed; [`judge`] turns a proposed action into `Autonomous` or an escalation reason.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::config::{AutonomySection, Bounds};
use crate::model::{MonoTime, Tier};

/// Ordered by what the node can do: `Safe < Isolated < NoCloud < Full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Safe,
    Isolated,
    NoCloud,
    Full,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Safe => "safe",
            Mode::Isolated => "isolated",
            Mode::NoCloud => "no_cloud",
            Mode::Full => "full",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the node observes: the other tiers it reaches and its own health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub reachable: BTreeSet<Tier>,
    pub healthy: bool,
}

/// The mode a node on tier `own` would be in given `health`, without hysteresis.
pub fn target(own: Tier, health: &Health) -> Mode {
    let reaches = |t: Tier| own == t || health.reachable.contains(&t);
    if !health.healthy {
        Mode::Safe
    } else if reaches(Tier::Cloud) {
        Mode::Full
    } else if reaches(Tier::Fog) {
        Mode::NoCloud
    } else {
        Mode::Isolated
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub from: Mode,
    pub to: Mode,
    #[serde(skip)]
    pub at: MonoTime,
    pub reason: String,
}

/// The mode with hysteresis.
#[derive(Debug, Clone)]
pub struct ModeMachine {
    own: Tier,
    mode: Mode,
    hold: Duration,
    /// Since when the target has been above the mode, and the lowest target seen since.
    better: Option<(MonoTime, Mode)>,
}

impl ModeMachine {
    /// Starts in `Isolated` (nothing is known to be reachable yet): the first observations can
    /// only raise it after the hold, like any recovery.
    pub fn new(own: Tier, hold: Duration) -> ModeMachine {
        ModeMachine { own, mode: if own == Tier::Cloud { Mode::Full } else { Mode::Isolated }, hold, better: None }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Feeds an observation at `now`; returns the transition if the mode changed.
    pub fn observe(&mut self, now: MonoTime, health: &Health) -> Option<Transition> {
        let want = target(self.own, health);
        if want < self.mode {
            self.better = None;
            return Some(self.change(now, want, format!("degraded: {}", describe(self.own, health))));
        }
        if want == self.mode {
            self.better = None;
            return None;
        }
        let (since, lowest) = match self.better {
            Some((since, lowest)) => (since, lowest.min(want)),
            None => (now, want),
        };
        self.better = Some((since, lowest));
        let held = now.saturating_since(since);
        if held >= self.hold {
            self.better = None;
            let reason = format!("recovered: {} for {} ms", describe(self.own, health), held.as_millis());
            return Some(self.change(now, lowest, reason));
        }
        None
    }

    /// When the pending recovery (if any) may happen: for the caller's timer.
    pub fn recovery_due(&self) -> Option<MonoTime> {
        self.better.map(|(since, _)| since.saturating_add(self.hold))
    }

    fn change(&mut self, at: MonoTime, to: Mode, reason: String) -> Transition {
        let from = std::mem::replace(&mut self.mode, to);
        Transition { from, to, at, reason }
    }
}

fn describe(own: Tier, h: &Health) -> String {
    let tiers: Vec<&str> = h.reachable.iter().filter(|&&t| t != own).map(|t| t.as_str()).collect();
    format!("{}reaches {}", if h.healthy { "" } else { "unhealthy; " }, if tiers.is_empty() { "no other tier".to_owned() } else { tiers.join(", ") })
}

/// The autonomy bounds of `mode`.
pub fn bounds(autonomy: &AutonomySection, mode: Mode) -> &Bounds {
    match mode {
        Mode::Full => &autonomy.full,
        Mode::NoCloud => &autonomy.no_cloud,
        Mode::Isolated => &autonomy.isolated,
        Mode::Safe => &autonomy.safe,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Autonomous,
    /// Needs a human; the reason names the bound.
    Escalate(String),
}

/// Whether `action` at `risk` may be taken without a human in `mode`.
pub fn judge(autonomy: &AutonomySection, mode: Mode, action: &str, risk: f64) -> Verdict {
    let b = bounds(autonomy, mode);
    if !b.actions.iter().any(|a| a.as_str() == action) {
        return Verdict::Escalate(format!("action {action:?} is not allowed autonomously in mode {mode}"));
    }
    // A risk is a share: outside [0, 1] (or NaN) it is a broken or forged decision, never
    // within bounds (a negative one would pass any risk_max).
    if !(0.0..=1.0).contains(&risk) {
        return Verdict::Escalate(format!("risk {risk} is not within [0, 1]"));
    }
    if risk > b.risk_max {
        return Verdict::Escalate(format!("risk {risk:.2} > risk_max {:.2} of mode {mode}", b.risk_max));
    }
    Verdict::Autonomous
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(tiers: &[Tier], healthy: bool) -> Health {
        Health { reachable: tiers.iter().copied().collect(), healthy }
    }

    #[test]
    fn targets_follow_reachability_and_health() {
        assert_eq!(target(Tier::Edge, &health(&[Tier::Fog, Tier::Cloud], true)), Mode::Full);
        assert_eq!(target(Tier::Edge, &health(&[Tier::Fog], true)), Mode::NoCloud);
        assert_eq!(target(Tier::Edge, &health(&[], true)), Mode::Isolated);
        assert_eq!(target(Tier::Edge, &health(&[Tier::Cloud], false)), Mode::Safe);
        assert_eq!(target(Tier::Fog, &health(&[], true)), Mode::NoCloud);
        assert_eq!(target(Tier::Cloud, &health(&[], true)), Mode::Full);
    }

    #[test]
    fn down_is_immediate_up_waits_for_the_hold() {
        let at = |ms: u64| MonoTime::from_micros(ms * 1000);
        let mut m = ModeMachine::new(Tier::Edge, Duration::from_millis(3000));
        let all = health(&[Tier::Fog, Tier::Cloud], true);
        assert_eq!(m.observe(at(0), &all), None);
        assert_eq!(m.recovery_due(), Some(at(3000)));
        assert_eq!(m.observe(at(2999), &all), None);
        let t = m.observe(at(3000), &all).unwrap();
        assert_eq!((t.from, t.to, t.reason.as_str()), (Mode::Isolated, Mode::Full, "recovered: reaches fog, cloud for 3000 ms"));
        let t = m.observe(at(4000), &health(&[Tier::Fog], true)).unwrap();
        assert_eq!((t.from, t.to, t.reason.as_str()), (Mode::Full, Mode::NoCloud, "degraded: reaches fog"));
        // Flapping: the cloud comes back for 2 s, goes, comes back: the hold restarts.
        assert_eq!(m.observe(at(5000), &all), None);
        assert_eq!(m.observe(at(7000), &health(&[Tier::Fog], true)), None);
        assert_eq!(m.observe(at(7500), &all), None);
        assert_eq!(m.observe(at(10_000), &all), None);
        assert_eq!(m.observe(at(10_500), &all).map(|t| t.to), Some(Mode::Full));
        // Recovering through a dip: it goes up only as far as held throughout.
        let mut m = ModeMachine::new(Tier::Edge, Duration::from_millis(1000));
        assert_eq!(m.observe(at(0), &all), None);
        assert_eq!(m.observe(at(500), &health(&[Tier::Fog], true)), None);
        assert_eq!(m.observe(at(1000), &all).map(|t| t.to), Some(Mode::NoCloud));
        assert_eq!(m.observe(at(1100), &health(&[], false)).map(|t| t.to), Some(Mode::Safe));
    }

    #[test]
    fn judge_applies_the_bounds_of_the_mode() {
        let a = AutonomySection::default();
        assert_eq!(judge(&a, Mode::Full, "stop", 0.9), Verdict::Autonomous);
        assert_eq!(judge(&a, Mode::Isolated, "stop", 0.5), Verdict::Escalate("risk 0.50 > risk_max 0.40 of mode isolated".into()));
        assert_eq!(judge(&a, Mode::Safe, "stop", 0.0), Verdict::Escalate("action \"stop\" is not allowed autonomously in mode safe".into()));
        assert_eq!(judge(&a, Mode::Full, "alert", f64::NAN), Verdict::Escalate("risk NaN is not within [0, 1]".into()));
        assert_eq!(judge(&a, Mode::Isolated, "stop", -1.0), Verdict::Escalate("risk -1 is not within [0, 1]".into()));
        assert_eq!(judge(&a, Mode::Full, "stop", 1.5), Verdict::Escalate("risk 1.5 is not within [0, 1]".into()));
        assert_eq!(judge(&a, Mode::Full, "stop", 1.0), Verdict::Autonomous);
    }
}
