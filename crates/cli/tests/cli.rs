//! The `agora` binary as a user runs it: real processes, real files.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn agora() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn shakespeare() -> PathBuf {
    let p = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()))
        .join("../../../shared/data/tinyshakespeare.txt");
    assert!(p.is_file(), "{} is missing: tests need ../shared/data/tinyshakespeare.txt", p.display());
    p
}

fn python() -> PathBuf {
    let python = std::env::var_os("AGORA_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/agora/venv/bin/python")
    });
    assert!(python.exists(), "{} not found: run scripts/setup.sh --test (make test does)", python.display());
    python
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("agora runs");
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command that must fail; returns its stderr, checked to be a one-line error and no panic.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("agora runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail with status 1; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{cmd:?} panicked:\n{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{cmd:?}: last line is not an error: {stderr}");
    last.to_string()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A tokenizer trained once by the CLI for all tests of this file.
fn tokenizer() -> &'static PathBuf {
    static TOKENIZER: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &TOKENIZER
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokenizer.json");
            let s = shakespeare();
            run(agora().args(["tokenizer", "train", "--vocab-size", "512", "--out"]).arg(&path).arg("--data").arg(&s));
            (dir, path)
        })
        .1
}

fn train_args(out: &Path, steps: u64) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--threads", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--steps".into(), steps.to_string(), "--eval-every".into(), "10".into(), "--json".into()]);
    args.extend(["--data".into(), shakespeare().display().to_string()]);
    args.extend(["--tokenizer".into(), tokenizer().display().to_string()]);
    args.extend(["--out".into(), out.display().to_string()]);
    args
}

#[test]
fn train_eval_generate_and_transformers_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let lines = json_lines(&run(agora().args(train_args(&out, 40))));
    let summary = &lines.last().unwrap()["summary"];
    let vals: Vec<f64> = lines.iter().filter_map(|l| l["val_loss"].as_f64()).collect();
    assert!(vals.len() >= 4, "{lines:?}");
    assert!(vals.last().unwrap() < &(vals[0] - 0.5), "validation loss did not fall: {vals:?}");
    assert_eq!(summary["steps"], 40);
    let ckpt = out.join("checkpoint");
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(ckpt.join(f).is_file(), "{f} missing from the checkpoint");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 4);

    let eval = json_lines(&run(agora().args(["eval", "--json", "--checkpoint"]).arg(&out)));
    let loss = eval[0]["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && (loss - vals.last().unwrap()).abs() < 0.2, "eval {loss} vs training's {vals:?}");
    assert!((eval[0]["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);

    let gen = |temperature: &str, seed: &str| {
        let out = run(agora().args(["generate", "--json", "--prompt", "ROMEO:", "--max-tokens", "24"]).args([
            "--temperature",
            temperature,
            "--seed",
            seed,
            "--checkpoint",
            ckpt.to_str().unwrap(),
        ]));
        json_lines(&out).remove(0)
    };
    let greedy = gen("0", "0");
    assert_eq!(greedy["prompt"], "ROMEO:");
    assert!(greedy["text"].as_str().unwrap().starts_with("ROMEO:"));
    let n = greedy["tokens"].as_u64().unwrap();
    assert!(n > 0 && n <= 24);
    assert_eq!(gen("0.9", "7"), gen("0.9", "7"), "sampling with a seed must be reproducible");

    // transformers loads the same directory (model and tokenizer) and decodes the same greedy tokens.
    let script =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()))
            .join("../../tests/python/hf_checkpoint.py");
    let hf = run(Command::new(python()).arg(script).arg("--checkpoint").arg(&ckpt).args([
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        &n.to_string(),
    ]));
    let hf = json_lines(&hf).remove(0);
    assert_eq!(hf["completion_ids"], greedy["completion_ids"], "transformers: {hf}\nagora: {greedy}");
}

#[test]
fn a_run_stopped_and_resumed_in_new_processes_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    run(agora().args(train_args(&straight, 12)));
    run(agora().args(train_args(&split, 12)).args(["--until", "5"]));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("checkpoint/agora_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 5);
    run(agora().args(["train", "--json", "--threads", "2", "--resume"]).arg(&split));
    for file in ["model.safetensors", "agora_state.safetensors"] {
        let a = std::fs::read(straight.join("checkpoint").join(file)).unwrap();
        let b = std::fs::read(split.join("checkpoint").join(file)).unwrap();
        assert!(a == b, "{file} differs between the straight and the resumed run");
    }
    // Training into a run directory that already has a checkpoint needs --resume.
    let err = fails(agora().args(train_args(&straight, 12)));
    assert!(err.contains("already holds a trained checkpoint"), "{err}");
}

#[test]
fn run_files_configure_training() {
    let dir = tempfile::tempdir().unwrap();
    let run_file = dir.path().join("run.toml");
    std::fs::write(
        &run_file,
        format!(
            "out = \"run\"\nthreads = 2\n[model]\npreset = \"tiny\"\n[data]\npaths = [{:?}]\ntokenizer = {:?}\n\
             [train]\nsteps = 3\nbatch_size = 4\nseq_len = 32\neval_batches = 2\n",
            shakespeare(),
            tokenizer()
        ),
    )
    .unwrap();
    let lines = json_lines(&run(agora().args(["train", "--json", "--config"]).arg(&run_file)));
    assert_eq!(lines.last().unwrap()["summary"]["steps"], 3);
    assert!(dir.path().join("run/checkpoint/model.safetensors").is_file());

    std::fs::write(&run_file, "[train]\nstepz = 3\n").unwrap();
    let err = fails(agora().args(["train", "--config"]).arg(&run_file));
    assert!(err.contains("run.toml") && err.contains("stepz"), "{err}");
    std::fs::write(&run_file, "[train]\nsteps = 0\n").unwrap();
    let err = fails(agora().args(["train", "--config"]).arg(&run_file));
    assert!(err.contains("train.steps must be positive"), "{err}");
}

#[test]
fn bad_input_gets_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let err = fails(agora().args(["eval", "--checkpoint"]).arg(d.join("missing")));
    assert!(err.contains("missing") && err.contains("config.json"), "{err}");

    let err = fails(
        agora()
            .args(["train", "--preset", "huge", "--steps", "1", "--out"])
            .arg(d.join("a"))
            .arg("--data")
            .arg(shakespeare())
            .arg("--tokenizer")
            .arg(tokenizer()),
    );
    assert!(err.contains("unknown preset \"huge\""), "{err}");

    let empty = d.join("empty.txt");
    std::fs::write(&empty, "  \n\n").unwrap();
    let err = fails(
        agora().args(["train", "--preset", "tiny", "--steps", "1", "--out"]).arg(d.join("b")).arg("--data").arg(&empty),
    );
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");

    let err = fails(agora().args(["info", "--preset", "nope"]));
    assert!(err.contains("unknown preset"), "{err}");

    // A checkpoint and a shard made by different tokenizers.
    let ckpt_run = d.join("c");
    run(agora().args(train_args(&ckpt_run, 2)));
    let other_tok = d.join("other.json");
    run(agora()
        .args(["tokenizer", "train", "--vocab-size", "300", "--out"])
        .arg(&other_tok)
        .arg("--data")
        .arg(shakespeare()));
    let shards = d.join("other-shards");
    run(agora()
        .args(["data", "prepare", "--tokenizer"])
        .arg(&other_tok)
        .arg("--out")
        .arg(&shards)
        .arg("--data")
        .arg(shakespeare()));
    let err = fails(agora().args(["eval", "--checkpoint"]).arg(&ckpt_run).arg("--data").arg(&shards));
    assert!(err.contains("tokenizer mismatch"), "{err}");

    // Corrupt weights, then a config that no longer matches them.
    let ckpt = ckpt_run.join("checkpoint");
    let weights = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let err = fails(agora().args(["generate", "--prompt", "a", "--checkpoint"]).arg(&ckpt));
    assert!(err.contains("model.safetensors") && err.contains("corrupt"), "{err}");
    std::fs::write(ckpt.join("model.safetensors"), &weights).unwrap();
    let config_path = ckpt.join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"hidden_size\": 128", "\"hidden_size\": 64");
    std::fs::write(&config_path, config).unwrap();
    let err = fails(agora().args(["generate", "--prompt", "a", "--checkpoint"]).arg(&ckpt));
    assert!(err.contains("has shape"), "{err}");
    // A resumable run whose optimizer state is gone.
    std::fs::remove_file(ckpt.join("agora_state.safetensors")).unwrap();
    let err = fails(agora().args(["train", "--resume"]).arg(&ckpt_run));
    assert!(err.contains("agora_state.safetensors") || err.contains("has shape"), "{err}");
}

/// A statement signed by the key it carries proves nothing: `agora ledger verify` wants a key to trust.
#[test]
fn ledger_verify_needs_a_trusted_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("statement.json");
    std::fs::write(&file, "{}").unwrap();
    let err = fails(agora().args(["ledger", "verify"]).arg(&file));
    assert!(err.contains("proves nothing") && err.contains("--coordinator-key") && err.contains("--pinned"), "{err}");
}

#[test]
fn a_grown_checkpoint_evaluates_and_decodes_as_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    run(agora().args(train_args(&run_dir, 12)));
    let grown = dir.path().join("grown");
    // tiny (4 layers, 128 wide, 4/2 heads of 32, 384 units, tied) → small's shape with heads of 32 (6 layers,
    // 384 wide, 12/4 heads, 1024 units, tied): 3× wider by tiling.
    let mut target: Value = serde_json::from_slice(
        &run(agora().args(["info", "--preset", "small", "--hf-config", "--vocab-size", "512"])).stdout,
    )
    .unwrap();
    (target["num_attention_heads"], target["num_key_value_heads"]) = (12.into(), 4.into());
    let target_file = dir.path().join("target.json");
    std::fs::write(&target_file, target.to_string()).unwrap();
    let out = run(agora()
        .args(["grow", "--json", "--hidden", "tile", "--ffn", "split", "--from"])
        .arg(&run_dir)
        .arg("--to")
        .arg(&target_file)
        .arg("--out")
        .arg(&grown));
    let report = json_lines(&out).remove(0);
    assert_eq!(report["exact"], true, "{report}");
    assert!(report["factor"].as_f64().unwrap() > 5.0, "{report}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(grown.join(f).is_file(), "{f} missing from the grown directory");
    }
    let eval = |checkpoint: &Path| {
        let out = run(agora()
            .args(["eval", "--json", "--threads", "2", "--seq-len", "64", "--checkpoint"])
            .arg(checkpoint)
            .arg("--data")
            .arg(run_dir.join("data")));
        json_lines(&out)[0]["loss"].as_f64().unwrap()
    };
    let (before, after) = (eval(&run_dir), eval(&grown));
    assert!((before - after).abs() < 1e-4, "validation loss {before} before growth, {after} after");
    let greedy = |checkpoint: &Path| {
        let out = run(agora()
            .args([
                "generate",
                "--json",
                "--prompt",
                "ROMEO:",
                "--max-tokens",
                "16",
                "--temperature",
                "0",
                "--checkpoint",
            ])
            .arg(checkpoint));
        json_lines(&out).remove(0)["completion_ids"].clone()
    };
    assert_eq!(greedy(&run_dir), greedy(&grown), "greedy decoding changed with growth");

    // Refusals, one line each.
    let err = fails(
        agora()
            .args(["grow", "--method", "depth", "--from"])
            .arg(&run_dir)
            .arg("--to")
            .arg(&target_file)
            .arg("--out")
            .arg(dir.path().join("x")),
    );
    assert!(err.contains("--method depth") && err.contains("hidden 128 → 384"), "{err}");
    let err =
        fails(agora().args(["grow", "--to", "phase1", "--from"]).arg(&run_dir).arg("--out").arg(dir.path().join("y")));
    assert!(err.contains("head size differs (32 → 128)"), "{err}");
    let err =
        fails(agora().args(["grow", "--from"]).arg(&run_dir).arg("--to").arg(&target_file).arg("--out").arg(&grown));
    assert!(err.contains("not empty"), "{err}");
    let err =
        fails(agora().args(["grow", "--to", "small", "--from"]).arg(&run_dir).arg("--out").arg(dir.path().join("z")));
    assert!(err.contains("head size differs (32 → 64)"), "{err}");

    // The ladder: seven phases, each about 3.75× the one before, every step exact.
    let ladder: Value = serde_json::from_slice(&run(agora().args(["info", "--ladder", "--json"])).stdout).unwrap();
    let rows = ladder.as_array().unwrap();
    assert_eq!(rows.len(), 7);
    for row in &rows[1..] {
        let factor = row["factor"].as_f64().unwrap();
        assert!((3.5..4.0).contains(&factor), "{row}");
        assert!(!row["grown_by"].as_array().unwrap().is_empty(), "{row}");
    }
}

#[test]
fn bench_grow_starts_exact_growth_at_the_small_models_loss() {
    let out = run(agora()
        .args([
            "bench",
            "grow",
            "--json",
            "--small-steps",
            "6",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--eval-batches",
            "4",
        ])
        .args([
            "--factors",
            "2",
            "--methods",
            "depth,width,stack",
            "--state",
            "carry,reset",
            "--threads",
            "2",
            "--data",
        ])
        .arg(shakespeare()));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let curves = report["curves"].as_array().unwrap();
    let first = |label: &str| -> f64 {
        let c = curves.iter().find(|c| c["label"].as_str().unwrap().starts_with(label)).unwrap();
        c["evals"][0][1].as_f64().unwrap()
    };
    let small = curves[0]["evals"].as_array().unwrap().last().unwrap()[1].as_f64().unwrap();
    for exact in ["grown 2× by depth, state carry", "grown 2× by width, state reset"] {
        assert!((first(exact) - small).abs() < 1e-4, "{exact}: {} after growth, {small} before", first(exact));
    }
    assert!((first("grown 2× by stack") - small).abs() > 1e-3, "G_stack is not exact");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 methods × 2 states");
    assert!(rows.iter().all(|r| r["scratch_loss"].as_f64().unwrap().is_finite()));
    let err = fails(agora().args(["bench", "grow", "--grown-lr-fraction", "0"]));
    assert!(err.contains("--grown-lr-fraction must be positive"), "{err}");
}
