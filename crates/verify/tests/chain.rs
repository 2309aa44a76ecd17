//! The hash chain and its spot check: an honest segment re-runs bit for bit; states from other data,
//! states that skipped the work, and proofs that are not the committed states all fail.

use agora_data::Shard;
use agora_diloco::tensors::param_specs;
use agora_diloco::train_steps;
use agora_model::{preset, Llama};
use agora_protocol::hash_bytes;
use agora_train::{TrainConfig, Trainer};
use agora_verify::chain::{self, segment_bounds, Segment};
use tch::Device;

const STEPS: u64 = 8;
const SEGMENTS: u64 = 4;

fn setup() -> (agora_model::LlamaConfig, TrainConfig, Shard) {
    let config = preset("tiny", Some(300)).unwrap();
    let train = TrainConfig { batch_size: 2, seq_len: 16, steps: 100, warmup_steps: 2, ..TrainConfig::default() };
    // A unit of exactly STEPS batches of 2 windows of 17 tokens.
    let tokens: Vec<u32> = (0..STEPS as usize * 2 * 17).map(|i| ((i * 7919) % 300) as u32).collect();
    (config, train, Shard::from_tokens(tokens, [1; 32], 300).unwrap())
}

/// Trains a whole round on `data` and returns the encoded state at every segment boundary.
fn chain_of(config: &agora_model::LlamaConfig, train: &TrainConfig, data: &Shard) -> Vec<Vec<u8>> {
    let specs = param_specs(config);
    let mut trainer = Trainer::new(Llama::new(config, Device::Cpu, 5), train.clone()).unwrap();
    let bounds = segment_bounds(STEPS, SEGMENTS);
    let mut states = vec![chain::encode_state(&trainer, &specs)];
    for w in bounds.windows(2) {
        train_steps(&mut trainer, data, 10, STEPS, w[0]..w[1], |_, _| {}).unwrap();
        states.push(chain::encode_state(&trainer, &specs));
    }
    states
}

/// Segment `k` of `bounds` of the round `setup` describes (its schedule position 10, STEPS steps).
fn segment_of<'a>(
    model: &'a agora_model::LlamaConfig,
    train: &'a TrainConfig,
    specs: &'a [agora_protocol::TensorSpec],
    unit: &'a Shard,
    bounds: &[u64],
    k: usize,
    merge: Option<chain::Merge<'a>>,
) -> Segment<'a> {
    Segment { model, train, specs, unit, first_step: 10, steps: STEPS, from: bounds[k], to: bounds[k + 1], merge }
}

#[test]
fn spot_checks_reproduce_honest_segments_and_catch_the_rest() {
    tch::set_num_threads(1);
    let (config, train, unit) = setup();
    let specs = param_specs(&config);
    let states = chain_of(&config, &train, &unit);
    assert_eq!(states.len(), SEGMENTS as usize + 1);
    let hashes: Vec<_> = states.iter().map(|s| hash_bytes(s)).collect();
    let meta = std::collections::BTreeMap::from([(chain::CHAIN_META.to_string(), chain::chain_to_meta(&hashes))]);
    assert_eq!(chain::parse_chain(&meta, SEGMENTS).unwrap(), hashes);
    assert!(chain::parse_chain(&meta, SEGMENTS + 1).is_err());

    let bounds = segment_bounds(STEPS, SEGMENTS);
    let segment = |k: usize| segment_of(&config, &train, &specs, &unit, &bounds, k, None);
    for k in 0..SEGMENTS as usize {
        let check = chain::recompute(&segment(k), &states[k], &states[k + 1], 0.01).unwrap();
        assert!(check.passed && check.exact, "segment {k}: {check:?}");
    }

    // Trained on other data (the unit reversed): its own chain is consistent, but not with the assignment.
    let mut reversed = unit.tokens().to_vec();
    reversed.reverse();
    let other = chain_of(&config, &train, &Shard::from_tokens(reversed, [1; 32], 300).unwrap());
    let check = chain::recompute(&segment(1), &other[1], &other[2], 0.01).unwrap();
    assert!(!check.passed && check.update_error > 0.1, "{check:?}");

    // Skipped the work: the "end" state is the start state.
    let check = chain::recompute(&segment(2), &states[2], &states[2], 0.01).unwrap();
    assert!(!check.passed, "{check:?}");

    // Perturbed end state (committed to a state it never reached).
    let mut lie = chain::decode_state(&states[3], &specs).unwrap();
    lie.weights[0].data[0] += 1e-3;
    let (tensors, meta): (Vec<_>, _) = {
        let mut t: Vec<agora_protocol::NamedTensor> = Vec::new();
        for (p, part) in [("w", &lie.weights), ("m", &lie.exp_avg), ("v", &lie.exp_avg_sq)] {
            t.extend(part.iter().map(|x| agora_protocol::NamedTensor { name: format!("{p}.{}", x.name), ..x.clone() }));
        }
        (t, std::collections::BTreeMap::from([("agora.step".to_string(), lie.step.to_string())]))
    };
    let forged = agora_protocol::encode_tensors(&tensors, &meta);
    let check = chain::recompute(&segment(2), &states[2], &forged, 0.01).unwrap();
    assert!(!check.exact, "{check:?}");

    assert!(chain::decode_state(b"garbage", &specs).is_err());
}

/// Streaming DiLoCo's overlap: the merge point τ is a boundary of its own, and the segment that ends there
/// re-runs with the late update (the round's global weights minus the chain's start); a worker that skipped
/// the update, applied it by another α, or took the global weights whole fails that segment.
#[test]
fn overlap_segments_re_run_the_late_merge() {
    tch::set_num_threads(1);
    assert_eq!(chain::chain_bounds(8, 4, 3), vec![0, 2, 3, 4, 6, 8], "τ = 3 becomes a boundary");
    assert_eq!(chain::chain_bounds(8, 4, 4), vec![0, 2, 4, 6, 8], "τ on a boundary adds none");
    assert_eq!(chain::chain_bounds(8, 4, 0), segment_bounds(8, 4), "no overlap, no extra boundary");
    assert_eq!(chain::chain_bounds(8, 1, 3), vec![0, 3, 8]);

    let (config, train, unit) = setup();
    let specs = param_specs(&config);
    let tau = 3;
    let bounds = chain::chain_bounds(STEPS, SEGMENTS, tau);
    // The round's global weights: another initialisation. The previous round synchronised tensors 0 and 2.
    let global = agora_diloco::tensors::model_weights(&Llama::new(&config, Device::Cpu, 9));
    let tensors = vec![0usize, 2];
    let alpha = 0.5;
    // The worker (started from its own weights): train to τ, apply the late update, commit, train on.
    let start_model = Llama::new(&config, Device::Cpu, 5);
    let start = agora_diloco::tensors::model_weights(&start_model);
    let run = |merge: &dyn Fn(&mut Vec<tch::Tensor>)| -> Vec<Vec<u8>> {
        let mut trainer = Trainer::new(Llama::new(&config, Device::Cpu, 5), train.clone()).unwrap();
        let mut states = vec![chain::encode_state(&trainer, &specs)];
        for w in bounds.windows(2) {
            train_steps(&mut trainer, &unit, 10, STEPS, w[0]..w[1], |_, _| {}).unwrap();
            if w[1] == tau {
                let mut weights = agora_diloco::tensors::model_weights(&trainer.model);
                merge(&mut weights);
                agora_diloco::tensors::load_weights(&trainer.model, &weights);
            }
            states.push(chain::encode_state(&trainer, &specs));
        }
        states
    };
    let (g, s, t) = (&global, &start, &tensors);
    let late = |a: f64| move |w: &mut Vec<tch::Tensor>| agora_diloco::overlap::apply_late(w, g, s, t, a);
    let segment = |k: usize| {
        let merge = chain::Merge { at: tau, alpha, global: &global, start: &start, tensors: tensors.clone() };
        segment_of(&config, &train, &specs, &unit, &bounds, k, Some(merge))
    };
    let honest = run(&late(alpha));
    for k in 0..bounds.len() - 1 {
        let check = chain::recompute(&segment(k), &honest[k], &honest[k + 1], 0.01).unwrap();
        assert!(check.passed && check.exact, "segment {k}: {check:?}");
    }
    let merging = bounds.iter().position(|&b| b == tau).unwrap() - 1;
    let whole = |w: &mut Vec<tch::Tensor>| {
        for &i in &tensors {
            w[i] = global[i].copy();
        }
    };
    for (what, states) in [
        ("no update", run(&|_| {})),
        ("α 0", run(&late(0.0))),
        ("α 0.9", run(&late(0.9))),
        ("global whole", run(&whole)),
    ] {
        let check = chain::recompute(&segment(merging), &states[merging], &states[merging + 1], 0.01).unwrap();
        assert!(!check.passed, "{what}: {check:?}");
    }
}

proptest::proptest! {
    /// Proof bodies come from the network: any bytes are an error or a pair of slices, never a panic, and
    /// any state bytes either decode to exactly the model's tensors or are refused.
    #[test]
    fn proofs_from_untrusted_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        if let Ok(proof) = agora_verify::binding::parse_proof(&bytes) {
            let carried: usize = proof.states.iter().map(|(_, s)| s.len() + 16).sum::<usize>() + proof.residual.len() + 12;
            proptest::prop_assert_eq!(carried, bytes.len());
        }
        let specs = param_specs(&preset("tiny", Some(300)).unwrap());
        proptest::prop_assert!(chain::decode_state(&bytes, &specs).is_err());
    }
}
