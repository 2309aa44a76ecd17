//! `agora bench compression`: every pseudo-gradient codec at an equal token budget, k workers, on real text.
//! Each configuration is a [`run_diloco`] run (the same functions the networked worker and coordinator
//! call); the reference is fp32 DiLoCo with the same k, H, data and schedule.
//!
//! With F fragments (Streaming DiLoCo) a round is H/F inner steps and synchronises one fragment, so every
//! fragment is still synchronised every H steps: the same bytes in all, F× fewer per round.

use super::diloco::DilocoArgs;
use super::sweep::{prepare_setup, run_diloco, Outcome, Plan, SweepArgs};
use crate::commands::set_threads;
use crate::format::human_bytes;
use agora_diloco::codec::{Codec, Values};
use agora_diloco::{CompressionConfig, Overlap};
use agora_model::Llama;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::time::Instant;
use tch::Device;

#[derive(Args, Clone)]
pub struct CompressionArgs {
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Workers k (default 4; --quick 2).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Inner steps between two synchronisations of a parameter, H (default 20; --quick 4).
    #[arg(long)]
    pub inner_steps: Option<u64>,
    /// Codecs to compare, comma-separated: NAME[:KEEP/CHUNK][:VALUES][:ef][:decay=D][:block=B][:fF] with
    /// NAME none|bf16|int8|int4|topk|dct, VALUES f32|bf16|2bit|sign, ef = error feedback, fF = F fragments;
    /// `:overlap=T[:merge=A]` overlaps the exchange with T inner steps (Streaming DiLoCo, merge α = A,
    /// default 0). The first must be `none` (the reference).
    #[arg(long, value_delimiter = ',')]
    pub codecs: Option<Vec<String>>,
}

pub const DEFAULT_CODECS: &str = "none,bf16,int8,int4,topk:2/64:f32,topk:2/64:2bit,topk:1/64:2bit,\
                                  topk:2/64:2bit:ef,topk:1/64:2bit:ef,topk:2/64:2bit:ef:decay=1,\
                                  topk:1/64:2bit:ef:decay=1,dct:2/64:2bit,dct:2/64:2bit:ef,\
                                  dct:2/64:2bit:ef:decay=1,none:f2,topk:2/64:2bit:f2";

/// Parses one `--codecs` entry with Streaming DiLoCo's overlap parts: `overlap=T` (τ inner steps before
/// the previous round's outer step is merged in) and `merge=A` (α, default 0), the run file's
/// `[compression] overlap_steps` and `merge`.
pub(crate) fn parse_entry(spec: &str) -> Result<CompressionConfig> {
    let mut overlap = Overlap::default();
    let mut codec_parts = Vec::new();
    for part in spec.split(':') {
        if let Some(t) = part.strip_prefix("overlap=") {
            overlap.steps = t.parse().with_context(|| format!("--codecs {spec:?}: overlap=T"))?;
        } else if let Some(a) = part.strip_prefix("merge=") {
            overlap.merge = a.parse().with_context(|| format!("--codecs {spec:?}: merge=A"))?;
        } else {
            codec_parts.push(part);
        }
    }
    ensure!(overlap.is_on() || overlap.merge == Overlap::default().merge, "--codecs {spec:?}: merge=A needs overlap=T");
    let c = CompressionConfig {
        overlap_steps: overlap.steps,
        merge: overlap.merge,
        ..parse_codec(&codec_parts.join(":"))?
    };
    c.validate().with_context(|| format!("--codecs {spec:?}"))?;
    Ok(c)
}

/// Parses one `--codecs` entry.
pub fn parse_codec(spec: &str) -> Result<CompressionConfig> {
    let mut parts = spec.split(':');
    let codec = match parts.next().unwrap_or_default() {
        "none" | "fp32" => Codec::None,
        "bf16" => Codec::Bf16,
        "int8" => Codec::Int8,
        "int4" => Codec::Int4,
        "topk" => Codec::TopK,
        "dct" => Codec::Dct,
        other => bail!("--codecs {spec:?}: unknown codec {other:?} (none, bf16, int8, int4, topk, dct)"),
    };
    let mut c = CompressionConfig { codec, ..CompressionConfig::default() };
    for part in parts {
        match part {
            "f32" => c.values = Values::F32,
            "bf16" => c.values = Values::Bf16,
            "2bit" => c.values = Values::TwoBit,
            "sign" => c.values = Values::Sign,
            "ef" => c.error_feedback = true,
            "noef" => c.error_feedback = false,
            p if p.starts_with("decay=") => c.feedback_decay = p[6..].parse().context("decay=D")?,
            p if p.starts_with("block=") => c.block = p[6..].parse().context("block=B")?,
            p if p.starts_with('f') && p[1..].parse::<usize>().is_ok() => c.fragments = p[1..].parse()?,
            p if p.contains('/') => {
                let (k, n) = p.split_once('/').expect("has a slash");
                c.keep = k.parse().with_context(|| format!("--codecs {spec:?}: KEEP/CHUNK"))?;
                c.chunk = n.parse().with_context(|| format!("--codecs {spec:?}: KEEP/CHUNK"))?;
            }
            other => bail!("--codecs {spec:?}: unknown part {other:?}"),
        }
    }
    c.validate().with_context(|| format!("--codecs {spec:?}"))?;
    Ok(c)
}

#[derive(Serialize)]
struct Row {
    codec: String,
    config: CompressionConfig,
    overlap: Overlap,
    fragments: usize,
    round_steps: u64,
    rounds: u64,
    bytes_per_worker_per_round: f64,
    bytes_per_worker: u64,
    fewer_than_fp32_diloco: f64,
    fewer_than_per_step_sync: f64,
    val_loss: f64,
    gap_vs_fp32_diloco_percent: f64,
    seconds: f64,
}

pub fn compression(c: CompressionArgs) -> Result<()> {
    let a = &c.sweep;
    let q = a.quick;
    let steps = a.steps.unwrap_or(if q { 24 } else { 1000 });
    let k = c.workers.unwrap_or(if q { 2 } else { 4 });
    let h = c.inner_steps.unwrap_or(if q { 4 } else { 20 });
    let specs: Vec<String> =
        c.codecs.clone().unwrap_or_else(|| DEFAULT_CODECS.split(',').map(|s| s.trim().to_string()).collect());
    let configs: Vec<(String, CompressionConfig)> =
        specs.iter().map(|s| Ok((s.clone(), parse_entry(s)?))).collect::<Result<_>>()?;
    ensure!(
        configs.first().is_some_and(|(_, c)| c.codec == Codec::None && c.fragments == 1 && !c.overlap().is_on()),
        "--codecs must start with `none` (fp32 DiLoCo, the reference)"
    );
    let mut round_steps = Vec::new();
    for (spec, c) in &configs {
        ensure!(h.is_multiple_of(c.fragments as u64), "{spec}: H = {h} is not divisible by {} fragments", c.fragments);
        let r = h / c.fragments as u64;
        c.overlap().validate(r).with_context(|| format!("--codecs {spec:?}: a round is {r} inner steps"))?;
        if !round_steps.contains(&r) {
            round_steps.push(r);
        }
    }
    let diloco_args = DilocoArgs {
        sweep: SweepArgs { steps: Some(steps), ..a.clone() },
        workers: Some(vec![k]),
        inner_steps: Some(round_steps.clone()),
        outer_compare: Some("none".into()),
        outer: None,
        baseline_lr: Some(vec![a.lr]),
        seeds: 1,
    };
    let plan = Plan::from_args(&diloco_args)?;
    let threads = set_threads(a.threads);
    let started = Instant::now();
    let (setup, data) = prepare_setup(a, plan)?;
    let p = &setup.plan;
    let init = setup.val_loss(&Llama::new(&setup.model, Device::Cpu, a.seed))?;
    let outer = p.outer;
    let per_step_sync = p.steps * setup.bytes_per_sync();
    let mut rows: Vec<Row> = Vec::new();
    for (i, (spec, c)) in configs.iter().enumerate() {
        let r = h / c.fragments as u64;
        tracing::info!("[{}/{}] {spec}: {}, k={k}, {r} inner steps per round", i + 1, configs.len(), c.describe());
        let o: Outcome = run_diloco(&setup, k, r, ("default", outer), c, a.seed)?;
        let reference =
            rows.first().map_or((o.bytes_sent_per_worker, o.val_loss), |r| (r.bytes_per_worker, r.val_loss));
        let row = Row {
            codec: c.describe(),
            config: *c,
            overlap: c.overlap(),
            fragments: c.fragments,
            round_steps: r,
            rounds: o.rounds,
            bytes_per_worker_per_round: o.bytes_sent_per_worker as f64 / o.rounds as f64,
            bytes_per_worker: o.bytes_sent_per_worker,
            fewer_than_fp32_diloco: reference.0 as f64 / o.bytes_sent_per_worker as f64,
            fewer_than_per_step_sync: per_step_sync as f64 / o.bytes_sent_per_worker as f64,
            val_loss: o.val_loss,
            gap_vs_fp32_diloco_percent: 100.0 * (o.val_loss - reference.1) / reference.1,
            seconds: o.seconds,
        };
        tracing::info!(
            "{spec}: validation loss {:.4} ({:+.2}% vs fp32 DiLoCo), {} per worker per round, {:.0}× fewer bytes ({:.0}s)",
            row.val_loss,
            row.gap_vs_fp32_diloco_percent,
            human_bytes(row.bytes_per_worker_per_round as u64),
            row.fewer_than_fp32_diloco,
            row.seconds
        );
        rows.push(row);
    }
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        let out = serde_json::json!({
            "preset": a.preset, "parameters": setup.parameters, "threads": threads, "data": data, "plan": p,
            "workers": k, "inner_steps": h, "initial_val_loss": init, "per_step_sync_bytes_per_worker": per_step_sync,
            "rows": rows, "seconds": seconds,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "`{}` ({:.2}M parameters) on `{}`: k = {k} workers, every parameter synchronised every H = {h} inner steps, \
         S = {} steps × {} windows × {} tokens per configuration (equal tokens). Outer {}; \
         inner AdamW lr {:.1e}. Per-step synchronous training would send {} per worker. Initial validation loss \
         {init:.4}. Seed {}, {threads} threads, {:.1} min in all.",
        a.preset,
        setup.parameters as f64 / 1e6,
        data["path"].as_str().unwrap_or("?"),
        p.steps,
        p.global_batch,
        p.seq_len,
        outer,
        p.inner_lr(k),
        human_bytes(per_step_sync),
        a.seed,
        seconds / 60.0
    );
    println!();
    println!(
        "| codec | fragments | overlap τ (merge α) | rounds | bytes/worker/round | × fewer than fp32 DiLoCo \
         | × fewer than per-step sync | final val loss | gap vs fp32 DiLoCo | time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let overlap =
            if r.overlap.is_on() { format!("{} ({})", r.overlap.steps, r.overlap.merge) } else { "-".to_string() };
        println!(
            "| {} | {} | {overlap} | {} | {} | {:.1}× | {:.0}× | {:.4} | {:+.2}% | {:.0}s |",
            r.codec,
            r.fragments,
            r.rounds,
            human_bytes(r.bytes_per_worker_per_round as u64),
            r.fewer_than_fp32_diloco,
            r.fewer_than_per_step_sync,
            r.val_loss,
            r.gap_vs_fp32_diloco_percent,
            r.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_codecs_parse() {
        for spec in DEFAULT_CODECS.split(',') {
            parse_codec(spec).unwrap();
        }
        let c = parse_codec("topk:1/64:2bit:noef:f2").unwrap();
        assert_eq!(
            (c.codec, c.keep, c.chunk, c.values, c.error_feedback, c.fragments),
            (Codec::TopK, 1, 64, Values::TwoBit, false, 2)
        );
        assert!(parse_codec("zip").is_err());
        let c = parse_entry("none:f2:overlap=5:merge=0.25").unwrap();
        assert_eq!((c.fragments, c.overlap_steps, c.merge), (2, 5, 0.25));
        assert!(!parse_entry("int8").unwrap().overlap().is_on());
        assert!(parse_entry("int8:ef:overlap=2").is_err(), "overlap with error feedback is refused");
        assert!(parse_entry("none:overlap=x").is_err());
        assert!(parse_entry("none:f2:merge=0.3").is_err(), "a merge without an overlap does nothing");
        assert!(parse_codec("topk:65/64").is_err());
    }
}
