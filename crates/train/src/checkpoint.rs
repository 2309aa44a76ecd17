//! Resumable training checkpoints: a Hugging Face model directory (loadable by `transformers`) plus
//! agora's training state beside it — `agora_state.json` (step, config, data identity) and
//! `agora_state.safetensors` (AdamW moments, fp32, exact).

use crate::optim::AdamW;
use crate::trainer::{TrainConfig, Trainer};
use agora_data::shard::hex;
use agora_data::{write_hf_tokenizer_files, Tokenizer};
use agora_model::{load_pretrained, save_pretrained};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const STATE_FILE: &str = "agora_state.json";
pub const MOMENTS_FILE: &str = "agora_state.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const STATE_FORMAT: u32 = 1;

/// What, beyond the weights and moments, a run needs to continue exactly where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingState {
    pub format: u32,
    /// Optimizer updates completed; the next batch is the one for this step index.
    pub step: u64,
    pub train: TrainConfig,
    /// blake3 of the canonical tokenizer; shards made by another tokenizer are refused.
    pub tokenizer_hash: String,
    /// Content hashes of the shards the run reads: batches are derived from (seed, train shard, step),
    /// so with this data position is fully described by `step`.
    pub train_shard: String,
    pub val_shard: String,
    /// libtorch intra-op threads; bit-identical resumption needs the same count.
    pub threads: usize,
    /// How batches are sampled; there is no other random state after initialisation.
    pub sampler: String,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Where the run's `train.shard`/`val.shard` were (a hint for `agora eval` and `--resume`; the
    /// hashes above are what is checked).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

pub const SAMPLER: &str = "agora-data batch_offsets v1: blake3(seed, shard, step, micro, row)";

/// Writes a complete checkpoint to `dir`, replacing any previous one only once the new one is whole:
/// it is written to `dir.partial`, the old directory is moved aside, then the new one renamed in.
pub fn save(dir: &Path, trainer: &Trainer, tokenizer: &Tokenizer, state: &TrainingState) -> Result<()> {
    let partial = sibling(dir, "partial");
    let old = sibling(dir, "old");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    save_pretrained(&trainer.model, &partial)?;
    write_hf_tokenizer_files(tokenizer, &partial, trainer.model.config.max_position_embeddings)?;
    let mut moments = Vec::new();
    for (i, (name, _)) in trainer.model.parameters().iter().enumerate() {
        moments.push((format!("exp_avg.{name}"), trainer.optimizer.exp_avg[i].to_device(Device::Cpu)));
        moments.push((format!("exp_avg_sq.{name}"), trainer.optimizer.exp_avg_sq[i].to_device(Device::Cpu)));
    }
    Tensor::write_safetensors(&moments, partial.join(MOMENTS_FILE))?;
    std::fs::write(partial.join(STATE_FILE), serde_json::to_string_pretty(state)? + "\n")?;
    sync_dir(&partial)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)
            .with_context(|| format!("{}: cannot move the previous checkpoint aside", dir.display()))?;
    }
    std::fs::rename(&partial, dir).with_context(|| format!("{}: cannot install the new checkpoint", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// Flushes every file of a directory to disk before it is renamed into place.
fn sync_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads `agora_state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainingState> {
    let path = dir.join(STATE_FILE);
    if !path.is_file() {
        if sibling(dir, "old").is_dir() {
            bail!(
                "{}: missing, but {} exists: a save was interrupted; move it back to resume",
                path.display(),
                sibling(dir, "old").display()
            );
        }
        bail!("{}: missing: {} is not a resumable agora checkpoint", path.display(), dir.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let state: TrainingState =
        serde_json::from_str(&text).with_context(|| format!("{}: corrupt training state", path.display()))?;
    if state.format != STATE_FORMAT {
        bail!("{}: training state format {} is not supported (expected {STATE_FORMAT})", path.display(), state.format);
    }
    Ok(state)
}

/// The tokenizer saved with a checkpoint.
pub fn read_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        bail!("{}: missing: the checkpoint has no tokenizer", path.display());
    }
    Tokenizer::from_file(&path)
}

/// Restores a trainer (weights, moments, step) from a checkpoint written by [`save`].
pub fn load(dir: &Path, device: Device) -> Result<(Trainer, TrainingState)> {
    let state = read_state(dir)?;
    let model = load_pretrained(dir, device)?;
    let mut trainer = Trainer::new(model, state.train.clone())?;
    let path = dir.join(MOMENTS_FILE);
    let moments: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(|e| anyhow::anyhow!("{}: corrupt or missing optimizer state: {e}", path.display()))?
        .into_iter()
        .collect();
    let AdamW { exp_avg, exp_avg_sq, .. } = &mut trainer.optimizer;
    for (i, (name, p)) in trainer.model.parameters().iter().enumerate() {
        for (slot, prefix) in [(&mut exp_avg[i], "exp_avg"), (&mut exp_avg_sq[i], "exp_avg_sq")] {
            let key = format!("{prefix}.{name}");
            let t = moments.get(&key).with_context(|| format!("{}: {key} is missing", path.display()))?;
            if t.size() != p.size() || t.kind() != Kind::Float {
                bail!(
                    "{}: {key} has shape {:?} ({:?}), the model needs {:?}",
                    path.display(),
                    t.size(),
                    t.kind(),
                    p.size()
                );
            }
            *slot = t.to_device(device);
        }
    }
    trainer.optimizer.step = state.step;
    Ok((trainer, state))
}

/// Refuses a shard tokenized by a different tokenizer than the checkpoint's.
pub fn check_tokenizer_matches(shard_path: &Path, shard_tokenizer: &[u8; 32], tokenizer: &Tokenizer) -> Result<()> {
    if shard_tokenizer != &tokenizer.hash() {
        bail!(
            "{}: tokenizer mismatch: the shard was made by tokenizer {} but the checkpoint uses {}; re-prepare the data with the checkpoint's tokenizer.json",
            shard_path.display(),
            &hex(shard_tokenizer)[..16],
            &tokenizer.hash_hex()[..16]
        );
    }
    Ok(())
}
