//! Issue #6, acceptance 2: three real nodes; decisions with 20 ms deadlines keep being taken
//! while the cloud is slowed (a 15 ms one-way delay on the fog-cloud link: they move to the
//! fog), the fog is killed (they move to the edge's local fallback) and the fog comes back
//! (they move back to it once the mode's hold time has passed).

use std::time::{Duration, Instant};

use serde_json::Value;
use strata_integration::proxy::Proxy;
use strata_integration::{free_port, records, status, zenoh_session, NodeProc};

use crate::replication::{serial, wait_async};

const HOLD_MS: u64 = 1500;

fn configs(edge: u16, fog: u16, fog_upstream: u16, cloud: u16) -> [String; 3] {
    let zenoh = |mode: &str, listen: u16, connect: Option<u16>| {
        let connect = connect.map_or(String::new(), |p| format!("\"tcp/127.0.0.1:{p}\""));
        format!(
            "[zenoh]\nmode = \"{mode}\"\nlisten = [\"tcp/127.0.0.1:{listen}\"]\nconnect = [{connect}]\nlease_ms = 1000\nconnect_retry_ms = 100\nopen_timeout_ms = 500\n"
        )
    };
    let node = |id: &str, tier: &str| format!("[node]\nid = \"{id}\"\ntier = \"{tier}\"\ndata_dir = \"{{data_dir}}\"\n");
    let routing = format!("[routing]\ndeadline_ms = {{ anomaly = 20 }}\nprobe_interval_ms = 100\n[modes]\nrecover_hold_ms = {HOLD_MS}\n");
    let server = |name: &str| {
        format!(
            "[[actors]]\nkind = \"inference\"\nname = \"{name}\"\ninputs = [\"edge-1:readings/line-3\"]\noutputs = [\"decisions\"]\n\
             params = {{ capability = \"anomaly\", model = \"ewma\", serve = true }}\n"
        )
    };
    [
        format!(
            "{}{}{routing}\
             [[actors]]\nkind = \"sensor\"\nname = \"line-3\"\noutputs = [\"readings/line-3\"]\nparams = {{ rate_hz = 50, seed = 7 }}\n\
             [[actors]]\nkind = \"inference\"\nname = \"anomaly-local\"\ninputs = [\"readings/line-3\"]\noutputs = [\"decisions\"]\n\
             params = {{ capability = \"anomaly\", model = \"ewma\", route = true }}\n",
            node("edge-1", "edge"),
            zenoh("peer", edge, Some(fog))
        ),
        format!(
            "{}{}[replication]\nsubscribe = [\"edge-1/readings/**\"]\n{routing}{}",
            node("fog-1", "fog"),
            zenoh("router", fog, Some(fog_upstream)),
            server("anomaly-fog")
        ),
        format!(
            "{}{}[replication]\nsubscribe = [\"*/readings/**\"]\n{routing}{}",
            node("cloud-1", "cloud"),
            zenoh("router", cloud, None),
            server("anomaly-cloud")
        ),
    ]
}

/// Whether a decision's reason says that `tier`'s node `node` could not answer in time: its
/// estimate over the budget left (`fog fog-1: p95 7.5 ms > 4.3 ms available`), or no budget
/// left to route with at all.
fn tier_did_not_fit(reason: &str, tier: &str, node: &str) -> bool {
    reason.split("; ").any(|clause| {
        let over = clause.strip_prefix(&format!("{tier} {node}: p95 ")).is_some_and(|c| c.contains(" > ") && c.ends_with(" available"));
        over || (clause.starts_with("budget ") && clause.contains(" <= margin")) || clause == "deadline passed before sending"
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

struct Phase {
    name: &'static str,
    from: u64,
    to: u64,
}

#[derive(Default, Debug)]
struct Tally {
    cloud: u64,
    fog: u64,
    edge: u64,
    met: u64,
    fallback: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.cloud + self.fog + self.edge
    }
    fn share(&self, n: u64) -> f64 {
        n as f64 / self.total().max(1) as f64
    }
}

fn tally<'a>(decisions: impl Iterator<Item = &'a (u64, Value)>) -> Tally {
    let mut t = Tally::default();
    for (_, d) in decisions {
        match d["tier"].as_str() {
            Some("cloud") => t.cloud += 1,
            Some("fog") => t.fog += 1,
            _ => t.edge += 1,
        }
        t.met += u64::from(d["met"] == true);
        t.fallback += u64::from(d["fallback"] == true);
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_follow_the_tier_that_can_meet_their_deadline() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (edge_port, fog_port, cloud_port) = (free_port(), free_port(), free_port());
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{cloud_port}").parse().unwrap()).await.unwrap();
    let [edge_cfg, fog_cfg, cloud_cfg] = configs(edge_port, fog_port, proxy.listen.port(), cloud_port);
    let mut cloud = NodeProc::new(dir.path(), "cloud-1", &cloud_cfg);
    let mut fog = NodeProc::new(dir.path(), "fog-1", &fog_cfg);
    let mut edge = NodeProc::new(dir.path(), "edge-1", &edge_cfg);
    cloud.start();
    fog.start();
    edge.start();
    let view = zenoh_session(&format!("tcp/127.0.0.1:{edge_port}")).await;

    // Warm: the edge is in mode Full and trusts both servers' estimates.
    let warm = wait_async(Duration::from_secs(60), || async {
        let Some(doc) = status(&view, "edge-1").await else { return false };
        let trusted = |node: &str| doc["estimates"].as_array().into_iter().flatten().any(|e| e["node"] == node && e["samples"].as_u64() >= Some(3));
        doc["mode"] == "full" && trusted("cloud-1") && trusted("fog-1")
    })
    .await;
    let doc = status(&view, "edge-1").await.unwrap_or_default();
    assert!(warm, "the edge never trusted both tiers: {:#}\nedge log:\n{}", doc["estimates"], edge.log_text());

    let mut phases = Vec::new();
    let mut phase = |name: &'static str, from: u64| phases.push(Phase { name, from, to: u64::MAX });
    phase("normal", unix_ms());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The cloud becomes slow: 15 ms each way between fog and cloud, so a round trip from
    // the edge no longer fits 20 ms.
    proxy.set_delay(Duration::from_millis(15));
    phase("cloud slow", unix_ms());
    tokio::time::sleep(Duration::from_secs(4)).await;

    fog.kill9();
    phase("fog killed", unix_ms());
    tokio::time::sleep(Duration::from_secs(4)).await;

    fog.start();
    let back = unix_ms();
    phase("fog back", back);
    let t0 = Instant::now();
    let returned = wait_async(Duration::from_secs(60), || async {
        records(&edge.data_dir, "decisions").iter().filter(|(at, d)| *at > back && d["tier"] == "fog").count() >= 100
    })
    .await;
    assert!(returned, "decisions never moved back to the fog\nedge log:\n{}", edge.log_text());
    let moved_back_s = t0.elapsed().as_secs_f64();
    let end = unix_ms();
    assert_eq!(edge.terminate(Duration::from_secs(20)), Some(0));
    for n in [&mut fog, &mut cloud] {
        assert_eq!(n.terminate(Duration::from_secs(20)), Some(0), "{}", n.log_text());
    }
    for i in 0..phases.len() {
        phases[i].to = phases.get(i + 1).map_or(end, |p| p.from);
    }

    let decisions = records(&edge.data_dir, "decisions");
    let events = records(&edge.data_dir, "events");
    report!("phase        decisions  cloud   fog  edge  fallback  deadline met");
    let mut tallies = Vec::new();
    for p in &phases {
        let t = tally(decisions.iter().filter(|(at, _)| (p.from..p.to).contains(at)));
        report!("{:<12} {:>9} {:>6} {:>5} {:>5} {:>9}  {:>5.1}%", p.name, t.total(), t.cloud, t.fog, t.edge, t.fallback, 100.0 * t.share(t.met));
        tallies.push(t);
    }
    report!("fog back: decisions moved back to it within {moved_back_s:.1} s (hold {HOLD_MS} ms)");
    for (p, t) in phases.iter().zip(&tallies) {
        let missed: Vec<String> = decisions
            .iter()
            .filter(|(at, d)| (p.from..p.to).contains(at) && d["met"] != true)
            .take(5)
            .map(|(_, d)| format!("{} {} {} us: {}", d["route"], d["tier"], d["latency_us"], d["reason"]))
            .collect();
        assert!(t.total() >= 50, "{}: only {} decisions", p.name, t.total());
        // Generous: the point is that decisions keep being taken in time on a busy 2-core CI
        // machine running debug builds; the figures are printed above.
        assert!(t.share(t.met) >= 0.8, "{}: deadline met {:.1}%: {t:?}; missed: {missed:#?}", p.name, 100.0 * t.share(t.met));
    }
    let [normal, slow, killed, _] = &tallies[..] else { unreachable!() };
    // On a busy machine (the other tests of this binary run alongside) a request can wait at
    // the edge long enough that the tier the phase is about no longer fits the budget left: the
    // router then rightly picks a nearer tier. So most decisions, not all, go to that tier, and
    // every other one must say why: that tier's estimate over the budget left, the budget gone
    // before routing, or no answer in time (a fallback). Never "unreachable" or "not trusted":
    // the tier is up and warm. (Decisions taken by a more capable tier, the cloud just after it
    // slowed down, are counted below.)
    for (p, tier, node, above) in [(&phases[0], "cloud", "cloud-1", None), (&phases[1], "fog", "fog-1", Some("cloud"))] {
        let unexplained: Vec<&str> = decisions
            .iter()
            .filter(|(at, d)| (p.from..p.to).contains(at) && d["tier"] != tier && d["tier"].as_str() != above && d["fallback"] != true)
            .map(|(_, d)| d["reason"].as_str().unwrap_or(""))
            .filter(|r| !tier_did_not_fit(r, tier, node))
            .collect();
        assert!(unexplained.is_empty(), "{}: decided without {tier}, and the reason does not say it did not fit: {unexplained:#?}", p.name);
    }
    // Normal: the cloud decides when its p95 through the fog fits the 20 ms budget left, and
    // more often than once it is slowed. Whether it fits depends on the machine: on a loaded
    // one it may never (14 of 150 in a cold CI run on 2026-11-29, 0 of 150 in a warm one on
    // 2026-11-30 while the other test binaries ran), and the fog rightly decides; every such
    // decision says the cloud did not fit (checked above), which is what this phase can show
    // then.
    if normal.cloud > 0 {
        assert!(normal.share(normal.cloud) > slow.share(slow.cloud), "normal: the cloud should decide more than when slowed: {normal:?}; slow: {slow:?}");
    } else {
        report!("normal: the cloud's p95 never fitted the budget on this machine; the fog decided, saying why: {normal:?}");
    }
    assert!(slow.share(slow.fog) >= 0.5 && slow.cloud <= 5, "cloud slow: the fog should decide: {slow:?}");
    assert!(killed.share(killed.edge) >= 0.9, "fog killed: the edge should decide: {killed:?}");
    // In the last phase, the fog decides again only once the mode has recovered, i.e. after
    // the fog was back for the hold time.
    let recovered = events
        .iter()
        .filter(|(at, e)| *at > back && e["event"] == "mode_changed" && e["from"] == "isolated")
        .map(|(at, e)| (*at, e["reason"].as_str().unwrap_or("").to_owned()))
        .next();
    let Some((recovered_at, reason)) = recovered else { panic!("no recovery from isolated after the fog came back: {events:?}") };
    let held: u64 = reason.split(" for ").nth(1).and_then(|r| r.trim_end_matches(" ms").parse().ok()).unwrap_or(0);
    assert!(held >= HOLD_MS, "the mode recovered after {held} ms < hold {HOLD_MS} ms: {reason}");
    let first_fog = decisions.iter().find(|(at, d)| *at > back && d["tier"] == "fog").map(|(at, _)| *at).unwrap();
    assert!(first_fog >= recovered_at, "the fog decided at {first_fog}, before the mode recovered at {recovered_at}");
    let misses = events.iter().filter(|(_, e)| e["event"] == "deadline_miss").count();
    report!("mode recovered {} ms after the fog process restarted ({reason}); deadline_miss events: {misses}", recovered_at - back);
    // The reasons say why.
    let slow_reason = decisions
        .iter()
        .filter(|(at, d)| (phases[1].from..phases[1].to).contains(at) && d["tier"] == "fog")
        .map(|(_, d)| d["reason"].as_str().unwrap_or(""))
        .next_back()
        .unwrap_or("");
    assert!(slow_reason.contains("cloud cloud-1: p95") && slow_reason.contains("fog fog-1: p95"), "{slow_reason}");
    report!("reason while the cloud is slow: {slow_reason}");
}
