//! Readings from foreign clients: any Zenoh client (the Python binding, a C device) puts a
//! JSON document on `strata/ingest/<stream>`:
//!
//! ```json
//! {"value": 21.5}                        // a number
//! {"value": {"x": 1, "y": 2}, "ts_ms": 1764160000000}   // or an object; optional device time
//! ```
//!
//! The node checks it ([`validate`]) and appends it to its own stream `<stream>` as a
//! `Reading` with payload type [`READING_TYPE`]. Anything else is rejected with a
//! [`Rejection`] reason, counted per reason, and logged; the node keeps running.

use serde_json::{Map, Value};

use crate::config::StreamPattern;
use crate::model::StreamName;

/// Payload type of readings (ingested or produced by sensors): the JSON document above.
pub const READING_TYPE: &str = "strata.reading/1";

/// Why an ingest message was refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    TooLarge { len: usize, max: usize },
    BadStream(String),
    StreamNotAllowed(String),
    NotJson(String),
    NotAnObject,
    MissingValue,
    BadValue,
    BadTimestamp,
    UnknownField(String),
}

impl Rejection {
    /// A short stable name, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::BadStream(_) => "bad_stream",
            Rejection::StreamNotAllowed(_) => "stream_not_allowed",
            Rejection::NotJson(_) => "not_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::MissingValue => "missing_value",
            Rejection::BadValue => "bad_value",
            Rejection::BadTimestamp => "bad_timestamp",
            Rejection::UnknownField(_) => "unknown_field",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::TooLarge { len, max } => write!(f, "message of {len} bytes is larger than {max}"),
            Rejection::BadStream(e) => write!(f, "{e}"),
            Rejection::StreamNotAllowed(s) => write!(f, "stream {s:?} is not open for ingest (ingest.streams)"),
            Rejection::NotJson(e) => write!(f, "not JSON: {e}"),
            Rejection::NotAnObject => write!(f, "not a JSON object"),
            Rejection::MissingValue => write!(f, "no \"value\" field"),
            Rejection::BadValue => write!(f, "\"value\" is neither a number nor an object"),
            Rejection::BadTimestamp => write!(f, "\"ts_ms\" is not a non-negative integer"),
            Rejection::UnknownField(k) => write!(f, "unknown field {k:?} (allowed: value, ts_ms)"),
        }
    }
}

/// Checks one ingest message for `key`'s stream; returns the stream and the canonical
/// payload to append.
pub fn validate(key: &str, payload: &[u8], allowed: &[StreamPattern], payload_bytes_max: usize) -> Result<(StreamName, Vec<u8>), Rejection> {
    if payload.len() > payload_bytes_max {
        return Err(Rejection::TooLarge { len: payload.len(), max: payload_bytes_max });
    }
    let stream = key.strip_prefix("strata/ingest/").ok_or_else(|| Rejection::BadStream(format!("key {key:?}")))?;
    let stream = StreamName::new(stream).map_err(|e| Rejection::BadStream(e.to_string()))?;
    if !allowed.iter().any(|p| p.matches(&stream)) {
        return Err(Rejection::StreamNotAllowed(stream.to_string()));
    }
    let doc: Value = serde_json::from_slice(payload).map_err(|e| Rejection::NotJson(e.to_string()))?;
    let Value::Object(fields) = doc else { return Err(Rejection::NotAnObject) };
    let mut out = Map::new();
    for (k, v) in fields {
        match k.as_str() {
            "value" if v.is_number() || v.is_object() => {
                out.insert(k, v);
            }
            "value" => return Err(Rejection::BadValue),
            "ts_ms" if v.is_u64() => {
                out.insert(k, v);
            }
            "ts_ms" => return Err(Rejection::BadTimestamp),
            _ => return Err(Rejection::UnknownField(k)),
        }
    }
    if !out.contains_key("value") {
        return Err(Rejection::MissingValue);
    }
    Ok((stream, serde_json::to_vec(&Value::Object(out)).expect("JSON values serialise")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, payload: &str, expected: Result<&str, &str>) {
        let allowed = [StreamPattern::new("readings/**").unwrap()];
        let got = validate(key, payload.as_bytes(), &allowed, 256).map(|(s, p)| format!("{s} {}", String::from_utf8(p).unwrap())).map_err(|r| r.reason());
        assert_eq!(got.as_deref().map_err(|e| *e), expected, "{key} {payload}");
    }

    #[test]
    fn ingest_messages() {
        check("strata/ingest/readings/a", r#"{"value": 1.5}"#, Ok(r#"readings/a {"value":1.5}"#));
        check("strata/ingest/readings/a", r#"{"ts_ms": 5, "value": {"x": 1}}"#, Ok(r#"readings/a {"ts_ms":5,"value":{"x":1}}"#));
        check("strata/ingest/readings/a", r#"{"value": "hot"}"#, Err("bad_value"));
        check("strata/ingest/readings/a", r#"{"value": 1, "extra": 2}"#, Err("unknown_field"));
        check("strata/ingest/readings/a", r#"{"ts_ms": -1, "value": 1}"#, Err("bad_timestamp"));
        check("strata/ingest/readings/a", r#"{"ts_ms": 1}"#, Err("missing_value"));
        check("strata/ingest/readings/a", r#"[1]"#, Err("not_an_object"));
        check("strata/ingest/readings/a", "not json", Err("not_json"));
        check("strata/ingest/other", r#"{"value": 1}"#, Err("stream_not_allowed"));
        check("strata/ingest/Readings", r#"{"value": 1}"#, Err("bad_stream"));
        check("strata/ingest/readings/a", &format!(r#"{{"value": "{}"}}"#, "x".repeat(300)), Err("too_large"));
    }
}
