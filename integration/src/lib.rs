//! Helpers for Strata's multi-node tests and benchmarks: locating the built `strata`
//! binary, temporary configs, free loopback ports.

use std::path::{Path, PathBuf};

/// The `strata` binary of the current build (same profile and target dir as the running
/// test or benchmark). `make test` builds it before running the tests.
pub fn strata_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/it-<hash>  or  <target>/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("strata");
    assert!(bin.exists(), "{} does not exist: build it first (`cargo build --workspace`, which `make test` does)", bin.display());
    bin
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A self-checking payload for producer `p`'s `n`th record: `p`, `n`, filler derived from
/// both, and an FNV-1a checksum of all that. [`check_crash_payload`] recovers `(p, n)`.
pub fn crash_payload(p: u8, n: u64) -> Vec<u8> {
    let mut out = vec![p];
    out.extend_from_slice(&n.to_le_bytes());
    let mut x = (n << 8) ^ p as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..(40 + (n % 50) as usize) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// `(producer, n)` of an intact [`crash_payload`]; `None` if it is torn.
pub fn check_crash_payload(payload: &[u8]) -> Option<(u8, u64)> {
    if payload.len() < 17 {
        return None;
    }
    let (body, sum) = payload.split_at(payload.len() - 8);
    if fnv1a(body).to_le_bytes() != sum {
        return None;
    }
    let p = body[0];
    let n = u64::from_le_bytes(body[1..9].try_into().ok()?);
    (crash_payload(p, n) == payload).then_some((p, n))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A built helper binary of this crate (same target dir and profile as the running test).
pub fn helper_bin(name: &str) -> PathBuf {
    let strata = strata_bin();
    let bin = strata.with_file_name(name);
    assert!(bin.exists(), "{} does not exist: build it first (`cargo build --workspace --all-targets`)", bin.display());
    bin
}

pub mod netns;
pub mod probe;
pub mod proxy;
pub mod routebench;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback for a node the test starts (see [`strata_core::ports`]).
/// A reading envelope as `origin` (incarnation `incarnation`) would send it on `stream`, with
/// seq `seq` and `{"value": seq}` as payload: what tests put on the wire or in a store as if
/// received from another node.
pub fn reading_envelope(origin: &str, incarnation: u64, stream: &str, seq: u64) -> strata_core::Envelope {
    use strata_core::{EnvelopeId, HlcTime, Incarnation, Kind, NodeId, PayloadType, Priority, Seq, StreamName, Trace};
    strata_core::Envelope {
        id: EnvelopeId {
            origin: NodeId::new(origin).unwrap(),
            incarnation: Incarnation::from_raw(incarnation),
            stream: StreamName::new(stream).unwrap(),
            seq: Seq::new(seq).unwrap(),
        },
        kind: Kind::Reading,
        hlc: HlcTime::from_uhlc(uhlc::HLC::default().new_timestamp()),
        budget_us: None,
        priority: Priority::NORMAL,
        trace: Trace::default(),
        payload_type: PayloadType::new("strata.reading/1").unwrap(),
        payload: format!("{{\"value\": {seq}}}").into_bytes(),
    }
}

pub fn free_port() -> u16 {
    strata_core::ports::free_loopback_port().expect("a free loopback port")
}

/// Waits up to `timeout` for `cond`, checking every 50 ms. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `strata run` child process with its config, store and log file in a test directory.
pub struct NodeProc {
    pub id: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    child: Option<Child>,
}

impl NodeProc {
    /// Writes `config_text` to `<dir>/<id>.toml`; the store goes to `<dir>/<id>-data`.
    /// The config text may use `{data_dir}`.
    pub fn new(dir: &Path, id: &str, config_text: &str) -> NodeProc {
        let data_dir = dir.join(format!("{id}-data"));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, config_text.replace("{data_dir}", data_dir.to_str().expect("utf-8 path"))).expect("write config");
        NodeProc { id: id.to_owned(), config, data_dir, log_file: dir.join(format!("{id}.log")), netns: None, child: None }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_file).expect("log file");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(strata_bin());
                c
            }
            None => Command::new(strata_bin()),
        };
        let child = command
            .arg("run")
            .arg(&self.config)
            .env("RUST_LOG", std::env::var("STRATA_TEST_LOG").unwrap_or_else(|_| "info,zenoh=warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strata run");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit code (`None`: killed after it).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: plain syscall on our own child's pid.
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

    /// Waits up to `timeout` for the node to exit by itself; its exit code (`None`: it was
    /// still running, and is killed, or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
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

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The node's log output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Zenoh session for a test: peer mode, multicast scouting off, no gossip autoconnect,
/// connected to `endpoint`.
pub async fn zenoh_session(endpoint: &str) -> zenoh::Session {
    zenoh_session_as("peer", endpoint).await
}

/// [`zenoh_session`] in another Zenoh mode (`client` to sit behind a router).
pub async fn zenoh_session_as(mode: &str, endpoint: &str) -> zenoh::Session {
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", &format!("\"{mode}\"")).unwrap();
    c.insert_json5("connect/endpoints", &format!("[\"{endpoint}\"]")).unwrap();
    c.insert_json5("scouting/multicast/enabled", "false").unwrap();
    c.insert_json5("scouting/gossip/autoconnect", "{router: [], peer: []}").unwrap();
    c.insert_json5("connect/timeout_ms", "-1").unwrap();
    c.insert_json5("connect/exit_on_failure", "false").unwrap();
    c.insert_json5("connect/retry", "{period_init_ms: 100, period_max_ms: 100, period_increase_factor: 1.0}").unwrap();
    zenoh::open(c).await.expect("open a zenoh session")
}

/// The status document of `node`, if it answers within a second.
pub async fn status(session: &zenoh::Session, node: &str) -> Option<serde_json::Value> {
    let replies = session.get(format!("strata/status/{node}")).timeout(Duration::from_secs(1)).await.ok()?;
    while let Ok(reply) = replies.recv_async().await {
        if let Ok(sample) = reply.result() {
            return serde_json::from_slice(&sample.payload().to_bytes()).ok();
        }
    }
    None
}

/// The watermark `node`'s status shows for `origin`'s stream `stream` (0 if absent; `None`
/// if the node does not answer).
pub async fn watermark(session: &zenoh::Session, node: &str, origin: &str, stream: &str) -> Option<u64> {
    let doc = status(session, node).await?;
    Some(
        doc["streams"].as_array()?.iter().filter(|s| s["origin"] == origin && s["stream"] == stream).filter_map(|s| s["watermark"].as_u64()).max().unwrap_or(0),
    )
}

/// The JSON payloads of a node's own stream `stream`, read from a read-only view of its
/// store at `data_dir` (works while the node runs).
pub fn payloads(data_dir: &Path, stream: &str) -> Vec<serde_json::Value> {
    records(data_dir, stream).into_iter().map(|(_, v)| v).collect()
}

/// The watermark of `origin`'s stream `stream` in the store at `data_dir` (its latest
/// incarnation there; 0 if absent), read from a read-only view (works while the node runs).
pub fn held_watermark(data_dir: &Path, origin: &str, stream: &str) -> u64 {
    use strata_core::log::{RocksStore, Store};
    let store = RocksStore::open_read_only(data_dir).expect("open the store read-only");
    let held: Vec<_> = store.streams().into_iter().filter(|i| i.origin.as_str() == origin && i.stream.as_str() == stream).collect();
    held.iter().max_by_key(|i| i.last).map_or(0, |i| i.watermark)
}

/// [`payloads`] with each record's append time (its HLC time, Unix ms).
pub fn records(data_dir: &Path, stream: &str) -> Vec<(u64, serde_json::Value)> {
    use strata_core::log::{RocksStore, Store, StreamKey};
    let store = RocksStore::open_read_only(data_dir).expect("open the store read-only");
    let key = StreamKey { origin: store.node().clone(), incarnation: store.incarnation(), stream: strata_core::StreamName::new(stream).expect("valid stream") };
    let (mut out, mut from) = (Vec::new(), 1);
    loop {
        let batch = store.read(&key, from, 1000).expect("read the stream");
        let Some(last) = batch.last() else { return out };
        from = last.id.seq.get() + 1;
        out.extend(batch.iter().map(|e| (e.hlc.unix_ms(), serde_json::from_slice(&e.payload).expect("JSON payload"))));
    }
}

/// CLOCK_MONOTONIC in ns: comparable between processes on one machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
