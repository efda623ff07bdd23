use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::link::probe_cross_memory;
use super::owner::PROBE;
use super::wire::{self, Reach};
use super::*;
use crate::memory::host::{HostAllocOptions, HostBuffer};

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
    shm.address.splitn(3, '/').nth(2).unwrap().to_string()
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
    assert!(matches!(wrong, Err(link::ConnectError::Unauthenticated(_))), "{:?}", wrong.err());
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
    use std::process::{Command, Stdio};

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

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "transport::shm::tests::hostile_lease_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KVFERRY_SHM_HOSTILE", shm_socket(&target))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
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
        *link::AFTER_READ_COPY.lock().unwrap() =
            Some(("race-target".into(), Box::new(move || drop(dropped.lock().unwrap().take()))));
        let e = initiator.read(&l, &[0], &r, &[0], crate::Deadline::after(std::time::Duration::from_secs(10)));
        let e = e.unwrap().wait().unwrap_err();
        *link::AFTER_READ_COPY.lock().unwrap() = None;
        assert_eq!(e.code(), crate::ErrorCode::RemoteUnknownKey, "{e}");
        assert!(reg.lock().unwrap().is_none(), "the registration was dropped during the READ");
    }
}
