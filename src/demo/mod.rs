//! `strata demo`: a real edge/fog/cloud continuum on this machine, broken on purpose.
//!
//! Three `strata run` processes (this binary) on loopback with temporary stores and free
//! ports; the fog reaches the cloud through a proxy that can slow or cut that link. The edge
//! reads a seeded sensor at 50 Hz and has every reading's anomaly decision taken by the tier
//! that can meet its 20 ms deadline. A fault schedule runs over `--duration`:
//!
//! normal → cloud slowed (+15 ms each way) → fog killed (SIGKILL) → fog restarted →
//! fog–cloud link cut → healed
//!
//! while a one-line live view shows the phase, the edge's mode, decisions per tier, the
//! deadline-met ratio, the cloud's replication lag and restarts. At the end the stores are read
//! back and a report says, per phase, who decided and how well, how long each fault took to be
//! detected and recovered from, and whether anything was lost or applied twice (see
//! [`report`]); an HTML version with charts goes to `--out`. Exit 0 only if nothing was lost,
//! nothing applied twice and at least 99% of deadlines were met.

mod report;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_core::bus::{keys, observer, Transport, ZenohTransport};
use strata_core::proxy::Proxy;
use strata_core::NodeId;

pub use report::Sample;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Length of the fault schedule, in seconds (at least 20).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seed of the edge's sensor (the readings and their anomalies).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Where the HTML report goes.
    #[arg(long, default_value = "strata-demo-report")]
    pub out: PathBuf,
    /// Keep the nodes' stores and logs (their directory is printed).
    #[arg(long)]
    pub keep: bool,
}

/// The phases and the share of the duration each lasts.
pub const PHASES: [(&str, f64); 6] =
    [("normal", 0.15), ("cloud slowed", 0.15), ("fog killed", 0.15), ("fog restarted", 0.20), ("fog-cloud cut", 0.15), ("healed", 0.20)];
const HOLD_MS: u64 = 1500;
const DEADLINE_MS: u64 = 20;
const SLOW_ONE_WAY_MS: u64 = 15;
const ESCALATION_TIMEOUT_MS: u64 = 5000;
/// Longest wait, once the edge trusts both servers' estimates, for them to settle before the
/// schedule starts.
const SETTLE_WAIT_S: u64 = 5;
/// The demo's nodes fsync their logs every 100 ms (`log.sync = "interval"`) instead of at every
/// commit: a process crash (the SIGKILL below) still loses nothing. On a disk that stalls now
/// and then for 100-300 ms under three nodes, `always` makes the edge's readings wait and a
/// few 20 ms decisions expire (measured here: 98.9% met before actors pipelined their commits,
/// 99.4-100% after), which would make the demo's verdict depend on the disk.
const LOG_SECTION: &str = "[log]\nsync = \"interval\"\nsync_interval_ms = 100\n";

/// The shipped ONNX models (trained by configs/models/train.py), built into the binary so the
/// demo needs no files beside it.
const MODELS: [(&str, &[u8]); 2] = [("fog", include_bytes!("../../configs/models/fog.onnx")), ("cloud", include_bytes!("../../configs/models/cloud.onnx"))];

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The three node configs: `[edge, fog, cloud]`.
fn configs(dir: &Path, seed: u64, ports: [u16; 3], fog_upstream: u16) -> [String; 3] {
    let [edge, fog, cloud] = ports;
    let node = |id: &str, tier: &str| format!("[node]\nid = \"{id}\"\ntier = \"{tier}\"\ndata_dir = \"{}\"\n", dir.join(id).display());
    let zenoh = |mode: &str, listen: u16, connect: Option<u16>| {
        let connect = connect.map_or(String::new(), |p| format!("\"tcp/127.0.0.1:{p}\""));
        format!("[zenoh]\nmode = \"{mode}\"\nlisten = [\"tcp/127.0.0.1:{listen}\"]\nconnect = [{connect}]\nlease_ms = 1000\nconnect_retry_ms = 100\nopen_timeout_ms = 500\n")
    };
    let common = format!(
        "[routing]\ndeadline_ms = {{ anomaly = {DEADLINE_MS} }}\nprobe_interval_ms = 100\n[modes]\nrecover_hold_ms = {HOLD_MS}\n\
         [autonomy]\nescalation_timeout_ms = {ESCALATION_TIMEOUT_MS}\n{LOG_SECTION}"
    );
    let server = |name: &str, model: &str| {
        format!(
            "[[actors]]\nkind = \"inference\"\nname = \"{name}\"\ninputs = [\"edge-1:readings/line-3\"]\noutputs = [\"decisions\"]\n\
             params = {{ capability = \"anomaly\", model = \"onnx\", onnx_path = \"{}\", serve = true }}\n",
            dir.join("models").join(format!("{model}.onnx")).display()
        )
    };
    [
        format!(
            "{}{}{common}\
             [[actors]]\nkind = \"sensor\"\nname = \"line-3\"\noutputs = [\"readings/line-3\"]\nparams = {{ rate_hz = 50, seed = {seed} }}\n\
             [[actors]]\nkind = \"inference\"\nname = \"anomaly-local\"\ninputs = [\"readings/line-3\"]\noutputs = [\"decisions\"]\n\
             params = {{ capability = \"anomaly\", model = \"ewma\", route = true }}\n\
             [[actors]]\nkind = \"arbiter\"\nname = \"arbiter\"\ninputs = [\"decisions\"]\noutputs = [\"commands\", \"escalations\"]\n",
            node("edge-1", "edge"),
            zenoh("peer", edge, Some(fog))
        ),
        format!(
            "{}{}[replication]\nsubscribe = [\"edge-1/readings/**\", \"edge-1/decisions\", \"edge-1/events\"]\n{common}{}",
            node("fog-1", "fog"),
            zenoh("router", fog, Some(fog_upstream)),
            server("anomaly-fog", "fog")
        ),
        format!(
            "{}{}[replication]\nsubscribe = [\"*/readings/**\", \"*/decisions\", \"*/events\"]\n{common}{}",
            node("cloud-1", "cloud"),
            zenoh("router", cloud, None),
            server("anomaly-cloud", "cloud")
        ),
    ]
}

/// A `strata run` child.
struct Proc {
    id: &'static str,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command.arg("run").arg(&self.config).env("RUST_LOG", "info,zenoh=warn").stdout(Stdio::null()).stderr(log);
        // The node dies with the demo, however the demo ends (even `kill -9`): no node left
        // writing into /tmp and holding its ports. (Started from the demo's main thread,
        // which lives as long as the demo.)
        use std::os::unix::process::CommandExt;
        let demo = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe, and nothing else runs between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The demo died between the fork and the prctl: do not start (no allocation
                // here, after a fork).
                if libc::getppid() as u32 != demo {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        self.child = Some(command.spawn()?);
        Ok(())
    }

    /// The exit status if the node has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; the exit code, or `None` if it had to be killed after `timeout`.
    fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: a plain syscall on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn status(view: &ZenohTransport, node: &str) -> Option<Value> {
    let node = NodeId::new(node).ok()?;
    let mut replies = view.request(&keys::status(&node), "", Vec::new(), Duration::from_millis(800), 1).await.ok()?;
    serde_json::from_slice(&replies.recv().await?).ok()
}

fn stream_of<'a>(doc: &'a Value, origin: &str, stream: &str) -> Option<&'a Value> {
    doc["streams"].as_array()?.iter().find(|s| s["origin"] == origin && s["stream"] == stream)
}

/// One observation of the running continuum.
async fn observe(edge: &ZenohTransport, cloud: &ZenohTransport, started: Instant, phase: usize) -> Sample {
    let (e, c) = tokio::join!(status(edge, "edge-1"), status(cloud, "cloud-1"));
    let produced = e.as_ref().and_then(|d| stream_of(d, "edge-1", "readings/line-3")).and_then(|s| s["last"].as_u64());
    let at_cloud = c.as_ref().and_then(|d| stream_of(d, "edge-1", "readings/line-3")).and_then(|s| s["watermark"].as_u64());
    let counters = e.as_ref().map(|d| d["decisions"].clone()).unwrap_or(Value::Null);
    let restarts: u64 = [&e, &c]
        .iter()
        .filter_map(|d| d.as_ref())
        .flat_map(|d| d["actors"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["restarts"].as_u64())
        .sum();
    Sample {
        t_ms: started.elapsed().as_millis() as u64,
        at_unix_ms: unix_ms(),
        phase,
        mode: e.as_ref().and_then(|d| d["mode"].as_str().map(str::to_owned)),
        produced,
        at_cloud,
        counters,
        restarts,
    }
}

fn progress(sample: &Sample, total_ms: u64, tty: bool) {
    let width = 24;
    let done = ((sample.t_ms as f64 / total_ms as f64) * width as f64).min(width as f64) as usize;
    let c = &sample.counters;
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let met = n("met") as f64 / (n("met") + n("missed")).max(1) as f64 * 100.0;
    let lag = match (sample.produced, sample.at_cloud) {
        (Some(p), Some(c)) => p.saturating_sub(c).to_string(),
        _ => "?".into(),
    };
    let line = format!(
        "[{}{}] {:>3}/{}s {:<13} edge mode {:<8} decided cloud {:>5} fog {:>5} edge {:>5}  met {:>5.1}%  cloud lag {:>5}  restarts {}",
        "#".repeat(done),
        ".".repeat(width - done),
        sample.t_ms / 1000,
        total_ms / 1000,
        PHASES[sample.phase].0,
        sample.mode.as_deref().unwrap_or("?"),
        n("cloud"),
        n("fog"),
        n("edge"),
        met,
        lag,
        sample.restarts
    );
    if tty {
        print!("\r{line}");
    } else {
        println!("{line}");
    }
    let _ = std::io::stdout().flush();
}

pub fn run(args: DemoArgs) -> ExitCode {
    if args.duration < 20 {
        eprintln!("strata demo: --duration must be at least 20 (seconds), got {}", args.duration);
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let dir = std::env::temp_dir().join(format!("strata-demo-{}-{}", std::process::id(), unix_ms()));
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = demo(&args, &dir) => Some(outcome),
            signal = interrupted() => {
                eprintln!("\nstrata demo: {signal}: stopping the nodes");
                None
            }
        }
    });
    // The demo's future is dropped by now, and with it its nodes (killed).
    match outcome {
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => ExitCode::from(1),
        Some(Err(e)) => {
            eprintln!("\nstrata demo: {e:#}");
            ExitCode::from(1)
        }
        None => {
            if args.keep {
                eprintln!("stores and node logs kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            ExitCode::from(130)
        }
    }
}

/// Waits for SIGINT, SIGTERM or SIGHUP and names it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

async fn demo(args: &DemoArgs, dir: &Path) -> anyhow::Result<bool> {
    use anyhow::Context;
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let port = strata_core::ports::free_loopback_port;
    let ports = [port()?, port()?, port()?];
    let proxy = Arc::new(Proxy::start("127.0.0.1:0".parse()?, format!("127.0.0.1:{}", ports[2]).parse()?).await?);
    // The example continuum's models (configs/models/), written next to the configs.
    std::fs::create_dir_all(dir.join("models"))?;
    for (name, bytes) in MODELS {
        std::fs::write(dir.join("models").join(format!("{name}.onnx")), bytes).with_context(|| format!("write the {name} model"))?;
    }
    let texts = configs(&dir, args.seed, ports, proxy.listen.port());
    let mut procs: Vec<Proc> = ["edge-1", "fog-1", "cloud-1"]
        .into_iter()
        .zip(texts)
        .map(|(id, text)| {
            let config = dir.join(format!("{id}.toml"));
            std::fs::write(&config, text).map(|()| Proc { id, config, log: dir.join(format!("{id}.log")), child: None })
        })
        .collect::<Result<_, _>>()?;
    println!("strata demo: edge-1 (sensor 50 Hz, seed {}), fog-1, cloud-1 on loopback; stores and logs in {}", args.seed, dir.display());
    for i in [2, 1, 0] {
        procs[i].start().with_context(|| format!("start {}", procs[i].id))?;
    }
    let edge_view = observer(&format!("tcp/127.0.0.1:{}", ports[0])).await?;
    let cloud_view = observer(&format!("tcp/127.0.0.1:{}", ports[2])).await?;

    // Ready: the edge sees the whole continuum and trusts both servers' latency estimates, and
    // these have settled (a p95 within three quarters of the deadline, about what a request
    // has once the margin and the fallback are set aside), so that "normal" starts as normal:
    // a model's first inferences are slow, and until they leave the estimate the edge rightly
    // decides itself (a CI run on 2026-11-30: 72 of 154 normal-phase decisions). On a machine
    // where they never settle, it starts anyway after `SETTLE_WAIT_S`.
    let t0 = Instant::now();
    let mut trusted_since = None;
    loop {
        let doc = status(&edge_view, "edge-1").await;
        let estimate = |node: &str| doc.as_ref().and_then(|d| d["estimates"].as_array().into_iter().flatten().find(|e| e["node"] == node).cloned());
        let trusted = |node: &str| estimate(node).is_some_and(|e| e["samples"].as_u64() >= Some(3));
        let settled = |node: &str| estimate(node).is_some_and(|e| e["p95_us"].as_u64().is_some_and(|p95| p95 <= DEADLINE_MS * 1000 * 3 / 4));
        if doc.as_ref().is_some_and(|d| d["mode"] == "full") && trusted("cloud-1") && trusted("fog-1") {
            let since = *trusted_since.get_or_insert_with(Instant::now);
            if (settled("cloud-1") && settled("fog-1")) || since.elapsed() > Duration::from_secs(SETTLE_WAIT_S) {
                break;
            }
        } else {
            trusted_since = None;
        }
        if let Some((id, log, status)) = procs.iter_mut().find_map(|p| p.exited().map(|s| (p.id, p.log.clone(), s))) {
            anyhow::bail!("{id} exited at start ({status}); its log: {}", log.display());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("the continuum did not come up within 60 s; node logs are in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("strata demo: continuum up in {:.1} s; running the fault schedule for {} s", t0.elapsed().as_secs_f64(), args.duration);

    let total_ms = args.duration * 1000;
    let mut bounds = Vec::new();
    let mut at = 0u64;
    for (_, share) in PHASES {
        bounds.push(at);
        at += (share * total_ms as f64) as u64;
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut phase_starts_unix = Vec::new();
    let mut samples = Vec::new();
    let mut last_print = 0u64;
    for (phase, &from) in bounds.iter().enumerate() {
        while (started.elapsed().as_millis() as u64) < from {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        phase_starts_unix.push(unix_ms());
        match phase {
            1 => proxy.set_delay(Duration::from_millis(SLOW_ONE_WAY_MS)),
            2 => {
                proxy.set_delay(Duration::ZERO);
                procs[1].kill9();
            }
            3 => procs[1].start().context("restart fog-1")?,
            4 => proxy.cut(),
            5 => proxy.heal(),
            _ => {}
        }
        if !tty {
            println!("-- {}", PHASES[phase].0);
        }
        let to = bounds.get(phase + 1).copied().unwrap_or(total_ms);
        while (started.elapsed().as_millis() as u64) < to {
            let s = observe(&edge_view, &cloud_view, started, phase).await;
            if tty || s.t_ms >= last_print + 5000 {
                progress(&s, total_ms, tty);
                last_print = s.t_ms;
            }
            samples.push(s);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let end_unix = unix_ms();
    if tty {
        println!();
    }

    // The edge stops first (orderly: its last batch durable); then the cloud catches up on
    // everything it produced (bounded wait; the fog answers replays for the stopped edge), and
    // the fog and the cloud stop.
    let mut clean = true;
    let stop = |p: &mut Proc, clean: &mut bool| {
        let code = p.terminate(Duration::from_secs(20));
        if code != Some(0) {
            eprintln!("strata demo: {} exited with {code:?} on SIGTERM (log: {})", p.id, p.log.display());
            *clean = false;
        }
    };
    stop(&mut procs[0], &mut clean);
    edge_view.close().await;
    let produced = report::produced(&dir.join("edge-1"))?;
    let catch_up = Instant::now();
    loop {
        let at_cloud = status(&cloud_view, "cloud-1").await.and_then(|d| stream_of(&d, "edge-1", "readings/line-3").and_then(|s| s["watermark"].as_u64()));
        let last = samples.last().cloned();
        samples.push(Sample {
            t_ms: started.elapsed().as_millis() as u64,
            at_unix_ms: unix_ms(),
            phase: PHASES.len() - 1,
            mode: last.as_ref().and_then(|s| s.mode.clone()),
            produced: Some(produced),
            at_cloud,
            counters: last.map_or(Value::Null, |s| s.counters),
            restarts: 0,
        });
        if at_cloud.is_some_and(|c| c >= produced) || catch_up.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cloud_view.close().await;
    for p in procs[1..].iter_mut() {
        stop(p, &mut clean);
    }
    let input = report::Input { dir: dir.clone(), phase_starts_unix, end_unix, samples, deadline_ms: DEADLINE_MS, seed: args.seed, duration_s: args.duration };
    let r = report::analyse(&input)?;
    println!("\n{}", r.text);
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let html = args.out.join("index.html");
    std::fs::write(&html, &r.html).with_context(|| format!("write {}", html.display()))?;
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&r.json)?)?;
    println!("HTML report: {}", html.display());
    let ok = r.passed && clean;
    if !ok {
        println!("strata demo: FAILED: {}", if r.failures.is_empty() { "a node did not stop cleanly".into() } else { r.failures.join("; ") });
    }
    if args.keep || !ok {
        println!("stores and node logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ok)
}
