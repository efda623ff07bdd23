//! Two hosts on one machine: a `kvferry serve` in one network namespace, `kvferry bench
//! --role initiator --check` in another, joined by a veth pair shaped with `tc` (a token bucket),
//! so the bytes cross a real network link between two network stacks. Over the TCP transport
//! and, with the `fabric` feature, libfabric's `tcp` provider. Needs root for `ip netns`: skips,
//! saying why, where namespaces cannot be made.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");
const SECRET: &str = "the two-host tests' cluster secret";

/// A pair of namespaces joined by a shaped veth pair, removed when dropped.
struct Link {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

impl Link {
    /// `None` (with the reason printed) where this machine cannot make namespaces.
    fn new(tag: &str, rate: &str) -> Option<Link> {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let link = Link { a: format!("kvt-a{id}"), b: format!("kvt-b{id}") };
        match ip(&["netns", "add", &link.a]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                println!("skipped: ip netns add failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                return None;
            }
            Err(e) => {
                println!("skipped: no ip command: {e}");
                return None;
            }
        }
        let (va, vb) = (format!("kvva{id}"), format!("kvvb{id}"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &link.b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &link.a],
            vec!["link", "set", &vb, "netns", &link.b],
            vec!["-n", &link.a, "addr", "add", "10.79.0.1/24", "dev", &va],
            vec!["-n", &link.b, "addr", "add", "10.79.0.2/24", "dev", &vb],
            vec!["-n", &link.a, "link", "set", "lo", "up"],
            vec!["-n", &link.b, "link", "set", "lo", "up"],
            vec!["-n", &link.a, "link", "set", &va, "up"],
            vec!["-n", &link.b, "link", "set", &vb, "up"],
        ];
        for step in steps {
            let out = ip(&step).unwrap();
            assert!(out.status.success(), "ip {step:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        for (ns, dev) in [(&link.a, &va), (&link.b, &vb)] {
            let shaped = Command::new("tc")
                .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb"])
                .args(["latency", "20ms"])
                .output();
            match shaped {
                Ok(out) if out.status.success() => {}
                other => println!("the link is not shaped (tc: {other:?}); it runs at the veth's speed"),
            }
        }
        Some(link)
    }

    fn in_ns(&self, ns: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, KVFERRY]).env(kvferry::auth::SECRET_ENV, SECRET);
        command
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Removing a namespace removes its end of the veth pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serve in namespace `a`, then read and write every block size across the link from `b`, each
/// byte checked by the initiator.
fn moves_across(transport: &[&str]) {
    let Some(link) = Link::new(&transport.len().to_string(), "2gbit") else { return };
    let mut served = link
        .in_ns(&link.a)
        .args(["serve", "--buffer-size", "16M", "--fill-seed", "5", "--listen", "10.79.0.1:7201"])
        .args(transport)
        .stdout(Stdio::piped())
        .spawn()
        .expect("kvferry serve starts in its namespace");
    let mut line = String::new();
    BufReader::new(served.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _served = Killed(served);
    assert!(line.contains("buffer_addr"), "serve did not start: {line:?}");
    for op in ["read", "write"] {
        let started = Instant::now();
        let out = link
            .in_ns(&link.b)
            .args(["bench", "--role", "initiator", "--peer", "10.79.0.1:7201", "--op", op, "--check", "--json"])
            .args(["--block-sizes", "4K,1M", "--batch-sizes", "1,8", "--min-iters", "3", "--max-iters", "20"])
            .args(transport)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{transport:?} {op} across the link failed: {stderr}");
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 4, "{transport:?} {op}: {rows:?}");
        for row in &rows {
            assert!(row["gbps"].as_f64().unwrap() > 0.0, "{row}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{op} took {:?}", started.elapsed());
    }
}

#[test]
fn the_tcp_transport_moves_checked_blocks_between_two_network_namespaces() {
    moves_across(&["--transport", "tcp"]);
}

#[cfg(feature = "fabric")]
#[test]
fn the_fabric_tcp_provider_moves_checked_blocks_between_two_network_namespaces() {
    moves_across(&["--transport", "fabric", "--provider", "tcp"]);
}
