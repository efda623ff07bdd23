//! One io_uring moving slabs of the host arena to and from the disk tier's file.
//!
//! The file and the arena are registered with the ring when the kernel allows (fixed files skip a
//! file-table lookup per op; fixed buffers skip pinning and unpinning the pages on every op), and the
//! ring falls back to plain reads and writes otherwise, keeping the reason for `TierStore::stats`.
//! A batch is kept `depth` ops deep until it drains. Where io_uring itself is refused (container
//! seccomp profiles block it), ops run one at a time with `pread`/`pwrite`, again with the reason.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};

/// The kernel caps one registered buffer at 1 GiB.
const MAX_FIXED_BUFFER: usize = 1 << 30;

/// Whether the kernel lets this process set up an io_uring.
pub(crate) fn probe() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

/// One read or write: `len` bytes at `addr` (a slab of the arena, or caller memory), `offset` in the
/// file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoOp {
    pub addr: usize,
    pub len: usize,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

/// The arena as the ring registers it: buffers of `chunk` bytes from `base`, `len` in all.
struct FixedBuffers {
    base: usize,
    len: usize,
    chunk: usize,
}

pub(crate) struct Ring {
    /// `None` where io_uring is unavailable.
    ring: Option<IoUring>,
    depth: usize,
    fd: RawFd,
    fixed_file: bool,
    fixed_buffers: Option<FixedBuffers>,
}

impl Ring {
    /// A ring of `depth` entries for `fd`, registering the arena (`arena_base`, `arena_len`) cut at
    /// multiples of `slab` so that no slab straddles two registered buffers. Also returns what the
    /// kernel refused, when it refused something.
    pub(crate) fn new(
        depth: usize,
        fd: RawFd,
        arena_base: usize,
        arena_len: usize,
        slab: usize,
    ) -> (Ring, Option<String>) {
        let ring = match IoUring::new(depth.next_power_of_two() as u32) {
            Ok(ring) => ring,
            Err(e) => {
                let ring = Ring { ring: None, depth, fd, fixed_file: false, fixed_buffers: None };
                return (ring, Some(format!("io_uring: {e}; using pread/pwrite, one block at a time")));
            }
        };
        let mut refused = Vec::new();
        let fixed_file = match ring.submitter().register_files(&[fd]) {
            Ok(()) => true,
            Err(e) => {
                refused.push(format!("registered files: {e}"));
                false
            }
        };
        let chunk = (MAX_FIXED_BUFFER / slab).max(1) * slab;
        let iovecs: Vec<libc::iovec> = (0..arena_len)
            .step_by(chunk)
            .map(|at| libc::iovec {
                iov_base: (arena_base + at) as *mut libc::c_void,
                iov_len: chunk.min(arena_len - at),
            })
            .collect();
        // SAFETY: the iovecs cover the arena, which outlives the ring (the store drops its rings
        // first).
        let fixed_buffers = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => Some(FixedBuffers { base: arena_base, len: arena_len, chunk }),
            Err(e) => {
                refused.push(format!("registered buffers: {e} (needs RLIMIT_MEMLOCK above the arena or CAP_IPC_LOCK)"));
                None
            }
        };
        let refused = (!refused.is_empty()).then(|| refused.join("; "));
        (Ring { ring: Some(ring), depth, fd, fixed_file, fixed_buffers }, refused)
    }

    /// Run every op, keeping up to `depth` in flight. `complete(i, outcome)` runs once when op `i`
    /// is done, right after the ops that take its place are submitted, so that per-block CPU work
    /// (checksums, copies) overlaps the i/o instead of delaying it. A short transfer is continued
    /// from where it stopped; reading past the end of the file is an error.
    pub(crate) fn run(&mut self, direction: Direction, ops: &[IoOp], complete: &mut dyn FnMut(usize, io::Result<()>)) {
        let Some(ring) = &mut self.ring else {
            return run_blocking(self.fd, direction, ops, complete);
        };
        let mut remaining: Vec<IoOp> = ops.to_vec();
        // Ops to (re)submit, as indices into `remaining`.
        let mut pending: VecDeque<usize> = (0..ops.len()).collect();
        let mut done: Vec<(usize, io::Result<()>)> = Vec::new();
        let mut reported = vec![false; ops.len()];
        let mut in_flight = 0;
        loop {
            while in_flight < self.depth {
                let Some(&index) = pending.front() else { break };
                let entry =
                    entry(self.fd, self.fixed_file, &self.fixed_buffers, direction, &remaining[index], index as u64);
                // SAFETY: the buffer lies in the arena, which outlives this call, or in caller memory
                // kept valid until its operation's fence completes (after this call); the ring has room
                // because no more than `depth` entries are ever outstanding.
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    break;
                }
                pending.pop_front();
                in_flight += 1;
            }
            let submitted = ring.submit();
            for (index, outcome) in done.drain(..) {
                reported[index] = true;
                complete(index, outcome);
            }
            if in_flight == 0 && pending.is_empty() {
                return;
            }
            let waited = submitted.and_then(|_| ring.submit_and_wait(1));
            if let Err(e) = waited {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The ring itself failed: nothing more completes, so every unfinished op fails.
                for (index, outcome) in done.drain(..) {
                    reported[index] = true;
                    complete(index, outcome);
                }
                for (index, _) in reported.iter().enumerate().filter(|(_, r)| !**r) {
                    complete(index, Err(io::Error::new(e.kind(), e.to_string())));
                }
                return;
            }
            for cqe in ring.completion() {
                in_flight -= 1;
                let (index, result) = (cqe.user_data() as usize, cqe.result());
                let op = &mut remaining[index];
                if result < 0 {
                    done.push((index, Err(io::Error::from_raw_os_error(-result))));
                } else if result == 0 {
                    done.push((index, Err(early_end())));
                } else if (result as usize) < op.len {
                    let moved = result as usize;
                    *op = IoOp { addr: op.addr + moved, len: op.len - moved, offset: op.offset + moved as u64 };
                    pending.push_front(index);
                } else {
                    done.push((index, Ok(())));
                }
            }
        }
    }
}

fn entry(
    fd: RawFd,
    fixed_file: bool,
    fixed_buffers: &Option<FixedBuffers>,
    direction: Direction,
    op: &IoOp,
    tag: u64,
) -> squeue::Entry {
    let (ptr, len) = (op.addr as *mut u8, op.len as u32);
    // Memory outside the arena (a direct read or write of the caller's) is not registered.
    let buffer = fixed_buffers
        .as_ref()
        .filter(|fixed| op.addr >= fixed.base && op.addr + op.len <= fixed.base + fixed.len)
        .map(|fixed| ((op.addr - fixed.base) / fixed.chunk) as u16);
    // The file target is a different type for fixed and plain files, hence a macro, not a fn.
    macro_rules! build {
        ($file:expr) => {
            match (buffer, direction) {
                (Some(index), Direction::Write) => {
                    opcode::WriteFixed::new($file, ptr, len, index).offset(op.offset).build()
                }
                (Some(index), Direction::Read) => {
                    opcode::ReadFixed::new($file, ptr, len, index).offset(op.offset).build()
                }
                (None, Direction::Write) => opcode::Write::new($file, ptr, len).offset(op.offset).build(),
                (None, Direction::Read) => opcode::Read::new($file, ptr, len).offset(op.offset).build(),
            }
        };
    }
    let entry = if fixed_file { build!(types::Fixed(0)) } else { build!(types::Fd(fd)) };
    entry.user_data(tag)
}

fn early_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early")
}

/// `Ring::run` without io_uring: one op at a time.
fn run_blocking(fd: RawFd, direction: Direction, ops: &[IoOp], complete: &mut dyn FnMut(usize, io::Result<()>)) {
    for (index, op) in ops.iter().enumerate() {
        let mut moved = 0;
        let outcome = loop {
            if moved == op.len {
                break Ok(());
            }
            let (ptr, len, offset) =
                ((op.addr + moved) as *mut libc::c_void, op.len - moved, (op.offset + moved as u64) as libc::off_t);
            // SAFETY: the range lies in the arena, which outlives this call, or in caller memory
            // kept valid until the operation's fence completes.
            let n = unsafe {
                match direction {
                    Direction::Read => libc::pread(fd, ptr, len, offset),
                    Direction::Write => libc::pwrite(fd, ptr, len, offset),
                }
            };
            match n {
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        break Err(err);
                    }
                }
                0 => break Err(early_end()),
                n => moved += n as usize,
            }
        };
        complete(index, outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::memory::host::{HostAllocOptions, HostBuffer};

    const BLOCK: usize = 4096;

    /// Write three blocks and read them back through `run`, each reported once; a read past the end
    /// of the file fails.
    fn round_trip(make_ring: impl Fn(RawFd, &HostBuffer) -> Ring) {
        let path = std::env::temp_dir().join(format!(
            "kvferry-uring-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let arena = HostBuffer::alloc(6 * BLOCK, &HostAllocOptions::new().with_pin(false)).unwrap();
        for i in 0..3 {
            arena.write_at(i * BLOCK, &[i as u8 + 1; BLOCK]).unwrap();
        }
        let mut ring = make_ring(file.as_raw_fd(), &arena);
        let base = arena.as_ptr() as usize;
        let writes: Vec<IoOp> =
            (0..3).map(|i| IoOp { addr: base + i * BLOCK, len: BLOCK, offset: ((2 - i) * BLOCK) as u64 }).collect();
        let mut completed = vec![];
        ring.run(Direction::Write, &writes, &mut |i, r| completed.push((i, r.is_ok())));
        completed.sort();
        assert_eq!(completed, [(0, true), (1, true), (2, true)]);

        let reads: Vec<IoOp> = (0..4)
            .map(|i| IoOp { addr: base + (3 + i.min(2)) * BLOCK, len: BLOCK, offset: (i * BLOCK) as u64 })
            .collect();
        let mut outcomes = [None; 4];
        ring.run(Direction::Read, &reads[..3], &mut |i, r| outcomes[i] = Some(r.is_ok()));
        assert_eq!(outcomes[..3], [Some(true); 3]);
        let bytes = arena.to_vec();
        for i in 0..3 {
            assert!(bytes[(3 + i) * BLOCK..(4 + i) * BLOCK].iter().all(|&b| b == 3 - i as u8), "block {i}");
        }
        let mut past_end = None;
        ring.run(Direction::Read, &reads[3..], &mut |_, r| past_end = Some(r));
        assert_eq!(past_end.unwrap().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn io_uring_moves_blocks_and_reports_each() {
        if let Err(e) = probe() {
            eprintln!("skipped: io_uring is unavailable here ({e}); the blocking fallback is tested instead");
            return;
        }
        round_trip(|fd, arena| Ring::new(2, fd, arena.as_ptr() as usize, arena.len(), BLOCK).0);
    }

    #[test]
    fn blocking_fallback_moves_blocks_and_reports_each() {
        round_trip(|fd, _| Ring { ring: None, depth: 1, fd, fixed_file: false, fixed_buffers: None });
    }
}
