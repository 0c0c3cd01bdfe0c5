//! Three real nodes (separate `strata run` processes, each with its own RocksDB) on
//! loopback: edge (peer, gateway for devices) -> fog (router) -> cloud (router). Readings are
//! put by a device-side Zenoh session on the edge's ingest key.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::log::{RocksStore, Store, StreamKey};
use strata_integration::proxy::Proxy;
use strata_integration::{free_port, status, watermark, zenoh_session, NodeProc};
use zenoh::qos::CongestionControl;

/// Multi-node tests run one at a time: they share two cores and their timing matters.
static SERIAL: Mutex<()> = Mutex::new(());

/// Held by a multi-node test while it runs: the others wait for it. A blocking mutex on
/// purpose: it orders whole tests, each on its own thread and runtime, so an async test that
/// holds it across `.await` blocks no task that would release it.
pub struct Serial {
    _guard: std::sync::MutexGuard<'static, ()>,
}

/// Waits until no other multi-node test runs (a test that failed while holding it does not
/// stop the others).
pub fn serial() -> Serial {
    Serial { _guard: SERIAL.lock().unwrap_or_else(|p| p.into_inner()) }
}

pub struct Continuum {
    pub _dir: tempfile::TempDir,
    pub edge: NodeProc,
    pub fog: NodeProc,
    pub cloud: NodeProc,
    pub edge_port: u16,
    pub fog_port: u16,
    pub cloud_port: u16,
    /// Between fog and cloud, when asked for.
    pub proxy: Option<Proxy>,
}

pub const STREAM: &str = "readings/a";

fn common(id: &str, tier: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\ntier = \"{tier}\"\ndata_dir = \"{{data_dir}}\"\n\
         [replication]\nreplay_check_interval_ms = 500\nack_interval_ms = 200\nreplay_timeout_ms = 3000\n"
    )
}

impl Continuum {
    /// Writes the three configs (fog reaches cloud through a cuttable proxy if `proxied`)
    /// and starts the nodes.
    pub async fn start(proxied: bool) -> Continuum {
        let dir = tempfile::tempdir().unwrap();
        let (edge_port, fog_port, cloud_port) = (free_port(), free_port(), free_port());
        let proxy =
            if proxied { Some(Proxy::start("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{cloud_port}").parse().unwrap()).await.unwrap()) } else { None };
        let fog_upstream = proxy.as_ref().map_or(cloud_port, |p| p.listen.port());
        let zenoh = |mode: &str, listen: u16, connect: Option<u16>| {
            let connect = connect.map_or(String::new(), |p| format!("\"tcp/127.0.0.1:{p}\""));
            format!(
                "[zenoh]\nmode = \"{mode}\"\nlisten = [\"tcp/127.0.0.1:{listen}\"]\nconnect = [{connect}]\nlease_ms = 1000\nconnect_retry_ms = 100\nopen_timeout_ms = 500\n"
            )
        };
        let edge = format!("{}{}[ingest]\nstreams = [\"readings/**\"]\n", common("edge-1", "edge"), zenoh("peer", edge_port, Some(fog_port)));
        let fog = format!("{}subscribe = [\"edge-1/**\"]\n{}", common("fog-1", "fog"), zenoh("router", fog_port, Some(fog_upstream)));
        let cloud = format!("{}subscribe = [\"*/**\"]\n{}", common("cloud-1", "cloud"), zenoh("router", cloud_port, None));
        let mut c = Continuum {
            edge: NodeProc::new(dir.path(), "edge-1", &edge),
            fog: NodeProc::new(dir.path(), "fog-1", &fog),
            cloud: NodeProc::new(dir.path(), "cloud-1", &cloud),
            _dir: dir,
            edge_port,
            fog_port,
            cloud_port,
            proxy,
        };
        c.cloud.start();
        c.fog.start();
        c.edge.start();
        c
    }

    pub fn endpoint(port: u16) -> String {
        format!("tcp/127.0.0.1:{port}")
    }

    /// Waits until the edge sees fog and cloud alive (so the continuum is connected).
    pub async fn wait_connected(&self, session: &zenoh::Session) {
        let ok = wait_async(Duration::from_secs(30), || async {
            let Some(doc) = status(session, "edge-1").await else { return false };
            ["fog-1", "cloud-1"].iter().all(|n| doc["liveliness"][n]["alive"] == true)
        })
        .await;
        assert!(ok, "edge never saw fog and cloud alive\nedge log:\n{}", self.edge.log_text());
    }

    pub fn stop_all(&mut self) {
        for n in [&mut self.edge, &mut self.fog, &mut self.cloud] {
            let code = n.terminate(Duration::from_secs(20));
            assert_eq!(code, Some(0), "{} did not exit 0 on SIGTERM\n{}", n.id, n.log_text());
        }
    }
}

/// Waits up to `timeout` for an async condition, checking every 100 ms.
pub async fn wait_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A device publishing readings `{"value": i}` on the edge's ingest key.
pub struct Device {
    pub sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Device {
    /// Publishes `count` readings (or until stopped) at `rate_per_s` (0: as fast as the
    /// link allows), with blocking congestion control.
    pub fn start(session: zenoh::Session, count: u64, rate_per_s: u64) -> Device {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (sent, stop) = (sent.clone(), stop.clone());
            tokio::spawn(async move {
                let publisher = session.declare_publisher(format!("strata/ingest/{STREAM}")).congestion_control(CongestionControl::Block).await.unwrap();
                let start = Instant::now();
                for i in 0..count {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if rate_per_s > 0 {
                        let due = start + Duration::from_secs_f64(i as f64 / rate_per_s as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    publisher.put(format!("{{\"value\":{i}}}")).await.unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Device { sent, stop, task: Some(task) }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub async fn finish(&mut self) -> u64 {
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        self.sent()
    }

    pub async fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }
}

/// What a node's store holds of edge-1's stream: per incarnation, the values in seq order.
pub struct Held {
    pub incarnations: usize,
    pub count: u64,
    pub watermark: u64,
    pub values: Vec<u64>,
    pub seqs_in_order: bool,
}

pub fn held(data_dir: &Path) -> Held {
    let store = RocksStore::open_read_only(data_dir).unwrap();
    let keys: Vec<StreamKey> = store.streams().into_iter().filter(|i| i.origin.as_str() == "edge-1" && i.stream.as_str() == STREAM).map(|i| i.key()).collect();
    let mut h = Held { incarnations: keys.len(), count: 0, watermark: 0, values: Vec::new(), seqs_in_order: true };
    for key in keys {
        let info = store.stream(&key).unwrap();
        h.count += info.count;
        h.watermark += info.watermark;
        let mut from = 1;
        let mut expect = 1;
        loop {
            let batch = store.read(&key, from, 4096).unwrap();
            let Some(last) = batch.last() else { break };
            from = last.id.seq.get() + 1;
            for e in batch {
                h.seqs_in_order &= e.id.seq.get() == expect;
                expect = e.id.seq.get() + 1;
                let doc: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
                h.values.push(doc["value"].as_u64().unwrap());
            }
        }
    }
    h
}

/// sent / delivered / lost / duplicated / out-of-order of what `data_dir` holds, against
/// values `0..sent` sent in order.
pub fn verdict(data_dir: &Path, sent: u64) -> (u64, u64, u64, u64) {
    let h = held(data_dir);
    let mut distinct = h.values.clone();
    distinct.sort();
    distinct.dedup();
    let delivered = distinct.iter().filter(|v| **v < sent).count() as u64;
    let duplicated = h.values.len() as u64 - distinct.len() as u64;
    let out_of_order = h.values.windows(2).filter(|w| w[1] <= w[0]).count() as u64 + u64::from(!h.seqs_in_order);
    (delivered, sent - delivered, duplicated, out_of_order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_readings_reach_the_cloud_in_order_once() {
    let _serial = serial();
    let mut c = Continuum::start(false).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;

    let n = 10_000;
    let mut d = Device::start(device.clone(), n, 0);
    assert_eq!(d.finish().await, n);
    let arrived = wait_async(Duration::from_secs(60), || async { watermark(&cloud_view, "cloud-1", "edge-1", STREAM).await == Some(n) }).await;
    if !arrived {
        let edge_view = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
        let fog_view = zenoh_session(&Continuum::endpoint(c.fog_port)).await;
        panic!(
            "cloud did not reach {n}\nedge: {:#}\nfog: {:#}\ncloud: {:#}\ncloud log:\n{}\nfog log:\n{}",
            status(&edge_view, "edge-1").await.unwrap_or_default(),
            status(&fog_view, "fog-1").await.unwrap_or_default(),
            status(&cloud_view, "cloud-1").await.unwrap_or_default(),
            c.cloud.log_text(),
            c.fog.log_text()
        );
    }
    c.stop_all();
    for node in [&c.fog, &c.cloud] {
        let h = held(&node.data_dir);
        assert_eq!(h.incarnations, 1);
        assert_eq!((h.count, h.watermark), (n, n), "{}", node.id);
        assert!(h.seqs_in_order);
        assert_eq!(h.values, (0..n).collect::<Vec<_>>(), "{}: every reading once, in order", node.id);
    }
    report!("replication: {n} readings, edge -> fog -> cloud: all stored once, in order");
}

/// The watermark `node` reports for edge-1's stream, asking through `view`.
async fn wm(view: &zenoh::Session, node: &str) -> u64 {
    watermark(view, node, "edge-1", STREAM).await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fog_cloud_partitions_lose_nothing() {
    let _serial = serial();
    let mut c = Continuum::start(true).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let edge_view = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;
    let mut d = Device::start(device.clone(), u64::MAX, 400);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let proxy = c.proxy.as_ref().unwrap();
    let mut catch_up = Vec::new();
    for cycle in 1..=3 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cloud_early = wm(&cloud_view, "cloud-1").await;
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let cloud_late = wm(&cloud_view, "cloud-1").await;
        let edge_at_heal = wm(&edge_view, "edge-1").await;
        assert_eq!(cloud_early, cloud_late, "cycle {cycle}: the cut did not separate the cloud from the edge");
        assert!(edge_at_heal > cloud_late, "cycle {cycle}: the edge kept producing during the cut");
        proxy.heal();
        let healed = Instant::now();
        let ok = wait_async(Duration::from_secs(60), || async { wm(&cloud_view, "cloud-1").await >= edge_at_heal }).await;
        assert!(ok, "cycle {cycle}: the cloud did not catch up\ncloud log:\n{}", c.cloud.log_text());
        let secs = healed.elapsed().as_secs_f64();
        report!("partition cycle {cycle}: cut 5.0 s, cloud behind by {} readings at heal, caught up in {secs:.2} s", edge_at_heal - cloud_late);
        catch_up.push(secs);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let sent = d.stop().await;
    let ok = wait_async(Duration::from_secs(60), || async { wm(&cloud_view, "cloud-1").await == sent }).await;
    assert!(ok, "the cloud did not get all {sent} readings");
    c.stop_all();
    let (delivered, lost, duplicated, out_of_order) = verdict(&c.cloud.data_dir, sent);
    report!(
        "partitions: sent {sent} / delivered {delivered} / lost {lost} / duplicated {duplicated} / out-of-order {out_of_order} / \
         seconds to catch up after heal {}",
        catch_up.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ")
    );
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fog_kill_9_mid_stream_resumes_from_its_watermarks() {
    let _serial = serial();
    let mut c = Continuum::start(false).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let edge_view = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let fog_view = zenoh_session(&Continuum::endpoint(c.fog_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;
    let mut d = Device::start(device.clone(), u64::MAX, 400);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let fog_before = wm(&fog_view, "fog-1").await;
    let cloud_before = wm(&cloud_view, "cloud-1").await;
    assert!(fog_before > 500, "the fog had replicated {fog_before} readings before the kill");
    c.fog.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.fog.start();
    // The restarted fog knows at once what it had: its watermark is in its store.
    let ok = wait_async(Duration::from_secs(30), || async { status(&fog_view, "fog-1").await.is_some() }).await;
    assert!(ok, "the restarted fog did not answer\n{}", c.fog.log_text());
    let fog_after_restart = wm(&fog_view, "fog-1").await;
    assert!(fog_after_restart >= fog_before - 50, "fog restarted at {fog_after_restart}, had {fog_before}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = d.stop().await;
    let ok = wait_async(Duration::from_secs(60), || async { wm(&cloud_view, "cloud-1").await == sent && wm(&fog_view, "fog-1").await == sent }).await;
    assert!(ok, "fog and cloud did not get all {sent} readings\nfog log:\n{}", c.fog.log_text());

    let edge_doc = status(&edge_view, "edge-1").await.unwrap();
    let fog_doc = status(&fog_view, "fog-1").await.unwrap();
    let served_by_edge = edge_doc["replication"]["replay_served_records"].as_u64().unwrap();
    let fog_replayed = fog_doc["replication"]["replay_received"].as_u64().unwrap();
    report!(
        "fog kill -9: fog had {fog_before}, cloud {cloud_before} of {sent}; after restart the fog replayed {fog_replayed} records \
         (not from seq 1); the edge served {served_by_edge} replayed records in all"
    );
    // Nothing re-sent from seq 1: the fog fetched only what it missed while dead.
    assert!(fog_replayed <= sent - fog_before + 50, "fog replayed {fog_replayed} > {} missed", sent - fog_before);
    assert!(served_by_edge <= 2 * (sent - cloud_before.min(fog_before)) + 100);
    c.stop_all();
    for node in [&c.fog, &c.cloud] {
        let (delivered, lost, duplicated, out_of_order) = verdict(&node.data_dir, sent);
        report!("{}: sent {sent} / delivered {delivered} / lost {lost} / duplicated {duplicated} / out-of-order {out_of_order}", node.id);
        assert_eq!((lost, duplicated, out_of_order), (0, 0, 0), "{}", node.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_edge_comes_back_as_a_new_incarnation() {
    let _serial = serial();
    let mut c = Continuum::start(false).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;
    Device::start(device.clone(), 100, 0).finish().await;
    assert!(wait_async(Duration::from_secs(30), || async { wm(&cloud_view, "cloud-1").await == 100 }).await);

    assert_eq!(c.edge.terminate(Duration::from_secs(20)), Some(0));
    std::fs::remove_dir_all(&c.edge.data_dir).unwrap();
    c.edge.start();
    c.wait_connected(&device).await;
    Device::start(device.clone(), 50, 0).finish().await;
    let histories = || async {
        let Some(doc) = status(&cloud_view, "cloud-1").await else { return Vec::new() };
        let mut wms: Vec<u64> = doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["origin"] == "edge-1" && s["stream"] == STREAM)
            .map(|s| s["watermark"].as_u64().unwrap())
            .collect();
        wms.sort();
        wms
    };
    let ok = wait_async(Duration::from_secs(30), || async { histories().await == vec![50, 100] }).await;
    assert!(ok, "cloud histories: {:?}\n{}", histories().await, c.cloud.log_text());
    c.stop_all();
    for node in [&c.fog, &c.cloud] {
        let h = held(&node.data_dir);
        assert_eq!((h.incarnations, h.count), (2, 150), "{}: both histories, apart", node.id);
        let out = std::process::Command::new(strata_integration::strata_bin()).args(["log", "ls", node.data_dir.to_str().unwrap()]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("edge-1") && l.contains(STREAM)).collect();
        assert_eq!(rows.len(), 2, "{}: strata log ls shows both incarnations:\n{text}", node.id);
        report!("{}: {}", node.id, rows.join(" | "));
    }
}

/// The partition test again, with the cloud in its own network namespace and the fog–cloud
/// veth set down: a cut the way a cable pull or a dead LTE link looks (no FIN, no RST; only
/// the 1 s lease notices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fog_cloud_partition_by_veth_link_down() {
    use strata_integration::netns::NsHost;
    let _serial = serial();
    let tag = std::process::id() % 100_000;
    let mut ns = match NsHost::create(&format!("st{tag}")) {
        Ok(ns) => ns,
        Err(why) => {
            report!("netns partition test NOT RUN: {why}");
            assert!(std::env::var("STRATA_REQUIRE_NETNS").is_err(), "STRATA_REQUIRE_NETNS is set but: {why}");
            return;
        }
    };
    let x = ((tag % 120) * 2) as u8;
    let fog_link = ns.add_link(0, 213, x).unwrap();
    let watch_link = ns.add_link(1, 213, x + 1).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (edge_port, fog_port, cloud_port) = (free_port(), free_port(), free_port());
    let zenoh = |mode: &str, listen: &str, connect: &str| {
        format!(
            "[zenoh]\nmode = \"{mode}\"\nlisten = [\"tcp/{listen}\"]\nconnect = [{connect}]\nlease_ms = 1000\nconnect_retry_ms = 100\nopen_timeout_ms = 500\n"
        )
    };
    let edge = format!(
        "{}{}[ingest]\nstreams = [\"readings/**\"]\n",
        common("edge-1", "edge"),
        zenoh("peer", &format!("127.0.0.1:{edge_port}"), &format!("\"tcp/127.0.0.1:{fog_port}\""))
    );
    let fog = format!(
        "{}subscribe = [\"edge-1/**\"]\n{}",
        common("fog-1", "fog"),
        zenoh("router", &format!("127.0.0.1:{fog_port}"), &format!("\"tcp/{}:{cloud_port}\"", fog_link.ns_ip))
    );
    let cloud = format!("{}subscribe = [\"*/**\"]\n{}", common("cloud-1", "cloud"), zenoh("router", &format!("0.0.0.0:{cloud_port}"), ""));
    let mut edge = NodeProc::new(dir.path(), "edge-1", &edge);
    let mut fog = NodeProc::new(dir.path(), "fog-1", &fog);
    let mut cloud = NodeProc::new(dir.path(), "cloud-1", &cloud);
    cloud.netns = Some(ns.name.clone());
    cloud.start();
    fog.start();
    edge.start();

    let device = zenoh_session(&Continuum::endpoint(edge_port)).await;
    let edge_view = zenoh_session(&Continuum::endpoint(edge_port)).await;
    let cloud_view = zenoh_session(&format!("tcp/{}:{cloud_port}", watch_link.ns_ip)).await;
    let connected = wait_async(Duration::from_secs(30), || async {
        let Some(doc) = status(&edge_view, "edge-1").await else { return false };
        ["fog-1", "cloud-1"].iter().all(|n| doc["liveliness"][n]["alive"] == true)
    })
    .await;
    assert!(connected, "continuum not connected\ncloud:\n{}\nfog:\n{}", cloud.log_text(), fog.log_text());
    let mut d = Device::start(device.clone(), u64::MAX, 400);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut catch_up = Vec::new();
    for cycle in 1..=3 {
        ns.set_link(&fog_link, false).unwrap();
        let cut_at = Instant::now();
        // The edge notices the cloud is gone through liveliness (lease 1 s).
        let noticed = wait_async(Duration::from_secs(10), || async {
            status(&edge_view, "edge-1").await.is_some_and(|doc| doc["liveliness"]["cloud-1"]["alive"] == false)
        })
        .await;
        assert!(noticed, "cycle {cycle}: the edge never saw the cloud go");
        let detected = cut_at.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let cloud_early = wm(&cloud_view, "cloud-1").await;
        tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
        let cloud_late = wm(&cloud_view, "cloud-1").await;
        let edge_at_heal = wm(&edge_view, "edge-1").await;
        assert_eq!(cloud_early, cloud_late, "cycle {cycle}: link down did not separate the cloud");
        ns.set_link(&fog_link, true).unwrap();
        let healed = Instant::now();
        let ok = wait_async(Duration::from_secs(60), || async { wm(&cloud_view, "cloud-1").await >= edge_at_heal }).await;
        assert!(ok, "cycle {cycle}: the cloud did not catch up\ncloud log:\n{}\nfog log:\n{}", cloud.log_text(), fog.log_text());
        let secs = healed.elapsed().as_secs_f64();
        report!(
            "veth partition cycle {cycle}: link down 5 s, loss detected by the edge after {detected:.2} s, cloud behind by {} at heal, caught up in {secs:.2} s",
            edge_at_heal - cloud_late
        );
        catch_up.push(secs);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if std::env::var("STRATA_DEBUG_LOGS").is_ok() {
        report!("cloud log:\n{}\nfog log:\n{}", cloud.log_text(), fog.log_text());
    }
    let sent = d.stop().await;
    assert!(wait_async(Duration::from_secs(60), || async { wm(&cloud_view, "cloud-1").await == sent }).await);
    for n in [&mut edge, &mut fog, &mut cloud] {
        assert_eq!(n.terminate(Duration::from_secs(20)), Some(0), "{}\n{}", n.id, n.log_text());
    }
    let (delivered, lost, duplicated, out_of_order) = verdict(&cloud.data_dir, sent);
    report!(
        "veth partitions: sent {sent} / delivered {delivered} / lost {lost} / duplicated {duplicated} / out-of-order {out_of_order} / \
         seconds to catch up after heal {}",
        catch_up.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ")
    );
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0));
}

/// A 60 s fog–cloud partition with the edge taking 5,000 readings/s: the backlog lives in
/// RocksDB, so every node's resident memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_during_a_long_partition() {
    let _serial = serial();
    let partition = Duration::from_secs(std::env::var("STRATA_PARTITION_S").ok().and_then(|v| v.parse().ok()).unwrap_or(60));
    let rate = 5_000;
    let mut c = Continuum::start(true).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let edge_view = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;
    let mut d = Device::start(device.clone(), u64::MAX, rate);
    // Warm up: memtables, caches and queues reach their working size.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = |c: &Continuum| [c.edge.rss_kib().unwrap(), c.fog.rss_kib().unwrap(), c.cloud.rss_kib().unwrap()];
    let before = rss(&c);
    c.proxy.as_ref().unwrap().cut();
    let mut peak = before;
    let start = Instant::now();
    while start.elapsed() < partition {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (p, now) in peak.iter_mut().zip(rss(&c)) {
            *p = (*p).max(now);
        }
    }
    let end = rss(&c);
    let backlog = wm(&edge_view, "edge-1").await - wm(&cloud_view, "cloud-1").await;
    c.proxy.as_ref().unwrap().heal();
    let healed = Instant::now();
    let sent = d.stop().await;
    let caught_up = wait_async(Duration::from_secs(300), || async { wm(&cloud_view, "cloud-1").await == sent }).await;
    let catch_up = healed.elapsed().as_secs_f64();
    let after = rss(&c);
    report!(
        "memory during a {} s partition at {rate} readings/s (backlog {backlog} readings; cloud caught up in {catch_up:.1} s, {:.0} readings/s):",
        partition.as_secs(),
        backlog as f64 / catch_up
    );
    let mut worst = 0;
    for (i, name) in ["edge-1", "fog-1", "cloud-1"].iter().enumerate() {
        let growth = peak[i].saturating_sub(before[i]);
        worst = worst.max(growth);
        report!(
            "  {name:<8} RSS before {:>7} KiB, end of partition {:>7} KiB, after catch-up {:>7} KiB, growth during partition {growth:>6} KiB",
            before[i],
            end[i],
            after[i]
        );
    }
    assert!(caught_up, "the cloud did not catch up with {sent} readings");
    assert!(worst < 32 * 1024, "a node's memory grew by {worst} KiB during the partition");
    c.stop_all();
}

/// Nodes whose only endpoint is a plain Zenoh router (`zenoh_hop`: the zenoh crate's router,
/// no Strata code): nothing Strata-specific is needed for discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_work_behind_a_plain_zenoh_router() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let router_port = free_port();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _router = Killed(
        std::process::Command::new(strata_integration::helper_bin("zenoh_hop"))
            .args(["--listen", &format!("tcp/127.0.0.1:{router_port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Each node in its deployed mode (edge peer, cloud router); the plain router is their only
    // endpoint. (Two *peers* behind one router do not reach each other unless they can mesh
    // directly: Zenoh expects peers of one region to be connected to each other.)
    let via_router = |id: &str, tier: &str, mode: &str, extra: &str| {
        format!("{}{extra}[zenoh]\nmode = \"{mode}\"\nconnect = [\"tcp/127.0.0.1:{router_port}\"]\nconnect_retry_ms = 100\n", common(id, tier))
    };
    let mut edge = NodeProc::new(dir.path(), "edge-1", &format!("{}[ingest]\nstreams = [\"readings/**\"]\n", via_router("edge-1", "edge", "peer", "")));
    let mut cloud = NodeProc::new(dir.path(), "cloud-1", &via_router("cloud-1", "cloud", "router", "subscribe = [\"*/**\"]\n"));
    edge.start();
    cloud.start();
    let view = strata_integration::zenoh_session_as("client", &Continuum::endpoint(router_port)).await;
    let connected =
        wait_async(Duration::from_secs(30), || async { status(&view, "edge-1").await.is_some_and(|doc| doc["liveliness"]["cloud-1"]["alive"] == true) }).await;
    assert!(connected, "edge and cloud did not find each other through the router\n{}", edge.log_text());
    Device::start(view.clone(), 1000, 0).finish().await;
    let ok = wait_async(Duration::from_secs(30), || async { wm(&view, "cloud-1").await == 1000 }).await;
    assert!(ok, "the cloud did not get the 1000 readings through the plain router");
    for n in [&mut edge, &mut cloud] {
        assert_eq!(n.terminate(Duration::from_secs(20)), Some(0));
    }
    let (delivered, lost, duplicated, out_of_order) = verdict(&cloud.data_dir, 1000);
    report!("behind a plain zenoh router: sent 1000 / delivered {delivered} / lost {lost} / duplicated {duplicated} / out-of-order {out_of_order}");
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0));
}
