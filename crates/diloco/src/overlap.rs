//! Streaming DiLoCo's overlap of communication with computation (arXiv 2501.18512): a worker does
//! not wait for round r's outer step. It starts round r + 1 at once from its own weights s (where it ended
//! round r) and, `steps` inner steps later, when round r's new global value g of the fragment it sent
//! arrives, applies that late update to the weights θ it has reached:
//! θ_f ← θ_f + (1 − merge)·(g_f − s_f). With `merge` 0 (the default) the worker lands where a worker that
//! had waited for g would be after its τ steps (to first order: those steps' gradients were taken from s,
//! not g); `merge` α keeps α of its own un-updated values.
//!
//! Why not the paper's blend θ_f ← α·θ_f + (1 − α)·g_f: it also drops (1 − α) of the τ local steps, and
//! with α > 0 it keeps α of g_f − s_f, which under an amplifying outer step (Nesterov lr 1 / momentum 0.6
//! moves the global weights about 2.5 times the mean Δ) is mostly the outer step's own extrapolation: the
//! next Δ = g − θ(end) shrinks by about α × 1.5 × the last mean Δ, the feedback halves the outer step's
//! amplification, and the workers' uploads are left dominated by their own noise. Measured: the blend at
//! α = 0.5 cost 0.5–2.2% against no overlap in process, and over HTTP its uploads were judged
//! `off_consensus` (BENCHMARKS.md, "Streaming DiLoCo's overlap over HTTP").
//!
//! The run file's `[compression] overlap_steps` (τ) and `merge` (α) turn it on. The networked worker
//! (`agora-worker`) is handed round r + 1 as soon as its upload for round r is in, starts it from its own
//! weights, and at step τ waits for round r's outer step and applies it with [`SyncState::merge_late`];
//! `agora bench compression --codecs none,none:f2:overlap=T` simulates the same in one process.

use crate::fragments::FragmentPlan;
use crate::inner::{train_steps, RoundStats};
use crate::sync::SyncState;
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
    /// α: the weight of the worker's own (un-updated) values at the merge, in [0, 1); 0 applies the whole
    /// late update.
    pub merge: f64,
}

impl Default for Overlap {
    fn default() -> Self {
        Overlap { steps: 0, merge: 0.0 }
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

/// θ ← θ + (1 − α)·(g − s) for the tensors `indices`: the late outer update (the global value g the round
/// should have started from, minus the value s it did start from) applied to the weights θ reached since.
/// A tensor that started from g is left as it is. The verifier re-runs exactly this function.
pub fn apply_late(weights: &mut [Tensor], global: &[Tensor], start: &[Tensor], indices: &[usize], alpha: f64) {
    tch::no_grad(|| {
        for &i in indices {
            weights[i] = &weights[i] + (&global[i] - &start[i]) * (1.0 - alpha);
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
        // `SyncState::new` keeps the worker's own weights under overlap, whatever the number of fragments.
        debug_assert!(self.keeps_local, "an overlapped round needs the worker's own weights");
        match &self.local {
            Some(local) => local.iter().map(|t| t.copy()).collect(),
            None => self.start_weights(config, plan, round, global),
        }
    }

    /// Applies to `weights` the late update of the fragment round `round − 1` synchronised, now that its
    /// outer step has landed (`global` holds it; `start` is what round `round` started from). Nothing to
    /// do in round 0.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_late(
        &mut self,
        plan: &FragmentPlan,
        round: u64,
        global: &[Tensor],
        start: &[Tensor],
        weights: &mut [Tensor],
        alpha: f64,
    ) {
        let Some(previous) = round.checked_sub(1) else { return };
        let fragment = plan.synced_in(previous);
        apply_late(weights, global, start, &plan.tensors(fragment), alpha);
        self.loaded[fragment] = Some(round);
    }
}

/// One overlapped round: `overlap.steps` inner steps from `start`, then `merge` (which receives the
/// trainer's weights and applies the late outer update to them), then the rest of the round's `steps`.
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

    #[test]
    fn the_late_update_is_exact_and_touches_only_the_fragment() {
        let global = vec![Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[10.0f32])];
        let start = vec![Tensor::from_slice(&[0.5f32, 3.0]), Tensor::from_slice(&[4.0f32])];
        let mut weights = vec![Tensor::from_slice(&[3.0f32, 6.0]), Tensor::from_slice(&[5.0f32])];
        apply_late(&mut weights, &global, &start, &[0], 0.25);
        // 3 + 0.75·(1 − 0.5) = 3.375; 6 + 0.75·(2 − 3) = 5.25; tensor 1 is not in the fragment.
        assert_eq!(Vec::<f32>::try_from(&weights[0]).unwrap(), vec![3.375, 5.25]);
        assert_eq!(Vec::<f32>::try_from(&weights[1]).unwrap(), vec![5.0]);
        // α = 0 applies the whole update: a round that started from the global value is left as it is.
        let mut from_global = vec![Tensor::from_slice(&[7.0f32, 8.0])];
        apply_late(&mut from_global, &global[..1], &global[..1], &[0], 0.0);
        assert_eq!(Vec::<f32>::try_from(&from_global[0]).unwrap(), vec![7.0, 8.0]);
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
