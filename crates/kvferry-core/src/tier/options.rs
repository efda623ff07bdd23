//! A tier store's settings as `key=value` options, the one way every front end spells them (the C
//! ABI's `kvferry_store_create`, Python's `TierStore`): [`StoreOptions::parse`] reads them and
//! [`StoreOptions::options`] lists them with their values. A test holds the two to the same keys.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::setting::{OptionValue, Setting, millis, switch};
use crate::tier::policy::EvictionPolicy;
use crate::tier::remote::{RemoteConfig, RemoteLocation};
use crate::tier::{DiskConfig, TierConfig};

/// The prefix of options passed through to the remote tier's client (`remote.option.aws_endpoint`).
const REMOTE_CLIENT_OPTION: &str = "option.";

/// What a front end opens a store with: its configuration, and whether the caller takes its
/// events (a queue nobody drains would grow).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub config: TierConfig,
    pub events: bool,
}

/// The keys [`StoreOptions::parse`] takes, for the error naming an unknown one.
const KEYS: &str = "block_size, host_capacity, policy, workers, pin, events, disk.dir, disk.capacity, \
                    disk.queue_depth, disk.admit_after, disk.sync_writes, remote.url, remote.path, \
                    remote.namespace, remote.timeout_ms, remote.retry_after_ms, remote.concurrency, \
                    remote.max_upload_bytes, remote.failures_to_open, remote.option.NAME";

fn required(key: &str) -> Error {
    Error::InvalidArgument(format!("option {key} is required"))
}

impl StoreOptions {
    /// The store `options` describe: `block_size` and `host_capacity` are required, `disk.dir` and
    /// `disk.capacity` come together, and `remote.url` or `remote.path` (one) with
    /// `remote.namespace`. A later value for a key replaces an earlier one. An unknown key, a value
    /// the key does not take or a required key missing is `InvalidArgument` naming the option.
    pub fn parse<'a>(options: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<StoreOptions> {
        let mut config = TierConfig::new(0, 0);
        let (mut block_size, mut host_capacity, mut disk_dir, mut disk_capacity) = (None, None, None, None);
        let mut disk = DiskConfig::new("", 0);
        let mut events = false;
        let mut remote = RemoteDraft::default();
        for (key, value) in options {
            let s = Setting { key, value };
            match key.split_once('.') {
                Some(("remote", field)) => remote.apply(&s, field)?,
                Some(("disk", "dir")) if value.is_empty() => return Err(s.bad("a directory")),
                Some(("disk", "dir")) => disk_dir = Some(PathBuf::from(value)),
                Some(("disk", "capacity")) => disk_capacity = Some(s.count()? as u64),
                Some(("disk", "queue_depth")) => disk.queue_depth = s.count()?,
                Some(("disk", "admit_after")) => {
                    disk.admit_after = value.parse::<u8>().map_err(|_| s.bad("a count from 0 to 255"))?
                }
                Some(("disk", "sync_writes")) => disk.sync_writes = s.switch()?,
                Some(_) => return Err(unknown(key)),
                None => match key {
                    "block_size" => block_size = Some(s.count()?),
                    "host_capacity" => host_capacity = Some(s.count()? as u64),
                    "policy" => {
                        config.policy = match value {
                            "lru" => EvictionPolicy::Lru,
                            "arc" => EvictionPolicy::Arc,
                            _ => return Err(s.bad("lru or arc")),
                        }
                    }
                    "workers" => config.workers = s.count()?,
                    "pin" => config.host_alloc = config.host_alloc.with_pin(s.switch()?),
                    "events" => events = s.switch()?,
                    _ => return Err(unknown(key)),
                },
            }
        }
        config.block_size = block_size.ok_or_else(|| required("block_size"))?;
        config.host_capacity = host_capacity.ok_or_else(|| required("host_capacity"))?;
        config.disk = match (disk_dir, disk_capacity) {
            (Some(dir), Some(capacity)) => Some(DiskConfig { dir, capacity, ..disk }),
            (None, None) => None,
            (Some(_), None) => return Err(required("disk.capacity (with disk.dir)")),
            (None, Some(_)) => return Err(required("disk.dir (with disk.capacity)")),
        };
        config.remote = remote.finish()?;
        Ok(StoreOptions { config, events })
    }

    /// Every setting as an option with its value (`None`: unset), in a stable order; what
    /// [`parse`](Self::parse) takes back. Client settings are listed as `remote.option.NAME`.
    pub fn options(&self) -> Vec<(String, OptionValue)> {
        let some = |key: &str, value: String| (key.to_string(), Some(value));
        let config = &self.config;
        let policy = match config.policy {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Arc => "arc",
        };
        let mut out = vec![
            some("block_size", config.block_size.to_string()),
            some("host_capacity", config.host_capacity.to_string()),
            some("policy", policy.into()),
            some("workers", config.workers.to_string()),
            some("pin", switch(config.host_alloc.pin)),
            some("events", switch(self.events)),
        ];
        let disk = config.disk.clone().unwrap_or_else(|| DiskConfig::new("", 0));
        let on_disk = config.disk.is_some();
        out.extend([
            ("disk.dir".into(), on_disk.then(|| disk.dir.display().to_string())),
            ("disk.capacity".into(), on_disk.then(|| disk.capacity.to_string())),
            some("disk.queue_depth", disk.queue_depth.to_string()),
            some("disk.admit_after", disk.admit_after.to_string()),
            some("disk.sync_writes", switch(disk.sync_writes)),
        ]);
        let remote = config.remote.as_ref();
        let location = |url: bool| {
            remote.and_then(|r| match (&r.location, url) {
                (RemoteLocation::Url(u), true) => Some(u.clone()),
                (RemoteLocation::Path(p), false) => Some(p.display().to_string()),
                _ => None,
            })
        };
        // Without a remote tier its settings are unset: given alone they are an error.
        let set = |value: fn(&RemoteConfig) -> String| remote.map(value);
        out.extend([
            ("remote.url".into(), location(true)),
            ("remote.path".into(), location(false)),
            ("remote.namespace".into(), set(|r| r.namespace.clone())),
            ("remote.timeout_ms".into(), set(|r| millis(r.timeout))),
            ("remote.retry_after_ms".into(), set(|r| millis(r.retry_after))),
            ("remote.concurrency".into(), set(|r| r.concurrency.to_string())),
            ("remote.max_upload_bytes".into(), set(|r| r.max_upload_bytes.to_string())),
            ("remote.failures_to_open".into(), set(|r| r.failures_to_open.to_string())),
        ]);
        let client = remote.iter().flat_map(|r| &r.options);
        out.extend(client.map(|(k, v)| (format!("remote.{REMOTE_CLIENT_OPTION}{k}"), Some(v.clone()))));
        out
    }
}

fn unknown(key: &str) -> Error {
    Error::InvalidArgument(format!("unknown option {key:?}; known options: {KEYS}"))
}

/// The remote tier's settings, kept until its location and namespace are known.
struct RemoteDraft {
    location: Option<RemoteLocation>,
    namespace: Option<String>,
    config: RemoteConfig,
    /// The first remote option given, which the error names when no location is.
    first: Option<String>,
}

impl Default for RemoteDraft {
    fn default() -> Self {
        let config = RemoteConfig::new(RemoteLocation::Path(PathBuf::new()), "");
        RemoteDraft { location: None, namespace: None, config, first: None }
    }
}

impl RemoteDraft {
    fn apply(&mut self, s: &Setting, field: &str) -> Result<()> {
        self.first.get_or_insert_with(|| s.key.to_string());
        let config = &mut self.config;
        match field {
            "url" | "path" if s.value.is_empty() => {
                return Err(s.bad(if field == "url" { "a URL" } else { "a directory" }));
            }
            "url" | "path" if self.location.is_some() => {
                return Err(Error::InvalidArgument(
                    "options remote.url and remote.path name the remote tier's location: give one, once".into(),
                ));
            }
            "url" => self.location = Some(RemoteLocation::Url(s.value.to_string())),
            "path" => self.location = Some(RemoteLocation::Path(PathBuf::from(s.value))),
            "namespace" if s.value.is_empty() => return Err(s.bad("a namespace")),
            "namespace" => self.namespace = Some(s.value.to_string()),
            "timeout_ms" => config.timeout = s.millis()?,
            "retry_after_ms" => config.retry_after = s.millis()?,
            "concurrency" => config.concurrency = s.count()?,
            "max_upload_bytes" => config.max_upload_bytes = s.count()? as u64,
            "failures_to_open" => {
                config.failures_to_open = u32::try_from(s.count()?).map_err(|_| s.bad("a count below 2^32"))?
            }
            client if client.starts_with(REMOTE_CLIENT_OPTION) => {
                let name = &client[REMOTE_CLIENT_OPTION.len()..];
                if name.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "option {} names no client setting (remote.option.aws_endpoint, say)",
                        s.key
                    )));
                }
                config.options.retain(|(k, _)| k != name);
                config.options.push((name.to_string(), s.value.to_string()));
            }
            _ => return Err(unknown(s.key)),
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<RemoteConfig>> {
        match (self.location, self.namespace, self.first) {
            (Some(location), Some(namespace), _) => Ok(Some(RemoteConfig { location, namespace, ..self.config })),
            (Some(_), None, _) => Err(required("remote.namespace (with remote.url or remote.path)")),
            (None, _, Some(key)) => Err(required(&format!("remote.url or remote.path (with {key})"))),
            (None, _, None) => Ok(None),
        }
    }
}

impl RemoteConfig {
    /// The remote tier's settings from `remote.*` options without their prefix (`url`,
    /// `namespace`, `timeout_ms`, `option.aws_endpoint`...), as [`StoreOptions::parse`] takes
    /// them: for a client of the remote tier alone.
    pub fn from_options<'a>(options: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<RemoteConfig> {
        let options: Vec<(String, &str)> = options.into_iter().map(|(k, v)| (format!("remote.{k}"), v)).collect();
        let mut draft = RemoteDraft::default();
        for (key, value) in &options {
            draft.apply(&Setting { key, value }, &key["remote.".len()..])?;
        }
        draft.finish()?.ok_or_else(|| required("remote.url or remote.path"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(options: &[&str]) -> Result<StoreOptions> {
        StoreOptions::parse(options.iter().map(|o| o.split_once('=').unwrap()))
    }

    fn listed(options: &StoreOptions) -> Vec<(String, String)> {
        options.options().into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
    }

    #[test]
    fn what_options_lists_parse_takes_back_and_lists_again() {
        let custom = parse(&[
            "block_size=8192",
            "host_capacity=65536",
            "policy=arc",
            "events=on",
            "disk.dir=/nvme/kv",
            "disk.capacity=1048576",
            "remote.url=s3://kv/prefix",
            "remote.namespace=ns",
            "remote.option.aws_endpoint=http://minio:9000",
        ])
        .unwrap();
        for options in [parse(&["block_size=4096", "host_capacity=4096"]).unwrap(), custom] {
            let listed = listed(&options);
            let again = StoreOptions::parse(listed.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
            assert_eq!(self::listed(&again), listed);
        }
    }

    #[test]
    fn store_options_become_the_tier_config() {
        let parsed = parse(&[
            "block_size=8192",
            "host_capacity=65536",
            "policy=arc",
            "workers=3",
            "pin=off",
            "events=on",
            "disk.dir=/nvme/kv",
            "disk.capacity=1048576",
            "disk.queue_depth=8",
            "disk.admit_after=0",
            "disk.sync_writes=on",
        ])
        .unwrap();
        let config = parsed.config;
        assert!(parsed.events);
        assert_eq!((config.block_size, config.host_capacity, config.workers), (8192, 65536, 3));
        assert_eq!(config.policy, EvictionPolicy::Arc);
        assert!(!config.host_alloc.pin);
        let disk = config.disk.unwrap();
        assert_eq!(disk.dir, PathBuf::from("/nvme/kv"));
        assert_eq!((disk.capacity, disk.queue_depth, disk.admit_after, disk.sync_writes), (1 << 20, 8, 0, true));

        let plain = parse(&["block_size=4096", "host_capacity=4096"]).unwrap();
        assert!(plain.config.disk.is_none() && !plain.events);
        assert_eq!(plain.config.policy, EvictionPolicy::Lru);

        for bad in [
            &["host_capacity=4096"][..],
            &["block_size=4096"],
            &["block_size=4096", "host_capacity=4096", "disk.dir=/x"],
            &["block_size=4096", "host_capacity=4096", "disk.capacity=4096"],
            &["block_size=4096", "host_capacity=4096", "disk.dir="],
            &["block_size=-1", "host_capacity=4096"],
            &["block_size=4096", "host_capacity=0"],
            &["block_size=4096", "host_capacity=4096", "disk.queue_depth=0"],
            &["block_size=4096", "host_capacity=4096", "disk.admit_after=256"],
            &["block_size=4096", "host_capacity=4096", "policy=mru"],
            &["block_size=4096", "host_capacity=4096", "pin=sometimes"],
            &["block_size=4096", "host_capacity=4096", "disk.color=blue"],
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn remote_options_become_the_remote_config() {
        let base = ["block_size=4096", "host_capacity=4096"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        let parsed = with(&[
            "remote.url=s3://kv/prefix",
            "remote.namespace=llama-8b/bf16/16/rank0",
            "remote.timeout_ms=1500",
            "remote.retry_after_ms=700",
            "remote.concurrency=4",
            "remote.max_upload_bytes=1048576",
            "remote.failures_to_open=5",
            "remote.option.aws_endpoint=http://minio:9000",
            "remote.option.aws_allow_http=true",
        ])
        .unwrap();
        let remote = parsed.config.remote.unwrap();
        assert_eq!(remote.location, RemoteLocation::Url("s3://kv/prefix".into()));
        assert_eq!(remote.namespace, "llama-8b/bf16/16/rank0");
        assert_eq!(
            (remote.timeout, remote.retry_after, remote.concurrency, remote.max_upload_bytes, remote.failures_to_open),
            (Duration::from_millis(1500), Duration::from_millis(700), 4, 1 << 20, 5)
        );
        assert_eq!(
            remote.options,
            [("aws_endpoint".to_string(), "http://minio:9000".to_string()), ("aws_allow_http".into(), "true".into())]
        );

        let shared = with(&["remote.path=/mnt/kv", "remote.namespace=ns"]).unwrap().config.remote.unwrap();
        assert_eq!(shared.location, RemoteLocation::Path("/mnt/kv".into()));
        let defaults = RemoteConfig::new(RemoteLocation::Path("/mnt/kv".into()), "ns");
        assert_eq!((shared.timeout, shared.concurrency), (defaults.timeout, defaults.concurrency));
        assert!(shared.options.is_empty());
        assert!(parse(&base).unwrap().config.remote.is_none());
        let alone = RemoteConfig::from_options([("path", "/mnt/kv"), ("namespace", "ns"), ("concurrency", "3")]);
        assert_eq!(alone.unwrap().concurrency, 3);
        assert!(RemoteConfig::from_options([("namespace", "ns")]).is_err());

        for (bad, needle) in [
            (&["remote.path=/mnt/kv"][..], "remote.namespace"),
            (&["remote.namespace=ns"], "remote.url or remote.path"),
            (&["remote.concurrency=4"], "with remote.concurrency"),
            (&["remote.path=/a", "remote.url=s3://b/c", "remote.namespace=ns"], "give one"),
            (&["remote.url=", "remote.namespace=ns"], "a URL"),
            (&["remote.path=/a", "remote.namespace="], "a namespace"),
            (&["remote.path=/a", "remote.namespace=ns", "remote.timeout_ms=0"], "milliseconds"),
            (&["remote.path=/a", "remote.namespace=ns", "remote.concurrency=many"], "at least 1"),
            (&["remote.path=/a", "remote.namespace=ns", "remote.max_upload_bytes=-1"], "at least 1"),
            (&["remote.path=/a", "remote.namespace=ns", "remote.option.=x"], "names no client setting"),
            (&["remote.bucket=kv"], "unknown option"),
        ] {
            let e = with(bad).err().unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains(needle), "{bad:?}: {e}");
        }
    }
}
