//! The initiator's side of the shm transport: a link per peer, a lane of the transport's progress
//! threads with a connection made on first use and closed after `idle_timeout` without a batch.
//!
//! - a **WRITE** is a request on the socket naming our own sources; the owner checks key and range
//!   and copies the bytes into its memory itself, and the batch settles on its answer. A source in
//!   a shareable registration of ours (a sealed memfd) is passed once per connection (`SHARE`), so
//!   the owner copies it with `pread` from the file; any other is named by address and pulled
//!   with `process_vm_readv`. The link is told when a local registration goes (`Job::Forget`)
//!   and withdraws its file (`UNSHARE`). No byte of ours is ever written into the owner's address
//!   space by us.
//! - a **READ** lands in our memory, so we copy it: after a grant (`MAP`), from the owner's
//!   shareable file (`pread`, never a mapping: see [`super::pull`]) or with `process_vm_readv`,
//!   split over the host device's copy pool, the progress thread taking a share. The connection's lease
//!   slot of every registration touched is checked before the copy and again after it: a READ
//!   that raced a deregistration is discarded (the transfer fails), and a hang-up of the socket
//!   after the copy means the owner died.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lease::LeaseFile;
use super::owner::{OwnerShared, PROBE};
use super::pull::{Pull, Source, pull_sharing};
use super::wire::{self, Reach, WriteOp};
use crate::auth::{Auth, Channel};
use crate::deadline::Deadline;
use crate::error::Result;
use crate::memory::MemRegion;
use crate::memory::host::{HostDevice, PeerFile};
use crate::net::DeadlineStream;
use crate::sync::Locked;
use crate::transport::frame::{self, Failure, Header};
use crate::transport::progress::{Lane, LaneWork, Progress};
use crate::transport::{
    AbortHook, Batch, Completion, ConnectError, Op, PeerLink, RejectReason, TransferError, XferOp, no_key_on_link,
};

/// A peer's region as this transport reaches it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RemoteShm {
    pub key: u128,
    pub reach: Reach,
    pub region: MemRegion,
}

pub(super) struct LinkInfo {
    pub local_name: String,
    pub peer: String,
    /// The endpoint as published, for error messages.
    pub endpoint: String,
    /// The owner's abstract socket name.
    pub socket: String,
    /// The owner's process id as seen from here (checked by the probe when cross-memory is used).
    pub pid: u32,
    pub auth: Auth,
    pub connect_timeout: Duration,
    /// This agent's own registrations, where a WRITE's sources are looked up.
    pub local: Arc<OwnerShared>,
}

/// What a link's lane is handed, in order.
pub(super) enum Job {
    Batch(Batch),
    /// A local registration is gone: stop sharing its file. Queued before the deregistration
    /// returns, so it is handled before any batch posted afterwards (which may use the same
    /// addresses for other memory).
    Forget(u128),
}

/// An authenticated connection to an owner.
pub(super) struct Connected {
    pub stream: UnixStream,
    /// The owner's pid, as the kernel saw it accept.
    pub pid: u32,
    pub probe: u64,
    /// Whether the owner could read our probe word, so can pull our WRITEs.
    pub can_pull: bool,
    pub leases: LeaseFile,
}

/// Connect to an abstract Unix socket by `deadline`. A blocking connect to a listener whose
/// backlog is full waits for room without end; `SO_SNDTIMEO`, which Linux honours for `AF_UNIX`
/// connect, bounds that wait (it then fails with `EAGAIN`).
pub(super) fn connect_by(socket: &str, deadline: Deadline) -> io::Result<UnixStream> {
    let name = socket.as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() + 1 > addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket name too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // An abstract name: a leading NUL, then the name (not NUL-terminated).
    for (dst, &b) in addr.sun_path[1..].iter_mut().zip(name) {
        *dst = b as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len()) as libc::socklen_t;
    // SAFETY: plain socket creation; the descriptor is owned by the stream at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    loop {
        stream.set_write_timeout(Some(crate::net::time_left(deadline)?))?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the listener's backlog stayed full"));
            }
            _ => return Err(e),
        }
    }
}

/// Connect to an owner by `deadline`, prove the cluster secret both ways and say hello.
pub(super) fn connect(
    socket: &str,
    local_name: &str,
    auth: &Auth,
    deadline: Deadline,
) -> std::result::Result<Connected, ConnectError> {
    let unreachable = |e: io::Error| ConnectError::Unreachable(e.to_string());
    let mut stream = connect_by(socket, deadline).map_err(unreachable)?;
    auth.client(&mut stream, Channel::Shm, deadline)?;
    stream.write_all_by(&wire::encode_hello(local_name, PROBE.as_ptr() as u64), deadline).map_err(unreachable)?;
    let mut ack = [0u8; frame::HEADER_LEN + 8];
    stream.set_timeouts(crate::net::time_left(deadline).map_err(unreachable)?).map_err(unreachable)?;
    let leases = wire::recv_with_fd(&stream, &mut ack)
        .map_err(|e| ConnectError::Unreachable(format!("handshake failed: {e}")))?;
    let header = Header::decode(ack[..frame::HEADER_LEN].try_into().expect("header"));
    match header.tag {
        0 => {
            let leases = leases.ok_or(ConnectError::Unreachable("the owner sent no lease file".into()))?;
            let leases = LeaseFile::map(leases.as_fd()).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            let flags = u64::from_le_bytes(ack[frame::HEADER_LEN..].try_into().expect("8 bytes"));
            let pid = crate::net::peer_cred(&stream).map_err(unreachable)?.pid as u32;
            Ok(Connected { stream, pid, probe: header.payload_len, can_pull: flags & wire::FLAG_CAN_PULL != 0, leases })
        }
        wire::STATUS_BAD_VERSION => Err(ConnectError::Unreachable(format!(
            "peer speaks shm version {}, this agent {}",
            header.count,
            wire::VERSION
        ))),
        other => Err(ConnectError::Unreachable(format!("handshake refused with status {other}"))),
    }
}

pub(super) struct ShmLink {
    regions: Arc<Vec<Option<RemoteShm>>>,
    lane: Lane<Worker>,
    /// The lane holds local sources a deregistration must withdraw (see [`Worker::sources`]).
    has_sources: Arc<AtomicBool>,
}

impl ShmLink {
    pub fn new(
        info: LinkInfo,
        regions: Vec<Option<RemoteShm>>,
        device: Arc<HostDevice>,
        progress: &Progress<Worker>,
    ) -> ShmLink {
        let regions = Arc::new(regions);
        let cut_handle: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let handle = cut_handle.clone();
        let cut: AbortHook = Arc::new(move || {
            if let Some(stream) = handle.locked().as_ref() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        });
        let has_sources = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            has_sources: has_sources.clone(),
            info: Arc::new(info),
            regions: regions.clone(),
            conn: None,
            cut_handle,
            cut,
            grants: HashMap::new(),
            sources: Vec::new(),
            next_source: 1,
            device,
        };
        ShmLink { regions, lane: progress.lane(worker), has_sources }
    }

    /// A local registration is gone: queued on the lane (so handled before any batch posted
    /// afterwards, which may use the same addresses for other memory) when the lane holds sources,
    /// which it withdraws. A lane that holds none, having written nothing since it connected,
    /// has nothing to do. Called once the key is out of the local key table: a source found in it
    /// was recorded (and `has_sources` set) before that, so is never missed.
    pub fn forget(&self, key: u128) {
        if self.has_sources.load(Ordering::SeqCst) {
            // A stopped pool shares nothing any more.
            let _ = self.lane.submit(Job::Forget(key));
        }
    }
}

impl PeerLink for ShmLink {
    fn max_notification(&self) -> u64 {
        frame::MAX_NOTIFICATION
    }

    fn post(&self, batch: Batch) -> Result<()> {
        if let Some((index, op)) = batch
            .ops
            .iter()
            .enumerate()
            .find(|(_, o)| self.regions.get(o.remote_region as usize).is_none_or(Option::is_none))
        {
            return Err(no_key_on_link(batch.completion.peer(), index, op));
        }
        batch.completion.set_guarded_parts(1);
        if let Err(Job::Batch(batch)) = self.lane.submit(Job::Batch(batch)) {
            batch.completion.refuse_part();
        }
        Ok(())
    }

    fn mode(&self, ops: &[XferOp]) -> Option<&'static str> {
        let reach = |o: &XferOp| self.regions[o.remote_region as usize].map(|r| r.reach);
        let mapped = ops.iter().any(|o| reach(o) == Some(Reach::Mapped));
        let cross = ops.iter().any(|o| reach(o) == Some(Reach::CrossMemory));
        match (mapped, cross) {
            (true, true) => Some("mapped+cross-memory"),
            (true, false) => Some(Reach::Mapped.name()),
            (false, true) => Some(Reach::CrossMemory.name()),
            (false, false) => None,
        }
    }
}

fn read_status(stream: &mut UnixStream, deadline: Deadline) -> Result<Header, Failure> {
    let mut head = [0u8; frame::HEADER_LEN];
    stream.read_exact_by(&mut head, deadline)?;
    frame::status_of(Header::decode(&head))
}

/// What the owner granted for one registration, for READs.
struct Grant {
    /// The registered range, as the owner has it.
    region: MemRegion,
    slot: u32,
    /// The owner's file behind a shareable region, read with `pread`.
    file: Option<PeerFile>,
}

/// A local registration a WRITE came from, as this connection knows it.
struct LocalSource {
    key: u128,
    /// The registered range: a shared file's offset 0 is at `base`.
    base: u64,
    len: u64,
    state: SourceState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceState {
    /// No shareable file behind it: pulled cross-memory.
    Plain,
    /// Shareable, not offered on this connection yet.
    Unshared,
    /// Shared under this id.
    Shared(u64),
    /// The owner refused the file (pulled cross-memory); offered again after an `UNSHARE` made
    /// room when `room` (the refusal was for the owner's limits).
    Refused { room: bool },
}

/// A link's state on its lane: the connection and what was granted and shared on it.
pub(super) struct Worker {
    info: Arc<LinkInfo>,
    regions: Arc<Vec<Option<RemoteShm>>>,
    conn: Option<Connected>,
    /// A second handle on `conn`'s socket, for the abort hook of a running part: shutting it down
    /// makes a call blocked on the owner (a grant, a WRITE's answer) return at once.
    cut_handle: Arc<Mutex<Option<UnixStream>>>,
    cut: AbortHook,
    /// Grants received on this connection, by key.
    grants: HashMap<u128, Grant>,
    /// Local registrations WRITEs came from on this connection.
    sources: Vec<LocalSource>,
    /// Set (before the key table is read) whenever a source may be recorded, cleared with the
    /// connection: what [`ShmLink::forget`] reads.
    has_sources: Arc<AtomicBool>,
    /// The id the next shared source gets on this connection (never 0: that is "by address").
    next_source: u64,
    device: Arc<HostDevice>,
}

/// Called between a READ's copy and its lease check on the link to the peer it names, so a test
/// can deregister at that moment.
#[cfg(test)]
pub(super) type ReadHook = (String, Box<dyn FnMut() + Send>);
#[cfg(test)]
pub(super) static AFTER_READ_COPY: Mutex<Option<ReadHook>> = Mutex::new(None);

impl LaneWork for Worker {
    type Job = Job;
    type Scratch = ();

    fn run(&mut self, job: Job, _: &mut ()) {
        match job {
            Job::Batch(batch) => self.run_batch(&batch),
            Job::Forget(key) => self.forget(key),
        }
    }

    /// The connection (and the owner's resources serving it) goes; the next batch connects again.
    fn idle(&mut self) {
        self.disconnect();
    }
}

impl Worker {
    fn run_batch(&mut self, batch: &Batch) {
        let completion = &*batch.completion;
        // A guarded part: a stop (cancel, failure, the deadline) cuts the connection and waits for
        // the part to end, so no byte lands in local memory after it; the copies themselves are
        // local and end by themselves.
        let result = match completion.start_part(Some(self.cut.clone())) {
            Err(e) => Err(e),
            Ok(part) => {
                let result = match batch.ops.is_empty() {
                    true => Ok(()),
                    false if completion.op() == Op::Write => self.write(completion, &batch.ops),
                    false => self.read(completion, &batch.ops),
                };
                if part.end() {
                    // What the hook cut is unusable; the stop's reason is the batch's.
                    self.disconnect();
                    Err(completion.skip_reason().unwrap_or_else(|| completion.timeout_error()))
                } else {
                    result
                }
            }
        };
        completion.settle_part(result, |data| self.notify(completion, &data));
    }

    /// The connection, made (or made again, when the owner closed it) within the batch's deadline.
    fn connection(&mut self, c: &Completion) -> Result<&mut Connected, TransferError> {
        if self.conn.as_ref().is_some_and(|conn| peer_hung_up(&conn.stream)) {
            self.disconnect();
        }
        if self.conn.is_none() {
            let deadline = c.deadline().min(Deadline::after(self.info.connect_timeout));
            let conn = connect(&self.info.socket, &self.info.local_name, &self.info.auth, deadline)
                .map_err(|e| e.for_part(c, &self.info.endpoint))?;
            if conn.pid != self.info.pid {
                let cause = format!("another process (pid {}) now serves the endpoint", conn.pid);
                return Err(ConnectError::Unreachable(cause).for_part(c, &self.info.endpoint));
            }
            // Grants name slots of the previous connection's lease file, and sources were shared
            // on it; ask afresh.
            self.grants.clear();
            self.sources.clear();
            *self.cut_handle.locked() = conn.stream.try_clone().ok();
            self.conn = Some(conn);
        }
        if c.expired() {
            return Err(c.timeout_error());
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Name a failure for the caller; a connection that may be out of step is dropped.
    fn named(&mut self, c: &Completion, failure: Failure) -> TransferError {
        if failure.breaks_stream() {
            self.disconnect();
        }
        failure.into_error(&self.info.peer, c)
    }

    /// Forget the connection and everything granted on it.
    fn disconnect(&mut self) {
        self.conn = None;
        *self.cut_handle.locked() = None;
        self.grants.clear();
        self.sources.clear();
        self.has_sources.store(false, Ordering::SeqCst);
    }

    fn region(&self, op: &XferOp) -> RemoteShm {
        self.regions[op.remote_region as usize].expect("post checked every op's region")
    }

    /// Ask the owner to pull the ops from our memory, in requests of at most `MAX_WRITE_OPS`.
    fn write(&mut self, c: &Completion, ops: &[XferOp]) -> Result<(), TransferError> {
        let deadline = c.deadline();
        let (peer, op) = (self.info.peer.clone(), c.op());
        for (chunk_index, chunk) in ops.chunks(wire::MAX_WRITE_OPS).enumerate() {
            let base = (chunk_index * wire::MAX_WRITE_OPS) as u32;
            let mut request = Header {
                tag: wire::WRITE,
                count: chunk.len() as u32,
                payload_len: (chunk.len() * wire::WRITE_OP_LEN) as u64,
            }
            .encode()
            .to_vec();
            // Sources are shared per connection: name them on the one the request goes on.
            self.connection(c)?;
            for o in chunk {
                let (from, source) = self.source_of(c, o)?;
                let key = self.region(o).key;
                WriteOp { key, addr: o.remote_addr, source, len: o.len, from }.encode_into(&mut request);
            }
            let conn = self.conn.as_mut().expect("connected above");
            if !conn.can_pull {
                let cause = "the owner cannot read this process's memory (ptrace policy)".to_string();
                return Err(TransferError::CrossMemoryRefused { peer, op, cause });
            }
            let mut head = [0u8; frame::HEADER_LEN];
            let answered = conn
                .stream
                .write_all_by(&request, deadline)
                .and_then(|()| conn.stream.read_exact_by(&mut head, deadline));
            if let Err(e) = answered {
                return Err(self.named(c, Failure::Io(e)));
            }
            let header = Header::decode(&head);
            if header.tag == wire::STATUS_PULL_FAILED {
                let e = io::Error::from_raw_os_error(header.payload_len as i32);
                return Err(match e.raw_os_error() {
                    Some(libc::EPERM | libc::EACCES) => {
                        TransferError::CrossMemoryRefused { peer, op, cause: e.to_string() }
                    }
                    _ => TransferError::Protocol {
                        peer,
                        detail: format!("the owner could not copy descriptor {}: {e}", base + header.count),
                    },
                });
            }
            if let Err(f) = frame::status_of(header) {
                let f = match f {
                    Failure::Rejected(index, reason) => Failure::Rejected(base + index, reason),
                    other => other,
                };
                return Err(self.named(c, f));
            }
        }
        Ok(())
    }

    /// Where the owner reads an op's bytes: `(from, source)` of its WRITE op. A source in a
    /// shareable registration is shared on first use; one the owner refuses is named by address.
    fn source_of(&mut self, c: &Completion, o: &XferOp) -> Result<(u64, u64), TransferError> {
        let found = self.sources.iter().position(|s| o.local_addr >= s.base && o.local_addr - s.base + o.len <= s.len);
        let index = match found {
            Some(index) => index,
            None => {
                // Set before the key table is read: a deregistration, which reads it after taking
                // the key out, then sees any source this finds.
                self.has_sources.store(true, Ordering::SeqCst);
                let Some((key, entry)) = self.info.local.keys.find(o.local_addr, o.len) else {
                    return Ok((wire::FROM_ADDRESS, o.local_addr));
                };
                let shareable =
                    entry.memory().is_some_and(|m| m.share_fd().is_some() && m.region().addr == entry.region.addr);
                let state = if shareable { SourceState::Unshared } else { SourceState::Plain };
                self.sources.push(LocalSource { key, base: entry.region.addr, len: entry.region.len, state });
                self.sources.len() - 1
            }
        };
        if self.sources[index].state == SourceState::Unshared {
            self.sources[index].state = self.share(c, index)?;
        }
        let s = &self.sources[index];
        Ok(match s.state {
            SourceState::Shared(id) => (id, o.local_addr - s.base),
            _ => (wire::FROM_ADDRESS, o.local_addr),
        })
    }

    /// Pass a shareable registration's file to the owner; what it became.
    fn share(&mut self, c: &Completion, index: usize) -> Result<SourceState, TransferError> {
        let LocalSource { key, len, .. } = self.sources[index];
        // A copy of the descriptor, so the registration is not held during the exchange.
        let fd: Option<OwnedFd> =
            self.info.local.keys.get(key).and_then(|entry| {
                entry.memory().and_then(|m| m.share_fd()).and_then(|fd| fd.try_clone_to_owned().ok())
            });
        let Some(fd) = fd else {
            // Going away (its `Forget` is queued), or out of descriptors: by address this time.
            return Ok(SourceState::Refused { room: false });
        };
        let id = self.next_source;
        self.next_source += 1;
        let deadline = c.deadline();
        let stream = &mut self.conn.as_mut().expect("sources are named on a connection").stream;
        let mut head = [0u8; frame::HEADER_LEN];
        let answered = crate::net::time_left(deadline)
            .and_then(|left| stream.set_timeouts(left))
            .and_then(|()| wire::send_with_fd(stream, &wire::encode_share(id, len), fd.as_fd()))
            .and_then(|()| stream.read_exact_by(&mut head, deadline));
        if let Err(e) = answered {
            return Err(self.named(c, Failure::Io(e)));
        }
        let header = Header::decode(&head);
        Ok(match header.tag {
            0 => SourceState::Shared(id),
            wire::STATUS_BAD_SOURCE => SourceState::Refused { room: false },
            tag if tag == RejectReason::TooLarge.to_wire() => SourceState::Refused { room: true },
            _ => {
                let failure = frame::status_of(header).err().unwrap_or(Failure::Protocol("a refused share".into()));
                return Err(self.named(c, failure));
            }
        })
    }

    /// A local registration is gone: withdraw its file from the owner, whose mapping would
    /// otherwise keep the pages alive until the connection ends.
    fn forget(&mut self, key: u128) {
        let ids: Vec<u64> = self
            .sources
            .iter()
            .filter_map(|s| match s.state {
                SourceState::Shared(id) if s.key == key => Some(id),
                _ => None,
            })
            .collect();
        self.sources.retain(|s| s.key != key);
        let Some(conn) = self.conn.as_mut().filter(|_| !ids.is_empty()) else { return };
        let deadline = Deadline::after(self.info.connect_timeout);
        for id in ids {
            let mut head = [0u8; frame::HEADER_LEN];
            let answered = conn
                .stream
                .write_all_by(&wire::encode_unshare(id), deadline)
                .and_then(|()| conn.stream.read_exact_by(&mut head, deadline));
            if answered.is_err() {
                // Closing the connection drops every mapping it held.
                self.disconnect();
                return;
            }
        }
        // Room was made: files refused for the owner's limits are offered again.
        for s in &mut self.sources {
            if s.state == (SourceState::Refused { room: true }) {
                s.state = SourceState::Unshared;
            }
        }
    }

    /// Check every op against its grant and its lease, copy, then check that the owner is still
    /// there (its file stays readable after its death, so the copy alone cannot tell) and that no
    /// registration was revoked meanwhile.
    fn read(&mut self, c: &Completion, ops: &[XferOp]) -> Result<(), TransferError> {
        let mut pulls = Vec::with_capacity(ops.len());
        let mut slots: Vec<(u32, u64, u32)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let remote = self.region(op);
            let grant = match self.grant(c, &remote) {
                Ok(grant) => grant,
                // The owner refused the key: name the op that used it.
                Err(TransferError::Rejected { peer, op, reason, .. }) => {
                    return Err(TransferError::Rejected { peer, op, index: index as u32, reason });
                }
                Err(e) => return Err(e),
            };
            let offset = op.remote_addr.checked_sub(grant.region.addr);
            let inside = offset.and_then(|o| o.checked_add(op.len)).is_some_and(|end| end <= grant.region.len);
            if !inside {
                return Err(self.named(c, Failure::Rejected(index as u32, RejectReason::OutOfRange)));
            }
            if !slots.iter().any(|&(slot, _, _)| slot == grant.slot) {
                slots.push((grant.slot, remote.key as u64, index as u32));
            }
            let (source, remote) = match &grant.file {
                None => (Source::Process(self.info.pid), op.remote_addr),
                Some(file) => (Source::File(file.raw_fd()), offset.expect("checked inside")),
            };
            pulls.push(Pull { source, local: op.local_addr, remote, len: op.len });
        }
        self.check_leases(c, &slots)?;
        // SAFETY: local addresses are registered memory held by the batch; files are kept in
        // `grants`, which nothing changes until the pull returns.
        let pulled = unsafe { pull_sharing(&self.device, pulls) };
        #[cfg(test)]
        if let Some((peer, hook)) = AFTER_READ_COPY.locked().as_mut()
            && *peer == self.info.peer
        {
            hook();
        }
        let hung_up = self.conn.as_ref().is_none_or(|conn| peer_hung_up(&conn.stream));
        let (peer, op) = (self.info.peer.clone(), c.op());
        if hung_up {
            self.disconnect();
            return Err(TransferError::PeerDisconnected { peer, op, cause: "its process exited".into() });
        }
        // What we copied is discarded (the transfer fails) if the registration went meanwhile.
        self.check_leases(c, &slots)?;
        pulled.map_err(|(_, e)| match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => TransferError::CrossMemoryRefused { peer, op, cause: e.to_string() },
            Some(libc::ESRCH) => TransferError::PeerDisconnected { peer, op, cause: "its process exited".into() },
            _ => TransferError::Protocol { peer, detail: format!("copying from the owner failed: {e}") },
        })?;
        // A copy cannot hang, but one that ended past the deadline is late like any other part.
        match c.expired() {
            true => Err(c.timeout_error()),
            false => Ok(()),
        }
    }

    /// Fail with `UnknownKey`, naming the first op that used it, when a slot was revoked.
    fn check_leases(&mut self, c: &Completion, slots: &[(u32, u64, u32)]) -> Result<(), TransferError> {
        let conn = self.conn.as_ref().expect("grants come with a connection");
        let Some(&(slot, _, index)) = slots.iter().find(|&&(slot, tag, _)| !conn.leases.held(slot, tag)) else {
            return Ok(());
        };
        // The registration is gone: forget its grant (and unmap its file).
        self.grants.retain(|_, g| g.slot != slot);
        Err(self.named(c, Failure::Rejected(index, RejectReason::UnknownKey)))
    }

    /// The owner's grant for a region, asked for on first use and kept for the connection.
    fn grant(&mut self, c: &Completion, remote: &RemoteShm) -> Result<&Grant, TransferError> {
        if self.conn.as_ref().is_some_and(|conn| peer_hung_up(&conn.stream)) {
            self.disconnect();
        }
        if !self.grants.contains_key(&remote.key) {
            let grant = self.ask_grant(c, remote)?;
            self.grants.insert(remote.key, grant);
        }
        Ok(&self.grants[&remote.key])
    }

    fn ask_grant(&mut self, c: &Completion, remote: &RemoteShm) -> Result<Grant, TransferError> {
        let peer = self.info.peer.clone();
        let failed = |cause: String| TransferError::MappingFailed { peer: peer.clone(), cause };
        let mut request = Header { tag: wire::MAP, count: 0, payload_len: 0 }.encode().to_vec();
        request.extend_from_slice(&remote.key.to_le_bytes());
        let deadline = c.deadline();
        let conn = self.connection(c)?;
        let mut ack = [0u8; wire::MAP_ACK_LEN];
        let stream = &mut conn.stream;
        let fd = match stream.write_all_by(&request, deadline).and_then(|()| {
            stream.set_timeouts(crate::net::time_left(deadline)?)?;
            wire::recv_with_fd(stream, &mut ack)
        }) {
            Ok(fd) => fd,
            Err(e) => return Err(self.named(c, Failure::Io(e))),
        };
        let header = match frame::status_of(Header::decode(ack[..frame::HEADER_LEN].try_into().expect("header"))) {
            Ok(header) => header,
            Err(f) => return Err(self.named(c, f)),
        };
        let addr = u64::from_le_bytes(ack[16..24].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(ack[24..32].try_into().expect("8 bytes"));
        let region = MemRegion { addr, len, ..remote.region };
        let file = match (remote.reach, fd) {
            (Reach::CrossMemory, _) => None,
            (Reach::Mapped, None) => return Err(failed("no file descriptor came with the grant".into())),
            (Reach::Mapped, Some(fd)) => Some(PeerFile::open(fd, len).map_err(|e| failed(e.to_string()))?),
        };
        Ok(Grant { region, slot: header.count, file })
    }

    fn notify(&mut self, c: &Completion, data: &[u8]) -> Result<(), TransferError> {
        let mut request = Header { tag: wire::NOTIFY, count: 0, payload_len: data.len() as u64 }.encode().to_vec();
        request.extend_from_slice(data);
        let deadline = c.deadline();
        let conn = self.connection(c)?;
        let stream = &mut conn.stream;
        let sent =
            stream.write_all_by(&request, deadline).map_err(Failure::Io).and_then(|()| read_status(stream, deadline));
        sent.map(|_| ()).map_err(|f| self.named(c, f))
    }
}

/// Whether the owner's end of the socket is closed (its process exited, or it closed an idle
/// connection), without blocking.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
