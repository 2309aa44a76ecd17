//! `agora bench diloco`: how close DiLoCo (k workers, H inner steps per round) gets to synchronous
//! data-parallel training at an equal token budget, for how many fewer bytes; which outer recipe gets
//! there; and plain averaging and SGD with momentum against the default recipe. Every configuration runs
//! once per seed and is reported as the mean and range over seeds; the baseline is tuned (its inner
//! learning rate swept, the best mean kept). The runs are [`super::sweep`]'s; this module holds the grid's
//! flags and prints the tables.

use super::sweep::{prepare_setup, run_baseline, run_diloco, LrScaling, Outcome, Plan, SweepArgs};
use crate::commands::set_threads;
use crate::format::human_bytes;
use agora_diloco::{CompressionConfig, OuterConfig, OuterKind};
use agora_model::Llama;
use anyhow::Result;
use clap::Args;
use serde::Serialize;
use std::time::Instant;
use tch::Device;

#[derive(Args, Clone)]
pub struct DilocoArgs {
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Worker counts k to sweep (default 1,2,4,8; --quick 1,2).
    #[arg(long, value_delimiter = ',')]
    pub workers: Option<Vec<usize>>,
    /// Inner steps per round H to sweep (default 10,50,200; --quick 4,12).
    #[arg(long, value_delimiter = ',')]
    pub inner_steps: Option<Vec<u64>>,
    /// Where to compare the default recipe with plain averaging and SGD with momentum, "K:H" (default
    /// 4:50; --quick 2:4), or "none".
    #[arg(long)]
    pub outer_compare: Option<String>,
    /// Outer recipes to sweep, comma-separated: `default` (the run file's, with the --outer-* flags), `old`
    /// (constant Nesterov 0.7/0.9, the default before issue 12) or
    /// KIND:LR[:MOMENTUM[:WARMUP_ROUNDS[:FINAL_LR_FRACTION[:FINAL_MOMENTUM_FRACTION]]]] (default: default).
    #[arg(long, value_delimiter = ',')]
    pub outer: Option<Vec<String>>,
    /// Peak inner learning rates of the data-parallel baseline; the best mean is the reference (default:
    /// half, once and twice --lr; --quick: --lr).
    #[arg(long, value_delimiter = ',')]
    pub baseline_lr: Option<Vec<f64>>,
    /// Runs of every configuration, with seeds --seed, --seed + 1, …: tables give the mean and the range.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
}

/// One configuration over every seed.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    /// The `--outer` recipe (None for the baseline).
    recipe: Option<String>,
    outer: Option<OuterConfig>,
    workers: Option<usize>,
    inner_steps: u64,
    lr: f64,
    rounds: u64,
    mean_val_loss: f64,
    min_val_loss: f64,
    max_val_loss: f64,
    /// 100 · (mean − the tuned baseline's mean) / the tuned baseline's mean.
    gap_percent: f64,
    /// The range over seeds of the gap to the tuned baseline's run with the same seed (same initial weights
    /// and data order): the noise of the comparison.
    min_paired_gap_percent: f64,
    max_paired_gap_percent: f64,
    bytes_sent_per_worker: u64,
    fewer_bytes: f64,
    mean_seconds: f64,
    runs: Vec<Outcome>,
}

impl Summary {
    fn new(runs: Vec<Outcome>, reference: Option<&Summary>) -> Summary {
        let first = runs.first().expect("one run per seed").clone();
        let losses: Vec<f64> = runs.iter().map(|o| o.val_loss).collect();
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        let mut s = Summary {
            recipe: first.recipe,
            outer: first.outer,
            workers: first.workers,
            inner_steps: first.inner_steps,
            lr: first.lr,
            rounds: first.rounds,
            mean_val_loss: mean,
            min_val_loss: losses.iter().copied().fold(f64::INFINITY, f64::min),
            max_val_loss: losses.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            gap_percent: 0.0,
            min_paired_gap_percent: 0.0,
            max_paired_gap_percent: 0.0,
            bytes_sent_per_worker: first.bytes_sent_per_worker,
            fewer_bytes: first.fewer_bytes,
            mean_seconds: runs.iter().map(|o| o.seconds).sum::<f64>() / runs.len() as f64,
            runs,
        };
        if let Some(r) = reference {
            s.gap_percent = 100.0 * (mean - r.mean_val_loss) / r.mean_val_loss;
            for o in &mut s.runs {
                let base = r.runs.iter().find(|b| b.seed == o.seed).expect("the baseline ran every seed");
                o.gap_percent = 100.0 * (o.val_loss - base.val_loss) / base.val_loss;
            }
            let gaps = s.runs.iter().map(|o| o.gap_percent);
            s.min_paired_gap_percent = gaps.clone().fold(f64::INFINITY, f64::min);
            s.max_paired_gap_percent = gaps.fold(f64::NEG_INFINITY, f64::max);
        }
        s
    }

    /// "3.1234 (3.1100–3.1400)", or the one value of a single seed.
    fn loss(&self) -> String {
        if self.runs.len() == 1 {
            format!("{:.4}", self.mean_val_loss)
        } else {
            format!("{:.4} ({:.4}–{:.4})", self.mean_val_loss, self.min_val_loss, self.max_val_loss)
        }
    }

    fn gap(&self) -> String {
        if self.runs.len() == 1 {
            format!("{:+.2}%", self.gap_percent)
        } else {
            format!(
                "{:+.2}% ({:+.2}…{:+.2})",
                self.gap_percent, self.min_paired_gap_percent, self.max_paired_gap_percent
            )
        }
    }
}

pub fn diloco(d: DilocoArgs) -> Result<()> {
    let plan = Plan::from_args(&d)?;
    let args = &d.sweep;
    let threads = set_threads(args.threads);
    let sweep_started = Instant::now();
    let (setup, data) = prepare_setup(args, plan)?;
    let p = &setup.plan;
    let init = setup.val_loss(&Llama::new(&setup.model, Device::Cpu, p.seeds[0]))?;
    let grid = p.grid();
    let compare_extra = p.compare.map_or(0, |_| 2);
    let per_seed = p.baseline_lrs.len() + p.outers.len() * grid.len() + compare_extra;
    let total = per_seed * p.seeds.len();
    tracing::info!(
        "{} parameters; {total} runs ({} seeds) of {} steps × {} windows × {} tokens; initial validation loss {init:.4}",
        setup.parameters,
        p.seeds.len(),
        p.steps,
        p.global_batch,
        p.seq_len
    );
    let mut done = 0;
    let mut progress = |what: &str| {
        done += 1;
        tracing::info!("[{done}/{total}] {what}");
    };
    let report = |o: &Outcome| tracing::info!("validation loss {:.4} ({:.0}s)", o.val_loss, o.seconds);

    let mut baselines = Vec::new();
    for &lr in &p.baseline_lrs {
        let mut runs = Vec::new();
        for &seed in &p.seeds {
            progress(&format!("data-parallel baseline, batch {}, inner lr {lr:.1e}, seed {seed}", p.global_batch));
            let o = run_baseline(&setup, lr, seed)?;
            report(&o);
            runs.push(o);
        }
        baselines.push(Summary::new(runs, None));
    }
    let best = baselines.iter().min_by(|a, b| a.mean_val_loss.total_cmp(&b.mean_val_loss)).expect("a baseline lr");
    let reference = best.clone();
    tracing::info!("tuned data-parallel: inner lr {:.1e}, validation loss {}", reference.lr, reference.loss());

    let run_all = |recipe: (&str, OuterConfig), k: usize, h: u64, progress: &mut dyn FnMut(&str)| -> Result<Summary> {
        let mut runs = Vec::new();
        for &seed in &p.seeds {
            progress(&format!(
                "DiLoCo k={k} H={h}, batch {} per worker, inner lr {:.1e}, outer {} ({}), seed {seed}",
                p.global_batch / k,
                p.inner_lr(k),
                recipe.0,
                recipe.1
            ));
            let o = run_diloco(&setup, k, h, recipe, &CompressionConfig::default(), seed)?;
            report(&o);
            runs.push(o);
        }
        let s = Summary::new(runs, Some(&reference));
        tracing::info!(
            "k={k} H={h} outer {}: validation loss {}, {} vs tuned data-parallel",
            recipe.0,
            s.loss(),
            s.gap()
        );
        Ok(s)
    };
    let mut rows = Vec::new();
    for (name, outer) in &p.outers {
        for &(k, h) in &grid {
            rows.push(run_all((name, *outer), k, h, &mut progress)?);
        }
    }
    let mut compare = Vec::new();
    if let Some((k, h)) = p.compare {
        let (name, outer) = &p.outers[0];
        let first =
            rows.iter().find(|o| o.workers == Some(k) && o.inner_steps == h && o.recipe.as_deref() == Some(name));
        compare.push(first.expect("the comparison point is in the grid").clone());
        let others = [
            ("average:1", OuterConfig::constant(OuterKind::Average, 1.0, 0.0)),
            ("sgd_momentum", OuterConfig { kind: OuterKind::SgdMomentum, ..*outer }),
        ];
        for recipe in others {
            compare.push(run_all(recipe, k, h, &mut progress)?);
        }
    }
    // The comparison point was only added to the grid to share its run; keep it out of the grid table
    // unless the sweep asked for it.
    rows.retain(|o| p.workers.contains(&o.workers.unwrap_or(0)) && p.inner_steps.contains(&o.inner_steps));
    let seconds = sweep_started.elapsed().as_secs_f64();

    let tokens = p.steps * (p.global_batch * p.seq_len) as u64;
    let epochs = (p.steps as usize * p.global_batch) as f64 / setup.pool_windows as f64;
    if args.json {
        let out = serde_json::json!({
            "preset": args.preset, "parameters": setup.parameters, "threads": threads, "data": data,
            "plan": p, "tokens_per_configuration": tokens, "epochs": epochs,
            "initial_val_loss": init, "baselines": baselines, "baseline": reference, "grid": rows,
            "outer_comparison": compare, "seconds": seconds,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "`{}` ({:.2}M parameters, {}-token BPE) on `{}`: S = {} steps × G = {} windows × {} tokens = {} tokens per \
         configuration ({:.2} epochs of a {}-window pool). DiLoCo inner AdamW peak lr {} (warmup {}, cosine to a \
         tenth), batch G/k per worker. Validation: {} tokens held out, initial loss {:.4}. Seeds {:?} (every row: mean, \
         range over seeds), {} threads, {:.1} min in all.",
        args.preset,
        setup.parameters as f64 / 1e6,
        setup.model.vocab_size,
        data["path"].as_str().unwrap_or("?"),
        p.steps,
        p.global_batch,
        p.seq_len,
        tokens,
        epochs,
        setup.pool_windows,
        match p.lr_scaling {
            LrScaling::Constant => format!("{:.1e}", p.lr),
            LrScaling::Sqrt => format!("{:.1e}/√k", p.lr),
        },
        p.warmup,
        setup.val.len(),
        init,
        p.seeds,
        threads,
        seconds / 60.0
    );
    println!();
    println!("Data-parallel baseline (batch G, every step synchronised), inner lr swept:");
    println!();
    println!("| inner lr | final val loss | |");
    println!("|---:|---:|---|");
    for b in &baselines {
        let chosen = if b.lr == reference.lr { "reference (best mean)" } else { "" };
        println!("| {:.1e} | {} | {chosen} |", b.lr, b.loss());
    }
    println!();
    println!("Recipes: {}.", p.outers.iter().map(|(n, o)| format!("`{n}` = {o}")).collect::<Vec<_>>().join("; "));
    println!();
    println!(
        "| outer | k | H | inner lr | rounds | final val loss | gap vs tuned DP (paired range) | bytes sent/worker | × fewer bytes than DP | time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| data-parallel | any | 1 | {:.1e} | {} | {} | — | {} | 1× | {:.0}s |",
        reference.lr,
        reference.rounds,
        reference.loss(),
        human_bytes(reference.bytes_sent_per_worker),
        reference.mean_seconds
    );
    for o in &rows {
        println!(
            "| {} | {} | {} | {:.1e} | {} | {} | {} | {} | {:.0}× | {:.0}s |",
            o.recipe.as_deref().unwrap_or("?"),
            o.workers.unwrap_or(0),
            o.inner_steps,
            o.lr,
            o.rounds,
            o.loss(),
            o.gap(),
            human_bytes(o.bytes_sent_per_worker),
            o.fewer_bytes,
            o.mean_seconds
        );
    }
    if let Some((k, h)) = p.compare {
        println!();
        println!("Outer optimizer at k = {k}, H = {h} (same inner runs' data and schedule):");
        println!();
        println!("| outer optimizer | final val loss | gap vs tuned DP (paired range) | time |");
        println!("|---|---:|---:|---:|");
        for o in &compare {
            let c = o.outer.expect("DiLoCo runs have an outer optimizer");
            println!("| {c} | {} | {} | {:.0}s |", o.loss(), o.gap(), o.mean_seconds);
        }
    }
    Ok(())
}
