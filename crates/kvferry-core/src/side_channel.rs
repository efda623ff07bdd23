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
use std::net::{SocketAddr, TcpStream};
use std::sync::Weak;
use std::time::Duration;

use crate::agent::AgentInner;
use crate::auth::{Auth, AuthError, Channel};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::net::{self, Acceptor, DeadlineStream};
use crate::transport::TransferError;

const MAGIC: [u8; 4] = *b"KVFS";
const VERSION: u16 = 1;
const OP_GET: u8 = 1;
const OP_EXCHANGE: u8 = 2;
const STATUS_OK: u8 = 0;
const STATUS_BAD_REQUEST: u8 = 1;
const STATUS_REJECTED: u8 = 2;
/// Metadata is a few hundred bytes per registration; this allows tens of thousands.
const MAX_METADATA: usize = 16 << 20;
/// A connection is answered, handshake included, within this from its accept, however slowly the
/// client sends.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A body is read in pieces of this size, so memory grows with the bytes that actually arrived
/// rather than with the length a client announced.
const READ_CHUNK: usize = 64 << 10;

pub(crate) struct SideChannelServer {
    acceptor: Acceptor,
}

impl SideChannelServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }
}

/// Serve `agent`'s metadata; stops when the server is dropped (held by the agent, hence weak).
pub(crate) fn serve(agent: Weak<AgentInner>, listen: SocketAddr) -> Result<SideChannelServer> {
    let acceptor = Acceptor::spawn(listen, "kvferry-side-channel", move |mut stream| {
        let Some(agent) = agent.upgrade() else { return };
        if let Err(e) = serve_one(&mut stream, &agent) {
            tracing::debug!(error = %e, "side channel: request failed");
        }
    })?;
    Ok(SideChannelServer { acceptor })
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

/// Read one frame by `deadline`; returns (tag, body).
pub(crate) fn read_frame<S: DeadlineStream>(stream: &mut S, deadline: Deadline) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 12];
    stream.read_exact_by(&mut head, deadline)?;
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
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(len.min(start + READ_CHUNK), 0);
        stream.read_exact_by(&mut body[start..], deadline)?;
    }
    Ok((head[6], body))
}

fn serve_one(stream: &mut TcpStream, agent: &AgentInner) -> io::Result<()> {
    let deadline = Deadline::after(SERVE_TIMEOUT);
    agent.auth.server(stream, Channel::SideChannel, deadline).map_err(|e| match e {
        AuthError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
    })?;
    let (op, body) = match read_frame(stream, deadline) {
        Ok(request) => request,
        Err(e) => {
            let _ = stream.write_all_by(&frame(STATUS_BAD_REQUEST, e.to_string().as_bytes()), deadline);
            return Err(e);
        }
    };
    let reply = match op {
        OP_GET => frame(STATUS_OK, &agent.metadata().encode()),
        OP_EXCHANGE => match agent.add_peer(&body) {
            Ok(_) => frame(STATUS_OK, &agent.metadata().encode()),
            Err(e) => frame(STATUS_REJECTED, e.to_string().as_bytes()),
        },
        other => frame(STATUS_BAD_REQUEST, format!("unknown side channel op {other}").as_bytes()),
    };
    stream.write_all_by(&reply, deadline)
}

/// Fetch the metadata of the agent serving at `addr`, proving the cluster secret with `auth`;
/// with `own`, also hand it ours.
pub fn exchange(auth: &Auth, addr: &str, own: Option<&[u8]>, deadline: Deadline) -> Result<Vec<u8>> {
    let unreachable =
        |cause: String| Error::from(TransferError::PeerUnreachable { peer: addr.into(), endpoint: addr.into(), cause });
    let protocol = |detail: String| Error::from(TransferError::Protocol { peer: addr.into(), detail });
    let mut stream = net::connect_within(addr, deadline).map_err(unreachable)?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => unreachable("timed out".into()),
        io::ErrorKind::InvalidData => protocol(e.to_string()),
        _ => unreachable(e.to_string()),
    };
    auth.client(&mut stream, Channel::SideChannel, deadline).map_err(|e| e.into_error(addr))?;
    let request = match own {
        Some(md) => frame(OP_EXCHANGE, md),
        None => frame(OP_GET, &[]),
    };
    stream.write_all_by(&request, deadline).map_err(io_err)?;
    let (status, body) = read_frame(&mut stream, deadline).map_err(io_err)?;
    match status {
        STATUS_OK => Ok(body),
        _ => Err(protocol(format!("the peer refused the exchange: {}", String::from_utf8_lossy(&body)))),
    }
}
