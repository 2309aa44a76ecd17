//! One worker's share of a round: start from the global weights, take H AdamW steps on a data unit,
//! and return the weights it reached (Δ = global − these is what the worker sends).

use crate::tensors::{load_weights, model_weights};
use crate::units::unit_batches;
use agora_data::Shard;
use agora_train::{StepStats, Trainer};
use anyhow::Result;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Mean training loss over the round's inner steps.
    pub mean_loss: f64,
    pub tokens: usize,
}

/// Runs `steps` inner steps from `global` on `unit`; the learning rate follows the run's schedule from
/// position `first_step` (so a worker joining late trains at the run's current learning rate). The
/// trainer's AdamW moments carry over from the worker's previous rounds. Returns the local weights.
pub fn train_round(
    trainer: &mut Trainer,
    start: &[Tensor],
    unit: &Shard,
    first_step: u64,
    steps: u64,
    mut on_step: impl FnMut(u64, &StepStats),
) -> Result<(Vec<Tensor>, RoundStats)> {
    load_weights(&trainer.model, start);
    let batches = unit_batches(unit.len(), trainer.config.batch_size, trainer.config.seq_len, steps);
    let schedule = trainer.config.schedule();
    let (mut loss_sum, mut tokens) = (0.0, 0);
    for (i, batch) in batches.into_iter().enumerate() {
        let stats = trainer.update_on(unit, &[batch], schedule.lr(first_step + i as u64))?;
        loss_sum += stats.loss;
        tokens += stats.tokens;
        on_step(i as u64 + 1, &stats);
    }
    Ok((model_weights(&trainer.model), RoundStats { mean_loss: loss_sum / steps.max(1) as f64, tokens }))
}
