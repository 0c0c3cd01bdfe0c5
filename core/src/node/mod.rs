//! A node: one store, one Zenoh session, one replication protocol, wired from a config.
//!
//! [`Node::start`] opens the RocksDB store (failing clearly if it is locked, of another node,
//! or of another format), opens the Zenoh session, starts replication, retention sweeps and
//! the status queryable (`strata/status/<node_id>`, a JSON document any Zenoh client can
//! read). [`Node::shutdown`] stops intake first, then the protocol, then flushes the log.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;
use tokio::task::JoinSet;

use crate::bus::replicator::{Replicator, Settings};
use crate::bus::{keys, BusError, Transport, ZenohTransport};
use crate::config::NodeConfig;
use crate::log::{Log, LogError, RocksStore, StoreOptions};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub struct Node {
    config: NodeConfig,
    log: Log,
    transport: Arc<ZenohTransport>,
    replicator: Arc<Replicator>,
    tasks: JoinSet<()>,
    started: Instant,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let data_dir = config.node.data_dir();
        let store = RocksStore::open(&data_dir, &config.node.id, StoreOptions::from_config(&config.log))?;
        let log = Log::new(Arc::new(store));
        tracing::info!(node = %config.node.id, tier = %config.node.tier, incarnation = %log.incarnation(),
            data_dir = %data_dir.display(), "store open");
        let transport = match ZenohTransport::open(&config).await {
            Ok(t) => Arc::new(t),
            Err(e) if config.zenoh.mode_for(config.node.tier) == crate::config::ZenohMode::Client => {
                return Err(NodeError::Bus(BusError::Zenoh(format!(
                    "{e} (a Zenoh client needs its router at start; use mode = \"peer\" for a node that must start while isolated)"
                ))))
            }
            Err(e) => return Err(e.into()),
        };
        let replicator =
            Arc::new(Replicator::start(Settings::from_config(&config), log.clone(), transport.clone() as Arc<dyn Transport>).await?);
        if !config.actors.is_empty() {
            tracing::warn!(actors = config.actors.len(), "this build does not run actors yet: the [[actors]] of the config are not started");
        }
        let mut node = Node { config, log, transport, replicator, tasks: JoinSet::new(), started: Instant::now() };
        node.start_retention();
        node.start_status().await?;
        tracing::info!(node = %node.config.node.id, "node running");
        Ok(node)
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn start_retention(&mut self) {
        if self.config.log.retention.is_empty() {
            return;
        }
        let log = self.log.clone();
        let every = Duration::from_millis(self.config.log.retention_check_interval_ms);
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match log.sweep(unix_ms()).await {
                    Ok(r) if r.removed > 0 => tracing::info!(removed = r.removed, expired = r.expired, "retention sweep"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
            }
        });
    }

    async fn start_status(&mut self) -> Result<(), NodeError> {
        let mut requests = self.transport.serve(&keys::status(&self.config.node.id), 16).await?;
        let (log, replicator, config, started) = (self.log.clone(), self.replicator.clone(), self.config.clone(), self.started);
        self.tasks.spawn(async move {
            while let Some(mut request) = requests.recv().await {
                let doc = status(&config, &log, &replicator, started);
                let _ = request.responder.reply(doc.to_string().into_bytes()).await;
            }
        });
        Ok(())
    }

    /// The status document served on `strata/status/<node_id>`.
    pub fn status(&self) -> Value {
        status(&self.config, &self.log, &self.replicator, self.started)
    }

    /// Orderly shutdown: stop serving and receiving, then flush and close the log.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        self.replicator.stop().await;
        self.transport.close().await;
        let log = self.log.clone();
        // Closing joins the committer thread: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!(node = %self.config.node.id, "node stopped");
    }
}

fn status(config: &NodeConfig, log: &Log, replicator: &Replicator, started: Instant) -> Value {
    let acks = replicator.acks();
    let holders = replicator.holders();
    let streams: Vec<Value> = log
        .streams()
        .into_iter()
        .map(|i| {
            let key = i.key();
            let peers: serde_json::Map<String, Value> = holders
                .get(&key)
                .map(|h| h.iter().map(|(n, wm)| (n.to_string(), json!({"watermark": wm, "lag": i.watermark.saturating_sub(*wm)}))).collect())
                .unwrap_or_default();
            let acked: serde_json::Map<String, Value> =
                acks.get(&key).map(|a| a.iter().map(|(t, wm)| (t.to_string(), json!(wm))).collect()).unwrap_or_default();
            json!({
                "origin": i.origin.as_str(), "incarnation": i.incarnation.to_string(), "stream": i.stream.as_str(),
                "local": i.local, "first": i.first, "last": i.last, "count": i.count, "bytes": i.bytes,
                "watermark": i.watermark, "expired": i.expired, "acked": acked, "peers": peers,
            })
        })
        .collect();
    let presence: serde_json::Map<String, Value> = replicator
        .presence()
        .into_iter()
        .map(|(n, p)| (n.to_string(), serde_json::to_value(p).expect("presence serialises")))
        .collect();
    json!({
        "node": config.node.id.as_str(),
        "tier": config.node.tier,
        "incarnation": log.incarnation().to_string(),
        "uptime_ms": started.elapsed().as_millis() as u64,
        "streams": streams,
        "liveliness": presence,
        "replication": replicator.counters(),
    })
}
