//! Concurrency primitives of Strata, kept free of RocksDB, Zenoh and tokio so that they can
//! be model-checked with [loom](https://docs.rs/loom) in seconds:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p strata-sync --release --target-dir target/loom
//! ```
//!
//! [`handoff`] is the group-commit hand-off between many producers (async tasks that append
//! to the durable log) and the one committer thread that writes their records in batches.

mod sync;

pub mod handoff;
