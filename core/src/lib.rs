//! `strata-core`: the runtime library of Strata.
//!
//! Strata keeps AI-driven systems spread over edge, fog and cloud behaving acceptably when
//! links partition, processes crash and data arrives late. This crate holds its parts:
//!
//! - [`model`]: identifiers, HLC and monotonic time, deadlines, the [`Envelope`]. Pure data.
//! - [`codec`]: the versioned binary format of envelopes; decoding never panics.
//! - [`config`]: the typed TOML node configuration and the continuum check.
//!
//! Later modules (durable log, bus, routing, modes, supervision, node) build on these; see
//! `ARCHITECTURE.md` for the map and the invariants that hold between them.

pub mod codec;
pub mod config;
pub mod bus;
pub mod log;
pub mod model;
pub mod node;

pub use config::{ConfigError, NodeConfig};
pub use model::{
    Deadline, Envelope, EnvelopeId, HlcTime, Incarnation, Kind, MonoClock, MonoTime, NodeId, PayloadType, Priority,
    Seq, StreamName, Tier, Trace,
};
