//! The decisions of an OTP supervisor, without actors or clocks: which children a failure
//! stops and restarts, whether a child's exit calls for a restart, when restarts are too
//! frequent, and how long to wait before the next one. Time is an argument.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{RestartType, Strategy, SupervisionSection};
use crate::model::MonoTime;

/// The supervisor's settings (from `[supervision]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub strategy: Strategy,
    pub restarts_max: u32,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub jitter_pct: u8,
    pub child_shutdown_timeout: Duration,
}

impl Policy {
    pub fn from_config(s: &SupervisionSection) -> Policy {
        Policy {
            strategy: s.strategy,
            restarts_max: s.restarts_max,
            window: Duration::from_millis(s.restart_window_ms),
            backoff_base: Duration::from_millis(s.backoff_base_ms),
            backoff_max: Duration::from_millis(s.backoff_max_ms),
            jitter_pct: s.backoff_jitter_pct,
            child_shutdown_timeout: Duration::from_millis(s.child_shutdown_timeout_ms),
        }
    }
}

/// Whether a child that exited should be restarted: `failed` is false for a normal exit.
pub fn should_restart(restart: RestartType, failed: bool) -> bool {
    match restart {
        RestartType::Permanent => true,
        RestartType::Transient => failed,
        RestartType::Temporary => false,
    }
}

/// After child `failed` (an index in start order) of `n` exits and must be restarted: the
/// other children to stop first (in reverse start order), and the children to start again
/// (in start order).
pub fn plan(strategy: Strategy, failed: usize, n: usize) -> (Vec<usize>, Vec<usize>) {
    assert!(failed < n, "child {failed} of {n}");
    let affected: Vec<usize> = match strategy {
        Strategy::OneForOne => vec![failed],
        Strategy::OneForAll => (0..n).collect(),
        Strategy::RestForOne => (failed..n).collect(),
    };
    let stop = affected.iter().rev().copied().filter(|&i| i != failed).collect();
    (stop, affected)
}

/// Restart intensity: at most `max` restarts within `window`.
#[derive(Debug, Clone)]
pub struct Intensity {
    max: u32,
    window: Duration,
    recent: VecDeque<MonoTime>,
}

impl Intensity {
    pub fn new(max: u32, window: Duration) -> Intensity {
        Intensity { max, window, recent: VecDeque::new() }
    }

    /// Records a restart at `now`. `false` if it is one too many: the supervisor must give up
    /// and escalate. Memory stays bounded by `max + 1` entries.
    pub fn record(&mut self, now: MonoTime) -> bool {
        while self.recent.front().is_some_and(|&t| now.saturating_since(t) >= self.window) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if self.recent.len() > self.max as usize + 1 {
            self.recent.pop_front();
        }
        self.recent.len() <= self.max as usize
    }

    /// Restarts within the window (the one just recorded included).
    pub fn count(&self) -> usize {
        self.recent.len()
    }
}

/// The delay before restart number `attempt` (1-based) within the window: `base * 2^(attempt-1)`,
/// at most `max`, plus `jitter` (a fraction in 0.0..1.0 of `jitter_pct` percent of it).
pub fn backoff(policy: &Policy, attempt: usize, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32) as u32;
    let delay = policy.backoff_base.saturating_mul(1u32 << doublings.min(31)).min(policy.backoff_max);
    let spread = delay.mul_f64(f64::from(policy.jitter_pct) / 100.0 * jitter.clamp(0.0, 1.0));
    delay + spread
}

/// The longest the backoff alone spaces `restarts_max + 1` failures of a child that fails as
/// soon as it starts (every delay at its full jitter). Unless it is shorter than the window,
/// such a child may never reach the restart intensity: its supervisor would restart it for
/// ever instead of giving up.
pub fn backoff_span(policy: &Policy) -> Duration {
    // From the 33rd restart on, every delay is the same (`backoff` doubles at most 32 times).
    let n = policy.restarts_max as usize;
    let varying: Duration = (1..=n.min(33)).map(|a| backoff(policy, a, 1.0)).sum();
    let same = backoff(policy, 33, 1.0).saturating_mul(n.saturating_sub(33).min(u32::MAX as usize) as u32);
    varying.saturating_add(same)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that fails as soon as it starts, restarted after each backoff (at full jitter):
    /// the restart at which its supervisor gives up, if it does within `tries`.
    fn gives_up_after(policy: &Policy, tries: usize) -> Option<usize> {
        let mut intensity = Intensity::new(policy.restarts_max, policy.window);
        let mut now = MonoTime::ZERO;
        for n in 1..=tries {
            if !intensity.record(now) {
                return Some(n);
            }
            now = now.saturating_add(backoff(policy, intensity.count(), 1.0));
        }
        None
    }

    /// The rule `config` checks (`backoff_span` under the window) is what makes a crash loop
    /// end: the defaults give up at the 6th failure; 8 restarts in the same 10 s with the same
    /// backoff (a span of 13.6 s) never do.
    #[test]
    fn a_crash_loop_ends_only_if_the_backoff_span_fits_in_the_window() {
        let defaults = Policy::from_config(&SupervisionSection::default());
        assert_eq!(backoff_span(&defaults), Duration::from_millis(1860));
        assert_eq!(gives_up_after(&defaults, 1000), Some(6));
        let eight = Policy { restarts_max: 8, ..defaults.clone() };
        assert_eq!(backoff_span(&eight), Duration::from_millis(13_620));
        assert_eq!(gives_up_after(&eight, 1000), None, "restarted for ever");
        let longer = Policy { window: Duration::from_millis(13_621), ..eight };
        assert_eq!(gives_up_after(&longer, 1000), Some(9));
        let many = Policy { restarts_max: u32::MAX, ..defaults };
        assert!(backoff_span(&many) > Duration::from_secs(86_400), "saturates, never wraps");
    }

    #[test]
    fn strategies_stop_and_restart_exactly_their_children() {
        let check = |s, failed, n, stop: &[usize], restart: &[usize]| {
            assert_eq!(plan(s, failed, n), (stop.to_vec(), restart.to_vec()), "{s:?} {failed}/{n}");
        };
        check(Strategy::OneForOne, 1, 4, &[], &[1]);
        check(Strategy::OneForAll, 1, 4, &[3, 2, 0], &[0, 1, 2, 3]);
        check(Strategy::RestForOne, 1, 4, &[3, 2], &[1, 2, 3]);
        check(Strategy::RestForOne, 3, 4, &[], &[3]);
        check(Strategy::OneForAll, 0, 1, &[], &[0]);
    }

    #[test]
    fn restart_types() {
        assert!(should_restart(RestartType::Permanent, false));
        assert!(should_restart(RestartType::Permanent, true));
        assert!(!should_restart(RestartType::Transient, false));
        assert!(should_restart(RestartType::Transient, true));
        assert!(!should_restart(RestartType::Temporary, true));
    }

    #[test]
    fn intensity_allows_max_restarts_in_the_window() {
        let ms = MonoTime::from_micros;
        let mut i = Intensity::new(3, Duration::from_secs(1));
        assert!(i.record(ms(0)));
        assert!(i.record(ms(100_000)));
        assert!(i.record(ms(200_000)));
        assert!(!i.record(ms(300_000)), "the 4th in 1 s is too many");
        let mut i = Intensity::new(3, Duration::from_secs(1));
        for t in [0, 100_000, 200_000] {
            assert!(i.record(ms(t)));
        }
        assert!(i.record(ms(1_050_000)), "the first one left the window");
        let mut i = Intensity::new(0, Duration::from_secs(1));
        assert!(!i.record(ms(0)), "max 0: no restart at all");
    }

    #[test]
    fn backoff_doubles_up_to_the_max_with_bounded_jitter() {
        let p = Policy {
            strategy: Strategy::OneForOne,
            restarts_max: 5,
            window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(300),
            jitter_pct: 20,
            child_shutdown_timeout: Duration::from_secs(1),
        };
        let ms = Duration::from_millis;
        assert_eq!(backoff(&p, 1, 0.0), ms(50));
        assert_eq!(backoff(&p, 2, 0.0), ms(100));
        assert_eq!(backoff(&p, 3, 0.0), ms(200));
        assert_eq!(backoff(&p, 4, 0.0), ms(300));
        assert_eq!(backoff(&p, 40, 0.0), ms(300));
        assert_eq!(backoff(&p, 1, 1.0), ms(60));
        assert_eq!(backoff(&p, 4, 0.5), ms(330));
    }
}
