//! The one integration test binary of Strata (one link step for all multi-node tests).

/// Prints a test's figures (and why a test did not run) straight to stderr. `println!` goes
/// through the test harness's capture and shows only when the test fails; these lines belong
/// in every test log, passing or not.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

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
