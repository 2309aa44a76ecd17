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
//!   weights, takes `H` AdamW steps (with `--round-lr-power` P > 0 its round's own length, from the
//!   run's [`RoundPlan`], as the coordinator's) with batch `G/k` on its own data ([`train_round`]; each worker keeps
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
//! `(r·k + i)`-th unit of that sequence; rounds of other lengths cut the same stream of windows at other
//! places ([`WindowStream`]). Validation loss is [`evaluate`] over every window of the held-out
//! split.
//!
//! [`mean`]: agora_diloco::mean

mod plan;

pub use plan::SweepArgs;
pub(crate) use plan::{LrScaling, Plan};

use agora_data::{prepare, train_bpe, Shard};
use agora_diloco::codec::{self, Accumulator, Expected};
use agora_diloco::tensors::{from_named, load_weights, model_weights, param_specs};
use agora_diloco::{
    cut_units, default_unit_steps, train_round, train_round_overlapped, unit_batches, unit_order, CompressionConfig,
    FragmentPlan, OuterConfig, OuterOptimizer, RoundPlan, SyncState,
};
use agora_model::{preset, Llama, LlamaConfig};
use agora_train::{evaluate, Trainer};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use std::time::Instant;
use tch::Device;
use tch::Tensor;

/// What one configuration reached.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    /// "data_parallel" or "diloco".
    pub(crate) method: &'static str,
    /// DiLoCo workers (None for the baseline, whose update does not depend on the worker count).
    pub(crate) workers: Option<usize>,
    pub(crate) inner_steps: u64,
    pub(crate) rounds: u64,
    /// Inner steps of each round, in order (None for the baseline): all `inner_steps` unless
    /// `--round-lr-power` made them follow the learning rate.
    pub(crate) round_lengths: Option<Vec<u64>>,
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

/// The windows a DiLoCo run visits: unit after unit in [`UnitCursor`] order, each unit's windows in order. A
/// worker's round takes the next `steps · batch` of them, so with rounds of H steps it takes exactly the next
/// unit (`r·k + i` for worker i of round r, as ever), and with rounds of other lengths the same stream cut at
/// other places.
struct WindowStream<'a> {
    units: &'a [Shard],
    cursor: UnitCursor,
    /// The unit being read and how many of its windows were taken.
    current: Option<(usize, usize)>,
    /// Tokens per window (seq_len + 1).
    window: usize,
}

impl<'a> WindowStream<'a> {
    fn new(units: &'a [Shard], cursor: UnitCursor, window: usize) -> Self {
        WindowStream { units, cursor, current: None, window }
    }

    fn take(&mut self, windows: usize, s: &Setup) -> Result<Shard> {
        let mut tokens = Vec::with_capacity(windows * self.window);
        let mut needed = windows;
        while needed > 0 {
            let (unit, used) = self.current.unwrap_or_else(|| (self.cursor.next(), 0));
            let unit_windows = self.units[unit].len() / self.window;
            let n = needed.min(unit_windows - used);
            tokens.extend_from_slice(&self.units[unit].tokens()[used * self.window..(used + n) * self.window]);
            needed -= n;
            self.current = if used + n == unit_windows { None } else { Some((unit, used + n)) };
        }
        Shard::from_tokens(tokens, s.tokenizer_hash, s.model.vocab_size)
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
        round_lengths: None,
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
/// (fp32 for the plain sweep; its `overlap_steps` and `merge` the Streaming DiLoCo overlap) exactly as networked workers encode it: [`SyncState`] carries each worker's
/// error-feedback residual and, with fragments or overlap, its own weights; the coordinator's [`Accumulator`] sums the
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
    let overlap = compression.overlap();
    let started = Instant::now();
    let batch = p.global_batch / k;
    let lr = p.inner_lr(k);
    let units = s.units(h as usize * batch, seed)?;
    let mut windows = WindowStream::new(&units, UnitCursor::new(seed, units.len()), p.seq_len + 1);
    let global_model = Llama::new(&s.model, Device::Cpu, seed);
    let global = model_weights(&global_model);
    let mut workers: Vec<Trainer> = (0..k)
        .map(|_| Trainer::new(Llama::zeros(&s.model, Device::Cpu), p.train_config(batch, lr, seed)))
        .collect::<Result<_>>()?;
    let mut outer_opt = OuterOptimizer::new(outer, &global);
    let specs = param_specs(&s.model);
    let plan = FragmentPlan::new(&specs, s.model.num_hidden_layers, compression.fragments)?;
    let fragment_specs: Vec<_> = (0..plan.count()).map(|f| plan.specs(&specs, f)).collect();
    let mut syncs: Vec<SyncState> = (0..k).map(|_| SyncState::new(&specs, compression)).collect();
    let rounds = p.steps / h;
    let unit_steps = p.unit_steps.unwrap_or_else(|| default_unit_steps(h, p.round_lr_power));
    let schedule = p.train_config(batch, lr, seed).schedule();
    // The coordinator's plan of the same run: round lengths in whole units, the rounds and steps of S/H.
    let round_plan = RoundPlan::new(&schedule, rounds, h, p.round_lr_power, unit_steps)?;
    let shortest = round_plan.shortest();
    overlap.validate(shortest)?;
    let report_every = (rounds / 10).max(1);
    let overlapped =
        if overlap.is_on() { format!(" overlap {} merge {}", overlap.steps, overlap.merge) } else { String::new() };
    let round_lengths = round_plan.lengths();
    let longest = round_lengths.iter().max().expect("at least one round");
    let lengths = if p.round_lr_power > 0.0 {
        format!(" rounds following lr^{}: {shortest}..{longest} steps", p.round_lr_power)
    } else {
        String::new()
    };
    let label = format!(
        "DiLoCo k={k} H={h}{lengths} lr {lr:.1e} outer {recipe} {}{overlapped} seed {seed}",
        compression.describe()
    );
    let mut last_train_loss = f64::NAN;
    let mut payload_bytes = 0u64;
    let no_metadata = std::collections::BTreeMap::new();
    for round in 0..rounds {
        let fragment = plan.synced_in(round);
        let expected = Expected { config: compression, fragment, specs: &fragment_specs[fragment] };
        let mut sum = Accumulator::new(*compression, fragment_specs[fragment].clone());
        let mut loss = 0.0;
        let (first, steps) = (round_plan.first_step(round), round_plan.steps(round));
        for (worker, sync) in workers.iter_mut().zip(syncs.iter_mut()) {
            let unit = &windows.take(steps as usize * batch, s)?;
            let (local, stats) = if overlap.is_on() {
                // `global` already holds round − 1's outer step: the worker starts without it and blends
                // its fragment in τ steps later, as a networked worker would when it arrives.
                let start = sync.overlapped_start(compression, &plan, round, &global);
                let merge = |w: &mut [Tensor]| sync.merge_late(&plan, round, &global, &start, w, overlap.merge);
                train_round_overlapped(worker, &start, unit, first, steps, overlap.steps, merge)?
            } else {
                let start = sync.start_weights(compression, &plan, round, &global);
                train_round(worker, &start, unit, first, steps, |_, _| {})?
            };
            let upload = sync.prepare_upload(compression, &plan, &specs, round, &global, local, &no_metadata);
            payload_bytes += upload.payload.len() as u64;
            sum.add(&codec::parse(&upload.payload, expected).context("a worker's own payload")?);
            sync.accepted(&plan, upload.fragment, upload.residual);
            loss += stats.mean_loss / k as f64;
        }
        let (lr, mu) = outer.step_at(round, rounds, k, round + 1 == rounds);
        outer_opt.step_subset(&plan.tensors(fragment), &global, &from_named(&sum.mean(), Device::Cpu), lr, mu);
        last_train_loss = loss;
        if (round + 1) % report_every == 0 || round + 1 == rounds {
            log_progress(&label, round_plan.first_step(round + 1), p.steps, started, loss);
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
        round_lengths: Some(round_lengths),
        outer: Some(outer),
        recipe: Some(recipe.to_string()),
        lr,
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
    use super::plan::tests::args;
    use super::*;

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

    /// Rounds of H steps take exactly the next unit each, as before round lengths could vary; rounds of other
    /// lengths cut the same stream of windows elsewhere, every window taken once per epoch.
    #[test]
    fn rounds_of_any_length_read_the_same_window_stream() {
        let (window, per_unit) = (5, 4);
        let tokens = |u: usize| (0..window * per_unit).map(|t| (u * 100 + t) as u32).collect::<Vec<u32>>();
        let units: Vec<Shard> = (0..6).map(|u| Shard::from_tokens(tokens(u), [0; 32], 1000).unwrap()).collect();
        let plan = Plan { workers: vec![1], inner_steps: vec![4], compare: None, ..Plan::from_args(&args()).unwrap() };
        let model = preset("tiny", Some(1000)).unwrap();
        let flat = Shard::from_tokens(vec![0; 64], [0; 32], 1000).unwrap();
        let setup = Setup {
            plan,
            model,
            parameters: 0,
            train: flat.clone(),
            pool_windows: 24,
            tokenizer_hash: [0; 32],
            val: flat,
        };
        let mut cursor = UnitCursor::new(7, units.len());
        let order: Vec<usize> = (0..12).map(|_| cursor.next()).collect();
        let mut equal = WindowStream::new(&units, UnitCursor::new(7, units.len()), window);
        for &u in &order {
            assert_eq!(equal.take(per_unit, &setup).unwrap().tokens(), units[u].tokens(), "one round, one unit");
        }
        let mut uneven = WindowStream::new(&units, UnitCursor::new(7, units.len()), window);
        let taken: Vec<u32> = [1, 3, 6, 2, 10, 2, 24]
            .iter()
            .flat_map(|&w| {
                let shard = uneven.take(w, &setup).unwrap();
                assert_eq!(shard.len(), w * window);
                shard.tokens().to_vec()
            })
            .collect();
        let stream: Vec<u32> = order.iter().flat_map(|&u| units[u].tokens().to_vec()).collect();
        assert_eq!(taken, stream, "the same windows in the same order, cut at other places");
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
