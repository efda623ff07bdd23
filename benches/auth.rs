//! What authentication costs a connection: a TCP connect on loopback followed by the cluster-secret
//! handshake (both proofs, both verdicts; it runs once per connection, never per transfer), then a
//! side-channel GET (connect, handshake, metadata) without and with TLS, so the difference is the
//! TLS handshake (ECDSA P-256 certificates made here). A bare connect is not measured: at criterion's
//! rates it mostly measures the loopback's exhaustion of ephemeral ports in TIME_WAIT.

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kvferry::auth::{Auth, Channel, Role};
use kvferry::{AuthConfig, Deadline};

fn auth(c: &mut Criterion) {
    let secret = Auth::resolve(&AuthConfig::Secret(b"the benchmark's cluster secret".to_vec())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = secret.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let deadline = Deadline::after(Duration::from_secs(5));
            let _ = server.authenticate(&mut stream, Channel::Tcp, Role::Server, deadline);
        }
    });
    let mut group = c.benchmark_group("connection");
    group.bench_function("tcp_connect_and_handshake", |b| {
        b.iter(|| {
            let mut stream = TcpStream::connect(addr).unwrap();
            let deadline = Deadline::after(Duration::from_secs(5));
            secret.authenticate(&mut stream, Channel::Tcp, Role::Client, deadline).unwrap();
        })
    });
    for tls in [false, true] {
        let config = tls.then(certs);
        let agent = kvferry::Agent::new(kvferry::AgentConfig {
            shm: None,
            auth: AuthConfig::Secret(b"the benchmark's cluster secret".to_vec()),
            tls: config.clone(),
            ..kvferry::AgentConfig::new("bench-target")
        })
        .unwrap();
        let side = agent.serve_side_channel("127.0.0.1:0".parse().unwrap()).unwrap().to_string();
        let client = match &config {
            Some(config) => secret.clone().with_tls(config).unwrap(),
            None => secret.clone(),
        };
        let name = if tls { "side_channel_get_tls" } else { "side_channel_get" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let deadline = Deadline::after(Duration::from_secs(5));
                kvferry::side_channel::exchange(&client, &side, None, deadline).unwrap()
            })
        });
    }
    group.finish();
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM files.
fn certs() -> kvferry::TlsConfig {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = std::env::temp_dir().join(format!("kvferry-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    kvferry::TlsConfig::new(
        write("cert.pem", leaf.pem()),
        write("key.pem", key.serialize_pem()),
        write("ca.pem", ca_cert.pem()),
    )
}

criterion_group!(benches, auth);
criterion_main!(benches);
