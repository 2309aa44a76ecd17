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

/// Where each tensor's section starts in a payload under `c` carrying `meta()`.
fn sections_at(c: &CompressionConfig) -> Vec<usize> {
    let mut at = 68 + 16 * specs().len() + serde_json::to_vec(&meta()).unwrap().len();
    specs()
        .iter()
        .map(|s| {
            let here = at;
            at += codec::section::section_len(c, s.shape.iter().product());
            here
        })
        .collect()
}

/// The malformed-payload refusal's message (panics if `bytes` is accepted or refused otherwise).
fn malformed(bytes: &[u8], c: &CompressionConfig) -> String {
    let e = codec::parse(bytes, expected(c, &specs())).err().expect("refused");
    assert!(e.is_malformed(), "{e}");
    assert_eq!(e.code(), "malformed_delta");
    e.to_string()
}

/// What a buffer decodes to when the value checks are skipped (to show two encodings of the same values).
fn decoded_unchecked(bytes: &[u8], c: &CompressionConfig) -> Vec<Vec<f32>> {
    let p = codec::parse_accepted(bytes, expected(c, &specs())).unwrap();
    codec::decode(c, &specs(), &p).into_iter().map(|t| t.data).collect()
}

fn compress_with(c: &CompressionConfig, d: &[Vec<f32>]) -> Vec<u8> {
    codec::compress(c, 0, &specs(), d, None, &meta()).0
}

#[test]
fn integer_codes_outside_the_encoders_range_are_refused() {
    for (codec, name) in [(Codec::Int8, "int8"), (Codec::Int4, "int4")] {
        let c = CompressionConfig { block: 16, ..cfg(codec) };
        let good = payload(&c);
        assert_eq!(refusal(&good, &c), "accepted");
        // Tensor a's codes start after its ⌈231 / 16⌉ = 15 scales.
        let codes = sections_at(&c)[0] + 4 * 15;
        let mut bad = good.clone();
        bad[codes] = if codec == Codec::Int8 { 0x80 } else { (bad[codes] & 0xF0) | 0x08 }; // −128 / −8
        let m = malformed(&reseal(bad), &c);
        assert!(m.contains(name) && m.contains("outside"), "{m}");
        if codec == Codec::Int4 {
            let mut bad = good.clone();
            bad[codes] = (bad[codes] & 0x0F) | 0x80; // −8 in the high nibble
            assert!(malformed(&reseal(bad), &c).contains("outside"));
        }
    }
}

#[test]
fn integer_blocks_have_one_scale_for_their_codes() {
    for (codec, levels) in [(Codec::Int8, 127u8), (Codec::Int4, 7)] {
        let c = CompressionConfig { block: 16, ..cfg(codec) };
        let mut d = delta(11);
        d[1] = vec![0.0; 5]; // tensor b: one block of zeros, written as scale 0 and codes 0
        let good = compress_with(&c, &d);
        assert_eq!(refusal(&good, &c), "accepted");
        let b = sections_at(&c)[1];
        assert_eq!(&good[b..b + 4], &0f32.to_le_bytes());
        let with = |scale: f32, codes: &[u8]| {
            let mut bytes = good.clone();
            bytes[b..b + 4].copy_from_slice(&scale.to_le_bytes());
            bytes[b + 4..b + 4 + codes.len()].copy_from_slice(codes);
            reseal(bytes)
        };
        // Scale 0 with a nonzero code decodes to the same zeros.
        let bad = with(0.0, &[1]);
        assert_eq!(decoded_unchecked(&bad, &c), decoded_unchecked(&good, &c));
        assert!(malformed(&bad, &c).contains("scale 0 but nonzero codes"), "{codec:?}");
        // −0 as a scale, and a positive scale over codes that are all 0: the same zeros again.
        assert!(malformed(&with(-0.0, &[0]), &c).contains("−0"));
        let bad = with(1.0, &[0]);
        assert_eq!(decoded_unchecked(&bad, &c), decoded_unchecked(&good, &c));
        assert!(malformed(&bad, &c).contains("every code 0"));
        // (1, [2, 4, 0, 0, 0]) and (2, [1, 2, 0, 0, 0]) decode alike; the encoder writes neither, since
        // it codes a block's largest magnitude ±levels.
        let (small, large) = if codec == Codec::Int8 { (vec![2, 4], vec![1, 2]) } else { (vec![0x42], vec![0x21]) };
        let (x, y) = (with(1.0, &small), with(2.0, &large));
        assert_eq!(decoded_unchecked(&x, &c), decoded_unchecked(&y, &c));
        for bad in [x, y] {
            let m = malformed(&bad, &c);
            assert!(m.contains("largest code magnitude") && m.contains(&format!("±{levels}")), "{m}");
        }
    }
}

/// Rewrites a payload's metadata bytes (and its metadata length and checksum).
fn with_metadata(good: &[u8], raw: &[u8]) -> Vec<u8> {
    let start = 68 + 16 * specs().len();
    let old = serde_json::to_vec(&meta()).unwrap().len();
    let mut out = good[..start].to_vec();
    out[32..36].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(raw);
    out.extend_from_slice(&good[start + old..]);
    reseal(out)
}

#[test]
fn metadata_has_one_encoding() {
    let c = cfg(Codec::Int8);
    let good = payload(&c);
    assert_eq!(with_metadata(&good, br#"{"round":"3"}"#), good, "the encoder's own bytes");
    let two = with_metadata(&good, br#"{"a":"1","round":"3"}"#);
    assert_eq!(codec::parse(&two, expected(&c, &specs())).unwrap().metadata.len(), 2);
    for raw in [
        &br#"{ "round": "3" }"#[..],
        br#"{"round":"3"} "#,
        br#"{"round":"\u0033"}"#,
        br#"{"round":"3","round":"3"}"#,
        br#"{"round":"1","round":"3"}"#,
        br#"{"round":"3","a":"1"}"#,
        b"{\"round\":\"3\"}\n",
    ] {
        let bad = with_metadata(&good, raw);
        // Every one of them parses as JSON to a map the encoder could have written.
        let map: BTreeMap<String, String> = serde_json::from_slice(raw).unwrap();
        assert!(map == meta() || map.len() == 2);
        let m = malformed(&bad, &c);
        assert!(m.contains("canonical"), "{}: {m}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn two_bit_groups_have_one_encoding() {
    let c = sparse(Codec::TopK, 2, 16, Values::TwoBit);
    // Tensor b: 5 elements, one chunk, one group: 2 scales, one byte of 4-bit indices, one of 2-bit codes.
    let good = payload(&c);
    let b = sections_at(&c)[1];
    let (lo, hi) = (&good[b..b + 4], &good[b + 4..b + 8]);
    assert!(f32::from_le_bytes(lo.try_into().unwrap()) < f32::from_le_bytes(hi.try_into().unwrap()));
    // Swapping the magnitudes and flipping every code's high/low bit decodes to the same values.
    let mut swapped = good.clone();
    swapped[b..b + 8].copy_from_slice(&[hi, lo].concat());
    swapped[b + 9] ^= 0b1010;
    let swapped = reseal(swapped);
    assert_eq!(decoded_unchecked(&swapped, &c), decoded_unchecked(&good, &c));
    assert!(malformed(&swapped, &c).contains("low magnitude"));

    // A magnitude no code uses could be anything: the high one must be used, and an unused low one is 0.
    let mut high_only = good.clone();
    high_only[b + 9] |= 0b1010;
    let unused_low = reseal(high_only.clone());
    high_only[b..b + 4].copy_from_slice(&0f32.to_le_bytes());
    let unused_zero = reseal(high_only);
    assert_eq!(decoded_unchecked(&unused_low, &c), decoded_unchecked(&unused_zero, &c));
    assert!(malformed(&unused_low, &c).contains("no code uses its low magnitude"));
    assert_eq!(refusal(&unused_zero, &c), "accepted");
    let mut low_only = good.clone();
    low_only[b + 9] &= !0b1010;
    assert!(malformed(&reseal(low_only), &c).contains("no code uses its high magnitude"));

    // A group of zeros: magnitudes 0 and 0, indices 0 and 1, codes 2 and 2 ("positive, high").
    let mut d = delta(9);
    d[1] = vec![0.0; 5];
    let zeros = compress_with(&c, &d);
    assert_eq!(refusal(&zeros, &c), "accepted");
    assert_eq!(&zeros[b..b + 10], &[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x0A]);
    for (at, byte, why) in [(9, 0x08, "every code must be 2"), (9, 0x0B, "every code must be 2"), (8, 0x30, "lowest")] {
        let mut bad = zeros.clone();
        bad[b + at] = byte;
        let bad = reseal(bad);
        assert_eq!(decoded_unchecked(&bad, &c), decoded_unchecked(&zeros, &c));
        let m = malformed(&bad, &c);
        assert!(m.contains(why), "{m}");
    }
}

#[test]
fn kept_zeros_sit_at_the_lowest_positions() {
    let c = sparse(Codec::TopK, 2, 16, Values::F32);
    let mut d = delta(9);
    d[1] = vec![0.0, 0.0, 5.0, 0.0, 0.0];
    let good = compress_with(&c, &d);
    assert_eq!(refusal(&good, &c), "accepted");
    let b = sections_at(&c)[1];
    // The encoder keeps position 2 (5.0) and, for the second slot, the lowest zero: position 0.
    assert_eq!(good[b], 0x20);
    // Keeping positions 2 and 3 instead (5.0, 0.0) is the same tensor.
    let mut bad = good.clone();
    bad[b] = 0x32;
    bad[b + 1..b + 9].copy_from_slice(&[5f32.to_le_bytes(), 0f32.to_le_bytes()].concat());
    let bad = reseal(bad);
    assert_eq!(decoded_unchecked(&bad, &c), decoded_unchecked(&good, &c));
    assert!(malformed(&bad, &c).contains("keeps a zero at position 3"));
}

fn every_codec() -> Vec<CompressionConfig> {
    let mut all = vec![cfg(Codec::None), cfg(Codec::Bf16)];
    for block in [1, 16, 64] {
        all.push(CompressionConfig { block, ..cfg(Codec::Int8) });
        all.push(CompressionConfig { block, ..cfg(Codec::Int4) });
    }
    for codec in [Codec::TopK, Codec::Dct] {
        for values in [Values::F32, Values::Bf16, Values::TwoBit, Values::Sign] {
            for (keep, chunk) in [(1, 16), (2, 16), (3, 10), (16, 16)] {
                all.push(sparse(codec, keep, chunk, values));
            }
        }
    }
    all
}

fn awkward_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        Just(-0.0f32),
        Just(f32::from_bits(1)),
        Just(-f32::from_bits(1)),
        -1e-38f32..1e-38,
        -1e-3f32..1e-3,
        -1e3f32..1e3,
        Just(0.5f32),
        Just(-0.5f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The canonical-form checks never refuse the encoder's own output, whatever the values: zeros of
    /// either sign, subnormals, ties and mixed magnitudes included.
    #[test]
    fn the_encoders_output_always_parses(
        a in proptest::collection::vec(awkward_value(), 231),
        b in proptest::collection::vec(awkward_value(), 5),
        c in proptest::collection::vec(awkward_value(), 300),
        sparse_b in any::<bool>(),
    ) {
        let b = if sparse_b { vec![0.0, b[1], 0.0, 0.0, b[4]] } else { b };
        let d = vec![a, b, c];
        for config in every_codec() {
            let bytes = compress_with(&config, &d);
            if let Err(e) = codec::parse(&bytes, expected(&config, &specs())) {
                prop_assert!(false, "{}: the encoder's own payload is refused: {e}", config.describe());
            }
        }
    }
}

/// A stored payload can be read one tensor at a time (the coordinator judges rounds that way): the
/// sections found from the header decode to exactly the whole payload's values.
#[test]
fn sections_read_alone_decode_like_the_whole_payload() {
    let specs =
        vec![TensorSpec { name: "a".into(), shape: vec![3, 70] }, TensorSpec { name: "b".into(), shape: vec![130] }];
    let configs = [
        cfg(Codec::Int8),
        cfg(Codec::Int4),
        cfg(Codec::None),
        sparse(Codec::TopK, 2, 64, Values::TwoBit),
        sparse(Codec::Dct, 2, 64, Values::F32),
    ];
    for config in configs {
        let spec = config.describe();
        let delta: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| (0..s.shape.iter().product::<usize>()).map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0).collect())
            .collect();
        let (bytes, _) = codec::compress(&config, 0, &specs, &delta, None, &meta());
        let expected = codec::Expected { config: &config, fragment: 0, specs: &specs };
        let whole = codec::decode(&config, &specs, &codec::parse(&bytes, expected).unwrap());
        let metadata_len = codec::header_metadata_len(&bytes[..codec::HEADER_LEN]).unwrap();
        for ((range, s), t) in codec::section_ranges(&config, &specs, metadata_len).into_iter().zip(&specs).zip(&whole)
        {
            let alone = codec::decode_section(&config, s, &bytes[range]);
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{spec} {}",
                s.name
            );
        }
        assert_eq!(codec::header_metadata_len(b"nope"), None);
    }
}
