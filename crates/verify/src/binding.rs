//! Binding the upload to the work (issue 11, item 3).
//!
//! The hash chain proves that each committed segment maps its start state to its end state. Two more links
//! tie the chain to the round and to the upload:
//! - **start**: the chain's first state starts from the round's global weights: for every tensor of the
//!   fragment the round synchronises, its weights are θ_r − decay · residual, with the residual the worker
//!   commits to in its upload (metadata `agora.residual`, blake3 of the residual's canonical encoding;
//!   without error feedback the residual is zero and the weights are θ_r exactly);
//! - **end**: the upload is the compression of Δ = θ_r − w(end) for that fragment, with w(end) the weights
//!   of the chain's last state.
//!
//! A challenged worker proves one segment *and both links*: its proof carries the states at boundaries
//! 0, j, j + 1 and S (deduplicated) and, with error feedback, the residual it started from. Checking a link
//! costs the coordinator one pass over the fragment (no training), so every challenge checks both: a lie
//! on either link is caught with the challenge probability itself, a lie on m of S segments with
//! challenge probability × m / S. The AdamW moments and step of the start state are the worker's and are not
//! bound; nor, with Streaming DiLoCo fragments, is the start at all (a worker continues from its own weights
//! for a fragment whose global value has not changed since it took it): there only the end link holds.

use crate::chain::decode_state;
use agora_diloco::codec::{self, CompressionConfig, Expected};
use agora_diloco::sync::{pseudo_gradient, start_from_global};
use agora_protocol::{decode_tensors, encode_tensors, hash_bytes, Hash32, NamedTensor, TensorSpec};
use std::collections::BTreeMap;
use tch::Tensor;

/// Payload metadata key of the residual commitment.
pub const RESIDUAL_META: &str = "agora.residual";

/// The boundaries whose states a proof of segment `segment` (of `segments`) carries, ascending.
pub fn proof_boundaries(segment: u64, segments: u64) -> Vec<u64> {
    let mut b = vec![0, segment, segment + 1, segments];
    b.sort_unstable();
    b.dedup();
    b
}

/// The canonical bytes of a fragment's residual (what the worker commits to and sends with a proof).
pub fn encode_residual(fragment_specs: &[TensorSpec], residual: &[Vec<f32>]) -> Vec<u8> {
    let tensors: Vec<NamedTensor> = fragment_specs
        .iter()
        .zip(residual)
        .map(|(s, r)| NamedTensor { name: s.name.clone(), shape: s.shape.clone(), data: r.clone() })
        .collect();
    encode_tensors(&tensors, &BTreeMap::new())
}

pub fn residual_commitment(bytes: &[u8]) -> Hash32 {
    hash_bytes(bytes)
}

/// A spot-check proof: states at boundaries, and the residual the round started from (empty without error
/// feedback).
#[derive(Debug, Clone, PartialEq)]
pub struct Proof {
    pub states: Vec<(u64, Vec<u8>)>,
    pub residual: Vec<u8>,
}

impl Proof {
    pub fn state(&self, boundary: u64) -> Option<&[u8]> {
        self.states.iter().find(|(b, _)| *b == boundary).map(|(_, s)| s.as_slice())
    }
}

/// `u32` count, then per state `u64` boundary, `u64` length, bytes; then `u64` length and the residual.
pub fn encode_proof(states: &[(u64, &[u8])], residual: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(states.len() as u32).to_le_bytes());
    for (b, s) in states {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }
    out.extend_from_slice(&(residual.len() as u64).to_le_bytes());
    out.extend_from_slice(residual);
    out
}

pub fn parse_proof(body: &[u8]) -> Result<Proof, String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| format!("proof truncated: needs {n} bytes at offset {at} of {}", body.len()))?;
        let s = &body[at..end];
        at = end;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    if count > 4 {
        return Err(format!("a proof carries at most 4 states, this one {count}"));
    }
    let mut states: Vec<(u64, Vec<u8>)> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let boundary = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let len = usize::try_from(len).map_err(|_| "state length overflows".to_string())?;
        if states.iter().any(|(b, _)| *b == boundary) {
            return Err(format!("the proof carries boundary {boundary} twice"));
        }
        states.push((boundary, take(len)?.to_vec()));
    }
    let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
    let residual = take(usize::try_from(len).map_err(|_| "residual length overflows".to_string())?)?.to_vec();
    if at != body.len() {
        return Err(format!("{} bytes after the proof", body.len() - at));
    }
    Ok(Proof { states, residual })
}

/// What the links are checked against.
pub struct Round<'a> {
    pub compression: &'a CompressionConfig,
    pub specs: &'a [TensorSpec],
    /// The fragment this round synchronises and its tensors (indices into `specs`).
    pub fragment: usize,
    pub fragment_tensors: &'a [usize],
    /// θ_r, every tensor.
    pub global: &'a [Tensor],
}

fn bits(v: &[f32]) -> impl Iterator<Item = u32> + '_ {
    v.iter().map(|x| x.to_bits())
}

/// The start link: the first state's synchronised weights are θ_r − decay · residual. `Err` says why not.
/// With Streaming DiLoCo fragments a worker continues from its own weights for a fragment whose global value
/// has not changed since it took it (`SyncState::start_weights`), so there is nothing to bind the start to:
/// the link is checked only for runs of one fragment. Likewise under Streaming DiLoCo's overlap, where a
/// worker that uploaded the previous round starts the next one from its own weights.
pub fn check_start(round: &Round<'_>, start: &[u8], residual: &[u8], committed: Option<Hash32>) -> Result<(), String> {
    if round.compression.fragments > 1 || round.compression.overlap().is_on() {
        return Ok(());
    }
    let state = decode_state(start, round.specs).map_err(|e| format!("start state: {e:#}"))?;
    let fragment_specs: Vec<TensorSpec> = round.fragment_tensors.iter().map(|&i| round.specs[i].clone()).collect();
    let residual: Option<Vec<Vec<f32>>> = if round.compression.uses_feedback() {
        match committed {
            Some(h) if residual_commitment(residual) == h => {}
            Some(_) => return Err("the residual sent is not the one committed to in the upload".into()),
            None => return Err("the upload commits to no residual, but the run uses error feedback".into()),
        }
        let (tensors, _) = decode_tensors(residual, Some(&fragment_specs)).map_err(|e| format!("residual: {e}"))?;
        Some(tensors.into_iter().map(|t| t.data).collect())
    } else {
        None
    };
    for (k, &i) in round.fragment_tensors.iter().enumerate() {
        let expected = match &residual {
            Some(r) => start_from_global(&round.global[i], Some(&r[k]), round.compression.feedback_decay),
            None => start_from_global(&round.global[i], None, round.compression.feedback_decay),
        };
        let expected = Vec::<f32>::try_from(&expected.flatten(0, -1)).map_err(|e| format!("{e}"))?;
        if !bits(&expected).eq(bits(&state.weights[i].data)) {
            return Err(format!(
                "the committed start state's {} is not the round's global weights{}",
                round.specs[i].name,
                if residual.is_some() { " minus the committed residual" } else { "" }
            ));
        }
    }
    Ok(())
}

/// The end link: the upload's values are those of the compression of θ_r − w(end). `Err` says why not.
pub fn check_end(round: &Round<'_>, end: &[u8], payload: &[u8]) -> Result<(), String> {
    let state = decode_state(end, round.specs).map_err(|e| format!("end state: {e:#}"))?;
    let fragment_specs: Vec<TensorSpec> = round.fragment_tensors.iter().map(|&i| round.specs[i].clone()).collect();
    let local: Vec<Tensor> = state
        .weights
        .iter()
        .map(|t| Tensor::from_slice(&t.data).view(t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>().as_slice()))
        .collect();
    let delta = pseudo_gradient(round.fragment_tensors, &fragment_specs, round.global, &local);
    let (recomputed, _) =
        codec::compress(round.compression, round.fragment, &fragment_specs, &delta, None, &BTreeMap::new());
    let expected = Expected { config: round.compression, fragment: round.fragment, specs: &fragment_specs };
    let parsed = codec::parse_accepted(&recomputed, expected).map_err(|e| e.to_string())?;
    let ours = codec::decode(round.compression, &fragment_specs, &parsed);
    let parsed = codec::parse(payload, expected).map_err(|e| e.to_string())?;
    let theirs = codec::decode(round.compression, &fragment_specs, &parsed);
    for (a, b) in ours.iter().zip(&theirs) {
        if !bits(&a.data).eq(bits(&b.data)) {
            return Err(format!(
                "the upload's {} is not the compression of the global weights minus the committed end state",
                a.name
            ));
        }
    }
    Ok(())
}
