//! More attention heads at the same head size (RoPE and the 1/√d scale depend on it), GQA kept consistent.
//!
//! Query head j reads key/value head j / g (g = heads / kv heads, Hugging Face's `repeat_kv`). Old key/value
//! head k serves old query heads k·g … k·g + g − 1. In the grown model, with groups of g', it becomes
//! r = ⌈g / g'⌉ copies (new kv heads k·r … k·r + r − 1, the same key and value rows), and its i-th old query
//! head lands at new index k·r·g' + i, which reads copy ⌊i / g'⌋ of it. Every other query head is new: fresh
//! query rows and **zero** `o_proj` columns, so it writes nothing; the key/value heads past kv·r are fresh.
//! Hence: old outputs unchanged, new heads silent, and exact for any g' as long as kv' ≥ kv·r.

use super::{edited, keep_head_size, layer_name, Fill, Weights};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Whether (heads, kv) can grow to (heads', kv') exactly; the error says what is short.
pub(super) fn check(from: (usize, usize), to: (usize, usize)) -> Result<()> {
    let ((heads, kv), (new_heads, new_kv)) = (from, to);
    ensure!(new_kv > 0 && new_heads.is_multiple_of(new_kv), "{new_kv} key/value heads do not divide {new_heads} heads");
    let (group, new_group) = (heads / kv, new_heads / new_kv);
    let copies = group.div_ceil(new_group);
    ensure!(
        new_kv >= kv * copies,
        "heads {heads}/{kv} kv → {new_heads}/{new_kv} kv: groups of {new_group} need each of the {kv} key/value \
         heads copied {copies}× ({} key/value heads), but the target has {new_kv}; give it at least {} key/value \
         heads, or groups of {group} or more",
        kv * copies,
        kv * copies
    );
    Ok(())
}

/// Grows to `heads` query heads and `kv_heads` key/value heads (module docs); `fill` draws the new rows.
pub fn add_heads(w: &Weights, heads: usize, kv_heads: usize, fill: Fill) -> Result<Weights> {
    let c = &w.config;
    let (old_heads, old_kv) = (c.num_attention_heads, c.kv_heads());
    check((old_heads, old_kv), (heads, kv_heads))?;
    let hd = c.head_size() as i64;
    let std = c.initializer_range;
    let (group, new_group) = (old_heads / old_kv, heads / kv_heads);
    let copies = group.div_ceil(new_group);
    // Where each new query head comes from: Some(old index) or None (new).
    let mut query_source = vec![None; heads];
    for k in 0..old_kv {
        for i in 0..group {
            query_source[k * copies * new_group + i] = Some(k * group + i);
        }
    }
    let kv_source = |new: usize| (new < old_kv * copies).then(|| new / copies);
    let config = edited(c, |n| {
        n.num_attention_heads = heads;
        n.num_key_value_heads = Some(kv_heads);
        keep_head_size(n, hd as usize);
    })?;
    let mut tensors = w.shallow_tensors();
    for l in 0..c.num_hidden_layers {
        let rows = |part: &str, sources: &[Option<usize>]| -> Tensor {
            let old = w.layer(l, part);
            let h = old.size()[1];
            let blocks: Vec<Tensor> = sources
                .iter()
                .enumerate()
                .map(|(new, source)| match source {
                    Some(j) => old.narrow(0, *j as i64 * hd, hd),
                    None => fill.fresh(&format!("{}/head{new}", layer_name(l, part)), &[hd, h], std),
                })
                .collect();
            Tensor::cat(&blocks, 0)
        };
        let kv_sources: Vec<Option<usize>> = (0..kv_heads).map(kv_source).collect();
        tensors.insert(layer_name(l, "self_attn.q_proj"), rows("self_attn.q_proj", &query_source));
        tensors.insert(layer_name(l, "self_attn.k_proj"), rows("self_attn.k_proj", &kv_sources));
        tensors.insert(layer_name(l, "self_attn.v_proj"), rows("self_attn.v_proj", &kv_sources));
        let o = w.layer(l, "self_attn.o_proj");
        let h = o.size()[0];
        let columns: Vec<Tensor> = query_source
            .iter()
            .map(|source| match source {
                Some(j) => o.narrow(1, *j as i64 * hd, hd),
                None => Tensor::zeros([h, hd], (Kind::Float, o.device())),
            })
            .collect();
        tensors.insert(layer_name(l, "self_attn.o_proj"), Tensor::cat(&columns, 1));
    }
    Weights::new(config, tensors)
}
