//! Streaming DiLoCo's overlap of communication with computation (arXiv 2501.18512): a worker does
//! not wait for round r's outer step. It starts round r + 1 at once from its own weights and, `steps`
//! inner steps later, when round r's new global value of the fragment it sent arrives, blends it into
//! its weights: θ_f ← merge · θ_f(local) + (1 − merge) · θ_f(global). `merge` 0 takes the global value
//! as it is (the τ local steps on that fragment are lost); 0.5 is the paper's choice.
//!
//! Only the in-process simulation runs it today (`agora bench compression --codecs none,none:f2:overlap=T`); a
//! networked worker still waits for its round's close before it starts the next one.

use crate::fragments::FragmentPlan;
use crate::inner::{train_steps, RoundStats};
use crate::sync::{start_from_global, SyncState};
use crate::tensors::{load_weights, model_weights};
use crate::CompressionConfig;
use agora_data::Shard;
use agora_train::Trainer;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Overlap {
    /// τ: inner steps of round r + 1 taken before round r's outer step is merged in; 0: no overlap (the
    /// worker waits for the close and starts from the new global weights).
    pub steps: u64,
    /// α: the weight of the worker's own values in the blend, in [0, 1).
    pub merge: f64,
}

impl Default for Overlap {
    fn default() -> Self {
        Overlap { steps: 0, merge: 0.5 }
    }
}

impl Overlap {
    pub fn is_on(&self) -> bool {
        self.steps > 0
    }

    pub fn validate(&self, inner_steps: u64) -> Result<()> {
        // α = 1 would never take the global weights in: the workers would never synchronise.
        if !(0.0..1.0).contains(&self.merge) {
            bail!("merge must be in [0, 1), got {}", self.merge);
        }
        if self.steps >= inner_steps.max(1) {
            bail!("overlap τ = {} must be fewer than the round's {inner_steps} inner steps", self.steps);
        }
        Ok(())
    }
}

/// θ ← α·θ + (1 − α)·g for the tensors `indices`, where g is the global value the worker would have
/// started from (global − decay · residual under error feedback, as in [`SyncState::start_weights`]).
pub fn blend(
    weights: &mut [Tensor],
    global: &[Tensor],
    residual: &[Vec<f32>],
    decay: f64,
    indices: &[usize],
    alpha: f64,
) {
    tch::no_grad(|| {
        for &i in indices {
            let g = start_from_global(&global[i], residual.get(i).map(|r| r.as_slice()), decay);
            weights[i] = &weights[i] * alpha + g * (1.0 - alpha);
        }
    });
}

impl SyncState {
    /// The weights an overlapped round `round` starts from: the worker's own weights once it has any (the
    /// previous round's outer step has not landed yet; [`SyncState::merge_late`] takes it in), the global
    /// weights in its first round.
    pub fn overlapped_start(
        &mut self,
        config: &CompressionConfig,
        plan: &FragmentPlan,
        round: u64,
        global: &[Tensor],
    ) -> Vec<Tensor> {
        // Overlap needs the worker's own weights every round, whatever the number of fragments.
        self.keeps_local = true;
        match &self.local {
            Some(local) => local.iter().map(|t| t.copy()).collect(),
            None => self.start_weights(config, plan, round, global),
        }
    }

    /// Blends into `weights` the global value of the fragment round `round − 1` synchronised, now that its
    /// outer step has landed (`global` holds it). Nothing to do in round 0.
    pub fn merge_late(
        &mut self,
        config: &CompressionConfig,
        plan: &FragmentPlan,
        round: u64,
        global: &[Tensor],
        weights: &mut [Tensor],
        alpha: f64,
    ) {
        let Some(previous) = round.checked_sub(1) else { return };
        let fragment = plan.synced_in(previous);
        blend(weights, global, &self.residual, config.feedback_decay, &plan.tensors(fragment), alpha);
        self.loaded[fragment] = Some(round);
    }
}

/// One overlapped round: `overlap.steps` inner steps from `start`, then `merge` (which receives the
/// trainer's weights and blends the late outer update into them), then the rest of the round's `steps`.
/// The learning-rate schedule, data batches and AdamW moments run on exactly as in
/// [`crate::train_round`]; only the weights change at the merge.
pub fn train_round_overlapped(
    trainer: &mut Trainer,
    start: &[Tensor],
    unit: &Shard,
    first_step: u64,
    steps: u64,
    overlap_steps: u64,
    merge: impl FnOnce(&mut [Tensor]),
) -> Result<(Vec<Tensor>, RoundStats)> {
    assert!(overlap_steps < steps, "the merge ({overlap_steps}) must fall inside the round ({steps} steps)");
    load_weights(&trainer.model, start);
    let before = train_steps(trainer, unit, first_step, steps, 0..overlap_steps, |_, _| {})?;
    let mut weights = model_weights(&trainer.model);
    merge(&mut weights);
    load_weights(&trainer.model, &weights);
    let after = train_steps(trainer, unit, first_step, steps, overlap_steps..steps, |_, _| {})?;
    let mean_loss =
        (before.mean_loss * overlap_steps as f64 + after.mean_loss * (steps - overlap_steps) as f64) / steps as f64;
    Ok((model_weights(&trainer.model), RoundStats { mean_loss, tokens: before.tokens + after.tokens }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn the_blend_is_exact_and_touches_only_the_fragment() {
        let global = vec![Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[10.0f32])];
        let mut weights = vec![Tensor::from_slice(&[3.0f32, 6.0]), Tensor::from_slice(&[5.0f32])];
        blend(&mut weights, &global, &[], 0.5, &[0], 0.25);
        let w0: Vec<f32> = Vec::try_from(&weights[0].to_kind(Kind::Float)).unwrap();
        // 0.25·3 + 0.75·1 = 1.5; 0.25·6 + 0.75·2 = 3.
        assert_eq!(w0, vec![1.5, 3.0]);
        assert_eq!(Vec::<f32>::try_from(&weights[1]).unwrap(), vec![5.0]);
        // α = 0 takes the global value; under error feedback that is global − decay · residual.
        let residual = vec![vec![2.0f32, 2.0], vec![0.0]];
        blend(&mut weights, &global, &residual, 0.5, &[0], 0.0);
        assert_eq!(Vec::<f32>::try_from(&weights[0]).unwrap(), vec![0.0, 1.0]);
    }

    #[test]
    fn overlap_is_validated_against_the_round() {
        assert!(Overlap { steps: 5, merge: 0.5 }.validate(50).is_ok());
        assert!(Overlap { steps: 50, merge: 0.5 }.validate(50).is_err());
        assert!(Overlap { steps: 2, merge: 1.5 }.validate(50).is_err());
        assert!(Overlap { steps: 2, merge: 1.0 }.validate(50).is_err());
        assert!(!Overlap::default().is_on());
    }
}
