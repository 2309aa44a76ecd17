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
    on_step: impl FnMut(u64, &StepStats),
) -> Result<(Vec<Tensor>, RoundStats)> {
    load_weights(&trainer.model, start);
    let stats = train_steps(trainer, unit, first_step, steps, 0..steps, on_step)?;
    Ok((model_weights(&trainer.model), stats))
}

/// Inner steps `range` (0-based within the round) of a round of `steps` steps on `unit`, from whatever
/// state the trainer holds. A round is the concatenation of its segments, bit for bit, which is what lets
/// a verifier re-run one segment of a worker's round from the state the worker committed to.
pub fn train_steps(
    trainer: &mut Trainer,
    unit: &Shard,
    first_step: u64,
    steps: u64,
    range: std::ops::Range<u64>,
    mut on_step: impl FnMut(u64, &StepStats),
) -> Result<RoundStats> {
    assert!(range.end <= steps, "steps {range:?} outside a round of {steps}");
    let batches = unit_batches(unit.len(), trainer.config.batch_size, trainer.config.seq_len, steps);
    let schedule = trainer.config.schedule();
    let (mut loss_sum, mut tokens) = (0.0, 0);
    for i in range.clone() {
        let stats = trainer.update_on(unit, &[batches[i as usize].clone()], schedule.lr(first_step + i))?;
        loss_sum += stats.loss;
        tokens += stats.tokens;
        on_step(i + 1, &stats);
    }
    Ok(RoundStats { mean_loss: loss_sum / (range.end - range.start).max(1) as f64, tokens })
}
