//! Deeper models: identity blocks inserted (exact), or the stack repeated (G_stack, not exact).

use super::{edited, layer_name, Fill, Weights, NORMS, READERS, WRITERS};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Where `added` new blocks go in a stack of `layers`, spread evenly: block b goes before old layer
/// ⌈(b + 1)·layers / (added + 1)⌉, so none lands at the bottom (the embedding's first reader is kept) and
/// several may share a place when more are added than there are layers.
pub fn spread_positions(layers: usize, added: usize) -> Vec<usize> {
    (0..added).map(|b| ((b + 1) * layers).div_ceil(added + 1)).collect()
}

/// Inserts one new block before old layer p for each p in `positions` (0 ..= layers; p = layers appends;
/// a position may repeat). A new block has unit gains, fresh q/k/v/gate/up and **zero** `o_proj` and
/// `down_proj`: both sublayers add zero to the residual stream, so the block is the identity (LLaMA Pro,
/// arXiv 2401.02415) until training moves its two output projections, which get gradients at once because
/// the fresh readers give them nonzero inputs.
pub fn insert_layers(w: &Weights, positions: &[usize], fill: Fill) -> Result<Weights> {
    let c = &w.config;
    let layers = c.num_hidden_layers;
    ensure!(positions.iter().all(|&p| p <= layers), "a position past the {layers} layers: {positions:?}");
    let mut sorted = positions.to_vec();
    sorted.sort_unstable();
    let config = edited(c, |n| n.num_hidden_layers = layers + positions.len())?;
    let shapes: Vec<(String, Vec<i64>)> = crate::llama::parameter_shapes(&config);
    let shape_of =
        |part: &str| shapes.iter().find(|(n, _)| *n == layer_name(0, part)).expect("layer 0 exists").1.clone();
    let mut tensors = w.shallow_tensors();
    tensors.retain(|n, _| !n.starts_with("model.layers."));
    let mut next = 0;
    let mut new_blocks = 0;
    for old in 0..=layers {
        while sorted.get(new_blocks) == Some(&old) {
            for part in NORMS {
                tensors.insert(layer_name(next, part), fill.unit_gains(&shape_of(part)));
            }
            for part in READERS {
                let what = format!("inserted{new_blocks}/{part}");
                tensors.insert(layer_name(next, part), fill.fresh(&what, &shape_of(part), c.initializer_range));
            }
            for part in WRITERS {
                tensors.insert(
                    layer_name(next, part),
                    Tensor::zeros(shape_of(part).as_slice(), (Kind::Float, tch::Device::Cpu)),
                );
            }
            new_blocks += 1;
            next += 1;
        }
        if old < layers {
            for part in NORMS.iter().chain(&READERS).chain(&WRITERS) {
                tensors.insert(layer_name(next, part), w.layer(old, part).shallow_clone());
            }
            next += 1;
        }
    }
    Weights::new(config, tensors)
}

/// G_stack (arXiv 2405.15319): `layers` blocks, block l a copy of old block l mod L, i.e. the whole stack
/// repeated (the last repeat cut short when `layers` is not a multiple of L). **Not exact**: each block
/// sees a different input than it was trained on. It is here to compare with the exact operators.
pub fn stack_layers(w: &Weights, layers: usize) -> Result<Weights> {
    let c = &w.config;
    let old = c.num_hidden_layers;
    ensure!(layers >= old, "num_hidden_layers shrinks ({old} → {layers})");
    let config = edited(c, |n| n.num_hidden_layers = layers)?;
    let mut tensors = w.shallow_tensors();
    tensors.retain(|n, _| !n.starts_with("model.layers."));
    for l in 0..layers {
        for part in NORMS.iter().chain(&READERS).chain(&WRITERS) {
            tensors.insert(layer_name(l, part), w.layer(l % old, part).copy());
        }
    }
    Weights::new(config, tensors)
}
