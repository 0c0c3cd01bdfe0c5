//! The versioned binary wire and storage format of an [`Envelope`].
//!
//! Layout: one byte of format version ([`FORMAT_VERSION`]), then the envelope encoded with
//! bincode 2 (standard configuration: little-endian, variable-length integers) through serde.
//! Zenoh frames the bytes on the wire and RocksDB frames them on disk, so no length prefix
//! is needed.
//!
//! Decoding takes untrusted bytes and never panics: it returns [`DecodeError`]. Inputs over
//! the configured limit are refused before decoding, and decoding allocates only the
//! envelope's names and payload, copied from the input once their lengths are checked against
//! what is left of it, so a forged length field cannot make it reserve a huge buffer. Encoder
//! and decoder are written out by hand for speed; property tests check both against
//! `bincode::serde` on arbitrary envelopes and arbitrary bytes.

use thiserror::Error;

use crate::model::{Envelope, EnvelopeId, HlcTime, Incarnation, Kind, NodeId, PayloadType, Priority, Seq, StreamName, Trace};

/// Version of the envelope format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Upper bound on everything in an encoded envelope but its payload (ids, names, payload type
/// and bincode's length prefixes come to well under half of this).
pub const HEADER_BYTES_MAX: usize = 1024;

/// Hard ceiling for `max_payload_bytes`, whatever the configuration says.
pub const PAYLOAD_BYTES_CEILING: usize = 64 * 1024 * 1024 - HEADER_BYTES_MAX - 1;

/// Size limits, from the node configuration (`log.payload_bytes_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
}

impl Limits {
    /// What a store's records are read with, whatever the reader's configuration: a record
    /// stored under a larger `log.payload_bytes_max` (or by another node) is not damaged, and
    /// reads as what it is. The configured limit applies to what comes in, not to what is kept.
    pub const STORED: Limits = Limits { max_payload_bytes: PAYLOAD_BYTES_CEILING };
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_payload_bytes: 1024 * 1024 }
    }
}

impl Limits {
    /// Largest encoded envelope accepted: version byte + header + payload.
    pub fn max_envelope_bytes(&self) -> usize {
        1 + HEADER_BYTES_MAX + self.max_payload_bytes.min(PAYLOAD_BYTES_CEILING)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("payload of {len} bytes is larger than the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("unknown envelope format version {found} (this build reads version {supported})")]
    UnknownVersion { found: u8, supported: u8 },
    #[error("envelope of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `envelope` as version byte + bincode body.
pub fn encode(envelope: &Envelope, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64 + envelope.payload.len());
    encode_into(envelope, limits, &mut out)?;
    Ok(out)
}

/// [`encode`] into `out`, replacing what it held (a buffer reused across envelopes).
pub fn encode_into(envelope: &Envelope, limits: &Limits, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    start(envelope, limits, out, FORMAT_VERSION)?;
    write_body(out, envelope);
    debug_assert!(out.len() <= limits.max_envelope_bytes(), "header grew past HEADER_BYTES_MAX");
    Ok(())
}

/// Checks the payload's size, then empties `out` and writes `first`.
fn start(envelope: &Envelope, limits: &Limits, out: &mut Vec<u8>, first: u8) -> Result<(), EncodeError> {
    let max = limits.max_payload_bytes.min(PAYLOAD_BYTES_CEILING);
    if envelope.payload.len() > max {
        return Err(EncodeError::PayloadTooLarge { len: envelope.payload.len(), max });
    }
    out.clear();
    out.reserve(HEADER_GUESS_BYTES + envelope.payload.len());
    out.push(first);
    Ok(())
}

/// Room reserved for an envelope's bytes besides its payload: enough for short names.
const HEADER_GUESS_BYTES: usize = 96;

/// Appends `e` encoded as bincode 2's standard configuration encodes it through serde, byte
/// for byte (a property test checks that against `bincode::serde` on arbitrary envelopes),
/// without serde's per-field dispatch: the committer encodes every appended record, and this
/// takes a third to a half of the time (`bench`, `STRATA_BENCH_ONLY=encode`). Field order is the
/// declaration order of [`Envelope`]; strings and byte runs are a varint length then the
/// bytes; an `Option` is a 0 or 1 byte then the value; an enum's unit variant is its index
/// as a varint; `u8` is one raw byte and so is each byte of the HLC's 16-byte id.
fn write_body(out: &mut Vec<u8>, e: &Envelope) {
    write_id(out, &e.id);
    put_varint(out, kind_index(e.kind).into());
    put_varint(out, e.hlc.as_uhlc().get_time().0);
    out.extend_from_slice(&e.hlc.as_uhlc().get_id().to_le_bytes());
    write_after_clock(out, e);
}

fn write_id(out: &mut Vec<u8>, id: &EnvelopeId) {
    put_bytes(out, id.origin.as_str().as_bytes());
    put_varint(out, id.incarnation.get());
    put_bytes(out, id.stream.as_str().as_bytes());
    put_varint(out, id.seq.get());
}

/// The fields after the HLC timestamp.
fn write_after_clock(out: &mut Vec<u8>, e: &Envelope) {
    put_option(out, e.budget_us);
    out.push(e.priority.0);
    put_varint_u128(out, e.trace.trace_id);
    put_option(out, e.trace.parent);
    put_bytes(out, e.payload_type.as_str().as_bytes());
    put_bytes(out, &e.payload);
}

/// The index serde gives each variant: its declaration order.
fn kind_index(kind: Kind) -> u8 {
    match kind {
        Kind::Reading => 0,
        Kind::DecisionRequest => 1,
        Kind::Decision => 2,
        Kind::Command => 3,
        Kind::Escalation => 4,
        Kind::Event => 5,
    }
}

/// bincode 2's variable-length integer: one byte up to 250, else a marker byte (251 to 253)
/// and the value in the smallest of 2, 4 or 8 little-endian bytes that holds it.
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v <= 250 {
        out.push(v as u8);
    } else if v <= u64::from(u16::MAX) {
        out.push(251);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(252);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// [`put_varint`] for a `u128`: above `u64::MAX`, marker 254 and 16 bytes.
fn put_varint_u128(out: &mut Vec<u8>, v: u128) {
    match u64::try_from(v) {
        Ok(v) => put_varint(out, v),
        Err(_) => {
            out.push(254);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_option(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_varint(out, v);
        }
    }
}

/// First byte of a log record whose HLC id is its origin's incarnation (see
/// [`encode_record_into`]): the id is left out.
pub const RECORD_OWN_CLOCK: u8 = 0xC1;
/// First byte of a log record that carries its HLC id (16 bytes).
pub const RECORD_CLOCK_ID: u8 = 0xC2;

/// The id of a node's HLC: its incarnation (an HLC id is never 0).
pub(crate) fn own_clock_id(incarnation: u64) -> u128 {
    u128::from(incarnation.max(1))
}

/// Encodes `envelope` as the log stores it, replacing what `out` held: the envelope's bytes
/// ([`encode`]) without what the record's key already says. The key holds origin,
/// incarnation, stream and seq, so the id is left out; so is the HLC id when it is the
/// origin's own clock (`RECORD_OWN_CLOCK`, every record a node appends itself), else it is
/// kept (`RECORD_CLOCK_ID`). The bench's 100-byte reading is stored in 124 bytes instead of
/// 171: a quarter less written to the WAL and to tables. [`decode_record`] restores
/// the envelope given its id.
pub fn encode_record_into(envelope: &Envelope, limits: &Limits, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let clock = envelope.hlc.as_uhlc();
    let clock_id = u128::from_le_bytes(clock.get_id().to_le_bytes());
    let own = clock_id == own_clock_id(envelope.id.incarnation.get());
    start(envelope, limits, out, if own { RECORD_OWN_CLOCK } else { RECORD_CLOCK_ID })?;
    put_varint(out, kind_index(envelope.kind).into());
    put_varint(out, clock.get_time().0);
    if !own {
        out.extend_from_slice(&clock_id.to_le_bytes());
    }
    write_after_clock(out, envelope);
    Ok(())
}

/// Decodes a log record stored under `id` (see [`encode_record_into`]). A record written
/// before that form existed holds the whole envelope ([`encode`]) and is decoded as such;
/// the caller checks that its id is the one expected. Never panics.
pub fn decode_record(id: &EnvelopeId, bytes: &[u8], limits: &Limits) -> Result<Envelope, DecodeError> {
    let Some((&form, rest)) = bytes.split_first() else {
        return Err(DecodeError::Malformed("empty record".into()));
    };
    let own = match form {
        FORMAT_VERSION => return decode(bytes, limits),
        RECORD_OWN_CLOCK => true,
        RECORD_CLOCK_ID => false,
        other => return Err(DecodeError::Malformed(format!("unknown record form {other:#04x}"))),
    };
    let max = limits.max_envelope_bytes();
    if bytes.len() > max {
        return Err(DecodeError::TooLarge { len: bytes.len(), max });
    }
    let mut r = Reader { rest };
    let kind = r.kind()?;
    let time = r.varint_u64("time")?;
    let clock = if own { own_clock_id(id.incarnation.get()) } else { u128::from_le_bytes(r.array("clock id")?) };
    let envelope = r.after_clock(id.clone(), kind, time, clock)?;
    check_payload(envelope, bytes.len(), limits)
}

/// Decodes bytes produced by [`encode`]. Never panics; see the module documentation for
/// the allocation bound.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Envelope, DecodeError> {
    let max = limits.max_envelope_bytes();
    if bytes.len() > max {
        return Err(DecodeError::TooLarge { len: bytes.len(), max });
    }
    let Some((&version, body)) = bytes.split_first() else {
        return Err(DecodeError::Malformed("empty input".into()));
    };
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion { found: version, supported: FORMAT_VERSION });
    }
    check_payload(read_body(body)?, bytes.len(), limits)
}

/// The payload bound the encoder applies too: the configured limit, at most the ceiling.
fn check_payload(envelope: Envelope, len: usize, limits: &Limits) -> Result<Envelope, DecodeError> {
    let max = limits.max_payload_bytes.min(PAYLOAD_BYTES_CEILING);
    if envelope.payload.len() > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(envelope)
}

/// Reads what [`write_body`] writes: the whole body, or an error naming the field that is
/// wrong. It accepts exactly what `bincode::serde` decoding an [`Envelope`] accepts (a
/// property test compares the two on arbitrary and mutated bytes), with one check more: an
/// HLC id of 0, which no clock issues, is refused.
fn read_body(body: &[u8]) -> Result<Envelope, DecodeError> {
    let mut r = Reader { rest: body };
    let origin = r.str("origin").and_then(|s| NodeId::parse(s).map_err(name_error))?;
    let incarnation = Incarnation::from_raw(r.varint_u64("incarnation")?);
    let stream = r.str("stream").and_then(|s| StreamName::parse(s).map_err(name_error))?;
    let seq = r.varint_u64("seq").and_then(|v| Seq::new(v).ok_or_else(|| malformed("seq is 0")))?;
    let kind = r.kind()?;
    let time = r.varint_u64("time")?;
    let clock = u128::from_le_bytes(r.array("clock id")?);
    r.after_clock(EnvelopeId { origin, incarnation, stream, seq }, kind, time, clock)
}

fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(what.into())
}

fn name_error(e: crate::model::NameError) -> DecodeError {
    malformed(e.to_string())
}

/// The bytes of a body not read yet.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(malformed(format!("{what}: {n} bytes needed, {} left", self.rest.len())));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn byte(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A bincode varint whose marker byte is at most `widest` (252 for a `u32`, 253 for a
    /// `u64`, 254 for a `u128`). Like bincode, it takes a wider form than needed.
    fn varint(&mut self, what: &str, widest: u8) -> Result<u128, DecodeError> {
        let first = self.byte(what)?;
        if first > widest {
            return Err(malformed(format!("{what}: integer marker {first} is not allowed here")));
        }
        Ok(match first {
            0..=250 => u128::from(first),
            251 => u128::from(u16::from_le_bytes(self.array(what)?)),
            252 => u128::from(u32::from_le_bytes(self.array(what)?)),
            253 => u128::from(u64::from_le_bytes(self.array(what)?)),
            _ => u128::from_le_bytes(self.array(what)?),
        })
    }

    fn varint_u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        // At most 253: the value fits in 64 bits.
        self.varint(what, 253).map(|v| v as u64)
    }

    /// A length-prefixed run of bytes, checked against what is left before it is taken.
    fn run(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint_u64(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.take(len, what)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.run(what)?).map_err(|e| malformed(format!("{what}: not UTF-8 ({e})")))
    }

    fn option(&mut self, what: &str) -> Result<Option<u64>, DecodeError> {
        match self.byte(what)? {
            0 => Ok(None),
            1 => self.varint_u64(what).map(Some),
            tag => Err(malformed(format!("{what}: option tag {tag} is neither 0 nor 1"))),
        }
    }

    fn kind(&mut self) -> Result<Kind, DecodeError> {
        Ok(match self.varint("kind", 252)? {
            0 => Kind::Reading,
            1 => Kind::DecisionRequest,
            2 => Kind::Decision,
            3 => Kind::Command,
            4 => Kind::Escalation,
            5 => Kind::Event,
            other => return Err(malformed(format!("kind: unknown variant {other}"))),
        })
    }

    /// The fields [`write_after_clock`] writes, then the end of the input.
    fn after_clock(&mut self, id: EnvelopeId, kind: Kind, time: u64, clock: u128) -> Result<Envelope, DecodeError> {
        let clock = uhlc::ID::try_from(clock).map_err(|_| malformed("clock id is 0"))?;
        let budget_us = self.option("budget_us")?;
        let priority = Priority(self.byte("priority")?);
        let trace_id = self.varint("trace id", 254)?;
        let parent = self.option("trace parent")?;
        let payload_type = self.str("payload type").and_then(|s| PayloadType::parse(s).map_err(name_error))?;
        let payload = self.run("payload")?.to_vec();
        if !self.rest.is_empty() {
            return Err(malformed(format!("{} trailing bytes at the end", self.rest.len())));
        }
        Ok(Envelope {
            id,
            kind,
            hlc: HlcTime::from_uhlc(uhlc::Timestamp::new(uhlc::NTP64(time), clock)),
            budget_us,
            priority,
            trace: Trace { trace_id, parent },
            payload_type,
            payload,
        })
    }
}

/// Largest allocation limit [`decode_bounded`] uses.
pub(crate) const CLAIM_LIMIT_MAX: usize = 1 << 26;

pub(crate) enum BoundedError {
    TooLarge(usize),
    Malformed(String),
}

/// Decodes a whole bincode (standard config) body as `T`, letting bincode claim (allocate)
/// at most `claims` bytes, rounded up to a power of two, and at most [`CLAIM_LIMIT_MAX`].
pub(crate) fn decode_bounded<T: serde::de::DeserializeOwned>(body: &[u8], claims: usize) -> Result<T, BoundedError> {
    macro_rules! with_limit_for {
        ($n:expr; $($bits:literal),*) => {
            match $n {
                $(n if n <= (1usize << $bits) => decode_limited::<T, { 1usize << $bits }>(body),)*
                // Not reached while `claims` is clamped to the largest limit (below).
                n => Err(BoundedError::TooLarge(n)),
            }
        };
    }
    with_limit_for!(claims.min(CLAIM_LIMIT_MAX); 9, 10, 12, 14, 16, 18, 20, 22, 24, 26)
}

fn decode_limited<T: serde::de::DeserializeOwned, const LIMIT: usize>(body: &[u8]) -> Result<T, BoundedError> {
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config().with_limit::<LIMIT>()).map_err(|e| BoundedError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(BoundedError::Malformed(format!("{} trailing bytes at the end", body.len() - used)));
    }
    Ok(value)
}

/// serde glue so that byte vectors are encoded as one length-prefixed run of bytes (bincode
/// reads them in one go, checking the length against its limit first) rather than as a
/// sequence of `u8` values.
pub(crate) mod bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Formats without a bytes type (JSON) give a sequence; grow as elements come.
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    fn sample(payload: Vec<u8>) -> Envelope {
        let hlc = uhlc::HLC::default();
        Envelope {
            id: EnvelopeId {
                origin: NodeId::new("edge-1").unwrap(),
                incarnation: Incarnation::from_raw(0xdead_beef),
                stream: StreamName::new("readings/line-3").unwrap(),
                seq: Seq::new(42).unwrap(),
            },
            kind: Kind::Reading,
            hlc: HlcTime::from_uhlc(hlc.new_timestamp()),
            budget_us: Some(20_000),
            priority: Priority::HIGH,
            trace: Trace { trace_id: 7, parent: Some(3) },
            payload_type: PayloadType::new("strata.reading/1").unwrap(),
            payload,
        }
    }

    fn cases(default: u32) -> u32 {
        // STRATA_FUZZ_CASES raises the count for longer local runs.
        std::env::var("STRATA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    fn name_strategy(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[a-z0-9_-]{{1,{max}}}")).unwrap()
    }

    fn stream_strategy() -> impl Strategy<Value = StreamName> {
        proptest::collection::vec(proptest::string::string_regex("[a-z0-9_-][a-z0-9_.-]{0,20}").unwrap(), 1..5).prop_filter_map("valid stream", |parts| {
            let s = parts.join("/");
            StreamName::new(s).ok()
        })
    }

    fn kind_strategy() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Reading), Just(Kind::DecisionRequest), Just(Kind::Decision), Just(Kind::Command), Just(Kind::Escalation), Just(Kind::Event),]
    }

    prop_compose! {
        fn envelope_strategy()(
            origin in name_strategy(64),
            incarnation in any::<u64>(),
            stream in stream_strategy(),
            seq in 1u64..,
            kind in kind_strategy(),
            time in any::<u64>(),
            clock in 1u128..,
            budget_us in any::<Option<u64>>(),
            priority in any::<u8>(),
            trace_id in any::<u128>(),
            parent in any::<Option<u64>>(),
            payload_type in proptest::string::string_regex("[!-~]{1,128}").unwrap(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) -> Envelope {
            let id = uhlc::ID::try_from(clock).unwrap();
            Envelope {
                id: EnvelopeId {
                    origin: NodeId::new(origin).unwrap(),
                    incarnation: Incarnation::from_raw(incarnation),
                    stream,
                    seq: Seq::new(seq).unwrap(),
                },
                kind,
                hlc: HlcTime::from_uhlc(uhlc::Timestamp::new(uhlc::NTP64(time), id)),
                budget_us,
                priority: Priority(priority),
                trace: Trace { trace_id, parent },
                payload_type: PayloadType::new(payload_type).unwrap(),
                payload,
            }
        }
    }

    /// What `bincode::serde` writes for `envelope`: the reference [`write_body`] matches.
    fn serde_encoded(envelope: &Envelope) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        bincode::serde::encode_into_std_write(envelope, &mut out, config()).unwrap();
        out
    }

    #[test]
    fn the_encoder_writes_what_bincode_serde_writes_at_every_varint_boundary() {
        let mut e = sample(vec![9; 300]);
        for v in [0u64, 1, 250, 251, 255, 65_535, 65_536, u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX - 1, u64::MAX] {
            e.id.incarnation = Incarnation::from_raw(v);
            e.id.seq = Seq::new(v.max(1)).unwrap();
            e.budget_us = Some(v);
            e.trace = Trace { trace_id: u128::from(v) << 64 | u128::from(v), parent: Some(v) };
            e.hlc = HlcTime::from_uhlc(uhlc::Timestamp::new(uhlc::NTP64(v), *e.hlc.as_uhlc().get_id()));
            assert_eq!(encode(&e, &Limits::default()).unwrap(), serde_encoded(&e), "at {v}");
        }
        for kind in [Kind::Reading, Kind::DecisionRequest, Kind::Decision, Kind::Command, Kind::Escalation, Kind::Event] {
            e.kind = kind;
            e.budget_us = None;
            e.trace.parent = None;
            assert_eq!(encode(&e, &Limits::default()).unwrap(), serde_encoded(&e), "{kind:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(2_000)))]
        #[test]
        fn the_encoder_writes_what_bincode_serde_writes(envelope in envelope_strategy()) {
            prop_assert_eq!(encode(&envelope, &Limits::default()).unwrap(), serde_encoded(&envelope));
        }

        #[test]
        fn round_trip(envelope in envelope_strategy()) {
            let limits = Limits::default();
            let bytes = encode(&envelope, &limits).unwrap();
            prop_assert!(bytes.len() <= limits.max_envelope_bytes());
            prop_assert_eq!(decode(&bytes, &limits).unwrap(), envelope);
        }
    }

    proptest! {
        // 60,000 arbitrary byte strings per run: with the mutation test below, well over
        // the 100,000 inputs per CI run that the fuzz-safety acceptance asks for.
        #![proptest_config(ProptestConfig::with_cases(cases(60_000)))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, &Limits::default());
            // The same bytes behind a valid version byte reach the bincode decoder.
            let mut versioned = vec![FORMAT_VERSION];
            versioned.extend_from_slice(&bytes);
            let _ = decode(&versioned, &Limits::default());
        }
    }

    /// `envelope` encoded, then each `(index, value)` of `flips` written over one of its bytes.
    fn mutated(envelope: &Envelope, flips: Vec<(prop::sample::Index, u8)>) -> Vec<u8> {
        let mut bytes = encode(envelope, &Limits::default()).unwrap();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(50_000)))]
        #[test]
        fn mutated_envelopes_never_panic(
            envelope in envelope_strategy(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let limits = Limits::default();
            let bytes = mutated(&envelope, flips);
            if let Ok(decoded) = decode(&bytes, &limits) {
                // Whatever decodes is valid by construction: names passed their checks.
                prop_assert!(StreamName::new(decoded.id.stream.as_str()).is_ok());
                prop_assert!(NodeId::new(decoded.id.origin.as_str()).is_ok());
            }
            // Any prefix of mutated bytes: the property is that decoding returns.
            let _ = decode(&bytes[..cut.index(bytes.len())], &limits);
        }
    }

    /// What `bincode::serde` decodes from `body`: the reference the hand-written decoder
    /// follows.
    fn serde_decoded(body: &[u8]) -> Option<Envelope> {
        decode_bounded::<Envelope>(body, body.len() + 256).ok()
    }

    /// The hand-written decoder accepts what serde accepts, with the same value, and
    /// refuses what serde refuses; the one exception is a clock id of 0, which it refuses.
    fn agrees_with_serde(body: &[u8]) -> Result<(), TestCaseError> {
        let ours = read_body(body);
        match serde_decoded(body) {
            Some(theirs) if u128::from_le_bytes(theirs.hlc.as_uhlc().get_id().to_le_bytes()) == 0 => {
                prop_assert_eq!(ours, Err(DecodeError::Malformed("clock id is 0".into())));
            }
            theirs => prop_assert_eq!(ours.ok(), theirs, "body {:?}", body),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(20_000)))]
        #[test]
        fn the_decoder_agrees_with_bincode_serde_on_mutated_envelopes(
            envelope in envelope_strategy(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = mutated(&envelope, flips);
            agrees_with_serde(&bytes[1..])?;
            agrees_with_serde(&bytes[1..1 + cut.index(bytes.len())])?;
        }

        #[test]
        fn the_decoder_agrees_with_bincode_serde_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            agrees_with_serde(&bytes)?;
        }
    }

    #[test]
    fn the_decoder_takes_wider_integer_forms_as_bincode_does_and_refuses_clock_id_0() {
        let e = sample(vec![1, 2, 3]);
        let mut id = Vec::new();
        write_id(&mut id, &e.id);
        let full = encode(&e, &Limits::default()).unwrap();
        // The seq (42, one byte, last of the id) written as a u16, a u32 and a u64.
        for wide in [vec![251, 42, 0], vec![252, 42, 0, 0, 0], vec![253, 42, 0, 0, 0, 0, 0, 0, 0]] {
            let mut body = id[..id.len() - 1].to_vec();
            body.extend_from_slice(&wide);
            body.extend_from_slice(&full[1 + id.len()..]);
            assert_eq!(serde_decoded(&body).as_ref(), Some(&e));
            assert_eq!(read_body(&body), Ok(e.clone()));
        }
        // A u128 form is not allowed for a u64.
        let mut body = id[..id.len() - 1].to_vec();
        body.push(254);
        body.extend_from_slice(&42u128.to_le_bytes());
        body.extend_from_slice(&full[1 + id.len()..]);
        assert_eq!(serde_decoded(&body), None);
        assert_eq!(read_body(&body), Err(DecodeError::Malformed("seq: integer marker 254 is not allowed here".into())));
        // The kind (a variant index, a u32 to bincode; the byte after the id): Escalation (4)
        // as a u16 and a u32, but not as a u64.
        let with_kind = |wide: &[u8]| {
            let mut body = id.clone();
            body.extend_from_slice(wide);
            body.extend_from_slice(&full[1 + id.len() + 1..]);
            body
        };
        let escalation = Envelope { kind: Kind::Escalation, ..e.clone() };
        for wide in [&[251u8, 4, 0][..], &[252, 4, 0, 0, 0]] {
            let body = with_kind(wide);
            assert_eq!(serde_decoded(&body).as_ref(), Some(&escalation));
            assert_eq!(read_body(&body), Ok(escalation.clone()));
        }
        let body = with_kind(&[253, 4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(serde_decoded(&body), None);
        assert_eq!(read_body(&body), Err(DecodeError::Malformed("kind: integer marker 253 is not allowed here".into())));
        for unknown in [&[6u8][..], &[251, 0, 1]] {
            assert_eq!(serde_decoded(&with_kind(unknown)), None);
            assert!(read_body(&with_kind(unknown)).is_err());
        }
        // The clock id: the 16 bytes after kind and time.
        let mut body = full[1..].to_vec();
        let clock_at = id.len() + 1 + {
            let mut t = Vec::new();
            put_varint(&mut t, e.hlc.as_uhlc().get_time().0);
            t.len()
        };
        body[clock_at..clock_at + 16].fill(0);
        assert!(serde_decoded(&body).is_some(), "serde takes a zero clock id");
        assert_eq!(read_body(&body), Err(DecodeError::Malformed("clock id is 0".into())));
    }

    /// `envelope` with the HLC id of its origin's own clock.
    fn with_own_clock(mut envelope: Envelope) -> Envelope {
        let time = envelope.hlc.as_uhlc().get_time().0;
        let id = uhlc::ID::try_from(own_clock_id(envelope.id.incarnation.get())).unwrap();
        envelope.hlc = HlcTime::from_uhlc(uhlc::Timestamp::new(uhlc::NTP64(time), id));
        envelope
    }

    fn record(envelope: &Envelope) -> Vec<u8> {
        let mut out = vec![0xAA; 3];
        encode_record_into(envelope, &Limits::default(), &mut out).unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

        #[test]
        fn records_round_trip_given_their_id(envelope in envelope_strategy(), own in any::<bool>()) {
            let envelope = if own { with_own_clock(envelope) } else { envelope };
            let bytes = record(&envelope);
            let own_clock = u128::from_le_bytes(envelope.hlc.as_uhlc().get_id().to_le_bytes()) == own_clock_id(envelope.id.incarnation.get());
            prop_assert_eq!(bytes[0], if own_clock { RECORD_OWN_CLOCK } else { RECORD_CLOCK_ID });
            prop_assert_eq!(decode_record(&envelope.id, &bytes, &Limits::default()), Ok(envelope));
        }

        #[test]
        fn arbitrary_records_never_panic(
            form in prop_oneof![Just(RECORD_OWN_CLOCK), Just(RECORD_CLOCK_ID), Just(FORMAT_VERSION), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = vec![form];
            bytes.extend_from_slice(&rest);
            let id = sample(vec![]).id;
            let _ = decode_record(&id, &bytes, &Limits::default());
        }
    }

    #[test]
    fn a_record_leaves_out_its_id_and_its_own_clock_id() {
        let envelope = with_own_clock(sample(vec![7; 100]));
        let mut id = Vec::new();
        write_id(&mut id, &envelope.id);
        let full = encode(&envelope, &Limits::default()).unwrap();
        let own = record(&envelope);
        assert_eq!(own[0], RECORD_OWN_CLOCK);
        // The form byte stands where the version byte stood.
        assert_eq!(full.len() - own.len(), id.len() + 16);
        let other = sample(vec![7; 100]);
        let kept = record(&other);
        assert_eq!(kept[0], RECORD_CLOCK_ID);
        assert_eq!(full.len() - kept.len(), id.len());
    }

    #[test]
    fn every_truncated_record_is_an_error_and_a_whole_envelope_still_reads() {
        let limits = Limits::default();
        for envelope in [sample(vec![1, 2, 3]), with_own_clock(sample(vec![1, 2, 3]))] {
            let bytes = record(&envelope);
            for n in 0..bytes.len() {
                let err = decode_record(&envelope.id, &bytes[..n], &limits).unwrap_err();
                assert!(matches!(err, DecodeError::Malformed(_)), "prefix {n}: {err:?}");
            }
            // A record of a version 1 store: the whole envelope.
            assert_eq!(decode_record(&envelope.id, &encode(&envelope, &limits).unwrap(), &limits), Ok(envelope));
        }
        let err = decode_record(&sample(vec![]).id, &[0x7F, 0, 0], &limits).unwrap_err();
        assert_eq!(err.to_string(), "malformed envelope: unknown record form 0x7f");
        let big = Limits { max_payload_bytes: 8 };
        let err = decode_record(&sample(vec![]).id, &record(&sample(vec![0; 2000])), &big).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let limits = Limits::default();
        let bytes = encode(&sample(vec![1, 2, 3, 4, 5]), &limits).unwrap();
        for n in 0..bytes.len() {
            let err = decode(&bytes[..n], &limits).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed(_)), "prefix {n}: {err:?}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer, &limits), Err(DecodeError::Malformed("1 trailing bytes at the end".into())));
    }

    #[test]
    fn unknown_version() {
        let limits = Limits::default();
        let mut bytes = encode(&sample(vec![]), &limits).unwrap();
        bytes[0] = 9;
        assert_eq!(decode(&bytes, &limits), Err(DecodeError::UnknownVersion { found: 9, supported: 1 }));
    }

    #[test]
    fn too_large_is_refused_before_decoding() {
        let limits = Limits { max_payload_bytes: 100 };
        let big = vec![0u8; limits.max_envelope_bytes() + 1];
        assert_eq!(decode(&big, &limits), Err(DecodeError::TooLarge { len: big.len(), max: limits.max_envelope_bytes() }));
        assert_eq!(encode(&sample(vec![0; 101]), &limits), Err(EncodeError::PayloadTooLarge { len: 101, max: 100 }));
        // A payload that fits the envelope bound but not the payload bound is refused too.
        let bytes = encode(&sample(vec![0; 150]), &Limits::default()).unwrap();
        assert!(matches!(decode(&bytes, &limits), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn forged_length_does_not_allocate() {
        // Encode an envelope with an empty payload, then replace the payload's length
        // (the last byte, a varint 0) by a varint claiming 2^56 bytes. If the decoder
        // believed it, the allocation would abort the test process.
        // A claim within the configured payload limit but beyond the input is refused too:
        // every length is checked against the bytes left before anything is copied.
        let limits = Limits::default();
        for claimed in [1u64 << 56, 900_000] {
            let mut bytes = encode(&sample(vec![]), &limits).unwrap();
            assert_eq!(bytes.pop(), Some(0));
            bytes.push(253); // bincode varint: u64 follows
            bytes.extend_from_slice(&claimed.to_le_bytes());
            let err = decode(&bytes, &limits).unwrap_err();
            assert_eq!(err, DecodeError::Malformed(format!("payload: {claimed} bytes needed, 0 left")), "claimed {claimed}");
        }
    }

    #[test]
    fn invalid_names_inside_valid_bincode_are_malformed() {
        // Encode the same structure with an invalid stream name via a mirror type.
        #[derive(serde::Serialize)]
        struct RawId<'a> {
            origin: &'a str,
            incarnation: u64,
            stream: &'a str,
            seq: u64,
        }
        let raw = RawId { origin: "edge-1", incarnation: 1, stream: "Bad Name", seq: 1 };
        let mut bytes = vec![FORMAT_VERSION];
        bincode::serde::encode_into_std_write(&raw, &mut bytes, config()).unwrap();
        let err = decode(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(err.contains("not a valid stream name"), "{err}");
    }
}
