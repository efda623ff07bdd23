//! A peer known to be gone (its discovery key vanished) fails its pending transfers at once,
//! rather than at their deadlines, and the failure is counted in the agent's metrics.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry_core::memory::host::HostBuffer;
use kvferry_core::metadata::{AgentMetadata, RegionInfo};
use kvferry_core::transport::Endpoint;
use kvferry_core::{Agent, AgentConfig, Deadline, ErrorCode, HostAllocOptions, MemKind, MemRegion, Op, TransportKind};

#[test]
fn a_gone_peer_fails_its_pending_transfers_at_once_and_is_removed() {
    // A "peer" that accepts connections and never answers: a hung host keeps its sockets open.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || silent.incoming().take(2).collect::<Vec<_>>());

    let agent = Agent::new(AgentConfig { shm: None, ..AgentConfig::new("waiter") }).unwrap();
    let buf = Arc::new(HostBuffer::alloc(1 << 20, &HostAllocOptions::new().with_pin(false)).unwrap());
    let _reg = agent.register(buf.clone()).unwrap();
    let remote_region = MemRegion { addr: 0x7000_0000, len: 1 << 20, kind: MemKind::Host };
    let hung = AgentMetadata {
        name: "hung".into(),
        generation: 1,
        endpoints: vec![Endpoint { kind: TransportKind::Tcp, address }],
        regions: vec![RegionInfo { region: remote_region, keys: vec![(TransportKind::Tcp, vec![7; 16])] }],
    };
    let peer = agent.add_peer(&hung.encode()).unwrap();
    let local = agent.prepare_local(&[buf.region()]).unwrap();
    let remote = agent.prepare_remote(&peer, &[remote_region]).unwrap();

    let deadline = Duration::from_secs(60);
    let xfer = agent.read(&local, &[0], &remote, &[0], Deadline::after(deadline)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(xfer.elapsed().is_none(), "nothing answers, so the read is still pending");
    let gone_at = Instant::now();
    assert_eq!(agent.peer_gone(&peer, "its lease expired").unwrap(), 1);
    let err = xfer.wait().unwrap_err();
    assert!(gone_at.elapsed() < Duration::from_secs(1), "failed {:?} after; deadline {deadline:?}", gone_at.elapsed());
    assert_eq!(err.code(), ErrorCode::PeerDisconnected, "{err}");
    assert!(err.to_string().contains("hung") && err.to_string().contains("its lease expired"), "{err}");
    assert!(agent.peers().is_empty());
    assert_eq!(agent.peer_gone(&peer, "again").unwrap_err().code(), ErrorCode::UnknownPeer);

    let metrics = agent.metrics();
    assert_eq!(metrics.errors(ErrorCode::PeerDisconnected), 1);
    assert_eq!(metrics.transfers(TransportKind::Tcp, Op::Read), 0);
    assert!(metrics.render().contains("kvferry_transfers_in_flight{transport=\"tcp\",direction=\"read\"} 0"));
    drop(held);
}
