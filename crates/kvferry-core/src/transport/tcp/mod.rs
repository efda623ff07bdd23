//! The TCP transport: the fallback that works between any two hosts.
//!
//! Data moves with `writev`/`readv` straight between registered memory and the socket: no
//! intermediate buffer in user space (the kernel's own socket copies remain). With TLS
//! ([`crate::tls`]) that becomes one copy: rustls encrypts from, and decrypts into its buffer and
//! then into, registered memory. Several streams per peer, each with its own connection, carry the
//! frames of a batch in parallel on the transport's progress threads, which every peer shares
//! (`transport::progress`). The target serves every connection with a fixed set of threads
//! (`net::Server`).

mod link;
mod target;
pub(crate) mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use self::link::{Stream, TcpLink};
use self::target::TargetShared;
use crate::auth::Auth;
use crate::error::{Error, Result};
use crate::limits::ServeLimits;
use crate::memory::{MemKind, MemRegion};
use crate::net::Server;
use crate::tls::PeerListener;
use crate::transport::keys;
use crate::transport::progress::Progress;
use crate::transport::staging::Stager;
use crate::transport::{
    Endpoint, MemoryOwner, NotificationQueue, PeerLink, RemoteRegion, Transport, TransportKind, remote_keys,
};

pub use crate::transport::frame::MAX_NOTIFICATION;

#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Where to listen for peers. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The host peers should dial, when `listen` is a wildcard address (`0.0.0.0`).
    pub advertise_host: Option<String>,
    /// Parallel TCP connections per peer.
    pub streams: usize,
    /// Threads moving the frames of every peer's streams (at least `streams`, so that one peer's
    /// batch uses all of its streams at once).
    pub threads: usize,
    pub connect_timeout: Duration,
    /// Batches are cut into frames of at least this many bytes; smaller batches use one stream.
    pub min_frame_bytes: u64,
    /// The longest a request this agent serves may take, from its first byte to its answer's
    /// last, however the peer paces it; past it the connection is dropped.
    pub request_timeout: Duration,
    /// Serving threads, connections and memory the peers of this transport can make it spend.
    pub limits: ServeLimits,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            streams: 2,
            threads: 4,
            connect_timeout: Duration::from_secs(5),
            min_frame_bytes: 512 * 1024,
            request_timeout: Duration::from_secs(30),
            limits: ServeLimits::default(),
        }
    }
}

pub struct TcpTransport {
    local_name: String,
    config: TcpConfig,
    endpoint: Endpoint,
    listen_addr: SocketAddr,
    shared: Arc<TargetShared>,
    server: Option<Server<TargetShared>>,
    /// Stages device memory (and, if configured, host memory) through bounce buffers.
    stager: Option<Arc<Stager>>,
    /// Proves the cluster secret on the connections this agent opens.
    auth: Auth,
    progress: Progress<Stream>,
}

impl TcpTransport {
    pub fn start(
        local_name: &str,
        config: TcpConfig,
        auth: Auth,
        notifications: Arc<NotificationQueue>,
    ) -> Result<TcpTransport> {
        TcpTransport::start_staged(local_name, config, auth, notifications, None)
    }

    /// Start listening. With a `stager`, the transport also moves the memory kinds it stages.
    pub(crate) fn start_staged(
        local_name: &str,
        config: TcpConfig,
        auth: Auth,
        notifications: Arc<NotificationQueue>,
        stager: Option<Arc<Stager>>,
    ) -> Result<TcpTransport> {
        let shared = Arc::new(TargetShared::new(
            auth.clone(),
            notifications,
            config.request_timeout,
            stager.clone(),
            config.limits.request_bytes,
        ));
        let listener = std::net::TcpListener::bind(config.listen)
            .map_err(|e| Error::io(format!("binding {}", config.listen), e))?;
        let listen_addr = listener.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
        let server = Server::start(PeerListener(listener), "kvferry-tcp", shared.clone(), config.limits.clone())?;
        let host = match &config.advertise_host {
            Some(h) => h.clone(),
            None if listen_addr.ip().is_unspecified() => {
                return Err(Error::InvalidArgument(format!(
                    "listening on {listen_addr} needs an advertised host for peers to dial"
                )));
            }
            None => listen_addr.ip().to_string(),
        };
        let address = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{}", listen_addr.port()),
            Err(_) => format!("{host}:{}", listen_addr.port()),
        };
        let progress = Progress::new(&format!("kvf-tcp-{local_name}"), config.threads.max(config.streams), None);
        Ok(TcpTransport {
            progress,
            local_name: local_name.to_string(),
            config,
            endpoint: Endpoint { kind: TransportKind::Tcp, address },
            listen_addr,
            shared,
            server: Some(server),
            stager,
            auth,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Stops accepting and closes every connection, those mid-request included.
        drop(self.server.take());
    }
}

/// Probe idle connections so a peer host that vanished without closing them (power loss, a cut
/// link) is noticed in about half a minute instead of hours.
fn set_keepalive(stream: &std::net::TcpStream) -> std::io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&probes)
}

fn decode_key(key: &[u8]) -> Option<u128> {
    Some(u128::from_le_bytes(key.try_into().ok()?))
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    fn supports(&self, kind: MemKind) -> bool {
        kind == MemKind::Host || self.stager.as_ref().is_some_and(|s| s.stages(kind))
    }

    fn register(&self, region: MemRegion, owner: MemoryOwner) -> Result<Vec<u8>> {
        if !self.supports(region.kind) {
            return Err(Error::Unsupported {
                what: format!("registering {} memory with the tcp transport", region.kind),
                why: "the tcp transport moves host memory, and device memory only with staging configured".into(),
            });
        }
        let key = keys::new_key()?;
        self.shared.keys.insert(key, region, owner);
        if let Some(stager) = self.stager.as_ref().filter(|s| s.stages(region.kind)) {
            stager.add_region(key, region);
        }
        Ok(key.to_le_bytes().to_vec())
    }

    fn deregister(&self, key: &[u8]) {
        if let Some(key) = decode_key(key) {
            if let Some(stager) = &self.stager {
                stager.remove_region(key);
            }
            self.shared.keys.remove(key);
        }
    }

    fn link(&self, peer: &str, endpoint: &Endpoint, regions: Vec<RemoteRegion>) -> Result<Arc<dyn PeerLink>> {
        let keys = remote_keys(peer, TransportKind::Tcp, &regions, |r| decode_key(&r.key))?;
        let link = TcpLink::new(
            &self.local_name,
            peer,
            &endpoint.address,
            keys,
            &self.config,
            self.auth.clone(),
            self.stager.clone(),
            &self.progress,
        );
        Ok(Arc::new(link))
    }
}

#[cfg(test)]
mod tests;
