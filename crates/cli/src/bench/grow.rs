//! `agora bench grow`: grow a trained small model and train on, against training the larger model from
//! scratch on the same data. Reports the tokens the grown model needs to reach the from-scratch run's final
//! validation loss, per growth method (depth, width, both, G_stack), optimizer state (carried or reset)
//! and growth factor (≈2× and ≈3.75×).

use agora_data::sampling::batch_offsets;
use agora_data::{prepare, train_bpe, Shard};
use agora_model::grow::{plan, FfnGrowth, GrowthMethod, GrowthOptions, HiddenGrowth};
use agora_model::{preset, Llama, LlamaConfig};
use agora_train::grow::{grow_trainer, StateGrowth};
use agora_train::{evaluate, TrainConfig, Trainer};
use anyhow::{bail, ensure, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

#[derive(Args)]
pub struct GrowArgs {
    /// Corpus (default: tinyshakespeare when present, else a generated Markov corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Steps of the small model (`tiny`) before growth.
    #[arg(long, default_value_t = 1000)]
    pub small_steps: u64,
    /// Steps of the larger model from scratch; a grown model follows the same data and stops at the first
    /// evaluation that reaches the from-scratch run's final loss (or at the end of its schedule).
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// The grown runs' schedule lengths (default: --steps). A cosine reaches its final loss only once its
    /// rate has come down, so a grown run on the from-scratch run's schedule cannot finish before most of
    /// it; with several lengths each grown model is trained on each schedule, and the shortest that
    /// reaches the target is the tokens it needs.
    #[arg(long, value_delimiter = ',')]
    pub grown_steps: Vec<u64>,
    /// Growth factors in parameters: 2 and/or 3.75 (each has its own target configs, below).
    #[arg(long, value_delimiter = ',', default_value = "2,3.75")]
    pub factors: Vec<f64>,
    /// depth, width, both, stack.
    #[arg(long, value_delimiter = ',', default_value = "depth,width,both,stack")]
    pub methods: Vec<GrowthMethod>,
    /// carry (moments mapped, step kept) and/or reset (fresh AdamW); both re-warm the learning rate.
    #[arg(long, value_delimiter = ',', default_value = "carry,reset")]
    pub state: Vec<StateGrowth>,
    /// FFN growth for width and both: fresh or split.
    #[arg(long, default_value = "fresh", value_parser = ["fresh", "split"])]
    pub ffn: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Peak learning rate of every run (warmup over a twentieth of its steps, cosine to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// The grown runs' peak learning rate as a fraction of --lr (their warmup and cosine as ever): a grown
    /// model may want a gentler restart than a new one.
    #[arg(long, default_value_t = 1.0)]
    pub grown_lr_fraction: f64,
    /// Validation every this many steps (the tokens-to-target resolution).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Validation batches of --batch-size windows each (the same windows at every evaluation).
    #[arg(long, default_value_t = 16)]
    pub eval_batches: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The larger models: for each factor and method, a config reachable from `tiny` (128 wide, 4 heads of 32
/// with 2 kv heads, 384 FFN units, 4 layers, tied) by that method alone.
fn target(small: &LlamaConfig, factor: f64, method: GrowthMethod) -> Result<LlamaConfig> {
    let mut c = small.clone();
    // (layers, hidden, heads, kv heads, ffn)
    let (l, h, nh, kv, i) = match (method, factor) {
        (GrowthMethod::Depth | GrowthMethod::Stack, 2.0) => (8, 128, 4, 2, 384),
        (GrowthMethod::Depth | GrowthMethod::Stack, 3.75) => (16, 128, 4, 2, 384),
        (GrowthMethod::Width, 2.0) => (4, 192, 6, 3, 512),
        (GrowthMethod::Width, 3.75) => (4, 256, 8, 4, 736),
        (GrowthMethod::Both, 2.0) => (5, 160, 5, 5, 448),
        (GrowthMethod::Both, 3.75) => (7, 192, 6, 3, 576),
        (_, f) => bail!("--factors: {f} has no target configs (2 or 3.75)"),
    };
    (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) =
        (l, h, nh, Some(kv), i);
    c.validate()?;
    Ok(c)
}

/// One training run's curve: validation loss every `eval_every` steps (step 0 included).
#[derive(Serialize)]
struct Curve {
    label: String,
    parameters: u64,
    /// (step, validation loss)
    evals: Vec<(u64, f64)>,
    seconds: f64,
}

impl Curve {
    fn final_loss(&self) -> f64 {
        self.evals.last().map_or(f64::NAN, |e| e.1)
    }
    /// The first evaluated step at which the loss is at or below `target`.
    fn steps_to(&self, target: f64) -> Option<u64> {
        self.evals.iter().find(|(_, loss)| *loss <= target).map(|(step, _)| *step)
    }
}

struct Bench<'a> {
    args: &'a GrowArgs,
    train: Shard,
    val: Shard,
}

impl Bench<'_> {
    fn config(&self, steps: u64) -> TrainConfig {
        let a = self.args;
        TrainConfig {
            seed: a.seed,
            steps,
            batch_size: a.batch_size,
            seq_len: a.seq_len,
            lr: a.lr,
            min_lr: a.lr / 10.0,
            warmup_steps: (steps / 20).max(1),
            eval_every: a.eval_every,
            eval_batches: a.eval_batches,
            ..Default::default()
        }
    }

    fn val_loss(&self, model: &Llama) -> Result<f64> {
        evaluate(model, &self.val, self.args.seq_len, self.args.batch_size, self.args.eval_batches)
    }

    /// Trains `trainer` for its config's steps on the batches of `data_seed` (the same for every run of a
    /// phase, whatever the optimizer's own step count), the learning rate from step 0 of its schedule;
    /// stops early at the first evaluation at or below `stop_at`.
    fn train(&self, label: String, trainer: &mut Trainer, data_seed: u64, stop_at: Option<f64>) -> Result<Curve> {
        let started = Instant::now();
        let c = trainer.config.clone();
        let schedule = c.schedule();
        let mut evals = vec![(0, self.val_loss(&trainer.model)?)];
        let reached = |evals: &[(u64, f64)]| stop_at.is_some_and(|target| evals.last().is_some_and(|e| e.1 <= target));
        let mut step = 0;
        while step < c.steps && !reached(&evals) {
            let offsets =
                batch_offsets(data_seed, &self.train.content_hash, step, 0, c.batch_size, c.seq_len, self.train.len());
            trainer.update_on(&self.train, &[offsets], schedule.lr(step))?;
            step += 1;
            if step % self.args.eval_every == 0 || step == c.steps {
                evals.push((step, self.val_loss(&trainer.model)?));
            }
        }
        let curve = Curve {
            label,
            parameters: trainer.model.num_parameters() as u64,
            evals,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            "{}: validation loss {:.4} after {step} steps ({:.0}s)",
            curve.label,
            curve.final_loss(),
            curve.seconds
        );
        Ok(curve)
    }
}

#[derive(Serialize)]
struct Row {
    factor: f64,
    method: &'static str,
    state: &'static str,
    /// The grown run's schedule length.
    schedule_steps: u64,
    parameters: u64,
    scratch_loss: f64,
    /// The grown run's last evaluation: where it reached the target, or after --steps.
    grown_loss: f64,
    /// Steps (of --steps) the grown model took to reach the from-scratch run's final loss.
    steps_to_scratch_loss: Option<u64>,
    /// 100 · (1 − steps_to / steps): the share of the from-scratch run's tokens saved.
    tokens_saved_percent: Option<f64>,
    /// The same, counting the small model's tokens against the grown run.
    tokens_saved_with_small_percent: Option<f64>,
}

pub fn grow_bench(args: GrowArgs) -> Result<()> {
    crate::commands::set_threads(args.threads);
    ensure!(
        args.eval_every > 0 && args.steps > 0 && args.small_steps > 0,
        "--steps, --small-steps and --eval-every must be positive"
    );
    let grown_steps = if args.grown_steps.is_empty() { vec![args.steps] } else { args.grown_steps.clone() };
    ensure!(
        grown_steps.iter().all(|&s| s > 0 && s <= args.steps),
        "--grown-steps must lie in 1..=--steps ({}), got {grown_steps:?}",
        args.steps
    );
    ensure!(
        args.grown_lr_fraction > 0.0 && args.grown_lr_fraction.is_finite(),
        "--grown-lr-fraction must be positive, got {}",
        args.grown_lr_fraction
    );
    let scratch = tempfile::tempdir()?;
    let data = super::corpus(args.data.clone(), scratch.path())?;
    let tokenizer = train_bpe(std::slice::from_ref(&data), 512)?;
    let report = prepare(std::slice::from_ref(&data), &tokenizer, scratch.path(), 0.1)?;
    let bench = Bench { args: &args, train: Shard::open(&report.train_path)?, val: Shard::open(&report.val_path)? };
    let small_config = preset("tiny", Some(tokenizer.vocab_size()))?;
    let options = |method: GrowthMethod| GrowthOptions {
        depth: method.depth(),
        ffn: if args.ffn == "split" { FfnGrowth::Split } else { FfnGrowth::Fresh },
        hidden: HiddenGrowth::Pad,
        seed: args.seed,
    };
    // Check every target before any training.
    for &factor in &args.factors {
        for &method in &args.methods {
            let to = target(&small_config, factor, method)?;
            method.check(&plan(&small_config, &to, &options(method))?)?;
        }
    }
    let mut small = Trainer::new(Llama::new(&small_config, Device::Cpu, args.seed), bench.config(args.small_steps))?;
    let small_curve = bench.train(format!("small (tiny) {} steps", args.small_steps), &mut small, args.seed, None)?;
    // The larger models' data: another sample than the small model's, the same for grown and scratch runs.
    let data_seed = args.seed + 1;
    let mut rows = Vec::new();
    let mut curves = vec![small_curve];
    for &factor in &args.factors {
        let mut scratch_runs: Vec<(LlamaConfig, Curve)> = Vec::new();
        for &method in &args.methods {
            let to = target(&small_config, factor, method)?;
            if !scratch_runs.iter().any(|(c, _)| *c == to) {
                let mut t = Trainer::new(Llama::new(&to, Device::Cpu, args.seed), bench.config(args.steps))?;
                let label = format!("scratch {:.2}M ({factor}×, {})", to.num_parameters() as f64 / 1e6, method.name());
                let curve = bench.train(label, &mut t, data_seed, None)?;
                scratch_runs.push((to.clone(), curve));
            }
            let scratch_loss = scratch_runs.iter().find(|(c, _)| *c == to).expect("just trained").1.final_loss();
            for &state in &args.state {
                for &schedule_steps in &grown_steps {
                    let state_name = if state == StateGrowth::Carry { "carry" } else { "reset" };
                    let mut config = bench.config(schedule_steps);
                    (config.lr, config.min_lr) =
                        (config.lr * args.grown_lr_fraction, config.min_lr * args.grown_lr_fraction);
                    let mut t = grow_trainer(&small, &to, &options(method), state, config)?;
                    let label = format!(
                        "grown {factor}× by {}, state {state_name}, {schedule_steps}-step schedule",
                        method.name()
                    );
                    let curve = bench.train(label, &mut t, data_seed, Some(scratch_loss))?;
                    let steps_to = curve.steps_to(scratch_loss);
                    let saved = |extra: u64| steps_to.map(|s| 100.0 * (1.0 - (s + extra) as f64 / args.steps as f64));
                    rows.push(Row {
                        factor,
                        method: method.name(),
                        state: state_name,
                        schedule_steps,
                        parameters: to.num_parameters(),
                        scratch_loss,
                        grown_loss: curve.final_loss(),
                        steps_to_scratch_loss: steps_to,
                        tokens_saved_percent: saved(0),
                        tokens_saved_with_small_percent: saved(args.small_steps),
                    });
                    curves.push(curve);
                }
            }
        }
        curves.extend(scratch_runs.into_iter().map(|(_, c)| c));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "rows": rows, "curves": curves }))?);
        return Ok(());
    }
    let tokens = |steps: u64| steps * (args.batch_size * args.seq_len) as u64;
    println!(
        "small: tiny ({:.2}M) trained {} steps ({} tokens); larger models from scratch {} steps × {} × {} tokens; grown ones on schedules of {:?} steps until they reach its final loss",
        small_config.num_parameters() as f64 / 1e6,
        args.small_steps,
        tokens(args.small_steps),
        args.steps,
        args.batch_size,
        args.seq_len,
        grown_steps
    );
    println!(
        "{:>6} {:>6} {:>6} {:>8} {:>9} {:>12} {:>10} {:>14} {:>12} {:>18}",
        "factor",
        "method",
        "state",
        "schedule",
        "params",
        "scratch loss",
        "grown loss",
        "steps to reach",
        "tokens saved",
        "saved incl. small"
    );
    for r in &rows {
        let pct = |p: Option<f64>| p.map_or("not reached".into(), |p| format!("{p:.1}%"));
        println!(
            "{:>5}× {:>6} {:>6} {:>8} {:>8.2}M {:>12.4} {:>10.4} {:>14} {:>12} {:>18}",
            r.factor,
            r.method,
            r.state,
            r.schedule_steps,
            r.parameters as f64 / 1e6,
            r.scratch_loss,
            r.grown_loss,
            r.steps_to_scratch_loss.map_or("—".into(), |s| s.to_string()),
            pct(r.tokens_saved_percent),
            pct(r.tokens_saved_with_small_percent),
        );
    }
    Ok(())
}
