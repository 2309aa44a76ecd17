//! `agora bench aggregate`: the coordinator's side of a round, alone. For each codec and number of
//! submitters, payloads of a model's size are made one at a time (as workers would send them), then parsed,
//! validated and added to one [`Accumulator`] exactly as the coordinator does with each upload; the table
//! gives the decode-and-accumulate throughput and the process's peak memory, which must not grow with the
//! number of submitters.

use crate::bench_compression::parse_codec;
use crate::bench_diloco::human_bytes;
use agora_diloco::codec::{self, Accumulator, Expected};
use agora_diloco::tensors::param_specs;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct AggregateArgs {
    /// Model whose pseudo-gradients are aggregated.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Numbers of submitters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,64")]
    pub submitters: Vec<usize>,
    /// Codecs, as for `agora bench compression`.
    #[arg(long, value_delimiter = ',', default_value = "none,bf16,int8,int4,topk:2/64:2bit,dct:2/64:2bit")]
    pub codecs: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    codec: String,
    submitters: usize,
    payload_bytes: u64,
    decode_seconds: f64,
    wire_mb_per_s: f64,
    fp32_mb_per_s: f64,
    peak_rss_bytes: Option<u64>,
    rss_before_bytes: Option<u64>,
}

/// `VmHWM` (peak resident set) and `VmRSS` of this process, in bytes.
fn memory() -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak resident set to the current one (Linux ≥ 4.0); false where that is not possible.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A deterministic pseudo-gradient-like tensor: small values, a few larger ones.
fn fill(data: &mut [f32], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        *v = u * u * u * 1e-2;
    }
}

pub fn aggregate(a: AggregateArgs) -> Result<()> {
    let model = agora_model::preset(&a.preset, None)?;
    let specs = param_specs(&model);
    let parameters: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
    let fp32 = 4 * parameters as u64;
    let can_reset = reset_peak();
    let mut rows = Vec::new();
    let mut delta: Vec<Vec<f32>> = specs.iter().map(|s| vec![0f32; s.shape.iter().product()]).collect();
    let metadata = BTreeMap::from([("agora.round".to_string(), "0".to_string())]);
    for spec in &a.codecs {
        let config = parse_codec(spec)?;
        anyhow::ensure!(config.fragments == 1, "{spec}: aggregate one whole model (no fragments)");
        for &n in &a.submitters {
            let expected = Expected { config: &config, fragment: 0, specs: &specs };
            let (_, rss_before) = memory();
            reset_peak();
            let mut sum = Accumulator::new(config, specs.clone());
            let (mut decode, mut payload_bytes) = (Duration::ZERO, 0u64);
            for worker in 0..n {
                for (i, d) in delta.iter_mut().enumerate() {
                    fill(d, (worker * 1000 + i) as u64);
                }
                let (payload, _) = codec::compress(&config, 0, &specs, &delta, None, &metadata);
                payload_bytes += payload.len() as u64;
                let started = Instant::now();
                sum.add(&codec::parse(&payload, expected).context("a generated payload")?);
                decode += started.elapsed();
            }
            let started = Instant::now();
            let mean = sum.mean();
            decode += started.elapsed();
            drop(mean);
            let (peak, _) = memory();
            let secs = decode.as_secs_f64();
            let row = Row {
                codec: config.describe(),
                submitters: n,
                payload_bytes: payload_bytes / n as u64,
                decode_seconds: secs,
                wire_mb_per_s: payload_bytes as f64 / 1e6 / secs,
                fp32_mb_per_s: (fp32 * n as u64) as f64 / 1e6 / secs,
                peak_rss_bytes: peak.filter(|_| can_reset),
                rss_before_bytes: rss_before,
            };
            tracing::info!(
                "{} × {n}: {:.2}s, {:.0} MB/s of payload, {:.0} MB/s fp32-equivalent",
                row.codec,
                secs,
                row.wire_mb_per_s,
                row.fp32_mb_per_s
            );
            rows.push(row);
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "preset": a.preset, "parameters": parameters, "rows": rows }));
        return Ok(());
    }
    println!(
        "`{}` ({:.1}M parameters, {} as fp32). One thread. Each payload is parsed (checksum, every length, every \
         value checked) and added to one fp32 sum; the mean (and for DCT the inverse transform) ends the round. \
         Peak RSS is this process's high-water mark during the aggregation ({}).",
        a.preset,
        parameters as f64 / 1e6,
        human_bytes(fp32),
        if can_reset { "reset before each row" } else { "could not be reset: not shown" }
    );
    println!();
    println!("| codec | submitters | payload | decode + accumulate | payload MB/s | fp32-equivalent MB/s | peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}s | {:.0} | {:.0} | {} |",
            r.codec,
            r.submitters,
            human_bytes(r.payload_bytes),
            r.decode_seconds,
            r.wire_mb_per_s,
            r.fp32_mb_per_s,
            r.peak_rss_bytes.map_or("—".to_string(), human_bytes)
        );
    }
    Ok(())
}
