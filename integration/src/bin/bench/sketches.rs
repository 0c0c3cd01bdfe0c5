//! Bare group commits over raw RocksDB, run next to Strata's (`STRATA_BENCH_ONLY=sketches
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
//! - `task in place`: the `task` committer, but it writes and syncs inside
//!   `tokio::task::block_in_place`, so the worker's other tasks move to another thread for the
//!   sync: what Strata would have to do to run its committer on an integrator's runtime.
//! - `leader`: no committer at all. A producer that finds nobody writing becomes the leader:
//!   it takes what is queued (its own record with it), writes and syncs inside
//!   `tokio::task::block_in_place` (its worker's other tasks move to another thread for the
//!   sync), then hands the lead to the first producer that queued meanwhile and acknowledges
//!   the rest. This is RocksDB's own leader/follower group commit with tasks instead of
//!   threads; it measures whether a sync on the producer's own thread, with no committer
//!   thread, removes the wake-up that costs Strata.

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

async fn task_committer(queue: &Queue, store: &mut RawStore, in_place: bool) -> Result<()> {
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
        if in_place {
            tokio::task::block_in_place(|| store.write(acks.len()))?;
        } else {
            store.write(acks.len())?;
        }
        acknowledge(acks);
        // Lets the producers just woken on this worker queue their next record.
        tokio::task::yield_now().await;
    }
}

/// What a waiting producer of the `leader` sketch is told.
enum Turn {
    /// Its record is durable.
    Done,
    /// Its record is not written yet, and it leads the next batch.
    Lead,
}

#[derive(Default)]
struct Led {
    waiting: Vec<oneshot::Sender<Turn>>,
    leading: bool,
}

struct LeaderQueue {
    led: Mutex<Led>,
    store: Mutex<RawStore>,
}

impl LeaderQueue {
    fn lock(&self) -> MutexGuard<'_, Led> {
        self.led.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn append(&self) -> Result<()> {
        let lead = {
            let mut led = self.lock();
            if led.leading {
                let (turn, told) = oneshot::channel();
                led.waiting.push(turn);
                Some(told)
            } else {
                led.leading = true;
                None
            }
        };
        match lead {
            None => self.lead(),
            Some(told) => match told.await? {
                Turn::Done => Ok(()),
                Turn::Lead => self.lead(),
            },
        }
    }

    /// Writes the leader's record with every one queued, then passes the lead on.
    fn lead(&self) -> Result<()> {
        let batch = std::mem::take(&mut self.lock().waiting);
        let written = tokio::task::block_in_place(|| self.store.lock().unwrap_or_else(|p| p.into_inner()).write(batch.len() + 1));
        {
            let mut led = self.lock();
            // A producer that stopped waiting cannot lead; the next one queued does.
            led.leading = false;
            while !led.waiting.is_empty() {
                if led.waiting.remove(0).send(Turn::Lead).is_ok() {
                    led.leading = true;
                    break;
                }
            }
        }
        for done in batch {
            let _ = done.send(Turn::Done);
        }
        written
    }
}

/// For 1, 8 and 64 producers: the raw batch of that size, the four sketches and Strata, in
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
            rt.spawn(async move { task_committer(&queue, &mut store, false).await })
        };
        let in_place_queue = Queue::new(Wake::Task(Notify::new()));
        let in_place = {
            let (queue, mut store) = (in_place_queue.clone(), RawStore::open(1, PAYLOAD_BYTES)?);
            rt.spawn(async move { task_committer(&queue, &mut store, true).await })
        };
        let leader = Arc::new(LeaderQueue { led: Mutex::default(), store: Mutex::new(RawStore::open(1, PAYLOAD_BYTES)?) });
        let slice = budget / SLICES;
        let mut totals = [(0u64, Duration::ZERO); 6];
        let mut add = |i: usize, (records, elapsed): (u64, Duration)| totals[i] = (totals[i].0 + records, totals[i].1 + elapsed);
        for _ in 0..SLICES {
            add(0, raw.run(slice)?);
            for (i, queue) in [(1, &thread_queue), (2, &task_queue), (5, &in_place_queue)] {
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
            let leader = leader.clone();
            add(
                4,
                rt.block_on(each_awaiting(n, slice, move || {
                    let leader = leader.clone();
                    async move { leader.append().await }
                }))?,
            );
        }
        thread_queue.stop();
        task_queue.stop();
        in_place_queue.stop();
        thread.join().map_err(|_| anyhow::anyhow!("the thread committer panicked"))??;
        rt.block_on(task)??;
        rt.block_on(in_place)??;
        let [r, t, k, s, l, p] = totals.map(|(records, elapsed)| rate(records, elapsed));
        println!(
            "{n} producers: raw batch of {n} {r:.0} rec/s; thread sketch {t:.0} (ratio {:.2}); task sketch {k:.0} (ratio {:.2}); \
             task sketch in place {p:.0} (ratio {:.2}); leader sketch {l:.0} (ratio {:.2}); strata {s:.0} (ratio {:.2})",
            t / r,
            k / r,
            p / r,
            l / r,
            s / r
        );
    }
    Ok(())
}
