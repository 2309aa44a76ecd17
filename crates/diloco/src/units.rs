//! Data units: the corpus cut into pieces of exactly one round of one worker's data.
//!
//! The training token stream is divided into windows of `seq_len + 1` tokens at stride `seq_len`; the
//! windows are shuffled once (seeded) and grouped `inner_steps · batch_size` at a time. A unit is stored
//! as its windows back to back, so inner step `s` trains on windows `s·B .. (s+1)·B` of the unit and no
//! window appears in two units. An epoch visits every unit once, in an order drawn from (seed, epoch).

/// What [`cut_units`] made.
pub struct Units {
    /// Each unit's tokens: `windows_per_unit` windows of `seq_len + 1` tokens.
    pub units: Vec<Vec<u32>>,
    /// Windows that did not fill a whole unit and are never trained on.
    pub dropped_windows: usize,
    pub total_windows: usize,
}

pub fn cut_units(tokens: &[u32], seq_len: usize, windows_per_unit: usize, seed: u64) -> Units {
    assert!(seq_len > 0 && windows_per_unit > 0, "units need a positive window length and count");
    let total_windows = tokens.len().saturating_sub(1) / seq_len;
    let mut order: Vec<usize> = (0..total_windows).collect();
    shuffle(&mut order, &keyed_stream("agora-diloco units v1", seed, 0));
    let units: Vec<Vec<u32>> = order
        .chunks_exact(windows_per_unit)
        .map(|windows| {
            let mut unit = Vec::with_capacity(windows.len() * (seq_len + 1));
            for &w in windows {
                unit.extend_from_slice(&tokens[w * seq_len..w * seq_len + seq_len + 1]);
            }
            unit
        })
        .collect();
    let dropped_windows = total_windows - units.len() * windows_per_unit;
    Units { units, dropped_windows, total_windows }
}

/// Window start offsets of each inner step's batch within a unit of `steps · batch_size` windows.
pub fn unit_batches(unit_tokens: usize, batch_size: usize, seq_len: usize, steps: u64) -> Vec<Vec<usize>> {
    let window = seq_len + 1;
    assert_eq!(
        unit_tokens,
        steps as usize * batch_size * window,
        "a unit holds exactly inner_steps · batch_size windows of seq_len + 1 tokens"
    );
    (0..steps as usize).map(|s| (0..batch_size).map(|b| (s * batch_size + b) * window).collect()).collect()
}

/// The order in which epoch `epoch` visits `n_units` units.
pub fn unit_order(seed: u64, epoch: u64, n_units: usize) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n_units as u64).collect();
    shuffle(&mut order, &keyed_stream("agora-diloco epoch order v1", seed, epoch));
    order
}

fn keyed_stream(context: &str, seed: u64, index: u64) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(&seed.to_le_bytes());
    h.update(&index.to_le_bytes());
    h.finalize_xof()
}

/// Fisher–Yates with unbiased bounded draws from a BLAKE3 stream.
fn shuffle<T>(items: &mut [T], stream: &blake3::OutputReader) {
    let mut stream = stream.clone();
    let mut next = || {
        let mut b = [0u8; 8];
        stream.fill(&mut b);
        u64::from_le_bytes(b)
    };
    for i in (1..items.len()).rev() {
        let n = i as u64 + 1;
        let threshold = n.wrapping_neg() % n;
        let j = loop {
            let m = u128::from(next()) * u128::from(n);
            if (m as u64) >= threshold {
                break (m >> 64) as usize;
            }
        };
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_partition_the_windows_without_repeats() {
        let tokens: Vec<u32> = (0..1000).collect();
        let cut = cut_units(&tokens, 10, 7, 42);
        assert_eq!(cut.total_windows, 99);
        assert_eq!(cut.units.len(), 14);
        assert_eq!(cut.dropped_windows, 1);
        let mut starts: Vec<u32> = cut.units.iter().flat_map(|u| u.chunks(11).map(|w| w[0])).collect();
        assert!(cut.units.iter().flat_map(|u| u.chunks(11)).all(|w| w.len() == 11 && w[10] == w[0] + 10));
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), 98, "every window used at most once");
        assert_eq!(cut_units(&tokens, 10, 7, 42).units, cut.units, "deterministic in the seed");
        assert_ne!(cut_units(&tokens, 10, 7, 43).units, cut.units);
    }

    #[test]
    fn batches_tile_the_unit() {
        let b = unit_batches(3 * 2 * 5, 2, 4, 3);
        assert_eq!(b, vec![vec![0, 5], vec![10, 15], vec![20, 25]]);
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let mut o = unit_order(1, 3, 50);
        assert_ne!(o, (0..50).collect::<Vec<_>>());
        o.sort();
        assert_eq!(o, (0..50).collect::<Vec<_>>());
        assert_ne!(unit_order(1, 3, 50), unit_order(1, 4, 50));
    }
}
