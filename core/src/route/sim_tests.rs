//! Deterministic simulation of router + estimator + mode machine through seeded schedules of
//! tier loss, latency spikes, partitions and recoveries. Each seed is a 10 s world at 1 ms
//! steps; every invariant is checked on every request and every mode change:
//!
//! - no request is sent whose plan cannot meet its deadline by the estimates (p95 + margin +
//!   fallback within the budget, and timeout + fallback within the budget);
//! - every decision meets its deadline (a late or lost answer leaves the fallback its time);
//! - no autonomous action outside the current mode's bounds;
//! - modes never skip hysteresis: a mode is entered upward only after every observation of
//!   the last `recover_hold` allowed at least that mode.
//!
//! `STRATA_ROUTE_SEEDS=<n>` runs more seeds; `STRATA_ROUTE_SEED=<s>` replays one.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{plan_ask, Ask, Candidate, Estimator, Policy, Route, Target};
use crate::config::AutonomySection;
use crate::mode::{bounds, judge, target, Health, Mode, ModeMachine, Verdict};
use crate::model::{MonoTime, NodeId, Priority, Tier};

const STEPS_MS: u64 = 10_000;
const BUDGET_US: u64 = 20_000;
const REQUEST_EVERY_MS: u64 = 10;
const PROBE_EVERY_MS: u64 = 100;
/// Liveliness detection delay (Zenoh lease).
const DETECT_MS: u64 = 1_000;
const HOLD: Duration = Duration::from_millis(3_000);

/// One remote tier of the simulated world.
struct World {
    base_us: u64,
    /// (from_ms, to_ms, factor) latency spikes.
    spikes: Vec<(u64, u64, u64)>,
    /// (from_ms, to_ms) outages.
    outages: Vec<(u64, u64)>,
}

impl World {
    fn random(rng: &mut StdRng, base_us: std::ops::Range<u64>) -> World {
        let interval = |rng: &mut StdRng| {
            let from = rng.gen_range(0..STEPS_MS);
            (from, from + rng.gen_range(100..4_000))
        };
        let spikes = (0..rng.gen_range(0..3)).map(|_| {
            let (a, b) = interval(rng);
            (a, b, rng.gen_range(2..8))
        });
        let spikes = spikes.collect();
        let outages = (0..rng.gen_range(0..3)).map(|_| interval(rng)).collect();
        World { base_us: rng.gen_range(base_us), spikes, outages }
    }

    fn up(&self, t_ms: u64) -> bool {
        !self.outages.iter().any(|&(a, b)| (a..b).contains(&t_ms))
    }

    fn latency_us(&self, t_ms: u64, rng: &mut StdRng) -> u64 {
        let factor = self.spikes.iter().filter(|&&(a, b, _)| (a..b).contains(&t_ms)).map(|s| s.2).max().unwrap_or(1);
        // ±25 % jitter.
        self.base_us * factor * rng.gen_range(75..=125) / 100
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    met: u64,
    by_route: [u64; 3],
    expired: u64,
    transitions: u64,
    escalations: u64,
}

fn run_seed(seed: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let fog = World::random(&mut rng, 2_000..6_000);
    let cloud = World::random(&mut rng, 5_000..15_000);
    let unhealthy: Option<(u64, u64)> = rng.gen_bool(0.2).then(|| {
        let from = rng.gen_range(0..STEPS_MS);
        (from, from + rng.gen_range(100..2_000))
    });
    let policy = Policy {
        preference: vec![Tier::Cloud, Tier::Fog, Tier::Edge],
        safety_margin_us: 2_000,
        fallback_us: rng.gen_range(500..3_000),
        samples_min: 3,
        hedging: rng.gen_bool(0.5),
    };
    let autonomy = AutonomySection::default();
    let targets = [
        Target { tier: Tier::Fog, node: NodeId::new("fog-1").unwrap(), capability: "anomaly".into() },
        Target { tier: Tier::Cloud, node: NodeId::new("cloud-1").unwrap(), capability: "anomaly".into() },
    ];
    let worlds = [&fog, &cloud];
    let mut est = Estimator::new(16);
    let mut modes = ModeMachine::new(Tier::Edge, HOLD);
    // Per mode, the last time the target was below it (for the hysteresis check).
    let mut last_below: [Option<u64>; 4] = [None; 4];
    let mut tally = Tally::default();
    let ctx = |what: &str| format!("seed {seed}: {what} (replay: STRATA_ROUTE_SEED={seed})");

    for t in 0..STEPS_MS {
        let now = MonoTime::from_micros(t * 1000);
        // What the edge believes: reachability lags the truth by the detection delay.
        let seen = t.saturating_sub(DETECT_MS);
        let believed = |w: &World| w.up(seen) && w.up(t.saturating_sub(DETECT_MS / 2));
        let mut reachable = BTreeSet::new();
        for (target, w) in targets.iter().zip(worlds) {
            if believed(w) {
                reachable.insert(target.tier);
            }
        }
        let healthy = !unhealthy.is_some_and(|(a, b)| (a..b).contains(&t));
        let health = Health { reachable, healthy };
        let want = target(Tier::Edge, &health);
        for m in [Mode::Safe, Mode::Isolated, Mode::NoCloud, Mode::Full] {
            if want < m {
                last_below[m as usize] = Some(t);
            }
        }
        if let Some(tr) = modes.observe(now, &health) {
            tally.transitions += 1;
            if tr.to > tr.from {
                // Every observation in [t - hold, t] allowed at least the new mode.
                let hold_ms = HOLD.as_millis() as u64;
                let held = match last_below[tr.to as usize] {
                    Some(below) => t - below > hold_ms,
                    None => t >= hold_ms,
                };
                assert!(held, "{}", ctx(&format!("{:?} -> {:?} at {t} ms skipped the hold", tr.from, tr.to)));
            }
        }

        if t % PROBE_EVERY_MS == 0 {
            for (target, w) in targets.iter().zip(worlds) {
                if health.reachable.contains(&target.tier) {
                    if w.up(t) {
                        let l = w.latency_us(t, &mut rng);
                        est.observe(target, now, l);
                    } else {
                        est.timed_out(target, now, BUDGET_US);
                    }
                }
            }
        }
        if t % REQUEST_EVERY_MS != 0 {
            continue;
        }
        // A request that waited in a local queue arrives with part of its budget spent;
        // now and then it is already late.
        let queued_us = if rng.gen_bool(0.01) { BUDGET_US } else { rng.gen_range(0..3_000) };
        let budget = BUDGET_US.saturating_sub(queued_us);
        let candidates: Vec<Candidate> =
            targets.iter().map(|tg| Candidate { target: tg.clone(), reachable: health.reachable.contains(&tg.tier), summary: est.summary(tg) }).collect();
        // Sometimes the node is busy: its own fallback is slower then (up to 5x: still within
        // the budget, so every decision can meet its deadline).
        let local_load = if rng.gen_bool(0.3) { rng.gen_range(0.0..0.8) } else { 0.0 };
        let priority = [Priority::LOW, Priority::NORMAL, Priority::HIGH, Priority::CRITICAL][rng.gen_range(0..4)];
        let fallback_us = (policy.fallback_us as f64 / (1.0 - f64::min(local_load, 0.9))).ceil() as u64;
        let p = plan_ask(Tier::Edge, &Ask { budget_us: budget, priority, local_load }, &candidates, &policy);
        assert!(p.hedge.is_none() || priority >= Priority::HIGH, "{}", ctx("hedged a request below HIGH priority"));
        tally.requests += 1;
        let mut remote_answer = |target: &Target, timeout_us: u64, rng: &mut StdRng| -> Option<u64> {
            let w = if target.tier == Tier::Fog { &fog } else { &cloud };
            let l = w.up(t).then(|| w.latency_us(t, rng));
            match l {
                Some(l) if l <= timeout_us => {
                    est.observe(target, now, l);
                    Some(l)
                }
                _ => {
                    est.timed_out(target, now, timeout_us);
                    None
                }
            }
        };
        let (taken_us, decided_by) = match &p.route {
            Route::Expired => {
                tally.expired += 1;
                assert_eq!(budget, 0, "{}", ctx("expired with budget left"));
                continue;
            }
            Route::Local => (fallback_us, 0),
            Route::Remote { target, timeout_us, estimate_us } => {
                assert!(
                    estimate_us + policy.safety_margin_us + fallback_us <= budget && timeout_us + fallback_us <= budget,
                    "{}",
                    ctx(&format!("sent a request that cannot meet its deadline: {p:?} budget {budget}"))
                );
                assert!(health.reachable.contains(&target.tier), "{}", ctx("sent to an unreachable tier"));
                let first = remote_answer(target, *timeout_us, &mut rng);
                let hedged = p.hedge.as_ref().and_then(|(h, to)| remote_answer(h, *to, &mut rng).map(|l| (l, h.tier)));
                let tier_idx = |tier: Tier| if tier == Tier::Fog { 1 } else { 2 };
                match (first, hedged) {
                    (Some(a), Some((b, tier))) if b < a => (b, tier_idx(tier)),
                    (Some(a), _) => (a, tier_idx(target.tier)),
                    (None, Some((b, tier))) => (b, tier_idx(tier)),
                    (None, None) => (timeout_us + fallback_us, 0),
                }
            }
        };
        tally.by_route[decided_by] += 1;
        if taken_us <= budget {
            tally.met += 1;
        }
        assert!(taken_us <= budget, "{}", ctx(&format!("deadline missed: took {taken_us} µs of {budget}: {p:?}")));

        // The arbiter: a random proposed action, judged in the current mode.
        let action = ["log", "alert", "adjust", "stop"][rng.gen_range(0..4)];
        let risk: f64 = rng.gen_range(0.0..1.0);
        let b = bounds(&autonomy, modes.mode());
        let allowed = b.actions.iter().any(|a| a.as_str() == action) && risk <= b.risk_max;
        match judge(&autonomy, modes.mode(), action, risk) {
            Verdict::Autonomous => assert!(allowed, "{}", ctx(&format!("{action} at risk {risk} taken autonomously in {:?}", modes.mode()))),
            Verdict::Escalate(_) => {
                assert!(!allowed, "{}", ctx("escalated an action inside the bounds"));
                tally.escalations += 1;
            }
        }
    }
    tally
}

#[test]
fn router_modes_and_bounds_hold_their_invariants_over_seeded_schedules() {
    let seeds: Vec<u64> = match std::env::var("STRATA_ROUTE_SEED") {
        Ok(s) => vec![s.parse().expect("STRATA_ROUTE_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("STRATA_ROUTE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
            (0..n).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED).collect()
        }
    };
    let mut total = Tally::default();
    for &seed in &seeds {
        let t = run_seed(seed);
        total.requests += t.requests;
        total.met += t.met;
        total.expired += t.expired;
        total.transitions += t.transitions;
        total.escalations += t.escalations;
        for i in 0..3 {
            total.by_route[i] += t.by_route[i];
        }
    }
    println!(
        "{} seeds: {} requests ({} expired, never sent), deadline met {} of {} decided; decided by edge/fog/cloud {:?}; {} mode transitions; {} escalations",
        seeds.len(),
        total.requests,
        total.expired,
        total.met,
        total.requests - total.expired,
        total.by_route,
        total.transitions,
        total.escalations
    );
    // The schedules must exercise every route, or the invariants were checked on nothing.
    assert!(total.by_route.iter().all(|&n| n > 0), "{:?}", total.by_route);
    assert!(total.transitions > 0 && total.escalations > 0 && total.expired > 0);
}
