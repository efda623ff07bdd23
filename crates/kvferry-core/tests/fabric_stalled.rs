//! A fabric target stopped with SIGSTOP (another process: this test binary, started again with
//! `KVFERRY_FABRIC_TARGET`) while a READ or WRITE of ours is posted to it: once `wait` has failed
//! at the deadline, no byte moves into or out of our memory for that transfer, even when the
//! target resumes and the provider completes what was posted (over `tcp;ofi_rxm` and `shm`,
//! where the peers' CPUs move the bytes). Without the rails' staging, 16 MiB landed after a
//! READ's wait failed and 12.8 MB of a WRITE were read from our memory afterwards.
#![cfg(feature = "fabric")]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry_core::memory::host::HostBuffer;
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::transport::fabric::FabricConfig;
use kvferry_core::{Agent, AgentConfig, AuthConfig, Deadline, ErrorCode, HostAllocOptions, MemRegion};

const TARGET_ENV: &str = "KVFERRY_FABRIC_TARGET";
const SECRET: &str = "the fabric stall tests' cluster secret";
/// Large enough that a WRITE outlasts the sockets' buffers and a READ's answer takes a while.
const LEN: usize = 16 << 20;
/// The target's memory before anything is written.
const TARGET_FILL: u8 = 0x11;
/// What our buffer holds when a transfer is posted, and what it holds after the transfer failed.
const BEFORE: u8 = 0x3c;
const AFTER: u8 = 0xb0;
const PATIENCE: Duration = Duration::from_secs(30);

fn config(name: &str, provider: &str) -> AgentConfig {
    let fabric = FabricConfig { provider: Some(provider.into()), ..FabricConfig::default() };
    let auth = AuthConfig::Secret(SECRET.into());
    AgentConfig { tcp: None, shm: None, fabric: Some(fabric), auth, ..AgentConfig::new(name) }
}

fn buffer(fill: u8) -> Arc<HostBuffer> {
    let buf = Arc::new(HostBuffer::alloc(LEN, &HostAllocOptions::new().with_pin(false)).unwrap());
    buf.write_at(0, &vec![fill; LEN]).unwrap();
    buf
}

/// The target: an agent over the provider named in `KVFERRY_FABRIC_TARGET` (`provider,path`)
/// with one registered buffer, its metadata written to `path`; it serves until stdin closes.
#[test]
#[ignore = "the entry point of the target process that the other tests start"]
fn fabric_target_entry() {
    let spec = std::env::var(TARGET_ENV).expect("run only as a child, with KVFERRY_FABRIC_TARGET set");
    let (provider, path) = spec.split_once(',').unwrap();
    let agent = Agent::new(config(&format!("stalled-target-{provider}"), provider)).unwrap();
    let memory = buffer(TARGET_FILL);
    let _reg = agent.register(memory.clone()).unwrap();
    std::fs::write(path, agent.metadata()).unwrap();
    println!("\nready");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

struct Target {
    child: Child,
    metadata: Vec<u8>,
}

impl Target {
    fn start(provider: &str) -> Target {
        let tag = format!("{provider}-{}-{:?}", std::process::id(), std::thread::current().id());
        let path = std::env::temp_dir().join(format!("kvferry-fabric-stalled-{tag}.md").replace(['(', ')'], ""));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fabric_target_entry", "--ignored", "--nocapture"])
            .env(TARGET_ENV, format!("{provider},{}", path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.is_ok_and(|l| l == "ready")), "the target did not start");
        // Keep reading its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let metadata = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Target { metadata, child }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: a signal to our own child, which we have not waited for yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let stopped = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
        };
        let since = Instant::now();
        while !stopped() {
            assert!(since.elapsed() < PATIENCE, "the target did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Our agent linked to a fresh target, with one transfer of 4 KiB done both ways so that the
/// session and connection are up before the target stops.
fn linked(provider: &str, op: &str) -> (Target, Agent, String, MemRegion) {
    let target = Target::start(provider);
    let agent = Agent::new(config(&format!("stalled-{op}-{provider}"), provider)).unwrap();
    let peer = agent.add_peer(&target.metadata).unwrap();
    let region = AgentMetadata::decode(&target.metadata).unwrap().regions[0].region;
    let warm = Arc::new(HostBuffer::alloc(4096, &HostAllocOptions::new().with_pin(false)).unwrap());
    let _reg = agent.register(warm.clone()).unwrap();
    let local = agent.prepare_local(&[warm.region()]).unwrap();
    let remote = agent.prepare_remote(&peer, &[MemRegion { len: 4096, ..region }]).unwrap();
    agent.read(&local, &[0], &remote, &[0], Deadline::after(PATIENCE)).unwrap().wait().unwrap();
    agent.write(&local, &[0], &remote, &[0], Deadline::after(PATIENCE)).unwrap().wait().unwrap();
    (target, agent, peer, region)
}

/// Post `op` of the whole buffer to the stopped target; it must fail at its 1-second deadline.
fn times_out(agent: &Agent, peer: &str, op: &str, buf: &HostBuffer, region: MemRegion) {
    let local = agent.prepare_local(&[buf.region()]).unwrap();
    let remote = agent.prepare_remote(peer, &[region]).unwrap();
    let deadline = Deadline::after(Duration::from_secs(1));
    let xfer = match op {
        "read" => agent.read(&local, &[0], &remote, &[0], deadline),
        _ => agent.write(&local, &[0], &remote, &[0], deadline),
    };
    let started = Instant::now();
    let e = xfer.unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    assert!(started.elapsed() < PATIENCE, "wait returned {:?} after the deadline", started.elapsed());
}

/// Read the whole target region into a fresh buffer: done once the provider has also finished
/// what was posted to the target before (it serves one connection in order).
fn read_back(agent: &Agent, peer: &str, region: MemRegion) -> Vec<u8> {
    let check = buffer(0);
    let _reg = agent.register(check.clone()).unwrap();
    let local = agent.prepare_local(&[check.region()]).unwrap();
    let remote = agent.prepare_remote(peer, &[region]).unwrap();
    agent.read(&local, &[0], &remote, &[0], Deadline::after(PATIENCE)).unwrap().wait().unwrap();
    check.to_vec()
}

fn a_stalled_read_lands_nothing_after_its_wait_failed(provider: &str) {
    let (target, agent, peer, region) = linked(provider, "read");
    let buf = buffer(BEFORE);
    let _reg = agent.register(buf.clone()).unwrap();
    target.stop();
    times_out(&agent, &peer, "read", &buf, region);
    target.signal(libc::SIGCONT);
    let target_bytes = read_back(&agent, &peer, region);
    assert!(target_bytes.iter().all(|&b| b == TARGET_FILL), "{provider}: the target's memory is not as it was");
    let landed = buf.to_vec().iter().filter(|&&b| b != BEFORE).count();
    assert_eq!(landed, 0, "{provider}: {landed} bytes landed after the READ's wait failed");
}

fn a_stalled_write_takes_nothing_after_its_wait_failed(provider: &str) {
    let (target, agent, peer, region) = linked(provider, "write");
    let buf = buffer(BEFORE);
    let _reg = agent.register(buf.clone()).unwrap();
    target.stop();
    times_out(&agent, &peer, "write", &buf, region);
    // Whatever the target receives from now on must not be these bytes.
    buf.write_at(0, &vec![AFTER; LEN]).unwrap();
    target.signal(libc::SIGCONT);
    let target_bytes = read_back(&agent, &peer, region);
    let taken = target_bytes.iter().filter(|&&b| b == AFTER).count();
    assert_eq!(taken, 0, "{provider}: {taken} bytes were read from our memory after the WRITE's wait failed");
    assert!(target_bytes.iter().all(|&b| b == TARGET_FILL || b == BEFORE), "{provider}: foreign bytes arrived");
}

#[test]
fn fabric_tcp_a_stalled_read_lands_nothing_after_its_wait_failed() {
    a_stalled_read_lands_nothing_after_its_wait_failed("tcp");
}

#[test]
fn fabric_tcp_a_stalled_write_takes_nothing_after_its_wait_failed() {
    a_stalled_write_takes_nothing_after_its_wait_failed("tcp");
}

// No READ over `shm`: the initiator copies it from the stopped target itself (cross-memory
// attach), so it completes on time.
#[test]
fn fabric_shm_a_stalled_write_takes_nothing_after_its_wait_failed() {
    a_stalled_write_takes_nothing_after_its_wait_failed("shm");
}
