//! `agora train`: a run file and/or flags → tokenizer, shards, a training loop with progress, evaluation
//! and resumable checkpoints. Also used by `agora demo`.

use crate::commands::{set_threads, RuntimeArgs};
use agora_data::{prepare, train_bpe, Shard, Tokenizer};
use agora_model::{config::preset_vocab_size, preset, Llama, LlamaConfig};
use agora_train::checkpoint::{self, check_tokenizer_matches, TrainingState, SAMPLER};
use agora_train::trainer::{default_compute_kind, parse_device};
use agora_train::{TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Default, Clone)]
pub struct TrainArgs {
    /// TOML run file ([model], [data], [train] sections); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model preset (tiny, small, base, phase1..phase7); see `agora info`.
    #[arg(long)]
    pub preset: Option<String>,
    /// Corpus files/directories (.txt, .jsonl, .parquet), or a directory with train.shard and val.shard.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// tokenizer.json to use; without it one is trained on the data.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size when training a tokenizer (default: the preset's).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Total optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop (with a checkpoint) after this step; the schedule still spans --steps, so a later
    /// --resume continues exactly as if the run had never stopped.
    #[arg(long)]
    pub until: Option<u64>,
    /// Run directory: checkpoint/, data/, metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from a checkpoint (a run directory or its checkpoint/).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Machine-readable output: one JSON object per log line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The TOML run file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: Option<TrainConfig>,
    pub out: Option<PathBuf>,
    pub threads: Option<usize>,
    pub device: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    /// A Hugging Face `config.json` instead of a preset.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub vocab_size: Option<usize>,
    pub val_fraction: Option<f64>,
}

impl RunFile {
    pub fn load(path: &Path) -> Result<RunFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read run file", path.display()))?;
        let mut run: RunFile = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: invalid run file: {}", path.display(), e.to_string().replace('\n', " "))
        })?;
        // Paths in a run file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        run.data.paths.iter_mut().for_each(rebase);
        run.data.tokenizer.iter_mut().for_each(rebase);
        run.model.config.iter_mut().for_each(rebase);
        run.out.iter_mut().for_each(rebase);
        if let Some(train) = &run.train {
            train.validate().with_context(|| path.display().to_string())?;
        }
        Ok(run)
    }
}

/// What a finished run reports.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub out: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: f64,
    pub val_perplexity: f64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub parameters: i64,
}

#[derive(Serialize)]
struct MetricsLine {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let json = args.json;
    let summary = run_training(args)?;
    if json {
        println!("{}", serde_json::to_string(&serde_json::json!({ "summary": summary }))?);
    } else {
        eprintln!(
            "done: {} steps, val loss {:.4} (perplexity {:.2}), {:.0} tokens/s; checkpoint {}",
            summary.steps,
            summary.val_loss,
            summary.val_perplexity,
            summary.tokens_per_second,
            summary.checkpoint.display()
        );
    }
    Ok(())
}

/// A checkpoint directory given either directly or as its run directory.
pub fn resolve_checkpoint(path: &Path) -> PathBuf {
    let nested = path.join("checkpoint");
    if !path.join(checkpoint::STATE_FILE).is_file() && nested.join(checkpoint::STATE_FILE).is_file() {
        nested
    } else {
        path.to_path_buf()
    }
}

/// The train and validation shards: an existing shard directory, or the corpus tokenized into `out/data`.
fn shards(data: &[PathBuf], tokenizer: &Tokenizer, out: &Path, val_fraction: f64) -> Result<(PathBuf, Shard, Shard)> {
    let prepared = match data {
        [dir] if dir.join("train.shard").is_file() => dir.clone(),
        [] => bail!("no training data: pass --data FILE (or [data] paths in the run file)"),
        _ => {
            let dir = out.join("data");
            let report = prepare(data, tokenizer, &dir, val_fraction)?;
            tracing::info!(
                "tokenized {} documents: {} train / {} validation tokens → {}",
                report.documents,
                report.train_tokens,
                report.val_tokens,
                dir.display()
            );
            dir
        }
    };
    let (train_path, val_path) = (prepared.join("train.shard"), prepared.join("val.shard"));
    let train = Shard::open(&train_path)?;
    let val = Shard::open(&val_path).with_context(|| format!("{}: validation shard needed", val_path.display()))?;
    check_tokenizer_matches(&train_path, &train.tokenizer_hash, tokenizer)?;
    check_tokenizer_matches(&val_path, &val.tokenizer_hash, tokenizer)?;
    Ok((prepared, train, val))
}

pub fn run_training(args: TrainArgs) -> Result<RunSummary> {
    let run = match &args.config {
        Some(path) => RunFile::load(path)?,
        None => RunFile::default(),
    };
    let threads = set_threads(args.runtime.threads.or(run.threads));
    let device = parse_device(args.runtime.device.as_deref().or(run.device.as_deref()).unwrap_or("cpu"))?;
    let data_paths = if args.data.is_empty() { run.data.paths.clone() } else { args.data.clone() };

    let (mut trainer, tokenizer, out, prepared, train_shard, val_shard) = if let Some(resume) = &args.resume {
        let dir = resolve_checkpoint(resume);
        let (mut trainer, state) = checkpoint::load(&dir, device)?;
        let tokenizer = checkpoint::read_tokenizer(&dir)?;
        if state.threads != threads {
            tracing::warn!(
                "resuming with {threads} threads, the run used {}: results will not be bit-identical",
                state.threads
            );
        }
        let out = args
            .out
            .clone()
            .or(run.out.clone())
            .unwrap_or_else(|| dir.parent().unwrap_or(Path::new(".")).to_path_buf());
        let data = if data_paths.is_empty() { state.data_dir.iter().cloned().collect() } else { data_paths.clone() };
        let (prepared, train, val) = shards(&data, &tokenizer, &out, 0.1)?;
        if train.content_hash_hex() != state.train_shard {
            bail!(
                "{}: the training shard differs from the one this run trained on ({}…); resume needs the same data",
                prepared.join("train.shard").display(),
                &state.train_shard[..16]
            );
        }
        if let Some(steps) = args.steps {
            if steps != trainer.config.steps {
                tracing::warn!("--steps {steps} changes the learning-rate schedule (was {})", trainer.config.steps);
                trainer.config.steps = steps;
            }
        }
        tracing::info!("resumed {} at step {}", dir.display(), state.step);
        (trainer, tokenizer, out, prepared, train, val)
    } else {
        let out = args.out.clone().or(run.out.clone()).context("no output directory: pass --out DIR")?;
        if out.join("checkpoint").join(checkpoint::STATE_FILE).is_file() {
            bail!(
                "{}: already holds a trained checkpoint; continue it with --resume {0} or choose another --out",
                out.display()
            );
        }
        std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create run directory", out.display()))?;
        let preset_name = args.preset.clone().or(run.model.preset.clone());
        let tokenizer = match args.tokenizer.as_ref().or(run.data.tokenizer.as_ref()) {
            Some(path) => Tokenizer::from_file(path)?,
            None => {
                let vocab = args
                    .vocab_size
                    .or(run.data.vocab_size)
                    .or_else(|| preset_name.as_deref().and_then(preset_vocab_size))
                    .unwrap_or(4096);
                if data_paths.is_empty() {
                    bail!("no training data: pass --data FILE (or [data] paths in the run file)");
                }
                let started = Instant::now();
                let tok = train_bpe(&data_paths, vocab)?;
                tracing::info!("trained a {vocab}-token BPE tokenizer in {:.1}s", started.elapsed().as_secs_f64());
                tok
            }
        };
        let val_fraction = run.data.val_fraction.unwrap_or(0.1);
        let (prepared, train, val) = shards(&data_paths, &tokenizer, &out, val_fraction)?;

        let mut model_config = match (&run.model.config, &preset_name) {
            (Some(path), None) => LlamaConfig::from_file(path)?,
            (None, name) => preset(name.as_deref().unwrap_or("tiny"), Some(tokenizer.vocab_size()))?,
            (Some(_), Some(_)) => bail!("give either a preset or [model] config, not both"),
        };
        if model_config.vocab_size < tokenizer.vocab_size() {
            bail!(
                "model vocab_size {} is smaller than the tokenizer's {}",
                model_config.vocab_size,
                tokenizer.vocab_size()
            );
        }
        model_config.bos_token_id = Some(tokenizer.bos_id());
        model_config.eos_token_id = Some(tokenizer.eos_id().into());

        let mut config = run.train.clone().unwrap_or_default();
        if let Some(v) = args.steps {
            config.steps = v;
        }
        if let Some(v) = args.batch_size {
            config.batch_size = v;
        }
        if let Some(v) = args.seq_len {
            config.seq_len = v;
        }
        if let Some(v) = args.grad_accum {
            config.grad_accum = v;
        }
        if let Some(v) = args.lr {
            config.lr = v;
            config.min_lr = config.min_lr.min(v);
        }
        if let Some(v) = args.warmup_steps {
            config.warmup_steps = v;
        }
        if let Some(v) = args.seed {
            config.seed = v;
        }
        if let Some(v) = args.eval_every {
            config.eval_every = v;
        }
        if let Some(v) = args.checkpoint_every {
            config.checkpoint_every = v;
        }
        let model = Llama::new(&model_config, device, config.seed);
        let trainer = Trainer::new(model, config)?;
        (trainer, tokenizer, out, prepared, train, val)
    };
    trainer.model.set_compute_kind(default_compute_kind(device));
    agora_data::sampling::ensure_window_fits(val_shard.len(), trainer.config.seq_len)
        .context("validation shard too small")?;

    let checkpoint_dir = out.join("checkpoint");
    let mut state = TrainingState {
        format: 1,
        step: trainer.step(),
        train: trainer.config.clone(),
        tokenizer_hash: tokenizer.hash_hex(),
        train_shard: train_shard.content_hash_hex(),
        val_shard: val_shard.content_hash_hex(),
        threads,
        sampler: SAMPLER.into(),
        last_loss: None,
        last_val_loss: None,
        data_dir: Some(std::path::absolute(&prepared).unwrap_or(prepared.clone())),
    };
    let total = trainer.config.steps;
    tracing::info!(
        "training {} parameters for {} steps ({} tokens/step) on {device:?} with {threads} threads",
        trainer.model.num_parameters(),
        total,
        trainer.config.tokens_per_step()
    );

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .with_context(|| format!("{}: cannot open metrics log", out.join("metrics.jsonl").display()))?;
    let bar = if args.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}").expect("valid template"),
    );
    bar.set_position(trainer.step());
    let started = Instant::now();
    let (mut tokens, mut last_loss) = (0u64, f64::NAN);
    let mut window = (Instant::now(), 0u64);
    let log_every = (total / 50).max(1);
    let stop = args.until.map_or(total, |u| u.min(total));
    while trainer.step() < stop {
        let stats = trainer.train_step(&train_shard)?;
        tokens += stats.tokens as u64;
        window.1 += stats.tokens as u64;
        last_loss = stats.loss;
        let step = stats.step;
        let c = &trainer.config;
        let eval_now = step == total || (c.eval_every > 0 && step.is_multiple_of(c.eval_every));
        if eval_now || step.is_multiple_of(log_every) {
            // Training throughput only: measured before the evaluation pass.
            let tps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
            let val_loss = if eval_now { Some(trainer.evaluate(&val_shard)?) } else { None };
            if let Some(v) = val_loss {
                state.last_val_loss = Some(v);
            }
            bar.set_message(format!("loss {:.4} | {tps:.0} tok/s", stats.loss));
            let line = MetricsLine {
                step,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_second: tps,
                val_loss,
            };
            let text = serde_json::to_string(&line)?;
            writeln!(metrics, "{text}")?;
            window = (Instant::now(), 0);
            if args.json {
                println!("{text}");
            } else if let Some(v) = val_loss {
                let line =
                    format!("step {step:>6}  loss {:.4}  val {v:.4}  lr {:.2e}  {tps:.0} tok/s", stats.loss, stats.lr);
                // A hidden bar (stderr is not a terminal) swallows println: log lines must still reach logs.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
        }
        bar.set_position(step);
        let c = &trainer.config;
        let save_now = step == stop || (c.checkpoint_every > 0 && step.is_multiple_of(c.checkpoint_every));
        if save_now {
            state.step = step;
            state.last_loss = Some(last_loss);
            state.train = trainer.config.clone();
            checkpoint::save(&checkpoint_dir, &trainer, &tokenizer, &state)?;
        }
    }
    bar.finish_and_clear();
    let val_loss = match state.last_val_loss {
        Some(v) if state.step == total => v,
        _ => trainer.evaluate(&val_shard)?,
    };
    if trainer.step() < total {
        tracing::info!("stopped at step {} of {total}; continue with --resume {}", trainer.step(), out.display());
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RunSummary {
        out: out.clone(),
        checkpoint: checkpoint_dir,
        steps: trainer.step(),
        final_loss: last_loss,
        val_loss,
        val_perplexity: val_loss.exp(),
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        parameters: trainer.model.num_parameters(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run file shown in the README parses and validates, so the documentation stays true.
    #[test]
    fn the_readme_run_file_is_valid() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| &b[..b.find("```").expect("closed code block")])
            .find(|b| b.contains("[train]"))
            .expect("README has a training run file");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, block).unwrap();
        let run = RunFile::load(&path).unwrap();
        assert_eq!(run.model.preset.as_deref(), Some("small"));
        assert_eq!(run.train.unwrap(), TrainConfig { steps: 1000, eval_batches: 20, ..TrainConfig::default() });
        assert_eq!(run.out, Some(dir.path().join("runs/small")));
    }
}
