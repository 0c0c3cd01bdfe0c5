//! Raw Zenoh, for the baselines of `bench bus` and as a stock router in tests: a router with
//! Zenoh's default settings (multicast scouting off) that may also count what it receives on
//! a key.
//!
//!     zenoh_hop --listen tcp/127.0.0.1:7000 [--connect tcp/127.0.0.1:7001] [--count bench/raw --expect N]
//!
//! Prints `ready` once open. When counting, payloads start with the sender's
//! CLOCK_MONOTONIC time in ns (same machine), and once `N` arrived it prints
//! `done <count> <seconds from first to last> <p50 µs> <p99 µs>`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use strata_integration::mono_ns;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let listen = arg("--listen").context("--listen")?;
    let mut c = zenoh::Config::default();
    let set = |c: &mut zenoh::Config, k: &str, v: String| c.insert_json5(k, &v).map_err(|e| anyhow::anyhow!("{k}: {e}"));
    set(&mut c, "mode", "\"router\"".into())?;
    set(&mut c, "listen/endpoints", format!("[\"{listen}\"]"))?;
    if let Some(connect) = arg("--connect") {
        set(&mut c, "connect/endpoints", format!("[\"{connect}\"]"))?;
    }
    set(&mut c, "scouting/multicast/enabled", "false".into())?;
    let session = zenoh::open(c).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let _sub = match (arg("--count"), arg("--expect")) {
        (Some(key), Some(expect)) => {
            let expect: u64 = expect.parse()?;
            let state = Arc::new(Mutex::new((0u64, None::<Instant>, Vec::<u64>::with_capacity(expect as usize))));
            Some(
                session
                    .declare_subscriber(key)
                    .callback(move |s| {
                        let now = mono_ns();
                        let bytes = s.payload().to_bytes();
                        let sent = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
                        let mut st = state.lock().unwrap();
                        let first = *st.1.get_or_insert_with(Instant::now);
                        st.0 += 1;
                        st.2.push(now.saturating_sub(sent) / 1000);
                        if st.0 == expect {
                            let secs = first.elapsed().as_secs_f64();
                            st.2.sort_unstable();
                            let q = |p: f64| st.2[((st.2.len() as f64 * p) as usize).min(st.2.len() - 1)];
                            println!("done {} {secs} {} {}", st.0, q(0.5), q(0.99));
                            std::io::stdout().flush().unwrap();
                        }
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
        }
        _ => None,
    };
    println!("ready");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
