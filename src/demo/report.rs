//! The demo's report, from the nodes' stores (read after they stopped) and the live samples:
//! per phase, decisions per tier and deadlines met; per tier, detection quality against the
//! sensor's ground-truth labels; detection and recovery time of each fault; readings produced,
//! replicated to the cloud, lost; anything applied twice. Text for the terminal, HTML with SVG
//! charts for a browser, JSON for tools.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};
use strata_core::log::{RocksStore, Store, StreamKey};
use strata_core::{NodeId, StreamName};

use super::PHASES;

/// One live observation of the continuum.
#[derive(Debug, Clone)]
pub struct Sample {
    pub t_ms: u64,
    pub at_unix_ms: u64,
    pub phase: usize,
    pub mode: Option<String>,
    /// The edge's last reading seq, and the cloud's watermark of that stream.
    pub produced: Option<u64>,
    pub at_cloud: Option<u64>,
    pub counters: Value,
    pub restarts: u64,
}

pub struct Input {
    pub dir: PathBuf,
    pub phase_starts_unix: Vec<u64>,
    pub end_unix: u64,
    pub samples: Vec<Sample>,
    pub deadline_ms: u64,
    pub seed: u64,
    pub duration_s: u64,
}

pub struct Report {
    pub text: String,
    pub html: String,
    pub json: Value,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// `(append time in Unix ms, payload)` of every record of `origin`'s `stream` in the store at
/// `data_dir`.
fn records(data_dir: &Path, origin: &str, stream: &str) -> anyhow::Result<Vec<(u64, Value)>> {
    let store = RocksStore::open_read_only(data_dir).with_context(|| format!("open {}", data_dir.display()))?;
    let origin = NodeId::new(origin)?;
    let stream = StreamName::new(stream)?;
    let mut out = Vec::new();
    for info in store.streams().into_iter().filter(|i| i.origin == origin && i.stream == stream) {
        let key: StreamKey = info.key();
        let mut from = 1;
        loop {
            let batch = store.read(&key, from, 1000)?;
            let Some(last) = batch.last() else { break };
            from = last.id.seq.get() + 1;
            out.extend(batch.iter().map(|e| (e.hlc.unix_ms(), serde_json::from_slice(&e.payload).unwrap_or(Value::Null))));
        }
    }
    Ok(out)
}

/// The edge's last reading seq, from its (stopped) store.
pub fn produced(edge_dir: &Path) -> anyhow::Result<u64> {
    Ok(held(edge_dir, "edge-1", "readings/line-3")?.1)
}

/// `(records, highest seq)` of `origin`'s `stream` held by the store at `data_dir`.
fn held(data_dir: &Path, origin: &str, stream: &str) -> anyhow::Result<(u64, u64)> {
    let store = RocksStore::open_read_only(data_dir).with_context(|| format!("open {}", data_dir.display()))?;
    let (origin, stream) = (NodeId::new(origin)?, StreamName::new(stream)?);
    Ok(store.streams().into_iter().filter(|i| i.origin == origin && i.stream == stream).fold((0, 0), |(n, last), i| (n + i.count, last.max(i.last))))
}

const TIERS: [&str; 3] = ["cloud", "fog", "edge"];
const COLORS: [&str; 3] = ["#4e79a7", "#f28e2b", "#59a14f"];

#[derive(Default, Clone, Copy)]
struct Tally {
    by: [u64; 3],
    met: u64,
    fallback: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.by.iter().sum()
    }
    fn met_pct(&self) -> f64 {
        100.0 * self.met as f64 / self.total().max(1) as f64
    }
}

fn tier_index(d: &Value) -> usize {
    TIERS.iter().position(|t| d["tier"] == *t).unwrap_or(2)
}

/// Detection quality of one tier's decisions against the labels.
#[derive(Default, Clone)]
struct Quality {
    tp: u64,
    fp: u64,
    fn_: u64,
    tn: u64,
    /// The models that decided (name and version).
    models: BTreeSet<String>,
    /// Total model evaluation time, µs.
    model_us: u64,
}

impl Quality {
    fn pct(n: u64, d: u64) -> f64 {
        if d == 0 {
            f64::NAN
        } else {
            100.0 * n as f64 / d as f64
        }
    }
    fn accuracy(&self) -> f64 {
        Quality::pct(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn_)
    }
    fn recall(&self) -> f64 {
        Quality::pct(self.tp, self.tp + self.fn_)
    }
    fn precision(&self) -> f64 {
        Quality::pct(self.tp, self.tp + self.fp)
    }
    fn decisions(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }
    fn mean_model_us(&self) -> f64 {
        self.model_us as f64 / self.decisions().max(1) as f64
    }
}

fn first_after(events: &[(u64, Value)], from: u64, pred: impl Fn(&Value) -> bool) -> Option<u64> {
    events.iter().find(|(at, e)| *at >= from && pred(e)).map(|(at, _)| at - from)
}

fn ms(v: Option<u64>) -> String {
    v.map_or("not seen".into(), |v| format!("{v} ms"))
}

pub fn analyse(input: &Input) -> anyhow::Result<Report> {
    let edge_dir = input.dir.join("edge-1");
    let cloud_dir = input.dir.join("cloud-1");
    let starts = &input.phase_starts_unix;
    let phase_of = |at: u64| -> Option<usize> {
        if at < starts[0] {
            return None;
        }
        Some(starts.iter().rposition(|&s| at >= s).unwrap_or(0))
    };
    let decisions: Vec<(u64, Value)> = records(&edge_dir, "edge-1", "decisions")?.into_iter().filter(|(_, d)| d["route"].is_string()).collect();
    let events = records(&edge_dir, "edge-1", "events")?;
    let commands = records(&edge_dir, "edge-1", "commands")?;

    let mut phases = vec![Tally::default(); PHASES.len()];
    let mut quality: [Quality; 3] = Default::default();
    let mut all = Tally::default();
    for (at, d) in &decisions {
        let i = tier_index(d);
        let met = d["met"] == true;
        for t in phase_of(*at).map(|p| &mut phases[p]).into_iter().chain(std::iter::once(&mut all)) {
            t.by[i] += 1;
            t.met += u64::from(met);
            t.fallback += u64::from(d["fallback"] == true);
        }
        let (said, truth) = (d["anomaly"] == true, d["label"] == "anomaly");
        let q = &mut quality[i];
        if let Some(m) = d["model"].as_str() {
            q.models.insert(m.to_string());
        }
        q.model_us += d["model_us"].as_u64().unwrap_or(0);
        match (said, truth) {
            (true, true) => q.tp += 1,
            (true, false) => q.fp += 1,
            (false, true) => q.fn_ += 1,
            (false, false) => q.tn += 1,
        }
    }
    let decided_twice = decisions.len() - decisions.iter().map(|(_, d)| d["input"].as_str().unwrap_or("")).collect::<BTreeSet<_>>().len();
    let command_keys: Vec<&str> = commands.iter().filter_map(|(_, c)| c["key"].as_str()).collect();
    let commands_twice = command_keys.len() - command_keys.iter().collect::<BTreeSet<_>>().len();
    let (produced, produced_last) = held(&edge_dir, "edge-1", "readings/line-3")?;
    let (at_cloud, cloud_last) = held(&cloud_dir, "edge-1", "readings/line-3")?;
    let lost = produced.saturating_sub(at_cloud);

    // Faults: detection and recovery.
    let mode_to = |to: &'static str| move |e: &Value| e["event"] == "mode_changed" && e["to"] == to;
    let slowed = first_after(&decisions, starts[1], |d| d["tier"] != "cloud");
    let killed = first_after(&events, starts[2], mode_to("isolated"));
    let restarted = first_after(&events, starts[3], |e| e["event"] == "mode_changed" && e["from"] == "isolated");
    let fog_used = first_after(&decisions, starts[3], |d| d["tier"] == "fog" || d["tier"] == "cloud");
    let cut = first_after(&events, starts[4], mode_to("no_cloud"));
    let healed = first_after(&events, starts[5], mode_to("full"));
    let caught_up = input
        .samples
        .iter()
        .find(|s| s.at_unix_ms >= starts[5] && matches!((s.produced, s.at_cloud), (Some(p), Some(c)) if c >= p))
        .map(|s| s.at_unix_ms - starts[5]);
    let max_lag = input.samples.iter().filter_map(|s| Some(s.produced?.saturating_sub(s.at_cloud?))).max().unwrap_or(0);
    let restarts = input.samples.iter().map(|s| s.restarts).max().unwrap_or(0);
    let count = |kind: &str| events.iter().filter(|(_, e)| e["event"] == kind).count();

    let mut t = String::new();
    let _ = writeln!(t, "strata demo report — seed {}, {} s schedule, {} ms deadlines", input.seed, input.duration_s, input.deadline_ms);
    let _ = writeln!(t, "\nphase           decisions   cloud     fog    edge  fallback  deadline met");
    for ((name, _), p) in PHASES.iter().zip(&phases) {
        let _ = writeln!(t, "{:<15} {:>9} {:>7} {:>7} {:>7} {:>9}  {:>10.2}%", name, p.total(), p.by[0], p.by[1], p.by[2], p.fallback, p.met_pct());
    }
    let _ =
        writeln!(t, "{:<15} {:>9} {:>7} {:>7} {:>7} {:>9}  {:>10.2}%", "whole run", all.total(), all.by[0], all.by[1], all.by[2], all.fallback, all.met_pct());
    let _ = writeln!(t, "\ndetection quality against the sensor's labels (who decided):");
    let _ = writeln!(t, "tier    decisions  accuracy  recall  precision  found/labelled  model µs  model");
    for (i, q) in quality.iter().enumerate() {
        let _ = writeln!(
            t,
            "{:<7} {:>9}  {:>7.2}%  {:>5.1}%  {:>8.1}%  {:>14}  {:>8.1}  {}",
            TIERS[i],
            q.decisions(),
            q.accuracy(),
            q.recall(),
            q.precision(),
            format!("{}/{}", q.tp, q.tp + q.fn_),
            q.mean_model_us(),
            q.models.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(t, "(recall: labelled anomalies the tier found; the edge decides only when fog and cloud cannot in time)");
    let _ = writeln!(t, "\nfaults (from the fault to the system's reaction, as recorded on the edge):");
    let _ = writeln!(t, "  cloud slowed +15 ms each way: decisions left the cloud after {}", ms(slowed));
    let _ = writeln!(t, "  fog killed (SIGKILL):         edge isolated after {}", ms(killed));
    let _ = writeln!(
        t,
        "  fog restarted:                mode recovered after {} (hold {} ms), fog/cloud deciding again after {}",
        ms(restarted),
        super::HOLD_MS,
        ms(fog_used)
    );
    let _ = writeln!(t, "  fog-cloud link cut:           edge in no_cloud after {}", ms(cut));
    let _ = writeln!(t, "  link healed:                  mode full after {}, cloud caught up after {}", ms(healed), ms(caught_up));
    let _ = writeln!(t, "\nincidents recorded by the edge (events incident_opened / incident_closed / caught_up):");
    for (_, e) in events.iter().filter(|(_, e)| e["event"] == "incident_closed" || e["event"] == "caught_up") {
        if e["event"] == "caught_up" {
            let _ = writeln!(t, "  replication caught up: {} records in {} ms", e["records"], e["after_ms"]);
        } else {
            let _ = writeln!(
                t,
                "  #{} {} — restored after {} ms: {}",
                e["incident"],
                e["what"].as_str().unwrap_or("?"),
                e["duration_ms"],
                e["restored"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        t,
        "\nreadings produced {produced} (last seq {produced_last}); at the cloud {at_cloud} (last {cloud_last}); lost {lost}; largest cloud lag {max_lag}"
    );
    let _ = writeln!(t, "decisions recorded twice {decided_twice}; commands applied twice {commands_twice}; actor restarts {restarts}");
    let _ = writeln!(
        t,
        "events: {} mode changes, {} deadline misses, {} escalations opened, {} resolved",
        count("mode_changed"),
        count("deadline_miss"),
        count("escalation_opened"),
        count("escalation_resolved")
    );
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} readings never reached the cloud"));
    }
    if decided_twice > 0 || commands_twice > 0 {
        failures.push(format!("{decided_twice} decisions and {commands_twice} commands applied twice"));
    }
    if all.met_pct() < 99.0 {
        failures.push(format!("deadline met {:.2}% < 99%", all.met_pct()));
    }
    if all.total() == 0 {
        failures.push("no decision was recorded".into());
    }
    let passed = failures.is_empty();
    let _ = writeln!(
        t,
        "\nresult: {}",
        if passed { "PASS: nothing lost, nothing applied twice, deadlines met".to_owned() } else { format!("FAIL: {}", failures.join("; ")) }
    );

    let json = json!({
        "seed": input.seed, "duration_s": input.duration_s, "deadline_ms": input.deadline_ms,
        "phases": PHASES.iter().zip(&phases).map(|((name, _), p)| json!({
            "name": name, "decisions": p.total(), "cloud": p.by[0], "fog": p.by[1], "edge": p.by[2],
            "fallback": p.fallback, "met": p.met, "met_pct": p.met_pct()})).collect::<Vec<_>>(),
        "whole_run": {"decisions": all.total(), "met": all.met, "met_pct": all.met_pct()},
        "quality": TIERS.iter().zip(&quality).map(|(t, q)| (t.to_string(), json!({"tp": q.tp, "fp": q.fp, "fn": q.fn_, "tn": q.tn, "models": q.models, "mean_model_us": q.mean_model_us()}))).collect::<BTreeMap<_, _>>(),
        "faults_ms": {"cloud_slowed_detected": slowed, "fog_killed_detected": killed, "fog_restarted_recovered": restarted,
                      "fog_restarted_deciding": fog_used, "cut_detected": cut, "healed_recovered": healed, "healed_caught_up": caught_up},
        "readings": {"produced": produced, "at_cloud": at_cloud, "lost": lost, "max_lag": max_lag},
        "decided_twice": decided_twice, "commands_twice": commands_twice, "restarts": restarts,
        "passed": passed, "failures": failures,
    });
    let html = html(input, &decisions, &t);
    Ok(Report { text: t, html, json, passed, failures })
}

// ---------------------------------------------------------------------------------------
// HTML with SVG charts

const W: f64 = 900.0;
const H: f64 = 220.0;
const LEFT: f64 = 50.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 30.0;

struct Chart {
    svg: String,
    span_s: f64,
}

impl Chart {
    fn new(title: &str, span_s: f64, starts_s: &[f64], y_label: &str) -> Chart {
        let mut svg = format!("<h2>{title}</h2>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\" shape-rendering=\"crispEdges\">\n");
        let _ =
            writeln!(svg, "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/>", W - LEFT - 10.0, H - TOP - BOTTOM);
        let _ = writeln!(svg, "<text x=\"4\" y=\"{}\" transform=\"rotate(-90 10 {})\">{y_label}</text>", H / 2.0, H / 2.0);
        let c = Chart { svg, span_s };
        let mut c = c;
        for (i, &s) in starts_s.iter().enumerate() {
            let x = c.x(s);
            let _ = writeln!(c.svg, "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"3,3\"/>", H - BOTTOM);
            let _ = writeln!(c.svg, "<text x=\"{:.1}\" y=\"{}\" fill=\"#555\">{}</text>", x + 2.0, TOP - 4.0, PHASES[i].0);
        }
        let mut t = 0.0;
        while t <= span_s {
            let x = c.x(t);
            let _ = writeln!(c.svg, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{t:.0}s</text>", H - 10.0);
            t += (span_s / 10.0).max(1.0).round();
        }
        c
    }

    fn x(&self, t_s: f64) -> f64 {
        LEFT + (t_s / self.span_s.max(1e-9)).clamp(0.0, 1.0) * (W - LEFT - 10.0)
    }

    /// y for `v` of `max`.
    fn y(v: f64, max: f64) -> f64 {
        H - BOTTOM - (v / max.max(1e-9)).clamp(0.0, 1.0) * (H - TOP - BOTTOM)
    }

    fn y_axis(&mut self, max: f64, unit: &str) {
        for f in [0.0, 0.5, 1.0] {
            let y = Chart::y(f * max, max);
            let _ = writeln!(self.svg, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}{unit}</text>", LEFT - 4.0, y + 4.0, f * max);
        }
    }

    fn finish(mut self, legend: &[(&str, &str)]) -> String {
        let mut x = LEFT;
        for (name, color) in legend {
            let _ = writeln!(self.svg, "<rect x=\"{x}\" y=\"4\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"13\">{name}</text>", x + 14.0);
            x += 90.0;
        }
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// Records, on `<body data-render-check>`, what the browser laid out: per chart, the marks
/// drawn (rectangles, dots, line points) and its size. Lets a headless browser (and the tests) check that the charts render.
const RENDER_CHECK: &str = "<script>document.body.setAttribute('data-render-check', \
[...document.querySelectorAll('svg')].map(s => { const b = s.getBBox(); \
const points = [...s.querySelectorAll('polyline')].reduce((n, p) => n + p.points.numberOfItems, 0); \
return (s.querySelectorAll('rect,circle').length + points) + ':' + Math.round(b.width) + 'x' + Math.round(b.height); }).join(' '));</script>\n";

fn html(input: &Input, decisions: &[(u64, Value)], text: &str) -> String {
    let t0 = input.phase_starts_unix[0];
    let span_s = (input.end_unix.saturating_sub(t0)) as f64 / 1000.0;
    let starts_s: Vec<f64> = input.phase_starts_unix.iter().map(|s| (s - t0) as f64 / 1000.0).collect();
    let in_run = |at: u64| at >= t0 && at <= input.end_unix;
    let legend: Vec<(&str, &str)> = TIERS.iter().copied().zip(COLORS).collect();

    // 1. Decisions per tier per second (stacked bars).
    let seconds = span_s.ceil().max(1.0) as usize;
    let mut per_s = vec![[0u64; 3]; seconds];
    for (at, d) in decisions.iter().filter(|(at, _)| in_run(*at)) {
        let s = (((at - t0) / 1000) as usize).min(seconds - 1);
        per_s[s][tier_index(d)] += 1;
    }
    let max = per_s.iter().map(|b| b.iter().sum::<u64>()).max().unwrap_or(1).max(1) as f64;
    let mut c1 = Chart::new("Decisions per tier, per second", span_s, &starts_s, "decisions/s");
    c1.y_axis(max, "");
    let bar = (c1.x(1.0) - c1.x(0.0)).max(1.0);
    for (s, b) in per_s.iter().enumerate().filter(|(s, _)| (*s as f64) + 1.0 <= span_s) {
        let mut acc = 0.0;
        for (i, &n) in b.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let (y1, y2) = (Chart::y(acc + n as f64, max), Chart::y(acc, max));
            let _ = writeln!(
                c1.svg,
                "<rect x=\"{:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                c1.x(s as f64),
                bar * 0.9,
                y2 - y1,
                COLORS[i]
            );
            acc += n as f64;
        }
    }

    // 2. Latency against the deadline.
    let cap = (input.deadline_ms * 2) as f64;
    let mut c2 = Chart::new("Decision latency against the deadline", span_s, &starts_s, "latency (ms)");
    c2.y_axis(cap, "ms");
    let dl = Chart::y(input.deadline_ms as f64, cap);
    let _ = writeln!(
        c2.svg,
        "<line x1=\"{LEFT}\" y1=\"{dl:.1}\" x2=\"{}\" y2=\"{dl:.1}\" stroke=\"#d62728\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#d62728\">deadline {} ms</text>",
        W - 10.0,
        W - 110.0,
        dl - 3.0,
        input.deadline_ms
    );
    let step = (decisions.len() / 4000).max(1);
    for (at, d) in decisions.iter().filter(|(at, _)| in_run(*at)).step_by(step) {
        let lat = d["latency_us"].as_f64().unwrap_or(0.0) / 1000.0;
        let _ = writeln!(
            c2.svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.5\" fill=\"{}\"/>",
            c2.x((at - t0) as f64 / 1000.0),
            Chart::y(lat.min(cap), cap),
            COLORS[tier_index(d)]
        );
    }

    // 3. The edge's mode over time.
    let modes = [("full", "#59a14f"), ("no_cloud", "#edc948"), ("isolated", "#f28e2b"), ("safe", "#e15759")];
    let mut c3 = Chart::new("The edge's degraded mode", span_s, &starts_s, "mode");
    let samples: Vec<&Sample> = input.samples.iter().filter(|s| in_run(s.at_unix_ms)).collect();
    for w in samples.windows(2) {
        let Some(mode) = w[0].mode.as_deref() else { continue };
        let (x1, x2) = (c3.x((w[0].at_unix_ms - t0) as f64 / 1000.0), c3.x((w[1].at_unix_ms - t0) as f64 / 1000.0));
        let color = modes.iter().find(|(m, _)| *m == mode).map_or("#bbb", |(_, c)| c);
        let _ = writeln!(
            c3.svg,
            "<rect x=\"{x1:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{color}\"/>",
            TOP + 30.0,
            (x2 - x1).max(0.5),
            H - TOP - BOTTOM - 40.0
        );
    }

    // 4. Replication lag: readings the cloud does not hold yet.
    let lags: Vec<(f64, f64)> =
        samples.iter().filter_map(|s| Some(((s.at_unix_ms - t0) as f64 / 1000.0, s.produced?.saturating_sub(s.at_cloud?) as f64))).collect();
    let max_lag = lags.iter().map(|l| l.1).fold(10.0, f64::max);
    let mut c4 = Chart::new("Replication lag at the cloud (edge readings not yet stored there)", span_s, &starts_s, "records");
    c4.y_axis(max_lag, "");
    let points: Vec<String> = lags.iter().map(|(t, l)| format!("{:.1},{:.1}", c4.x(*t), Chart::y(*l, max_lag))).collect();
    let _ = writeln!(c4.svg, "<polyline fill=\"none\" stroke=\"#4e79a7\" stroke-width=\"1.5\" points=\"{}\"/>", points.join(" "));

    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Strata demo report</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:960px}}pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}</style></head>\n\
         <body><h1>Strata demo report</h1>\n{}{}{}{}<h2>Report</h2><pre>{}</pre>\n{RENDER_CHECK}</body></html>\n",
        c1.finish(&legend),
        c2.finish(&legend),
        c3.finish(&modes),
        c4.finish(&[("lag", "#4e79a7")]),
        escape(text)
    )
}
