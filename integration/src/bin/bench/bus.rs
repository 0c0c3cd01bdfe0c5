//! `bench bus`: see the crate documentation of the bench program.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use strata_core::log::Draft;
use strata_core::node::Node;
use strata_core::{Kind, NodeConfig, PayloadType, StreamName};
use strata_integration::proxy::Proxy;
use strata_integration::{free_port, helper_bin, mono_ns, watermark, zenoh_session, NodeProc};
use zenoh::qos::CongestionControl;

const PAYLOAD_BYTES: usize = 100;
const RAW_N: u64 = 500_000;
const STRATA_N: u64 = 200_000;
const RATE: u64 = 10_000;
/// Appends the edge keeps in flight (queued or being written).
const IN_FLIGHT: usize = 8192;
const RATE_SECONDS: u64 = 3;

struct Hop {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Hop {
    fn start(listen: u16, connect: Option<u16>, count: Option<(&str, u64)>) -> Result<Hop> {
        let mut cmd = Command::new(helper_bin("zenoh_hop"));
        cmd.args(["--listen", &format!("tcp/127.0.0.1:{listen}")]);
        if let Some(c) = connect {
            cmd.args(["--connect", &format!("tcp/127.0.0.1:{c}")]);
        }
        if let Some((key, n)) = count {
            cmd.args(["--count", key, "--expect", &n.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let hop = Hop { child, lines };
        hop.expect("ready", Duration::from_secs(20))?;
        Ok(hop)
    }

    fn expect(&self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => continue,
                Err(_) => bail!("zenoh_hop did not print {prefix:?} in time"),
            }
        }
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payload() -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD_BYTES];
    p[..8].copy_from_slice(&mono_ns().to_le_bytes());
    p
}

/// Raw Zenoh: bench (client) -> fog router -> cloud router (subscriber). Sends `n` at
/// `rate` (0: as fast as possible); returns (msg/s at the receiver, p50 µs, p99 µs).
async fn raw(n: u64, rate: u64) -> Result<(f64, u64, u64)> {
    let (fog, cloud) = (free_port(), free_port());
    let _cloud = Hop::start(cloud, None, Some(("bench/raw", n)))?;
    let _fog = Hop::start(fog, Some(cloud), None)?;
    let counter = _cloud;
    let session = client(fog).await?;
    // Let routing settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publisher = session.declare_publisher("bench/raw").congestion_control(CongestionControl::Block).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let start = Instant::now();
    for i in 0..n {
        if rate > 0 {
            tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
        }
        publisher.put(payload()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let done = counter.expect("done", Duration::from_secs(120))?;
    let f: Vec<&str> = done.split_whitespace().collect();
    let secs: f64 = f[2].parse()?;
    Ok((n as f64 / secs, f[3].parse()?, f[4].parse()?))
}

async fn client(port: u16) -> Result<zenoh::Session> {
    let mut c = zenoh::Config::default();
    let set = |c: &mut zenoh::Config, k: &str, v: &str| c.insert_json5(k, v).map_err(|e| anyhow::anyhow!("{k}: {e}"));
    set(&mut c, "mode", "\"client\"")?;
    set(&mut c, "connect/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))?;
    set(&mut c, "scouting/multicast/enabled", "false")?;
    zenoh::open(c).await.map_err(|e| anyhow::anyhow!("{e}"))
}

/// An operator's client session over QUIC (the identity the secured nodes answer status to).
async fn operator(port: u16, certs: &std::path::Path) -> Result<zenoh::Session> {
    let mut c = zenoh::Config::default();
    let set = |c: &mut zenoh::Config, k: &str, v: &str| c.insert_json5(k, v).map_err(|e| anyhow::anyhow!("{k}: {e}"));
    set(&mut c, "mode", "\"client\"")?;
    set(&mut c, "connect/endpoints", &format!("[\"quic/127.0.0.1:{port}\"]"))?;
    set(&mut c, "scouting/multicast/enabled", "false")?;
    set(&mut c, "connect/timeout_ms", "30000")?;
    let tls = format!(
        "{{root_ca_certificate: {:?}, connect_certificate: {:?}, connect_private_key: {:?}, enable_mtls: true}}",
        certs.join("ca.pem"),
        certs.join("ops.pem"),
        certs.join("ops.key")
    );
    set(&mut c, "transport/link/tls", &tls)?;
    zenoh::open(c).await.map_err(|e| anyhow::anyhow!("{e}"))
}

/// A Strata continuum: fog and cloud as `strata run` processes, the edge in this process.
struct Continuum {
    _dir: tempfile::TempDir,
    fog: NodeProc,
    cloud: NodeProc,
    /// Between fog and cloud (plain TCP only: QUIC is UDP).
    proxy: Option<Proxy>,
    edge: Option<Node>,
    fog_view: zenoh::Session,
    cloud_view: zenoh::Session,
}

impl Continuum {
    /// Plain TCP links with a cuttable proxy between fog and cloud, or (`secure`) QUIC with
    /// mutual TLS and the generated access control, fog and cloud linked directly; the views
    /// are then an operator's sessions.
    async fn start(secure: bool) -> Result<Continuum> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let (fog_port, cloud_port) = (free_port(), free_port());
        let proxy = if secure { None } else { Some(Proxy::start("127.0.0.1:0".parse()?, format!("127.0.0.1:{cloud_port}").parse()?).await?) };
        let fog_up = proxy.as_ref().map_or(cloud_port, |p| p.listen.port());
        let proto = if secure { "quic" } else { "tcp" };
        let certs = d.join("certs");
        if secure {
            use strata_core::security::certs;
            certs::init(&certs, 1)?;
            certs::issue(&certs, &["edge-1".into(), "fog-1".into(), "cloud-1".into(), "ops".into()], &[], 1)?;
        }
        let files: Vec<_> = ["edge-1", "fog-1", "cloud-1"].iter().map(|id| d.join(format!("{id}.toml"))).collect();
        let common = |id: &str, tier: &str| {
            let mut s = format!("[node]\nid = \"{id}\"\ntier = \"{tier}\"\ndata_dir = \"{{data_dir}}\"\n[log]\nsync = \"always\"\n");
            if secure {
                s += &format!(
                    "[security]\ntls = true\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ncontinuum = {:?}\noperators = [\"ops\"]\n",
                    certs.join("ca.pem"),
                    certs.join(format!("{id}.pem")),
                    certs.join(format!("{id}.key")),
                    files
                );
            }
            s + "[replication]\nreplay_check_interval_ms = 500\nack_interval_ms = 200\nreplay_timeout_ms = 5000\n"
        };
        let zenoh = |listen: u16, connect: Option<u16>| {
            let connect = connect.map_or(String::new(), |p| format!("\"{proto}/127.0.0.1:{p}\""));
            format!(
                "[zenoh]\nmode = \"router\"\nlisten = [\"{proto}/127.0.0.1:{listen}\"]\nconnect = [{connect}]\nconnect_retry_ms = 100\nopen_timeout_ms = 500\n"
            )
        };
        let mut fog = NodeProc::new(d, "fog-1", &format!("{}subscribe = [\"edge-1/**\"]\n{}", common("fog-1", "fog"), zenoh(fog_port, Some(fog_up))));
        let mut cloud = NodeProc::new(d, "cloud-1", &format!("{}subscribe = [\"*/**\"]\n{}", common("cloud-1", "cloud"), zenoh(cloud_port, None)));
        let edge_cfg = format!(
            "{}[zenoh]\nmode = \"peer\"\nconnect = [\"{proto}/127.0.0.1:{fog_port}\"]\n",
            common("edge-1", "edge").replace("{data_dir}", d.join("edge-data").to_str().unwrap())
        );
        // The continuum's configs must be on disk before any secured node starts.
        std::fs::write(&files[0], &edge_cfg)?;
        cloud.start();
        fog.start();
        let edge = Node::start(NodeConfig::load(&files[0]).map_err(|e| anyhow::anyhow!("{e}"))?, &strata_core::Registry::new()).await?;
        let (cloud_view, fog_view) = if secure {
            let ops = |port: u16| operator(port, &certs);
            (ops(cloud_port).await?, ops(fog_port).await?)
        } else {
            (zenoh_session(&format!("tcp/127.0.0.1:{cloud_port}")).await, zenoh_session(&format!("tcp/127.0.0.1:{fog_port}")).await)
        };
        let c = Continuum { _dir: dir, fog, cloud, proxy, edge: Some(edge), fog_view, cloud_view };
        // Connected: the edge sees the cloud's liveliness.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.edge().replicator().presence().get(&"cloud-1".parse()?).is_some_and(|p| p.alive) {
            if Instant::now() > deadline {
                bail!("the continuum did not connect");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(c)
    }

    fn edge(&self) -> &Node {
        self.edge.as_ref().expect("edge running")
    }

    async fn cloud_watermark(&self) -> u64 {
        watermark(&self.cloud_view, "cloud-1", "edge-1", "readings/bench").await.unwrap_or(0)
    }

    async fn fog_watermark(&self) -> u64 {
        watermark(&self.fog_view, "fog-1", "edge-1", "readings/bench").await.unwrap_or(0)
    }

    /// Waits until both fog and cloud hold `n` records durably.
    async fn wait_cloud(&self, n: u64, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        while self.cloud_watermark().await < n || self.fog_watermark().await < n {
            if Instant::now() > deadline {
                bail!("the cloud did not reach {n} (at {})", self.cloud_watermark().await);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Instant::now())
    }

    /// Appends `n` readings at `rate` (0: as fast as the log takes them, `IN_FLIGHT` outstanding),
    /// each published live once durable.
    async fn produce(&self, n: u64, rate: u64) -> Result<()> {
        let edge = self.edge();
        let stream: StreamName = "readings/bench".parse()?;
        let replicator = edge.replicator().clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<strata_core::log::AppendTicket>(IN_FLIGHT);
        let publisher = tokio::spawn(async move {
            while let Some(t) = rx.recv().await {
                match t.await {
                    Ok(env) => replicator.publish(&env),
                    Err(e) => return Err(anyhow::anyhow!("{e}")),
                }
            }
            Ok(())
        });
        let start = Instant::now();
        let payload_type: PayloadType = "bench/1".parse()?;
        for i in 0..n {
            if rate > 0 {
                tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
            }
            let draft = Draft::new(Kind::Reading, payload_type.clone(), vec![7u8; PAYLOAD_BYTES]);
            tx.send(edge.log().append(stream.clone(), draft).await?).await?;
        }
        drop(tx);
        publisher.await??;
        Ok(())
    }

    async fn stop(mut self) {
        if let Some(e) = self.edge.take() {
            e.shutdown().await;
        }
        self.fog.terminate(Duration::from_secs(20));
        self.cloud.terminate(Duration::from_secs(20));
    }

    async fn cloud_lag(&self) -> Result<(u64, u64)> {
        let doc = strata_integration::status(&self.cloud_view, "cloud-1").await.context("cloud status")?;
        let lag = &doc["replication"]["live_lag_us"];
        Ok((lag["p50_us"].as_u64().unwrap_or(0), lag["p99_us"].as_u64().unwrap_or(0)))
    }
}

pub fn bench_bus() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        println!("bench bus: {PAYLOAD_BYTES}-byte payloads, edge -> fog -> cloud, three processes on loopback");
        println!("baseline: raw Zenoh, client -> router -> router (subscriber), same machine, same run");
        println!();
        let only_strata = std::env::var("STRATA_BENCH_ONLY").as_deref() == Ok("strata");
        let (raw_rate, _, _) = if only_strata { (1.0, 0, 0) } else { raw(RAW_N, 0).await? };
        println!("raw zenoh throughput          {raw_rate:>12.0} msg/s ({RAW_N} messages)");

        let c = Continuum::start(false).await?;
        let start = Instant::now();
        c.produce(STRATA_N, 0).await?;
        let produced = start.elapsed();
        let done = c.wait_cloud(STRATA_N, Duration::from_secs(300)).await?;
        let strata_rate = STRATA_N as f64 / (done - start).as_secs_f64();
        println!(
            "strata throughput            {strata_rate:>12.0} msg/s ({STRATA_N} readings until durable at edge, fog and cloud; the edge appended at {:.0}/s)",
            STRATA_N as f64 / produced.as_secs_f64()
        );
        println!("ratio strata / raw zenoh     {:>12.3}   (target 0.3)", strata_rate / raw_rate);
        let e = c.edge().replicator().counters();
        println!("  edge-1: published live {}, not published live (publish queue full) {}", e.published, e.publish_dropped);
        for (view, node) in [(&c.fog_view, "fog-1"), (&c.cloud_view, "cloud-1")] {
            if let Some(doc) = strata_integration::status(view, node).await {
                let r = &doc["replication"];
                println!(
                    "  {node}: live received {}, stored live {}, dropped from full queue {}, stored by replay {}",
                    r["live_received"], r["live_stored"], r["live_dropped"], r["replay_stored"]
                );
            }
        }

        // The other bound of this topology on one machine: all three stores write every record
        // durably to the same disk, which raw Zenoh never touches.
        let record = c.edge().log().read(&c.edge().log().local_key(&"readings/bench".parse()?), 1, 1)?;
        let mut value = Vec::new();
        if let Some(e) = record.first() {
            strata_core::codec::encode_record_into(e, &Default::default(), &mut value)?;
        }
        let value_bytes = if value.is_empty() { 200 } else { value.len() };
        let ceiling = crate::three_stores_ceiling(value_bytes, Duration::from_secs(2))?;
        println!(
            "durable-write ceiling        {ceiling:>12.0} records/s per store (raw RocksDB, three stores on this disk at once, \
             WriteBatch of 1024 + WAL sync, {value_bytes}-byte values as stored)"
        );
        println!("ratio strata / that ceiling  {:>12.3}", strata_rate / ceiling);
        let bare = crate::three_stores_ceiling(PAYLOAD_BYTES, Duration::from_secs(2))?;
        println!("  the same with bare {PAYLOAD_BYTES}-byte values (no envelope at all): {bare:.0} records/s per store");

        // Replay rate: a partition, then catch-up.
        let proxy = c.proxy.as_ref().expect("a plain continuum has its proxy");
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let backlog_n = 100_000;
        c.produce(backlog_n, 0).await?;
        let total = STRATA_N + backlog_n;
        let behind = total - c.cloud_watermark().await;
        proxy.heal();
        let healed = Instant::now();
        let done = c.wait_cloud(total, Duration::from_secs(300)).await?;
        println!(
            "strata replay after a partition {:>9.0} records/s ({behind} records behind at heal, caught up in {:.2} s)",
            behind as f64 / (done - healed).as_secs_f64(),
            (done - healed).as_secs_f64()
        );
        c.stop().await;

        // The same throughput with security on: QUIC with mutual TLS and the generated ACL.
        let c = Continuum::start(true).await?;
        let start = Instant::now();
        c.produce(STRATA_N, 0).await?;
        let done = c.wait_cloud(STRATA_N, Duration::from_secs(300)).await?;
        let secure_rate = STRATA_N as f64 / (done - start).as_secs_f64();
        c.stop().await;
        println!("strata throughput, secured   {secure_rate:>12.0} msg/s (QUIC + mutual TLS + ACL at every hop)");
        println!("ratio secured / plain strata {:>12.3}", secure_rate / strata_rate);
        if only_strata {
            return Ok(());
        }

        let n = RATE * RATE_SECONDS;
        let (_, raw_p50, raw_p99) = raw(n, RATE).await?;
        let c = Continuum::start(false).await?;
        c.produce(n, RATE).await?;
        c.wait_cloud(n, Duration::from_secs(120)).await?;
        let (p50, p99) = c.cloud_lag().await?;
        c.stop().await;
        println!();
        println!("end-to-end latency at {RATE} msg/s ({n} messages):");
        println!("  raw zenoh   send -> received at cloud:                  p50 {raw_p50:>7} us  p99 {raw_p99:>7} us");
        println!("  strata      commit at edge -> durable at cloud:          p50 {p50:>7} us  p99 {p99:>7} us  (histogram buckets, +19% at most;");
        println!("              the fog router forwards live and stores in parallel, so the cloud does not wait for the fog's fsync)");
        anyhow::Ok(())
    })?;
    Ok(())
}
