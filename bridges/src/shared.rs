//! What both bridges share: reconnect backoff, rejection counters with rate-limited logging,
//! the connection state shown in status, command expiry and readings.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{json, Value};
use strata_core::actor::Source;
use strata_core::log::Draft;
use strata_core::{Envelope, Kind, PayloadType};

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Exponential backoff between `min` and `max`, each delay drawn in [d/2, d] (jitter: many
/// bridges that lost the same broker do not all come back at the same instant). It goes back
/// to `min` only after a connection has lasted `max`: a link that connects and fails at once
/// again and again (a broker kicking a duplicate client id, a gateway whose device does not
/// answer) backs off like one that does not connect at all.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// When the current connection was made.
    up_since: Option<tokio::time::Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min, up_since: None }
    }

    /// A connection was made.
    pub fn connected(&mut self) {
        self.up_since = Some(tokio::time::Instant::now());
    }

    /// The delay before the next attempt; doubles the one after. Back to `min` first if the
    /// connection that just ended had lasted `max`.
    pub fn delay(&mut self) -> Duration {
        if self.up_since.take().is_some_and(|t| t.elapsed() >= self.max) {
            self.next = self.min;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=d - half)
    }
}

/// A bridge's state as `strata status` shows it (`reports.<actor>`), and its events.
pub struct Health {
    source: Source,
    kind: &'static str,
    peer: String,
    log_interval: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    connected: bool,
    since_ms: u64,
    reconnects: u64,
    last_error: Option<String>,
    counters: BTreeMap<&'static str, u64>,
    rejected: BTreeMap<String, u64>,
    /// Per reason: when it was last logged, and how many went unlogged since.
    logged: BTreeMap<String, (Instant, u64)>,
}

impl Health {
    pub fn new(source: Source, kind: &'static str, peer: String, log_interval: Duration) -> Health {
        let h = Health { source, kind, peer, log_interval, inner: Mutex::new(Inner { since_ms: unix_ms(), ..Inner::default() }) };
        h.publish(&h.lock());
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, i: &Inner) {
        self.source.report(json!({
            "bridge": self.kind, "peer": self.peer, "connected": i.connected, "since_ms": i.since_ms,
            "reconnects": i.reconnects, "last_error": i.last_error, "counters": i.counters, "rejected": i.rejected,
        }));
    }

    pub fn connected(&self) {
        let mut i = self.lock();
        if i.connected {
            return;
        }
        i.connected = true;
        i.since_ms = unix_ms();
        self.source.event(json!({"event": "bridge_connected", "bridge": self.kind, "peer": self.peer, "reconnects": i.reconnects}));
        tracing::info!(bridge = self.kind, peer = %self.peer, "bridge connected");
        self.publish(&i);
    }

    pub fn disconnected(&self, error: &str) {
        let mut i = self.lock();
        i.last_error = Some(error.to_owned());
        if i.connected {
            i.connected = false;
            i.since_ms = unix_ms();
            i.reconnects += 1;
            self.source.event(json!({"event": "bridge_disconnected", "bridge": self.kind, "peer": self.peer, "error": error}));
            tracing::warn!(bridge = self.kind, peer = %self.peer, error, "bridge disconnected");
        }
        self.publish(&i);
    }

    pub fn count(&self, counter: &'static str, n: u64) {
        let mut i = self.lock();
        *i.counters.entry(counter).or_default() += n;
        self.publish(&i);
    }

    /// Counts a rejected input by reason, and logs it at most once per `log_interval` per
    /// reason (with how many were not logged in between).
    pub fn reject(&self, reason: &str, detail: &str) {
        let mut i = self.lock();
        *i.rejected.entry(reason.to_owned()).or_default() += 1;
        let now = Instant::now();
        match i.logged.get_mut(reason) {
            Some((at, unlogged)) if now.duration_since(*at) < self.log_interval => *unlogged += 1,
            last => {
                let unlogged = last.map_or(0, |(_, n)| *n);
                tracing::warn!(bridge = self.kind, peer = %self.peer, reason, detail, unlogged, "input rejected");
                i.logged.insert(reason.to_owned(), (now, 0));
            }
        }
        self.publish(&i);
    }

    pub fn event(&self, doc: Value) {
        self.source.event(doc);
    }

    pub fn source(&self) -> &Source {
        &self.source
    }
}

/// How long ago `command` was appended, if it is older than `expiry`.
pub fn expired(command: &Envelope, expiry: Duration) -> Option<Duration> {
    let age = Duration::from_millis(unix_ms().saturating_sub(command.hlc.unix_us() / 1000));
    (age > expiry).then_some(age)
}

/// Records an expired command on `events` (never dropped silently).
pub fn record_expired(health: &Health, command: &Envelope, age: Duration, key: Option<&str>) {
    health.count("commands_expired", 1);
    health.event(json!({"event": "command_expired", "bridge": health.kind, "command": command.id.to_string(), "key": key, "age_ms": age.as_millis() as u64}));
    tracing::warn!(bridge = health.kind, command = %command.id, age_ms = age.as_millis() as u64, "command expired before it could be sent");
}

/// A reading (`strata.reading/1`, the format of ingest and sensors).
pub fn reading(value: f64, ts_ms: u64) -> Result<Draft, String> {
    if !value.is_finite() {
        // JSON has no NaN or infinity: `json!` would store `null`, which ingest itself refuses.
        return Err(format!("reading value {value} is not a finite number"));
    }
    let doc = json!({"value": value, "ts_ms": ts_ms});
    let ty = PayloadType::new(strata_core::bus::ingest::READING_TYPE).map_err(|e| e.to_string())?;
    Ok(Draft::new(Kind::Reading, ty, doc.to_string().into_bytes()))
}

/// `template` with each `{field}` replaced by the command's top-level field (a string or a
/// number); a missing field is an error naming it.
pub fn render(template: &str, command: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("template {template:?}: unclosed '{{'"))? + open;
        let field = &rest[open + 1..close];
        match &command[field] {
            Value::String(s) => out.push_str(s),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            _ => return Err(format!("the command has no field {field:?} (topic template {template:?})")),
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a template's syntax (at `strata check`): braces balanced, field names non-empty.
pub fn check_template(template: &str) -> Result<(), String> {
    let mut open = false;
    let mut name_len = 0;
    for c in template.chars() {
        match (c, open) {
            ('{', false) => (open, name_len) = (true, 0),
            ('}', true) if name_len > 0 => open = false,
            ('{', true) | ('}', _) => return Err(format!("template {template:?}: misplaced {c:?}")),
            (_, true) => name_len += 1,
            _ => {}
        }
    }
    if open {
        return Err(format!("template {template:?}: unclosed '{{'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backoff keeps growing over connections that fail at once, and starts again from
    /// `min` after one that lasted `max` (on a paused clock).
    #[test]
    fn the_backoff_resets_only_after_a_connection_that_lasted() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let (min, max) = (Duration::from_millis(100), Duration::from_millis(800));
            let mut b = Backoff::new(min, max);
            let bounds =
                |d: Duration, of: u64| assert!(d >= Duration::from_millis(of / 2) && d <= Duration::from_millis(of), "{d:?} not in [{}, {of}] ms", of / 2);
            bounds(b.delay(), 100);
            for of in [200, 400, 800, 800] {
                b.connected();
                tokio::time::sleep(Duration::from_millis(50)).await;
                bounds(b.delay(), of);
            }
            b.connected();
            tokio::time::sleep(max).await;
            bounds(b.delay(), 100);
        });
    }

    #[test]
    fn a_reading_that_json_cannot_hold_is_refused() {
        assert!(reading(21.5, 1).is_ok());
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(reading(bad, 1).err().unwrap(), format!("reading value {bad} is not a finite number"));
        }
    }

    #[test]
    fn templates_take_the_commands_fields() {
        let cmd = json!({"key": "edge-1/decisions@1#5", "action": "stop", "line": 3});
        assert_eq!(render("plant/line-{line}/{action}", &cmd).unwrap(), "plant/line-3/stop");
        assert_eq!(render("plant/{device}/cmd", &cmd).unwrap_err(), "the command has no field \"device\" (topic template \"plant/{device}/cmd\")");
        assert!(check_template("a/{x}/b").is_ok());
        assert!(check_template("a/{x/b").unwrap_err().contains("unclosed"));
        assert!(check_template("a/{}/b").unwrap_err().contains("misplaced"));
        assert!(check_template("a/}x").unwrap_err().contains("misplaced"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ds: Vec<Duration> = (0..6).map(|_| b.delay()).collect();
        for (d, nominal) in ds.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            let nominal = Duration::from_millis(nominal);
            assert!(*d >= nominal / 2 && *d <= nominal, "{d:?} not in [{:?}, {nominal:?}]", nominal / 2);
        }
    }
}
