//! Entry points for the fuzz targets (`fuzz/` at the repository root) and for the test that
//! replays their corpora: each runs the crate's own decoder of one kind of untrusted bytes on the
//! given input and never panics on any input (a panic is the bug a fuzzer finds). Some also check
//! an invariant of what the decoder accepted. Built only with the `fuzzing` feature; not an API.
//!
//! Inputs that travel over a stream are fed through `Wire`, an in-memory stream that hands out
//! the input a few bytes per read (so the decoders' loops over short reads run) and then reports
//! end of file.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::auth::{Auth, AuthConfig, Channel};
use crate::deadline::Deadline;
use crate::memory::{MemKind, MemRegion};
use crate::metadata::{self, AgentMetadata};
use crate::net::DeadlineStream;
use crate::tier::disk::{self, Record};
use crate::transport::frame::{self, FrameKind, Header, WireDesc};
use crate::transport::keys::KeyTable;

/// The most bytes one read of a [`Wire`] returns.
const SHORT_READ: usize = 7;

/// An in-memory peer: reads come from the input, writes are kept (and bounded, so a decoder that
/// answered without end would show as a failed write rather than exhaust memory).
struct Wire<'a> {
    input: &'a [u8],
    written: usize,
}

impl<'a> Wire<'a> {
    fn new(input: &'a [u8]) -> Self {
        Wire { input, written: 0 }
    }
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len()).min(SHORT_READ);
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() > 1 << 20 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DeadlineStream for Wire<'_> {
    fn set_timeouts(&self, _left: Duration) -> io::Result<()> {
        Ok(())
    }
}

fn far() -> Deadline {
    Deadline::after(Duration::from_secs(3600))
}

/// `AgentMetadata::decode` on the bytes as they came, and on the bytes sealed as a body (so the
/// fuzzer reaches the body's parser past the checksum). Whatever decodes re-encodes to metadata
/// that decodes to the same value.
pub fn metadata(bytes: &[u8]) {
    for input in [bytes.to_vec(), metadata::seal(bytes)] {
        if let Ok(md) = AgentMetadata::decode(&input) {
            assert_eq!(AgentMetadata::decode(&md.encode()).as_ref(), Ok(&md), "metadata does not round-trip");
        }
    }
}

/// The registration the TCP target's key table holds while fuzzing: a range that is never
/// touched (requests are checked, not served).
pub const TCP_KEY: u128 = 0x6b76_6665_7272_795f_6675_7a7a_0000_0001;
pub const TCP_REGION: MemRegion = MemRegion { addr: 0x1000_0000, len: 1 << 20, kind: MemKind::Host };

fn tcp_keys() -> &'static KeyTable {
    static KEYS: OnceLock<KeyTable> = OnceLock::new();
    KEYS.get_or_init(|| {
        let keys = KeyTable::default();
        keys.insert(TCP_KEY, TCP_REGION, None);
        keys
    })
}

/// Requests are only checked here, never served: nothing to cut off.
fn no_cut() -> crate::transport::keys::Cut {
    Arc::new(|| {})
}

/// Both directions of the TCP transport on the same bytes: [`tcp_request`] and [`tcp_response`].
pub fn tcp_frame(bytes: &[u8]) {
    tcp_request(bytes);
    tcp_response(bytes);
}

/// The target's reading of a stream of requests (after the hello): each header, its descriptors
/// and payload, as `transport::tcp::target` reads them, every descriptor checked against the key
/// table. A request the table accepts names only registered bytes.
pub fn tcp_request(bytes: &[u8]) {
    let mut wire = Wire::new(bytes);
    let mut desc_buf = Vec::new();
    while let Ok(header) = Header::read_from(&mut wire) {
        let Some(kind) = FrameKind::from_wire(header.tag) else { return };
        let count = header.count as usize;
        if count > frame::MAX_DESCS {
            return;
        }
        desc_buf.resize(count * frame::DESC_LEN, 0);
        if wire.read_exact(&mut desc_buf).is_err() {
            return;
        }
        let descs: Vec<WireDesc> = desc_buf.chunks_exact(frame::DESC_LEN).map(WireDesc::decode).collect();
        let payload = match kind {
            FrameKind::Notify if count != 0 || header.payload_len > frame::MAX_NOTIFICATION => return,
            FrameKind::Notify => header.payload_len,
            FrameKind::Read | FrameKind::Write => {
                let described = descs.iter().fold(0u64, |acc, d| acc.saturating_add(d.len));
                if kind == FrameKind::Write && described != header.payload_len {
                    return;
                }
                if let Ok((_held, kinds)) = tcp_keys().resolve(&descs, &no_cut()) {
                    assert_eq!(kinds.len(), descs.len());
                    for d in &descs {
                        assert!(d.key == TCP_KEY && TCP_REGION.contains(d.addr, d.len), "accepted {d:?}");
                    }
                }
                if kind == FrameKind::Read { 0 } else { header.payload_len }
            }
        };
        if !skip(&mut wire, payload) {
            return;
        }
    }
}

/// Consume `len` bytes of the input; false when it ends first.
fn skip(wire: &mut Wire<'_>, len: u64) -> bool {
    if (wire.input.len() as u64) < len {
        return false;
    }
    wire.input = &wire.input[len as usize..];
    true
}

/// The initiator's reading of a stream of responses: each header's status (`frame::status_of`,
/// which names a rejection or refuses an unknown status) and its payload.
pub fn tcp_response(bytes: &[u8]) {
    let mut wire = Wire::new(bytes);
    while let Ok(header) = Header::read_from(&mut wire) {
        match frame::status_of(header) {
            Ok(h) if skip(&mut wire, h.payload_len) => {}
            Ok(_) => return,
            // A rejection leaves the stream in step; anything else ends it.
            Err(f) if !f.breaks_stream() => {}
            Err(_) => return,
        }
    }
}

/// What an shm initiator reads from an owner: the hello answer's header, then MAP answers (status,
/// lease slot, granted range); and the shm key that metadata carries, through `wire::decode_key`.
pub fn shm_wire(bytes: &[u8]) {
    use crate::transport::shm::decode_key;
    const MAP_ACK_LEN: usize = frame::HEADER_LEN + 16;
    let _ = decode_key(bytes);
    let _ = decode_key(&bytes[..bytes.len().min(17)]);
    let Some((hello, mut rest)) = bytes.split_first_chunk::<{ frame::HEADER_LEN }>() else { return };
    let hello = Header::decode(hello);
    if hello.tag != 0 {
        return;
    }
    while let Some((ack, tail)) = rest.split_first_chunk::<MAP_ACK_LEN>() {
        rest = tail;
        let status = frame::status_of(Header::decode(ack[..frame::HEADER_LEN].try_into().unwrap()));
        if status.is_err() {
            continue;
        }
        let addr = u64::from_le_bytes(ack[16..24].try_into().unwrap());
        let len = u64::from_le_bytes(ack[24..32].try_into().unwrap());
        let _granted = MemRegion { addr, len, kind: MemKind::Host };
    }
}

/// The side channel's frame reader (`side_channel::read_frame`, used by both ends), and the
/// metadata an exchange carries in its body.
pub fn side_channel(bytes: &[u8]) {
    let mut wire = Wire::new(bytes);
    if let Ok((_op, body)) = crate::side_channel::read_frame(&mut wire, far()) {
        assert!(body.len() <= bytes.len(), "a body longer than the input");
        let _ = AgentMetadata::decode(&body);
    }
}

/// Messages from another fabric rail as a rail receives them (`fabric::session::Sessions::open`:
/// handshake messages, and sealed notifications, check queries and verdicts, nothing of which is
/// acted upon before it verifies). The input is a sequence of messages, each behind a u16 length,
/// so that one input can take a session through its handshake steps.
#[cfg(feature = "fabric")]
pub fn fabric_control(bytes: &[u8]) {
    use crate::transport::fabric::Sessions;
    let mut sessions = Sessions::new(fuzz_auth().clone(), b"fuzzed rail".to_vec());
    let mut rest = bytes;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = (u16::from_le_bytes(*len) as usize).min(tail.len());
        let (message, tail) = tail.split_at(len);
        let _ = sessions.open(message);
        rest = tail;
    }
    let _ = sessions.open(rest);
}

/// The fuzzed disk tier's geometry.
pub const TIER_BLOCK_SIZE: usize = 4096;
pub const TIER_SLOTS: u32 = 64;

/// The disk tier's index log replay (`disk::replay_log`) on the bytes as they came, and on the
/// bytes behind a valid header with each record's CRC made right (so the fuzzer reaches what
/// replay does with well-formed records). What replay accepts names each slot at most once, and
/// only slots that exist.
pub fn tier_index(bytes: &[u8]) {
    let dir = Path::new("/nonexistent/kvferry-fuzz");
    check_replayed(disk::replay_log(dir, bytes, TIER_BLOCK_SIZE, TIER_SLOTS));
    let header = disk::header(TIER_BLOCK_SIZE, TIER_SLOTS);
    let mut fixed = [&header[..], bytes].concat();
    for rec in fixed[header.len()..].chunks_exact_mut(disk::RECORD_LEN) {
        let crc = crc32fast::hash(&rec[..disk::RECORD_LEN - 4]);
        rec[disk::RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        let _ = Record::decode(rec);
    }
    check_replayed(disk::replay_log(dir, &fixed, TIER_BLOCK_SIZE, TIER_SLOTS));
}

fn check_replayed(replayed: Result<disk::Replayed, crate::tier::TierError>) {
    let Ok(replayed) = replayed else { return };
    let mut owners = HashMap::new();
    for (key, entry) in &replayed.blocks {
        assert!(entry.slot < TIER_SLOTS, "slot {} replayed", entry.slot);
        assert!(owners.insert(entry.slot, *key).is_none(), "two blocks replayed into slot {}", entry.slot);
    }
}

/// The block size of the remote objects the fuzzer decodes: small, so that whole objects fit in
/// libFuzzer's input length limit.
const REMOTE_BLOCK_SIZE: usize = 64;
const REMOTE_FINGERPRINT: [u8; 16] = [0x5a; 16];

fn remote_key() -> crate::tier::BlockKey {
    crate::tier::BlockKey::from_engine_hash(&[0x33; 16]).expect("a 16-byte key")
}

/// An object read from the remote tier (`remote::ObjectReader`), whole and in pieces, on the bytes
/// as they came and with the checksum made right (so the fuzzer reaches the checks after it). What
/// it accepts is one block of the store's size and re-encodes to the very same object.
pub fn remote_object(bytes: &[u8]) {
    check_remote_object(bytes);
    if bytes.len() >= 8 {
        let body = bytes.len() - 8;
        let mut sealed = bytes.to_vec();
        let sum = xxhash_rust::xxh3::xxh3_64(&sealed[..body]);
        sealed[body..].copy_from_slice(&sum.to_le_bytes());
        check_remote_object(&sealed);
    }
}

fn check_remote_object(bytes: &[u8]) {
    use crate::tier::remote::{ObjectReader, decode_object, encode_object};
    let key = remote_key();
    let whole = decode_object(bytes, &REMOTE_FINGERPRINT, &key, REMOTE_BLOCK_SIZE);
    // The same bytes arriving in pieces (of a size the input picks) get the same verdict.
    let piece = bytes.first().map_or(1, |&b| usize::from(b % 17) + 1);
    let mut block = vec![0; REMOTE_BLOCK_SIZE];
    let mut reader = ObjectReader::new(&REMOTE_FINGERPRINT, &key, &mut block);
    let in_pieces = bytes.chunks(piece).try_for_each(|chunk| reader.feed(chunk)).and_then(|()| reader.finish());
    assert_eq!(whole.is_ok(), in_pieces.is_ok(), "pieces of {piece} bytes changed the verdict");
    let Ok(decoded) = whole else { return };
    assert_eq!(decoded, block, "pieces of {piece} bytes landed another block");
    assert_eq!(encode_object(&REMOTE_FINGERPRINT, &key, &decoded), bytes, "an accepted object re-encodes differently");
}

fn fuzz_auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        Auth::resolve(&AuthConfig::Secret(b"the fuzzed cluster secret, 32 b.".to_vec())).expect("a long secret")
    })
}

/// The cluster-secret handshake fed arbitrary bytes: the server side (what an accepting socket
/// reads from anyone who connects) with and without a secret, and the client side (what a
/// connecting agent reads from the endpoint it dialled). No input proves the secret: the proofs
/// bind the fresh nonce of this run, which the input cannot know.
pub fn auth_handshake(bytes: &[u8]) {
    let secret = fuzz_auth();
    let none = Auth::disabled();
    assert!(secret.server(&mut Wire::new(bytes), Channel::Tcp, far()).is_err(), "an input proved the secret");
    let _ = none.server(&mut Wire::new(bytes), Channel::Tcp, far());
    assert!(secret.client(&mut Wire::new(bytes), Channel::Tcp, far()).is_err(), "an input proved the secret");
    let _ = none.client(&mut Wire::new(bytes), Channel::Tcp, far());
}

/// A fuzz target: its name (that of its corpus directory) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target's name and entry point, for the corpus replay test.
pub fn targets() -> Vec<Target> {
    let all: Vec<Target> = vec![
        ("metadata", metadata),
        ("tcp_frame", tcp_frame),
        ("shm_wire", shm_wire),
        ("side_channel", side_channel),
        ("tier_index", tier_index),
        ("auth_handshake", auth_handshake),
        ("remote_object", remote_object),
    ];
    #[cfg(feature = "fabric")]
    let all = [all, vec![("fabric_control", fabric_control as fn(&[u8]))]].concat();
    all
}

/// Small valid inputs for each target, made with the crate's own encoders where it has them (the
/// fuzz corpora start from these).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "metadata" => {
            let md = sample_metadata();
            let encoded = md.encode();
            let empty = AgentMetadata { name: "a".into(), generation: 0, endpoints: vec![], regions: vec![] }.encode();
            // Bodies too, for the resealed path.
            vec![encoded.clone(), encoded[16..].to_vec(), empty.clone(), empty[16..].to_vec()]
        }
        "tcp_frame" => {
            let desc = |addr, len| WireDesc { key: TCP_KEY, addr, len };
            let request = |kind: FrameKind, descs: &[WireDesc], payload: &[u8]| {
                let header = Header { tag: kind as u8, count: descs.len() as u32, payload_len: payload.len() as u64 };
                let mut out = header.encode().to_vec();
                descs.iter().for_each(|d| d.encode_into(&mut out));
                out.extend_from_slice(payload);
                out
            };
            let read = request(FrameKind::Read, &[desc(TCP_REGION.addr, 64), desc(TCP_REGION.addr + 4096, 8)], &[]);
            let write = request(FrameKind::Write, &[desc(TCP_REGION.addr + 16, 4)], b"abcd");
            let notify = request(FrameKind::Notify, &[], b"done");
            let outside = request(FrameKind::Read, &[desc(TCP_REGION.addr + TCP_REGION.len - 4, 8)], &[]);
            let mut ok = Header { tag: 0, count: 0, payload_len: 3 }.encode().to_vec();
            ok.extend_from_slice(b"xyz");
            let rejected =
                Header { tag: crate::transport::RejectReason::OutOfRange.to_wire(), count: 1, payload_len: 0 };
            vec![
                [read.clone(), write.clone(), notify].concat(),
                outside,
                write,
                [ok, rejected.encode().to_vec()].concat(),
            ]
        }
        "shm_wire" => {
            let hello = Header { tag: 0, count: 4242, payload_len: 0x7f00_0000_1000 }.encode();
            let mut grant = Header { tag: 0, count: 3, payload_len: 16 }.encode().to_vec();
            grant.extend_from_slice(&0x7f00_0000_2000u64.to_le_bytes());
            grant.extend_from_slice(&4096u64.to_le_bytes());
            let refused =
                Header { tag: crate::transport::RejectReason::UnknownKey.to_wire(), count: 0, payload_len: 16 };
            let mut refused = refused.encode().to_vec();
            refused.resize(32, 0);
            let mut key = 7u128.to_le_bytes().to_vec();
            key.push(2);
            vec![[&hello[..], &grant, &refused].concat(), key]
        }
        "side_channel" => {
            let md = sample_metadata().encode();
            vec![
                crate::side_channel::frame(1, &[]),
                crate::side_channel::frame(2, &md),
                crate::side_channel::frame(0, b"the peer refused"),
            ]
        }
        "fabric_control" => {
            // Each message behind its u16 length, as `fabric_control` splits its input.
            let framed = |messages: &[Vec<u8>]| {
                let mut out = Vec::new();
                for m in messages {
                    out.extend_from_slice(&(m.len() as u16).to_le_bytes());
                    out.extend_from_slice(m);
                }
                out
            };
            let mut hello = vec![4u8];
            hello.extend_from_slice(&4u16.to_le_bytes());
            hello.extend_from_slice(b"peer");
            hello.extend_from_slice(&[7u8; 32]);
            // A sealed notification's shape: kind, initiator, counter, sender, payload, tag.
            let mut sealed = vec![1u8, 1];
            sealed.extend_from_slice(&1u64.to_le_bytes());
            sealed.extend_from_slice(&4u16.to_le_bytes());
            sealed.extend_from_slice(b"peer");
            sealed.extend_from_slice(&5u16.to_le_bytes());
            sealed.extend_from_slice(b"agentdone");
            sealed.extend_from_slice(&[0u8; 16]);
            vec![framed(&[hello.clone()]), framed(&[hello, sealed.clone()]), framed(&[sealed])]
        }
        "tier_index" => {
            let key = |i: u32| crate::tier::BlockKey::chain(None, &[i], b"");
            let mut log = disk::header(TIER_BLOCK_SIZE, TIER_SLOTS).to_vec();
            let mut records = Vec::new();
            Record::Store(key(1), disk::DiskEntry { slot: 3, checksum: 77 }).encode(&mut records);
            Record::Store(key(2), disk::DiskEntry { slot: 3, checksum: 78 }).encode(&mut records);
            Record::Remove(key(1)).encode(&mut records);
            log.extend_from_slice(&records);
            vec![log, records]
        }
        "remote_object" => {
            use crate::tier::remote::encode_object;
            let block: Vec<u8> = (0..REMOTE_BLOCK_SIZE as u8).collect();
            let object = encode_object(&REMOTE_FINGERPRINT, &remote_key(), &block);
            let other_key = crate::tier::BlockKey::from_engine_hash(&[0x44; 8]).expect("an 8-byte key");
            vec![
                object.clone(),
                encode_object(&[0; 16], &remote_key(), &block),
                encode_object(&REMOTE_FINGERPRINT, &other_key, &block),
                object[..40].to_vec(),
            ]
        }
        "auth_handshake" => {
            // A client's hello (scheme hmac, channel tcp) and a proof; a server's answer and verdict.
            let mut hello = b"KVFA\x01\x01\x02\x00".to_vec();
            hello.extend_from_slice(&[0x11; 32]);
            hello.extend_from_slice(&[0x22; 32]);
            let mut answer = b"KVFA\x01\x01\x00\x00".to_vec();
            answer.extend_from_slice(&[0x33; 64]);
            answer.push(0);
            vec![hello, answer]
        }
        _ => Vec::new(),
    }
}

fn sample_metadata() -> AgentMetadata {
    use crate::metadata::RegionInfo;
    use crate::transport::{Endpoint, TransportKind};
    AgentMetadata {
        name: "prefill-0".into(),
        generation: 3,
        endpoints: vec![Endpoint { kind: TransportKind::Tcp, address: "127.0.0.1:7000".into() }],
        regions: vec![RegionInfo {
            region: MemRegion { addr: 0x7f00_0000_0000, len: 1 << 20, kind: MemKind::Host },
            keys: vec![(TransportKind::Tcp, TCP_KEY.to_le_bytes().to_vec())],
        }],
    }
}
