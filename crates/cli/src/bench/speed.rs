//! `agora bench` (no subcommand): how fast one optimizer step is. Times training steps of a preset on random
//! tokens (median ms/step, tokens/s) and the model FLOPs they achieve as a share of the best fp32 matmul rate
//! libtorch reaches on this machine (MFU); `bench/run.sh` puts these beside the same model in PyTorch.

use crate::commands::{set_threads, RuntimeArgs};
use agora_data::Shard;
use agora_model::{preset, Llama};
use agora_train::trainer::{default_compute_kind, parse_device};
use agora_train::{TrainConfig, Trainer};
use anyhow::Result;
use clap::Args;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[arg(long)]
    pub json: bool,
}

/// Median seconds of `f` over `n` runs after `warmup` runs.
fn median_seconds(warmup: usize, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok((sorted[sorted.len() / 2], times))
}

/// The best fp32 matmul rate libtorch reaches here (GFLOP/s), the denominator of MFU.
fn matmul_peak(device: Device) -> Result<f64> {
    let n = 2048;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let (t, _) = median_seconds(2, 5, || {
        let c = a.matmul(&b);
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        drop(c);
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / t / 1e9)
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let threads = set_threads(args.runtime.threads);
    let device = parse_device(args.runtime.device.as_deref().unwrap_or("cpu"))?;
    let config = preset(&args.preset, None)?;
    let mut model = Llama::new(&config, device, 0);
    model.set_compute_kind(default_compute_kind(device));
    let train = TrainConfig {
        steps: 1_000_000,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        warmup_steps: 10,
        ..Default::default()
    };
    // Random tokens: the cost of a step does not depend on what the tokens say.
    let n_tokens = 1 << 20;
    let tokens: Vec<u32> = (0..n_tokens as u64).map(|i| ((i * 2654435761) % config.vocab_size as u64) as u32).collect();
    let shard = Shard::from_tokens(tokens, [0; 32], config.vocab_size)?;
    let mut trainer = Trainer::new(model, train)?;
    let (seconds, times) = median_seconds(args.warmup, args.steps, || {
        trainer.train_step(&shard)?;
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        Ok(())
    })?;
    let tokens_per_step = (args.batch_size * args.seq_len) as f64;
    let flops = config.train_flops_per_token(args.seq_len) * tokens_per_step;
    let peak = matmul_peak(device)?;
    let achieved = flops / seconds / 1e9;
    let row = serde_json::json!({
        "impl": "agora", "preset": args.preset, "parameters": config.num_parameters(),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": threads,
        "ms_per_step": seconds * 1e3, "tokens_per_second": tokens_per_step / seconds,
        "model_gflops": achieved, "matmul_peak_gflops": peak, "mfu": achieved / peak,
        "step_times_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{row}");
    } else {
        println!(
            "agora {}: {:.1} ms/step, {:.0} tokens/s, {:.1} GFLOP/s = {:.1}% of the {:.1} GFLOP/s matmul peak",
            args.preset,
            seconds * 1e3,
            tokens_per_step / seconds,
            achieved,
            100.0 * achieved / peak,
            peak
        );
    }
    Ok(())
}
