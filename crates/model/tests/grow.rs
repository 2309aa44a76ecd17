//! Growth operators: the grown model computes the original's logits (max |Δ| ≤ 1e-5, fp32), breaks the
//! copies' symmetry, and refuses what no exact operator can do.

use agora_model::grow::{
    add_heads, grow, grow_companion, insert_layers, plan, spread_positions, stack_layers, untie_head, widen_ffn,
    widen_hidden, DepthGrowth, FfnGrowth, Fill, GrowthOptions, HiddenGrowth, Weights,
};

fn w_seed(seed: u64) -> Fill {
    Fill::Weights { seed }
}
use agora_model::{load_pretrained, preset, save_pretrained, Llama, LlamaConfig};
use tch::{Device, Kind, Tensor};

const VOCAB: usize = 61;

/// A small GQA model (hidden 32, 4 heads of 8, 2 kv heads, 3 layers) whose weights look trained rather
/// than freshly initialised: larger matrices, RMSNorm gains away from 1, so that a wrong scale anywhere
/// shows in the logits.
fn source(tied: bool, seed: u64) -> Weights {
    let mut c = LlamaConfig::new(VOCAB, 32, 48, 3, 4, 2, 64, tied);
    c.initializer_range = 0.2;
    let model = Llama::new(&c, Device::Cpu, seed);
    let mut w = Weights::of(&model);
    for (name, t) in w.tensors.iter_mut() {
        if name.ends_with("norm.weight") {
            let n = t.size()[0];
            let gains: Vec<f32> =
                (0..n).map(|i| 0.6 + 0.8 * (((i * 37 + seed as i64 * 11) % 17) as f32 / 16.0)).collect();
            *t = Tensor::from_slice(&gains);
        }
    }
    w.config.initializer_range = 0.02;
    w
}

fn tokens() -> Tensor {
    Tensor::from_slice(&(0..34).map(|i| (i * 29 + 7) % VOCAB as i64).collect::<Vec<i64>>()).view([2, 17])
}

fn logits(w: &Weights) -> Tensor {
    let model = w.deep_copy().into_model(Device::Cpu).unwrap();
    tch::no_grad(|| model.forward(&tokens()))
}

fn max_diff(a: &Weights, b: &Weights) -> f64 {
    (logits(a) - logits(b)).abs().max().double_value(&[])
}

fn assert_exact(original: &Weights, grown: &Weights, what: &str) {
    let diff = max_diff(original, grown);
    let scale = logits(original).abs().max().double_value(&[]);
    println!("{what}: max |Δ logits| {diff:.2e}, max |logit| {scale:.2}");
    assert!(diff <= 1e-5, "{what}: logits differ by {diff}");
    // The test can fail: the original's logits are far from zero and from each other.
    assert!(logits(original).abs().max().double_value(&[]) > 0.5, "{what}: a degenerate source model");
}

#[test]
fn inserted_blocks_are_the_identity_at_any_position() {
    for tied in [true, false] {
        let w = source(tied, 1);
        for positions in [vec![0], vec![3], vec![1, 1, 2], spread_positions(3, 5)] {
            let grown = insert_layers(&w, &positions, w_seed(9)).unwrap();
            assert_eq!(grown.config.num_hidden_layers, 3 + positions.len());
            assert_exact(&w, &grown, &format!("depth at {positions:?}, tied {tied}"));
        }
    }
    assert_eq!(spread_positions(12, 10), vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert_eq!(spread_positions(2, 3), vec![1, 1, 2]);
    assert!(insert_layers(&source(false, 1), &[4], w_seed(0)).unwrap_err().to_string().contains("past the 3 layers"));
}

#[test]
fn the_test_notices_a_block_that_writes() {
    // A new block with a nonzero o_proj is not the identity: the comparison above would fail on it.
    let w = source(false, 2);
    let mut grown = insert_layers(&w, &[1], w_seed(9)).unwrap();
    let o = grown.tensors.get_mut("model.layers.1.self_attn.o_proj.weight").unwrap();
    *o = Tensor::ones(o.size().as_slice(), (Kind::Float, Device::Cpu)) * 0.05;
    assert!(max_diff(&w, &grown) > 1e-3);
}

#[test]
fn wider_ffns_are_exact_fresh_or_split() {
    for tied in [true, false] {
        let w = source(tied, 3);
        for (units, how) in [(80, FfnGrowth::Fresh), (80, FfnGrowth::Split), (130, FfnGrowth::Split)] {
            let grown = widen_ffn(&w, units, how, w_seed(4)).unwrap();
            assert_eq!(grown.tensors["model.layers.0.mlp.down_proj.weight"].size(), [32, units as i64]);
            assert_exact(&w, &grown, &format!("ffn → {units} {how:?}, tied {tied}"));
        }
    }
}

#[test]
fn more_heads_keep_every_gqa_group_exact() {
    for tied in [true, false] {
        let w = source(tied, 5);
        // (4, 2): groups of 2. Same group size; larger groups; groups of 1 (each kv head copied twice).
        for (heads, kv) in [(6, 3), (8, 2), (6, 6), (10, 5)] {
            let grown = add_heads(&w, heads, kv, w_seed(6)).unwrap();
            assert_eq!((grown.config.num_attention_heads, grown.config.kv_heads()), (heads, kv));
            assert_eq!(grown.config.head_size(), 8, "the head size is kept");
            assert_exact(&w, &grown, &format!("heads → {heads}/{kv}, tied {tied}"));
        }
    }
    // Groups of 4 → 3 need each kv head twice; from (8, 2) that is 4 kv heads, not 3.
    let mut c = LlamaConfig::new(VOCAB, 64, 48, 2, 8, 2, 64, false);
    c.initializer_range = 0.2;
    let w = Weights::of(&Llama::new(&c, Device::Cpu, 7));
    let err = add_heads(&w, 9, 3, w_seed(0)).unwrap_err().to_string();
    assert!(err.contains("copied 2×") && err.contains("target has 3"), "{err}");
    let grown = add_heads(&w, 12, 4, w_seed(0)).unwrap();
    assert_exact(&w, &grown, "heads 8/2 → 12/4");
}

#[test]
fn a_wider_residual_stream_is_exact_padded_or_tiled() {
    for tied in [true, false] {
        let w = source(tied, 8);
        for (hidden, how) in
            [(48, HiddenGrowth::Pad), (40, HiddenGrowth::Pad), (64, HiddenGrowth::Tile), (96, HiddenGrowth::Tile)]
        {
            let grown = widen_hidden(&w, hidden, how, w_seed(2)).unwrap();
            assert_eq!(grown.config.hidden_size, hidden);
            assert_eq!(grown.config.head_size(), 8);
            assert_eq!(grown.config.rms_norm_eps, w.config.rms_norm_eps, "ε is unchanged");
            assert_exact(&w, &grown, &format!("hidden → {hidden} {how:?}, tied {tied}"));
        }
        let err = widen_hidden(&w, 48, HiddenGrowth::Tile, w_seed(0)).unwrap_err().to_string();
        assert!(err.contains("multiple of the hidden size 32"), "{err}");
    }
}

#[test]
fn untying_the_head_is_exact() {
    let w = source(true, 9);
    let grown = untie_head(&w).unwrap();
    assert!(!grown.config.tie_word_embeddings);
    assert_exact(&w, &grown, "untie");
    assert!(untie_head(&grown).is_err());
}

fn bigger(tied: bool) -> LlamaConfig {
    let mut c = LlamaConfig::new(VOCAB, 48, 96, 5, 6, 3, 128, tied);
    c.initializer_range = 0.02;
    c
}

#[test]
fn grow_reaches_the_target_config_exactly_through_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    for (from_tied, to_tied) in [(true, true), (true, false), (false, false)] {
        for ffn in [FfnGrowth::Fresh, FfnGrowth::Split] {
            let w = source(from_tied, 10);
            let options = GrowthOptions { ffn, seed: 3, ..Default::default() };
            let grown = grow(&w, &bigger(to_tied), &options).unwrap();
            assert_eq!(grown.config.num_parameters(), bigger(to_tied).num_parameters());
            assert_exact(&w, &grown, &format!("grow tied {from_tied} → {to_tied}, {ffn:?}"));
            // Through a Hugging Face directory and back.
            let model = grown.deep_copy().into_model(Device::Cpu).unwrap();
            save_pretrained(&model, dir.path()).unwrap();
            let loaded = Weights::of(&load_pretrained(dir.path(), Device::Cpu).unwrap());
            assert_exact(&w, &loaded, "grown, saved and loaded");
        }
    }
    // Tiling takes 32 → 64 when the target asks for it.
    let mut to = bigger(false);
    to.hidden_size = 64;
    to.head_dim = Some(8);
    let options = GrowthOptions { hidden: HiddenGrowth::Tile, ..Default::default() };
    assert_exact(&source(false, 11), &grow(&source(false, 11), &to, &options).unwrap(), "grow with tiling");
}

#[test]
fn grow_refuses_what_no_operator_does() {
    let w = source(false, 12);
    let refuse = |edit: &dyn Fn(&mut LlamaConfig), want: &str| {
        let mut to = bigger(false);
        edit(&mut to);
        let err = grow(&w, &to, &GrowthOptions::default()).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
    };
    refuse(&|c| c.vocab_size = 64, "vocab_size differs");
    refuse(&|c| c.num_hidden_layers = 2, "num_hidden_layers shrinks");
    refuse(&|c| c.intermediate_size = 40, "intermediate_size shrinks");
    refuse(&|c| c.tie_word_embeddings = true, "cannot be tied again");
    refuse(&|c| c.head_dim = Some(16), "head size differs");
    refuse(&|c| c.rope_theta = 5e5, "rope_theta differs");
    refuse(&|c| c.max_position_embeddings = 32, "max_position_embeddings shrinks");
    refuse(&|c| c.num_key_value_heads = Some(1), "num_key_value_heads shrinks");
}

#[test]
fn stacking_is_not_exact_but_copies_the_stack() {
    let w = source(false, 13);
    let stacked = stack_layers(&w, 7).unwrap();
    assert_eq!(stacked.config.num_hidden_layers, 7);
    for l in 0..7 {
        let (a, b) =
            (format!("model.layers.{l}.mlp.up_proj.weight"), format!("model.layers.{}.mlp.up_proj.weight", l % 3));
        assert!(stacked.tensors[&a].equal(&w.tensors[&b]));
    }
    assert!(max_diff(&w, &stacked) > 1e-3, "G_stack changes the function");
    let options = GrowthOptions { depth: DepthGrowth::Stack, ..Default::default() };
    let steps = plan(&w.config, &bigger(false), &options).unwrap();
    assert!(steps.iter().any(|s| !s.is_exact()));
}

/// The gradient of `name` in a model of `w` for one batch.
fn gradients(w: &Weights) -> Vec<(String, Tensor)> {
    let model = w.deep_copy().into_model(Device::Cpu).unwrap();
    let ids = tokens();
    let targets = (&ids + 1).remainder(VOCAB as i64);
    model.loss(&ids, &targets).backward();
    model.parameters().iter().map(|(n, p)| (n.clone(), p.grad().copy())).collect()
}

fn grad_of<'a>(g: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &g.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn copies_get_their_own_gradients() {
    // Split FFN units: unit 48 + j copies unit j; their gate rows must not move together.
    let w = source(false, 14);
    let g = gradients(&widen_ffn(&w, 80, FfnGrowth::Split, w_seed(1)).unwrap());
    let gate = grad_of(&g, "model.layers.1.mlp.gate_proj.weight");
    let (original, copy) = (gate.get(5), gate.get(48 + 5));
    assert!((&original - &copy).abs().max().double_value(&[]) > 1e-6, "split units share a gradient");
    // Tiled residual stream: the copies of an embedding row get different gradients.
    let g = gradients(&widen_hidden(&w, 64, HiddenGrowth::Tile, w_seed(1)).unwrap());
    let embed = grad_of(&g, "model.embed_tokens.weight");
    let diff = (embed.narrow(1, 0, 32) - embed.narrow(1, 32, 32)).abs().max().double_value(&[]);
    assert!(diff > 1e-6, "tiled copies share a gradient");
    // Zero padding: the new residual dimensions get a gradient through the writers' zero rows.
    let g = gradients(&widen_hidden(&w, 48, HiddenGrowth::Pad, w_seed(1)).unwrap());
    let down = grad_of(&g, "model.layers.0.mlp.down_proj.weight");
    assert!(down.narrow(0, 32, 16).abs().max().double_value(&[]) > 1e-6, "padded dimensions are dead");
    // An inserted block's output projections learn at once.
    let g = gradients(&insert_layers(&w, &[1], w_seed(1)).unwrap());
    for part in ["self_attn.o_proj", "mlp.down_proj"] {
        let grad = grad_of(&g, &format!("model.layers.1.{part}.weight"));
        assert!(grad.abs().max().double_value(&[]) > 1e-6, "the new block's {part} gets no gradient");
    }
    // Copied key/value heads (groups of 2 → 1: each kv head twice) serve different query heads.
    let g = gradients(&add_heads(&w, 6, 6, w_seed(1)).unwrap());
    let k = grad_of(&g, "model.layers.0.self_attn.k_proj.weight");
    let diff = (k.narrow(0, 0, 8) - k.narrow(0, 8, 8)).abs().max().double_value(&[]);
    assert!(diff > 1e-6, "copied kv heads share a gradient");
    // New heads: their o_proj columns (zero) get a gradient.
    let g = gradients(&add_heads(&w, 6, 3, w_seed(1)).unwrap());
    let o = grad_of(&g, "model.layers.0.self_attn.o_proj.weight");
    assert!(o.narrow(1, 4 * 8, 8).abs().max().double_value(&[]) > 1e-6, "a new head is dead");
}

#[test]
fn every_step_of_the_preset_ladder_is_reachable() {
    let names = ["phase1", "phase2", "phase3", "phase4", "phase5", "phase6", "phase7"];
    for pair in names.windows(2) {
        let (from, to) = (preset(pair[0], None).unwrap(), preset(pair[1], None).unwrap());
        let steps =
            plan(&from, &to, &GrowthOptions::default()).unwrap_or_else(|e| panic!("{} → {}: {e:#}", pair[0], pair[1]));
        assert!(steps.iter().all(|s| s.is_exact()), "{} → {}: {steps:?}", pair[0], pair[1]);
        assert!(!steps.is_empty());
    }
}

#[test]
fn companions_carry_old_entries_and_start_new_ones_at_zero() {
    use std::collections::HashSet;
    let w = source(false, 15);
    // A companion whose every entry is distinct from zero (as optimizer moments are, after a few steps).
    let companion =
        Weights::new(w.config.clone(), w.tensors.iter().map(|(n, t)| (n.clone(), t.abs() + 1.0)).collect()).unwrap();
    let values = |w: &Weights| -> Vec<u32> {
        w.tensors.values().flat_map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()).map(f32::to_bits).collect()
    };
    let old: HashSet<u32> = values(&companion).into_iter().collect();
    let mut tiled = bigger(false);
    (tiled.hidden_size, tiled.head_dim) = (64, Some(8));
    for (to, ffn, hidden) in
        [(bigger(false), FfnGrowth::Fresh, HiddenGrowth::Pad), (tiled, FfnGrowth::Split, HiddenGrowth::Tile)]
    {
        let options = GrowthOptions { ffn, hidden, ..Default::default() };
        let grown = grow_companion(&companion, &to, &options).unwrap();
        let grown_weights = grow(&w, &to, &options).unwrap();
        for (name, t) in &grown.tensors {
            assert_eq!(t.size(), grown_weights.tensors[name].size(), "{name}");
        }
        let new: Vec<u32> = values(&grown);
        let zeros = new.iter().filter(|&&v| v == 0).count();
        assert!(zeros > 0, "{ffn:?}/{hidden:?}: no new entry");
        assert!(
            new.iter().all(|v| *v == 0 || old.contains(v)),
            "{ffn:?}/{hidden:?}: an entry neither carried nor zero"
        );
        let carried: HashSet<u32> = new.into_iter().filter(|&v| v != 0).collect();
        assert_eq!(carried.len(), old.len(), "{ffn:?}/{hidden:?}: an old entry was lost");
    }
}

#[test]
fn companions_sit_where_their_weights_went() {
    // For operators that move entries without rescaling them, the companion of a tensor set equals the
    // grown tensor set wherever the companion is nonzero (new entries: zero in the companion, fresh in weights).
    let w = source(true, 16);
    let c =
        Weights::new(w.config.clone(), w.tensors.iter().map(|(n, t)| (n.clone(), t.abs() + 1.0)).collect()).unwrap();
    type Op = Box<dyn Fn(&Weights, Fill) -> Weights>;
    let ops: Vec<(&str, Op)> = vec![
        ("depth", Box::new(|w, f| insert_layers(w, &[0, 2, 3], f).unwrap())),
        ("heads", Box::new(|w, f| add_heads(w, 6, 6, f).unwrap())),
        ("ffn", Box::new(|w, f| widen_ffn(w, 70, FfnGrowth::Fresh, f).unwrap())),
        ("untie", Box::new(|w, _| untie_head(w).unwrap())),
    ];
    for (what, op) in ops {
        let (moved, grown) = (op(&c, Fill::Companion), op(&c, w_seed(1)));
        for (name, m) in &moved.tensors {
            let g = &grown.tensors[name];
            let mask = m.ne(0.0);
            assert!(
                m.masked_select(&mask).equal(&g.masked_select(&mask)),
                "{what}: {name} moved elsewhere than its weights"
            );
        }
    }
}

#[test]
fn a_scaled_down_ladder_grows_exactly_phase_by_phase() {
    // The presets' head and key/value head counts (12/4 → 20/4 → 32/8 → 52/13 → 72/18), heads of 8 instead
    // of 128 and a handful of layers, grown weights and all.
    let shape = [(12, 4, 2, 64), (20, 4, 3, 112), (32, 8, 4, 176), (52, 13, 5, 288), (72, 18, 6, 448)];
    let config = |&(heads, kv, layers, ffn): &(usize, usize, usize, usize)| {
        let mut c = LlamaConfig::new(VOCAB, heads * 8, ffn, layers, heads, kv, 64, false);
        // Logits of a few units, as the other tests' (the bound is absolute; fp32 rounding scales with them).
        c.initializer_range = 0.12;
        c
    };
    let mut w = Weights::of(&Llama::new(&config(&shape[0]), Device::Cpu, 17));
    let original = w.deep_copy();
    for (k, phase) in shape.iter().enumerate().skip(1) {
        let to = config(phase);
        w = grow(&w, &to, &GrowthOptions { seed: k as u64, ..Default::default() }).unwrap();
        assert_eq!(w.config.num_parameters(), to.num_parameters());
        assert_exact(&original, &w, &format!("scaled-down phase {} → {}", k, k + 1));
    }
}
