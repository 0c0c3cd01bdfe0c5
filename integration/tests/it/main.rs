//! The one integration test binary of Strata (one link step for all multi-node tests).

mod actors;
mod bridges;
mod cli;
mod crash;
mod demo;
mod escalate;
mod example;
mod ingest;
mod node;
mod replication;
mod route;
mod security;
mod supervise;
