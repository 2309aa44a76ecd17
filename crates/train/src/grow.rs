//! A trainer carried through growth: the weights grown by [`agora_model::grow`], the AdamW state either
//! mapped onto the new shapes or started afresh.

use crate::{AdamW, TrainConfig, Trainer};
use agora_model::grow::{grow, grow_companion, GrowthOptions, Weights};
use agora_model::LlamaConfig;
use anyhow::Result;
use tch::{Device, Tensor};

/// What happens to the optimizer's state when the model grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateGrowth {
    /// Both moments mapped with the weights ([`grow_companion`]: an entry that moves keeps its moments, a
    /// new entry starts at zero) and the step count kept, so the bias corrections stay where they were.
    Carry,
    /// Fresh moments and step 0, as for a new model.
    Reset,
}

impl std::str::FromStr for StateGrowth {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "carry" => Ok(StateGrowth::Carry),
            "reset" => Ok(StateGrowth::Reset),
            _ => anyhow::bail!("unknown optimizer state handling {s:?}: carry or reset"),
        }
    }
}

/// The trainer for `to`: weights grown from `trainer`'s by `options`, optimizer state per `state`, and the
/// new phase's `config`, whose schedule re-warms the learning rate from its own step 0.
///
/// Drive it with [`Trainer::update_on`] and the new phase's own step count (the learning rate from
/// `config.schedule().lr(phase_step)`), as DiLoCo workers and `agora bench grow` do. With
/// [`StateGrowth::Carry`] the trainer's [`Trainer::step`] continues the old count, because Adam's bias
/// corrections need it; [`Trainer::train_step`] takes its schedule position and data from that count too,
/// so it would continue the old schedule instead of re-warming.
pub fn grow_trainer(
    trainer: &Trainer,
    to: &LlamaConfig,
    options: &GrowthOptions,
    state: StateGrowth,
    config: TrainConfig,
) -> Result<Trainer> {
    let device = trainer.model.device();
    let from = Weights::of(&trainer.model);
    let model = grow(&from, to, options)?.into_model(device)?;
    let mut grown = Trainer::new(model, config)?;
    if state == StateGrowth::Carry {
        let moments = |tensors: &[Tensor]| -> Result<Vec<Tensor>> {
            let by_name = trainer
                .model
                .parameters()
                .iter()
                .zip(tensors)
                .map(|((name, _), t)| (name.clone(), t.to_device(Device::Cpu)))
                .collect();
            let mut mapped = grow_companion(&Weights::new(from.config.clone(), by_name)?, to, options)?.tensors;
            Ok(grown
                .model
                .parameters()
                .iter()
                .map(|(name, _)| {
                    mapped.remove(name).expect("the companion has the grown model's tensors").to_device(device)
                })
                .collect())
        };
        let AdamW { exp_avg, exp_avg_sq, .. } = &trainer.optimizer;
        grown.optimizer.exp_avg = moments(exp_avg)?;
        grown.optimizer.exp_avg_sq = moments(exp_avg_sq)?;
        grown.optimizer.step = trainer.optimizer.step;
    }
    Ok(grown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_data::Shard;
    use agora_model::Llama;

    fn trained() -> (Trainer, Shard) {
        let mut c = agora_model::preset("tiny", Some(64)).unwrap();
        c.num_hidden_layers = 2;
        let config = TrainConfig { steps: 3, batch_size: 2, seq_len: 8, warmup_steps: 1, ..Default::default() };
        let mut trainer = Trainer::new(Llama::new(&c, Device::Cpu, 1), config).unwrap();
        let shard = Shard::from_tokens((0..400u32).map(|i| (i * 7) % 64).collect(), [0; 32], 64).unwrap();
        for _ in 0..3 {
            trainer.train_step(&shard).unwrap();
        }
        (trainer, shard)
    }

    fn config_lr0(t: &Trainer) -> f64 {
        t.config.schedule().lr(0)
    }

    #[test]
    fn carried_state_keeps_moments_and_step_reset_starts_over() {
        let (trainer, shard) = trained();
        let mut to = trainer.model.config.clone();
        (to.num_hidden_layers, to.intermediate_size) = (3, 512);
        let options = GrowthOptions::default();
        let config = trainer.config.clone();
        let mut carried = grow_trainer(&trainer, &to, &options, StateGrowth::Carry, config.clone()).unwrap();
        assert_eq!(carried.optimizer.step, 3);
        // The embedding moments are unchanged; the new layer's (layer 1 of 3: spread) start at zero.
        assert!(carried.optimizer.exp_avg[0].equal(&trainer.optimizer.exp_avg[0]));
        let index = |t: &Trainer, name: &str| t.model.parameters().iter().position(|(n, _)| n == name).unwrap();
        let new_q = index(&carried, "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(carried.optimizer.exp_avg_sq[new_q].abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
        let old_q = index(&carried, "model.layers.2.self_attn.q_proj.weight");
        assert!(carried.optimizer.exp_avg_sq[old_q]
            .equal(&trainer.optimizer.exp_avg_sq[index(&trainer, "model.layers.1.self_attn.q_proj.weight")]));
        let reset = grow_trainer(&trainer, &to, &options, StateGrowth::Reset, config).unwrap();
        assert_eq!(reset.optimizer.step, 0);
        assert!(reset.optimizer.exp_avg.iter().all(|m| m.abs().sum(tch::Kind::Float).double_value(&[]) == 0.0));
        // Both train on, the schedule driven from the new phase's step 0.
        let lr = config_lr0(&carried);
        let offsets = vec![vec![0, 40]];
        let stats = carried.update_on(&shard, &offsets, lr).unwrap();
        assert_eq!((stats.step, stats.lr), (4, carried.config.schedule().lr(0)));
    }
}
