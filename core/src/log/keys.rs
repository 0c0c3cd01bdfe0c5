//! Byte layout of keys and small values in the store. Pure; shared by every backend.
//!
//! A stream prefix is `len(origin) origin incarnation(u64 BE) len(stream) stream`: the
//! length bytes make prefixes of different streams distinct (no prefix of one is the prefix
//! of another), and a record key appends `seq` as u64 big-endian, so iterating a prefix
//! visits a stream's records in seq order.

use crate::config::Name;
use crate::model::{Incarnation, NodeId, Seq, StreamName};

use super::StreamKey;

pub(crate) fn stream_prefix(key: &StreamKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + key.origin.as_str().len() + 8 + key.stream.as_str().len() + 8);
    push_prefix(&mut out, key);
    out
}

fn push_prefix(out: &mut Vec<u8>, key: &StreamKey) {
    push_str(out, key.origin.as_str());
    out.extend_from_slice(&key.incarnation.get().to_be_bytes());
    push_str(out, key.stream.as_str());
}

pub(crate) fn record_key(key: &StreamKey, seq: u64) -> Vec<u8> {
    let mut out = Vec::new();
    record_key_into(&mut out, key, seq);
    out
}

/// [`record_key`] into a reused buffer.
pub(crate) fn record_key_into(out: &mut Vec<u8>, key: &StreamKey, seq: u64) {
    out.clear();
    push_prefix(out, key);
    out.extend_from_slice(&seq.to_be_bytes());
}

/// The seq of a record key whose stream prefix is `prefix`; `None` if the key is not of it.
pub(crate) fn record_seq(prefix: &[u8], key: &[u8]) -> Option<Seq> {
    let rest = key.strip_prefix(prefix)?;
    let bytes: [u8; 8] = rest.try_into().ok()?;
    Seq::new(u64::from_be_bytes(bytes))
}

/// Parses a stream prefix (as written by [`stream_prefix`]), returning the key and the
/// remaining bytes.
pub(crate) fn parse_stream_prefix(bytes: &[u8]) -> Option<(StreamKey, &[u8])> {
    let (origin, rest) = take_str(bytes)?;
    let (inc, rest) = rest.split_at_checked(8)?;
    let (stream, rest) = take_str(rest)?;
    let key = StreamKey {
        origin: NodeId::new(origin).ok()?,
        incarnation: Incarnation::from_raw(u64::from_be_bytes(inc.try_into().ok()?)),
        stream: StreamName::new(stream).ok()?,
    };
    Some((key, rest))
}

pub(crate) fn cursor_key(consumer: &Name, key: &StreamKey) -> Vec<u8> {
    let mut out = Vec::new();
    push_str(&mut out, consumer.as_str());
    out.extend_from_slice(&stream_prefix(key));
    out
}

pub(crate) fn parse_cursor_key(bytes: &[u8]) -> Option<(Name, StreamKey)> {
    let (consumer, rest) = take_str(bytes)?;
    let (key, rest) = parse_stream_prefix(rest)?;
    rest.is_empty().then_some(())?;
    Some((Name::new(consumer).ok()?, key))
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("names are at most 128 bytes");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

fn take_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let (s, rest) = rest.split_at_checked(len as usize)?;
    Some((std::str::from_utf8(s).ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(origin: &str, inc: u64, stream: &str) -> StreamKey {
        StreamKey { origin: NodeId::new(origin).unwrap(), incarnation: Incarnation::from_raw(inc), stream: StreamName::new(stream).unwrap() }
    }

    #[test]
    fn record_keys_sort_by_seq_within_a_stream_and_never_mix_streams() {
        let a = key("e", 1, "a");
        let ab = key("e", 1, "a.b");
        let mut keys = [record_key(&a, 256), record_key(&ab, 1), record_key(&a, 2), record_key(&a, 1)];
        keys.sort();
        let pa = stream_prefix(&a);
        let seqs: Vec<u64> = keys.iter().filter_map(|k| record_seq(&pa, k)).map(Seq::get).collect();
        assert_eq!(seqs, vec![1, 2, 256]);
        assert!(!record_key(&ab, 1).starts_with(&pa), "prefix of 'a' must not match 'a.b'");
        let k9 = record_key(&a, 9);
        let (parsed, rest) = parse_stream_prefix(&k9).unwrap();
        assert_eq!(parsed, a);
        assert_eq!(rest, 9u64.to_be_bytes());
        let c = cursor_key(&Name::new("arbiter").unwrap(), &a);
        assert_eq!(parse_cursor_key(&c), Some((Name::new("arbiter").unwrap(), a)));
        assert_eq!(parse_cursor_key(&[200, 1]), None);
    }
}
