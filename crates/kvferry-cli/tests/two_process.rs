//! Two real OS processes: `kvferry serve` hosts a buffer, this test's agent (or `kvferry bench`)
//! moves blocks in and out of it over TCP, or over shared memory (a mapped memfd, or cross-memory
//! attach into the server's plain memory).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::metadata::AgentMetadata;
use kvferry::{
    Agent, AgentConfig, AuthConfig, Deadline, ErrorCode, LocalDescs, MemKind, MemRegion, RemoteDescs, TransportKind,
};
use kvferry_cli::pattern;

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");
/// The cluster secret every process of these tests shares.
const SECRET: &str = "the two-process tests' cluster secret";

/// The `kvferry` binary, given the tests' secret.
fn kvferry() -> Command {
    let mut command = Command::new(KVFERRY);
    command.env(kvferry::auth::SECRET_ENV, SECRET);
    command
}

fn test_config(name: impl Into<String>) -> AgentConfig {
    AgentConfig { auth: AuthConfig::Secret(SECRET.into()), ..AgentConfig::new(name) }
}

fn test_auth() -> kvferry::Auth {
    kvferry::Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap()
}

/// A `kvferry serve` child, killed when dropped.
struct Served {
    child: Child,
    side_channel: String,
    buffer_addr: u64,
    buffer_size: u64,
}

impl Served {
    fn start(buffer_size: &str, fill_seed: u64) -> Served {
        Served::start_with(buffer_size, fill_seed, &[])
    }

    /// `extra` adds `kvferry serve` flags (`--transport fabric --provider shm`).
    fn start_with(buffer_size: &str, fill_seed: u64, extra: &[&str]) -> Served {
        let mut child = kvferry()
            .args(["serve", "--buffer-size", buffer_size, "--fill-seed", &fill_seed.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("kvferry serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let addr = info["buffer_addr"].as_str().unwrap().trim_start_matches("0x");
        Served {
            child,
            side_channel: info["side_channel"].as_str().unwrap().to_string(),
            buffer_addr: u64::from_str_radix(addr, 16).unwrap(),
            buffer_size: info["buffer_size"].as_u64().unwrap(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn region(&self, offset: u64, len: u64) -> MemRegion {
        MemRegion { addr: self.buffer_addr + offset, len, kind: MemKind::Host }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP-only agent: the tests of the TCP transport must not be served by shm on this host.
fn initiator(name: &str, len: usize) -> (Agent, Arc<HostBuffer>, kvferry::Registration) {
    initiator_with(AgentConfig { shm: None, ..test_config(name) }, len)
}

fn initiator_with(config: AgentConfig, len: usize) -> (Agent, Arc<HostBuffer>, kvferry::Registration) {
    let agent = Agent::new(config).unwrap();
    let buf = Arc::new(HostBuffer::alloc(len, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    let reg = agent.register(buf.clone()).unwrap();
    (agent, buf, reg)
}

/// Every block of the local buffer and of the served one, prepared.
fn block_lists(agent: &Agent, peer: &str, buf: &HostBuffer, served: &Served, block: u64) -> (LocalDescs, RemoteDescs) {
    let local: Vec<MemRegion> = (0..buf.len() as u64 / block)
        .map(|i| MemRegion::host(unsafe { buf.as_ptr().add((i * block) as usize) }, block as usize))
        .collect();
    let remote: Vec<MemRegion> = (0..served.buffer_size / block).map(|i| served.region(i * block, block)).collect();
    (agent.prepare_local(&local).unwrap(), agent.prepare_remote(peer, &remote).unwrap())
}

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

#[test]
fn blocks_move_both_ways_between_processes_byte_exact() {
    let served = Served::start("8M", 11);
    let (agent, buf, _reg) = initiator("two-process", BLOCK as usize * BLOCKS);
    moves_blocks_both_ways(&served, &agent, &buf);
}

const BLOCK: u64 = 64 * 1024;
const BLOCKS: usize = 64;

/// Scattered READs checked against the pattern `served` was filled with (seed 11), then a WRITE
/// read back. `buf` holds `BLOCKS` blocks.
fn moves_blocks_both_ways(served: &Served, agent: &Agent, buf: &HostBuffer) {
    const N: usize = BLOCKS;
    let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
    let (local, remote) = block_lists(agent, &peer, buf, served, BLOCK);

    // READ: local block i ← remote block 2i + 1, checked against the pattern the server wrote.
    let picks: Vec<usize> = (0..N).map(|i| 2 * i + 1).collect();
    let all: Vec<usize> = (0..N).collect();
    agent.read(&local, &all, &remote, &picks, soon()).unwrap().wait().unwrap();
    let got = buf.to_vec();
    for (i, &r) in picks.iter().enumerate() {
        let block = &got[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert_eq!(pattern::first_mismatch(block, 11, r as u64 * BLOCK), None, "block {i} ← {r}");
    }

    // WRITE a new pattern into remote blocks 0..N, then read it back into the local buffer.
    pattern::fill(unsafe { buf.as_mut_slice() }, 99, 0);
    agent.write(&local, &all, &remote, &all, soon()).unwrap().wait().unwrap();
    buf.fill(0);
    agent.read(&local, &all, &remote, &all, soon()).unwrap().wait().unwrap();
    assert_eq!(pattern::first_mismatch(&buf.to_vec(), 99, 0), None);
}

#[test]
fn killing_the_target_mid_transfer_fails_fast_and_the_agent_moves_on() {
    let len: u64 = 1 << 30;
    let (agent, buf, _reg) = initiator("killer", len as usize);
    let local = agent.prepare_local(&[buf.region()]).unwrap();
    let mut victim = Served::start("1G", 1);
    let peer = agent.connect_peer(&victim.side_channel, soon()).unwrap();
    let remote = agent.prepare_remote(&peer, &[victim.region(0, len)]).unwrap();
    // Warm the connections so the kill lands during the data, not the handshake.
    let small = agent.prepare_remote(&peer, &[victim.region(0, 4096)]).unwrap();
    let small_local = agent.prepare_local(&[MemRegion::host(buf.as_ptr(), 4096)]).unwrap();
    agent.read(&small_local, &[0], &small, &[0], soon()).unwrap().wait().unwrap();

    let deadline = Duration::from_secs(60);
    let xfer = agent.read(&local, &[0], &remote, &[0], Deadline::after(deadline)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let killed_at = Instant::now();
    victim.kill();
    let err = xfer.wait().expect_err("1 GiB cannot cross loopback in 30 ms");
    let took = killed_at.elapsed();
    assert!(matches!(err.code(), ErrorCode::PeerDisconnected | ErrorCode::PeerUnreachable), "unexpected error: {err}");
    assert!(err.to_string().contains(&peer), "the error names the peer: {err}");
    assert!(took < Duration::from_secs(5), "failed {took:?} after the kill; deadline was {deadline:?}");

    // The same agent keeps working with another peer.
    let other = Served::start("4M", 5);
    let peer2 = agent.connect_peer(&other.side_channel, soon()).unwrap();
    let remote2 = agent.prepare_remote(&peer2, &[other.region(0, 4096)]).unwrap();
    agent.read(&small_local, &[0], &remote2, &[0], soon()).unwrap().wait().unwrap();
    assert_eq!(pattern::first_mismatch(&buf.to_vec()[..4096], 5, 0), None);
}

#[test]
fn the_target_process_rejects_forged_descriptors_and_keeps_serving() {
    let served = Served::start("1M", 3);
    let (agent, buf, _reg) = initiator("forger", 4096);
    rejects_forged_descriptors(&served, &agent, &buf);
}

/// Metadata forged to claim more memory, then to carry a key the target never issued: typed
/// rejections, nothing written, honest requests still served. `served` was filled with seed 3.
fn rejects_forged_descriptors(served: &Served, agent: &Agent, buf: &HostBuffer) {
    let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
    let local = agent.prepare_local(&[MemRegion::host(buf.as_ptr(), 4096)]).unwrap();
    let honest = agent.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();

    let mut md = AgentMetadata::decode(
        &kvferry::side_channel::exchange(&test_auth(), &served.side_channel, None, soon()).unwrap(),
    )
    .unwrap();
    md.name = "forged".into();
    md.regions[0].region.len *= 4; // claims memory beyond the registration
    agent.add_peer(&md.encode()).unwrap();
    let beyond = agent.prepare_remote("forged", &[served.region(served.buffer_size, 4096)]).unwrap();
    let e = agent.read(&local, &[0], &beyond, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{e}");

    // Every key the region has (the one for this agent's transport among them) is one the target never issued.
    for (_, key) in &mut md.regions[0].keys {
        key[3] ^= 0x5a;
    }
    md.generation += 1;
    agent.add_peer(&md.encode()).unwrap();
    let forged = agent.prepare_remote("forged", &[served.region(0, 4096)]).unwrap();
    let e = agent.write(&local, &[0], &forged, &[0], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");

    // The forged write changed nothing and honest requests are still served.
    agent.read(&local, &[0], &honest, &[0], soon()).unwrap().wait().unwrap();
    assert_eq!(pattern::first_mismatch(&buf.to_vec(), 3, 0), None);
}

fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = kvferry().arg("bench").args(args).args(["--json", "--min-time", "0.01"]).output().unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

#[test]
fn bench_initiator_checks_every_byte_against_a_serve_process() {
    let served = Served::start("4M", 0);
    let rows = bench_json(&[
        "--role",
        "initiator",
        "--peer",
        &served.side_channel,
        "--block-sizes",
        "4K,64K",
        "--batch-sizes",
        "1,16",
        "--check",
    ]);
    assert_eq!(rows.len(), 2 * 2 * 2);
    for r in &rows {
        assert_eq!(r["transport"], "tcp");
        assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["lat_p99_us"].as_f64().unwrap() >= r["lat_p50_us"].as_f64().unwrap(), "{r}");
        assert_eq!(r["wire_ops"], r["batch"], "bench blocks must not coalesce: {r}");
        assert_eq!(
            r["bytes_per_transfer"].as_u64().unwrap(),
            r["block_size"].as_u64().unwrap() * r["batch"].as_u64().unwrap()
        );
    }
}

#[test]
fn bench_loopback_default_sweeps_and_skips_what_exceeds_max_transfer() {
    let rows =
        bench_json(&["--block-sizes", "16K,1M", "--batch-sizes", "1,64", "--max-transfer", "16M", "--op", "read"]);
    let combos: Vec<(u64, u64)> =
        rows.iter().map(|r| (r["block_size"].as_u64().unwrap(), r["batch"].as_u64().unwrap())).collect();
    assert_eq!(combos, vec![(16384, 1), (16384, 64), (1 << 20, 1)]);
    assert!(rows.iter().all(|r| r["op"] == "read"));
}

#[test]
fn bench_rejects_bad_flags_with_a_clear_message() {
    for (args, needle) in [
        (&["--block-sizes", "12Q"][..], "unknown unit"),
        (&["--transport", "carrier-pigeon"][..], "not available in this build"),
        (&["--role", "initiator"][..], "--peer"),
    ] {
        let out = kvferry().arg("bench").args(args).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `kvferry info --json`.
fn info_json() -> serde_json::Value {
    let out = kvferry().args(["info", "--json"]).output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn info_lists_host_and_tcp() {
    let v = info_json();
    let names = |k: &str| {
        v[k].as_array().unwrap().iter().map(|d| (d["name"].clone(), d["available"].clone())).collect::<Vec<_>>()
    };
    assert!(names("devices").contains(&("host".into(), true.into())));
    assert!(names("transports").contains(&("tcp".into(), true.into())));
    assert!(names("tiers").contains(&("disk".into(), true.into())));
    assert!(names("tiers").contains(&("remote".into(), true.into())));
}

#[test]
fn info_says_where_the_cluster_secret_comes_from() {
    let auth = |env: &[(&str, &str)]| {
        let mut command = Command::new(KVFERRY);
        command.args(["info", "--json"]).env_remove(kvferry::auth::SECRET_ENV);
        for (k, v) in env {
            command.env(k, v);
        }
        let v: serde_json::Value = serde_json::from_slice(&command.output().unwrap().stdout).unwrap();
        v["security"][0]["value"].as_str().unwrap().to_string()
    };
    assert!(auth(&[(kvferry::auth::SECRET_ENV, SECRET)]).contains("KVFERRY_SECRET"));
    assert!(auth(&[]).contains("random secret of this process"));
    assert!(auth(&[(kvferry::auth::AUTH_ENV, "none")]).starts_with("disabled"));
    assert!(auth(&[(kvferry::auth::SECRET_ENV, "short")]).starts_with("misconfigured"));
}

#[test]
fn bench_tier_measures_both_tiers_and_checks_the_bytes() {
    let dir = std::env::temp_dir().join(format!("kvferry-bench-tier-{}", std::process::id()));
    let args = [
        "bench",
        "tier",
        "--dir",
        dir.to_str().unwrap(),
        "--bytes",
        "2M",
        "--block-sizes",
        "64K,256K",
        "--queue-depths",
        "1,4",
        "--repeats",
        "1",
        "--disk-batch",
        "8",
        "--json",
    ];
    let out = kvferry().args(args).output().unwrap();
    assert!(out.status.success(), "bench tier failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone();
    // Per block size: host put and get, then put and get at each queue depth.
    assert_eq!(rows.len(), 2 * (2 + 2 * 2), "{rows:?}");
    for row in &rows {
        assert!(row["gbps"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["memcpy_gbps"].is_null(), row["tier"] == "disk", "{row}");
    }
    assert!(!dir.exists(), "the bench left its directory behind");
    let out = kvferry().args(["bench", "tier", "--dir", "/proc/no-such-dir", "--bytes", "1M"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk tier"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `memory` of the server → the mode shm reports.
const SHM_MODES: [(&str, &str); 2] = [("shared", "mapped"), ("private", "cross-memory")];

fn shm_initiator(name: &str, len: usize) -> (Agent, Arc<HostBuffer>, kvferry::Registration) {
    initiator_with(test_config(name), len)
}

/// An initiator whose buffer is a memfd when the server's is (`memory` "shared"): the server
/// then copies its WRITEs through a mapping of that file.
fn shm_initiator_like(name: &str, len: usize, memory: &str) -> (Agent, Arc<HostBuffer>, kvferry::Registration) {
    let agent = Agent::new(test_config(name)).unwrap();
    let options = HostAllocOptions { pin: false, shareable: memory == "shared", ..Default::default() };
    let buf = Arc::new(HostBuffer::alloc(len, &options).unwrap());
    assert_eq!(buf.share_fd().is_some(), memory == "shared");
    let reg = agent.register(buf.clone()).unwrap();
    (agent, buf, reg)
}

fn shm_blocks_move_both_ways(memory: &str, mode: &str) {
    const BLOCK: u64 = 16 * 1024;
    const N: usize = 64;
    let served = Served::start_with("4M", 21, &["--memory", memory]);
    let (agent, buf, _reg) = shm_initiator_like("shm-two-process", BLOCK as usize * N, memory);
    let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
    assert_eq!(agent.peer_transport(&peer), Some(TransportKind::Shm));
    let (local, remote) = block_lists(&agent, &peer, &buf, &served, BLOCK);

    // READ: local block i ← remote block 3i + 2, checked against the pattern the server wrote.
    let picks: Vec<usize> = (0..N).map(|i| 3 * i + 2).collect();
    let all: Vec<usize> = (0..N).collect();
    let xfer = agent.read(&local, &all, &remote, &picks, soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Shm, Some(mode)));
    let got = buf.to_vec();
    for (i, &r) in picks.iter().enumerate() {
        let block = &got[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert_eq!(pattern::first_mismatch(block, 21, r as u64 * BLOCK), None, "block {i} ← {r}");
    }

    // WRITE a new pattern into remote blocks N-1..0 (reversed), then read it back in order.
    pattern::fill(unsafe { buf.as_mut_slice() }, 77, 0);
    let reversed: Vec<usize> = all.iter().rev().copied().collect();
    let xfer = agent.write(&local, &all, &remote, &reversed, soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.mode(), Some(mode));
    buf.fill(0);
    agent.read(&local, &reversed, &remote, &all, soon()).unwrap().wait().unwrap();
    assert_eq!(pattern::first_mismatch(&buf.to_vec(), 77, 0), None);
}

#[test]
fn shm_mapped_blocks_move_both_ways_between_processes_byte_exact() {
    shm_blocks_move_both_ways("shared", "mapped");
}

#[test]
fn shm_cross_memory_blocks_move_both_ways_between_processes_byte_exact() {
    shm_blocks_move_both_ways("private", "cross-memory");
}

#[test]
fn shm_killing_the_target_mid_transfer_fails_within_the_deadline() {
    let len: u64 = 256 << 20;
    for (memory, mode) in SHM_MODES {
        let (agent, buf, _reg) = shm_initiator("shm-killer", len as usize);
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let mut victim = Served::start_with("256M", 1, &["--memory", memory]);
        let peer = agent.connect_peer(&victim.side_channel, soon()).unwrap();
        let remote = agent.prepare_remote(&peer, &[victim.region(0, len)]).unwrap();
        // Map (or probe) first, so the kill lands during the data.
        let warm = agent.read(&local, &[0], &remote, &[0], soon()).unwrap();
        warm.wait().unwrap();
        assert_eq!(warm.mode(), Some(mode));

        let deadline = Duration::from_secs(60);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            victim.kill();
            Instant::now()
        });
        // Transfers back to back until one fails: the one in flight when the server dies (a shared
        // mapping stays valid, so only the window's release can notice).
        let err = loop {
            match agent.read(&local, &[0], &remote, &[0], Deadline::after(deadline)).unwrap().wait() {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        let failed_at = Instant::now();
        let killed_at = killer.join().unwrap();
        let took = failed_at.saturating_duration_since(killed_at);
        assert!(
            matches!(err.code(), ErrorCode::PeerDisconnected | ErrorCode::PeerUnreachable),
            "{memory}: unexpected error: {err}"
        );
        assert!(err.to_string().contains(&peer), "the error names the peer: {err}");
        assert!(took < Duration::from_secs(5), "{memory}: failed {took:?} after the kill; deadline was {deadline:?}");
    }
}

#[test]
fn shm_a_read_that_failed_at_its_deadline_lands_nothing_when_the_stopped_owner_resumes() {
    let len: u64 = 1 << 20;
    for (memory, _) in SHM_MODES {
        let (agent, buf, _reg) = shm_initiator("shm-stopped-owner", 2 * len as usize);
        buf.write_at(0, &vec![0x5A; 2 * len as usize]).unwrap();
        let served = Served::start_with("1M", 9, &["--memory", memory]);
        let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
        let remote = agent.prepare_remote(&peer, &[served.region(0, len)]).unwrap();
        let first = agent.prepare_local(&[MemRegion { len, ..buf.region() }]).unwrap();
        // Stopped before the read asks for its grant: the read waits on the owner's answer.
        let stop = Command::new("kill").args(["-STOP", &served.child.id().to_string()]).status().unwrap();
        assert!(stop.success());
        let stopped = agent.read(&first, &[0], &remote, &[0], Deadline::after(Duration::from_millis(500))).unwrap();
        let e = stopped.wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::Timeout, "{memory}: {e}");
        let resume = Command::new("kill").args(["-CONT", &served.child.id().to_string()]).status().unwrap();
        assert!(resume.success());
        // A second read on the same link runs after whatever the first one still had to do.
        let second_region = MemRegion { addr: buf.region().addr + len, len, kind: MemKind::Host };
        let second = agent.prepare_local(&[second_region]).unwrap();
        agent.read(&second, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
        let bytes = buf.to_vec();
        assert_eq!(pattern::first_mismatch(&bytes[len as usize..], 9, 0), None, "{memory}: the second read");
        assert!(bytes[..len as usize].iter().all(|&b| b == 0x5A), "{memory}: bytes landed after the read failed");
    }
}

#[test]
fn shm_target_process_rejects_unregistered_ranges_and_forged_keys() {
    for (memory, mode) in SHM_MODES {
        let served = Served::start_with("1M", 3, &["--memory", memory]);
        let (agent, buf, _reg) = shm_initiator("shm-forger", 8192);
        buf.fill(0xee);
        let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let honest = agent.prepare_remote(&peer, &[served.region(0, 8192)]).unwrap();

        let mut md = AgentMetadata::decode(
            &kvferry::side_channel::exchange(&test_auth(), &served.side_channel, None, soon()).unwrap(),
        )
        .unwrap();
        md.name = "forged".into();
        md.regions[0].region.len *= 4; // claims memory beyond the registration
        agent.add_peer(&md.encode()).unwrap();
        assert_eq!(agent.peer_transport("forged"), Some(TransportKind::Shm));
        let straddling = agent.prepare_remote("forged", &[served.region(served.buffer_size - 4096, 8192)]).unwrap();
        let e = agent.write(&local, &[0], &straddling, &[0], soon()).unwrap().wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{memory}: {e}");

        let key = md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Shm).unwrap();
        key.1[5] ^= 0x5a; // a key the server never issued
        md.generation += 1;
        agent.add_peer(&md.encode()).unwrap();
        let forged = agent.prepare_remote("forged", &[served.region(0, 8192)]).unwrap();
        let e = agent.write(&local, &[0], &forged, &[0], soon()).unwrap().wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{memory}: {e}");

        // Neither write changed a byte, and honest requests are still served.
        let tail = agent.prepare_remote(&peer, &[served.region(served.buffer_size - 8192, 8192)]).unwrap();
        for (remote, offset) in [(&honest, 0), (&tail, served.buffer_size - 8192)] {
            let xfer = agent.read(&local, &[0], remote, &[0], soon()).unwrap();
            xfer.wait().unwrap();
            assert_eq!(xfer.mode(), Some(mode));
            assert_eq!(pattern::first_mismatch(&buf.to_vec(), 3, offset), None, "{memory}: offset {offset}");
        }
    }
}

#[test]
fn bench_over_shm_checks_every_byte_and_reports_the_mode() {
    for (memory, mode) in SHM_MODES {
        let served = Served::start_with("4M", 0, &["--memory", memory]);
        let rows = bench_json(&[
            "--transport",
            "shm",
            "--role",
            "initiator",
            "--peer",
            &served.side_channel,
            "--block-sizes",
            "16K",
            "--batch-sizes",
            "1,64",
            "--check",
        ]);
        assert_eq!(rows.len(), 2 * 2);
        for r in &rows {
            assert_eq!(r["transport"], "shm");
            assert_eq!(r["path"], format!("shm/{mode}"), "{r}");
            assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
}

#[test]
fn info_reports_the_shm_transport() {
    let out = kvferry().args(["info", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shm = v["transports"].as_array().unwrap().iter().find(|t| t["name"] == "shm").expect("shm listed").clone();
    assert_eq!(shm["available"], true, "{shm}");
    let detail = shm["detail"].as_str().unwrap();
    assert!(detail.contains("shared mappings") && detail.contains("cross-memory attach"), "{detail}");
}

/// The same process pairs over libfabric's `tcp` (RDM over TCP) and `shm` providers.
#[cfg(feature = "fabric")]
mod fabric {
    use kvferry::transport::fabric::FabricConfig;

    use super::*;

    fn config(name: &str, provider: &str) -> AgentConfig {
        let fabric = FabricConfig { provider: Some(provider.into()), ..FabricConfig::default() };
        AgentConfig { tcp: None, shm: None, fabric: Some(fabric), ..test_config(name) }
    }

    #[test]
    fn info_lists_the_libfabric_providers_and_their_memory_registration_modes() {
        let out = kvferry().args(["info", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let providers = v["fabric_providers"].as_array().expect("a provider list");
        let named =
            |name: &str| providers.iter().find(|p| p["provider"] == name).unwrap_or_else(|| panic!("{name} in {v}"));
        assert!(named("shm")["mr_mode"].as_array().unwrap().iter().any(|m| m == "virt_addr"), "{v}");
        for name in ["tcp;ofi_rxm", "shm"] {
            let caps = named(name)["caps"].as_array().unwrap();
            assert!(caps.iter().any(|c| c == "rma") && caps.iter().any(|c| c == "msg"), "{name}: {caps:?}");
        }
        let fabric = v["transports"].as_array().unwrap().iter().find(|t| t["name"] == "fabric").unwrap();
        assert_eq!(fabric["available"], true, "{fabric}");
    }

    /// Libraries libfabric brings with it on Debian (psm's libinfinipath replaces SIGTERM's and
    /// SIGSEGV's handlers with one that calls `exit` inside the handler).
    const FABRIC_LIBRARIES: [&str; 4] = ["libfabric", "libinfinipath", "libpsm", "libefa"];

    #[test]
    fn the_binary_does_not_link_libfabric() {
        // The dynamic linker lists what it would load for the binary, and exits.
        let out = Command::new(KVFERRY).env("LD_TRACE_LOADED_OBJECTS", "1").output().unwrap();
        let loaded = String::from_utf8_lossy(&out.stdout);
        assert!(loaded.contains("libc.so.6"), "{loaded}");
        for library in FABRIC_LIBRARIES {
            assert!(!loaded.contains(library), "{library} is a dependency:\n{loaded}");
        }
    }

    /// The libraries mapped into a running process, and the signals it catches (`SigCgt`).
    fn mapped_and_caught(pid: u32) -> (String, String) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caught = status.lines().find(|l| l.starts_with("SigCgt:")).unwrap().to_string();
        (maps, caught)
    }

    #[test]
    fn libfabric_is_mapped_only_where_the_fabric_transport_runs_and_keeps_the_signal_handlers() {
        let tcp = Served::start("1M", 1);
        let (maps, tcp_caught) = mapped_and_caught(tcp.child.id());
        for library in FABRIC_LIBRARIES {
            assert!(!maps.contains(library), "{library} is mapped into a TCP-only serve:\n{maps}");
        }
        let fabric = serve("1M", 1, "tcp");
        let (maps, fabric_caught) = mapped_and_caught(fabric.child.id());
        assert!(maps.contains("libfabric.so"), "the fabric serve has libfabric:\n{maps}");
        assert_eq!(fabric_caught, tcp_caught, "loading libfabric changed which signals the process catches");
    }

    #[test]
    fn a_missing_libfabric_is_reported_by_info_and_refused_by_serve() {
        let missing = "/nonexistent/libfabric.so.1";
        let out = kvferry().args(["info", "--json"]).env(kvferry::transport::fabric::LIBRARY_ENV, missing).output();
        let out = out.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let fabric = v["transports"].as_array().unwrap().iter().find(|t| t["name"] == "fabric").unwrap();
        assert_eq!(fabric["available"], false, "{fabric}");
        let detail = fabric["detail"].as_str().unwrap();
        assert!(detail.contains("could not be loaded") && detail.contains(missing), "{detail}");
        assert_eq!(v["fabric_providers"], serde_json::json!([]), "{v}");

        let out = kvferry()
            .args(["serve", "--buffer-size", "1M", "--transport", "fabric", "--provider", "tcp"])
            .env(kvferry::transport::fabric::LIBRARY_ENV, missing)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.status.code().is_some(), "{:?}: {stderr}", out.status);
        assert!(stderr.contains("could not be loaded") && stderr.contains(missing), "{stderr}");
    }

    fn serve(buffer_size: &str, fill_seed: u64, provider: &str) -> Served {
        Served::start_with(buffer_size, fill_seed, &["--transport", "fabric", "--provider", provider])
    }

    fn blocks_move_both_ways(provider: &str) {
        let served = serve("8M", 11, provider);
        let name = format!("fabric-{provider}");
        let (agent, buf, _reg) = initiator_with(config(&name, provider), BLOCK as usize * BLOCKS);
        moves_blocks_both_ways(&served, &agent, &buf);
    }

    #[test]
    fn fabric_tcp_blocks_move_both_ways_between_processes_byte_exact() {
        blocks_move_both_ways("tcp");
    }

    #[test]
    fn fabric_shm_blocks_move_both_ways_between_processes_byte_exact() {
        blocks_move_both_ways("shm");
    }

    /// An agent of another cluster that holds a served process's metadata (handed over by a member)
    /// gets nothing over the fabric: its first transfer fails as unauthenticated, and the target's
    /// memory is as it was.
    fn another_secret(provider: &str) {
        let served = serve("1M", 13, provider);
        let (member, buf, _reg) = initiator_with(config(&format!("member-{provider}"), provider), 4096);
        let peer = member.connect_peer(&served.side_channel, soon()).unwrap();
        let metadata = member.peer_metadata(&peer).unwrap().encode();
        let foreign = AgentConfig {
            auth: AuthConfig::Secret(b"another secret of 32 bytes......".to_vec()),
            ..config(&format!("foreign-{provider}"), provider)
        };
        let (stranger, sbuf, _sreg) = initiator_with(foreign, 4096);
        sbuf.write_at(0, &[0xee; 4096]).unwrap();
        let speer = stranger.add_peer(&metadata).unwrap();
        let local = stranger.prepare_local(&[sbuf.region()]).unwrap();
        let remote = stranger.prepare_remote(&speer, &[served.region(0, 4096)]).unwrap();
        let e = stranger.write(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unauthenticated, "{provider}: {e}");
        let e = stranger.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unauthenticated, "{provider}: {e}");
        assert_eq!(sbuf.to_vec(), vec![0xee; 4096], "{provider}: the refused read wrote here");
        let local = member.prepare_local(&[buf.region()]).unwrap();
        let remote = member.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();
        member.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec(), 13, 0), None, "{provider}: the target's memory changed");
    }

    #[test]
    fn fabric_tcp_target_process_refuses_an_agent_with_another_secret() {
        another_secret("tcp");
    }

    #[test]
    fn fabric_shm_target_process_refuses_an_agent_with_another_secret() {
        another_secret("shm");
    }

    /// kill -9 of the target during a 1 GiB read ends the read by its deadline: with a typed error
    /// naming the peer, or, where `may_finish` (shm: the kernel copies between the processes and
    /// keeps a dying process's memory until the copy ends), with every byte in place. A transfer
    /// to the dead peer then fails by its deadline, and the agent works with another peer.
    fn killed_target(provider: &str, may_finish: bool, deadline: Duration, within: Duration) {
        let len: u64 = 1 << 30;
        let (agent, buf, _reg) = initiator_with(config(&format!("killer-{provider}"), provider), len as usize);
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let mut victim = serve("1G", 1, provider);
        let peer = agent.connect_peer(&victim.side_channel, soon()).unwrap();
        let remote = agent.prepare_remote(&peer, &[victim.region(0, len)]).unwrap();
        // Warm the connection so the kill lands during the data, not the handshake.
        let small = agent.prepare_remote(&peer, &[victim.region(0, 4096)]).unwrap();
        let small_local = agent.prepare_local(&[MemRegion::host(buf.as_ptr(), 4096)]).unwrap();
        agent.read(&small_local, &[0], &small, &[0], soon()).unwrap().wait().unwrap();

        let xfer = agent.read(&local, &[0], &remote, &[0], Deadline::after(deadline)).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let killed_at = Instant::now();
        victim.kill();
        let outcome = xfer.wait();
        let took = killed_at.elapsed();
        eprintln!("{provider}: {outcome:?} ({took:?} after the kill)");
        assert!(took < within, "{provider}: ended {took:?} after the kill; deadline was {deadline:?}");
        let dead = [ErrorCode::PeerDisconnected, ErrorCode::PeerUnreachable, ErrorCode::Timeout];
        match outcome {
            Err(err) => {
                assert!(dead.contains(&err.code()), "{provider}: unexpected error: {err}");
                assert!(err.to_string().contains(&peer), "the error names the peer: {err}");
            }
            Ok(()) if may_finish => assert_eq!(pattern::first_mismatch(&buf.to_vec(), 1, 0), None, "{provider}"),
            Ok(()) => panic!("{provider}: 1 GiB cannot cross in 30 ms"),
        }
        let started = Instant::now();
        let err = agent.read(&small_local, &[0], &small, &[0], Deadline::after(Duration::from_secs(2))).unwrap().wait();
        let err = err.expect_err("the peer is dead");
        assert!(dead.contains(&err.code()), "{provider}: unexpected error: {err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{provider}: {:?}", started.elapsed());

        let other = serve("4M", 5, provider);
        let peer2 = agent.connect_peer(&other.side_channel, soon()).unwrap();
        let remote2 = agent.prepare_remote(&peer2, &[other.region(0, 4096)]).unwrap();
        agent.read(&small_local, &[0], &remote2, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec()[..4096], 5, 0), None, "{provider}");
    }

    #[test]
    fn fabric_tcp_target_process_rejects_forged_descriptors_and_keeps_serving() {
        let served = serve("1M", 3, "tcp");
        let (agent, buf, _reg) = initiator_with(config("forger-tcp", "tcp"), 4096);
        rejects_forged_descriptors(&served, &agent, &buf);
    }

    #[test]
    fn fabric_shm_target_process_rejects_forged_descriptors_and_keeps_serving() {
        let served = serve("1M", 3, "shm");
        let (agent, buf, _reg) = initiator_with(config("forger-shm", "shm"), 4096);
        rejects_forged_descriptors(&served, &agent, &buf);
    }

    #[test]
    fn fabric_tcp_killing_the_target_mid_transfer_fails_fast_and_the_agent_moves_on() {
        // The provider sees the connection drop: the error comes long before the deadline.
        killed_target("tcp", false, Duration::from_secs(60), Duration::from_secs(5));
    }

    #[test]
    fn fabric_shm_killing_the_target_mid_transfer_ends_by_the_deadline_and_the_agent_moves_on() {
        // shm has no connection to lose: work queued to a dead process ends at its deadline.
        killed_target("shm", true, Duration::from_secs(10), Duration::from_secs(12));
    }
}

/// The body of `GET /metrics` from a kvferry metrics endpoint.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: kvferry\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    reply.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of one series (`name{labels}`) in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_scraped_after_a_bench_count_the_bytes_it_moved() {
    let served = Served::start("4M", 0);
    let mut bench = kvferry()
        .args(["bench", "--role", "initiator", "--peer", &served.side_channel])
        .args(["--block-sizes", "4K,64K", "--batch-sizes", "1,16", "--min-time", "0.01", "--json"])
        .args(["--metrics", "127.0.0.1:0", "--linger", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(bench.stderr.take().unwrap());
    let addr = stderr
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split_once("metrics at http://").map(|(_, rest)| rest.trim_end_matches("/metrics").to_string()))
        .expect("the bench says where its metrics are");
    // The rows are one JSON array; the bench lingers after printing it.
    let mut json = String::new();
    let mut stdout = BufReader::new(bench.stdout.take().unwrap());
    let rows = loop {
        assert!(stdout.read_line(&mut json).unwrap() > 0, "the bench ended without its rows: {json}");
        if let Ok(serde_json::Value::Array(rows)) = serde_json::from_str(&json) {
            break rows;
        }
    };
    let text = scrape(&addr);
    let _ = bench.kill();
    let _ = bench.wait();
    for op in ["read", "write"] {
        let rows: Vec<_> = rows.iter().filter(|r| r["op"] == op).collect();
        assert_eq!(rows.len(), 4);
        // Each row moves one untimed warm-up transfer, then `iterations` timed ones.
        let transfers: u64 = rows.iter().map(|r| r["iterations"].as_u64().unwrap() + 1).sum();
        let bytes: u64 = rows
            .iter()
            .map(|r| (r["iterations"].as_u64().unwrap() + 1) * r["bytes_per_transfer"].as_u64().unwrap())
            .sum();
        let labels = format!("{{transport=\"tcp\",direction=\"{op}\"}}");
        assert_eq!(sample(&text, &format!("kvferry_transfer_bytes_total{labels}")), Some(bytes as f64), "{text}");
        assert_eq!(sample(&text, &format!("kvferry_transfers_total{labels}")), Some(transfers as f64), "{text}");
        assert_eq!(sample(&text, &format!("kvferry_transfer_duration_seconds_count{labels}")), Some(transfers as f64));
        assert_eq!(sample(&text, &format!("kvferry_transfers_in_flight{labels}")), Some(0.0));
    }
    assert!(!text.contains("kvferry_transfer_errors_total{"), "no transfer failed: {text}");
}

#[test]
fn info_reports_metrics_and_the_observability_features_of_this_build() {
    let v = info_json();
    let available = |name: &str| {
        let items = v["observability"].as_array().unwrap();
        items.iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("no {name}: {v}"))["available"].clone()
    };
    assert_eq!(available("metrics"), true);
    assert_eq!(available("etcd"), cfg!(feature = "etcd"));
    assert_eq!(available("kv-events"), cfg!(feature = "kv-events"));
}

/// Discovery through a real etcd (Debian's `etcd-server`), started by each test on loopback.
#[cfg(feature = "etcd")]
mod etcd {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use kvferry::discovery::{EtcdConfig, EtcdDiscovery};

    use super::*;

    /// An etcd process with its own data directory and free ports, killed and removed when dropped.
    struct Etcd {
        child: Child,
        url: String,
        dir: PathBuf,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    impl Etcd {
        /// `None` (saying why) where etcd is not installed: `scripts/test.sh` installs it and
        /// checks that it is there, so these tests cannot skip in CI.
        fn start(test: &str) -> Option<Etcd> {
            let binary = std::env::var("KVFERRY_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into());
            if !std::path::Path::new(&binary).exists() {
                eprintln!("skipping {test}: no etcd at {binary} (apt-get install etcd-server, or set KVFERRY_ETCD)");
                return None;
            }
            let (client, peer) = (free_port(), free_port());
            let dir = std::env::temp_dir().join(format!("kvferry-etcd-{}-{client}", std::process::id()));
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&binary)
                .args(["--name", "kvferry-test", "--data-dir", dir.to_str().unwrap()])
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("kvferry-test={peer_url}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd starts");
            let etcd = Etcd { child, url, dir };
            let ready = Instant::now() + Duration::from_secs(30);
            while etcd.post("/v3/kv/range", r#"{"key":"AA=="}"#).is_none() {
                assert!(Instant::now() < ready, "etcd did not answer within 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(etcd)
        }

        /// The body of a successful POST to the v3 JSON gateway.
        fn post(&self, path: &str, body: &str) -> Option<String> {
            let mut stream = TcpStream::connect(self.url.trim_start_matches("http://")).ok()?;
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).ok()?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).ok()?;
            reply.starts_with("HTTP/1.1 200").then(|| reply.split_once("\r\n\r\n").unwrap().1.to_string())
        }

        fn put(&self, key: &str, value: &[u8]) {
            let body = format!(r#"{{"key":"{}","value":"{}"}}"#, BASE64.encode(key), BASE64.encode(value));
            self.post("/v3/kv/put", &body).expect("put");
        }

        fn exists(&self, key: &str) -> bool {
            self.get(key).is_some()
        }

        /// The raw value under `key`, as etcd holds it.
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            let reply = self.post("/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, BASE64.encode(key))).expect("range");
            let reply: serde_json::Value = serde_json::from_str(&reply).expect("etcd answers JSON");
            let value = reply["kvs"].get(0)?["value"].as_str()?.to_string();
            Some(BASE64.decode(value).expect("etcd values are base64"))
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const PREFIX: &str = "kvferry-test/agents/";

    /// A `kvferry serve` publishing itself in `etcd` as `name` with a 2 s lease.
    fn serve_in(etcd: &Etcd, name: &str, buffer_size: &str) -> Served {
        let args = ["--name", name, "--etcd", &etcd.url, "--etcd-prefix", PREFIX, "--etcd-ttl", "2"];
        Served::start_with(buffer_size, 7, &args)
    }

    fn join(agent: &Agent, etcd: &Etcd) -> EtcdDiscovery {
        let config = EtcdConfig::new(vec![etcd.url.clone()], PREFIX).with_lease_ttl(Duration::from_secs(2));
        EtcdDiscovery::join(agent, config).unwrap()
    }

    fn signal(served: &Served, signal: &str) {
        let status = Command::new("kill").args([signal, &served.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    #[test]
    fn etcd_agents_in_two_processes_find_each_other_and_transfer() {
        let Some(etcd) = Etcd::start("etcd_agents_in_two_processes_find_each_other_and_transfer") else { return };
        let served = serve_in(&etcd, "etcd-target", "8M");
        let (agent, buf, _reg) = initiator("etcd-initiator", 64 * 1024);
        let discovery = join(&agent, &etcd);
        assert!(etcd.exists(&format!("{PREFIX}etcd-initiator")), "the initiator is published too");
        assert_eq!(discovery.peers().unwrap(), vec!["etcd-target".to_string()]);
        let peer = discovery.lookup("etcd-target").unwrap();
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let remote = agent.prepare_remote(&peer, &[served.region(64 * 1024, 64 * 1024)]).unwrap();
        agent.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec(), 7, 64 * 1024), None);

        // Leaving revokes the lease: the key goes at once, not when the lease would expire.
        drop(discovery);
        assert!(!etcd.exists(&format!("{PREFIX}etcd-initiator")));
    }

    #[test]
    fn etcd_a_killed_process_loses_its_key_when_its_lease_expires() {
        let Some(etcd) = Etcd::start("etcd_a_killed_process_loses_its_key_when_its_lease_expires") else { return };
        let mut served = serve_in(&etcd, "etcd-doomed", "1M");
        let key = format!("{PREFIX}etcd-doomed");
        assert!(etcd.exists(&key));
        served.kill();
        let killed = Instant::now();
        // SIGKILL leaves no chance to revoke: only the lease's expiry (2 s TTL) removes the key.
        assert!(etcd.exists(&key), "the key outlives the process until its lease expires");
        while etcd.exists(&key) {
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "the key is still there {:?} after the kill",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn etcd_a_hung_peer_fails_its_pending_transfer_when_its_key_vanishes() {
        let Some(etcd) = Etcd::start("etcd_a_hung_peer_fails_its_pending_transfer_when_its_key_vanishes") else {
            return;
        };
        let len: u64 = 256 << 20;
        let served = serve_in(&etcd, "etcd-hung", "256M");
        let (agent, buf, _reg) = initiator("etcd-waiter", len as usize);
        let discovery = join(&agent, &etcd);
        let peer = discovery.lookup("etcd-hung").unwrap();
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let remote = agent.prepare_remote(&peer, &[served.region(0, len)]).unwrap();
        let small = agent.prepare_local(&[MemRegion::host(buf.as_ptr(), 4096)]).unwrap();
        let small_remote = agent.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();
        agent.read(&small, &[0], &small_remote, &[0], soon()).unwrap().wait().unwrap();

        // A stopped process keeps its sockets open: TCP alone would wait for the deadline.
        signal(&served, "-STOP");
        let stopped = Instant::now();
        let deadline = Duration::from_secs(60);
        let xfer = agent.read(&local, &[0], &remote, &[0], Deadline::after(deadline)).unwrap();
        let err = xfer.wait().expect_err("a stopped target cannot serve 256 MiB");
        let took = stopped.elapsed();
        assert_eq!(err.code(), ErrorCode::PeerDisconnected, "{err}");
        assert!(err.to_string().contains("etcd key"), "the error says why: {err}");
        assert!(took < Duration::from_secs(10), "failed {took:?} after the stop; the deadline was {deadline:?}");
        assert!(!etcd.exists(&format!("{PREFIX}etcd-hung")));
        assert!(!agent.peers().contains(&peer), "the gone peer is removed");

        // Woken up, it finds its lease expired, takes a new one and publishes again: it can be
        // looked up and used once more.
        signal(&served, "-CONT");
        let resumed = Instant::now();
        while !etcd.exists(&format!("{PREFIX}etcd-hung")) {
            assert!(resumed.elapsed() < Duration::from_secs(10), "the woken process did not publish again");
            std::thread::sleep(Duration::from_millis(100));
        }
        let peer = discovery.lookup("etcd-hung").unwrap();
        let small_remote = agent.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();
        agent.read(&small, &[0], &small_remote, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec()[..4096], 7, 0), None);
    }

    #[test]
    fn etcd_unreachable_is_a_typed_error_and_the_side_channel_still_works() {
        let (agent, buf, _reg) = initiator("etcd-orphan", 4096);
        let closed = format!("http://127.0.0.1:{}", free_port());
        let config = EtcdConfig::new(vec![closed], PREFIX);
        let err = EtcdDiscovery::join(&agent, config).err().expect("nothing listens there");
        assert_eq!(err.code(), ErrorCode::DiscoveryUnreachable, "{err}");
        let config = EtcdConfig::new(vec!["https://etcd:2379".into()], PREFIX);
        assert_eq!(EtcdDiscovery::join(&agent, config).err().unwrap().code(), ErrorCode::DiscoveryConfig);

        let served = Served::start("1M", 4);
        let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let remote = agent.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();
        agent.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec(), 4, 0), None);

        let out = kvferry().args(["serve", "--etcd", "http://127.0.0.1:1", "--buffer-size", "1M"]).output();
        let out = out.unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unreachable"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn etcd_malformed_values_under_the_prefix_are_typed_errors() {
        let Some(etcd) = Etcd::start("etcd_malformed_values_under_the_prefix_are_typed_errors") else { return };
        let served = serve_in(&etcd, "etcd-honest", "1M");
        let (agent, buf, _reg) = initiator("etcd-reader", 4096);
        let discovery = join(&agent, &etcd);
        etcd.put(&format!("{PREFIX}etcd-junk"), b"not kvferry metadata");
        let err = discovery.lookup("etcd-junk").unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
        let err = discovery.lookup("etcd-nobody").unwrap_err();
        assert_eq!(err.code(), ErrorCode::DiscoveryPeerNotFound, "{err}");
        // What etcd holds is sealed under the secret: no plain metadata, so no keys, for its readers.
        let honest = kvferry::side_channel::exchange(&test_auth(), &served.side_channel, None, soon()).unwrap();
        let stored = etcd.get(&format!("{PREFIX}etcd-honest")).expect("the served agent is published");
        assert!(
            !stored.windows(4).any(|w| w == b"KVFM") && !stored.windows(16).any(|w| honest.windows(16).any(|h| h == w))
        );
        // Plain metadata written by someone without the secret, or the honest sealed value moved
        // under another name, is refused.
        etcd.put(&format!("{PREFIX}etcd-impostor"), &honest);
        assert_eq!(discovery.lookup("etcd-impostor").unwrap_err().code(), ErrorCode::Unauthenticated);
        etcd.put(&format!("{PREFIX}etcd-impostor"), &stored);
        assert_eq!(discovery.lookup("etcd-impostor").unwrap_err().code(), ErrorCode::Unauthenticated);
        assert!(!agent.peers().contains(&"etcd-honest".to_string()));

        // A tracked peer's key overwritten with garbage: the update is ignored, the peer stays.
        let peer = discovery.lookup("etcd-honest").unwrap();
        etcd.put(&format!("{PREFIX}etcd-honest"), b"\x00garbage");
        std::thread::sleep(Duration::from_millis(500));
        let local = agent.prepare_local(&[buf.region()]).unwrap();
        let remote = agent.prepare_remote(&peer, &[served.region(0, 4096)]).unwrap();
        agent.read(&local, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
        assert_eq!(pattern::first_mismatch(&buf.to_vec(), 7, 0), None);
    }
}
