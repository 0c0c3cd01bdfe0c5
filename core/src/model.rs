//! The data model: identifiers, time, deadlines and the [`Envelope`].
//!
//! Pure data. Every type whose value has a precondition (a stream name's alphabet, a
//! sequence number that is never zero) can only be built valid, so the rest of Strata does
//! not re-validate. Deserialisation goes through the same constructors, so bytes from the
//! network or from disk cannot smuggle an invalid value in.
//!
//! Time comes in two kinds that are never mixed:
//! - [`MonoTime`]: microseconds on *this node's* monotonic clock. Deadlines live here.
//!   It is meaningless on another machine and is never put on the wire.
//! - [`HlcTime`]: a hybrid logical clock timestamp (the `uhlc` crate, the one Zenoh uses)
//!   that orders events causally across nodes. It is for ordering and postmortems, never
//!   for deciding whether something is late.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("{value:?} is not a valid {what}: it is empty")]
    Empty { what: &'static str, value: String },
    #[error("{value:?} is not a valid {what}: {len} bytes is longer than {max}")]
    TooLong { what: &'static str, value: String, len: usize, max: usize },
    #[error("{value:?} is not a valid {what}: character {ch:?} at byte {at} is not one of {allowed}")]
    BadChar { what: &'static str, value: String, ch: char, at: usize, allowed: &'static str },
    #[error("{value:?} is not a valid {what}: {reason}")]
    Shape { what: &'static str, value: String, reason: &'static str },
}

pub(crate) fn check_alphabet(what: &'static str, value: &str, max: usize, allowed: &'static str, ok: impl Fn(u8) -> bool) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what, value: value.to_owned() });
    }
    if value.len() > max {
        return Err(NameError::TooLong { what, value: value.to_owned(), len: value.len(), max });
    }
    if let Some((at, ch)) = value.char_indices().find(|&(_, c)| !c.is_ascii() || !ok(c as u8)) {
        return Err(NameError::BadChar { what, value: value.to_owned(), ch, at, allowed });
    }
    Ok(())
}

/// A node's stable identity: 1..=64 bytes of `[a-z0-9_-]`. Cheap to clone (shared).
///
/// It appears as one chunk of Zenoh key expressions (`strata/s/<node_id>/...`), so it
/// cannot hold `/` or wildcard characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub const LEN_MAX: usize = 64;

    pub fn new(value: impl Into<String>) -> Result<NodeId, NameError> {
        Self::parse(&value.into())
    }

    /// [`NodeId::new`] from a borrowed string, allocating only the shared one (a decoder's path).
    pub(crate) fn parse(value: &str) -> Result<NodeId, NameError> {
        Self::check(value)?;
        Ok(NodeId(value.into()))
    }

    fn check(value: &str) -> Result<(), NameError> {
        check_alphabet("node id", value, Self::LEN_MAX, "[a-z0-9_-]", |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stream's name: 1..=128 bytes of `[a-z0-9_./-]`, no leading or trailing `/`, no empty
/// segment (`a//b`) and no `..`.
///
/// Empty segments are refused because a stream name is embedded in Zenoh key expressions,
/// where empty chunks are invalid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct StreamName(Arc<str>);

impl StreamName {
    pub const LEN_MAX: usize = 128;

    pub fn new(value: impl Into<String>) -> Result<StreamName, NameError> {
        Self::parse(&value.into())
    }

    /// [`StreamName::new`] from a borrowed string, allocating only the shared one (a decoder's path).
    pub(crate) fn parse(value: &str) -> Result<StreamName, NameError> {
        Self::check(value)?;
        Ok(StreamName(value.into()))
    }

    fn check(value: &str) -> Result<(), NameError> {
        let what = "stream name";
        check_alphabet(what, value, Self::LEN_MAX, "[a-z0-9_./-]", |b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'/' | b'-'))?;
        let shape = |reason| Err(NameError::Shape { what, value: value.to_owned(), reason });
        if value.starts_with('/') {
            return shape("it starts with '/'");
        }
        if value.ends_with('/') {
            return shape("it ends with '/'");
        }
        if value.contains("//") {
            return shape("it has an empty segment ('//')");
        }
        if value.contains("..") {
            return shape("it contains '..'");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of a payload's schema and its version, e.g. `strata.reading/1`:
/// 1..=128 bytes of printable ASCII without spaces.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PayloadType(Arc<str>);

impl PayloadType {
    pub const LEN_MAX: usize = 128;

    pub fn new(value: impl Into<String>) -> Result<PayloadType, NameError> {
        Self::parse(&value.into())
    }

    /// [`PayloadType::new`] from a borrowed string, allocating only the shared one (a decoder's path).
    pub(crate) fn parse(value: &str) -> Result<PayloadType, NameError> {
        Self::check(value)?;
        Ok(PayloadType(value.into()))
    }

    fn check(value: &str) -> Result<(), NameError> {
        check_alphabet("payload type", value, Self::LEN_MAX, "printable ASCII without space", |b| b.is_ascii_graphic())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The conversions of a validated string newtype `$t(String)` or `$t(Arc<str>)` whose `new`
/// returns `Result<$t, $err>`. Deserialising goes through `TryFrom<String>` (derive it with
/// `#[serde(try_from = "String")]`), so decoding validates too.
macro_rules! string_newtype {
    ($err:ty: $($t:ident),*) => {$(
        impl TryFrom<String> for $t {
            type Error = $err;
            fn try_from(value: String) -> Result<Self, $err> {
                $t::new(value)
            }
        }
        impl From<$t> for String {
            fn from(value: $t) -> String {
                String::from(&*value.0)
            }
        }
        // By reference: encoding an envelope allocates nothing for its names.
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = $err;
            fn from_str(value: &str) -> Result<Self, $err> {
                $t::new(value)
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.0, f)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    )*};
}
pub(crate) use string_newtype;
string_newtype!(NameError: NodeId, StreamName, PayloadType);

/// A node's tier in the continuum, ordered by capability: `Edge < Fog < Cloud`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Edge,
    Fog,
    Cloud,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Edge, Tier::Fog, Tier::Cloud];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Fog => "fog",
            Tier::Cloud => "cloud",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position in a stream. Starts at 1; zero cannot be represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(NonZeroU64);

impl Seq {
    pub const FIRST: Seq = Seq(NonZeroU64::MIN);

    /// `None` for 0.
    pub const fn new(value: u64) -> Option<Seq> {
        match NonZeroU64::new(value) {
            Some(v) => Some(Seq(v)),
            None => None,
        }
    }

    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The next seq; `None` on overflow (after 2^64 - 1 records).
    pub fn next(self) -> Option<Seq> {
        self.0.checked_add(1).map(Seq)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A random 64-bit id created together with a node's store (see DESIGN.md, Vocabulary).
/// A node whose disk was wiped comes back with a new incarnation, so its new `seq 1` never
/// collides with the old one stored upstream. So does a store that may have lost acknowledged
/// records (left open under `log.sync = "interval"` or `"never"` across a machine restart):
/// its seqs go on under a new incarnation instead of naming other records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Incarnation(u64);

impl Incarnation {
    pub fn random() -> Incarnation {
        Incarnation(rand::random())
    }

    pub const fn from_raw(value: u64) -> Incarnation {
        Incarnation(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Identifies an envelope uniquely and forever.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EnvelopeId {
    pub origin: NodeId,
    pub incarnation: Incarnation,
    pub stream: StreamName,
    pub seq: Seq,
}

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}#{}", self.origin, self.stream, self.incarnation, self.seq)
    }
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    Reading,
    DecisionRequest,
    Decision,
    Command,
    Escalation,
    Event,
}

/// Urgency: higher is more urgent. Used to order work under load, never to drop data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Priority(pub u8);

impl Priority {
    pub const LOW: Priority = Priority(64);
    pub const NORMAL: Priority = Priority(128);
    pub const HIGH: Priority = Priority(192);
    pub const CRITICAL: Priority = Priority(255);
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

/// Causal trace context: every envelope produced while handling another names it as parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Trace {
    pub trace_id: u128,
    pub parent: Option<u64>,
}

/// A hybrid-logical-clock timestamp from the `uhlc` crate (the one Zenoh uses): physical
/// time in NTP64 format plus a logical counter in the low bits, and the id of the clock that
/// issued it. Totally ordered; consistent with causality across nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HlcTime(uhlc::Timestamp);

impl HlcTime {
    pub fn from_uhlc(ts: uhlc::Timestamp) -> HlcTime {
        HlcTime(ts)
    }

    pub fn as_uhlc(&self) -> &uhlc::Timestamp {
        &self.0
    }

    /// Physical part in RFC 3339 with nanoseconds, e.g. `2026-11-26T15:00:00.123456789Z`.
    pub fn rfc3339(&self) -> String {
        format!("{:#}", self.0.get_time())
    }

    /// Physical part as microseconds since the Unix epoch.
    pub fn unix_us(&self) -> u64 {
        self.0.get_time().to_duration().as_micros() as u64
    }

    /// Physical part as milliseconds since the Unix epoch (for display only).
    pub fn unix_ms(&self) -> u64 {
        self.0.get_time().to_duration().as_millis() as u64
    }
}

impl fmt::Display for HlcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An instant on this node's monotonic clock, in microseconds on it (a clock starts at
/// [`MonoClock::START`]; only differences mean anything).
/// Never leaves the node: see [`Deadline`] for how time crosses the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MonoTime(u64);

impl MonoTime {
    pub const ZERO: MonoTime = MonoTime(0);

    pub const fn from_micros(us: u64) -> MonoTime {
        MonoTime(us)
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(duration_us(d)))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: MonoTime) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reads this node's monotonic clock. The only place in the model that reads a clock;
/// pure modules (`route`, `mode`) take [`MonoTime`] as an argument instead.
///
/// It starts at [`MonoClock::START`], not at zero: a time before the clock was made (when a
/// reading of a backlog was taken, before a restart) is still a time on it, so a deadline or a
/// lateness counted from there is not cut short at the start.
#[derive(Debug, Clone, Copy)]
pub struct MonoClock {
    start: Instant,
}

impl MonoClock {
    /// The clock's first reading: 2^50 µs, about 35 years.
    pub const START: MonoTime = MonoTime(1 << 50);

    pub fn new() -> MonoClock {
        MonoClock { start: Instant::now() }
    }

    pub fn now(&self) -> MonoTime {
        MonoClock::START.saturating_add(self.start.elapsed())
    }
}

impl Default for MonoClock {
    fn default() -> Self {
        MonoClock::new()
    }
}

/// The instant by which a decision must be taken, on this node's monotonic clock.
///
/// On the wire a deadline travels as the *remaining budget* in µs at send time
/// ([`Deadline::budget_us`]); the receiver rebuilds it on its own clock, minus half the
/// measured round trip ([`Deadline::from_budget`]). Clocks of different machines are never
/// compared, so clock skew cannot make a late decision look timely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: MonoTime,
}

impl Deadline {
    pub fn at(at: MonoTime) -> Deadline {
        Deadline { at }
    }

    pub fn after(now: MonoTime, budget: Duration) -> Deadline {
        Deadline { at: now.saturating_add(budget) }
    }

    pub fn instant(self) -> MonoTime {
        self.at
    }

    /// Time left at `now`; `None` once the deadline has passed (or is exactly now).
    pub fn remaining(self, now: MonoTime) -> Option<Duration> {
        (self.at > now).then(|| self.at.saturating_since(now))
    }

    pub fn has_passed(self, now: MonoTime) -> bool {
        self.remaining(now).is_none()
    }

    /// The budget to put on the wire when sending at `now`; `None` if already passed —
    /// such a request must not be sent at all.
    pub fn budget_us(self, now: MonoTime) -> Option<u64> {
        self.remaining(now).map(duration_us)
    }

    /// Rebuilds a deadline received as `budget_us`, on the receiver's clock at `now`,
    /// charging half of the measured round trip `rtt` for the transit.
    pub fn from_budget(now: MonoTime, budget_us: u64, rtt: Duration) -> Deadline {
        let transit_us = duration_us(rtt) / 2;
        Deadline { at: MonoTime(now.0.saturating_add(budget_us.saturating_sub(transit_us))) }
    }
}

/// The unit on the wire and in the log. See DESIGN.md, "Wire format".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: EnvelopeId,
    pub kind: Kind,
    pub hlc: HlcTime,
    /// Remaining deadline budget in µs at send time, for envelopes that carry a deadline.
    pub budget_us: Option<u64>,
    pub priority: Priority,
    pub trace: Trace,
    pub payload_type: PayloadType,
    #[serde(with = "crate::codec::bytes")]
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_stream(input: &str, expected: Result<(), &str>) {
        let got = StreamName::new(input).map(|_| ()).map_err(|e| e.to_string());
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(fragment)) => assert!(e.contains(fragment), "{input:?}: {e} lacks {fragment:?}"),
            (got, expected) => panic!("{input:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn stream_names() {
        check_stream("readings/line-3", Ok(()));
        check_stream("a", Ok(()));
        check_stream("decisions", Ok(()));
        check_stream("a.b_c-d/e.f", Ok(()));
        check_stream(&"x".repeat(128), Ok(()));
        check_stream(&"x".repeat(129), Err("129 bytes is longer than 128"));
        check_stream("", Err("it is empty"));
        check_stream("Readings!", Err("character 'R' at byte 0"));
        check_stream("a b", Err("character ' ' at byte 1"));
        check_stream("/abs", Err("starts with '/'"));
        check_stream("a/", Err("ends with '/'"));
        check_stream("a//b", Err("empty segment"));
        check_stream("a/../b", Err("'..'"));
        check_stream("a/*", Err("character '*'"));
        check_stream("é", Err("character 'é'"));
    }

    #[test]
    fn node_ids() {
        assert!(NodeId::new("edge-1").is_ok());
        assert!(NodeId::new("fog_a").is_ok());
        let err = NodeId::new("edge/1").unwrap_err().to_string();
        assert!(err.contains("'/'"), "{err}");
        assert!(NodeId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn tiers_are_ordered_by_capability() {
        assert!(Tier::Edge < Tier::Fog && Tier::Fog < Tier::Cloud);
    }

    #[test]
    fn seq_is_never_zero() {
        assert_eq!(Seq::new(0), None);
        assert_eq!(Seq::FIRST.get(), 1);
        assert_eq!(Seq::new(u64::MAX).unwrap().next(), None);
    }

    #[test]
    fn deadline_budget_round_trip_charges_half_rtt() {
        let sender_now = MonoTime::from_micros(1_000_000);
        let d = Deadline::after(sender_now, Duration::from_millis(20));
        assert_eq!(d.budget_us(sender_now), Some(20_000));
        // Receiver's clock is unrelated to the sender's.
        let receiver_now = MonoTime::from_micros(5);
        let r = Deadline::from_budget(receiver_now, 20_000, Duration::from_millis(4));
        assert_eq!(r.remaining(receiver_now), Some(Duration::from_millis(18)));
        // Passed deadlines produce no budget: the request must not be sent.
        assert_eq!(d.budget_us(MonoTime::from_micros(1_020_000)), None);
        assert!(d.has_passed(MonoTime::from_micros(1_020_001)));
        // A round trip longer than twice the budget leaves a deadline that has passed.
        let r = Deadline::from_budget(receiver_now, 1_000, Duration::from_millis(4));
        assert!(r.has_passed(receiver_now));
    }
}
