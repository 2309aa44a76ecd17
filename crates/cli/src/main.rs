//! `agora`: the one binary. Subcommands parse arguments and report; the work lives in the library crates.
//!
//! Must not know about: tensor math or file formats beyond calling the crates that own them.

mod bench;
mod children;
mod commands;
mod demo;
mod demo_phases;
mod format;
mod grow;
mod ledger_verify;
mod net;
mod research;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "agora", version, about = "Train open language models with crowdsourced compute")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a corpus (from a TOML run file and/or flags); resumable.
    Train(Box<run::TrainArgs>),
    /// Validation loss and perplexity of a checkpoint.
    Eval(commands::EvalArgs),
    /// Continue a prompt with a checkpoint.
    Generate(commands::GenerateArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Corpus tools: tokenize into shards, generate a synthetic corpus.
    #[command(subcommand)]
    Data(DataCommand),
    /// Parameters, FLOPs per token and training memory of a preset or config; `--ladder`: the seven phases.
    Info(commands::InfoArgs),
    /// Grow a checkpoint into a larger model that computes the same function (a Hugging Face directory).
    Grow(grow::GrowArgs),
    /// The main job: a coordinator and N worker processes train one model over loopback (DiLoCo).
    Demo(demo::DemoArgs),
    /// Time optimizer steps (ms/step, tokens/s, MFU) for the benchmark table; `bench diloco`: DiLoCo vs
    /// data-parallel training at an equal token budget.
    Bench(Box<bench::BenchCommand>),
    /// Serve a DiLoCo run: membership, rounds, data assignment, the outer step (HTTP).
    Coordinator(net::CoordinatorArgs),
    /// Serve a campaign: its phases one after another at one URL, each grown from the last and admitting
    /// the best of the one before; between phases, calls for proposals measured by proxy runs.
    Campaign(net::CampaignArgs),
    /// Join a run (or a campaign, following its phases): train H inner steps per round on assigned data and
    /// send pseudo-gradients.
    Worker(net::WorkerArgs),
    /// Show a coordinator's run: round, workers, losses, bytes.
    Status(net::StatusArgs),
    /// Identities ranked by reputation, with their accepted/rejected contributions and credits.
    Leaderboard(net::LeaderboardArgs),
    /// Balances and signed round roots; `--worker ID`: its receipts with inclusion proofs;
    /// `agora ledger verify FILE --coordinator-key HEX` (or `--pinned WORKER_DIR`): check such a statement
    /// offline against a coordinator key you trust.
    Ledger(net::LedgerArgs),
    /// Propose a patch to the next phase's recipe in a campaign's open call for proposals (signed with
    /// your researcher identity); the best proposal by proxy-run validation loss is adopted.
    Propose(research::ProposeArgs),
    /// A campaign's calls for proposals: every proposal ranked by its proxy run's validation loss, the
    /// adopted one, credits and retained researchers.
    Proposals(research::ProposalsArgs),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer.
    Train {
        /// Corpus files or directories (.txt, .jsonl with a `text` field, .parquet with a `text` column).
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize a corpus once into `train.shard` and `val.shard`.
    Prepare {
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Fraction held out for validation (the end of the corpus).
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
    },
    /// Write a corpus from a Markov source whose entropy rate is known exactly.
    Synthetic {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        words: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// glibc returns every freed block of 32 MiB or more (logits, their gradients) to the kernel, so each
/// training step page-faults them back in, zeroed: ~5% of a CPU step (BENCHMARKS.md). Keep them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_allocations() {
    const ONE_GIB: i32 = 1 << 30;
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations() {}

fn main() {
    keep_large_allocations();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "agora=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Train(args) => run::train(*args),
        Command::Eval(args) => commands::eval(args),
        Command::Generate(args) => commands::generate(args),
        Command::Tokenizer(TokenizerCommand::Train { data, vocab_size, out }) => {
            commands::tokenizer_train(&data, vocab_size, &out)
        }
        Command::Data(DataCommand::Prepare { data, tokenizer, out, val_fraction }) => {
            commands::data_prepare(&data, &tokenizer, &out, val_fraction)
        }
        Command::Data(DataCommand::Synthetic { out, words, seed }) => commands::data_synthetic(&out, words, seed),
        Command::Info(args) => commands::info(args),
        Command::Grow(args) => grow::grow_command(args),
        Command::Demo(args) => demo::demo(args),
        Command::Bench(args) => bench::bench(*args),
        Command::Coordinator(args) => net::coordinator(args),
        Command::Campaign(args) => net::campaign(args),
        Command::Worker(args) => net::worker(args),
        Command::Status(args) => net::status(args),
        Command::Leaderboard(args) => net::leaderboard(args),
        Command::Ledger(args) => net::ledger(args),
        Command::Propose(args) => research::propose(args),
        Command::Proposals(args) => research::proposals(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
