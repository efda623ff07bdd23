//! libfabric is opened when the fabric transport starts, not before; each case runs in a child
//! process (this test binary, started again with `KVFERRY_FABRIC_LOAD_CHILD`), since a process
//! opens libfabric at most once.
#![cfg(feature = "fabric")]

use std::process::Command;

use kvferry_core::transport::fabric::{self, FabricConfig};
use kvferry_core::{Agent, AgentConfig, ErrorCode};

const CHILD_ENV: &str = "KVFERRY_FABRIC_LOAD_CHILD";
const MISSING: &str = "/nonexistent/libfabric.so.1";

/// libfabric and what Debian's brings with it (psm's libinfinipath replaces SIGTERM's and
/// SIGSEGV's handlers with one that calls `exit` inside the handler).
const FABRIC_LIBRARIES: [&str; 4] = ["libfabric", "libinfinipath", "libpsm", "libefa"];

fn mapped() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap()
}

fn assert_no_fabric_library(when: &str) {
    let maps = mapped();
    for library in FABRIC_LIBRARIES {
        assert!(!maps.contains(library), "{library} is mapped {when}:\n{maps}");
    }
}

fn handlers() -> Vec<usize> {
    [libc::SIGTERM, libc::SIGINT, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGABRT]
        .map(|signal| {
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::sigaction(signal, std::ptr::null(), &mut action) }, 0);
            action.sa_sigaction
        })
        .to_vec()
}

fn tcp_only(name: &str) -> Agent {
    Agent::new(AgentConfig { shm: None, ..AgentConfig::new(name) }).unwrap()
}

fn fabric_config(name: &str) -> AgentConfig {
    let fabric = FabricConfig { provider: Some("tcp".into()), ..FabricConfig::default() };
    AgentConfig { tcp: None, shm: None, fabric: Some(fabric), ..AgentConfig::new(name) }
}

fn run_child(mode: &str, env: &[(&str, &str)]) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_entry", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, mode)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child {mode}: {:?}\n{text}", out.status);
    assert!(text.contains("1 passed"), "child {mode} ran its case:\n{text}");
}

#[test]
fn libfabric_is_mapped_only_once_the_fabric_transport_starts_and_keeps_the_signal_handlers() {
    run_child("tcp-then-fabric", &[]);
}

#[test]
fn a_missing_libfabric_is_a_typed_error_when_the_fabric_transport_starts() {
    run_child("missing", &[(fabric::LIBRARY_ENV, MISSING)]);
}

/// What a child process does, chosen by `KVFERRY_FABRIC_LOAD_CHILD`.
#[test]
#[ignore = "the entry point of the child processes the tests above start"]
fn child_process_entry() {
    match std::env::var(CHILD_ENV).expect("run only as a child").as_str() {
        "tcp-then-fabric" => {
            let _tcp = tcp_only("tcp-only");
            assert_no_fabric_library("in a process whose agent has no fabric transport");
            let before = handlers();
            let _fabric = Agent::new(fabric_config("fabric")).unwrap();
            assert!(mapped().contains("libfabric.so"), "the fabric transport runs on libfabric");
            assert_eq!(handlers(), before, "starting the fabric transport changed the signal handlers");
        }
        "missing" => {
            let _tcp = tcp_only("tcp-only");
            for attempt in 0..2 {
                let e = Agent::new(fabric_config("fabric")).err().expect("no libfabric, no fabric transport");
                assert_eq!(e.code(), ErrorCode::FabricNoProvider, "attempt {attempt}: {e}");
                let text = e.to_string();
                assert!(text.contains("could not be loaded") && text.contains(MISSING), "attempt {attempt}: {text}");
            }
            let e = fabric::providers().unwrap_err();
            assert_eq!(e.code(), ErrorCode::FabricNoProvider, "{e}");
            assert_no_fabric_library("after libfabric failed to load");
        }
        other => panic!("unknown child mode {other}"),
    }
}
