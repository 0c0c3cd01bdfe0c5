//! Typed node configuration, read from TOML.
//!
//! Every section is `#[serde(default, deny_unknown_fields)]` with an explicit `Default`, and
//! every bound, timeout and size carries its unit in its name (`lease_ms`,
//! `commit_queue_len_max`). `configs/reference.toml` documents every key with its unit and
//! default; a test checks that it lists every key and that its values are the defaults.
//!
//! Errors name the file, the key path and what was wrong:
//! `configs/edge.toml: actors[1].outputs[0]: "Readings!" is not a valid stream name: ...`.
//! [`NodeConfig::load`] reports the first error serde meets while parsing (with its line), or
//! every problem [`NodeConfig::validate`] finds in a config that parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bus::wire::{MESSAGE_BYTES_MAX, REPLICABLE_PAYLOAD_BYTES_MAX};
use crate::model::{string_newtype, NameError, NodeId, StreamName, Tier};

// ---------------------------------------------------------------------------------------
// Errors

/// One thing wrong in a config: where (`path`, `line`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `actors[1].outputs[0]`; empty for the whole file.
    pub path: String,
    pub message: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem { path: path.into(), message: message.into(), line: None }
    }
}

/// Everything wrong with one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: ", self.file.display())?;
            if !p.path.is_empty() {
                write!(f, "{}: ", p.path)?;
            }
            write!(f, "{}", p.message)?;
            if let Some(line) = p.line {
                write!(f, " (line {line})")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Validated small types used by the config

/// A Zenoh locator that Strata accepts: `tcp/<host>:<port>`, or `quic/<host>:<port>` (mutual
/// TLS 1.3, with `[security] tls = true`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Endpoint(String);

impl Endpoint {
    pub fn new(value: impl Into<String>) -> Result<Endpoint, String> {
        let value = value.into();
        let bad = |why: &str| Err(format!("{value:?} is not a valid endpoint: {why} (expected tcp/<host>:<port> or quic/<host>:<port>)"));
        let Some((proto, addr)) = value.split_once('/') else {
            return bad("no protocol");
        };
        if proto == "tls" {
            return bad("Zenoh's tls/ link is not used by Strata: it can corrupt memory under load (eclipse-zenoh/zenoh#2557); quic/ is mutual TLS 1.3 with the same certificates");
        }
        if proto != "tcp" && proto != "quic" {
            return bad(&format!("protocol {proto:?} is not supported"));
        }
        let Some((host, port)) = addr.rsplit_once(':') else {
            return bad("no port");
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/' || c == '#' || c == '?') {
            return bad("bad host");
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Endpoint(value)),
            _ => bad(&format!("port {port:?} is not in 1..=65535")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn port(&self) -> u16 {
        self.0.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("validated on construction")
    }
}

/// A pattern over stream names, segment-wise like Zenoh key expressions: `*` matches one
/// segment, `**` any number of segments (also none). `readings/**`, `*/alarms`, `decisions`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct StreamPattern(String);

impl StreamPattern {
    pub fn new(value: impl Into<String>) -> Result<StreamPattern, String> {
        let value = value.into();
        check_pattern(&value, "stream pattern")?;
        Ok(StreamPattern(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, stream: &StreamName) -> bool {
        let pattern: Vec<&str> = self.0.split('/').collect();
        let name: Vec<&str> = stream.as_str().split('/').collect();
        segments_match(&pattern, &name)
    }
}

fn check_pattern(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > StreamName::LEN_MAX {
        return Err(format!("{value:?} is not a valid {what}: it must be 1..=128 bytes"));
    }
    for segment in value.split('/') {
        if segment.is_empty() {
            return Err(format!("{value:?} is not a valid {what}: it has an empty segment"));
        }
        if segment == "*" || segment == "**" {
            continue;
        }
        if segment.contains("..") {
            return Err(format!("{value:?} is not a valid {what}: it contains '..'"));
        }
        if let Some(c) = segment.chars().find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))) {
            return Err(format!("{value:?} is not a valid {what}: character {c:?} is not one of [a-z0-9_./-] (or a whole segment * or **)"));
        }
    }
    Ok(())
}

pub(crate) fn segments_match(pattern: &[&str], name: &[&str]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(&"**"), _) => segments_match(&pattern[1..], name) || (!name.is_empty() && segments_match(pattern, &name[1..])),
        (Some(&p), Some(&n)) => (p == "*" || p == n) && segments_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// What a node replicates from others: `<origin>/<stream pattern>`, where `<origin>` is a
/// node id or `*`. `edge-1/readings/**`, `*/events`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Subscription(String);

impl Subscription {
    pub fn new(value: impl Into<String>) -> Result<Subscription, String> {
        let value = value.into();
        let Some((origin, stream)) = value.split_once('/') else {
            return Err(format!("{value:?} is not a valid subscription: expected <origin node id or *>/<stream pattern>"));
        };
        if origin != "*" {
            NodeId::new(origin).map_err(|e| format!("{value:?} is not a valid subscription: origin {e}"))?;
        }
        check_pattern(stream, "stream pattern").map_err(|e| format!("{value:?} is not a valid subscription: {e}"))?;
        Ok(Subscription(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `None` for `*`.
    pub fn origin(&self) -> Option<NodeId> {
        let (origin, _) = self.0.split_once('/').expect("validated on construction");
        (origin != "*").then(|| NodeId::new(origin).expect("validated on construction"))
    }

    pub fn stream_pattern(&self) -> StreamPattern {
        let (_, stream) = self.0.split_once('/').expect("validated on construction");
        StreamPattern(stream.to_owned())
    }

    pub fn matches(&self, origin: &NodeId, stream: &StreamName) -> bool {
        self.origin().is_none_or(|o| &o == origin) && self.stream_pattern().matches(stream)
    }
}

/// A reference to a stream as an actor input: `readings/line-3` (this node's own stream) or
/// `edge-1:readings/line-3` (a stream of node `edge-1`, replicated here).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamRef {
    pub origin: Option<NodeId>,
    pub stream: StreamName,
}

impl TryFrom<String> for StreamRef {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        let (origin, stream) = match value.split_once(':') {
            Some((o, s)) => (Some(NodeId::new(o).map_err(|e| e.to_string())?), s),
            None => (None, value.as_str()),
        };
        Ok(StreamRef { origin, stream: StreamName::new(stream).map_err(|e| e.to_string())? })
    }
}

impl From<StreamRef> for String {
    fn from(r: StreamRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(o) => write!(f, "{o}:{}", self.stream),
            None => write!(f, "{}", self.stream),
        }
    }
}

/// A short lower-case name: actor kinds and names, capabilities, action classes.
/// 1..=64 bytes of `[a-z0-9_-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    pub fn new(value: impl Into<String>) -> Result<Name, NameError> {
        let value = value.into();
        crate::model::check_alphabet("name", &value, NodeId::LEN_MAX, "[a-z0-9_-]", |b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
        })?;
        Ok(Name(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype!(String: Endpoint, StreamPattern, Subscription);
string_newtype!(NameError: Name);

impl fmt::Debug for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

// ---------------------------------------------------------------------------------------
// The config

/// A node's whole configuration. Only `[node]` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub zenoh: ZenohSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub ingest: IngestSection,
    #[serde(default)]
    pub supervision: SupervisionSection,
    #[serde(default)]
    pub actors: Vec<ActorSpec>,
    #[serde(default)]
    pub routing: RoutingSection,
    #[serde(default)]
    pub modes: ModesSection,
    #[serde(default)]
    pub autonomy: AutonomySection,
    #[serde(default)]
    pub security: SecuritySection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Stable identity of the node. Required.
    pub id: NodeId,
    /// `edge`, `fog` or `cloud`. Required.
    pub tier: Tier,
    /// Directory of the node's RocksDB store. Default `data/<id>`, relative to the working
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Status queries (`strata status`, `strata demo`'s view) waiting to be answered; beyond
    /// it a query is dropped: the tool that asked gets no reply from this node. Default 16.
    #[serde(default = "status_queue_len_default")]
    pub status_queue_len_max: usize,
}

fn status_queue_len_default() -> usize {
    16
}

impl NodeSection {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| Path::new("data").join(self.id.as_str()))
    }
}

/// Zenoh session mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZenohMode {
    Peer,
    Client,
    Router,
}

impl ZenohMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ZenohMode::Peer => "peer",
            ZenohMode::Client => "client",
            ZenohMode::Router => "router",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZenohSection {
    /// `peer`, `client` or `router`. Default by tier: edge = peer, fog and cloud = router.
    /// A Zenoh client cannot open its session until its router answers, so a client node
    /// does not start while isolated; edges are peers so that they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<ZenohMode>,
    /// Endpoints this node listens on. Default none.
    pub listen: Vec<Endpoint>,
    /// Endpoints this node connects to (its parent tier, or a `zenohd`). Default none.
    pub connect: Vec<Endpoint>,
    /// Zenoh lease: how long a silent link is trusted, in ms. Default 1000.
    pub lease_ms: u64,
    /// Period between attempts to re-open a lost connection, in ms. Default 250.
    pub connect_retry_ms: u64,
    /// How long one attempt to open a link (TCP connect + handshake) may take, in ms. After a
    /// link comes back, reconnection takes at most about this plus `connect_retry_ms` (an
    /// attempt made while the link was dead waits in TCP's SYN backoff otherwise).
    /// Default 2000.
    pub open_timeout_ms: u64,
    /// Multicast scouting (peer discovery on the LAN). Default false: links are explicit.
    pub scouting_multicast: bool,
    /// Zenoh publishers kept declared, one per key this node publishes on (live streams,
    /// heads); beyond it the node sends plain puts, which cost a key lookup each. 0: plain
    /// puts only. Default 1024.
    pub publishers_max: usize,
}

impl Default for ZenohSection {
    fn default() -> Self {
        ZenohSection {
            mode: None,
            listen: Vec::new(),
            connect: Vec::new(),
            lease_ms: 1000,
            connect_retry_ms: 250,
            open_timeout_ms: 2000,
            scouting_multicast: false,
            publishers_max: 1024,
        }
    }
}

impl ZenohSection {
    pub fn mode_for(&self, tier: Tier) -> ZenohMode {
        self.mode.unwrap_or(match tier {
            Tier::Edge => ZenohMode::Peer,
            Tier::Fog | Tier::Cloud => ZenohMode::Router,
        })
    }
}

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// Every batch's WAL is fsync'd before its appends return. Survives power loss.
    Always,
    /// The WAL is fsync'd every `sync_interval_ms`; appends return once written to the OS.
    /// A crash of the process loses nothing; a power loss loses up to one interval.
    Interval,
    /// Never fsync'd by Strata. A process crash loses nothing; a power loss may lose any
    /// amount not yet flushed by the OS.
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `always`, `interval` or `never`. Default `always`.
    pub sync: SyncPolicy,
    /// WAL fsync period for `sync = "interval"`, in ms. Default 100.
    pub sync_interval_ms: u64,
    /// Most appends written in one group-commit batch. Default 1024.
    pub commit_batch_len_max: usize,
    /// How long the committer waits for more appends once one arrived, in µs. Default 0:
    /// batches form on their own while the previous sync runs.
    pub commit_linger_us: u64,
    /// Adaptive group commit: when fewer appends are ready than the last WAL sync covered
    /// (`sync = "always"`; otherwise the last write), wait for that many, at most half a sync
    /// (and at most `commit_wait_us_max`). Keeps N producers in one sync instead of two
    /// alternating halves. Default true.
    pub commit_wait_adaptive: bool,
    /// The longest the adaptive wait may be, in µs, whatever a sync takes. Default 2000.
    pub commit_wait_us_max: u64,
    /// Within that adaptive wait, how long the committer first spins (looks, yields the CPU,
    /// looks again) before it sleeps, in µs. The producers it expects are usually back within
    /// tens of µs; a sleeping committer's wake-up costs about as much again on a busy or
    /// virtual machine. It spins at most this long per batch and only when it expects
    /// producers back. 0: never spins (a battery-powered node may prefer it). Default 100.
    pub commit_spin_us: u64,
    /// Appends waiting for the committer; producers wait when it is full. Default 4096.
    pub commit_queue_len_max: usize,
    /// With `sync = "always"`: batches written but waiting for their WAL sync (the next batch
    /// is written while the previous one syncs); the committer waits when this many wait.
    /// Default 4.
    pub commit_unsynced_batches_max: usize,
    /// Largest payload of one envelope, in bytes. Default 1048576 (1 MiB).
    pub payload_bytes_max: usize,
    /// RocksDB memtable size (write buffer), in bytes. Default 4194304 (4 MiB).
    pub memtable_bytes: usize,
    /// RocksDB block cache size, in bytes. Default 8388608 (8 MiB).
    pub block_cache_bytes: usize,
    /// Period of the retention sweep, in ms. Default 10000.
    pub retention_check_interval_ms: u64,
    /// Bytes of older snapshots kept per actor (`snapshots/<actor>` streams) beyond the
    /// latest one, which is always kept. Default 1048576 (1 MiB).
    pub snapshot_bytes_max: u64,
    /// Retention rules; the first rule whose `streams` matches a stream applies.
    /// Default none: keep everything.
    pub retention: Vec<RetentionRule>,
    /// Most records one retention sweep removes (the sweep is one committer operation, so it
    /// delays appends meanwhile); the next sweep goes on. Default 100000.
    pub sweep_records_max: u64,
    /// WAL files kept once their records are flushed, and written again instead of new ones
    /// (RocksDB's `recycle_log_file_num`): the fsync of a file whose size does not change
    /// need not update its inode. 0 creates a new file every time. Default 4.
    pub wal_files_reused: usize,
    /// Most disjoint ranges of received records kept above a stream's watermark (its memory
    /// grows with the gaps, not the records); a received record that would open one more is
    /// not stored (`Deferred`) and replay brings it again in order. Default 1024.
    pub present_ranges_max: usize,
    /// RocksDB's own info log (`LOG` files in the store's directory): files kept. Default 3.
    pub info_log_files_max: usize,
    /// The size at which that log rolls to a new file, in bytes. Default 1048576 (1 MiB).
    pub info_log_file_bytes_max: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            sync: SyncPolicy::Always,
            sync_interval_ms: 100,
            commit_batch_len_max: 1024,
            commit_linger_us: 0,
            commit_wait_adaptive: true,
            commit_wait_us_max: 2000,
            commit_spin_us: 100,
            commit_queue_len_max: 4096,
            commit_unsynced_batches_max: 4,
            payload_bytes_max: 1024 * 1024,
            memtable_bytes: 4 * 1024 * 1024,
            block_cache_bytes: 8 * 1024 * 1024,
            retention_check_interval_ms: 10_000,
            snapshot_bytes_max: 1024 * 1024,
            retention: Vec::new(),
            sweep_records_max: 100_000,
            wal_files_reused: 4,
            present_ranges_max: 1024,
            info_log_files_max: 3,
            info_log_file_bytes_max: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Streams this rule applies to (pattern). Required.
    pub streams: StreamPattern,
    /// Keep at most this many bytes per stream; oldest records go first. Default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_max: Option<u64>,
    /// Keep records at most this old, in seconds. Default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_s_max: Option<u64>,
    /// Never delete a record of this node's own streams before every named tier acknowledged
    /// it. Replicas of other nodes' streams go by size and age alone (their origin keeps its
    /// own copy until acknowledged). Default none.
    #[serde(default)]
    pub keep_until_acked: Vec<Tier>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSection {
    /// Streams of other nodes to replicate here, as `<origin or *>/<stream pattern>`.
    /// Default none.
    pub subscribe: Vec<Subscription>,
    /// Most records in one replay reply batch. Default 256.
    pub replay_batch_len_max: usize,
    /// Period of the check for gaps and lagging watermarks, in ms. Default 1000.
    pub replay_check_interval_ms: u64,
    /// How long one replay query may take, in ms; a holder that has not answered by then is
    /// passed over and another asked. Also the bound on a query of who is alive, after
    /// liveliness changes were dropped. Default 2000.
    pub replay_timeout_ms: u64,
    /// Period at which this node publishes its watermarks as acknowledgements, in ms.
    /// Default 250.
    pub ack_interval_ms: u64,
    /// Received live samples waiting to be stored; beyond it samples are dropped and
    /// later repaired by replay. Default 8192.
    pub live_queue_len_max: usize,
    /// The bound in bytes (keys and payloads) of each receive queue (live samples, heads,
    /// ingest): samples beyond it are dropped like those beyond `live_queue_len_max` (ingest
    /// waits instead); one larger sample is taken when its queue is empty. At least 4194304.
    /// Default 67108864 (64 MiB).
    pub live_queue_bytes_max: usize,
    /// Durable local records waiting to be published live; beyond it they are not published
    /// live and subscribers repair them by replay. Default 4096.
    pub publish_queue_len_max: usize,
    /// The same queue's bound in bytes of encoded records. Default 8388608 (8 MiB).
    pub publish_queue_bytes_max: usize,
    /// Largest live frame, in bytes: records of one stream waiting to be published go out
    /// together in frames up to this size (a record alone when nothing else waits).
    /// Default 16384.
    pub live_frame_bytes_max: usize,
    /// How long an orderly stop waits, in ms, for the tiers it reaches to acknowledge every
    /// record of this node's own streams (they replay what they miss from it meanwhile), so
    /// that a stopped node leaves nothing only it holds. Tiers not reachable are not waited
    /// for; 0 does not wait. Default 5000.
    pub shutdown_handover_ms: u64,
    /// How long an actor reading a received stream waits, in ms, at a gap (records missing
    /// below ones that arrived) for replay to fill it. Past it, the actor goes on after the
    /// gap, and the seqs it passed over are recorded as an `input_gap_passed` event: records
    /// that no holder can supply (removed by retention at their origin before they were
    /// replicated, or damaged everywhere) must not stop a consumer for good. Input records
    /// damaged on this node's disk get the same wait (a fault of a moment is waited out),
    /// then are passed over with an `input_damaged_passed` event; so does a damaged record of
    /// the escalation desk's stream, which then waits as an escalation with an unknown action.
    /// Default 30000.
    pub consumer_gap_wait_ms: u64,
    /// Most received live samples stored as one insert operation. Default 512.
    pub live_batch_len_max: usize,
    /// The same batch's bound in bytes of payloads: no sample is added once the batch holds
    /// this many, so it may exceed it by one sample. Default 262144 (256 KiB).
    pub live_batch_bytes_max: usize,
    /// Insert operations of received live samples queued to the log before the receiver
    /// waits for the oldest to be durable (meanwhile samples wait in the live queue).
    /// Default 64.
    pub insert_batches_in_flight_max: usize,
    /// Replay requests naming this node as the holder waiting to be served (every node
    /// receives each request; the others refuse it before it takes a place here). Beyond it a
    /// request is dropped and counted (`replay_requests_dropped`), which ends it with no
    /// answer: its sender asks another holder, or again at its next check. Default 64.
    pub request_queue_len_max: usize,
    /// Heads announcements of other nodes waiting to be handled, and (each in a queue of its
    /// own) their liveliness changes and the decision servers' announcements; beyond it they
    /// are dropped. Heads are counted as `heads_dropped` and come again every
    /// `ack_interval_ms`. Liveliness does not send a dropped change again, so after a drop
    /// (counted as `presence_dropped`, or `servers_dropped` in the decisions' counters) the node
    /// notices it within `ack_interval_ms` (`routing.probe_interval_ms` for decision servers), asks who
    /// is alive now (a query of at most `replay_timeout_ms`, tried again while it fails) and its
    /// table follows the answer: keep it well above the number of nodes. At least 64.
    /// Default 1024.
    pub peer_events_queue_len_max: usize,
    /// Most queued local records the publisher takes in one round (it frames them by stream
    /// before it publishes them). Default 4096.
    pub publish_round_len_max: usize,
    /// How long an orderly stop waits for the records queued to be published live to go
    /// out, in ms, before the handover. 0: not waited for (subscribers replay them later).
    /// Default 5000.
    pub shutdown_flush_ms: u64,
    /// Most replay requests for one stream in one check (each for one missing range, answered
    /// with up to 16 × `replay_batch_len_max` records); the next check goes on. Default 64.
    pub replay_requests_per_check_max: usize,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            subscribe: Vec::new(),
            replay_batch_len_max: 256,
            replay_check_interval_ms: 1000,
            replay_timeout_ms: 2000,
            ack_interval_ms: 250,
            live_queue_len_max: 8192,
            live_queue_bytes_max: 64 * 1024 * 1024,
            publish_queue_len_max: 4096,
            publish_queue_bytes_max: 8 * 1024 * 1024,
            live_frame_bytes_max: 16384,
            shutdown_handover_ms: 5000,
            consumer_gap_wait_ms: 30_000,
            live_batch_len_max: 512,
            live_batch_bytes_max: 256 * 1024,
            insert_batches_in_flight_max: 64,
            request_queue_len_max: 64,
            peer_events_queue_len_max: 1024,
            publish_round_len_max: 4096,
            shutdown_flush_ms: 5000,
            replay_requests_per_check_max: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSection {
    /// Streams that foreign clients may write through `strata/ingest/<stream>`.
    /// Default none: ingest is off.
    pub streams: Vec<StreamPattern>,
    /// Largest accepted ingest message, in bytes. Default 65536.
    pub payload_bytes_max: usize,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection { streams: Vec::new(), payload_bytes_max: 64 * 1024 }
    }
}

/// OTP restart strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    OneForOne,
    OneForAll,
    RestForOne,
}

/// OTP child restart type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartType {
    /// Always restarted.
    Permanent,
    /// Restarted only after a failure, not after a normal exit.
    Transient,
    /// Never restarted.
    Temporary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionSection {
    /// `one_for_one`, `one_for_all` or `rest_for_one`. Default `one_for_one`.
    pub strategy: Strategy,
    /// Restarts allowed within `restart_window_ms` before escalating. Default 5.
    pub restarts_max: u32,
    /// Window of the restart intensity, in ms: longer than the backoff can spread `restarts_max`
    /// restarts over (their delays at full jitter; checked), or a child failing at every start
    /// would never exceed the intensity. Default 10000.
    pub restart_window_ms: u64,
    /// First restart delay, in ms; doubles with each restart in the window. Default 50.
    pub backoff_base_ms: u64,
    /// Largest restart delay, in ms. Default 5000.
    pub backoff_max_ms: u64,
    /// Random spread added to each delay, in percent of it. Default 20.
    pub backoff_jitter_pct: u8,
    /// How long one child may take to stop before it is killed, in ms. Default 5000.
    pub child_shutdown_timeout_ms: u64,
    /// Supervision events waiting to be appended to the `events` stream; beyond it they are
    /// counted as dropped (and still logged). Default 1024.
    pub events_queue_len_max: usize,
    /// How long an orderly stop waits for the events still queued to be appended, in ms; past
    /// it the rest are not appended. 0: no wait. Default 5000.
    pub events_drain_wait_ms: u64,
    /// Most records an actor's host reads from one input per batch (one handler batch, one
    /// cursor commit). Default 256.
    pub input_batch_len_max: usize,
    /// Longest an idle actor's host waits for new input before it looks again, in ms (new
    /// records wake it at once; this bounds a missed wake-up). At least 10. Default 200.
    pub input_idle_wait_ms: u64,
    /// How long a status query waits for the root supervisor's list of actors, in ms; past
    /// it the status shows the list as unknown (`actors` null, `actors_unlisted_after_ms`).
    /// Well below `strata status --timeout-ms` (2000), so that a node whose supervisor is busy
    /// still answers in time, and is not taken for one that is down. Default 500.
    pub status_children_wait_ms: u64,
    /// Times in a row an actor's handler may fail (an error or a panic) on the same input
    /// record, each failure restarting the actor into it, before the next instance passes that
    /// record over with an `input_failed_passed` event. A `Retry` error (not the input's
    /// fault: a connection that ended) does not count. 0: never pass it (the actor is
    /// restarted into it until its supervisor gives up). Each failure is a restart, counted
    /// in `restarts_max` with every other restart of the node's actors: with the defaults,
    /// two such records in one `restart_window_ms` are passed, a third gives up. A value above
    /// `restarts_max` is taken as `restarts_max`. Default 2 (one retry after a fresh start).
    pub input_failures_max: u32,
}

impl Default for SupervisionSection {
    fn default() -> Self {
        SupervisionSection {
            strategy: Strategy::OneForOne,
            restarts_max: 5,
            restart_window_ms: 10_000,
            backoff_base_ms: 50,
            backoff_max_ms: 5_000,
            backoff_jitter_pct: 20,
            child_shutdown_timeout_ms: 5_000,
            events_queue_len_max: 1024,
            events_drain_wait_ms: 5000,
            input_batch_len_max: 256,
            input_idle_wait_ms: 200,
            status_children_wait_ms: 500,
            input_failures_max: 2,
        }
    }
}

/// One actor of the node's supervision tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    /// Registered actor kind, e.g. `sensor`, `inference`, `arbiter`. Required.
    pub kind: Name,
    /// Unique name of this actor in the node; also its cursor's name. Required.
    pub name: Name,
    /// Streams the actor consumes: `stream` (this node's) or `origin:stream`.
    #[serde(default)]
    pub inputs: Vec<StreamRef>,
    /// Streams the actor appends to.
    #[serde(default)]
    pub outputs: Vec<StreamName>,
    /// `permanent`, `transient` or `temporary`. Default `permanent`.
    #[serde(default = "permanent")]
    pub restart: RestartType,
    /// Kind-specific parameters, checked by the kind when the node is built.
    #[serde(default)]
    pub params: toml::Table,
}

fn permanent() -> RestartType {
    RestartType::Permanent
}

impl ActorSpec {
    /// Parses `params` into a kind's typed parameters (unknown keys refused); the error is the
    /// parser's message, naming the key.
    pub fn params<P: serde::de::DeserializeOwned>(&self) -> Result<P, String> {
        serde_path_to_error::deserialize(toml::Value::Table(self.params.clone())).map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
            let (path, message) = (e.path().to_string(), e.inner().message().trim().to_owned());
            // The key, unless the message names it already (unknown fields).
            if path == "." || message.starts_with("unknown field") {
                message
            } else {
                format!("{path}: {message}")
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    /// Tiers in order of preference when several can meet a deadline.
    /// Default `["cloud", "fog", "edge"]`.
    pub preference: Vec<Tier>,
    /// Time kept in reserve when judging whether a tier fits a budget, in ms. Default 2.
    pub safety_margin_ms: u64,
    /// Send to two tiers when estimates are uncertain. Default false.
    pub hedging: bool,
    /// Period of latency probes to each reachable tier, in ms; a probe waits as long as its
    /// capability's deadline. Default 500.
    pub probe_interval_ms: u64,
    /// Deadline of a decision whose capability has no entry in `deadline_ms`, in ms.
    /// Default 100.
    pub default_deadline_ms: u64,
    /// Deadline per capability, in ms, e.g. `{ anomaly = 20 }`. Default none.
    pub deadline_ms: BTreeMap<Name, u64>,
    /// Time the local fallback needs to decide, kept in reserve when sending a request
    /// elsewhere, in ms. Default 2.
    pub fallback_ms: u64,
    /// Latency samples (answers and probes) kept per tier, node and capability. Default 16.
    pub estimate_samples_max: usize,
    /// Samples needed before a tier is trusted with requests. Default 3.
    pub estimate_samples_min: usize,
    /// Decision requests a serving node queues and answers at once; beyond it, requests
    /// are refused (no reply: the requester falls back). Default 64.
    pub serve_queue_len_max: usize,
    /// Decision servers (capability, tier, node) this node keeps track of and probes; one
    /// announced beyond it is not taken (until it is announced again with room, or the servers
    /// are read again in full), and counted (`servers_refused`): a broken or hostile
    /// peer announcing thousands cannot grow the table and its probes without bound. Keep it
    /// well above the capabilities × nodes of the system. Default 1024.
    pub servers_max: usize,
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            preference: vec![Tier::Cloud, Tier::Fog, Tier::Edge],
            safety_margin_ms: 2,
            hedging: false,
            probe_interval_ms: 500,
            default_deadline_ms: 100,
            deadline_ms: BTreeMap::new(),
            fallback_ms: 2,
            estimate_samples_max: 16,
            estimate_samples_min: 3,
            serve_queue_len_max: 64,
            servers_max: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModesSection {
    /// How long a lost tier must stay back before the mode goes up again, in ms.
    /// Default 3000.
    pub recover_hold_ms: u64,
    /// How often the mode is re-evaluated from the liveliness table and local health, in ms.
    /// Default 100.
    pub check_interval_ms: u64,
    /// After a recovery, how long the catch-up of the tiers that acknowledge this node's
    /// streams is watched, in ms: a `caught_up` event when they hold what this node held at
    /// the recovery, a `catch_up_slow` event if they still do not after this (looked at every
    /// `replication.ack_interval_ms`). Default 600000.
    pub catch_up_watch_ms: u64,
}

impl Default for ModesSection {
    fn default() -> Self {
        ModesSection { recover_hold_ms: 3000, check_interval_ms: 100, catch_up_watch_ms: 600_000 }
    }
}

/// What may be decided without a human in one degraded mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Action classes allowed autonomously.
    pub actions: Vec<Name>,
    /// Highest risk score (0.0..=1.0) allowed autonomously.
    pub risk_max: f64,
}

fn bounds(actions: &[&str], risk_max: f64) -> Bounds {
    Bounds { actions: actions.iter().map(|a| Name::new(*a).expect("static name")).collect(), risk_max }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutonomySection {
    /// How long an escalation waits for an operator, in ms. Default 30000.
    pub escalation_timeout_ms: u64,
    /// Action taken when an escalation times out or is denied. Default `hold`.
    pub safe_default_action: Name,
    /// The local stream whose escalations wait for an operator here. Default `escalations`.
    pub escalations_stream: StreamName,
    /// The local stream where resolutions (approved, denied, timed out) are appended, for
    /// the arbiter to act on. Default `decisions`.
    pub resolutions_stream: StreamName,
    /// Escalations waiting at once; beyond it the oldest is resolved with the safe default
    /// at once (and recorded as such). Default 1024.
    pub pending_escalations_max: usize,
    /// Resolutions remembered after the fact, to answer a late approve or deny with what
    /// happened. Default 1024.
    pub resolutions_remembered_max: usize,
    /// Operators' approvals and denials waiting for this node's escalation desk; beyond it
    /// one is dropped: the operator's tool gets no reply from this node, and the escalation
    /// stays pending. Default 16.
    pub approvals_queue_len_max: usize,
    /// Escalations read from their stream per batch. Default 64.
    pub escalation_batch_len_max: usize,
    /// Longest wait for new escalations between checks for timed-out ones, in ms: an
    /// escalation times out at most this late. At least 10. Default 100.
    pub escalation_check_interval_ms: u64,
    /// Bounds in mode `Full`. Default actions log, alert, adjust, stop; risk_max 1.0.
    pub full: Bounds,
    /// Bounds in mode `NoCloud`. Default actions log, alert, adjust, stop; risk_max 0.7.
    pub no_cloud: Bounds,
    /// Bounds in mode `Isolated`. Default actions log, alert, stop; risk_max 0.4.
    pub isolated: Bounds,
    /// Bounds in mode `Safe`. Default actions log, alert; risk_max 0.1.
    pub safe: Bounds,
}

impl Default for AutonomySection {
    fn default() -> Self {
        AutonomySection {
            escalation_timeout_ms: 30_000,
            safe_default_action: Name::new("hold").expect("static name"),
            escalations_stream: StreamName::new("escalations").expect("static name"),
            resolutions_stream: StreamName::new("decisions").expect("static name"),
            pending_escalations_max: 1024,
            resolutions_remembered_max: 1024,
            approvals_queue_len_max: 16,
            escalation_batch_len_max: 64,
            escalation_check_interval_ms: 100,
            full: bounds(&["log", "alert", "adjust", "stop"], 1.0),
            no_cloud: bounds(&["log", "alert", "adjust", "stop"], 0.7),
            isolated: bounds(&["log", "alert", "stop"], 0.4),
            safe: bounds(&["log", "alert"], 0.1),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading and validation

impl NodeConfig {
    /// Reads, parses and validates the config at `file`.
    pub fn load(file: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError { file: file.to_owned(), problems: vec![Problem::new("", format!("cannot read the file: {e}"))] })?;
        NodeConfig::parse(file, &text)
    }

    /// Parses and validates `text`; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        let config = parse_toml(text).map_err(|p| ConfigError { file: file.to_owned(), problems: vec![p] })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { file: file.to_owned(), problems })
        }
    }

    /// Every problem that parsing alone cannot see (ranges, cross-field rules).
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |path: &str, message: String| out.push(Problem::new(path, message));

        let z = &self.zenoh;
        let mode = z.mode_for(self.node.tier);
        if !(100..=60_000).contains(&z.lease_ms) {
            bad("zenoh.lease_ms", format!("{} is not in 100..=60000", z.lease_ms));
        }
        if !(10..=60_000).contains(&z.connect_retry_ms) {
            bad("zenoh.connect_retry_ms", format!("{} is not in 10..=60000", z.connect_retry_ms));
        }
        if !(100..=60_000).contains(&z.open_timeout_ms) {
            bad("zenoh.open_timeout_ms", format!("{} is not in 100..=60000", z.open_timeout_ms));
        }
        if mode == ZenohMode::Client && !z.listen.is_empty() {
            bad("zenoh.listen", "a Zenoh client does not listen; remove `listen` or set mode = \"peer\" or \"router\"".into());
        }
        if mode == ZenohMode::Client && z.connect.is_empty() {
            bad("zenoh.connect", "a Zenoh client needs at least one endpoint to connect to".into());
        }
        duplicates("zenoh.listen", &z.listen, &mut bad);
        duplicates("zenoh.connect", &z.connect, &mut bad);
        for (i, c) in z.connect.iter().enumerate() {
            if z.listen.contains(c) {
                bad(&format!("zenoh.connect[{i}]"), format!("{:?} is this node's own listen endpoint", c.as_str()));
            }
        }

        let sec = &self.security;
        let tls_endpoints = z.listen.iter().chain(&z.connect).any(|e| e.as_str().starts_with("quic/"));
        if sec.tls {
            for (field, value) in [("ca_file", &sec.ca_file), ("cert_file", &sec.cert_file), ("key_file", &sec.key_file)] {
                if value.is_none() {
                    bad(&format!("security.{field}"), "is required with tls = true".into());
                }
            }
            if sec.continuum.is_empty() {
                bad("security.continuum", "is required with tls = true: the configs of every node, from which the access control is derived".into());
            }
            for (list, eps) in [("listen", &z.listen), ("connect", &z.connect)] {
                for (i, e) in eps.iter().enumerate() {
                    if !e.as_str().starts_with("quic/") {
                        bad(
                            &format!("zenoh.{list}[{i}]"),
                            format!("{:?} is not a quic/ endpoint, and security.tls = true puts every link under mutual TLS (QUIC)", e.as_str()),
                        );
                    }
                }
            }
            if z.scouting_multicast {
                // Multicast discovery would open plain links to any Zenoh on the LAN, and
                // announce this node there: not every link would be mutual TLS any more.
                bad("zenoh.scouting_multicast", "must be false with security.tls = true: every link is an explicit quic/ endpoint".into());
            }
        } else {
            if tls_endpoints {
                bad("security.tls", "quic/ endpoints need security.tls = true (and the CA, certificate and key files)".into());
            }
            // Without TLS there is no identity and no access control: these would look like
            // protection and be none (anyone reaching an endpoint could approve, deny, ingest).
            // (The file paths are left alone: unused, they restrict nothing.)
            let set = [("continuum", !sec.continuum.is_empty()), ("operators", !sec.operators.is_empty()), ("ingest_clients", !sec.ingest_clients.is_empty())];
            for (field, _) in set.iter().filter(|(_, is_set)| *is_set) {
                bad(
                    &format!("security.{field}"),
                    "is set, but security.tls = false: without TLS there is no identity and no access control, so it would protect nothing; set tls = true or remove it"
                        .into(),
                );
            }
        }
        for (field, names) in [("operators", &sec.operators), ("ingest_clients", &sec.ingest_clients)] {
            for (i, n) in names.iter().enumerate() {
                if n.is_empty() || n.chars().any(|c| c.is_control()) {
                    bad(&format!("security.{field}[{i}]"), format!("{n:?} is not a certificate common name"));
                } else if n == self.node.id.as_str() {
                    bad(&format!("security.{field}[{i}]"), format!("{n:?} is this node's own id; clients need identities of their own"));
                }
            }
        }
        if !sec.ingest_clients.is_empty() && self.ingest.streams.is_empty() {
            bad("security.ingest_clients", "ingest clients are named but [ingest] streams is empty".into());
        }

        let l = &self.log;
        if l.sync == SyncPolicy::Interval && !(1..=60_000).contains(&l.sync_interval_ms) {
            bad("log.sync_interval_ms", format!("{} is not in 1..=60000", l.sync_interval_ms));
        }
        if !(1..=65_536).contains(&l.commit_batch_len_max) {
            bad("log.commit_batch_len_max", format!("{} is not in 1..=65536", l.commit_batch_len_max));
        }
        if l.commit_linger_us > 1_000_000 {
            bad("log.commit_linger_us", format!("{} is more than 1000000 (1 s)", l.commit_linger_us));
        }
        if !(1..=100_000).contains(&l.commit_wait_us_max) {
            bad("log.commit_wait_us_max", format!("{} is not in 1..=100000", l.commit_wait_us_max));
        }
        if l.commit_spin_us > l.commit_wait_us_max {
            bad("log.commit_spin_us", format!("{} is more than commit_wait_us_max ({}), the wait it is part of", l.commit_spin_us, l.commit_wait_us_max));
        }
        if !(1..=10_000_000).contains(&l.sweep_records_max) {
            bad("log.sweep_records_max", format!("{} is not in 1..=10000000", l.sweep_records_max));
        }
        if !(1..=1024).contains(&l.commit_unsynced_batches_max) {
            bad("log.commit_unsynced_batches_max", format!("{} is not in 1..=1024", l.commit_unsynced_batches_max));
        }
        if !(1..=1_048_576).contains(&l.commit_queue_len_max) {
            bad("log.commit_queue_len_max", format!("{} is not in 1..=1048576", l.commit_queue_len_max));
        }
        if !(1..=REPLICABLE_PAYLOAD_BYTES_MAX).contains(&l.payload_bytes_max) {
            bad(
                "log.payload_bytes_max",
                format!(
                    "{} is not in 1..={REPLICABLE_PAYLOAD_BYTES_MAX} (a record must fit in one replay message of {MESSAGE_BYTES_MAX} bytes)",
                    l.payload_bytes_max
                ),
            );
        }
        if l.memtable_bytes < 64 * 1024 {
            bad("log.memtable_bytes", format!("{} is less than 65536", l.memtable_bytes));
        }
        for (i, r) in l.retention.iter().enumerate() {
            if r.bytes_max.is_none() && r.age_s_max.is_none() {
                bad(&format!("log.retention[{i}]"), "a rule needs bytes_max, age_s_max or both".into());
            }
            if r.bytes_max == Some(0) {
                bad(&format!("log.retention[{i}].bytes_max"), "must be at least 1".into());
            }
        }

        let r = &self.replication;
        // Upper bounds too: a value with a few zeros too many must be refused here, not
        // overflow a sum of instants or a channel's allocation when the node starts.
        let (sv, rt, md, au) = (&self.supervision, &self.routing, &self.modes, &self.autonomy);
        for (key, value, min, max) in [
            ("replication.replay_batch_len_max", r.replay_batch_len_max as u64, 1, BATCH_LEN_CEILING),
            ("replication.replay_check_interval_ms", r.replay_check_interval_ms, 10, DAY_MS),
            ("replication.replay_timeout_ms", r.replay_timeout_ms, 10, DAY_MS),
            ("replication.ack_interval_ms", r.ack_interval_ms, 10, DAY_MS),
            ("replication.live_queue_len_max", r.live_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("replication.live_queue_bytes_max", r.live_queue_bytes_max as u64, crate::bus::wire::MESSAGE_BYTES_MAX as u64, u64::MAX),
            ("replication.publish_queue_len_max", r.publish_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("replication.publish_queue_bytes_max", r.publish_queue_bytes_max as u64, 1024, u64::MAX),
            ("replication.live_frame_bytes_max", r.live_frame_bytes_max as u64, 1024, crate::bus::wire::MESSAGE_BYTES_MAX as u64),
            ("replication.shutdown_handover_ms", r.shutdown_handover_ms, 0, DAY_MS),
            ("replication.consumer_gap_wait_ms", r.consumer_gap_wait_ms, 0, DAY_MS),
            ("ingest.payload_bytes_max", self.ingest.payload_bytes_max as u64, 16, u64::MAX),
            ("log.retention_check_interval_ms", l.retention_check_interval_ms, 1, DAY_MS),
            ("supervision.restart_window_ms", sv.restart_window_ms, 1, DAY_MS),
            ("supervision.backoff_base_ms", sv.backoff_base_ms, 0, DAY_MS),
            ("supervision.backoff_max_ms", sv.backoff_max_ms, 0, DAY_MS),
            ("supervision.child_shutdown_timeout_ms", sv.child_shutdown_timeout_ms, 1, DAY_MS),
            ("supervision.events_queue_len_max", sv.events_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("routing.safety_margin_ms", rt.safety_margin_ms, 0, DAY_MS),
            ("routing.probe_interval_ms", rt.probe_interval_ms, 10, DAY_MS),
            ("routing.default_deadline_ms", rt.default_deadline_ms, 1, DAY_MS),
            ("routing.fallback_ms", rt.fallback_ms, 0, DAY_MS),
            ("routing.estimate_samples_max", rt.estimate_samples_max as u64, 1, QUEUE_LEN_CEILING),
            ("routing.serve_queue_len_max", rt.serve_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("routing.servers_max", rt.servers_max as u64, 1, QUEUE_LEN_CEILING),
            ("modes.recover_hold_ms", md.recover_hold_ms, 0, DAY_MS),
            ("modes.check_interval_ms", md.check_interval_ms, 1, DAY_MS),
            ("autonomy.escalation_timeout_ms", au.escalation_timeout_ms, 1, DAY_MS),
            ("autonomy.pending_escalations_max", au.pending_escalations_max as u64, 1, QUEUE_LEN_CEILING),
            ("autonomy.resolutions_remembered_max", au.resolutions_remembered_max as u64, 1, QUEUE_LEN_CEILING),
            ("autonomy.approvals_queue_len_max", au.approvals_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("node.status_queue_len_max", self.node.status_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("autonomy.escalation_batch_len_max", au.escalation_batch_len_max as u64, 1, BATCH_LEN_CEILING),
            ("autonomy.escalation_check_interval_ms", au.escalation_check_interval_ms, 10, DAY_MS),
            ("replication.live_batch_len_max", r.live_batch_len_max as u64, 1, BATCH_LEN_CEILING),
            ("replication.live_batch_bytes_max", r.live_batch_bytes_max as u64, 1024, crate::bus::wire::MESSAGE_BYTES_MAX as u64 * 16),
            ("replication.insert_batches_in_flight_max", r.insert_batches_in_flight_max as u64, 1, BATCH_LEN_CEILING),
            ("replication.request_queue_len_max", r.request_queue_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("replication.peer_events_queue_len_max", r.peer_events_queue_len_max as u64, 64, QUEUE_LEN_CEILING),
            ("replication.replay_requests_per_check_max", r.replay_requests_per_check_max as u64, 1, QUEUE_LEN_CEILING),
            ("replication.publish_round_len_max", r.publish_round_len_max as u64, 1, QUEUE_LEN_CEILING),
            ("replication.shutdown_flush_ms", r.shutdown_flush_ms, 0, DAY_MS),
            ("supervision.events_drain_wait_ms", sv.events_drain_wait_ms, 0, DAY_MS),
            ("supervision.input_batch_len_max", sv.input_batch_len_max as u64, 1, BATCH_LEN_CEILING),
            ("supervision.input_idle_wait_ms", sv.input_idle_wait_ms, 10, DAY_MS),
            ("supervision.status_children_wait_ms", sv.status_children_wait_ms, 1, DAY_MS),
            ("modes.catch_up_watch_ms", md.catch_up_watch_ms, 1, DAY_MS),
            ("log.wal_files_reused", l.wal_files_reused as u64, 0, 64),
            ("log.present_ranges_max", l.present_ranges_max as u64, 1, QUEUE_LEN_CEILING),
            ("log.info_log_files_max", l.info_log_files_max as u64, 1, 1000),
            ("log.info_log_file_bytes_max", l.info_log_file_bytes_max as u64, 64 * 1024, 1 << 30),
            ("zenoh.publishers_max", z.publishers_max as u64, 0, QUEUE_LEN_CEILING),
        ] {
            if value < min {
                bad(key, format!("{value} is less than {min}"));
            } else if value > max {
                bad(key, format!("{value} is more than {max}"));
            }
        }
        for (cap, ms) in &rt.deadline_ms {
            if *ms > DAY_MS {
                bad(&format!("routing.deadline_ms.{cap}"), format!("{ms} is more than {DAY_MS}"));
            }
        }
        if self.ingest.payload_bytes_max > l.payload_bytes_max {
            bad("ingest.payload_bytes_max", format!("{} is larger than log.payload_bytes_max ({})", self.ingest.payload_bytes_max, l.payload_bytes_max));
        }

        let s = &self.supervision;
        if s.backoff_base_ms > s.backoff_max_ms {
            bad("supervision.backoff_base_ms", format!("{} is larger than backoff_max_ms ({})", s.backoff_base_ms, s.backoff_max_ms));
        }
        if s.backoff_jitter_pct > 100 {
            bad("supervision.backoff_jitter_pct", format!("{} is more than 100", s.backoff_jitter_pct));
        }
        let span = crate::supervise::policy::backoff_span(&crate::supervise::policy::Policy::from_config(s));
        if span >= std::time::Duration::from_millis(s.restart_window_ms) {
            bad(
                "supervision.restart_window_ms",
                format!(
                    "{} is not longer than the {} ms the backoff can spread restarts_max ({}) restarts over (backoff_base_ms {}, backoff_max_ms {}, jitter {}%): \
                     a child failing at every start would never exceed restarts_max and be restarted for ever; raise it, or lower restarts_max or backoff_max_ms",
                    s.restart_window_ms,
                    span.as_millis(),
                    s.restarts_max,
                    s.backoff_base_ms,
                    s.backoff_max_ms,
                    s.backoff_jitter_pct
                ),
            );
        }

        let mut names = BTreeSet::new();
        for (i, a) in self.actors.iter().enumerate() {
            if !names.insert(&a.name) {
                bad(&format!("actors[{i}].name"), format!("{:?} is already the name of another actor", a.name.as_str()));
            }
            if a.name.as_str() == crate::node::escalate::DESK {
                // Its cursors and snapshots would be the desk's own.
                bad(&format!("actors[{i}].name"), format!("{:?} is the node's escalation desk's name; choose another", a.name.as_str()));
            }
            duplicates(&format!("actors[{i}].outputs"), &a.outputs, &mut bad);
        }

        let rt = &self.routing;
        if rt.estimate_samples_min > rt.estimate_samples_max {
            bad("routing.estimate_samples_min", format!("{} is larger than estimate_samples_max ({})", rt.estimate_samples_min, rt.estimate_samples_max));
        }
        if rt.preference.is_empty() {
            bad("routing.preference", "must name at least one tier".into());
        }
        duplicates("routing.preference", &rt.preference, &mut bad);
        for (cap, ms) in &rt.deadline_ms {
            if *ms == 0 {
                bad(&format!("routing.deadline_ms.{cap}"), "must be at least 1".into());
            }
        }

        for (mode, b) in
            [("full", &self.autonomy.full), ("no_cloud", &self.autonomy.no_cloud), ("isolated", &self.autonomy.isolated), ("safe", &self.autonomy.safe)]
        {
            if !(0.0..=1.0).contains(&b.risk_max) {
                bad(&format!("autonomy.{mode}.risk_max"), format!("{} is not in 0.0..=1.0", b.risk_max));
            }
            duplicates(&format!("autonomy.{mode}.actions"), &b.actions, &mut bad);
        }
        out
    }
}

/// Longest duration any `*_ms` setting may have: one day.
pub(crate) const DAY_MS: u64 = 86_400_000;
/// Most entries any queue, and any list of samples, may be configured to hold.
const QUEUE_LEN_CEILING: u64 = 1_048_576;
/// Most records any batch may be configured to hold.
const BATCH_LEN_CEILING: u64 = 65_536;

fn duplicates<T: PartialEq + fmt::Debug>(path: &str, items: &[T], bad: &mut impl FnMut(&str, String)) {
    for (i, item) in items.iter().enumerate() {
        if items[..i].contains(item) {
            bad(&format!("{path}[{i}]"), format!("{item:?} is listed twice"));
        }
    }
}

fn parse_toml(text: &str) -> Result<NodeConfig, Problem> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // Newlines before the span, plus one: an error starting a line (an unknown key) is on
        // that line, not the one before.
        let line = inner.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let path = if path == "." { String::new() } else { path };
        Problem { path, message: inner.message().trim().to_owned(), line }
    })
}

/// Security between tiers: mutual TLS on every Zenoh link and access control derived from
/// the continuum's configs (see `crate::security`). Paths are relative to the working
/// directory, like `node.data_dir`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySection {
    /// Mutual TLS on every link (every endpoint must be `quic/`: TLS 1.3) and Zenoh access
    /// control, default deny. Default false.
    pub tls: bool,
    /// PEM certificate of the CA that signs every node's and client's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate of this node; its common name must be `node.id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The configs of every node of the continuum (this one included): the access control
    /// is derived from them (`strata acl` prints it). Default none.
    pub continuum: Vec<PathBuf>,
    /// Certificate common names of the operators who may read status and approve or deny
    /// escalations through this node. Default none.
    pub operators: Vec<String>,
    /// Certificate common names of the foreign clients (devices, gateways) that may put
    /// readings on this node's `[ingest]` streams. Default none.
    pub ingest_clients: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// A continuum of several configs

/// A set of node configs that form a consistent continuum, with its links.
#[derive(Debug, Clone)]
pub struct Continuum {
    pub nodes: Vec<(PathBuf, NodeConfig)>,
    /// `(from, to)` indexes into `nodes`: `from` connects to an endpoint `to` listens on.
    pub links: Vec<(usize, usize)>,
    /// One path edge → fog → cloud, as node indexes.
    pub path: [usize; 3],
}

/// Checks that configs (already loaded and valid one by one) form a continuum: unique node
/// ids and listen endpoints, every `connect` endpoint is some node's `listen`, and at least
/// one edge → fog → cloud path.
pub fn check_continuum(nodes: Vec<(PathBuf, NodeConfig)>) -> Result<Continuum, Vec<ConfigError>> {
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut report = |file: &Path, path: String, message: String| match errors.iter_mut().find(|e| e.file == file) {
        Some(e) => e.problems.push(Problem::new(path, message)),
        None => errors.push(ConfigError { file: file.to_owned(), problems: vec![Problem::new(path, message)] }),
    };

    let mut ids: BTreeMap<&NodeId, &Path> = BTreeMap::new();
    let mut listeners: BTreeMap<&Endpoint, (usize, &Path)> = BTreeMap::new();
    for (i, (file, cfg)) in nodes.iter().enumerate() {
        if let Some(first) = ids.insert(&cfg.node.id, file) {
            ids.insert(&cfg.node.id, first);
            report(file, "node.id".into(), format!("{:?} is already the id of the node in {}", cfg.node.id.as_str(), first.display()));
        }
        for (j, ep) in cfg.zenoh.listen.iter().enumerate() {
            if let Some(&(_, first)) = listeners.get(ep) {
                report(file, format!("zenoh.listen[{j}]"), format!("{:?} is already a listen endpoint of {}", ep.as_str(), first.display()));
            } else {
                listeners.insert(ep, (i, file));
            }
        }
    }

    // Zenoh gives a link the rights of every subject its certificate's name matches: a client
    // named like a node would give that node's certificate the client's rights (an edge
    // approving a fog's escalations, say).
    for (file, cfg) in &nodes {
        for (field, names) in [("operators", &cfg.security.operators), ("ingest_clients", &cfg.security.ingest_clients)] {
            for (j, name) in names.iter().enumerate() {
                if let Some((other, _)) = nodes.iter().find(|(_, c)| c.node.id.as_str() == name) {
                    report(
                        file,
                        format!("security.{field}[{j}]"),
                        format!("{name:?} is the id of the node in {}; clients need identities of their own", other.display()),
                    );
                }
            }
        }
    }

    let mut links = Vec::new();
    for (i, (file, cfg)) in nodes.iter().enumerate() {
        for (j, ep) in cfg.zenoh.connect.iter().enumerate() {
            match listeners.get(ep) {
                Some(&(to, _)) => links.push((i, to)),
                None => {
                    let known: Vec<String> = listeners.iter().map(|(ep, (n, _))| format!("{} ({})", ep.as_str(), nodes[*n].1.node.id)).collect();
                    let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
                    report(file, format!("zenoh.connect[{j}]"), format!("{:?} is not the listen endpoint of any node given (listening: {known})", ep.as_str()));
                }
            }
        }
    }

    let tier = |i: usize| nodes[i].1.node.tier;
    let linked = |a: usize, b: usize| links.iter().any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a));
    let mut path = None;
    'search: for e in (0..nodes.len()).filter(|&i| tier(i) == Tier::Edge) {
        for f in (0..nodes.len()).filter(|&i| tier(i) == Tier::Fog && linked(e, i)) {
            if let Some(c) = (0..nodes.len()).find(|&i| tier(i) == Tier::Cloud && linked(f, i)) {
                path = Some([e, f, c]);
                break 'search;
            }
        }
    }
    if path.is_none() && errors.is_empty() {
        let count = |t| nodes.iter().filter(|(_, c)| c.node.tier == t).count();
        let message = format!(
            "no path edge -> fog -> cloud through the connect/listen links ({} edge, {} fog, {} cloud node(s) given)",
            count(Tier::Edge),
            count(Tier::Fog),
            count(Tier::Cloud)
        );
        errors.push(ConfigError { file: PathBuf::from("continuum"), problems: vec![Problem::new("", message)] });
    }
    match path {
        Some(path) if errors.is_empty() => Ok(Continuum { nodes, links, path }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[zenoh]\nconnect = [\"tcp/127.0.0.1:7448\"]\n";

    /// Parses `text` and returns `Ok` or the error rendered as the CLI shows it.
    fn check(text: &str, expected: Result<(), &str>) {
        let got = NodeConfig::parse(Path::new("t.toml"), text).map(|_| ()).map_err(|e| e.to_string());
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(fragment)) => assert!(e.contains(fragment), "error {e:?} lacks {fragment:?}"),
            (got, expected) => panic!("got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = NodeConfig::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(c.zenoh.mode_for(c.node.tier), ZenohMode::Peer);
        assert_eq!(c.log, LogSection::default());
        assert_eq!(c.node.data_dir(), PathBuf::from("data/edge-1"));
    }

    #[test]
    fn security_sections_are_checked() {
        let secure = "[node]\nid = \"e\"\ntier = \"edge\"\n[zenoh]\nlisten = [\"quic/127.0.0.1:1\"]\n[security]\ntls = true\nca_file = \"ca.pem\"\ncert_file = \"e.pem\"\nkey_file = \"e.key\"\ncontinuum = [\"e.toml\"]\n";
        check(secure, Ok(()));
        check(&secure.replace("quic/", "tcp/"), Err("zenoh.listen[0]: \"tcp/127.0.0.1:1\" is not a quic/ endpoint"));
        check(&secure.replace("quic/", "tls/"), Err("eclipse-zenoh/zenoh#2557"));
        check(&secure.replace("key_file = \"e.key\"\n", ""), Err("security.key_file: is required with tls = true"));
        check(&secure.replace("continuum = [\"e.toml\"]\n", ""), Err("security.continuum: is required with tls = true"));
        check(&secure.replace("tls = true", "tls = false"), Err("security.tls: quic/ endpoints need security.tls = true"));
        check(&format!("{secure}operators = [\"e\"]\n"), Err("security.operators[0]: \"e\" is this node's own id"));
        check(&format!("{secure}ingest_clients = [\"gw\"]\n"), Err("security.ingest_clients: ingest clients are named but [ingest] streams is empty"));
        // Without TLS, access lists would protect nothing; multicast discovery with TLS would
        // open plain links.
        let plain = "[node]\nid = \"e\"\ntier = \"edge\"\n[zenoh]\nlisten = [\"tcp/127.0.0.1:1\"]\n[security]\n";
        check(&format!("{plain}operators = [\"ops\"]\n"), Err("security.operators: is set, but security.tls = false"));
        check(&format!("{plain}continuum = [\"e.toml\"]\n"), Err("security.continuum: is set, but security.tls = false"));
        check(&format!("{plain}ca_file = \"ca.pem\"\n"), Ok(()));
        check(&secure.replace("[security]", "scouting_multicast = true\n[security]"), Err("zenoh.scouting_multicast: must be false with security.tls = true"));
    }

    /// The bounds that were constants in the code: each is a field now, refused by name out
    /// of its range and taken at its edges.
    #[test]
    fn former_constants_are_fields_with_ranges() {
        for (section, key, low, high) in [
            ("zenoh", "publishers_max", 0, QUEUE_LEN_CEILING),
            ("log", "wal_files_reused", 0, 64),
            ("log", "present_ranges_max", 1, QUEUE_LEN_CEILING),
            ("log", "info_log_files_max", 1, 1000),
            ("log", "info_log_file_bytes_max", 64 * 1024, 1 << 30),
            ("replication", "live_batch_len_max", 1, BATCH_LEN_CEILING),
            ("replication", "live_batch_bytes_max", 1024, 64 * 1024 * 1024),
            ("replication", "insert_batches_in_flight_max", 1, BATCH_LEN_CEILING),
            ("replication", "request_queue_len_max", 1, QUEUE_LEN_CEILING),
            ("replication", "peer_events_queue_len_max", 64, QUEUE_LEN_CEILING),
            ("replication", "replay_requests_per_check_max", 1, QUEUE_LEN_CEILING),
            ("replication", "publish_round_len_max", 1, QUEUE_LEN_CEILING),
            ("replication", "shutdown_flush_ms", 0, DAY_MS),
            ("supervision", "events_drain_wait_ms", 0, DAY_MS),
            ("supervision", "input_batch_len_max", 1, BATCH_LEN_CEILING),
            ("supervision", "input_idle_wait_ms", 10, DAY_MS),
            ("supervision", "status_children_wait_ms", 1, DAY_MS),
            ("modes", "catch_up_watch_ms", 1, DAY_MS),
            ("autonomy", "resolutions_remembered_max", 1, QUEUE_LEN_CEILING),
            ("autonomy", "approvals_queue_len_max", 1, QUEUE_LEN_CEILING),
            ("autonomy", "escalation_batch_len_max", 1, BATCH_LEN_CEILING),
            ("autonomy", "escalation_check_interval_ms", 10, DAY_MS),
            ("routing", "servers_max", 1, QUEUE_LEN_CEILING),
        ] {
            // MINIMAL ends in its [zenoh] table.
            let header = if section == "zenoh" { String::new() } else { format!("[{section}]\n") };
            let with = |v: u64| format!("{MINIMAL}{header}{key} = {v}\n");
            check(&with(low), Ok(()));
            check(&with(high), Ok(()));
            check(&with(high + 1), Err(&format!("t.toml: {section}.{key}: {} is more than {high}", high + 1)));
            if low > 0 {
                check(&with(low - 1), Err(&format!("t.toml: {section}.{key}: {} is less than {low}", low - 1)));
            }
        }
        let node = |v: u64| format!("[node]\nid = \"edge-1\"\ntier = \"edge\"\nstatus_queue_len_max = {v}\n[zenoh]\nconnect = [\"tcp/127.0.0.1:7448\"]\n");
        check(&node(1), Ok(()));
        check(&node(0), Err("t.toml: node.status_queue_len_max: 0 is less than 1"));
    }

    #[test]
    fn errors_name_key_path_and_problem() {
        check(
            &format!("{MINIMAL}[[actors]]\nkind = \"sensor\"\nname = \"a\"\n[[actors]]\nkind = \"sensor\"\nname = \"b\"\noutputs = [\"Readings!\"]\n"),
            Err("t.toml: actors[1].outputs[0]: \"Readings!\" is not a valid stream name"),
        );
        check(&format!("{MINIMAL}lease = 3\n"), Err("t.toml: zenoh.lease: unknown field `lease`"));
        check("[node]\nid = \"Edge\"\ntier = \"edge\"\n", Err("t.toml: node.id: \"Edge\" is not a valid node id"));
        check("[node]\nid = \"e\"\ntier = \"sky\"\n", Err("t.toml: node.tier: unknown variant `sky`"));
        check("[node]\ntier = \"edge\"\n", Err("missing field `id`"));
        check(&format!("{MINIMAL}[log]\nsync = \"sometimes\"\n"), Err("t.toml: log.sync: unknown variant `sometimes`"));
        check(&format!("{MINIMAL}[log]\ncommit_batch_len_max = 0\n"), Err("t.toml: log.commit_batch_len_max: 0 is not in 1..=65536"));
        check(&format!("{MINIMAL}[log]\ncommit_spin_us = 5000\n"), Err("t.toml: log.commit_spin_us: 5000 is more than commit_wait_us_max (2000)"));
        check(&format!("{MINIMAL}[log]\ncommit_spin_us = 5000\ncommit_wait_us_max = 5000\n"), Ok(()));
        check(&format!("{MINIMAL}[log]\nsweep_records_max = 0\n"), Err("t.toml: log.sweep_records_max: 0 is not in 1..=10000000"));
        check(
            &format!("{MINIMAL}[log]\npayload_bytes_max = 8388608\n"),
            Err("t.toml: log.payload_bytes_max: 8388608 is not in 1..=4192247 (a record must fit in one replay message of 4194304 bytes)"),
        );
        check(&format!("{MINIMAL}[log]\npayload_bytes_max = 4192247\n"), Ok(()));
        check(
            &format!("{MINIMAL}[routing]\nsafety_margin_ms = 18446744073709551\n"),
            Err("t.toml: routing.safety_margin_ms: 18446744073709551 is more than 86400000"),
        );
        check(
            &format!("{MINIMAL}[replication]\nlive_queue_len_max = 2305843009213693952\n"),
            Err("replication.live_queue_len_max: 2305843009213693952 is more than 1048576"),
        );
        check(&format!("{MINIMAL}[replication]\nshutdown_handover_ms = 86400001\n"), Err("replication.shutdown_handover_ms: 86400001 is more than 86400000"));
        check(
            &format!("{MINIMAL}[supervision]\nrestarts_max = 8\n"),
            Err("supervision.restart_window_ms: 10000 is not longer than the 13620 ms the backoff can spread restarts_max (8) restarts over"),
        );
        check(&format!("{MINIMAL}[supervision]\nrestarts_max = 8\nrestart_window_ms = 14000\n"), Ok(()));
        // input_failures_max above restarts_max is taken as restarts_max (not refused: a
        // config of restarts_max 1 that worked before the key existed still does).
        check(&format!("{MINIMAL}[supervision]\nrestarts_max = 1\n"), Ok(()));
        check(
            &format!("{MINIMAL}[[actors]]\nkind = \"sensor\"\nname = \"escalation-desk\"\n"),
            Err("actors[0].name: \"escalation-desk\" is the node's escalation desk's name; choose another"),
        );
        check(&format!("{MINIMAL}[routing.deadline_ms]\ninspect = 86400001\n"), Err("routing.deadline_ms.inspect: 86400001 is more than 86400000"));
        check(&format!("{MINIMAL}[zenoh]\n"), Err("duplicate key"));
        check(
            "[node]\nid = \"e\"\ntier = \"edge\"\n[zenoh]\nmode = \"client\"\nlisten = [\"tcp/127.0.0.1:1\"]\nconnect = [\"tcp/h:2\"]\n",
            Err("zenoh.listen: a Zenoh client does not listen"),
        );
        check(
            "[node]\nid = \"e\"\ntier = \"fog\"\n[zenoh]\nlisten = [\"udp/127.0.0.1:1\"]\n",
            Err("zenoh.listen[0]: \"udp/127.0.0.1:1\" is not a valid endpoint: protocol \"udp\" is not supported"),
        );
        check("[node]\nid = \"e\"\ntier = \"fog\"\n[zenoh]\nlisten = [\"tcp/127.0.0.1:70000\"]\n", Err("port \"70000\" is not in 1..=65535"));
        check(
            &format!("{MINIMAL}[[actors]]\nkind = \"x\"\nname = \"a\"\n[[actors]]\nkind = \"y\"\nname = \"a\"\n"),
            Err("actors[1].name: \"a\" is already the name of another actor"),
        );
        check(&format!("{MINIMAL}[autonomy.safe]\nactions = []\nrisk_max = 1.5\n"), Err("autonomy.safe.risk_max: 1.5 is not in 0.0..=1.0"));
        check(&format!("{MINIMAL}[replication]\nsubscribe = [\"edge-1\"]\n"), Err("replication.subscribe[0]: \"edge-1\" is not a valid subscription"));
        check(&format!("{MINIMAL}[[log.retention]]\nstreams = \"readings/**\"\n"), Err("log.retention[0]: a rule needs bytes_max, age_s_max or both"));
        check("[node\n", Err("line 1"));
        check("[node]\nid = \"e\"\ntier = \"fog\"\n[zenoh]\nleese_ms = 100\n", Err("(line 5)"));
        check("[node]\nid = \"e\"\ntier = \"fog\"\n[node]\n", Err("(line 4)"));
    }

    #[test]
    fn stream_patterns() {
        let m = |p: &str, s: &str| StreamPattern::new(p).unwrap().matches(&StreamName::new(s).unwrap());
        assert!(m("readings/**", "readings/line-3"));
        assert!(m("readings/**", "readings/a/b"));
        assert!(m("**", "x"));
        assert!(m("*/alarms", "line/alarms"));
        assert!(!m("*/alarms", "alarms"));
        assert!(!m("readings/*", "readings/a/b"));
        assert!(m("a/**/z", "a/z"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(!m("a/**/z", "a/b/c"));
        assert!(StreamPattern::new("a//b").is_err());
        assert!(StreamPattern::new("a/b*").is_err());
        let s = Subscription::new("edge-1/readings/**").unwrap();
        assert!(s.matches(&NodeId::new("edge-1").unwrap(), &StreamName::new("readings/x").unwrap()));
        assert!(!s.matches(&NodeId::new("edge-2").unwrap(), &StreamName::new("readings/x").unwrap()));
        assert!(Subscription::new("*/events").unwrap().origin().is_none());
    }

    #[test]
    fn stream_refs() {
        let r = StreamRef::try_from("edge-1:readings/a".to_owned()).unwrap();
        assert_eq!(r.origin.as_ref().map(NodeId::as_str), Some("edge-1"));
        assert_eq!(r.to_string(), "edge-1:readings/a");
        assert!(StreamRef::try_from("readings/a".to_owned()).unwrap().origin.is_none());
        assert!(StreamRef::try_from("E:readings".to_owned()).is_err());
    }

    fn node(id: &str, tier: &str, listen: &[&str], connect: &[&str]) -> (PathBuf, NodeConfig) {
        let q = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let mode = if listen.is_empty() { "client" } else { "router" };
        let text = format!("[node]\nid = \"{id}\"\ntier = \"{tier}\"\n[zenoh]\nmode = \"{mode}\"\nlisten = [{}]\nconnect = [{}]\n", q(listen), q(connect));
        let file = PathBuf::from(format!("{id}.toml"));
        let cfg = NodeConfig::parse(&file, &text).unwrap();
        (file, cfg)
    }

    #[test]
    fn continuum_checks() {
        let e = node("edge-1", "edge", &[], &["tcp/127.0.0.1:2"]);
        let f = node("fog-1", "fog", &["tcp/127.0.0.1:2"], &["tcp/127.0.0.1:3"]);
        let c = node("cloud-1", "cloud", &["tcp/127.0.0.1:3"], &[]);
        let ok = check_continuum(vec![e.clone(), f.clone(), c.clone()]).unwrap();
        assert_eq!(ok.path, [0, 1, 2]);

        let render = |r: Result<Continuum, Vec<ConfigError>>| r.unwrap_err().iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
        // An operator named like another node of the continuum.
        let mut fog_ops = f.clone();
        fog_ops.1.security.operators = vec!["edge-1".into()];
        let err = render(check_continuum(vec![e.clone(), fog_ops, c.clone()]));
        assert!(err.contains("fog-1.toml: security.operators[0]: \"edge-1\" is the id of the node in edge-1.toml"), "{err}");

        let dup = node("edge-1", "edge", &[], &["tcp/127.0.0.1:2"]);
        let err = render(check_continuum(vec![e.clone(), f.clone(), c.clone(), (PathBuf::from("b.toml"), dup.1)]));
        assert!(err.contains("b.toml: node.id: \"edge-1\" is already the id of the node in edge-1.toml"), "{err}");

        let dangling = node("edge-2", "edge", &[], &["tcp/127.0.0.1:9"]);
        let err = render(check_continuum(vec![dangling, f.clone(), c.clone()]));
        assert!(err.contains("edge-2.toml: zenoh.connect[0]: \"tcp/127.0.0.1:9\" is not the listen endpoint of any node given"), "{err}");

        let lonely_cloud = node("cloud-1", "cloud", &["tcp/127.0.0.1:3"], &[]);
        let fog_alone = node("fog-1", "fog", &["tcp/127.0.0.1:2"], &[]);
        let err = render(check_continuum(vec![e, fog_alone, lonely_cloud]));
        assert!(err.contains("no path edge -> fog -> cloud"), "{err}");
    }
}

#[cfg(test)]
mod config_files {
    //! The files under `configs/` are documentation: they must parse, and the reference
    //! must list every key with its default value.
    use super::*;

    fn configs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    #[test]
    fn every_config_file_parses() {
        let mut seen = 0;
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = NodeConfig::load(&path) {
                    panic!("{e}");
                }
                seen += 1;
            }
        }
        assert!(seen >= 4, "expected edge, fog, cloud and reference configs, found {seen}");
        for f in ["edge", "fog", "cloud"] {
            let path = configs_dir().join("secure").join(format!("{f}.toml"));
            let c = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.security.tls, "{}", path.display());
        }
    }

    #[test]
    fn example_continuum_is_consistent() {
        let nodes = ["edge", "fog", "cloud"]
            .iter()
            .map(|n| {
                let p = configs_dir().join(format!("{n}.toml"));
                let c = NodeConfig::load(&p).unwrap();
                (p, c)
            })
            .collect();
        let c = check_continuum(nodes).unwrap();
        assert_eq!(c.path, [0, 1, 2]);
    }

    fn key_paths(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    // Free-form tables: their keys are not config keys.
                    if k == "params" || k == "deadline_ms" {
                        out.insert(path);
                        continue;
                    }
                    out.insert(path.clone());
                    key_paths(v, &path, out);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    key_paths(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn reference_names_every_key_with_its_default() {
        let path = configs_dir().join("reference.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let reference = NodeConfig::parse(&path, &text).unwrap();

        // A config with every optional part present, so that every key is serialised.
        let mut full = reference.clone();
        full.zenoh.mode = Some(ZenohMode::Peer);
        full.node.data_dir = Some("x".into());
        let full_value = toml::Value::try_from(&full).unwrap();
        let mut wanted = BTreeSet::new();
        key_paths(&full_value, "", &mut wanted);
        let mut documented = BTreeSet::new();
        key_paths(&text.parse::<toml::Value>().unwrap(), "", &mut documented);
        let missing: Vec<_> = wanted.difference(&documented).collect();
        assert!(missing.is_empty(), "configs/reference.toml does not document {missing:?}");

        // Values not marked "example" must be the defaults.
        let d = |mut c: NodeConfig| {
            c.zenoh.mode = None;
            c.zenoh.connect.clear();
            c.log.retention.clear();
            c.replication.subscribe.clear();
            c.ingest.streams.clear();
            c.actors.clear();
            c.routing.deadline_ms.clear();
            (c.security.ca_file, c.security.cert_file, c.security.key_file) = (None, None, None);
            c
        };
        let reference = d(reference);
        assert_eq!(reference.zenoh, ZenohSection::default());
        assert_eq!(reference.log, LogSection::default());
        assert_eq!(reference.replication, ReplicationSection::default());
        assert_eq!(reference.ingest, IngestSection::default());
        assert_eq!(reference.supervision, SupervisionSection::default());
        assert_eq!(reference.routing, RoutingSection::default());
        assert_eq!(reference.modes, ModesSection::default());
        assert_eq!(reference.autonomy, AutonomySection::default());
        assert_eq!(reference.security, SecuritySection::default());
        assert_eq!(reference.node.status_queue_len_max, status_queue_len_default());
    }
}

// ---------------------------------------------------------------------------------------
// One-screen summaries for `strata check`

/// One line per node: id, tier, Zenoh mode, endpoints, actors and subscriptions.
pub fn summary_table(nodes: &[(PathBuf, NodeConfig)]) -> String {
    let list = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(",") };
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|(file, c)| {
            vec![
                c.node.id.to_string(),
                c.node.tier.to_string(),
                c.zenoh.mode_for(c.node.tier).as_str().to_owned(),
                list(c.zenoh.listen.iter().map(|e| e.to_string()).collect()),
                list(c.zenoh.connect.iter().map(|e| e.to_string()).collect()),
                list(c.actors.iter().map(|a| format!("{}({})", a.name, a.kind)).collect()),
                list(c.replication.subscribe.iter().map(|s| s.to_string()).collect()),
                file.display().to_string(),
            ]
        })
        .collect();
    crate::log::show::table(&["node", "tier", "mode", "listen", "connect", "actors", "replicates", "file"], &rows)
}

impl fmt::Display for Continuum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "continuum of {} nodes: consistent", self.nodes.len())?;
        write!(f, "{}", summary_table(&self.nodes))?;
        let id = |i: usize| self.nodes[i].1.node.id.as_str();
        let links: Vec<String> = self.links.iter().map(|&(a, b)| format!("{} -> {}", id(a), id(b))).collect();
        writeln!(f, "links (connects to): {}", links.join(", "))?;
        let [e, fo, c] = self.path;
        write!(f, "path edge -> fog -> cloud: {} -> {} -> {}", id(e), id(fo), id(c))
    }
}
