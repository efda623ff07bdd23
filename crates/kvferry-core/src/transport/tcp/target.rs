//! The memory owner's side of the TCP transport: accepts connections and serves READ, WRITE and
//! NOTIFY requests against the registered regions. Every descriptor is checked against the key
//! table (key, range) before a byte moves; nothing from the wire is trusted.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::wire::{self, FrameKind, Header, WireDesc, invalid};
use crate::auth::{Auth, AuthError, Channel};
use crate::deadline::Deadline;
use crate::memory::MemKind;
use crate::net::Connections;
use crate::transport::keys::KeyTable;
use crate::transport::staging::{Bounce, Segment, StageError, Stager};
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// How long a new connection has to prove the cluster secret.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared by the accept loop and the connection threads.
pub(super) struct TargetShared {
    auth: Auth,
    pub keys: KeyTable,
    pub notifications: Arc<NotificationQueue>,
    /// Longest a request may stall mid-way before its connection is closed (which releases the
    /// regions it holds, so deregistration never waits on a stopped initiator for longer).
    request_timeout: Duration,
    stager: Option<Arc<Stager>>,
    pub connections: Connections,
}

impl TargetShared {
    pub fn new(
        auth: Auth,
        notifications: Arc<NotificationQueue>,
        request_timeout: Duration,
        stager: Option<Arc<Stager>>,
    ) -> Self {
        TargetShared {
            auth,
            keys: KeyTable::default(),
            notifications,
            request_timeout,
            stager,
            connections: Connections::default(),
        }
    }
}

/// Serve one accepted connection until the initiator closes it.
pub(super) fn serve(stream: TcpStream, shared: &TargetShared) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    shared.connections.serve(stream, |stream| {
        if let Err(e) = serve_connection(stream, shared) {
            tracing::debug!(%peer, error = %e, "tcp transport: connection closed");
        }
    });
}

/// Reads the initiator's hello; returns its agent name.
fn accept_hello(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = [0u8; 8];
    stream.read_exact(&mut head)?;
    if head[..4] != wire::MAGIC {
        return Err(invalid("not a kvferry tcp connection"));
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != wire::VERSION {
        stream.write_all(&wire::encode_hello_ack(wire::HELLO_BAD_VERSION))?;
        return Err(invalid(format!("peer speaks wire version {version}, this agent {}", wire::VERSION)));
    }
    let name_len = u16::from_le_bytes([head[6], head[7]]) as usize;
    if name_len > wire::MAX_NAME {
        return Err(invalid("agent name too long"));
    }
    let mut name = vec![0u8; name_len];
    stream.read_exact(&mut name)?;
    let name = String::from_utf8(name).map_err(|_| invalid("agent name is not UTF-8"))?;
    stream.write_all(&wire::encode_hello_ack(wire::HELLO_OK))?;
    Ok(name)
}

fn serve_connection(mut stream: TcpStream, shared: &TargetShared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    super::set_keepalive(&stream)?;
    // Nothing but the handshake is read from a connection that has not proven the secret.
    let hello_deadline = Deadline::after(shared.request_timeout.min(HELLO_TIMEOUT));
    shared.auth.server(&mut stream, Channel::Tcp, hello_deadline).map_err(|e| match e {
        AuthError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
    })?;
    stream.set_read_timeout(Some(shared.request_timeout))?;
    stream.set_write_timeout(Some(shared.request_timeout))?;
    let from = accept_hello(&mut stream)?;
    let mut desc_buf: Vec<u8> = Vec::new();
    let mut descs: Vec<WireDesc> = Vec::new();
    // Bounce buffers for staged requests, allocated on the first one.
    let mut bounce: Option<Bounce> = None;
    loop {
        let Some(header) = next_header(&mut stream)? else { return Ok(()) };
        let kind =
            FrameKind::from_wire(header.tag).ok_or_else(|| invalid(format!("unknown request kind {}", header.tag)))?;
        let count = header.count as usize;
        if count > wire::MAX_DESCS {
            // The stream cannot be resynchronised cheaply; answer and close.
            respond(&mut stream, Err((0, RejectReason::TooLarge)), &[])?;
            return Err(invalid(format!("{count} descriptors in one request")));
        }
        desc_buf.resize(count * wire::DESC_LEN, 0);
        stream.read_exact(&mut desc_buf)?;
        descs.clear();
        descs.extend(desc_buf.chunks_exact(wire::DESC_LEN).map(WireDesc::decode));
        match kind {
            FrameKind::Read => serve_read(&mut stream, shared, &descs, &mut bounce)?,
            FrameKind::Write => serve_write(&mut stream, shared, &descs, header.payload_len, &mut bounce)?,
            FrameKind::Notify => {
                if count != 0 || header.payload_len > wire::MAX_NOTIFICATION {
                    respond(&mut stream, Err((0, RejectReason::TooLarge)), &[])?;
                    return Err(invalid("oversized notification"));
                }
                let mut data = vec![0u8; header.payload_len as usize];
                stream.read_exact(&mut data)?;
                // Acknowledge first: a receiver that acts on the notification by shutting down
                // would otherwise close the connection before the sender learns it succeeded.
                respond(&mut stream, Ok(0), &[])?;
                shared.notifications.push(Notification { from: from.clone(), data });
            }
        }
    }
}

/// Wait for the next request: idle time between requests is unlimited (the socket timeout only
/// bounds a request once its first byte has arrived). `None` when the initiator closed.
fn next_header(stream: &mut TcpStream) -> io::Result<Option<Header>> {
    let mut b = [0u8; wire::HEADER_LEN];
    loop {
        match stream.read(&mut b[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    stream.read_exact(&mut b[1..])?;
    Ok(Some(Header::decode(&b)))
}

fn respond(
    stream: &mut TcpStream,
    status: Result<u64, (u32, RejectReason)>,
    payload: &[IoSlice<'_>],
) -> io::Result<()> {
    let header = match status {
        Ok(payload_len) => Header { tag: 0, count: 0, payload_len },
        Err((index, reason)) => Header { tag: reason.to_wire(), count: index, payload_len: 0 },
    };
    let encoded = header.encode();
    let mut bufs = Vec::with_capacity(1 + payload.len());
    bufs.push(IoSlice::new(&encoded));
    bufs.extend_from_slice(payload);
    wire::write_all_vectored(stream, &mut bufs)
}

/// The staging path for a request, when it names memory the transport stages: the stager and the
/// payload's segments.
fn staged<'a>(shared: &'a TargetShared, descs: &[WireDesc], kinds: &[MemKind]) -> Option<(&'a Stager, Vec<Segment>)> {
    let stager = shared.stager.as_deref()?;
    if !kinds.iter().any(|&k| stager.stages(k)) {
        return None;
    }
    let segments = descs.iter().zip(kinds).map(|(d, &kind)| Segment { addr: d.addr, len: d.len, kind }).collect();
    Some((stager, segments))
}

/// A device failure mid-payload cannot be answered in step with the stream: close the connection
/// (the initiator sees it fail) and say why here.
fn staging_failed(e: StageError) -> io::Error {
    match e {
        StageError::Io(e) => e,
        StageError::Device(e) => {
            tracing::warn!(error = %e, "tcp transport: staging through host memory failed; closing the connection");
            io::Error::other(e.to_string())
        }
    }
}

fn serve_read(
    stream: &mut TcpStream,
    shared: &TargetShared,
    descs: &[WireDesc],
    bounce: &mut Option<Bounce>,
) -> io::Result<()> {
    match shared.keys.resolve(descs) {
        Err(rejection) => respond(stream, Err(rejection), &[]),
        Ok((_held, kinds)) => {
            let total = descs.iter().map(|d| d.len).sum();
            if let Some((stager, segments)) = staged(shared, descs, &kinds) {
                respond(stream, Ok(total), &[])?;
                let deadline = Deadline::after(shared.request_timeout);
                return stager
                    .send(bounce, &segments, deadline, |chunk| stream.write_all(chunk))
                    .map_err(staging_failed);
            }
            // Zero-copy: the kernel reads straight from the registered memory, which `_held` keeps
            // registered until the send is done.
            let payload = unsafe { wire::slices(descs.iter().map(|d| (d.addr, d.len))) };
            respond(stream, Ok(total), &payload)
        }
    }
}

fn serve_write(
    stream: &mut TcpStream,
    shared: &TargetShared,
    descs: &[WireDesc],
    payload_len: u64,
    bounce: &mut Option<Bounce>,
) -> io::Result<()> {
    let described: u64 = descs.iter().fold(0u64, |acc, d| acc.saturating_add(d.len));
    if described != payload_len {
        return Err(invalid(format!("write carries {payload_len} bytes but describes {described}")));
    }
    match shared.keys.resolve(descs) {
        Err(rejection) => {
            drain(stream, payload_len)?;
            respond(stream, Err(rejection), &[])
        }
        Ok((_held, kinds)) => {
            if let Some((stager, segments)) = staged(shared, descs, &kinds) {
                let deadline = Deadline::after(shared.request_timeout);
                stager
                    .receive(bounce, &segments, deadline, |chunk| stream.read_exact(chunk))
                    .map_err(staging_failed)?;
                return respond(stream, Ok(0), &[]);
            }
            // Zero-copy: the kernel writes straight into the registered memory.
            let mut dst = unsafe { wire::slices_mut(descs.iter().map(|d| (d.addr, d.len))) };
            wire::read_exact_vectored(stream, &mut dst)?;
            respond(stream, Ok(0), &[])
        }
    }
}

/// Discard a rejected request's payload so the stream stays in step. Only the error path copies.
fn drain(stream: &mut TcpStream, mut len: u64) -> io::Result<()> {
    let mut sink = [0u8; 64 * 1024];
    while len > 0 {
        let n = len.min(sink.len() as u64) as usize;
        stream.read_exact(&mut sink[..n])?;
        len -= n as u64;
    }
    Ok(())
}
