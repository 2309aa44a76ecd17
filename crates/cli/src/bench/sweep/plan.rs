//! The flags every equal-token sweep shares and the plan they resolve to: budget, schedules, the grid of
//! (k, H), outer recipes, baseline learning rates, seeds and the window pool's size.

use super::super::diloco::DilocoArgs;
use agora_diloco::{OuterConfig, OuterKind};
use agora_train::{AdamWConfig, TrainConfig};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

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
    /// Peak inner AdamW learning rate (cosine to a tenth of it): every configuration's, or with
    /// `--lr-scaling sqrt` the rate at the global batch G.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// How DiLoCo's inner learning rate follows its workers' batch G/k: `constant` (--lr whatever k) or
    /// `sqrt` (--lr / √k, Adam's square-root rule for a batch k times smaller).
    #[arg(long, value_enum, default_value_t = LrScaling::Constant)]
    pub lr_scaling: LrScaling,
    /// Warmup steps of the inner schedule (default: S/20).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Where every inner cosine ends, as a fraction of its peak (the run file's `train.min_lr` / `train.lr`;
    /// default 0.1, theirs).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_fraction: f64,
    /// The inner AdamW's β1, every configuration's, the baseline's included (default: the run file's 0.9).
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// The inner AdamW's β2, every configuration's, the baseline's included (default: the run file's 0.95).
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// The inner AdamW's decoupled weight decay, every configuration's, the baseline's included (default:
    /// the run file's 0.1).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// The bound on every inner step's global gradient norm, every configuration's, the baseline's included
    /// (0: no clipping; default: the run file's 1).
    #[arg(long)]
    pub grad_clip: Option<f64>,
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
    /// The default outer recipe's momentum at the last round, as a fraction of --outer-momentum (default: the
    /// run file's; the final momentum must stay below 1).
    #[arg(long)]
    pub outer_final_momentum_fraction: Option<f64>,
    /// Rounds with fewer pseudo-gradients than this step at lr · √(n / this), every recipe's but `old`
    /// (default: the run file's).
    #[arg(long)]
    pub outer_full_lr_contributions: Option<u64>,
    /// Whether the last outer step takes no momentum, every recipe's but `old` (default: the run file's).
    #[arg(long)]
    pub outer_average_last_step: Option<bool>,
    /// Round lengths that follow the inner learning rate: each round holds an equal share of
    /// Σ (lr_t / peak)^P over the run's steps, the number of rounds (S/H) unchanged; 0: every round H steps.
    /// The outer schedule still counts rounds (its warmup then spans fewer steps). Default: the run file's
    /// `[inner] round_lr_power`.
    #[arg(long)]
    pub round_lr_power: Option<f64>,
    /// Inner steps in one data unit: every round length is a whole number of them (default: a round when
    /// rounds are equal, else the largest divisor of H up to H/5, the run file's rule). Divides every H.
    #[arg(long)]
    pub unit_steps: Option<u64>,
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
            lr_scaling: LrScaling::Constant,
            warmup: None,
            min_lr_fraction: 0.1,
            adam_beta1: None,
            adam_beta2: None,
            weight_decay: None,
            grad_clip: None,
            outer_lr: None,
            outer_momentum: None,
            outer_warmup_rounds: None,
            outer_final_lr_fraction: None,
            outer_final_momentum_fraction: None,
            outer_full_lr_contributions: None,
            outer_average_last_step: None,
            round_lr_power: None,
            unit_steps: None,
            seed: 0,
            threads: None,
            quick: false,
            json: false,
        }
    }
}

/// How a DiLoCo worker's peak inner learning rate relates to `--lr` (the rate at the global batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrScaling {
    /// Every configuration at `--lr`.
    Constant,
    /// `--lr / √k`: a worker's batch is G/k, and Adam's best rate falls about as the square root of the batch.
    /// At k = 4 it turns the data-parallel run's best 6e-3 into the 3e-3 DiLoCo does best at, but it did not
    /// help at k = 1 or 8 (BENCHMARKS.md, issue 12): it is a sweep option, not the recipe.
    Sqrt,
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
            final_momentum_fraction: self.outer_final_momentum_fraction.unwrap_or(d.final_momentum_fraction),
            full_lr_contributions: self.outer_full_lr_contributions.unwrap_or(d.full_lr_contributions),
            average_last_step: self.outer_average_last_step.unwrap_or(d.average_last_step),
            ..d
        }
    }
}

/// One outer recipe of `--outer`: `default` (the run file's default with the `--outer-*` overrides), `old`
/// (constant Nesterov lr 0.7, momentum 0.9: the default before issue 12), or
/// `KIND:LR[:MOMENTUM[:WARMUP_ROUNDS[:FINAL_LR_FRACTION[:FINAL_MOMENTUM_FRACTION]]]]` with KIND nesterov,
/// sgd_momentum or average, which takes `full_lr_contributions` and `average_last_step` from the default.
pub(crate) fn parse_outer(spec: &str, default: OuterConfig) -> Result<(String, OuterConfig)> {
    let config = match spec.trim() {
        "default" => default,
        "old" => OuterConfig::CONSTANT_NESTEROV,
        s => {
            let parts: Vec<&str> = s.split(':').map(str::trim).collect();
            ensure!(
                (2..=6).contains(&parts.len()),
                "--outer {s:?}: want default, old or \
                 KIND:LR[:MOMENTUM[:WARMUP_ROUNDS[:FINAL_LR_FRACTION[:FINAL_MOMENTUM_FRACTION]]]]"
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
                final_momentum_fraction: field(&parts, 5, s, "final momentum fraction")?.unwrap_or(1.0),
                full_lr_contributions: default.full_lr_contributions,
                average_last_step: default.average_last_step,
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
    pub(crate) lr_scaling: LrScaling,
    /// Every inner cosine's floor, as a fraction of its peak.
    pub(crate) min_lr_fraction: f64,
    pub(crate) warmup: u64,
    /// Round lengths follow the inner rate to this power ([`agora_diloco::round_starts`]); 0: equal rounds.
    pub(crate) round_lr_power: f64,
    /// Steps per data unit (`--unit-steps`); None: `agora_diloco::default_unit_steps` for each H.
    pub(crate) unit_steps: Option<u64>,
    /// Every configuration's inner AdamW (β1, β2 and weight decay from the flags; ε the run file's default).
    pub(crate) adamw: AdamWConfig,
    /// Every configuration's gradient-norm bound (0: none).
    pub(crate) grad_clip: f64,
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
            lr_scaling: a.lr_scaling,
            min_lr_fraction: a.min_lr_fraction,
            warmup: a.warmup.unwrap_or((steps / 20).max(1)),
            round_lr_power: a.round_lr_power.unwrap_or(agora_diloco::DEFAULT_ROUND_LR_POWER),
            unit_steps: a.unit_steps,
            adamw: {
                let d = AdamWConfig::default();
                AdamWConfig {
                    beta1: a.adam_beta1.unwrap_or(d.beta1),
                    beta2: a.adam_beta2.unwrap_or(d.beta2),
                    weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
                    ..d
                }
            },
            grad_clip: a.grad_clip.unwrap_or(TrainConfig::default().grad_clip),
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
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_fraction),
            "--min-lr-fraction must be in [0, 1], got {}",
            self.min_lr_fraction
        );
        let p = self.round_lr_power;
        ensure!(p.is_finite() && p >= 0.0, "--round-lr-power must be at least 0, got {p}");
        if let Some(u) = self.unit_steps {
            let every_h = self.inner_steps.iter().copied().chain(self.compare.map(|(_, h)| h));
            ensure!(
                u > 0 && self.steps.is_multiple_of(u) && every_h.clone().all(|h| h.is_multiple_of(u)),
                "--unit-steps must divide --steps {} and every --inner-steps H ({:?}), got {u}",
                self.steps,
                every_h.collect::<Vec<_>>()
            );
        }
        for (flag, beta) in [("--adam-beta1", self.adamw.beta1), ("--adam-beta2", self.adamw.beta2)] {
            ensure!((0.0..1.0).contains(&beta), "{flag} must be in [0, 1), got {beta}");
        }
        let clip = self.grad_clip;
        ensure!(clip.is_finite() && clip >= 0.0, "--grad-clip must be at least 0 (0: no clipping), got {clip}");
        let wd = self.adamw.weight_decay;
        ensure!(wd.is_finite() && wd >= 0.0, "--weight-decay must be at least 0, got {wd}");
        self.outer.validate().context(
            "--outer-lr / --outer-momentum / --outer-warmup-rounds / --outer-final-lr-fraction / \
                 --outer-final-momentum-fraction / --outer-full-lr-contributions",
        )?;
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
    pub(super) fn pool_windows(&self, available: usize) -> Result<usize> {
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

    /// The peak inner learning rate of a DiLoCo worker when `k` workers share the global batch.
    pub(crate) fn inner_lr(&self, k: usize) -> f64 {
        match self.lr_scaling {
            LrScaling::Constant => self.lr,
            LrScaling::Sqrt => self.lr / (k as f64).sqrt(),
        }
    }

    /// The inner loop of a run at peak learning rate `lr` (cosine to `min_lr_fraction` of it).
    pub(super) fn train_config(&self, batch_size: usize, lr: f64, seed: u64) -> TrainConfig {
        TrainConfig {
            seed,
            steps: self.steps,
            batch_size,
            seq_len: self.seq_len,
            lr,
            min_lr: lr * self.min_lr_fraction,
            warmup_steps: self.warmup,
            adamw: self.adamw,
            grad_clip: self.grad_clip,
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `agora bench diloco` with every flag at its default.
    pub(in super::super) fn args() -> DilocoArgs {
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
        assert_eq!(c.final_momentum_fraction, 1.0, "constant momentum unless given");
        let c = parse_outer("nesterov:1:0.6:4:1:0", default).unwrap().1;
        assert_eq!((c.final_lr_fraction, c.final_momentum_fraction), (1.0, 0.0));
        assert_eq!(
            parse_outer("average:1", default).unwrap().1,
            OuterConfig {
                full_lr_contributions: 2,
                average_last_step: true,
                ..OuterConfig::constant(OuterKind::Average, 1.0, 0.0)
            }
        );
        for bad in [
            "adam:1",
            "nesterov",
            "nesterov:x",
            "nesterov:1:1.0",
            "nesterov:1:0.5:2:0",
            "nesterov:1:0:1.5",
            "nesterov:1:0.6:4:1:1.7",
            "nesterov:1:0.6:4:1:0:7",
        ] {
            assert!(parse_outer(bad, default).is_err(), "{bad} parsed");
        }
        // An explicit recipe takes the default's contributions rule and last step; `old` has neither.
        assert_eq!(parse_outer("nesterov:1:0.6:4:1:1.25", default).unwrap().1, default);
        let old = parse_outer("old", default).unwrap().1;
        assert_eq!((old.full_lr_contributions, old.average_last_step), (1, false));
        let a = SweepArgs {
            outer_full_lr_contributions: Some(1),
            outer_average_last_step: Some(false),
            ..SweepArgs::default()
        };
        let plain = parse_outer("nesterov:1:0.4", a.outer()).unwrap().1;
        assert_eq!((plain.full_lr_contributions, plain.average_last_step, plain.momentum), (1, false, 0.4));
        assert!(parse_outer("default", SweepArgs { outer_full_lr_contributions: Some(0), ..a }.outer()).is_err());
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

    #[test]
    fn the_sqrt_rule_scales_the_inner_rate_by_the_worker_batch() {
        let constant = Plan::from_args(&args()).unwrap();
        assert_eq!((constant.inner_lr(1), constant.inner_lr(8)), (3e-3, 3e-3));
        let sweep = SweepArgs { lr: 6e-3, lr_scaling: LrScaling::Sqrt, ..SweepArgs::default() };
        let sqrt = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        assert_eq!(sqrt.inner_lr(1), 6e-3);
        assert!((sqrt.inner_lr(4) - 3e-3).abs() < 1e-12);
        assert!((sqrt.inner_lr(8) - 6e-3 / 8f64.sqrt()).abs() < 1e-12);
        // The baseline's rates still centre on --lr: half, once and twice it.
        assert_eq!(sqrt.baseline_lrs, vec![3e-3, 6e-3, 1.2e-2]);
    }

    /// --min-lr-fraction sets where every inner cosine ends, the baseline's included; outside [0, 1] is refused.
    #[test]
    fn the_inner_floor_follows_the_peak() {
        let default = Plan::from_args(&args()).unwrap().train_config(16, 3e-3, 0);
        assert!((default.min_lr - 3e-4).abs() < 1e-12, "a tenth of the peak, as the run file's 3e-4 of 3e-3");
        let sweep = SweepArgs { min_lr_fraction: 0.3, ..SweepArgs::default() };
        let plan = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        assert!((plan.train_config(4, 2e-3, 0).min_lr - 6e-4).abs() < 1e-12);
        for bad in [-0.1, 1.5, f64::NAN] {
            let sweep = SweepArgs { min_lr_fraction: bad, ..SweepArgs::default() };
            assert!(Plan::from_args(&DilocoArgs { sweep, ..args() }).is_err(), "{bad} accepted");
        }
    }

    /// --round-lr-power reaches the plan (by default the run file's); a negative or non-finite power is
    /// refused, and so is a --unit-steps that does not divide --steps.
    #[test]
    fn round_lengths_that_follow_the_rate_are_validated() {
        let default = Plan::from_args(&args()).unwrap();
        assert_eq!(default.round_lr_power, agora_diloco::DEFAULT_ROUND_LR_POWER, "the run file's by default");
        assert_eq!(default.unit_steps, None);
        let sweep = SweepArgs { round_lr_power: Some(2.5), unit_steps: Some(5), ..SweepArgs::default() };
        let p = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        assert_eq!((p.round_lr_power, p.unit_steps), (2.5, Some(5)));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let sweep = SweepArgs { round_lr_power: Some(bad), ..SweepArgs::default() };
            assert!(Plan::from_args(&DilocoArgs { sweep, ..args() }).is_err(), "{bad} accepted");
        }
        for bad in [0, 7] {
            let sweep = SweepArgs { steps: Some(100), unit_steps: Some(bad), ..SweepArgs::default() };
            assert!(Plan::from_args(&DilocoArgs { sweep, ..args() }).is_err(), "--unit-steps {bad} accepted");
        }
        let with_h = |h: Vec<u64>, u: u64| {
            let sweep = SweepArgs { steps: Some(400), unit_steps: Some(u), ..SweepArgs::default() };
            Plan::from_args(&DilocoArgs { sweep, inner_steps: Some(h), outer_compare: Some("none".into()), ..args() })
        };
        assert!(with_h(vec![10, 200], 10).is_ok());
        assert!(with_h(vec![10, 200], 20).is_err(), "20 does not divide H = 10");
    }

    /// --adam-beta1/2 and --weight-decay set every configuration's inner AdamW, the baseline's included; out of
    /// range is refused.
    #[test]
    fn adam_betas_reach_every_configuration() {
        let sweep = SweepArgs { adam_beta1: Some(0.95), adam_beta2: Some(0.99), ..SweepArgs::default() };
        let plan = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        for batch in [16, 4] {
            let c = plan.train_config(batch, 3e-3, 0).adamw;
            assert_eq!((c.beta1, c.beta2, c.weight_decay), (0.95, 0.99, AdamWConfig::default().weight_decay));
        }
        let sweep = SweepArgs { weight_decay: Some(0.05), ..SweepArgs::default() };
        let plan = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        assert_eq!(plan.train_config(2, 3e-3, 0).adamw.weight_decay, 0.05);
        assert_eq!(Plan::from_args(&args()).unwrap().train_config(16, 3e-3, 0).adamw, AdamWConfig::default());
        for bad in [
            SweepArgs { adam_beta2: Some(1.0), ..SweepArgs::default() },
            SweepArgs { adam_beta1: Some(-0.1), ..SweepArgs::default() },
            SweepArgs { weight_decay: Some(-0.1), ..SweepArgs::default() },
            SweepArgs { grad_clip: Some(-1.0), ..SweepArgs::default() },
            SweepArgs { grad_clip: Some(f64::NAN), ..SweepArgs::default() },
        ] {
            assert!(Plan::from_args(&DilocoArgs { sweep: bad, ..args() }).is_err());
        }
    }

    /// --grad-clip bounds every configuration's gradient norm, the baseline's included; 0 turns clipping off.
    #[test]
    fn the_gradient_bound_reaches_every_configuration() {
        assert_eq!(Plan::from_args(&args()).unwrap().train_config(16, 3e-3, 0).grad_clip, 1.0, "the run file's");
        let sweep = SweepArgs { grad_clip: Some(0.0), ..SweepArgs::default() };
        let plan = Plan::from_args(&DilocoArgs { sweep, ..args() }).unwrap();
        for batch in [16, 2] {
            assert_eq!(plan.train_config(batch, 3e-3, 0).grad_clip, 0.0);
        }
    }
}
