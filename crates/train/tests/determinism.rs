//! The inner loop's contract: same inputs → bit-identical run; resume → the uninterrupted run.

use agora_data::{prepare, train_bpe, Shard, Tokenizer};
use agora_model::{preset, Llama};
use agora_train::checkpoint::{self, TrainingState, SAMPLER};
use agora_train::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::Device;

fn shakespeare() -> PathBuf {
    let p = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()))
        .join("../../../shared/data/tinyshakespeare.txt");
    assert!(p.is_file(), "{} is missing: tests need ../shared/data/tinyshakespeare.txt", p.display());
    p
}

/// Tokenizer and shards shared by the tests of this file (built once).
fn data() -> &'static (Tokenizer, Shard, Shard, tempfile::TempDir) {
    static DATA: OnceLock<(Tokenizer, Shard, Shard, tempfile::TempDir)> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tok = train_bpe(&[shakespeare()], 512).unwrap();
        let report = prepare(&[shakespeare()], &tok, dir.path(), 0.1).unwrap();
        let train = Shard::open(&report.train_path).unwrap();
        let val = Shard::open(&report.val_path).unwrap();
        (tok, train, val, dir)
    })
}

fn config() -> TrainConfig {
    TrainConfig { seed: 11, steps: 8, batch_size: 4, seq_len: 64, grad_accum: 2, warmup_steps: 2, ..Default::default() }
}

fn new_trainer() -> Trainer {
    tch::set_num_threads(2);
    let mut model_config = preset("tiny", Some(data().0.vocab_size())).unwrap();
    model_config.num_hidden_layers = 2;
    Trainer::new(Llama::new(&model_config, Device::Cpu, 5), config()).unwrap()
}

fn run(trainer: &mut Trainer, steps: u64) -> Vec<f64> {
    (0..steps).map(|_| trainer.train_step(&data().1).unwrap().loss).collect()
}

fn assert_same_weights(a: &Trainer, b: &Trainer) {
    for ((name, x), (_, y)) in a.model.parameters().iter().zip(b.model.parameters()) {
        assert!(x.equal(y), "{name} differs");
    }
    for (x, y) in a.optimizer.exp_avg_sq.iter().zip(&b.optimizer.exp_avg_sq) {
        assert!(x.equal(y), "optimizer moments differ");
    }
}

#[test]
fn same_seed_and_data_give_bit_identical_runs() {
    let (mut a, mut b) = (new_trainer(), new_trainer());
    let (la, lb) = (run(&mut a, 6), run(&mut b, 6));
    assert_eq!(la.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), lb.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
    assert_same_weights(&a, &b);
    assert!(la[5] < la[0], "loss did not fall: {la:?}");
}

#[test]
fn resuming_from_a_checkpoint_continues_bit_identically() {
    let mut straight = new_trainer();
    let straight_losses = run(&mut straight, 6);

    let mut first = new_trainer();
    let mut losses = run(&mut first, 3);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let (tok, train, val, _) = data();
    let state = TrainingState {
        format: 1,
        step: first.step(),
        train: first.config.clone(),
        tokenizer_hash: tok.hash_hex(),
        train_shard: train.content_hash_hex(),
        val_shard: val.content_hash_hex(),
        threads: 2,
        sampler: SAMPLER.into(),
        last_loss: losses.last().copied(),
        last_val_loss: None,
        data_dir: None,
    };
    checkpoint::save(&ckpt, &first, tok, &state).unwrap();
    // Save twice: the second save must replace the first cleanly.
    checkpoint::save(&ckpt, &first, tok, &state).unwrap();
    drop(first);

    let (mut resumed, state) = checkpoint::load(&ckpt, Device::Cpu).unwrap();
    assert_eq!(state.step, 3);
    losses.extend(run(&mut resumed, 3));
    let bits = |v: &[f64]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&straight_losses), "resumed {losses:?} vs straight {straight_losses:?}");
    assert_same_weights(&resumed, &straight);
}

#[test]
fn validation_loss_is_deterministic_and_falls_with_training() {
    let mut t = new_trainer();
    let before = t.evaluate(&data().2).unwrap();
    assert_eq!(before.to_bits(), t.evaluate(&data().2).unwrap().to_bits());
    run(&mut t, 8);
    let after = t.evaluate(&data().2).unwrap();
    assert!(after < before - 0.3, "validation loss {before} → {after}");
}
