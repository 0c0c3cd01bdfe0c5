//! Latency estimates per (tier, node, capability): streaming p50/p95 over the most recent
//! answers and probes. Pure: time is an argument.
//!
//! Each estimate keeps the last `samples_max` observations of the whole request latency (round
//! trip including the remote service time) in a ring. Percentiles are nearest-rank over the
//! ring, so a tier that became slow is noticed as soon as slow samples are more than 5% of
//! the ring (with 16 samples: the first slow answer moves p95), and old samples decay out as
//! new answers and probes arrive. A timeout counts as a sample of the timeout's length: a lower
//! bound of the real latency, enough to steer away from that tier.

use std::collections::{BTreeMap, VecDeque};

use crate::model::{MonoTime, NodeId, Tier};

/// Where an estimate applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub tier: Tier,
    pub node: NodeId,
    pub capability: String,
}

/// Percentiles of one target's latency, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub p50_us: u64,
    pub p95_us: u64,
    /// Samples behind the figures.
    pub samples: usize,
    /// When the newest sample was taken.
    pub last: MonoTime,
}

#[derive(Debug, Clone, Default)]
struct Ring {
    latencies_us: VecDeque<u64>,
    last: Option<MonoTime>,
}

/// Estimates for every target seen.
#[derive(Debug, Clone)]
pub struct Estimator {
    samples_max: usize,
    rings: BTreeMap<Target, Ring>,
}

/// Nearest-rank percentile of `sorted` (non-empty), `p` in 0..=1.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Estimator {
    /// `samples_max`: observations kept per target (at least 1).
    pub fn new(samples_max: usize) -> Estimator {
        Estimator { samples_max: samples_max.max(1), rings: BTreeMap::new() }
    }

    /// Records an answer (or probe) from `target` that took `latency_us` in all.
    pub fn observe(&mut self, target: &Target, now: MonoTime, latency_us: u64) {
        let ring = self.rings.entry(target.clone()).or_default();
        if ring.latencies_us.len() == self.samples_max {
            ring.latencies_us.pop_front();
        }
        ring.latencies_us.push_back(latency_us);
        ring.last = Some(now);
    }

    /// Records that `target` did not answer within `timeout_us`: a sample just above the
    /// timeout (the real latency is longer), so a tier that timed out no longer fits the
    /// budget that timeout was derived from.
    pub fn timed_out(&mut self, target: &Target, now: MonoTime, timeout_us: u64) {
        self.observe(target, now, timeout_us.saturating_add(1));
    }

    /// Forgets `target` (its node left): a returning node starts from fresh samples.
    pub fn forget_node(&mut self, node: &NodeId) {
        self.rings.retain(|t, _| &t.node != node);
    }

    /// Forgets one target (its server left): it starts from fresh samples if it returns.
    pub fn forget(&mut self, target: &Target) {
        self.rings.remove(target);
    }

    pub fn summary(&self, target: &Target) -> Option<Summary> {
        let ring = self.rings.get(target)?;
        if ring.latencies_us.is_empty() {
            return None;
        }
        let mut sorted: Vec<u64> = ring.latencies_us.iter().copied().collect();
        sorted.sort_unstable();
        Some(Summary { p50_us: percentile(&sorted, 0.50), p95_us: percentile(&sorted, 0.95), samples: sorted.len(), last: ring.last.unwrap_or(MonoTime::ZERO) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target { tier: Tier::Cloud, node: NodeId::new("cloud-1").unwrap(), capability: "anomaly".into() }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[5], 0.95), 5);
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.95)), (10, 19));
        let v: Vec<u64> = (1..=16).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.95)), (8, 16));
    }

    #[test]
    fn a_tier_that_became_slow_is_noticed_within_a_few_requests_and_recovers() {
        let mut e = Estimator::new(16);
        let t = target();
        let at = MonoTime::from_micros;
        for i in 0..16 {
            e.observe(&t, at(i), 5_000);
        }
        assert_eq!(e.summary(&t).unwrap().p95_us, 5_000);
        e.observe(&t, at(100), 40_000);
        assert_eq!(e.summary(&t).unwrap().p95_us, 40_000, "one slow answer in 16 moves p95");
        assert_eq!(e.summary(&t).unwrap().p50_us, 5_000);
        for i in 0..16 {
            e.observe(&t, at(200 + i), 6_000);
        }
        let s = e.summary(&t).unwrap();
        assert_eq!((s.p50_us, s.p95_us, s.samples, s.last), (6_000, 6_000, 16, at(215)), "the spike decayed out");
        e.timed_out(&t, at(300), 20_000);
        assert_eq!(e.summary(&t).unwrap().p95_us, 20_001, "above the timeout: no longer fits a 20 ms budget");
        e.forget_node(&t.node);
        assert_eq!(e.summary(&t), None);
    }
}
