//! `mqtt`: a bridge to an MQTT broker (MQTT 3.1.1 or 5, over TCP or TLS).
//!
//! In: subscribes to the `readings` topic filters (QoS 1 by default, persistent session) and
//! turns each message into a reading (`strata.reading/1`) on the mapped stream. A message is
//! acknowledged to the broker (PUBACK, in arrival order) only once its reading is durable in
//! the log, so a bridge or node that crashes loses nothing: the broker sends again what was
//! not acknowledged.
//!
//! Out: each command on the actor's `inputs` (`strata.command/1`, e.g. from the arbiter) is
//! published on `command_topic` (a template: `{field}` is the command's field) with its JSON
//! as the payload, one at a time, in order, on a connection of its own (client id + `-out`,
//! so a command waiting for the broker never holds back the readings' acknowledgements); the
//! next is sent only when the broker acknowledged the previous. While the broker is away commands wait in the log (the actor's
//! cursor does not move); a command older than `command_expiry_ms` when it could be sent is
//! recorded as `command_expired` on `events` and counted, never sent.
//!
//! ```toml
//! [[actors]]
//! kind = "mqtt"
//! name = "plant-broker"
//! inputs = ["commands"]                   # commands to publish
//! outputs = ["readings/press-1", "readings/press-2"]   # every stream a mapping may produce
//! [actors.params]
//! host = "127.0.0.1"
//! port = 1883
//! command_topic = "plant/line-3/cmd/{action}"
//! [[actors.params.readings]]
//! topic = "plant/+/temperature"           # an MQTT filter; each `+` is {1}, {2}, ... in `stream`
//! stream = "readings/{1}"                 # must be one of `outputs`
//! value = "/celsius"                      # JSON pointer; "" (default): the payload is the number
//! ts = "/ts_ms"                           # optional JSON pointer to a Unix time in ms
//! min = -40.0                             # optional bounds: outside is rejected (out_of_range)
//! max = 150.0
//! ```
//!
//! Rejected messages (acknowledged, so the broker does not send them again) are counted by
//! reason in `strata status`: `too_large`, `not_json`, `missing_field`, `bad_value`,
//! `out_of_range`, `bad_timestamp`, `unmapped_topic`, `stream_not_in_outputs`. A message over
//! `packet_bytes_max` cannot be read: it fails the connection and is counted as
//! `packet_too_large` (see `packet_bytes_max`). Commands that
//! cannot be published: `bad_command` (not a JSON object, a template field missing, a rendered
//! topic a publish cannot use (empty, a wildcard or NUL, over 65535 bytes), or too large for
//! `packet_bytes_max`) and `command_refused` (the broker
//! refused it with an MQTT 5 reason code); each is recorded as a `command_rejected` event and
//! not sent again.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use strata_core::actor::Retry;
use strata_core::config::ActorSpec;
use strata_core::{ActorError, Behaviour, Ctx, Envelope, StreamName};
use tokio::sync::{mpsc, oneshot, watch};

use crate::shared::{self, Backoff, Health};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttParams {
    /// Broker host name or address. Required.
    pub host: String,
    /// Broker port. Default 1883 (8883 is usual with TLS).
    #[serde(default = "d_port")]
    pub port: u16,
    /// `3.1.1` or `5`. Default `3.1.1`.
    #[serde(default = "d_protocol")]
    pub protocol: String,
    /// MQTT client id; keep it stable (the broker keeps the session under it). Default
    /// `strata-<node>-<actor>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// TLS to the broker. Default off.
    #[serde(default)]
    pub tls: Option<TlsParams>,
    /// QoS of subscriptions and command publishes: 0, 1 or 2. Default 1.
    #[serde(default = "d_qos")]
    pub qos: u8,
    /// MQTT keep-alive, in ms: whole seconds (MQTT counts it in seconds), at least 1000 (5000
    /// with protocol 5), at most 65535000. Default 5000.
    #[serde(default = "d_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// First reconnect delay, in ms; doubles up to `reconnect_max_ms`. Default 100.
    #[serde(default = "d_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in ms. Default 10000.
    #[serde(default = "d_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Messages taken in and not yet durable (nor acknowledged) at most. Default 256.
    #[serde(default = "d_in_flight_max")]
    pub in_flight_len_max: usize,
    /// Largest message accepted, in bytes (at least 1). Default 65536.
    #[serde(default = "d_payload_bytes_max")]
    pub payload_bytes_max: usize,
    /// Largest MQTT packet read from or sent to the broker, in bytes. A message over
    /// `payload_bytes_max` but within this is read, rejected as `too_large` and acknowledged.
    /// A larger one fails the connection, and an MQTT 3.1.1 broker sends it again at every
    /// reconnection, which holds back every message after it: keep the broker's own limit
    /// (Mosquitto's `message_size_limit`, which counts the payload only) at or below this less
    /// 1024. An MQTT 5 broker is told it and drops larger messages itself. At least
    /// `payload_bytes_max` + 1024, at most 268435455. Default 1048576 (1 MiB), or
    /// `payload_bytes_max` + 1024 if that is more.
    #[serde(default)]
    pub packet_bytes_max: Option<usize>,
    /// A command older than this when it could be sent is expired instead, in ms. Default
    /// 600000 (10 min).
    #[serde(default = "d_command_expiry_ms")]
    pub command_expiry_ms: u64,
    /// Topic of each command: a template over the command's fields. Required with inputs.
    #[serde(default)]
    pub command_topic: Option<String>,
    /// Each rejection reason is logged at most once per this interval, in ms. Default 1000.
    #[serde(default = "d_reject_log_interval_ms")]
    pub reject_log_interval_ms: u64,
    /// Topic filters to take readings from.
    #[serde(default)]
    pub readings: Vec<ReadingMap>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsParams {
    /// PEM file of the CA(s) that signed the broker's certificate. Required.
    pub ca_path: std::path::PathBuf,
    /// PEM certificate chain of this client, for brokers that require client certificates.
    #[serde(default)]
    pub cert_path: Option<std::path::PathBuf>,
    /// PEM private key of `cert_path`.
    #[serde(default)]
    pub key_path: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingMap {
    /// MQTT topic filter (`+` and `#` wildcards). Required.
    pub topic: String,
    /// Stream of the readings; `{1}`, `{2}`, ... are the topic levels matched by the `+`s.
    /// Required.
    pub stream: String,
    /// JSON pointer to the value; "" (default): the whole payload is a number (raw text or
    /// JSON).
    #[serde(default)]
    pub value: String,
    /// JSON pointer to a Unix time in ms; default: the time the message arrived.
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn d_port() -> u16 {
    1883
}
fn d_protocol() -> String {
    "3.1.1".into()
}
fn d_qos() -> u8 {
    1
}
fn d_keep_alive_ms() -> u64 {
    5000
}
fn d_reconnect_min_ms() -> u64 {
    100
}
fn d_reconnect_max_ms() -> u64 {
    10_000
}
fn d_in_flight_max() -> usize {
    256
}
fn d_payload_bytes_max() -> usize {
    65_536
}

impl MqttParams {
    /// `packet_bytes_max`, or its default.
    pub fn packet_bytes_max(&self) -> usize {
        self.packet_bytes_max.unwrap_or_else(|| (1 << 20).max(self.payload_bytes_max.saturating_add(PACKET_OVERHEAD_BYTES)))
    }
}
fn d_command_expiry_ms() -> u64 {
    600_000
}
fn d_reject_log_interval_ms() -> u64 {
    1000
}

/// Does the MQTT filter `filter` match `topic`? Returns the levels matched by each `+`.
pub fn matches(filter: &str, topic: &str) -> Option<Vec<String>> {
    let mut plus = Vec::new();
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match (f, levels.next()) {
            ("#", _) => return Some(plus),
            ("+", Some(level)) => plus.push(level.to_owned()),
            (f, Some(level)) if f == level => {}
            _ => return None,
        }
    }
    levels.next().is_none().then_some(plus)
}

fn check_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let bad = (l.contains('#') && (*l != "#" || i + 1 != levels.len())) || (l.contains('+') && *l != "+");
        if bad || filter.is_empty() {
            return Err(format!("topic {filter:?} is not a valid MQTT filter"));
        }
    }
    Ok(())
}

/// Why a message was not taken in (counted per reason).
#[derive(Debug, PartialEq)]
pub struct Rejected(pub &'static str, pub String);

/// `template` with each `{N}` replaced by the topic's N-th `+` level, in one pass: a level
/// that itself reads `{2}` is not replaced again (replaced one placeholder after another, the
/// topic `{2}/b` of `+/+` made `readings/{1}-{2}` into `readings/b-b`, the stream of `b/b`).
fn fill_levels(template: &str, plus: &[String]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let level = after.find('}').and_then(|close| {
            let n: usize = after[..close].parse().ok()?;
            plus.get(n.checked_sub(1)?).map(|level| (close, level))
        });
        match level {
            Some((close, level)) => {
                out.push_str(level);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The stream and reading of one message, or why not.
pub fn map_message(maps: &[ReadingMap], outputs: &[StreamName], topic: &str, payload: &[u8], bytes_max: usize) -> Result<(StreamName, f64, u64), Rejected> {
    if payload.len() > bytes_max {
        return Err(Rejected("too_large", format!("{} bytes > payload_bytes_max {bytes_max}", payload.len())));
    }
    let (map, plus) = maps
        .iter()
        .find_map(|m| matches(&m.topic, topic).map(|p| (m, p)))
        .ok_or_else(|| Rejected("unmapped_topic", format!("no mapping for topic {topic:?}")))?;
    let stream = fill_levels(&map.stream, &plus);
    let stream = StreamName::new(stream.as_str())
        .ok()
        .filter(|s| outputs.contains(s))
        .ok_or_else(|| Rejected("stream_not_in_outputs", format!("topic {topic:?} maps to {stream:?}, not one of the outputs")))?;
    let text = std::str::from_utf8(payload).map_err(|_| Rejected("not_json", "payload is not UTF-8".into()))?;
    let raw = text.trim().parse::<f64>().ok();
    let doc: Option<Value> =
        if raw.is_some() && map.value.is_empty() { None } else { Some(serde_json::from_str(text).map_err(|e| Rejected("not_json", e.to_string()))?) };
    let value = match (&doc, raw) {
        (None, Some(v)) => v,
        (Some(doc), _) => {
            let v = doc.pointer(&map.value).ok_or_else(|| Rejected("missing_field", format!("no {:?} in the payload", map.value)))?;
            v.as_f64().ok_or_else(|| Rejected("bad_value", format!("{:?} is {v}, not a number", map.value)))?
        }
        (None, None) => unreachable!("doc is parsed unless the payload is a raw number"),
    };
    if !value.is_finite() || map.min.is_some_and(|m| value < m) || map.max.is_some_and(|m| value > m) {
        return Err(Rejected("out_of_range", format!("{value} is outside [{:?}, {:?}]", map.min, map.max)));
    }
    let ts_ms = match (map.ts.as_deref(), &doc) {
        (Some(pointer), Some(doc)) => match doc.pointer(pointer) {
            None => shared::unix_ms(),
            Some(t) => t.as_u64().ok_or_else(|| Rejected("bad_timestamp", format!("{pointer:?} is {t}, not a Unix time in ms")))?,
        },
        _ => shared::unix_ms(),
    };
    Ok((stream, value, ts_ms))
}

/// Longest MQTT keep-alive: 65535 s (a 16-bit count of seconds).
const KEEP_ALIVE_MS_MAX: u64 = 65_535_000;
/// Largest packet MQTT can frame (its remaining length is at most 268435455).
const PACKET_BYTES_CEILING: usize = 268_435_455;
/// Room for a packet's header, topic and properties above its payload.
const PACKET_OVERHEAD_BYTES: usize = 1024;

pub struct Mqtt {
    params: MqttParams,
    qos: rumqttc::QoS,
    outputs: Vec<StreamName>,
    /// Publishes commands (it has inputs).
    commands: bool,
}

impl Mqtt {
    pub fn from_spec(spec: &ActorSpec) -> Result<Mqtt, String> {
        let p: MqttParams = spec.params()?;
        let qos = match p.qos {
            0 => rumqttc::QoS::AtMostOnce,
            1 => rumqttc::QoS::AtLeastOnce,
            2 => rumqttc::QoS::ExactlyOnce,
            q => return Err(format!("qos: {q} is not 0, 1 or 2")),
        };
        if !["3.1.1", "5"].contains(&p.protocol.as_str()) {
            return Err(format!("protocol: {:?} is not \"3.1.1\" or \"5\"", p.protocol));
        }
        if p.host.is_empty() {
            return Err("host: must not be empty".into());
        }
        let keep_alive_min_ms = if p.protocol == "5" { 5000 } else { 1000 };
        if p.keep_alive_ms % 1000 != 0 || !(keep_alive_min_ms..=KEEP_ALIVE_MS_MAX).contains(&p.keep_alive_ms) {
            return Err(format!(
                "keep_alive_ms: {} is not whole seconds in {keep_alive_min_ms}..={KEEP_ALIVE_MS_MAX} (MQTT {} counts it in seconds, in 16 bits)",
                p.keep_alive_ms, p.protocol
            ));
        }
        if p.payload_bytes_max == 0 {
            return Err("payload_bytes_max: must be at least 1".into());
        }
        let packet_min = p.payload_bytes_max.saturating_add(PACKET_OVERHEAD_BYTES);
        if p.packet_bytes_max() < packet_min || p.packet_bytes_max() > PACKET_BYTES_CEILING {
            return Err(format!(
                "packet_bytes_max: {} is not in payload_bytes_max + {PACKET_OVERHEAD_BYTES} ({packet_min})..={PACKET_BYTES_CEILING} (MQTT's largest packet)",
                p.packet_bytes_max()
            ));
        }
        if p.reconnect_min_ms == 0 || p.reconnect_max_ms < p.reconnect_min_ms {
            return Err(format!("reconnect_min_ms ({}) must be > 0 and <= reconnect_max_ms ({})", p.reconnect_min_ms, p.reconnect_max_ms));
        }
        if p.in_flight_len_max == 0 || p.in_flight_len_max > 65_535 {
            return Err(format!("in_flight_len_max: {} is not in 1..=65535", p.in_flight_len_max));
        }
        if p.username.is_none() && p.password.is_some() {
            return Err("password: given without a username".into());
        }
        if p.readings.is_empty() && spec.inputs.is_empty() {
            return Err("nothing to bridge: give `readings` mappings, command `inputs`, or both".into());
        }
        for (i, m) in p.readings.iter().enumerate() {
            let at = |e: String| format!("readings[{i}]: {e}");
            check_filter(&m.topic).map_err(at)?;
            if !m.value.is_empty() && !m.value.starts_with('/') {
                return Err(at(format!("value: {:?} is not a JSON pointer (\"\" or starting with '/')", m.value)));
            }
            if let Some(ts) = m.ts.as_deref().filter(|t| !t.starts_with('/')) {
                return Err(at(format!("ts: {ts:?} is not a JSON pointer (starting with '/')")));
            }
            let pluses = m.topic.split('/').filter(|l| *l == "+").count();
            let mut fixed = m.stream.clone();
            for k in 1..=pluses {
                fixed = fixed.replace(&format!("{{{k}}}"), "x");
            }
            if fixed.contains('{') {
                return Err(at(format!("stream: {:?} uses a level the topic has no `+` for", m.stream)));
            }
            if pluses == 0 && !spec.outputs.iter().any(|o| o.as_str() == m.stream) {
                return Err(at(format!("stream: {:?} is not one of the outputs {:?}", m.stream, spec.outputs)));
            }
        }
        match (&p.command_topic, spec.inputs.is_empty()) {
            (None, false) => return Err("command_topic: required to publish the commands of `inputs`".into()),
            (Some(t), _) => shared::check_template(t).map_err(|e| format!("command_topic: {e}"))?,
            _ => {}
        }
        if let Some(tls) = &p.tls {
            tls_config(tls).map_err(|e| format!("tls: {e}"))?;
        }
        Ok(Mqtt { qos, outputs: spec.outputs.clone(), commands: !spec.inputs.is_empty(), params: p })
    }
}

/// A rustls client config from PEM files (ring provider).
fn tls_config(tls: &TlsParams) -> Result<Arc<rustls::ClientConfig>, String> {
    fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = read(&tls.ca_path)?;
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        let cert = cert.map_err(|e| format!("{}: {e}", tls.ca_path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", tls.ca_path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate in it", tls.ca_path.display()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&tls.cert_path, &tls.key_path) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut &read(cert)?[..]).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{}: {e}", cert.display()))?;
            let key_der = rustls_pemfile::private_key(&mut &read(key)?[..])
                .map_err(|e| format!("{}: {e}", key.display()))?
                .ok_or_else(|| format!("{}: no PEM private key in it", key.display()))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| format!("cert_path/key_path: {e}"))?
        }
        _ => return Err("cert_path and key_path go together".into()),
    };
    Ok(Arc::new(config))
}

/// One message taken in, to acknowledge once its reading is durable.
enum AckToken {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// What the event loop saw, for either protocol version.
enum Seen {
    /// Connected; `session_present`: the broker kept the session of the previous connection
    /// (and with it what was in flight).
    Connected {
        session_present: bool,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
        token: Box<AckToken>,
    },
    PublishAcked,
    /// The broker refused a publish (MQTT 5 reason code).
    PublishRefused(String),
    Other,
}

/// A client, MQTT 3.1.1 or 5 (`Sync`: used across awaits by the connection task).
#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Its event loop (not `Sync`: only the connection task polls it); boxed, as each is large.
enum Events {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

fn connect(p: &MqttParams, client_id: String) -> Result<(Client, Events), String> {
    let transport = match &p.tls {
        None => rumqttc::Transport::Tcp,
        Some(tls) => rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls_config(tls)?)),
    };
    let keep_alive = Duration::from_millis(p.keep_alive_ms);
    // The request channel holds the acks of every message the broker may have in flight
    // (at most 65535: a packet id each), subscriptions and one command: it never fills, so the
    // loop never waits on itself and no ack is lost. Acks queue while the client reads
    // (buffered messages come first, and a read then competes with sending at random), so
    // `in_flight_len_max` (appends in flight) does not bound them; the channel allocates only
    // what it holds.
    let cap = usize::from(u16::MAX) + p.in_flight_len_max + p.readings.len() + 16;
    Ok(if p.protocol == "5" {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, p.host.clone(), p.port);
        o.set_keep_alive(keep_alive).set_clean_start(false).set_manual_acks(true).set_transport(transport);
        // Keep the session (subscriptions, unacknowledged messages) across disconnections.
        o.set_session_expiry_interval(Some(u32::MAX));
        // At most PACKET_BYTES_CEILING (checked): fits in u32.
        o.set_max_packet_size(Some(p.packet_bytes_max() as u32));
        if let Some(u) = &p.username {
            o.set_credentials(u.clone(), p.password.clone().unwrap_or_default());
        }
        let (c, e) = rumqttc::v5::AsyncClient::new(o, cap);
        (Client::V5(c), Events::V5(Box::new(e)))
    } else {
        let mut o = rumqttc::MqttOptions::new(client_id, p.host.clone(), p.port);
        o.set_keep_alive(keep_alive).set_clean_session(false).set_manual_acks(true).set_transport(transport);
        o.set_max_packet_size(p.packet_bytes_max(), p.packet_bytes_max());
        if let Some(u) = &p.username {
            o.set_credentials(u.clone(), p.password.clone().unwrap_or_default());
        }
        let (c, e) = rumqttc::AsyncClient::new(o, cap);
        (Client::V4(c), Events::V4(Box::new(e)))
    })
}

impl Events {
    async fn poll(&mut self) -> Result<Seen, String> {
        match self {
            Events::V4(e) => {
                use rumqttc::{Event, Packet};
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => Seen::Connected { session_present: a.session_present },
                    Event::Incoming(Packet::Publish(p)) => {
                        Seen::Message { topic: p.topic.clone(), payload: p.payload.to_vec(), token: Box::new(AckToken::V4(p)) }
                    }
                    Event::Incoming(Packet::PubAck(_)) => Seen::PublishAcked,
                    Event::Incoming(Packet::PubComp(_)) => Seen::PublishAcked,
                    _ => Seen::Other,
                })
            }
            Events::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
                use rumqttc::v5::Event;
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => Seen::Connected { session_present: a.session_present },
                    Event::Incoming(Packet::Publish(p)) => {
                        Seen::Message { topic: String::from_utf8_lossy(&p.topic).into_owned(), payload: p.payload.to_vec(), token: Box::new(AckToken::V5(p)) }
                    }
                    Event::Incoming(Packet::PubAck(a)) => match a.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Seen::PublishAcked,
                        refused => Seen::PublishRefused(format!("{refused:?}")),
                    },
                    Event::Incoming(Packet::PubRec(r)) => match r.reason {
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Seen::Other,
                        refused => Seen::PublishRefused(format!("{refused:?}")),
                    },
                    Event::Incoming(Packet::PubComp(_)) => Seen::PublishAcked,
                    _ => Seen::Other,
                })
            }
        }
    }
}

/// Requests never wait on the client's queue (the task that would wait is the one that
/// drains it): the queue is sized so that they fit.
impl Client {
    fn try_subscribe(&self, filter: &str, qos: rumqttc::QoS) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_subscribe(filter, qos).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe(filter, v5_qos(qos)).map_err(|e| e.to_string()),
        }
    }

    fn try_publish(&self, topic: String, qos: rumqttc::QoS, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_publish(topic, qos, false, payload).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_publish(topic, v5_qos(qos), false, payload).map_err(|e| e.to_string()),
        }
    }

    fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }

    fn try_ack(&self, token: &AckToken) -> Result<(), String> {
        match (self, token) {
            (Client::V4(c), AckToken::V4(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (Client::V5(c), AckToken::V5(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            _ => Err("ack token of the other protocol version".into()),
        }
    }
}

fn v5_qos(q: rumqttc::QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        rumqttc::QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A command for the connection task: publish, then say when the broker acknowledged it, or
/// why it was not.
struct Outbound {
    topic: String,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), NotSent>>,
}

/// Why a command was not published.
enum NotSent {
    /// The broker refused it (an MQTT 5 reason code): sending it again meets the same answer.
    Refused(String),
    /// The client could not take it now: the handler fails and the command is tried again.
    Later(String),
}

/// Why `topic` cannot carry a command of `payload_len` bytes within `packet_bytes_max`, if it
/// cannot: checked before sending, so that such a command is rejected (recorded), not retried
/// into the same refusal at every restart.
fn unpublishable(topic: &str, payload_len: usize, packet_bytes_max: usize) -> Option<String> {
    if topic.is_empty() {
        return Some("the topic is empty".into());
    }
    if topic.contains(['+', '#', '\0']) {
        return Some(format!("topic {topic:?} has a wildcard (+ or #) or a NUL, which a publish cannot use"));
    }
    if topic.len() > usize::from(u16::MAX) {
        return Some(format!("topic of {} bytes is over MQTT's 65535", topic.len()));
    }
    let size = payload_len + topic.len() + PACKET_OVERHEAD_BYTES;
    (size > packet_bytes_max).then(|| format!("{payload_len} bytes with the topic and headers do not fit packet_bytes_max {packet_bytes_max}"))
}

/// The bridge's state: its connection task (stopped with the actor).
pub struct MqttState {
    health: Arc<Health>,
    outbound: mpsc::Sender<Outbound>,
    /// The command connection's state.
    connected: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MqttState {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl Behaviour for Mqtt {
    type State = MqttState;

    async fn start(&self, ctx: &mut Ctx) -> Result<MqttState, ActorError> {
        let p = &self.params;
        let client_id = p.client_id.clone().unwrap_or_else(|| format!("strata-{}-{}", ctx.node(), ctx.name()));
        let peer = format!("mqtt://{}:{}", p.host, p.port);
        let health = Arc::new(Health::new(ctx.source(), "mqtt", peer, Duration::from_millis(p.reject_log_interval_ms)));
        let (outbound, outbound_rx) = mpsc::channel(1);
        let (in_tx, _) = watch::channel(false);
        let (out_tx, connected) = watch::channel(false);
        let mut tasks = Vec::new();
        if !p.readings.is_empty() {
            let (client, events) = connect(p, client_id.clone())?;
            tasks.push(tokio::spawn(ingest(p.clone(), self.qos, self.outputs.clone(), client, events, health.clone(), in_tx)));
        }
        if self.commands {
            // Its own connection (client id + "-out"): a command waiting for the broker never
            // holds back the acknowledgements of readings.
            let (client, events) = connect(p, format!("{client_id}-out"))?;
            let h = health.clone();
            let mut state = out_tx.subscribe();
            tasks.push(tokio::spawn(commands(p.clone(), self.qos, client, events, outbound_rx, out_tx)));
            // Without readings, the command connection is the bridge's connection state.
            if p.readings.is_empty() {
                tasks.push(tokio::spawn(async move {
                    while state.changed().await.is_ok() {
                        let up = *state.borrow_and_update();
                        if up {
                            h.connected()
                        } else {
                            h.disconnected("command connection lost")
                        }
                    }
                }));
            }
        }
        Ok(MqttState { health, outbound, connected, tasks })
    }

    /// Publishes one command: waits for the broker (the command stays in the log meanwhile)
    /// unless it expires first, then waits for the broker's acknowledgement.
    async fn handle(&self, _: &mut Ctx, state: &mut MqttState, input: &Envelope) -> Result<(), ActorError> {
        let health = &state.health;
        let command: Value = match serde_json::from_slice(&input.payload) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                health.reject("bad_command", &format!("{}: not a JSON object", input.id));
                health.event(json!({"event": "command_rejected", "bridge": "mqtt", "command": input.id.to_string(), "reason": "not a JSON object"}));
                return Ok(());
            }
        };
        let key = command["key"].as_str();
        let template = self.params.command_topic.as_deref().unwrap_or_default();
        let topic = match shared::render(template, &command) {
            Ok(t) => t,
            Err(e) => {
                health.reject("bad_command", &e);
                health.event(json!({"event": "command_rejected", "bridge": "mqtt", "command": input.id.to_string(), "key": key, "reason": e}));
                return Ok(());
            }
        };
        if let Some(e) = unpublishable(&topic, input.payload.len(), self.params.packet_bytes_max()) {
            health.reject("bad_command", &e);
            health.event(json!({"event": "command_rejected", "bridge": "mqtt", "command": input.id.to_string(), "key": key, "reason": e}));
            return Ok(());
        }
        let expiry = Duration::from_millis(self.params.command_expiry_ms);
        // Wait for the broker, at most until the command expires.
        loop {
            if let Some(age) = shared::expired(input, expiry) {
                shared::record_expired(health, input, age, key);
                return Ok(());
            }
            if *state.connected.borrow_and_update() {
                break;
            }
            // The connection task has ended (it holds the sender): fail so that the supervisor
            // restarts it, rather than spin here until the command expires.
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), state.connected.changed()).await {
                return Err(Retry("the MQTT connection task ended".into()).into());
            }
        }
        let (done, acked) = oneshot::channel();
        // Failures of the connection, not of the command: a restart cures them, and they do
        // not count towards passing the command over.
        state.outbound.send(Outbound { topic, payload: input.payload.to_vec(), done }).await.map_err(|_| Retry("the MQTT connection task ended".into()))?;
        // Sent: the client resends it after a reconnection until the broker acknowledges.
        match acked.await.map_err(|_| Retry("the MQTT connection task ended before the broker acknowledged a command".into()))? {
            Ok(()) => health.count("commands_sent", 1),
            Err(NotSent::Refused(e)) => {
                health.reject("command_refused", &format!("{}: {e}", input.id));
                health.event(json!({"event": "command_rejected", "bridge": "mqtt", "command": input.id.to_string(), "key": key, "reason": e}));
            }
            Err(NotSent::Later(e)) => return Err(Retry(e).into()),
        }
        Ok(())
    }

    /// Fails the actor (its supervisor restarts it) if the connection task stopped.
    async fn tick(&self, _: &mut Ctx, state: &mut MqttState) -> Result<(), ActorError> {
        if state.tasks.iter().any(|t| t.is_finished()) {
            return Err("the MQTT connection task stopped (see the log above)".into());
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

/// The ingest connection: subscribes, takes messages in, acknowledges each once durable.
/// It publishes nothing (commands have their own connection), so nothing can hold its
/// acknowledgements back, and it never waits on its own client's queue.
async fn ingest(
    p: MqttParams,
    qos: rumqttc::QoS,
    outputs: Vec<StreamName>,
    conn: Client,
    mut events: Events,
    health: Arc<Health>,
    connected: watch::Sender<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(p.reconnect_min_ms), Duration::from_millis(p.reconnect_max_ms));
    // Appends in flight, acknowledged in arrival order as each becomes durable.
    let mut appends = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(done) = appends.next(), if !appends.is_empty() => {
                let done: Result<Result<AckToken, String>, tokio::task::JoinError> = done;
                let token = match done {
                    Ok(Ok(token)) => token,
                    // The log refused: stop taking messages in (unacknowledged, they stay with
                    // the broker); the actor notices and its supervisor restarts it.
                    Ok(Err(e)) => return tracing::error!(error = %e, "mqtt: a reading could not be appended; the connection stops"),
                    Err(e) => return tracing::error!(error = %e, "mqtt: an append task failed; the connection stops"),
                };
                // The queue has room for an ack of every message the broker may have in
                // flight (`connect`): never full here. After a reconnection the client drops
                // acks of the old connection; the broker sends those messages again (stored
                // twice at worst, never lost).
                if let Err(e) = conn.try_ack(&token) {
                    tracing::warn!(error = %e, "mqtt: could not acknowledge a message (the broker will send it again)");
                }
            }
            seen = events.poll(), if appends.len() < p.in_flight_len_max => match seen {
                Ok(Seen::Connected { .. }) => {
                    backoff.connected();
                    // At every connection: a broker that lost our session has lost our
                    // subscriptions too (subscribing again is harmless otherwise).
                    for m in &p.readings {
                        if let Err(e) = conn.try_subscribe(&m.topic, qos) {
                            tracing::warn!(error = %e, topic = m.topic, "mqtt: subscribe failed");
                        }
                    }
                    health.connected();
                    connected.send_replace(true);
                }
                Ok(Seen::Message { topic, payload, token }) => {
                    health.count("received", 1);
                    match map_message(&p.readings, &outputs, &topic, &payload, p.payload_bytes_max) {
                        Ok((stream, value, ts_ms)) => {
                            let (source, h) = (health.source().clone(), health.clone());
                            appends.push_back(tokio::spawn(async move {
                                let draft = shared::reading(value, ts_ms)?;
                                source.append(&stream, draft).await.map_err(|e| format!("stream {stream}: {e}"))?;
                                h.count("accepted", 1);
                                Ok(*token)
                            }));
                        }
                        Err(Rejected(reason, detail)) => {
                            health.reject(reason, &format!("topic {topic:?}: {detail}"));
                            // Acknowledged (the broker must not send it again), in arrival
                            // order: after the appends still in flight (MQTT 3.1.1 4.6).
                            if appends.is_empty() {
                                let _ = conn.try_ack(&token);
                            } else {
                                appends.push_back(tokio::spawn(async move { Ok(*token) }));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connected.send_replace(false);
                    if oversized_packet(&e) {
                        // Counted, and named: otherwise the bridge looks merely flaky.
                        health.reject(
                            "packet_too_large",
                            &format!("a message over packet_bytes_max {} failed the connection ({e}); an MQTT 3.1.1 broker sends it again at every reconnection: raise packet_bytes_max or set the broker's message size limit below it", p.packet_bytes_max()),
                        );
                    }
                    health.disconnected(&e);
                    tokio::time::sleep(backoff.delay()).await;
                }
            }
        }
    }
}

/// Whether the event loop's error `e` is a packet over the client's maximum (the texts of
/// rumqttc's MQTT 3.1.1 and 5 errors).
fn oversized_packet(e: &str) -> bool {
    e.contains("size limit exceeded") || (e.contains("Max Payload size") && e.contains("exceeded"))
}

/// The command connection: publishes one command at a time and reports the broker's
/// acknowledgement (the only publish in flight, so any PUBACK/PUBCOMP is its).
async fn commands(p: MqttParams, qos: rumqttc::QoS, conn: Client, mut events: Events, mut outbound: mpsc::Receiver<Outbound>, connected: watch::Sender<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(p.reconnect_min_ms), Duration::from_millis(p.reconnect_max_ms));
    let mut waiting: Option<oneshot::Sender<Result<(), NotSent>>> = None;
    loop {
        tokio::select! {
            // Only while connected: a publish queued in the client while it reconnects would
            // go out on the new connection even when a lost session fails its command (sent
            // again, then, twice).
            Some(cmd) = outbound.recv(), if waiting.is_none() && *connected.borrow() => {
                match conn.try_publish(cmd.topic, qos, cmd.payload) {
                    Ok(()) if qos == rumqttc::QoS::AtMostOnce => { let _ = cmd.done.send(Ok(())); }
                    Ok(()) => waiting = Some(cmd.done),
                    Err(e) => { let _ = cmd.done.send(Err(NotSent::Later(format!("the MQTT client could not queue a command: {e}")))); }
                }
            }
            seen = events.poll() => match seen {
                Ok(Seen::Connected { session_present }) => {
                    backoff.connected();
                    // A broker that lost the session (restarted without persistence, or the
                    // session expired) lost the command in flight, and the client drops it too
                    // (it sends again only within a session): it would wait for an
                    // acknowledgement forever, and every command behind it. It is sent again.
                    if !session_present {
                        if let Some(done) = waiting.take() {
                            let _ = done.send(Err(NotSent::Later("the broker lost the session before acknowledging a command; it is sent again".into())));
                        }
                    }
                    connected.send_replace(true);
                }
                Ok(Seen::PublishAcked) => {
                    if let Some(done) = waiting.take() {
                        let _ = done.send(Ok(()));
                    }
                }
                Ok(Seen::PublishRefused(reason)) => {
                    if let Some(done) = waiting.take() {
                        let _ = done.send(Err(NotSent::Refused(format!("the broker refused it: {reason}"))));
                    }
                    // rumqttc frees a QoS 2 publish's place in flight only at its PUBCOMP, which
                    // a refused PUBREC never gets: reconnecting frees it.
                    if qos == rumqttc::QoS::ExactlyOnce {
                        let _ = conn.try_disconnect();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connected.send_replace(false);
                    tracing::debug!(error = %e, "mqtt: command connection down");
                    tokio::time::sleep(backoff.delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(toml_text: &str) -> Vec<ReadingMap> {
        #[derive(Deserialize)]
        struct W {
            readings: Vec<ReadingMap>,
        }
        toml::from_str::<W>(toml_text).unwrap().readings
    }

    #[test]
    fn filters_match_and_capture_their_plus_levels() {
        assert_eq!(matches("plant/+/temp", "plant/p1/temp"), Some(vec!["p1".to_string()]));
        assert_eq!(matches("plant/#", "plant/p1/temp"), Some(vec![]));
        assert_eq!(matches("plant/+", "plant/p1/temp"), None);
        assert_eq!(matches("plant/+/temp", "plant/p1"), None);
        assert!(check_filter("a/#/b").is_err() && check_filter("a/b+").is_err() && check_filter("a/+/#").is_ok());
    }

    #[test]
    fn messages_become_readings_or_a_reason() {
        let m = maps(
            "[[readings]]\ntopic = \"plant/+/temp\"\nstream = \"readings/{1}\"\nvalue = \"/c\"\nts = \"/ts\"\nmin = -40\nmax = 150\n\
                      [[readings]]\ntopic = \"raw/+\"\nstream = \"readings/{1}\"",
        );
        let outs = vec![StreamName::new("readings/p1").unwrap()];
        let map = |topic: &str, payload: &str| map_message(&m, &outs, topic, payload.as_bytes(), 64);
        assert_eq!(map("plant/p1/temp", r#"{"c": 21.5, "ts": 1700000000000}"#), Ok((outs[0].clone(), 21.5, 1_700_000_000_000)));
        assert_eq!(map("raw/p1", " 7.25 ").map(|r| r.1), Ok(7.25));
        let reason = |r: Result<_, Rejected>| r.unwrap_err().0;
        assert_eq!(reason(map("plant/p1/temp", "hot")), "not_json");
        assert_eq!(reason(map("plant/p1/temp", r#"{"f": 70}"#)), "missing_field");
        assert_eq!(reason(map("plant/p1/temp", r#"{"c": "hot"}"#)), "bad_value");
        assert_eq!(reason(map("plant/p1/temp", r#"{"c": 900}"#)), "out_of_range");
        assert_eq!(reason(map("plant/p1/temp", r#"{"c": 1, "ts": "noon"}"#)), "bad_timestamp");
        assert_eq!(reason(map("plant/p2/temp", r#"{"c": 1}"#)), "stream_not_in_outputs");
        assert_eq!(reason(map("other", "1")), "unmapped_topic");
        assert_eq!(reason(map("raw/p1", &"1".repeat(65))), "too_large");
    }

    /// A `+` level is put into the stream as it is, never read as a placeholder itself: a
    /// device publishing on `{2}/b` must not write into the stream of `b/b`.
    #[test]
    fn a_topic_level_cannot_rewrite_the_stream_template() {
        let m = maps("[[readings]]\ntopic = \"+/+\"\nstream = \"readings/{1}-{2}\"");
        let outs = vec![StreamName::new("readings/b-b").unwrap(), StreamName::new("readings/a-b").unwrap()];
        let map = |topic: &str| map_message(&m, &outs, topic, b"1", 64).map(|r| r.0.to_string()).map_err(|r| r.0);
        assert_eq!(map("b/b"), Ok("readings/b-b".to_string()));
        assert_eq!(map("a/b"), Ok("readings/a-b".to_string()));
        assert_eq!(map("{2}/b"), Err("stream_not_in_outputs"));
        assert_eq!(fill_levels("r/{1}-{2}/{3}/{x}/{", &["{2}".into(), "b".into()]), "r/{2}-b/{3}/{x}/{");
    }

    #[test]
    fn params_are_checked_with_the_name_of_what_is_wrong() {
        let spec = |params: &str| -> Result<Mqtt, String> {
            let text = format!("kind = \"mqtt\"\nname = \"b\"\ninputs = [\"commands\"]\noutputs = [\"readings/a\"]\n[params]\nhost = \"127.0.0.1\"\n{params}");
            Mqtt::from_spec(&toml::from_str(&text).unwrap())
        };
        let err = |params: &str| spec(params).err().unwrap();
        assert!(spec("command_topic = \"c/{action}\"\n[[params.readings]]\ntopic = \"a\"\nstream = \"readings/a\"").is_ok());
        assert_eq!(err(""), "command_topic: required to publish the commands of `inputs`");
        assert_eq!(err("command_topic = \"c\"\nqos = 3"), "qos: 3 is not 0, 1 or 2");
        assert_eq!(err("command_topic = \"c\"\nprotocol = \"4\""), "protocol: \"4\" is not \"3.1.1\" or \"5\"");
        assert_eq!(
            err("command_topic = \"c\"\n[[params.readings]]\ntopic = \"a/#/b\"\nstream = \"readings/a\""),
            "readings[0]: topic \"a/#/b\" is not a valid MQTT filter"
        );
        assert_eq!(
            err("command_topic = \"c\"\n[[params.readings]]\ntopic = \"a\"\nstream = \"readings/b\""),
            "readings[0]: stream: \"readings/b\" is not one of the outputs [\"readings/a\"]"
        );
        assert_eq!(
            err("command_topic = \"c\"\n[[params.readings]]\ntopic = \"a\"\nstream = \"readings/{1}\""),
            "readings[0]: stream: \"readings/{1}\" uses a level the topic has no `+` for"
        );
        assert!(err("command_topic = \"c\"\ntls = { ca_path = \"/nonexistent/ca.pem\" }").starts_with("tls: /nonexistent/ca.pem: "));
        assert!(err("command_topic = \"c\"\nport = \"x\"").contains("port"));
        // Keep-alive: whole seconds, at least 5 s with MQTT 5 (the client library asserts it).
        assert!(spec("command_topic = \"c\"\nprotocol = \"5\"\nkeep_alive_ms = 5000").is_ok());
        assert!(err("command_topic = \"c\"\nprotocol = \"5\"\nkeep_alive_ms = 2000").starts_with("keep_alive_ms: 2000 is not whole seconds in 5000..="));
        assert!(err("command_topic = \"c\"\nkeep_alive_ms = 1500").starts_with("keep_alive_ms: 1500 is not whole seconds in 1000..="));
        assert!(err("command_topic = \"c\"\nkeep_alive_ms = 65536000").starts_with("keep_alive_ms: 65536000"));
        assert_eq!(err("command_topic = \"c\"\npayload_bytes_max = 0"), "payload_bytes_max: must be at least 1");
        assert!(spec("command_topic = \"c\"\npayload_bytes_max = 2000000").is_ok(), "the default packet bound follows a larger payload bound");
        assert!(err("command_topic = \"c\"\npayload_bytes_max = 2000000\npacket_bytes_max = 1048576")
            .starts_with("packet_bytes_max: 1048576 is not in payload_bytes_max + 1024 (2001024)"));
        assert!(err("command_topic = \"c\"\npacket_bytes_max = 300000000").starts_with("packet_bytes_max: 300000000"));
    }

    #[test]
    fn commands_a_publish_cannot_carry_are_found_before_sending() {
        assert_eq!(unpublishable("plant/cmd/stop", 100, 1 << 20), None);
        assert!(unpublishable("plant/cmd/+", 100, 1 << 20).unwrap().contains("wildcard"));
        assert!(unpublishable("plant/#", 100, 1 << 20).unwrap().contains("wildcard"));
        assert!(unpublishable("a\0b", 100, 1 << 20).unwrap().contains("NUL"));
        assert_eq!(unpublishable("", 100, 1 << 20).as_deref(), Some("the topic is empty"));
        assert!(unpublishable(&"t".repeat(70_000), 1, 1 << 20).unwrap().contains("65535"));
        assert!(unpublishable("t", 1 << 20, 1 << 20).unwrap().contains("packet_bytes_max 1048576"));
    }
}
