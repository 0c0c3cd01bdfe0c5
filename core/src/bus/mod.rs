//! The continuum bus: how nodes exchange streams over Zenoh, and how they repair what the
//! network lost.
//!
//! - [`Transport`] is the little that Strata needs from a network: best-effort live
//!   publication, bounded subscriptions, request/reply, liveliness. [`ZenohTransport`] is the
//!   real one (the only code in Strata that knows Zenoh); [`sim::SimNet`] is an in-memory
//!   network with seeded faults (drop, duplicate, reorder, delay, partition) for
//!   deterministic simulation.
//! - [`replicator`] is the replication protocol, written once against [`Transport`] and
//!   [`Log`](crate::log::Log): live samples are stored idempotently; every node publishes its
//!   *heads* (per stream: the watermark it holds), which are both acknowledgements for the
//!   origin's retention and the signal that someone holds more than we do; gaps are repaired by
//!   replay queries answered from a holder's RocksDB log, in bounded batches, until closed.
//!
//! Backpressure: live samples go into a bounded queue and are dropped when it is full (Zenoh
//! `CongestionControl::Drop` on the publisher side too); replay repairs them, so overload
//! never loses data and never blocks producers. Every queue here is bounded by a config field.

pub mod ingest;
pub mod replicator;
pub mod sim;
#[cfg(test)]
mod sim_tests;
pub mod wire;
mod zenoh;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::model::{NodeId, StreamName, Tier};

pub use self::zenoh::{observer, query_json, query_status, zenoh_config, ZenohTransport};

/// A boxed future, for object-safe async trait methods.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BusError {
    #[error("zenoh: {0}")]
    Zenoh(String),
    #[error("invalid key expression {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("the transport is closed")]
    Closed,
}

/// A publication received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub key: String,
    pub payload: Vec<u8>,
}

/// What a full subscription queue does with the next sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop it and count it: for replicated streams, which replay repairs.
    Drop,
    /// Hold the network until there is room: for ingest from devices, which nothing would
    /// repair. The sender sees backpressure (Zenoh `Block` publishers wait).
    Block,
}

/// A liveliness change: a token appeared (`alive`) or disappeared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliveEvent {
    pub key: String,
    pub alive: bool,
}

/// Answers one request; dropping it ends the reply stream.
pub trait Responder: Send {
    fn reply(&mut self, payload: Vec<u8>) -> BoxFut<'_, Result<(), BusError>>;
}

/// A request received by a [`Transport::serve`]r.
pub struct Request {
    pub key: String,
    pub params: String,
    /// The request's body (empty if none).
    pub payload: Vec<u8>,
    pub responder: Box<dyn Responder>,
}

/// A bounded stream of incoming items, plus what keeps the declaration alive and a count of
/// items dropped because the queue was full.
pub struct Incoming<T> {
    pub rx: mpsc::Receiver<T>,
    pub dropped: Arc<AtomicU64>,
    _guard: Box<dyn Any + Send + Sync>,
}

impl<T> Incoming<T> {
    pub fn new(rx: mpsc::Receiver<T>, dropped: Arc<AtomicU64>, guard: Box<dyn Any + Send + Sync>) -> Incoming<T> {
        Incoming { rx, dropped, _guard: guard }
    }

    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What Strata needs from a network. Key expressions use Zenoh's syntax (`*` one chunk,
/// `**` any chunks).
pub trait Transport: Send + Sync + 'static {
    fn node(&self) -> &NodeId;
    /// Live publication: never blocks; may be dropped under congestion or partition.
    fn publish(&self, key: &str, payload: Vec<u8>);
    /// Samples published on keys matching `keyexpr`, in a queue of `capacity`; when it is
    /// full, `overflow` says whether new samples are dropped (and counted) or the network
    /// is made to wait.
    fn subscribe(&self, keyexpr: &str, capacity: usize, overflow: Overflow) -> BoxFut<'_, Result<Incoming<Sample>, BusError>>;
    /// Requests on keys matching `keyexpr`, in a queue of `capacity` (full: refused).
    fn serve(&self, keyexpr: &str, capacity: usize) -> BoxFut<'_, Result<Incoming<Request>, BusError>>;
    /// Sends a request (with an optional body, `payload`) to every server of `key`; the
    /// replies arrive on the returned queue of `capacity`, which closes when all servers
    /// finished or `timeout` passed.
    fn request(&self, key: &str, params: &str, payload: Vec<u8>, timeout: Duration, capacity: usize) -> BoxFut<'_, Result<mpsc::Receiver<Vec<u8>>, BusError>>;
    /// Declares a liveliness token, held until the returned guard is dropped.
    fn declare_alive(&self, key: &str) -> BoxFut<'_, Result<Box<dyn Any + Send + Sync>, BusError>>;
    /// Liveliness tokens matching `keyexpr`: the ones present now, then every change.
    fn watch_alive(&self, keyexpr: &str, capacity: usize) -> BoxFut<'_, Result<Incoming<AliveEvent>, BusError>>;
}

/// Key expressions of the Strata protocol.
pub mod keys {
    use super::*;

    /// Live publications of `origin`'s stream.
    pub fn stream(origin: &NodeId, stream: &StreamName) -> String {
        format!("strata/s/{origin}/{stream}")
    }

    /// The origin and stream of a live publication key.
    pub fn parse_stream(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix("strata/s/")?.split_once('/')
    }

    pub fn replay(origin: &NodeId, stream: &StreamName) -> String {
        format!("strata/replay/{origin}/{stream}")
    }

    pub fn parse_replay(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix("strata/replay/")?.split_once('/')
    }

    pub const REPLAY_ALL: &str = "strata/replay/**";

    pub fn heads(node: &NodeId) -> String {
        format!("strata/heads/{node}")
    }

    pub const HEADS_ALL: &str = "strata/heads/*";

    pub fn alive(tier: Tier, node: &NodeId) -> String {
        format!("strata/alive/{tier}/{node}")
    }

    pub const ALIVE_ALL: &str = "strata/alive/**";

    /// `(tier, node)` of a liveliness key.
    pub fn parse_alive(key: &str) -> Option<(Tier, NodeId)> {
        let (tier, node) = key.strip_prefix("strata/alive/")?.split_once('/')?;
        let tier = match tier {
            "edge" => Tier::Edge,
            "fog" => Tier::Fog,
            "cloud" => Tier::Cloud,
            _ => return None,
        };
        Some((tier, NodeId::new(node).ok()?))
    }

    pub fn ingest(stream: &StreamName) -> String {
        format!("strata/ingest/{stream}")
    }

    pub const INGEST_ALL: &str = "strata/ingest/**";

    pub const STATUS_ALL: &str = "strata/status/*";

    pub fn status(node: &NodeId) -> String {
        format!("strata/status/{node}")
    }

    /// Whether `key` (no wildcards) matches `pattern` (Zenoh `*` and `**` chunks).
    pub fn matches(pattern: &str, key: &str) -> bool {
        let p: Vec<&str> = pattern.split('/').collect();
        let k: Vec<&str> = key.split('/').collect();
        crate::config::segments_match(&p, &k)
    }
}
