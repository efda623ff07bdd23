//! An agent's settings, and the one way every front end spells them: `key=value` options that
//! [`AgentConfig::with_options`] parses (the C ABI's `kvferry_agent_create`, Python's
//! `Agent(options=...)`, the CLI's `--set`) and [`AgentConfig::options`] lists with their values
//! (`kvferry info`). A test holds the two to the same keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::auth::AuthConfig;
use crate::error::{Error, Result};
use crate::limits::{AgentLimits, ServeLimits};
use crate::setting::{OptionValue, Setting, millis, switch};
use crate::tls::TlsConfig;
use crate::transport::shm::ShmConfig;
use crate::transport::staging::StagingConfig;
use crate::transport::tcp::TcpConfig;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unique among the agents that talk to each other.
    pub name: String,
    /// The TCP transport; `None` disables it.
    pub tcp: Option<TcpConfig>,
    /// Device memory moved by transports that cannot reach it (TCP) passes through pinned host
    /// buffers with these devices; `None` registers device memory only with transports that can.
    pub staging: Option<StagingConfig>,
    /// The shared-memory transport, preferred for peers on the same host; `None` disables it.
    pub shm: Option<ShmConfig>,
    /// CUDA IPC between peers on this host; `None` disables it. When enabled it is preferred over
    /// shm and TCP for the device memory it moves; other memory to the same peer takes the others.
    #[cfg(feature = "cuda")]
    pub cuda_ipc: Option<crate::transport::cuda_ipc::CudaIpcConfig>,
    /// The libfabric transport; `None` (the default) disables it. Preferred over TCP (and after
    /// shm and cuda-ipc, which only reach peers on this host).
    #[cfg(feature = "fabric")]
    pub fabric: Option<crate::transport::fabric::FabricConfig>,
    /// How peers prove the cluster secret on every channel (see [`AuthConfig`]).
    pub auth: AuthConfig,
    /// TLS on the side channel and the TCP transport (both directions); `None` (the default):
    /// plain TCP after the cluster-secret handshake. An agent with TLS refuses peers without it.
    pub tls: Option<TlsConfig>,
    /// What peers can make the agent spend: the side channel's connections, queued notifications,
    /// peers added through the side channel.
    pub limits: AgentLimits,
}

impl AgentConfig {
    /// TCP and shared memory with their defaults.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            name: name.into(),
            tcp: Some(TcpConfig::default()),
            staging: None,
            shm: Some(ShmConfig::default()),
            #[cfg(feature = "cuda")]
            cuda_ipc: None,
            #[cfg(feature = "fabric")]
            fabric: None,
            auth: AuthConfig::default(),
            tls: None,
            limits: AgentLimits::default(),
        }
    }
}

/// How one of an endpoint's limits is listed and set.
type LimitOption = (&'static str, fn(&ServeLimits) -> String, fn(&mut ServeLimits, &Setting) -> Result<()>);

/// Every limit of a serving endpoint, as an option under its endpoint's prefix (`tcp.workers`).
const SERVE_LIMITS: [LimitOption; 8] = [
    (
        "workers",
        |l| l.workers.to_string(),
        |l, s| {
            l.workers = s.count()?;
            Ok(())
        },
    ),
    (
        "handshake_workers",
        |l| l.handshake_workers.to_string(),
        |l, s| {
            l.handshake_workers = s.count()?;
            Ok(())
        },
    ),
    (
        "max_connections",
        |l| l.max_connections.to_string(),
        |l, s| {
            l.max_connections = s.count()?;
            Ok(())
        },
    ),
    (
        "max_unauthenticated",
        |l| l.max_unauthenticated.to_string(),
        |l, s| {
            l.max_unauthenticated = s.count()?;
            Ok(())
        },
    ),
    (
        "max_per_ip",
        |l| l.max_per_ip.to_string(),
        |l, s| {
            l.max_per_ip = s.count()?;
            Ok(())
        },
    ),
    (
        "handshake_timeout_ms",
        |l| millis(l.handshake_timeout),
        |l, s| {
            l.handshake_timeout = s.millis()?;
            Ok(())
        },
    ),
    (
        "idle_timeout_ms",
        |l| millis(l.idle_timeout),
        |l, s| {
            l.idle_timeout = s.millis()?;
            Ok(())
        },
    ),
    (
        "request_bytes",
        |l| l.request_bytes.to_string(),
        |l, s| {
            l.request_bytes = s.count()? as u64;
            Ok(())
        },
    ),
];

/// The options of one serving endpoint's limits, under `prefix`.
fn serve_limit_options(prefix: &str, limits: &ServeLimits) -> Vec<(String, OptionValue)> {
    SERVE_LIMITS.iter().map(|(key, get, _)| (format!("{prefix}.{key}"), Some(get(limits)))).collect()
}

/// Apply `setting` to `limits`' field named `field`; `false` when `field` is not one.
fn serve_limit(setting: &Setting, limits: &mut ServeLimits, field: &str) -> Result<bool> {
    match SERVE_LIMITS.iter().find(|(key, _, _)| *key == field) {
        Some((_, _, set)) => set(limits, setting).map(|()| true),
        None => Ok(false),
    }
}

/// The TLS files as they are being set: TLS needs all three or none.
#[derive(Default)]
struct TlsDraft {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    require_client_cert: bool,
    server_name: Option<String>,
}

impl TlsDraft {
    fn of(tls: &Option<TlsConfig>) -> TlsDraft {
        match tls {
            Some(t) => TlsDraft {
                cert: Some(t.cert.clone()),
                key: Some(t.key.clone()),
                ca: Some(t.ca.clone()),
                require_client_cert: t.require_client_cert,
                server_name: t.server_name.clone(),
            },
            None => TlsDraft::default(),
        }
    }

    fn finish(self) -> Result<Option<TlsConfig>> {
        match (self.cert, self.key, self.ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsConfig {
                require_client_cert: self.require_client_cert,
                server_name: self.server_name,
                ..TlsConfig::new(cert, key, ca)
            })),
            (None, None, None) if !self.require_client_cert && self.server_name.is_none() => Ok(None),
            _ => Err(Error::InvalidArgument("TLS needs all three of tls.cert, tls.key and tls.ca".into())),
        }
    }
}

impl AgentConfig {
    /// Every setting as an option with its value (`None`: unset), in a stable order. A transport
    /// that is off lists the settings it would have. The secret is never shown: `auth` says where
    /// it comes from.
    pub fn options(&self) -> Vec<(String, OptionValue)> {
        let some = |key: &str, value: String| (key.to_string(), Some(value));
        let tcp = self.tcp.clone().unwrap_or_default();
        let mut out = vec![
            some("tcp", switch(self.tcp.is_some())),
            some("tcp.listen", tcp.listen.to_string()),
            ("tcp.advertise_host".into(), tcp.advertise_host.clone()),
            some("tcp.streams", tcp.streams.to_string()),
            some("tcp.threads", tcp.threads.to_string()),
            some("tcp.connect_timeout_ms", millis(tcp.connect_timeout)),
            some("tcp.request_timeout_ms", millis(tcp.request_timeout)),
            some("tcp.min_frame_bytes", tcp.min_frame_bytes.to_string()),
        ];
        out.extend(serve_limit_options("tcp", &tcp.limits));
        let shm = self.shm.clone().unwrap_or_default();
        out.extend([
            some("shm", switch(self.shm.is_some())),
            ("shm.copy_threads".into(), shm.copy_threads.map(|n| n.to_string())),
            some("shm.threads", shm.threads.to_string()),
            some("shm.connect_timeout_ms", millis(shm.connect_timeout)),
            some("shm.request_timeout_ms", millis(shm.request_timeout)),
            some("shm.link_idle_timeout_ms", millis(shm.idle_timeout)),
            some("shm.max_shared_sources", shm.max_shared_sources.to_string()),
        ]);
        out.extend(serve_limit_options("shm", &shm.limits));
        #[cfg(feature = "fabric")]
        {
            let on = self.fabric.as_ref().map(|f| f.provider.clone().unwrap_or_else(|| "any".into()));
            let fabric = self.fabric.clone().unwrap_or_default();
            out.extend([
                some("fabric", on.unwrap_or_else(|| "off".into())),
                some("fabric.rails", fabric.rails.to_string()),
                ("fabric.domains".into(), (!fabric.domains.is_empty()).then(|| fabric.domains.join(","))),
                some("fabric.hmem", switch(fabric.hmem)),
                some("fabric.stripe_min_bytes", fabric.stripe_min_bytes.to_string()),
                some("fabric.max_answers", fabric.max_answers.to_string()),
                some("fabric.staging_kept_bytes", fabric.staging_kept_bytes.to_string()),
            ]);
        }
        let auth = match self.auth {
            AuthConfig::FromEnv => "env",
            AuthConfig::Secret(_) => "secret",
            AuthConfig::Disabled => "none",
        };
        let tls = self.tls.as_ref();
        let limits = &self.limits;
        out.extend([
            some("auth", auth.into()),
            ("secret".into(), None),
            ("tls.cert".into(), tls.map(|t| t.cert.display().to_string())),
            ("tls.key".into(), tls.map(|t| t.key.display().to_string())),
            ("tls.ca".into(), tls.map(|t| t.ca.display().to_string())),
            some("tls.require_client_cert", switch(tls.is_some_and(|t| t.require_client_cert))),
            ("tls.server_name".into(), tls.and_then(|t| t.server_name.clone())),
            some("max_notifications", limits.max_notifications.to_string()),
            some("max_notification_bytes", limits.max_notification_bytes.to_string()),
            some("max_peers", limits.max_peers.to_string()),
            some("peer_idle_timeout_ms", millis(limits.peer_idle_timeout)),
        ]);
        out.extend(serve_limit_options("side_channel", &limits.side_channel));
        out
    }

    /// This configuration with `options` applied, each a `key` of [`options`](Self::options) and a
    /// value as it lists them; a later value for a key replaces an earlier one, and the order of
    /// different keys does not matter (`tcp=off` turns TCP off whatever `tcp.*` says). An unknown
    /// key, a value the key does not take, or TLS files given only in part is `InvalidArgument`
    /// naming the option, and no configuration results.
    pub fn with_options<'a>(self, options: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<AgentConfig> {
        let mut draft = Draft::of(self);
        for (key, value) in options {
            let setting = Setting { key, value };
            if !draft.apply(&setting)? {
                let known: Vec<String> = draft.config.options().into_iter().map(|(key, _)| key).collect();
                return Err(Error::InvalidArgument(format!(
                    "unknown option {key:?}; known options: {}",
                    known.join(", ")
                )));
            }
        }
        draft.finish()
    }
}

/// A configuration being set from options: each transport's settings kept apart from whether it
/// is on, so that the order of the options does not matter.
struct Draft {
    config: AgentConfig,
    tcp: (bool, TcpConfig),
    shm: (bool, ShmConfig),
    #[cfg(feature = "fabric")]
    fabric: (bool, crate::transport::fabric::FabricConfig),
    tls: TlsDraft,
}

impl Draft {
    fn of(mut config: AgentConfig) -> Draft {
        let tcp = (config.tcp.is_some(), config.tcp.take().unwrap_or_default());
        let shm = (config.shm.is_some(), config.shm.take().unwrap_or_default());
        #[cfg(feature = "fabric")]
        let fabric = (config.fabric.is_some(), config.fabric.take().unwrap_or_default());
        let tls = TlsDraft::of(&config.tls);
        Draft {
            config,
            tcp,
            shm,
            #[cfg(feature = "fabric")]
            fabric,
            tls,
        }
    }

    fn finish(self) -> Result<AgentConfig> {
        let Draft { mut config, tcp, shm, tls, .. } = self;
        config.tcp = tcp.0.then_some(tcp.1);
        config.shm = shm.0.then_some(shm.1);
        #[cfg(feature = "fabric")]
        {
            config.fabric = self.fabric.0.then_some(self.fabric.1);
        }
        config.tls = tls.finish()?;
        Ok(config)
    }

    /// Apply one setting; `false` when its key is not an option.
    fn apply(&mut self, s: &Setting) -> Result<bool> {
        let (section, field) = s.key.split_once('.').unwrap_or((s.key, ""));
        let (limits, tls) = (&mut self.config.limits, &mut self.tls);
        match (section, field) {
            ("tcp", "") => self.tcp.0 = s.switch()?,
            ("tcp", field) => {
                let tcp = &mut self.tcp.1;
                match field {
                    "listen" => tcp.listen = s.value.parse::<SocketAddr>().map_err(|_| s.bad("an ip:port address"))?,
                    "advertise_host" => tcp.advertise_host = Some(s.value.to_string()),
                    "streams" => {
                        tcp.streams = match s.number() {
                            Ok(n @ 1..=64) => n as usize,
                            _ => return Err(s.bad("a stream count from 1 to 64")),
                        }
                    }
                    "threads" => tcp.threads = s.count()?,
                    "connect_timeout_ms" => tcp.connect_timeout = s.millis()?,
                    "request_timeout_ms" => tcp.request_timeout = s.millis()?,
                    "min_frame_bytes" => tcp.min_frame_bytes = s.number()?,
                    other => return serve_limit(s, &mut tcp.limits, other),
                }
            }
            ("shm", "") => self.shm.0 = s.switch()?,
            ("shm", field) => {
                let shm = &mut self.shm.1;
                match field {
                    "copy_threads" => shm.copy_threads = Some(s.count()?),
                    "threads" => shm.threads = s.count()?,
                    "connect_timeout_ms" => shm.connect_timeout = s.millis()?,
                    "request_timeout_ms" => shm.request_timeout = s.millis()?,
                    "link_idle_timeout_ms" => shm.idle_timeout = s.millis()?,
                    "max_shared_sources" => shm.max_shared_sources = s.count()?,
                    other => return serve_limit(s, &mut shm.limits, other),
                }
            }
            #[cfg(feature = "fabric")]
            ("fabric", field) => return self.apply_fabric(s, field),
            ("auth", "") => {
                self.config.auth = match s.value {
                    "env" => AuthConfig::FromEnv,
                    "none" => AuthConfig::Disabled,
                    // What `options` lists once a secret is set; the secret itself comes with `secret`.
                    "secret" if matches!(self.config.auth, AuthConfig::Secret(_)) => return Ok(true),
                    _ => return Err(s.bad("`env` or `none` (a secret is given with `secret`)")),
                }
            }
            ("secret", "") => self.config.auth = AuthConfig::Secret(s.value.as_bytes().to_vec()),
            ("tls", "cert") => tls.cert = Some(s.value.into()),
            ("tls", "key") => tls.key = Some(s.value.into()),
            ("tls", "ca") => tls.ca = Some(s.value.into()),
            ("tls", "require_client_cert") => tls.require_client_cert = s.switch()?,
            ("tls", "server_name") => tls.server_name = Some(s.value.to_string()),
            ("max_notifications", "") => limits.max_notifications = s.count()?,
            ("max_notification_bytes", "") => limits.max_notification_bytes = s.count()? as u64,
            ("max_peers", "") => limits.max_peers = s.count()?,
            ("peer_idle_timeout_ms", "") => limits.peer_idle_timeout = s.millis()?,
            ("side_channel", field) => return serve_limit(s, &mut limits.side_channel, field),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `fabric=off|any|PROVIDER` and the `fabric.*` settings.
    #[cfg(feature = "fabric")]
    fn apply_fabric(&mut self, s: &Setting, field: &str) -> Result<bool> {
        let (on, fabric) = &mut self.fabric;
        match field {
            "" => match s.value {
                "off" => *on = false,
                "any" => (*on, fabric.provider) = (true, None),
                provider => (*on, fabric.provider) = (true, Some(provider.into())),
            },
            "rails" => fabric.rails = s.count()?,
            "domains" => fabric.domains = s.value.split(',').filter(|d| !d.is_empty()).map(String::from).collect(),
            "hmem" => fabric.hmem = s.switch()?,
            "stripe_min_bytes" => fabric.stripe_min_bytes = s.number()?,
            "max_answers" => fabric.max_answers = s.count()?,
            "staging_kept_bytes" => fabric.staging_kept_bytes = s.number()? as usize,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn set(options: &[(&str, &str)]) -> Result<AgentConfig> {
        AgentConfig::new("options").with_options(options.iter().copied())
    }

    /// The listed values of the options that have one, as `with_options` takes them.
    fn listed(config: &AgentConfig) -> Vec<(String, String)> {
        config.options().into_iter().filter_map(|(key, value)| Some((key, value?))).collect()
    }

    #[test]
    fn what_options_lists_with_options_takes_back_and_lists_again() {
        let custom = set(&[
            ("tcp.listen", "127.0.0.1:7311"),
            ("tcp.advertise_host", "node-7"),
            ("tcp.streams", "5"),
            ("tcp.threads", "6"),
            ("tcp.workers", "3"),
            ("shm", "off"),
            ("shm.copy_threads", "2"),
            ("shm.threads", "3"),
            ("auth", "none"),
            ("tls.cert", "/c.pem"),
            ("tls.key", "/k.pem"),
            ("tls.ca", "/ca.pem"),
            ("tls.server_name", "kv.example"),
            ("max_peers", "9"),
            ("side_channel.idle_timeout_ms", "1234"),
        ])
        .unwrap();
        for config in [AgentConfig::new("defaults"), custom] {
            let options = listed(&config);
            let again = AgentConfig::new("again").with_options(options.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            assert_eq!(listed(&again.unwrap()), options);
        }
    }

    #[test]
    fn every_listed_key_is_taken_and_an_unknown_one_is_refused_with_the_list() {
        let defaults = AgentConfig::new("defaults");
        for (key, value) in listed(&defaults) {
            set(&[(&key, &value)]).unwrap_or_else(|e| panic!("{key}={value}: {e}"));
        }
        let e = set(&[("tcp.stream", "2")]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        let message = e.to_string();
        assert!(message.contains("unknown option \"tcp.stream\""), "{message}");
        for (key, _) in defaults.options() {
            assert!(message.contains(&key), "{key} missing from: {message}");
        }
    }

    #[test]
    fn a_transport_turned_off_stays_off_whatever_order_its_settings_come_in() {
        for options in [[("tcp", "off"), ("tcp.streams", "3")], [("tcp.streams", "3"), ("tcp", "off")]] {
            assert!(set(&options).unwrap().tcp.is_none());
        }
        let on = set(&[("tcp", "off"), ("tcp.streams", "3"), ("tcp", "on")]).unwrap();
        assert_eq!(on.tcp.unwrap().streams, 3);
    }

    #[test]
    fn bad_values_name_their_option_and_yield_no_configuration() {
        for (key, value, expected) in [
            ("tcp.streams", "0", "a stream count from 1 to 64"),
            ("tcp.connect_timeout_ms", "0", "a positive number of milliseconds"),
            ("tcp.listen", "localhost", "an ip:port address"),
            ("shm", "maybe", "on or off"),
            ("max_notifications", "-1", "a number of at least 1"),
            ("auth", "secret", "`env` or `none`"),
        ] {
            let e = set(&[(key, value)]).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{key}");
            let message = e.to_string();
            assert!(message.contains(&format!("option {key}: {value:?} is not {expected}")), "{message}");
        }
        let e = set(&[("tls.cert", "/c.pem"), ("tls.key", "/k.pem")]).unwrap_err();
        assert!(e.to_string().contains("TLS needs all three of tls.cert, tls.key and tls.ca"), "{e}");
    }

    #[test]
    fn the_secret_is_never_listed() {
        let config = set(&[("secret", "a cluster secret of some length")]).unwrap();
        assert!(matches!(config.auth, AuthConfig::Secret(_)));
        let options = config.options();
        assert!(options.contains(&("auth".into(), Some("secret".into()))));
        assert!(options.contains(&("secret".into(), None)));
        assert!(!format!("{options:?}").contains("some length"));
    }

    #[cfg(feature = "fabric")]
    #[test]
    fn fabric_takes_a_provider_and_its_settings_in_any_order() {
        let config = set(&[("fabric.rails", "2"), ("fabric", "tcp")]).unwrap();
        let fabric = config.fabric.unwrap();
        assert_eq!((fabric.provider.as_deref(), fabric.rails), (Some("tcp"), 2));
        assert!(set(&[("fabric", "tcp"), ("fabric", "off")]).unwrap().fabric.is_none());
        assert!(set(&[("fabric", "any")]).unwrap().fabric.unwrap().provider.is_none());
    }
}
