//! The deterministic inner loop: sample a batch from (seed, shard, step), forward, backward, clip, AdamW.
//!
//! Determinism contract: the same model init, shard, [`TrainConfig`] and libtorch thread count give
//! bit-identical losses and weights, and a run resumed from a checkpoint continues exactly as if it had
//! never stopped. Nothing here reads a clock or a global RNG; batch `k` is a pure function of its inputs.

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use agora_data::sampling::{batch_offsets, batch_tokens, ensure_window_fits, eval_offsets};
use agora_data::Shard;
use agora_model::Llama;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Everything that decides what the inner loop computes (model shape aside).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// Optimizer updates in the whole run.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per update: an update sees `batch_size · grad_accum · seq_len` tokens.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Global L2 norm bound on gradients; 0 disables clipping.
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
    /// Validation every this many updates (0: only at the end).
    pub eval_every: u64,
    /// Validation batches (each `batch_size` windows) per evaluation.
    pub eval_batches: usize,
    /// Save a resumable checkpoint every this many updates (0: only at the end).
    pub checkpoint_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            steps: 1000,
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            grad_clip: 1.0,
            adamw: AdamWConfig::default(),
            eval_every: 100,
            eval_batches: 20,
            checkpoint_every: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("steps", self.steps as f64),
            ("batch_size", self.batch_size as f64),
            ("seq_len", self.seq_len as f64),
            ("grad_accum", self.grad_accum as f64),
            ("lr", self.lr),
        ];
        for (field, v) in positive {
            if v.is_nan() || v <= 0.0 {
                bail!("train.{field} must be positive, got {v}");
            }
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!("train.min_lr must be in [0, lr], got {}", self.min_lr);
        }
        let a = &self.adamw;
        if !(0.0..1.0).contains(&a.beta1)
            || !(0.0..1.0).contains(&a.beta2)
            || a.eps.is_nan()
            || a.eps <= 0.0
            || a.weight_decay < 0.0
        {
            bail!("train.adamw: betas must be in [0, 1), eps > 0, weight_decay ≥ 0; got {a:?}");
        }
        Ok(())
    }

    pub fn schedule(&self) -> Schedule {
        Schedule { peak: self.lr, min: self.min_lr, warmup: self.warmup_steps, total: self.steps }
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.seq_len
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    /// The update this was (1-based: the optimizer's step count after it).
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

pub struct Trainer {
    pub model: Llama,
    pub optimizer: AdamW,
    pub config: TrainConfig,
}

impl Trainer {
    pub fn new(model: Llama, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        if config.seq_len > model.config.max_position_embeddings {
            bail!(
                "train.seq_len = {} exceeds the model's max_position_embeddings = {}",
                config.seq_len,
                model.config.max_position_embeddings
            );
        }
        let optimizer = AdamW::new(config.adamw, model.parameters());
        Ok(Trainer { model, optimizer, config })
    }

    /// Updates completed so far.
    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    /// One optimizer update on the batches that (seed, shard, step) select.
    pub fn train_step(&mut self, shard: &Shard) -> Result<StepStats> {
        let c = &self.config;
        ensure_window_fits(shard.len(), c.seq_len)?;
        let step = self.optimizer.step;
        let micro_batches: Vec<Vec<usize>> = (0..c.grad_accum as u64)
            .map(|micro| batch_offsets(c.seed, &shard.content_hash, step, micro, c.batch_size, c.seq_len, shard.len()))
            .collect();
        let lr = c.schedule().lr(step);
        self.update_on(shard, &micro_batches, lr)
    }

    /// One optimizer update with learning rate `lr` on explicitly chosen windows: each inner slice is a
    /// micro-batch of window start offsets into `shard` (each window is `seq_len + 1` tokens). A DiLoCo
    /// worker uses this: its data and its schedule position come from the round, not from its own step count.
    pub fn update_on(&mut self, shard: &Shard, micro_batches: &[Vec<usize>], lr: f64) -> Result<StepStats> {
        let seq_len = self.config.seq_len;
        ensure_window_fits(shard.len(), seq_len)?;
        assert!(!micro_batches.is_empty(), "an update needs at least one micro-batch");
        for (_, p) in self.model.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for offsets in micro_batches {
            assert!(
                offsets.iter().all(|&o| o + seq_len < shard.len()),
                "window offset out of range for a shard of {} tokens",
                shard.len()
            );
            let (inputs, targets) = batch_tensors(shard, offsets, seq_len, self.model.device());
            let loss = self.model.loss(&inputs, &targets);
            (&loss / micro_batches.len() as f64).backward();
            loss_sum += loss.double_value(&[]);
            tokens += offsets.len() * seq_len;
        }
        let loss = loss_sum / micro_batches.len() as f64;
        if !loss.is_finite() {
            bail!("loss is {loss} at step {}: training diverged (try a lower lr)", self.optimizer.step + 1);
        }
        let grad_norm = clip_grad_norm(self.model.parameters(), self.config.grad_clip);
        self.optimizer.update(self.model.parameters(), lr);
        Ok(StepStats { step: self.optimizer.step, loss, lr, grad_norm, tokens })
    }

    /// Mean validation loss (nats/token) over up to `eval_batches` fixed windows of `shard`.
    pub fn evaluate(&self, shard: &Shard) -> Result<f64> {
        evaluate(&self.model, shard, self.config.seq_len, self.config.batch_size, self.config.eval_batches)
    }
}

/// Inputs and next-token targets, `[windows, seq_len]` int64 on `device`, for windows starting at `offsets`.
fn batch_tensors(shard: &Shard, offsets: &[usize], seq_len: usize, device: Device) -> (Tensor, Tensor) {
    let (inputs, targets) = batch_tokens(shard, offsets, seq_len);
    let to_tensor = |ids: Vec<u32>| {
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        Tensor::from_slice(&ids).view([offsets.len() as i64, seq_len as i64]).to_device(device)
    };
    (to_tensor(inputs), to_tensor(targets))
}

/// Mean next-token loss of `model` over fixed, non-overlapping windows of `shard`.
pub fn evaluate(model: &Llama, shard: &Shard, seq_len: usize, batch_size: usize, max_batches: usize) -> Result<f64> {
    ensure_window_fits(shard.len(), seq_len)?;
    let batches = eval_offsets(shard.len(), seq_len, max_batches, batch_size);
    let (mut total, mut count) = (0.0, 0usize);
    tch::no_grad(|| {
        for offsets in &batches {
            let (inputs, targets) = batch_tensors(shard, offsets, seq_len, model.device());
            let loss = model.loss(&inputs, &targets).double_value(&[]);
            total += loss * offsets.len() as f64;
            count += offsets.len();
        }
    });
    Ok(total / count.max(1) as f64)
}

/// Mean next-token loss of `model` over explicitly chosen windows (each inner slice one batch of window
/// start offsets into `shard`): how a verifier measures a contribution on the batches it picked.
pub fn loss_on(model: &Llama, shard: &Shard, batches: &[Vec<usize>], seq_len: usize) -> Result<f64> {
    ensure_window_fits(shard.len(), seq_len)?;
    let (mut total, mut count) = (0.0, 0usize);
    tch::no_grad(|| {
        for offsets in batches {
            let (inputs, targets) = batch_tensors(shard, offsets, seq_len, model.device());
            total += model.loss(&inputs, &targets).double_value(&[]) * offsets.len() as f64;
            count += offsets.len();
        }
    });
    Ok(total / count.max(1) as f64)
}

/// The device named on the command line: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is available to libtorch (run scripts/setup.sh with AGORA_CUDA=1 on a GPU machine)");
            }
            Ok(Device::Cuda(0))
        }
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if tch::Cuda::is_available() && (n as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(n)),
            Some(n) => bail!("--device cuda:{n}: no such CUDA device"),
            None => bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
        },
    }
}

/// Matmul precision for a device: bf16 on CUDA (fp32 master weights), fp32 on CPU.
pub fn default_compute_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}
