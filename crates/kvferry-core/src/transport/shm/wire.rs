//! The shm transport's control messages, on a Unix stream socket, after the cluster-secret
//! handshake ([`crate::auth`], channel `Shm`). They reuse the TCP transport's 16-byte header; the
//! data itself never crosses the socket.
//!
//! ```text
//! hello        header{HELLO, count: version, payload_len: name_len} | probe address u64 | name
//! hello ack    header{status, count: pid, payload_len: probe address} | flags u64,
//!              this connection's own lease file attached
//! map          header{MAP, 0, 0} | key [16]
//! map ack      header{status, count: lease slot, 16} | addr u64 | len u64,
//!              the memfd attached (SCM_RIGHTS) when the region has one
//! share        header{SHARE, 0, 16} | source u64 | len u64, the initiator's memfd attached
//! share ack    header{status, 0, 0}
//! unshare      header{UNSHARE, 0, 8} | source u64
//! unshare ack  header{status, 0, 0}
//! write        header{WRITE, count: ops, payload_len: ops × 48}
//!              | (key [16] | addr u64 | source u64 | len u64 | from u64)*
//! write ack    header{status, count: op index, payload_len: errno when STATUS_PULL_FAILED}
//! notify       header{NOTIFY, 0, len} | notification
//! notify ack   header{status, 0, 0}
//! ```
//! Status 0 is success; otherwise a [`RejectReason`](crate::transport::RejectReason),
//! [`STATUS_BAD_VERSION`], [`STATUS_PULL_FAILED`], [`STATUS_BAD_SOURCE`], or the TCP transport's
//! busy status (`0x80`, `count` naming the limit: 1 request bytes, then the connection is closed;
//! 2 the notification queue, and the connection keeps serving), which the initiator reports as
//! `PeerBusy`. A WRITE op names where its bytes come from: with `from` 0, `source` is an address
//! of the initiator's, which the owner reads with `process_vm_readv`; otherwise `from` names a
//! source the initiator shared on this connection (`SHARE`: the first `len` bytes of a sealed
//! memfd, which the owner maps read-only until `UNSHARE` or the connection's end) and `source` is
//! an offset into it. Either way the owner checks key and range and copies into its memory itself.
//! A refused `SHARE` (limits: `TooLarge`; a file it will not map: [`STATUS_BAD_SOURCE`]) leaves the
//! connection serving; the initiator pulls that source cross-memory.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::transport::frame::{HEADER_LEN, Header};

/// 3: WRITE ops name their source (`from`), and `SHARE`/`UNSHARE` pass the initiator's memfds.
pub const VERSION: u32 = 3;

pub const HELLO: u8 = 1;
pub const MAP: u8 = 2;
pub const NOTIFY: u8 = 3;
pub const WRITE: u8 = 4;
pub const SHARE: u8 = 5;
pub const UNSHARE: u8 = 6;

/// The peer speaks another version of this protocol.
pub const STATUS_BAD_VERSION: u8 = 100;
/// The owner could not copy the initiator's source bytes (`payload_len` carries the errno).
pub const STATUS_PULL_FAILED: u8 = 101;
/// The owner will not map the file a `SHARE` passed (none attached, not sealed against shrinking,
/// shorter than announced, hugetlb, or a source id in use).
pub const STATUS_BAD_SOURCE: u8 = 102;

/// Hello-ack flag: the owner read the initiator's probe word, so it can pull WRITEs.
pub const FLAG_CAN_PULL: u64 = 1;

/// Ops in one WRITE request: the most one `process_vm_readv` takes (`IOV_MAX`), which bounds what
/// the owner reads before it has checked anything.
pub const MAX_WRITE_OPS: usize = 1024;
pub const WRITE_OP_LEN: usize = 48;
pub const SHARE_LEN: usize = 16;
pub const UNSHARE_LEN: usize = 8;

/// A WRITE op's `from` when its source is an address of the initiator's, not a shared file.
pub const FROM_ADDRESS: u64 = 0;

pub const MAP_ACK_LEN: usize = HEADER_LEN + 16;

/// The word at the probe address: an initiator that reads it with `process_vm_readv` knows that
/// cross-memory attach works and that the pid names the right process.
pub const PROBE_MAGIC: u64 = 0x6b76_6665_7272_7973;

/// Send `data` with `fd` attached (`SCM_RIGHTS`).
pub fn send_with_fd(stream: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // Room for one descriptor's control message, aligned as cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as _;
    // SAFETY: the control buffer is large enough for one header and one int, and `msg` points at it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    // SAFETY: `msg` and everything it points to are valid for the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptor went with the first byte; the rest of a short send follows plainly.
    (&mut &*stream).write_all(&data[sent as usize..])
}

/// Fill `buf` from the stream, returning the descriptor attached to its first bytes, if any.
pub fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    let (got, fd) = loop {
        match recv_fd_once(stream, buf, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    if got == 0 && !buf.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    (&mut &*stream).read_exact(&mut buf[got..])?;
    Ok(fd)
}

/// What has arrived, without blocking (as [`crate::net::recv_ready`]), and the descriptor
/// attached to it, if any: an owner reads every request header this way, so a `SHARE`'s file is
/// not lost.
pub fn recv_ready_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    loop {
        match recv_fd_once(stream, buf, libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// One `recvmsg` into `buf`: the bytes read, and the first descriptor that came with them. Every
/// other descriptor that arrived is closed, so none leaks.
fn recv_fd_once(stream: &UnixStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 8];
    // SAFETY: as in `send_with_fd`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes `buf` and `control`, both valid for writes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with well-formed control messages of `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fds.into_iter().next()))
}

pub fn encode_hello(name: &str, probe: u64) -> Vec<u8> {
    let mut out = Header { tag: HELLO, count: VERSION, payload_len: name.len() as u64 }.encode().to_vec();
    out.extend_from_slice(&probe.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// One op of a WRITE request: `len` bytes from the initiator's `source` to the owner's `addr`,
/// inside the registration `key`. `source` is an address of the initiator's when `from` is
/// [`FROM_ADDRESS`], an offset into the shared source `from` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOp {
    pub key: u128,
    pub addr: u64,
    pub source: u64,
    pub len: u64,
    pub from: u64,
}

impl WriteOp {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.source.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.from.to_le_bytes());
    }

    pub fn decode(bytes: &[u8; WRITE_OP_LEN]) -> WriteOp {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        WriteOp {
            key: u128::from_le_bytes(bytes[..16].try_into().expect("16 bytes")),
            addr: word(16),
            source: word(24),
            len: word(32),
            from: word(40),
        }
    }
}

/// A `SHARE` request: the memfd goes with its first byte.
pub fn encode_share(source: u64, len: u64) -> Vec<u8> {
    let mut out = Header { tag: SHARE, count: 0, payload_len: SHARE_LEN as u64 }.encode().to_vec();
    out.extend_from_slice(&source.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

pub fn encode_unshare(source: u64) -> Vec<u8> {
    let mut out = Header { tag: UNSHARE, count: 0, payload_len: UNSHARE_LEN as u64 }.encode().to_vec();
    out.extend_from_slice(&source.to_le_bytes());
    out
}

/// How a peer's region is reached; the last byte of its shm key (after the 16-byte registration key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The region is a shareable file: the initiator maps it once and copies with `memcpy`.
    Mapped,
    /// Plain process memory: `process_vm_readv`/`process_vm_writev`.
    CrossMemory,
}

impl Reach {
    pub fn name(self) -> &'static str {
        match self {
            Reach::Mapped => "mapped",
            Reach::CrossMemory => "cross-memory",
        }
    }
}

pub fn encode_key(key: u128, reach: Reach) -> Vec<u8> {
    let mut out = key.to_le_bytes().to_vec();
    out.push(match reach {
        Reach::Mapped => 1,
        Reach::CrossMemory => 2,
    });
    out
}

pub fn decode_key(bytes: &[u8]) -> Option<(u128, Reach)> {
    let (key, reach) = bytes.split_first_chunk::<16>()?;
    let reach = match reach {
        [1] => Reach::Mapped,
        [2] => Reach::CrossMemory,
        _ => return None,
    };
    Some((u128::from_le_bytes(*key), reach))
}
