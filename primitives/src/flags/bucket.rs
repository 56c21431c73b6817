//! Deterministic bucketing, compatible with Unleash's normalisation so a service migrating from
//! Unleash keeps every subject in the same bucket: the bucket is
//! `murmur3_32("{group}:{id}", seed) % modulus + 1`, with seed 0 and modulus 100 for the
//! rollout percentage, and seed [`VARIANT_SEED`] and modulus 1000 (the total variant weight)
//! for variant selection.

/// The seed Unleash uses to pick a variant (so variant and rollout buckets are independent).
pub const VARIANT_SEED: u32 = 86_028_157;
/// Unleash's total variant weight; keel's weights (summing to 100) are scaled by 10.
pub const VARIANT_WEIGHT_TOTAL: u32 = 1000;

/// MurmurHash3, x86 32-bit variant.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        // chunks_exact(4) yields 4-byte slices, so the conversion cannot fail.
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Unleash's `normalizedValue`: `murmur3_32("{group}:{id}", seed) % modulus + 1`, in
/// `1..=modulus`. `modulus` must be at least 1 (0 is treated as 1).
pub fn normalized_hash(group: &str, id: &str, modulus: u32, seed: u32) -> u32 {
    let mut buf = Vec::with_capacity(group.len() + 1 + id.len());
    buf.extend_from_slice(group.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(id.as_bytes());
    murmur3_32(&buf, seed) % modulus.max(1) + 1
}

/// The rollout bucket of `id` in `group`, 1 to 100: the subject is in a rollout of `p`% when
/// its bucket is at most `p`, so raising `p` only adds subjects.
pub fn rollout_bucket(group: &str, id: &str) -> u32 {
    normalized_hash(group, id, 100, 0)
}

/// The variant bucket of `id` in `group`, 1 to 1000.
pub fn variant_bucket(group: &str, id: &str) -> u32 {
    normalized_hash(group, id, VARIANT_WEIGHT_TOTAL, VARIANT_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second, independent MurmurHash3 x86_32, written from the reference algorithm's
    /// description byte by byte (no chunking helpers), to cross-check the one above.
    // Rotations are spelled out as shifts on purpose: this copy must not share code or idioms
    // with the implementation it checks.
    #[allow(clippy::manual_rotate)]
    fn reference_murmur(data: &[u8], seed: u32) -> u32 {
        let mut h1: u32 = seed;
        let nblocks = data.len() / 4;
        let mut i = 0;
        while i < nblocks {
            let b = &data[i * 4..i * 4 + 4];
            let mut k1 =
                (b[0] as u32) | (b[1] as u32) << 8 | (b[2] as u32) << 16 | (b[3] as u32) << 24;
            k1 = k1.wrapping_mul(0xcc9e2d51);
            k1 = (k1 << 15) | (k1 >> 17);
            k1 = k1.wrapping_mul(0x1b873593);
            h1 ^= k1;
            h1 = (h1 << 13) | (h1 >> 19);
            h1 = h1.wrapping_mul(5).wrapping_add(0xe6546b64);
            i += 1;
        }
        let tail = &data[nblocks * 4..];
        let mut k1: u32 = 0;
        if tail.len() >= 3 {
            k1 ^= (tail[2] as u32) << 16;
        }
        if tail.len() >= 2 {
            k1 ^= (tail[1] as u32) << 8;
        }
        if !tail.is_empty() {
            k1 ^= tail[0] as u32;
            k1 = k1.wrapping_mul(0xcc9e2d51);
            k1 = (k1 << 15) | (k1 >> 17);
            k1 = k1.wrapping_mul(0x1b873593);
            h1 ^= k1;
        }
        h1 ^= data.len() as u32;
        h1 ^= h1 >> 16;
        h1 = h1.wrapping_mul(0x85ebca6b);
        h1 ^= h1 >> 13;
        h1 = h1.wrapping_mul(0xc2b2ae35);
        h1 ^= h1 >> 16;
        h1
    }

    #[test]
    fn murmur3_matches_published_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn murmur3_matches_an_independent_implementation() {
        let mut data = Vec::new();
        for len in 0..64u32 {
            for seed in [0, 1, VARIANT_SEED, u32::MAX] {
                assert_eq!(
                    murmur3_32(&data, seed),
                    reference_murmur(&data, seed),
                    "len {len} seed {seed}"
                );
            }
            data.push((len.wrapping_mul(37) ^ 0xa5) as u8);
        }
    }

    /// The values Unleash's client specification and its Node client assert for
    /// `normalizedValue(id, groupId)`.
    #[test]
    fn normalisation_matches_unleash() {
        assert_eq!(normalized_hash("gr1", "123", 100, 0), 73);
        assert_eq!(normalized_hash("groupX", "999", 100, 0), 25);
    }
}
