//! One peer, several links: two agents on this host share shm and TCP (staging through the host
//! device), and each transfer goes over the first link that reaches all of its memory.
//!
//! Without a GPU all memory here is host memory, which shm moves whatever it is. Memory that only
//! TCP can move is made the way an engine keeps a region off shared memory: registered with TCP
//! alone (`Agent::register_with`). On a GPU host the same choice falls out of the memory kind:
//! shm refuses to register device memory, TCP stages it.

use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::{
    Agent, AgentConfig, Deadline, DescError, DescSide, Device, Error, ErrorCode, HostDevice, LinkGap, MemRegion,
    Memory, Op, Registration, StagingConfig, TransferRequest, TransportKind,
};

const BLOCK: usize = 4096;
const BLOCKS: usize = 16;

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

/// shm (the default) and TCP staging host memory through the host device.
fn agent(name: &str) -> Agent {
    let host: Arc<dyn Device> = Arc::new(HostDevice::with_threads(2).unwrap());
    let staging = StagingConfig { devices: vec![host], chunk_bytes: 3 * BLOCK, stage_host: true };
    Agent::new(AgentConfig { staging: Some(staging), ..AgentConfig::new(name) }).unwrap()
}

fn buffer(seed: u8) -> Arc<HostBuffer> {
    let options = HostAllocOptions::new().with_pin(false).with_shareable(true);
    let b = Arc::new(HostBuffer::alloc(BLOCK * BLOCKS, &options).unwrap());
    let data: Vec<u8> = (0..b.len()).map(|i| (i % 251) as u8 ^ seed).collect();
    b.write_at(0, &data).unwrap();
    b
}

fn blocks(memory: &dyn Memory) -> Vec<MemRegion> {
    let r = memory.region();
    (0..BLOCKS).map(|i| MemRegion { addr: r.addr + (i * BLOCK) as u64, len: BLOCK as u64, kind: r.kind }).collect()
}

fn block_of(buf: &HostBuffer, i: usize) -> Vec<u8> {
    buf.to_vec()[i * BLOCK..(i + 1) * BLOCK].to_vec()
}

/// An initiator with one buffer registered everywhere, linked to a target whose buffers are
/// registered with every transport (`None`) or with some.
struct Pair {
    initiator: Agent,
    target: Agent,
    local: Arc<HostBuffer>,
    remotes: Vec<Arc<HostBuffer>>,
    _regs: Vec<Registration>,
}

fn pair(initiator: &str, target: &str, remote_transports: &[Option<&[TransportKind]>]) -> Pair {
    let (initiator, target) = (agent(initiator), agent(target));
    let local = buffer(1);
    let mut regs = vec![initiator.register(local.clone()).unwrap()];
    let remotes: Vec<_> = (2..).zip(remote_transports).map(|(seed, _)| buffer(seed)).collect();
    for (remote, transports) in remotes.iter().zip(remote_transports) {
        regs.push(match transports {
            None => target.register(remote.clone()).unwrap(),
            Some(only) => target.register_with(remote.clone(), only).unwrap(),
        });
    }
    initiator.add_peer(&target.metadata()).unwrap();
    Pair { initiator, target, local, remotes, _regs: regs }
}

#[test]
fn each_transfer_goes_over_the_first_link_that_reaches_its_memory() {
    let (initiator, target) = (agent("multi-initiator"), agent("multi-target"));
    let (local, local_tcp) = (buffer(1), buffer(2));
    let (remote_any, remote_tcp) = (buffer(3), buffer(4));
    let _regs = [
        initiator.register(local.clone()).unwrap(),
        initiator.register_with(local_tcp.clone(), &[TransportKind::Tcp]).unwrap(),
        target.register(remote_any.clone()).unwrap(),
        target.register_with(remote_tcp.clone(), &[TransportKind::Tcp]).unwrap(),
    ];
    initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(initiator.peer_transports("multi-target"), Some(vec![TransportKind::Shm, TransportKind::Tcp]));
    assert_eq!(initiator.peer_transport("multi-target"), Some(TransportKind::Shm));

    let locals = initiator.prepare_local(&[blocks(&*local), blocks(&*local_tcp)].concat()).unwrap();
    let remotes =
        initiator.prepare_remote("multi-target", &[blocks(&*remote_any), blocks(&*remote_tcp)].concat()).unwrap();
    // Both lists hold the TCP-only buffer's blocks after the others.
    let tcp_only = |i: usize| BLOCKS + i;

    // Both sides open to shm: shm, through the mapping.
    let xfer = initiator.write(&locals, &[0, 1], &remotes, &[5, 6], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Shm, Some("mapped")));
    assert_eq!(block_of(&remote_any, 5), block_of(&local, 0));
    assert_eq!(block_of(&remote_any, 6), block_of(&local, 1));

    // The remote region is open to TCP only: TCP, with the notification after the data.
    let targets = [tcp_only(7), tcp_only(0)];
    let mut request = TransferRequest::new(Op::Write, (&locals, &[2, 3]), (&remotes, &targets), soon());
    request.notification = Some(b"over tcp");
    let xfer = initiator.post(request).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Tcp, None));
    assert_eq!(target.wait_notifications(soon())[0].data, b"over tcp");
    assert_eq!(block_of(&remote_tcp, 7), block_of(&local, 2));
    assert_eq!(block_of(&remote_tcp, 0), block_of(&local, 3));

    // The local region is open to TCP only: TCP too, reading into it.
    let xfer = initiator.read(&locals, &[tcp_only(4)], &remotes, &[9], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Tcp);
    assert_eq!(block_of(&local_tcp, 4), block_of(&remote_any, 9));

    // A notification alone takes the preferred link.
    let xfer = initiator.notify("multi-target", b"alone", soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Shm);
    assert_eq!(target.wait_notifications(soon())[0].data, b"alone");
}

#[test]
fn a_request_no_single_link_can_move_is_refused_at_post_and_moves_nothing() {
    let p = pair("split-initiator", "split-target", &[Some(&[TransportKind::Shm]), Some(&[TransportKind::Tcp])]);
    let (initiator, local, remote_shm, remote_tcp) = (&p.initiator, &*p.local, &*p.remotes[0], &*p.remotes[1]);
    let locals = initiator.prepare_local(&blocks(local)).unwrap();
    // Each descriptor alone is reachable, so the list is accepted.
    let remotes = initiator.prepare_remote("split-target", &[blocks(remote_shm), blocks(remote_tcp)].concat()).unwrap();
    let before = (remote_shm.to_vec(), remote_tcp.to_vec());

    let e = initiator.write(&locals, &[0, 1], &remotes, &[2, BLOCKS + 3], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::NoCommonLink, "{e}");
    let Error::Descriptor(DescError::NoCommonLink { peer, gaps }) = &e else { panic!("not a descriptor error: {e}") };
    assert_eq!(peer, "split-target");
    let gap = |transport, index| LinkGap { transport, side: DescSide::Remote, index };
    assert_eq!(gaps, &[gap(TransportKind::Shm, BLOCKS + 3), gap(TransportKind::Tcp, 2)]);
    assert!(e.to_string().contains("shm: the peer did not register remote descriptor 19"), "{e}");
    assert!((remote_shm.to_vec(), remote_tcp.to_vec()) == before, "a refused request moved data");

    // Split in two, each half has its link.
    let xfer = initiator.write(&locals, &[0], &remotes, &[2], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Shm);
    let xfer = initiator.write(&locals, &[1], &remotes, &[BLOCKS + 3], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Tcp);
    assert_eq!(block_of(remote_shm, 2), block_of(local, 0));
    assert_eq!(block_of(remote_tcp, 3), block_of(local, 1));
}

#[test]
fn a_region_open_only_to_an_unlinked_transport_is_refused_when_prepared() {
    let tcp_only = Agent::new(AgentConfig { shm: None, ..AgentConfig::new("no-shm") }).unwrap();
    let target = agent("shm-and-tcp");
    let remote_shm = buffer(2);
    let _reg = target.register_with(remote_shm.clone(), &[TransportKind::Shm]).unwrap();
    tcp_only.add_peer(&target.metadata()).unwrap();
    assert_eq!(tcp_only.peer_transports("shm-and-tcp"), Some(vec![TransportKind::Tcp]));
    let e = tcp_only.prepare_remote("shm-and-tcp", &blocks(&*remote_shm)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteRegionUnknown, "{e}");
}

#[test]
fn registering_with_no_transport_that_moves_the_memory_is_refused() {
    let a = agent("picky");
    let e = a.register_with(buffer(1), &[TransportKind::CudaIpc]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unsupported, "{e}");
    let e = a.register_with(buffer(1), &[]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unsupported, "{e}");
}

#[test]
fn new_metadata_relinks_every_transport_and_stales_old_lists() {
    let p = pair("relink-initiator", "relink-target", &[None]);
    let (initiator, target, local, remote) = (&p.initiator, &p.target, &*p.local, &*p.remotes[0]);
    let locals = initiator.prepare_local(&blocks(local)).unwrap();
    let old = initiator.prepare_remote("relink-target", &blocks(remote)).unwrap();

    let later = buffer(3);
    let _later = target.register_with(later.clone(), &[TransportKind::Tcp]).unwrap();
    initiator.add_peer(&target.metadata()).unwrap();
    let e = initiator.write(&locals, &[0], &old, &[0], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::StaleDescriptors, "{e}");
    assert_eq!(initiator.peer_transports("relink-target"), Some(vec![TransportKind::Shm, TransportKind::Tcp]));
    let fresh = initiator.prepare_remote("relink-target", &[blocks(remote), blocks(&*later)].concat()).unwrap();
    let xfer = initiator.read(&locals, &[0, 1], &fresh, &[1, BLOCKS + 2], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Tcp, "one descriptor is open to TCP only");
    assert_eq!(block_of(local, 0), block_of(remote, 1));
    assert_eq!(block_of(local, 1), block_of(&later, 2));

    initiator.remove_peer("relink-target").unwrap();
    assert_eq!(initiator.peer_transports("relink-target"), None);
    let e = initiator.write(&locals, &[0], &fresh, &[0], soon()).err().unwrap();
    assert_eq!(e.code(), ErrorCode::UnknownPeer, "{e}");
}

/// GPU memory, which shm refuses and TCP stages, goes over TCP while host memory takes shm.
#[cfg(feature = "cuda")]
#[test]
fn gpu_memory_goes_over_tcp_staging_while_host_memory_takes_shm() {
    use kvferry_core::{CopyOp, CudaDevice};
    let device = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => return println!("skipping GPU link choice: {e}"),
    };
    let gpu_agent = |name: &str| {
        let staging = StagingConfig::new(vec![Arc::new(device.clone()) as Arc<dyn Device>]);
        Agent::new(AgentConfig { staging: Some(staging), ..AgentConfig::new(name) }).unwrap()
    };
    let upload = |seed: u8| {
        let memory = device.alloc(BLOCK * BLOCKS).unwrap();
        let host = buffer(seed);
        let op = CopyOp { src: host.as_ptr() as u64, dst: memory.region().addr, len: host.len() as u64 };
        unsafe { device.copy_now(&[op], soon()) }.unwrap();
        (memory, host)
    };
    let (initiator, target) = (gpu_agent("gpu-initiator"), gpu_agent("gpu-target"));
    let ((local_gpu, local_gpu_bytes), (remote_gpu, _)) = (upload(1), upload(2));
    let (local_host, remote_host) = (buffer(3), buffer(4));
    let _regs = [
        initiator.register(local_gpu.clone()).unwrap(),
        initiator.register(local_host.clone()).unwrap(),
        target.register(remote_gpu.clone()).unwrap(),
        target.register(remote_host.clone()).unwrap(),
    ];
    initiator.add_peer(&target.metadata()).unwrap();
    let locals = initiator.prepare_local(&[blocks(&*local_gpu), blocks(&*local_host)].concat()).unwrap();
    let remotes =
        initiator.prepare_remote("gpu-target", &[blocks(&*remote_gpu), blocks(&*remote_host)].concat()).unwrap();

    let xfer = initiator.write(&locals, &[0, 1], &remotes, &[0, 1], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Tcp);
    let check = buffer(0);
    let op = CopyOp { src: remote_gpu.region().addr, dst: check.as_ptr() as u64, len: check.len() as u64 };
    unsafe { device.copy_now(&[op], soon()) }.unwrap();
    assert!(check.to_vec()[..2 * BLOCK] == local_gpu_bytes.to_vec()[..2 * BLOCK], "GPU blocks arrived");

    let xfer = initiator.write(&locals, &[BLOCKS + 2], &remotes, &[BLOCKS + 5], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!(xfer.transport(), TransportKind::Shm);
    assert_eq!(block_of(&remote_host, 5), block_of(&local_host, 2));
}

/// Threads of this process whose (15-byte) name is `name`. Threads of other tests come and go
/// meanwhile: one that exits before its name is read does not count.
fn threads_named(name: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim() == name))
        .count()
}

#[test]
fn a_link_that_is_never_used_starts_no_threads() {
    // The TCP transport's progress threads are named `kvf-tcp-<agent>-<n>`, cut by the kernel to
    // 15 bytes; they start on the transport's first frame.
    let p = pair("qz7-idle-initiator", "qz7-idle-target", &[None, Some(&[TransportKind::Tcp])]);
    let (initiator, local, remote, remote_tcp) = (&p.initiator, &*p.local, &*p.remotes[0], &*p.remotes[1]);
    let locals = initiator.prepare_local(&blocks(local)).unwrap();
    let remotes = initiator.prepare_remote("qz7-idle-target", &[blocks(remote), blocks(remote_tcp)].concat()).unwrap();
    initiator.write(&locals, &[0], &remotes, &[0], soon()).unwrap().wait().unwrap();
    assert_eq!(threads_named("kvf-tcp-qz7-idl"), 0, "the TCP link to a peer reached over shm stays idle");
    initiator.write(&locals, &[1], &remotes, &[BLOCKS + 1], soon()).unwrap().wait().unwrap();
    assert!(threads_named("kvf-tcp-qz7-idl") > 0, "its first transfer starts the TCP transport's threads");
}
