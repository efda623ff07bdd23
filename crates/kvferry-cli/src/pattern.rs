//! A deterministic byte pattern, so two processes can check each other's data without sharing it.
//! Each 8-byte word depends on the seed and the word's offset in the buffer.

fn word(seed: u64, index: u64) -> u64 {
    // splitmix64: cheap, and every word differs from its neighbours.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern byte at `offset`.
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fill `buf`, which sits at `offset` in the patterned buffer.
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    let len = buf.len();
    let head = ((offset.next_multiple_of(8) - offset) as usize).min(len);
    let tail_start = head + (len - head) / 8 * 8;
    let (head_bytes, rest) = buf.split_at_mut(head);
    let (words, tail) = rest.split_at_mut(tail_start - head);
    // Bytes up to the first word boundary, whole words, then the bytes after the last one.
    for (i, b) in head_bytes.iter_mut().enumerate() {
        *b = byte_at(seed, offset + i as u64);
    }
    let first_word = (offset + head as u64) / 8;
    for (w, chunk) in words.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seed, first_word + w as u64).to_le_bytes());
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b = byte_at(seed, offset + (tail_start + i) as u64);
    }
}

/// The first offset (relative to `buf`) where `buf` differs from the pattern, if any.
pub fn first_mismatch(buf: &[u8], seed: u64, offset: u64) -> Option<usize> {
    let mut expected = vec![0u8; buf.len().min(1 << 20)];
    for (c, chunk) in buf.chunks(expected.len().max(1)).enumerate() {
        let start = c * expected.len();
        let exp = &mut expected[..chunk.len()];
        fill(exp, seed, offset + start as u64);
        if chunk != exp {
            return chunk.iter().zip(exp.iter()).position(|(a, b)| a != b).map(|p| start + p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_byte_at_at_any_offset() {
        for offset in [0u64, 1, 7, 8, 13] {
            let mut buf = vec![0u8; 37];
            fill(&mut buf, 42, offset);
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(*b, byte_at(42, offset + i as u64));
            }
            assert_eq!(first_mismatch(&buf, 42, offset), None);
            buf[20] ^= 1;
            assert_eq!(first_mismatch(&buf, 42, offset), Some(20));
        }
    }

    #[test]
    fn seeds_differ() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        fill(&mut a, 1, 0);
        fill(&mut b, 2, 0);
        assert_ne!(a, b);
    }
}
