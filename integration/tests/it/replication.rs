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
pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Continuum {
    pub dir: tempfile::TempDir,
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
        let proxy = if proxied {
            Some(Proxy::start("127.0.0.1:0".parse().unwrap(), format!("127.0.0.1:{cloud_port}").parse().unwrap()).await.unwrap())
        } else {
            None
        };
        let fog_upstream = proxy.as_ref().map_or(cloud_port, |p| p.listen.port());
        let zenoh = |mode: &str, listen: u16, connect: Option<u16>| {
            let connect = connect.map_or(String::new(), |p| format!("\"tcp/127.0.0.1:{p}\""));
            format!(
                "[zenoh]\nmode = \"{mode}\"\nlisten = [\"tcp/127.0.0.1:{listen}\"]\nconnect = [{connect}]\nlease_ms = 1000\nconnect_retry_ms = 100\n"
            )
        };
        let edge = format!("{}{}[ingest]\nstreams = [\"readings/**\"]\n", common("edge-1", "edge"), zenoh("peer", edge_port, Some(fog_port)));
        let fog = format!(
            "{}subscribe = [\"edge-1/**\"]\n{}",
            common("fog-1", "fog"),
            zenoh("router", fog_port, Some(fog_upstream))
        );
        let cloud = format!("{}subscribe = [\"*/**\"]\n{}", common("cloud-1", "cloud"), zenoh("router", cloud_port, None));
        let mut c = Continuum {
            edge: NodeProc::new(dir.path(), "edge-1", &edge),
            fog: NodeProc::new(dir.path(), "fog-1", &fog),
            cloud: NodeProc::new(dir.path(), "cloud-1", &cloud),
            dir,
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
                let publisher = session
                    .declare_publisher(format!("strata/ingest/{STREAM}"))
                    .congestion_control(CongestionControl::Block)
                    .await
                    .unwrap();
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
    let keys: Vec<StreamKey> =
        store.streams().into_iter().filter(|i| i.origin.as_str() == "edge-1" && i.stream.as_str() == STREAM).map(|i| i.key()).collect();
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
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Continuum::start(false).await;
    let device = zenoh_session(&Continuum::endpoint(c.edge_port)).await;
    let cloud_view = zenoh_session(&Continuum::endpoint(c.cloud_port)).await;
    c.wait_connected(&device).await;

    let n = 10_000;
    let mut d = Device::start(device.clone(), n, 0);
    assert_eq!(d.finish().await, n);
    let arrived = wait_async(Duration::from_secs(60), || async {
        watermark(&cloud_view, "cloud-1", "edge-1", STREAM).await == Some(n)
    })
    .await;
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
    println!("replication: {n} readings, edge -> fog -> cloud: all stored once, in order");
}
