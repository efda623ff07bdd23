//! `kvferry info`: the devices and transports this build can use on this machine.

use kvferry::memory::host;
use serde_json::json;

pub fn run(as_json: bool) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memlock = host::memlock_limit();
    let huge = host::huge_pages_free();
    // Each optional back end reports whether this build carries it; one not compiled in says which
    // cargo feature brings it.
    let optional = |feature: &str, enabled: bool, what: &str| {
        json!({
            "name": feature,
            "available": false,
            "detail": if enabled {
                format!("{what}: compiled in, not yet able to run on this machine")
            } else {
                format!("{what}: not in this build (cargo feature `{feature}`)")
            },
        })
    };
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
            optional("cuda", cfg!(feature = "cuda"), "CUDA devices"),
            optional("rocm", cfg!(feature = "rocm"), "ROCm devices"),
        ],
        "transports": [
            { "name": "tcp", "available": true, "detail": "TCP streams between any two hosts (zero-copy readv/writev)" },
            fabric_entry(&optional),
            optional("verbs", cfg!(feature = "verbs"), "ibverbs RDMA"),
        ],
    });
    let mut report = report;
    report["fabric_providers"] = fabric_providers();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("kvferry {}", report["version"].as_str().unwrap_or_default());
    for section in ["devices", "transports"] {
        println!("{section}:");
        for item in report[section].as_array().into_iter().flatten() {
            let mark = if item["available"].as_bool() == Some(true) { "yes" } else { "no " };
            println!(
                "  {:<8} {mark}  {}",
                item["name"].as_str().unwrap_or_default(),
                item["detail"].as_str().unwrap_or_default()
            );
        }
    }
    for p in report["fabric_providers"].as_array().into_iter().flatten() {
        println!(
            "  fabric provider {:<14} fabric {:<16} domain {:<10} caps {:<28} mr_mode {}",
            p["provider"].as_str().unwrap_or_default(),
            p["fabric"].as_str().unwrap_or_default(),
            p["domain"].as_str().unwrap_or_default(),
            json_list(&p["caps"]),
            json_list(&p["mr_mode"]),
        );
    }
    Ok(())
}

fn json_list(v: &serde_json::Value) -> String {
    let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect();
    if items.is_empty() { "-".into() } else { items.join(",") }
}

/// The fabric transport's line: usable when libfabric lists at least one provider for it.
#[cfg(feature = "fabric")]
fn fabric_entry(_optional: &dyn Fn(&str, bool, &str) -> serde_json::Value) -> serde_json::Value {
    match kvferry::transport::fabric::providers() {
        Ok(list) if !list.is_empty() => {
            let mut names: Vec<&str> = list.iter().map(|p| p.provider.as_str()).collect();
            names.dedup();
            json!({ "name": "fabric", "available": true, "detail": format!("libfabric RDMA; providers: {}", names.join(", ")) })
        }
        Ok(_) => {
            json!({ "name": "fabric", "available": false, "detail": "libfabric lists no RDM provider with RMA here" })
        }
        Err(e) => json!({ "name": "fabric", "available": false, "detail": format!("libfabric: {e}") }),
    }
}

#[cfg(not(feature = "fabric"))]
fn fabric_entry(optional: &dyn Fn(&str, bool, &str) -> serde_json::Value) -> serde_json::Value {
    optional("fabric", false, "libfabric RDMA")
}

/// Every libfabric provider entry the fabric transport can use (empty without the feature).
fn fabric_providers() -> serde_json::Value {
    #[cfg(feature = "fabric")]
    if let Ok(list) = kvferry::transport::fabric::providers() {
        return list
            .iter()
            .map(|p| json!({ "provider": p.provider, "fabric": p.fabric, "domain": p.domain, "caps": p.caps, "mr_mode": p.mr_mode }))
            .collect();
    }
    json!([])
}
