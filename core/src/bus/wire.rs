//! Messages of the replication protocol other than envelopes: heads (what a node holds)
//! and replay batches, each a version byte + bincode-2 body like envelopes, decoded without
//! panicking and within a size limit; and the parameters of a replay request.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::log::StreamKey;
use crate::model::{Incarnation, NodeId, StreamName, Tier};

pub const WIRE_VERSION: u8 = 1;

/// Largest heads or replay message accepted, in bytes. A replay reply is cut to stay under
/// it whatever `replay_batch_len_max` says.
pub const MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Room kept in a replay reply for its own framing, and what each record adds to it.
pub const REPLY_FRAMING_BYTES: usize = 1024;
pub const REPLY_RECORD_OVERHEAD: usize = 8;

/// Largest payload a record may have and still be replayed: alone in a reply, with the
/// largest envelope header. `log.payload_bytes_max` may not be set above it, or a record
/// that went out live could never be replayed to a node that missed it.
pub const REPLICABLE_PAYLOAD_BYTES_MAX: usize = MESSAGE_BYTES_MAX - REPLY_FRAMING_BYTES - REPLY_RECORD_OVERHEAD - 1 - crate::codec::HEADER_BYTES_MAX;

/// Most stream entries in one heads message; a node with more sends several.
pub const HEADS_PER_MESSAGE_MAX: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("unknown message version {0}")]
    UnknownVersion(u8),
    #[error("message of {len} bytes is larger than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// What one node holds of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub origin: NodeId,
    pub incarnation: Incarnation,
    pub stream: StreamName,
    /// Everything up to here is held (durably).
    pub watermark: u64,
}

impl Head {
    pub fn key(&self) -> StreamKey {
        StreamKey { origin: self.origin.clone(), incarnation: self.incarnation, stream: self.stream.clone() }
    }
}

/// Published periodically by every node on `strata/heads/<node>`: its holdings. For an
/// origin they are acknowledgements (retention `keep_until_acked`); for everyone they say
/// who can answer a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heads {
    pub node: NodeId,
    pub tier: Tier,
    pub heads: Vec<Head>,
}

/// One reply to a replay request: consecutive encoded envelopes of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayBatch {
    pub records: Vec<ByteVec>,
}

/// A byte vector encoded as one length-prefixed run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteVec(#[serde(with = "crate::codec::bytes")] pub Vec<u8>);

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    bincode::serde::encode_into_std_write(message, &mut out, bincode::config::standard()).expect("encoding into a Vec cannot fail");
    out
}

/// Decodes untrusted bytes; never panics. bincode may allocate at most 16 times the input's
/// length (integers claim their full width however short their encoding), so a forged length
/// cannot make it reserve a huge buffer.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(WireError::TooLarge { len: bytes.len(), max: MESSAGE_BYTES_MAX });
    }
    let (&version, body) = bytes.split_first().ok_or_else(|| WireError::Malformed("empty".into()))?;
    if version != WIRE_VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    crate::codec::decode_bounded(body, body.len().saturating_mul(16) + 256).map_err(|e| match e {
        crate::codec::BoundedError::TooLarge(len) => WireError::TooLarge { len, max: crate::codec::CLAIM_LIMIT_MAX },
        crate::codec::BoundedError::Malformed(m) => WireError::Malformed(m),
    })
}

/// First byte of a live frame: several encoded envelopes of one stream in one sample on
/// `strata/s/<origin>/<stream>`. Never an envelope's format version (those are small), so a
/// receiver tells a frame from a single envelope by its first byte.
pub const LIVE_FRAME_VERSION: u8 = 0x81;

/// Bytes a live frame adds per record (its length) and in all (version and count).
pub const LIVE_FRAME_RECORD_OVERHEAD: usize = 4;
pub const LIVE_FRAME_OVERHEAD: usize = 5;
/// No encoded envelope is shorter (checked by a test): a frame's records are at least this
/// long, so a forged count or empty records cannot make a small frame cost many records.
pub const LIVE_FRAME_RECORD_BYTES_MIN: usize = 16;

/// A live frame of `records` (each an encoded envelope): the version byte, the count (u32
/// little-endian), then each record's length (u32 little-endian) and bytes.
pub fn encode_live_frame(records: &[Vec<u8>]) -> Vec<u8> {
    let len = LIVE_FRAME_OVERHEAD + records.iter().map(|r| r.len() + LIVE_FRAME_RECORD_OVERHEAD).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(LIVE_FRAME_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// The records of a live frame (untrusted bytes; never panics).
pub fn decode_live_frame(bytes: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(WireError::TooLarge { len: bytes.len(), max: MESSAGE_BYTES_MAX });
    }
    let (&version, mut rest) = bytes.split_first().ok_or_else(|| WireError::Malformed("empty".into()))?;
    if version != LIVE_FRAME_VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    let take_u32 = |rest: &mut &[u8], what: &str| -> Result<usize, WireError> {
        let (n, tail) = rest.split_first_chunk::<4>().ok_or_else(|| WireError::Malformed(format!("live frame cut in its {what}")))?;
        *rest = tail;
        Ok(u32::from_le_bytes(*n) as usize)
    };
    let count = take_u32(&mut rest, "record count")?;
    // Every record takes at least its length and the shortest envelope: a forged count
    // cannot reserve much.
    if count > rest.len() / (LIVE_FRAME_RECORD_OVERHEAD + LIVE_FRAME_RECORD_BYTES_MIN) {
        return Err(WireError::Malformed(format!("live frame claims {count} records in {} bytes", rest.len())));
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let len = take_u32(&mut rest, "record length")?;
        if len > rest.len() {
            return Err(WireError::Malformed(format!("live frame record {i} claims {len} bytes, {} left", rest.len())));
        }
        if len < LIVE_FRAME_RECORD_BYTES_MIN {
            return Err(WireError::Malformed(format!("live frame record {i} has {len} bytes, fewer than any envelope")));
        }
        let (record, tail) = rest.split_at(len);
        records.push(record.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} bytes after the last record of a live frame", rest.len())));
    }
    Ok(records)
}

/// The parameters of a replay request for `strata/replay/<origin>/<stream>`:
/// `inc=<hex>;from=<seq>;to=<seq>;holder=<node id>`. Only `holder` answers, so a stream held
/// by several nodes is sent once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayParams {
    pub incarnation: Incarnation,
    pub from: u64,
    pub to: u64,
    pub holder: NodeId,
}

impl ReplayParams {
    pub fn to_params(&self) -> String {
        format!("inc={:x};from={};to={};holder={}", self.incarnation.get(), self.from, self.to, self.holder)
    }

    pub fn parse(params: &str) -> Result<ReplayParams, String> {
        let (mut inc, mut from, mut to, mut holder) = (None, None, None, None);
        for part in params.split(['&', ';']).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("parameter {part:?} has no value"))?;
            match k {
                "inc" => inc = Some(u64::from_str_radix(v, 16).map_err(|_| format!("inc {v:?} is not hex"))?),
                "from" => from = Some(v.parse::<u64>().map_err(|_| format!("from {v:?} is not a number"))?),
                "to" => to = Some(v.parse::<u64>().map_err(|_| format!("to {v:?} is not a number"))?),
                "holder" => holder = Some(NodeId::new(v).map_err(|e| e.to_string())?),
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        let p = ReplayParams {
            incarnation: Incarnation::from_raw(inc.ok_or("missing inc")?),
            from: from.ok_or("missing from")?,
            to: to.ok_or("missing to")?,
            holder: holder.ok_or("missing holder")?,
        };
        if p.from == 0 || p.from > p.to {
            return Err(format!("empty or invalid range {}..={}", p.from, p.to));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_round_trip_and_garbage_is_an_error() {
        let heads = Heads {
            node: NodeId::new("fog-1").unwrap(),
            tier: Tier::Fog,
            heads: vec![Head {
                origin: NodeId::new("edge-1").unwrap(),
                incarnation: Incarnation::from_raw(9),
                stream: StreamName::new("readings/a").unwrap(),
                watermark: 42,
            }],
        };
        assert_eq!(decode::<Heads>(&encode(&heads)).unwrap(), heads);
        assert!(matches!(decode::<Heads>(&[WIRE_VERSION, 200, 1]), Err(WireError::Malformed(_))));
        assert_eq!(decode::<Heads>(&[7]), Err(WireError::UnknownVersion(7)));
    }

    /// A message of the largest size allowed decodes: its allocation bound (16 times its
    /// length) is over the decoder's ceiling, which is then the bound, not a refusal.
    #[test]
    fn a_message_of_the_largest_size_decodes() {
        // Version byte, one-byte record count, five-byte length of the record.
        let batch = ReplayBatch { records: vec![ByteVec(vec![7; MESSAGE_BYTES_MAX - 7])] };
        let bytes = encode(&batch);
        assert_eq!(bytes.len(), MESSAGE_BYTES_MAX);
        assert_eq!(decode::<ReplayBatch>(&bytes).unwrap(), batch);
        let mut over = bytes;
        over.push(0);
        assert_eq!(decode::<ReplayBatch>(&over), Err(WireError::TooLarge { len: MESSAGE_BYTES_MAX + 1, max: MESSAGE_BYTES_MAX }));
    }

    #[test]
    fn live_frames_round_trip_and_forged_ones_are_errors() {
        let records = vec![vec![1u8; 16], vec![2; 20], vec![9; 300]];
        let frame = encode_live_frame(&records);
        assert_eq!(frame.len(), LIVE_FRAME_OVERHEAD + 336 + 3 * LIVE_FRAME_RECORD_OVERHEAD);
        assert_eq!(decode_live_frame(&frame), Ok(records));
        // The smallest envelope there can be is not shorter than a frame's records must be.
        let smallest = crate::Envelope {
            id: crate::EnvelopeId {
                origin: NodeId::new("a").unwrap(),
                incarnation: Incarnation::from_raw(1),
                stream: StreamName::new("s").unwrap(),
                seq: crate::Seq::new(1).unwrap(),
            },
            kind: crate::Kind::Event,
            hlc: crate::HlcTime::from_uhlc(uhlc::HLC::default().new_timestamp()),
            budget_us: None,
            priority: crate::Priority::NORMAL,
            trace: crate::Trace::default(),
            payload_type: crate::PayloadType::new("a").unwrap(),
            payload: Vec::new(),
        };
        let bytes = crate::codec::encode(&smallest, &crate::codec::Limits::STORED).unwrap();
        assert!(bytes.len() >= LIVE_FRAME_RECORD_BYTES_MIN, "{} bytes", bytes.len());
        assert_ne!(LIVE_FRAME_VERSION, crate::codec::FORMAT_VERSION, "a frame is told from an envelope by its first byte");
        assert_eq!(decode_live_frame(&[crate::codec::FORMAT_VERSION, 0, 0, 0, 0]), Err(WireError::UnknownVersion(crate::codec::FORMAT_VERSION)));
        let error = |bytes: &[u8]| match decode_live_frame(bytes) {
            Err(WireError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(error(&[LIVE_FRAME_VERSION, 1]), "live frame cut in its record count");
        assert_eq!(error(&[LIVE_FRAME_VERSION, 255, 255, 255, 255, 0, 0, 0, 0]), "live frame claims 4294967295 records in 4 bytes");
        // Almost a million empty records fit in 4 MiB of lengths: refused.
        let mut empties = vec![LIVE_FRAME_VERSION];
        empties.extend_from_slice(&((1u32 << 20) - 2).to_le_bytes());
        empties.extend(std::iter::repeat_n(0u8, (4 << 20) - 8));
        assert_eq!(error(&empties), "live frame claims 1048574 records in 4194296 bytes");
        assert_eq!(error(&encode_live_frame(&[vec![1; 40], Vec::new()])), "live frame record 1 has 0 bytes, fewer than any envelope");
        let mut cut = vec![LIVE_FRAME_VERSION, 1, 0, 0, 0, 99, 0, 0, 0];
        cut.extend([1; 20]);
        assert_eq!(error(&cut), "live frame record 0 claims 99 bytes, 20 left");
        assert_eq!(error(&[LIVE_FRAME_VERSION, 0, 0, 0, 0, 7]), "1 bytes after the last record of a live frame");
    }

    proptest! {
        #[test]
        fn live_frame_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut framed = vec![LIVE_FRAME_VERSION];
            framed.extend_from_slice(&bytes);
            let _ = decode_live_frame(&framed);
            let _ = decode_live_frame(&bytes);
        }
    }

    #[test]
    fn replay_params() {
        let p = ReplayParams { incarnation: Incarnation::from_raw(0xab), from: 5, to: 9, holder: NodeId::new("fog-1").unwrap() };
        assert_eq!(ReplayParams::parse(&p.to_params()), Ok(p));
        assert!(ReplayParams::parse("inc=1;from=5;to=4;holder=a").unwrap_err().contains("invalid range"));
        assert!(ReplayParams::parse("inc=1;from=5;to=9").unwrap_err().contains("missing holder"));
        assert!(ReplayParams::parse("inc=zz;from=5;to=9;holder=a").unwrap_err().contains("not hex"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Heads>(&bytes);
            let _ = decode::<ReplayBatch>(&bytes);
            let mut v = vec![WIRE_VERSION];
            v.extend_from_slice(&bytes);
            let _ = decode::<Heads>(&v);
            let _ = decode::<ReplayBatch>(&v);
        }
    }
}
