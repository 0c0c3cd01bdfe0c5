//! Deadline-aware routing: which tier takes a decision. Pure: no Zenoh, no RocksDB, no
//! tokio, no clock reads; time and the world are arguments.
//!
//! Given a request's remaining budget, the candidates that serve its capability (reachability
//! and latency [`estimate`]s) and the [`Policy`], [`plan`] returns where to send it, the
//! timeout to send it with — always leaving the local fallback the time it needs, so a late or
//! lost answer still ends in a decision within the deadline — and the reason in words:
//!
//! ```text
//! cloud cloud-1: p95 38.0 ms > 16.0 ms available; fog fog-1: p95 6.0 ms fits (timeout 16.0 ms)
//! ```
//!
//! Tiers are tried in the policy's preference order (most capable first by default); within a
//! tier the node with the lowest p95 wins. A tier fits when its p95 is within the budget less
//! the safety margin and the fallback's time. Reaching the node's own tier (or a lower one)
//! means deciding locally. A request whose budget is already spent is never sent
//! ([`Route::Expired`]: the caller records a `DeadlineMiss`).
//!
//! The request's [`Ask`] also carries its priority and the node's local load: under load the
//! local fallback is slower, so its reserve grows (`fallback / (1 - load)`, load capped at 0.9)
//! and a remote tier must answer sooner to fit; hedging (a second tier asked at once, which
//! doubles the remote work) is spent only on requests of priority `HIGH` or above.

pub mod estimate;
#[cfg(test)]
mod sim_tests;

use std::fmt::Write as _;

use crate::model::{Priority, Tier};
pub use estimate::{Estimator, Summary, Target};

/// Routing policy (from `[routing]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Tiers, most preferred first.
    pub preference: Vec<Tier>,
    /// Reserve kept when judging whether a tier fits, in µs.
    pub safety_margin_us: u64,
    /// Time the local fallback needs to decide, in µs.
    pub fallback_us: u64,
    /// Samples an estimate needs before a tier is trusted with requests (probes fill it).
    pub samples_min: usize,
    /// Also send to the next fitting tier when the chosen one's estimate is uncertain.
    pub hedging: bool,
}

impl Policy {
    pub fn from_config(r: &crate::config::RoutingSection) -> Policy {
        Policy {
            preference: r.preference.clone(),
            safety_margin_us: r.safety_margin_ms * 1000,
            fallback_us: r.fallback_ms * 1000,
            samples_min: r.estimate_samples_min,
            hedging: r.hedging,
        }
    }
}

/// A node that serves the capability, as the caller sees it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub target: Target,
    pub reachable: bool,
    pub summary: Option<Summary>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Ask `target`, waiting at most `timeout_us`; on no answer, decide locally.
    Remote { target: Target, timeout_us: u64, estimate_us: u64 },
    /// Decide here (the local model, or the fallback rule).
    Local,
    /// The budget is spent: do not send; record a deadline miss.
    Expired,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub route: Route,
    /// A second remote asked at the same time (hedging), with its timeout.
    pub hedge: Option<(Target, u64)>,
    pub reason: String,
}

/// The separator before the next clause of a reason.
fn sep(reason: &str) -> &'static str {
    if reason.is_empty() || reason.ends_with("; ") {
        ""
    } else {
        "; "
    }
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// What is being planned: the time left, how urgent it is, how busy this node is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask {
    /// Time left before the deadline, in µs.
    pub budget_us: u64,
    pub priority: Priority,
    /// This node's load, 0.0 (idle) ..= 1.0 (saturated): e.g. its decision backlog.
    pub local_load: f64,
}

impl Ask {
    /// A request of normal priority on an idle node.
    pub fn new(budget_us: u64) -> Ask {
        Ask { budget_us, priority: Priority::NORMAL, local_load: 0.0 }
    }
}

/// Plans one request of a node on tier `local` with `budget_us` left before its deadline
/// (normal priority, idle node: see [`plan_ask`]).
pub fn plan(local: Tier, budget_us: u64, candidates: &[Candidate], policy: &Policy) -> Plan {
    plan_ask(local, &Ask::new(budget_us), candidates, policy)
}

/// Plans one request of a node on tier `local`.
pub fn plan_ask(local: Tier, ask: &Ask, candidates: &[Candidate], policy: &Policy) -> Plan {
    let budget_us = ask.budget_us;
    if budget_us == 0 {
        return Plan { route: Route::Expired, hedge: None, reason: "deadline passed before sending".into() };
    }
    // Unknown (NaN) counts as saturated; capped so the reserve stays finite.
    let load = if ask.local_load.is_nan() { 0.9 } else { ask.local_load.clamp(0.0, 0.9) };
    let fallback_us = (policy.fallback_us as f64 / (1.0 - load)).ceil() as u64;
    let reserve = policy.safety_margin_us + fallback_us;
    let mut reason = String::new();
    if fallback_us > policy.fallback_us {
        let _ = write!(reason, "local load {load:.2}: fallback reserve {}; ", ms(fallback_us));
    }
    let Some(available) = budget_us.checked_sub(reserve).filter(|&a| a > 0) else {
        let _ = write!(reason, "budget {} <= margin + fallback {}: local", ms(budget_us), ms(reserve));
        return Plan { route: Route::Local, hedge: None, reason };
    };
    let hedging = policy.hedging && ask.priority >= Priority::HIGH;
    let mut fitting: Vec<(&Candidate, Summary)> = Vec::new();
    for &tier in &policy.preference {
        if tier <= local {
            if fitting.is_empty() {
                let _ = write!(reason, "{}{tier}: local", sep(&reason));
                return Plan { route: Route::Local, hedge: None, reason };
            }
            break;
        }
        let mut best: Option<(&Candidate, Summary)> = None;
        for c in candidates.iter().filter(|c| c.target.tier == tier) {
            let sep = sep(&reason);
            let name = format!("{tier} {}", c.target.node);
            match c.summary {
                _ if !c.reachable => {
                    let _ = write!(reason, "{sep}{name}: unreachable");
                }
                Some(s) if s.samples >= policy.samples_min => {
                    if s.p95_us <= available {
                        if best.is_none_or(|(_, b)| s.p95_us < b.p95_us) {
                            best = Some((c, s));
                        }
                    } else {
                        let _ = write!(reason, "{sep}{name}: p95 {} > {} available", ms(s.p95_us), ms(available));
                    }
                }
                s => {
                    let n = s.map_or(0, |s| s.samples);
                    let _ = write!(reason, "{sep}{name}: {n} of {} samples, not yet trusted", policy.samples_min);
                }
            }
        }
        if let Some(found) = best {
            fitting.push(found);
            if !hedging || fitting.len() == 2 {
                break;
            }
            let (_, s) = found;
            let uncertain = s.p95_us > 2 * s.p50_us;
            if !uncertain {
                break;
            }
        }
    }
    match fitting.first() {
        Some(&(c, s)) => {
            let sep = sep(&reason);
            let _ = write!(reason, "{sep}{} {}: p95 {} fits (timeout {})", c.target.tier, c.target.node, ms(s.p95_us), ms(available));
            let hedge = fitting.get(1).map(|(h, hs)| {
                let _ = write!(reason, "; hedged to {} {} (p95 {})", h.target.tier, h.target.node, ms(hs.p95_us));
                (h.target.clone(), available)
            });
            Plan { route: Route::Remote { target: c.target.clone(), timeout_us: available, estimate_us: s.p95_us }, hedge, reason }
        }
        None => {
            let sep = sep(&reason);
            let _ = write!(reason, "{sep}no remote tier fits: local fallback");
            Plan { route: Route::Local, hedge: None, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MonoTime, NodeId};

    fn cand(tier: Tier, node: &str, reachable: bool, p50_ms: u64, p95_ms: u64, samples: usize) -> Candidate {
        Candidate {
            target: Target { tier, node: NodeId::new(node).unwrap(), capability: "anomaly".into() },
            reachable,
            summary: (samples > 0).then_some(Summary { p50_us: p50_ms * 1000, p95_us: p95_ms * 1000, samples, last: MonoTime::ZERO }),
        }
    }

    fn policy(hedging: bool) -> Policy {
        Policy { preference: vec![Tier::Cloud, Tier::Fog, Tier::Edge], safety_margin_us: 2_000, fallback_us: 2_000, samples_min: 3, hedging }
    }

    fn node(p: &Plan) -> Option<&str> {
        match &p.route {
            Route::Remote { target, .. } => Some(target.node.as_str()),
            _ => None,
        }
    }

    #[test]
    fn the_most_capable_tier_that_fits_wins_and_the_reason_says_why() {
        let cands = [cand(Tier::Cloud, "cloud-1", true, 30, 38, 16), cand(Tier::Fog, "fog-1", true, 4, 6, 16)];
        let p = plan(Tier::Edge, 20_000, &cands, &policy(false));
        assert_eq!(p.route, Route::Remote { target: cands[1].target.clone(), timeout_us: 16_000, estimate_us: 6_000 });
        assert_eq!(p.reason, "cloud cloud-1: p95 38.0 ms > 16.0 ms available; fog fog-1: p95 6.0 ms fits (timeout 16.0 ms)");
        let fast_cloud = [cand(Tier::Cloud, "cloud-1", true, 8, 12, 16), cands[1].clone()];
        assert_eq!(node(&plan(Tier::Edge, 20_000, &fast_cloud, &policy(false))), Some("cloud-1"));
    }

    #[test]
    fn unreachable_untrusted_and_slow_tiers_fall_back_to_local() {
        let cands = [cand(Tier::Cloud, "cloud-1", false, 5, 6, 16), cand(Tier::Fog, "fog-1", true, 4, 6, 2)];
        let p = plan(Tier::Edge, 20_000, &cands, &policy(false));
        assert_eq!(p.route, Route::Local);
        assert_eq!(p.reason, "cloud cloud-1: unreachable; fog fog-1: 2 of 3 samples, not yet trusted; edge: local");
        assert_eq!(plan(Tier::Edge, 0, &cands, &policy(false)).route, Route::Expired);
        let p = plan(Tier::Edge, 3_000, &cands, &policy(false));
        assert_eq!((p.route, p.reason.as_str()), (Route::Local, "budget 3.0 ms <= margin + fallback 4.0 ms: local"));
        // A fog node never sends down to the edge, nor to itself.
        let p = plan(Tier::Fog, 20_000, &[cand(Tier::Cloud, "cloud-1", true, 30, 38, 16)], &policy(false));
        assert_eq!(p.route, Route::Local);
        assert_eq!(p.reason, "cloud cloud-1: p95 38.0 ms > 16.0 ms available; fog: local");
    }

    #[test]
    fn within_a_tier_the_fastest_node_wins() {
        let cands = [cand(Tier::Fog, "fog-1", true, 8, 9, 16), cand(Tier::Fog, "fog-2", true, 3, 4, 16)];
        assert_eq!(node(&plan(Tier::Edge, 20_000, &cands, &policy(false))), Some("fog-2"));
    }

    #[test]
    fn hedging_adds_the_next_tier_for_urgent_requests_when_the_estimate_is_uncertain() {
        let uncertain = [cand(Tier::Cloud, "cloud-1", true, 4, 14, 16), cand(Tier::Fog, "fog-1", true, 4, 6, 16)];
        let urgent = Ask { priority: Priority::HIGH, ..Ask::new(20_000) };
        let p = plan_ask(Tier::Edge, &urgent, &uncertain, &policy(true));
        assert_eq!(node(&p), Some("cloud-1"));
        assert_eq!(p.hedge, Some((uncertain[1].target.clone(), 16_000)));
        assert!(p.reason.ends_with("hedged to fog fog-1 (p95 6.0 ms)"), "{}", p.reason);
        let steady = [cand(Tier::Cloud, "cloud-1", true, 10, 12, 16), uncertain[1].clone()];
        assert_eq!(plan_ask(Tier::Edge, &urgent, &steady, &policy(true)).hedge, None);
        assert_eq!(plan_ask(Tier::Edge, &urgent, &uncertain, &policy(false)).hedge, None);
        // Normal priority: not worth doubling the remote work.
        assert_eq!(plan(Tier::Edge, 20_000, &uncertain, &policy(true)).hedge, None);
    }

    #[test]
    fn local_load_grows_the_fallback_reserve() {
        let cands = [cand(Tier::Cloud, "cloud-1", true, 10, 15, 16), cand(Tier::Fog, "fog-1", true, 4, 6, 16)];
        // Idle: 20 - 2 - 2 = 16 ms available, the cloud's 15 ms fits.
        assert_eq!(node(&plan(Tier::Edge, 20_000, &cands, &policy(false))), Some("cloud-1"));
        // Half loaded: the fallback needs 4 ms, 14 ms available: the fog.
        let busy = Ask { local_load: 0.5, ..Ask::new(20_000) };
        let p = plan_ask(Tier::Edge, &busy, &cands, &policy(false));
        assert_eq!(p.route, Route::Remote { target: cands[1].target.clone(), timeout_us: 14_000, estimate_us: 6_000 });
        assert_eq!(
            p.reason,
            "local load 0.50: fallback reserve 4.0 ms; cloud cloud-1: p95 15.0 ms > 14.0 ms available; fog fog-1: p95 6.0 ms fits (timeout 14.0 ms)"
        );
        // Saturated (capped at 0.9): the fallback needs 20 ms: nothing fits but deciding now.
        let saturated = Ask { local_load: f64::NAN, ..Ask::new(20_000) };
        let p = plan_ask(Tier::Edge, &saturated, &cands, &policy(false));
        assert_eq!(
            (p.route, p.reason.as_str()),
            (Route::Local, "local load 0.90: fallback reserve 20.0 ms; budget 20.0 ms <= margin + fallback 22.0 ms: local")
        );
    }
}
