//! The worker pool: N threads, each owning a [`JsRuntime`] with every script compiled in it,
//! pulling calls from one shared queue. No lock is held while a script runs: the queue's mutex
//! covers a push or a pop only, so N documents run at once on N cores, and a worker held up by a
//! slow lookup leaves the others pulling work.
//!
//! Results come back through [`Pending`], a one-shot slot that is both a [`Future`] (await it
//! from tokio without `spawn_blocking`: the worker wakes the task) and blocking ([`Pending::wait`]).
//!
//! # Bounds
//! The queue holds what callers submitted and have not collected; callers bound it by how many
//! results they keep pending (the engine awaits each batch, whose size its batcher bounds).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::thread::JoinHandle;

use crate::lookup::Lookup;
use crate::runtime::JsRuntime;
use crate::{Config, Decision, MapOutcome, ScriptError};

/// Native stack of a worker thread: well above the JavaScript stack limit (1 MiB by default),
/// so deep recursion hits QuickJS's own check first.
const WORKER_STACK_BYTES: usize = 8 << 20;

pub(crate) enum Job {
    Map { ns: String, doc: String, update_desc: Option<String>, reply: Completer<MapOutcome> },
    Filter { ns: String, doc: String, update_desc: Option<String>, reply: Completer<bool> },
    Pipeline { ns: String, change_stream: bool, reply: Completer<Vec<serde_json::Value>> },
    /// The filters (when `filter`), then the map scripts (when `map`) if the filters keep it.
    Decide { ns: String, doc: String, update_desc: Option<String>, filter: bool, map: bool, reply: Completer<Decision> },
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

pub(crate) struct Pool {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens while the queue is held (push/pop only), so a poisoned lock still
    // guards a consistent queue.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Starts `workers` threads; each compiles every script before the pool is returned, so a
    /// script that fails to compile fails here.
    pub(crate) fn start(config: Arc<Config>, lookup: Arc<dyn Lookup>, workers: usize) -> Result<Pool, ScriptError> {
        let shared = Arc::new((Mutex::new(Queue { jobs: VecDeque::new(), closed: false }), Condvar::new()));
        let mut pool = Pool { shared: Arc::clone(&shared), threads: Vec::with_capacity(workers) };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ScriptError>>();
        for i in 0..workers {
            let shared = Arc::clone(&shared);
            let config = Arc::clone(&config);
            let lookup = Arc::clone(&lookup);
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("monsoon-script-{i}"))
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || {
                    let runtime = match JsRuntime::new(config, lookup) {
                        Ok(r) => {
                            let _ = ready.send(Ok(()));
                            r
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    drop(ready);
                    work(runtime, &shared);
                })
                .map_err(|e| ScriptError::Internal(format!("failed to start a script worker: {e}")))?;
            pool.threads.push(handle);
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e), // dropping `pool` stops the others
                Err(_) => return Err(ScriptError::Internal("a script worker died while compiling".to_owned())),
            }
        }
        Ok(pool)
    }

    pub(crate) fn submit(&self, job: Job) {
        let (queue, ready) = &*self.shared;
        let mut q = lock(queue);
        if q.closed {
            drop(q);
            drop(job); // its completer answers Stopped
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        ready.notify_one();
    }

    pub(crate) fn submit_all(&self, jobs: impl IntoIterator<Item = Job>) {
        let (queue, ready) = &*self.shared;
        let mut q = lock(queue);
        if q.closed {
            return;
        }
        let before = q.jobs.len();
        q.jobs.extend(jobs);
        let added = q.jobs.len() - before;
        drop(q);
        // As many workers as there are new jobs: a batch of one wakes one thread, not all.
        if added >= self.threads.len() {
            ready.notify_all();
        } else {
            for _ in 0..added {
                ready.notify_one();
            }
        }
    }

    pub(crate) fn workers(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (queue, ready) = &*self.shared;
        {
            let mut q = lock(queue);
            q.closed = true;
            q.jobs.clear(); // their completers answer Stopped
        }
        ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(mut runtime: JsRuntime, shared: &(Mutex<Queue>, Condvar)) {
    let (queue, ready) = shared;
    loop {
        let job = {
            let mut q = lock(queue);
            loop {
                if q.closed {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                q = ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let healthy = match job {
            Job::Map { ns, doc, update_desc, reply } => {
                guarded(&mut runtime, reply, |rt| rt.map(&ns, &doc, update_desc.as_deref()))
            }
            Job::Filter { ns, doc, update_desc, reply } => {
                guarded(&mut runtime, reply, |rt| rt.filter(&ns, &doc, update_desc.as_deref()))
            }
            Job::Pipeline { ns, change_stream, reply } => guarded(&mut runtime, reply, |rt| rt.pipeline(&ns, change_stream)),
            Job::Decide { ns, doc, update_desc, filter, map, reply } => guarded(&mut runtime, reply, |rt| {
                if filter && !rt.filter(&ns, &doc, update_desc.as_deref())? {
                    return Ok(Decision::Ignored);
                }
                Ok(Decision::Mapped(if map { rt.map(&ns, &doc, update_desc.as_deref())? } else { MapOutcome::Keep }))
            }),
        };
        if !healthy {
            // A panic (a bug in this crate or the bindings) may have left the runtime in any
            // state: start afresh, or stop this worker if even that fails.
            match runtime.fresh() {
                Ok(r) => runtime = r,
                Err(_) => return,
            }
        }
    }
}

/// Runs one call, answering `reply` even if it panics (with an error that is not retriable, so
/// the document is dead-lettered rather than retried into the same panic). Returns false after
/// a panic.
fn guarded<T>(
    runtime: &mut JsRuntime,
    reply: Completer<T>,
    call: impl FnOnce(&mut JsRuntime) -> Result<T, ScriptError>,
) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(runtime))) {
        Ok(result) => {
            reply.complete(result);
            true
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            reply.complete(Err(ScriptError::Internal(format!("a script worker panicked: {what}"))));
            false
        }
    }
}

/// A one-shot slot shared by a [`Completer`] (the worker side) and a [`Pending`] (the caller's).
struct Slot<T> {
    state: Mutex<SlotState<T>>,
    filled: Condvar,
}

struct SlotState<T> {
    value: Option<Result<T, ScriptError>>,
    waker: Option<Waker>,
    /// A thread is blocked in [`Pending::wait`]: only then is the condvar signalled (a signal
    /// is a system call; most results are collected after they are there).
    blocked: bool,
}

/// The results of one batch: one slot per item and a count of those still running, so the
/// caller wakes once per batch rather than once per item.
pub(crate) struct BatchSlot<T> {
    state: Mutex<BatchState<T>>,
    done: Condvar,
}

struct BatchState<T> {
    results: Vec<Option<Result<T, ScriptError>>>,
    remaining: usize,
    waker: Option<Waker>,
}

impl<T> BatchSlot<T> {
    pub(crate) fn new(len: usize) -> Arc<BatchSlot<T>> {
        let mut results = Vec::with_capacity(len);
        results.resize_with(len, || None);
        Arc::new(BatchSlot { state: Mutex::new(BatchState { results, remaining: 0, waker: None }), done: Condvar::new() })
    }

    /// Sets the result of item `index` now (no worker involved).
    pub(crate) fn set(&self, index: usize, value: Result<T, ScriptError>) {
        lock(&self.state).results[index] = Some(value);
    }

    /// The completer for item `index`, which a worker will fill.
    pub(crate) fn completer(self: &Arc<Self>, index: usize) -> Completer<T> {
        lock(&self.state).remaining += 1;
        Completer { target: Some(Target::Batch(Arc::clone(self), index)) }
    }

}

/// The results of a submitted batch, in the items' order, available once every item has run.
/// Like [`Pending`]: await it (one wake-up for the whole batch) or [`PendingBatch::wait`].
#[must_use = "a PendingBatch does nothing unless awaited or waited on"]
pub struct PendingBatch<T> {
    batch: Arc<BatchSlot<T>>,
}

impl<T> PendingBatch<T> {
    pub(crate) fn new(batch: Arc<BatchSlot<T>>) -> Self {
        PendingBatch { batch }
    }

    /// Items still running: a caller waiting on a long batch sees it progress.
    pub fn remaining(&self) -> usize {
        lock(&self.batch.state).remaining
    }

    /// Blocks the current thread until every item has its result. Don't call it on an async
    /// runtime's thread; await the `PendingBatch` instead.
    pub fn wait(self) -> Vec<Result<T, ScriptError>> {
        let mut s = lock(&self.batch.state);
        while s.remaining > 0 {
            s = self.batch.done.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        take_results(&mut s)
    }
}

fn take_results<T>(s: &mut BatchState<T>) -> Vec<Result<T, ScriptError>> {
    std::mem::take(&mut s.results).into_iter().map(|r| r.unwrap_or(Err(ScriptError::Stopped))).collect()
}

impl<T> Future for PendingBatch<T> {
    type Output = Vec<Result<T, ScriptError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.batch.state);
        if s.remaining == 0 {
            return Poll::Ready(take_results(&mut s));
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// The result of one submitted call, available once a worker has run it.
///
/// Await it (`Future`, woken by the worker: no `spawn_blocking` needed) or block on it with
/// [`Pending::wait`]. Dropping it is fine: the call still runs, its result is discarded.
#[must_use = "a Pending does nothing unless awaited or waited on"]
pub struct Pending<T> {
    slot: Arc<Slot<T>>,
}

enum Target<T> {
    One(Arc<Slot<T>>),
    Batch(Arc<BatchSlot<T>>, usize),
}

/// The worker's end of a [`Pending`] or of one item of a batch. If it is dropped without a
/// result (pool shutting down), the caller gets [`ScriptError::Stopped`].
pub(crate) struct Completer<T> {
    target: Option<Target<T>>,
}

pub(crate) fn oneshot<T>() -> (Completer<T>, Pending<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState { value: None, waker: None, blocked: false }),
        filled: Condvar::new(),
    });
    (Completer { target: Some(Target::One(Arc::clone(&slot))) }, Pending { slot })
}

impl<T> Completer<T> {
    pub(crate) fn complete(mut self, value: Result<T, ScriptError>) {
        if let Some(target) = self.target.take() {
            fill(target, value);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            fill(target, Err(ScriptError::Stopped));
        }
    }
}

fn fill<T>(target: Target<T>, value: Result<T, ScriptError>) {
    match target {
        Target::One(slot) => {
            let (waker, blocked) = {
                let mut s = lock(&slot.state);
                s.value = Some(value);
                (s.waker.take(), s.blocked)
            };
            if blocked {
                slot.filled.notify_all();
            }
            if let Some(w) = waker {
                w.wake();
            }
        }
        Target::Batch(batch, index) => {
            let (finished, waker) = {
                let mut s = lock(&batch.state);
                s.results[index] = Some(value);
                s.remaining -= 1;
                let finished = s.remaining == 0;
                (finished, if finished { s.waker.take() } else { None })
            };
            if finished {
                batch.done.notify_all();
            }
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl<T> Pending<T> {
    /// A `Pending` that already holds its result.
    pub fn ready(value: Result<T, ScriptError>) -> Pending<T> {
        let (completer, pending) = oneshot();
        completer.complete(value);
        pending
    }

    /// Blocks the current thread until the result is there. Don't call it on an async
    /// runtime's thread; await the `Pending` instead.
    pub fn wait(self) -> Result<T, ScriptError> {
        let mut s = lock(&self.slot.state);
        loop {
            if let Some(v) = s.value.take() {
                return v;
            }
            s.blocked = true;
            s = self.slot.filled.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T, ScriptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.slot.state);
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                match &s.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => s.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}
