//! `agora bench liveness`: rounds per minute of a run with two honest workers, with and without one more
//! identity that takes work every round and never delivers it (issue 11, finding 7: such an identity held
//! every round until the 600 s deadline). Real processes on loopback, the run file's default deadline; the
//! idle identity is the `idle` misbehaviour, so the bench needs a `--features adversary` build.

use super::corpus;
use super::trust::{require_misbehaviours, run_file, TrustArgs};
use crate::children::Children;
use agora_protocol::StatusReport;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct LivenessArgs {
    /// Corpus (default: tinyshakespeare when present, else a generated Markov corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 12)]
    pub rounds: u64,
    #[arg(long, default_value_t = 20)]
    pub inner_steps: u64,
    #[arg(long, default_value = "runs/bench-liveness")]
    pub out: PathBuf,
}

/// One run: how long its rounds took, and what the idle identity got.
struct Outcome {
    rounds_per_minute: f64,
    seconds: f64,
    idle_assignments: Option<String>,
}

fn run(args: &LivenessArgs, corpus: &Path, idle: bool) -> Result<Outcome> {
    let name = if idle { "with-idle" } else { "honest" };
    let dir = args.out.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let dir = std::fs::canonicalize(&dir)?;
    let trust = TrustArgs {
        data: None,
        rounds: args.rounds,
        inner_steps: args.inner_steps,
        batch_size: 8,
        seq_len: 64,
        codec: "int8".into(),
        aggregation: "mean".into(),
        spot_check: 0.25,
        behaviours: vec![],
        out: dir.clone(),
        json: false,
    };
    let run = dir.join("run.toml");
    std::fs::write(&run, run_file(&trust, corpus, 2, 7)?)?;
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    let mut procs = Children::new();
    let (coordinator, url) =
        crate::net::spawn_coordinator(&run, &dir.join("coordinator"), &dir.join("logs/coordinator.log"))?;
    procs.push("coordinator", coordinator);
    let mut names = vec!["honest-0", "honest-1"];
    if idle {
        names.push("idle");
    }
    for w in &names {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--coordinator", &url, "--threads", "1", "--name", w, "--data-dir"])
            .arg(dir.join("workers").join(w))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("logs").join(format!("{w}.log")))?);
        if *w == "idle" {
            cmd.args(["--behaviour", "idle"]);
        }
        procs.push(w.to_string(), cmd.spawn().with_context(|| format!("cannot start {w}"))?);
    }
    // Rounds are timed from the close of round 0 (which includes every process's start-up) to the end.
    let started = Instant::now();
    let mut after_round_0: Option<Instant> = None;
    let status = loop {
        let status: StatusReport = crate::net::fetch_json(&url, "/v1/status")?;
        if status.round >= 1 && after_round_0.is_none() {
            after_round_0 = Some(Instant::now());
        }
        if status.finished {
            break status;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("{name}: not finished in an hour; see {}", dir.join("logs").display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let since = after_round_0.context("round 0 never closed")?;
    let seconds = since.elapsed().as_secs_f64();
    let idle_assignments = idle.then(|| {
        let log = std::fs::read_to_string(dir.join("logs/coordinator.log")).unwrap_or_default();
        let no_shows = log.lines().filter(|l| l.contains("no-show")).count();
        let idle_id = status.workers.iter().find(|w| w.name == "idle").map(|w| w.id.short());
        let assigned =
            idle_id.map_or(0, |id| log.lines().filter(|l| l.contains(" assigned") && l.contains(id.as_str())).count());
        format!("held work in {assigned} of {} rounds, {no_shows} no-shows recorded", status.round)
    });
    Ok(Outcome { rounds_per_minute: (status.round - 1) as f64 * 60.0 / seconds, seconds, idle_assignments })
}

pub fn liveness(args: LivenessArgs) -> Result<()> {
    require_misbehaviours(cfg!(feature = "adversary"))?;
    let corpus = corpus(args.data.clone(), &args.out)?;
    let honest = run(&args, &corpus, false)?;
    eprintln!("2 honest workers: {:.2} rounds/min", honest.rounds_per_minute);
    let with_idle = run(&args, &corpus, true)?;
    eprintln!("2 honest + 1 idle: {:.2} rounds/min", with_idle.rounds_per_minute);
    println!(
        "liveness: tiny model, {} rounds × H = {}, 2 honest workers, deadline 600 s (the default), grace 0.5 × the quorum's time\n",
        args.rounds, args.inner_steps
    );
    println!("| run | rounds 1..{} took | rounds per minute | vs honest only |", args.rounds);
    println!("|---|---:|---:|---:|");
    println!("| 2 honest | {:.1} s | {:.2} | 1.00 |", honest.seconds, honest.rounds_per_minute);
    println!(
        "| 2 honest + 1 identity that takes work and never uploads | {:.1} s | {:.2} | {:.2} |",
        with_idle.seconds,
        with_idle.rounds_per_minute,
        with_idle.rounds_per_minute / honest.rounds_per_minute
    );
    if let Some(idle) = with_idle.idle_assignments {
        println!("\nthe idle identity {idle}");
    }
    Ok(())
}
