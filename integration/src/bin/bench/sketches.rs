//! Two bare group commits over raw RocksDB, run next to Strata's (`STRATA_BENCH_ONLY=sketches
//! bench log`): what tokio tasks that each await their own acknowledgement get from a group
//! commit that does nothing but batch (no envelopes, no seq assignment, no stream state).
//!
//! - `thread`: the simplest one an integrator could write. Tasks queue a oneshot sender and
//!   await it; one thread takes whatever is queued, writes it as one `WriteBatch` + WAL sync
//!   and answers. Every acknowledgement crosses from that thread to a runtime worker, as in
//!   Strata.
//! - `task`: the committer is a task on the producers' runtime. It writes and syncs on its
//!   worker, blocking it, so the acknowledgements wake the producers on a worker that is
//!   awake (no cross-thread wake-up), and it waits (yielding, at most [`GATHER_MAX`]) until as
//!   many records are queued as its last batch held. Strata could not ship this: every sync
//!   would block a worker of the integrator's runtime. It measures how far removing the
//!   wake-up would go.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{oneshot, Notify};

use super::{each_awaiting, rate, RawStore, StrataLog, PAYLOAD_BYTES, SLICES};

/// Longest the `task` committer waits for its batch to fill once a record is queued.
const GATHER_MAX: Duration = Duration::from_micros(100);

#[derive(Default)]
struct Waiting {
    acks: Vec<oneshot::Sender<()>>,
    stop: bool,
}

/// How producers wake their committer.
enum Wake {
    Thread(Condvar),
    Task(Notify),
}

struct Queue {
    waiting: Mutex<Waiting>,
    wake: Wake,
}

impl Queue {
    fn new(wake: Wake) -> Arc<Queue> {
        Arc::new(Queue { waiting: Mutex::default(), wake })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        match &self.wake {
            Wake::Thread(c) => c.notify_one(),
            Wake::Task(n) => n.notify_one(),
        }
    }

    /// One producer's append: queue, wake the committer, await the acknowledgement.
    async fn append(&self) -> Result<()> {
        let (ack, durable) = oneshot::channel();
        self.lock().acks.push(ack);
        self.notify();
        durable.await?;
        Ok(())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.notify();
    }
}

fn acknowledge(acks: Vec<oneshot::Sender<()>>) {
    for ack in acks {
        // A producer that stopped waiting has nothing to be told.
        let _ = ack.send(());
    }
}

fn thread_committer(queue: &Queue, store: &mut RawStore) -> Result<()> {
    let Wake::Thread(not_empty) = &queue.wake else { anyhow::bail!("the thread committer needs a condvar") };
    loop {
        let acks = {
            let mut w = queue.lock();
            while w.acks.is_empty() && !w.stop {
                w = not_empty.wait(w).unwrap_or_else(|p| p.into_inner());
            }
            if w.acks.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut w.acks)
        };
        store.write(acks.len())?;
        acknowledge(acks);
    }
}

async fn task_committer(queue: &Queue, store: &mut RawStore) -> Result<()> {
    let Wake::Task(queued) = &queue.wake else { anyhow::bail!("the task committer needs a Notify") };
    let mut last = 1;
    loop {
        let mut since = Instant::now();
        let acks = loop {
            let len = {
                let mut w = queue.lock();
                let len = w.acks.len();
                if len >= last || (len > 0 && since.elapsed() >= GATHER_MAX) {
                    break std::mem::take(&mut w.acks);
                }
                if w.stop && len == 0 {
                    return Ok(());
                }
                len
            };
            if len == 0 {
                queued.notified().await;
                since = Instant::now();
            } else {
                tokio::task::yield_now().await;
            }
        };
        last = acks.len();
        store.write(acks.len())?;
        acknowledge(acks);
        // Lets the producers just woken on this worker queue their next record.
        tokio::task::yield_now().await;
    }
}

/// For 1, 8 and 64 producers: the raw batch of that size, both sketches and Strata, in
/// alternating slices (see [`super::round`]); prints each rate and its ratio to raw.
pub(super) fn bench_sketches(rt: &tokio::runtime::Runtime, budget: Duration) -> Result<()> {
    for n in [1usize, 8, 64] {
        let mut raw = RawStore::open(n, PAYLOAD_BYTES)?;
        let log = StrataLog::open()?;
        let thread_queue = Queue::new(Wake::Thread(Condvar::new()));
        let thread = {
            let (queue, mut store) = (thread_queue.clone(), RawStore::open(1, PAYLOAD_BYTES)?);
            std::thread::spawn(move || thread_committer(&queue, &mut store))
        };
        let task_queue = Queue::new(Wake::Task(Notify::new()));
        let task = {
            let (queue, mut store) = (task_queue.clone(), RawStore::open(1, PAYLOAD_BYTES)?);
            rt.spawn(async move { task_committer(&queue, &mut store).await })
        };
        let slice = budget / SLICES;
        let mut totals = [(0u64, Duration::ZERO); 4];
        let mut add = |i: usize, (records, elapsed): (u64, Duration)| totals[i] = (totals[i].0 + records, totals[i].1 + elapsed);
        for _ in 0..SLICES {
            add(0, raw.run(slice)?);
            for (i, queue) in [(1, &thread_queue), (2, &task_queue)] {
                let queue = queue.clone();
                add(
                    i,
                    rt.block_on(each_awaiting(n, slice, move || {
                        let queue = queue.clone();
                        async move { queue.append().await }
                    }))?,
                );
            }
            add(3, rt.block_on(log.producers(n, slice))?);
        }
        thread_queue.stop();
        task_queue.stop();
        thread.join().map_err(|_| anyhow::anyhow!("the thread committer panicked"))??;
        rt.block_on(task)??;
        let [r, t, k, s] = totals.map(|(records, elapsed)| rate(records, elapsed));
        println!(
            "{n} producers: raw batch of {n} {r:.0} rec/s; thread sketch {t:.0} (ratio {:.2}); task sketch {k:.0} (ratio {:.2}); strata {s:.0} (ratio {:.2})",
            t / r,
            k / r,
            s / r
        );
    }
    Ok(())
}
