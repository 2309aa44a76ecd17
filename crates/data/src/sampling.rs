//! Deterministic batch sampling.
//!
//! Every batch is a pure function of its coordinates (seed, shard, step, micro-batch, shape):
//! there is no RNG state to checkpoint, a resumed run sees exactly the batches it would have seen,
//! and any worker can compute any batch independently.

use anyhow::{bail, Result};

use crate::shard::Shard;

/// Domain separation for the BLAKE3 key derivation, so these bytes never collide with other
/// uses of BLAKE3 in the system. Changing it changes every batch.
const CONTEXT: &str = "agora-data 2025 batch_offsets v1";

/// Fails (for user-facing validation) if a shard of `n_tokens` tokens cannot hold one training
/// window of `seq_len + 1` tokens. [`batch_offsets`] and [`eval_offsets`] panic in that case.
pub fn ensure_window_fits(n_tokens: usize, seq_len: usize) -> Result<()> {
    if seq_len == 0 {
        bail!("sequence length must be at least 1");
    }
    if n_tokens <= seq_len {
        bail!("shard has {n_tokens} tokens but a training window needs seq_len + 1 = {} tokens", seq_len + 1);
    }
    Ok(())
}

/// Start offsets of `batch_size` windows of `seq_len + 1` tokens, drawn uniformly (and
/// independently, with replacement) from the valid starts `0..=n_tokens - seq_len - 1`.
///
/// The result is a pure function of all arguments: randomness is the BLAKE3 extendable output
/// of their little-endian encoding, and each offset is drawn from it with Lemire's unbiased
/// bounded-integer method.
///
/// # Panics
/// If `n_tokens <= seq_len` (check user input with [`ensure_window_fits`] first).
pub fn batch_offsets(
    seed: u64,
    shard_hash: &[u8; 32],
    step: u64,
    micro_batch: u64,
    batch_size: usize,
    seq_len: usize,
    n_tokens: usize,
) -> Vec<usize> {
    assert!(
        n_tokens > seq_len,
        "shard too short: {n_tokens} tokens cannot hold a window of seq_len + 1 = {} tokens",
        seq_len + 1
    );
    let n_starts = (n_tokens - seq_len) as u64;

    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    hasher.update(&seed.to_le_bytes());
    hasher.update(shard_hash);
    hasher.update(&step.to_le_bytes());
    hasher.update(&micro_batch.to_le_bytes());
    hasher.update(&(batch_size as u64).to_le_bytes());
    hasher.update(&(seq_len as u64).to_le_bytes());
    hasher.update(&(n_tokens as u64).to_le_bytes());
    let mut stream = hasher.finalize_xof();
    let mut next_u64 = || {
        let mut buf = [0u8; 8];
        stream.fill(&mut buf);
        u64::from_le_bytes(buf)
    };

    (0..batch_size).map(|_| uniform_below(n_starts, &mut next_u64) as usize).collect()
}

/// Uniform integer in `0..n` (n > 0), exactly unbiased (Lemire 2019, with rejection).
fn uniform_below(n: u64, next_u64: &mut impl FnMut() -> u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Gathers the windows starting at `offsets` into row-major `[offsets.len(), seq_len]` inputs
/// and targets, where targets are the inputs shifted by one token.
///
/// # Panics
/// If a window runs past the end of the shard (offsets from [`batch_offsets`] never do).
pub fn batch_tokens(shard: &Shard, offsets: &[usize], seq_len: usize) -> (Vec<u32>, Vec<u32>) {
    let tokens = shard.tokens();
    let mut inputs = Vec::with_capacity(offsets.len() * seq_len);
    let mut targets = Vec::with_capacity(offsets.len() * seq_len);
    for &start in offsets {
        assert!(
            start + seq_len < tokens.len(),
            "window at {start} of {} tokens runs past the shard end ({} tokens)",
            seq_len + 1,
            tokens.len()
        );
        inputs.extend_from_slice(&tokens[start..start + seq_len]);
        targets.extend_from_slice(&tokens[start + 1..start + seq_len + 1]);
    }
    (inputs, targets)
}

/// Deterministic evaluation windows over a shard of `n_tokens` tokens, grouped into batches.
///
/// Windows start at multiples of `seq_len`, so every token after the first is a target exactly
/// once when all windows are used. If there are more than `max_batches * batch_size` windows,
/// that many are taken evenly spaced across the whole shard (so evaluation still sees all of
/// it). Batches hold `batch_size` offsets except possibly the last, which may be shorter.
///
/// # Panics
/// If `batch_size == 0` or `n_tokens <= seq_len` (check with [`ensure_window_fits`]).
pub fn eval_offsets(n_tokens: usize, seq_len: usize, max_batches: usize, batch_size: usize) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "eval batch size must be at least 1");
    assert!(seq_len > 0, "sequence length must be at least 1");
    assert!(
        n_tokens > seq_len,
        "shard too short: {n_tokens} tokens cannot hold a window of seq_len + 1 = {} tokens",
        seq_len + 1
    );
    let n_windows = (n_tokens - 1) / seq_len;
    let wanted = n_windows.min(max_batches.saturating_mul(batch_size));
    let offsets: Vec<usize> = (0..wanted)
        // Evenly spaced window indices; exact integer arithmetic keeps them distinct and sorted.
        .map(|j| ((j as u128 * n_windows as u128) / wanted as u128) as usize * seq_len)
        .collect();
    offsets.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_below_covers_small_ranges() {
        let mut x = 0u64;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x
        };
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[uniform_below(3, &mut next) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
