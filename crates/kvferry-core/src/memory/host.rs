//! Host memory: page-aligned mappings ([`HostBuffer`]) and a CPU copy engine ([`HostDevice`]) with a
//! persistent pool of copy threads.
//!
//! Host buffers are the targets of DMA by NICs and GPUs, so they are allocated with `mmap` (page
//! aligned, optionally on huge pages, which cut IOMMU and NIC translation misses) and page-locked by
//! default: a transport registers them once and the kernel must never move or swap the pages.
//! Shareable buffers are backed by a sealed `memfd` instead of anonymous memory, so another process
//! on the node can map the same pages from the file descriptor ([`HostBuffer::share_fd`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::{
    CopyFence, CopyOp, Device, FenceSignal, IpcHandle, MemKind, MemRegion, Memory, MemoryError, Piece, PinGuard,
    coalesce_copies,
};
use crate::sync::Locked;

/// Batches smaller than this are copied on the caller's thread: waking a worker and signalling the
/// fence back costs more than copying this much. Chosen with `benches/host_copy.rs`.
const INLINE_COPY_MAX: usize = 1 << 20;

/// The smallest share of a batch given to one worker; below it the hand-off dominates.
pub(crate) const MIN_WORKER_SHARE: usize = 256 << 10;

/// The most copy threads [`HostDevice::new`] starts: a few cores saturate memory bandwidth.
const MAX_DEFAULT_THREADS: usize = 8;

/// Used when `/proc/meminfo` does not say (it is the default huge page size on x86-64).
const FALLBACK_HUGE_PAGE_SIZE: usize = 2 << 20;

/// Whether a host allocation uses huge pages (`MAP_HUGETLB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    Off,
    /// Huge pages when the pool has enough; otherwise normal pages with transparent huge pages
    /// requested (`MADV_HUGEPAGE`).
    Try,
    /// Huge pages or [`MemoryError::HugePagesUnavailable`].
    Require,
}

/// How [`HostBuffer::alloc`] maps memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAllocOptions {
    pub huge_pages: HugePages,
    /// Page-lock the buffer (`mlock`) so it can be handed to DMA engines. Failure is an error, not a
    /// silent downgrade: unpinned memory registered with a NIC would be corrupted by swapping.
    pub pin: bool,
    /// Fault every page in at allocation (`MAP_POPULATE`) rather than on first touch.
    pub populate: bool,
    /// Back the buffer with a sealed `memfd` that other processes on this node can map
    /// ([`HostBuffer::share_fd`]); with huge pages it is a hugetlb memfd (`MFD_HUGETLB`).
    pub shareable: bool,
}

impl HostAllocOptions {
    /// Normal pages, pinned, not populated, not shareable.
    pub const fn new() -> Self {
        HostAllocOptions { huge_pages: HugePages::Off, pin: true, populate: false, shareable: false }
    }

    pub const fn with_shareable(mut self, shareable: bool) -> Self {
        self.shareable = shareable;
        self
    }

    pub const fn with_huge_pages(mut self, huge_pages: HugePages) -> Self {
        self.huge_pages = huge_pages;
        self
    }

    pub const fn with_pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    pub const fn with_populate(mut self, populate: bool) -> Self {
        self.populate = populate;
        self
    }
}

impl Default for HostAllocOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A page-aligned host mapping (anonymous, or of a `memfd` when shareable), unmapped on drop.
///
/// Transports and devices write into it at any time through its address, so it hands out raw
/// pointers and copies rather than references whose contents Rust would assume unchanging.
#[derive(Debug)]
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// `len` rounded up to the page size actually mapped.
    map_len: usize,
    pinned: bool,
    huge_pages: bool,
    /// The memfd behind a shareable buffer.
    file: Option<OwnedFd>,
}

// SAFETY: the buffer owns its mapping and has no thread affinity; concurrent access through the raw
// pointer is the caller's to coordinate, as for any DMA memory.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Map `len` bytes (rounded up to the page size, or to the huge page size with huge pages).
    pub fn alloc(len: usize, options: &HostAllocOptions) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot allocate an empty host buffer".into()));
        }
        let huge = match options.huge_pages {
            HugePages::Off => None,
            HugePages::Try | HugePages::Require => {
                let huge_len = round_up(len, huge_page_size())?;
                match map_backing(huge_len, true, options) {
                    Ok((ptr, file)) => Some(HostBuffer::new(ptr, len, huge_len, true, file)),
                    Err(cause) if options.huge_pages == HugePages::Require => {
                        return Err(MemoryError::HugePagesUnavailable {
                            len: len as u64,
                            cause: format!("{cause} (see HugePages_Free in /proc/meminfo)"),
                        }
                        .into());
                    }
                    Err(_) => None,
                }
            }
        };
        let mut buffer =
            match huge {
                Some(buffer) => buffer,
                None => {
                    let map_len = round_up(len, page_size())?;
                    let (ptr, file) = map_backing(map_len, false, options).map_err(|cause| {
                        MemoryError::AllocFailed { kind: MemKind::Host, len: len as u64, cause: cause.to_string() }
                    })?;
                    if options.huge_pages == HugePages::Try {
                        // Advisory only: transparent huge pages may be disabled, and normal pages work.
                        // SAFETY: the range is the mapping just created.
                        unsafe { libc::madvise(ptr.as_ptr().cast(), map_len, libc::MADV_HUGEPAGE) };
                    }
                    HostBuffer::new(ptr, len, map_len, false, file)
                }
            };
        // Hugetlb pages are never swapped or migrated, so they are pinned already; mlock would only
        // charge them against RLIMIT_MEMLOCK.
        if options.pin && !buffer.huge_pages {
            // On failure `buffer` drops here and unmaps.
            mlock(buffer.ptr.as_ptr() as usize, buffer.len)?;
        }
        buffer.pinned = options.pin || buffer.huge_pages;
        Ok(buffer)
    }

    /// Map the whole of a shareable buffer another process exported with [`share_fd`](Self::share_fd).
    /// The file must be sealed against shrinking (a peer that could truncate it would turn our
    /// accesses into `SIGBUS`) and live outside hugetlbfs (a holder may punch a hole in a hugetlb
    /// file, and faulting the hole in again raises `SIGBUS` when the pool is empty). Reading a
    /// hole allocates the page: bulk copies from a peer's file go through [`PeerFile`] instead.
    pub fn map_shared(fd: BorrowedFd<'_>) -> Result<HostBuffer> {
        let refuse = |why: String| Error::InvalidArgument(format!("cannot map a shared host buffer: {why}"));
        let len = sealed_size(fd).map_err(refuse)?;
        // SAFETY: `statfs` is plain data that fstatfs fills in.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a valid descriptor and `fs` a valid out-pointer.
        if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
            return Err(refuse(std::io::Error::last_os_error().to_string()));
        }
        if fs.f_type == libc::HUGETLBFS_MAGIC {
            return Err(refuse("a hugetlb file can lose pages under a mapping".into()));
        }
        let ptr = map(len, libc::MAP_SHARED, Some(fd)).map_err(|e| refuse(e.to_string()))?;
        Ok(HostBuffer::new(ptr, len, len, false, None))
    }

    fn new(ptr: NonNull<u8>, len: usize, map_len: usize, huge_pages: bool, file: Option<OwnedFd>) -> Self {
        HostBuffer { ptr, len, map_len, pinned: false, huge_pages, file }
    }

    /// The memfd of a shareable buffer (mapped from offset 0 at [`as_ptr`](Self::as_ptr)), to pass
    /// to another process (`SCM_RIGHTS`), which maps it with [`map_shared`](Self::map_shared).
    /// `None` for buffers allocated without [`HostAllocOptions::shareable`].
    pub fn share_fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: empty buffers cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the pages are locked in memory (`mlock`, or huge pages).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Whether the buffer lives on huge pages (`MAP_HUGETLB`).
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    pub fn region(&self) -> MemRegion {
        MemRegion::host(self.as_ptr(), self.len)
    }

    /// Copy `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        let at = self.checked_ptr(offset, data.len())?;
        // SAFETY: `checked_ptr` proved the range lies inside the mapping; `data` is a Rust slice and
        // cannot alias memory that Rust does not own as a slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, data.len()) };
        Ok(())
    }

    /// Copy `out.len()` bytes from the buffer at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let at = self.checked_ptr(offset, out.len())?;
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::copy_nonoverlapping(at, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Set every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole buffer is mapped and writable.
        unsafe { std::ptr::write_bytes(self.as_ptr(), byte, self.len) };
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        // SAFETY: the whole buffer is mapped and readable; `out` is as long as it.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr(), out.as_mut_ptr(), self.len) };
        out
    }

    /// The contents as a slice.
    ///
    /// # Safety
    /// Nothing may write to the buffer (another thread, a device, a transport, or
    /// [`as_mut_slice`](Self::as_mut_slice)) while the slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for the lifetime of `self`; the caller rules
        // out concurrent writes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The contents as a mutable slice.
    ///
    /// # Safety
    /// The slice must be the only access to the buffer while it is alive: no other slice from this
    /// buffer, and no reads or writes by other threads, devices or transports.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }

    fn checked_ptr(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.as_ptr().wrapping_add(offset)),
            _ => Err(Error::InvalidArgument(format!(
                "range of {len} bytes at offset {offset} exceeds the {}-byte host buffer",
                self.len
            ))),
        }
    }
}

/// The size of a file that cannot shrink (sealed with `F_SEAL_SHRINK`), or why it is refused.
fn sealed_size(fd: BorrowedFd<'_>) -> std::result::Result<usize, String> {
    // SAFETY: F_GET_SEALS reads the file's seals and has no other effect.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err("the file is not sealed against shrinking".into());
    }
    // SAFETY: `stat` is plain data that fstat fills in.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a valid descriptor and `stat` a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    usize::try_from(stat.st_size).ok().filter(|&l| l > 0).ok_or_else(|| "empty file".into())
}

/// Another process's sealed memfd, read with `pread` and never mapped: how the shm transport
/// copies from a peer's shareable buffer (an owner pulling a WRITE, an initiator a READ). A read
/// fault on a hole of a shared mapping would allocate the page (charged to us, up to the file's
/// size), and on a hugetlb hole with an empty pool raise `SIGBUS`; `pread` returns zeros for a
/// hole and allocates nothing. Nothing here writes to the file.
#[derive(Debug)]
pub struct PeerFile {
    file: OwnedFd,
    len: u64,
}

impl PeerFile {
    /// The first `len` bytes of `file`, refused (`InvalidArgument`) unless the file is sealed
    /// against shrinking and holds `len` bytes, so that a read inside them never comes up short.
    pub fn open(file: OwnedFd, len: u64) -> Result<PeerFile> {
        let refuse = |why: String| Error::InvalidArgument(format!("cannot read a peer's file: {why}"));
        if len == 0 {
            return Err(refuse("empty range".into()));
        }
        let size = sealed_size(file.as_fd()).map_err(refuse)?;
        if (size as u64) < len {
            return Err(refuse(format!("the file holds {size} bytes, not {len}")));
        }
        Ok(PeerFile { file, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: empty files are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw descriptor, for reads on the copy pool while `self` is kept alive.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Copy `len` bytes at `offset` of the file `fd` to `dst` with `pread`, looping over short reads.
///
/// # Safety
/// `dst..dst + len` must be writable memory of ours that nothing else accesses meanwhile, and
/// `fd` an open descriptor for the duration of the call.
pub(crate) unsafe fn read_file_at(fd: std::os::fd::RawFd, dst: u64, len: u64, offset: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let (at, want) = (offset + done, (len - done).min(isize::MAX as u64) as usize);
        // SAFETY: the caller's guarantees; the kernel checks the descriptor.
        let n = unsafe { libc::pread(fd, (dst + done) as *mut libc::c_void, want, at as libc::off_t) };
        match n {
            n if n > 0 => done += n as u64,
            0 => return Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // Unmapping also drops the page locks.
        // SAFETY: `ptr`/`map_len` are exactly the mapping created in `alloc`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl Memory for HostBuffer {
    fn region(&self) -> MemRegion {
        HostBuffer::region(self)
    }

    fn share_fd(&self) -> Option<BorrowedFd<'_>> {
        HostBuffer::share_fd(self)
    }
}

/// Host memory as a [`Device`]: allocation, page locking, and copies by a persistent thread pool.
///
/// Dropping the device finishes the copies already submitted, then joins its threads.
#[derive(Debug)]
pub struct HostDevice {
    alloc_options: HostAllocOptions,
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl HostDevice {
    /// One copy thread per available core, at most 8.
    pub fn new() -> Result<HostDevice> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HostDevice::with_threads(cores.clamp(1, MAX_DEFAULT_THREADS))
    }

    /// `threads` copy threads (at least one).
    pub fn with_threads(threads: usize) -> Result<HostDevice> {
        if threads == 0 {
            return Err(Error::InvalidArgument("a host device needs at least one copy thread".into()));
        }
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut device = HostDevice { alloc_options: HostAllocOptions::new(), jobs: Some(sender), workers: Vec::new() };
        for i in 0..threads {
            let receiver = Arc::clone(&receiver);
            // On failure `device` drops, which stops and joins the threads already started.
            let worker = std::thread::Builder::new()
                .name(format!("kvferry-copy-{i}"))
                .spawn(move || copy_worker(&receiver))
                .map_err(|e| Error::io("starting a host copy thread", e))?;
            device.workers.push(worker);
        }
        Ok(device)
    }

    /// Options for [`Device::alloc`].
    pub fn with_alloc_options(mut self, options: HostAllocOptions) -> Self {
        self.alloc_options = options;
        self
    }

    pub fn alloc_options(&self) -> &HostAllocOptions {
        &self.alloc_options
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }
}

impl HostDevice {
    /// Run `tasks` on the copy pool, the calling thread running the last one itself, and return
    /// once every one has finished: for copies other than `memcpy` (a transport's
    /// `process_vm_readv`, `pread`) split into shares the way [`Device::copy_batch`]
    /// splits a batch. A task must not panic.
    pub(crate) fn run_sharing(&self, mut tasks: Vec<Box<dyn FnOnce() + Send>>) {
        let own = tasks.pop();
        let fence = HostFence::new(tasks.len());
        let fence = Arc::new(fence);
        let sender = self.jobs.as_ref().expect("the job queue lives as long as the device");
        for task in tasks {
            let job = Job { work: Work::Run(task), fence: Arc::clone(&fence) };
            sender.send(job).expect("copy workers run until the device drops");
        }
        if let Some(own) = own {
            own();
        }
        // The tasks are the caller's own copies, which finish whatever peers do.
        while fence.wait(Deadline::after(std::time::Duration::from_secs(60))).is_err() {}
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        // Closing the queue lets each worker drain what is left and exit.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            // A worker only panics if a copy did, which the safety contract rules out; there is
            // nothing to recover in drop either way.
            let _ = worker.join();
        }
    }
}

impl Device for HostDevice {
    fn name(&self) -> String {
        "host".into()
    }

    fn kind(&self) -> MemKind {
        MemKind::Host
    }

    fn alloc(&self, len: usize) -> Result<Arc<dyn Memory>> {
        Ok(Arc::new(HostBuffer::alloc(len, &self.alloc_options)?))
    }

    /// Locks the pages covering `region`. Page locks do not nest: dropping a guard unlocks its pages
    /// even where another pin covers them too.
    fn pin_host(&self, region: MemRegion) -> Result<PinGuard> {
        if region.kind != MemKind::Host {
            return Err(Error::InvalidArgument(format!("cannot pin {} memory as host memory", region.kind)));
        }
        let page = page_size() as u64;
        let start = region.addr & !(page - 1);
        let end = region
            .end()
            .and_then(|end| end.checked_next_multiple_of(page))
            .and_then(|end| usize::try_from(end).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("host region {region:?} overflows")))?;
        let (start, len) = (start as usize, end - start as usize);
        mlock(start, len)?;
        Ok(PinGuard::new(move || {
            // SAFETY: unlocking is harmless even if the range has been unmapped since.
            unsafe { libc::munlock(start as *const libc::c_void, len) };
        }))
    }

    unsafe fn copy_batch(&self, ops: &[CopyOp]) -> Result<CopyFence> {
        let pieces = coalesce_copies(ops)?;
        let total = pieces.iter().fold(0usize, |acc, p| acc.saturating_add(p.len));
        if total < INLINE_COPY_MAX {
            // SAFETY: the caller guarantees the ranges are valid and non-overlapping.
            pieces.iter().for_each(|piece| unsafe { piece.copy() });
            return Ok(CopyFence::new(Arc::new(HostFence::new(0))));
        }
        let jobs = split_into_shares(pieces, total, self.workers.len());
        let fence = Arc::new(HostFence::new(jobs.len()));
        let sender = self.jobs.as_ref().expect("the job queue lives as long as the device");
        for pieces in jobs {
            let job = Job { work: Work::Copy(pieces), fence: Arc::clone(&fence) };
            sender.send(job).expect("copy workers run until the device drops");
        }
        Ok(CopyFence::new(fence))
    }

    fn export_ipc(&self, _region: MemRegion) -> Result<IpcHandle> {
        Err(ipc_unsupported("IPC export of host memory"))
    }

    fn import_ipc(&self, _handle: &IpcHandle) -> Result<Arc<dyn Memory>> {
        Err(ipc_unsupported("IPC import of host memory"))
    }
}

fn ipc_unsupported(what: &str) -> Error {
    Error::Unsupported {
        what: what.into(),
        why: "a region names no file to share; allocate the buffer with `HostAllocOptions::shareable` and pass \
              `HostBuffer::share_fd`"
            .into(),
    }
}

/// Deal `pieces` (`total` bytes) out to `workers` in roughly equal byte shares, splitting pieces
/// that straddle a share boundary, so that one large copy uses every thread.
fn split_into_shares(pieces: Vec<Piece>, total: usize, workers: usize) -> Vec<Vec<Piece>> {
    let share = total.div_ceil(workers).max(MIN_WORKER_SHARE);
    let mut shares = Vec::with_capacity(total.div_ceil(share));
    let mut current = Vec::new();
    let mut current_len = 0;
    for mut piece in pieces {
        while piece.len > 0 {
            let take = piece.len.min(share - current_len);
            current.push(Piece { src: piece.src, dst: piece.dst, len: take });
            current_len += take;
            piece = Piece { src: piece.src + take, dst: piece.dst + take, len: piece.len - take };
            if current_len == share {
                shares.push(std::mem::take(&mut current));
                current_len = 0;
            }
        }
    }
    if !current.is_empty() {
        shares.push(current);
    }
    shares
}

/// A worker's share of one batch.
struct Job {
    work: Work,
    fence: Arc<HostFence>,
}

enum Work {
    Copy(Vec<Piece>),
    Run(Box<dyn FnOnce() + Send>),
}

fn copy_worker(jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // The lock is released as soon as a job is taken, so the others can take the next one.
        let job = jobs.locked().recv();
        let Ok(job) = job else { return };
        match job.work {
            Work::Copy(pieces) => {
                for piece in &pieces {
                    // SAFETY: `copy_batch`'s caller keeps the ranges valid until the fence
                    // completes, which is not before this job signals it.
                    unsafe { piece.copy() };
                }
            }
            Work::Run(task) => task(),
        }
        job.fence.signal();
    }
}

/// Completes when every worker share of a batch is done. Host copies cannot fail once validated,
/// so the outcome is always success.
struct HostFence {
    remaining: Mutex<usize>,
    done: Condvar,
}

impl HostFence {
    fn new(remaining: usize) -> Self {
        HostFence { remaining: Mutex::new(remaining), done: Condvar::new() }
    }

    fn signal(&self) {
        let mut remaining = self.remaining.locked();
        *remaining -= 1;
        if *remaining == 0 {
            self.done.notify_all();
        }
    }
}

impl FenceSignal for HostFence {
    fn poll(&self) -> Option<Result<()>> {
        (*self.remaining.locked() == 0).then_some(Ok(()))
    }

    fn wait(&self, deadline: Deadline) -> Result<()> {
        let mut remaining = self.remaining.locked();
        while *remaining > 0 {
            if deadline.expired() {
                return Err(MemoryError::FenceTimeout.into());
            }
            remaining =
                self.done.wait_timeout(remaining, deadline.remaining()).unwrap_or_else(PoisonError::into_inner).0;
        }
        Ok(())
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// The soft `RLIMIT_MEMLOCK` in bytes: how much an unprivileged process may pin. `None` when
/// unlimited (or unknown).
pub fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Bytes of free huge pages of the default size (`HugePages_Free × Hugepagesize`), or `None` when
/// `/proc/meminfo` does not say.
pub fn huge_pages_free() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let free = meminfo_field(&meminfo, "HugePages_Free")?;
    let size_kib = meminfo_field(&meminfo, "Hugepagesize")?;
    free.checked_mul(size_kib)?.checked_mul(1024)
}

/// The default huge page size, which `MAP_HUGETLB` uses.
fn huge_page_size() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| meminfo_field(&meminfo, "Hugepagesize"))
        .and_then(|kib| usize::try_from(kib.checked_mul(1024)?).ok())
        .unwrap_or(FALLBACK_HUGE_PAGE_SIZE)
}

/// The number on a `Name:   value [kB]` line of `/proc/meminfo`.
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

fn round_up(len: usize, to: usize) -> Result<usize> {
    len.checked_next_multiple_of(to)
        .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes overflow when rounded up to pages")))
}

/// Map `len` bytes: anonymous private memory, or a fresh sealed memfd when the buffer is shareable.
fn map_backing(len: usize, huge: bool, options: &HostAllocOptions) -> std::io::Result<(NonNull<u8>, Option<OwnedFd>)> {
    let populate = if options.populate { libc::MAP_POPULATE } else { 0 };
    if !options.shareable {
        let huge = if huge { libc::MAP_HUGETLB } else { 0 };
        return Ok((map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | huge | populate, None)?, None));
    }
    let file = shareable_file(len, huge)?;
    let ptr = map(len, libc::MAP_SHARED | populate, Some(file.as_fd()))?;
    Ok((ptr, Some(file)))
}

/// A memfd of `len` bytes, sealed so that nobody (a peer holding the descriptor included) can
/// shrink or grow it.
fn shareable_file(len: usize, huge: bool) -> std::io::Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: the name is a valid C string; memfd_create returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"kvferry-host".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| std::io::Error::other("buffer too large for a memfd"))?;
    // SAFETY: `file` is a valid memfd.
    if unsafe { libc::ftruncate(file.as_raw_fd(), size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: adding seals to our own memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn map(len: usize, flags: libc::c_int, file: Option<BorrowedFd<'_>>) -> std::io::Result<NonNull<u8>> {
    let fd = file.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: a mapping at an address of the kernel's choosing touches no existing memory.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))
}

fn mlock(addr: usize, len: usize) -> Result<(), MemoryError> {
    // SAFETY: mlock only changes page residency; an unmapped range fails with ENOMEM.
    if unsafe { libc::mlock(addr as *const libc::c_void, len) } != 0 {
        return Err(MemoryError::PinFailed {
            addr: addr as u64,
            len: len as u64,
            cause: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorCode;

    const UNPINNED: HostAllocOptions = HostAllocOptions::new().with_pin(false);

    /// The code of a call that must fail (for results whose value is not `Debug`).
    fn error_code<T>(result: Result<T>) -> ErrorCode {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(err) => err.code(),
        }
    }

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(30))
    }

    /// A buffer whose every byte depends on its position and on `seed`.
    fn patterned(len: usize, seed: u8) -> HostBuffer {
        let buf = HostBuffer::alloc(len, &UNPINNED).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        buf.write_at(0, &bytes).unwrap();
        buf
    }

    fn op(src: &HostBuffer, src_off: usize, dst: &HostBuffer, dst_off: usize, len: usize) -> CopyOp {
        CopyOp { src: src.as_ptr() as u64 + src_off as u64, dst: dst.as_ptr() as u64 + dst_off as u64, len: len as u64 }
    }

    /// Copies `count` ops of `len` bytes from a patterned source into a patterned destination in
    /// reverse order, and checks every destination byte.
    fn check_copy(device: &HostDevice, count: usize, len: usize) {
        let src = patterned(count * len, 0x5a);
        let dst = patterned(count * len, 0xc3);
        let ops: Vec<CopyOp> = (0..count).map(|i| op(&src, i * len, &dst, (count - 1 - i) * len, len)).collect();
        let fence = unsafe { device.copy_batch(&ops) }.unwrap();
        fence.wait(deadline()).unwrap();
        assert!(matches!(fence.poll(), Some(Ok(()))));
        let (src, dst) = (src.to_vec(), dst.to_vec());
        for i in 0..count {
            let j = count - 1 - i;
            assert!(src[i * len..(i + 1) * len] == dst[j * len..(j + 1) * len], "op {i} copied wrong bytes");
        }
    }

    #[test]
    fn buffers_are_page_aligned_and_rounded() {
        let page = page_size();
        assert!(page.is_power_of_two());
        for len in [1, page - 1, page, page + 1, 3 * page + 17] {
            let buf = HostBuffer::alloc(len, &UNPINNED).unwrap();
            assert_eq!(buf.as_ptr() as usize % page, 0);
            assert_eq!(buf.len(), len);
            assert!(!buf.is_empty() && !buf.is_pinned() && !buf.huge_pages());
            assert_eq!(buf.region(), MemRegion { addr: buf.as_ptr() as u64, len: len as u64, kind: MemKind::Host });
            assert_eq!(Memory::region(&buf), buf.region());
        }
    }

    #[test]
    fn empty_allocation_is_invalid() {
        let err = HostBuffer::alloc(0, &UNPINNED).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn fresh_buffers_are_zeroed_and_fill_sets_every_byte() {
        let buf = HostBuffer::alloc(10_000, &UNPINNED.with_populate(true)).unwrap();
        assert!(buf.to_vec().iter().all(|&b| b == 0));
        buf.fill(0xab);
        assert!(unsafe { buf.as_slice() }.iter().all(|&b| b == 0xab));
        let bytes = unsafe { buf.as_mut_slice() };
        bytes[9_999] = 1;
        assert_eq!(buf.to_vec()[9_999], 1);
    }

    #[test]
    fn write_at_and_read_at_are_bounds_checked() {
        let buf = HostBuffer::alloc(100, &UNPINNED).unwrap();
        buf.write_at(90, &[7; 10]).unwrap();
        let mut out = [0; 12];
        buf.read_at(88, &mut out).unwrap();
        assert_eq!(out, [0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        buf.write_at(100, &[]).unwrap();

        for err in [
            buf.write_at(91, &[0; 10]).unwrap_err(),
            buf.write_at(101, &[]).unwrap_err(),
            buf.write_at(usize::MAX, &[0]).unwrap_err(),
            buf.read_at(95, &mut [0; 6]).unwrap_err(),
            buf.read_at(usize::MAX - 2, &mut [0; 6]).unwrap_err(),
        ] {
            assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
        }
        assert_eq!(buf.to_vec()[90..], [7; 10]);
    }

    fn huge_pages_available(len: usize) -> bool {
        huge_pages_free().is_some_and(|free| free >= len as u64)
    }

    #[test]
    fn try_huge_pages_always_allocates() {
        let len = 3 << 20;
        let expect_huge = huge_pages_available(4 << 20);
        let buf = HostBuffer::alloc(len, &UNPINNED.with_huge_pages(HugePages::Try)).unwrap();
        assert_eq!(buf.len(), len);
        // Huge pages may be taken by someone else between the check and the allocation, so only
        // their absence is certain.
        if !expect_huge {
            assert!(!buf.huge_pages());
        }
        buf.write_at(len - 1, &[9]).unwrap();
        assert_eq!(buf.to_vec()[len - 1], 9);
    }

    #[test]
    fn required_huge_pages_are_used_or_reported_unavailable() {
        let len = 1 << 20;
        match HostBuffer::alloc(len, &UNPINNED.with_huge_pages(HugePages::Require)) {
            Ok(buf) => {
                assert!(buf.huge_pages() && buf.is_pinned());
                assert_eq!(buf.as_ptr() as usize % huge_page_size(), 0);
                buf.fill(1);
            }
            Err(err) => {
                assert!(!huge_pages_available(2 * huge_page_size()), "huge pages were free: {err}");
                assert!(matches!(err, Error::Memory(MemoryError::HugePagesUnavailable { .. })), "{err}");
                assert_eq!(err.code(), ErrorCode::HugePagesUnavailable);
            }
        }
    }

    #[test]
    fn pinned_allocation_succeeds_within_the_memlock_limit() {
        let len = 64 << 10;
        let ample = memlock_limit().is_none_or(|limit| limit >= 4 * len as u64);
        match HostBuffer::alloc(len, &HostAllocOptions::default()) {
            Ok(buf) => assert!(buf.is_pinned()),
            // A process with CAP_IPC_LOCK pins past the limit, so a small limit only allows failure.
            Err(err) => {
                assert!(!ample, "pinning failed within the limit: {err}");
                assert_eq!(err.code(), ErrorCode::PinFailed);
                assert!(err.to_string().contains("ulimit -l"));
            }
        }
    }

    #[test]
    fn pin_host_locks_existing_memory() {
        let device = HostDevice::with_threads(1).unwrap();
        let buf = HostBuffer::alloc(3 * page_size(), &UNPINNED).unwrap();
        let ample = memlock_limit().is_none_or(|limit| limit >= 1 << 20);
        let region = MemRegion::host(buf.as_ptr().wrapping_add(100), page_size());
        match device.pin_host(region) {
            Ok(guard) => drop(guard),
            Err(err) => {
                assert!(!ample, "pinning failed within the limit: {err}");
                assert_eq!(err.code(), ErrorCode::PinFailed);
            }
        }
        let gpu = MemRegion { kind: MemKind::Cuda { device: 0 }, ..region };
        assert_eq!(error_code(device.pin_host(gpu)), ErrorCode::InvalidArgument);
        let wrapping = MemRegion { addr: u64::MAX - 10, len: 100, kind: MemKind::Host };
        assert_eq!(error_code(device.pin_host(wrapping)), ErrorCode::InvalidArgument);
    }

    #[test]
    fn device_identity_and_allocation() {
        let device = HostDevice::with_threads(2).unwrap().with_alloc_options(UNPINNED);
        assert_eq!(device.name(), "host");
        assert_eq!(device.kind(), MemKind::Host);
        assert_eq!(device.threads(), 2);
        assert_eq!(device.alloc_options(), &UNPINNED);
        let memory = device.alloc(5000).unwrap();
        assert_eq!(memory.region().len, 5000);
        assert_eq!(memory.region().addr % page_size() as u64, 0);
        assert_eq!(error_code(device.alloc(0)), ErrorCode::InvalidArgument);
        assert_eq!(HostDevice::with_threads(0).unwrap_err().code(), ErrorCode::InvalidArgument);
        assert!((1..=MAX_DEFAULT_THREADS).contains(&HostDevice::new().unwrap().threads()));
    }

    #[test]
    fn empty_batch_completes_immediately() {
        let device = HostDevice::with_threads(2).unwrap();
        let fence = unsafe { device.copy_batch(&[]) }.unwrap();
        assert!(matches!(fence.poll(), Some(Ok(()))));
        fence.wait(deadline()).unwrap();
    }

    #[test]
    fn small_batch_is_copied_inline() {
        let device = HostDevice::with_threads(2).unwrap();
        let src = patterned(4096, 1);
        let dst = patterned(4096, 2);
        let ops = [op(&src, 0, &dst, 1000, 100), CopyOp { src: 0, dst: 0, len: 0 }, op(&src, 500, &dst, 0, 1000)];
        let fence = unsafe { device.copy_batch(&ops) }.unwrap();
        // Already done before any wait.
        assert!(fence.is_done());
        let (src, dst) = (src.to_vec(), dst.to_vec());
        assert_eq!(dst[1000..1100], src[..100]);
        assert_eq!(dst[..1000], src[500..1500]);
        assert_eq!(dst[1100..], patterned(4096, 2).to_vec()[1100..]);
    }

    #[test]
    fn many_small_ops_are_copied_exactly() {
        check_copy(&HostDevice::with_threads(3).unwrap(), 256, 64 << 10);
    }

    #[test]
    fn single_large_op_is_split_across_threads() {
        check_copy(&HostDevice::with_threads(4).unwrap(), 1, 32 << 20);
    }

    #[test]
    fn uneven_ops_are_copied_exactly() {
        let device = HostDevice::with_threads(3).unwrap();
        let len = 5 << 20;
        let src = patterned(len, 0x11);
        // Pieces of odd lengths straddle the worker shares; laid out in the same order they merge
        // into one copy, mirrored they stay apart.
        let cuts = [0, 1, 300_001, 1 << 20, (3 << 20) + 7, len];
        for mirrored in [false, true] {
            let dst = patterned(len, 0x22);
            let dst_offset = |from: usize, to: usize| if mirrored { len - to } else { from };
            let ops: Vec<CopyOp> =
                cuts.windows(2).map(|w| op(&src, w[0], &dst, dst_offset(w[0], w[1]), w[1] - w[0])).collect();
            unsafe { device.copy_batch(&ops) }.unwrap().wait(deadline()).unwrap();
            let (src, dst) = (src.to_vec(), dst.to_vec());
            for w in cuts.windows(2) {
                let at = dst_offset(w[0], w[1]);
                assert!(dst[at..at + w[1] - w[0]] == src[w[0]..w[1]], "mirrored {mirrored}, piece at {}", w[0]);
            }
        }
    }

    #[test]
    fn batches_are_split_into_equal_shares() {
        let mib = 1 << 20;
        let shares = split_into_shares(vec![Piece { src: 0x1000, dst: 0x1000_0000, len: 32 * mib }], 32 * mib, 4);
        assert_eq!(shares.len(), 4);
        for (i, share) in shares.iter().enumerate() {
            let offset = i * 8 * mib;
            assert_eq!(share.len(), 1);
            assert_eq!((share[0].src, share[0].dst, share[0].len), (0x1000 + offset, 0x1000_0000 + offset, 8 * mib));
        }

        // 1 MiB over 8 workers: shares do not shrink below the minimum.
        let ops: Vec<Piece> =
            (0..64).map(|i| Piece { src: 0x1000 + i * 16384, dst: 0x100_0000 + i * 16384, len: 16384 }).collect();
        let shares = split_into_shares(ops, mib, 8);
        assert_eq!(shares.len(), mib / MIN_WORKER_SHARE);
        assert!(shares.iter().all(|s| s.iter().map(|p| p.len).sum::<usize>() == MIN_WORKER_SHARE));

        // A share boundary inside a piece splits it; the remainder goes to the last share.
        let ops = vec![
            Piece { src: 0x1000, dst: 0x90_0000, len: 300_000 },
            Piece { src: 0x80_0000, dst: 0xa0_0000, len: 300_001 },
        ];
        let shares = split_into_shares(ops, 600_001, 2);
        let lens: Vec<Vec<usize>> = shares.iter().map(|s| s.iter().map(|p| p.len).collect()).collect();
        assert_eq!(lens, [vec![300_000, 1], vec![300_000]]);
        assert_eq!((shares[1][0].src, shares[1][0].dst), (0x80_0001, 0xa0_0001));
    }

    #[test]
    fn contiguous_ops_merge_unless_the_result_overlaps() {
        let mut piece = Piece { src: 0x1000, dst: 0x9000, len: 0x100 };
        assert!(piece.try_extend(&Piece { src: 0x1100, dst: 0x9100, len: 0x200 }));
        assert_eq!((piece.src, piece.dst, piece.len), (0x1000, 0x9000, 0x300));
        assert!(!piece.try_extend(&Piece { src: 0x1300, dst: 0x9400, len: 0x100 }));
        assert!(!piece.try_extend(&Piece { src: 0x1400, dst: 0x9300, len: 0x100 }));
        // Each op is disjoint on its own, but together the ranges would overlap.
        let mut piece = Piece { src: 0x1000, dst: 0x1800, len: 0x800 };
        assert!(!piece.try_extend(&Piece { src: 0x1800, dst: 0x2000, len: 0x800 }));
        assert_eq!(piece.len, 0x800);
    }

    #[test]
    fn invalid_ops_are_rejected_with_their_index() {
        let device = HostDevice::with_threads(2).unwrap();
        let src = patterned(4096, 1);
        let dst = HostBuffer::alloc(4096, &UNPINNED).unwrap();
        let good = op(&src, 0, &dst, 0, 16);
        let cases = [
            (vec![good, CopyOp { src: 0, ..good }], 1),
            (vec![CopyOp { dst: 0, ..good }], 0),
            (vec![good, CopyOp { src: 0, dst: 0, len: 0 }, good, CopyOp { len: u64::MAX, ..good }], 3),
            (vec![CopyOp { src: u64::MAX - 4, ..good }], 0),
            (vec![good, good, CopyOp { dst: good.src + 8, ..good }], 2),
        ];
        for (ops, index) in cases {
            match unsafe { device.copy_batch(&ops) } {
                Err(err @ Error::Memory(MemoryError::InvalidCopy { index: got, .. })) => {
                    assert_eq!(got, index, "{err}");
                    assert_eq!(err.code(), ErrorCode::InvalidCopy);
                }
                other => panic!("expected InvalidCopy at {index}, got {:?}", other.map(|_| ())),
            }
        }
        // Nothing of a rejected batch is copied.
        assert!(dst.to_vec().iter().all(|&b| b == 0));
    }

    #[test]
    fn fence_times_out_while_copies_remain() {
        let fence = HostFence::new(1);
        let err = fence.wait(Deadline::after(Duration::from_millis(10))).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Timeout);
        assert!(fence.poll().is_none());
        fence.signal();
        assert!(matches!(fence.poll(), Some(Ok(()))));
        fence.wait(Deadline::after(Duration::ZERO)).unwrap();
    }

    #[test]
    fn dropping_the_device_finishes_copies_and_joins_threads() {
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let src = patterned(8 << 20, 3);
            let dst = HostBuffer::alloc(8 << 20, &UNPINNED).unwrap();
            let device = HostDevice::with_threads(4).unwrap();
            let fence = unsafe { device.copy_batch(&[op(&src, 0, &dst, 0, 8 << 20)]) }.unwrap();
            drop(device);
            let copied = fence.is_done() && src.to_vec() == dst.to_vec();
            done.send(copied).unwrap();
        });
        assert!(finished.recv_timeout(Duration::from_secs(60)).expect("device drop hung"));
    }

    #[test]
    fn ipc_is_unsupported() {
        let device = HostDevice::with_threads(1).unwrap();
        let buf = HostBuffer::alloc(4096, &UNPINNED).unwrap();
        assert_eq!(device.export_ipc(buf.region()).unwrap_err().code(), ErrorCode::Unsupported);
        let handle = IpcHandle { kind: MemKind::Host, len: 4096, bytes: vec![] };
        assert_eq!(error_code(device.import_ipc(&handle)), ErrorCode::Unsupported);
    }

    #[test]
    fn shareable_buffers_export_a_sealed_file_another_mapping_shares() {
        let shareable = UNPINNED.with_shareable(true).with_populate(true);
        let buf = HostBuffer::alloc(10_000, &shareable).unwrap();
        assert_eq!(buf.as_ptr() as usize % page_size(), 0);
        assert!(HostBuffer::alloc(10_000, &UNPINNED).unwrap().share_fd().is_none());
        let fd = buf.share_fd().expect("a shareable buffer has a file");
        assert_eq!(Memory::share_fd(&buf).map(|f| f.as_raw_fd()), Some(fd.as_raw_fd()));
        // The file is sealed: nobody holding it can shrink it under a mapping.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
        let view = HostBuffer::map_shared(fd).unwrap();
        assert_eq!(view.len(), 10_000usize.next_multiple_of(page_size()));
        buf.write_at(9_999, &[42]).unwrap();
        let mut got = [0u8];
        view.read_at(9_999, &mut got).unwrap();
        assert_eq!(got, [42]);

        // An unsealed file could shrink under the mapping: refused.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        let unsealed = unsafe { OwnedFd::from_raw_fd(raw) };
        assert_eq!(unsafe { libc::ftruncate(unsealed.as_raw_fd(), 4096) }, 0);
        assert_eq!(HostBuffer::map_shared(unsealed.as_fd()).unwrap_err().code(), ErrorCode::InvalidArgument);
    }

    fn sealed_memfd(flags: libc::c_uint, len: usize) -> Option<OwnedFd> {
        let raw = unsafe {
            libc::memfd_create(c"peer-file-test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | flags)
        };
        let fd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })?;
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
        assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
        Some(fd)
    }

    fn blocks_of(fd: BorrowedFd<'_>) -> i64 {
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) }, 0);
        stat.st_blocks
    }

    fn read_all(file: &PeerFile, offset: u64, len: usize) -> Vec<u8> {
        let mut got = vec![0xeeu8; len];
        // SAFETY: `got` is ours, `file` open.
        unsafe { read_file_at(file.raw_fd(), got.as_mut_ptr() as u64, len as u64, offset) }.unwrap();
        got
    }

    #[test]
    fn a_peer_file_is_read_live_and_files_that_could_shrink_are_refused() {
        let buf = HostBuffer::alloc(3 * page_size(), &UNPINNED.with_shareable(true)).unwrap();
        buf.write_at(5000, b"view").unwrap();
        let file = PeerFile::open(buf.share_fd().unwrap().try_clone_to_owned().unwrap(), 5004).unwrap();
        assert_eq!(file.len(), 5004);
        assert_eq!(read_all(&file, 5000, 4), b"view");
        buf.write_at(5000, b"live").unwrap();
        assert_eq!(read_all(&file, 5000, 4), b"live");
        let dup = || buf.share_fd().unwrap().try_clone_to_owned().unwrap();
        let refused = |r: Result<PeerFile>| r.map(drop).unwrap_err().to_string();
        assert!(refused(PeerFile::open(dup(), 3 * page_size() as u64 + 1)).contains("holds"));
        assert!(refused(PeerFile::open(dup(), 0)).contains("empty"));
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        let unsealed = unsafe { OwnedFd::from_raw_fd(raw) };
        assert_eq!(unsafe { libc::ftruncate(unsealed.as_raw_fd(), 4096) }, 0);
        assert!(refused(PeerFile::open(unsealed, 4096)).contains("not sealed"));
    }

    #[test]
    fn reading_a_peer_files_holes_gives_zeros_and_allocates_nothing() {
        let len = 16 << 20;
        let sparse = sealed_memfd(0, len).unwrap();
        let file = PeerFile::open(sparse.try_clone().unwrap(), len as u64).unwrap();
        assert!(read_all(&file, 0, len).iter().all(|&b| b == 0));
        assert_eq!(blocks_of(sparse.as_fd()), 0, "reading the holes allocated pages of the peer's file");
        // What a mapping would have done: one read fault allocates a page, charged to the reader.
        let mapped = HostBuffer::map_shared(sparse.as_fd()).unwrap();
        assert_eq!(unsafe { std::ptr::read_volatile(mapped.as_ptr()) }, 0);
        assert!(blocks_of(sparse.as_fd()) > 0, "a read fault on a hole allocated nothing");

        // A hugetlb hole reads as zeros too (a mapping is refused: faulting it could raise SIGBUS).
        if let Some(huge) = sealed_memfd(libc::MFD_HUGETLB, huge_page_size()) {
            assert!(HostBuffer::map_shared(huge.as_fd()).unwrap_err().to_string().contains("hugetlb"));
            let file = PeerFile::open(huge, huge_page_size() as u64).unwrap();
            assert!(read_all(&file, 0, huge_page_size()).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn shareable_buffers_use_huge_pages_when_there_are_some() {
        let options = UNPINNED.with_shareable(true).with_huge_pages(HugePages::Try);
        let buf = HostBuffer::alloc(1 << 20, &options).unwrap();
        assert!(buf.share_fd().is_some());
        if !huge_pages_available(2 * huge_page_size()) {
            assert!(!buf.huge_pages());
        }
        buf.fill(3);
        assert!(buf.to_vec().iter().all(|&b| b == 3));
    }

    #[test]
    fn system_limits_are_readable() {
        assert!(page_size() >= 4096);
        assert!(huge_page_size().is_power_of_two());
        assert_eq!(meminfo_field("HugePages_Free:      12\nHugepagesize:    2048 kB\n", "Hugepagesize"), Some(2048));
        assert_eq!(meminfo_field("HugePages_Free:      12\n", "HugePages"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(huge_pages_free().is_some());
        }
        // Whatever the limit, asking must not fail.
        let _ = memlock_limit();
    }
}
