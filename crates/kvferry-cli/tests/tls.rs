//! TLS between two real OS processes: a `kvferry serve --tls-*` child and this test's agent move
//! blocks byte-exact both ways over TCP, with certificates made at test time; an initiator
//! without TLS is refused by the child with a typed error.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::{Agent, AgentConfig, AuthConfig, Deadline, ErrorCode, MemKind, MemRegion, TlsConfig};
use kvferry_cli::pattern;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");
const SECRET: &str = "the cli tls tests' cluster secret";
const BLOCK: u64 = 64 * 1024;
const BLOCKS: usize = 32;

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in a fresh directory.
fn certs(tag: &str) -> TlsConfig {
    let dir = std::env::temp_dir().join(format!("kvferry-cli-tls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kvferry cli test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let write = |name: &str, pem: String| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    TlsConfig::new(write("cert.pem", leaf.pem()), write("key.pem", key.serialize_pem()), write("ca.pem", ca_cert.pem()))
}

/// A `kvferry serve` child with TLS, killed when dropped.
struct Served {
    child: Child,
    side_channel: String,
    buffer_addr: u64,
}

impl Served {
    fn start(tls: &TlsConfig, seed: u64) -> Served {
        let mut child = Command::new(KVFERRY)
            .env(kvferry::auth::SECRET_ENV, SECRET)
            .args(["serve", "--buffer-size", "4M", "--fill-seed", &seed.to_string()])
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca)
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
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn initiator(tls: Option<TlsConfig>) -> (Agent, Arc<HostBuffer>, kvferry::Registration) {
    let config = AgentConfig { shm: None, auth: AuthConfig::Secret(SECRET.into()), tls, ..AgentConfig::new("tls-cli") };
    let agent = Agent::new(config).unwrap();
    let len = BLOCK as usize * BLOCKS;
    let buf = Arc::new(HostBuffer::alloc(len, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    let reg = agent.register(buf.clone()).unwrap();
    (agent, buf, reg)
}

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

#[test]
fn blocks_move_both_ways_between_processes_over_tls() {
    let tls = certs("both-ways");
    let served = Served::start(&tls, 11);
    let (agent, buf, _reg) = initiator(Some(tls));
    let peer = agent.connect_peer(&served.side_channel, soon()).unwrap();
    let blocks = |base: u64, picks: &[u64]| -> Vec<MemRegion> {
        picks.iter().map(|&i| MemRegion { addr: base + i * BLOCK, len: BLOCK, kind: MemKind::Host }).collect()
    };
    let all: Vec<u64> = (0..BLOCKS as u64).collect();
    let local = agent.prepare_local(&blocks(buf.as_ptr() as u64, &all)).unwrap();
    // READ remote blocks 2i+1 into local block i, checked against the child's pattern.
    let odd: Vec<u64> = all.iter().map(|i| 2 * i + 1).collect();
    let remote = agent.prepare_remote(&peer, &blocks(served.buffer_addr, &odd)).unwrap();
    let idx: Vec<usize> = (0..BLOCKS).collect();
    agent.read(&local, &idx, &remote, &idx, soon()).unwrap().wait().unwrap();
    let got = buf.to_vec();
    for (i, &r) in odd.iter().enumerate() {
        let block = &got[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert_eq!(pattern::first_mismatch(block, 11, r * BLOCK), None, "block {i} ← {r}");
    }
    // WRITE a new pattern there, then read it back.
    pattern::fill(unsafe { buf.as_mut_slice() }, 99, 0);
    agent.write(&local, &idx, &remote, &idx, soon()).unwrap().wait().unwrap();
    buf.fill(0);
    agent.read(&local, &idx, &remote, &idx, soon()).unwrap().wait().unwrap();
    assert_eq!(pattern::first_mismatch(&buf.to_vec(), 99, 0), None);
}

#[test]
fn the_tls_process_refuses_an_initiator_without_tls() {
    let served = Served::start(&certs("refuses"), 5);
    let (agent, buf, _reg) = initiator(None);
    let e = agent.connect_peer(&served.side_channel, soon()).expect_err("refused");
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
    assert!(e.to_string().contains("requires TLS"), "{e}");
    assert!(buf.to_vec().iter().all(|&b| b == 0), "nothing moved");
}
