//! `strata-core`: the runtime library of Strata.
//!
//! Strata keeps AI-driven systems spread over edge, fog and cloud behaving acceptably when
//! links partition, processes crash and data arrives late. This crate holds its parts:
//!
//! - [`model`]: identifiers, HLC and monotonic time, deadlines, the [`Envelope`]. Pure data.
//! - [`codec`]: the versioned binary format of envelopes; decoding never panics.
//! - [`config`]: the typed TOML node configuration and the continuum check.
//!
//! - [`log`]: the durable RocksDB log: streams, group commit, cursors, watermarks, retention.
//! - [`bus`]: Zenoh transport and the replication protocol (live, gap repair, replay).
//! - [`route`] and [`mode`]: deadline-aware routing, latency estimates, degraded modes and
//!   autonomy bounds. Pure: time is an argument.
//! - [`supervise`]: OTP-style supervisors on ractor.
//! - [`actor`]: the integrator API ([`Behaviour`], [`Ctx`], [`Registry`]); start there to
//!   write an actor.
//! - [`node`]: a node wired from its config.
//! - [`security`]: mutual TLS between tiers, access control derived from the configs, and
//!   the development PKI of `strata certs`.
//! - [`proxy`]: a TCP proxy that cuts or slows a link, for drills, `strata demo` and tests.
//!
//! See `ARCHITECTURE.md` for the map and the invariants that hold between them.

pub mod actor;
pub mod bus;
pub mod codec;
pub mod config;
pub mod log;
pub mod mode;
pub mod model;
pub mod node;
pub mod ports;
pub mod proxy;
pub mod route;
pub mod security;
pub mod supervise;

pub use actor::{ActorError, Behaviour, Ctx, Registry};
pub use config::{ConfigError, NodeConfig};
pub use model::{Deadline, Envelope, EnvelopeId, HlcTime, Incarnation, Kind, MonoClock, MonoTime, NodeId, PayloadType, Priority, Seq, StreamName, Tier, Trace};
