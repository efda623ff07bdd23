//! `kvferry info`: the devices, transports and tiers this build can use on this machine.

use std::fmt::Write as _;
use std::io::Write as _;

use kvferry::memory::host::{self, HostAllocOptions, HostBuffer};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use serde_json::json;

/// The variables that choose where an `s3://` remote tier sends its requests.
const S3_PLACE_ENV: [&str; 5] =
    ["AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"];

/// How many devices a GPU back end sees: `None` when not compiled in, else the count or why none.
type DeviceCount = Option<Result<u32, String>>;

fn cuda_devices() -> DeviceCount {
    #[cfg(feature = "cuda")]
    return Some(kvferry::memory::cuda::device_count().map_err(|e| e.to_string()));
    #[cfg(not(feature = "cuda"))]
    None
}

fn rocm_devices() -> DeviceCount {
    #[cfg(feature = "rocm")]
    return Some(kvferry::memory::rocm::device_count().map_err(|e| e.to_string()));
    #[cfg(not(feature = "rocm"))]
    None
}

/// A GPU back end's line: present and how many devices, compiled in but unusable and why, or not
/// in this build and which cargo feature brings it.
fn gpu(name: &str, devices: DeviceCount, what: &str) -> serde_json::Value {
    let feature = name.split('-').next().unwrap_or(name);
    let (available, detail) = match devices {
        Some(Ok(n)) => (true, format!("{what}: {n} device(s)")),
        Some(Err(why)) => (false, format!("{what}: compiled in; {why}")),
        None => (false, format!("{what}: not in this build (cargo feature `{feature}`)")),
    };
    json!({ "name": name, "available": available, "detail": detail })
}

/// Whether the shm transport can run here, and which of its ways the kernel allows.
fn shm_report() -> serde_json::Value {
    let boot_id = match kvferry::transport::host::boot_id() {
        Ok(id) => id,
        Err(e) => return json!({ "name": "shm", "available": false, "detail": format!("no boot id: {e}") }),
    };
    let mapped = match HostBuffer::alloc(4096, &HostAllocOptions::new().with_pin(false).with_shareable(true)) {
        Ok(_) => "shared mappings (memfd + SCM_RIGHTS): yes".to_string(),
        Err(e) => format!("shared mappings: no ({e})"),
    };
    // Yama's ptrace_scope decides whether process_vm_readv reaches a peer that is not our child.
    let cross = match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_string()) {
        Err(_) => "cross-memory attach: yes (no Yama ptrace restriction)".to_string(),
        Ok(scope) if scope == "0" => "cross-memory attach: yes (Yama ptrace_scope 0)".to_string(),
        Ok(scope) => {
            format!("cross-memory attach: only into child processes (Yama ptrace_scope {scope}), TCP otherwise")
        }
    };
    json!({
        "name": "shm",
        "available": true,
        "detail": format!("same-host peers (boot id {boot_id}); {mapped}; {cross}"),
    })
}

pub fn run(as_json: bool) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memlock = host::memlock_limit();
    let huge = host::huge_pages_free();
    let cuda = cuda_devices();
    let (fabric, fabric_providers) = fabric_report();
    let report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "devices": [
            {
                "name": "host",
                "available": true,
                "detail": format!(
                    "{cpus} CPUs, page size {} B, huge pages free: {}, memlock limit: {}",
                    host::page_size(),
                    huge.map_or("none".to_string(), |b| format!("{b} B")),
                    memlock.map_or("unlimited".to_string(), |b| format!("{b} B")),
                ),
            },
            gpu("cuda", cuda.clone(), "CUDA devices"),
            gpu("rocm", rocm_devices(), "ROCm devices"),
        ],
        "transports": [
            { "name": "tcp", "available": true, "detail": "TCP streams between any two hosts (zero-copy readv/writev; device memory staged through pinned host buffers)" },
            shm_report(),
            gpu("cuda-ipc", cuda, "CUDA IPC between processes on this host"),
            fabric,
            optional("verbs", cfg!(feature = "verbs"), "ibverbs RDMA"),
        ],
        "tiers": [
            { "name": "host", "available": true, "detail": "pinned DRAM arena (tier store)" },
            {
                "name": "disk",
                "available": true,
                "detail": match kvferry::tier::io_uring_available() {
                    Ok(()) => "NVMe through io_uring, O_DIRECT".to_string(),
                    Err(why) => format!("pread/pwrite, one block at a time (io_uring: {why})"),
                },
            },
            remote_report(),
        ],
        "observability": [
            { "name": "metrics", "available": true, "detail": "Prometheus text format (--metrics ADDR on serve and bench)" },
            built_in("etcd", cfg!(feature = "etcd"), "cluster discovery through etcd (serve --etcd URL)"),
            built_in("kv-events", cfg!(feature = "kv-events"), "tier store events over ZMQ in vLLM's KV event format"),
        ],
        "fabric_providers": fabric_providers,
        "security": security_report(),
        "agent_options": agent_options_report(),
    });
    let text = match as_json {
        true => serde_json::to_string_pretty(&report)? + "\n",
        false => text_report(&report)?,
    };
    // A reader that stops early (`kvferry info | head`) ends the output, not the command with an
    // error: the process keeps SIGPIPE ignored, which its sockets need.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn text_report(report: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "kvferry {}", report["version"].as_str().unwrap_or_default())?;
    for section in ["devices", "transports", "tiers", "observability"] {
        writeln!(out, "{section}:")?;
        for item in report[section].as_array().into_iter().flatten() {
            let mark = if item["available"].as_bool() == Some(true) { "yes" } else { "no " };
            writeln!(
                out,
                "  {:<9} {mark}  {}",
                item["name"].as_str().unwrap_or_default(),
                item["detail"].as_str().unwrap_or_default()
            )?;
        }
    }
    writeln!(out, "security:")?;
    for item in report["security"].as_array().into_iter().flatten() {
        writeln!(out, "  {:<34} {}", item["name"].as_str().unwrap_or_default(), item["value"])?;
    }
    writeln!(out, "agent options (defaults; set with --set KEY=VALUE, C key=value options, Python options=):")?;
    for item in report["agent_options"].as_array().into_iter().flatten() {
        let value = item["value"].as_str().unwrap_or("(unset)");
        writeln!(out, "  {:<34} {value}", item["name"].as_str().unwrap_or_default())?;
    }
    let providers = report["fabric_providers"].as_array().into_iter().flatten();
    for (i, p) in providers.enumerate() {
        if i == 0 {
            writeln!(out, "fabric providers:")?;
        }
        writeln!(
            out,
            "  {:<14} fabric {:<16} domain {:<10} caps {:<28} mr_mode {}",
            p["provider"].as_str().unwrap_or_default(),
            p["fabric"].as_str().unwrap_or_default(),
            p["domain"].as_str().unwrap_or_default(),
            json_list(&p["caps"]),
            json_list(&p["mr_mode"]),
        )?;
    }
    Ok(out)
}

/// The remote tier's line: its back ends, and where an `s3://` store would send its requests when
/// the environment says, read the way the store's client reads it (credentials are never shown,
/// nor user info or a query in the endpoint URL).
fn remote_report() -> serde_json::Value {
    let mut detail = "S3-compatible object storage (s3://), shared directory (path or file://)".to_string();
    if S3_PLACE_ENV.iter().any(|name| std::env::var_os(name).is_some()) {
        let s3 = AmazonS3Builder::from_env();
        let region = s3.get_config_value(&AmazonS3ConfigKey::Region);
        // The client prefers the S3-specific endpoint, and without one addresses AWS's own.
        let endpoint = s3
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| s3.get_config_value(&AmazonS3ConfigKey::Endpoint))
            .map(|e| redacted_url(&e))
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", region.as_deref().unwrap_or("us-east-1")));
        let region = region.unwrap_or_else(|| "us-east-1 (the default)".to_string());
        detail.push_str(&format!("; s3:// from the environment: endpoint {endpoint}, region {region}"));
    }
    json!({ "name": "remote", "available": true, "detail": detail })
}

/// `url` without user name, password or query, which may carry secrets.
fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            // Only URLs that cannot have user info refuse these, and they have none to hide.
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "(set, but not a URL)".to_string(),
    }
}

/// How agents started here would authenticate their peers (from the environment, as `serve` and
/// `bench` read it).
fn security_report() -> serde_json::Value {
    let auth = match kvferry::Auth::resolve(&kvferry::AuthConfig::FromEnv) {
        Ok(auth) if auth.enabled() => format!("cluster secret ({})", auth.source()),
        Ok(_) => "disabled (KVFERRY_AUTH=none): anyone who reaches a port is a peer".to_string(),
        Err(e) => format!("misconfigured: {e}"),
    };
    json!([
        { "name": "authentication", "value": auth },
        { "name": "tls", "value": "supported (rustls, ring; TLS 1.2 and 1.3) on the side channel and the TCP transport; \
            off unless configured (serve/bench --tls-cert --tls-key --tls-ca, C `tls.*` options, Python tls_* \
            arguments): without it the bytes after the handshake travel in the clear" },
    ])
}

/// Every agent option with its default, from the parser the C ABI, Python and `--set` share (the
/// limits on what peers can make an agent spend among them); `null` for one unset by default.
fn agent_options_report() -> serde_json::Value {
    let options = kvferry::AgentConfig::new("defaults").options();
    serde_json::Value::Array(options.into_iter().map(|(key, value)| json!({ "name": key, "value": value })).collect())
}

fn json_list(v: &serde_json::Value) -> String {
    let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect();
    if items.is_empty() { "-".into() } else { items.join(",") }
}

/// A feature that works wherever it is compiled in; one that is not says which cargo feature brings it.
fn built_in(feature: &str, enabled: bool, what: &str) -> serde_json::Value {
    match enabled {
        true => json!({ "name": feature, "available": true, "detail": what }),
        false => optional(feature, false, what),
    }
}

/// A back end other than a GPU's: whether this build carries it; one not compiled in says which
/// cargo feature brings it.
fn optional(feature: &str, enabled: bool, what: &str) -> serde_json::Value {
    json!({
        "name": feature,
        "available": false,
        "detail": if enabled {
            format!("{what}: compiled in, not yet able to run on this machine")
        } else {
            format!("{what}: not in this build (cargo feature `{feature}`)")
        },
    })
}

/// The fabric transport's line, usable when libfabric lists at least one provider for it, and every
/// libfabric provider entry it can use (none without the feature).
#[cfg(feature = "fabric")]
fn fabric_report() -> (serde_json::Value, serde_json::Value) {
    use kvferry::transport::fabric;
    let unavailable = |detail: String| (json!({ "name": "fabric", "available": false, "detail": detail }), json!([]));
    // Opened here, not at start: a missing libfabric is reported, not a failure to start.
    let lib = match fabric::libfabric() {
        Ok(lib) => lib,
        Err(e) => return unavailable(e.to_string()),
    };
    let list = match fabric::providers() {
        Ok(list) => list,
        Err(e) => return unavailable(format!("libfabric: {e}")),
    };
    let version = format!("libfabric {}.{} ({})", lib.major, lib.minor, lib.library);
    let entry = if list.is_empty() {
        json!({ "name": "fabric", "available": false, "detail": format!("{version} lists no RDM provider with RMA here") })
    } else {
        let mut names: Vec<&str> = list.iter().map(|p| p.provider.as_str()).collect();
        names.dedup();
        json!({ "name": "fabric", "available": true, "detail": format!("{version} RDMA; providers: {}", names.join(", ")) })
    };
    let providers = list
        .iter()
        .map(|p| json!({ "provider": p.provider, "fabric": p.fabric, "domain": p.domain, "caps": p.caps, "mr_mode": p.mr_mode }))
        .collect();
    (entry, providers)
}

#[cfg(not(feature = "fabric"))]
fn fabric_report() -> (serde_json::Value, serde_json::Value) {
    (optional("fabric", false, "libfabric RDMA"), json!([]))
}
