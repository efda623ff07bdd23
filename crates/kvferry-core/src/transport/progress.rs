//! A transport's progress threads: one fixed pool, started on first use, that runs the work of
//! every link, so an agent's thread count does not grow with its peers.
//!
//! A link's work is cut into [`Lane`]s (a TCP stream, an shm connection): a lane is a queue run
//! in order by one thread at a time, so what it holds (its connection, what was granted on it)
//! needs no lock of its own and a job queued after another runs after it. Every job must end by a
//! deadline of its own (all of a transport's I/O is bounded by the batch's), since a thread running
//! a stalled peer's job serves no other lane meanwhile.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::sync::Locked;

/// What a lane runs: its jobs, in order, with the state it keeps between them.
pub(crate) trait LaneWork: Send + 'static {
    type Job: Send + 'static;
    /// What a progress thread keeps between jobs of any lane (scratch buffers), so that it costs
    /// per thread rather than per lane.
    type Scratch: Default;
    fn run(&mut self, job: Self::Job, scratch: &mut Self::Scratch);
    /// No job was queued for the pool's idle time: let go of what is held for the next one (a
    /// connection, which the next job makes again).
    fn idle(&mut self) {}
}

/// Jobs a thread runs from one lane before it lets other lanes' jobs go first.
const TURN: usize = 16;

pub(crate) struct Progress<W: LaneWork> {
    pool: Arc<Pool<W>>,
}

struct Pool<W: LaneWork> {
    /// Threads are named `<name>-<n>`.
    name: String,
    max_threads: usize,
    /// Lanes with nothing queued for this long are told so ([`LaneWork::idle`]).
    idle_after: Option<Duration>,
    state: Mutex<PoolState<W>>,
    wake: Condvar,
}

struct PoolState<W: LaneWork> {
    /// Lanes with queued jobs that no thread runs yet, each once.
    ready: VecDeque<Arc<LaneShared<W>>>,
    threads: Vec<JoinHandle<()>>,
    /// Threads waiting for a ready lane.
    waiting: usize,
    stopped: bool,
    /// Every lane, when lanes are told of idleness.
    lanes: Vec<Weak<LaneShared<W>>>,
    swept_at: Instant,
}

/// One queue of a link's work on its transport's progress threads.
pub(crate) struct Lane<W: LaneWork> {
    shared: Arc<LaneShared<W>>,
}

struct LaneShared<W: LaneWork> {
    pool: Arc<Pool<W>>,
    queue: Mutex<LaneQueue<W::Job>>,
    /// Taken only by the thread running the lane (one at a time, as `scheduled` says).
    work: Mutex<W>,
}

struct LaneQueue<J> {
    items: VecDeque<Item<J>>,
    /// In the pool's ready queue or being run: jobs pushed meanwhile are run by that turn.
    scheduled: bool,
    last_job: Instant,
    /// An idle item was queued since the last job.
    told_idle: bool,
}

enum Item<J> {
    Job(J),
    Idle,
}

impl<W: LaneWork> Progress<W> {
    /// A pool of at most `max_threads` threads (at least one), none started yet.
    pub fn new(name: &str, max_threads: usize, idle_after: Option<Duration>) -> Progress<W> {
        let state = PoolState {
            ready: VecDeque::new(),
            threads: Vec::new(),
            waiting: 0,
            stopped: false,
            lanes: Vec::new(),
            swept_at: Instant::now(),
        };
        let pool = Pool {
            name: name.to_string(),
            max_threads: max_threads.max(1),
            idle_after,
            state: Mutex::new(state),
            wake: Condvar::new(),
        };
        Progress { pool: Arc::new(pool) }
    }

    /// A new lane running `work`'s jobs on this pool.
    pub fn lane(&self, work: W) -> Lane<W> {
        let queue = LaneQueue { items: VecDeque::new(), scheduled: false, last_job: Instant::now(), told_idle: true };
        let shared = Arc::new(LaneShared { pool: self.pool.clone(), queue: Mutex::new(queue), work: Mutex::new(work) });
        if self.pool.idle_after.is_some() {
            let mut state = self.pool.state.locked();
            state.lanes.retain(|lane| lane.strong_count() > 0);
            state.lanes.push(Arc::downgrade(&shared));
        }
        Lane { shared }
    }

    /// Threads started so far.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.pool.state.locked().threads.len()
    }
}

impl<W: LaneWork> Drop for Progress<W> {
    /// Jobs already queued still run (each ends by its deadline); the threads are joined once
    /// they have, and later jobs are refused.
    fn drop(&mut self) {
        let threads = {
            let mut state = self.pool.state.locked();
            state.stopped = true;
            std::mem::take(&mut state.threads)
        };
        self.pool.wake.notify_all();
        let me = thread::current().id();
        for t in threads {
            // The last owner may be a job on one of these threads: that one ends by itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl<W: LaneWork> Lane<W> {
    /// Queue a job after the lane's others. The job comes back when it cannot run: the transport
    /// is shutting down, or no thread could be started.
    pub fn submit(&self, job: W::Job) -> Result<(), W::Job> {
        let wake = {
            let mut queue = self.shared.queue.locked();
            queue.items.push_back(Item::Job(job));
            queue.last_job = Instant::now();
            queue.told_idle = false;
            if queue.scheduled {
                return Ok(());
            }
            // An unscheduled lane has nothing queued: the job just pushed is the only one.
            let Ok(wake) = self.shared.pool.schedule(&self.shared) else {
                let Some(Item::Job(job)) = queue.items.pop_back() else { unreachable!("pushed above") };
                return Err(job);
            };
            queue.scheduled = true;
            wake
        };
        // Woken only once both locks are free, so that the thread it wakes does not block on them.
        self.shared.pool.wake_one(wake);
        Ok(())
    }
}

impl<W: LaneWork> Pool<W> {
    /// Put a lane in the ready queue and see that a thread comes for it: `Ok(true)` when a
    /// waiting thread is to be woken, which the caller does with [`wake_one`](Self::wake_one) once
    /// it has let go of its locks. The caller holds the lane's queue lock (the lock order is lane,
    /// then pool).
    fn schedule(self: &Arc<Self>, lane: &Arc<LaneShared<W>>) -> Result<bool, ()> {
        let mut state = self.state.locked();
        if state.stopped {
            return Err(());
        }
        state.ready.push_back(lane.clone());
        if state.ready.len() <= state.waiting || state.threads.len() == self.max_threads {
            return Ok(true);
        }
        let pool = self.clone();
        let spawned =
            thread::Builder::new().name(format!("{}-{}", self.name, state.threads.len())).spawn(move || pool.serve());
        match spawned {
            Ok(thread) => state.threads.push(thread),
            Err(e) if state.threads.is_empty() => {
                tracing::error!(pool = %self.name, "cannot start a progress thread: {e}");
                state.ready.pop_back();
                return Err(());
            }
            // The threads already running take the lane in turn.
            Err(e) => tracing::warn!(pool = %self.name, "cannot start another progress thread: {e}"),
        }
        Ok(false)
    }

    fn wake_one(&self, wake: bool) {
        if wake {
            self.wake.notify_one();
        }
    }

    fn serve(self: Arc<Self>) {
        let mut scratch = W::Scratch::default();
        let mut state = self.state.locked();
        loop {
            if let Some(lane) = state.ready.pop_front() {
                drop(state);
                lane.run_turn(&mut scratch);
                state = self.state.locked();
                continue;
            }
            if state.stopped {
                return;
            }
            let Some(idle) = self.idle_after else {
                state.waiting += 1;
                state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                state.waiting -= 1;
                continue;
            };
            if state.swept_at.elapsed() >= idle / 2 {
                state.swept_at = Instant::now();
                let lanes: Vec<_> = state.lanes.iter().filter_map(Weak::upgrade).collect();
                drop(state);
                for lane in lanes {
                    lane.tell_if_idle(idle);
                }
                state = self.state.locked();
                continue;
            }
            state.waiting += 1;
            state = self.wake.wait_timeout(state, idle / 2).unwrap_or_else(PoisonError::into_inner).0;
            state.waiting -= 1;
        }
    }
}

impl<W: LaneWork> LaneShared<W> {
    /// Run queued jobs, a turn's worth at a time; a lane with more goes to the back of the ready
    /// queue (or, once the pool has stopped, is finished by this thread).
    fn run_turn(self: &Arc<Self>, scratch: &mut W::Scratch) {
        loop {
            let mut work = self.work.locked();
            for _ in 0..TURN {
                let item = {
                    let mut queue = self.queue.locked();
                    match queue.items.pop_front() {
                        Some(item) => item,
                        None => {
                            queue.scheduled = false;
                            return;
                        }
                    }
                };
                // A panic is a bug in one job: it must not take the thread (and every lane after
                // it) along.
                let ran = catch_unwind(AssertUnwindSafe(|| match item {
                    Item::Job(job) => work.run(job, scratch),
                    Item::Idle => work.idle(),
                }));
                if ran.is_err() {
                    tracing::error!(pool = %self.pool.name, "a progress job panicked");
                }
            }
            drop(work);
            let mut queue = self.queue.locked();
            if queue.items.is_empty() {
                queue.scheduled = false;
                return;
            }
            if let Ok(wake) = self.pool.schedule(self) {
                drop(queue);
                self.pool.wake_one(wake);
                return;
            }
        }
    }

    /// Queue an idle item on a lane that has had no job for `idle` and was not told yet.
    fn tell_if_idle(self: &Arc<Self>, idle: Duration) {
        let mut queue = self.queue.locked();
        if queue.scheduled || queue.told_idle || queue.last_job.elapsed() < idle {
            return;
        }
        if let Ok(wake) = self.pool.schedule(self) {
            queue.items.push_back(Item::Idle);
            queue.scheduled = true;
            queue.told_idle = true;
            drop(queue);
            self.pool.wake_one(wake);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// Records each job's lane and value, and idle calls.
    struct Recorder {
        lane: usize,
        seen: mpsc::Sender<(usize, Option<u32>)>,
    }

    impl LaneWork for Recorder {
        type Job = u32;
        type Scratch = ();
        fn run(&mut self, job: u32, _: &mut ()) {
            self.seen.send((self.lane, Some(job))).unwrap();
        }
        fn idle(&mut self) {
            self.seen.send((self.lane, None)).unwrap();
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn many_lanes_share_the_pool_and_each_runs_its_jobs_in_order() {
        let progress = Progress::new("kvf-test-order", 3, None);
        let (tx, rx) = mpsc::channel();
        let lanes: Vec<_> = (0..50).map(|lane| progress.lane(Recorder { lane, seen: tx.clone() })).collect();
        for job in 0..40 {
            for lane in &lanes {
                lane.submit(job).map_err(|_| ()).unwrap();
            }
        }
        let mut next = vec![0u32; lanes.len()];
        for _ in 0..lanes.len() * 40 {
            let (lane, job) = rx.recv_timeout(WAIT).unwrap();
            assert_eq!(job, Some(next[lane]), "lane {lane} ran a job out of order");
            next[lane] += 1;
        }
        assert!(progress.threads() <= 3, "{} threads", progress.threads());
    }

    #[test]
    fn a_pool_starts_no_thread_before_its_first_job() {
        let progress: Progress<Recorder> = Progress::new("kvf-test-lazy", 4, None);
        let (tx, rx) = mpsc::channel();
        let lane = progress.lane(Recorder { lane: 0, seen: tx });
        assert_eq!(progress.threads(), 0);
        lane.submit(7).map_err(|_| ()).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, Some(7)));
        assert_eq!(progress.threads(), 1);
    }

    #[test]
    fn a_lane_without_jobs_is_told_it_is_idle_once() {
        let progress = Progress::new("kvf-test-idle", 1, Some(Duration::from_millis(40)));
        let (tx, rx) = mpsc::channel();
        let lane = progress.lane(Recorder { lane: 0, seen: tx });
        lane.submit(1).map_err(|_| ()).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, Some(1)));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, None), "told once the idle time passed");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "told only once");
        lane.submit(2).map_err(|_| ()).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, Some(2)));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (0, None), "and again after the next job");
    }

    struct Blocking(Arc<(Mutex<bool>, Condvar)>, Arc<AtomicUsize>);

    impl LaneWork for Blocking {
        type Job = ();
        type Scratch = ();
        fn run(&mut self, _: (), _: &mut ()) {
            let (open, cond) = &*self.0;
            let guard = open.locked();
            let _open = cond.wait_while(guard, |open| !*open).unwrap();
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_dropped_pool_runs_what_was_queued_and_refuses_the_rest() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let progress = Progress::new("kvf-test-stop", 1, None);
        let lane = progress.lane(Blocking(gate.clone(), done.clone()));
        for _ in 0..3 {
            lane.submit(()).unwrap();
        }
        let opener = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            *gate.0.locked() = true;
            gate.1.notify_all();
        });
        drop(progress);
        assert_eq!(done.load(Ordering::SeqCst), 3, "the drop waited for the queued jobs");
        assert!(lane.submit(()).is_err(), "a stopped pool refuses jobs");
        opener.join().unwrap();
    }
}
