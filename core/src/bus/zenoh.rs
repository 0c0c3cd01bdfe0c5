//! The Zenoh [`Transport`]: the only code in Strata that knows Zenoh.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use zenoh::qos::CongestionControl;
use zenoh::query::{ConsolidationMode, QueryTarget};
use zenoh::sample::SampleKind;
use zenoh::Wait;

use super::{Accept, AliveEvent, BoxFut, BusError, ByteBudget, Incoming, Overflow, Request, Responder, Sample, Transport};
use crate::config::{NodeConfig, ZenohMode};
use crate::security::{NodeSecurity, TlsFiles};

use crate::model::NodeId;

fn zerr(e: impl std::fmt::Display) -> BusError {
    BusError::Zenoh(e.to_string())
}

/// The Zenoh session configuration of a node: mode, endpoints, lease, connect retry,
/// scouting off unless asked for; with `security`, mutual TLS and the access control.
pub fn zenoh_config(config: &NodeConfig, security: &NodeSecurity) -> Result<zenoh::Config, BusError> {
    let z = &config.zenoh;
    let mode = z.mode_for(config.node.tier);
    let json = |v: &dyn erased::Json| v.json();
    let mut c = zenoh::Config::default();
    let mut set = |key: &str, value: String| c.insert_json5(key, &value).map_err(|e| BusError::Zenoh(format!("config {key}: {e}")));
    set("mode", json(&mode.as_str()))?;
    set("listen/endpoints", json(&z.listen.iter().map(|e| e.as_str()).collect::<Vec<_>>()))?;
    set("connect/endpoints", json(&z.connect.iter().map(|e| e.as_str()).collect::<Vec<_>>()))?;
    set("scouting/multicast/enabled", json(&z.scouting_multicast))?;
    // Gossip stays on (Zenoh needs it to de-duplicate data between peers behind routers), but
    // it never opens links: they are exactly the configured ones.
    set("scouting/gossip/enabled", "true".into())?;
    if !z.scouting_multicast {
        set("scouting/gossip/autoconnect", "{router: [], peer: []}".into())?;
    }
    set("transport/link/tx/lease", json(&z.lease_ms))?;
    set("transport/link/tx/keep_alive", "4".into())?;
    set("transport/unicast/open_timeout", json(&z.open_timeout_ms))?;
    // Keep trying to (re)connect, at a constant period; a node starts and runs while its
    // parent tier is unreachable.
    set("connect/timeout_ms", "-1".into())?;
    set("connect/exit_on_failure", "false".into())?;
    if mode == ZenohMode::Client {
        // A client's open would otherwise wait for its router forever; the node must start
        // and run while its parent tier is unreachable, and keep trying in the background.
        set("connect/timeout_ms", "0".into())?;
    }
    let period = z.connect_retry_ms;
    set("connect/retry", format!("{{period_init_ms: {period}, period_max_ms: {period}, period_increase_factor: 1.0}}"))?;
    if let Some(tls) = &security.tls {
        set_tls(&mut c, tls)?;
    }
    if let Some(acl) = &security.acl {
        c.insert_json5("access_control", &acl.to_string()).map_err(|e| BusError::Zenoh(format!("config access_control: {e}")))?;
    }
    Ok(c)
}

/// Mutual TLS on every link: the CA that signs every peer, and this side's certificate for
/// both directions (listening and connecting). A server's name is checked against its
/// certificate when connecting.
fn set_tls(c: &mut zenoh::Config, tls: &TlsFiles) -> Result<(), BusError> {
    let path = |p: &std::path::Path| serde_json::to_string(&p.to_string_lossy()).expect("strings serialise");
    for (key, value) in [
        ("transport/link/tls/root_ca_certificate", path(&tls.ca)),
        ("transport/link/tls/listen_certificate", path(&tls.cert)),
        ("transport/link/tls/listen_private_key", path(&tls.key)),
        ("transport/link/tls/connect_certificate", path(&tls.cert)),
        ("transport/link/tls/connect_private_key", path(&tls.key)),
        ("transport/link/tls/enable_mtls", "true".into()),
        ("transport/link/tls/verify_name_on_connect", "true".into()),
        // A link whose peer's certificate expires is closed then, not kept up for good.
        ("transport/link/tls/close_link_on_expiration", "true".into()),
    ] {
        c.insert_json5(key, &value).map_err(|e| BusError::Zenoh(format!("config {key}: {e}")))?;
    }
    Ok(())
}

/// Asks every node reachable through `endpoint` (e.g. `tcp/127.0.0.1:7448`, a fog router)
/// for its status document, as a Zenoh client: `strata/status/*`, answers collected for
/// `timeout`. Used by `strata status`; any Zenoh client can do the same.
pub async fn query_status(endpoint: &str, tls: Option<&TlsFiles>, timeout: Duration) -> Result<Vec<serde_json::Value>, BusError> {
    query_json(endpoint, tls, super::keys::STATUS_ALL, Vec::new(), timeout).await
}

/// Sends one request on `key` (with body `payload`) through `endpoint`, as a short-lived Zenoh
/// client, and collects the JSON answers that arrive within `timeout` (non-JSON answers are
/// logged and skipped). Used by `strata status`, `strata approve` and `strata deny`; `tls`: the
/// client's CA, certificate and key for a `quic/` endpoint.
pub async fn query_json(endpoint: &str, tls: Option<&TlsFiles>, key: &str, payload: Vec<u8>, timeout: Duration) -> Result<Vec<serde_json::Value>, BusError> {
    let mut c = zenoh::Config::default();
    let mut set = |key: &str, value: String| c.insert_json5(key, &value).map_err(|e| BusError::Zenoh(format!("config {key}: {e}")));
    set("mode", "\"client\"".into())?;
    set("connect/endpoints", serde_json::to_string(&[endpoint]).expect("strings serialise"))?;
    set("scouting/multicast/enabled", "false".into())?;
    set("connect/timeout_ms", timeout.as_millis().to_string())?;
    set("connect/exit_on_failure", "true".into())?;
    if let Some(tls) = tls {
        set_tls(&mut c, tls)?;
    }
    let node = NodeId::new("strata-cli").expect("valid node id");
    let transport = ZenohTransport::open_with(node, c).await.map_err(|e| BusError::Zenoh(format!("cannot reach {endpoint}: {e}")))?;
    let mut replies = transport.request(key, "", payload, timeout, STATUS_REPLIES_MAX).await?;
    let mut docs = Vec::new();
    while let Some(bytes) = replies.recv().await {
        match serde_json::from_slice(&bytes) {
            Ok(doc) => docs.push(doc),
            Err(e) => tracing::warn!(error = %e, key, "an answer is not JSON"),
        }
    }
    transport.close().await;
    Ok(docs)
}

/// Opens a long-lived observer session (a Zenoh peer with no scouting and no gossip
/// autoconnect) on `endpoint`, retrying the connection every 100 ms: for tools that watch
/// nodes over time (`strata demo`). Ask with [`Transport::request`].
pub async fn observer(endpoint: &str) -> Result<ZenohTransport, BusError> {
    let mut c = zenoh::Config::default();
    let mut set = |key: &str, value: String| c.insert_json5(key, &value).map_err(|e| BusError::Zenoh(format!("config {key}: {e}")));
    set("mode", "\"peer\"".into())?;
    set("connect/endpoints", serde_json::to_string(&[endpoint]).expect("strings serialise"))?;
    set("scouting/multicast/enabled", "false".into())?;
    set("scouting/gossip/autoconnect", "{router: [], peer: []}".into())?;
    set("connect/timeout_ms", "-1".into())?;
    set("connect/exit_on_failure", "false".into())?;
    set("connect/retry", "{period_init_ms: 100, period_max_ms: 100, period_increase_factor: 1.0}".into())?;
    ZenohTransport::open_with(NodeId::new("strata-observer").expect("valid node id"), c).await
}

/// Most answers collected by [`query_json`].
const STATUS_REPLIES_MAX: usize = 1024;

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("plain values serialise")
        }
    }
}

pub struct ZenohTransport {
    node: NodeId,
    session: zenoh::Session,
    publishers: Mutex<HashMap<String, zenoh::pubsub::Publisher<'static>>>,
    /// Most publishers kept declared (one per key); beyond it, plain puts are used.
    publishers_max: usize,
}

/// Publishers kept declared by a session opened without a node config (tools: they publish
/// little); a node's session keeps `zenoh.publishers_max`.
const TOOL_PUBLISHERS_MAX: usize = 16;

impl ZenohTransport {
    /// Opens the node's session from its config and what its `[security]` prepared.
    pub async fn open(config: &NodeConfig, security: &NodeSecurity) -> Result<ZenohTransport, BusError> {
        let mut transport = ZenohTransport::open_with(config.node.id.clone(), zenoh_config(config, security)?).await?;
        transport.publishers_max = config.zenoh.publishers_max;
        Ok(transport)
    }

    pub async fn open_with(node: NodeId, config: zenoh::Config) -> Result<ZenohTransport, BusError> {
        let session = zenoh::open(config).await.map_err(zerr)?;
        Ok(ZenohTransport { node, session, publishers: Mutex::new(HashMap::new()), publishers_max: TOOL_PUBLISHERS_MAX })
    }

    pub fn session(&self) -> &zenoh::Session {
        &self.session
    }

    pub async fn close(&self) {
        self.publishers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Err(e) = self.session.close().await {
            tracing::warn!(error = %e, "closing the zenoh session");
        }
    }
}

struct ZenohResponder {
    query: zenoh::query::Query,
    /// The queryable's own key when it has no wildcard (`strata/status/<node>`): the reply
    /// names the node that answers, whatever wildcard was asked (`strata/status/*`), so that
    /// access control can tell who may answer what.
    own_key: Option<zenoh::key_expr::KeyExpr<'static>>,
}

impl Responder for ZenohResponder {
    fn reply(&mut self, payload: Vec<u8>) -> BoxFut<'_, Result<(), BusError>> {
        Box::pin(async move {
            let key = self.own_key.clone().unwrap_or_else(|| self.query.key_expr().clone().into_owned());
            self.query.reply(key, payload).await.map_err(zerr)
        })
    }
}

impl Transport for ZenohTransport {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn publish(&self, key: &str, payload: Vec<u8>) {
        let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        if !publishers.contains_key(key) && publishers.len() < self.publishers_max {
            match self.session.declare_publisher(key.to_owned()).congestion_control(CongestionControl::Drop).wait() {
                Ok(p) => {
                    publishers.insert(key.to_owned(), p);
                }
                Err(e) => tracing::warn!(key, error = %e, "declaring a publisher"),
            }
        }
        let result = match publishers.get(key) {
            Some(p) => p.put(payload).wait(),
            None => self.session.put(key, payload).congestion_control(CongestionControl::Drop).wait(),
        };
        if let Err(e) = result {
            tracing::debug!(key, error = %e, "live publication failed (replay will repair)");
        }
    }

    fn subscribe(&self, keyexpr: &str, capacity: usize, bytes_max: usize, overflow: Overflow) -> BoxFut<'_, Result<Incoming<Sample>, BusError>> {
        let keyexpr = keyexpr.to_owned();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(capacity);
            let dropped = Arc::new(AtomicU64::new(0));
            let counter = dropped.clone();
            let oversized = Arc::new(AtomicU64::new(0));
            let too_large = oversized.clone();
            let opened = std::time::Instant::now();
            let last_line_s = AtomicU64::new(0);
            let budget = ByteBudget::new(bytes_max);
            let bytes = budget.clone();
            let sub = self
                .session
                .declare_subscriber(keyexpr)
                .callback(move |s: zenoh::sample::Sample| {
                    // No message of the protocol (live frame or envelope, heads, ingest) is larger
                    // than MESSAGE_BYTES_MAX; Zenoh itself would pass up to 1 GiB.
                    if s.payload().len() > super::wire::MESSAGE_BYTES_MAX {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let n = too_large.fetch_add(1, Ordering::Relaxed) + 1;
                        // The 1st, 2nd, 4th, 8th…, and at least one a minute: a sender that keeps
                        // trying cannot flood the log, nor silence it for a later one.
                        let now_s = opened.elapsed().as_secs() + 60;
                        let last_s = last_line_s.load(Ordering::Relaxed);
                        if (n.is_power_of_two() || now_s >= last_s + 60)
                            && last_line_s.compare_exchange(last_s, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
                        {
                            tracing::warn!(
                                key = s.key_expr().as_str(),
                                bytes = s.payload().len(),
                                bytes_max = super::wire::MESSAGE_BYTES_MAX,
                                refused = n,
                                "message larger than the protocol's largest refused unread"
                            );
                        }
                        return;
                    }
                    // The bytes are reserved before the payload is copied out of Zenoh's buffer:
                    // a sample that does not fit costs no copy. `n` is the copy's weight.
                    let n = s.key_expr().as_str().len() + s.payload().len();
                    let copy = |s: &zenoh::sample::Sample| Sample { key: s.key_expr().as_str().to_owned(), payload: s.payload().to_bytes().into_owned() };
                    let reserved = match overflow {
                        Overflow::Drop => bytes.try_take(n),
                        // Blocks this Zenoh receive thread until there is room, in bytes and in
                        // samples: backpressure reaches the sender through the link.
                        Overflow::Block => bytes.take_blocking(n),
                    };
                    if !reserved {
                        counter.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let queued = match overflow {
                        Overflow::Drop => tx.try_send(copy(&s)).is_ok(),
                        // `unconstrained`: this thread is a tokio worker of Zenoh's runtime, whose
                        // cooperative budget would otherwise run out (and never refill) while we
                        // block inside the task.
                        Overflow::Block => futures::executor::block_on(tokio::task::unconstrained(tx.send(copy(&s)))).is_ok(),
                    };
                    if !queued {
                        bytes.give_back(n);
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await
                .map_err(zerr)?;
            Ok(Incoming::new(rx, dropped, Box::new(sub)).with_budget(budget).with_oversized(oversized))
        })
    }

    fn serve(&self, keyexpr: &str, capacity: usize, accept: Accept) -> BoxFut<'_, Result<Incoming<Request>, BusError>> {
        let keyexpr = keyexpr.to_owned();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(capacity);
            let dropped = Arc::new(AtomicU64::new(0));
            let counter = dropped.clone();
            let own_key = if keyexpr.contains('*') { None } else { zenoh::key_expr::KeyExpr::new(keyexpr.clone()).ok() };
            let q = self
                .session
                .declare_queryable(keyexpr)
                .callback(move |query: zenoh::query::Query| {
                    // Dropping the query without a reply ends it for this node at once. The body
                    // is bounded like a sample (Zenoh itself would pass up to 1 GiB), before it
                    // is copied into the queue.
                    let body_len = query.payload().map_or(0, |p| p.len());
                    if body_len > super::wire::MESSAGE_BYTES_MAX || !accept(query.key_expr().as_str(), query.parameters().as_str(), body_len) {
                        return;
                    }
                    let request = Request {
                        key: query.key_expr().as_str().to_owned(),
                        params: query.parameters().as_str().to_owned(),
                        payload: query.payload().map(|p| p.to_bytes().into_owned()).unwrap_or_default(),
                        responder: Box::new(ZenohResponder { query, own_key: own_key.clone() }),
                        received: tokio::time::Instant::now(),
                    };
                    // Full: the query is dropped, which ends it with no reply; the
                    // requester retries.
                    if let Err(refused) = tx.try_send(request) {
                        // Counted before the query ends, which the requester may see at once.
                        counter.fetch_add(1, Ordering::Relaxed);
                        drop(refused);
                    }
                })
                .await
                .map_err(zerr)?;
            Ok(Incoming::new(rx, dropped, Box::new(q)))
        })
    }

    fn request(&self, key: &str, params: &str, payload: Vec<u8>, timeout: Duration, capacity: usize) -> BoxFut<'_, Result<mpsc::Receiver<Vec<u8>>, BusError>> {
        let selector = if params.is_empty() { key.to_owned() } else { format!("{key}?{params}") };
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(capacity);
            let mut get = self.session.get(selector);
            if !payload.is_empty() {
                get = get.payload(payload);
            }
            get.target(QueryTarget::All)
                .consolidation(ConsolidationMode::None)
                .timeout(timeout)
                .callback(move |reply: zenoh::query::Reply| {
                    if let Ok(sample) = reply.result() {
                        // Larger than any answer of ours (Zenoh would pass up to 1 GiB): not
                        // copied. Full: the rest of this reply is lost; the requester asks again.
                        if sample.payload().len() <= super::wire::MESSAGE_BYTES_MAX {
                            let _ = tx.try_send(sample.payload().to_bytes().into_owned());
                        }
                    }
                })
                .await
                .map_err(zerr)?;
            Ok(rx)
        })
    }

    fn declare_alive(&self, key: &str) -> BoxFut<'_, Result<Box<dyn Any + Send + Sync>, BusError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let token = self.session.liveliness().declare_token(key).await.map_err(zerr)?;
            Ok(Box::new(token) as Box<dyn Any + Send + Sync>)
        })
    }

    fn watch_alive(&self, keyexpr: &str, capacity: usize) -> BoxFut<'_, Result<Incoming<AliveEvent>, BusError>> {
        let keyexpr = keyexpr.to_owned();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(capacity);
            let dropped = Arc::new(AtomicU64::new(0));
            let counter = dropped.clone();
            let sub = self
                .session
                .liveliness()
                .declare_subscriber(keyexpr)
                .history(true)
                .callback(move |s: zenoh::sample::Sample| {
                    let event = AliveEvent { key: s.key_expr().as_str().to_owned(), alive: s.kind() == SampleKind::Put };
                    if tx.try_send(event).is_err() {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await
                .map_err(zerr)?;
            Ok(Incoming::new(rx, dropped, Box::new(sub)))
        })
    }

    fn alive_now(&self, keyexpr: &str, timeout: Duration) -> BoxFut<'_, Result<BTreeSet<String>, BusError>> {
        let keyexpr = keyexpr.to_owned();
        Box::pin(async move {
            let replies = self.session.liveliness().get(&keyexpr).timeout(timeout).await.map_err(zerr)?;
            let mut alive = BTreeSet::new();
            while let Ok(reply) = replies.recv_async().await {
                match reply.result() {
                    Ok(sample) => drop(alive.insert(sample.key_expr().as_str().to_owned())),
                    // A timeout (or any error) leaves the answer incomplete: taken as the whole
                    // set, it would count live peers as gone.
                    Err(e) => return Err(BusError::Zenoh(format!("liveliness query on {keyexpr}: {}", e.payload().try_to_string().unwrap_or_default()))),
                }
            }
            Ok(alive)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn loopback(node: &str, listen: Option<u16>, connect: Option<u16>) -> ZenohTransport {
        let mut c = zenoh::Config::default();
        let mut set = |key: &str, value: String| c.insert_json5(key, &value).unwrap();
        set("mode", "\"peer\"".into());
        set("scouting/multicast/enabled", "false".into());
        set("listen/endpoints", serde_json::to_string(&listen.map(|p| format!("tcp/127.0.0.1:{p}")).into_iter().collect::<Vec<_>>()).unwrap());
        set("connect/endpoints", serde_json::to_string(&connect.map(|p| format!("tcp/127.0.0.1:{p}")).into_iter().collect::<Vec<_>>()).unwrap());
        ZenohTransport::open_with(NodeId::new(node).unwrap(), c).await.unwrap()
    }

    /// Beyond `publishers_max` declared publishers, live publication goes on with plain puts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_publishers_max_records_go_out_as_plain_puts() {
        let port = crate::ports::free_loopback_port().unwrap();
        let mut a = loopback("a", Some(port), None).await;
        a.publishers_max = 1;
        let b = loopback("b", None, Some(port)).await;
        let mut incoming = b.subscribe("t/**", 1024, 1 << 20, Overflow::Drop).await.unwrap();
        let keys = ["t/x", "t/y", "t/z"];
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // Until the subscription has reached `a`, what it publishes goes nowhere: publish again.
        while seen.len() < keys.len() {
            assert!(tokio::time::Instant::now() < deadline, "received only {seen:?}");
            for k in keys {
                a.publish(k, k.as_bytes().to_vec());
            }
            while let Ok(Some(s)) = tokio::time::timeout(Duration::from_millis(50), incoming.recv()).await {
                assert_eq!(s.payload, s.key.as_bytes(), "each key's own payload");
                seen.insert(s.key);
            }
        }
        assert_eq!(a.publishers.lock().unwrap().len(), 1, "one publisher declared, the other keys put plainly");
        a.close().await;
        b.close().await;
    }

    /// Over real Zenoh sessions: a request the server refuses (`accept` says no), or cannot
    /// queue (its queue is full), ends at once for the requester, with no reply; one waiting
    /// in the queue keeps the reply stream open until it is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_a_server_refuses_or_cannot_queue_end_at_once() {
        let port = crate::ports::free_loopback_port().unwrap();
        let a = loopback("a", Some(port), None).await;
        let b = loopback("b", None, Some(port)).await;
        let mut served = a.serve("test/q/**", 1, Arc::new(|_, params, _| params == "take")).await.unwrap();
        let long = Duration::from_secs(20);
        // Until the queryable has reached `b`, a request ends with nobody asked: ask again
        // until `a` receives one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(tokio::time::Instant::now() < deadline, "a never received b's request");
            let _replies = b.request("test/q/x", "take", Vec::new(), Duration::from_secs(1), 4).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(100), served.recv()).await.is_ok() {
                break;
            }
        }
        // A probe that arrives late must not take the queue's one place: wait until none has
        // come for longer than a probe lives.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1500), served.recv()).await {}
        let mut queued = b.request("test/q/x", "take", Vec::new(), long, 4).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(1), queued.recv()).await.is_err(), "a queued request keeps its reply stream open");
        let mut full = b.request("test/q/x", "take", Vec::new(), long, 4).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), full.recv()).await;
        assert_eq!(ended, Ok(None), "a request the full queue dropped ends at once, unanswered");
        assert_eq!(served.dropped(), 1);
        let mut refused = b.request("test/q/x", "other", Vec::new(), long, 4).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), refused.recv()).await;
        assert_eq!(ended, Ok(None), "a request the server refuses ends at once, unanswered");
        assert_eq!(served.dropped(), 1, "a refused request is not counted as dropped");
        let mut request = tokio::time::timeout(Duration::from_secs(10), served.recv()).await.unwrap().unwrap();
        request.responder.reply(b"hi".to_vec()).await.unwrap();
        drop(request);
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), queued.recv()).await, Ok(Some(b"hi".to_vec())));
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), queued.recv()).await, Ok(None));
        // A body over the largest message is refused before it is copied, whatever `accept`
        // says; the queue has room, and stays empty.
        let mut huge = b.request("test/q/x", "take", vec![7; super::super::wire::MESSAGE_BYTES_MAX + 1], long, 4).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), huge.recv()).await, Ok(None), "refused at once, unanswered");
        assert!(tokio::time::timeout(Duration::from_millis(500), served.recv()).await.is_err(), "nothing was queued");
        assert_eq!(served.dropped(), 1);
        drop(served);
        a.close().await;
        b.close().await;
    }

    /// Follows `watch` until it has dropped at least `drops` changes and the set it reports
    /// is `expected` (bounded waits).
    async fn follow(watch: &mut super::super::AliveWatch, seen: &mut BTreeSet<String>, expected: BTreeSet<String>, drops: u64) {
        use super::super::AliveChange;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while watch.dropped() < drops {
            assert!(tokio::time::Instant::now() < deadline, "dropped {} of {drops}", watch.dropped());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while *seen != expected {
            let change = tokio::time::timeout_at(deadline, watch.next()).await.unwrap_or_else(|_| panic!("still {seen:?}, not {expected:?}"));
            match change.expect("the watch is open") {
                AliveChange::One(e) if e.alive => drop(seen.insert(e.key)),
                AliveChange::One(e) => drop(seen.remove(&e.key)),
                AliveChange::All { alive, .. } => *seen = alive,
            }
        }
    }

    /// Over real Zenoh sessions: liveliness changes dropped by a full queue are not lost for
    /// good; the watch reads who is alive again and ends with the true set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_alive_watch_over_zenoh_recovers_dropped_changes() {
        let port = crate::ports::free_loopback_port().unwrap();
        let a = Arc::new(loopback("a", Some(port), None).await);
        let b = loopback("b", None, Some(port)).await;
        let keys = |n: usize| (0..n).map(|i| format!("test/alive/{i}")).collect::<BTreeSet<_>>();
        let mut tokens = Vec::new();
        for key in keys(5) {
            tokens.push(b.declare_alive(&key).await.unwrap());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while a.alive_now("test/alive/**", Duration::from_secs(1)).await.ok() != Some(keys(5)) {
            assert!(tokio::time::Instant::now() < deadline, "a never saw b's five tokens");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A queue of one: the five tokens already alive come as five changes, four dropped.
        let mut watch = super::super::AliveWatch::open(a.clone(), "test/alive/**", 1, Duration::from_secs(1), Duration::from_secs(5)).await.unwrap();
        let mut seen = BTreeSet::new();
        follow(&mut watch, &mut seen, keys(5), 4).await;
        // Three go while nobody reads: one change queued, two dropped.
        tokens.truncate(2);
        follow(&mut watch, &mut seen, keys(2), 6).await;
        drop(watch);
        a.close().await;
        b.close().await;
    }
}
