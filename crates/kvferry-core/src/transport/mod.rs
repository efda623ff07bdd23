//! Moving bytes between registered regions of two agents.
//!
//! A [`Transport`] registers regions (→ a key the peer needs), publishes an [`Endpoint`], connects to
//! peers ([`PeerLink`]) and posts batches of READ/WRITE ops with an optional notification. It knows
//! nothing about KV caches, layers or tiers. Completion is reported through a shared [`Completion`].

#[cfg(feature = "cuda")]
pub mod cuda_ipc;
pub(crate) mod error;
#[cfg(feature = "fabric")]
pub mod fabric;
pub(crate) mod frame;
pub mod host;
pub(crate) mod keys;
pub(crate) mod kind;
pub(crate) mod progress;
pub mod shm;
pub mod staging;
pub mod tcp;

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::AuthError;
use crate::deadline::{Clock, Deadline, SystemClock};
use crate::error::Result;
use crate::error::code::ErrorCode;
use crate::memory::{MemKind, MemRegion};
use crate::sync::Locked;

pub use error::{RejectReason, TransferError};
pub use kind::{Endpoint, Op, TransportKind};

/// Hears of every batch a transport is handed: [`started`](Self::started), then
/// [`settled`](Self::settled) once or [`abandoned`](Self::abandoned) if it was never queued. The
/// agent's metrics are one; the transports count nothing themselves.
pub trait TransferObserver: Send + Sync {
    fn started(&self, transport: TransportKind, op: Op);
    /// `Ok(bytes)` moved, or the batch failed with `code`, `elapsed` after it was posted.
    fn settled(
        &self,
        transport: TransportKind,
        op: Op,
        elapsed: Duration,
        outcome: std::result::Result<u64, ErrorCode>,
    );
    fn abandoned(&self, transport: TransportKind, op: Op);
}

/// One op of a batch, resolved: a local address, and a remote address inside the peer's region
/// number `remote_region` (an index into the peer's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XferOp {
    pub local_addr: u64,
    pub remote_region: u32,
    pub remote_addr: u64,
    pub len: u64,
}

/// A batch handed to a [`PeerLink`]. Its op and notification travel in `completion`, where the
/// part that finishes last finds them.
pub struct Batch {
    pub ops: Vec<XferOp>,
    pub completion: Arc<Completion>,
    /// Keeps the local memory of the ops alive until the last part of the batch has finished.
    pub keep_alive: Arc<dyn Any + Send + Sync>,
}

/// A region of the peer as a transport needs it: where it is and the key that opens it.
#[derive(Debug, Clone)]
pub struct RemoteRegion {
    pub region: MemRegion,
    pub key: Vec<u8>,
}

/// What keeps a registered region's memory alive while remote requests use it: the memory itself
/// when the agent owns it (a transport may also ask it for a file to share, `Memory::share_fd`),
/// nothing for a raw registration, whose owner promised to keep it valid.
pub type MemoryOwner = Option<Arc<dyn crate::memory::Memory>>;

/// A transport's connection to one peer.
pub trait PeerLink: Send + Sync {
    /// Queue a batch; never blocks on the network. Failures after this returns are reported through
    /// the batch's completion.
    fn post(&self, batch: Batch) -> Result<()>;

    /// The largest notification this link carries, in bytes: the agent refuses a longer one
    /// before anything is sent.
    fn max_notification(&self) -> u64;

    /// How these ops will move, for transports with more than one way (the shm transport's
    /// `mapped` and `cross-memory`); reported per transfer.
    fn mode(&self, _ops: &[XferOp]) -> Option<&'static str> {
        None
    }
}

/// Moves bytes between registered regions of two agents.
pub trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;

    fn endpoint(&self) -> Endpoint;

    /// Whether this transport can move memory of this kind directly.
    fn supports(&self, kind: MemKind) -> bool;

    /// Make a region accessible to peers; returns the key they need. `owner` is held while any
    /// remote request is using the region.
    fn register(&self, region: MemRegion, owner: MemoryOwner) -> Result<Vec<u8>>;

    /// Revoke a key. Returns once no remote request is using the region any more.
    fn deregister(&self, key: &[u8]);

    /// A link to a peer, which connects lazily on first use.
    fn link(&self, peer: &str, endpoint: &Endpoint, regions: Vec<RemoteRegion>) -> Result<Arc<dyn PeerLink>>;
}

/// Refuse to register anything but host memory with a transport that moves host memory only.
pub(crate) fn require_host(transport: TransportKind, region: &MemRegion) -> Result<()> {
    if region.kind != MemKind::Host {
        return Err(crate::error::Error::Unsupported {
            what: format!("registering {} memory with the {transport} transport", region.kind),
            why: format!("the {transport} transport moves host memory only"),
        });
    }
    Ok(())
}

/// Decode the key of each of a peer's regions with `decode`; a region the peer did not open to this
/// transport has no key and maps to `None` (ops on it are refused when posted).
pub(crate) fn remote_keys<T>(
    peer: &str,
    transport: TransportKind,
    regions: &[RemoteRegion],
    decode: impl Fn(&RemoteRegion) -> Option<T>,
) -> Result<Vec<Option<T>>> {
    regions
        .iter()
        .map(|r| match r.key.is_empty() {
            true => Ok(None),
            false => decode(r).map(Some).ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!("peer {peer} sent a malformed {transport} key"))
            }),
        })
        .collect()
}

/// The one refusal, whatever the transport, of op `index` of a batch naming a remote region this
/// link holds no key for (the peer did not register it for this transport). Links find it at post,
/// before anything moves; the agent, which picks a link that has every key, normally finds it first.
pub(crate) fn no_key_on_link(peer: &str, index: usize, op: &XferOp) -> crate::error::Error {
    crate::descriptor::DescError::RemoteRegionUnknown { peer: peer.into(), index, addr: op.remote_addr, len: op.len }
        .into()
}

/// Why a link could not connect to its peer (connect, TLS, the cluster secret, the hello).
#[derive(Debug)]
pub(crate) enum ConnectError {
    Unreachable(String),
    /// The peer did not prove the cluster secret, or refused our proof.
    Unauthenticated(String),
}

impl ConnectError {
    /// The error of the part that needed the connection: an unreachable peer whose connect the
    /// batch's deadline cut short is a timeout, not proof the peer is gone.
    pub(crate) fn for_part(self, completion: &Completion, endpoint: &str) -> TransferError {
        let peer = completion.peer().to_string();
        match self {
            ConnectError::Unauthenticated(cause) => TransferError::Unauthenticated { peer, cause },
            ConnectError::Unreachable(_) if completion.expired() => completion.timeout_error(),
            ConnectError::Unreachable(cause) => {
                TransferError::PeerUnreachable { peer, endpoint: endpoint.into(), cause }
            }
        }
    }
}

impl From<AuthError> for ConnectError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Refused(why) => ConnectError::Unauthenticated(why),
            // Another protocol or version: not a peer this agent can talk to.
            AuthError::Protocol(why) => ConnectError::Unreachable(why),
            AuthError::Io(e) => ConnectError::Unreachable(format!("handshake failed: {e}")),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(why) | ConnectError::Unauthenticated(why) => f.write_str(why),
        }
    }
}

/// Random bits for a registration key, from the OS: a peer cannot guess another registration's key.
pub(crate) fn random_key<const N: usize>() -> Result<[u8; N]> {
    let mut key = [0u8; N];
    getrandom::fill(&mut key)
        .map_err(|e| crate::error::Error::Io { context: "drawing a registration key".into(), cause: e.to_string() })?;
    Ok(key)
}

/// A notification delivered after a batch's data is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent's name.
    pub from: String,
    pub data: Vec<u8>,
}

/// Where transports deliver incoming notifications; the agent drains it. Bounded in count and
/// bytes: a notification beyond them is refused to its sender, who gets `PeerBusy`.
pub struct NotificationQueue {
    queue: Mutex<Queued>,
    arrived: Condvar,
    max_count: usize,
    max_bytes: u64,
}

#[derive(Default)]
struct Queued {
    notifications: VecDeque<Notification>,
    /// Bytes of the queued notifications and of those with room held.
    bytes: u64,
    /// Notifications with room held, not yet queued.
    reserved: usize,
}

impl Default for NotificationQueue {
    fn default() -> Self {
        let limits = crate::limits::AgentLimits::default();
        NotificationQueue::with_limits(limits.max_notifications, limits.max_notification_bytes)
    }
}

impl NotificationQueue {
    /// A queue holding at most `max_count` notifications and `max_bytes` of their data.
    pub fn with_limits(max_count: usize, max_bytes: u64) -> Self {
        NotificationQueue { queue: Mutex::default(), arrived: Condvar::new(), max_count, max_bytes }
    }

    /// Queue a notification a sender is waiting on, the way every transport serves one: room is
    /// held first and `answer(room)` tells the sender queued or busy (a full queue refuses it, and
    /// the sender gets `PeerBusy`); the notification is queued only once `answer` says its answer
    /// went out (`true`), so one answered as queued is queued and one that could not be answered is
    /// not. Answering first matters: a receiver that acts on the notification by shutting down
    /// would otherwise close the connection before its sender learns it succeeded.
    pub(crate) fn deliver<R>(&self, n: Notification, answer: impl FnOnce(bool) -> (bool, R)) -> R {
        let bytes = n.data.len() as u64;
        let room = self.reserve(bytes);
        let (answered, result) = answer(room);
        match (room, answered) {
            (true, true) => {
                let mut q = self.queue.locked();
                q.reserved -= 1;
                q.notifications.push_back(n);
                self.arrived.notify_all();
            }
            (true, false) => {
                let mut q = self.queue.locked();
                q.reserved -= 1;
                q.bytes -= bytes;
            }
            (false, _) => {}
        }
        result
    }

    /// Hold room for a notification of `bytes`, if it fits.
    fn reserve(&self, bytes: u64) -> bool {
        let mut q = self.queue.locked();
        let fits =
            q.notifications.len() + q.reserved < self.max_count && q.bytes.saturating_add(bytes) <= self.max_bytes;
        if fits {
            q.bytes += bytes;
            q.reserved += 1;
        }
        fits
    }

    pub fn take(&self) -> Vec<Notification> {
        Self::drain(&mut self.queue.locked())
    }

    fn drain(q: &mut Queued) -> Vec<Notification> {
        let taken: Vec<Notification> = q.notifications.drain(..).collect();
        q.bytes -= taken.iter().map(|n| n.data.len() as u64).sum::<u64>();
        taken
    }

    /// Waits until at least one notification is queued or the deadline passes, then takes all.
    pub fn wait(&self, deadline: Deadline) -> Vec<Notification> {
        let mut q = self.queue.locked();
        while q.notifications.is_empty() && !deadline.expired() {
            q = self.arrived.wait_timeout(q, deadline.remaining()).unwrap().0;
        }
        Self::drain(&mut q)
    }
}

/// The state of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferStatus {
    InProgress,
    Done,
    Failed(TransferError),
}

/// What a finished part means for the transport that ran it.
pub enum PartOutcome {
    /// Other parts are still running.
    Pending,
    /// This was the last part and all succeeded: send the notification (if any), then call
    /// [`Completion::finish`].
    LastOk { notification: Option<Vec<u8>> },
    /// This was the last part; the batch is already finished.
    Finished,
}

/// What stops a running part when its batch is cancelled, fails or passes its deadline: it makes
/// the part's blocking calls return at once (for a socket, it shuts the socket down). It runs with
/// the batch's lock held, so it must not block.
pub type AbortHook = Arc<dyn Fn() + Send + Sync>;

/// How long a stopped batch waits for a running part before it says so in the log (it goes on
/// waiting: the part may still touch the local memory).
const STOP_WARN_AFTER: Duration = Duration::from_secs(5);

/// Completion state of one batch, shared by the transport's workers and the caller's handle.
///
/// A batch is split into parts (frames, work requests). Each part reports once through
/// [`Completion::part_done`]; the part that finishes last sends the notification and settles the
/// status, so a notification never overtakes the data it announces.
///
/// A transport that brackets every touch of local memory with [`Completion::start_part`] (and
/// says so with [`Completion::set_guarded_parts`]) gets the cut-off: when the batch is cancelled,
/// fails or passes its deadline, the abort hook of every running part is called, and `cancel`,
/// `wait` (with an error) and `status` (as failed) wait until every running part has ended, so
/// that no byte of the batch's local memory moves after they return. Parts not yet started are
/// refused by `start_part`.
pub struct Completion {
    peer: String,
    op: Op,
    deadline: Deadline,
    posted_at: Instant,
    bytes: u64,
    remaining: AtomicUsize,
    cancelled: AtomicBool,
    /// Set once running parts must stop: cancelled, failed, or settled as failed.
    stopping: AtomicBool,
    /// The transport guards its parts with `start_part`.
    guarded: AtomicBool,
    state: Mutex<CompletionState>,
    /// Signalled when the batch settles, a part reports, or a running part ends.
    settled: Condvar,
    /// Who counts the settled outcome, and as which transport's.
    observer: Option<(Arc<dyn TransferObserver>, TransportKind)>,
    /// What the deadline and the batch's duration are read on.
    clock: &'static dyn Clock,
}

struct CompletionState {
    status: TransferStatus,
    first_error: Option<TransferError>,
    notification: Option<Vec<u8>>,
    finished_at: Option<Instant>,
    /// Parts inside a [`RunningPart`] guard.
    running: Vec<Running>,
    next_part: u64,
}

struct Running {
    id: u64,
    abort: Option<AbortHook>,
    /// The abort hook has run.
    cut: bool,
}

/// A part touching the batch's local memory (or the connection that moves it); ends when dropped.
#[must_use = "the part counts as running until the guard is dropped"]
pub struct RunningPart<'a> {
    completion: &'a Completion,
    id: u64,
}

impl RunningPart<'_> {
    /// End the part. Returns whether its abort hook ran: then what the hook cut (a connection) is
    /// unusable, even if the part's own calls happened to succeed.
    pub fn end(self) -> bool {
        let cut = self.completion.end_part(self.id);
        std::mem::forget(self);
        cut
    }
}

impl Drop for RunningPart<'_> {
    fn drop(&mut self) {
        self.completion.end_part(self.id);
    }
}

impl Completion {
    pub fn new(peer: &str, op: Op, bytes: u64, notification: Option<Vec<u8>>, deadline: Deadline) -> Self {
        Completion {
            peer: peer.to_string(),
            op,
            deadline,
            posted_at: Instant::now(),
            clock: &SystemClock,
            bytes,
            remaining: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            guarded: AtomicBool::new(false),
            state: Mutex::new(CompletionState {
                status: TransferStatus::InProgress,
                first_error: None,
                notification,
                finished_at: None,
                running: Vec::new(),
                next_part: 0,
            }),
            settled: Condvar::new(),
            observer: None,
        }
    }

    /// Tell `observer` of this batch as in flight on `transport`, and of its outcome once settled.
    pub(crate) fn observed(mut self, observer: Arc<dyn TransferObserver>, transport: TransportKind) -> Self {
        observer.started(transport, self.op);
        self.observer = Some((observer, transport));
        self
    }

    /// The transport refused the batch before queuing it, so it never settles: stop counting it.
    pub(crate) fn abandon(&self) {
        if let Some((observer, transport)) = &self.observer {
            observer.abandoned(*transport, self.op);
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn op(&self) -> Op {
        self.op
    }

    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The batch is past its deadline on its clock.
    pub(crate) fn expired(&self) -> bool {
        self.deadline.expired_on(self.clock)
    }

    /// The batch read on `clock` (posted at its `now`), for tests that move time by hand.
    #[cfg(test)]
    fn on_clock(mut self, clock: &'static dyn Clock) -> Self {
        self.posted_at = clock.now();
        self.clock = clock;
        self
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Called by the transport before handing out parts.
    pub fn set_parts(&self, parts: usize) {
        self.remaining.store(parts, Ordering::Release);
    }

    /// [`set_parts`](Self::set_parts) for a transport that touches local memory only inside
    /// [`start_part`](Self::start_part) guards: stopping the batch then waits for running parts only.
    pub fn set_guarded_parts(&self, parts: usize) {
        self.guarded.store(true, Ordering::Release);
        self.set_parts(parts);
    }

    /// Why a part that has not started yet should not start: cancelled, past its deadline, or
    /// another part already failed.
    pub fn skip_reason(&self) -> Option<TransferError> {
        self.skip_reason_locked(&self.state.locked())
    }

    fn skip_reason_locked(&self, state: &CompletionState) -> Option<TransferError> {
        if self.cancelled.load(Ordering::Acquire) {
            return Some(self.cancelled_error());
        }
        if self.expired() {
            return Some(self.timeout_error());
        }
        if let TransferStatus::Failed(e) = &state.status {
            return Some(e.clone());
        }
        state.first_error.clone()
    }

    /// Begin a part that touches local memory, or refuse it (as [`skip_reason`](Self::skip_reason)
    /// would). `abort` is called, at most once, if the batch stops while the part runs; it must
    /// make the part's blocking calls return at once. Whoever stops the batch waits for the guard.
    pub fn start_part(&self, abort: Option<AbortHook>) -> std::result::Result<RunningPart<'_>, TransferError> {
        let mut state = self.state.locked();
        if let Some(e) = self.skip_reason_locked(&state) {
            return Err(e);
        }
        let id = state.next_part;
        state.next_part += 1;
        state.running.push(Running { id, abort, cut: false });
        Ok(RunningPart { completion: self, id })
    }

    /// Whether running parts should stop now: checked by a part between its blocking calls.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.expired()
    }

    fn end_part(&self, id: u64) -> bool {
        let mut state = self.state.locked();
        let at = state.running.iter().position(|r| r.id == id).expect("a running part ends once");
        let part = state.running.swap_remove(at);
        // Only a stopped batch waits for its running parts to end (`wait_stopped`): waking the
        // caller's `wait` at every part's end would cost each transfer a context switch.
        if state.status != TransferStatus::InProgress || self.stopping.load(Ordering::Acquire) {
            self.settled.notify_all();
        }
        part.cut
    }

    /// Cut every running part off (once each).
    fn abort_running(&self, state: &mut CompletionState) {
        self.stopping.store(true, Ordering::Release);
        for part in state.running.iter_mut().filter(|p| !p.cut) {
            part.cut = true;
            if let Some(abort) = &part.abort {
                abort();
            }
        }
    }

    /// Wait until no part runs. Not bounded by a deadline: a running part may still move bytes of
    /// the local memory, and its abort hook makes it end at once (by contract of the transport).
    fn wait_stopped<'a>(&self, mut state: MutexGuard<'a, CompletionState>) -> MutexGuard<'a, CompletionState> {
        let since = Instant::now();
        let mut warned = false;
        while !state.running.is_empty() {
            state = self.settled.wait_timeout(state, STOP_WARN_AFTER).unwrap().0;
            if !warned && !state.running.is_empty() && since.elapsed() >= STOP_WARN_AFTER {
                tracing::warn!(
                    peer = %self.peer, op = %self.op, parts = state.running.len(),
                    "parts of a stopped transfer are still running; waiting for them to leave its memory"
                );
                warned = true;
            }
        }
        state
    }

    pub fn timeout_error(&self) -> TransferError {
        TransferError::Timeout { peer: self.peer.clone(), op: self.op }
    }

    fn cancelled_error(&self) -> TransferError {
        TransferError::Cancelled { peer: self.peer.clone(), op: self.op }
    }

    /// Report one part's outcome. A failed part cuts off the parts still running.
    pub fn part_done(&self, result: std::result::Result<(), TransferError>) -> PartOutcome {
        let mut state = self.state.locked();
        if let Err(e) = result {
            state.first_error.get_or_insert(e);
            self.abort_running(&mut state);
        }
        // `wait` is woken when the batch settles; only a cancel of an unguarded batch, which sets
        // `stopping` under this lock first, waits for the parts to report.
        if self.stopping.load(Ordering::Acquire) {
            self.settled.notify_all();
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return PartOutcome::Pending;
        }
        if let Some(e) = state.first_error.clone() {
            self.settle(&mut state, TransferStatus::Failed(e));
            return PartOutcome::Finished;
        }
        if self.cancelled.load(Ordering::Acquire) {
            let e = self.cancelled_error();
            self.settle(&mut state, TransferStatus::Failed(e));
            return PartOutcome::Finished;
        }
        PartOutcome::LastOk { notification: state.notification.take() }
    }

    /// Report a part's outcome the way every blocking transport does: the last part of a batch
    /// that succeeded sends the notification with `notify` (synchronously, so a notification never
    /// overtakes its data) and settles the batch with its outcome.
    pub(crate) fn settle_part(
        &self,
        result: std::result::Result<(), TransferError>,
        notify: impl FnOnce(Vec<u8>) -> std::result::Result<(), TransferError>,
    ) {
        if let PartOutcome::LastOk { notification } = self.part_done(result) {
            self.finish(notification.map_or(Ok(()), notify));
        }
    }

    /// Fail a part its link's progress threads refused (the transport is shutting down, or no
    /// thread could be started); the link cannot move it.
    pub(crate) fn refuse_part(&self) {
        let cause = "the transport is shutting down or could not start a progress thread".to_string();
        let e = TransferError::PeerDisconnected { peer: self.peer.clone(), op: self.op, cause };
        // A failed part settles the batch as failed if it was the last; nothing else to do.
        let _ = self.part_done(Err(e));
    }

    /// Settle the batch after a [`PartOutcome::LastOk`] (with the notification's outcome).
    pub fn finish(&self, result: std::result::Result<(), TransferError>) {
        let mut state = self.state.locked();
        let status = match result {
            Ok(()) => TransferStatus::Done,
            Err(e) => TransferStatus::Failed(e),
        };
        self.settle(&mut state, status);
    }

    fn settle(&self, state: &mut CompletionState, status: TransferStatus) {
        // A waiter that gave up at the deadline has already settled the batch as timed out.
        if state.status == TransferStatus::InProgress {
            let now = self.clock.now();
            if let Some((observer, transport)) = &self.observer {
                let outcome = match &status {
                    TransferStatus::Failed(e) => Err(e.code()),
                    _ => Ok(self.bytes),
                };
                observer.settled(*transport, self.op, now - self.posted_at, outcome);
            }
            if matches!(status, TransferStatus::Failed(_)) {
                self.abort_running(state);
            }
            state.status = status;
            state.finished_at = Some(now);
        }
        self.settled.notify_all();
    }

    /// The batch's state. A batch that failed reads as in progress until its running parts have
    /// ended (they are being cut off), so a failure seen here means its memory is free.
    pub fn status(&self) -> TransferStatus {
        let mut state = self.state.locked();
        if state.status == TransferStatus::InProgress && self.expired() {
            let e = self.timeout_error();
            self.settle(&mut state, TransferStatus::Failed(e));
        }
        if !state.running.is_empty() && matches!(state.status, TransferStatus::Failed(_)) {
            return TransferStatus::InProgress;
        }
        state.status.clone()
    }

    /// Block until the batch settles or its deadline passes.
    pub fn wait(&self) -> std::result::Result<(), TransferError> {
        self.wait_until(self.deadline).unwrap_or_else(|| unreachable!("the batch settles by its own deadline"))
    }

    /// Block until the batch settles, its deadline passes, or `until` passes first; `None` when the
    /// batch is still running at `until` (a caller's shorter wait, not a failure). A failure is
    /// returned once the running parts it cut off have ended.
    pub fn wait_until(&self, until: Deadline) -> Option<std::result::Result<(), TransferError>> {
        let mut state = self.state.locked();
        while state.status == TransferStatus::InProgress {
            if self.expired() {
                let e = self.timeout_error();
                self.settle(&mut state, TransferStatus::Failed(e));
                break;
            }
            if until < self.deadline && until.expired_on(self.clock) {
                return None;
            }
            state = self.settled.wait_timeout(state, until.min(self.deadline).remaining_on(self.clock)).unwrap().0;
        }
        match state.status.clone() {
            TransferStatus::Done => Some(Ok(())),
            TransferStatus::Failed(e) => {
                drop(self.wait_stopped(state));
                Some(Err(e))
            }
            TransferStatus::InProgress => unreachable!("loop exits only once settled"),
        }
    }

    /// Ask the transport to stop: parts not yet started are skipped, running guarded parts are cut
    /// off. Returns once no guarded part runs any more, so the local memory is no longer touched.
    /// For a transport that does not guard its parts, returns once every part has reported or the
    /// deadline passed.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let mut state = self.state.locked();
        if self.guarded.load(Ordering::Acquire) {
            let e = self.cancelled_error();
            self.settle(&mut state, TransferStatus::Failed(e));
            // Already settled (failed, or done with nothing running): cut whatever still runs.
            self.abort_running(&mut state);
            drop(self.wait_stopped(state));
            return;
        }
        self.stopping.store(true, Ordering::Release);
        while self.remaining.load(Ordering::Acquire) > 0 && !self.expired() {
            state = self.settled.wait_timeout(state, self.deadline.remaining_on(self.clock)).unwrap().0;
        }
        if state.status == TransferStatus::InProgress {
            let e = self.cancelled_error();
            self.settle(&mut state, TransferStatus::Failed(e));
        }
    }

    /// Cancel, then wait until no part touches the local memory however long that takes: for a
    /// transport that guards its parts that is `cancel` itself (bounded by the cut-off); for one
    /// that does not, until every part has reported (bounded only by the transport).
    pub(crate) fn stop(&self) {
        self.cancel();
        let mut state = self.state.locked();
        let since = Instant::now();
        let mut warned = false;
        while !self.guarded.load(Ordering::Acquire) && self.remaining.load(Ordering::Acquire) > 0 {
            state = self.settled.wait_timeout(state, STOP_WARN_AFTER).unwrap().0;
            if !warned && since.elapsed() >= STOP_WARN_AFTER {
                tracing::warn!(peer = %self.peer, op = %self.op, "a cancelled transfer has parts still in the transport; waiting");
                warned = true;
            }
        }
    }

    /// Settle the batch as failed now, for a peer known to be gone: parts not yet started are
    /// skipped and running guarded parts are cut off (waiters return once those have ended). A
    /// part a transport does not guard ends on its own (by its deadline at the latest); the batch
    /// keeps its local memory registered until then.
    pub fn fail(&self, error: TransferError) {
        let mut state = self.state.locked();
        self.settle(&mut state, TransferStatus::Failed(error));
    }

    pub(crate) fn is_settled(&self) -> bool {
        self.state.locked().status != TransferStatus::InProgress
    }

    /// Time from post to settle, once settled.
    pub fn elapsed(&self) -> Option<Duration> {
        self.state.locked().finished_at.map(|t| t - self.posted_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock a test moves by hand.
    struct ManualClock(Mutex<Instant>);

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.locked()
        }
    }

    impl ManualClock {
        fn leaked() -> &'static ManualClock {
            Box::leak(Box::new(ManualClock(Mutex::new(Instant::now()))))
        }

        fn advance(&self, by: Duration) {
            *self.0.locked() += by;
        }
    }

    #[test]
    fn a_batch_passes_its_deadline_when_its_clock_does_and_no_sooner() {
        let clock = ManualClock::leaked();
        let deadline = Deadline::at(clock.now() + Duration::from_secs(10));
        let batch = Completion::new("p", Op::Write, 64, None, deadline).on_clock(clock);
        batch.set_guarded_parts(2);
        let part = batch.start_part(None).unwrap();
        assert!(!part.end(), "nothing cut it off");
        clock.advance(Duration::from_secs(9));
        assert_eq!(batch.status(), TransferStatus::InProgress, "a second before the deadline");
        assert!(batch.skip_reason().is_none() && !batch.stopping());
        clock.advance(Duration::from_secs(1));
        assert!(batch.stopping(), "at the deadline");
        assert!(matches!(batch.skip_reason(), Some(TransferError::Timeout { .. })));
        assert!(batch.start_part(None).is_err(), "no part starts past the deadline");
        assert!(matches!(batch.status(), TransferStatus::Failed(TransferError::Timeout { .. })));
        assert_eq!(batch.elapsed(), Some(Duration::from_secs(10)), "timed on its clock");
    }

    #[test]
    fn a_batch_that_settles_before_its_deadline_is_timed_on_its_clock() {
        let clock = ManualClock::leaked();
        let deadline = Deadline::at(clock.now() + Duration::from_secs(10));
        let batch = Completion::new("p", Op::Read, 64, None, deadline).on_clock(clock);
        batch.set_parts(1);
        clock.advance(Duration::from_millis(2500));
        batch.settle_part(Ok(()), |_| unreachable!("no notification"));
        clock.advance(Duration::from_secs(60));
        assert_eq!(batch.status(), TransferStatus::Done, "done stays done past the deadline");
        assert_eq!(batch.elapsed(), Some(Duration::from_millis(2500)));
    }

    /// Every transport refuses, with the one error for it, a batch naming a peer's region that
    /// the peer did not open to that transport (its key is empty), before anything moves.
    #[test]
    fn every_transport_refuses_a_region_without_its_key_with_one_error() {
        use crate::auth::Auth;
        use crate::memory::host::{HostAllocOptions, HostBuffer};
        let auth = || Auth::disabled();
        let queue = || Arc::new(NotificationQueue::default());
        #[cfg_attr(not(feature = "fabric"), allow(unused_mut))]
        let mut transports: Vec<(Box<dyn Transport>, Box<dyn Transport>)> = vec![
            (
                Box::new(tcp::TcpTransport::start("a", tcp::TcpConfig::default(), auth(), queue()).unwrap()),
                Box::new(tcp::TcpTransport::start("b", tcp::TcpConfig::default(), auth(), queue()).unwrap()),
            ),
            (
                Box::new(shm::ShmTransport::start("a", shm::ShmConfig::default(), auth(), queue()).unwrap()),
                Box::new(shm::ShmTransport::start("b", shm::ShmConfig::default(), auth(), queue()).unwrap()),
            ),
        ];
        #[cfg(feature = "fabric")]
        {
            let config = fabric::FabricConfig { provider: Some("tcp".into()), ..fabric::FabricConfig::default() };
            transports.push((
                Box::new(fabric::FabricTransport::start("a", config.clone(), auth(), queue()).unwrap()),
                Box::new(fabric::FabricTransport::start("b", config, auth(), queue()).unwrap()),
            ));
        }
        let options = HostAllocOptions { pin: false, ..Default::default() };
        let (local, remote) = (
            Arc::new(HostBuffer::alloc(8192, &options).unwrap()),
            Arc::new(HostBuffer::alloc(8192, &options).unwrap()),
        );
        for (a, b) in &transports {
            let kind = a.kind();
            a.register(local.region(), Some(local.clone())).unwrap();
            let opened = b.register(remote.region(), Some(remote.clone())).unwrap();
            let regions = vec![
                RemoteRegion { region: remote.region(), key: opened },
                RemoteRegion { region: remote.region(), key: Vec::new() },
            ];
            let link = a.link("b", &b.endpoint(), regions).unwrap();
            let op = |remote_region| XferOp {
                local_addr: local.as_ptr() as u64,
                remote_region,
                remote_addr: remote.as_ptr() as u64 + 4096,
                len: 64,
            };
            let completion =
                Arc::new(Completion::new("b", Op::Write, 128, None, Deadline::after(Duration::from_secs(5))));
            let batch = Batch { ops: vec![op(0), op(1)], completion: completion.clone(), keep_alive: local.clone() };
            let refused = link.post(batch).expect_err(&format!("{kind} posted a batch without a key"));
            assert_eq!(refused.code(), ErrorCode::RemoteRegionUnknown, "{kind}: {refused}");
            assert!(refused.to_string().contains("descriptor 1"), "{kind} names the op: {refused}");
        }
    }

    #[test]
    fn a_wait_shorter_than_the_deadline_leaves_the_batch_running() {
        let batch = Completion::new("peer", Op::Read, 0, None, Deadline::after(Duration::from_secs(30)));
        batch.set_parts(1);
        assert!(batch.wait_until(Deadline::after(Duration::from_millis(20))).is_none());
        assert_eq!(batch.status(), TransferStatus::InProgress);
        assert!(matches!(batch.part_done(Ok(())), PartOutcome::LastOk { .. }));
        batch.finish(Ok(()));
        assert!(matches!(batch.wait_until(Deadline::after(Duration::ZERO)), Some(Ok(()))));

        // A wait reaching past the deadline settles the batch as timed out, as `wait` does.
        let late = Completion::new("peer", Op::Write, 0, None, Deadline::after(Duration::from_millis(20)));
        late.set_parts(1);
        let outcome = late.wait_until(Deadline::after(Duration::from_secs(30)));
        assert!(matches!(outcome, Some(Err(TransferError::Timeout { .. }))), "{outcome:?}");
    }

    #[test]
    fn stopping_a_batch_cuts_its_running_parts_and_waits_for_them() {
        let batch = Arc::new(Completion::new("peer", Op::Read, 0, None, Deadline::after(Duration::from_secs(30))));
        batch.set_guarded_parts(2);
        let (cut_tx, cut_rx) = std::sync::mpsc::channel();
        let hook: AbortHook = Arc::new(move || cut_tx.send(()).unwrap());
        let running = batch.clone();
        let left = Arc::new(AtomicBool::new(false));
        let leaving = left.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let part = std::thread::spawn(move || {
            let guard = running.start_part(Some(hook)).unwrap();
            started_tx.send(()).unwrap();
            // The part "blocks" until its abort hook has run, as a socket call does until shutdown.
            while !running.stopping() {
                std::thread::yield_now();
            }
            leaving.store(true, Ordering::Release);
            assert!(guard.end(), "the hook ran");
        });
        started_rx.recv().unwrap();
        batch.cancel();
        // `cancel` returned: the hook ran and the part had left before.
        cut_rx.try_recv().unwrap();
        assert!(left.load(Ordering::Acquire));
        part.join().unwrap();
        assert!(matches!(batch.start_part(None), Err(TransferError::Cancelled { .. })));
        assert!(matches!(batch.status(), TransferStatus::Failed(TransferError::Cancelled { .. })));
    }

    #[test]
    fn a_failed_batch_reads_as_running_until_its_parts_have_ended() {
        let batch = Completion::new("peer", Op::Write, 0, None, Deadline::after(Duration::from_secs(30)));
        batch.set_guarded_parts(2);
        let guard = batch.start_part(None).unwrap();
        batch.fail(TransferError::Protocol { peer: "peer".into(), detail: "gone".into() });
        assert!(batch.stopping());
        assert_eq!(batch.status(), TransferStatus::InProgress);
        drop(guard);
        assert!(matches!(batch.status(), TransferStatus::Failed(TransferError::Protocol { .. })));
    }
}
