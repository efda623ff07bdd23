//! The frame format the stream transports share (TCP, and shm's control socket): requests,
//! descriptors, responses, their failures, and vectored I/O over them. Little-endian, fixed-size
//! headers so that a frame's payload can be read straight into registered memory.
//!
//! ```text
//! request    kind u8 | 0u8 ×3 | count u32 | payload_len u64 | count × desc | payload
//! desc       key [u8;16] | addr u64 | len u64
//! response   status u8 | 0u8 ×3 | index u32 | payload_len u64 | payload
//! ```
//! A request's payload is the WRITE data (the descriptors' bytes, in order) or the notification; a
//! response's payload is the READ data. Response status 0 is success, [`STATUS_BUSY`] a refusal
//! for one of the target's limits (`index` says which: [`BUSY_REQUEST_BYTES`],
//! [`BUSY_NOTIFICATIONS`]; it may succeed later), otherwise a
//! [`RejectReason`](crate::transport::RejectReason) naming descriptor `index`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::deadline::Deadline;
use crate::net::{DeadlineStream, time_left};
use crate::transport::{Completion, RejectReason, TransferError};

pub const HEADER_LEN: usize = 16;
pub const DESC_LEN: usize = 32;
/// The most descriptors one request may carry; initiators split larger batches.
pub const MAX_DESCS: usize = 1 << 16;
pub const MAX_NOTIFICATION: u64 = 1 << 20;
pub const MAX_NAME: usize = 1024;

/// Response status: the target refused the request for one of its limits.
pub const STATUS_BUSY: u8 = 0x80;
/// Busy: the bytes held by requests being read reached the target's budget.
pub const BUSY_REQUEST_BYTES: u32 = 1;
/// Busy: the target's queue of notifications is full.
pub const BUSY_NOTIFICATIONS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Read = 1,
    Write = 2,
    Notify = 3,
}

impl FrameKind {
    pub fn from_wire(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Read),
            2 => Some(FrameKind::Write),
            3 => Some(FrameKind::Notify),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireDesc {
    pub key: u128,
    pub addr: u64,
    pub len: u64,
}

impl WireDesc {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> WireDesc {
        WireDesc {
            key: u128::from_le_bytes(b[0..16].try_into().unwrap()),
            addr: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            len: u64::from_le_bytes(b[24..32].try_into().unwrap()),
        }
    }
}

/// Request header and response header share one shape: a byte, a u32 and a u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub count: u32,
    pub payload_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.tag;
        b[4..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            tag: b[0],
            count: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            payload_len: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn read_from(r: &mut impl Read) -> io::Result<Header> {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b)?;
        Ok(Header::decode(&b))
    }
}

/// What a request can end in, before the transport names it for the caller.
pub enum Failure {
    Io(io::Error),
    Rejected(u32, RejectReason),
    Protocol(String),
    /// A device copy to or from the staging bounce buffers failed.
    Staging(String),
    /// The target refused the request for one of its limits ([`STATUS_BUSY`]).
    Busy(u32),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl Failure {
    /// Whether the stream may be out of step, so its connection must be dropped: all but a
    /// rejection, which the target answers in step.
    pub fn breaks_stream(&self) -> bool {
        !matches!(self, Failure::Rejected(..) | Failure::Busy(_))
    }

    /// Name the failure for the caller of a transfer with `peer`.
    pub fn into_error(self, peer: &str, c: &Completion) -> TransferError {
        let peer = peer.to_string();
        match self {
            Failure::Rejected(index, reason) => TransferError::Rejected { peer, op: c.op(), index, reason },
            Failure::Protocol(detail) => TransferError::Protocol { peer, detail },
            Failure::Staging(cause) => TransferError::Staging { peer, op: c.op(), cause },
            Failure::Busy(what) => {
                let cause = match what {
                    BUSY_REQUEST_BYTES => "it holds as many bytes of requests being read as it allows".into(),
                    BUSY_NOTIFICATIONS => "its queue of notifications is full".into(),
                    other => format!("busy ({other})"),
                };
                TransferError::PeerBusy { peer, op: c.op(), cause }
            }
            Failure::Io(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => c.timeout_error(),
                _ => TransferError::PeerDisconnected { peer, op: c.op(), cause: e.to_string() },
            },
        }
    }
}

/// A response header's status: 0 is success, otherwise the rejection it names.
pub fn status_of(header: Header) -> Result<Header, Failure> {
    match header.tag {
        0 => Ok(header),
        STATUS_BUSY => Err(Failure::Busy(header.count)),
        tag => Err(match RejectReason::from_wire(tag) {
            Some(reason) => Failure::Rejected(header.count, reason),
            None => Failure::Protocol(format!("unknown response status {tag}")),
        }),
    }
}

/// A malformed message from the peer: the connection cannot go on.
pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `write_all` for a gather list: loops over short writes, calling `before` ahead of every write:
/// where a caller sets the socket's timeout from an absolute deadline (so no single call outlasts
/// it), or stops with an error.
pub fn write_all_vectored_with<W: Write>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
    mut before: impl FnMut(&mut W) -> io::Result<()>,
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        before(w)?;
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` for a scatter list: loops over short reads (EOF before the end is an error),
/// calling `before` ahead of every read (see [`write_all_vectored_with`]).
pub fn read_exact_vectored_with<R: Read>(
    r: &mut R,
    mut bufs: &mut [IoSliceMut<'_>],
    mut before: impl FnMut(&mut R) -> io::Result<()>,
) -> io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        before(r)?;
        match r.read_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`write_all_vectored_with`] by an absolute deadline: the socket's timeout is set again from the
/// time left before every system call, so a peer taking one byte at a time cannot stretch it.
pub fn write_all_vectored_by<S: DeadlineStream>(
    w: &mut S,
    bufs: &mut [IoSlice<'_>],
    deadline: Deadline,
) -> io::Result<()> {
    write_all_vectored_with(w, bufs, |w| w.set_timeouts(time_left(deadline)?))
}

/// [`read_exact_vectored_with`] by an absolute deadline, as [`write_all_vectored_by`].
pub fn read_exact_vectored_by<S: DeadlineStream>(
    r: &mut S,
    bufs: &mut [IoSliceMut<'_>],
    deadline: Deadline,
) -> io::Result<()> {
    read_exact_vectored_with(r, bufs, |r| r.set_timeouts(time_left(deadline)?))
}

/// Gather slices over raw memory ranges.
///
/// # Safety
/// Every `(addr, len)` must be readable memory that stays valid while the slices are used.
pub unsafe fn slices<'a>(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<IoSlice<'a>> {
    ranges
        .map(|(addr, len)| IoSlice::new(unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) }))
        .collect()
}

/// Scatter slices over raw memory ranges.
///
/// # Safety
/// Every `(addr, len)` must be writable memory that stays valid while the slices are used, and no
/// two ranges may overlap.
pub unsafe fn slices_mut<'a>(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<IoSliceMut<'a>> {
    ranges
        .map(|(addr, len)| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }))
        .collect()
}
