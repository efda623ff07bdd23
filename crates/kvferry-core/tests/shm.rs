//! Two agents in one process on the shared-memory transport, through the public API only: both
//! ways of reaching memory (a mapped memfd, cross-memory attach), the owner's checks, and the
//! fallback to TCP.

use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::host::{HostAllocOptions, HostBuffer};
use kvferry_core::metadata::AgentMetadata;
use kvferry_core::{Agent, AgentConfig, Deadline, ErrorCode, MemKind, MemRegion, TransportKind};

const BLOCK: usize = 4096;

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

fn buffer(len: usize, shareable: bool, seed: u8) -> Arc<HostBuffer> {
    let options = HostAllocOptions::new().with_pin(false).with_shareable(shareable);
    let b = Arc::new(HostBuffer::alloc(len, &options).unwrap());
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
    b.write_at(0, &data).unwrap();
    b
}

fn blocks(buf: &HostBuffer) -> Vec<MemRegion> {
    (0..buf.len() / BLOCK).map(|i| MemRegion::host(unsafe { buf.as_ptr().add(i * BLOCK) }, BLOCK)).collect()
}

fn block_of(buf: &HostBuffer, i: usize) -> Vec<u8> {
    buf.to_vec()[i * BLOCK..(i + 1) * BLOCK].to_vec()
}

struct Pair {
    initiator: Agent,
    target: Agent,
    local_buf: Arc<HostBuffer>,
    remote_buf: Arc<HostBuffer>,
    _regs: Vec<kvferry_core::Registration>,
}

/// The target's memory is shareable (mapped) or plain (cross-memory attach).
fn pair(shareable: bool, blocks: usize) -> Pair {
    let initiator = Agent::new(AgentConfig::new("shm-initiator")).unwrap();
    let target = Agent::new(AgentConfig::new("shm-target")).unwrap();
    let local_buf = buffer(BLOCK * blocks, false, 1);
    let remote_buf = buffer(BLOCK * blocks, shareable, 2);
    let regs = vec![initiator.register(local_buf.clone()).unwrap(), target.register(remote_buf.clone()).unwrap()];
    initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(initiator.peer_transport("shm-target"), Some(TransportKind::Shm));
    Pair { initiator, target, local_buf, remote_buf, _regs: regs }
}

fn read_and_write_byte_exact(shareable: bool, mode: &str) {
    let p = pair(shareable, 32);
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
    let xfer = p.initiator.read(&local, &[0, 1, 2], &remote, &[7, 3, 9], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Shm, Some(mode)));
    for (l, r) in [(0, 7), (1, 3), (2, 9)] {
        assert_eq!(block_of(&p.local_buf, l), block_of(&p.remote_buf, r), "read block {l} ← {r}");
    }
    let untouched = block_of(&p.local_buf, 3);
    p.initiator.write(&local, &[3, 4], &remote, &[20, 10], soon()).unwrap().wait().unwrap();
    assert_eq!(block_of(&p.remote_buf, 20), untouched);
    assert_eq!(block_of(&p.remote_buf, 10), block_of(&p.local_buf, 4));
}

#[test]
fn mapped_memory_moves_byte_exact_both_ways() {
    read_and_write_byte_exact(true, "mapped");
}

#[test]
fn cross_memory_attach_moves_byte_exact_both_ways() {
    read_and_write_byte_exact(false, "cross-memory");
}

#[test]
fn large_batches_split_over_copy_threads_byte_exact() {
    for shareable in [true, false] {
        // 16 MiB in 4 KiB blocks, reversed so that none coalesce.
        let p = pair(shareable, 4096);
        let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
        let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
        let all: Vec<usize> = (0..4096).collect();
        let reversed: Vec<usize> = all.iter().rev().copied().collect();
        p.initiator.read(&local, &all, &remote, &reversed, soon()).unwrap().wait().unwrap();
        let (got, want) = (p.local_buf.to_vec(), p.remote_buf.to_vec());
        for i in 0..4096 {
            let j = 4095 - i;
            assert!(got[i * BLOCK..(i + 1) * BLOCK] == want[j * BLOCK..(j + 1) * BLOCK], "block {i}");
        }
    }
}

#[test]
fn notifications_follow_the_data() {
    let p = pair(true, 4);
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&p.remote_buf)).unwrap();
    let mut req = kvferry_core::TransferRequest::new(
        kvferry_core::Op::Write,
        (&local, &[0, 1, 2, 3]),
        (&remote, &[0, 1, 2, 3]),
        soon(),
    );
    req.notification = Some(b"written");
    p.initiator.post(req).unwrap().wait().unwrap();
    let got = p.target.wait_notifications(soon());
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].from.as_str(), got[0].data.as_slice()), ("shm-initiator", &b"written"[..]));
    assert_eq!(p.remote_buf.to_vec(), p.local_buf.to_vec());
    p.initiator.notify("shm-target", b"alone", soon()).unwrap().wait().unwrap();
    assert_eq!(p.target.wait_notifications(soon())[0].data, b"alone");
}

/// Metadata of the target with a region claimed larger than registered and, after that, a forged
/// key: the owner refuses both, and nothing is written.
fn the_owner_rejects_what_lying_metadata_allows(shareable: bool) {
    let p = pair(shareable, 8);
    let before = p.remote_buf.to_vec();
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "liar".into();
    md.regions[0].region.len *= 2;
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("liar"), Some(TransportKind::Shm));
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let beyond =
        MemRegion { addr: p.remote_buf.as_ptr() as u64 + 8 * BLOCK as u64, len: BLOCK as u64, kind: MemKind::Host };
    let inside = MemRegion { len: BLOCK as u64, ..p.remote_buf.region() };
    let remote = p.initiator.prepare_remote("liar", &[inside, beyond]).unwrap();
    let e = p.initiator.write(&local, &[0, 1], &remote, &[0, 1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteOutOfRange, "{e}");
    assert!(e.to_string().contains("descriptor 1"), "{e}");

    let shm_key = md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Shm).unwrap();
    shm_key.1[0] ^= 1;
    md.generation += 1;
    p.initiator.add_peer(&md.encode()).unwrap();
    let remote = p.initiator.prepare_remote("liar", &[inside, inside]).unwrap();
    let e = p.initiator.write(&local, &[0, 2], &remote, &[0, 1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");
    assert!(e.to_string().contains("descriptor 0"), "{e}");
    assert!(p.remote_buf.to_vec() == before, "a rejected write touched the target's memory");
}

#[test]
fn the_owner_rejects_out_of_range_and_forged_descriptors_mapped() {
    the_owner_rejects_what_lying_metadata_allows(true);
}

#[test]
fn the_owner_rejects_out_of_range_and_forged_descriptors_cross_memory() {
    the_owner_rejects_what_lying_metadata_allows(false);
}

#[test]
fn a_dropped_registration_is_revoked_even_after_it_was_mapped() {
    let p = pair(true, 4);
    let extra = buffer(4 * BLOCK, true, 9);
    let reg = p.target.register(extra.clone()).unwrap();
    p.initiator.add_peer(&p.target.metadata()).unwrap();
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("shm-target", &blocks(&extra)).unwrap();
    p.initiator.read(&local, &[0], &remote, &[1], soon()).unwrap().wait().unwrap();
    assert_eq!(block_of(&p.local_buf, 0), block_of(&extra, 1));
    drop(reg);
    let before = extra.to_vec();
    let e = p.initiator.write(&local, &[2], &remote, &[1], soon()).unwrap().wait().unwrap_err();
    assert_eq!(e.code(), ErrorCode::RemoteUnknownKey, "{e}");
    assert!(extra.to_vec() == before);
}

#[test]
fn a_peer_on_another_host_is_reached_over_tcp() {
    let p = pair(true, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "elsewhere".into();
    let shm = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap();
    shm.address = format!("00000000-0000-0000-0000-000000000000{}", &shm.address[36..]);
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("elsewhere"), Some(TransportKind::Tcp));
    let local = p.initiator.prepare_local(&blocks(&p.local_buf)).unwrap();
    let remote = p.initiator.prepare_remote("elsewhere", &blocks(&p.remote_buf)).unwrap();
    let xfer = p.initiator.read(&local, &[0], &remote, &[3], soon()).unwrap();
    xfer.wait().unwrap();
    assert_eq!((xfer.transport(), xfer.mode()), (TransportKind::Tcp, None));
    assert_eq!(block_of(&p.local_buf, 0), block_of(&p.remote_buf, 3));
}

#[test]
fn an_unreachable_socket_falls_back_to_tcp() {
    let p = pair(false, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "no-socket".into();
    let shm = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap();
    shm.address.push_str("-gone");
    p.initiator.add_peer(&md.encode()).unwrap();
    assert_eq!(p.initiator.peer_transport("no-socket"), Some(TransportKind::Tcp));
}

#[test]
fn a_malformed_shm_endpoint_or_key_is_an_error_when_nothing_else_is_shared() {
    let initiator = Agent::new(AgentConfig { tcp: None, ..AgentConfig::new("shm-only") }).unwrap();
    let p = pair(true, 4);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap().address = "no-slashes".into();
    assert_eq!(initiator.add_peer(&md.encode()).unwrap_err().code(), ErrorCode::InvalidArgument);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.regions[0].keys.iter_mut().find(|(k, _)| *k == TransportKind::Shm).unwrap().1.push(0);
    assert_eq!(initiator.add_peer(&md.encode()).unwrap_err().code(), ErrorCode::InvalidArgument);
}

// Hostile and vanishing peers in other processes: this test binary re-executed as a child.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use kvferry_core::AuthConfig;
use kvferry_core::transport::shm::ShmConfig;

const SECRET: &str = "the shm process tests' secret...";

fn with_secret(name: &str, shm: ShmConfig) -> AgentConfig {
    AgentConfig {
        auth: AuthConfig::Secret(SECRET.as_bytes().to_vec()),
        tcp: None,
        shm: Some(shm),
        ..AgentConfig::new(name)
    }
}

fn spawn_child(role: &str, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_entry", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("KVFERRY_SHM_CHILD", format!("{role}:{arg}"))
        .env("KVFERRY_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The lines a child prints, as they come, without libtest's (which puts the test's name before
/// the first output).
fn lines(child: &mut Child) -> impl Iterator<Item = String> + use<> {
    let lines = BufReader::new(child.stdout.take().unwrap()).lines().map(|l| l.unwrap());
    lines
        .map(|l| match l.rfind(" ... ") {
            Some(at) => l[at + 5..].to_string(),
            None => l,
        })
        .filter(|l| !l.is_empty() && !l.starts_with("running "))
}

fn metadata_file(agent: &Agent, tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("kvferry-shm-{tag}-{}.md", std::process::id()));
    std::fs::write(&path, agent.metadata()).unwrap();
    path
}

/// Poll `check` every 10 ms until it holds or `limit` passes; whether it held.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const WRITE_BLOCK: usize = 1 << 20;
const WRITE_BLOCKS: usize = 64;

#[test]
#[ignore = "run by the process tests as a child"]
fn child_process_entry() {
    let Ok(role) = std::env::var("KVFERRY_SHM_CHILD") else { return };
    let (role, arg) = role.split_once(':').unwrap();
    match role {
        // WRITEs the whole of the parent's registration until refused, then says how.
        // `writer-shared`: from a shareable buffer, which the owner copies through a mapping.
        "writer" | "writer-shared" => {
            let agent = Agent::new(AgentConfig { tcp: None, ..AgentConfig::new("shm-writer") }).unwrap();
            let local = buffer(WRITE_BLOCK * WRITE_BLOCKS, role == "writer-shared", 0);
            local.write_at(0, &vec![0xee; local.len()]).unwrap();
            let _reg = agent.register(local.clone()).unwrap();
            let peer = agent.add_peer(&std::fs::read(arg).unwrap()).unwrap();
            assert_eq!(agent.peer_transport(&peer), Some(TransportKind::Shm));
            let md = AgentMetadata::decode(&std::fs::read(arg).unwrap()).unwrap();
            let region = md.regions[0].region;
            let at = |i: usize| MemRegion {
                addr: region.addr + (i * WRITE_BLOCK) as u64,
                len: WRITE_BLOCK as u64,
                ..region
            };
            let remote = agent.prepare_remote(&peer, &(0..WRITE_BLOCKS).map(at).collect::<Vec<_>>()).unwrap();
            let mine: Vec<MemRegion> = (0..WRITE_BLOCKS)
                .map(|i| MemRegion::host(unsafe { local.as_ptr().add(i * WRITE_BLOCK) }, WRITE_BLOCK))
                .collect();
            let local_descs = agent.prepare_local(&mine).unwrap();
            let all: Vec<usize> = (0..WRITE_BLOCKS).collect();
            for n in 0.. {
                let deadline = Deadline::after(Duration::from_secs(60));
                match agent.write(&local_descs, &all, &remote, &all, deadline).unwrap().wait() {
                    Ok(()) if n == 0 => println!("wrote"),
                    Ok(()) => {}
                    Err(e) => {
                        println!("refused {:?}", e.code());
                        return;
                    }
                }
            }
        }
        // Listens with a backlog of 0 and never accepts.
        "backlog" => {
            let name = format!("kvferry-test-backlog-{}", std::process::id());
            let fd = abstract_socket();
            let (addr, len) = abstract_addr(&name);
            unsafe {
                assert_eq!(libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len), 0);
                assert_eq!(libc::listen(fd, 0), 0);
            }
            println!("listening {name}");
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        }
        // Reads and writes over shm, then exits without dropping anything.
        "initiator" => {
            let agent = Agent::new(AgentConfig { tcp: None, ..AgentConfig::new("shm-leaver") }).unwrap();
            let local = buffer(2 * BLOCK, false, 3);
            let _reg = agent.register(local.clone()).unwrap();
            let peer = agent.add_peer(&std::fs::read(arg).unwrap()).unwrap();
            let md = AgentMetadata::decode(&std::fs::read(arg).unwrap()).unwrap();
            let remote =
                agent.prepare_remote(&peer, &[MemRegion { len: BLOCK as u64, ..md.regions[0].region }]).unwrap();
            let l = agent.prepare_local(&blocks(&local)).unwrap();
            agent.read(&l, &[0], &remote, &[0], soon()).unwrap().wait().unwrap();
            agent.write(&l, &[1], &remote, &[0], soon()).unwrap().wait().unwrap();
            println!("done");
            std::process::exit(0);
        }
        // An owner that counts its threads and descriptors before and after initiators come and go.
        "owner" => {
            let agent = Agent::new(with_secret("shm-counter", ShmConfig::default())).unwrap();
            let memory = buffer(4 * BLOCK, false, 4);
            let _reg = agent.register(memory).unwrap();
            let md = metadata_file(&agent, "counter");
            let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
            let before = (count("/proc/self/task"), count("/proc/self/fd"));
            for _ in 0..3 {
                let mut child = spawn_child("initiator", md.to_str().unwrap());
                assert!(lines(&mut child).any(|l| l == "done"), "an initiator failed");
                assert!(child.wait().unwrap().success());
            }
            let now = || (count("/proc/self/task"), count("/proc/self/fd"));
            let clean = eventually(Duration::from_secs(20), || {
                let (threads, fds) = now();
                threads <= before.0 && fds <= before.1
            });
            std::fs::remove_file(md).unwrap();
            println!("counts {before:?} -> {:?}", now());
            assert!(clean, "initiators that exited left threads or descriptors: {before:?} -> {:?}", now());
            println!("clean");
        }
        other => panic!("unknown child role {other}"),
    }
}

fn abstract_socket() -> libc::c_int {
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    fd
}

fn abstract_addr(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &b) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *dst = b as libc::c_char;
    }
    (addr, (std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len()) as libc::socklen_t)
}

fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
}

/// Finding: a peer stopped inside a multi-syscall batch wrote into memory after its
/// deregistration returned. Now the owner copies every WRITE itself: the drop returns without
/// waiting on the stopped peer, and nothing the peer does afterwards changes a byte.
#[test]
fn a_stopped_writer_cannot_touch_a_dropped_registration() {
    stopped_writer_cannot_touch_a_dropped_registration("writer");
}

/// The same when the owner copies through its mapping of the writer's shared file.
#[test]
fn a_stopped_writer_from_a_shared_file_cannot_touch_a_dropped_registration() {
    stopped_writer_cannot_touch_a_dropped_registration("writer-shared");
}

fn stopped_writer_cannot_touch_a_dropped_registration(role: &str) {
    // request_timeout is far above the bound asserted for the drop: the drop must not wait it out.
    let shm = ShmConfig { request_timeout: Duration::from_secs(120), ..ShmConfig::default() };
    let target = Agent::new(with_secret("shm-victim", shm)).unwrap();
    let memory = buffer(WRITE_BLOCK * WRITE_BLOCKS, false, 0);
    memory.write_at(0, &vec![0; memory.len()]).unwrap();
    let reg = target.register(memory.clone()).unwrap();
    let md = metadata_file(&target, &format!("victim-{role}"));
    let mut child = spawn_child(role, md.to_str().unwrap());
    let mut said = lines(&mut child);
    assert_eq!(said.next().as_deref(), Some("wrote"), "the writer's first WRITE failed");
    assert!(memory.to_vec().iter().all(|&b| b == 0xee), "the first WRITE did not land");
    // Stop it while it keeps writing, most likely mid-request.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGSTOP) };
    assert!(eventually(Duration::from_secs(10), || stopped(child.id())), "the writer did not stop");
    let started = Instant::now();
    drop(reg);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "deregistration waited {took:?} for a stopped peer");
    memory.write_at(0, &vec![0x5a; memory.len()]).unwrap();
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
    let rest: Vec<String> = said.collect();
    assert!(child.wait().unwrap().success(), "the writer failed: {rest:?}");
    std::fs::remove_file(md).unwrap();
    assert!(rest.iter().any(|l| l == "refused RemoteUnknownKey"), "{rest:?}");
    let after = memory.to_vec();
    let changed = after.iter().filter(|&&b| b != 0x5a).count();
    assert_eq!(changed, 0, "{changed} bytes changed after the registration was dropped");
}

/// Finding: add_peer hung on an shm endpoint whose socket backlog was full.
#[test]
fn an_endpoint_with_a_full_backlog_fails_add_peer_by_the_deadline() {
    let mut child = spawn_child("backlog", "");
    let mut said = lines(&mut child);
    let name = said.next().and_then(|l| l.strip_prefix("listening ").map(str::to_string)).expect("the child listens");
    // Fill the backlog: non-blocking connects until the kernel says it is full.
    let (addr, len) = abstract_addr(&name);
    let mut queued = Vec::new();
    loop {
        let fd = abstract_socket();
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
        queued.push(fd);
        if r != 0 {
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN));
            break;
        }
        assert!(queued.len() < 1000, "the backlog never filled");
    }
    let shm = ShmConfig { connect_timeout: Duration::from_millis(500), ..ShmConfig::default() };
    let initiator = Agent::new(with_secret("shm-patient", shm)).unwrap();
    let p = pair(false, 1);
    let mut md = AgentMetadata::decode(&p.target.metadata()).unwrap();
    md.name = "full-backlog".into();
    let endpoint = md.endpoints.iter_mut().find(|e| e.kind == TransportKind::Shm).unwrap();
    let boot = endpoint.address.split('/').next().unwrap().to_string();
    endpoint.address = format!("{boot}/{}/{name}", child.id());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(initiator.add_peer(&md.encode()).map(|_| ())));
    let got = rx.recv_timeout(Duration::from_secs(60)).expect("add_peer still hangs on a full backlog");
    let e = got.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unsupported, "{e}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    for fd in queued {
        unsafe { libc::close(fd) };
    }
    drop(child.stdin.take());
    said.for_each(drop);
    assert!(child.wait().unwrap().success());
}

/// Finding: each initiator that exited left a thread and a descriptor in the owner.
#[test]
fn initiators_that_exit_leave_no_thread_or_descriptor_in_the_owner() {
    // The owner runs in a child of its own, so other tests' threads do not blur its counts.
    let mut owner = spawn_child("owner", "");
    let said: Vec<String> = lines(&mut owner).collect();
    assert!(owner.wait().unwrap().success(), "{said:?}");
    println!("owner: {said:?}");
    assert!(said.iter().any(|l| l == "clean"), "{said:?}");
}
