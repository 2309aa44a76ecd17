//! A worker's state between rounds: error feedback kept in its weights, and Streaming DiLoCo's fragments.

use agora_diloco::codec::{self, Codec, CompressionConfig, Expected, Values};
use agora_diloco::tensors::from_named;
use agora_diloco::{FragmentPlan, SyncState};
use agora_protocol::TensorSpec;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec { name: "model.embed_tokens.weight".into(), shape: vec![8, 16] },
        TensorSpec { name: "model.layers.0.mlp.up_proj.weight".into(), shape: vec![16, 16] },
        TensorSpec { name: "model.layers.1.mlp.up_proj.weight".into(), shape: vec![16, 16] },
        TensorSpec { name: "model.norm.weight".into(), shape: vec![16] },
    ]
}

fn random(seed: i64) -> Vec<Tensor> {
    tch::manual_seed(seed);
    specs()
        .iter()
        .map(|s| Tensor::randn(s.shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), (Kind::Float, Device::Cpu)))
        .collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// Decodes an upload and applies it as plain averaging with one worker would: θ ← θ − mean(sent).
fn apply(config: &CompressionConfig, plan: &FragmentPlan, fragment: usize, payload: &[u8], global: &mut [Tensor]) {
    let specs = plan.specs(&specs(), fragment);
    let parsed = codec::parse(payload, Expected { config, fragment, specs: &specs }).unwrap();
    let sent = from_named(&codec::decode(config, &specs, &parsed), Device::Cpu);
    for (i, s) in plan.tensors(fragment).into_iter().zip(sent) {
        global[i] = &global[i] - s;
    }
}

/// With one worker and outer averaging at lr 1, a worker under error feedback loses nothing to compression:
/// its next round starts exactly where its own training ended, however little the payload carried.
#[test]
fn error_feedback_in_the_weights_resumes_the_workers_own_model() {
    let config = CompressionConfig {
        codec: Codec::TopK,
        keep: 1,
        chunk: 16,
        values: Values::TwoBit,
        error_feedback: true,
        feedback_decay: 1.0,
        ..Default::default()
    };
    let plan = FragmentPlan::new(&specs(), 2, 1).unwrap();
    let mut sync = SyncState::new(&specs(), &config);
    let mut global = random(1);
    for round in 0..5u64 {
        let start = sync.start_weights(&config, &plan, round, &global);
        // "Training": any displacement.
        let local: Vec<Tensor> = start.iter().zip(random(100 + round as i64)).map(|(s, d)| s - d * 0.01).collect();
        let upload = sync.prepare_upload(
            &config,
            &plan,
            &specs(),
            round,
            &global,
            local.iter().map(|t| t.copy()).collect(),
            &BTreeMap::new(),
        );
        assert!(upload.payload.len() * 5 < upload.fp32_bytes as usize, "the payload is compressed");
        apply(&config, &plan, 0, &upload.payload, &mut global);
        sync.accepted(&plan, upload.fragment, upload.residual);
        let next = sync.start_weights(&config, &plan, round + 1, &global);
        assert!(max_diff(&next, &local) < 1e-5, "round {round}: the next start is the worker's own weights");
        // start_weights is called once per round; undo the bookkeeping of this probe.
        sync.loaded.iter_mut().for_each(|l| *l = Some(round));
    }
}

/// A refused upload leaves the residual as it was: the next round starts from global − the old residual.
#[test]
fn a_refused_upload_keeps_the_previous_residual() {
    let config = CompressionConfig { codec: Codec::Int4, error_feedback: true, ..Default::default() };
    let plan = FragmentPlan::new(&specs(), 2, 1).unwrap();
    let mut sync = SyncState::new(&specs(), &config);
    let global = random(2);
    let start = sync.start_weights(&config, &plan, 0, &global);
    assert!(max_diff(&start, &global) == 0.0, "no residual yet");
    let local: Vec<Tensor> = start.iter().map(|s| s - 0.3).collect();
    let upload = sync.prepare_upload(&config, &plan, &specs(), 0, &global, local, &BTreeMap::new());
    assert!(upload.residual.iter().flatten().any(|v| *v != 0.0), "int4 drops something");
    // Refused: `accepted` is not called.
    let again = sync.start_weights(&config, &plan, 1, &global);
    assert!(max_diff(&again, &global) == 0.0);
}

/// With two fragments, round r sends only fragment r mod 2, and the other fragment keeps training from the
/// worker's own weights until its turn.
#[test]
fn fragments_alternate_and_unsynchronised_ones_continue_locally() {
    let config = CompressionConfig { fragments: 2, ..Default::default() };
    let plan = FragmentPlan::new(&specs(), 2, 2).unwrap();
    assert_eq!(plan.tensors(0), vec![0, 1]);
    assert_eq!(plan.tensors(1), vec![2, 3]);
    let mut sync = SyncState::new(&specs(), &config);
    let mut global = random(3);
    let mut previous_local: Option<Vec<Tensor>> = None;
    for round in 0..4u64 {
        let start = sync.start_weights(&config, &plan, round, &global);
        if let Some(prev) = &previous_local {
            let synced_last = plan.synced_in(round - 1);
            for i in 0..4 {
                let expected = if plan.fragment_of(i) == synced_last { &global[i] } else { &prev[i] };
                assert!(max_diff(&[start[i].copy()], &[expected.copy()]) == 0.0, "round {round}, tensor {i}");
            }
        }
        let local: Vec<Tensor> = start.iter().map(|s| s - 0.1).collect();
        let upload = sync.prepare_upload(
            &config,
            &plan,
            &specs(),
            round,
            &global,
            local.iter().map(|t| t.copy()).collect(),
            &BTreeMap::new(),
        );
        assert_eq!(upload.fragment, (round % 2) as usize);
        let fragment_elements: usize =
            plan.specs(&specs(), upload.fragment).iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert_eq!(upload.fp32_bytes as usize, 4 * fragment_elements);
        apply(&config, &plan, upload.fragment, &upload.payload, &mut global);
        previous_local = Some(local);
    }
}

/// Streaming DiLoCo's overlap: an overlapped round starts from the worker's own weights (the previous
/// round's outer step has not landed), and the late merge applies that round's update to its fragment only.
#[test]
fn an_overlapped_round_starts_local_and_merges_only_the_late_fragment() {
    let config = CompressionConfig { fragments: 2, overlap_steps: 2, ..Default::default() };
    let plan = FragmentPlan::new(&specs(), 2, 2).unwrap();
    let mut sync = SyncState::new(&specs(), &config);
    assert!(sync.keeps_local, "an overlap run keeps its own weights");
    let mut global = random(1);
    let start = sync.overlapped_start(&config, &plan, 0, &global);
    assert_eq!(max_diff(&start, &global), 0.0, "round 0 starts from the global weights");
    let local: Vec<Tensor> = start.iter().zip(random(2)).map(|(s, d)| s - d * 0.01).collect();
    let upload = sync.prepare_upload(&config, &plan, &specs(), 0, &global, local, &BTreeMap::new());
    assert_eq!(upload.fragment, 0);
    apply(&config, &plan, 0, &upload.payload, &mut global);
    sync.accepted(&plan, upload.fragment, upload.residual);
    let kept: Vec<Tensor> = sync.local.as_ref().unwrap().iter().map(|t| t.copy()).collect();
    let start = sync.overlapped_start(&config, &plan, 1, &global);
    assert_eq!(max_diff(&start, &kept), 0.0, "round 1 starts from the worker's own weights");
    // τ steps later round 0's outer step lands: fragment 0 (embedding, layer 0) moves by 0.75 of the update
    // (global − start), fragment 1 is kept.
    let mut weights: Vec<Tensor> = start.iter().zip(random(3)).map(|(s, d)| s - d * 0.01).collect();
    let before: Vec<Tensor> = weights.iter().map(|t| t.copy()).collect();
    sync.merge_late(&plan, 1, &global, &start, &mut weights, 0.25);
    for i in 0..specs().len() {
        let expected =
            if plan.fragment_of(i) == 0 { &before[i] + (&global[i] - &start[i]) * 0.75 } else { before[i].copy() };
        let diff = (&weights[i] - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "tensor {i}: off by {diff}");
    }
    assert_eq!(sync.loaded[0], Some(1));
    // With one fragment and α = 0 a merge right at the start (no local steps) is a restart from the global
    // weights, and a round that started from the global weights is left as it is.
    let one = FragmentPlan::new(&specs(), 2, 1).unwrap();
    let mut whole = SyncState::new(&specs(), &CompressionConfig { overlap_steps: 1, ..Default::default() });
    let own = random(4);
    let mut w: Vec<Tensor> = own.iter().map(|t| t.copy()).collect();
    whole.merge_late(&one, 3, &global, &own, &mut w, 0.0);
    assert!(max_diff(&w, &global) < 1e-6);
    let mut w: Vec<Tensor> = own.iter().map(|t| t.copy()).collect();
    whole.merge_late(&one, 3, &own, &own, &mut w, 0.0);
    assert_eq!(max_diff(&w, &own), 0.0);
}
