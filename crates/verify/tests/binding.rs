//! The links that bind a worker's chain to the round (start = θ_r − decay · residual) and to its upload
//! (upload = codec(θ_r − w(end))): an honest worker's states satisfy both, bit for bit; a different start,
//! a different residual, or an upload that is not the compression of the end state each fail.

use agora_diloco::codec::{self, Codec, CompressionConfig};
use agora_diloco::sync::{pseudo_gradient, start_from_global};
use agora_diloco::tensors::{model_weights, param_specs};
use agora_model::{preset, Llama};
use agora_train::{TrainConfig, Trainer};
use agora_verify::binding::{self, Round};
use agora_verify::chain;
use std::collections::BTreeMap;
use tch::{Device, Tensor};

fn trainer_at(config: &agora_model::LlamaConfig, weights: &[Tensor]) -> Trainer {
    let trainer = Trainer::new(Llama::zeros(config, Device::Cpu), TrainConfig::default()).unwrap();
    agora_diloco::tensors::load_weights(&trainer.model, weights);
    trainer
}

#[test]
fn honest_links_hold_and_lies_are_caught() {
    let config = preset("tiny", Some(300)).unwrap();
    let specs = param_specs(&config);
    let global = model_weights(&Llama::new(&config, Device::Cpu, 1));
    let all: Vec<usize> = (0..specs.len()).collect();
    for feedback in [false, true] {
        let compression = CompressionConfig {
            codec: Codec::Int8,
            error_feedback: feedback,
            feedback_decay: 0.5,
            ..CompressionConfig::default()
        };
        let links =
            Round { compression: &compression, specs: &specs, fragment: 0, fragment_tensors: &all, global: &global };
        // The residual the worker starts from (small values), and its start weights.
        let residual: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| (0..s.shape.iter().product::<usize>()).map(|i| ((i % 13) as f32 - 6.0) * 1e-4).collect())
            .collect();
        let start: Vec<Tensor> = global
            .iter()
            .zip(&residual)
            .map(|(g, r)| start_from_global(g, feedback.then_some(r.as_slice()), 0.5))
            .collect();
        let residual_bytes = if feedback { binding::encode_residual(&specs, &residual) } else { Vec::new() };
        let commitment = feedback.then(|| binding::residual_commitment(&residual_bytes));
        let s0 = chain::encode_state(&trainer_at(&config, &start), &specs);
        binding::check_start(&links, &s0, &residual_bytes, commitment).unwrap();

        // A start that is not the round's weights (e.g. another round's, or trained before the round).
        let moved: Vec<Tensor> = start.iter().map(|t| t + 1e-3).collect();
        let lie = chain::encode_state(&trainer_at(&config, &moved), &specs);
        assert!(binding::check_start(&links, &lie, &residual_bytes, commitment)
            .unwrap_err()
            .contains("global weights"));
        if feedback {
            // A residual that is not the committed one.
            let doubled: Vec<Vec<f32>> = residual.iter().map(|r| r.iter().map(|v| v * 2.0).collect()).collect();
            let other = binding::encode_residual(&specs, &doubled);
            assert!(binding::check_start(&links, &s0, &other, commitment).unwrap_err().contains("committed"));
            assert!(binding::check_start(&links, &s0, &residual_bytes, None).is_err());
        }

        // The end: the worker's upload is the compression of θ_r − w(end).
        let end: Vec<Tensor> = start.iter().map(|t| t * 0.999).collect();
        let s_end = chain::encode_state(&trainer_at(&config, &end), &specs);
        let delta = pseudo_gradient(&all, &specs, &global, &end);
        let meta = BTreeMap::from([("agora.round".to_string(), "0".to_string())]);
        let (payload, _) = codec::compress(&compression, 0, &specs, &delta, None, &meta);
        binding::check_end(&links, &s_end, &payload).unwrap();
        // Anything else (scaled, another worker's, trained further than committed) is a lie.
        let scaled: Vec<Vec<f32>> = delta.iter().map(|d| d.iter().map(|v| v * 100.0).collect()).collect();
        let (lie, _) = codec::compress(&compression, 0, &specs, &scaled, None, &meta);
        assert!(binding::check_end(&links, &s_end, &lie).unwrap_err().contains("compression"));
        assert!(binding::check_end(&links, &s0, &payload).is_err());
    }
}

#[test]
fn proof_framing_round_trips_and_refuses_garbage() {
    assert_eq!(binding::proof_boundaries(0, 4), vec![0, 1, 4]);
    assert_eq!(binding::proof_boundaries(2, 4), vec![0, 2, 3, 4]);
    assert_eq!(binding::proof_boundaries(3, 4), vec![0, 3, 4]);
    assert_eq!(binding::proof_boundaries(0, 1), vec![0, 1]);
    let body = binding::encode_proof(&[(0, b"aa"), (3, b"bbb")], b"r");
    let proof = binding::parse_proof(&body).unwrap();
    assert_eq!(proof.state(3), Some(&b"bbb"[..]));
    assert_eq!(proof.state(1), None);
    assert_eq!(proof.residual, b"r");
    assert!(binding::parse_proof(&body[..body.len() - 1]).is_err());
    let mut extra = body.clone();
    extra.push(0);
    assert!(binding::parse_proof(&extra).is_err());
    assert!(binding::parse_proof(&binding::encode_proof(&[(1, b"a"), (1, b"b")], b"")).is_err(), "a boundary twice");
    let mut huge = body.clone();
    huge[..4].copy_from_slice(&9u32.to_le_bytes());
    assert!(binding::parse_proof(&huge).is_err());
}
