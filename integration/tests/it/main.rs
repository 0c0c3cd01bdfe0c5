//! The one integration test binary of Strata (one link step for all multi-node tests).

mod cli;
mod actors;
mod crash;
mod escalate;
mod ingest;
mod node;
mod replication;
mod route;
mod supervise;
