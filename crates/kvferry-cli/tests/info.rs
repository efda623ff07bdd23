//! `kvferry info`: every agent option with its default, and output into a pipe closed early ends
//! the command the way a closed pipe ends any other, not in a panic.

use std::io::Read;
use std::process::{Command, Stdio};

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");

#[test]
fn info_lists_the_agent_options_the_parser_takes() {
    let out = Command::new(KVFERRY).args(["info", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> =
        report["agent_options"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    let keys: Vec<String> = kvferry::AgentConfig::new("defaults").options().into_iter().map(|(k, _)| k).collect();
    assert_eq!(listed, keys);
    for key in ["tcp.streams", "shm.max_connections", "side_channel.request_bytes", "max_peers"] {
        assert!(listed.contains(&key), "{key}");
    }
}

#[test]
fn a_pipe_closed_early_ends_info_without_a_panic() {
    let mut child = Command::new(KVFERRY).arg("info").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Closed before the command writes its first line.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
