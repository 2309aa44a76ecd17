//! The judge's rules: from what was measured about a round's uploads to a verdict for each. Pure
//! functions of numbers (no tensors, storage or clock), so every rule is unit- and property-tested here
//! and the coordinator only measures and records.
//!
//! The invariant the references are built for: **no set of fewer than half of a round's uploads can get
//! an honest upload refused**, provided the honest uploads agree with each other (their norms within a
//! factor `norm_limit` of one another and their pairwise cosines above `min_agreement`). Every reference
//! a rule compares against is therefore an *upper* median (the value at index ⌊n/2⌋ of the sorted list),
//! which a minority can neither pull below the smallest honest value nor push above the largest:
//! - norm: an upload is refused when its norm exceeds `norm_limit` × the upper median of the round's
//!   norms. Tiny uploads cannot lower that reference below the smallest honest norm.
//! - direction: an upload is refused as off-consensus when the upper median of its cosines with the
//!   other remaining uploads is below `min_agreement`. For an honest upload a minority supplies fewer
//!   than half of those cosines, so the median is one of its cosines with honest uploads. It is only
//!   applied with at least three remaining uploads: two uploads that disagree cannot say which is wrong.
//! - score: relative to the upper median of the round's positive held-out gains (see
//!   [`crate::bounded_scores`]): small uploads score low themselves and cannot raise anyone else's score.
//!
//! Copies and replays are judged pairwise (the later of two near-identical uploads of a round is the
//! copier; a Δ equal or near-identical to an earlier round's is a replay).

use crate::config::TrustConfig;

/// Verdicts, in the order they are tested. Every one but `accepted` earns nothing and stays out of the
/// aggregate; all but `zero_score` and `off_consensus` are proven misbehaviour (see [`is_slashing`]).
pub const ACCEPTED: &str = "accepted";
pub const NORM: &str = "norm";
pub const REPLAY: &str = "replay";
pub const COPY: &str = "copy";
pub const SPOT_CHECK_FAILED: &str = "spot_check_failed";
pub const ZERO_SCORE: &str = "zero_score";
/// Points against or across the round's consensus (the median of its cosines with the other uploads is
/// below `min_agreement`): a sign flip, or noise.
pub const OFF_CONSENSUS: &str = "off_consensus";
pub const NON_FINITE: &str = "non_finite";

/// Whether a verdict proves misbehaviour (as opposed to a contribution that merely did not help).
pub fn is_slashing(verdict: &str) -> bool {
    !matches!(verdict, ACCEPTED | ZERO_SCORE | OFF_CONSENSUS)
}

/// The value at index ⌊n/2⌋ of the sorted values (the larger middle one for an even count); 0 for none.
/// Fewer than half of the values (at most ⌈n/2⌉ − 1) can neither put it below the smallest of the others
/// nor above the largest.
pub fn upper_median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Pairwise dot products of a round's uploads (each a flat vector), accumulated chunk by chunk so that
/// the uploads never have to be in memory together.
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    n: usize,
    dots: Vec<f64>,
}

impl Gram {
    pub fn new(n: usize) -> Gram {
        Gram { n, dots: vec![0.0; n * n] }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Adds one chunk: `chunks[i]` holds the same coordinates of upload `i`.
    pub fn add_chunk(&mut self, chunks: &[&[f32]]) {
        assert_eq!(chunks.len(), self.n, "one chunk per upload");
        for i in 0..self.n {
            for j in i..self.n {
                assert_eq!(chunks[i].len(), chunks[j].len(), "chunks of different lengths");
                let dot: f64 = chunks[i].iter().zip(chunks[j]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                self.dots[i * self.n + j] += dot;
                if i != j {
                    self.dots[j * self.n + i] += dot;
                }
            }
        }
    }

    /// The statistics of the first `n` vectors only (the round's uploads, when the previous round's were
    /// accumulated after them).
    pub fn leading(&self, n: usize) -> Gram {
        assert!(n <= self.n, "leading {n} of {}", self.n);
        let mut dots = Vec::with_capacity(n * n);
        for i in 0..n {
            dots.extend_from_slice(&self.dots[i * self.n..i * self.n + n]);
        }
        Gram { n, dots }
    }

    pub fn dot(&self, i: usize, j: usize) -> f64 {
        self.dots[i * self.n + j]
    }

    pub fn norm(&self, i: usize) -> f64 {
        self.dot(i, i).max(0.0).sqrt()
    }

    /// Cosine similarity; 0 when either vector is zero (a zero Δ copies nobody).
    pub fn cosine(&self, i: usize, j: usize) -> f64 {
        let (a, b) = (self.norm(i), self.norm(j));
        if a == 0.0 || b == 0.0 {
            0.0
        } else {
            (self.dot(i, j) / (a * b)).clamp(-1.0, 1.0)
        }
    }
}

/// The state of an upload's spot check when the round is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpotCheckState {
    NotChallenged,
    Passed,
    /// Failed, or challenged and not answered before the round closed.
    Failed,
}

/// What the judge knows of one upload besides the round's Gram matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadFacts {
    /// Its decoded values equal those of an upload of an earlier round.
    pub replayed: bool,
    /// Largest cosine with the previous round's accepted uploads of the same fragment.
    pub previous_similarity: f64,
    pub spot_check: SpotCheckState,
}

/// One upload's verdict before scoring, with the numbers it rests on.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleVerdict {
    pub verdict: &'static str,
    pub norm: f64,
    /// Largest cosine with an earlier upload of the round.
    pub similarity: f64,
    /// Upper median of its cosines with the other remaining uploads (None: the rule did not apply).
    pub agreement: Option<f64>,
}

/// The verdicts that need no loss measurement, for uploads in acceptance order: norm, replay, copy,
/// spot check, then direction among those still accepted.
pub fn rule_verdicts(trust: &TrustConfig, facts: &[UploadFacts], gram: &Gram) -> Vec<RuleVerdict> {
    assert_eq!(facts.len(), gram.len(), "one set of facts per upload");
    let n = facts.len();
    let norms: Vec<f64> = (0..n).map(|i| gram.norm(i)).collect();
    let reference = upper_median(&norms);
    let mut out: Vec<RuleVerdict> = (0..n)
        .map(|i| {
            let similarity = (0..i).map(|j| gram.cosine(i, j)).fold(0.0, f64::max);
            let f = &facts[i];
            let verdict = if norms[i] > trust.norm_limit * reference {
                NORM
            } else if f.replayed || f.previous_similarity >= trust.copy_cosine {
                REPLAY
            } else if similarity >= trust.copy_cosine {
                COPY
            } else if f.spot_check == SpotCheckState::Failed {
                SPOT_CHECK_FAILED
            } else {
                ACCEPTED
            };
            RuleVerdict { verdict, norm: norms[i], similarity, agreement: None }
        })
        .collect();
    let remaining: Vec<usize> = (0..n).filter(|&i| out[i].verdict == ACCEPTED).collect();
    if remaining.len() >= 3 {
        for &i in &remaining {
            let cosines: Vec<f64> = remaining.iter().filter(|&&j| j != i).map(|&j| gram.cosine(i, j)).collect();
            let agreement = upper_median(&cosines);
            out[i].agreement = Some(agreement);
            if agreement < trust.min_agreement {
                out[i].verdict = OFF_CONSENSUS;
            }
        }
    }
    out
}

/// The last rule, after the loss measurement: an upload still accepted whose bounded score is 0 (its step did
/// not lower the held-out loss relative to the round's reference) is refused as `zero_score`, which is not a
/// proven cheat (it earns nothing and stays out of the aggregate, its reputation only decays).
pub fn score_verdict(verdict: &'static str, score: f64) -> &'static str {
    if verdict == ACCEPTED && (score.is_nan() || score <= 0.0) {
        ZERO_SCORE
    } else {
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uploads_that_do_not_help_score_zero() {
        assert_eq!(score_verdict(ACCEPTED, 0.3), ACCEPTED);
        assert_eq!(score_verdict(ACCEPTED, 0.0), ZERO_SCORE);
        assert_eq!(score_verdict(ACCEPTED, f64::NAN), ZERO_SCORE);
        assert_eq!(score_verdict(COPY, 0.9), COPY, "an earlier verdict stands");
        assert!(!is_slashing(ZERO_SCORE));
    }

    fn gram_of(vectors: &[Vec<f32>]) -> Gram {
        let mut g = Gram::new(vectors.len());
        let views: Vec<&[f32]> = vectors.iter().map(|v| v.as_slice()).collect();
        g.add_chunk(&views);
        g
    }

    fn honest_facts(n: usize) -> Vec<UploadFacts> {
        vec![UploadFacts { replayed: false, previous_similarity: 0.0, spot_check: SpotCheckState::NotChallenged }; n]
    }

    /// A deterministic pseudo-random vector: a shared direction plus per-upload noise.
    fn honest(seed: u64, dim: usize, scale: f32, signal: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..dim)
            .map(|k| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let noise = (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                let common = ((k as f32) * 0.37).sin();
                scale * (signal * common + noise)
            })
            .collect()
    }

    #[test]
    fn upper_median_is_the_larger_middle() {
        assert_eq!(upper_median(&[]), 0.0);
        assert_eq!(upper_median(&[3.0]), 3.0);
        assert_eq!(upper_median(&[1.0, 5.0]), 5.0);
        assert_eq!(upper_median(&[9.0, 1.0, 5.0]), 5.0);
        assert_eq!(upper_median(&[0.1, 0.1, 4.0, 5.0]), 4.0, "two of four cannot pull it down");
    }

    #[test]
    fn chunked_gram_equals_the_whole() {
        let v: Vec<Vec<f32>> = (0..3).map(|s| honest(s, 100, 1.0, 1.0)).collect();
        let whole = gram_of(&v);
        let mut chunked = Gram::new(3);
        for range in [0..37, 37..100] {
            let views: Vec<&[f32]> = v.iter().map(|x| &x[range.clone()]).collect();
            chunked.add_chunk(&views);
        }
        for i in 0..3 {
            for j in 0..3 {
                assert!((whole.dot(i, j) - chunked.dot(i, j)).abs() < 1e-9);
            }
        }
        assert!((whole.cosine(0, 0) - 1.0).abs() < 1e-12);
        assert_eq!(gram_of(&[vec![0.0; 4], vec![1.0; 4]]).cosine(0, 1), 0.0, "a zero Δ copies nobody");
    }

    #[test]
    fn norm_rule_refuses_only_the_outsized() {
        let trust = TrustConfig::default();
        let mut v: Vec<Vec<f32>> = (0..3).map(|s| honest(s, 200, 1.0, 1.0)).collect();
        v.push(v[0].iter().map(|x| x * 100.0).collect());
        let verdicts = rule_verdicts(&trust, &honest_facts(4), &gram_of(&v));
        assert_eq!(verdicts.iter().map(|v| v.verdict).collect::<Vec<_>>(), [ACCEPTED, ACCEPTED, ACCEPTED, NORM]);
    }

    /// Issue 11, finding 2: with the lower median two tiny uploads out of four (or one of two) got honest
    /// uploads refused as `norm`.
    #[test]
    fn tiny_uploads_cannot_move_the_norm_reference() {
        let trust = TrustConfig::default();
        for (honest_count, tiny_count) in [(1usize, 1usize), (2, 2), (3, 2)] {
            let mut v: Vec<Vec<f32>> = (0..honest_count as u64).map(|s| honest(s, 200, 1.0, 1.0)).collect();
            for k in 0..tiny_count {
                v.push(v[k % honest_count].iter().map(|x| x * 0.05).collect());
            }
            let verdicts = rule_verdicts(&trust, &honest_facts(v.len()), &gram_of(&v));
            for (i, r) in verdicts.iter().take(honest_count).enumerate() {
                assert_ne!(r.verdict, NORM, "honest {i} of {honest_count} refused with {tiny_count} tiny uploads");
            }
        }
    }

    #[test]
    fn copies_and_replays_are_the_later_upload() {
        let trust = TrustConfig::default();
        let mut v: Vec<Vec<f32>> = (0..3).map(|s| honest(s, 200, 1.0, 0.3)).collect();
        v.push(v[1].clone());
        let mut facts = honest_facts(4);
        facts[2].replayed = true;
        let verdicts = rule_verdicts(&trust, &facts, &gram_of(&v));
        assert_eq!(verdicts[1].verdict, ACCEPTED, "the original is not the copier");
        assert_eq!(verdicts[3].verdict, COPY);
        assert_eq!(verdicts[2].verdict, REPLAY);
        facts[0].previous_similarity = 0.99;
        assert_eq!(rule_verdicts(&trust, &facts, &gram_of(&v))[0].verdict, REPLAY);
    }

    #[test]
    fn failed_spot_checks_are_refused() {
        let trust = TrustConfig::default();
        let v: Vec<Vec<f32>> = (0..3).map(|s| honest(s, 200, 1.0, 1.0)).collect();
        let mut facts = honest_facts(3);
        facts[1].spot_check = SpotCheckState::Failed;
        facts[2].spot_check = SpotCheckState::Passed;
        let verdicts = rule_verdicts(&trust, &facts, &gram_of(&v));
        assert_eq!(verdicts.iter().map(|v| v.verdict).collect::<Vec<_>>(), [ACCEPTED, SPOT_CHECK_FAILED, ACCEPTED]);
    }

    #[test]
    fn sign_flips_and_noise_are_off_consensus() {
        let trust = TrustConfig::default();
        let mut v: Vec<Vec<f32>> = (0..3).map(|s| honest(s, 100_000, 1.0, 1.0)).collect();
        v.push(v[0].iter().map(|x| -x).collect());
        v.push(honest(99, 100_000, 1.0, 0.0));
        let verdicts = rule_verdicts(&trust, &honest_facts(5), &gram_of(&v));
        assert_eq!(
            verdicts.iter().map(|v| v.verdict).collect::<Vec<_>>(),
            [ACCEPTED, ACCEPTED, ACCEPTED, OFF_CONSENSUS, OFF_CONSENSUS]
        );
    }

    #[test]
    fn two_uploads_never_refuse_each_other_on_direction() {
        let trust = TrustConfig::default();
        let a = honest(1, 500, 1.0, 1.0);
        let v = vec![a.clone(), a.iter().map(|x| -x).collect()];
        let verdicts = rule_verdicts(&trust, &honest_facts(2), &gram_of(&v));
        assert!(verdicts.iter().all(|v| v.verdict == ACCEPTED && v.agreement.is_none()));
    }

    #[test]
    fn slashing_verdicts() {
        for v in [NORM, REPLAY, COPY, SPOT_CHECK_FAILED, NON_FINITE] {
            assert!(is_slashing(v), "{v}");
        }
        for v in [ACCEPTED, ZERO_SCORE, OFF_CONSENSUS] {
            assert!(!is_slashing(v), "{v}");
        }
    }

    /// What an attacker may send: anything from nothing to a 9× (under the norm limit) or 1000× scaled,
    /// flipped or random vector.
    fn attacker(kind: u8, seed: u64, base: &[f32]) -> Vec<f32> {
        match kind % 6 {
            0 => base.iter().map(|x| x * 0.01).collect(),
            1 => base.iter().map(|x| -x * 9.0).collect(),
            2 => honest(seed, base.len(), 5.0, 0.0),
            3 => base.iter().map(|x| x * 1000.0).collect(),
            4 => vec![0.0; base.len()],
            _ => base.iter().map(|x| -x).collect(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The invariant: fewer than half of a round's uploads, whatever they send, never get an honest
        /// upload refused by a rule that compares uploads (norm, copy, direction).
        #[test]
        fn a_minority_never_gets_an_honest_upload_refused(
            honest_count in 1usize..7,
            attackers in proptest::collection::vec((0u8..6, any::<u64>(), any::<bool>()), 0..6),
            scales in proptest::collection::vec(0.5f32..2.0, 7),
            seed in any::<u64>(),
        ) {
            // Strictly fewer than half of all uploads.
            let attackers: Vec<_> = attackers.into_iter().take(honest_count.saturating_sub(1)).collect();
            prop_assume!(2 * attackers.len() < honest_count + attackers.len());
            let trust = TrustConfig::default();
            let honest_vectors: Vec<Vec<f32>> =
                (0..honest_count).map(|i| honest(seed.wrapping_add(i as u64), 3000, scales[i], 1.0)).collect();
            // Attackers derive their uploads from the first honest one, so they upload after it (nobody can
            // send a scaled copy of a Δ before it exists); otherwise they interleave with the honest ones.
            let mut uploads: Vec<(bool, Vec<f32>)> = vec![(true, honest_vectors[0].clone())];
            let mut hv = honest_vectors.iter().skip(1);
            for (kind, s, first) in &attackers {
                if !*first {
                    if let Some(h) = hv.next() { uploads.push((true, h.clone())); }
                }
                uploads.push((false, attacker(*kind, *s, &honest_vectors[0])));
            }
            for h in hv { uploads.push((true, h.clone())); }
            let vectors: Vec<Vec<f32>> = uploads.iter().map(|u| u.1.clone()).collect();
            let verdicts = rule_verdicts(&trust, &honest_facts(vectors.len()), &gram_of(&vectors));
            for (u, v) in uploads.iter().zip(&verdicts) {
                if u.0 {
                    prop_assert_eq!(v.verdict, ACCEPTED, "honest upload refused: {:?}", v);
                }
            }
        }
    }
}
