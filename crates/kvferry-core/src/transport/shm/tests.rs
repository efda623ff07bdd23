use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

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
fn revocation_waits_for_initiators_inside_and_refuses_later_ones() {
    use super::lease::{LeaseFile, Leases};
    use std::time::{Duration, Instant};

    let owner = Leases::new().unwrap();
    let view = LeaseFile::map(owner.fd()).unwrap();
    let slot = owner.open(0xabc).unwrap();
    assert!(!view.enter(slot, 0xdef), "a wrong tag is refused");
    assert!(view.enter(slot, 0xabc));
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            view.leave(slot);
        });
        owner.revoke(slot, Duration::from_secs(10));
    });
    assert!(started.elapsed() >= Duration::from_millis(90), "revoke returned while an initiator was inside");
    assert!(!view.enter(slot, 0xabc), "a revoked registration is refused");

    // The freed slot serves a new registration; the old tag stays refused.
    let reused = owner.open(0x123).unwrap();
    assert_eq!(reused, slot);
    assert!(!view.enter(reused, 0xabc));
    assert!(view.enter(reused, 0x123));
    // An initiator that never leaves (it died inside) costs the timeout once; the slot is retired.
    let started = Instant::now();
    owner.revoke(reused, Duration::from_millis(50));
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_ne!(owner.open(0x456).unwrap(), reused);
    assert!(view.slot(u32::MAX).is_none() && !view.enter(u32::MAX, 0));
}
