//! `agora bench`: the benchmarks, one module each; this one is the dispatcher. Without a subcommand it times
//! optimizer steps ([`speed`]); `diloco`, `compression`, `aggregate`, `trust` and `liveness` measure training
//! quality per byte, the codecs, the coordinator's aggregation, the defences and rounds per minute under
//! an idle identity.

mod aggregate;
pub mod compression;
mod diloco;
mod grow;
mod liveness;
mod speed;
mod sweep;
mod trust;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// `agora bench` times optimizer steps; `agora bench diloco` runs the DiLoCo sweep.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub command: Option<BenchSubcommand>,
    #[command(flatten)]
    pub steps: speed::BenchArgs,
}

#[derive(Subcommand)]
pub enum BenchSubcommand {
    /// DiLoCo (k workers, H inner steps) against data-parallel training at an equal token budget: final
    /// validation loss, gap to the baseline, bytes sent per worker; and an outer-optimizer comparison.
    Diloco(diloco::DilocoArgs),
    /// Every pseudo-gradient codec (fp32, bf16, int8, int4, top-k and DCT top-k with and without error
    /// feedback, Streaming DiLoCo fragments) at an equal token budget: bytes per worker per round, ratios
    /// against fp32 DiLoCo and per-step synchronous training, validation loss.
    Compression(compression::CompressionArgs),
    /// Coordinator-side aggregation: decode-and-accumulate throughput and peak memory, per codec, for a
    /// given number of simulated submitters.
    Aggregate(aggregate::AggregateArgs),
    /// The adversarial suite: 3 honest workers and 1 cheater per misbehaviour (real processes; needs a
    /// binary built with `--features adversary`): detection, credits, loss against the honest-only run,
    /// false positives, verification cost.
    Trust(trust::TrustArgs),
    /// Growth: a trained small model grown (depth, width, both, G_stack; optimizer state carried or reset)
    /// and trained on, against the larger model trained from scratch: tokens to reach its final loss.
    Grow(grow::GrowArgs),
    /// Rounds per minute with two honest workers, with and without an identity that takes work and never
    /// uploads (real processes; needs a binary built with `--features adversary`).
    Liveness(liveness::LivenessArgs),
}

pub fn bench(cmd: BenchCommand) -> Result<()> {
    match cmd.command {
        None => speed::bench(cmd.steps),
        Some(BenchSubcommand::Diloco(args)) => diloco::diloco(args),
        Some(BenchSubcommand::Compression(args)) => compression::compression(args),
        Some(BenchSubcommand::Aggregate(args)) => aggregate::aggregate(args),
        Some(BenchSubcommand::Trust(args)) => trust::trust(args),
        Some(BenchSubcommand::Liveness(args)) => liveness::liveness(args),
        Some(BenchSubcommand::Grow(args)) => grow::grow_bench(args),
    }
}

/// A bench's corpus: `data`, else tinyshakespeare when present, else a generated Markov corpus (about the
/// same 1.2 MB) written into `out`, so every bench runs on a fresh clone without `../shared`.
pub(crate) fn corpus(data: Option<PathBuf>, out: &Path) -> Result<PathBuf> {
    let shared = PathBuf::from("../shared/data/tinyshakespeare.txt");
    match data.or_else(|| shared.is_file().then_some(shared)) {
        Some(p) => std::fs::canonicalize(&p).with_context(|| format!("{}: no such corpus", p.display())),
        None => {
            std::fs::create_dir_all(out)?;
            let p = out.join("corpus.txt");
            std::fs::write(&p, agora_data::MarkovSource::new(1).generate(200_000, 1))?;
            tracing::info!(
                "no ../shared/data/tinyshakespeare.txt: training on a generated Markov corpus ({})",
                p.display()
            );
            Ok(std::fs::canonicalize(&p)?)
        }
    }
}
