//! `kvferry serve`: a target agent hosting one registered buffer behind a side channel. It is the
//! other end of `kvferry bench --role initiator`, and what `bench` starts in-process by default.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::metrics::MetricsServer;
use kvferry::transport::tcp::TcpConfig;
use kvferry::{Agent, AgentConfig, AgentLimits, Deadline, Registration, ServeLimits};

use crate::{pattern, units};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Side channel address peers dial (`host:port`); the data port is picked next to it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Host name or address peers should dial when listening on a wildcard address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Size of the registered buffer (e.g. 256M, 1G).
    #[arg(long, default_value = "1G", value_parser = units::parse_size)]
    pub buffer_size: u64,
    /// Fill the buffer with the pattern of this seed, so initiators can check what they read.
    #[arg(long)]
    pub fill_seed: Option<u64>,
    /// TCP streams per peer (for transfers this agent starts).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Exit after this many seconds (default: run until killed).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Agent name (default: kvferry-serve-PID).
    #[arg(long)]
    pub name: Option<String>,
    /// What backs the buffer: `shared` (a memfd that same-host peers map) or `private` (anonymous
    /// memory, which same-host peers reach by cross-memory attach).
    #[arg(long, value_enum, default_value = "shared")]
    pub memory: MemoryArg,
    /// Transport peers reach the buffer through: `tcp` (and shm for peers on this host), or `fabric`
    /// (libfabric only) in builds with it.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (e.g. 127.0.0.1:9400; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub options: OptionArgs,
}

/// Agent options by key, the same as the C ABI's `key=value` options and Python's `options=`
/// (`kvferry info` lists them with their defaults); applied after the other flags, so they win.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OptionArgs {
    /// An agent option, `KEY=VALUE` (e.g. `--set tcp.max_connections=64`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_option)]
    pub set: Vec<(String, String)>,
}

fn parse_option(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not of the form KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

impl OptionArgs {
    /// `config` with these options applied.
    pub fn apply(&self, config: AgentConfig) -> anyhow::Result<AgentConfig> {
        Ok(config.with_options(self.set.iter().map(|(k, v)| (k.as_str(), v.as_str())))?)
    }
}

/// TLS on the side channel and the TCP transport (off unless `--tls-cert` is given). The cluster
/// secret is still proven inside it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This agent's certificate chain (PEM), presented when serving and as the client certificate.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA bundle (PEM) that peers' certificates must chain to.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Refuse clients without a certificate the CA signed (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_require_client_cert: bool,
    /// The name servers' certificates must carry (default: the host of the endpoint dialled).
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    pub fn config(&self) -> Option<kvferry::TlsConfig> {
        let (cert, key, ca) = (self.tls_cert.clone()?, self.tls_key.clone()?, self.tls_ca.clone()?);
        Some(kvferry::TlsConfig {
            require_client_cert: self.tls_require_client_cert,
            server_name: self.tls_server_name.clone(),
            ..kvferry::TlsConfig::new(cert, key, ca)
        })
    }
}

/// What peers can make the served agent spend (`kvferry info` lists the defaults). They apply to
/// the TCP transport, the shm transport and the side channel alike.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Seconds a served request may take from its first byte to its answer's last.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
    /// Threads serving requests, per transport.
    #[arg(long)]
    pub serve_workers: Option<usize>,
    /// Connections open at once, per transport.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connections that have not proven the cluster secret yet, per transport.
    #[arg(long)]
    pub max_unauthenticated: Option<usize>,
    /// Connections from one IP address (shm: from one user id), per transport.
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds from accept to a proven cluster secret.
    #[arg(long)]
    pub handshake_timeout: Option<f64>,
    /// Notifications queued and not yet taken.
    #[arg(long)]
    pub max_notifications: Option<usize>,
    /// Peers added through the side channel.
    #[arg(long)]
    pub max_peers: Option<usize>,
}

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs {
            request_timeout: TcpConfig::default().request_timeout.as_secs_f64(),
            serve_workers: None,
            max_connections: None,
            max_unauthenticated: None,
            max_connections_per_ip: None,
            handshake_timeout: None,
            max_notifications: None,
            max_peers: None,
        }
    }
}

impl LimitArgs {
    fn serve_limits(&self) -> ServeLimits {
        let d = ServeLimits::default();
        ServeLimits {
            workers: self.serve_workers.unwrap_or(d.workers),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_unauthenticated: self.max_unauthenticated.unwrap_or(d.max_unauthenticated),
            max_per_ip: self.max_connections_per_ip.unwrap_or(d.max_per_ip),
            handshake_timeout: self.handshake_timeout.map_or(d.handshake_timeout, Duration::from_secs_f64),
            ..d
        }
    }

    fn agent_limits(&self) -> AgentLimits {
        let d = AgentLimits::default();
        AgentLimits {
            side_channel: self.serve_limits(),
            max_notifications: self.max_notifications.unwrap_or(d.max_notifications),
            max_peers: self.max_peers.unwrap_or(d.max_peers),
            ..d
        }
    }
}

/// Publishing the agent in etcd, in builds with the `etcd` feature.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// etcd client URLs (`http://host:2379`, comma-separated): publish this agent's metadata there
    /// under a lease, so peers find it by name.
    #[arg(long, value_delimiter = ',', value_name = "URLS")]
    pub etcd: Vec<String>,
    /// Key prefix shared by the agents of one cluster.
    #[arg(long, default_value = "kvferry/agents/")]
    pub etcd_prefix: String,
    /// Seconds after this process stops renewing its lease (dies, hangs) that its key vanishes.
    #[arg(long, default_value_t = 10.0)]
    pub etcd_ttl: f64,
}

/// Publish `agent` in etcd if `--etcd` was given.
#[cfg(feature = "etcd")]
pub fn join_etcd(agent: &Agent, args: &EtcdArgs) -> anyhow::Result<Option<kvferry::discovery::EtcdDiscovery>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    let config = kvferry::discovery::EtcdConfig::new(args.etcd.clone(), args.etcd_prefix.clone())
        .with_lease_ttl(Duration::from_secs_f64(args.etcd_ttl));
    Ok(Some(kvferry::discovery::EtcdDiscovery::join(agent, config).context("joining etcd")?))
}

#[cfg(not(feature = "etcd"))]
pub fn join_etcd(_agent: &Agent, args: &EtcdArgs) -> anyhow::Result<Option<std::convert::Infallible>> {
    match args.etcd.is_empty() {
        true => Ok(None),
        false => anyhow::bail!("--etcd needs a build with the cargo feature `etcd`"),
    }
}

/// libfabric options, for `--transport fabric`.
#[derive(clap::Args, Debug, Clone)]
pub struct FabricArgs {
    /// libfabric provider: verbs, efa, cxi, tcp, shm, ... (default: the best available; `kvferry
    /// info` lists them).
    #[arg(long)]
    pub provider: Option<String>,
    /// Domains (NICs) to use at once; large batches are striped across them.
    #[arg(long, default_value_t = 1)]
    pub rails: usize,
}

/// The agent configuration for `transport`: `tcp` (TCP, and shm for same-host peers) or `fabric`
/// (libfabric alone, so that same-host peers measure it rather than shm).
pub fn agent_config(name: String, transport: &str, tcp: TcpConfig, fabric: &FabricArgs) -> anyhow::Result<AgentConfig> {
    match transport {
        "tcp" | "shm" => Ok(AgentConfig { tcp: Some(tcp), ..AgentConfig::new(name) }),
        #[cfg(feature = "fabric")]
        "fabric" => Ok(AgentConfig {
            tcp: None,
            shm: None,
            fabric: Some(kvferry::transport::fabric::FabricConfig {
                provider: fabric.provider.clone(),
                rails: fabric.rails,
                ..Default::default()
            }),
            ..AgentConfig::new(name)
        }),
        other => {
            let _ = fabric;
            anyhow::bail!(
                "transport `{other}` is not available in this build (`kvferry info` lists the transports; fabric \
                 needs the cargo feature `fabric`)"
            )
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryArg {
    Shared,
    Private,
}

/// A running target: the agent, its buffer and its side channel.
pub struct Target {
    pub agent: Agent,
    pub buffer: Arc<HostBuffer>,
    pub side_channel: SocketAddr,
    _registration: Registration,
}

impl Target {
    pub fn start(args: &ServeArgs) -> anyhow::Result<Target> {
        let mut tcp = TcpConfig {
            streams: args.streams,
            advertise_host: args.advertise.clone(),
            request_timeout: Duration::from_secs_f64(args.limits.request_timeout),
            limits: args.limits.serve_limits(),
            ..TcpConfig::default()
        };
        tcp.listen.set_ip(args.listen.ip());
        let name = args.name.clone().unwrap_or_else(|| format!("kvferry-serve-{}", std::process::id()));
        let mut config = AgentConfig {
            limits: args.limits.agent_limits(),
            tls: args.tls.config(),
            ..agent_config(name, &args.transport, tcp, &args.fabric)?
        };
        if let Some(shm) = config.shm.as_mut() {
            shm.request_timeout = Duration::from_secs_f64(args.limits.request_timeout);
            shm.limits = args.limits.serve_limits();
        }
        let agent = Agent::new(args.options.apply(config)?).context("starting the agent")?;
        let buffer = alloc_buffer(args.buffer_size, args.memory == MemoryArg::Shared)?;
        if let Some(seed) = args.fill_seed {
            // Nothing is registered yet, so nobody else touches the buffer.
            pattern::fill(unsafe { buffer.as_mut_slice() }, seed, 0);
        }
        let registration = agent.register(buffer.clone()).context("registering the buffer")?;
        let side_channel = agent.serve_side_channel(args.listen).context("starting the side channel")?;
        Ok(Target { agent, buffer, side_channel, _registration: registration })
    }
}

/// A pinned, pre-faulted buffer (memfd-backed when `shareable`); unpinned (with a warning) where the
/// memlock limit is too small.
pub fn alloc_buffer(len: u64, shareable: bool) -> anyhow::Result<Arc<HostBuffer>> {
    let len = usize::try_from(len).context("buffer size")?;
    let pinned = HostAllocOptions { pin: true, populate: true, shareable, ..HostAllocOptions::default() };
    match HostBuffer::alloc(len, &pinned) {
        Ok(b) => Ok(Arc::new(b)),
        Err(e) if e.code() == kvferry::ErrorCode::PinFailed => {
            eprintln!("warning: {e}; continuing with unpinned memory");
            let unpinned = HostAllocOptions { pin: false, ..pinned };
            Ok(Arc::new(HostBuffer::alloc(len, &unpinned)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// Serve `agent`'s metrics on `listen`, if asked; says where on stderr.
pub fn serve_metrics(agent: &Agent, listen: Option<SocketAddr>) -> anyhow::Result<Option<MetricsServer>> {
    let Some(listen) = listen else { return Ok(None) };
    let metrics = agent.metrics();
    let server = kvferry::metrics::serve(listen, move || metrics.render()).context("starting the metrics endpoint")?;
    eprintln!("kvferry: metrics at http://{}/metrics", server.local_addr());
    Ok(Some(server))
}

#[cfg(feature = "etcd")]
fn etcd_key(etcd: Option<&kvferry::discovery::EtcdDiscovery>) -> Option<String> {
    etcd.map(|d| d.key())
}

#[cfg(not(feature = "etcd"))]
fn etcd_key(_: Option<&std::convert::Infallible>) -> Option<String> {
    None
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let target = Target::start(args)?;
    let metrics = serve_metrics(&target.agent, args.metrics)?;
    let etcd = join_etcd(&target.agent, &args.etcd)?;
    let endpoints: Vec<String> =
        target.agent.endpoints().iter().map(|e| format!("{}://{}", e.kind, e.address)).collect();
    // What a peer dials: a wildcard listen address is reached through the advertised host.
    let dial = match (&args.advertise, target.side_channel.ip().is_unspecified()) {
        (Some(host), true) => format!("{host}:{}", target.side_channel.port()),
        _ => target.side_channel.to_string(),
    };
    // One machine-readable line first: scripts and tests wait for it.
    println!(
        "{}",
        serde_json::json!({
            "side_channel": dial,
            "agent": target.agent.name(),
            "endpoints": endpoints,
            "buffer_addr": format!("{:#x}", target.buffer.as_ptr() as u64),
            "buffer_size": target.buffer.len(),
            "metrics": metrics.as_ref().map(|m| m.local_addr().to_string()),
            "etcd_key": etcd_key(etcd.as_ref()),
        })
    );
    eprintln!("kvferry serve: {} bytes registered; peers connect with --peer {dial}", target.buffer.len());
    let until = args.duration.map(|s| Instant::now() + Duration::from_secs_f64(s));
    loop {
        let step = Deadline::after(Duration::from_millis(500));
        for n in target.agent.wait_notifications(step) {
            eprintln!("notification from {}: {}", n.from, String::from_utf8_lossy(&n.data));
        }
        if until.is_some_and(|t| Instant::now() >= t) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        options: OptionArgs,
    }

    #[test]
    fn set_applies_agent_options_by_the_core_parser_and_refuses_what_it_refuses() {
        let parsed = Command::try_parse_from(["serve", "--set", "max_peers=3", "--set", "shm=off"]).unwrap();
        let config = parsed.options.apply(AgentConfig::new("cli")).unwrap();
        assert_eq!((config.limits.max_peers, config.shm.is_none()), (3, true));
        let bad = Command::try_parse_from(["serve", "--set", "tcp.streams=0"]).unwrap();
        let e = bad.options.apply(AgentConfig::new("cli")).unwrap_err().to_string();
        assert!(e.contains("option tcp.streams: \"0\" is not a stream count from 1 to 64"), "{e}");
        assert!(Command::try_parse_from(["serve", "--set", "no-equals-sign"]).is_err());
    }
}
