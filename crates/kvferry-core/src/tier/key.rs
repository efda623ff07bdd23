//! Block keys: chained prefix hashes, so that a key names a block *and* everything before it.
//!
//! The default is a 128-bit xxh3 over the parent's key, the block's token ids and any extra keys
//! (LoRA id, multimodal hashes, cache salt). An engine that already hashes its blocks (vLLM's prefix
//! cache) hands its own hash bytes to [`BlockKey::from_engine_hash`] instead, so that kvferry's keys,
//! and the events that carry them, match the engine's and its routers'.

use xxhash_rust::xxh3::Xxh3;

use crate::tier::error::TierError;

/// The longest engine hash kept verbatim: vLLM's `sha256` block hashes are 32 bytes, its builtin
/// hashes 8.
pub const MAX_KEY_BYTES: usize = 32;

/// The key of one cached block: up to [`MAX_KEY_BYTES`] opaque bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    len: u8,
    bytes: [u8; MAX_KEY_BYTES],
}

impl BlockKey {
    /// A key from the engine's own block hash, kept byte for byte.
    pub fn from_engine_hash(hash: &[u8]) -> Result<BlockKey, TierError> {
        if hash.is_empty() || hash.len() > MAX_KEY_BYTES {
            return Err(TierError::BadKey { len: hash.len() });
        }
        let mut bytes = [0; MAX_KEY_BYTES];
        bytes[..hash.len()].copy_from_slice(hash);
        Ok(BlockKey { len: hash.len() as u8, bytes })
    }

    /// The key of the block holding `tokens`, following the block keyed `parent` (`None` for the
    /// first block of a sequence).
    pub fn chain(parent: Option<&BlockKey>, tokens: &[u32], extra: &[u8]) -> BlockKey {
        let mut hasher = Xxh3::new();
        match parent {
            Some(parent) => {
                hasher.update(&[parent.len]);
                hasher.update(parent.as_bytes());
            }
            None => hasher.update(&[0]),
        }
        hasher.update(&(tokens.len() as u64).to_le_bytes());
        for token in tokens {
            hasher.update(&token.to_le_bytes());
        }
        hasher.update(extra);
        let mut bytes = [0; MAX_KEY_BYTES];
        bytes[..16].copy_from_slice(&hasher.digest128().to_le_bytes());
        BlockKey { len: 16, bytes }
    }

    /// The chained keys of every full block of `tokens`, `block_tokens` tokens per block; a trailing
    /// partial block has no key (it cannot be shared until it fills).
    pub fn prefix_keys(tokens: &[u32], block_tokens: usize, extra: &[u8]) -> Vec<BlockKey> {
        if block_tokens == 0 {
            return Vec::new();
        }
        let mut keys: Vec<BlockKey> = Vec::with_capacity(tokens.len() / block_tokens);
        for block in tokens.chunks_exact(block_tokens) {
            let key = BlockKey::chain(keys.last(), block, extra);
            keys.push(key);
        }
        keys
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockKey(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl std::fmt::Display for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_keys_depend_on_the_whole_prefix() {
        let tokens: Vec<u32> = (0..64).collect();
        let keys = BlockKey::prefix_keys(&tokens, 16, b"");
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0], BlockKey::chain(None, &tokens[..16], b""));
        assert_eq!(keys[1], BlockKey::chain(Some(&keys[0]), &tokens[16..32], b""));
        // The same tokens after a different prefix give a different key.
        let mut other = tokens.clone();
        other[0] = 999;
        let other_keys = BlockKey::prefix_keys(&other, 16, b"");
        assert!(keys.iter().zip(&other_keys).all(|(a, b)| a != b));
        // Extra keys (a LoRA id, say) separate otherwise equal prefixes.
        assert_ne!(BlockKey::prefix_keys(&tokens, 16, b"lora-1")[0], keys[0]);
        // A partial block has no key; a zero block size gives none at all.
        assert_eq!(BlockKey::prefix_keys(&tokens[..40], 16, b"").len(), 2);
        assert!(BlockKey::prefix_keys(&tokens, 0, b"").is_empty());
        assert_eq!(keys[0].as_bytes().len(), 16);
    }

    /// Keys are persisted on disk and computed by other languages (the Python package's tests pin
    /// the same vectors): a change of the hash layout must fail here. Checked against an
    /// independent xxh3-128 over `[0 | len, parent] ++ u64le(count) ++ u32le(tokens) ++ extra`.
    #[test]
    fn chained_keys_match_pinned_vectors() {
        let hex = |key: &BlockKey| key.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(&BlockKey::chain(None, &[1, 2, 3], b"salt")), "59abaae1cfec5273ed3e59683822b33d");
        let tokens: Vec<u32> = (0..64).collect();
        let keys: Vec<String> = BlockKey::prefix_keys(&tokens, 16, b"").iter().map(hex).collect();
        assert_eq!(
            keys,
            [
                "dbdc0b6ca540bbccd5c4062439d1f940",
                "30807fd1c44b81d2932044000baad0e4",
                "206b1e5036df9b8bd70b969c00b3cf4b",
                "58bb016c29d97fb652de44b8a2a001f0",
            ]
        );
        assert_eq!(hex(&BlockKey::prefix_keys(&tokens[..32], 16, b"lora-1")[1]), "a1254d268ac26059e165c5c8f05d30e2");
    }

    #[test]
    fn engine_hashes_are_kept_verbatim() {
        let sha = [7u8; 32];
        let key = BlockKey::from_engine_hash(&sha).unwrap();
        assert_eq!(key.as_bytes(), sha);
        let int_hash = 0x1234_5678_9abc_def0u64.to_be_bytes();
        assert_eq!(BlockKey::from_engine_hash(&int_hash).unwrap().as_bytes(), int_hash);
        // A short hash is not confused with its zero-padded form.
        assert_ne!(BlockKey::from_engine_hash(&[1]).unwrap(), BlockKey::from_engine_hash(&[1, 0]).unwrap());
        for bad in [&[][..], &[0u8; 33][..]] {
            let err = BlockKey::from_engine_hash(bad).unwrap_err();
            assert_eq!(crate::Error::from(err).code(), crate::ErrorCode::TierBadKey);
        }
    }
}
