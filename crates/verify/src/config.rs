//! The run file's `[trust]` section.

use crate::aggregate::AggregationRule;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    /// Judge every submission at the round's close (scores, copies, replays, norms, spot checks) and
    /// aggregate only the admitted ones. Off: every accepted payload goes into a plain mean (issue 4's
    /// streaming sum), and nobody is credited.
    pub verify: bool,
    /// How the admitted pseudo-gradients are combined.
    pub aggregation: AggregationRule,
    /// Segments of the hash chain a worker commits to (states at each segment boundary); 0: no chain.
    pub segments: u64,
    /// Fraction of submissions challenged to prove one segment (re-run by the coordinator).
    pub spot_check: f64,
    /// Largest relative difference between the recomputed and the committed update of a segment
    /// (‖Δw_recomputed − Δw_committed‖ / ‖Δw_committed‖). Bit-exact when both use the same thread count.
    pub tolerance: f64,
    /// Random held-out batches (of `inner.batch_size` windows) the score is measured on; the assigned-data
    /// evidence, which is reported but not scored, uses a quarter as many.
    pub score_batches: usize,
    /// Step along a submission's Δ when its loss is measured: θ − scale·Δ. One worker's whole Δ
    /// overshoots on held-out data once training is under way (it is 1/n of an outer step); a shorter
    /// step measures its direction.
    pub score_scale: f64,
    /// A Δ whose L2 norm exceeds this multiple of the round's median is rejected.
    pub norm_limit: f64,
    /// Cosine similarity at or above which the later of two same-round uploads is a copy.
    pub copy_cosine: f64,
    /// Least cosine between a Δ and the mean of the round's other uploads. Honest workers' Δs agree
    /// (0.2–0.8 measured); a sign flip is negative and random noise of model size is within ±0.005.
    pub min_agreement: f64,
    /// Reputation EMA weight of a new score.
    pub reputation_alpha: f64,
    /// Micro-credits per token trained at score 1.
    pub micro_credits_per_token: f64,
    /// Micro-credits the run's reward pool is funded with; payouts stop when it is empty.
    pub reward_pool: u64,
    /// Credits vest: a judged credit is booked as a pending transfer and posted only at the close of the
    /// round this many rounds later; a proven cheat in between voids every pending credit of the identity.
    pub vesting_rounds: u64,
    /// Probation: nothing of an identity's is posted before it has this many verified rounds (uploads
    /// whose spot check passed) since its last proven cheat, so a fresh identity that lies on every
    /// challenge never posts anything.
    pub probation_rounds: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            verify: true,
            aggregation: AggregationRule::Mean,
            segments: 4,
            spot_check: 0.25,
            tolerance: 0.01,
            score_batches: 8,
            score_scale: 0.25,
            norm_limit: 10.0,
            copy_cosine: 0.95,
            min_agreement: 0.01,
            reputation_alpha: 0.2,
            micro_credits_per_token: 1.0,
            reward_pool: 1_000_000_000_000_000,
            vesting_rounds: 8,
            probation_rounds: 2,
        }
    }
}

impl TrustConfig {
    /// Segments of a round of `steps` inner steps (never more than its steps).
    pub fn chain_segments(&self, steps: u64) -> u64 {
        self.segments.min(steps)
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.spot_check) {
            bail!("trust.spot_check must be a fraction in [0, 1], got {}", self.spot_check);
        }
        if self.spot_check > 0.0 && self.segments == 0 {
            bail!("trust.spot_check needs trust.segments > 0 (a chain to check)");
        }
        for (name, v) in
            [("tolerance", self.tolerance), ("norm_limit", self.norm_limit), ("score_scale", self.score_scale)]
        {
            if v.is_nan() || v <= 0.0 {
                bail!("trust.{name} must be positive, got {v}");
            }
        }
        if !(-1.0..1.0).contains(&self.min_agreement) {
            bail!("trust.min_agreement must be in [-1, 1), got {}", self.min_agreement);
        }
        if !(self.copy_cosine > 0.0 && self.copy_cosine <= 1.0) {
            bail!("trust.copy_cosine must be in (0, 1], got {}", self.copy_cosine);
        }
        if !(self.reputation_alpha > 0.0 && self.reputation_alpha <= 1.0) {
            bail!("trust.reputation_alpha must be in (0, 1], got {}", self.reputation_alpha);
        }
        if self.micro_credits_per_token.is_nan() || self.micro_credits_per_token < 0.0 {
            bail!("trust.micro_credits_per_token must be ≥ 0");
        }
        if self.score_batches == 0 {
            bail!("trust.score_batches must be at least 1");
        }
        self.aggregation.validate()
    }
}
