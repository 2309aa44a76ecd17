//! The worker's durable state for one run: AdamW moments and step after its last trained round, and
//! the pseudo-gradient of that round until it is accepted. One file, replaced atomically, so a worker
//! killed at any point resumes either before or after a whole round, never inside one.

use agora_diloco::tensors::{from_named, to_named};
use agora_protocol::{decode_tensors, encode_tensors, Hash32, NamedTensor, TensorSpec};
use agora_train::AdamW;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tch::Device;

const STATE_FILE: &str = "worker_state.safetensors";

#[derive(Clone)]
pub struct PendingDelta {
    pub round: u64,
    pub unit: u64,
    pub base: Hash32,
    pub train_loss: f64,
    pub delta: Vec<NamedTensor>,
}

pub struct WorkerState {
    pub trained_round: u64,
    step: u64,
    exp_avg: Vec<NamedTensor>,
    exp_avg_sq: Vec<NamedTensor>,
    pub pending: Option<PendingDelta>,
}

fn prefixed(prefix: &str, specs: &[TensorSpec]) -> Vec<TensorSpec> {
    specs.iter().map(|s| TensorSpec { name: format!("{prefix}.{}", s.name), shape: s.shape.clone() }).collect()
}

fn rename(prefix: &str, tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    tensors.into_iter().map(|t| NamedTensor { name: format!("{prefix}.{}", t.name), ..t }).collect()
}

fn strip(prefix: &str, tensors: &[NamedTensor]) -> Vec<NamedTensor> {
    tensors.iter().map(|t| NamedTensor { name: t.name[prefix.len() + 1..].to_string(), ..t.clone() }).collect()
}

impl WorkerState {
    pub fn capture(optimizer: &AdamW, specs: &[TensorSpec], trained_round: u64, pending: PendingDelta) -> Self {
        WorkerState {
            trained_round,
            step: optimizer.step,
            exp_avg: to_named(specs, &optimizer.exp_avg),
            exp_avg_sq: to_named(specs, &optimizer.exp_avg_sq),
            pending: Some(pending),
        }
    }

    pub fn restore_optimizer(&self, optimizer: &mut AdamW) {
        let device = optimizer.exp_avg.first().map_or(Device::Cpu, |t| t.device());
        optimizer.step = self.step;
        optimizer.exp_avg = from_named(&self.exp_avg, device);
        optimizer.exp_avg_sq = from_named(&self.exp_avg_sq, device);
    }

    pub fn save(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("{}: cannot create", run_dir.display()))?;
        let mut tensors = rename("exp_avg", self.exp_avg.clone());
        tensors.extend(rename("exp_avg_sq", self.exp_avg_sq.clone()));
        let mut meta = BTreeMap::from([
            ("step".to_string(), self.step.to_string()),
            ("trained_round".to_string(), self.trained_round.to_string()),
        ]);
        if let Some(p) = &self.pending {
            tensors.extend(rename("delta", p.delta.clone()));
            meta.insert("pending.round".into(), p.round.to_string());
            meta.insert("pending.unit".into(), p.unit.to_string());
            meta.insert("pending.base".into(), p.base.hex());
            meta.insert("pending.train_loss".into(), p.train_loss.to_string());
        }
        let bytes = encode_tensors(&tensors, &meta);
        let path = run_dir.join(STATE_FILE);
        let tmp = run_dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
        std::fs::File::open(run_dir)?.sync_all()?;
        Ok(())
    }

    /// The saved state, if any. A state that does not decode is an error, not silently discarded.
    pub fn load(run_dir: &Path, specs: &[TensorSpec], _device: Device) -> Result<Option<WorkerState>> {
        let path = run_dir.join(STATE_FILE);
        let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
        let (tensors, meta) = decode_tensors(&bytes, None).map_err(|e| {
            anyhow::anyhow!("{}: corrupt worker state ({e}); delete it to start this run afresh", path.display())
        })?;
        let get = |key: &str| -> Result<&String> {
            meta.get(key).with_context(|| format!("{}: worker state lacks {key}", path.display()))
        };
        let pick =
            |prefix: &str| -> Result<Vec<NamedTensor>> {
                let wanted = prefixed(prefix, specs);
                wanted
                    .iter()
                    .map(|w| {
                        tensors.iter().find(|t| t.name == w.name && t.shape == w.shape).cloned().with_context(|| {
                            format!("{}: worker state lacks {} (another model?)", path.display(), w.name)
                        })
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(|v| strip(prefix, &v))
            };
        let pending = if meta.contains_key("pending.round") {
            Some(PendingDelta {
                round: get("pending.round")?.parse()?,
                unit: get("pending.unit")?.parse()?,
                base: get("pending.base")?.parse().map_err(|e: String| anyhow::anyhow!(e))?,
                train_loss: get("pending.train_loss")?.parse()?,
                delta: pick("delta")?,
            })
        } else {
            None
        };
        Ok(Some(WorkerState {
            trained_round: get("trained_round")?.parse()?,
            step: get("step")?.parse()?,
            exp_avg: pick("exp_avg")?,
            exp_avg_sq: pick("exp_avg_sq")?,
            pending,
        }))
    }
}
