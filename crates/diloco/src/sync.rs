//! What a worker carries from one round to the next besides its AdamW moments: the error-feedback residual
//! (what compression has not sent yet) and, with fragments, its own weights for the fragments not yet
//! synchronised. The networked worker persists this; `agora bench` keeps it in memory. Both call the same
//! functions, in this order: [`SyncState::start_weights`] → train → [`SyncState::prepare_upload`] → (if the
//! coordinator accepts) [`SyncState::accepted`].

use crate::codec::{compress, CompressionConfig};
use crate::fragments::FragmentPlan;
use crate::tensors::to_named;
use agora_protocol::TensorSpec;
use std::collections::BTreeMap;
use tch::Tensor;

/// Error feedback lives in the worker's weights: a worker whose last upload dropped `e` starts its next round
/// from θ_global − e rather than adding `e` to its next Δ. Adding it (the textbook form, [`compress`] with a
/// residual) double-counts in DiLoCo: a worker restarted at θ_global re-learns the displacement that was not
/// sent, and the residual then adds it a second time. Measured on tinyshakespeare, top-k with additive
/// feedback ended 31% above fp32 DiLoCo, worse than no feedback at all (+7%); in the weights, with the
/// residual halved each round (`feedback_decay` 0.5), it beats no feedback (BENCHMARKS.md).
pub struct SyncState {
    /// Per model tensor: what compression has dropped and not yet sent (empty without error feedback).
    pub residual: Vec<Vec<f32>>,
    /// With fragments (or under overlap, `keeps_local`): this worker's weights after its last round.
    pub local: Option<Vec<Tensor>>,
    /// Per fragment: the round whose global weights this worker last took that fragment from.
    pub loaded: Vec<Option<u64>>,
    /// Keep `local` even with one fragment: an overlapped round starts from it ([`crate::overlap`]).
    pub keeps_local: bool,
}

/// One round's upload, and the residual to keep once it is accepted.
pub struct Upload {
    pub payload: Vec<u8>,
    pub fragment: usize,
    pub residual: Vec<Vec<f32>>,
    /// Bytes the same Δ would take as fp32 values (the compression ratio's numerator).
    pub fp32_bytes: u64,
}

/// A tensor taken from the global weights: g − decay · residual (g itself without a residual). The
/// verifier recomputes a worker's start with this very function, so the bits agree.
pub fn start_from_global(g: &Tensor, residual: Option<&[f32]>, decay: f64) -> Tensor {
    match residual {
        Some(r) => tch::no_grad(|| {
            let r = Tensor::from_slice(r).view(g.size().as_slice()).to_device(g.device()).to_kind(g.kind());
            g - r * decay
        }),
        None => g.copy(),
    }
}

/// Δ = global − local for the tensors `indices` (a fragment, described by `fragment_specs`), flattened per
/// tensor: what a worker compresses and uploads, and what the verifier recomputes from a committed state.
pub fn pseudo_gradient(
    indices: &[usize],
    fragment_specs: &[TensorSpec],
    global: &[Tensor],
    local: &[Tensor],
) -> Vec<Vec<f32>> {
    let delta: Vec<Tensor> = tch::no_grad(|| indices.iter().map(|&i| &global[i] - &local[i]).collect());
    to_named(fragment_specs, &delta).into_iter().map(|t| t.data).collect()
}

impl SyncState {
    pub fn new(specs: &[TensorSpec], config: &CompressionConfig) -> SyncState {
        let residual = if config.uses_feedback() {
            specs.iter().map(|s| vec![0f32; s.shape.iter().product()]).collect()
        } else {
            Vec::new()
        };
        // Under overlap a worker starts each round from its own weights: it keeps them whatever F.
        SyncState { residual, local: None, loaded: vec![None; config.fragments], keeps_local: config.overlap().is_on() }
    }

    /// The weights to train round `round` from: the global weights, except (with fragments) for the
    /// fragments whose global values have not changed since this worker took them, where it continues from
    /// its own weights. That includes the fragment this round synchronises when the worker already took its
    /// current global value in an earlier round (it keeps training every fragment between syncs); Δ =
    /// global − local is still relative to the round's global weights.
    ///
    /// Tensors taken from the global weights start at global − decay · residual: the displacement earlier
    /// compression dropped stays in this worker's model, and is part of its next Δ.
    pub fn start_weights(
        &mut self,
        config: &CompressionConfig,
        plan: &FragmentPlan,
        round: u64,
        global: &[Tensor],
    ) -> Vec<Tensor> {
        let decay = config.feedback_decay;
        let residual = &self.residual;
        let from_global =
            |i: usize, g: &Tensor| -> Tensor { start_from_global(g, residual.get(i).map(|r| r.as_slice()), decay) };
        let Some(local) = &self.local else {
            self.loaded.iter_mut().for_each(|l| *l = Some(round));
            return global.iter().enumerate().map(|(i, g)| from_global(i, g)).collect();
        };
        let fresh: Vec<bool> = (0..plan.count())
            .map(|f| match (self.loaded[f], plan.last_sync_before(f, round)) {
                (Some(loaded), Some(sync)) => loaded <= sync,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .collect();
        let start = global
            .iter()
            .zip(local)
            .enumerate()
            .map(|(i, (g, l))| if fresh[plan.fragment_of(i)] { from_global(i, g) } else { l.copy() })
            .collect();
        for (f, l) in self.loaded.iter_mut().enumerate() {
            if fresh[f] {
                *l = Some(round);
            }
        }
        start
    }

    /// Compresses Δ = global − local of the fragment round `round` synchronises (which, under error
    /// feedback, includes the residual the worker started from). With fragments or under overlap, keeps
    /// `local` for the next round.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_upload(
        &mut self,
        config: &CompressionConfig,
        plan: &FragmentPlan,
        specs: &[TensorSpec],
        round: u64,
        global: &[Tensor],
        local: Vec<Tensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Upload {
        let fragment = plan.synced_in(round);
        let indices = plan.tensors(fragment);
        let fragment_specs: Vec<TensorSpec> = indices.iter().map(|&i| specs[i].clone()).collect();
        let delta = pseudo_gradient(&indices, &fragment_specs, global, &local);
        let (payload, residual) = compress(config, fragment, &fragment_specs, &delta, None, metadata);
        if plan.count() > 1 || self.keeps_local {
            self.local = Some(local);
        }
        let fp32_bytes = 4 * fragment_specs.iter().map(|s| s.shape.iter().product::<usize>() as u64).sum::<u64>();
        Upload { payload, fragment, residual, fp32_bytes }
    }

    /// The coordinator accepted the upload: what it did not carry becomes the residual.
    pub fn accepted(&mut self, plan: &FragmentPlan, fragment: usize, residual: Vec<Vec<f32>>) {
        if self.residual.is_empty() {
            return;
        }
        for (i, r) in plan.tensors(fragment).into_iter().zip(residual) {
            self.residual[i] = r;
        }
    }
}
