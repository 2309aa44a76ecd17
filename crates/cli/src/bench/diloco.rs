//! `agora bench diloco`: how close DiLoCo (k workers, H inner steps per round) gets to synchronous
//! data-parallel training at an equal token budget, for how many fewer bytes; and plain averaging and SGD
//! with momentum against Nesterov as the outer optimizer. The runs are [`super::sweep`]'s; this module holds
//! the grid's flags and prints the tables.

use super::sweep::{prepare_setup, run_baseline, run_diloco, Outcome, Plan, SweepArgs};
use crate::commands::set_threads;
use crate::format::human_bytes;
use agora_diloco::{CompressionConfig, OuterConfig, OuterKind};
use agora_model::Llama;
use anyhow::Result;
use clap::Args;
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
    /// Where to compare the outer optimizers, "K:H" (default 4:50; --quick 2:4), or "none".
    #[arg(long)]
    pub outer_compare: Option<String>,
}

pub fn diloco(d: DilocoArgs) -> Result<()> {
    let plan = Plan::from_args(&d)?;
    let args = &d.sweep;
    let threads = set_threads(args.threads);
    let sweep_started = Instant::now();
    let (setup, data) = prepare_setup(args, plan)?;
    let p = &setup.plan;
    let init = setup.val_loss(&Llama::new(&setup.model, Device::Cpu, p.seed))?;
    let nesterov_grid = p.grid();
    let extra = p.compare.map_or(0, |_| 2);
    let total = 1 + nesterov_grid.len() + extra;
    tracing::info!(
        "{} parameters; {} configurations of {} steps × {} windows × {} tokens; initial validation loss {init:.4}",
        setup.parameters,
        total,
        p.steps,
        p.global_batch,
        p.seq_len
    );

    tracing::info!("[1/{total}] data-parallel baseline, batch {}", p.global_batch);
    let baseline = run_baseline(&setup)?;
    tracing::info!("data-parallel: validation loss {:.4} ({:.0}s)", baseline.val_loss, baseline.seconds);
    let with_gap = |mut o: Outcome| {
        o.gap_percent = 100.0 * (o.val_loss - baseline.val_loss) / baseline.val_loss;
        tracing::info!(
            "validation loss {:.4}, {:+.2}% vs data-parallel ({:.0}s)",
            o.val_loss,
            o.gap_percent,
            o.seconds
        );
        o
    };
    let mut grid = Vec::new();
    for (i, &(k, h)) in nesterov_grid.iter().enumerate() {
        tracing::info!("[{}/{total}] DiLoCo k={k} H={h}, batch {} per worker", i + 2, p.global_batch / k);
        grid.push(with_gap(run_diloco(&setup, k, h, p.outer, &CompressionConfig::default())?));
    }
    let mut compare = Vec::new();
    if let Some((k, h)) = p.compare {
        let nesterov = grid.iter().find(|o| o.workers == Some(k) && o.inner_steps == h).expect("in the grid");
        compare.push(nesterov.clone());
        let others = [
            OuterConfig { kind: OuterKind::Average, lr: 1.0, momentum: 0.0 },
            OuterConfig { kind: OuterKind::SgdMomentum, lr: p.outer.lr, momentum: p.outer.momentum },
        ];
        for (i, outer) in others.into_iter().enumerate() {
            tracing::info!("[{}/{total}] DiLoCo k={k} H={h}, outer {:?}", nesterov_grid.len() + i + 2, outer.kind);
            compare.push(with_gap(run_diloco(&setup, k, h, outer, &CompressionConfig::default())?));
        }
    }
    // The comparison point was only added to the grid to share its Nesterov run; keep it out of the grid
    // table unless the sweep asked for it.
    grid.retain(|o| p.workers.contains(&o.workers.unwrap_or(0)) && p.inner_steps.contains(&o.inner_steps));
    let seconds = sweep_started.elapsed().as_secs_f64();

    let tokens = p.steps * (p.global_batch * p.seq_len) as u64;
    let epochs = (p.steps as usize * p.global_batch) as f64 / setup.pool_windows as f64;
    if args.json {
        let out = serde_json::json!({
            "preset": args.preset, "parameters": setup.parameters, "threads": threads, "data": data,
            "plan": p, "tokens_per_configuration": tokens, "epochs": epochs,
            "initial_val_loss": init, "baseline": baseline, "grid": grid, "outer_comparison": compare,
            "seconds": seconds,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "`{}` ({:.2}M parameters, {}-token BPE) on `{}`: S = {} steps × G = {} windows × {} tokens = {} tokens per \
         configuration ({:.2} epochs of a {}-window pool). Inner AdamW lr {:.1e} → {:.1e} (warmup {}, cosine), batch G/k \
         per worker; outer Nesterov lr {}, momentum {}. Validation: {} tokens held out, initial loss {:.4}. \
         Seed {}, {} threads, {:.1} min in all.",
        args.preset,
        setup.parameters as f64 / 1e6,
        setup.model.vocab_size,
        args.data.display(),
        p.steps,
        p.global_batch,
        p.seq_len,
        tokens,
        epochs,
        setup.pool_windows,
        p.lr,
        p.min_lr,
        p.warmup,
        p.outer.lr,
        p.outer.momentum,
        setup.val.len(),
        init,
        p.seed,
        threads,
        seconds / 60.0
    );
    println!();
    println!(
        "| config | k | H | rounds | final val loss | gap vs baseline | bytes sent/worker | × fewer bytes than DP | time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| data-parallel (baseline) | any | 1 | {} | {:.4} | — | {} | 1× | {:.0}s |",
        baseline.rounds,
        baseline.val_loss,
        human_bytes(baseline.bytes_sent_per_worker),
        baseline.seconds
    );
    for o in &grid {
        println!(
            "| DiLoCo | {} | {} | {} | {:.4} | {:+.2}% | {} | {:.0}× | {:.0}s |",
            o.workers.unwrap_or(0),
            o.inner_steps,
            o.rounds,
            o.val_loss,
            o.gap_percent,
            human_bytes(o.bytes_sent_per_worker),
            o.fewer_bytes,
            o.seconds
        );
    }
    if let Some((k, h)) = p.compare {
        println!();
        println!("Outer optimizer at k = {k}, H = {h} (same inner runs' data and schedule):");
        println!();
        println!("| outer optimizer | outer lr | momentum | final val loss | gap vs baseline | time |");
        println!("|---|---:|---:|---:|---:|---:|");
        for o in &compare {
            let c = o.outer.expect("DiLoCo runs have an outer optimizer");
            let name = match c.kind {
                OuterKind::Nesterov => "Nesterov",
                OuterKind::Average => "plain averaging",
                OuterKind::SgdMomentum => "SGD with momentum",
            };
            println!(
                "| {name} | {} | {} | {:.4} | {:+.2}% | {:.0}s |",
                c.lr, c.momentum, o.val_loss, o.gap_percent, o.seconds
            );
        }
    }
    Ok(())
}
