//! The [`Agent`]: one engine rank's registry of memory, its transports, its peers, and the
//! transfers between them.
//!
//! ```text
//! register (RAII) → metadata() → peer.add_peer(bytes) → prepare_local / prepare_remote
//!   → read / write / post (batch, deadline, notification) → Transfer::poll / wait / cancel
//! ```
//!
//! By job: `config.rs` (settings and the one options parser), `pending.rs` (transfers that may
//! not have settled), `registry.rs` (registrations and metadata), `peers.rs` (peers and their links), `descriptors.rs` (prepared lists), `post.rs`
//! (posting, coalescing, link choice, the transfer handle); this file builds the transports.

mod config;
mod descriptors;
mod peers;
mod pending;
mod post;
mod registry;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

pub use self::config::AgentConfig;
pub use self::descriptors::{LocalDescs, PreparedList, RemoteDescs};
use self::peers::Peer;
pub use self::post::{Transfer, TransferRequest};
pub use self::registry::Registration;
use self::registry::Registry;
use crate::auth::Auth;
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::limits::AgentLimits;
use crate::metrics::Metrics;
use crate::side_channel::{self, MetadataHost, SideChannelServer};
use crate::sync::Locked;
use crate::transport::shm::ShmTransport;
use crate::transport::staging::Stager;
use crate::transport::tcp::TcpTransport;
use crate::transport::{Endpoint, NotificationQueue, Transport};
pub use crate::transport::{Notification, TransferStatus};

pub(crate) struct AgentInner {
    name: String,
    transports: Vec<Arc<dyn Transport>>,
    registry: Mutex<Registry>,
    next_reg_id: AtomicU64,
    generation: AtomicU64,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    notifications: Arc<NotificationQueue>,
    side_channel: Mutex<Option<SideChannelServer>>,
    metrics: Arc<Metrics>,
    pub(crate) auth: Auth,
    limits: AgentLimits,
    started: Instant,
}

/// One engine rank's endpoint: registered memory, transports, peers, transfers. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Agent> {
        if config.name.is_empty() || config.name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("an agent name must be 1 to 65535 bytes".into()));
        }
        let mut auth = Auth::resolve(&config.auth)?;
        if let Some(tls) = &config.tls {
            auth = auth.with_tls(tls)?;
        }
        let limits = config.limits.clone();
        let notifications =
            Arc::new(NotificationQueue::with_limits(limits.max_notifications, limits.max_notification_bytes));
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        let stager = config.staging.map(Stager::new).transpose()?.map(Arc::new);
        // In order of preference: add_peer links a peer through the first of these that reaches it.
        #[cfg(feature = "cuda")]
        if let Some(ipc) = config.cuda_ipc {
            let ipc = crate::transport::cuda_ipc::CudaIpcTransport::start(
                &config.name,
                ipc,
                auth.clone(),
                notifications.clone(),
            )?;
            transports.push(Arc::new(ipc));
        }
        if let Some(shm) = config.shm {
            // Shared memory only speeds up same-host peers: a system without it still has an agent.
            match ShmTransport::start(&config.name, shm, auth.clone(), notifications.clone()) {
                Ok(t) => transports.push(Arc::new(t)),
                Err(e) => tracing::warn!(error = %e, "the shm transport is unavailable; peers use the others"),
            }
        }
        #[cfg(feature = "fabric")]
        if let Some(fabric) = config.fabric {
            let fabric = crate::transport::fabric::FabricTransport::start(
                &config.name,
                fabric,
                auth.clone(),
                notifications.clone(),
            )?;
            transports.push(Arc::new(fabric));
        }
        if let Some(tcp) = config.tcp {
            transports.push(Arc::new(TcpTransport::start_staged(
                &config.name,
                tcp,
                auth.clone(),
                notifications.clone(),
                stager.clone(),
            )?));
        }
        if transports.is_empty() {
            return Err(Error::InvalidArgument("an agent needs at least one transport".into()));
        }
        Ok(Agent {
            inner: Arc::new(AgentInner {
                name: config.name,
                transports,
                registry: Mutex::new(BTreeMap::new()),
                next_reg_id: AtomicU64::new(1),
                generation: AtomicU64::new(1),
                peers: RwLock::new(HashMap::new()),
                notifications,
                side_channel: Mutex::new(None),
                metrics: Arc::new(Metrics::default()),
                auth,
                limits,
                started: Instant::now(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How this agent authenticates its peers.
    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner.transports.iter().map(|t| t.endpoint()).collect()
    }

    /// The counters of this agent's transfers; render them, or attach tier stores to them.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// Notifications received so far (emptied by the call).
    pub fn take_notifications(&self) -> Vec<Notification> {
        self.inner.notifications.take()
    }

    /// Wait until at least one notification has arrived or the deadline passes, then take them all.
    pub fn wait_notifications(&self, deadline: Deadline) -> Vec<Notification> {
        self.inner.notifications.wait(deadline)
    }

    /// Serve this agent's metadata on `listen` so peers can find it from `host:port` alone.
    /// Returns the bound address. Peers that send their own metadata are added as peers.
    pub fn serve_side_channel(&self, listen: SocketAddr) -> Result<SocketAddr> {
        let host: Weak<dyn MetadataHost> = Arc::downgrade(&self.inner) as Weak<AgentInner>;
        let server =
            side_channel::serve(host, self.inner.auth.clone(), listen, self.inner.limits.side_channel.clone())?;
        let addr = server.local_addr();
        *self.inner.side_channel.locked() = Some(server);
        Ok(addr)
    }

    /// Exchange metadata with the agent serving a side channel at `addr` and add it as a peer.
    pub fn connect_peer(&self, addr: &str, deadline: Deadline) -> Result<String> {
        let theirs = side_channel::exchange(&self.inner.auth, addr, Some(&self.metadata()), deadline)?;
        self.add_peer(&theirs)
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// A reference that does not keep the agent alive, for its background threads.
    #[cfg(feature = "etcd")]
    pub(crate) fn downgrade(&self) -> Weak<AgentInner> {
        Arc::downgrade(&self.inner)
    }

    #[cfg(feature = "etcd")]
    pub(crate) fn upgrade(inner: &Weak<AgentInner>) -> Option<Agent> {
        inner.upgrade().map(|inner| Agent { inner })
    }

    /// Increases on every registration change, and with it [`metadata`](Self::metadata).
    #[cfg(feature = "etcd")]
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl AgentInner {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
