//! The worker's durable state for one run: AdamW moments and step after its last trained round, what it
//! carries between rounds (error-feedback residual; with fragments, its own weights), and the upload of
//! its last round until the coordinator has answered it (in a verifying run: until the round's verified
//! receipt has said whether it was accepted; under Streaming DiLoCo's overlap, which keeps no residual, only
//! until it is received: the verdict is read later, for the summary). One file, replaced atomically (the pending
//! payload is written first, under its hash), so a worker killed at any point resumes either before or
//! after a whole round, never inside one.

use agora_diloco::tensors::{from_named, to_named};
use agora_diloco::{CompressionConfig, FragmentPlan, SyncState};
use agora_protocol::{decode_tensors, encode_tensors, hash_bytes, Hash32, NamedTensor, TensorSpec};
use agora_train::AdamW;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Device;

const STATE_FILE: &str = "worker_state.safetensors";

/// A trained round's upload, kept until the coordinator refuses it or (in a verifying run) its round's
/// receipt says whether it was accepted; in a run that does not verify, until it is received.
pub struct PendingUpload {
    pub round: u64,
    /// The units it trained, as its `agora.unit` metadata names them.
    pub units: String,
    pub base: Hash32,
    pub train_loss: f64,
    pub fragment: usize,
    pub payload: Vec<u8>,
    /// The fragment's residual to keep if the payload is accepted (received, when the run does not verify).
    pub residual: Vec<Vec<f32>>,
    pub fp32_bytes: u64,
}

pub struct WorkerState {
    pub trained_round: Option<u64>,
    step: u64,
    exp_avg: Vec<NamedTensor>,
    exp_avg_sq: Vec<NamedTensor>,
    pub sync: SyncState,
    pub pending: Option<PendingUpload>,
}

/// Writes `dir/name` via a synced temporary file and a rename: readers see the old or the new bytes.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn payload_file(run_dir: &Path, hash: &Hash32) -> PathBuf {
    run_dir.join(format!("pending-{}.delta", hash.hex()))
}

fn renamed(prefix: &str, specs: &[TensorSpec], data: impl IntoIterator<Item = Vec<f32>>) -> Vec<NamedTensor> {
    specs
        .iter()
        .zip(data)
        .map(|(s, d)| NamedTensor { name: format!("{prefix}.{}", s.name), shape: s.shape.clone(), data: d })
        .collect()
}

impl WorkerState {
    pub fn fresh(specs: &[TensorSpec], config: &CompressionConfig) -> WorkerState {
        WorkerState {
            trained_round: None,
            step: 0,
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
            sync: SyncState::new(specs, config),
            pending: None,
        }
    }

    /// Records the optimizer after training `round`.
    pub fn capture_optimizer(&mut self, optimizer: &AdamW, specs: &[TensorSpec], round: u64) {
        self.trained_round = Some(round);
        self.step = optimizer.step;
        self.exp_avg = to_named(specs, &optimizer.exp_avg);
        self.exp_avg_sq = to_named(specs, &optimizer.exp_avg_sq);
    }

    pub fn restore_optimizer(&self, optimizer: &mut AdamW) {
        if self.exp_avg.is_empty() {
            return;
        }
        let device = optimizer.exp_avg.first().map_or(Device::Cpu, |t| t.device());
        optimizer.step = self.step;
        optimizer.exp_avg = from_named(&self.exp_avg, device);
        optimizer.exp_avg_sq = from_named(&self.exp_avg_sq, device);
    }

    pub fn save(&self, run_dir: &Path, specs: &[TensorSpec], plan: &FragmentPlan) -> Result<()> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("{}: cannot create", run_dir.display()))?;
        let rename = |prefix: &str, t: &[NamedTensor]| renamed(prefix, specs, t.iter().map(|t| t.data.clone()));
        let mut tensors = rename("exp_avg", &self.exp_avg);
        tensors.extend(rename("exp_avg_sq", &self.exp_avg_sq));
        tensors.extend(renamed("residual", specs, self.sync.residual.iter().cloned()));
        if let Some(local) = &self.sync.local {
            tensors.extend(renamed("local", specs, to_named(specs, local).into_iter().map(|t| t.data)));
        }
        let mut meta = BTreeMap::from([
            ("step".to_string(), self.step.to_string()),
            ("loaded".to_string(), serde_json::to_string(&self.sync.loaded)?),
        ]);
        if let Some(r) = self.trained_round {
            meta.insert("trained_round".into(), r.to_string());
        }
        let mut keep = None;
        if let Some(p) = &self.pending {
            let hash = hash_bytes(&p.payload);
            let file = payload_file(run_dir, &hash);
            if !file.exists() {
                write_atomically(run_dir, file.file_name().and_then(|n| n.to_str()).expect("utf-8 name"), &p.payload)?;
            }
            keep = Some(file);
            tensors.extend(renamed("pending_residual", &plan.specs(specs, p.fragment), p.residual.iter().cloned()));
            meta.insert("pending.round".into(), p.round.to_string());
            meta.insert("pending.unit".into(), p.units.clone());
            meta.insert("pending.base".into(), p.base.hex());
            meta.insert("pending.train_loss".into(), p.train_loss.to_string());
            meta.insert("pending.fragment".into(), p.fragment.to_string());
            meta.insert("pending.payload".into(), hash.hex());
            meta.insert("pending.fp32_bytes".into(), p.fp32_bytes.to_string());
        }
        write_atomically(run_dir, STATE_FILE, &encode_tensors(&tensors, &meta))?;
        // Payload files of uploads already answered are no longer referenced.
        for entry in std::fs::read_dir(run_dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("pending-") && name.ends_with(".delta") && Some(&path) != keep.as_ref() {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// The saved state, if any. A state that does not decode is an error, not silently discarded.
    pub fn load(
        run_dir: &Path,
        specs: &[TensorSpec],
        plan: &FragmentPlan,
        config: &CompressionConfig,
        device: Device,
    ) -> Result<Option<WorkerState>> {
        let path = run_dir.join(STATE_FILE);
        let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
        let corrupt = |what: String| anyhow::anyhow!("{}: {what}; delete it to start this run afresh", path.display());
        let (tensors, meta) =
            decode_tensors(&bytes, None).map_err(|e| corrupt(format!("corrupt worker state ({e})")))?;
        let get = |key: &str| -> Result<&String> { meta.get(key).ok_or_else(|| corrupt(format!("no {key}"))) };
        let pick = |prefix: &str, wanted: &[TensorSpec]| -> Result<Vec<NamedTensor>> {
            wanted
                .iter()
                .map(|w| {
                    let name = format!("{prefix}.{}", w.name);
                    tensors
                        .iter()
                        .find(|t| t.name == name && t.shape == w.shape)
                        .map(|t| NamedTensor { name: w.name.clone(), ..t.clone() })
                        .ok_or_else(|| corrupt(format!("worker state lacks {name} (another model?)")))
                })
                .collect()
        };
        let has = |prefix: &str| tensors.iter().any(|t| t.name.starts_with(&format!("{prefix}.")));
        let mut sync = SyncState::new(specs, config);
        if !sync.residual.is_empty() && has("residual") {
            sync.residual = pick("residual", specs)?.into_iter().map(|t| t.data).collect();
        }
        if (plan.count() > 1 || sync.keeps_local) && has("local") {
            sync.local = Some(from_named(&pick("local", specs)?, device));
        }
        let loaded: Vec<Option<u64>> = serde_json::from_str(get("loaded")?)?;
        if loaded.len() == sync.loaded.len() {
            sync.loaded = loaded;
        } else if sync.local.is_some() {
            bail!(corrupt("its fragment count differs from the run's".into()));
        }
        let pending = if meta.contains_key("pending.round") {
            let fragment: usize = get("pending.fragment")?.parse()?;
            if fragment >= plan.count() {
                bail!(corrupt(format!("pending upload of fragment {fragment}")));
            }
            let hash: Hash32 = get("pending.payload")?.parse().map_err(|e: String| corrupt(e))?;
            let file = payload_file(run_dir, &hash);
            let payload =
                std::fs::read(&file).with_context(|| format!("{}: pending upload missing", file.display()))?;
            if hash_bytes(&payload) != hash {
                bail!(corrupt(format!("{} does not match its hash", file.display())));
            }
            let residual = if sync.residual.is_empty() {
                Vec::new()
            } else {
                pick("pending_residual", &plan.specs(specs, fragment))?.into_iter().map(|t| t.data).collect()
            };
            Some(PendingUpload {
                round: get("pending.round")?.parse()?,
                units: get("pending.unit")?.to_string(),
                base: get("pending.base")?.parse().map_err(|e: String| corrupt(e))?,
                train_loss: get("pending.train_loss")?.parse()?,
                fragment,
                payload,
                residual,
                fp32_bytes: get("pending.fp32_bytes")?.parse()?,
            })
        } else {
            None
        };
        let (exp_avg, exp_avg_sq) = if has("exp_avg") {
            (pick("exp_avg", specs)?, pick("exp_avg_sq", specs)?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Some(WorkerState {
            trained_round: meta.get("trained_round").map(|r| r.parse()).transpose()?,
            step: get("step")?.parse()?,
            exp_avg,
            exp_avg_sq,
            sync,
            pending,
        }))
    }
}
