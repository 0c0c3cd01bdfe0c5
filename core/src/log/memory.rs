//! An in-memory [`Store`] for pure tests and deterministic simulation: the same planning
//! code as RocksDB's, applied to ordered maps under one lock. Every operation is durable (in
//! the sense of this store) as soon as it is queued, so its futures resolve on first poll.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Mutex;

use crate::codec::Limits;
use crate::config::{Name, RetentionRule};
use crate::model::{Envelope, Incarnation, NodeId, Tier};

use super::core::{decode_records, Backend, Cf, Core, Write};
use super::keys::{record_seq, stream_prefix};
use super::{LogError, Op, Pending, PendingInner, Store, StreamInfo, StreamKey};

struct Inner {
    core: Core,
    data: BTreeMap<(u8, Vec<u8>), Vec<u8>>,
    closed: bool,
}

fn cf_id(cf: Cf) -> u8 {
    cf as u8
}

impl Backend for BTreeMap<(u8, Vec<u8>), Vec<u8>> {
    fn scan(&self, prefix: &[u8], from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        let mut start = prefix.to_vec();
        start.extend_from_slice(&from.to_be_bytes());
        Ok(self
            .range((cf_id(Cf::Log), start)..)
            .take_while(|((cf, k), _)| *cf == cf_id(Cf::Log) && k.starts_with(prefix))
            .filter_map(|((_, k), v)| record_seq(prefix, k).map(|s| (s.get(), v.clone())))
            .take_while(|(seq, _)| *seq <= to)
            .take(limit)
            .collect())
    }
}

pub struct MemStore {
    node: NodeId,
    incarnation: Incarnation,
    /// `limits.max_payload_bytes` within the ceiling.
    payload_bytes_max: usize,
    inner: Mutex<Inner>,
    commits: tokio::sync::watch::Sender<u64>,
}

impl MemStore {
    pub fn new(node: NodeId, incarnation: Incarnation, limits: Limits, retention: Vec<RetentionRule>) -> MemStore {
        MemStore {
            node: node.clone(),
            incarnation,
            payload_bytes_max: limits.max_payload_bytes.min(crate::codec::PAYLOAD_BYTES_CEILING),
            inner: Mutex::new(Inner { core: Core::new(node, incarnation, limits, retention), data: BTreeMap::new(), closed: false }),
            commits: tokio::sync::watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets `log.present_ranges_max` (see [`super::StoreOptions`]), for tests of deferred
    /// records.
    #[cfg(test)]
    pub(crate) fn set_present_ranges_max(&self, n: usize) {
        self.lock().core.present_ranges_max = n;
    }

    /// Overwrites the stored record `seq` of `key` with bytes no decoder accepts, as a damaged
    /// disk block would (for tests of what reads and replication do then).
    #[cfg(test)]
    pub(crate) fn damage_record(&self, key: &StreamKey, seq: u64) {
        let k = (cf_id(Cf::Log), super::keys::record_key(key, seq));
        let mut inner = self.lock();
        assert!(inner.data.contains_key(&k), "no record {key}#{seq} to damage");
        inner.data.insert(k, vec![crate::codec::RECORD_OWN_CLOCK, 0xFF]);
    }

    /// Runs one op to completion (what the committer does for a batch of one).
    fn run(&self, op: Op) -> Result<Pending, LogError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(LogError::Closed);
        }
        let Inner { core, data, .. } = &mut *inner;
        let mut writes: Vec<Write> = Vec::new();
        let plan = core.plan(vec![op], &*data, &mut writes);
        for write in writes {
            match write {
                Write::Put(cf, k, v) => {
                    data.insert((cf_id(cf), k), v);
                }
                Write::Delete(cf, k) => {
                    data.remove(&(cf_id(cf), k));
                }
            }
        }
        let result = core.apply(plan).pop().expect("one result per op");
        drop(inner);
        self.commits.send_modify(|n| *n += 1);
        Ok(Pending(PendingInner::Ready(Some(result))))
    }
}

impl Store for MemStore {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    fn payload_bytes_max(&self) -> usize {
        self.payload_bytes_max
    }

    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending, LogError>> + Send + '_>> {
        let result = self.run(op);
        Box::pin(async move { result })
    }

    fn read(&self, key: &StreamKey, from: u64, limit: usize) -> Result<Vec<Envelope>, LogError> {
        let inner = self.lock();
        let records = inner.data.scan(&stream_prefix(key), from, u64::MAX, limit)?;
        decode_records(key, &records)
    }

    fn streams(&self) -> Vec<StreamInfo> {
        self.lock().core.infos()
    }

    fn stream(&self, key: &StreamKey) -> Option<StreamInfo> {
        self.lock().core.info(key)
    }

    fn gaps(&self, key: &StreamKey, max: usize) -> Vec<RangeInclusive<u64>> {
        self.lock().core.gaps(key, max)
    }

    fn cursor(&self, consumer: &Name, key: &StreamKey) -> Option<u64> {
        self.lock().core.cursor(consumer, key)
    }

    fn durable_by(&self, key: &StreamKey, seq: u64) -> Option<std::time::Instant> {
        self.lock().core.durable_by(key, seq)
    }

    fn record_ack(&self, tier: Tier, key: &StreamKey, watermark: u64) {
        self.lock().core.record_ack(tier, key, watermark)
    }

    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    fn close(&self) {
        self.lock().closed = true;
        // Wakes tailing readers, which then see it closed.
        self.commits.send_modify(|n| *n += 1);
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}
