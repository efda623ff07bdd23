//! What authentication costs a connection: a TCP connect on loopback alone, and the same connect
//! followed by the cluster-secret handshake (both proofs, both verdicts), so the difference is the
//! handshake. It runs once per connection, never per transfer.

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
            // A plain connect sends nothing: the server sees end of file and moves on.
            let _ = server.authenticate(&mut stream, Channel::Tcp, Role::Server, deadline);
        }
    });
    let mut group = c.benchmark_group("connection");
    group.bench_function("tcp_connect", |b| b.iter(|| drop(TcpStream::connect(addr).unwrap())));
    group.bench_function("tcp_connect_and_handshake", |b| {
        b.iter(|| {
            let mut stream = TcpStream::connect(addr).unwrap();
            let deadline = Deadline::after(Duration::from_secs(5));
            secret.authenticate(&mut stream, Channel::Tcp, Role::Client, deadline).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, auth);
criterion_main!(benches);
