//! A READ from a target that trickles its payload one byte at a time, played by another process
//! (this test binary, started again with `KVFERRY_STALLED_PEER`): once `cancel` returns, `wait`
//! returns Timeout, or the local registration's drop returns, not one more byte lands in the
//! local memory, and the peer is cut off (its writes fail).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvferry_core::auth::{Auth, Channel, Role};
use kvferry_core::memory::host::HostBuffer;
use kvferry_core::metadata::{AgentMetadata, RegionInfo};
use kvferry_core::transport::Endpoint;
use kvferry_core::transport::tcp::TcpConfig;
use kvferry_core::{
    Agent, AgentConfig, AuthConfig, Deadline, ErrorCode, HostAllocOptions, MemKind, MemRegion, TransportKind,
};

const PEER_ENV: &str = "KVFERRY_STALLED_PEER";
/// Set (to the owner's side channel) for the member that trickles a WRITE into the owner.
const WRITER_ENV: &str = "KVFERRY_TRICKLING_WRITER";
const SECRET: &str = "the stalled-peer tests' cluster secret";
/// The READ's size: the peer never gets near its end.
const LEN: usize = 1 << 20;
/// What the local buffer holds before the READ; the peer sends the complement.
const FILL: u8 = 0x3C;
/// Bytes the peer tries to send after the initiator stopped: each would land on the old code.
const AFTER: u64 = 20;
/// Any bound on the peer's answers: only reached if something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// The hostile target: a raw server speaking just enough of the TCP transport's wire format (see
/// `transport/tcp/wire.rs`) to accept one READ, whose payload it then sends a byte every few
/// milliseconds, reporting `sent <total>` per byte and `cut <total>` when a write fails.
#[test]
#[ignore = "the entry point of the stalled peer that the other tests start"]
fn stalled_peer_entry() {
    std::env::var(PEER_ENV).expect("run only as a child, with KVFERRY_STALLED_PEER set");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut out = std::io::stdout();
    let report = |out: &mut std::io::Stdout, line: String| {
        // The test that started us has gone: stop.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    };
    // On a line of its own: the harness has just printed the test's name without ending its line.
    report(&mut out, format!("\nlistening {}", listener.local_addr().unwrap().port()));
    let (mut s, _) = listener.accept().unwrap();
    // A member: it holds the secret, and then misbehaves.
    let auth = Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap();
    auth.authenticate(&mut s, Channel::Tcp, Role::Server, Deadline::after(PATIENCE)).unwrap();
    s.set_read_timeout(None).unwrap();
    s.set_write_timeout(None).unwrap();
    let mut hello = [0u8; 8];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..4], b"KVFT");
    let mut name = vec![0u8; u16::from_le_bytes([hello[6], hello[7]]) as usize];
    s.read_exact(&mut name).unwrap();
    let mut ack = [0u8; 8];
    ack[..6].copy_from_slice(&hello[..6]);
    s.write_all(&ack).unwrap();
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 1, "a READ");
    let count = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    let mut descs = vec![0u8; count * 32];
    s.read_exact(&mut descs).unwrap();
    let total: u64 = descs.chunks_exact(32).map(|d| u64::from_le_bytes(d[24..32].try_into().unwrap())).sum();
    let mut response = [0u8; 16];
    response[8..16].copy_from_slice(&total.to_le_bytes());
    s.write_all(&response).unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total && started.elapsed() < 2 * PATIENCE {
        match s.write(&[!FILL]) {
            Ok(1) => sent += 1,
            _ => return report(&mut out, format!("cut {sent}")),
        }
        report(&mut out, format!("sent {sent}"));
        std::thread::sleep(Duration::from_millis(5));
    }
    report(&mut out, format!("done {sent}"));
}

/// What the peer reports, line by line.
#[derive(Debug, PartialEq)]
enum Report {
    Sent(u64),
    Cut(u64),
    Done(u64),
}

struct Peer {
    child: Child,
    reports: mpsc::Receiver<Report>,
    port: u16,
}

impl Peer {
    fn start() -> Peer {
        Peer::start_entry("stalled_peer_entry", PEER_ENV, "1", true)
    }

    /// This test binary again, running the ignored test `entry` with `env` set to `value`.
    fn start_entry(entry: &str, env: &str, value: &str, listens: bool) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", entry, "--ignored", "--nocapture", "--test-threads", "1"])
            .env(env, value)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (ports, port) = mpsc::channel();
        let (tx, reports) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            // The test harness prints its own lines too.
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let word = |prefix: &str| line.strip_prefix(prefix).map(|n| n.parse::<u64>().unwrap());
                let report = if let Some(p) = word("listening ") {
                    let _ = ports.send(p as u16);
                    continue;
                } else if let Some(n) = word("sent ") {
                    Report::Sent(n)
                } else if let Some(n) = word("cut ") {
                    Report::Cut(n)
                } else if let Some(n) = word("done ") {
                    Report::Done(n)
                } else {
                    continue;
                };
                if tx.send(report).is_err() {
                    return;
                }
            }
        });
        // Built first, so that the child is killed should it never listen.
        let mut peer = Peer { child, reports, port: 0 };
        if listens {
            peer.port = port.recv_timeout(PATIENCE).expect("the peer did not start listening");
        }
        peer
    }

    fn next(&self) -> Report {
        self.reports.recv_timeout(PATIENCE).expect("the peer stopped reporting")
    }

    /// The peer's latest report: the queued ones are old news, or the next if none is queued.
    fn latest(&self) -> Report {
        let mut last = None;
        while let Ok(report) = self.reports.try_recv() {
            last = Some(report);
        }
        last.unwrap_or_else(|| self.next())
    }

    /// Wait until the peer has sent at least `n` bytes in all.
    fn wait_sent(&self, n: u64) {
        loop {
            match self.next() {
                Report::Sent(total) if total >= n => return,
                Report::Sent(_) => {}
                other => panic!("the peer ended early: {other:?}"),
            }
        }
    }

    /// After the initiator stopped at `stopped_at` bytes: the peer's writes must fail within
    /// `AFTER` more bytes.
    fn expect_cut(&self, stopped_at: u64) {
        loop {
            match self.next() {
                Report::Cut(_) => return,
                Report::Sent(total) if total < stopped_at + AFTER => {}
                other => panic!("the peer was not cut off: {other:?} ({stopped_at} bytes when stopped)"),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn initiator() -> Agent {
    let tcp = TcpConfig { streams: 1, ..TcpConfig::default() };
    let auth = AuthConfig::Secret(SECRET.into());
    Agent::new(AgentConfig { shm: None, tcp: Some(tcp), auth, ..AgentConfig::new("reader") }).unwrap()
}

fn local_buffer() -> Arc<HostBuffer> {
    let buf = Arc::new(HostBuffer::alloc(LEN, &HostAllocOptions::new().with_pin(false)).unwrap());
    buf.write_at(0, &vec![FILL; LEN]).unwrap();
    buf
}

/// Link the agent to the stalled peer, which claims one region with a made-up key.
fn link(agent: &Agent, peer: &Peer) -> kvferry_core::RemoteDescs {
    let region = MemRegion { addr: 0x7000_0000, len: LEN as u64, kind: MemKind::Host };
    let meta = AgentMetadata {
        name: "stalled".into(),
        generation: 1,
        endpoints: vec![Endpoint { kind: TransportKind::Tcp, address: format!("127.0.0.1:{}", peer.port) }],
        regions: vec![RegionInfo { region, keys: vec![(TransportKind::Tcp, vec![7; 16])] }],
    };
    let name = agent.add_peer(&meta.encode()).unwrap();
    agent.prepare_remote(&name, &[region]).unwrap()
}

/// How many bytes of the peer's payload are in `buf`: they land in order from its start.
fn landed(buf: &HostBuffer) -> usize {
    buf.to_vec().iter().take_while(|&&b| b == !FILL).count()
}

/// Start a READ of the whole buffer from the stalled peer and wait until bytes land in it.
fn trickling_read(agent: &Agent, peer: &Peer, buf: &HostBuffer, deadline: Deadline) -> kvferry_core::Transfer {
    let remote = link(agent, peer);
    let local = agent.prepare_local(&[buf.region()]).unwrap();
    let xfer = agent.read(&local, &[0], &remote, &[0], deadline).unwrap();
    peer.wait_sent(8);
    // The peer's bytes do reach the local memory while the READ runs.
    let since = Instant::now();
    while landed(buf) == 0 {
        assert!(since.elapsed() < PATIENCE, "no byte of the payload landed");
        peer.wait_sent(0);
    }
    xfer
}

/// Once stopped, the buffer stays as it is, byte for byte, while the peer tries to send more,
/// until its writes fail.
fn stays_untouched(buf: &HostBuffer, peer: &Peer) {
    let snapshot = buf.to_vec();
    match peer.latest() {
        Report::Sent(stopped_at) => peer.expect_cut(stopped_at),
        Report::Cut(_) => {}
        Report::Done(n) => panic!("the peer was never cut off; it gave up after {n} bytes"),
    }
    assert!(buf.to_vec() == snapshot, "bytes landed after the transfer was stopped ({} now)", landed(buf));
    assert!(landed(buf) < LEN);
}

#[test]
fn after_cancel_returns_no_byte_lands_and_the_peer_is_cut_off() {
    let peer = Peer::start();
    let agent = initiator();
    let buf = local_buffer();
    let _reg = agent.register(buf.clone()).unwrap();
    let xfer = trickling_read(&agent, &peer, &buf, Deadline::after(4 * PATIENCE));
    xfer.cancel();
    stays_untouched(&buf, &peer);
    assert_eq!(xfer.wait().unwrap_err().code(), ErrorCode::Cancelled);
}

#[test]
fn after_wait_times_out_no_byte_lands_and_the_peer_is_cut_off() {
    let peer = Peer::start();
    let agent = initiator();
    let buf = local_buffer();
    let _reg = agent.register(buf.clone()).unwrap();
    // Long enough for the first bytes to arrive; the peer needs over an hour for the rest.
    let xfer = trickling_read(&agent, &peer, &buf, Deadline::after(Duration::from_secs(3)));
    let e = xfer.wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    stays_untouched(&buf, &peer);
}

#[test]
fn dropping_a_raw_registration_cuts_its_transfers_off_at_once() {
    let peer = Peer::start();
    let agent = initiator();
    let buf = local_buffer();
    // The test keeps the memory itself, so that a byte landing after the drop can be seen.
    let reg = unsafe { agent.register_raw(buf.region()) }.unwrap();
    let xfer = trickling_read(&agent, &peer, &buf, Deadline::after(4 * PATIENCE));
    // The drop must not wait for the peer, which would take until the deadline: run it aside and
    // give it a bound far below that (the TCP transport's request_timeout).
    let (dropped, done) = mpsc::channel();
    std::thread::spawn(move || {
        drop(reg);
        let _ = dropped.send(());
    });
    done.recv_timeout(TcpConfig::default().request_timeout / 3).expect("the registration's drop waited for the peer");
    stays_untouched(&buf, &peer);
    assert_eq!(xfer.wait().unwrap_err().code(), ErrorCode::Cancelled);
    let local = agent.prepare_local(&[buf.region()]);
    assert_eq!(local.unwrap_err().code(), ErrorCode::NotRegistered);
}

/// The hostile member on the other side: it fetches the owner's metadata through the side channel
/// (it holds the secret), then WRITEs the whole region one byte every few milliseconds, reporting
/// `sent <total>` per byte and `cut <total>` when a write fails.
#[test]
#[ignore = "the entry point of the trickling writer that the owner-side test starts"]
fn trickling_writer_entry() {
    let side_channel = std::env::var(WRITER_ENV).expect("run only as a child, with KVFERRY_TRICKLING_WRITER set");
    let auth = Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap();
    let md = kvferry_core::side_channel::exchange(&auth, &side_channel, None, Deadline::after(PATIENCE)).unwrap();
    let md = AgentMetadata::decode(&md).unwrap();
    let tcp = md.endpoints.iter().find(|e| e.kind == TransportKind::Tcp).unwrap();
    let region = &md.regions[0];
    let mut s = std::net::TcpStream::connect(&tcp.address).unwrap();
    auth.authenticate(&mut s, Channel::Tcp, Role::Client, Deadline::after(PATIENCE)).unwrap();
    s.set_read_timeout(None).unwrap();
    s.set_write_timeout(None).unwrap();
    let mut hello = b"KVFT".to_vec();
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&6u16.to_le_bytes());
    hello.extend_from_slice(b"writer");
    s.write_all(&hello).unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[6], 0, "hello accepted");
    // WRITE | count 1 | payload LEN | key | addr | len
    let mut head = vec![2u8, 0, 0, 0];
    head.extend_from_slice(&1u32.to_le_bytes());
    head.extend_from_slice(&(LEN as u64).to_le_bytes());
    head.extend_from_slice(region.key(TransportKind::Tcp).unwrap());
    head.extend_from_slice(&region.region.addr.to_le_bytes());
    head.extend_from_slice(&(LEN as u64).to_le_bytes());
    s.write_all(&head).unwrap();
    let mut out = std::io::stdout();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < LEN as u64 && started.elapsed() < 2 * PATIENCE {
        let line = match s.write(&[!FILL]) {
            Ok(1) => {
                sent += 1;
                format!("\nsent {sent}")
            }
            _ => format!("\ncut {sent}"),
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() || line.starts_with("\ncut") {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = writeln!(out, "\ndone {sent}");
}

#[test]
fn an_owner_dropping_a_registration_cuts_off_a_member_trickling_a_write_into_it() {
    let tcp = TcpConfig::default();
    let request_timeout = tcp.request_timeout;
    let auth = AuthConfig::Secret(SECRET.into());
    let owner = Agent::new(AgentConfig { shm: None, tcp: Some(tcp), auth, ..AgentConfig::new("owner") }).unwrap();
    let buf = local_buffer();
    // The test keeps the memory itself, so that a byte landing after the drop can be seen.
    let reg = unsafe { owner.register_raw(buf.region()) }.unwrap();
    let side_channel = owner.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let peer = Peer::start_entry("trickling_writer_entry", WRITER_ENV, &side_channel.to_string(), false);
    peer.wait_sent(8);
    let since = Instant::now();
    while landed(&buf) == 0 {
        assert!(since.elapsed() < PATIENCE, "no byte of the WRITE landed");
        peer.wait_sent(0);
    }
    // The served request holds the region; the drop must cut it off rather than wait out the
    // request's timeout (30 s), which the member's trickle would take to the end.
    let (dropped, done) = mpsc::channel();
    std::thread::spawn(move || {
        drop(reg);
        let _ = dropped.send(());
    });
    done.recv_timeout(request_timeout / 3).expect("the registration's drop waited for the member");
    stays_untouched(&buf, &peer);
}
