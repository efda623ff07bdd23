//! The embedded side channel: a small TCP exchange of agent metadata, so two processes find each
//! other from `host:port` alone.
//!
//! Every connection starts with the cluster-secret handshake of [`crate::auth`] (the server proves
//! itself first), so metadata, which carries registration keys, only ever goes to a peer that holds
//! the secret, and only such a peer can add itself as one. Then:
//!
//! ```text
//! request  magic "KVFS" | version u16 | op u8 (1 get, 2 exchange) | 0u8 | len u32 | metadata
//! reply    magic "KVFS" | version u16 | status u8 | 0u8 | len u32 | metadata, or an error text
//! ```
//! On an exchange the server also adds the caller as a peer, so either side can start transfers.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::auth::{Auth, AuthError, Channel};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::limits::{Budget, Reservation, ServeLimits};
use crate::net::{self, DeadlineStream, Next, Server, Service, received};
use crate::tls::{PeerListener, PeerStream};
use crate::transport::{Op, TransferError};

const MAGIC: [u8; 4] = *b"KVFS";
const VERSION: u16 = 1;
const OP_GET: u8 = 1;
const OP_EXCHANGE: u8 = 2;
const STATUS_OK: u8 = 0;
const STATUS_BAD_REQUEST: u8 = 1;
const STATUS_REJECTED: u8 = 2;
/// The server refused for one of its limits (its table of peers is full); it may succeed later.
const STATUS_BUSY: u8 = 3;
/// Metadata is a few hundred bytes per registration; this allows tens of thousands.
const MAX_METADATA: usize = 16 << 20;
/// A request is answered within this from its first byte, however slowly the client sends.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A body is read in pieces of this size, so memory grows with the bytes that actually arrived
/// rather than with the length a client announced.
const READ_CHUNK: usize = 64 << 10;

/// What the side channel serves: an agent's metadata, and the peers that exchange theirs with it.
pub(crate) trait MetadataHost: Send + Sync + 'static {
    /// The metadata peers read, encoded.
    fn encoded_metadata(&self) -> Vec<u8>;
    /// Add the peer whose encoded metadata an exchange carried.
    fn add_exchanged_peer(&self, metadata: &[u8]) -> Result<String>;
}

pub(crate) struct SideChannelServer {
    addr: SocketAddr,
    _server: Server<SideChannel>,
}

impl SideChannelServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serve `agent`'s metadata to peers that prove `auth`'s secret; stops when the server is dropped
/// (held by the agent, hence weak).
pub(crate) fn serve(
    agent: Weak<dyn MetadataHost>,
    auth: Auth,
    listen: SocketAddr,
    limits: ServeLimits,
) -> Result<SideChannelServer> {
    let listener = TcpListener::bind(listen).map_err(|e| Error::io(format!("binding {listen}"), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
    let service = Arc::new(SideChannel { agent, auth, budget: Budget::new(limits.request_bytes) });
    let server = Server::start(PeerListener(listener), "kvferry-side-channel", service, limits)?;
    Ok(SideChannelServer { addr, _server: server })
}

struct SideChannel {
    agent: Weak<dyn MetadataHost>,
    auth: Auth,
    /// Bytes of requests still being read, over all connections.
    budget: Arc<Budget>,
}

/// The request being read on a connection: its head, then its body as it arrives.
struct Request {
    head: [u8; 12],
    got: usize,
    body: Vec<u8>,
    held: Reservation,
}

impl Service for SideChannel {
    type Stream = PeerStream;
    type Conn = Request;
    type Worker = ();

    fn request_timeout(&self) -> Duration {
        SERVE_TIMEOUT
    }

    fn handshake(&self, stream: &mut PeerStream, deadline: Deadline) -> io::Result<Request> {
        self.auth.accept_stream(stream, Channel::Exchange, deadline).map_err(|e| match e {
            AuthError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
        })?;
        Ok(Request { head: [0; 12], got: 0, body: Vec::new(), held: self.budget.reservation() })
    }

    fn readable(&self, stream: &mut PeerStream, req: &mut Request, _: &mut (), deadline: Deadline) -> io::Result<Next> {
        while req.got < req.head.len() {
            let started = req.got > 0;
            if let Some(next) = received(stream.recv_ready(&mut req.head[req.got..], deadline), &mut req.got, started)?
            {
                return Ok(next);
            }
        }
        let len = match check_head(&req.head) {
            Ok(len) => len,
            Err(e) => {
                let _ = stream.write_all_by(&frame(STATUS_BAD_REQUEST, e.to_string().as_bytes()), deadline);
                return Err(e);
            }
        };
        while req.body.len() < len {
            let start = req.body.len();
            let end = len.min(start + READ_CHUNK);
            if !req.held.grow((end - start) as u64) {
                let _ = stream.write_all_by(&frame(STATUS_BUSY, b"too many requests being read"), deadline);
                return Ok(Next::Close);
            }
            req.body.resize(end, 0);
            let mut got = start;
            let next = received(stream.recv_ready(&mut req.body[start..], deadline), &mut got, true);
            req.body.truncate(got);
            if let Some(next) = next? {
                return Ok(next);
            }
        }
        let Some(agent) = self.agent.upgrade() else { return Ok(Next::Close) };
        let reply = match req.head[6] {
            OP_GET => frame(STATUS_OK, &agent.encoded_metadata()),
            OP_EXCHANGE => match agent.add_exchanged_peer(&req.body) {
                Ok(_) => frame(STATUS_OK, &agent.encoded_metadata()),
                Err(e) if e.code() == crate::ErrorCode::PeerBusy => frame(STATUS_BUSY, e.to_string().as_bytes()),
                Err(e) => frame(STATUS_REJECTED, e.to_string().as_bytes()),
            },
            other => frame(STATUS_BAD_REQUEST, format!("unknown side channel op {other}").as_bytes()),
        };
        drop(agent);
        stream.write_all_by(&reply, deadline)?;
        // One request per connection.
        Ok(Next::Close)
    }
}

pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[tag, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body length a frame's head announces, once checked.
fn check_head(head: &[u8; 12]) -> io::Result<usize> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if head[..4] != MAGIC {
        return Err(invalid("not a kvferry side channel".into()));
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != VERSION {
        return Err(invalid(format!("side channel version {version}, expected {VERSION}")));
    }
    let len = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
    if len > MAX_METADATA {
        return Err(invalid(format!("{len} bytes of metadata exceed the limit")));
    }
    Ok(len)
}

/// Read one frame by `deadline`; returns (tag, body).
pub(crate) fn read_frame<S: DeadlineStream>(stream: &mut S, deadline: Deadline) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 12];
    stream.read_exact_by(&mut head, deadline)?;
    let len = check_head(&head)?;
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(len.min(start + READ_CHUNK), 0);
        stream.read_exact_by(&mut body[start..], deadline)?;
    }
    Ok((head[6], body))
}

/// Fetch the metadata of the agent serving at `addr`, proving the cluster secret with `auth`;
/// with `own`, also hand it ours.
pub fn exchange(auth: &Auth, addr: &str, own: Option<&[u8]>, deadline: Deadline) -> Result<Vec<u8>> {
    let unreachable =
        |cause: String| Error::from(TransferError::PeerUnreachable { peer: addr.into(), endpoint: addr.into(), cause });
    let protocol = |detail: String| Error::from(TransferError::Protocol { peer: addr.into(), detail });
    let stream = net::connect_within(addr, deadline).map_err(unreachable)?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => unreachable("timed out".into()),
        io::ErrorKind::InvalidData => protocol(e.to_string()),
        _ => unreachable(e.to_string()),
    };
    let mut stream = auth.connect_stream(stream, addr, Channel::Exchange, deadline).map_err(|e| e.into_error(addr))?;
    let request = match own {
        Some(md) => frame(OP_EXCHANGE, md),
        None => frame(OP_GET, &[]),
    };
    stream.write_all_by(&request, deadline).map_err(io_err)?;
    let (status, body) = read_frame(&mut stream, deadline).map_err(io_err)?;
    match status {
        STATUS_OK => Ok(body),
        STATUS_BUSY => Err(Error::from(TransferError::PeerBusy {
            peer: addr.into(),
            op: Op::Notify,
            cause: String::from_utf8_lossy(&body).into_owned(),
        })),
        _ => Err(protocol(format!("the peer refused the exchange: {}", String::from_utf8_lossy(&body)))),
    }
}
