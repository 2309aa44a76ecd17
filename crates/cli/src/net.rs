//! The networked subcommands: `agora coordinator`, `agora worker`, `agora status`.

use crate::commands::{set_threads, RuntimeArgs};
use crate::format::{credits, human_bytes};
use agora_coordinator::{Coordinator, Options};
use agora_protocol::StatusReport;
use agora_protocol::{LeaderboardEntry, LedgerReport};
use agora_train::trainer::parse_device;
use agora_worker::{follow, WorkerOptions};
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

/// `--dir`, or FILE-STEM.SUFFIX beside the run or campaign file.
fn state_dir(file: &std::path::Path, given: Option<PathBuf>, suffix: &str) -> PathBuf {
    given.unwrap_or_else(|| {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| suffix.into());
        file.with_file_name(format!("{stem}.{suffix}"))
    })
}

/// The servers' runtime: two async threads (the heavy work runs on blocking threads).
fn server_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Binds `listen` and writes the address it got (port 0 picks one) to DIR/address.
async fn bind(listen: &str, dir: &std::path::Path) -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    std::fs::write(dir.join("address"), format!("http://{address}\n"))?;
    Ok((listener, address))
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    set_threads(args.threads);
    let dir = state_dir(&args.run, args.dir.clone(), "coordinator");
    let options =
        Options { run_file: args.run.clone(), dir: dir.clone(), database: args.database, blobs: args.blobs, key: None };
    server_runtime()?.block_on(async move {
        let app = Coordinator::open(&options).await?;
        let (listener, address) = bind(&args.listen, &dir).await?;
        println!("agora coordinator: run {} listening on http://{address}", app.run_id);
        std::io::stdout().flush()?;
        agora_coordinator::serve(app, listener, shutdown_signal()).await
    })
}

#[derive(Args)]
pub struct CampaignArgs {
    /// The campaign file (TOML): shared [data], then one [[phase]] per phase.
    #[arg(long)]
    pub file: PathBuf,
    /// Address to serve on; port 0 picks a free port (the chosen address is printed and written to DIR/address).
    #[arg(long, default_value = "127.0.0.1:8642")]
    pub listen: String,
    /// A database URL for the whole campaign; phase K uses a database of its own beside it (NAME_phaseK).
    /// Default: SQLite in each phase's directory.
    #[arg(long)]
    pub database: Option<String>,
    /// Blob store shared by the phases: a directory or an object-store URL (default: DIR/blobs).
    #[arg(long)]
    pub blobs: Option<String>,
    /// Campaign state directory (default: FILE-STEM.campaign beside the campaign file).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// libtorch threads for the outer step, evaluation and growth.
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn campaign(args: CampaignArgs) -> Result<()> {
    set_threads(args.threads);
    let dir = state_dir(&args.file, args.dir.clone(), "campaign");
    let options = agora_coordinator::CampaignOptions {
        campaign_file: args.file.clone(),
        dir: dir.clone(),
        database: args.database,
        blobs: args.blobs,
    };
    server_runtime()?.block_on(async move {
        let campaign = agora_coordinator::Campaign::open(options).await?;
        let (listener, address) = bind(&args.listen, &dir).await?;
        println!(
            "agora campaign: {} ({} phases) listening on http://{address}",
            campaign.file.name,
            campaign.file.phases.len()
        );
        std::io::stdout().flush()?;
        agora_coordinator::serve_campaign(campaign, listener, shutdown_signal()).await
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
    /// Leave the run once the coordinator has received this many of its uploads (accepted or not).
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Give up after the coordinator has been unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    pub patience_secs: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Misbehave on purpose (adversarial tests only): nan, scaled, tiny, noise, sign-flip, copy:BLOB_DIR,
    /// free-ride, replay, other-data, chain-lie, lazy, inflate, idle.
    #[cfg(feature = "adversary")]
    #[arg(long, default_value = "honest")]
    pub behaviour: agora_worker::adversary::Behaviour,
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
        #[cfg(feature = "adversary")]
        behaviour: args.behaviour,
    };
    let followed = follow(&options)?;
    for summary in &followed.runs {
        if args.json {
            println!("{}", serde_json::to_string(summary)?);
        } else {
            println!(
                "worker {} (run {}): {}; sent {} bytes, received {} bytes{}",
                &summary.worker[..8],
                summary.run_id,
                worker_verdicts(summary),
                summary.bytes_sent,
                summary.bytes_received,
                if summary.finished { "; the run is finished" } else { "" }
            );
        }
    }
    if let Some(note) = &followed.not_retained {
        if args.json {
            println!("{}", serde_json::json!({ "not_retained": note }));
        } else {
            println!("{note}");
        }
    }
    Ok(())
}

/// What became of a worker's uploads: received, then (when the run verifies) accepted or rejected, and why.
fn worker_verdicts(s: &agora_worker::WorkerSummary) -> String {
    let mut out = format!("{} uploads received", s.rounds_received);
    if s.verifying {
        out += &format!(
            ": {} accepted ({} micro-credits booked, pending vesting), {} rejected",
            s.rounds_accepted, s.credits_booked, s.rounds_rejected
        );
        if !s.rejections.is_empty() {
            let reasons: Vec<String> = s.rejections.iter().map(|(code, n)| format!("{code} {n}")).collect();
            out += &format!(" ({})", reasons.join(", "));
        }
        if s.rounds_not_judged > 0 {
            out += &format!(", {} not judged", s.rounds_not_judged);
        }
    } else {
        out += " (this run does not judge uploads)";
    }
    if s.rounds_refused > 0 {
        out += &format!("; {} refused as late or reassigned", s.rounds_refused);
    }
    out
}

#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's URL.
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

/// Starts `agora coordinator` (this binary) for `run_file` on a free loopback port, its state in `dir` and
/// its log in `log`; returns the process and the URL it printed once listening.
pub fn spawn_coordinator(
    run_file: &std::path::Path,
    dir: &std::path::Path,
    log: &std::path::Path,
) -> Result<(std::process::Child, String)> {
    spawn_server("coordinator", "--run", run_file, dir, log)
}

/// Starts `agora campaign` (this binary) for `file` the same way.
pub fn spawn_campaign(
    file: &std::path::Path,
    dir: &std::path::Path,
    log: &std::path::Path,
) -> Result<(std::process::Child, String)> {
    spawn_server("campaign", "--file", file, dir, log)
}

/// `agora SUBCOMMAND FILE_FLAG FILE --listen 127.0.0.1:0 --threads 1 --dir DIR`, waiting for the URL it prints.
fn spawn_server(
    subcommand: &str,
    file_flag: &str,
    file: &std::path::Path,
    dir: &std::path::Path,
    log: &std::path::Path,
) -> Result<(std::process::Child, String)> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    let mut child = std::process::Command::new(exe)
        .args([subcommand, file_flag])
        .arg(file)
        .args(["--listen", "127.0.0.1:0", "--threads", "1", "--dir"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).with_context(|| format!("{}: cannot create", log.display()))?)
        .spawn()
        .with_context(|| format!("cannot start the {subcommand}"))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    match line.split_whitespace().find(|w| w.starts_with("http://")) {
        Some(url) => Ok((child, url.to_string())),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            anyhow::bail!("the {subcommand} did not start:\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
        }
    }
}

pub fn fetch_status(url: &str) -> Result<StatusReport> {
    fetch_json(url, "/v1/status")
}

/// GETs `path` from a coordinator and parses the JSON answer.
pub fn fetch_json<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
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
    serde_json::from_str(&text).with_context(|| format!("{url}: not the answer agora expects"))
}

#[derive(Args)]
pub struct LeaderboardArgs {
    /// The coordinator's URL.
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

pub fn leaderboard(args: LeaderboardArgs) -> Result<()> {
    let board: Vec<LeaderboardEntry> = fetch_json(&args.url, "/v1/leaderboard")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&board)?);
        return Ok(());
    }
    println!(
        "{:>4}  {:<10} {:<12} {:>7} {:>9} {:>9} {:>14}",
        "rank", "worker", "name", "rating", "accepted", "rejected", "credits"
    );
    for e in &board {
        println!(
            "{:>4}  {:<10} {:<12} {:>7.3} {:>9} {:>9} {:>14}",
            e.rank,
            e.worker.short(),
            e.name.chars().take(12).collect::<String>(),
            e.rating,
            e.accepted,
            e.rejected,
            credits(e.credits as i64)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct LedgerArgs {
    /// The coordinator's URL, or `verify` followed by a statement file.
    pub url: String,
    /// `agora ledger verify FILE`: the statement (`agora ledger URL --worker ID --json > FILE`).
    pub file: Option<PathBuf>,
    /// One worker's receipts with inclusion proofs (hex public key).
    #[arg(long)]
    pub worker: Option<String>,
    /// `verify`: the coordinator key to trust (hex; the `coordinator_key` of `GET /v1/run`). `verify` needs
    /// this or --pinned: the key a statement names proves nothing by itself.
    #[arg(long, value_name = "HEX")]
    pub coordinator_key: Option<String>,
    /// `verify`: trust the coordinator key that this worker data directory pinned when it joined the
    /// statement's run (DIR/runs/RUN_ID/coordinator.key.pub).
    #[arg(long, value_name = "DIR", conflicts_with = "coordinator_key")]
    pub pinned: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn ledger(args: LedgerArgs) -> Result<()> {
    if args.url == "verify" {
        let file = args.file.context("agora ledger verify FILE: name the statement file")?;
        return crate::ledger_verify::verify(&file, args.coordinator_key.as_deref(), args.pinned.as_deref(), args.json);
    }
    if let Some(worker) = &args.worker {
        let statement: agora_ledger::WorkerStatement = fetch_json(&args.url, &format!("/v1/ledger?worker={worker}"))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&statement)?);
            return Ok(());
        }
        println!(
            "worker {} in run {}: balance {} credits",
            statement.worker.short(),
            statement.run_id,
            credits(statement.balance as i64)
        );
        println!("{:>6} {:<18} {:>7} {:>14}  receipt", "round", "verdict", "score", "credits");
        for r in &statement.receipts {
            let x = &r.receipt.receipt;
            println!(
                "{:>6} {:<18} {:>7.3} {:>14}  {}",
                x.round,
                x.verdict,
                x.score,
                credits(x.credits as i64),
                &agora_protocol::Hash32(x.digest()).hex()[..16]
            );
        }
        return Ok(());
    }
    let report: LedgerReport = fetch_json(&args.url, "/v1/ledger")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "run {}  coordinator {}  {} entries, {} round roots",
        report.run_id,
        report.coordinator.short(),
        report.entries,
        report.roots.len()
    );
    let total: i64 = report.balances.iter().map(|b| b.1).sum();
    for (account, balance) in &report.balances {
        let name = account
            .strip_prefix("worker:")
            .map(|w| format!("worker:{}", &w[..8.min(w.len())]))
            .unwrap_or(account.clone());
        println!("  {name:<40} {:>22}", credits(*balance));
    }
    println!("  {:<40} {:>22}", "(sum: double entry balances to zero)", credits(total));
    Ok(())
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

/// A plain-text view of a status report (what `agora status` and the demo's live view print).
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
        "  {:<10} {:<10} {:<10} {:>6} {:>8} {:>7} {:>7} {:>10} {:>11} {:>11} {:>11}\n",
        "worker", "name", "state", "step", "loss", "rounds", "refused", "credits", "sent", "sent/round", "received"
    );
    for w in &r.workers {
        s += &format!(
            "  {:<10} {:<10} {:<10} {:>6} {:>8} {:>7} {:>7} {:>10} {:>11} {:>11} {:>11}\n",
            w.id.short(),
            w.name.chars().take(10).collect::<String>(),
            w.state,
            w.inner_step,
            w.last_loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into()),
            w.rounds_accepted,
            w.rounds_rejected,
            format!("{:.4}", w.credits as f64 / 1e6),
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
