//! `agora demo`: the whole system on one machine. A coordinator and N worker processes train the tiny
//! model over loopback HTTP with DiLoCo; the demo watches the run live, then trains the same token budget
//! in one process (synchronous data-parallel: batch N·B every step) for comparison, and samples text
//! from the final global weights.

use crate::children::Children;
use crate::commands::{complete, set_threads};
use crate::format::human_bytes;
use crate::net::{fetch_status, render_status, spawn_coordinator, wire_summary};
use agora_data::{MarkovSource, Shard, Tokenizer};
use agora_diloco::tensors::{from_named, load_weights, param_specs};
use agora_model::{Llama, LlamaConfig};
use agora_protocol::{decode_tensors, RunInfo, StatusReport};
use agora_train::{evaluate, TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::Device;

#[derive(Args)]
pub struct DemoArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Outer steps.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Inner steps per round (H).
    #[arg(long, default_value_t = 20)]
    pub inner_steps: u64,
    /// Windows per inner step, per worker.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// A text corpus (default: one generated from a Markov source with a known entropy floor).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory (replaced if an earlier demo made it).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// How workers encode their pseudo-gradients, as for `agora bench compression`: none, bf16, int8, int4,
    /// topk:KEEP/CHUNK:VALUES, dct:KEEP/CHUNK:VALUES, with :ef (error feedback), :fF (F fragments) and
    /// :overlap=T[:merge=A] (Streaming DiLoCo's overlap: a worker starts the next round as soon as it has
    /// uploaded, and applies the outer step T inner steps later, keeping A of its own values, default 0).
    #[arg(long, default_value = DEFAULT_DEMO_CODEC)]
    pub codec: String,
    /// Print the summary as one JSON object on stdout (the live view goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Run a campaign of this many phases (2 or 3) instead of one run: `agora campaign` on loopback, each
    /// phase grown from the last (tiny → twice as deep → wider) and admitting only the best of the one
    /// before; --rounds is split among the phases.
    #[arg(long)]
    pub phases: Option<usize>,
}

pub const DEFAULT_DEMO_CODEC: &str = "int4";

#[derive(Serialize)]
struct Summary {
    run_id: String,
    workers: usize,
    rounds: u64,
    inner_steps: u64,
    tokens: u64,
    final_val_loss: f64,
    baseline_val_loss: f64,
    /// (final − baseline) / baseline.
    relative_gap: f64,
    entropy_floor: Option<f64>,
    bytes_sent_per_worker: BTreeMap<String, u64>,
    /// The pseudo-gradient encoding, e.g. `topk 2/64 2bit +EF`.
    codec: String,
    /// Mean payload bytes per worker per round, and how many times fewer than fp32 pseudo-gradients.
    bytes_per_round_per_worker: f64,
    compression_ratio: f64,
    /// What synchronous data-parallel training would send per worker: one fp32 gradient per step.
    data_parallel_bytes_per_worker: u64,
    sample: String,
    distributed_seconds: f64,
    baseline_seconds: f64,
    /// Per worker name.
    idle: BTreeMap<String, IdleTime>,
    trust: TrustSummary,
}

/// How long one worker sat waiting on the coordinator between rounds (for its round to close and be judged,
/// and for the next one to open): what Streaming DiLoCo's overlap would hide.
#[derive(Debug, Serialize)]
struct IdleTime {
    /// Seconds waiting per received upload.
    per_round: f64,
    /// Waiting as a fraction of the worker's time in the run.
    fraction: f64,
}

/// Every worker's idle time, by name, from its JSON summary (`logs/worker-i.json`, written when it exits).
/// A worker that has not written one (it had not exited by the deadline) is left out, with a warning.
fn idle_time(logs: &Path, workers: usize) -> Result<BTreeMap<String, IdleTime>> {
    let mut idle = BTreeMap::new();
    for i in 0..workers {
        let name = format!("worker-{i}");
        let path = logs.join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("{}: the worker's summary", path.display()))?;
        let Ok(s) = serde_json::from_str::<agora_worker::WorkerSummary>(text.trim()) else {
            tracing::warn!("{}: no summary (the worker had not finished); left out of the idle time", path.display());
            continue;
        };
        let per_round = s.waiting_seconds / s.rounds_received.max(1) as f64;
        idle.insert(name, IdleTime { per_round, fraction: s.waiting_seconds / s.wall_seconds.max(f64::MIN_POSITIVE) });
    }
    Ok(idle)
}

/// How the run's uploads were judged and paid.
#[derive(Debug, Serialize)]
struct TrustSummary {
    uploads_judged: u64,
    uploads_accepted: u64,
    spot_checks: u64,
    spot_checks_passed: u64,
    /// Micro-credits per worker name.
    credits: BTreeMap<String, u64>,
    /// Every worker's receipts checked against the signed round roots, as `agora ledger verify` does.
    receipts_verified: usize,
}

fn trust_summary(url: &str, info: &RunInfo, report: &StatusReport) -> Result<TrustSummary> {
    let judged: Vec<agora_protocol::JudgedSubmission> = crate::net::fetch_json(url, "/v1/judgements")?;
    let mut credits = BTreeMap::new();
    let mut receipts_verified = 0;
    for w in &report.workers {
        let statement: agora_ledger::WorkerStatement =
            crate::net::fetch_json(url, &format!("/v1/ledger?worker={}", w.id.hex()))?;
        receipts_verified += agora_ledger::verify_statement(&statement, Some(&info.coordinator_key))
            .with_context(|| format!("{}'s receipts do not verify", w.name))?
            .receipts;
        credits.insert(w.name.clone(), statement.balance);
    }
    Ok(TrustSummary {
        uploads_judged: judged.len() as u64,
        uploads_accepted: judged.iter().filter(|j| j.verdict == "accepted").count() as u64,
        spot_checks: judged.iter().filter(|j| j.spot_check.is_some()).count() as u64,
        spot_checks_passed: judged.iter().filter(|j| j.spot_check.as_deref() == Some("passed")).count() as u64,
        credits,
        receipts_verified,
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn demo(args: DemoArgs) -> Result<()> {
    if let Some(phases) = args.phases {
        return crate::demo_phases::demo_phases(&args, phases);
    }
    if args.workers == 0 || args.rounds == 0 || args.inner_steps == 0 {
        bail!("--workers, --rounds and --inner-steps must be positive");
    }
    let started = Instant::now();
    prepare_out_dir(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut view: Box<dyn Write> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let live_terminal = if args.json { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };

    let source = MarkovSource::new(1);
    let corpus = match &args.data {
        Some(path) => std::fs::canonicalize(path).with_context(|| format!("{}: no such corpus", path.display()))?,
        None => {
            let path = out.join("corpus.txt");
            std::fs::write(&path, source.generate(400_000, 1))?;
            writeln!(
                view,
                "corpus: {} ({} KB) from a Markov source with a known entropy rate of {:.4} bits/word",
                path.display(),
                std::fs::metadata(&path)?.len() / 1024,
                source.entropy_rate_bits_per_word()
            )?;
            path
        }
    };
    let run_file = out.join("run.toml");
    std::fs::write(&run_file, run_toml(&args, &corpus)?)?;

    // The coordinator picks a free port and prints it.
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    // Every process the demo starts dies with it.
    let mut children = Children::new();
    writeln!(view, "starting the coordinator (tokenizer, data units, initial weights)...")?;
    let (coordinator, url) = spawn_coordinator(&run_file, &out.join("coordinator"), &logs.join("coordinator.log"))?;
    children.push("coordinator", coordinator);
    let info: RunInfo = reqwest::blocking::get(format!("{url}/v1/run"))?.json()?;
    writeln!(view, "coordinator: {url} (run {}); starting {} workers", info.run_id, args.workers)?;

    spawn_workers(&mut children, &exe, &url, args.workers, &out, &logs)?;

    let report = watch(&url, &mut children, &logs, &mut *view, live_terminal)?;
    let distributed_seconds = started.elapsed().as_secs_f64();
    // Workers exit on their own once the run is finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, child) in children.iter_mut().skip(1) {
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{name} failed ({status}):\n{}", log_tail(&logs.join(format!("{name}.log"))));
            }
        }
    }
    let idle = idle_time(&logs, args.workers)?;
    let final_val_loss =
        report.history.last().and_then(|h| h.val_loss).context("the final round has no validation loss")?;

    // The final weights and the tokenizer, as any worker or user would get them: blobs by hash.
    let http = reqwest::blocking::Client::new();
    let fetch = |hash: &agora_protocol::Hash32| -> Result<Vec<u8>> {
        Ok(http.get(format!("{url}/v1/blobs/{}", hash.hex())).send()?.error_for_status()?.bytes()?.to_vec())
    };
    let config = LlamaConfig::from_json_str(&serde_json::to_string(&info.model)?)?;
    let specs = param_specs(&config);
    let (weights, _) = decode_tensors(&fetch(&report.global_hash)?, Some(&specs))?;
    let model = Llama::zeros(&config, Device::Cpu);
    load_weights(&model, &from_named(&weights, Device::Cpu));
    let tokenizer = Tokenizer::from_json_bytes(&fetch(&info.tokenizer_hash)?)?;
    let trust = trust_summary(&url, &info, &report)?;
    drop(children);

    writeln!(
        view,
        "\nbaseline: the same {} tokens in one process (batch {} = {} workers × {}, {} steps)...",
        report.tokens_trained,
        args.workers * args.batch_size,
        args.workers,
        args.batch_size,
        args.rounds * args.inner_steps
    )?;
    let baseline_started = Instant::now();
    // One thread, like each worker: libtorch's multi-threaded kernels slow down several-fold when another
    // process shares the cores (measured in BENCHMARKS.md), and the comparison is about tokens, not speed.
    set_threads(Some(1));
    let prepared = out.join("coordinator").join("prepared");
    let train = Shard::open(&prepared.join("train.shard"))?;
    let val = Shard::open(&prepared.join("val.shard"))?;
    let baseline_val_loss = baseline(&args, &info, &config, &train, &val)?;
    let baseline_seconds = baseline_started.elapsed().as_secs_f64();

    let text = std::fs::read_to_string(&corpus)?;
    let entropy_floor = if args.data.is_none() {
        let chars_per_token = text.len() as f64 / tokenizer.encode(&text)?.len() as f64;
        Some(source.loss_floor_nats_per_token(chars_per_token))
    } else {
        None
    };
    let prompt = text.split_whitespace().next().unwrap_or("").to_string();
    let sample = complete(&model, &tokenizer, &prompt, 48, 0.8, 0.95, 0)?.text;

    let parameters: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
    let wire = wire_summary(&report);
    let summary = Summary {
        run_id: info.run_id.clone(),
        workers: args.workers,
        rounds: args.rounds,
        inner_steps: args.inner_steps,
        tokens: report.tokens_trained,
        final_val_loss,
        baseline_val_loss,
        relative_gap: (final_val_loss - baseline_val_loss) / baseline_val_loss,
        entropy_floor,
        bytes_sent_per_worker: report.workers.iter().map(|w| (w.name.clone(), w.bytes_sent)).collect(),
        codec: report.codec.clone(),
        bytes_per_round_per_worker: wire.map_or(0.0, |w| w.bytes_per_round_per_worker),
        compression_ratio: wire.map_or(1.0, |w| w.ratio),
        data_parallel_bytes_per_worker: args.rounds * args.inner_steps * parameters as u64 * 4,
        sample,
        distributed_seconds,
        baseline_seconds,
        idle,
        trust,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary, &out);
    }
    Ok(())
}

/// Starts `count` worker processes (`worker-0` …) for `url`: data in OUT/workers/NAME, each one's summary
/// (JSON lines: idle time, verdicts) in LOGS/NAME.json, read back once it has exited, and its log beside.
pub(crate) fn spawn_workers(
    children: &mut Children,
    exe: &Path,
    url: &str,
    count: usize,
    out: &Path,
    logs: &Path,
) -> Result<()> {
    for i in 0..count {
        let name = format!("worker-{i}");
        let child = Command::new(exe)
            .args(["worker", "--coordinator", url, "--threads", "1", "--json", "--name", &name, "--data-dir"])
            .arg(out.join("workers").join(&name))
            .stdout(std::fs::File::create(logs.join(format!("{name}.json")))?)
            .stderr(std::fs::File::create(logs.join(format!("{name}.log")))?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        children.push(name, child);
    }
    Ok(())
}

pub(crate) fn prepare_out_dir(out: &Path) -> Result<()> {
    // Only ever delete a directory that an earlier demo made.
    if out.exists() {
        // A demo marks its directory; run.toml and metrics.jsonl mark those of demos older than the mark.
        let earlier_demo = [DEMO_MARK, "run.toml", "metrics.jsonl"].iter().any(|f| out.join(f).is_file());
        let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !earlier_demo && !empty {
            bail!("{}: exists and is not an earlier demo run; choose another --out", out.display());
        }
        std::fs::remove_dir_all(out)
            .with_context(|| format!("{}: cannot clear the earlier demo run", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    std::fs::write(out.join(DEMO_MARK), "made by agora demo; removed by the next agora demo --out here\n")
        .with_context(|| format!("{}: cannot write", out.display()))
}

/// The file that marks a directory as made by `agora demo` (and so replaceable by the next demo).
const DEMO_MARK: &str = ".agora-demo";

fn run_toml(args: &DemoArgs, corpus: &Path) -> Result<String> {
    let warmup = (args.rounds * args.inner_steps / 20).max(1);
    let compression = toml::to_string(&crate::bench::compression::parse_entry(&args.codec)?)?;
    Ok(format!(
        r#"# Written by `agora demo`.
seed = 0

[model]
preset = "tiny"

[data]
files = [{corpus:?}]
vocab_size = 512
val_fraction = 0.05

[inner]
steps = {h}
batch_size = {b}
seq_len = {t}
lr = 3e-3
min_lr = 3e-4
warmup_steps = {warmup}

[outer]
{outer}
[rounds]
count = {r}
# Every worker contributes to every round; the deadline only matters if one is lost.
min_workers = {n}
deadline_secs = 120
heartbeat_timeout_secs = 20

[eval]
every_rounds = 1
batches = 10

# --codec {codec}
[compression]
{compression}"#,
        codec = args.codec,
        // The run file's default outer recipe, written out so the run file shows it.
        outer = toml::to_string(&agora_diloco::OuterConfig::default())?,
        corpus = corpus.display().to_string(),
        h = args.inner_steps,
        b = args.batch_size,
        t = args.seq_len,
        r = args.rounds,
        n = args.workers,
    ))
}

/// Polls the coordinator until the run finishes, redrawing the view; fails fast if a process dies.
fn watch(
    url: &str,
    children: &mut Children,
    logs: &Path,
    view: &mut dyn Write,
    live_terminal: bool,
) -> Result<StatusReport> {
    let mut drawn_lines = 0;
    let mut last_round = None;
    let mut last_progress = Instant::now();
    loop {
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                if !status.success() || name == "coordinator" {
                    bail!("{name} exited early ({status}):\n{}", log_tail(&logs.join(format!("{name}.log"))));
                }
            }
        }
        let report = match fetch_status(url) {
            Ok(r) => r,
            Err(e) if last_progress.elapsed() < Duration::from_secs(30) => {
                tracing::debug!("status: {e:#}");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e),
        };
        if last_round != Some((report.round, report.finished)) {
            last_round = Some((report.round, report.finished));
            last_progress = Instant::now();
        }
        let text = render_status(&report);
        if live_terminal {
            if drawn_lines > 0 {
                write!(view, "\x1b[{drawn_lines}A\x1b[J")?;
            }
            write!(view, "{text}")?;
            drawn_lines = text.lines().count();
        } else if last_progress.elapsed() < Duration::from_millis(600) || report.finished {
            // One line per round when the output is not a terminal.
            let val = report.history.last().and_then(|h| h.val_loss).map(|v| format!("{v:.4}")).unwrap_or("-".into());
            writeln!(
                view,
                "round {:>3}/{}  val loss {val}  tokens {}",
                report.round, report.rounds, report.tokens_trained
            )?;
            last_progress -= Duration::from_millis(600);
        }
        view.flush()?;
        if report.finished {
            if !live_terminal {
                write!(view, "{text}")?;
            }
            return Ok(report);
        }
        if last_progress.elapsed() > Duration::from_secs(300) {
            bail!("no round has closed for 5 minutes:\n{}", log_tail(&logs.join("coordinator.log")));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The same token budget in one process: batch workers × B at every step, the same schedule.
fn baseline(args: &DemoArgs, info: &RunInfo, config: &LlamaConfig, train: &Shard, val: &Shard) -> Result<f64> {
    let mut train_config: TrainConfig = serde_json::from_value(info.inner.clone())?;
    train_config.batch_size = args.workers * args.batch_size;
    let model = Llama::new(config, Device::Cpu, train_config.seed);
    let eval_batches = train_config.eval_batches;
    let mut trainer = Trainer::new(model, train_config)?;
    for _ in 0..args.rounds * args.inner_steps {
        trainer.train_step(train)?;
    }
    evaluate(&trainer.model, val, args.seq_len, args.batch_size, eval_batches)
}

fn print_summary(s: &Summary, out: &Path) {
    println!("\n== summary ==");
    println!("{} workers × {} rounds × {} inner steps: {} tokens", s.workers, s.rounds, s.inner_steps, s.tokens);
    println!(
        "validation loss: DiLoCo {:.4}   one process, same tokens {:.4}   ({:+.2}%)",
        s.final_val_loss,
        s.baseline_val_loss,
        100.0 * s.relative_gap
    );
    if let Some(floor) = s.entropy_floor {
        println!(
            "entropy floor of the source: {floor:.4} nats/token (DiLoCo is {:.4} above it)",
            s.final_val_loss - floor
        );
    }
    for (name, bytes) in &s.bytes_sent_per_worker {
        println!(
            "{name}: sent {} ({:.0}× less than data-parallel's {})",
            human_bytes(*bytes),
            s.data_parallel_bytes_per_worker as f64 / (*bytes).max(1) as f64,
            human_bytes(s.data_parallel_bytes_per_worker)
        );
    }
    println!(
        "pseudo-gradients: {}, {} per worker per round, {:.0}× fewer bytes than fp32 pseudo-gradients",
        s.codec,
        human_bytes(s.bytes_per_round_per_worker as u64),
        s.compression_ratio
    );
    let t = &s.trust;
    println!(
        "trust: {} uploads judged, {} accepted; {} spot checks (segments re-run by the coordinator), {} passed; \
         {} receipts verified against the signed round roots",
        t.uploads_judged, t.uploads_accepted, t.spot_checks, t.spot_checks_passed, t.receipts_verified
    );
    let credits: Vec<String> = t.credits.iter().map(|(n, c)| format!("{n} {:.4}", *c as f64 / 1e6)).collect();
    println!("credits earned: {}", credits.join(", "));
    let idle: Vec<String> =
        s.idle.iter().map(|(n, t)| format!("{n} {:.1}s ({:.0}%)", t.per_round, 100.0 * t.fraction)).collect();
    println!(
        "idle, waiting for a round to close and the next to open: {} per round (share of each worker's time)",
        idle.join(", ")
    );
    println!("time: distributed {:.0}s, baseline {:.0}s", s.distributed_seconds, s.baseline_seconds);
    println!(
        "\nsample from the final global weights (temperature 0.8):\n  {}",
        s.sample.trim_end().replace('\n', "\n  ")
    );
    println!("\nrun directory: {} (logs/, coordinator/, workers/)", out.display());
}
