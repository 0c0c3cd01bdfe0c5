//! `bench restart`: how long a supervised actor takes to be back at work after a failure —
//! from the panic to the first record handled by the new instance (the one it failed on) —
//! over 1,000 restarts, without and with a state snapshot to restore, next to a bare ractor
//! spawn (spawn to first message handled) measured in the same run.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use strata_core::actor::ActorEnv;
use strata_core::config::Strategy;
use strata_core::log::{Draft, Log, RocksStore, StoreOptions};
use strata_core::supervise::{self, policy::Policy, Supervisor, SupervisorArgs};
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, NodeConfig, NodeId, PayloadType, Registry, StreamName};
use tokio::sync::mpsc;

const RESTARTS: usize = 1000;

struct Failing {
    snapshot_bytes: usize,
    /// Seqs already failed on (each fails once).
    failed: Arc<Mutex<HashSet<u64>>>,
    /// (seq, when the failure happened) and (seq, when handled).
    failures: mpsc::Sender<Instant>,
    handled: mpsc::Sender<(u64, Instant)>,
}

impl Behaviour for Failing {
    type State = Vec<u8>;

    async fn start(&self, ctx: &mut Ctx) -> Result<Vec<u8>, ActorError> {
        // Restore the state from the snapshot (a real restore: read and copy it).
        Ok(ctx.snapshot().map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; self.snapshot_bytes]))
    }

    async fn handle(&self, ctx: &mut Ctx, state: &mut Vec<u8>, input: &Envelope) -> Result<(), ActorError> {
        let seq = input.id.seq.get();
        if self.failed.lock().unwrap().insert(seq) {
            self.failures.send(Instant::now()).await?;
            panic!("bench failure at {seq}");
        }
        self.handled.send((seq, Instant::now())).await?;
        if self.snapshot_bytes > 0 {
            state[0] = state[0].wrapping_add(1);
            ctx.save_snapshot(state.clone());
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn restarts(snapshot_bytes: usize) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let node = NodeId::new("bench").map_err(anyhow::Error::msg)?;
    let log = Log::new(Arc::new(RocksStore::open(dir.path(), &node, StoreOptions::default())?));
    let config =
        NodeConfig::parse("bench.toml".as_ref(), "[node]\nid = \"bench\"\ntier = \"edge\"\n[[actors]]\nkind = \"failing\"\nname = \"f\"\ninputs = [\"in\"]\n")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (fail_tx, mut fail_rx) = mpsc::channel(4);
    let (handled_tx, mut handled_rx) = mpsc::channel(4);
    let failed = Arc::new(Mutex::new(HashSet::new()));
    let mut registry = Registry::new();
    registry.register("failing", move |_: &strata_core::config::ActorSpec| {
        Ok::<_, String>(Failing { snapshot_bytes, failed: failed.clone(), failures: fail_tx.clone(), handled: handled_tx.clone() })
    });
    let env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
    let policy = Policy {
        strategy: Strategy::OneForOne,
        restarts_max: u32::MAX,
        window: Duration::from_secs(1),
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        jitter_pct: 0,
        child_shutdown_timeout: Duration::from_secs(5),
    };
    let child = registry.child(&config.actors[0], &env).map_err(anyhow::Error::msg)?;
    let (sup, _) = Actor::spawn(None, Supervisor, SupervisorArgs { name: "root".into(), policy, children: vec![child], events: Arc::new(|_| {}) }).await?;
    let input = StreamName::new("in").map_err(anyhow::Error::msg)?;
    let mut out = Vec::with_capacity(RESTARTS);
    for i in 0..=RESTARTS {
        log.append_durable(input.clone(), Draft::new(Kind::Reading, PayloadType::new("bench/1").map_err(anyhow::Error::msg)?, vec![0; 16])).await?;
        let failed_at = tokio::time::timeout(Duration::from_secs(10), fail_rx.recv()).await?.context("actor gone")?;
        let (_, handled_at) = tokio::time::timeout(Duration::from_secs(10), handled_rx.recv()).await?.context("actor gone")?;
        if i > 0 {
            // The first one includes the log's warm-up.
            out.push(handled_at - failed_at);
        }
    }
    supervise::shutdown(&sup, Duration::from_secs(10)).await;
    log.close();
    Ok(out)
}

struct Bare;

impl Actor for Bare {
    type Msg = tokio::sync::oneshot::Sender<Instant>;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, reply: Self::Msg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(Instant::now());
        myself.stop(None);
        Ok(())
    }
}

async fn bare_spawns() -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(RESTARTS);
    for _ in 0..RESTARTS {
        let t0 = Instant::now();
        let (actor, handle) = Actor::spawn(None, Bare, ()).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        actor.send_message(tx)?;
        let handled = rx.await?;
        out.push(handled - t0);
        handle.await?;
    }
    Ok(out)
}

pub fn bench_restart() -> Result<()> {
    // The injected panics are the point: do not spend the measured time printing them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("bench failure") {
            default_hook(info);
        }
    }));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let report = |name: &str, mut d: Vec<Duration>, base: Option<Duration>| {
            d.sort();
            let (p50, p99) = (percentile(&d, 0.5), percentile(&d, 0.99));
            let ratio = base.map_or(String::new(), |b| format!("   p50 {:.1}x bare spawn", p50.as_secs_f64() / b.as_secs_f64()));
            println!("{name:<38} p50 {:>8.1} µs   p99 {:>8.1} µs{ratio}", p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6);
            p50
        };
        println!("restart latency over {RESTARTS} restarts (failure -> first record handled by the new instance), backoff 0:");
        let bare = report("bare ractor spawn (to first message)", bare_spawns().await?, None);
        report("strata actor, no snapshot", restarts(0).await?, Some(bare));
        report("strata actor, 64 KiB snapshot", restarts(64 * 1024).await?, Some(bare));
        Ok(())
    })
}
