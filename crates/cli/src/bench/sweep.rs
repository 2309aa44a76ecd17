//! The equal-token sweep that `agora bench diloco` and `agora bench compression` run: DiLoCo against
//! synchronous data-parallel training at an equal token budget, in one process, calling exactly the
//! `agora-diloco` functions the networked coordinator and workers call ([`train_round`], [`mean`],
//! [`OuterOptimizer::step`], [`cut_units`], [`unit_order`]). This module measures nothing by itself: it
//! holds the shared flags, the plan, the data pool and the two kinds of run; the commands print the tables.
//!
//! Design (as in "Scaling laws for DiLoCo"): a fixed global batch of `G` windows per inner step and `S` inner
//! steps in total, so every configuration trains on `S·G·seq_len` tokens with the same warmup + cosine
//! learning-rate schedule over `S` steps.
//! - *Data-parallel baseline*: one [`Trainer`] with batch `G` for `S` steps. Synchronous data parallelism over
//!   any number of workers that average their gradients every step computes exactly this update (the mean of
//!   the workers' per-shard mean gradients is the mean gradient of the global batch), so one process stands
//!   in for all of them. Each worker would send one fp32 gradient per step: `S · 4 · parameters` bytes.
//! - *DiLoCo with k workers and H inner steps*: `S/H` rounds; in each, every worker starts from the global
//!   weights, takes `H` AdamW steps with batch `G/k` on its own data unit ([`train_round`]; each worker keeps
//!   its own AdamW moments across rounds, as real workers do), then the pseudo-gradients are averaged
//!   ([`mean`]) and the outer optimizer moves the global weights ([`OuterOptimizer::step`]). Each worker sends
//!   one fp32 pseudo-gradient per round: `S/H · 4 · parameters` bytes, H× fewer than data-parallel.
//!
//! The workers run one after another in this process: the result is what k machines would compute (they
//! only meet at the average), deterministic for a given thread count, and the wall time is not a DiLoCo
//! speed measurement.
//!
//! Data: [`cut_units`] cuts the training split into windows of `seq_len + 1` tokens, shuffles them with the
//! seed (the same permutation whatever the unit size) and groups consecutive ones into units: the baseline's
//! units are single steps (`G` windows), DiLoCo's are one worker's round (`H·G/k` windows). Every
//! configuration keeps only its first `P/unit` units, `P` the largest multiple of every unit size that the
//! split holds, so all of them train on the same `P` windows — a random subset spread over the whole split,
//! not a prefix of it. Units are visited in [`unit_order`] epoch order, worker `i` of round `r` taking the
//! `(r·k + i)`-th unit of that sequence. Validation loss is [`evaluate`] over every window of the held-out
//!
//! [`mean`]: agora_diloco::mean

use super::diloco::DilocoArgs;
use agora_data::{prepare, train_bpe, Shard};
use agora_diloco::codec::{self, Accumulator, Expected};
use agora_diloco::tensors::{from_named, load_weights, model_weights, param_specs};
use agora_diloco::{
    cut_units, train_round, unit_batches, unit_order, CompressionConfig, FragmentPlan, OuterConfig, OuterKind,
    OuterOptimizer, SyncState,
};
use agora_model::{preset, Llama, LlamaConfig};
use agora_train::{evaluate, TrainConfig, Trainer};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

/// What every equal-token sweep shares: data, model, budget, schedules, seed, output.
#[derive(Args, Clone)]
pub struct SweepArgs {
    /// Training text, its last 10% the validation split (default: tinyshakespeare when present, else a
    /// generated Markov corpus of the same size).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// BPE vocabulary trained on --data (default: the preset's).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Total inner steps S of every configuration (default 1000; --quick 24). Divisible by every round length.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Windows per step summed over the workers, G (default 16; --quick 8). Divisible by every k.
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Tokens per window (default 64; --quick 32).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak inner AdamW learning rate, the same for every configuration (cosine to a tenth of it).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Warmup steps of the inner schedule (default: S/20).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// The default outer recipe's peak learning rate (default: the run file's `[outer] lr`).
    #[arg(long)]
    pub outer_lr: Option<f64>,
    /// The default outer recipe's momentum (default: the run file's).
    #[arg(long)]
    pub outer_momentum: Option<f64>,
    /// The default outer recipe's warmup, in rounds (default: the run file's).
    #[arg(long)]
    pub outer_warmup_rounds: Option<u64>,
    /// The default outer recipe's learning rate at the last round, as a fraction of the peak (default: the
    /// run file's).
    #[arg(long)]
    pub outer_final_lr_fraction: Option<f64>,
    /// Model initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A smoke run: small defaults (a few seconds after tokenization); explicit flags still win.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as one line of JSON instead of Markdown tables.
    #[arg(long)]
    pub json: bool,
}

impl Default for SweepArgs {
    fn default() -> Self {
        SweepArgs {
            data: None,
            preset: "tiny".into(),
            vocab_size: None,
            steps: None,
            global_batch: None,
            seq_len: None,
            lr: 3e-3,
            warmup: None,
            outer_lr: None,
            outer_momentum: None,
            outer_warmup_rounds: None,
            outer_final_lr_fraction: None,
            seed: 0,
            threads: None,
            quick: false,
            json: false,
        }
    }
}

impl SweepArgs {
    /// The run file's default outer recipe with this sweep's `--outer-*` overrides.
    pub(crate) fn outer(&self) -> OuterConfig {
        let d = OuterConfig::default();
        OuterConfig {
            lr: self.outer_lr.unwrap_or(d.lr),
            momentum: self.outer_momentum.unwrap_or(d.momentum),
            warmup_rounds: self.outer_warmup_rounds.unwrap_or(d.warmup_rounds),
            final_lr_fraction: self.outer_final_lr_fraction.unwrap_or(d.final_lr_fraction),
            ..d
        }
    }
}

/// One outer recipe of `--outer`: `default` (the run file's default with the `--outer-*` overrides), `old`
/// (constant Nesterov lr 0.7, momentum 0.9: the default before issue 12), or
/// `KIND:LR[:MOMENTUM[:WARMUP_ROUNDS[:FINAL_LR_FRACTION]]]` with KIND nesterov, sgd_momentum or average.
pub(crate) fn parse_outer(spec: &str, default: OuterConfig) -> Result<(String, OuterConfig)> {
    let config = match spec.trim() {
        "default" => default,
        "old" => OuterConfig::CONSTANT_NESTEROV,
        s => {
            let parts: Vec<&str> = s.split(':').map(str::trim).collect();
            ensure!(
                (2..=5).contains(&parts.len()),
                "--outer {s:?}: want default, old or KIND:LR[:MOMENTUM[:WARMUP_ROUNDS[:FINAL_LR_FRACTION]]]"
            );
            let kind = match parts[0] {
                "nesterov" => OuterKind::Nesterov,
                "sgd_momentum" => OuterKind::SgdMomentum,
                "average" => OuterKind::Average,
                k => bail!("--outer {s:?}: unknown kind {k:?} (nesterov, sgd_momentum, average)"),
            };
            fn field<T: std::str::FromStr>(parts: &[&str], i: usize, spec: &str, what: &str) -> Result<Option<T>>
            where
                T::Err: std::error::Error + Send + Sync + 'static,
            {
                parts
                    .get(i)
                    .map(|v| v.parse::<T>().with_context(|| format!("--outer {spec:?}: {what} {v:?}")))
                    .transpose()
            }
            OuterConfig {
                kind,
                lr: field(&parts, 1, s, "learning rate")?.expect("checked: at least 2 parts"),
                momentum: field(&parts, 2, s, "momentum")?.unwrap_or(0.0),
                warmup_rounds: field(&parts, 3, s, "warmup rounds")?.unwrap_or(0),
                final_lr_fraction: field(&parts, 4, s, "final learning-rate fraction")?.unwrap_or(1.0),
            }
        }
    };
    config.validate().with_context(|| format!("--outer {spec:?}"))?;
    Ok((spec.trim().to_string(), config))
}

/// The sweep after defaults and validation.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    pub(crate) steps: u64,
    pub(crate) global_batch: usize,
    pub(crate) seq_len: usize,
    pub(crate) workers: Vec<usize>,
    pub(crate) inner_steps: Vec<u64>,
    pub(crate) lr: f64,
    pub(crate) min_lr: f64,
    pub(crate) warmup: u64,
    /// The default outer recipe (`--outer-*` applied): the grid's first, and the codec sweep's only one.
    pub(crate) outer: OuterConfig,
    /// Every outer recipe of the grid, by its `--outer` name.
    pub(crate) outers: Vec<(String, OuterConfig)>,
    /// Peak inner learning rates of the data-parallel baseline; the best of them (mean over seeds) is the
    /// reference, so DiLoCo is compared with a tuned baseline.
    pub(crate) baseline_lrs: Vec<f64>,
    /// Seeds (model initialisation and data order); every configuration runs once per seed.
    pub(crate) seeds: Vec<u64>,
    /// (k, H) of the outer-optimizer comparison.
    pub(crate) compare: Option<(usize, u64)>,
}

fn parse_compare(s: &str) -> Result<Option<(usize, u64)>> {
    if s == "none" {
        return Ok(None);
    }
    let parsed = s.split_once(':').and_then(|(k, h)| Some((k.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some(kh) => Ok(Some(kh)),
        None => bail!("--outer-compare {s:?}: want K:H (e.g. 4:50) or none"),
    }
}

impl Plan {
    pub(crate) fn from_args(d: &DilocoArgs) -> Result<Plan> {
        let a = &d.sweep;
        let q = a.quick;
        let steps = a.steps.unwrap_or(if q { 24 } else { 1000 });
        let global_batch = a.global_batch.unwrap_or(if q { 8 } else { 16 });
        let seq_len = a.seq_len.unwrap_or(if q { 32 } else { 64 });
        let workers = d.workers.clone().unwrap_or(if q { vec![1, 2] } else { vec![1, 2, 4, 8] });
        let inner_steps = d.inner_steps.clone().unwrap_or(if q { vec![4, 12] } else { vec![10, 50, 200] });
        let compare = match &d.outer_compare {
            Some(s) => parse_compare(s)?,
            None => Some(if q { (2, 4) } else { (4, 50) }),
        };
        let outer = a.outer();
        let outers = d
            .outer
            .clone()
            .unwrap_or_else(|| vec!["default".into()])
            .iter()
            .map(|spec| parse_outer(spec, outer))
            .collect::<Result<Vec<_>>>()?;
        ensure!(d.seeds >= 1, "--seeds must be at least 1");
        let baseline_lrs =
            d.baseline_lr.clone().unwrap_or(if q { vec![a.lr] } else { vec![a.lr / 2.0, a.lr, 2.0 * a.lr] });
        let plan = Plan {
            steps,
            global_batch,
            seq_len,
            workers,
            inner_steps,
            lr: a.lr,
            min_lr: a.lr / 10.0,
            warmup: a.warmup.unwrap_or((steps / 20).max(1)),
            outer,
            outers,
            baseline_lrs,
            compare,
            seeds: (a.seed..a.seed + d.seeds as u64).collect(),
        };
        plan.validate()?;
        Ok(plan)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be positive");
        ensure!(self.global_batch > 0, "--global-batch must be positive");
        ensure!(self.seq_len > 0, "--seq-len must be positive");
        ensure!(!self.workers.is_empty(), "--workers needs at least one worker count");
        ensure!(!self.inner_steps.is_empty(), "--inner-steps needs at least one value");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be positive, got {}", self.lr);
        ensure!(self.warmup <= self.steps, "--warmup {} exceeds --steps {}", self.warmup, self.steps);
        self.outer
            .validate()
            .context("--outer-lr / --outer-momentum / --outer-warmup-rounds / --outer-final-lr-fraction")?;
        ensure!(!self.outers.is_empty(), "--outer needs at least one recipe");
        ensure!(!self.baseline_lrs.is_empty(), "--baseline-lr needs at least one value");
        for &lr in &self.baseline_lrs {
            ensure!(lr.is_finite() && lr > 0.0, "--baseline-lr must be positive, got {lr}");
        }
        let ks = self.workers.iter().copied().chain(self.compare.map(|(k, _)| k));
        for k in ks {
            ensure!(k > 0, "a worker count must be at least 1");
            ensure!(
                self.global_batch.is_multiple_of(k),
                "--global-batch {} is not divisible by {k} workers (each worker takes G/k windows per step)",
                self.global_batch
            );
        }
        for h in self.inner_steps.iter().copied().chain(self.compare.map(|(_, h)| h)) {
            ensure!(h > 0, "inner steps per round must be at least 1");
            ensure!(
                self.steps.is_multiple_of(h),
                "--steps {} is not divisible by H = {h} (every configuration runs S/H whole rounds)",
                self.steps
            );
        }
        Ok(())
    }

    /// Every (k, H) the sweep runs, the comparison point included.
    pub(crate) fn grid(&self) -> Vec<(usize, u64)> {
        let mut grid: Vec<(usize, u64)> =
            self.workers.iter().flat_map(|&k| self.inner_steps.iter().map(move |&h| (k, h))).collect();
        if let Some(kh) = self.compare {
            if !grid.contains(&kh) {
                grid.push(kh);
            }
        }
        grid
    }

    /// The size of the window pool: the largest multiple of every unit size (G for the baseline, H·G/k for
    /// DiLoCo) that the training split holds.
    fn pool_windows(&self, available: usize) -> Result<usize> {
        let mut l = self.global_batch;
        for (k, h) in self.grid() {
            let unit = h as usize * (self.global_batch / k);
            l = lcm(l, unit).context("the unit sizes' least common multiple overflows")?;
        }
        ensure!(
            available >= l,
            "the training split holds {available} windows of {} tokens, fewer than {l} (the least common multiple \
             of every configuration's unit of H·G/k windows); use a larger corpus or smaller --inner-steps, \
             --global-batch or --seq-len",
            self.seq_len + 1
        );
        Ok(available / l * l)
    }

    /// The inner loop of a run at peak learning rate `lr` (cosine to a tenth of it).
    fn train_config(&self, batch_size: usize, lr: f64, seed: u64) -> TrainConfig {
        TrainConfig {
            seed,
            steps: self.steps,
            batch_size,
            seq_len: self.seq_len,
            lr,
            min_lr: lr / 10.0,
            warmup_steps: self.warmup,
            ..TrainConfig::default()
        }
    }
}

fn lcm(a: usize, b: usize) -> Option<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    (a / gcd(a, b)).checked_mul(b)
}

/// What one configuration reached.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    /// "data_parallel" or "diloco".
    pub(crate) method: &'static str,
    /// DiLoCo workers (None for the baseline, whose update does not depend on the worker count).
    pub(crate) workers: Option<usize>,
    pub(crate) inner_steps: u64,
    pub(crate) rounds: u64,
    pub(crate) outer: Option<OuterConfig>,
    /// The `--outer` recipe's name (None for the baseline).
    pub(crate) recipe: Option<String>,
    /// Peak inner learning rate.
    pub(crate) lr: f64,
    pub(crate) seed: u64,
    pub(crate) val_loss: f64,
    /// 100 · (val_loss − baseline) / baseline.
    pub(crate) gap_percent: f64,
    /// Every payload byte a worker uploaded (for DiLoCo: the agora header and checksum included).
    pub(crate) bytes_sent_per_worker: u64,
    /// Data-parallel bytes per worker ÷ these.
    pub(crate) fewer_bytes: f64,
    /// Mean training loss over the last round's inner steps (each worker's local loss, averaged).
    pub(crate) last_train_loss: f64,
    pub(crate) seconds: f64,
}

/// Shared by every configuration: the model shape, the window pool and the validation split.
pub(crate) struct Setup {
    pub(crate) plan: Plan,
    pub(crate) model: LlamaConfig,
    pub(crate) parameters: u64,
    train: Shard,
    /// Windows every configuration trains on (the first this many of [`cut_units`]' shuffled order).
    pub(crate) pool_windows: usize,
    tokenizer_hash: [u8; 32],
    pub(crate) val: Shard,
}

impl Setup {
    pub(crate) fn bytes_per_sync(&self) -> u64 {
        4 * self.parameters
    }

    /// The pool cut into units of `windows` windows, each a shard of its own. [`cut_units`] shuffles the
    /// windows independently of the unit size and unit `j` holds windows `j·u .. (j+1)·u` of that order, so
    /// the first `pool_windows / u` units of any size `u` hold the same windows (for one `seed`).
    fn units(&self, windows: usize, seed: u64) -> Result<Vec<Shard>> {
        assert_eq!(self.pool_windows % windows, 0, "the pool is a multiple of every unit size");
        let cut = cut_units(self.train.tokens(), self.plan.seq_len, windows, seed);
        cut.units
            .into_iter()
            .take(self.pool_windows / windows)
            .map(|u| Shard::from_tokens(u, self.tokenizer_hash, self.model.vocab_size))
            .collect()
    }

    pub(crate) fn val_loss(&self, model: &Llama) -> Result<f64> {
        evaluate(model, &self.val, self.plan.seq_len, self.plan.global_batch, usize::MAX)
    }
}

/// The sequence of units the run visits: epoch after epoch, each in its [`unit_order`].
struct UnitCursor {
    seed: u64,
    n: usize,
    next: u64,
    order: Vec<u64>,
}

impl UnitCursor {
    fn new(seed: u64, n: usize) -> Self {
        UnitCursor { seed, n, next: 0, order: Vec::new() }
    }

    fn next(&mut self) -> usize {
        let (epoch, i) = (self.next / self.n as u64, (self.next % self.n as u64) as usize);
        if i == 0 {
            self.order = unit_order(self.seed, epoch, self.n);
        }
        self.next += 1;
        self.order[i] as usize
    }
}

fn log_progress(label: &str, done: u64, total: u64, started: Instant, loss: f64) {
    tracing::info!("{label}: {done}/{total} steps, train loss {loss:.3}, {:.0}s", started.elapsed().as_secs_f64());
}

/// The data-parallel baseline at peak inner learning rate `lr`.
pub(crate) fn run_baseline(s: &Setup, lr: f64, seed: u64) -> Result<Outcome> {
    let p = &s.plan;
    let started = Instant::now();
    let units = s.units(p.global_batch, seed)?;
    let mut cursor = UnitCursor::new(seed, units.len());
    let mut trainer = Trainer::new(Llama::new(&s.model, Device::Cpu, seed), p.train_config(p.global_batch, lr, seed))?;
    let schedule = trainer.config.schedule();
    let batch = unit_batches(units[0].len(), p.global_batch, p.seq_len, 1);
    let report_every = (p.steps / 10).max(1);
    let (mut recent, mut recent_n) = (0.0, 0);
    let mut last_train_loss = f64::NAN;
    for step in 0..p.steps {
        let stats = trainer.update_on(&units[cursor.next()], &batch, schedule.lr(step))?;
        recent += stats.loss;
        recent_n += 1;
        if (step + 1) % report_every == 0 || step + 1 == p.steps {
            last_train_loss = recent / recent_n as f64;
            log_progress(
                &format!("data-parallel lr {lr:.1e} seed {seed}"),
                step + 1,
                p.steps,
                started,
                last_train_loss,
            );
            (recent, recent_n) = (0.0, 0);
        }
    }
    let val_loss = s.val_loss(&trainer.model)?;
    Ok(Outcome {
        method: "data_parallel",
        workers: None,
        inner_steps: 1,
        rounds: p.steps,
        outer: None,
        recipe: None,
        lr,
        seed,
        val_loss,
        gap_percent: 0.0,
        bytes_sent_per_worker: p.steps * s.bytes_per_sync(),
        fewer_bytes: 1.0,
        last_train_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// DiLoCo with k workers and H inner steps per round, every pseudo-gradient encoded with `compression`
/// (fp32 for the plain sweep) exactly as networked workers encode it: [`SyncState`] carries each worker's
/// error-feedback residual and, with fragments, its own weights; the coordinator's [`Accumulator`] sums the
/// parsed payloads; the outer step moves the round's fragment.
pub(crate) fn run_diloco(
    s: &Setup,
    k: usize,
    h: u64,
    (recipe, outer): (&str, OuterConfig),
    compression: &CompressionConfig,
    seed: u64,
) -> Result<Outcome> {
    let p = &s.plan;
    let started = Instant::now();
    let batch = p.global_batch / k;
    let units = s.units(h as usize * batch, seed)?;
    let mut cursor = UnitCursor::new(seed, units.len());
    let global_model = Llama::new(&s.model, Device::Cpu, seed);
    let global = model_weights(&global_model);
    let mut workers: Vec<Trainer> = (0..k)
        .map(|_| Trainer::new(Llama::zeros(&s.model, Device::Cpu), p.train_config(batch, p.lr, seed)))
        .collect::<Result<_>>()?;
    let mut outer_opt = OuterOptimizer::new(outer, &global);
    let specs = param_specs(&s.model);
    let plan = FragmentPlan::new(&specs, s.model.num_hidden_layers, compression.fragments)?;
    let fragment_specs: Vec<_> = (0..plan.count()).map(|f| plan.specs(&specs, f)).collect();
    let mut syncs: Vec<SyncState> = (0..k).map(|_| SyncState::new(&specs, compression)).collect();
    let rounds = p.steps / h;
    let report_every = (rounds / 10).max(1);
    let label = format!("DiLoCo k={k} H={h} outer {recipe} {} seed {seed}", compression.describe());
    let mut last_train_loss = f64::NAN;
    let mut payload_bytes = 0u64;
    let no_metadata = std::collections::BTreeMap::new();
    for round in 0..rounds {
        let fragment = plan.synced_in(round);
        let expected = Expected { config: compression, fragment, specs: &fragment_specs[fragment] };
        let mut sum = Accumulator::new(*compression, fragment_specs[fragment].clone());
        let mut loss = 0.0;
        for (worker, sync) in workers.iter_mut().zip(syncs.iter_mut()) {
            let unit = &units[cursor.next()];
            let start = sync.start_weights(compression, &plan, round, &global);
            let (local, stats) = train_round(worker, &start, unit, round * h, h, |_, _| {})?;
            let upload = sync.prepare_upload(compression, &plan, &specs, round, &global, local, &no_metadata);
            payload_bytes += upload.payload.len() as u64;
            sum.add(&codec::parse(&upload.payload, expected).context("a worker's own payload")?);
            sync.accepted(&plan, upload.fragment, upload.residual);
            loss += stats.mean_loss / k as f64;
        }
        let outer_lr = outer.lr_at(round, rounds);
        outer_opt.step_subset(&plan.tensors(fragment), &global, &from_named(&sum.mean(), Device::Cpu), outer_lr);
        last_train_loss = loss;
        if (round + 1) % report_every == 0 || round + 1 == rounds {
            log_progress(&label, (round + 1) * h, p.steps, started, loss);
        }
    }
    load_weights(&global_model, &global);
    let val_loss = s.val_loss(&global_model)?;
    let bytes = payload_bytes / k as u64;
    Ok(Outcome {
        method: "diloco",
        workers: Some(k),
        inner_steps: h,
        rounds,
        outer: Some(outer),
        recipe: Some(recipe.to_string()),
        lr: p.lr,
        seed,
        val_loss,
        gap_percent: 0.0,
        bytes_sent_per_worker: bytes,
        fewer_bytes: (p.steps * s.bytes_per_sync()) as f64 / bytes as f64,
        last_train_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub(crate) fn prepare_setup(a: &SweepArgs, plan: Plan) -> Result<(Setup, serde_json::Value)> {
    let scratch = tempfile::tempdir()?;
    let data = super::corpus(a.data.clone(), scratch.path())?;
    let vocab = match a.vocab_size {
        Some(v) => v,
        None => agora_model::config::preset_vocab_size(&a.preset)
            .with_context(|| format!("--preset {}: unknown preset", a.preset))?,
    };
    let started = Instant::now();
    let tokenizer = train_bpe(std::slice::from_ref(&data), vocab)?;
    let report = prepare(std::slice::from_ref(&data), &tokenizer, scratch.path(), 0.1)?;
    let train = Shard::open(&report.train_path)?;
    let val = Shard::open(&report.val_path)?;
    tracing::info!(
        "{}: {}-token BPE, {} training and {} validation tokens ({:.1}s)",
        data.display(),
        tokenizer.vocab_size(),
        train.len(),
        val.len(),
        started.elapsed().as_secs_f64()
    );
    let mut model = preset(&a.preset, Some(tokenizer.vocab_size()))?;
    model.bos_token_id = Some(tokenizer.bos_id());
    model.eos_token_id = Some(tokenizer.eos_id().into());
    ensure!(
        plan.seq_len <= model.max_position_embeddings,
        "--seq-len {} exceeds the {} preset's context of {}",
        plan.seq_len,
        a.preset,
        model.max_position_embeddings
    );
    ensure!(
        val.len() > plan.seq_len,
        "the validation split ({} tokens) is shorter than one window of --seq-len {} + 1",
        val.len(),
        plan.seq_len
    );
    let available = train.len().saturating_sub(1) / plan.seq_len;
    let pool_windows = plan.pool_windows(available)?;
    let parameters = Llama::zeros(&model, Device::Cpu).num_parameters() as u64;
    let data = serde_json::json!({
        "path": data, "vocab_size": tokenizer.vocab_size(), "train_tokens": train.len(),
        "val_tokens": val.len(), "available_windows": available, "pool_windows": pool_windows,
    });
    let setup = Setup { plan, model, parameters, train, pool_windows, tokenizer_hash: tokenizer.hash(), val };
    Ok((setup, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DilocoArgs {
        DilocoArgs {
            sweep: SweepArgs::default(),
            workers: None,
            inner_steps: None,
            outer_compare: None,
            outer: None,
            baseline_lr: None,
            seeds: 1,
        }
    }

    #[test]
    fn default_plan_is_valid_and_its_pool_fits_every_unit() {
        let plan = Plan::from_args(&args()).unwrap();
        assert_eq!(plan.grid().len(), 12, "4:50 is in the default grid");
        // Units: 16 (baseline) and H·16/k; the largest is 200·16 = 3200 and every other one divides it.
        assert_eq!(plan.pool_windows(8283).unwrap(), 6400);
        assert!(plan.pool_windows(3199).is_err());
        Plan::from_args(&DilocoArgs { sweep: SweepArgs { quick: true, ..SweepArgs::default() }, ..args() }).unwrap();
    }

    #[test]
    fn bad_arguments_are_refused() {
        let bad = |a: DilocoArgs| Plan::from_args(&a).unwrap_err().to_string();
        assert!(bad(DilocoArgs { workers: Some(vec![3]), ..args() }).contains("not divisible by 3 workers"));
        assert!(bad(DilocoArgs { inner_steps: Some(vec![30]), ..args() }).contains("not divisible by H = 30"));
        assert!(bad(DilocoArgs { outer_compare: Some("4x50".into()), ..args() }).contains("want K:H"));
        assert!(bad(DilocoArgs { sweep: SweepArgs { outer_lr: Some(0.0), ..SweepArgs::default() }, ..args() })
            .contains("outer"));
        assert!(bad(DilocoArgs { sweep: SweepArgs { steps: Some(0), ..SweepArgs::default() }, ..args() })
            .contains("--steps"));
        assert!(Plan::from_args(&DilocoArgs { outer_compare: Some("none".into()), ..args() })
            .unwrap()
            .compare
            .is_none());
    }

    #[test]
    fn outer_recipes_parse_and_bad_ones_are_refused() {
        let default = OuterConfig::default();
        assert_eq!(parse_outer("default", default).unwrap().1, default);
        assert_eq!(parse_outer("old", default).unwrap().1, OuterConfig::CONSTANT_NESTEROV);
        let c = parse_outer("nesterov:1:0.6:4:0.5", default).unwrap().1;
        assert_eq!(
            (c.kind, c.lr, c.momentum, c.warmup_rounds, c.final_lr_fraction),
            (OuterKind::Nesterov, 1.0, 0.6, 4, 0.5)
        );
        assert_eq!(parse_outer("average:1", default).unwrap().1, OuterConfig::constant(OuterKind::Average, 1.0, 0.0));
        for bad in ["adam:1", "nesterov", "nesterov:x", "nesterov:1:1.0", "nesterov:1:0.5:2:0", "nesterov:1:0:1.5"] {
            assert!(parse_outer(bad, default).is_err(), "{bad} parsed");
        }
        // The --outer-* flags override the default recipe only.
        let a = SweepArgs { outer_lr: Some(1.0), outer_warmup_rounds: Some(3), ..SweepArgs::default() };
        assert_eq!((a.outer().lr, a.outer().warmup_rounds, a.outer().momentum), (1.0, 3, default.momentum));
    }

    #[test]
    fn seeds_and_baseline_rates_shape_the_plan() {
        let plan = Plan::from_args(&DilocoArgs { seeds: 3, ..args() }).unwrap();
        assert_eq!(plan.seeds, vec![0, 1, 2]);
        assert_eq!(plan.baseline_lrs, vec![1.5e-3, 3e-3, 6e-3], "half, once and twice --lr");
        assert!(Plan::from_args(&DilocoArgs { seeds: 0, ..args() }).is_err());
        assert!(Plan::from_args(&DilocoArgs { baseline_lr: Some(vec![-1.0]), ..args() }).is_err());
        let two = Plan::from_args(&DilocoArgs { outer: Some(vec!["default".into(), "old".into()]), ..args() }).unwrap();
        assert_eq!(two.outers.len(), 2);
    }

    /// Every unit size keeps the same windows: a random subset of the split, not a prefix.
    #[test]
    fn every_unit_size_trains_on_the_same_pool() {
        let plan =
            Plan { workers: vec![1, 2], inner_steps: vec![3], compare: None, ..Plan::from_args(&args()).unwrap() };
        let seq_len = plan.seq_len;
        let n = 1000 * seq_len + 1;
        let train = Shard::from_tokens((0..n as u32).collect(), [0; 32], n).unwrap();
        let val = Shard::from_tokens(vec![0; 200], [0; 32], 512).unwrap();
        let pool_windows = plan.pool_windows(1000).unwrap();
        assert_eq!(pool_windows, 960, "units of 16, 48 and 24 windows");
        let model = preset("tiny", Some(n)).unwrap();
        let setup = Setup { plan, model, parameters: 0, train, pool_windows, tokenizer_hash: [0; 32], val };
        let windows = |unit: usize| {
            let units = setup.units(unit, 0).unwrap();
            assert_eq!(units.len() * unit, pool_windows);
            let mut starts: Vec<u32> =
                units.iter().flat_map(|u| u.tokens().chunks(seq_len + 1).map(|w| w[0])).collect();
            starts.sort();
            starts
        };
        let pool = windows(16);
        assert_eq!(pool, windows(48));
        assert_eq!(pool, windows(24));
        assert!(pool.windows(2).all(|w| w[0] != w[1]), "no window twice");
        assert!(*pool.last().unwrap() as usize > 990 * seq_len, "drawn from the whole split, not a prefix");
    }

    #[test]
    fn the_cursor_visits_every_unit_once_per_epoch() {
        let mut c = UnitCursor::new(3, 5);
        for _ in 0..3 {
            let mut epoch: Vec<usize> = (0..5).map(|_| c.next()).collect();
            epoch.sort();
            assert_eq!(epoch, vec![0, 1, 2, 3, 4]);
        }
    }
}
