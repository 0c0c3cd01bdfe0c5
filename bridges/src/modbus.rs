//! `modbus`: a bridge to a Modbus TCP device.
//!
//! In: every `poll_interval_ms`, reads each configured point (holding or input registers,
//! coils, discrete inputs), decodes it (`u16`, `i16`, `u32`, `i32`, `f32`; two-register
//! types in `word_order` `big` — high word first, the Modbus convention — or `little`;
//! then `value = raw * scale + offset`) and appends a reading (`strata.reading/1`) to the
//! point's stream.
//!
//! Out: each command on the actor's `inputs` (`strata.command/1`) whose `action` names one of
//! the `writes` writes that register (or coil): the command's own numeric `value` if it has
//! one, else the write's `value`, encoded like a point (`raw = (value - offset) / scale`). While
//! the device is unreachable, commands wait in the log (the actor's cursor does not move); one
//! older than `command_expiry_ms` when it could be sent is recorded as `command_expired` on
//! `events`, never written.
//!
//! ```toml
//! [[actors]]
//! kind = "modbus"
//! name = "press-plc"
//! inputs = ["commands"]
//! outputs = ["readings/press-1"]
//! [actors.params]
//! host = "127.0.0.1"
//! port = 502
//! unit_id = 1
//! poll_interval_ms = 1000
//! [[actors.params.points]]
//! stream = "readings/press-1"
//! table = "holding"          # holding | input | coil | discrete
//! address = 0
//! type = "f32"               # u16 | i16 | u32 | i32 | f32 (registers); coils are 0 or 1
//! word_order = "big"
//! scale = 1.0
//! offset = 0.0
//! [[actors.params.writes]]
//! action = "stop"            # the command's `action`
//! table = "holding"          # holding | coil
//! address = 10
//! type = "u16"
//! value = 0
//! ```
//!
//! Counted by reason in `strata status` and never stopping the bridge: Modbus exceptions
//! (`exception_<name>`, e.g. `exception_illegal_data_address`), `timeout`, `out_of_range`
//! (a value that does not fit its write's type), `unknown_action` (a command no write
//! handles, recorded as a `command_rejected` event), `bad_command`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use strata_core::actor::Retry;
use strata_core::config::ActorSpec;
use strata_core::{ActorError, Behaviour, Ctx, Envelope, StreamName};
use tokio::sync::{watch, Mutex};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::Slave;

use crate::shared::{self, Backoff, Health};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusParams {
    /// Device host name or address. Required.
    pub host: String,
    /// Default 502.
    #[serde(default = "d_port")]
    pub port: u16,
    /// Modbus unit (slave) id. Default 1.
    #[serde(default = "d_unit")]
    pub unit_id: u8,
    /// Time between two polls of every point, in ms. Default 1000.
    #[serde(default = "d_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Longest wait for one request's answer, in ms. Default 1000.
    #[serde(default = "d_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// First reconnect delay, in ms; doubles up to `reconnect_max_ms`. Default 100.
    #[serde(default = "d_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in ms. Default 10000.
    #[serde(default = "d_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// A command older than this when it could be written is expired instead, in ms.
    /// Default 600000 (10 min).
    #[serde(default = "d_command_expiry_ms")]
    pub command_expiry_ms: u64,
    /// Each rejection reason is logged at most once per this interval, in ms. Default 1000.
    #[serde(default = "d_reject_log_interval_ms")]
    pub reject_log_interval_ms: u64,
    #[serde(default)]
    pub points: Vec<Point>,
    #[serde(default)]
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Holding,
    Input,
    Coil,
    Discrete,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl Type {
    fn words(self) -> u16 {
        match self {
            Type::U16 | Type::I16 => 1,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    Big,
    Little,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Stream of the readings (one of `outputs`). Required.
    pub stream: StreamName,
    /// `holding`, `input`, `coil` or `discrete`. Required.
    pub table: Table,
    /// Register or coil address (0-based, as on the wire). Required.
    pub address: u16,
    /// Register type. Default `u16`; ignored for coils and discrete inputs.
    #[serde(default = "d_type", rename = "type")]
    pub ty: Type,
    /// Default `big` (high word first).
    #[serde(default = "d_word_order")]
    pub word_order: WordOrder,
    /// Default 1.
    #[serde(default = "d_scale")]
    pub scale: f64,
    /// Default 0.
    #[serde(default)]
    pub offset: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Write {
    /// The command `action` this write carries out. Required.
    pub action: String,
    /// `holding` or `coil`. Default `holding`.
    #[serde(default = "d_write_table")]
    pub table: Table,
    pub address: u16,
    #[serde(default = "d_type", rename = "type")]
    pub ty: Type,
    #[serde(default = "d_word_order")]
    pub word_order: WordOrder,
    #[serde(default = "d_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Written when the command carries no numeric `value`. Default 1.
    #[serde(default = "d_scale")]
    pub value: f64,
}

fn d_port() -> u16 {
    502
}
fn d_unit() -> u8 {
    1
}
fn d_poll_interval_ms() -> u64 {
    1000
}
fn d_request_timeout_ms() -> u64 {
    1000
}
fn d_reconnect_min_ms() -> u64 {
    100
}
fn d_reconnect_max_ms() -> u64 {
    10_000
}
fn d_command_expiry_ms() -> u64 {
    600_000
}
fn d_reject_log_interval_ms() -> u64 {
    1000
}
fn d_type() -> Type {
    Type::U16
}
fn d_word_order() -> WordOrder {
    WordOrder::Big
}
fn d_scale() -> f64 {
    1.0
}
fn d_write_table() -> Table {
    Table::Holding
}

/// Decodes `words` (as read) into a number of type `ty`.
pub fn decode(words: &[u16], ty: Type, order: WordOrder) -> Option<f64> {
    let w32 = || -> Option<u32> {
        let (hi, lo) = match order {
            WordOrder::Big => (*words.first()?, *words.get(1)?),
            WordOrder::Little => (*words.get(1)?, *words.first()?),
        };
        Some(u32::from(hi) << 16 | u32::from(lo))
    };
    Some(match ty {
        Type::U16 => f64::from(*words.first()?),
        Type::I16 => f64::from(*words.first()? as i16),
        Type::U32 => f64::from(w32()?),
        Type::I32 => f64::from(w32()? as i32),
        Type::F32 => f64::from(f32::from_bits(w32()?)),
    })
}

/// Encodes `raw` as the words of type `ty`, or `None` if it does not fit.
pub fn encode(raw: f64, ty: Type, order: WordOrder) -> Option<Vec<u16>> {
    let int = |lo: f64, hi: f64| (raw.is_finite() && raw.round() >= lo && raw.round() <= hi).then(|| raw.round() as i64);
    let bits: u32 = match ty {
        Type::U16 => return int(0.0, 65_535.0).map(|v| vec![v as u16]),
        Type::I16 => return int(-32_768.0, 32_767.0).map(|v| vec![v as i16 as u16]),
        Type::U32 => int(0.0, 4_294_967_295.0)? as u32,
        Type::I32 => int(-2_147_483_648.0, 2_147_483_647.0)? as i32 as u32,
        Type::F32 => {
            let f = raw as f32;
            if !f.is_finite() {
                return None;
            }
            f.to_bits()
        }
    };
    let (hi, lo) = ((bits >> 16) as u16, bits as u16);
    Some(match order {
        WordOrder::Big => vec![hi, lo],
        WordOrder::Little => vec![lo, hi],
    })
}

/// `exception_<name>` for a Modbus exception code (its Debug name in snake case).
fn exception_reason(code: tokio_modbus::ExceptionCode) -> String {
    let name = format!("{code:?}");
    let mut out = String::from("exception_");
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

pub struct Modbus {
    params: ModbusParams,
}

impl Modbus {
    pub fn from_spec(spec: &ActorSpec) -> Result<Modbus, String> {
        let p: ModbusParams = spec.params()?;
        if p.host.is_empty() {
            return Err("host: must not be empty".into());
        }
        if p.poll_interval_ms == 0 || p.request_timeout_ms == 0 {
            return Err("poll_interval_ms and request_timeout_ms must be > 0".into());
        }
        if p.reconnect_min_ms == 0 || p.reconnect_max_ms < p.reconnect_min_ms {
            return Err(format!("reconnect_min_ms ({}) must be > 0 and <= reconnect_max_ms ({})", p.reconnect_min_ms, p.reconnect_max_ms));
        }
        if p.points.is_empty() && spec.inputs.is_empty() {
            return Err("nothing to bridge: give `points` to poll, command `inputs` with `writes`, or both".into());
        }
        for (i, pt) in p.points.iter().enumerate() {
            if !spec.outputs.contains(&pt.stream) {
                return Err(format!("points[{i}]: stream: {:?} is not one of the outputs {:?}", pt.stream.as_str(), spec.outputs));
            }
            if pt.scale == 0.0 || !pt.scale.is_finite() || !pt.offset.is_finite() {
                return Err(format!("points[{i}]: scale must be finite and non-zero, offset finite"));
            }
        }
        for (i, w) in p.writes.iter().enumerate() {
            if !matches!(w.table, Table::Holding | Table::Coil) {
                return Err(format!("writes[{i}]: table: only `holding` registers and `coil`s can be written"));
            }
            if w.scale == 0.0 || !w.scale.is_finite() {
                return Err(format!("writes[{i}]: scale must be finite and non-zero"));
            }
            if w.table == Table::Holding && encode((w.value - w.offset) / w.scale, w.ty, w.word_order).is_none() {
                return Err(format!("writes[{i}]: value {} does not fit a {:?}", w.value, w.ty));
            }
        }
        if !spec.inputs.is_empty() && p.writes.is_empty() {
            return Err("writes: required to carry out the commands of `inputs`".into());
        }
        Ok(Modbus { params: p })
    }
}

type Shared = Arc<Mutex<Option<Context>>>;

pub struct ModbusState {
    health: Arc<Health>,
    conn: Shared,
    connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ModbusState {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs one request with the timeout; `Err(reason)` for a timeout, a lost connection
/// (`io`) or a Modbus exception.
async fn request<T, F>(timeout: Duration, f: F) -> Result<T, (String, bool)>
where
    F: std::future::Future<Output = tokio_modbus::Result<T>>,
{
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(("timeout".into(), true)),
        Ok(Err(e)) => Err((format!("io: {e}"), true)),
        Ok(Ok(Err(code))) => Err((exception_reason(code), false)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

impl Behaviour for Modbus {
    type State = ModbusState;

    async fn start(&self, ctx: &mut Ctx) -> Result<ModbusState, ActorError> {
        let p = &self.params;
        let peer = format!("modbus://{}:{}/{}", p.host, p.port, p.unit_id);
        let health = Arc::new(Health::new(ctx.source(), "modbus", peer, Duration::from_millis(p.reject_log_interval_ms)));
        let conn: Shared = Arc::new(Mutex::new(None));
        let (connected_tx, connected) = watch::channel(false);
        let task = tokio::spawn(poll(p.clone(), conn.clone(), health.clone(), connected_tx));
        Ok(ModbusState { health, conn, connected, task })
    }

    async fn handle(&self, _: &mut Ctx, state: &mut ModbusState, input: &Envelope) -> Result<(), ActorError> {
        let health = &state.health;
        let reject = |reason: &str, why: String| {
            health.reject(reason, &format!("{}: {why}", input.id));
            health.event(json!({"event": "command_rejected", "bridge": "modbus", "command": input.id.to_string(), "reason": why}));
        };
        let Ok(command @ Value::Object(_)) = serde_json::from_slice::<Value>(&input.payload) else {
            reject("bad_command", "not a JSON object".into());
            return Ok(());
        };
        let action = command["action"].as_str().unwrap_or_default();
        let Some(w) = self.params.writes.iter().find(|w| w.action == action) else {
            reject("unknown_action", format!("no write for action {action:?}"));
            return Ok(());
        };
        let value = command["value"].as_f64().unwrap_or(w.value);
        let raw = (value - w.offset) / w.scale;
        let words = match w.table {
            Table::Coil => None,
            _ => match encode(raw, w.ty, w.word_order) {
                Some(words) => Some(words),
                None => {
                    reject("out_of_range", format!("{value} does not fit a {:?} at {}", w.ty, w.address));
                    return Ok(());
                }
            },
        };
        let key = command["key"].as_str();
        let expiry = Duration::from_millis(self.params.command_expiry_ms);
        let timeout = Duration::from_millis(self.params.request_timeout_ms);
        loop {
            if let Some(age) = shared::expired(input, expiry) {
                shared::record_expired(health, input, age, key);
                return Ok(());
            }
            if *state.connected.borrow_and_update() {
                let mut guard = state.conn.lock().await;
                if let Some(c) = guard.as_mut() {
                    let done = match &words {
                        None => request(timeout, c.write_single_coil(w.address, raw != 0.0)).await,
                        Some(words) if words.len() == 1 => request(timeout, c.write_single_register(w.address, words[0])).await,
                        Some(words) => request(timeout, c.write_multiple_registers(w.address, words)).await,
                    };
                    match done {
                        Ok(()) => {
                            health.count("commands_written", 1);
                            return Ok(());
                        }
                        // The device refused it: counted and recorded; retrying would not help.
                        Err((reason, false)) => {
                            reject(&reason, format!("writing {value} to {}", w.address));
                            return Ok(());
                        }
                        // Lost the device: the poller reconnects; try again then.
                        Err((reason, true)) => {
                            *guard = None;
                            drop(guard);
                            health.disconnected(&reason);
                        }
                    }
                }
            }
            // The poller (which reconnects) has stopped: fail, so the supervisor restarts the
            // actor, rather than spin here until the command expires. Not the command's fault:
            // it does not count towards passing it over.
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), state.connected.changed()).await {
                return Err(Retry("the Modbus poller stopped (see the log above)".into()).into());
            }
        }
    }

    async fn tick(&self, _: &mut Ctx, state: &mut ModbusState) -> Result<(), ActorError> {
        if state.task.is_finished() {
            return Err("the Modbus poller stopped (see the log above)".into());
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

/// Connects (with backoff), then polls every point every `poll_interval_ms`.
async fn poll(p: ModbusParams, conn: Shared, health: Arc<Health>, connected: watch::Sender<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(p.reconnect_min_ms), Duration::from_millis(p.reconnect_max_ms));
    let timeout = Duration::from_millis(p.request_timeout_ms);
    let mut interval = tokio::time::interval(Duration::from_millis(p.poll_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if conn.lock().await.is_none() {
            connected.send_replace(false);
            let addr = format!("{}:{}", p.host, p.port);
            let attempt = async {
                let sock = tokio::net::lookup_host(&addr).await?.next().ok_or_else(|| std::io::Error::other("no address"))?;
                tokio_modbus::client::tcp::connect_slave(sock, Slave(p.unit_id)).await
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(c)) => {
                    *conn.lock().await = Some(c);
                    backoff.connected();
                    health.connected();
                    connected.send_replace(true);
                }
                Ok(Err(e)) => {
                    health.disconnected(&format!("connect {addr}: {e}"));
                    tokio::time::sleep(backoff.delay()).await;
                    continue;
                }
                Err(_) => {
                    health.disconnected(&format!("connect {addr}: timeout"));
                    tokio::time::sleep(backoff.delay()).await;
                    continue;
                }
            }
        }
        interval.tick().await;
        let mut readings = Vec::with_capacity(p.points.len());
        let mut lost = false;
        {
            let mut guard = conn.lock().await;
            let Some(c) = guard.as_mut() else { continue };
            for pt in &p.points {
                let raw = match pt.table {
                    Table::Holding => request(timeout, c.read_holding_registers(pt.address, pt.ty.words())).await.map(|w| decode(&w, pt.ty, pt.word_order)),
                    Table::Input => request(timeout, c.read_input_registers(pt.address, pt.ty.words())).await.map(|w| decode(&w, pt.ty, pt.word_order)),
                    Table::Coil => request(timeout, c.read_coils(pt.address, 1)).await.map(|b| b.first().map(|b| f64::from(u8::from(*b)))),
                    Table::Discrete => request(timeout, c.read_discrete_inputs(pt.address, 1)).await.map(|b| b.first().map(|b| f64::from(u8::from(*b)))),
                };
                match raw {
                    Ok(Some(raw)) => match raw * pt.scale + pt.offset {
                        // A float register holding NaN or infinity (a sensor's fault code), or a
                        // scale that overflows: JSON has no such number, so it is refused here,
                        // named, rather than stored as `null`.
                        value if !value.is_finite() => {
                            health.reject("bad_value", &format!("{:?} {}: {raw} scaled is {value}, not a finite number", pt.table, pt.address))
                        }
                        value => readings.push((pt.stream.clone(), value)),
                    },
                    Ok(None) => health.reject("short_answer", &format!("{:?} {}: fewer words than asked", pt.table, pt.address)),
                    Err((reason, false)) => health.reject(&reason, &format!("reading {:?} {}", pt.table, pt.address)),
                    Err((reason, true)) => {
                        *guard = None;
                        health.disconnected(&reason);
                        lost = true;
                        break;
                    }
                }
            }
        }
        health.count("polls", 1);
        let ts_ms = shared::unix_ms();
        for (stream, value) in readings {
            let appended = match shared::reading(value, ts_ms) {
                Ok(draft) => health.source().append(&stream, draft).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match appended {
                Ok(_) => health.count("readings", 1),
                Err(e) => return tracing::error!(error = %e, "modbus: a reading could not be appended; the poller stops"),
            }
        }
        // Lost right after connecting (a gateway that accepts but whose device does not
        // answer): wait as after a failed connect, not one poll interval.
        if lost {
            tokio::time::sleep(backoff.delay()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_decode_and_encode_both_word_orders() {
        assert_eq!(decode(&[0xFFFF], Type::I16, WordOrder::Big), Some(-1.0));
        assert_eq!(decode(&[0x0001, 0x0002], Type::U32, WordOrder::Big), Some(65_538.0));
        assert_eq!(decode(&[0x0002, 0x0001], Type::U32, WordOrder::Little), Some(65_538.0));
        let words = encode(21.5, Type::F32, WordOrder::Big).unwrap();
        assert_eq!(words, vec![0x41AC, 0x0000]);
        assert_eq!(decode(&words, Type::F32, WordOrder::Big), Some(21.5));
        assert_eq!(decode(&encode(-5.0, Type::I32, WordOrder::Little).unwrap(), Type::I32, WordOrder::Little), Some(-5.0));
        assert_eq!(encode(70_000.0, Type::U16, WordOrder::Big), None);
        assert_eq!(encode(-1.0, Type::U32, WordOrder::Big), None);
        assert_eq!(decode(&[1], Type::U32, WordOrder::Big), None);
        assert_eq!(exception_reason(tokio_modbus::ExceptionCode::IllegalDataAddress), "exception_illegal_data_address");
    }

    #[test]
    fn params_are_checked_with_the_name_of_what_is_wrong() {
        let spec = |params: &str| -> Result<Modbus, String> {
            let text =
                format!("kind = \"modbus\"\nname = \"plc\"\ninputs = [\"commands\"]\noutputs = [\"readings/p\"]\n[params]\nhost = \"127.0.0.1\"\n{params}");
            Modbus::from_spec(&toml::from_str(&text).unwrap())
        };
        let err = |params: &str| spec(params).err().unwrap();
        let write = "[[params.writes]]\naction = \"stop\"\naddress = 3\n";
        assert!(spec(&format!("{write}[[params.points]]\nstream = \"readings/p\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"")).is_ok());
        assert_eq!(err(""), "writes: required to carry out the commands of `inputs`");
        assert_eq!(
            err(&format!("{write}[[params.points]]\nstream = \"readings/q\"\ntable = \"input\"\naddress = 0")),
            "points[0]: stream: \"readings/q\" is not one of the outputs [\"readings/p\"]"
        );
        assert!(err(&format!("{write}[[params.points]]\nstream = \"readings/p\"\ntable = \"eeprom\"\naddress = 0")).contains("eeprom"));
        assert_eq!(err("[[params.writes]]\naction = \"stop\"\naddress = 3\nvalue = 70000"), "writes[0]: value 70000 does not fit a U16");
        assert_eq!(
            err("[[params.writes]]\naction = \"stop\"\naddress = 3\ntable = \"input\""),
            "writes[0]: table: only `holding` registers and `coil`s can be written"
        );
    }
}
