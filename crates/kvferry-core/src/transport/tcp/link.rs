//! The initiator's side of the TCP transport: a link per peer with several streams, each a lane of
//! the transport's progress threads that owns one connection, made on its first frame. A batch is
//! cut into frames spread over the streams; the frame that finishes last sends the notification.
//! A link that is never used (a same-host peer reached over shm, say) holds no connection.

use std::any::Any;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::TcpConfig;
use super::wire;
use crate::auth::{Auth, Channel};
use crate::deadline::Deadline;
use crate::error::Result;
use crate::memory::MemKind;
use crate::net::DeadlineStream;
use crate::tls::PeerStream;
use crate::transport::frame::{self, Failure, FrameKind, Header, WireDesc};
use crate::transport::progress::{Lane, LaneWork, Progress};
use crate::transport::staging::{Bounce, Segment, StageError, Stager};
use crate::transport::{AbortHook, Batch, Completion, ConnectError, Op, PeerLink, TransferError, no_key_on_link};

/// One request on one stream.
pub(super) struct Frame {
    kind: FrameKind,
    descs: Vec<WireDesc>,
    /// Local addresses, parallel to `descs`.
    local: Vec<u64>,
    completion: Arc<Completion>,
    _keep_alive: Arc<dyn Any + Send + Sync>,
}

struct LinkInfo {
    local_name: String,
    peer: String,
    address: String,
    connect_timeout: Duration,
    auth: Auth,
    stager: Option<Arc<Stager>>,
}

pub(super) struct TcpLink {
    info: Arc<LinkInfo>,
    keys: Vec<Option<u128>>,
    streams: Vec<Lane<Stream>>,
    next_stream: AtomicUsize,
    min_frame_bytes: u64,
}

impl TcpLink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        local_name: &str,
        peer: &str,
        address: &str,
        keys: Vec<Option<u128>>,
        config: &TcpConfig,
        auth: Auth,
        stager: Option<Arc<Stager>>,
        progress: &Progress<Stream>,
    ) -> TcpLink {
        let info = Arc::new(LinkInfo {
            local_name: local_name.to_string(),
            peer: peer.to_string(),
            address: address.to_string(),
            connect_timeout: config.connect_timeout,
            auth,
            stager,
        });
        let streams = (0..config.streams.max(1)).map(|_| progress.lane(Stream { info: info.clone(), conn: None }));
        TcpLink {
            streams: streams.collect(),
            info,
            keys,
            next_stream: AtomicUsize::new(0),
            min_frame_bytes: config.min_frame_bytes,
        }
    }

    /// Cut a batch into frames of about `total / streams` bytes (at least `min_frame_bytes`, at most
    /// `MAX_DESCS` descriptors), splitting ops where needed so one huge op still uses every stream.
    fn frames(&self, batch: &Batch) -> Result<Vec<(Vec<WireDesc>, Vec<u64>)>> {
        let total: u64 = batch.ops.iter().map(|o| o.len).sum();
        let target = total.div_ceil(self.streams.len() as u64).max(self.min_frame_bytes);
        let mut frames = Vec::new();
        let mut descs = Vec::new();
        let mut local = Vec::new();
        let mut bytes = 0u64;
        for (index, op) in batch.ops.iter().enumerate() {
            let key = self
                .keys
                .get(op.remote_region as usize)
                .copied()
                .flatten()
                .ok_or_else(|| no_key_on_link(&self.info.peer, index, op))?;
            let mut done = 0u64;
            while done < op.len {
                let take = (op.len - done).min(target - bytes);
                descs.push(WireDesc { key, addr: op.remote_addr + done, len: take });
                local.push(op.local_addr + done);
                done += take;
                bytes += take;
                if bytes >= target || descs.len() == frame::MAX_DESCS {
                    frames.push((std::mem::take(&mut descs), std::mem::take(&mut local)));
                    bytes = 0;
                }
            }
        }
        if !descs.is_empty() || frames.is_empty() {
            // A batch without ops (a bare notification) still needs one part to carry it.
            frames.push((descs, local));
        }
        Ok(frames)
    }
}

impl PeerLink for TcpLink {
    fn max_notification(&self) -> u64 {
        frame::MAX_NOTIFICATION
    }

    fn post(&self, batch: Batch) -> Result<()> {
        let op = batch.completion.op();
        let kind = match op {
            Op::Read => FrameKind::Read,
            Op::Write | Op::Notify => FrameKind::Write,
        };
        let frames = self.frames(&batch)?;
        let streams = &self.streams;
        batch.completion.set_guarded_parts(frames.len());
        let first = self.next_stream.fetch_add(1, Ordering::Relaxed);
        for (i, (descs, local)) in frames.into_iter().enumerate() {
            let frame = Frame {
                kind,
                descs,
                local,
                completion: batch.completion.clone(),
                _keep_alive: batch.keep_alive.clone(),
            };
            let stream = &streams[(first + i) % streams.len()];
            if let Err(frame) = stream.submit(frame) {
                frame.completion.refuse_part();
            }
        }
        Ok(())
    }
}

/// A stream's connection, and the hook that cuts it off from another thread.
struct Conn {
    stream: PeerStream,
    cut: AbortHook,
}

impl Conn {
    fn new(stream: PeerStream) -> io::Result<Conn> {
        // A second handle on the same socket: shutting the socket down through it makes a call
        // blocked on the first return at once (TLS or not). Owning it (not a raw fd) rules out
        // closing a reused fd.
        let handle = stream.socket().try_clone()?;
        let cut: AbortHook = Arc::new(move || {
            let _ = handle.shutdown(Shutdown::Both);
        });
        Ok(Conn { stream, cut })
    }
}

/// One stream of a link: its connection, made on the first frame and again after one broke.
pub(super) struct Stream {
    info: Arc<LinkInfo>,
    conn: Option<Conn>,
}

impl LaneWork for Stream {
    type Job = Frame;
    /// Bounce buffers for frames that stage local memory, allocated on the first one.
    type Scratch = Option<Bounce>;

    fn run(&mut self, frame: Frame, bounce: &mut Option<Bounce>) {
        let (info, conn) = (&*self.info, &mut self.conn);
        let completion = &frame.completion;
        let result = match frame.descs.is_empty() {
            true => completion.skip_reason().map_or(Ok(()), Err),
            false => exchange(info, conn, completion, |io| run_frame(io, &frame, info.stager.as_deref(), bounce)),
        };
        completion.settle_part(result, |data| exchange(info, conn, completion, |io| send_notification(io, &data)));
    }
}

impl From<StageError> for Failure {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Io(e) => Failure::Io(e),
            StageError::Device(e) => Failure::Staging(e.to_string()),
        }
    }
}

/// Run one request on this stream's connection (connecting first if needed), within the batch's
/// deadline, as a running part of the batch: stopping the batch shuts the connection down, and a
/// connection that was cut or failed mid-request is dropped; the next request reconnects.
fn exchange(
    info: &LinkInfo,
    conn: &mut Option<Conn>,
    completion: &Completion,
    request: impl FnOnce(&mut Io<'_>) -> Result<(), Failure>,
) -> Result<(), TransferError> {
    if let Some(e) = completion.skip_reason() {
        return Err(e);
    }
    let deadline = completion.deadline();
    if conn.is_none() {
        let until = deadline.min(Deadline::after(info.connect_timeout));
        *conn = Some(connect(info, until).map_err(|e| e.for_part(completion, &info.address))?);
    }
    let c = conn.as_mut().unwrap();
    let part = completion.start_part(Some(c.cut.clone()))?;
    let outcome = request(&mut Io { stream: &mut c.stream, completion });
    let cut = part.end();
    if cut || outcome.as_ref().is_err_and(Failure::breaks_stream) {
        *conn = None;
    }
    outcome.map_err(|failure| match cut {
        // The batch was stopped: its reason, not the broken socket's.
        true => completion.skip_reason().unwrap_or_else(|| failure.into_error(&info.peer, completion)),
        false => failure.into_error(&info.peer, completion),
    })
}

/// Bound the next blocking call on `stream` by `until`: the socket's timeout is what is left of it,
/// so however the peer trickles, the calls of one request together end by `until`.
/// Under TLS one call may take several system calls; each is bounded the same way.
fn bound_by(stream: &PeerStream, until: Deadline) -> io::Result<()> {
    let left = until.remaining();
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    stream.set_timeouts(left)
}

/// A request's use of its connection: every call is bounded by the batch's absolute deadline and
/// refused once the batch is stopping.
struct Io<'a> {
    stream: &'a mut PeerStream,
    completion: &'a Completion,
}

impl Io<'_> {
    fn ready(completion: &Completion, stream: &PeerStream) -> io::Result<()> {
        if completion.stopping() && !completion.expired() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the transfer was stopped"));
        }
        bound_by(stream, completion.deadline())
    }

    fn write_all(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let c = self.completion;
        frame::write_all_vectored_with(self.stream, bufs, |s| Io::ready(c, s))
    }

    fn read_exact(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let c = self.completion;
        frame::read_exact_vectored_with(self.stream, bufs, |s| Io::ready(c, s))
    }

    fn read_response(&mut self) -> Result<Header, Failure> {
        let mut b = [0u8; frame::HEADER_LEN];
        self.read_exact(&mut [IoSliceMut::new(&mut b)])?;
        frame::status_of(Header::decode(&b))
    }
}

/// Connect, prove the cluster secret and say hello, all by `until`.
fn connect(info: &LinkInfo, until: Deadline) -> Result<Conn, ConnectError> {
    if until.expired() {
        return Err(ConnectError::Unreachable("deadline passed before connecting".into()));
    }
    let unreachable = |e: io::Error| ConnectError::Unreachable(e.to_string());
    let addrs: Vec<SocketAddr> = info.address.to_socket_addrs().map_err(unreachable)?.collect();
    let mut last = String::from("address resolves to nothing");
    for addr in addrs {
        let left = until.remaining();
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => {
                let mut stream = info.auth.connect_stream(stream, &info.address, Channel::Tcp, until)?;
                handshake(info, &mut stream, until).map_err(ConnectError::Unreachable)?;
                return Conn::new(stream).map_err(|e| ConnectError::Unreachable(format!("handshake failed: {e}")));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(ConnectError::Unreachable(last))
}

fn handshake(info: &LinkInfo, stream: &mut PeerStream, until: Deadline) -> Result<(), String> {
    let io = |e: io::Error| format!("handshake failed: {e}");
    stream.socket().set_nodelay(true).map_err(io)?;
    super::set_keepalive(stream.socket()).map_err(io)?;
    let hello = wire::encode_hello(&info.local_name);
    frame::write_all_vectored_with(stream, &mut [IoSlice::new(&hello)], |s| bound_by(s, until)).map_err(io)?;
    let mut ack = [0u8; wire::HELLO_ACK_LEN];
    frame::read_exact_vectored_with(stream, &mut [IoSliceMut::new(&mut ack)], |s| bound_by(s, until)).map_err(io)?;
    let version = u16::from_le_bytes([ack[4], ack[5]]);
    if ack[..4] != wire::MAGIC {
        return Err("the endpoint is not a kvferry tcp transport".into());
    }
    if ack[6] != wire::HELLO_OK {
        return Err(format!("peer speaks wire version {version}, this agent {}", wire::VERSION));
    }
    Ok(())
}

fn request_header(kind: FrameKind, descs: &[WireDesc], payload_len: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(frame::HEADER_LEN + descs.len() * frame::DESC_LEN);
    head.extend_from_slice(&Header { tag: kind as u8, count: descs.len() as u32, payload_len }.encode());
    for d in descs {
        d.encode_into(&mut head);
    }
    head
}

/// The staging path for a frame, when any of its local memory is memory the stager handles: the
/// stager and the frame's local memory as segments.
fn staged<'a>(stager: Option<&'a Stager>, frame: &Frame) -> Option<(&'a Stager, Vec<Segment>)> {
    let stager = stager?;
    let kinds: Vec<Option<MemKind>> =
        frame.local.iter().zip(&frame.descs).map(|(&addr, d)| stager.staged_kind(addr, d.len)).collect();
    if kinds.iter().all(Option::is_none) {
        return None;
    }
    let segments = frame.local.iter().zip(&frame.descs).zip(kinds);
    let segments = segments.map(|((&addr, d), kind)| Segment { addr, len: d.len, kind: kind.unwrap_or(MemKind::Host) });
    Some((stager, segments.collect()))
}

fn run_frame(
    io: &mut Io<'_>,
    frame: &Frame,
    stager: Option<&Stager>,
    bounce: &mut Option<Bounce>,
) -> Result<(), Failure> {
    let total: u64 = frame.descs.iter().map(|d| d.len).sum();
    let lens = frame.descs.iter().map(|d| d.len);
    let staged = staged(stager, frame);
    let deadline = frame.completion.deadline();
    match frame.kind {
        FrameKind::Read => {
            io.write_all(&mut [IoSlice::new(&request_header(FrameKind::Read, &frame.descs, 0))])?;
            let header = io.read_response()?;
            if header.payload_len != total {
                return Err(Failure::Protocol(format!("read returned {} bytes, expected {total}", header.payload_len)));
            }
            if let Some((stager, segments)) = staged {
                stager.receive(bounce, &segments, deadline, |chunk| io.read_exact(&mut [IoSliceMut::new(chunk)]))?;
                return Ok(());
            }
            // Zero-copy: the kernel writes the payload straight into the registered local memory.
            // Under TLS, one copy: rustls decrypts into its buffer, then copies into this memory.
            let mut dst = unsafe { frame::slices_mut(frame.local.iter().copied().zip(lens)) };
            io.read_exact(&mut dst)?;
        }
        _ => {
            let head = request_header(FrameKind::Write, &frame.descs, total);
            if let Some((stager, segments)) = staged {
                io.write_all(&mut [IoSlice::new(&head)])?;
                stager.send(bounce, &segments, deadline, |chunk| io.write_all(&mut [IoSlice::new(chunk)]))?;
                io.read_response()?;
                return Ok(());
            }
            let mut bufs = Vec::with_capacity(1 + frame.descs.len());
            bufs.push(IoSlice::new(&head));
            // Zero-copy: the kernel reads straight from the registered local memory. Under TLS,
            // rustls encrypts from it into its record buffer: one copy.
            bufs.extend(unsafe { frame::slices(frame.local.iter().copied().zip(lens)) });
            io.write_all(&mut bufs)?;
            io.read_response()?;
        }
    }
    Ok(())
}

fn send_notification(io: &mut Io<'_>, data: &[u8]) -> Result<(), Failure> {
    let head = Header { tag: FrameKind::Notify as u8, count: 0, payload_len: data.len() as u64 }.encode();
    io.write_all(&mut [IoSlice::new(&head), IoSlice::new(data)])?;
    io.read_response()?;
    Ok(())
}
