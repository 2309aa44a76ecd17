//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `generation_config.json`.

use crate::config::LlamaConfig;
use crate::llama::{parameter_shapes, Llama};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Writes `config.json`, `model.safetensors` and `generation_config.json` into `dir` (created if needed).
/// Files are written under a temporary name and renamed, so a crash never leaves a half-written file.
pub fn save_pretrained(model: &Llama, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create checkpoint directory", dir.display()))?;
    let tensors: Vec<(String, Tensor)> = model
        .parameters()
        .iter()
        .map(|(name, t)| (name.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    Tensor::write_safetensors(&tensors, &tmp).with_context(|| format!("{}: cannot write weights", tmp.display()))?;
    std::fs::rename(&tmp, &weights)?;

    write_json(&dir.join(CONFIG_FILE), &model.config.to_hf_json())?;
    let mut generation = serde_json::json!({ "_from_model_config": true, "do_sample": false });
    if let Some(bos) = model.config.bos_token_id {
        generation["bos_token_id"] = bos.into();
    }
    if let Some(eos) = &model.config.eos_token_id {
        generation["eos_token_id"] = eos.clone();
    }
    write_json(&dir.join(GENERATION_CONFIG_FILE), &generation)
}

/// Writes pretty JSON atomically (temporary file + rename).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// The weight files of a checkpoint directory: `model.safetensors`, or every shard named by the index.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = value["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    if !dir.is_dir() {
        bail!("{}: checkpoint directory does not exist", dir.display());
    }
    bail!("{}: not a checkpoint: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} is there", dir.display())
}

/// Reads every tensor of a checkpoint (as stored: any dtype) by name.
pub fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut tensors = BTreeMap::new();
    for file in weight_files(dir)? {
        let read = Tensor::read_safetensors(&file)
            .map_err(|e| anyhow::anyhow!("{}: corrupt or unreadable safetensors file: {e}", file.display()))?;
        tensors.extend(read);
    }
    Ok(tensors)
}

/// Loads a checkpoint directory made by agora or by `transformers` (`save_pretrained`) onto `device`.
/// Weights stored in fp16/bf16 are widened to fp32.
pub fn load_pretrained(dir: &Path, device: Device) -> Result<Llama> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        bail!("{}: not a checkpoint: {CONFIG_FILE} is missing", dir.display());
    }
    let config = LlamaConfig::from_file(&config_path)?;
    let tensors = read_weights(dir)?;
    from_weights(&config, tensors, device, &dir.join(WEIGHTS_FILE).display().to_string())
}

/// A model of `config` holding exactly `tensors` (HF names; any float dtype, widened to fp32). `source`
/// names where they came from in errors. A tensor missing, of the wrong shape or not part of the model is
/// an error, except a tied model's `lm_head.weight` equal to its embedding and HF's rotary buffers.
pub fn from_weights(
    config: &LlamaConfig,
    mut tensors: BTreeMap<String, Tensor>,
    device: Device,
    source: &str,
) -> Result<Llama> {
    config.validate()?;
    let model = Llama::zeros(config, device);
    tch::no_grad(|| -> Result<()> {
        for (name, shape) in parameter_shapes(config) {
            let tensor = tensors
                .remove(&name)
                .with_context(|| format!("{source}: tensor {name} is missing (config.json expects it)"))?;
            if tensor.size() != shape {
                bail!("{source}: tensor {name} has shape {:?} but {CONFIG_FILE} implies {:?}", tensor.size(), shape);
            }
            let (_, target) = model.parameters().iter().find(|(n, _)| *n == name).expect("same shapes list");
            target.shallow_clone().copy_(&tensor.to_kind(Kind::Float).to_device(device));
        }
        Ok(())
    })?;
    // A tied model saved by some tools still carries lm_head.weight: accept it only if it is the embedding.
    if config.tie_word_embeddings {
        if let Some(head) = tensors.remove("lm_head.weight") {
            let embed = &model.parameters()[0].1;
            if head.size() != embed.size() || !head.to_kind(Kind::Float).to_device(device).equal(embed) {
                bail!("{source}: tie_word_embeddings is true but lm_head.weight differs from the embedding");
            }
        }
    }
    // Buffers HF may save (rotary inv_freq) are recomputed; anything else is a model we would misread.
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if let Some(name) = tensors.keys().next() {
        bail!("{source}: unexpected tensor {name} ({} unexpected in all); is this a Llama checkpoint?", tensors.len());
    }
    Ok(model)
}

/// Detached fp32 CPU copies of a model's weights, by HF name.
pub fn weights_of(model: &Llama) -> BTreeMap<String, Tensor> {
    model
        .parameters()
        .iter()
        .map(|(name, t)| (name.clone(), t.detach().to_device(Device::Cpu).to_kind(Kind::Float).copy()))
        .collect()
}
