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
    /// Per mode above the current one (indexed by `Mode as usize`): since when the target has
    /// been at or above it without a break. Kept for the modes still above after a partial
    /// rise, so that their holds go on from where they started.
    above: [Option<MonoTime>; 4],
}

impl ModeMachine {
    /// Starts in `Isolated` (nothing is known to be reachable yet): the first observations can
    /// only raise it after the hold, like any recovery.
    pub fn new(own: Tier, hold: Duration) -> ModeMachine {
        ModeMachine { own, mode: if own == Tier::Cloud { Mode::Full } else { Mode::Isolated }, hold, above: [None; 4] }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Feeds an observation at `now`; returns the transition if the mode changed.
    pub fn observe(&mut self, now: MonoTime, health: &Health) -> Option<Transition> {
        let want = target(self.own, health);
        // The holds of the modes the target is below now are broken.
        for (level, since) in self.above.iter_mut().enumerate() {
            if level > want as usize || level <= self.mode as usize {
                *since = None;
            } else if since.is_none() {
                *since = Some(now);
            }
        }
        if want < self.mode {
            return Some(self.change(now, want, format!("degraded: {}", describe(self.own, health))));
        }
        // Up to the highest mode held for `hold`: the target may have risen further during
        // the hold, and that higher mode then has its own, later start.
        let (level, since) = self.above.iter().enumerate().rev().find_map(|(l, s)| s.filter(|s| now.saturating_since(*s) >= self.hold).map(|s| (l, s)))?;
        let to = [Mode::Safe, Mode::Isolated, Mode::NoCloud, Mode::Full][level];
        self.above[..=level].iter_mut().for_each(|s| *s = None);
        let reason = format!("recovered: {} for {} ms", describe(self.own, health), now.saturating_since(since).as_millis());
        Some(self.change(now, to, reason))
    }

    /// When the pending recovery (if any) may happen: for the caller's timer.
    pub fn recovery_due(&self) -> Option<MonoTime> {
        self.above.iter().flatten().min().map(|since| since.saturating_add(self.hold))
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

    /// A recovery that rose only part of the way (the higher mode was reached later in the
    /// hold) goes on to the higher mode once that has held for the hold from its own start,
    /// not after a whole new hold. The higher mode's wait used to start again at the partial
    /// rise: the cloud, reachable from 100 ms, came into use at 6,100 ms instead of 3,100.
    #[test]
    fn after_a_partial_recovery_the_higher_mode_keeps_its_own_hold() {
        let at = |ms: u64| MonoTime::from_micros(ms * 1000);
        let (fog, all) = (health(&[Tier::Fog], true), health(&[Tier::Fog, Tier::Cloud], true));
        let mut m = ModeMachine::new(Tier::Edge, Duration::from_millis(3000));
        assert_eq!(m.observe(at(0), &fog), None);
        assert_eq!(m.observe(at(100), &all), None);
        assert_eq!(m.recovery_due(), Some(at(3000)));
        let t = m.observe(at(3000), &all).unwrap();
        assert_eq!((t.from, t.to, t.reason.as_str()), (Mode::Isolated, Mode::NoCloud, "recovered: reaches fog, cloud for 3000 ms"));
        assert_eq!(m.recovery_due(), Some(at(3100)));
        assert_eq!(m.observe(at(3099), &all), None);
        let t = m.observe(at(3100), &all).unwrap();
        assert_eq!((t.from, t.to, t.reason.as_str()), (Mode::NoCloud, Mode::Full, "recovered: reaches fog, cloud for 3000 ms"));
        assert_eq!(m.recovery_due(), None);
        // A break of the higher mode's hold still restarts it: the cloud lost at 4,000 (down
        // at once) and back at 4,500; the cloud alone at 4,800 keeps full as the target; the
        // fog alone at 5,000 breaks the hold; both again from 5,200.
        assert_eq!(m.observe(at(4000), &fog).map(|t| t.to), Some(Mode::NoCloud));
        assert_eq!(m.observe(at(4500), &all), None);
        assert_eq!(m.observe(at(4800), &health(&[Tier::Cloud], true)), None, "the edge reaches the cloud: still full as a target");
        assert_eq!(m.observe(at(5000), &fog), None);
        assert_eq!(m.observe(at(5200), &all), None);
        assert_eq!(m.observe(at(7600), &all), None, "held since 5,200 only");
        assert_eq!(m.observe(at(8200), &all).map(|t| t.to), Some(Mode::Full));
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
