//! The networked subcommands: `agora coordinator`, `agora worker`, `agora status`.

use crate::commands::{set_threads, RuntimeArgs};
use agora_coordinator::{Coordinator, Options};
use agora_protocol::StatusReport;
use agora_train::trainer::parse_device;
use agora_worker::{run_worker, WorkerOptions};
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// The run file (TOML): model, data, inner and outer optimizer, rounds.
    #[arg(long)]
    pub run: PathBuf,
    /// Address to serve on; port 0 picks a free port (the chosen address is printed and written to DIR/address).
    #[arg(long, default_value = "127.0.0.1:8642")]
    pub listen: String,
    /// sqlite://FILE or postgres://USER@HOST/DB (default: sqlite in --dir).
    #[arg(long)]
    pub database: Option<String>,
    /// Blob store: a directory or an object-store URL such as s3://bucket/prefix (default: DIR/blobs).
    #[arg(long)]
    pub blobs: Option<String>,
    /// Coordinator state directory (default: RUN-FILE-STEM.coordinator beside the run file).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// libtorch threads for the outer step and evaluation.
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    set_threads(args.threads);
    let dir = args.dir.clone().unwrap_or_else(|| {
        let stem = args.run.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        args.run.with_file_name(format!("{stem}.coordinator"))
    });
    let options = Options { run_file: args.run.clone(), dir: dir.clone(), database: args.database, blobs: args.blobs };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let app = Coordinator::open(&options).await?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let address = listener.local_addr()?;
        std::fs::write(dir.join("address"), format!("http://{address}\n"))?;
        println!("agora coordinator: run {} listening on http://{address}", app.run_id);
        std::io::stdout().flush()?;
        agora_coordinator::serve(app, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL, e.g. http://127.0.0.1:8642.
    #[arg(long)]
    pub coordinator: String,
    /// Identity key, blob cache and optimizer state (default: ./agora-worker).
    #[arg(long, default_value = "agora-worker")]
    pub data_dir: PathBuf,
    /// A label for status tables (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Leave the run after contributing this many rounds.
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Give up after the coordinator has been unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    pub patience_secs: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    set_threads(args.runtime.threads);
    let device = parse_device(args.runtime.device.as_deref().unwrap_or("cpu"))?;
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "worker".into())
    });
    let options = WorkerOptions {
        coordinator: args.coordinator,
        data_dir: args.data_dir,
        name,
        device,
        max_rounds: args.max_rounds,
        patience: Duration::from_secs(args.patience_secs),
    };
    let summary = run_worker(&options)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "worker {}: {} rounds contributed, {} refused; sent {} bytes, received {} bytes{}",
            &summary.worker[..8],
            summary.rounds_contributed,
            summary.rounds_rejected,
            summary.bytes_sent,
            summary.bytes_received,
            if summary.finished { "; the run is finished" } else { "" }
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's URL.
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

pub fn fetch_status(url: &str) -> Result<StatusReport> {
    let url = format!("{}/v1/status", url.trim_end_matches('/'));
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(&url)
        .send()
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.text()?;
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: not an agora status report"))
}

pub fn status(args: StatusArgs) -> Result<()> {
    let report = fetch_status(&args.url)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{}", render_status(&report));
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

/// A plain-text view of a status report (what `agora status` and the demo's live view print).
/// Pseudo-gradient traffic over the applied rounds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WireSummary {
    /// Mean payload bytes one worker sent in one round.
    pub bytes_per_round_per_worker: f64,
    /// What the same pseudo-gradients would take as fp32 values, divided by what was sent.
    pub ratio: f64,
    pub last_round_per_worker: f64,
}

pub fn wire_summary(r: &StatusReport) -> Option<WireSummary> {
    let applied: Vec<_> = r.history.iter().filter(|h| h.contributions > 0 && h.delta_bytes > 0).collect();
    let last = applied.last()?;
    let (bytes, fp32, uploads) = applied
        .iter()
        .fold((0u64, 0u64, 0u64), |(b, f, n), h| (b + h.delta_bytes, f + h.fp32_bytes, n + h.contributions));
    Some(WireSummary {
        bytes_per_round_per_worker: bytes as f64 / uploads as f64,
        ratio: fp32 as f64 / bytes as f64,
        last_round_per_worker: last.delta_bytes as f64 / last.contributions as f64,
    })
}

pub fn render_status(r: &StatusReport) -> String {
    let mut s = String::new();
    let state = if r.finished { "finished".to_string() } else { format!("round {}/{}", r.round, r.rounds) };
    let last_val = r.history.iter().rev().find_map(|h| h.val_loss.map(|v| (h.round, v)));
    let last_train = r.history.iter().rev().find_map(|h| h.train_loss.map(|v| (h.round, v)));
    s += &format!("run {}  {state}  tokens trained {}\n", r.run_id, r.tokens_trained);
    if let Some((round, v)) = last_val {
        s += &format!("  val loss {v:.4} (weights after round {round})");
    }
    if let Some((round, v)) = last_train {
        s += &format!("  train loss {v:.4} (round {round})");
    }
    s += "\n";
    s += &format!("  pseudo-gradients: {}", r.codec);
    if let Some(w) = wire_summary(r) {
        s += &format!(
            "; {} per worker per round ({:.1}× fewer than fp32), last round {} per worker",
            human_bytes(w.bytes_per_round_per_worker as u64),
            w.ratio,
            human_bytes(w.last_round_per_worker as u64)
        );
    }
    s += "\n";
    s += &format!(
        "  {:<10} {:<10} {:<10} {:>6} {:>8} {:>7} {:>11} {:>11} {:>11}\n",
        "worker", "name", "state", "step", "loss", "rounds", "sent", "sent/round", "received"
    );
    for w in &r.workers {
        s += &format!(
            "  {:<10} {:<10} {:<10} {:>6} {:>8} {:>7} {:>11} {:>11} {:>11}\n",
            w.id.short(),
            w.name.chars().take(10).collect::<String>(),
            w.state,
            w.inner_step,
            w.last_loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into()),
            w.rounds_accepted,
            human_bytes(w.bytes_sent),
            w.bytes_sent.checked_div(w.rounds_accepted).map_or_else(|| "-".into(), human_bytes),
            human_bytes(w.bytes_received)
        );
    }
    let rejected: Vec<String> = r
        .counters
        .iter()
        .filter(|(k, v)| k.starts_with("rejected.") && *v > 0)
        .map(|(k, v)| format!("{}={v}", &k[9..]))
        .collect();
    if !rejected.is_empty() {
        s += &format!("  refused: {}\n", rejected.join(" "));
    }
    s
}
