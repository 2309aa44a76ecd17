//! Judging a round: the blocking computations (decode, pairwise statistics, loss before/after, spot-check
//! re-runs). The rules that turn them into verdicts are `agora_verify::rules`; `close.rs` feeds them from
//! storage and `settlement.rs` records what they decide, in the round's commit transaction.

use agora_data::sampling::batch_offsets;
use agora_data::Shard;
use agora_diloco::codec::{self, Expected};
use agora_diloco::tensors::load_weights;
use agora_diloco::{unit_batches, CompressionConfig};
use agora_model::{Llama, LlamaConfig};
use agora_protocol::{Hash32, NamedTensor, TensorSpec, WorkerId};
use agora_verify::{
    aggregate_chunk, bounded_scores, relative_gain, rule_verdicts, Gains, Gram, SpotCheckState, TrustConfig,
    UploadFacts,
};
use anyhow::{Context, Result};
use tch::{Device, Tensor};

pub use agora_verify::rules::{
    is_slashing, ACCEPTED, COPY, NON_FINITE, NORM, OFF_CONSENSUS, REPLAY, SPOT_CHECK_FAILED, ZERO_SCORE,
};

/// A payload in the blob store, already validated in full when it was received: its hash and its metadata
/// length, which is all it takes to find each tensor's section (`codec::section_ranges`).
#[derive(Debug, Clone, Copy)]
pub struct StoredPayload {
    pub hash: Hash32,
    pub metadata_len: usize,
}

/// One received upload of the round, in acceptance order.
pub struct Candidate {
    pub worker: WorkerId,
    pub payload: StoredPayload,
    /// The blobs of the data units the worker was assigned, in training order.
    pub units: Vec<Hash32>,
    /// `None`: not challenged; else `pending`, `passed` or `failed: ...`.
    pub spot_check: Option<String>,
    /// Its decoded values equal a pseudo-gradient accepted in an earlier round.
    pub replayed: bool,
}

#[derive(Debug, Clone)]
pub struct Judgement {
    pub verdict: &'static str,
    pub score: f64,
    pub gains: Option<Gains>,
    /// Largest cosine with an earlier upload of this round.
    pub similarity: f64,
    pub norm: f64,
}

pub struct RoundJudgement {
    pub judgements: Vec<Judgement>,
    /// The aggregate of the accepted pseudo-gradients (fragment tensors), None when none was accepted.
    pub aggregate: Option<Vec<NamedTensor>>,
}

/// Reads a blob from the store: a byte range of it, or (None) the whole blob, checked against its hash.
pub type ReadBlob<'a> = dyn Fn(&Hash32, Option<std::ops::Range<usize>>) -> Result<bytes::Bytes> + 'a;

/// What judging needs besides the candidates.
pub struct JudgeContext<'a> {
    pub trust: &'a TrustConfig,
    pub compression: &'a CompressionConfig,
    pub model: &'a LlamaConfig,
    /// Every tensor of the model, and the indices of the fragment this round synchronises.
    pub specs: &'a [TensorSpec],
    pub fragment: usize,
    pub fragment_tensors: &'a [usize],
    pub global: &'a [Tensor],
    pub val: &'a Shard,
    pub seq_len: usize,
    pub batch_size: usize,
    /// The round's inner steps (every upload of a round trained as many).
    pub inner_steps: u64,
    /// Secret per-round seed: which held-out and assigned batches are scored.
    pub seed: u64,
    /// The previous round of the same fragment's accepted pseudo-gradients: a near-duplicate of one of
    /// them is a replay.
    pub previous: &'a [StoredPayload],
    pub read: &'a ReadBlob<'a>,
}

/// The content hash replay detection compares: blake3 of the decoded values, whatever the metadata.
pub fn content_hash(compression: &CompressionConfig, specs: &[TensorSpec], payload: &codec::Payload<'_>) -> Hash32 {
    let mut h = blake3::Hasher::new_derive_key("agora-coordinator v1 delta content");
    for t in codec::decode(compression, specs, payload) {
        for v in t.data {
            h.update(&v.to_le_bytes());
        }
    }
    Hash32(*h.finalize().as_bytes())
}

/// One stored payload's values (flattened), read whole and checked against its hash.
fn decode_whole(ctx: &JudgeContext<'_>, fragment_specs: &[TensorSpec], stored: &StoredPayload) -> Result<Vec<f32>> {
    let bytes = (ctx.read)(&stored.hash, None)?;
    let expected = Expected { config: ctx.compression, fragment: ctx.fragment, specs: fragment_specs };
    let payload = codec::parse(&bytes, expected).map_err(|e| anyhow::anyhow!("stored payload {}: {e}", stored.hash))?;
    Ok(codec::decode(ctx.compression, fragment_specs, &payload).into_iter().flat_map(|t| t.data).collect())
}

/// Tensor `t` of each stored payload, decoded (one tensor of every payload in memory at once).
fn decode_tensor(
    ctx: &JudgeContext<'_>,
    fragment_specs: &[TensorSpec],
    t: usize,
    payloads: &[StoredPayload],
) -> Result<Vec<Vec<f32>>> {
    payloads
        .iter()
        .map(|p| {
            let range = codec::section_ranges(ctx.compression, fragment_specs, p.metadata_len)[t].clone();
            let bytes = (ctx.read)(&p.hash, Some(range))?;
            Ok(codec::decode_section(ctx.compression, &fragment_specs[t], &bytes))
        })
        .collect()
}

/// A quarter of `score_batches` batches of a worker's unit (spread over its round): the assigned-data
/// evidence is a diagnostic, the score rests on the held-out batches.
fn assigned_batches(ctx: &JudgeContext<'_>, unit: &Shard) -> Vec<Vec<usize>> {
    let all = unit_batches(unit.len(), ctx.batch_size, ctx.seq_len, ctx.inner_steps);
    let k = ctx.trust.score_batches.div_ceil(4).min(all.len());
    let offset = (ctx.seed % all.len() as u64) as usize;
    (0..k).map(|j| all[(offset + j * all.len() / k) % all.len()].clone()).collect()
}

fn random_batches(ctx: &JudgeContext<'_>) -> Vec<Vec<usize>> {
    (0..ctx.trust.score_batches as u64)
        .map(|b| batch_offsets(ctx.seed, &ctx.val.content_hash, b, 0, ctx.batch_size, ctx.seq_len, ctx.val.len()))
        .collect()
}

/// Judges every candidate and aggregates the accepted ones, reading the stored payloads tensor by tensor:
/// one pass accumulates the Gram matrix of the round's uploads and the previous round's, the loss of each
/// remaining upload is measured with that upload alone decoded, and a last pass aggregates the accepted
/// uploads tensor by tensor. Peak memory: the global weights, one decoded upload, and one tensor of every
/// upload.
pub fn judge_round(ctx: &JudgeContext<'_>, candidates: &[Candidate]) -> Result<RoundJudgement> {
    let fragment_specs: Vec<TensorSpec> = ctx.fragment_tensors.iter().map(|&i| ctx.specs[i].clone()).collect();
    let n = candidates.len();
    let all: Vec<StoredPayload> = candidates.iter().map(|c| c.payload).chain(ctx.previous.iter().copied()).collect();
    let mut gram = Gram::new(all.len());
    for t in 0..fragment_specs.len() {
        let chunks = decode_tensor(ctx, &fragment_specs, t, &all)?;
        gram.add_chunk(&chunks.iter().map(|c| c.as_slice()).collect::<Vec<_>>());
    }
    // The verdicts of `agora_verify::rules`, from the round's own statistics and the replay facts.
    let facts: Vec<UploadFacts> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| UploadFacts {
            replayed: c.replayed,
            previous_similarity: (n..all.len()).map(|k| gram.cosine(i, k)).fold(0.0, f64::max),
            spot_check: match c.spot_check.as_deref() {
                None => SpotCheckState::NotChallenged,
                Some("passed") => SpotCheckState::Passed,
                Some(_) => SpotCheckState::Failed,
            },
        })
        .collect();
    let round_gram = gram.leading(n);
    let mut judgements: Vec<Judgement> = rule_verdicts(ctx.trust, &facts, &round_gram)
        .into_iter()
        .map(|r| Judgement { verdict: r.verdict, score: 0.0, gains: None, similarity: r.similarity, norm: r.norm })
        .collect();

    // Loss before and after a step along each remaining Δ, on held-out batches and on its own data.
    let model = Llama::zeros(ctx.model, Device::Cpu);
    load_weights(&model, ctx.global);
    let random = random_batches(ctx);
    let random_before = agora_train::loss_on(&model, ctx.val, &random, ctx.seq_len)?;
    for (i, c) in candidates.iter().enumerate() {
        if judgements[i].verdict != ACCEPTED {
            continue;
        }
        let delta = decode_whole(ctx, &fragment_specs, &c.payload)?;
        let parts = c.units.iter().map(|h| Shard::from_bytes(&(ctx.read)(h, None)?)).collect::<Result<Vec<_>>>()?;
        let unit = Shard::concat(&parts)?;
        let assigned = assigned_batches(ctx, &unit);
        load_weights(&model, ctx.global);
        let assigned_before = agora_train::loss_on(&model, &unit, &assigned, ctx.seq_len)?;
        let mut weights: Vec<Tensor> = ctx.global.iter().map(|t| t.shallow_clone()).collect();
        let mut at = 0;
        for &t in ctx.fragment_tensors {
            let n = ctx.global[t].numel();
            let step = Tensor::from_slice(&delta[at..at + n]).view(ctx.global[t].size().as_slice());
            weights[t] = tch::no_grad(|| &ctx.global[t] - step * ctx.trust.score_scale);
            at += n;
        }
        load_weights(&model, &weights);
        let gains = Gains {
            random: relative_gain(random_before, agora_train::loss_on(&model, ctx.val, &random, ctx.seq_len)?),
            assigned: relative_gain(assigned_before, agora_train::loss_on(&model, &unit, &assigned, ctx.seq_len)?),
        };
        judgements[i].gains = Some(gains);
    }
    let scores = bounded_scores(&judgements.iter().map(|j| j.gains).collect::<Vec<_>>());
    for (j, score) in judgements.iter_mut().zip(scores) {
        j.score = score;
        j.verdict = agora_verify::rules::score_verdict(j.verdict, score);
    }

    let admitted: Vec<usize> = (0..n).filter(|&i| judgements[i].verdict == ACCEPTED).collect();
    let aggregate = if admitted.is_empty() {
        None
    } else {
        let payloads: Vec<StoredPayload> = admitted.iter().map(|&i| candidates[i].payload).collect();
        let scores: Vec<f64> = admitted.iter().map(|&i| judgements[i].score).collect();
        let norms: Vec<f64> = admitted.iter().map(|&i| round_gram.norm(i)).collect();
        let mut tensors = Vec::with_capacity(fragment_specs.len());
        for (t, spec) in fragment_specs.iter().enumerate() {
            let chunks = decode_tensor(ctx, &fragment_specs, t, &payloads)?;
            let views: Vec<&[f32]> = chunks.iter().map(|c| c.as_slice()).collect();
            let data = aggregate_chunk(ctx.trust.aggregation, &views, &scores, &norms);
            tensors.push(NamedTensor { name: spec.name.clone(), shape: spec.shape.clone(), data });
        }
        Some(tensors)
    };
    Ok(RoundJudgement { judgements, aggregate })
}

/// Whether the submission with this payload hash is challenged, and which segment: a keyed choice the
/// worker could not predict when it committed.
pub fn challenge_for(choice: [u8; 32], spot_check: f64, segments: u64) -> Option<u64> {
    if segments == 0 || spot_check <= 0.0 {
        return None;
    }
    let draw = u64::from_le_bytes(choice[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    (draw < spot_check).then(|| u64::from_le_bytes(choice[8..16].try_into().expect("8 bytes")) % segments)
}

/// Re-runs a challenged segment; returns the `spot_check` column's new value.
#[allow(clippy::too_many_arguments)]
pub fn run_spot_check(
    model: &LlamaConfig,
    train: &agora_train::TrainConfig,
    specs: &[TensorSpec],
    unit: &Shard,
    first_step: u64,
    steps: u64,
    bounds: &[u64],
    segment: u64,
    merge: Option<agora_verify::chain::Merge<'_>>,
    start: &[u8],
    end: &[u8],
    tolerance: f64,
) -> Result<String> {
    let (from, to) = (bounds[segment as usize], bounds[segment as usize + 1]);
    let check = agora_verify::chain::recompute(
        &agora_verify::chain::Segment { model, train, specs, unit, first_step, steps, from, to, merge },
        start,
        end,
        tolerance,
    )
    .context("spot check")?;
    tracing::info!(
        segment,
        passed = check.passed,
        exact = check.exact,
        error = check.update_error,
        "spot check re-run"
    );
    Ok(if check.passed { "passed".to_string() } else { format!("failed: {}", check.reason) })
}
