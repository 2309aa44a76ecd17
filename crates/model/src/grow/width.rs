//! Wider models: more SwiGLU units, a wider residual stream, an untied head.

use super::{
    edited, keep_head_size, layer_name, std_of, FfnGrowth, Fill, HiddenGrowth, Weights, NORMS, READERS, WRITERS,
};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Noise added to copies, as a fraction of the copied matrix's standard deviation (at least of the
/// initialisation's, so that copies of an untrained all-zero matrix still part): enough to give each copy
/// its own gradient, small beside the weights themselves.
const COPY_NOISE: f64 = 0.1;

/// Grows the SwiGLU hidden width to `intermediate` units.
///
/// - [`FfnGrowth::Fresh`]: the new units' gate and up rows are drawn fresh, their `down_proj` columns are
///   zero: they compute something and write nothing until training moves their down columns.
/// - [`FfnGrowth::Split`]: unit u of the new width copies old unit u mod i, i the old width (so each old unit is split as evenly as
///   the sizes allow). A unit with m copies in all (itself included) gives each the down column d/m + ε_c,
///   Σ ε_c = 0: the copies compute the same activation a, so Σ (d/m + ε_c)·a = d·a.
pub fn widen_ffn(w: &Weights, intermediate: usize, how: FfnGrowth, fill: Fill) -> Result<Weights> {
    let c = &w.config;
    let old = c.intermediate_size;
    ensure!(intermediate >= old, "intermediate_size shrinks ({old} → {intermediate})");
    let config = edited(c, |n| n.intermediate_size = intermediate)?;
    let added = (intermediate - old) as i64;
    let h = c.hidden_size as i64;
    let mut tensors = w.shallow_tensors();
    for l in 0..c.num_hidden_layers {
        let (gate, up, down) = (w.layer(l, "mlp.gate_proj"), w.layer(l, "mlp.up_proj"), w.layer(l, "mlp.down_proj"));
        let (gate, up, down) = match how {
            FfnGrowth::Fresh => {
                let std = c.initializer_range;
                let new_rows = |part: &str| fill.fresh(&format!("{}/units", layer_name(l, part)), &[added, h], std);
                (
                    Tensor::cat(&[gate, &new_rows("mlp.gate_proj")], 0),
                    Tensor::cat(&[up, &new_rows("mlp.up_proj")], 0),
                    Tensor::cat(&[down, &Tensor::zeros([h, added], (Kind::Float, down.device()))], 1),
                )
            }
            FfnGrowth::Split => {
                // source[u]: the old unit that new unit u copies (an old unit is its own source).
                let source: Vec<i64> = (0..intermediate).map(|u| (u % old) as i64).collect();
                let index = Tensor::from_slice(&source);
                let mut copies = vec![0usize; old];
                source.iter().for_each(|&s| copies[s as usize] += 1);
                let std = COPY_NOISE * std_of(down).max(c.initializer_range);
                let mut columns: Vec<Tensor> = Vec::with_capacity(intermediate);
                let mut noise: Vec<Vec<Tensor>> = (0..old)
                    .map(|j| {
                        if copies[j] == 1 {
                            return Vec::new();
                        }
                        let what = format!("{}/split{j}", layer_name(l, "mlp.down_proj"));
                        fill.cancelling_noise(&what, copies[j], &[h], std)
                    })
                    .collect();
                for &s in &source {
                    let d = down.select(1, s) / fill.scale(copies[s as usize] as f64);
                    columns.push(match noise[s as usize].pop() {
                        Some(eps) => d + eps,
                        None => d,
                    });
                }
                (gate.index_select(0, &index), up.index_select(0, &index), Tensor::stack(&columns, 1))
            }
        };
        tensors.insert(layer_name(l, "mlp.gate_proj"), gate);
        tensors.insert(layer_name(l, "mlp.up_proj"), up);
        tensors.insert(layer_name(l, "mlp.down_proj"), down);
    }
    Weights::new(config, tensors)
}

/// Grows the residual stream to `hidden` dimensions, at the same head size and head count.
///
/// [`HiddenGrowth::Pad`]: the stream x becomes [c·x, 0] with c = √(hidden / h), so its root mean square
/// over the wider stream is unchanged (RMSNorm's ε too); each norm's gain is divided by c, so every normed
/// input is [y, 0] as before. Layers that read the stream get fresh columns for the new dimensions (they
/// read zeros, and they are what gives the new dimensions a gradient); layers that write it are scaled by
/// c, with zero rows for the new dimensions, which therefore stay zero. A tied head reads c·E: the final
/// gain is divided by c² instead.
///
/// [`HiddenGrowth::Tile`] (HyperCloning, arXiv 2409.12903), hidden = n·h: the stream becomes n copies of
/// itself (root mean square unchanged), gains are tiled, writers are tiled by rows, readers become
/// [W/n + ε_1 … W/n + ε_n] with Σ ε_c = 0 (the copies they read are equal). A tied head reads n copies:
/// the final gain is divided by n.
pub fn widen_hidden(w: &Weights, hidden: usize, how: HiddenGrowth, fill: Fill) -> Result<Weights> {
    let c = &w.config;
    let h = c.hidden_size;
    ensure!(hidden >= h, "hidden_size shrinks ({h} → {hidden})");
    if how == HiddenGrowth::Tile {
        ensure!(hidden.is_multiple_of(h), "tiling needs a multiple of the hidden size {h}, not {hidden}");
    }
    let config = edited(c, |n| {
        n.hidden_size = hidden;
        keep_head_size(n, c.head_size());
    })?;
    let (h, wide) = (h as i64, hidden as i64);
    let tied = c.tie_word_embeddings;
    let std = c.initializer_range;
    let mut tensors = w.shallow_tensors();
    let mut set = |name: String, t: Tensor| {
        tensors.insert(name, t);
    };
    match how {
        HiddenGrowth::Pad => {
            let scale = fill.scale((hidden as f64 / h as f64).sqrt());
            let zeros = |rows: i64, cols: i64| Tensor::zeros([rows, cols], (Kind::Float, tch::Device::Cpu));
            let gain = |g: &Tensor, by: f64| Tensor::cat(&[g / by, fill.unit_gains(&[wide - h]) / by], 0);
            let reader = |name: &str, t: &Tensor| {
                let rows = t.size()[0];
                Tensor::cat(&[t, &fill.fresh(&format!("{name}/columns"), &[rows, wide - h], std)], 1)
            };
            let writer = |t: &Tensor| Tensor::cat(&[t * scale, zeros(wide - h, t.size()[1])], 0);
            let embed = w.get("model.embed_tokens.weight");
            set("model.embed_tokens.weight".into(), Tensor::cat(&[embed * scale, zeros(embed.size()[0], wide - h)], 1));
            for l in 0..c.num_hidden_layers {
                for part in NORMS {
                    set(layer_name(l, part), gain(w.layer(l, part), scale));
                }
                for part in READERS {
                    set(layer_name(l, part), reader(&layer_name(l, part), w.layer(l, part)));
                }
                for part in WRITERS {
                    set(layer_name(l, part), writer(w.layer(l, part)));
                }
            }
            let final_scale = if tied { scale * scale } else { scale };
            set("model.norm.weight".into(), gain(w.get("model.norm.weight"), final_scale));
            if !tied {
                set("lm_head.weight".into(), reader("lm_head.weight", w.get("lm_head.weight")));
            }
        }
        HiddenGrowth::Tile => {
            let n = (wide / h) as usize;
            let reader = |name: &str, t: &Tensor| {
                let noise = fill.cancelling_noise(
                    &format!("{name}/tiles"),
                    n,
                    &t.size(),
                    COPY_NOISE * std_of(t).max(std) / n as f64,
                );
                let tiles: Vec<Tensor> = noise.iter().map(|eps| t / fill.scale(n as f64) + eps).collect();
                Tensor::cat(&tiles, 1)
            };
            let tile = |t: &Tensor, dim: i64| Tensor::cat(&vec![t; n], dim);
            set("model.embed_tokens.weight".into(), tile(w.get("model.embed_tokens.weight"), 1));
            for l in 0..c.num_hidden_layers {
                for part in NORMS {
                    set(layer_name(l, part), tile(w.layer(l, part), 0));
                }
                for part in READERS {
                    set(layer_name(l, part), reader(&layer_name(l, part), w.layer(l, part)));
                }
                for part in WRITERS {
                    set(layer_name(l, part), tile(w.layer(l, part), 0));
                }
            }
            let final_gain = tile(w.get("model.norm.weight"), 0);
            set("model.norm.weight".into(), if tied { final_gain / fill.scale(n as f64) } else { final_gain });
            if !tied {
                set("lm_head.weight".into(), reader("lm_head.weight", w.get("lm_head.weight")));
            }
        }
    }
    Weights::new(config, tensors)
}

/// A tied model made untied: the head starts as a copy of the embedding (exact), and the two train apart.
pub fn untie_head(w: &Weights) -> Result<Weights> {
    ensure!(w.config.tie_word_embeddings, "the head is untied already");
    let config = edited(&w.config, |n| n.tie_word_embeddings = false)?;
    let mut tensors = w.shallow_tensors();
    tensors.insert("lm_head.weight".into(), w.get("model.embed_tokens.weight").copy());
    Weights::new(config, tensors)
}
