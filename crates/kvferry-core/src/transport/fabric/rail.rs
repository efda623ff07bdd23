//! One rail: a libfabric domain with its RDM endpoint, completion queue and address vector, owned by
//! one progress thread. Every libfabric call on the rail runs on that thread, so the domain can be
//! opened with `FI_THREAD_DOMAIN` (no locks inside the provider); other threads hand it commands.
//!
//! **Staging.** A posted RMA cannot be taken back, and where the provider moves bytes with the
//! processes' CPUs (`Info::staged`: `tcp`, `shm`) a stopped or slow peer can make one land long
//! after its batch was cancelled or timed out. On such rails every operation of host memory goes
//! through a buffer of its own (one per message, freed when the provider returns the operation):
//! a WRITE's bytes are copied into it before the post, a READ's out of it after the completion,
//! each copy inside [`Completion::start_part`], which a stopped batch refuses and waits for. So
//! once `cancel` returns or `wait` fails, no byte moves into or out of the batch's memory,
//! whatever the peer does; what lands late lands in the staging buffer.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kvferry_fabric_sys as sys;

use super::session::{self, Incoming, Sessions};
use super::{FabricError, Info, LocalRegistry, c_text, check, fi_error_text, transfer_error};
use crate::auth::Auth;
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::limits::LogLimiter;
use crate::memory::{MemKind, MemRegion};
use crate::sync::{Locked, ReadWriteLocked};
use crate::transport::{Completion, NotificationQueue, Op, PartOutcome, RejectReason, TransferError};

/// Posted receive buffers per rail for notifications, and the size of each: the sender's name
/// (`u16` length), the largest notification, and room for a sealed message's envelope.
const RECV_SLOTS: usize = 16;
const MESSAGE_BYTES: usize = 2 + u16::MAX as usize + super::MAX_NOTIFICATION as usize;
const RECV_SLOT_BYTES: usize = MESSAGE_BYTES + ENVELOPE_BYTES;
/// A sealed message's envelope at most: kind, initiator, counter, the sender's address (a rail's
/// own address; libfabric's are far shorter) and the tag.
const ENVELOPE_BYTES: usize = 1024;
/// Completion entries read per `fi_cq_read`.
const CQ_BATCH: usize = 64;
/// How long an idle rail waits in `fi_cq_sread` (or sleeps, where the provider has no wait object)
/// before polling again. Peers' requests to this rail need its progress on providers with manual
/// progress, so an idle rail still polls.
const IDLE_WAIT_MS: i32 = 100;
const IDLE_SLEEP: Duration = Duration::from_micros(50);
/// Busy-poll this long after the last activity before waiting: back-to-back transfers then see no
/// wake-up latency.
const SPIN_AFTER_ACTIVITY: Duration = Duration::from_millis(2);
/// How long posting a receive buffer or an answer to a peer's check may wait for queue space.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Zeros after a peer's address given to `fi_av_insert`: libfabric's fixed-size address formats
/// (sockaddrs, EFA's, PSM's, CXI's, ...) are no longer than a `sockaddr_storage`, and a string
/// ends at the first zero.
const ADDRESS_PAD: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// One remote access of a part, resolved for this rail.
pub(super) struct RailOp {
    pub local_addr: u64,
    pub local_desc: usize,
    pub remote_addr: u64,
    pub remote_key: u64,
    pub len: u64,
}

/// The share of a batch that runs on one rail.
pub(super) struct Part {
    pub op: Op,
    pub dest: sys::fi_addr_t,
    /// The peer rail's address, which its session is known by.
    pub peer_address: Arc<[u8]>,
    pub ops: Vec<RailOp>,
    pub completion: Arc<Completion>,
    /// Held, never read: keeps the batch's local memory alive while the part runs.
    pub _keep_alive: Arc<dyn Any + Send + Sync>,
    /// The sending agent's name, put in front of a notification.
    pub from: Arc<str>,
    pub endpoint: Arc<str>,
    /// Remote regions to confirm with their owner before the first access (see [`Check`]).
    pub checks: Vec<Check>,
    /// The link's verdict per remote region, updated from the owner's answer.
    pub verdicts: Arc<[AtomicU8]>,
}

/// A remote region (index `region` in the peer's metadata) whose keys this link has not yet
/// confirmed with the peer. Providers differ in how they report a refused access (`shm` 1.17 never
/// answers one; `tcp;ofi_rxm` drops the connection), so the owner confirms each region's keys and
/// range once per link, and a forged descriptor fails with a typed rejection before any access.
pub(super) struct Check {
    pub region: u32,
    /// The first op of the batch that uses the region, for the error.
    pub first_op: u32,
    pub addr: u64,
    pub len: u64,
    pub keys: Vec<u64>,
}

/// A region's verdict: not yet asked, confirmed, or `REFUSED + RejectReason::to_wire()`.
pub(super) const UNCHECKED: u8 = 0;
pub(super) const CONFIRMED: u8 = 1;
pub(super) const REFUSED: u8 = 16;

/// The reason a verdict refuses a region; `None` for `UNCHECKED`, `CONFIRMED`, or a byte that is no
/// reason (only a peer's answer can carry one).
pub(super) fn refusal(verdict: u8) -> Option<RejectReason> {
    verdict.checked_sub(REFUSED).and_then(RejectReason::from_wire)
}

/// The most regions one check message asks about: it must fit a receive buffer with every rail's
/// key for each region (17 + 8 × rails bytes each).
pub(super) const MAX_CHECKS: usize = (MESSAGE_BYTES - 64) / (17 + 8 * super::MAX_RAILS);

/// Message kinds, the first byte of every message between rails; 4 to 7 are the session's
/// handshake (`session.rs`). Kind 1, a notification that was not acknowledged, is dropped as
/// malformed.
const MSG_CHECK: u8 = 2;
const MSG_CHECKED: u8 = 3;
const MSG_NOTIFY: u8 = 8;
const MSG_NOTIFIED: u8 = 9;

/// How a receiver answers a notification (`MSG_NOTIFIED`): queued, or refused for a full queue.
const NOTIFY_QUEUED: u8 = 0;
const NOTIFY_BUSY: u8 = 1;

/// What a rail may hold (`FabricConfig::max_answers`, `staging_kept_bytes`): answers to checks
/// and notifications in flight (a peer that floods us gets no answer beyond them, its batches
/// time out, and a notification that goes unanswered is not queued), and staging buffers kept
/// for reuse.
#[derive(Debug, Clone, Copy)]
pub(super) struct RailLimits {
    pub max_answers: usize,
    pub staging_kept: usize,
}

pub(super) struct RegisteredMr {
    pub id: u64,
    pub key: u64,
    pub desc: usize,
}

/// An open libfabric object, closed (`fi_close`) when dropped. Owners drop an object before the
/// one it was opened on or bound to: a registration or endpoint before its domain, say.
struct Fid<T: FiObject>(ptr::NonNull<T>);

/// libfabric's object types.
///
/// # Safety
/// `#[repr(C)]` structures that begin with their `struct fid`, so a pointer to one is a pointer to
/// its `fid`.
unsafe trait FiObject {}

// SAFETY: each of these begins with `fid: fid` (see the bindings).
unsafe impl FiObject for sys::fid_fabric {}
// SAFETY: as above.
unsafe impl FiObject for sys::fid_domain {}
// SAFETY: as above.
unsafe impl FiObject for sys::fid_cq {}
// SAFETY: as above.
unsafe impl FiObject for sys::fid_av {}
// SAFETY: as above.
unsafe impl FiObject for sys::fid_ep {}
// SAFETY: as above.
unsafe impl FiObject for sys::fid_mr {}

impl<T: FiObject> Fid<T> {
    /// The object `open` opens: a libfabric call that writes it to the pointer it is given and
    /// returns 0, or returns an error code (reported as `call`'s).
    ///
    /// # Safety
    /// When `open` returns 0, it has written an open object that nothing else closes.
    unsafe fn open(call: &'static str, open: impl FnOnce(*mut *mut T) -> i32) -> Result<Fid<T>> {
        let mut raw = ptr::null_mut();
        check(call, open(&mut raw))?;
        let detail = "it returned no object".to_string();
        ptr::NonNull::new(raw).map(Fid).ok_or_else(|| FabricError::Call { call, code: 0, detail }.into())
    }

    fn as_ptr(&self) -> *mut T {
        self.0.as_ptr()
    }

    fn fid(&self) -> *mut sys::fid {
        self.0.as_ptr().cast()
    }
}

impl<T: FiObject> Drop for Fid<T> {
    fn drop(&mut self) {
        // SAFETY: an open object this `Fid` alone owns (see `open`), so closed once.
        unsafe { sys::kvferry_fi_close(self.fid()) };
    }
}

/// A memory registration. Its owner keeps the memory alive until it is closed, and closes it
/// while the domain is open.
type Registration = Fid<sys::fid_mr>;

impl Registration {
    fn key(&self) -> u64 {
        // SAFETY: an open registration.
        unsafe { sys::kvferry_fi_mr_key(self.as_ptr()) }
    }

    fn desc(&self) -> *mut libc::c_void {
        // SAFETY: an open registration.
        unsafe { sys::kvferry_fi_mr_desc(self.as_ptr()) }
    }
}

/// The local descriptor of `mr`: null for memory that is not registered.
fn desc_of(mr: Option<&Registration>) -> *mut libc::c_void {
    mr.map_or(ptr::null_mut(), Registration::desc)
}

enum Command {
    Register {
        region: MemRegion,
        requested_key: u64,
        reply: mpsc::Sender<Result<RegisteredMr>>,
    },
    Deregister {
        id: u64,
        reply: mpsc::Sender<()>,
    },
    Insert {
        address: Vec<u8>,
        reply: mpsc::Sender<Result<sys::fi_addr_t>>,
    },
    Post(Part),
    /// Send these bytes as they are, as a peer that does not follow the protocol would.
    #[cfg(test)]
    Raw {
        to: Vec<u8>,
        message: Vec<u8>,
    },
}

/// The handle other threads hold: a command queue and what they need to know about the rail.
pub(super) struct Rail {
    pub info: Info,
    /// This rail's endpoint name, as peers insert it into their address vectors.
    pub address: Arc<[u8]>,
    /// Bytes of remote accesses posted on this rail.
    pub bytes: Arc<AtomicU64>,
    queue: Arc<CommandQueue>,
    thread: Option<thread::JoinHandle<()>>,
    /// Every message received, as it arrived, once handled.
    #[cfg(test)]
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

struct CommandQueue {
    commands: Mutex<VecDeque<Command>>,
    posted: Condvar,
    stop: AtomicBool,
    /// The completion queue, for `fi_cq_signal` (which may be called from any thread) to wake a
    /// progress thread blocked in `fi_cq_sread`; 0 when the provider has no wait object, and from
    /// just before the progress thread closes it.
    wakeable_cq: Mutex<usize>,
}

impl CommandQueue {
    fn push(&self, c: Command) {
        self.commands.locked().push_back(c);
        self.wake();
    }

    fn wake(&self) {
        self.posted.notify_one();
        let cq = self.wakeable_cq.locked();
        if *cq != 0 {
            // SAFETY: `fi_cq_signal` may be called from any thread, and the queue is open: the
            // progress thread zeroes `wakeable_cq` under this lock before closing it.
            unsafe { sys::kvferry_fi_cq_signal(*cq as *mut sys::fid_cq) };
        }
    }
}

impl Rail {
    pub fn open(
        info: Info,
        index: usize,
        limits: RailLimits,
        notifications: Arc<NotificationQueue>,
        registry: LocalRegistry,
        auth: Auth,
    ) -> Result<Rail> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_info = info.clone();
        let bytes = Arc::new(AtomicU64::new(0));
        let thread_bytes = bytes.clone();
        #[cfg(test)]
        let received = Arc::new(Mutex::new(Vec::new()));
        #[cfg(test)]
        let thread_received = received.clone();
        let thread = thread::Builder::new()
            .name(format!("kvferry-fabric-{index}"))
            .spawn(move || match Objects::open(&thread_info) {
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
                Ok(objects) => {
                    let queue = Arc::new(CommandQueue {
                        commands: Mutex::new(VecDeque::new()),
                        posted: Condvar::new(),
                        stop: AtomicBool::new(false),
                        wakeable_cq: Mutex::new(if objects.cq_waits { objects.cq.as_ptr() as usize } else { 0 }),
                    });
                    let sessions = Sessions::new(auth, objects.address.clone());
                    let progress = Progress::new(
                        objects,
                        thread_info,
                        limits,
                        queue.clone(),
                        notifications,
                        thread_bytes,
                        registry,
                        sessions,
                    );
                    let mut progress = match progress {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    #[cfg(test)]
                    {
                        progress.received = thread_received;
                    }
                    let _ = ready_tx.send(Ok((progress.objects.address.clone(), queue)));
                    progress.run();
                }
            })
            .map_err(|e| Error::io("starting a fabric progress thread", e))?;
        let (address, queue) = ready_rx
            .recv()
            .map_err(|_| Error::Io { context: "starting a fabric rail".into(), cause: "thread exited".into() })??;
        Ok(Rail {
            info,
            address: address.into(),
            bytes,
            queue,
            thread: Some(thread),
            #[cfg(test)]
            received,
        })
    }

    fn call<T>(&self, make: impl FnOnce(mpsc::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.queue.push(make(tx));
        rx.recv().ok()
    }

    pub fn register(&self, region: MemRegion, requested_key: u64) -> Result<RegisteredMr> {
        self.call(|reply| Command::Register { region, requested_key, reply }).unwrap_or_else(|| Err(stopped()))
    }

    pub fn deregister(&self, id: u64) {
        self.call(|reply| Command::Deregister { id, reply });
    }

    pub fn insert(&self, address: Vec<u8>) -> Result<sys::fi_addr_t> {
        self.call(|reply| Command::Insert { address, reply }).unwrap_or_else(|| Err(stopped()))
    }

    pub fn post(&self, part: Part) {
        self.queue.push(Command::Post(part));
    }

    #[cfg(test)]
    pub fn send_raw(&self, to: &[u8], message: Vec<u8>) {
        self.queue.push(Command::Raw { to: to.to_vec(), message });
    }
}

fn stopped() -> Error {
    Error::Io { context: "using a fabric rail".into(), cause: "its progress thread has stopped".into() }
}

impl Drop for Rail {
    fn drop(&mut self) {
        self.queue.stop.store(true, Ordering::Release);
        self.queue.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The libfabric objects of a rail. Fields drop in declaration order: the endpoint before the
/// address vector and completion queue bound to it, those before their domain, the domain before
/// its fabric.
struct Objects {
    /// `None` once closed, at shutdown (see `Progress`'s `Drop`).
    ep: Option<Fid<sys::fid_ep>>,
    av: Fid<sys::fid_av>,
    cq: Fid<sys::fid_cq>,
    domain: Fid<sys::fid_domain>,
    /// Held, never read: the domain's fabric, closed last.
    _fabric: Fid<sys::fid_fabric>,
    /// Whether the completion queue has a wait object (`fi_cq_sread`, `fi_cq_signal` work).
    cq_waits: bool,
    address: Vec<u8>,
}

impl Objects {
    /// Opened in order; on a failure, what is already open closes in reverse order.
    fn open(info: &Info) -> Result<Objects> {
        let raw = info.raw();
        // SAFETY: `raw` is the entry `info` owns, which the call only reads.
        let fabric = unsafe { Fid::open("fi_fabric", |out| sys::fi_fabric((*raw).fabric_attr, out, ptr::null_mut())) }?;
        // SAFETY: an open fabric, and the entry it was opened from.
        let domain = unsafe {
            Fid::open("fi_domain", |out| sys::kvferry_fi_domain(fabric.as_ptr(), raw, out, ptr::null_mut()))
        }?;
        // SAFETY: plain data, for which zero is the default.
        let mut cq_attr: sys::fi_cq_attr = unsafe { std::mem::zeroed() };
        cq_attr.format = sys::FI_CQ_FORMAT_DATA;
        cq_attr.wait_obj = sys::FI_WAIT_UNSPEC;
        let open_cq = |cq_attr: &mut sys::fi_cq_attr| {
            // SAFETY: an open domain; `cq_attr` is valid for the call.
            unsafe {
                Fid::open("fi_cq_open", |out| sys::kvferry_fi_cq_open(domain.as_ptr(), cq_attr, out, ptr::null_mut()))
            }
        };
        // A wait object lets an idle rail sleep in the kernel; providers without one are polled.
        let (cq, cq_waits) = match open_cq(&mut cq_attr) {
            Ok(cq) => (cq, true),
            Err(_) => {
                cq_attr.wait_obj = sys::FI_WAIT_NONE;
                (open_cq(&mut cq_attr)?, false)
            }
        };
        // SAFETY: plain data, for which zero is the default.
        let mut av_attr: sys::fi_av_attr = unsafe { std::mem::zeroed() };
        av_attr.type_ = sys::FI_AV_TABLE;
        // SAFETY: an open domain; `av_attr` is valid for the call.
        let av = unsafe {
            Fid::open("fi_av_open", |out| sys::kvferry_fi_av_open(domain.as_ptr(), &mut av_attr, out, ptr::null_mut()))
        }?;
        // SAFETY: an open domain, and the entry it was opened from.
        let ep = unsafe {
            Fid::open("fi_endpoint", |out| sys::kvferry_fi_endpoint(domain.as_ptr(), raw, out, ptr::null_mut()))
        }?;
        // SAFETY: an open endpoint and address vector of one domain.
        check("fi_ep_bind(av)", unsafe { sys::kvferry_fi_ep_bind(ep.as_ptr(), av.fid(), 0) })?;
        let cq_flags = (sys::FI_TRANSMIT | sys::FI_RECV) as u64;
        // SAFETY: an open endpoint and completion queue of one domain.
        check("fi_ep_bind(cq)", unsafe { sys::kvferry_fi_ep_bind(ep.as_ptr(), cq.fid(), cq_flags) })?;
        // SAFETY: an open endpoint, bound to its address vector and completion queue.
        check("fi_enable", unsafe { sys::kvferry_fi_enable(ep.as_ptr()) })?;
        let mut len = 0usize;
        // The first call reports the length (-FI_ETOOSMALL), the second fills the name.
        // SAFETY: an open endpoint; with no buffer, only `len` is written.
        unsafe { sys::kvferry_fi_getname(ep.fid(), ptr::null_mut(), &mut len) };
        let mut address = vec![0u8; len];
        // SAFETY: an open endpoint; `address` is valid for writes of `len` bytes, the most written.
        check("fi_getname", unsafe { sys::kvferry_fi_getname(ep.fid(), address.as_mut_ptr().cast(), &mut len) })?;
        address.truncate(len);
        Ok(Objects { ep: Some(ep), av, cq, domain, _fabric: fabric, cq_waits, address })
    }
}

/// A posted operation's context. `fi_context2` comes first: providers that ask for `FI_CONTEXT2`
/// use that space while the operation runs.
#[repr(C)]
struct OpContext {
    scratch: sys::fi_context2,
    what: Pending,
}

enum Pending {
    /// Ops `staging.ops` (or the message's ops, unstaged) of a part.
    Access {
        run: Rc<RefCell<PartRun>>,
        staging: Option<Staging>,
    },
    /// A message, and what its completion means.
    Send {
        sent: Sent,
        /// Before the message, so it closes before the memory it registers is freed.
        _mr: Option<Registration>,
        _message: Vec<u8>,
    },
    Recv {
        slot: usize,
    },
}

/// Staging buffers come in powers of two from this size, and a rail keeps some for reuse
/// ([`RailLimits::staging_kept`]): allocating, faulting in and registering a buffer per message
/// would cost more than the copy.
const MIN_STAGING: usize = 64 << 10;

/// A staging buffer and its registration (every provider gets one: some pick faster protocols for
/// registered memory). Dropped only while the domain is open; the registration closes first.
struct StagingBuf {
    mr: Option<Registration>,
    buf: Vec<u8>,
}

/// One message's staging (see the module's comment): its first `len` bytes carry the part's
/// ops `ops`, in order.
struct Staging {
    held: StagingBuf,
    len: usize,
    ops: std::ops::Range<usize>,
}

/// What a message is, for what its send completion does.
enum Purpose {
    /// Nothing waits for it (a handshake message, a check).
    Plain,
    /// An answer to a peer's check or notification: counted against [`RailLimits::max_answers`].
    Answer,
    /// A notification: its batch settles on the receiver's answer (`MSG_NOTIFIED`), or fails if
    /// the send does.
    Notify { query: u64, peer: Arc<[u8]>, completion: Arc<Completion> },
}

/// A posted message's [`Purpose`], as its send completion needs it.
enum Sent {
    Plain,
    Answer,
    Notify(u64),
}

/// A part whose operations are in flight.
struct PartRun {
    part: Part,
    in_flight: usize,
    /// Every op has been posted (no further completions will be added).
    all_posted: bool,
    error: Option<TransferError>,
}

/// A message for a peer, waiting for its session to open.
struct Waiting {
    kind: u8,
    payload: Vec<u8>,
    dest: sys::fi_addr_t,
    /// The batch it belongs to: its deadline bounds the wait.
    completion: Arc<Completion>,
    /// A check's query id (its part is parked under it), or a notification's (its answer names it).
    query: u64,
}

impl Waiting {
    /// What sending it means, to the peer rail at `peer`.
    fn purpose(&self, peer: &[u8]) -> Purpose {
        match self.kind {
            MSG_NOTIFY => Purpose::Notify { query: self.query, peer: peer.into(), completion: self.completion.clone() },
            _ => Purpose::Plain,
        }
    }
}

/// State owned by the progress thread.
struct Progress {
    objects: Objects,
    info: Info,
    queue: Arc<CommandQueue>,
    notifications: Arc<NotificationQueue>,
    mrs: HashMap<u64, Registration>,
    next_mr: u64,
    /// Contexts handed to libfabric and not yet returned by a completion, freed at shutdown.
    live: HashSet<usize>,
    recv_buffer: Vec<u8>,
    recv_mr: Option<Registration>,
    last_activity: Instant,
    bytes: Arc<AtomicU64>,
    /// The transport's registrations, to answer peers' checks.
    registry: LocalRegistry,
    /// Peers' rail addresses already in the address vector (for answers).
    known: HashMap<Vec<u8>, sys::fi_addr_t>,
    /// Parts waiting for the answer to their check, by query id.
    parked: HashMap<u64, Part>,
    /// Notifications sent and not yet answered, by query id: the peer rail asked, and the batch.
    notifying: HashMap<u64, (Arc<[u8]>, Arc<Completion>)>,
    limits: RailLimits,
    /// Answers posted and not yet completed (at most [`RailLimits::max_answers`]).
    answers_in_flight: usize,
    /// Operations go through staging buffers (see the module's comment).
    staged: bool,
    /// Staging buffers not in use, by size, and their bytes (at most [`RailLimits::staging_kept`]).
    staging_pool: HashMap<usize, Vec<StagingBuf>>,
    staging_kept: usize,
    unanswered_log: LogLimiter,
    /// Each peer's session (see `session`), when messages are authenticated.
    sessions: Sessions,
    /// Messages waiting for a session with the peer (by its address) to open.
    waiting: HashMap<Arc<[u8]>, Vec<Waiting>>,
    #[cfg(test)]
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    next_query: u64,
    /// The latest deadline of the parts posted so far: past it, operations still in flight are
    /// stuck with a dead peer and no longer worth a spinning core.
    spin_until: Option<Deadline>,
}

impl Progress {
    #[allow(clippy::too_many_arguments)] // what the progress thread owns, each handed over once
    fn new(
        objects: Objects,
        info: Info,
        limits: RailLimits,
        queue: Arc<CommandQueue>,
        notifications: Arc<NotificationQueue>,
        bytes: Arc<AtomicU64>,
        registry: LocalRegistry,
        sessions: Sessions,
    ) -> Result<Progress> {
        let staged = info.staged();
        let mut p = Progress {
            objects,
            info,
            queue,
            notifications,
            mrs: HashMap::new(),
            next_mr: 1,
            live: HashSet::new(),
            recv_buffer: vec![0u8; RECV_SLOTS * RECV_SLOT_BYTES],
            recv_mr: None,
            last_activity: Instant::now(),
            bytes,
            registry,
            known: HashMap::new(),
            parked: HashMap::new(),
            notifying: HashMap::new(),
            limits,
            answers_in_flight: 0,
            staged,
            staging_pool: HashMap::new(),
            staging_kept: 0,
            unanswered_log: LogLimiter::per_second(),
            sessions,
            waiting: HashMap::new(),
            #[cfg(test)]
            received: Arc::default(),
            next_query: 1,
            spin_until: None,
        };
        if p.info.mr_local() {
            let region = MemRegion::host(p.recv_buffer.as_ptr(), p.recv_buffer.len());
            p.recv_mr = Some(p.reg_mr(region, 0, sys::FI_RECV as u64)?);
        }
        for slot in 0..RECV_SLOTS {
            p.post_recv(slot)?;
        }
        Ok(p)
    }

    fn run(&mut self) {
        let mut entries = empty_entries();
        while !self.queue.stop.load(Ordering::Acquire) {
            let mut busy = self.drain_commands();
            busy |= self.poll(&mut entries) > 0;
            self.expire_waiting();
            self.expire_parked();
            self.expire_notifying();
            if busy {
                self.last_activity = Instant::now();
            } else if (self.live.len() > RECV_SLOTS && self.spin_until.is_some_and(|d| !d.expired()))
                || !self.parked.is_empty()
                || !self.waiting.is_empty()
                || self.last_activity.elapsed() < SPIN_AFTER_ACTIVITY
            {
                // Operations in flight, or recent traffic: keep polling, but let the other side
                // of a same-host transfer run.
                thread::yield_now();
            } else {
                self.idle(&mut entries);
            }
        }
    }

    /// Wait for a completion or a command without spinning.
    fn idle(&mut self, entries: &mut [sys::fi_cq_data_entry; CQ_BATCH]) {
        if self.objects.cq_waits {
            let cq = self.objects.cq.as_ptr();
            // SAFETY: an open completion queue with a wait object, and room for `CQ_BATCH` entries
            // of its format (`FI_CQ_FORMAT_DATA`); no wait condition.
            let n = unsafe {
                sys::kvferry_fi_cq_sread(cq, entries.as_mut_ptr().cast(), CQ_BATCH, ptr::null(), IDLE_WAIT_MS)
            };
            if n > 0 {
                self.last_activity = Instant::now();
            }
            self.handle_read(n, entries);
            return;
        }
        let commands = self.queue.commands.locked();
        if commands.is_empty() {
            let _ = self.queue.posted.wait_timeout(commands, IDLE_SLEEP);
        }
    }

    fn drain_commands(&mut self) -> bool {
        let mut any = false;
        loop {
            let Some(command) = self.queue.commands.locked().pop_front() else { return any };
            any = true;
            match command {
                Command::Register { region, requested_key, reply } => {
                    let access = (sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64;
                    let result = self.reg_mr(region, requested_key, access).map(|mr| {
                        let id = self.next_mr;
                        self.next_mr += 1;
                        let registered = RegisteredMr { id, key: mr.key(), desc: mr.desc() as usize };
                        self.mrs.insert(id, mr);
                        registered
                    });
                    let _ = reply.send(result);
                }
                Command::Deregister { id, reply } => {
                    // Dropping the registration closes it.
                    self.mrs.remove(&id);
                    let _ = reply.send(());
                }
                Command::Insert { address, reply } => {
                    let _ = reply.send(self.av_insert(&address));
                }
                Command::Post(part) => self.start(part),
                #[cfg(test)]
                Command::Raw { to, message } => {
                    if let Some(dest) = self.address_of(&to) {
                        let _ = self.send(dest, message, Purpose::Plain, Deadline::after(HOUSEKEEPING));
                    }
                }
            }
        }
    }

    fn av_insert(&mut self, address: &[u8]) -> Result<sys::fi_addr_t> {
        // libfabric takes an address's length from its bytes (a sockaddr's family, a string's
        // end), and peers supply `address`: zeros after it keep what is read inside the buffer.
        let mut padded = address.to_vec();
        padded.resize(address.len() + ADDRESS_PAD, 0);
        let mut fi_addr: sys::fi_addr_t = sys::FI_ADDR_UNSPEC;
        let av = self.objects.av.as_ptr();
        // SAFETY: an open address vector; the one address read lies inside `padded` (see
        // `ADDRESS_PAD`), and one entry is written to `fi_addr`.
        let ret = unsafe { sys::kvferry_fi_av_insert(av, padded.as_ptr().cast(), 1, &mut fi_addr, 0, ptr::null_mut()) };
        match ret {
            1 => Ok(fi_addr),
            r => Err(FabricError::Call { call: "fi_av_insert", code: r.min(0), detail: fi_error_text(r) }.into()),
        }
    }

    /// Register memory with this rail's domain, honouring the provider's `mr_mode`.
    fn reg_mr(&mut self, region: MemRegion, requested_key: u64, access: u64) -> Result<Registration> {
        let iov = libc::iovec { iov_base: region.addr as *mut libc::c_void, iov_len: region.len as usize };
        // SAFETY: plain data, for which zero is the default.
        let mut attr: sys::fi_mr_attr = unsafe { std::mem::zeroed() };
        attr.mr_iov = (&iov as *const libc::iovec).cast();
        attr.iov_count = 1;
        attr.access = access;
        // Without FI_MR_PROV_KEY the caller picks the key; with it the provider does.
        attr.requested_key = requested_key;
        match region.kind {
            MemKind::Host => attr.iface = sys::FI_HMEM_SYSTEM,
            MemKind::Cuda { device } => {
                attr.iface = sys::FI_HMEM_CUDA;
                attr.device.cuda = device as i32;
            }
            MemKind::Rocm { device } => {
                attr.iface = sys::FI_HMEM_ROCR;
                attr.device.reserved = device as u64;
            }
        }
        let domain = self.objects.domain.as_ptr();
        // SAFETY: an open domain; `attr` and the iovec it points to are valid for the call. The
        // region's memory outlives the registration (see `Registration`).
        let mr = unsafe { Fid::open("fi_mr_regattr", |out| sys::kvferry_fi_mr_regattr(domain, &attr, 0, out)) }?;
        // FI_MR_ENDPOINT: a region is usable only once bound to the endpoint and enabled (on a
        // failure, dropping `mr` closes it).
        if self.info.mr_mode() & sys::FI_MR_ENDPOINT as i32 != 0 {
            let ep = self.objects.ep.as_ref().ok_or_else(stopped)?;
            // SAFETY: an open registration, and an open endpoint of its domain.
            check("fi_mr_bind", unsafe { sys::kvferry_fi_mr_bind(mr.as_ptr(), ep.fid(), 0) })?;
            // SAFETY: an open registration, bound to the endpoint.
            check("fi_mr_enable", unsafe { sys::kvferry_fi_mr_enable(mr.as_ptr()) })?;
        }
        Ok(mr)
    }

    fn post_recv(&mut self, slot: usize) -> Result<()> {
        let ctx = self.context(Pending::Recv { slot });
        // SAFETY: `slot < RECV_SLOTS`, so the slot lies inside `recv_buffer`.
        let base = unsafe { self.recv_buffer.as_mut_ptr().add(slot * RECV_SLOT_BYTES) };
        let iov = libc::iovec { iov_base: base.cast(), iov_len: RECV_SLOT_BYTES };
        let mut desc = desc_of(self.recv_mr.as_ref());
        let msg = sys::fi_msg {
            msg_iov: (&iov as *const libc::iovec).cast(),
            desc: &mut desc,
            iov_count: 1,
            addr: sys::FI_ADDR_UNSPEC,
            context: ctx.cast(),
            data: 0,
        };
        // SAFETY: `ep` is open; `msg` and what it points to are valid for the call. The slot and
        // `ctx` stay valid until the receive completes or the endpoint closes (first, at shutdown).
        let ret = self.retry(Deadline::after(HOUSEKEEPING), |ep| unsafe { sys::kvferry_fi_recvmsg(ep, &msg, 0) });
        if ret != 0 {
            self.forget(ctx);
            return check("fi_recvmsg", ret as i32);
        }
        Ok(())
    }

    /// A context to hand to libfabric with an operation, until [`forget`](Self::forget) takes it
    /// back.
    fn context(&mut self, what: Pending) -> *mut OpContext {
        let scratch = sys::fi_context2 { internal: [ptr::null_mut(); 8] };
        let ctx = Box::into_raw(Box::new(OpContext { scratch, what }));
        self.live.insert(ctx as usize);
        ctx
    }

    /// Take back a context libfabric is done with (its operation completed or was never posted,
    /// or the endpoint is closed); `None` if `ctx` is not a live one.
    fn forget(&mut self, ctx: *mut OpContext) -> Option<Pending> {
        if !self.live.remove(&(ctx as usize)) {
            return None;
        }
        // SAFETY: a live context is a box `context` leaked, and leaves `live` once, here.
        Some(unsafe { Box::from_raw(ctx) }.what)
    }

    /// Post with `post`, progressing the completion queue while the provider's queue is full, until
    /// `deadline` (a peer that went away can leave a provider answering `FI_EAGAIN` for good).
    fn retry(&mut self, deadline: Deadline, mut post: impl FnMut(*mut sys::fid_ep) -> isize) -> isize {
        // Room for completions only once the queue turns out full: most posts go through first time.
        let mut entries = None;
        loop {
            let Some(ep) = self.objects.ep.as_ref() else {
                // Closed at shutdown, when nothing is posted any more.
                return -(sys::FI_ECANCELED as isize);
            };
            let ret = post(ep.as_ptr());
            if ret != -(sys::FI_EAGAIN as isize) {
                return ret;
            }
            if deadline.expired() {
                return -(sys::FI_ETIMEDOUT as isize);
            }
            self.poll(entries.get_or_insert_with(empty_entries));
        }
    }

    /// Post every op of a part, `FI_MORE` on all but the last so the provider can batch them.
    fn start(&mut self, part: Part) {
        if let Some(e) = part.completion.skip_reason() {
            return self.part_finished(part, Some(e));
        }
        if !part.checks.is_empty() {
            return self.send_check(part);
        }
        if part.ops.is_empty() {
            return self.part_finished(part, None);
        }
        // Up to `per_message` ops share one message (local and remote scatter-gather lists of equal
        // lengths pair up in order), which cuts the provider's per-message work.
        let per_message = self.info.max_iov();
        let ordered_writes = self.info.ordered_writes();
        let (op, dest, count, deadline) = (part.op, part.dest, part.ops.len(), part.completion.deadline());
        self.spin_until = Some(self.spin_until.map_or(deadline, |d| d.max(deadline)));
        let completion = part.completion.clone();
        let run = Rc::new(RefCell::new(PartRun { part, in_flight: 0, all_posted: false, error: None }));
        let mut first = 0;
        while first < count {
            let last = (first + per_message).min(count);
            let (mut iov, mut desc, rma): (Vec<libc::iovec>, Vec<*mut libc::c_void>, Vec<sys::fi_rma_iov>) = {
                let r = run.borrow();
                let ops = &r.part.ops[first..last];
                (
                    ops.iter()
                        .map(|o| libc::iovec { iov_base: o.local_addr as *mut libc::c_void, iov_len: o.len as usize })
                        .collect(),
                    ops.iter().map(|o| o.local_desc as *mut libc::c_void).collect(),
                    ops.iter()
                        .map(|o| sys::fi_rma_iov { addr: o.remote_addr, len: o.len as usize, key: o.remote_key })
                        .collect(),
                )
            };
            let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
            let staging = match self.staged {
                false => None,
                true => match self.stage(&completion, &run.borrow().part.ops, first..last, len) {
                    Ok(staging) => Some(staging),
                    Err(e) => {
                        run.borrow_mut().error.get_or_insert(e);
                        break;
                    }
                },
            };
            if let Some(st) = &staging {
                iov = vec![libc::iovec { iov_base: st.held.buf.as_ptr() as *mut libc::c_void, iov_len: st.len }];
                desc = vec![desc_of(st.held.mr.as_ref())];
            }
            let ctx = self.context(Pending::Access { run: run.clone(), staging });
            let msg = sys::fi_msg_rma {
                msg_iov: iov.as_ptr().cast(),
                desc: desc.as_mut_ptr(),
                iov_count: iov.len(),
                addr: dest,
                rma_iov: rma.as_ptr(),
                rma_iov_count: rma.len(),
                context: ctx.cast(),
                data: 0,
            };
            let more = if last < count { sys::FI_MORE as u64 } else { 0 };
            // A part's writes complete only once the data is in the target's memory, so the
            // notification sent after the batch cannot overtake it. Where the provider applies
            // writes in order, asking that of the last write covers the ones before it.
            let delivered = match ordered_writes && last < count {
                true => 0,
                false => sys::FI_DELIVERY_COMPLETE as u64,
            };
            let ret = match op {
                // SAFETY: `ep` is open; `msg` and the lists it points to are valid for the call.
                // The local memory (the batch's, which the part holds, or the staging buffer the
                // context holds) and `ctx` stay valid until the write completes or the endpoint
                // closes.
                Op::Write => self.retry(deadline, |ep| unsafe { sys::kvferry_fi_writemsg(ep, &msg, more | delivered) }),
                // SAFETY: as for a write.
                _ => self.retry(deadline, |ep| unsafe { sys::kvferry_fi_readmsg(ep, &msg, more) }),
            };
            if ret != 0 {
                self.forget(ctx);
                let call = if op == Op::Write { "fi_writemsg" } else { "fi_readmsg" };
                let detail = format!("{call}: {}", fi_error_text(ret as i32));
                let e = transfer_error(&run.borrow().part, (-ret) as i32, detail);
                run.borrow_mut().error.get_or_insert(e);
                break;
            }
            run.borrow_mut().in_flight += 1;
            self.bytes.fetch_add(len, Ordering::Relaxed);
            first = last;
        }
        run.borrow_mut().all_posted = true;
        self.maybe_finish(run);
    }

    /// A staging buffer for ops `ops` of a part (`len` bytes), holding their bytes for a WRITE.
    /// Refused, as the batch would refuse a part, once the batch has stopped.
    fn stage(
        &mut self,
        completion: &Completion,
        all: &[RailOp],
        ops: std::ops::Range<usize>,
        len: u64,
    ) -> std::result::Result<Staging, TransferError> {
        let len = len as usize;
        let mut held = self.take_staging(len).map_err(|e| TransferError::Protocol {
            peer: completion.peer().to_string(),
            detail: format!("a staging buffer: {e}"),
        })?;
        if completion.op() == Op::Write {
            let _touching = completion.start_part(None)?;
            let mut at = 0;
            for o in &all[ops.clone()] {
                // SAFETY: the op's local range lies in memory the batch holds, which no one
                // reclaims while it runs (the guard keeps a stop waiting for this copy); the
                // buffer has room for the ops' `len` bytes.
                unsafe {
                    ptr::copy_nonoverlapping(o.local_addr as *const u8, held.buf.as_mut_ptr().add(at), o.len as usize)
                };
                at += o.len as usize;
            }
        }
        Ok(Staging { held, len, ops })
    }

    /// A registered staging buffer of at least `len` bytes, reused if one is free.
    fn take_staging(&mut self, len: usize) -> Result<StagingBuf> {
        let size = len.next_power_of_two().max(MIN_STAGING);
        if let Some(held) = self.staging_pool.get_mut(&size).and_then(Vec::pop) {
            self.staging_kept -= size;
            return Ok(held);
        }
        let buf = vec![0u8; size];
        let access = (sys::FI_READ | sys::FI_WRITE) as u64;
        // A random key, as for registrations: providers that let us choose keys want them unique.
        let key = u64::from_le_bytes(crate::transport::random_key()?);
        let mr = match self.reg_mr(MemRegion::host(buf.as_ptr(), buf.len()), key, access) {
            Ok(mr) => Some(mr),
            // Providers that need no local registration move unregistered memory too.
            Err(_) if !self.info.mr_local() => None,
            Err(e) => return Err(e),
        };
        Ok(StagingBuf { mr, buf })
    }

    /// Keep a staging buffer the provider has returned for the next message, within
    /// [`RailLimits::staging_kept`].
    fn recycle(&mut self, held: StagingBuf) {
        let size = held.buf.len();
        if self.staging_kept + size <= self.limits.staging_kept {
            self.staging_kept += size;
            self.staging_pool.entry(size).or_default().push(held);
        }
    }

    /// A staged READ's bytes, copied into the batch's memory unless the batch has stopped.
    fn unstage(run: &RefCell<PartRun>, staging: &Staging) -> std::result::Result<(), TransferError> {
        let r = run.borrow();
        let _touching = r.part.completion.start_part(None)?;
        let mut at = 0;
        for o in &r.part.ops[staging.ops.clone()] {
            // SAFETY: as in `stage`, the other way.
            unsafe {
                ptr::copy_nonoverlapping(staging.held.buf.as_ptr().add(at), o.local_addr as *mut u8, o.len as usize)
            };
            at += o.len as usize;
        }
        Ok(())
    }

    /// Finish the part once every op is posted and back; `run` is then its last reference.
    fn maybe_finish(&mut self, run: Rc<RefCell<PartRun>>) {
        let done = {
            let r = run.borrow();
            r.all_posted && r.in_flight == 0
        };
        if !done {
            return;
        }
        let Ok(run) = Rc::try_unwrap(run).map(RefCell::into_inner) else {
            return;
        };
        self.part_finished(run.part, run.error);
    }

    /// Report a part to its batch; the last part of a successful batch sends its notification.
    fn part_finished(&mut self, part: Part, error: Option<TransferError>) {
        let completion = part.completion.clone();
        match completion.part_done(error.map_or(Ok(()), Err)) {
            PartOutcome::LastOk { notification: Some(data) } => self.send_notification(&part, data),
            PartOutcome::LastOk { notification: None } => completion.finish(Ok(())),
            PartOutcome::Pending | PartOutcome::Finished => {}
        }
        // Dropping the part releases the batch's hold on its local memory.
    }

    /// `query u64 | reply_len u16 | our rail's address | name_len u16 | name | data`: the receiver
    /// answers the query to that address once it has queued the notification or refused it.
    fn send_notification(&mut self, part: &Part, data: Vec<u8>) {
        let query = self.next_query;
        self.next_query += 1;
        let address = &self.objects.address;
        let mut payload = Vec::with_capacity(12 + address.len() + part.from.len() + data.len());
        payload.extend_from_slice(&query.to_le_bytes());
        payload.extend_from_slice(&(address.len() as u16).to_le_bytes());
        payload.extend_from_slice(address);
        payload.extend_from_slice(&(part.from.len() as u16).to_le_bytes());
        payload.extend_from_slice(part.from.as_bytes());
        payload.extend_from_slice(&data);
        let w = Waiting { kind: MSG_NOTIFY, payload, dest: part.dest, completion: part.completion.clone(), query };
        if let Err((code, detail)) = self.send_message(&part.peer_address, w) {
            part.completion.finish(Err(transfer_error(part, code, detail)));
        }
    }

    /// Send `w` to the peer rail at `peer`: as it is without authentication, sealed in the session
    /// with the peer where one is open, or once one opens (beginning it if need be).
    fn send_message(&mut self, peer: &Arc<[u8]>, w: Waiting) -> std::result::Result<(), (i32, String)> {
        let deadline = w.completion.deadline();
        if !self.sessions.enabled() {
            let message = [&[w.kind][..], &w.payload].concat();
            return self.send(w.dest, message, w.purpose(peer), deadline);
        }
        if let Some(message) = self.sessions.seal(peer, w.kind, &w.payload) {
            return self.send(w.dest, message, w.purpose(peer), deadline);
        }
        let dest = w.dest;
        self.waiting.entry(peer.clone()).or_default().push(w);
        if !self.sessions.initiating(peer) {
            let hello = self.sessions.hello(peer);
            if let Err((code, detail)) = self.send(dest, hello, Purpose::Plain, deadline) {
                self.sessions.forget(peer, false);
                let waiting = self.waiting.remove(peer).unwrap_or_default();
                // The message just queued reports through the caller; the others here.
                let mut waiting = waiting.into_iter().rev();
                waiting.next();
                for w in waiting {
                    let e = super::classify(w.completion.peer(), w.completion.op(), "", code, detail.clone());
                    self.fail_waiting(w, e);
                }
                return Err((code, detail));
            }
        }
        Ok(())
    }

    /// A session with `peer` opened: send what waits for it.
    fn flush(&mut self, peer: &[u8]) {
        for w in self.waiting.remove(peer).unwrap_or_default() {
            if let Some(e) = w.completion.skip_reason() {
                self.fail_waiting(w, e);
                continue;
            }
            let Some(message) = self.sessions.seal(peer, w.kind, &w.payload) else {
                let cause = "the fabric session closed before the message was sent".to_string();
                let e = TransferError::Unauthenticated { peer: w.completion.peer().to_string(), cause };
                self.fail_waiting(w, e);
                continue;
            };
            let purpose = w.purpose(peer);
            if let Err((code, detail)) = self.send(w.dest, message, purpose, w.completion.deadline()) {
                let e = super::classify(w.completion.peer(), w.completion.op(), "", code, detail);
                self.fail_waiting(w, e);
            }
        }
    }

    /// Fail the batch a waiting message belongs to: its parked part, or its notification.
    fn fail_waiting(&mut self, w: Waiting, e: TransferError) {
        match w.kind {
            MSG_CHECK => {
                if let Some(part) = self.parked.remove(&w.query) {
                    self.part_finished(part, Some(e));
                }
            }
            _ => w.completion.finish(Err(e)),
        }
    }

    /// Fail, as unauthenticated, what waits for a session that has not opened by its deadline.
    fn expire_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let peers: Vec<Arc<[u8]>> = self.waiting.keys().cloned().collect();
        for peer in peers {
            let waiting = self.waiting.remove(&peer).unwrap_or_default();
            let (expired, kept): (Vec<Waiting>, Vec<Waiting>) =
                waiting.into_iter().partition(|w| w.completion.skip_reason().is_some());
            for w in expired {
                let e = match w.completion.expired() {
                    true => TransferError::Unauthenticated {
                        peer: w.completion.peer().to_string(),
                        cause: "the peer did not complete the fabric handshake by the deadline".into(),
                    },
                    false => w.completion.skip_reason().expect("partitioned on it"),
                };
                self.fail_waiting(w, e);
            }
            match kept.is_empty() {
                // The next message begins afresh (the hello may have been lost or evicted).
                true => self.sessions.forget(&peer, false),
                false => {
                    self.waiting.insert(peer, kept);
                }
            }
        }
    }

    /// The peer refused our hello: fail what waits for it.
    fn refused(&mut self, peer: &[u8], cause: String) {
        for w in self.waiting.remove(peer).unwrap_or_default() {
            let e = TransferError::Unauthenticated { peer: w.completion.peer().to_string(), cause: cause.clone() };
            self.fail_waiting(w, e);
        }
    }

    /// Ask the peer to confirm the part's regions; the part waits for the answer.
    fn send_check(&mut self, part: Part) {
        let query = self.next_query;
        self.next_query += 1;
        let mut message = Vec::new();
        message.extend_from_slice(&query.to_le_bytes());
        // The owner answers to this rail's own address.
        message.extend_from_slice(&(self.objects.address.len() as u16).to_le_bytes());
        message.extend_from_slice(&self.objects.address);
        message.extend_from_slice(&(part.checks.len() as u16).to_le_bytes());
        for c in &part.checks {
            message.extend_from_slice(&c.addr.to_le_bytes());
            message.extend_from_slice(&c.len.to_le_bytes());
            message.push(c.keys.len() as u8);
            c.keys.iter().for_each(|k| message.extend_from_slice(&k.to_le_bytes()));
        }
        let w =
            Waiting { kind: MSG_CHECK, payload: message, dest: part.dest, completion: part.completion.clone(), query };
        let peer = part.peer_address.clone();
        self.parked.insert(query, part);
        if let Err((code, detail)) = self.send_message(&peer, w) {
            let part = self.parked.remove(&query).expect("parked above");
            let e = transfer_error(&part, code, detail);
            self.part_finished(part, Some(e));
        }
    }

    /// The peer's answer to a check (`from` it, when authenticated): record the verdicts, then run
    /// the part or refuse it.
    fn checked(&mut self, message: &[u8], from: Option<&[u8]>) -> Option<()> {
        let query = u64::from_le_bytes(message.get(0..8)?.try_into().ok()?);
        let count = u16::from_le_bytes(message.get(8..10)?.try_into().ok()?) as usize;
        let verdicts = message.get(10..10 + count)?;
        // Only the peer that was asked answers.
        if let (Some(from), Some(part)) = (from, self.parked.get(&query))
            && *part.peer_address != *from
        {
            return None;
        }
        let mut part = self.parked.remove(&query)?;
        if verdicts.len() != part.checks.len() {
            let peer = part.completion.peer().to_string();
            let detail = format!("{} verdicts for {} regions", verdicts.len(), part.checks.len());
            self.part_finished(part, Some(TransferError::Protocol { peer, detail }));
            return Some(());
        }
        let mut rejected = None;
        for (c, &v) in part.checks.iter().zip(verdicts) {
            part.verdicts[c.region as usize].store(v, Ordering::Release);
            if let (None, Some(reason)) = (&rejected, refusal(v)) {
                rejected = Some(TransferError::Rejected {
                    peer: part.completion.peer().to_string(),
                    op: part.op,
                    index: c.first_op,
                    reason,
                });
            }
        }
        part.checks.clear();
        match rejected {
            Some(e) => self.part_finished(part, Some(e)),
            None => self.start(part),
        }
        Some(())
    }

    /// Answer a peer's check against this transport's registrations; when authenticated, to the
    /// peer that proved itself (`from`), over its session.
    fn answer_check(&mut self, message: &[u8], from: Option<&[u8]>) -> Option<()> {
        let mut r = Reader(message);
        let (query, reply_to) = r.query(from)?;
        let count = r.u16()? as usize;
        let mut answer = Vec::new();
        answer.extend_from_slice(&query.to_le_bytes());
        answer.extend_from_slice(&(count as u16).to_le_bytes());
        {
            let registry = self.registry.read_locked();
            for _ in 0..count {
                let (addr, len) = (r.u64()?, r.u64()?);
                let keys: Vec<u64> = (0..r.take(1)?[0]).map(|_| r.u64()).collect::<Option<_>>()?;
                let verdict = match registry.values().find(|mr| mr.keys == keys) {
                    None => REFUSED + RejectReason::UnknownKey.to_wire(),
                    Some(mr) if !mr.region.contains(addr, len) => REFUSED + RejectReason::OutOfRange.to_wire(),
                    Some(_) => CONFIRMED,
                };
                answer.push(verdict);
            }
        }
        self.reply(&reply_to, from, MSG_CHECKED, &answer)?;
        Some(())
    }

    /// Send `answer` to the peer rail at `reply_to` (over its session when authenticated, `from`
    /// being the peer that proved itself). Returns whether it was posted: not beyond
    /// [`RailLimits::max_answers`] in flight, nor to a rail we cannot reach. `None` when the session is gone.
    fn reply(&mut self, reply_to: &[u8], from: Option<&[u8]>, kind: u8, answer: &[u8]) -> Option<bool> {
        if self.answers_in_flight >= self.limits.max_answers {
            if let Some(left_out) = self.unanswered_log.allow() {
                let limit = self.limits.max_answers;
                tracing::warn!(left_out, "fabric: {limit} answers in flight; a peer's request goes unanswered");
            }
            return Some(false);
        }
        let Some(dest) = self.address_of(reply_to) else { return Some(false) };
        let message = match from {
            Some(from) => self.sessions.seal(from, kind, answer)?,
            None => [&[kind][..], answer].concat(),
        };
        match self.send(dest, message, Purpose::Answer, Deadline::after(HOUSEKEEPING)) {
            Ok(()) => Some(true),
            Err((_, detail)) => {
                tracing::warn!("fabric: cannot answer a peer: {detail}");
                Some(false)
            }
        }
    }

    /// The address-vector entry of the peer rail at `address`, inserted if new. Entries no session
    /// needs any more are removed once there are many, so strangers' hellos cannot fill the vector.
    fn address_of(&mut self, address: &[u8]) -> Option<sys::fi_addr_t> {
        if let Some(&a) = self.known.get(address) {
            return Some(a);
        }
        if self.sessions.enabled() && self.known.len() >= 2 * session::MAX_HALF_OPEN {
            let unused: Vec<Vec<u8>> = self.known.keys().filter(|a| !self.sessions.holds(a)).cloned().collect();
            for a in unused {
                let mut fi_addr = self.known.remove(&a).expect("listed above");
                // SAFETY: an open address vector, and an entry it gave, removed once (from `known`).
                unsafe { sys::kvferry_fi_av_remove(self.objects.av.as_ptr(), &mut fi_addr, 1, 0) };
            }
        }
        match self.av_insert(address) {
            Ok(a) => Some(*self.known.entry(address.to_vec()).or_insert(a)),
            Err(e) => {
                tracing::warn!("fabric: cannot reach a peer's rail: {e}");
                None
            }
        }
    }

    /// Act on a message received, once it proves to come from a peer with the secret (or at once
    /// without authentication).
    fn handle(&mut self, message: &[u8]) {
        if !self.sessions.enabled() {
            let handled = match message.split_first() {
                Some((&MSG_NOTIFY, payload)) => self.deliver(payload, None),
                Some((&MSG_NOTIFIED, payload)) => self.notified(payload, None),
                Some((&MSG_CHECK, payload)) => self.answer_check(payload, None),
                Some((&MSG_CHECKED, payload)) => self.checked(payload, None),
                _ => None,
            };
            if handled.is_none() {
                tracing::warn!("fabric: dropped a malformed message of {} bytes", message.len());
            }
            return;
        }
        match self.sessions.open(message) {
            Incoming::Message { kind, from, payload } => {
                let handled = match kind {
                    MSG_NOTIFY => self.deliver(&payload, Some(&from)),
                    MSG_NOTIFIED => self.notified(&payload, Some(&from)),
                    MSG_CHECK => self.answer_check(&payload, Some(&from)),
                    MSG_CHECKED => self.checked(&payload, Some(&from)),
                    _ => None,
                };
                if handled.is_none() {
                    tracing::warn!("fabric: dropped a malformed message of {} bytes", message.len());
                }
            }
            Incoming::Reply { to, message } => {
                if let Some(dest) = self.address_of(&to)
                    && let Err((_, detail)) = self.send(dest, message, Purpose::Plain, Deadline::after(HOUSEKEEPING))
                {
                    tracing::debug!("fabric: cannot answer a handshake: {detail}");
                }
            }
            Incoming::Accepted { peer, welcome } => {
                if let Some(dest) = self.address_of(&peer)
                    && let Err((_, detail)) = self.send(dest, welcome, Purpose::Plain, Deadline::after(HOUSEKEEPING))
                {
                    tracing::debug!("fabric: cannot answer a handshake: {detail}");
                }
                self.flush(&peer);
            }
            Incoming::Established { peer } => self.flush(&peer),
            Incoming::Refused { peer, cause } => self.refused(&peer, cause),
            Incoming::Dropped(why) => tracing::debug!("fabric: dropped {why} ({} bytes)", message.len()),
        }
    }

    /// Parts whose check has not been answered by their deadline (or that were cancelled) fail.
    fn expire_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let expired: Vec<(u64, TransferError)> =
            self.parked.iter().filter_map(|(q, p)| Some((*q, p.completion.skip_reason()?))).collect();
        for (q, e) in expired {
            let part = self.parked.remove(&q).expect("listed above");
            // An unanswered check may mean the peer restarted and lost its session: the next
            // message begins a new one.
            if matches!(e, TransferError::Timeout { .. }) {
                self.sessions.forget(&part.peer_address, true);
            }
            self.part_finished(part, Some(e));
        }
    }

    /// Notifications not answered by their deadline (or whose batch was cancelled) fail.
    fn expire_notifying(&mut self) {
        if self.notifying.is_empty() {
            return;
        }
        let expired: Vec<(u64, TransferError)> =
            self.notifying.iter().filter_map(|(q, (_, c))| Some((*q, c.skip_reason()?))).collect();
        for (q, e) in expired {
            let (_, completion) = self.notifying.remove(&q).expect("listed above");
            completion.finish(Err(e));
        }
    }

    /// Send a message; what its completion does is its `purpose`'s.
    fn send(
        &mut self,
        dest: sys::fi_addr_t,
        message: Vec<u8>,
        purpose: Purpose,
        deadline: Deadline,
    ) -> std::result::Result<(), (i32, String)> {
        // Providers with FI_MR_LOCAL need the message registered; it is small and rare.
        let mr = match self.info.mr_local() {
            true => Some(
                self.reg_mr(MemRegion::host(message.as_ptr(), message.len()), 0, sys::FI_SEND as u64)
                    .map_err(|e| (0, format!("registering a message: {e}")))?,
            ),
            false => None,
        };
        let iov = libc::iovec { iov_base: message.as_ptr() as *mut libc::c_void, iov_len: message.len() };
        let mut desc = desc_of(mr.as_ref());
        let sent = match &purpose {
            Purpose::Plain => Sent::Plain,
            Purpose::Answer => Sent::Answer,
            Purpose::Notify { query, .. } => Sent::Notify(*query),
        };
        let ctx = self.context(Pending::Send { sent, _mr: mr, _message: message });
        let msg = sys::fi_msg {
            msg_iov: (&iov as *const libc::iovec).cast(),
            desc: &mut desc,
            iov_count: 1,
            addr: dest,
            context: ctx.cast(),
            data: 0,
        };
        // SAFETY: `ep` is open; `msg` and what it points to are valid for the call. The message's
        // bytes (moved, not copied, into the context) and `ctx` stay valid until the send
        // completes or the endpoint closes.
        let ret = self.retry(deadline, |ep| unsafe { sys::kvferry_fi_sendmsg(ep, &msg, 0) });
        if ret != 0 {
            // Dropping the context closes the message's registration.
            self.forget(ctx);
            return Err(((-ret) as i32, format!("fi_sendmsg: {}", fi_error_text(ret as i32))));
        }
        match purpose {
            Purpose::Plain => {}
            Purpose::Answer => self.answers_in_flight += 1,
            Purpose::Notify { query, peer, completion } => {
                self.notifying.insert(query, (peer, completion));
            }
        }
        Ok(())
    }

    /// Read completions once; returns how many arrived (errors included).
    fn poll(&mut self, entries: &mut [sys::fi_cq_data_entry; CQ_BATCH]) -> usize {
        // SAFETY: an open completion queue, and room for `CQ_BATCH` entries of its format
        // (`FI_CQ_FORMAT_DATA`).
        let n = unsafe { sys::kvferry_fi_cq_read(self.objects.cq.as_ptr(), entries.as_mut_ptr().cast(), CQ_BATCH) };
        self.handle_read(n, entries)
    }

    /// Complete what a `fi_cq_read` or `fi_cq_sread` returning `n` put in `entries`, or the error
    /// it reported; returns how many completions that was.
    fn handle_read(&mut self, n: isize, entries: &[sys::fi_cq_data_entry]) -> usize {
        if n > 0 {
            for e in &entries[..n as usize] {
                self.complete(e.op_context.cast(), Ok(e.len));
            }
            return n as usize;
        }
        if n == -(sys::FI_EAVAIL as isize) {
            self.read_error();
            return 1;
        }
        0
    }

    fn read_error(&mut self) {
        let cq = self.objects.cq.as_ptr();
        // SAFETY: plain data, for which zero is valid.
        let mut err: sys::fi_cq_err_entry = unsafe { std::mem::zeroed() };
        // SAFETY: an open completion queue; `err` is valid for writes of one entry (with
        // `err_data_size` 0, the provider keeps the error data).
        if unsafe { sys::kvferry_fi_cq_readerr(cq, &mut err, 0) } != 1 {
            return;
        }
        let mut text = [0 as libc::c_char; 256];
        // SAFETY: the entry just read, whose error data is valid until the next read; `text` is
        // valid for writes of its length. The answer is a C string, in `text` or the provider's.
        let provider = unsafe {
            c_text(sys::kvferry_fi_cq_strerror(cq, err.prov_errno, err.err_data, text.as_mut_ptr(), text.len()))
        };
        let detail = format!("{} (provider: {provider})", fi_error_text(-err.err));
        self.complete(err.op_context.cast(), Err((err.err, detail)));
    }

    fn complete(&mut self, ctx: *mut OpContext, result: std::result::Result<usize, (i32, String)>) {
        let Some(what) = self.forget(ctx) else { return };
        match what {
            Pending::Access { run, staging } => {
                let result = match (&staging, result) {
                    (Some(st), Ok(_)) if run.borrow().part.op == Op::Read => Self::unstage(&run, st),
                    (_, Ok(_)) => Ok(()),
                    (_, Err((code, detail))) => Err(transfer_error(&run.borrow().part, code, detail)),
                };
                if let Err(e) = result {
                    run.borrow_mut().error.get_or_insert(e);
                }
                if let Some(st) = staging {
                    self.recycle(st.held);
                }
                run.borrow_mut().in_flight -= 1;
                self.maybe_finish(run);
            }
            // The message and its registration go when `what` does.
            Pending::Send { sent, .. } => {
                match (sent, result) {
                    (Sent::Answer, _) => self.answers_in_flight -= 1,
                    // A notification sent settles on its answer; one that could not be sent, now.
                    (Sent::Notify(query), Err((code, cause))) => {
                        if let Some((_, completion)) = self.notifying.remove(&query) {
                            let peer = completion.peer().to_string();
                            completion.finish(Err(super::classify(&peer, Op::Notify, "", code, cause)));
                        }
                    }
                    (Sent::Notify(_) | Sent::Plain, _) => {}
                }
            }
            Pending::Recv { slot } => {
                if let Ok(len) = result {
                    let start = slot * RECV_SLOT_BYTES;
                    let message = self.recv_buffer[start..start + len.min(RECV_SLOT_BYTES)].to_vec();
                    self.handle(&message);
                    #[cfg(test)]
                    self.received.locked().push(message);
                }
                if !self.queue.stop.load(Ordering::Acquire)
                    && self.objects.ep.is_some()
                    && let Err(e) = self.post_recv(slot)
                {
                    tracing::warn!("fabric: reposting a notification buffer failed: {e}");
                }
            }
        }
    }

    /// Hand an incoming notification (see [`send_notification`](Self::send_notification)) to the
    /// agent if its queue has room, and answer the sender either way; when authenticated, only
    /// to the peer that proved itself (`from`), queued as every transport does
    /// ([`NotificationQueue::deliver`](crate::transport::NotificationQueue::deliver); one that could
    /// not be answered is not queued, and its sender times out).
    fn deliver(&mut self, message: &[u8], from: Option<&[u8]>) -> Option<()> {
        let mut r = Reader(message);
        let (query, reply_to) = r.query(from)?;
        let len = r.u16()? as usize;
        let name = std::str::from_utf8(r.take(len)?).ok()?.to_string();
        let note = crate::transport::Notification { from: name, data: r.0.to_vec() };
        let notifications = self.notifications.clone();
        notifications.deliver(note, |room| {
            let answer = [&query.to_le_bytes()[..], &[if room { NOTIFY_QUEUED } else { NOTIFY_BUSY }]].concat();
            let answered = self.reply(&reply_to, from, MSG_NOTIFIED, &answer);
            (answered == Some(true), answered.map(drop))
        })
    }

    /// A receiver's answer to our notification: the batch settles, done or refused as busy.
    fn notified(&mut self, message: &[u8], from: Option<&[u8]>) -> Option<()> {
        let mut r = Reader(message);
        let query = r.u64()?;
        let status = r.take(1)?[0];
        // Only the rail the notification went to answers it.
        let (peer, _) = self.notifying.get(&query)?;
        if from.is_some_and(|from| from != &**peer) {
            return None;
        }
        let (_, completion) = self.notifying.remove(&query).expect("found above");
        let peer = completion.peer().to_string();
        completion.finish(match status {
            NOTIFY_QUEUED => Ok(()),
            NOTIFY_BUSY => Err(TransferError::PeerBusy {
                peer,
                op: Op::Notify,
                cause: "its queue of notifications is full".into(),
            }),
            other => Err(TransferError::Protocol { peer, detail: format!("a notification answered {other}") }),
        });
        Some(())
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // From here no other thread signals the completion queue, which closes once this returns.
        *self.queue.wakeable_cq.locked() = 0;
        // Close the endpoint first so no completion can name a context freed below.
        self.objects.ep = None;
        // Fail what is still in flight (its completions will never come), releasing its memory.
        let closed = || (sys::FI_ECANCELED as i32, "the fabric transport was closed".to_string());
        for ctx in self.live.iter().copied().collect::<Vec<_>>() {
            self.complete(ctx as *mut OpContext, Err(closed()));
        }
        for (_, (_, completion)) in std::mem::take(&mut self.notifying) {
            completion.finish(Err(super::classify(completion.peer(), Op::Notify, "", closed().0, closed().1)));
        }
        for w in std::mem::take(&mut self.waiting).into_values().flatten() {
            if w.kind != MSG_CHECK {
                w.completion.finish(Err(super::classify(w.completion.peer(), Op::Notify, "", closed().0, closed().1)));
            }
        }
        for (_, part) in std::mem::take(&mut self.parked) {
            let e = transfer_error(&part, closed().0, closed().1);
            self.part_finished(part, Some(e));
        }
        // Registrations close while the domain is still open.
        self.staging_pool.clear();
        self.mrs.clear();
        self.recv_mr = None;
    }
}

fn empty_entries() -> [sys::fi_cq_data_entry; CQ_BATCH] {
    [sys::fi_cq_data_entry { op_context: ptr::null_mut(), flags: 0, len: 0, buf: ptr::null_mut(), data: 0 }; CQ_BATCH]
}

/// Little-endian fields off the front of a message; `None` when it is too short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A query's head, `query u64 | reply_len u16 | reply address`: the query and where to answer
    /// it. When authenticated, `None` unless the answer goes to the peer that proved itself (`from`).
    fn query(&mut self, from: Option<&[u8]>) -> Option<(u64, Vec<u8>)> {
        let query = self.u64()?;
        let reply_len = self.u16()? as usize;
        let reply_to = self.take(reply_len)?.to_vec();
        if from.is_some_and(|from| from != reply_to.as_slice()) {
            return None;
        }
        Some((query, reply_to))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}
