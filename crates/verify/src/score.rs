//! Scores from loss measurements, and reputation.
//!
//! A submission's Δ is applied to the round's global weights and the loss is measured before and after on
//! (a) batches of the data it was assigned and (b) random held-out batches the worker could not know. The
//! score rewards (b) relative to the round's typical submission, clamped to [0, 1]: a Δ that does not
//! lower the held-out loss earns nothing, however it got there, so two negatives never make a positive
//! (Templar's zero-then-random exploit) and no penalty can raise a score.
//! (a) − (b) is the evidence that the worker trained on its assignment (it fits its own data better than
//! data it never saw). Measured on a few batches it is noisy (BENCHMARKS.md: an honest worker's
//! assigned gain falls below its random gain in some rounds), so it is recorded and reported, not used
//! to cut credits; the spot check is what catches training on other data.

use serde::{Deserialize, Serialize};

/// Relative loss improvements of one submission, in [-1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gains {
    /// On random held-out batches.
    pub random: f64,
    /// On batches of the worker's assigned data.
    pub assigned: f64,
}

impl Gains {
    /// Did the worker fit its own data better than unseen data?
    pub fn trained_on_assignment(&self) -> bool {
        self.assigned > self.random
    }
}

/// (before − after) / before, bounded to [-1, 1]; a non-finite or non-positive loss counts as the worst.
pub fn relative_gain(before: f64, after: f64) -> f64 {
    if !(before.is_finite() && before > 0.0 && after.is_finite()) {
        return -1.0;
    }
    ((before - after) / before).clamp(-1.0, 1.0)
}

/// One bounded score in [0, 1] per candidate; `None` (rejected on other grounds) scores 0 and does not
/// set the reference. The reference is the upper median of the round's positive random-batch gains, so a
/// score measures "as useful as a typical honest contribution" whatever the stage of training, and fewer
/// than half of the scored uploads cannot pull the reference below every honest gain (which would pay
/// their own small gains in full: issue 11, finding 2).
pub fn bounded_scores(gains: &[Option<Gains>]) -> Vec<f64> {
    let positive: Vec<f64> = gains.iter().flatten().map(|g| g.random).filter(|&g| g > 0.0).collect();
    let reference = crate::rules::upper_median(&positive);
    gains
        .iter()
        .map(|g| match g {
            Some(g) if reference > 0.0 && g.random > 0.0 => (g.random / reference).clamp(0.0, 1.0),
            _ => 0.0,
        })
        .collect()
}

/// What a round's judgement means for an identity's reputation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A bounded score in [0, 1].
    Scored(f64),
    /// Proven dishonest (failed spot check, copy, replay, poisoned Δ): the rating is reset to 0.
    Slashed,
}

/// Exponential moving average of bounded scores; slashing resets it.
pub fn update_rating(rating: f64, outcome: Outcome, alpha: f64) -> f64 {
    match outcome {
        Outcome::Scored(s) => ((1.0 - alpha) * rating + alpha * s.clamp(0.0, 1.0)).clamp(0.0, 1.0),
        Outcome::Slashed => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_bounded_and_sign_safe() {
        let g = |random, assigned| Some(Gains { random, assigned });
        let s = bounded_scores(&[g(0.02, 0.03), g(0.01, 0.02), g(0.04, 0.05), g(-0.5, -0.9), None, g(0.02, 0.01)]);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 0.5);
        assert_eq!(s[2], 1.0, "capped at 1");
        assert_eq!(s[3], 0.0, "negative × negative is still nothing");
        assert_eq!(s[4], 0.0);
        assert_eq!(s[5], 1.0, "the assignment evidence is reported, not scored");
        assert!(!Gains { random: 0.02, assigned: 0.01 }.trained_on_assignment());
        assert!(bounded_scores(&[g(-0.1, -0.1), g(0.0, 0.0)]).iter().all(|&s| s == 0.0));
        // Two tiny gains out of four cannot lower the reference: they score low, the honest ones in full.
        let s = bounded_scores(&[g(0.001, 0.0), g(0.02, 0.0), g(0.001, 0.0), g(0.021, 0.0)]);
        assert!(s[0] < 0.06 && s[2] < 0.06, "{s:?}");
        assert!(s[1] > 0.9 && s[3] == 1.0, "{s:?}");
        assert_eq!(relative_gain(2.0, 1.0), 0.5);
        assert_eq!(relative_gain(2.0, f64::NAN), -1.0);
        assert_eq!(relative_gain(1.0, 1e9), -1.0);
    }

    #[test]
    fn reputation_is_an_ema_and_slashing_resets_it() {
        let mut r = 0.0;
        for _ in 0..20 {
            r = update_rating(r, Outcome::Scored(1.0), 0.2);
        }
        assert!(r > 0.98 && r <= 1.0);
        assert_eq!(update_rating(r, Outcome::Slashed, 0.2), 0.0);
        assert_eq!(update_rating(0.5, Outcome::Scored(7.0), 0.5), 0.75, "scores are clamped");
    }
}
