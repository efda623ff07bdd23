//! [`EtcdDiscovery`]: one agent's membership under an etcd prefix.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::DiscoveryError;
use super::etcd::{EtcdClient, WatchEvent};
use crate::agent::{Agent, AgentInner};
use crate::error::{Error, Result};
use crate::sync::Locked;
use crate::transport::TransferError;

/// How an agent joins a cluster through etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` of etcd's client URLs, tried in order.
    pub endpoints: Vec<String>,
    /// Keys are `{prefix}{agent name}`; a `/` is added if the prefix does not end with one.
    pub prefix: String,
    /// A process that stops renewing its lease (dead, hung, cut off) loses its key this long after
    /// its last renewal; peers then fail its pending transfers. Renewed every third of it.
    pub lease_ttl: Duration,
    /// Connecting to and waiting for etcd, per request.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// A 10 s lease and a 2 s request timeout.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: prefix.into(),
            lease_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
        }
    }

    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }
}

/// How often a watch that has nothing to report checks whether discovery is stopping.
const WATCH_POLL: Duration = Duration::from_millis(200);

/// An agent's membership in a cluster: its metadata published under `{prefix}{name}` with a lease,
/// peers looked up by name, and peers whose keys vanish failed at once. Leaving (drop) revokes the
/// lease, so the key disappears without waiting for it to expire.
pub struct EtcdDiscovery {
    agent: Agent,
    client: EtcdClient,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    prefix: Vec<u8>,
    name: String,
    lease_ttl: Duration,
    lease: AtomicI64,
    /// The agent's metadata generation last published.
    published: AtomicU64,
    /// Peers added through [`EtcdDiscovery::lookup`]: only those are failed when their key goes.
    tracked: Mutex<HashSet<String>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn key(&self) -> Vec<u8> {
        [self.prefix.as_slice(), self.name.as_bytes()].concat()
    }

    fn stopping(&self) -> bool {
        *self.stop.locked()
    }

    /// Sleep up to `timeout`; returns whether discovery is stopping.
    fn sleep(&self, timeout: Duration) -> bool {
        let stop = self.stop.locked();
        *self.wake.wait_timeout_while(stop, timeout, |stop| !*stop).unwrap().0
    }

    /// Publish the agent's metadata under the current lease.
    fn publish(&self, client: &EtcdClient, agent: &Agent) -> std::result::Result<(), DiscoveryError> {
        let generation = agent.generation();
        // Metadata carries registration keys: readers of etcd without the secret must not get them.
        let key = self.key();
        client.put(&key, &agent.auth().seal(&key, &agent.metadata()), self.lease.load(Ordering::Acquire))?;
        self.published.store(generation, Ordering::Release);
        Ok(())
    }

    /// A tracked peer's key was deleted (its lease expired or it left): fail what is pending to it.
    fn gone(&self, agent: &Agent, name: &str) {
        if self.tracked.locked().remove(name) {
            let cause = format!("its etcd key {}{name} was deleted", String::from_utf8_lossy(&self.prefix));
            // It may have been removed by the caller meanwhile; nothing is left to fail then.
            let _ = agent.peer_gone(name, &cause);
        }
    }
}

impl EtcdDiscovery {
    /// Publish `agent` under the prefix and start watching it. Fails with a typed error when etcd
    /// cannot be reached; the agent is untouched then and its side channel works as before.
    pub fn join(agent: &Agent, config: EtcdConfig) -> Result<EtcdDiscovery> {
        if config.prefix.is_empty() {
            return Err(DiscoveryError::Config { why: "the etcd prefix is empty".into() }.into());
        }
        if config.lease_ttl < Duration::from_secs(1) {
            return Err(DiscoveryError::Config { why: "the lease TTL must be at least 1 s".into() }.into());
        }
        let mut prefix = config.prefix.into_bytes();
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        let client = EtcdClient::new(&config.endpoints, config.timeout)?;
        let lease = client.grant(config.lease_ttl)?;
        let shared = Arc::new(Shared {
            prefix,
            name: agent.name().to_string(),
            lease_ttl: config.lease_ttl,
            lease: AtomicI64::new(lease),
            published: AtomicU64::new(0),
            tracked: Mutex::new(HashSet::new()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let joined = shared.publish(&client, agent).and_then(|()| {
            // Watch from just after the listing, so no deletion falls between the two.
            let (_, revision) = client.list(&shared.prefix)?;
            client.watch(&shared.prefix, revision + 1, WATCH_POLL)
        });
        let watch = match joined {
            Ok(watch) => watch,
            Err(e) => {
                let _ = client.revoke(lease);
                return Err(e.into());
            }
        };
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            thread::Builder::new().name(name.into()).spawn(run).map_err(|e| Error::io("spawning a discovery thread", e))
        };
        let lease_thread = {
            let (client, shared, agent) = (client.clone(), shared.clone(), agent.downgrade());
            spawn("kvferry-etcd-lease", Box::new(move || keep_alive(&client, &shared, &agent)))?
        };
        let watch_thread = {
            let (client, shared, agent) = (client.clone(), shared.clone(), agent.downgrade());
            spawn("kvferry-etcd-watch", Box::new(move || watch_peers(&client, &shared, &agent, watch)))?
        };
        Ok(EtcdDiscovery { agent: agent.clone(), client, shared, threads: vec![lease_thread, watch_thread] })
    }

    /// Find the agent called `name` under the prefix and add it as a peer; returns its name. From
    /// then on, its key vanishing fails its pending transfers and removes it.
    pub fn lookup(&self, name: &str) -> Result<String> {
        let key = [self.shared.prefix.as_slice(), name.as_bytes()].concat();
        let Some(sealed) = self.client.get(&key)? else {
            return Err(DiscoveryError::PeerNotFound { name: name.into(), prefix: self.prefix() }.into());
        };
        let metadata = self
            .agent
            .auth()
            .open(&key, &sealed)
            .map_err(|cause| TransferError::Unauthenticated { peer: name.into(), cause })?;
        // Track before adding, so that a deletion arriving meanwhile is not missed.
        self.shared.tracked.locked().insert(name.to_string());
        let added = self.agent.add_peer(&metadata).and_then(|added| match added == name {
            true => Ok(added),
            false => {
                let _ = self.agent.remove_peer(&added);
                let why = format!("key {}{name} holds the metadata of agent {added}", self.prefix());
                Err(DiscoveryError::BadResponse { endpoint: self.client.endpoints(), why }.into())
            }
        });
        if added.is_err() {
            self.shared.tracked.locked().remove(name);
        }
        added
    }

    /// The names of the agents registered under the prefix, this one excluded.
    pub fn peers(&self) -> Result<Vec<String>> {
        let (kvs, _) = self.client.list(&self.shared.prefix)?;
        let names = kvs.into_iter().filter_map(|(key, _)| {
            let name = String::from_utf8(key.get(self.shared.prefix.len()..)?.to_vec()).ok()?;
            (name != self.shared.name).then_some(name)
        });
        Ok(names.collect())
    }

    /// Publish the agent's metadata now rather than at the next renewal (after registering memory
    /// that peers should see at once).
    pub fn publish(&self) -> Result<()> {
        Ok(self.shared.publish(&self.client, &self.agent)?)
    }

    /// The key this agent is published under.
    pub fn key(&self) -> String {
        String::from_utf8_lossy(&self.shared.key()).into_owned()
    }

    pub fn prefix(&self) -> String {
        String::from_utf8_lossy(&self.shared.prefix).into_owned()
    }

    /// The lease the key is attached to (replaced if etcd let it expire).
    pub fn lease(&self) -> i64 {
        self.shared.lease.load(Ordering::Acquire)
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        *self.shared.stop.locked() = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.client.revoke(self.lease()) {
            tracing::warn!(error = %e, "leaving etcd: the lease could not be revoked; the key expires with it");
        }
    }
}

/// Renew the lease every third of its TTL; take a new one if etcd let it expire (this process was
/// stopped longer than the TTL, or etcd was unreachable that long), and republish when the
/// agent's metadata changed.
fn keep_alive(client: &EtcdClient, shared: &Shared, agent: &Weak<AgentInner>) {
    while !shared.sleep(shared.lease_ttl / 3) {
        let Some(agent) = Agent::upgrade(agent) else { return };
        let lease = shared.lease.load(Ordering::Acquire);
        let renewed = client.keep_alive(lease).or_else(|e| match e {
            DiscoveryError::LeaseLost { .. } => {
                tracing::warn!(lease, "the etcd lease expired; publishing again under a new one");
                let lease = client.grant(shared.lease_ttl)?;
                shared.lease.store(lease, Ordering::Release);
                shared.publish(client, &agent)
            }
            e => Err(e),
        });
        let renewed = renewed.and_then(|()| match agent.generation() == shared.published.load(Ordering::Acquire) {
            true => Ok(()),
            false => shared.publish(client, &agent),
        });
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "etcd: renewing this agent's key failed; retrying");
        }
    }
}

/// Follow the prefix: a tracked peer's deletion fails its transfers, its update refreshes its
/// metadata. After a broken watch, the listing decides which tracked peers are gone.
fn watch_peers(client: &EtcdClient, shared: &Shared, agent: &Weak<AgentInner>, mut watch: super::etcd::Watch) {
    let name_of = |key: &[u8]| String::from_utf8(key.get(shared.prefix.len()..)?.to_vec()).ok();
    loop {
        if shared.stopping() {
            return;
        }
        let Some(agent) = Agent::upgrade(agent) else { return };
        match watch.next() {
            Ok(None) => {}
            Ok(Some(events)) => {
                for event in events {
                    match event {
                        WatchEvent::Delete { key } => {
                            if let Some(name) = name_of(&key) {
                                shared.gone(&agent, &name);
                            }
                        }
                        WatchEvent::Put { key, value } => {
                            let Some(name) = name_of(&key) else { continue };
                            if !shared.tracked.locked().contains(&name) {
                                continue;
                            }
                            let update = agent.auth().open(&key, &value).map_err(|cause| {
                                Error::from(TransferError::Unauthenticated { peer: name.clone(), cause })
                            });
                            if let Err(e) = update.and_then(|metadata| agent.add_peer(&metadata)) {
                                tracing::warn!(peer = %name, error = %e, "etcd: ignoring a malformed update");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd: the watch broke; listing and watching again");
                loop {
                    if shared.sleep(Duration::from_millis(500)) {
                        return;
                    }
                    let resumed = client.list(&shared.prefix).and_then(|(kvs, revision)| {
                        let present: HashSet<String> = kvs.iter().filter_map(|(k, _)| name_of(k)).collect();
                        let tracked: Vec<String> = shared.tracked.locked().iter().cloned().collect();
                        for name in tracked.iter().filter(|n| !present.contains(*n)) {
                            shared.gone(&agent, name);
                        }
                        client.watch(&shared.prefix, revision + 1, WATCH_POLL)
                    });
                    match resumed {
                        Ok(w) => {
                            watch = w;
                            break;
                        }
                        Err(e) => tracing::debug!(error = %e, "etcd: still unreachable"),
                    }
                }
            }
        }
    }
}
