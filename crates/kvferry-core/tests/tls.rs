//! TLS on the side channel and the TCP transport, with certificates made at test time: blocks move
//! byte-exact; a peer without TLS, or whose certificate the CA did not sign, is refused and no
//! memory moves; a relay on the path (another process: this test binary started again with
//! `KVFERRY_TLS_RELAY`) sees no plaintext under TLS while it does without; a relay trickling the
//! TLS stream is cut off at the deadline.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::{Agent, AgentConfig, AuthConfig, Deadline, ErrorCode, MemRegion, TlsConfig, TransportKind};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const SECRET: &str = "the tls tests' cluster secret....";
const RELAY_ENV: &str = "KVFERRY_TLS_RELAY";
const LEN: usize = 1 << 20;
/// Bounds waits that end at once unless something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, written as PEM files into a
/// fresh directory named after `tag`; returns the config that uses them.
fn certs(tag: &str) -> TlsConfig {
    let dir = std::env::temp_dir().join(format!("kvferry-tls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("kvferry test CA {tag}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let write = |name: &str, pem: String| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    TlsConfig::new(write("cert.pem", leaf.pem()), write("key.pem", key.serialize_pem()), write("ca.pem", ca_cert.pem()))
}

fn agent(name: &str, tls: Option<TlsConfig>) -> Agent {
    let config = AgentConfig { shm: None, auth: AuthConfig::Secret(SECRET.into()), tls, ..AgentConfig::new(name) };
    Agent::new(config).unwrap()
}

fn buffer(fill: impl Fn(usize) -> u8) -> Arc<HostBuffer> {
    let b = Arc::new(HostBuffer::alloc(LEN, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    let data: Vec<u8> = (0..LEN).map(fill).collect();
    b.write_at(0, &data).unwrap();
    b
}

/// A pattern that no TLS record would show by chance: a counter's bytes.
fn pattern(i: usize) -> u8 {
    ((i / 4) as u32).to_le_bytes()[i % 4]
}

fn soon() -> Deadline {
    Deadline::after(PATIENCE)
}

/// The target's metadata, with its TCP endpoint moved to `address` (a relay).
fn via(target: &Agent, address: Option<String>) -> Vec<u8> {
    let mut md = AgentMetadata::decode(&target.metadata()).unwrap();
    if let Some(address) = address {
        let tcp = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Tcp).unwrap();
        tcp.address = address;
    }
    md.encode()
}

struct Setup {
    initiator: Agent,
    target: Agent,
    local: Arc<HostBuffer>,
    remote: Arc<HostBuffer>,
    _regs: Vec<kvferry_core::Registration>,
}

fn setup(initiator_tls: Option<TlsConfig>, target_tls: Option<TlsConfig>) -> Setup {
    let initiator = agent("tls-initiator", initiator_tls);
    let target = agent("tls-target", target_tls);
    let (local, remote) = (buffer(|_| 0), buffer(pattern));
    let regs = vec![initiator.register(local.clone()).unwrap(), target.register(remote.clone()).unwrap()];
    Setup { initiator, target, local, remote, _regs: regs }
}

impl Setup {
    fn read(&self, peer: &str, deadline: Deadline) -> kvferry_core::Result<()> {
        let local = self.initiator.prepare_local(&[self.local.region()])?;
        let remote = self.initiator.prepare_remote(peer, &[MemRegion::host(self.remote.as_ptr(), LEN)])?;
        self.initiator.read(&local, &[0], &remote, &[0], deadline)?.wait()
    }

    fn write(&self, peer: &str) -> kvferry_core::Result<()> {
        let local = self.initiator.prepare_local(&[self.local.region()])?;
        let remote = self.initiator.prepare_remote(peer, &[MemRegion::host(self.remote.as_ptr(), LEN)])?;
        self.initiator.write(&local, &[0], &remote, &[0], soon())?.wait()
    }
}

fn moves_both_ways(s: &Setup, peer: &str) {
    s.read(peer, soon()).unwrap();
    assert_eq!(s.local.to_vec(), s.remote.to_vec(), "READ over TLS is byte-exact");
    let fresh: Vec<u8> = (0..LEN).map(|i| (i as u8).wrapping_mul(7).wrapping_add(3)).collect();
    s.local.write_at(0, &fresh).unwrap();
    s.write(peer).unwrap();
    assert_eq!(s.remote.to_vec(), fresh, "WRITE over TLS is byte-exact");
}

#[test]
fn blocks_move_both_ways_over_tls() {
    let tls = certs("both-ways");
    let s = setup(Some(tls.clone()), Some(tls));
    let peer = s.initiator.add_peer(&s.target.metadata()).unwrap();
    moves_both_ways(&s, &peer);
}

#[test]
fn mutual_tls_and_the_side_channel_work_together() {
    let tls = TlsConfig { require_client_cert: true, ..certs("mutual") };
    let s = setup(Some(tls.clone()), Some(tls));
    let side = s.target.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let peer = s.initiator.connect_peer(&side.to_string(), soon()).unwrap();
    moves_both_ways(&s, &peer);
}

/// The error of a READ refused at the handshake, with the target's memory unchanged and nothing
/// landed locally.
fn refused(s: &Setup, peer: &str) -> kvferry_core::Error {
    let before = s.remote.to_vec();
    let e = s.read(peer, soon()).expect_err("refused");
    assert!(s.local.to_vec().iter().all(|&b| b == 0), "nothing landed locally");
    assert!(s.write(peer).is_err(), "a WRITE is refused too");
    assert_eq!(s.remote.to_vec(), before, "the target's memory is untouched");
    e
}

#[test]
fn a_peer_without_tls_is_refused_in_both_directions() {
    let tls = certs("without");
    let s = setup(None, Some(tls.clone()));
    let peer = s.initiator.add_peer(&s.target.metadata()).unwrap();
    let e = refused(&s, &peer);
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
    assert!(e.to_string().contains("requires TLS"), "{e}");

    let s = setup(Some(tls), None);
    let peer = s.initiator.add_peer(&s.target.metadata()).unwrap();
    let e = refused(&s, &peer);
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
    assert!(e.to_string().contains("does not use TLS"), "{e}");

    // The side channel too.
    let s = setup(None, Some(certs("without-side")));
    let side = s.target.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let e = s.initiator.connect_peer(&side.to_string(), soon()).expect_err("refused");
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
}

#[test]
fn a_certificate_the_ca_did_not_sign_is_refused() {
    let ours = certs("signed");
    let rogue = certs("rogue");
    // The target presents a certificate from another CA.
    let s = setup(Some(ours.clone()), Some(rogue.clone()));
    let peer = s.initiator.add_peer(&s.target.metadata()).unwrap();
    let e = refused(&s, &peer);
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // With mutual TLS, a client whose certificate another CA signed (it trusts ours, so the
    // server's certificate passes).
    let client = TlsConfig { ca: ours.ca.clone(), ..rogue };
    let s = setup(Some(client), Some(TlsConfig { require_client_cert: true, ..ours }));
    let peer = s.initiator.add_peer(&s.target.metadata()).unwrap();
    let e = refused(&s, &peer);
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
}

/// The relay: another process between initiator and target.
struct Relay {
    child: Child,
    address: String,
    lines: mpsc::Receiver<String>,
}

impl Relay {
    /// `mode`: `record:<file>` appends every byte the target sends to the file (and `<file>.up`
    /// those the initiator sends); `trickle` passes the first 16 KiB the target sends, then a
    /// byte every 10 ms, printing `cut` once a write to the initiator fails.
    fn start(target: &Agent, mode: &str) -> Relay {
        let md = AgentMetadata::decode(&target.metadata()).unwrap();
        let tcp = md.endpoints.iter().find(|e| e.kind == TransportKind::Tcp).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tls_relay_entry", "--ignored", "--nocapture", "--test-threads=1"])
            .env(RELAY_ENV, format!("{}|{mode}", tcp.address))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let port = expect_line(&lines, "listening ");
        Relay { child, address: format!("127.0.0.1:{port}"), lines }
    }
}

fn expect_line(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    let until = Instant::now() + PATIENCE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("the relay never said {prefix:?}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "the entry point of the relay that the other tests start"]
fn tls_relay_entry() {
    let spec = std::env::var(RELAY_ENV).expect("run only as a child, with KVFERRY_TLS_RELAY set");
    let (target, mode) = spec.split_once('|').unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // On a line of its own: the harness has just printed the test's name without ending its line.
    println!("\nlistening {}", listener.local_addr().unwrap().port());
    for client in listener.incoming() {
        let client = client.unwrap();
        let server = TcpStream::connect(target).unwrap();
        let (record, trickle) = match mode.strip_prefix("record:") {
            Some(path) => (Some(PathBuf::from(path)), false),
            None => (None, mode == "trickle"),
        };
        let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let up_record = record.as_ref().map(|p| p.with_extension("up"));
        thread::spawn(move || pipe(up.0, up.1, up_record.as_deref(), false));
        thread::spawn(move || pipe(server, client, record.as_deref(), trickle));
    }
}

/// Copy `from` to `to` until either end closes, appending what passes to `record`.
fn pipe(mut from: TcpStream, mut to: TcpStream, record: Option<&Path>, trickle: bool) {
    let mut file: Option<File> = record.map(|p| OpenOptions::new().create(true).append(true).open(p).unwrap());
    let mut buf = vec![0u8; 64 * 1024];
    let mut passed = 0usize;
    loop {
        let want = if trickle && passed >= 16 * 1024 { 1 } else { buf.len() };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = file.as_mut() {
            f.write_all(&buf[..n]).unwrap();
        }
        if to.write_all(&buf[..n]).is_err() {
            if trickle {
                println!("cut {passed}");
            }
            break;
        }
        passed += n;
        if trickle && passed > 16 * 1024 {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Whether `haystack` holds 16 consecutive values of the pattern's counter, at any offset.
fn shows_pattern(haystack: &[u8]) -> bool {
    let word = |w: &[u8], k: usize| u32::from_le_bytes(w[4 * k..4 * k + 4].try_into().unwrap());
    haystack.windows(64).any(|w| (1..16).all(|k| word(w, k) == word(w, 0).wrapping_add(k as u32)))
}

fn recorded(tls: Option<TlsConfig>, tag: &str) -> (Vec<u8>, Vec<u8>) {
    let s = setup(tls.clone(), tls);
    let dir = std::env::temp_dir().join(format!("kvferry-tls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wire.down");
    let relay = Relay::start(&s.target, &format!("record:{}", file.display()));
    let peer = s.initiator.add_peer(&via(&s.target, Some(relay.address.clone()))).unwrap();
    // READ the pattern, then WRITE it back shifted: both directions carry it.
    s.read(&peer, soon()).unwrap();
    assert_eq!(s.local.to_vec(), s.remote.to_vec());
    s.write(&peer).unwrap();
    drop(relay);
    (std::fs::read(&file).unwrap(), std::fs::read(file.with_extension("up")).unwrap())
}

#[test]
fn a_relay_sees_the_pattern_in_the_clear_but_not_under_tls() {
    let (down, up) = recorded(None, "relay-plain");
    assert!(down.len() >= LEN && up.len() >= LEN, "the relay carried the payloads");
    assert!(shows_pattern(&down) && shows_pattern(&up), "without TLS the payload crosses in the clear");

    let (down, up) = recorded(Some(certs("relay-tls")), "relay-tls");
    assert!(down.len() >= LEN && up.len() >= LEN, "the relay carried the payloads");
    assert!(!shows_pattern(&down), "the READ payload is encrypted on the wire");
    assert!(!shows_pattern(&up), "the WRITE payload is encrypted on the wire");
}

#[test]
fn a_trickling_relay_is_cut_off_at_the_deadline_under_tls() {
    let tls = certs("trickle");
    let s = setup(Some(tls.clone()), Some(tls));
    let relay = Relay::start(&s.target, "trickle");
    let peer = s.initiator.add_peer(&via(&s.target, Some(relay.address.clone()))).unwrap();
    let started = Instant::now();
    let e = s.read(&peer, Deadline::after(Duration::from_secs(2))).expect_err("1 MiB at 100 bytes a second");
    assert_eq!(e.code(), ErrorCode::Timeout, "{e}");
    assert!(started.elapsed() < PATIENCE, "the deadline bounds the READ");
    let after_wait = s.local.to_vec();
    // The relay's next writes fail: the initiator cut the connection off.
    expect_line(&relay.lines, "cut ");
    assert_eq!(s.local.to_vec(), after_wait, "no byte landed after wait returned");
}

/// A client whose first bytes are neither a TLS record nor the plain handshake (the TLS side
/// takes them for the plain path, where the handshake refuses them), sent one byte at a time, is
/// cut off, and the endpoint keeps serving an honest peer meanwhile.
#[test]
fn garbage_trickled_at_a_tls_side_channel_is_refused_and_others_are_served() {
    let tls = certs("garbage");
    let target = agent("garbage-target", Some(tls.clone()));
    let side = target.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut raw = TcpStream::connect(side).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET / HTTP/1.1\r\n" {
        if raw.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let honest = agent("garbage-honest", Some(tls));
    honest.connect_peer(&side.to_string(), soon()).expect("an honest peer is served");
    // The server ends the connection (EOF, or a reset), rather than the read timing out.
    let mut rest = Vec::new();
    let ended = match raw.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    assert!(closed || ended, "never cut off; it got {rest:?}");
    assert!(!rest.starts_with(b"HTTP"), "{rest:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "cut off at {:?}", started.elapsed());
}
