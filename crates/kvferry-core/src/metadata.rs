//! An agent's metadata: what a peer needs to reach it (name, endpoints, registered regions and their
//! keys), as a versioned, checksummed binary blob.
//!
//! ```text
//! header  magic "KVFM" | version u16 | flags u16 | body_len u32 | crc32(body) u32
//! body    name str | generation u64 | endpoint count u16 | endpoints | region count u32 | regions
//! str     len u16 | UTF-8 bytes
//! endpoint  transport u8 | address str
//! region  addr u64 | len u64 | kind u8 | device u32 | key count u8 | (transport u8 | key len u16 | key)*
//! ```
//!
//! Endpoints and keys of transports this build does not know (a peer built with another set of
//! back ends) are skipped, not refused: the peer stays reachable through what both sides speak.

use crate::error::code::ErrorCode;
use crate::memory::region::{MemKind, MemRegion};
use crate::transport::kind::{Endpoint, TransportKind};

pub const MAGIC: [u8; 4] = *b"KVFM";
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    #[error("metadata truncated: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    #[error("not kvferry metadata (magic {found:02x?})")]
    BadMagic { found: [u8; 4] },
    #[error("metadata version {found} is not supported (this build reads version {supported})")]
    Version { found: u16, supported: u16 },
    #[error("metadata is corrupt: checksum {found:#010x}, computed {computed:#010x}")]
    Corrupt { found: u32, computed: u32 },
    #[error("metadata is malformed: {0}")]
    Malformed(String),
}

impl MetadataError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MetadataError::Truncated { .. } => ErrorCode::MetadataTruncated,
            MetadataError::BadMagic { .. } => ErrorCode::MetadataBadMagic,
            MetadataError::Version { .. } => ErrorCode::MetadataVersion,
            MetadataError::Corrupt { .. } => ErrorCode::MetadataCorrupt,
            MetadataError::Malformed(_) => ErrorCode::MetadataMalformed,
        }
    }
}

/// A registered region as peers see it, with one key per transport it is open to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub region: MemRegion,
    pub keys: Vec<(TransportKind, Vec<u8>)>,
}

impl RegionInfo {
    pub fn key(&self, kind: TransportKind) -> Option<&[u8]> {
        self.keys.iter().find(|(k, _)| *k == kind).map(|(_, key)| key.as_slice())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMetadata {
    pub name: String,
    /// Increases whenever the agent's registrations change, so a newer blob replaces an older one.
    pub generation: u64,
    pub endpoints: Vec<Endpoint>,
    pub regions: Vec<RegionInfo>,
}

impl AgentMetadata {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.regions.len() * 48);
        put_str(&mut body, &self.name);
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&(self.endpoints.len() as u16).to_le_bytes());
        for e in &self.endpoints {
            body.push(e.kind.to_wire());
            put_str(&mut body, &e.address);
        }
        body.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            let (tag, device) = r.region.kind.to_wire();
            body.extend_from_slice(&r.region.addr.to_le_bytes());
            body.extend_from_slice(&r.region.len.to_le_bytes());
            body.push(tag);
            body.extend_from_slice(&device.to_le_bytes());
            body.push(r.keys.len() as u8);
            for (kind, key) in &r.keys {
                body.push(kind.to_wire());
                body.extend_from_slice(&(key.len() as u16).to_le_bytes());
                body.extend_from_slice(key);
            }
        }
        seal(&body)
    }

    pub fn decode(bytes: &[u8]) -> Result<AgentMetadata, MetadataError> {
        let truncated = |needed| MetadataError::Truncated { needed, got: bytes.len() };
        if bytes.len() < 4 {
            return Err(truncated(HEADER_LEN));
        }
        if bytes[..4] != MAGIC {
            return Err(MetadataError::BadMagic { found: bytes[..4].try_into().unwrap() });
        }
        if bytes.len() < HEADER_LEN {
            return Err(truncated(HEADER_LEN));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(MetadataError::Version { found: version, supported: VERSION });
        }
        let body_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let needed = HEADER_LEN + body_len;
        if bytes.len() < needed {
            return Err(truncated(needed));
        }
        if bytes.len() > needed {
            return Err(MetadataError::Malformed(format!("{} bytes after the end", bytes.len() - needed)));
        }
        let body = &bytes[HEADER_LEN..];
        let found = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
        let computed = crc32fast::hash(body);
        if found != computed {
            return Err(MetadataError::Corrupt { found, computed });
        }
        let mut r = Reader { buf: body };
        let name = r.str()?;
        if name.is_empty() {
            return Err(MetadataError::Malformed("empty agent name".into()));
        }
        let generation = r.u64()?;
        let mut endpoints = Vec::new();
        for _ in 0..r.u16()? {
            let tag = r.u8()?;
            let address = r.str()?;
            if let Some(kind) = TransportKind::from_wire(tag) {
                endpoints.push(Endpoint { kind, address });
            }
        }
        let region_count = r.u32()? as usize;
        // Each region takes at least 22 bytes: refuse counts the body cannot hold before allocating.
        if region_count > r.buf.len() / 22 {
            return Err(MetadataError::Malformed(format!("{region_count} regions cannot fit in the body")));
        }
        let mut regions = Vec::with_capacity(region_count);
        for i in 0..region_count {
            let addr = r.u64()?;
            let len = r.u64()?;
            let (tag, device) = (r.u8()?, r.u32()?);
            let kind = MemKind::from_wire(tag, device)
                .ok_or_else(|| MetadataError::Malformed(format!("region {i}: unknown memory kind {tag}")))?;
            let region = MemRegion { addr, len, kind };
            if len == 0 || region.end().is_none() {
                return Err(MetadataError::Malformed(format!("region {i}: bad range {addr:#x}+{len}")));
            }
            let mut keys = Vec::new();
            for _ in 0..r.u8()? {
                let tag = r.u8()?;
                let key_len = r.u16()? as usize;
                let key = r.take(key_len)?;
                if let Some(kind) = TransportKind::from_wire(tag) {
                    keys.push((kind, key.to_vec()));
                }
            }
            regions.push(RegionInfo { region, keys });
        }
        if !r.buf.is_empty() {
            return Err(MetadataError::Malformed(format!("{} unread bytes in the body", r.buf.len())));
        }
        Ok(AgentMetadata { name, generation, endpoints, regions })
    }
}

/// Header (magic, version, flags, length, checksum) + body.
pub(crate) fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A bounds-checked cursor: running off the end means the checksummed body lied about its shape.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetadataError> {
        if self.buf.len() < n {
            return Err(MetadataError::Malformed(format!("field of {n} bytes runs past the end")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, MetadataError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MetadataError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, MetadataError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, MetadataError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn str(&mut self) -> Result<String, MetadataError> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| MetadataError::Malformed("string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentMetadata {
        AgentMetadata {
            name: "prefill-0".into(),
            generation: 7,
            endpoints: vec![Endpoint { kind: TransportKind::Tcp, address: "127.0.0.1:4000".into() }],
            regions: vec![
                RegionInfo {
                    region: MemRegion { addr: 0x7000_0000, len: 1 << 20, kind: MemKind::Host },
                    keys: vec![(TransportKind::Tcp, vec![9; 16])],
                },
                RegionInfo {
                    region: MemRegion { addr: 0x1000, len: 4096, kind: MemKind::Cuda { device: 3 } },
                    keys: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let md = sample();
        assert_eq!(AgentMetadata::decode(&md.encode()).unwrap(), md);
    }

    #[test]
    fn transports_this_build_does_not_know_are_skipped() {
        let md = sample();
        let mut bytes = md.encode();
        let unknown = 0xEE;
        assert!(TransportKind::from_wire(unknown).is_none());
        // Retag every TCP endpoint and key (tag 1 before the address / key length) as unknown.
        let mut body = bytes[HEADER_LEN..].to_vec();
        let endpoint_tag = body.windows(3).position(|w| w == [1, 14, 0]).expect("the endpoint's tag and length");
        body[endpoint_tag] = unknown;
        let key_tag = body.windows(3).position(|w| w == [1, 16, 0]).expect("the key's tag and length");
        body[key_tag] = unknown;
        bytes = seal(&body);
        let decoded = AgentMetadata::decode(&bytes).unwrap();
        assert!(decoded.endpoints.is_empty());
        assert!(decoded.regions[0].keys.is_empty());
        assert_eq!(decoded.regions.len(), md.regions.len());
        assert_eq!((decoded.name, decoded.generation), (md.name, md.generation));
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            match AgentMetadata::decode(&bytes[..cut]) {
                Err(MetadataError::Truncated { got, .. }) => assert_eq!(got, cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_magic_version_and_trailing_bytes() {
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert!(matches!(AgentMetadata::decode(&bytes), Err(MetadataError::BadMagic { .. })));

        let mut bytes = sample().encode();
        bytes[4..6].copy_from_slice(&2u16.to_le_bytes());
        let err = AgentMetadata::decode(&bytes).unwrap_err();
        assert_eq!(err, MetadataError::Version { found: 2, supported: VERSION });
        assert_eq!(crate::Error::from(err).code(), ErrorCode::MetadataVersion);

        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(AgentMetadata::decode(&bytes), Err(MetadataError::Malformed(_))));
    }

    #[test]
    fn any_flipped_body_bit_is_caught_by_the_checksum() {
        let bytes = sample().encode();
        for i in HEADER_LEN..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert!(
                matches!(AgentMetadata::decode(&damaged), Err(MetadataError::Corrupt { .. })),
                "flip at byte {i} not detected"
            );
        }
    }

    #[test]
    fn well_checksummed_nonsense_is_malformed() {
        // A body whose checksum is right but whose fields lie about their lengths.
        let mut body = Vec::new();
        put_str(&mut body, "x");
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(AgentMetadata::decode(&seal(&body)), Err(MetadataError::Malformed(_))));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = AgentMetadata::decode(&bytes);
        }

        /// Damage behind a valid header and checksum (a buggy or hostile peer) is an error, not a
        /// panic or a huge allocation.
        #[test]
        fn resealed_damaged_bodies_never_panic(at in 0usize..200, byte in proptest::num::u8::ANY, cut in 0usize..200) {
            let encoded = sample().encode();
            let mut body = encoded[HEADER_LEN..].to_vec();
            let at = at % body.len();
            body[at] = byte;
            body.truncate(body.len() - cut % body.len());
            if let Ok(md) = AgentMetadata::decode(&seal(&body)) {
                proptest::prop_assert_eq!(AgentMetadata::decode(&md.encode()).unwrap(), md);
            }
        }
    }
}
