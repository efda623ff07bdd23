//! `kvferry info`: the devices, transports and tiers this build can use on this machine.

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
            optional("fabric", cfg!(feature = "fabric"), "libfabric RDMA"),
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
        ],
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("kvferry {}", report["version"].as_str().unwrap_or_default());
    for section in ["devices", "transports", "tiers"] {
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
    Ok(())
}
