use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::owner::PROBE;
use super::pull::probe_cross_memory;
use super::wire::{self, Reach};
use super::*;
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::sync::Locked;
use crate::transport::RejectReason;
use crate::transport::frame;

#[test]
fn endpoint_addresses_parse_or_are_refused() {
    let a = ShmAddress::parse("3feb82a9-ffa6/1234/kvferry-shm-1234-ab").unwrap();
    assert_eq!((a.boot_id, a.pid, a.socket), ("3feb82a9-ffa6", 1234, "kvferry-shm-1234-ab"));
    for bad in ["", "boot", "boot/notapid/sock", "boot/12/", "boot/12"] {
        assert!(ShmAddress::parse(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn keys_carry_how_the_region_is_reached() {
    for reach in [Reach::Mapped, Reach::CrossMemory] {
        let bytes = wire::encode_key(0x0123_4567_89ab_cdef_u128 << 40, reach);
        assert_eq!(wire::decode_key(&bytes), Some((0x0123_4567_89ab_cdef_u128 << 40, reach)));
    }
    assert_eq!(wire::decode_key(&[0; 16]), None);
    assert_eq!(wire::decode_key(&[0; 18]), None);
    let mut unknown = wire::encode_key(7, Reach::Mapped);
    unknown[16] = 9;
    assert_eq!(wire::decode_key(&unknown), None);
}

#[test]
fn a_memfd_crosses_a_socket_and_maps_the_same_pages() {
    let (a, b) = UnixStream::pair().unwrap();
    let buf = HostBuffer::alloc(3 * 4096, &HostAllocOptions::new().with_pin(false).with_shareable(true)).unwrap();
    buf.write_at(5000, b"shared").unwrap();
    wire::send_with_fd(&a, b"hello, fd", buf.share_fd().unwrap()).unwrap();
    let mut got = [0u8; 9];
    let fd = wire::recv_with_fd(&b, &mut got).unwrap().expect("a descriptor arrives");
    assert_eq!(&got, b"hello, fd");
    let mapped = HostBuffer::map_shared(fd.as_fd()).unwrap();
    assert_eq!(mapped.len(), 3 * 4096);
    let mut word = [0u8; 6];
    mapped.read_at(5000, &mut word).unwrap();
    assert_eq!(&word, b"shared");
    mapped.write_at(0, b"back").unwrap();
    let mut back = [0u8; 4];
    buf.read_at(0, &mut back).unwrap();
    assert_eq!(&back, b"back");

    // Without a descriptor attached, none is returned; a closed peer is end of file.
    (&a).write_all(b"no fd").unwrap();
    let mut plain = [0u8; 5];
    assert!(wire::recv_with_fd(&b, &mut plain).unwrap().is_none());
    drop(a);
    let err = wire::recv_with_fd(&b, &mut plain).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn the_cross_memory_probe_checks_the_process() {
    probe_cross_memory(std::process::id(), PROBE.as_ptr() as u64).unwrap();
    let wrong_word = &PROBE as *const _ as u64 + 8;
    let err = probe_cross_memory(std::process::id(), wrong_word);
    assert!(err.is_err(), "reading a word other than the probe must fail");
    // No process has pid 0 for process_vm_readv.
    assert!(probe_cross_memory(0, PROBE.as_ptr() as u64).is_err());
}

#[test]
fn a_revoked_slot_is_no_longer_held_and_a_reused_one_does_not_carry_the_old_tag() {
    use super::lease::{LeaseFile, Leases};

    let owner = Leases::new().unwrap();
    let view = LeaseFile::map(owner.fd()).unwrap();
    let slot = owner.open(0xabc).unwrap();
    assert_eq!(owner.open(0xabc), Some(slot), "one slot per registration and connection");
    assert!(view.held(slot, 0xabc));
    assert!(!view.held(slot, 0xdef), "a wrong tag is not held");
    // Revocation does not wait for anyone: the initiator finds out at its next check.
    owner.revoke(0xabc);
    assert!(!view.held(slot, 0xabc));
    let reused = owner.open(0x123).unwrap();
    assert_eq!(reused, slot);
    assert!(!view.held(reused, 0xabc) && view.held(reused, 0x123));
    assert!(view.slot(u32::MAX).is_none() && !view.held(u32::MAX, 0));
}

fn secret_auth(secret: &str) -> crate::auth::Auth {
    crate::auth::Auth::resolve(&crate::auth::AuthConfig::Secret(secret.as_bytes().to_vec())).unwrap()
}

const SECRET: &str = "the shm tests' cluster secret....";

fn agent_with_secret(name: &str) -> crate::Agent {
    let config = crate::AgentConfig {
        auth: crate::auth::AuthConfig::Secret(SECRET.as_bytes().to_vec()),
        ..crate::AgentConfig::new(name)
    };
    crate::Agent::new(config).unwrap()
}

fn shm_socket(agent: &crate::Agent) -> String {
    let md = crate::metadata::AgentMetadata::decode(&agent.metadata()).unwrap();
    let shm = md.endpoints.iter().find(|e| e.kind == TransportKind::Shm).unwrap();
    socket_of(&shm.address)
}

/// The abstract socket name of an shm endpoint address (`boot-id/pid/socket`).
fn socket_of(address: &str) -> String {
    address.splitn(3, '/').nth(2).unwrap().to_string()
}

/// This test binary again, running only the ignored test `entry` (a hostile peer's body) with
/// `env` set, its stdin and stdout piped.
fn spawn_entry(entry: &str, env: (&str, String)) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", entry, "--ignored", "--nocapture", "--test-threads", "1"])
        .env(env.0, env.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The hostile local process of `a_hostile_lease_holder_fails_only_itself`: without the secret it
/// gets nothing; with it, it revokes every slot of its lease file, then holds its connection.
#[test]
#[ignore = "run by a_hostile_lease_holder_fails_only_itself in a child process"]
fn hostile_lease_child() {
    use std::io::Read;
    let Ok(socket) = std::env::var("KVFERRY_SHM_HOSTILE") else { return };
    let deadline = || crate::Deadline::after(std::time::Duration::from_secs(10));
    // A hello that skips the handshake: refused with the handshake's answer, no file attached.
    let mut raw = link::connect_by(&socket, deadline()).unwrap();
    raw.write_all(&wire::encode_hello("raw", 0)).unwrap();
    let mut answer = [0u8; 72];
    let fd = wire::recv_with_fd(&raw, &mut answer).unwrap();
    assert!(fd.is_none() && &answer[..4] == b"KVFA" && answer[6] != 0, "a hello without the secret was answered");
    // The wrong secret: refused before any hello answer.
    let wrong = link::connect(&socket, "intruder", &secret_auth("not the cluster secret, 32 bytes"), deadline());
    assert!(matches!(wrong, Err(crate::transport::ConnectError::Unauthenticated(_))), "{:?}", wrong.err());
    println!("refused");
    let conn = link::connect(&socket, "hostile", &secret_auth(SECRET), deadline()).map_err(|e| e.to_string()).unwrap();
    conn.leases.revoke_all();
    println!("revoked");
    // Hold the connection (and the lease file) until the parent is done.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(conn);
}

#[test]
fn a_hostile_lease_holder_fails_only_itself() {
    use std::io::BufRead;

    let target = agent_with_secret("lease-target");
    let initiator = agent_with_secret("lease-honest");
    let options = HostAllocOptions::new().with_pin(false);
    let remote = Arc::new(HostBuffer::alloc(2 * 4096, &options.with_shareable(true)).unwrap());
    let plain = Arc::new(HostBuffer::alloc(4096, &options).unwrap());
    remote.write_at(0, &[0x11; 4096]).unwrap();
    plain.write_at(0, &[0x22; 4096]).unwrap();
    let local = Arc::new(HostBuffer::alloc(2 * 4096, &options).unwrap());
    let _regs = [target.register(remote.clone()).unwrap(), target.register(plain.clone()).unwrap()];
    let _local_reg = initiator.register(local.clone()).unwrap();
    initiator.add_peer(&target.metadata()).unwrap();
    assert_eq!(initiator.peer_transport("lease-target"), Some(TransportKind::Shm));
    let local_blocks = initiator
        .prepare_local(&[
            MemRegion::host(local.as_ptr(), 4096),
            MemRegion::host(unsafe { local.as_ptr().add(4096) }, 4096),
        ])
        .unwrap();
    let remote_blocks = initiator
        .prepare_remote(
            "lease-target",
            &[
                MemRegion::host(remote.as_ptr(), 4096),
                MemRegion::host(unsafe { remote.as_ptr().add(4096) }, 4096),
                plain.region(),
            ],
        )
        .unwrap();
    let soon = || crate::Deadline::after(std::time::Duration::from_secs(10));
    // Granted before the hostile process acts: the honest peer's slots exist already.
    initiator.read(&local_blocks, &[0, 1], &remote_blocks, &[0, 2], soon()).unwrap().wait().unwrap();

    let mut child =
        spawn_entry("transport::shm::tests::hostile_lease_child", ("KVFERRY_SHM_HOSTILE", shm_socket(&target)));
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        // libtest prints the test's name on the line of its first output.
        let line = line.unwrap();
        if let Some(step) = ["refused", "revoked"].into_iter().find(|s| line.ends_with(s)) {
            said.push(step);
        }
        if line.ends_with("revoked") {
            break;
        }
    }
    assert_eq!(said, ["refused", "revoked"], "the hostile child did not get through its steps");

    // The honest peer's reads and writes are untouched by the revocations in the other file.
    local.write_at(0, &[0; 8192]).unwrap();
    initiator.read(&local_blocks, &[0, 1], &remote_blocks, &[0, 2], soon()).unwrap().wait().unwrap();
    assert!(local.to_vec()[..4096].iter().all(|&b| b == 0x11) && local.to_vec()[4096..].iter().all(|&b| b == 0x22));
    local.write_at(0, &[0x33; 4096]).unwrap();
    initiator.write(&local_blocks, &[0], &remote_blocks, &[1], soon()).unwrap().wait().unwrap();
    assert!(remote.to_vec()[4096..].iter().all(|&b| b == 0x33));
    drop(child.stdin.take());
    lines.for_each(drop);
    assert!(child.wait().unwrap().success(), "the hostile child failed");
}

#[test]
fn a_read_that_raced_a_deregistration_fails_instead_of_succeeding() {
    use std::sync::Mutex;
    let target = agent_with_secret("race-target");
    let initiator = agent_with_secret("race-initiator");
    let options = HostAllocOptions::new().with_pin(false);
    for shareable in [true, false] {
        let remote = Arc::new(HostBuffer::alloc(4096, &options.with_shareable(shareable)).unwrap());
        let local = Arc::new(HostBuffer::alloc(4096, &options).unwrap());
        let reg = Arc::new(Mutex::new(Some(target.register(remote.clone()).unwrap())));
        let _local_reg = initiator.register(local.clone()).unwrap();
        initiator.add_peer(&target.metadata()).unwrap();
        let l = initiator.prepare_local(&[local.region()]).unwrap();
        let r = initiator.prepare_remote("race-target", &[remote.region()]).unwrap();
        // Deregister between the copy and the lease check: the copy happened, the READ must fail.
        let dropped = reg.clone();
        *link::AFTER_READ_COPY.locked() = Some(("race-target".into(), Box::new(move || drop(dropped.locked().take()))));
        let e = initiator.read(&l, &[0], &r, &[0], crate::Deadline::after(std::time::Duration::from_secs(10)));
        let e = e.unwrap().wait().unwrap_err();
        *link::AFTER_READ_COPY.locked() = None;
        assert_eq!(e.code(), crate::ErrorCode::RemoteUnknownKey, "{e}");
        assert!(reg.locked().is_none(), "the registration was dropped during the READ");
    }
}

/// An owner and an initiator transport with the shm tests' secret, and the initiator's link.
struct Transports {
    owner: ShmTransport,
    initiator: ShmTransport,
}

fn transports(config: ShmConfig) -> Transports {
    let start = |name: &str| {
        let queue = Arc::new(crate::transport::NotificationQueue::with_limits(16, 1 << 20));
        ShmTransport::start(name, config.clone(), secret_auth(SECRET), queue).unwrap()
    };
    Transports { owner: start("pull-owner"), initiator: start("pull-initiator") }
}

/// Register `buf` with `transport` as the agent does, owning the memory.
fn register(transport: &ShmTransport, buf: &Arc<HostBuffer>) -> Vec<u8> {
    let memory: Arc<dyn crate::memory::Memory> = buf.clone();
    transport.register(buf.region(), Some(memory)).unwrap()
}

fn patterned(len: usize, shareable: bool, seed: u8) -> Arc<HostBuffer> {
    let options = HostAllocOptions::new().with_pin(false).with_shareable(shareable);
    let buf = Arc::new(HostBuffer::alloc(len, &options).unwrap());
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
    buf.write_at(0, &data).unwrap();
    buf
}

/// Post a WRITE of `ops` on `link` and wait for it.
fn write_ops(
    link: &Arc<dyn PeerLink>,
    ops: Vec<crate::transport::XferOp>,
) -> std::result::Result<(), crate::transport::TransferError> {
    let bytes = ops.iter().map(|o| o.len).sum();
    let deadline = crate::Deadline::after(std::time::Duration::from_secs(20));
    let completion =
        Arc::new(crate::transport::Completion::new("pull-owner", crate::transport::Op::Write, bytes, None, deadline));
    link.post(crate::transport::Batch { ops, completion: completion.clone(), keep_alive: Arc::new(()) }).unwrap();
    completion.wait()
}

fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = crate::Deadline::after(std::time::Duration::from_secs(10));
    while !deadline.expired() {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    check()
}

/// Descriptors of this process open on the same file as `fd` (itself included).
fn descriptors_of(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let own = inode(std::path::Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())));
    let entries = std::fs::read_dir("/proc/self/fd").unwrap();
    entries.filter_map(|e| e.ok()).filter(|e| own.is_some() && inode(&e.path()) == own).count()
}

#[test]
fn a_write_from_a_shareable_source_is_copied_from_its_file_byte_exact() {
    use crate::transport::XferOp;
    use std::sync::atomic::Ordering;

    let t = transports(ShmConfig { copy_threads: Some(2), ..ShmConfig::default() });
    let target = patterned(8 << 20, false, 0);
    let key = register(&t.owner, &target);
    let shared_src = patterned(4 << 20, true, 0x5a);
    let plain_src = patterned(1 << 20, false, 0xa5);
    let src_key = register(&t.initiator, &shared_src);
    register(&t.initiator, &plain_src);
    let remote = crate::transport::RemoteRegion { region: target.region(), key };
    let link = t.initiator.link("pull-owner", &t.owner.endpoint(), vec![remote]).unwrap();

    // 64 blocks of 64 KiB from the shared file, reversed so that the owner's copy is split into
    // many pieces over its pool, and two from plain memory in the same request.
    let block = 64u64 << 10;
    let mut ops: Vec<XferOp> = (0..64)
        .map(|i| XferOp {
            local_addr: shared_src.as_ptr() as u64 + i * block,
            remote_region: 0,
            remote_addr: target.as_ptr() as u64 + (63 - i) * block,
            len: block,
        })
        .collect();
    for i in 0..2 {
        ops.push(XferOp {
            local_addr: plain_src.as_ptr() as u64 + i * block,
            remote_region: 0,
            remote_addr: target.as_ptr() as u64 + (4 << 20) + i * block,
            len: block,
        });
    }
    write_ops(&link, ops).unwrap();
    let (got, shared, plain) = (target.to_vec(), shared_src.to_vec(), plain_src.to_vec());
    let b = block as usize;
    for i in 0..64 {
        assert!(got[(63 - i) * b..(64 - i) * b] == shared[i * b..(i + 1) * b], "shared block {i}");
    }
    assert!(got[4 << 20..(4 << 20) + 2 * b] == plain[..2 * b], "plain blocks");
    let pulled = &t.owner.shared.pulled;
    assert_eq!(
        pulled.mapped.load(Ordering::Relaxed),
        64 * block,
        "the shared source was not copied through its mapping"
    );
    assert_eq!(pulled.cross_memory.load(Ordering::Relaxed), 2 * block);
    // Ours and the owner's: one descriptor each (the processes are one here).
    let file = shared_src.share_fd().unwrap();
    assert_eq!(descriptors_of(file), 2, "the owner does not hold the shared file once");

    // Deregistered, the file is withdrawn from the owner at once, not when the connection ends.
    t.initiator.deregister(&src_key);
    assert!(eventually(|| descriptors_of(file) == 1), "the owner still holds a deregistered source");
    // A new registration of the same memory is shared afresh.
    register(&t.initiator, &shared_src);
    shared_src.write_at(0, &[0x77; 4096]).unwrap();
    let op = XferOp {
        local_addr: shared_src.as_ptr() as u64,
        remote_region: 0,
        remote_addr: target.as_ptr() as u64,
        len: 4096,
    };
    write_ops(&link, vec![op]).unwrap();
    assert!(target.to_vec()[..4096].iter().all(|&b| b == 0x77));
    assert_eq!(pulled.mapped.load(Ordering::Relaxed), 64 * block + 4096);
}

/// The hostile process of `a_hostile_sharer_is_refused_and_the_owner_keeps_serving`: it shares
/// files the owner must not map and names ranges past them, then holds its connection.
#[test]
#[ignore = "run by a_hostile_sharer_is_refused_and_the_owner_keeps_serving in a child process"]
fn hostile_sharer_child() {
    use crate::transport::frame::Header;
    use std::io::Read;
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use wire::WriteOp;

    let Ok(spec) = std::env::var("KVFERRY_SHM_SHARER") else { return };
    let mut parts = spec.split(',');
    let mut next = || parts.next().unwrap().to_string();
    let (socket, key, addr) = (next(), u128::from_str_radix(&next(), 16).unwrap(), next().parse::<u64>().unwrap());
    let deadline = crate::Deadline::after(std::time::Duration::from_secs(10));
    let mut conn = link::connect(&socket, "sharer", &secret_auth(SECRET), deadline).map_err(|e| e.to_string()).unwrap();
    let stream = &mut conn.stream;
    let mut ask = |request: &[u8], fd: Option<BorrowedFd<'_>>| {
        match fd {
            Some(fd) => wire::send_with_fd(stream, request, fd).unwrap(),
            None => stream.write_all(request).unwrap(),
        }
        let mut head = [0u8; frame::HEADER_LEN];
        stream.read_exact(&mut head).unwrap();
        let h = Header::decode(&head);
        (h.tag, h.count)
    };
    let memfd = |flags: libc::c_uint, len: i64, seals: libc::c_int| {
        let raw = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC | flags) };
        assert!(raw >= 0);
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        assert_eq!(unsafe { libc::ftruncate(raw, len) }, 0);
        if seals != 0 {
            assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) }, 0);
        }
        fd
    };
    let sealed = memfd(libc::MFD_ALLOW_SEALING, 4096, libc::F_SEAL_SHRINK);
    let unsealed = memfd(libc::MFD_ALLOW_SEALING, 4096, 0);
    let bad = wire::STATUS_BAD_SOURCE;
    let too_large = RejectReason::TooLarge.to_wire();
    // Files the owner must not map: shrinkable, shorter than announced, none at all; an id in use.
    assert_eq!(ask(&wire::encode_share(1, 4096), Some(unsealed.as_fd())).0, bad, "an unsealed file");
    assert_eq!(ask(&wire::encode_share(1, 8192), Some(sealed.as_fd())).0, bad, "a file shorter than announced");
    assert_eq!(ask(&wire::encode_share(1, 4096), None).0, bad, "no file");
    assert_eq!(ask(&wire::encode_share(wire::FROM_ADDRESS, 4096), Some(sealed.as_fd())).0, bad, "source id 0");
    assert_eq!(ask(&wire::encode_share(1, 4096), Some(sealed.as_fd())).0, 0, "a sealed file");
    assert_eq!(ask(&wire::encode_share(1, 4096), Some(sealed.as_fd())).0, bad, "an id in use");
    // Beyond the owner's limits (2 sources per connection here): refused as too large.
    assert_eq!(ask(&wire::encode_share(2, 4096), Some(sealed.as_fd())).0, 0);
    assert_eq!(ask(&wire::encode_share(3, 4096), Some(sealed.as_fd())).0, too_large, "a third source");
    println!("shares refused");

    let write = |ops: &[WriteOp]| {
        let mut request =
            Header { tag: wire::WRITE, count: ops.len() as u32, payload_len: (ops.len() * wire::WRITE_OP_LEN) as u64 }
                .encode()
                .to_vec();
        ops.iter().for_each(|op| op.encode_into(&mut request));
        request
    };
    let good = WriteOp { key, addr, source: 0, len: 4096, from: 1 };
    let past_end = WriteOp { source: 4000, len: 200, ..good };
    let unknown = WriteOp { from: 7, ..good };
    let wrapping = WriteOp { source: u64::MAX - 10, len: 100, ..good };
    let reason = |r: RejectReason| r.to_wire();
    assert_eq!(ask(&write(&[good, past_end]), None), (reason(RejectReason::OutOfRange), 1), "a range past the file");
    assert_eq!(ask(&write(&[unknown]), None), (reason(RejectReason::UnknownKey), 0), "an unknown source");
    assert_eq!(ask(&write(&[wrapping]), None), (reason(RejectReason::RangeOverflow), 0), "a wrapping range");
    // Withdrawn, a source is unknown; withdrawing it again too.
    assert_eq!(ask(&wire::encode_unshare(2), None).0, 0);
    assert_eq!(ask(&wire::encode_unshare(2), None).0, reason(RejectReason::UnknownKey));
    assert_eq!(ask(&write(&[WriteOp { from: 2, ..good }]), None).0, reason(RejectReason::UnknownKey));
    // A descriptor on a request that takes none closes the connection.
    let mut fresh =
        link::connect(&socket, "sharer", &secret_auth(SECRET), deadline).map_err(|e| e.to_string()).unwrap();
    wire::send_with_fd(&fresh.stream, &write(&[good]), sealed.as_fd()).unwrap();
    let mut head = [0u8; frame::HEADER_LEN];
    assert!(fresh.stream.read_exact(&mut head).is_err(), "a WRITE carrying a descriptor was answered");
    println!("writes refused");
    // Hold the first connection (and its mapping) until the parent is done.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// The child of `a_sharer_of_holes_costs_the_owner_no_page`: it shares a sparse file and WRITEs
/// the owner's registration from its holes, then checks that no page of the file was allocated.
#[test]
#[ignore = "run by a_sharer_of_holes_costs_the_owner_no_page in a child process"]
fn sparse_sharer_child() {
    use crate::transport::frame::Header;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use wire::WriteOp;

    let Ok(spec) = std::env::var("KVFERRY_SHM_SPARSE") else { return };
    let mut parts = spec.split(',');
    let mut next = || parts.next().unwrap().to_string();
    let (socket, key, addr) = (next(), u128::from_str_radix(&next(), 16).unwrap(), next().parse::<u64>().unwrap());
    let deadline = crate::Deadline::after(std::time::Duration::from_secs(10));
    let mut conn = link::connect(&socket, "sparse", &secret_auth(SECRET), deadline).map_err(|e| e.to_string()).unwrap();
    let stream = &mut conn.stream;
    let len = 64u64 << 20;
    let raw = unsafe { libc::memfd_create(c"sparse".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    let sparse = unsafe { OwnedFd::from_raw_fd(raw) };
    assert_eq!(unsafe { libc::ftruncate(raw, len as libc::off_t) }, 0);
    assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
    let answer = |stream: &mut UnixStream| {
        let mut head = [0u8; frame::HEADER_LEN];
        stream.read_exact(&mut head).unwrap();
        Header::decode(&head).tag
    };
    wire::send_with_fd(stream, &wire::encode_share(1, len), sparse.as_fd()).unwrap();
    assert_eq!(answer(stream), 0, "the sparse file was refused");
    // Both pages of the owner's registration, from holes far apart in the file.
    let ops = [
        WriteOp { key, addr, source: 0, len: 4096, from: 1 },
        WriteOp { key, addr: addr + 4096, source: len - 4096, len: 4096, from: 1 },
    ];
    let mut request =
        Header { tag: wire::WRITE, count: 2, payload_len: (2 * wire::WRITE_OP_LEN) as u64 }.encode().to_vec();
    ops.iter().for_each(|op| op.encode_into(&mut request));
    stream.write_all(&request).unwrap();
    assert_eq!(answer(stream), 0, "the WRITE from holes failed");
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(sparse.as_raw_fd(), &mut stat) }, 0);
    assert_eq!(stat.st_blocks, 0, "the owner's reads allocated pages of the shared file");
    println!("holes read");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn a_sharer_of_holes_costs_the_owner_no_page() {
    use std::io::BufRead;
    use std::sync::atomic::Ordering;

    let t = transports(ShmConfig::default());
    let target = patterned(2 * 4096, false, 0x5a);
    let key = register(&t.owner, &target);
    let (raw_key, _) = wire::decode_key(&key).unwrap();
    let socket = socket_of(&t.owner.endpoint().address);
    let mut child = spawn_entry(
        "transport::shm::tests::sparse_sharer_child",
        ("KVFERRY_SHM_SPARSE", format!("{socket},{raw_key:x},{}", target.as_ptr() as u64)),
    );
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let said = lines.by_ref().map_while(|l| l.ok()).any(|l| l.ends_with("holes read"));
    drop(child.stdin.take());
    lines.for_each(drop);
    assert!(child.wait().unwrap().success() && said, "the sparse sharer failed (see its output)");
    assert!(target.to_vec().iter().all(|&b| b == 0), "the holes did not land as zeros");
    assert_eq!(t.owner.shared.pulled.mapped.load(Ordering::Relaxed), 2 * 4096);
}

#[test]
fn a_hostile_sharer_is_refused_and_the_owner_keeps_serving() {
    use crate::transport::XferOp;
    use std::io::BufRead;
    use std::sync::atomic::Ordering;

    let t = transports(ShmConfig { max_shared_sources: 2, ..ShmConfig::default() });
    let target = patterned(2 * 4096, false, 0);
    let key = register(&t.owner, &target);
    let before = target.to_vec();
    let (raw_key, _) = wire::decode_key(&key).unwrap();
    let socket = socket_of(&t.owner.endpoint().address);
    let target_addr = target.as_ptr() as u64 + 4096;
    let mut child = spawn_entry(
        "transport::shm::tests::hostile_sharer_child",
        ("KVFERRY_SHM_SHARER", format!("{socket},{raw_key:x},{target_addr}")),
    );
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(step) = ["shares refused", "writes refused"].into_iter().find(|s| line.ends_with(s)) {
            said.push(step);
            if step == "writes refused" {
                break;
            }
        }
    }
    assert_eq!(said, ["shares refused", "writes refused"], "the hostile child did not get through its steps");
    assert!(target.to_vec() == before, "a refused WRITE changed the owner's memory");
    assert_eq!(t.owner.shared.pulled.mapped.load(Ordering::Relaxed), 0);

    // The owner serves an honest initiator as before, through a mapping.
    let src = patterned(4096, true, 0x3c);
    register(&t.initiator, &src);
    let remote = crate::transport::RemoteRegion { region: target.region(), key };
    let link = t.initiator.link("pull-owner", &t.owner.endpoint(), vec![remote]).unwrap();
    let op =
        XferOp { local_addr: src.as_ptr() as u64, remote_region: 0, remote_addr: target.as_ptr() as u64, len: 4096 };
    write_ops(&link, vec![op]).unwrap();
    assert!(target.to_vec()[..4096] == src.to_vec()[..]);
    assert_eq!(t.owner.shared.pulled.mapped.load(Ordering::Relaxed), 4096);
    drop(child.stdin.take());
    lines.for_each(drop);
    assert!(child.wait().unwrap().success(), "the hostile child failed");
}
