//! An agent's threads do not grow with its peers: links share their transport's progress threads
//! and the targets serve every connection with a fixed set. Alone in its test binary, so that the
//! process's thread count is this test's.

use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::{Agent, AgentConfig, Deadline, MemRegion, Memory, TransportKind};

const BLOCK: usize = 4096;
const PEERS_PER_TRANSPORT: usize = 256;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The process's threads by name, numbers dropped: `kvf-tcp-hub-0` and `-1` count as `kvf-tcp-hub-`.
fn threads_by_name() -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().filter_map(Result::ok) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().trim_end_matches(|c: char| c.is_ascii_digit()).to_string()).or_insert(0) += 1;
    }
    names
}

fn buffer(seed: u8) -> Arc<HostBuffer> {
    let b = Arc::new(HostBuffer::alloc(BLOCK, &HostAllocOptions::new().with_pin(false)).unwrap());
    b.write_at(0, &vec![seed; BLOCK]).unwrap();
    b
}

fn region(memory: &dyn Memory) -> MemRegion {
    memory.region()
}

#[test]
fn threads_stay_fixed_from_a_few_peers_to_hundreds_over_tcp_and_shm() {
    let hub = Agent::new(AgentConfig::new("hub")).unwrap();
    let target = Agent::new(AgentConfig::new("target")).unwrap();
    let (local, remote) = (buffer(1), buffer(2));
    let _regs = [hub.register(local.clone()).unwrap(), target.register(remote.clone()).unwrap()];
    let metadata = AgentMetadata::decode(&target.metadata()).unwrap();
    let locals = hub.prepare_local(&[region(&*local)]).unwrap();

    // The target under many names, each reached over one transport: a link (and its connections)
    // per name, as with as many processes.
    let mut moved = 0;
    let mut move_to = |kind: TransportKind, n: usize| {
        let name = format!("{kind}-peer-{n}");
        let mut peer = metadata.clone();
        peer.name = name.clone();
        peer.endpoints.retain(|e| e.kind == kind);
        hub.add_peer(&peer.encode()).unwrap();
        assert_eq!(hub.peer_transport(&name), Some(kind));
        let remotes = hub.prepare_remote(&name, &[region(&*remote)]).unwrap();
        let deadline = Deadline::after(Duration::from_secs(30));
        let xfer = hub.write(&locals, &[0], &remotes, &[0], deadline).unwrap();
        xfer.wait().unwrap();
        assert_eq!(xfer.transport(), kind);
        moved += 1;
    };
    const FEW: usize = 8;
    for n in 0..FEW {
        move_to(TransportKind::Tcp, n);
        move_to(TransportKind::Shm, n);
    }
    let (with_few, named_with_few) = (threads(), threads_by_name());
    for n in FEW..PEERS_PER_TRANSPORT {
        move_to(TransportKind::Tcp, n);
        move_to(TransportKind::Shm, n);
    }
    let (with_many, named_with_many) = (threads(), threads_by_name());
    assert_eq!(moved, 2 * PEERS_PER_TRANSPORT);
    assert_eq!(remote.to_vec(), local.to_vec(), "every batch landed");
    println!(
        "threads of the process (two agents, tests' main thread included): {with_few} with {FEW} tcp and {FEW} \
         shm peers, {with_many} with {PEERS_PER_TRANSPORT} of each: {:?}",
        named_with_many
    );
    // Progress threads start as work comes, up to their transport's setting; every other thread
    // was there from the start.
    let progress = |names: &std::collections::BTreeMap<String, usize>, pool: &str| names.get(pool).copied();
    let defaults = AgentConfig::new("defaults");
    let caps = [("kvf-tcp-hub-", defaults.tcp.unwrap().threads), ("kvf-shm-hub-", defaults.shm.unwrap().threads)];
    for (pool, cap) in caps {
        assert!(progress(&named_with_many, pool).is_some_and(|n| n <= cap), "{pool}: {named_with_many:?}");
    }
    let others = |mut names: std::collections::BTreeMap<String, usize>| {
        names.retain(|name, _| !caps.iter().any(|(pool, _)| name == pool));
        names
    };
    assert_eq!(others(named_with_many), others(named_with_few), "threads grew with the peers");
}
