//! The group-commit hand-off: a bounded queue from many async producers to one blocking
//! consumer (the committer), with a completion ticket per item.
//!
//! - A producer [`Handoff::submit`]s an item. The future waits while the queue holds
//!   `capacity` items (backpressure: memory stays bounded however fast producers are), then
//!   enqueues the item and yields a [`Ticket`].
//! - The committer [`Handoff::take_batch`]es up to `max` items at once (blocking while the
//!   queue is empty), does the work for the whole batch (one `WriteBatch`, one WAL sync), and
//!   then [`Completer::complete`]s each item; the producer's [`Ticket`] resolves with the value.
//! - Every ticket resolves: if the committer drops a [`Completer`] without completing it
//!   (an error path, a panic), the ticket resolves to [`Abandoned`].
//! - [`Handoff::close`] refuses new items; items already queued are still handed out, and
//!   `take_batch` returns `None` once the queue is closed and empty.
//!
//! Items leave the queue in submission order, and a batch is a contiguous run of it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{lock, Arc, Condvar, Mutex};

/// The committer dropped the item's [`Completer`] without completing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// The hand-off was closed; the item is given back.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed<T>(pub T);

struct State<T, R> {
    queue: VecDeque<(T, Completer<R>)>,
    capacity: usize,
    closed: bool,
    /// Producers waiting for room, by waiter id (a re-polled future replaces its waker, so
    /// this holds at most one entry per waiting producer).
    space_waiters: Vec<(u64, Waker)>,
    next_waiter_id: u64,
    /// The committer is woken when the queue holds this many items (1 unless it waits to
    /// grow a batch).
    wanted: usize,
    /// The committer is blocked on `not_empty` (producers only signal then: a condvar signal
    /// is a system call even with nobody waiting).
    waiting: bool,
}

struct Shared<T, R> {
    state: Mutex<State<T, R>>,
    not_empty: Condvar,
}

/// The producers' and the committer's shared end. Cheap to clone.
pub struct Handoff<T, R> {
    shared: Arc<Shared<T, R>>,
}

impl<T, R> Clone for Handoff<T, R> {
    fn clone(&self) -> Self {
        Handoff { shared: self.shared.clone() }
    }
}

impl<T, R> Handoff<T, R> {
    /// A hand-off that holds at most `capacity` waiting items (at least 1).
    pub fn new(capacity: usize) -> Handoff<T, R> {
        assert!(capacity >= 1, "hand-off capacity must be at least 1");
        Handoff {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    capacity,
                    closed: false,
                    space_waiters: Vec::new(),
                    next_waiter_id: 0,
                    wanted: 1,
                    waiting: false,
                }),
                not_empty: Condvar::new(),
            }),
        }
    }

    /// Enqueues `item`, waiting while the queue is full. Resolves to a [`Ticket`] that
    /// resolves when the committer completes the item, or to [`Closed`] if the hand-off was
    /// closed first.
    pub fn submit(&self, item: T) -> Submit<'_, T, R> {
        Submit { handoff: self, item: Some(item), waiter_id: None }
    }

    /// Enqueues `item` if there is room right now.
    pub fn try_submit(&self, item: T) -> Result<Ticket<R>, TrySubmitError<T>> {
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(TrySubmitError::Closed(item));
        }
        if state.queue.len() >= state.capacity {
            return Err(TrySubmitError::Full(item));
        }
        Ok(Self::enqueue(&self.shared, &mut state, item))
    }

    fn enqueue(shared: &Shared<T, R>, state: &mut State<T, R>, item: T) -> Ticket<R> {
        let slot = Arc::new(Mutex::new(Slot::Waiting(None)));
        state.queue.push_back((item, Completer { slot: Some(slot.clone()) }));
        debug_assert!(state.queue.len() <= state.capacity);
        if state.waiting && state.queue.len() >= state.wanted {
            shared.not_empty.notify_one();
        }
        Ticket { slot }
    }

    /// Takes up to `max` items (at least one), blocking the calling thread while the queue is
    /// empty. `None` once the hand-off is closed and every item has been taken.
    pub fn take_batch(&self, max: usize) -> Option<Vec<(T, Completer<R>)>> {
        assert!(max >= 1, "batch size must be at least 1");
        let mut state = lock(&self.shared.state);
        loop {
            if !state.queue.is_empty() {
                return Some(Self::drain(&mut state, max));
            }
            if state.closed {
                return None;
            }
            state.waiting = true;
            state = match self.shared.not_empty.wait(state) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            state.waiting = false;
        }
    }

    /// Takes up to `max` items without blocking (possibly none). For a committer that
    /// lingers to grow a batch after `take_batch` returned.
    pub fn try_take_batch(&self, max: usize) -> Vec<(T, Completer<R>)> {
        Self::drain(&mut lock(&self.shared.state), max)
    }

    /// Waits until at least `min` items are queued (or the hand-off is closed, or
    /// `deadline` passes), then takes up to `max` (possibly none). For a committer that
    /// expects as many appends as its last batch had: their producers are about to resubmit.
    /// Producers wake the committer only once `min` items are queued.
    #[cfg(not(loom))]
    pub fn take_batch_until(&self, max: usize, min: usize, deadline: std::time::Instant) -> Vec<(T, Completer<R>)> {
        let mut state = lock(&self.shared.state);
        // More than the queue holds can never be queued (its producers wait for room): the
        // committer would wait out the deadline at every batch.
        let min = min.min(state.capacity);
        while state.queue.len() < min && !state.closed {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            state.wanted = min;
            state.waiting = true;
            state = match self.shared.not_empty.wait_timeout(state, deadline - now) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.waiting = false;
        }
        state.wanted = 1;
        Self::drain(&mut state, max)
    }

    /// Takes items as they are queued, handing each lot to `each` at once (so the caller
    /// works on one lot while producers queue the next), until `want` were taken, or nothing
    /// is queued once `spin_until` has passed, or the hand-off is closed and empty; takes at
    /// most `max` in all and returns how many. While nothing is queued it spins, yielding the
    /// CPU between looks. For a committer that expects producers back within microseconds: it
    /// sees them without a sleep and wake-up (a wake-up costs tens of µs on a busy or virtual
    /// machine), and producers make no system call to signal it. Items that keep coming keep
    /// it taking past `spin_until` (its caller is busy with them, not idle), up to `want`.
    #[cfg(not(loom))]
    pub fn take_spinning(&self, max: usize, want: usize, spin_until: std::time::Instant, mut each: impl FnMut(Vec<(T, Completer<R>)>)) -> usize {
        let want = want.min(max);
        let mut taken = 0;
        while taken < want {
            let lot = {
                let mut state = lock(&self.shared.state);
                if state.queue.is_empty() {
                    if state.closed || std::time::Instant::now() >= spin_until {
                        break;
                    }
                    None
                } else {
                    Some(Self::drain(&mut state, max - taken))
                }
            };
            match lot {
                Some(lot) => {
                    taken += lot.len();
                    each(lot);
                }
                None => std::thread::yield_now(),
            }
        }
        taken
    }

    fn drain(state: &mut State<T, R>, max: usize) -> Vec<(T, Completer<R>)> {
        let n = state.queue.len().min(max);
        let batch: Vec<_> = state.queue.drain(..n).collect();
        if n > 0 {
            // Room was made: wake every waiting producer; those that do not fit wait again.
            for (_, waker) in state.space_waiters.drain(..) {
                waker.wake();
            }
        }
        batch
    }

    /// Number of items waiting for the committer.
    pub fn len(&self) -> usize {
        lock(&self.shared.state).queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses new items and wakes everyone: waiting producers get [`Closed`], and the
    /// committer drains what is queued, then gets `None`.
    pub fn close(&self) {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        for (_, waker) in state.space_waiters.drain(..) {
            waker.wake();
        }
        self.shared.not_empty.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum TrySubmitError<T> {
    Full(T),
    Closed(T),
}

/// The future returned by [`Handoff::submit`].
pub struct Submit<'a, T, R> {
    handoff: &'a Handoff<T, R>,
    item: Option<T>,
    waiter_id: Option<u64>,
}

// `Submit` never pins its fields structurally.
impl<T, R> Unpin for Submit<'_, T, R> {}

impl<T, R> Future for Submit<'_, T, R> {
    type Output = Result<Ticket<R>, Closed<T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let shared = &this.handoff.shared;
        let mut state = lock(&shared.state);
        let item = this.item.take().expect("Submit polled after completion");
        if state.closed {
            return Poll::Ready(Err(Closed(item)));
        }
        if state.queue.len() < state.capacity {
            if let Some(id) = this.waiter_id.take() {
                state.space_waiters.retain(|(w, _)| *w != id);
            }
            return Poll::Ready(Ok(Handoff::enqueue(shared, &mut state, item)));
        }
        this.item = Some(item);
        let id = match this.waiter_id {
            Some(id) => id,
            None => {
                let id = state.next_waiter_id;
                state.next_waiter_id += 1;
                this.waiter_id = Some(id);
                id
            }
        };
        match state.space_waiters.iter_mut().find(|(w, _)| *w == id) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => state.space_waiters.push((id, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl<T, R> Drop for Submit<'_, T, R> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter_id {
            if self.item.is_some() {
                lock(&self.handoff.shared.state).space_waiters.retain(|(w, _)| *w != id);
            }
        }
    }
}

enum Slot<R> {
    Waiting(Option<Waker>),
    Done(R),
    Abandoned,
    Taken,
}

/// Resolves with the committer's value for one item.
pub struct Ticket<R> {
    slot: Arc<Mutex<Slot<R>>>,
}

impl<R> Future for Ticket<R> {
    type Output = Result<R, Abandoned>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = lock(&self.slot);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Done(value) => Poll::Ready(Ok(value)),
            Slot::Abandoned => Poll::Ready(Err(Abandoned)),
            Slot::Waiting(_) => {
                *slot = Slot::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            Slot::Taken => panic!("Ticket polled after completion"),
        }
    }
}

/// The committer's handle to complete one item. Dropping it uncompleted abandons the item.
pub struct Completer<R> {
    slot: Option<Arc<Mutex<Slot<R>>>>,
}

impl<R> Completer<R> {
    pub fn complete(mut self, value: R) {
        let slot = self.slot.take().expect("completer holds its slot until used");
        Self::finish(&slot, Slot::Done(value));
    }

    fn finish(slot: &Mutex<Slot<R>>, end: Slot<R>) {
        let waker = {
            let mut slot = lock(slot);
            match std::mem::replace(&mut *slot, end) {
                Slot::Waiting(waker) => waker,
                _ => unreachable!("an item is completed once"),
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<R> Drop for Completer<R> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            Self::finish(&slot, Slot::Abandoned);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<F: Future + Unpin>(f: &mut F, wake: &std::sync::Arc<CountWake>) -> Poll<F::Output> {
        let waker = Waker::from(wake.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn full_queue_makes_producers_wait_and_wakes_them_once_room_is_made() {
        let h: Handoff<u32, u32> = Handoff::new(1);
        let w = std::sync::Arc::new(CountWake(AtomicUsize::new(0)));
        let mut first = h.submit(1);
        let Poll::Ready(Ok(mut t1)) = poll(&mut first, &w) else { panic!("room for one") };
        let mut second = h.submit(2);
        assert!(poll(&mut second, &w).is_pending());
        // Re-polling does not pile up wakers.
        assert!(poll(&mut second, &w).is_pending());
        assert_eq!(lock(&h.shared.state).space_waiters.len(), 1);
        assert!(matches!(h.try_submit(3), Err(TrySubmitError::Full(3))));

        let batch = h.take_batch(8).unwrap();
        assert_eq!(w.0.load(Ordering::SeqCst), 1, "the waiting producer was woken");
        assert_eq!(batch.len(), 1);
        let Poll::Ready(Ok(mut t2)) = poll(&mut second, &w) else { panic!("room now") };
        for (item, done) in batch {
            done.complete(item * 10);
        }
        assert_eq!(poll(&mut t1, &w), Poll::Ready(Ok(10)));
        let (item, done) = h.take_batch(8).unwrap().pop().unwrap();
        drop(done); // committer failed on this one
        assert_eq!(item, 2);
        assert_eq!(poll(&mut t2, &w), Poll::Ready(Err(Abandoned)));
    }

    #[test]
    fn take_batch_until_waits_for_enough_items_or_the_deadline() {
        use std::time::{Duration, Instant};
        let h: Handoff<u32, ()> = Handoff::new(8);
        let _t: Vec<_> = (0..2).map(|i| h.try_submit(i).unwrap()).collect();
        // Not enough items: returns what is there once the deadline passes.
        let start = Instant::now();
        let got = h.take_batch_until(8, 3, start + Duration::from_millis(20));
        assert_eq!(got.len(), 2);
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Enough items arrive from another thread: returns before a distant deadline.
        let producer = {
            let h = h.clone();
            std::thread::spawn(move || (10..13).map(|i| h.try_submit(i).unwrap()).collect::<Vec<_>>())
        };
        let got = h.take_batch_until(8, 3, Instant::now() + Duration::from_secs(30));
        assert_eq!(got.into_iter().map(|(i, _)| i).collect::<Vec<_>>(), vec![10, 11, 12]);
        let _tickets = producer.join().unwrap();
        // Wanting more than the queue can hold: a full queue is enough (its producers wait for
        // room, so more never comes before the deadline).
        let small: Handoff<u32, ()> = Handoff::new(2);
        let _t: Vec<_> = (0..2).map(|i| small.try_submit(i).unwrap()).collect();
        let start = Instant::now();
        assert_eq!(small.take_batch_until(64, 10, start + Duration::from_secs(60)).len(), 2);
        assert!(start.elapsed() < Duration::from_secs(30), "waited out the deadline: {:?}", start.elapsed());
    }

    #[test]
    fn take_spinning_stops_at_want_max_an_empty_queue_after_the_spin_or_close() {
        use std::time::{Duration, Instant};
        let h: Handoff<u32, ()> = Handoff::new(8);
        let take = |max: usize, want: usize, spin: Duration| {
            let mut got = Vec::new();
            let n = h.take_spinning(max, want, Instant::now() + spin, |lot| got.extend(lot.into_iter().map(|(i, _)| i)));
            assert_eq!(n, got.len());
            got
        };
        // Nothing comes: none, once the spin is over.
        let start = Instant::now();
        assert!(take(8, 3, Duration::from_millis(20)).is_empty());
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Items from another thread: returns once `want` came, long before the spin's end.
        let producer = {
            let h = h.clone();
            std::thread::spawn(move || (1..4).map(|i| h.try_submit(i).unwrap()).collect::<Vec<_>>())
        };
        let start = Instant::now();
        assert_eq!(take(8, 3, Duration::from_secs(30)), vec![1, 2, 3]);
        assert!(start.elapsed() < Duration::from_secs(30));
        let _tickets = producer.join().unwrap();
        // At most `max`, even when more are queued and wanted; the rest stay queued.
        let _tickets: Vec<_> = (4..9).map(|i| h.try_submit(i).unwrap()).collect();
        assert_eq!(take(2, 10, Duration::from_secs(30)), vec![4, 5]);
        assert_eq!(h.len(), 3);
        assert_eq!(take(8, 3, Duration::from_secs(30)), vec![6, 7, 8]);
        // A producer that queues the next item while each lot is handled (the queue is never
        // empty when looked at) keeps the take going past the spin's end, up to `want`.
        let mut next = 100;
        drop(h.try_submit(next).unwrap());
        let n = h.take_spinning(usize::MAX, 1000, Instant::now(), |lot| {
            assert_eq!(lot.len(), 1);
            next += 1;
            // The ticket is dropped: the item stays queued, its result is not awaited.
            drop(h.try_submit(next).unwrap());
        });
        assert_eq!((n, next), (1000, 1100));
        // Closed and empty (once the last item queued, 1100, is taken): returns at once.
        assert_eq!(take(8, 8, Duration::ZERO), vec![1100]);
        h.close();
        let start = Instant::now();
        assert!(take(8, 3, Duration::from_secs(30)).is_empty());
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn close_drains_then_ends() {
        let h: Handoff<u32, ()> = Handoff::new(4);
        let _t = h.try_submit(1).unwrap();
        h.close();
        assert!(matches!(h.try_submit(2), Err(TrySubmitError::Closed(2))));
        assert_eq!(h.take_batch(4).map(|b| b.len()), Some(1));
        assert!(h.take_batch(4).is_none());
    }

    #[test]
    fn batches_keep_submission_order() {
        let h: Handoff<u32, ()> = Handoff::new(100);
        let _tickets: Vec<_> = (0..10).map(|i| h.try_submit(i).unwrap()).collect();
        let a: Vec<u32> = h.take_batch(4).unwrap().into_iter().map(|(i, _)| i).collect();
        let b: Vec<u32> = h.take_batch(100).unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(a, vec![0, 1, 2, 3]);
        assert_eq!(b, vec![4, 5, 6, 7, 8, 9]);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model checks of the hand-off: every interleaving of producers, committer and close
    //! (run with `LOOM_MAX_PREEMPTIONS=2`, as `make test-loom` does, to bound the search).
    use super::*;
    use loom::future::block_on;
    use loom::thread;

    /// A committer that takes batches until it has handled `n` items, completing each with
    /// 10x its value.
    fn committer(h: Handoff<u32, u32>, max: usize, n: usize) -> thread::JoinHandle<Vec<u32>> {
        thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < n {
                let batch = h.take_batch(max).expect("not closed");
                for (item, done) in batch {
                    seen.push(item);
                    done.complete(item * 10);
                }
            }
            seen
        })
    }

    #[test]
    fn two_producers_each_get_their_own_result() {
        loom::model(|| {
            let h: Handoff<u32, u32> = Handoff::new(2);
            let c = committer(h.clone(), 2, 2);
            let other = {
                let h = h.clone();
                thread::spawn(move || {
                    let ticket = block_on(h.submit(2)).expect("not closed");
                    assert_eq!(block_on(ticket), Ok(20));
                })
            };
            let ticket = block_on(h.submit(1)).expect("not closed");
            assert_eq!(block_on(ticket), Ok(10));
            other.join().unwrap();
            let mut seen = c.join().unwrap();
            seen.sort();
            assert_eq!(seen, vec![1, 2], "each item handed out exactly once");
        });
    }

    #[test]
    fn producer_blocked_on_a_full_queue_is_woken() {
        loom::model(|| {
            let h: Handoff<u32, u32> = Handoff::new(1);
            let c = committer(h.clone(), 1, 2);
            // The second submit finds the queue full unless the committer already took
            // the first item; either way it must get in, in order.
            let first = block_on(h.submit(1)).expect("not closed");
            let second = block_on(h.submit(2)).expect("not closed");
            assert_eq!(block_on(first), Ok(10));
            assert_eq!(block_on(second), Ok(20));
            assert_eq!(c.join().unwrap(), vec![1, 2], "submission order is kept");
        });
    }

    #[test]
    fn close_never_strands_a_producer() {
        loom::model(|| {
            let h: Handoff<u32, u32> = Handoff::new(1);
            let c = {
                let h = h.clone();
                thread::spawn(move || {
                    while let Some(batch) = h.take_batch(1) {
                        for (item, done) in batch {
                            done.complete(item * 10);
                        }
                    }
                })
            };
            let p = {
                let h = h.clone();
                thread::spawn(move || match block_on(h.submit(7)) {
                    // Enqueued before the close: the committer still completes it.
                    Ok(ticket) => assert_eq!(block_on(ticket), Ok(70)),
                    Err(Closed(item)) => assert_eq!(item, 7),
                })
            };
            h.close();
            p.join().unwrap();
            c.join().unwrap();
        });
    }

    #[test]
    fn abandoned_items_resolve() {
        loom::model(|| {
            let h: Handoff<u32, u32> = Handoff::new(1);
            let c = {
                let h = h.clone();
                thread::spawn(move || {
                    // A committer whose batch write failed: it drops the completers.
                    let batch = h.take_batch(1).unwrap();
                    drop(batch);
                })
            };
            let ticket = block_on(h.submit(1)).unwrap();
            assert_eq!(block_on(ticket), Err(Abandoned));
            c.join().unwrap();
        });
    }
}
