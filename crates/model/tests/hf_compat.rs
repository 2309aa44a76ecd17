//! agora's Llama against Hugging Face `transformers`, both directions, fp32 on CPU.
//! Needs the test venv (`scripts/setup.sh --test`); `make test` provides it.

use agora_model::{load_pretrained, preset, save_pretrained, Llama};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    let python = std::env::var_os("AGORA_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/agora/venv/bin/python")
    });
    assert!(python.exists(), "{} not found: run scripts/setup.sh --test (make test does)", python.display());
    python
}

fn script() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()))
        .join("../../tests/python/hf_logits.py")
}

fn run_python(args: &[&str]) {
    let out = Command::new(python()).arg(script()).args(args).output().expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "hf_logits.py {args:?} failed:\n{text}");
}

/// A fresh model whose RMSNorm gains are not all 1: gains of exactly 1 would hide a misplaced norm weight.
fn model_with_uneven_gains(config: &agora_model::LlamaConfig, seed: u64) -> Llama {
    let model = Llama::new(config, Device::Cpu, seed);
    tch::no_grad(|| {
        for (name, p) in model.parameters() {
            if name.ends_with("norm.weight") {
                let _ = p.shallow_clone().g_add_(&(p.randn_like() * 0.1));
            }
        }
    });
    model
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn transformers_loads_agora_checkpoints_with_equal_logits() {
    tch::set_num_threads(2);
    for tied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = preset("tiny", Some(320)).unwrap();
        config.tie_word_embeddings = tied;
        config.num_hidden_layers = 2;
        config.rope_theta = 30000.0;
        let model = model_with_uneven_gains(&config, 7);
        save_pretrained(&model, dir.path()).unwrap();
        let ids = Tensor::randint(320, [2, 33], (Kind::Int64, Device::Cpu));
        let logits = tch::no_grad(|| model.forward(&ids));
        let inputs = dir.path().join("inputs.safetensors");
        Tensor::write_safetensors(&[("ids", &ids), ("logits", &logits)], &inputs).unwrap();
        run_python(&["check", "--checkpoint", dir.path().to_str().unwrap(), "--inputs", inputs.to_str().unwrap()]);
    }
}

#[test]
fn agora_loads_transformers_checkpoints_with_equal_logits() {
    tch::set_num_threads(2);
    for tied in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("hf");
        let inputs = dir.path().join("inputs.safetensors");
        let mut args = vec!["make", "--checkpoint", ckpt.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()];
        if tied {
            args.push("--tied");
        }
        run_python(&args);
        let model = load_pretrained(&ckpt, Device::Cpu).unwrap();
        assert_eq!(model.config.kv_heads(), 2);
        let data: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&inputs).unwrap().into_iter().collect();
        let logits = tch::no_grad(|| model.forward(&data["ids"]));
        let diff = max_abs_diff(&logits, &data["logits"]);
        println!("tied={tied}: max abs logit difference transformers vs agora: {diff:.3e}");
        assert!(diff <= 1e-4, "tied={tied}: logits differ by {diff}");
    }
}

#[test]
fn transformers_loads_a_grown_model_with_the_original_logits() {
    use agora_model::grow::{grow, GrowthOptions, HiddenGrowth, Weights};
    tch::set_num_threads(2);
    for (tied, hidden) in [(true, HiddenGrowth::Pad), (false, HiddenGrowth::Pad), (false, HiddenGrowth::Tile)] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = preset("tiny", Some(320)).unwrap();
        config.tie_word_embeddings = tied;
        config.num_hidden_layers = 2;
        let model = model_with_uneven_gains(&config, 8);
        // tiny cut to 2 layers (128 hidden, 4 heads / 2 kv, 384 units) → every dimension grown, untied; groups
        // of 2 → 1, so each kv head is copied (8 kv heads for 8 query heads).
        let mut to = config.clone();
        (to.hidden_size, to.num_attention_heads, to.num_key_value_heads) = (256, 8, Some(8));
        (to.intermediate_size, to.num_hidden_layers, to.tie_word_embeddings) = (768, 3, false);
        let options = GrowthOptions { hidden, seed: 5, ..Default::default() };
        let grown = grow(&Weights::of(&model), &to, &options).unwrap().into_model(Device::Cpu).unwrap();
        let (original_dir, grown_dir) = (dir.path().join("original"), dir.path().join("grown"));
        save_pretrained(&model, &original_dir).unwrap();
        save_pretrained(&grown, &grown_dir).unwrap();
        let ids = Tensor::randint(320, [2, 33], (Kind::Int64, Device::Cpu));
        let inputs = dir.path().join("inputs.safetensors");
        Tensor::write_safetensors(&[("ids", &ids)], &inputs).unwrap();
        let (a, b, i) = (original_dir.to_str().unwrap(), grown_dir.to_str().unwrap(), inputs.to_str().unwrap());
        run_python(&["same", "--checkpoint", a, "--other", b, "--inputs", i, "--tolerance", "1e-5"]);
    }
}
