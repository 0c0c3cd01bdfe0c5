//! How `strata log` shows streams and envelopes: one-screen tables and one line per
//! envelope for people, JSON for machines.

use serde_json::{json, Value};

use crate::model::{Envelope, Kind};

use super::StreamInfo;

/// Up to this many payload bytes are shown on a human-readable line.
const PAYLOAD_SHOWN_BYTES_MAX: usize = 96;

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A plain-text table: columns padded to their widest cell, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `strata log ls`: one row per stream history.
pub fn streams_table(infos: &[StreamInfo]) -> String {
    let header = ["origin", "incarnation", "stream", "first", "last", "count", "bytes", "watermark", "missing", "expired", ""];
    let rows: Vec<Vec<String>> = infos
        .iter()
        .map(|i| {
            vec![
                i.origin.to_string(),
                i.incarnation.to_string(),
                i.stream.to_string(),
                i.first.to_string(),
                i.last.to_string(),
                i.count.to_string(),
                human_bytes(i.bytes),
                i.watermark.to_string(),
                i.missing.to_string(),
                i.expired.to_string(),
                match (i.local, i.own) {
                    (true, _) => "local",
                    (false, true) => "local, earlier incarnation",
                    (false, false) => "replica",
                }
                .to_owned(),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    if infos.is_empty() {
        out.push_str("(no streams)\n");
    }
    out
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Reading => "reading",
        Kind::DecisionRequest => "decision_request",
        Kind::Decision => "decision",
        Kind::Command => "command",
        Kind::Escalation => "escalation",
        Kind::Event => "event",
    }
}

fn printable(payload: &[u8]) -> Option<&str> {
    std::str::from_utf8(payload).ok().filter(|s| s.chars().all(|c| !c.is_control() || c == '\t'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `strata log tail`: one human-readable line per envelope.
pub fn envelope_line(e: &Envelope) -> String {
    let shown = &e.payload[..e.payload.len().min(PAYLOAD_SHOWN_BYTES_MAX)];
    let more = if e.payload.len() > shown.len() { "…" } else { "" };
    let payload = match printable(shown) {
        Some(text) => format!("{text}{more}"),
        None => format!("0x{}{more}", hex(shown)),
    };
    let budget = e.budget_us.map_or("-".to_owned(), |b| format!("{b}us"));
    format!(
        "{} #{} @{} {} {} {} prio={} budget={} {}B {}",
        e.id.origin,
        e.id.seq,
        e.id.incarnation,
        e.hlc.rfc3339(),
        e.id.stream,
        kind(e.kind),
        e.priority.0,
        budget,
        e.payload.len(),
        payload
    )
}

/// `strata log tail --json`: one object per envelope. A UTF-8 payload is given as text
/// (`payload`), any other as hex (`payload_hex`).
pub fn envelope_json(e: &Envelope) -> Value {
    let text = std::str::from_utf8(&e.payload).ok();
    json!({
        "origin": e.id.origin.as_str(),
        "incarnation": e.id.incarnation.to_string(),
        "stream": e.id.stream.as_str(),
        "seq": e.id.seq.get(),
        "kind": kind(e.kind),
        "hlc": e.hlc.to_string(),
        "time": e.hlc.rfc3339(),
        "budget_us": e.budget_us,
        "priority": e.priority.0,
        "trace_id": format!("{:032x}", e.trace.trace_id),
        "parent": e.trace.parent,
        "payload_type": e.payload_type.as_str(),
        "payload_len": e.payload.len(),
        "payload": text,
        "payload_hex": if text.is_none() { Some(hex(&e.payload)) } else { None },
    })
}
