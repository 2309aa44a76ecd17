//! The hash chain a worker commits to, and the spot check that re-runs one of its segments.
//!
//! A round of H inner steps is cut into `segments` segments at fixed boundaries. At every boundary the
//! worker hashes its whole training state (weights, AdamW moments, step count); the list of these hashes
//! travels in the metadata of its signed upload, so it is fixed before the coordinator picks, from a
//! secret the worker cannot see, which segment to challenge. The worker then hands over that segment's
//! start and end states (with the chain's first and last, for the links of `crate::binding`). Their hashes must be the committed ones, and re-running the segment from the
//! start state on the worker's assigned batches must reproduce the end state: exactly with the same
//! libtorch thread count, within `tolerance` otherwise. A worker that trained on other data, skipped
//! steps or made up its states cannot produce such a pair without breaking blake3.

use agora_data::Shard;
use agora_diloco::overlap::apply_late;
use agora_diloco::tensors::{from_named, load_weights, model_weights, to_named};
use agora_diloco::train_steps;
use agora_model::{Llama, LlamaConfig};
use agora_protocol::{decode_tensors, encode_tensors, hash_bytes, Hash32, NamedTensor, TensorSpec};
use agora_train::{TrainConfig, Trainer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Device, Tensor};

/// Payload metadata key holding the committed state hashes, comma-separated, boundary order.
pub const CHAIN_META: &str = "agora.chain";
const STEP_META: &str = "agora.step";

/// The step boundaries of a round's segments: `segments + 1` increasing positions from 0 to `steps`.
pub fn segment_bounds(steps: u64, segments: u64) -> Vec<u64> {
    assert!(segments >= 1 && segments <= steps, "{segments} segments of a {steps}-step round");
    (0..=segments).map(|k| k * steps / segments).collect()
}

/// The boundaries of a round's hash chain: `segments` even segments ([`segment_bounds`]) and, under
/// Streaming DiLoCo's overlap, the merge point τ (`merge_at`) as a boundary of its own when it is not one
/// already: the late update of the previous round's outer step is the last thing the segment ending at τ
/// does, so the state committed at τ is the merged one and every segment re-runs from committed states.
pub fn chain_bounds(steps: u64, segments: u64, merge_at: u64) -> Vec<u64> {
    let mut bounds = segment_bounds(steps, segments);
    if merge_at > 0 && merge_at < steps && !bounds.contains(&merge_at) {
        bounds.push(merge_at);
        bounds.sort_unstable();
    }
    bounds
}

/// A worker's whole training state at one boundary.
pub struct TrainerState {
    pub weights: Vec<NamedTensor>,
    pub exp_avg: Vec<NamedTensor>,
    pub exp_avg_sq: Vec<NamedTensor>,
    /// AdamW updates completed (its bias corrections depend on it).
    pub step: u64,
}

fn prefixed(prefix: &str, tensors: Vec<NamedTensor>) -> impl Iterator<Item = NamedTensor> + '_ {
    tensors.into_iter().map(move |t| NamedTensor { name: format!("{prefix}.{}", t.name), ..t })
}

fn state_specs(specs: &[TensorSpec]) -> Vec<TensorSpec> {
    ["w", "m", "v"]
        .iter()
        .flat_map(|p| specs.iter().map(move |s| TensorSpec { name: format!("{p}.{}", s.name), shape: s.shape.clone() }))
        .collect()
}

/// The canonical bytes of the trainer's state (what is hashed into the chain and sent as proof).
pub fn encode_state(trainer: &Trainer, specs: &[TensorSpec]) -> Vec<u8> {
    let mut tensors: Vec<NamedTensor> = prefixed("w", to_named(specs, &model_weights(&trainer.model))).collect();
    tensors.extend(prefixed("m", to_named(specs, &trainer.optimizer.exp_avg)));
    tensors.extend(prefixed("v", to_named(specs, &trainer.optimizer.exp_avg_sq)));
    encode_tensors(&tensors, &BTreeMap::from([(STEP_META.to_string(), trainer.optimizer.step.to_string())]))
}

pub fn decode_state(bytes: &[u8], specs: &[TensorSpec]) -> Result<TrainerState> {
    let (tensors, meta) =
        decode_tensors(bytes, Some(&state_specs(specs))).map_err(|e| anyhow::anyhow!("training state: {e}"))?;
    let step = meta
        .get(STEP_META)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("training state: metadata {STEP_META} missing or not a number"))?;
    let mut parts = tensors.into_iter();
    let mut take = |prefix: &str| -> Vec<NamedTensor> {
        (&mut parts)
            .take(specs.len())
            .map(|t| NamedTensor { name: t.name[prefix.len() + 1..].to_string(), ..t })
            .collect()
    };
    let (weights, exp_avg, exp_avg_sq) = (take("w"), take("m"), take("v"));
    Ok(TrainerState { weights, exp_avg, exp_avg_sq, step })
}

/// Puts `state` into `trainer` (weights, moments and step).
pub fn load_state(trainer: &mut Trainer, state: &TrainerState) {
    let device = trainer.model.device();
    load_weights(&trainer.model, &from_named(&state.weights, device));
    trainer.optimizer.exp_avg = from_named(&state.exp_avg, device);
    trainer.optimizer.exp_avg_sq = from_named(&state.exp_avg_sq, device);
    trainer.optimizer.step = state.step;
}

pub fn chain_to_meta(hashes: &[Hash32]) -> String {
    hashes.iter().map(|h| h.hex()).collect::<Vec<_>>().join(",")
}

/// The committed hashes in a payload's metadata; exactly `segments + 1` of them.
pub fn parse_chain(meta: &BTreeMap<String, String>, segments: u64) -> Result<Vec<Hash32>, String> {
    let text =
        meta.get(CHAIN_META).ok_or_else(|| format!("metadata {CHAIN_META} is missing: this run needs a hash chain"))?;
    let hashes: Vec<Hash32> = text
        .split(',')
        .map(|h| h.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("metadata {CHAIN_META}: {e}"))?;
    if hashes.len() as u64 != segments + 1 {
        return Err(format!(
            "metadata {CHAIN_META} holds {} hashes, the run's chain has {}",
            hashes.len(),
            segments + 1
        ));
    }
    Ok(hashes)
}

/// The outcome of re-running one segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpotCheck {
    pub passed: bool,
    /// The recomputed end state hashes to the committed one (bit-exact).
    pub exact: bool,
    /// ‖Δw_recomputed − Δw_committed‖ / ‖Δw_committed‖ over the segment.
    pub update_error: f64,
    pub reason: String,
}

/// What the verifier needs to re-run a segment of a worker's round.
pub struct Segment<'a> {
    pub model: &'a LlamaConfig,
    pub train: &'a TrainConfig,
    pub specs: &'a [TensorSpec],
    pub unit: &'a Shard,
    /// The round's position in the learning-rate schedule and its length (H).
    pub first_step: u64,
    pub steps: u64,
    /// Inner steps `[from, to)` of the round.
    pub from: u64,
    pub to: u64,
    /// Under overlap, the late update at the merge point ([`Merge`]); None without overlap (and in round 0).
    pub merge: Option<Merge<'a>>,
}

/// Streaming DiLoCo's late merge inside a round: after step `at`, the tensors `tensors` (the fragment the
/// previous round synchronised) move by (1 − α)·(`global` − `start`), the round's global weights minus the
/// weights its chain started from, as [`agora_diloco::SyncState::merge_late`] does on the worker.
pub struct Merge<'a> {
    pub at: u64,
    pub alpha: f64,
    pub global: &'a [Tensor],
    pub start: &'a [Tensor],
    pub tensors: Vec<usize>,
}

/// Re-runs `segment` from `start` and compares with `end` (both already matched to the commitment).
pub fn recompute(segment: &Segment<'_>, start: &[u8], end: &[u8], tolerance: f64) -> Result<SpotCheck> {
    let (start_state, end_state) = (decode_state(start, segment.specs)?, decode_state(end, segment.specs)?);
    let fail = |reason: String| SpotCheck { passed: false, exact: false, update_error: f64::INFINITY, reason };
    if end_state.step != start_state.step + (segment.to - segment.from) {
        return Ok(fail(format!(
            "the end state is at AdamW step {}, the start at {}: the segment has {} steps",
            end_state.step,
            start_state.step,
            segment.to - segment.from
        )));
    }
    let mut trainer = Trainer::new(Llama::zeros(segment.model, Device::Cpu), segment.train.clone())?;
    load_state(&mut trainer, &start_state);
    train_steps(&mut trainer, segment.unit, segment.first_step, segment.steps, segment.from..segment.to, |_, _| {})
        .context("re-running the challenged segment")?;
    if let Some(m) = segment.merge.as_ref().filter(|m| m.at == segment.to) {
        let mut weights = model_weights(&trainer.model);
        apply_late(&mut weights, m.global, m.start, &m.tensors, m.alpha);
        load_weights(&trainer.model, &weights);
    }
    let recomputed = encode_state(&trainer, segment.specs);
    if hash_bytes(&recomputed) == hash_bytes(end) {
        return Ok(SpotCheck { passed: true, exact: true, update_error: 0.0, reason: "bit-exact".into() });
    }
    let now = to_named(segment.specs, &model_weights(&trainer.model));
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((s, r), e) in start_state.weights.iter().zip(&now).zip(&end_state.weights) {
        for ((&s, &r), &e) in s.data.iter().zip(&r.data).zip(&e.data) {
            let committed = f64::from(e) - f64::from(s);
            let ours = f64::from(r) - f64::from(s);
            diff += (ours - committed).powi(2);
            norm += committed * committed;
        }
    }
    let update_error = if norm > 0.0 { (diff / norm).sqrt() } else { f64::INFINITY };
    let passed = update_error <= tolerance;
    let reason = if norm == 0.0 {
        "the committed end state has the start state's weights, but re-running the segment changes them".into()
    } else if passed {
        format!("within tolerance ({update_error:.2e} ≤ {tolerance})")
    } else {
        format!("re-running the segment does not reproduce the committed end state (update error {update_error:.3} > {tolerance})")
    };
    Ok(SpotCheck { passed, exact: false, update_error, reason })
}
