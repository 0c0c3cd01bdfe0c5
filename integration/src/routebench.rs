//! The routing benchmark's scenario (issue #6, acceptance 4), in virtual time: one fixed,
//! seeded 60 s world replayed against Strata's router and against static policies.
//!
//! What runs is the production code of [`strata_core::route`] (planner and estimator) and
//! [`strata_core::mode`] (mode machine with hysteresis), with the default `[routing]` and
//! `[modes]` settings. The world around them is a discrete-event model, so every policy meets
//! exactly the same requests and faults and the result is reproducible to the request:
//!
//! - an edge node issues 700 decision requests/s (Poisson), 70% with a 20 ms deadline, 30%
//!   with 60 ms; the fog (2 workers, 2 ms per decision) and the cloud (3 workers, 3 ms) each
//!   run at 70% of their capacity if everything is sent to them; round trips edge-fog 1 ms,
//!   edge-cloud 5 ms (through the fog), ±10% jitter; the edge's own fallback decides in 0.5 ms;
//! - after a 5 s warm-up (not counted: the node is already running when the scenario starts):
//!   0-12 s steady; 12-24 s the cloud's round trip spikes by 30 ms; 24-36 s steady again;
//!   36-48 s the fog is lost (and with it the path to the cloud); 48-60 s recovery;
//! - liveliness: a lost node is noticed after 500 ms (lease), a returning one after 200 ms;
//!   Strata probes every server every `probe_interval_ms` through the same queues.
//!
//! Policies: **strata** (plan, send with the planned timeout, local fallback when no answer
//! in time); **always-cloud**, **always-fog**, **always-edge** (send there and wait for the
//! answer; a lost tier never answers). For information, **cloud+fallback**: always the cloud,
//! with Strata's timeout and fallback.
//!
//! **Utility** is the share of requests decided in time *and* by the most capable tier that
//! could have answered in time: the oracle knows the ground truth (is the tier reachable, does
//! its round trip plus service time fit the deadline) at the instant of the request.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_core::config::{ModesSection, RoutingSection};
use strata_core::mode::{Health, ModeMachine};
use strata_core::model::{MonoTime, NodeId, Tier};
use strata_core::route::{plan, Candidate, Estimator, Policy, Route, Target};

pub const SCENARIO_MS: u64 = 60_000;
const RATE_PER_S: f64 = 700.0;
const FALLBACK_US: u64 = 500;
const DETECT_LOSS_US: u64 = 500_000;
const DETECT_RETURN_US: u64 = 200_000;
const MODE_CHECK_US: u64 = 100_000;
/// Requests before the scenario's time 0, to bring the node to its steady state; not counted.
const WARMUP_US: u64 = 5_000_000;

/// The phases of the scenario: (name, from ms, to ms).
pub const PHASES: [(&str, u64, u64); 5] =
    [("steady", 0, 12_000), ("cloud spike", 12_000, 24_000), ("steady", 24_000, 36_000), ("fog lost", 36_000, 48_000), ("recovery", 48_000, 60_000)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Strata,
    Always(Tier),
    CloudWithFallback,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Strata => "strata",
            PolicyKind::Always(Tier::Cloud) => "always-cloud",
            PolicyKind::Always(Tier::Fog) => "always-fog",
            PolicyKind::Always(Tier::Edge) => "always-edge",
            PolicyKind::CloudWithFallback => "cloud+fallback",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Request {
    at_us: u64,
    deadline_us: u64,
    jitter: [f64; 2],
}

/// The world's ground truth.
struct World;

impl World {
    /// Scenario time (0 at the end of the warm-up) of absolute time `t_us`.
    fn at(t_us: u64) -> Option<u64> {
        t_us.checked_sub(WARMUP_US)
    }

    fn fog_up(t_us: u64) -> bool {
        !World::at(t_us).is_some_and(|t| (36_000_000..48_000_000).contains(&t))
    }

    fn up(tier: Tier, t_us: u64) -> bool {
        match tier {
            Tier::Edge => true,
            // The edge reaches the cloud through the fog.
            Tier::Fog | Tier::Cloud => World::fog_up(t_us),
        }
    }

    fn rtt_us(tier: Tier, t_us: u64) -> u64 {
        match tier {
            Tier::Edge => 0,
            Tier::Fog => 1_000,
            Tier::Cloud if World::at(t_us).is_some_and(|t| (12_000_000..24_000_000).contains(&t)) => 35_000,
            Tier::Cloud => 5_000,
        }
    }

    fn service_us(tier: Tier) -> u64 {
        match tier {
            Tier::Edge => FALLBACK_US,
            Tier::Fog => 2_000,
            Tier::Cloud => 3_000,
        }
    }

    fn workers(tier: Tier) -> usize {
        match tier {
            Tier::Fog => 2,
            _ => 3,
        }
    }

    /// Liveliness as the edge sees it: loss noticed after the lease, return after reconnect.
    fn seen_alive(tier: Tier, t_us: u64) -> bool {
        if tier == Tier::Edge {
            return true;
        }
        let (lost, back) = (WARMUP_US + 36_000_000, WARMUP_US + 48_000_000);
        !(lost + DETECT_LOSS_US..back + DETECT_RETURN_US).contains(&t_us)
    }

    /// The most capable tier that could have answered `r` in time.
    fn oracle(r: &Request) -> Tier {
        for tier in [Tier::Cloud, Tier::Fog] {
            if World::up(tier, r.at_us) && World::rtt_us(tier, r.at_us) + World::service_us(tier) <= r.deadline_us {
                return tier;
            }
        }
        Tier::Edge
    }
}

/// FCFS queues of one remote tier's workers.
struct Server {
    tier: Tier,
    free_at: BinaryHeap<Reverse<u64>>,
}

impl Server {
    fn new(tier: Tier) -> Server {
        Server { tier, free_at: (0..World::workers(tier)).map(|_| Reverse(0)).collect() }
    }

    /// Sends a request at `t_us`; the answer's latency, or `None` if the tier is lost.
    fn call(&mut self, t_us: u64, jitter: f64) -> Option<u64> {
        if !World::up(self.tier, t_us) {
            return None;
        }
        let rtt = (World::rtt_us(self.tier, t_us) as f64 * (1.0 + 0.1 * jitter)) as u64;
        let arrive = t_us + rtt / 2;
        let Reverse(free) = self.free_at.pop().expect("workers");
        let done = arrive.max(free) + World::service_us(self.tier);
        self.free_at.push(Reverse(done));
        Some(done + rtt / 2 - t_us)
    }
}

/// What one policy did with the scenario.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub requests: u64,
    pub met: u64,
    pub useful: u64,
    /// Decided by cloud, fog, edge; never decided.
    pub by: [u64; 3],
    pub undecided: u64,
}

impl Tally {
    pub fn met_ratio(&self) -> f64 {
        self.met as f64 / self.requests.max(1) as f64
    }
    pub fn utility(&self) -> f64 {
        self.useful as f64 / self.requests.max(1) as f64
    }
    fn record(&mut self, r: &Request, decided: Option<(Tier, u64)>) {
        self.requests += 1;
        match decided {
            Some((tier, latency_us)) => {
                self.by[match tier {
                    Tier::Cloud => 0,
                    Tier::Fog => 1,
                    Tier::Edge => 2,
                }] += 1;
                if latency_us <= r.deadline_us {
                    self.met += 1;
                    self.useful += u64::from(tier == World::oracle(r));
                }
            }
            None => self.undecided += 1,
        }
    }
}

/// The outcome of one policy: overall, and per phase of [`PHASES`].
#[derive(Debug, Clone)]
pub struct Run {
    pub policy: PolicyKind,
    pub total: Tally,
    pub phases: Vec<Tally>,
    pub mode_changes: u64,
}

fn requests(seed: u64) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0f64;
    let mut out = Vec::new();
    loop {
        t += -(1.0 - rng.gen::<f64>()).ln() / RATE_PER_S * 1e6;
        if t >= (WARMUP_US + SCENARIO_MS * 1000) as f64 {
            return out;
        }
        let deadline_us = if rng.gen_bool(0.7) { 20_000 } else { 60_000 };
        out.push(Request { at_us: t as u64, deadline_us, jitter: [rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0)] });
    }
}

fn target(tier: Tier) -> Target {
    Target { tier, node: NodeId::new(format!("{tier}-1")).expect("valid"), capability: "anomaly".into() }
}

/// Strata's state: estimator fed by answers, timeouts and probes (each applied when it
/// happens), mode machine fed by liveliness.
struct Strata {
    policy: Policy,
    estimator: Estimator,
    machine: ModeMachine,
    /// Observations not yet known to the edge: (at, tier, latency or timeout, timed out).
    pending: BinaryHeap<Reverse<(u64, u8, u64, bool)>>,
    next_probe_us: u64,
    probe_every_us: u64,
    probe_timeout_us: u64,
    next_mode_us: u64,
    mode_changes: u64,
    probe_jitter: StdRng,
}

const TIERS: [Tier; 2] = [Tier::Cloud, Tier::Fog];

impl Strata {
    fn new(seed: u64) -> Strata {
        let (r, m) = (RoutingSection::default(), ModesSection::default());
        Strata {
            policy: Policy::from_config(&r),
            estimator: Estimator::new(r.estimate_samples_max),
            machine: ModeMachine::new(Tier::Edge, Duration::from_millis(m.recover_hold_ms)),
            pending: BinaryHeap::new(),
            next_probe_us: 0,
            probe_every_us: r.probe_interval_ms * 1000,
            probe_timeout_us: r.default_deadline_ms * 1000,
            next_mode_us: 0,
            mode_changes: 0,
            probe_jitter: StdRng::seed_from_u64(seed ^ 0x5eed),
        }
    }

    /// Brings the edge's knowledge up to `t_us`: answers and timeouts that arrived, probes
    /// sent, mode checks. Probes go through the same server queues as requests.
    fn advance(&mut self, t_us: u64, servers: &mut [Server; 2]) {
        loop {
            let next_obs = self.pending.peek().map_or(u64::MAX, |Reverse(o)| o.0);
            let next = next_obs.min(self.next_probe_us).min(self.next_mode_us);
            if next > t_us {
                return;
            }
            if next == next_obs {
                let Reverse((at, i, latency, timed_out)) = self.pending.pop().expect("peeked");
                let tgt = target(TIERS[i as usize]);
                // A server that left is forgotten; a late answer must not revive it.
                if World::seen_alive(tgt.tier, at) {
                    if timed_out {
                        self.estimator.timed_out(&tgt, MonoTime::from_micros(at), latency);
                    } else {
                        self.estimator.observe(&tgt, MonoTime::from_micros(at), latency);
                    }
                }
            } else if next == self.next_probe_us {
                for (i, server) in servers.iter_mut().enumerate() {
                    if World::seen_alive(server.tier, next) {
                        let jitter = self.probe_jitter.gen_range(-1.0..1.0);
                        let obs = match server.call(next, jitter) {
                            Some(l) if l <= self.probe_timeout_us => (next + l, i as u8, l, false),
                            _ => (next + self.probe_timeout_us, i as u8, self.probe_timeout_us, true),
                        };
                        self.pending.push(Reverse(obs));
                    }
                }
                self.next_probe_us += self.probe_every_us;
            } else {
                let reachable = TIERS.into_iter().filter(|&t| World::seen_alive(t, next)).collect();
                if self.machine.observe(MonoTime::from_micros(next), &Health { reachable, healthy: true }).is_some() {
                    self.mode_changes += 1;
                }
                for t in TIERS {
                    if !World::seen_alive(t, next) {
                        self.estimator.forget(&target(t));
                    }
                }
                self.next_mode_us += MODE_CHECK_US;
            }
        }
    }

    fn decide(&mut self, r: &Request, servers: &mut [Server; 2]) -> Option<(Tier, u64)> {
        self.advance(r.at_us, servers);
        let mode = self.machine.mode();
        let candidates: Vec<Candidate> = TIERS
            .into_iter()
            .filter(|&t| World::seen_alive(t, r.at_us))
            .map(|t| {
                let reachable = match t {
                    Tier::Cloud => mode == strata_core::mode::Mode::Full,
                    _ => mode >= strata_core::mode::Mode::NoCloud,
                };
                Candidate { target: target(t), reachable, summary: self.estimator.summary(&target(t)) }
            })
            .collect();
        let p = plan(Tier::Edge, r.deadline_us, &candidates, &self.policy);
        match p.route {
            Route::Expired => None,
            Route::Local => Some((Tier::Edge, FALLBACK_US)),
            Route::Remote { target: tgt, timeout_us, .. } => {
                let i = TIERS.iter().position(|&t| t == tgt.tier).expect("a remote tier");
                match servers[i].call(r.at_us, r.jitter[i]) {
                    Some(l) if l <= timeout_us => {
                        self.pending.push(Reverse((r.at_us + l, i as u8, l, false)));
                        Some((tgt.tier, l))
                    }
                    _ => {
                        self.pending.push(Reverse((r.at_us + timeout_us, i as u8, timeout_us, true)));
                        Some((Tier::Edge, timeout_us + FALLBACK_US))
                    }
                }
            }
        }
    }
}

/// The phase of absolute time `t_us`; `None` during the warm-up.
fn phase_of(t_us: u64) -> Option<usize> {
    let t = World::at(t_us)?;
    Some(PHASES.iter().position(|&(_, a, b)| (a * 1000..b * 1000).contains(&t)).unwrap_or(PHASES.len() - 1))
}

/// Replays the scenario of `seed` against `policy`.
pub fn run(policy: PolicyKind, seed: u64) -> Run {
    let reqs = requests(seed);
    let mut servers = [Server::new(Tier::Cloud), Server::new(Tier::Fog)];
    let mut strata = Strata::new(seed);
    let mut total = Tally::default();
    let mut phases = vec![Tally::default(); PHASES.len()];
    let fallback = RoutingSection::default();
    let reserve_us = (fallback.fallback_ms + fallback.safety_margin_ms) * 1000;
    for r in &reqs {
        let decided = match policy {
            PolicyKind::Strata => strata.decide(r, &mut servers),
            PolicyKind::Always(Tier::Edge) => Some((Tier::Edge, FALLBACK_US)),
            PolicyKind::Always(tier) => {
                let i = TIERS.iter().position(|&t| t == tier).expect("remote");
                servers[i].call(r.at_us, r.jitter[i]).map(|l| (tier, l))
            }
            PolicyKind::CloudWithFallback => {
                let timeout = r.deadline_us - reserve_us;
                match servers[0].call(r.at_us, r.jitter[0]) {
                    Some(l) if l <= timeout => Some((Tier::Cloud, l)),
                    _ => Some((Tier::Edge, timeout + FALLBACK_US)),
                }
            }
        };
        if let Some(phase) = phase_of(r.at_us) {
            total.record(r, decided);
            phases[phase].record(r, decided);
        }
    }
    Run { policy, total, phases, mode_changes: strata.mode_changes }
}

/// Every policy, in the order they are printed.
pub const POLICIES: [PolicyKind; 5] =
    [PolicyKind::Strata, PolicyKind::Always(Tier::Cloud), PolicyKind::Always(Tier::Fog), PolicyKind::Always(Tier::Edge), PolicyKind::CloudWithFallback];

/// The figures the benchmark prints: one row per policy, then Strata per phase.
pub fn report(seed: u64) -> (Vec<Run>, String) {
    use std::fmt::Write as _;
    let runs: Vec<Run> = POLICIES.iter().map(|&p| run(p, seed)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "policy          requests  deadline met  utility   cloud    fog   edge  undecided");
    for r in &runs {
        let t = &r.total;
        let _ = writeln!(
            out,
            "{:<15} {:>8}  {:>11.2}%  {:>6.2}%  {:>6} {:>6} {:>6} {:>10}",
            r.policy.name(),
            t.requests,
            100.0 * t.met_ratio(),
            100.0 * t.utility(),
            t.by[0],
            t.by[1],
            t.by[2],
            t.undecided
        );
    }
    let _ = writeln!(out, "\nstrata per phase: phase          requests  met      utility  cloud    fog   edge");
    for ((name, a, b), t) in PHASES.iter().zip(&runs[0].phases) {
        let _ = writeln!(
            out,
            "  {:<13} {:>5}-{:<2}s {:>6}  {:>6.2}%  {:>6.2}%  {:>5} {:>6} {:>6}",
            name,
            a / 1000,
            b / 1000,
            t.requests,
            100.0 * t.met_ratio(),
            100.0 * t.utility(),
            t.by[0],
            t.by[1],
            t.by[2]
        );
    }
    (runs, out)
}

/// Strata's utility minus the best of the three static policies, in points.
pub fn margin_over_static(runs: &[Run]) -> f64 {
    let strata = runs.iter().find(|r| r.policy == PolicyKind::Strata).expect("strata ran").total.utility();
    let best = runs.iter().filter(|r| matches!(r.policy, PolicyKind::Always(_))).map(|r| r.total.utility()).fold(0.0, f64::max);
    100.0 * (strata - best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets of issue #6 on the fixed scenario: it is virtual time, so this is exact
    /// and deterministic, not a timing assertion.
    #[test]
    fn strata_meets_deadlines_and_uses_capability_better_than_any_static_policy() {
        let (runs, text) = report(1);
        println!("{text}");
        let strata = &runs[0].total;
        assert!(strata.met_ratio() >= 0.99, "{text}");
        assert!(strata.utility() >= 0.90, "{text}");
        assert!(margin_over_static(&runs) >= 15.0, "{text}");
        // The static policies fail the way the issue says they do.
        let by = |p: PolicyKind| runs.iter().find(|r| r.policy == p).unwrap().total.clone();
        assert_eq!(by(PolicyKind::Always(Tier::Edge)).met_ratio(), 1.0);
        assert!(by(PolicyKind::Always(Tier::Edge)).utility() < 0.5);
        assert!(by(PolicyKind::Always(Tier::Cloud)).met_ratio() < 0.9);
        // Same seed, same figures.
        assert_eq!(report(1).1, text);
    }
}
