//! `kvferry gpu-bench` as a user runs it: with host memory it measures every part it can here; with
//! a GPU device that cannot be opened it says why and exits cleanly.

use std::process::Command;

fn gpu_bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvferry")).arg("gpu-bench").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn host_device_rows_cover_batched_copies_and_staged_tcp() {
    let (ok, out) =
        gpu_bench(&["--device", "host", "--block-sizes", "64K", "--blocks", "8", "--min-time", "0.01", "--json"]);
    assert!(ok, "{out}");
    let json_start = out.find('[').expect("a JSON array of rows");
    let rows: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let rows = rows.as_array().unwrap();
    let parts: Vec<&str> = rows.iter().map(|r| r["part"].as_str().unwrap()).collect();
    assert_eq!(parts, ["copy", "copy", "staging"], "{out}");
    for r in rows {
        assert_eq!(r["block_size"], 65536);
        assert!(r["gbps"].as_f64().unwrap() > 0.0 && r["reference_gbps"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn a_gpu_that_cannot_be_opened_is_skipped_with_the_reason() {
    for device in ["cuda:0", "rocm:0"] {
        let (ok, out) = gpu_bench(&["--device", device, "--block-sizes", "64K", "--blocks", "4", "--min-time", "0.01"]);
        assert!(ok, "{out}");
        // Either the device is here and rows were measured, or the skip names the cause.
        assert!(out.contains("skipping GPU benchmarks: no ") || out.contains("GB/s"), "{out}");
    }
}

#[test]
fn an_unknown_device_is_an_error() {
    let (ok, out) = gpu_bench(&["--device", "tpu:0"]);
    assert!(!ok);
    assert!(out.contains("unknown device `tpu:0`"), "{out}");
}
