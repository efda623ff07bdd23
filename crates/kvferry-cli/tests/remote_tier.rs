//! The remote tier from the command line: `kvferry bench tier --tier remote` against shared
//! directories, and what `kvferry info` says of it.

use std::process::{Command, Output};

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");
/// The variables that choose where an `s3://` store sends its requests; cleared for each test's
/// commands, so that the machine's own do not leak in.
const S3_PLACE_ENV: [&str; 5] =
    ["AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"];

fn kvferry(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KVFERRY);
    command.args(args);
    for name in S3_PLACE_ENV {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "kvferry failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Rows of the remote table: (op, block, concurrency, GB/s, raw GB/s).
fn remote_rows(table: &str) -> Vec<(String, String, String, f64, f64)> {
    table
        .lines()
        .filter(|line| line.starts_with("| remote |"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let number = |i: usize| cells[i].parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            (cells[1].to_string(), cells[2].to_string(), cells[3].to_string(), number(4), number(5))
        })
        .collect()
}

#[test]
fn bench_tier_remote_measures_puts_and_gets_next_to_the_raw_client() {
    let small = ["--block-sizes", "64K,256K", "--bytes", "1M", "--repeats", "1", "--concurrency", "4"];
    // The default location: a fresh directory of its own, removed afterwards.
    let table = stdout(&kvferry(&[&["bench", "tier", "--tier", "remote"][..], &small].concat(), &[]));
    assert!(table.contains("| tier | op | block | concurrency | GB/s | raw object_store GB/s | % of raw |"), "{table}");
    let rows = remote_rows(&table);
    let ops: Vec<(&str, &str)> = rows.iter().map(|(op, block, ..)| (op.as_str(), block.as_str())).collect();
    assert_eq!(ops, [("put", "64K"), ("get", "64K"), ("put", "256K"), ("get", "256K")], "{table}");
    for (_, _, concurrency, gbps, raw) in &rows {
        assert_eq!(concurrency, "4", "{table}");
        assert!(*gbps > 0.0 && *raw > 0.0, "{table}");
    }
    assert!(!table.contains("| host |") && !table.contains("| disk |"), "{table}");

    // A directory of the caller's: the bench's objects go, the directory and what it held stay.
    let dir = std::env::temp_dir().join(format!("kvferry-cli-remote-tier-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kept"), b"not the bench's").unwrap();
    let path = dir.to_str().unwrap();
    let out =
        kvferry(&[&["bench", "tier", "--tiers", "remote", "--remote-path", path, "--json"][..], &small].concat(), &[]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{json}");
    for row in rows {
        assert_eq!(row["tier"], "remote", "{row}");
        assert_eq!(row["concurrency"], 4, "{row}");
        assert!(row["gbps"].as_f64().unwrap() > 0.0 && row["raw_gbps"].as_f64().unwrap() > 0.0, "{row}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["kept"], "the bench left objects in {}", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_tier_remote_refuses_what_it_cannot_use() {
    for (args, needle) in [
        (&["--tiers", "remote", "--remote-url", "ftp://host/kv"][..], "ftp"),
        (&["--tiers", "host", "--remote-path", "/tmp/x"], "--tiers remote"),
        (&["--tiers", "remote", "--concurrency", "0"], "--concurrency"),
        (&["--tiers", "remote", "--remote-path", "/proc/no-such-dir"], "/proc/no-such-dir"),
    ] {
        let out = kvferry(&[&["bench", "tier"][..], args].concat(), &[]);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

fn remote_detail(env: &[(&str, &str)]) -> (String, String) {
    let text = stdout(&kvferry(&["info", "--json"], env));
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tiers = info["tiers"].as_array().unwrap();
    let remote = tiers.iter().find(|t| t["name"] == "remote").unwrap_or_else(|| panic!("no remote tier: {info}"));
    assert_eq!(remote["available"], true, "{remote}");
    (remote["detail"].as_str().unwrap().to_string(), text)
}

#[test]
fn info_names_the_remote_back_ends_and_the_endpoint_from_the_environment() {
    let (plain, _) = remote_detail(&[]);
    assert_eq!(plain, "S3-compatible object storage (s3://), shared directory (path or file://)");

    let (detail, text) = remote_detail(&[
        ("AWS_ENDPOINT_URL", "http://kvuser-in-url:password-in-url@minio.local:9000/?token=query-secret"),
        ("AWS_REGION", "eu-west-3"),
        ("AWS_ACCESS_KEY_ID", "AKIAKEYNEVERSHOWN"),
        ("AWS_SECRET_ACCESS_KEY", "secret-never-shown"),
    ]);
    assert!(detail.contains("endpoint http://minio.local:9000, region eu-west-3"), "{detail}");
    for secret in ["password-in-url", "query-secret", "AKIAKEYNEVERSHOWN", "secret-never-shown", "kvuser-in-url"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    // A region alone: AWS's own endpoint for it. The S3-specific endpoint wins over the generic one.
    let (detail, _) = remote_detail(&[("AWS_DEFAULT_REGION", "ap-south-1")]);
    assert!(detail.ends_with("endpoint https://s3.ap-south-1.amazonaws.com, region ap-south-1"), "{detail}");
    let (detail, _) =
        remote_detail(&[("AWS_ENDPOINT", "http://generic:9000"), ("AWS_ENDPOINT_URL_S3", "https://s3.internal")]);
    assert!(detail.contains("endpoint https://s3.internal, region us-east-1 (the default)"), "{detail}");

    // The text form lists it with the other tiers.
    let text = stdout(&kvferry(&["info"], &[]));
    assert!(text.lines().any(|l| l.trim_start().starts_with("remote") && l.contains("yes")), "{text}");
}
