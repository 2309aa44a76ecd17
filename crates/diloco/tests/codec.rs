//! Every codec: round trips within its stated bound, error feedback, the accumulator, and the wire format's
//! refusal of anything but a payload the run allows.

use agora_diloco::codec::{self, Accumulator, Codec, CompressionConfig, Expected, Values};
use agora_protocol::TensorSpec;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec { name: "a".into(), shape: vec![7, 33] },
        TensorSpec { name: "b".into(), shape: vec![5] },
        TensorSpec { name: "c".into(), shape: vec![300] },
    ]
}

/// Deterministic values with a spread of magnitudes and both signs.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * u * u * 0.1 + if x.is_multiple_of(17) { u } else { 0.0 }
        })
        .collect()
}

fn delta(seed: u64) -> Vec<Vec<f32>> {
    specs().iter().enumerate().map(|(i, s)| values(s.shape.iter().product(), seed * 10 + i as u64)).collect()
}

fn cfg(codec: Codec) -> CompressionConfig {
    CompressionConfig { codec, error_feedback: false, feedback_decay: 1.0, ..CompressionConfig::default() }
}

fn sparse(codec: Codec, keep: usize, chunk: usize, values: Values) -> CompressionConfig {
    CompressionConfig { codec, keep, chunk, values, block: 4, ..cfg(codec) }
}

fn meta() -> BTreeMap<String, String> {
    BTreeMap::from([("round".to_string(), "3".to_string())])
}

fn expected<'a>(c: &'a CompressionConfig, specs: &'a [TensorSpec]) -> Expected<'a> {
    Expected { config: c, fragment: 0, specs }
}

/// Encodes, parses and decodes `d` under `c`.
fn round_trip(c: &CompressionConfig, d: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let specs = specs();
    let (payload, residual) = codec::compress(c, 0, &specs, d, None, &meta());
    assert!(residual.is_empty(), "no residual without error feedback");
    assert_eq!(payload.len(), codec::payload_len(c, &specs, serde_json::to_vec(&meta()).unwrap().len()));
    let parsed = codec::parse(&payload, expected(c, &specs)).unwrap();
    assert_eq!(parsed.metadata, meta());
    codec::decode(c, &specs, &parsed).into_iter().map(|t| t.data).collect()
}

#[test]
fn fp32_is_exact() {
    let d = delta(1);
    assert_eq!(round_trip(&cfg(Codec::None), &d), d);
}

#[test]
fn bf16_error_is_within_a_relative_2_pow_minus_8() {
    let d = delta(2);
    for (a, b) in d.iter().flatten().zip(round_trip(&cfg(Codec::Bf16), &d).iter().flatten()) {
        assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} → {b}");
    }
}

/// int8: |v − v̂| ≤ max|block| / 254; int4: ≤ max|block| / 14 (half a quantisation step).
#[test]
fn integer_codecs_stay_within_half_a_step_of_their_block() {
    let d = delta(3);
    for (codec, levels) in [(Codec::Int8, 127.0f32), (Codec::Int4, 7.0)] {
        for block in [1usize, 16, 64, 1000] {
            let c = CompressionConfig { block, ..cfg(codec) };
            let back = round_trip(&c, &d);
            for (orig, dec) in d.iter().zip(&back) {
                for (ob, db) in orig.chunks(block).zip(dec.chunks(block)) {
                    let amax = ob.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (a, b) in ob.iter().zip(db) {
                        let bound = amax / (2.0 * levels) * (1.0 + 1e-5) + 1e-12;
                        assert!((a - b).abs() <= bound, "{codec:?}/{block}: {a} → {b}, bound {bound}");
                    }
                }
            }
        }
    }
}

/// Top-k keeps exactly the `keep` largest magnitudes of every chunk, exactly (f32 values), and zeroes the rest.
#[test]
fn top_k_keeps_the_largest_of_every_chunk() {
    let d = delta(4);
    for (keep, chunk) in [(1usize, 64usize), (2, 64), (3, 10), (10, 10)] {
        let back = round_trip(&sparse(Codec::TopK, keep, chunk, Values::F32), &d);
        for (orig, dec) in d.iter().zip(&back) {
            for (oc, dc) in orig.chunks(chunk).zip(dec.chunks(chunk)) {
                let kept: Vec<usize> = (0..oc.len()).filter(|&i| dc[i] != 0.0).collect();
                assert!(kept.len() <= keep.min(oc.len()));
                let smallest_kept = kept.iter().map(|&i| oc[i].abs()).fold(f32::INFINITY, f32::min);
                for i in 0..oc.len() {
                    if dc[i] != 0.0 {
                        assert_eq!(dc[i], oc[i]);
                    } else {
                        assert!(oc[i].abs() <= smallest_kept || oc[i] == 0.0);
                    }
                }
            }
        }
    }
}

/// 2-bit values: the sign is kept and the magnitude is one of two per group, each between the group's
/// smallest and largest kept magnitude; sign-only: the group's mean magnitude; bf16: 2⁻⁸ relative.
#[test]
fn quantised_kept_values_keep_their_sign_and_stay_in_range() {
    let d = delta(5);
    for values in [Values::TwoBit, Values::Sign, Values::Bf16] {
        let c = sparse(Codec::TopK, 2, 16, values);
        let exact = round_trip(&sparse(Codec::TopK, 2, 16, Values::F32), &d);
        let back = round_trip(&c, &d);
        for (e, b) in exact.iter().zip(&back) {
            // A group is `block` = 4 chunks of 16.
            for (eg, bg) in e.chunks(64).zip(b.chunks(64)) {
                let mags: Vec<f32> = eg.iter().filter(|v| **v != 0.0).map(|v| v.abs()).collect();
                let (lo, hi) = mags.iter().fold((f32::INFINITY, 0f32), |(l, h), m| (l.min(*m), h.max(*m)));
                let distinct: std::collections::BTreeSet<u32> =
                    bg.iter().filter(|v| **v != 0.0).map(|v| v.abs().to_bits()).collect();
                match values {
                    Values::TwoBit => assert!(distinct.len() <= 2),
                    Values::Sign => assert!(distinct.len() <= 1),
                    _ => {}
                }
                for (x, y) in eg.iter().zip(bg) {
                    if *x == 0.0 {
                        assert_eq!(*y, 0.0);
                        continue;
                    }
                    assert_eq!(x.signum(), y.signum(), "{values:?}: {x} → {y}");
                    let tolerance = if values == Values::Bf16 { hi * 2f32.powi(-8) } else { hi * 1e-5 };
                    assert!(
                        y.abs() >= lo - tolerance && y.abs() <= hi + tolerance,
                        "{values:?}: {x} → {y} ∉ [{lo}, {hi}]"
                    );
                }
            }
        }
    }
}

/// DCT with every coefficient kept is lossless (to f32 rounding); keeping k of L coefficients loses at most
/// the energy of the dropped ones, which by Parseval is at most (L − k)/L of the chunk's energy.
#[test]
fn dct_top_k_loses_only_the_dropped_coefficients_energy() {
    let d = delta(6);
    let all = round_trip(&sparse(Codec::Dct, 16, 16, Values::F32), &d);
    for (a, b) in d.iter().flatten().zip(all.iter().flatten()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let back = round_trip(&sparse(Codec::Dct, 4, 16, Values::F32), &d);
    for (orig, dec) in d.iter().zip(&back) {
        for (oc, dc) in orig.chunks(16).zip(dec.chunks(16)) {
            let energy: f32 = oc.iter().map(|v| v * v).sum();
            let error: f32 = oc.iter().zip(dc).map(|(a, b)| (a - b) * (a - b)).sum();
            let kept = 4.min(oc.len()) as f32;
            assert!(error <= energy * (1.0 - kept / oc.len() as f32) + 1e-6, "error {error} of energy {energy}");
        }
    }
}

/// Error feedback: Σ sent = Σ Δ − residual, and the residual stays bounded, so the sum of what was sent
/// converges (relatively) to the sum of the true Δ. Without feedback it does not.
#[test]
fn error_feedback_makes_the_sent_sum_converge_to_the_true_sum() {
    let specs = specs();
    let mut results = Vec::new();
    for c in [
        CompressionConfig { error_feedback: true, ..sparse(Codec::TopK, 1, 64, Values::TwoBit) },
        CompressionConfig { error_feedback: true, ..sparse(Codec::Dct, 1, 64, Values::TwoBit) },
        CompressionConfig { error_feedback: true, ..cfg(Codec::Int4) },
        sparse(Codec::TopK, 1, 64, Values::TwoBit),
    ] {
        let drift = delta(100);
        let zeros: Vec<Vec<f64>> = specs.iter().map(|s| vec![0.0; s.shape.iter().product()]).collect();
        let mut residual: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.shape.iter().product()]).collect();
        let (mut true_sum, mut sent_sum) = (zeros.clone(), zeros);
        let mut relative = Vec::new();
        for round in 0..400u64 {
            let noise = delta(round + 1000);
            let d: Vec<Vec<f32>> =
                drift.iter().zip(&noise).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + 0.5 * y).collect()).collect();
            let (payload, new_residual) = codec::compress(&c, 0, &specs, &d, Some(&residual), &meta());
            if c.error_feedback {
                residual = new_residual;
            }
            let parsed = codec::parse(&payload, Expected { config: &c, fragment: 0, specs: &specs }).unwrap();
            let sent = codec::decode(&c, &specs, &parsed);
            for ((t, s), (d, x)) in true_sum.iter_mut().zip(sent_sum.iter_mut()).zip(d.iter().zip(&sent)) {
                t.iter_mut().zip(d).for_each(|(t, d)| *t += *d as f64);
                s.iter_mut().zip(&x.data).for_each(|(s, x)| *s += *x as f64);
            }
            if c.error_feedback {
                // The invariant behind it: Σ sent + residual = Σ Δ (to f32 rounding).
                let gap: f64 = true_sum
                    .iter()
                    .flatten()
                    .zip(sent_sum.iter().flatten())
                    .zip(residual.iter().flatten())
                    .map(|((t, s), r)| (t - s - *r as f64).abs())
                    .fold(0.0, f64::max);
                assert!(gap < 1e-3, "{}: Σ sent + residual drifts from Σ Δ by {gap}", c.describe());
            }
            if [49, 399].contains(&round) {
                let (mut err, mut norm) = (0f64, 0f64);
                for (t, s) in true_sum.iter().flatten().zip(sent_sum.iter().flatten()) {
                    err += (t - s).powi(2);
                    norm += t.powi(2);
                }
                relative.push((err / norm).sqrt());
            }
        }
        results.push((c.describe(), relative));
    }
    // A bounded residual against a sum that grows linearly: the relative error falls like 1/rounds
    // (8× more rounds between the two probes).
    for (name, rel) in &results[..3] {
        assert!(rel[1] < 0.1, "{name}: relative error of the sent sum after 400 rounds {rel:?}");
        assert!(rel[1] < rel[0] / 4.0, "{name}: the relative error shrinks like 1/rounds {rel:?}");
    }
    let (name, rel) = &results[3];
    assert!(rel[1] > 0.3, "{name}: without feedback the dropped mass is lost for good {rel:?}");
}

/// The accumulator's mean is the element-wise mean of the decoded payloads.
#[test]
fn the_accumulator_averages_decoded_payloads() {
    let specs = specs();
    for c in [cfg(Codec::None), cfg(Codec::Int8), sparse(Codec::Dct, 3, 16, Values::TwoBit)] {
        let mut acc = Accumulator::new(c, specs.clone());
        let mut dense: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.shape.iter().product()]).collect();
        for seed in 0..5 {
            let (payload, _) = codec::compress(&c, 0, &specs, &delta(seed), None, &meta());
            let parsed = codec::parse(&payload, expected(&c, &specs)).unwrap();
            for (d, t) in dense.iter_mut().zip(codec::decode(&c, &specs, &parsed)) {
                d.iter_mut().zip(&t.data).for_each(|(d, v)| *d += v);
            }
            acc.add(&parsed);
        }
        assert_eq!(acc.count(), 5);
        for (m, d) in acc.mean().iter().zip(&dense) {
            for (a, b) in m.data.iter().zip(d) {
                assert!((a - b / 5.0).abs() < 1e-6, "{}: {a} vs {}", c.describe(), b / 5.0);
            }
        }
    }
}

fn payload(c: &CompressionConfig) -> Vec<u8> {
    codec::compress(c, 0, &specs(), &delta(9), None, &meta()).0
}

/// Rewrites the checksum so that a test can reach the checks behind it.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 32;
    let sum = blake3::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(sum.as_bytes());
    bytes
}

fn refusal(bytes: &[u8], c: &CompressionConfig) -> &'static str {
    match codec::parse(bytes, expected(c, &specs())) {
        Ok(_) => "accepted",
        Err(e) => e.code(),
    }
}

#[test]
fn payloads_the_run_does_not_allow_are_refused_with_a_reason() {
    let topk = sparse(Codec::TopK, 2, 16, Values::TwoBit);
    let good = payload(&topk);
    assert_eq!(refusal(&good, &topk), "accepted");
    assert_eq!(refusal(&payload(&cfg(Codec::Int8)), &topk), "wrong_codec");
    assert_eq!(refusal(&good, &sparse(Codec::TopK, 3, 16, Values::TwoBit)), "wrong_codec");
    let other = vec![TensorSpec { name: "a".into(), shape: vec![33, 7] }, specs()[1].clone(), specs()[2].clone()];
    assert_eq!(codec::parse(&good, expected(&topk, &other)).err().unwrap().code(), "shape_mismatch");
    assert_eq!(
        codec::parse(&good, Expected { fragment: 1, ..expected(&topk, &specs()) }).err().unwrap().code(),
        "wrong_fragment"
    );
    assert_eq!(refusal(&good[..good.len() - 1], &topk), "malformed_delta");
    assert_eq!(refusal(&[good.clone(), vec![0]].concat(), &topk), "malformed_delta");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    assert_eq!(refusal(&flipped, &topk), "malformed_delta", "checksum");

    // Behind a valid checksum: a NaN value, an int8 −128, an index out of range or out of order.
    let none = cfg(Codec::None);
    let mut nan = payload(&none);
    let last_value = nan.len() - 32 - 4;
    nan[last_value..last_value + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(refusal(&reseal(nan), &none), "non_finite");
    let int8 = cfg(Codec::Int8);
    let mut minus128 = payload(&int8);
    let at = minus128.len() - 33;
    minus128[at] = 0x80;
    assert_eq!(refusal(&reseal(minus128), &int8), "malformed_delta");
    let f32_topk = sparse(Codec::TopK, 2, 16, Values::F32);
    let p = payload(&f32_topk);
    // The first section's indices start after the header, the tensor table and the metadata.
    let header = 68 + 16 * 3 + serde_json::to_vec(&meta()).unwrap().len();
    let mut swapped = p.clone();
    swapped[header] = 0xFF; // first two 4-bit indices: 15, 15 (not ascending)
    assert_eq!(refusal(&reseal(swapped), &f32_topk), "malformed_delta");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes never panic the decoder, and are (all but surely) refused.
    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let c = sparse(Codec::TopK, 2, 16, Values::TwoBit);
        prop_assert!(codec::parse(&bytes, expected(&c, &specs())).is_err());
    }

    /// Any single corrupted byte or any truncation of a valid payload is refused, never a panic.
    #[test]
    fn corruption_and_truncation_are_refused(
        which in 0usize..6, at in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>()
    ) {
        let c = [cfg(Codec::None), cfg(Codec::Bf16), cfg(Codec::Int8), cfg(Codec::Int4),
                 sparse(Codec::TopK, 2, 16, Values::TwoBit), sparse(Codec::Dct, 1, 64, Values::Sign)][which];
        let good = payload(&c);
        let mut bad = good.clone();
        bad[at.index(good.len())] ^= 1 << bit;
        prop_assert!(codec::parse(&bad, expected(&c, &specs())).is_err());
        prop_assert!(codec::parse(&good[..cut.index(good.len())], expected(&c, &specs())).is_err());
    }

    /// Corruption behind a valid checksum (a hostile sender) is refused or decodes to finite values.
    #[test]
    fn resealed_corruption_never_panics(which in 0usize..6, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let c = [cfg(Codec::None), cfg(Codec::Bf16), cfg(Codec::Int8), cfg(Codec::Int4),
                 sparse(Codec::TopK, 2, 16, Values::TwoBit), sparse(Codec::Dct, 1, 64, Values::Sign)][which];
        let mut bad = payload(&c);
        let n = bad.len() - 32;
        bad[at.index(n)] = byte;
        let bad = reseal(bad);
        if let Ok(p) = codec::parse(&bad, expected(&c, &specs())) {
            for t in codec::decode(&c, &specs(), &p) {
                prop_assert!(t.data.iter().all(|v| v.is_finite()));
            }
        }
    }

    /// fp32 payloads round-trip exactly, whatever the values.
    #[test]
    fn fp32_round_trips(a in proptest::collection::vec(-1e6f32..1e6, 231), b in proptest::collection::vec(-1e3f32..1e3, 5),
                        c in proptest::collection::vec(-1f32..1.0, 300)) {
        let d = vec![a, b, c];
        prop_assert_eq!(round_trip(&cfg(Codec::None), &d), d);
    }
}

/// The coordinator's second parse of a buffer it has already accepted decodes the same values.
#[test]
fn parse_accepted_decodes_what_parse_accepted() {
    let specs = specs();
    for c in [cfg(Codec::Int4), sparse(Codec::Dct, 2, 16, Values::TwoBit)] {
        let bytes = payload(&c);
        let full = codec::decode(&c, &specs, &codec::parse(&bytes, expected(&c, &specs)).unwrap());
        let again = codec::decode(&c, &specs, &codec::parse_accepted(&bytes, expected(&c, &specs)).unwrap());
        assert_eq!(full, again);
        // Structure is still checked: a truncated buffer is refused, not decoded out of bounds.
        assert!(codec::parse_accepted(&bytes[..bytes.len() - 1], expected(&c, &specs)).is_err());
    }
}
