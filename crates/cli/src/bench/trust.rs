//! `agora bench trust`: the adversarial suite. For each misbehaviour, a real coordinator and real worker
//! processes (3 honest, 1 adversarial) train the same run; the table says whether the cheater was
//! detected or neutralised and by what, what it earned, what the honest workers earned against the
//! honest-only run, the final validation loss against that run, and how often honest work was refused.
//! Needs a binary built with `--features adversary` (the misbehaviours are compiled only there); refuses to
//! run without them, and fails a scenario whose attacker did not really take part.

use super::compression::parse_codec;
use crate::children::Children;
use agora_ledger::WorkerStatement;
use agora_protocol::{JudgedSubmission, LeaderboardEntry, RunInfo, StatusReport, WorkerId};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Every misbehaviour of the suite, in the issue's order.
pub const BEHAVIOURS: [&str; 9] =
    ["nan", "scaled", "noise", "sign-flip", "copy", "free-ride", "replay", "other-data", "chain-lie"];

#[derive(Args, Clone)]
pub struct TrustArgs {
    /// Corpus (default: tinyshakespeare when present, else a generated Markov corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    #[arg(long, default_value_t = 12)]
    pub inner_steps: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value = "int8")]
    pub codec: String,
    /// Aggregation rule: mean, clipped_mean[:C], trimmed_mean[:T], median, top_n[:N].
    #[arg(long, default_value = "mean")]
    pub aggregation: String,
    /// Fraction of submissions spot-checked.
    #[arg(long, default_value_t = 1.0)]
    pub spot_check: f64,
    /// Which misbehaviours (comma-separated; default: all nine).
    #[arg(long, value_delimiter = ',')]
    pub behaviours: Vec<String>,
    #[arg(long, default_value = "runs/bench-trust")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub behaviour: String,
    /// Verdicts of the attacker's receipts (and refusals at upload), e.g. `{"copy": 5, "zero_score": 1}`.
    pub attacker_verdicts: BTreeMap<String, u64>,
    pub attacker_credits: u64,
    pub honest_credits: u64,
    /// Honest submissions judged, and how many were not accepted (false positives).
    pub honest_submissions: u64,
    pub honest_rejected: u64,
    pub final_val_loss: f64,
    /// Spot checks of honest submissions that matched bit for bit.
    pub exact_spot_checks: u64,
    /// Coordinator seconds spent re-running spot-checked segments and judging rounds, and worker seconds
    /// spent training (all workers).
    pub spot_check_seconds: f64,
    pub judge_seconds: f64,
    pub train_seconds: f64,
    /// Every receipt of every worker verified offline against the signed round roots.
    pub receipts_verified: usize,
    /// Mean (assigned − random) held-out gain over the judged uploads that were scored: the evidence of
    /// training on the assignment, for the honest workers and for the attacker.
    pub honest_evidence: Option<f64>,
    pub attacker_evidence: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TrustReport {
    pub baseline: Scenario,
    pub attacks: Vec<Scenario>,
    pub false_positive_rate: f64,
    pub honest_submissions: u64,
}

fn default_data() -> Option<PathBuf> {
    let p = PathBuf::from("../shared/data/tinyshakespeare.txt");
    p.is_file().then_some(p)
}

fn run_file(args: &TrustArgs, corpus: &Path) -> Result<String> {
    let compression = toml::to_string(&parse_codec(&args.codec)?)?;
    let aggregation: agora_verify::AggregationRule = args.aggregation.parse()?;
    Ok(format!(
        r#"# Written by `agora bench trust`.
seed = 7
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
[rounds]
count = {r}
min_workers = 3
deadline_secs = 300
heartbeat_timeout_secs = 20
[eval]
batches = 10
[compression]
{compression}
[trust]
spot_check = {spot}
aggregation = {aggregation}
"#,
        corpus = corpus.display().to_string(),
        h = args.inner_steps,
        b = args.batch_size,
        t = args.seq_len,
        warmup = (args.rounds * args.inner_steps / 20).max(1),
        r = args.rounds,
        spot = args.spot_check,
        aggregation = inline_table(&serde_json::to_value(aggregation)?),
    ))
}

/// A flat JSON object as a TOML inline table (JSON strings and numbers are TOML literals).
fn inline_table(value: &serde_json::Value) -> String {
    let fields: Vec<String> = value.as_object().into_iter().flatten().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", fields.join(", "))
}

fn get<T: serde::de::DeserializeOwned>(url: &str, path: &str) -> Result<T> {
    crate::net::fetch_json(url, path)
}

/// Runs one scenario: 3 honest workers, plus one with `behaviour` unless it is the honest-only baseline.
fn scenario(args: &TrustArgs, corpus: &Path, behaviour: Option<&str>) -> Result<Scenario> {
    let name = behaviour.unwrap_or("honest-only");
    let dir = args.out.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let dir = std::fs::canonicalize(&dir)?;
    let run = dir.join("run.toml");
    std::fs::write(&run, run_file(args, corpus)?)?;
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    // The coordinator and the workers, killed when the scenario ends, however it ends.
    let mut procs = Children::new();
    let log = |n: &str| std::fs::File::create(dir.join("logs").join(format!("{n}.log")));
    let (coordinator, url) =
        crate::net::spawn_coordinator(&run, &dir.join("coordinator"), &dir.join("logs/coordinator.log"))
            .with_context(|| format!("{name}: see {}", dir.join("logs").display()))?;
    procs.push("coordinator", coordinator);
    let info: RunInfo = get(&url, "/v1/run")?;
    let mut workers: Vec<(String, bool)> = (0..3).map(|i| (format!("honest-{i}"), true)).collect();
    if behaviour.is_some() {
        workers.push(("attacker".into(), false));
    }
    for (w, honest) in &workers {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--coordinator", &url, "--threads", "1", "--json", "--name", w, "--data-dir"])
            .arg(dir.join("workers").join(w))
            .stdout(Stdio::piped())
            .stderr(log(w)?);
        if !honest {
            let b = behaviour.expect("an attacker has a behaviour");
            let arg =
                if b == "copy" { format!("copy:{}", dir.join("coordinator/blobs").display()) } else { b.to_string() };
            cmd.args(["--behaviour", &arg]);
        }
        procs.push(w.clone(), cmd.spawn().with_context(|| format!("{name}: cannot start {w}"))?);
    }
    // Every worker exits once the run is finished (a refused attacker may exit earlier, with an error).
    let started = Instant::now();
    let mut summaries: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut attacker_exit = None;
    for ((w, honest), (_, child)) in workers.iter().zip(procs.iter_mut().skip(1)) {
        loop {
            if let Some(status) = child.try_wait()? {
                if *honest && !status.success() {
                    bail!("{name}: honest worker {w} failed ({status}); see {}", dir.join("logs").display());
                }
                if !honest {
                    attacker_exit = Some(status);
                }
                let mut line = String::new();
                BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
                if let Ok(v) = serde_json::from_str(&line) {
                    summaries.insert(w.clone(), v);
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("{name}: {w} did not finish in 30 minutes; see {}", dir.join("logs").display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let status: StatusReport = get(&url, "/v1/status")?;
    if let Some(exit) = attacker_exit {
        let log = dir.join("logs/attacker.log");
        let joined = status.workers.iter().any(|w| w.name == "attacker");
        check_attacker_exit(name, exit, joined, &std::fs::read_to_string(&log).unwrap_or_default())
            .with_context(|| format!("see {}", log.display()))?;
    }
    if !status.finished {
        bail!("{name}: the workers exited but the run is not finished; see {}", dir.join("logs").display());
    }
    let board: Vec<LeaderboardEntry> = get(&url, "/v1/leaderboard")?;
    let names: BTreeMap<WorkerId, String> = status.workers.iter().map(|w| (w.id, w.name.clone())).collect();
    let mut result = Scenario {
        behaviour: name.to_string(),
        attacker_verdicts: BTreeMap::new(),
        attacker_credits: 0,
        honest_credits: 0,
        honest_submissions: 0,
        honest_rejected: 0,
        final_val_loss: status.history.last().and_then(|h| h.val_loss).context("no final validation loss")?,
        exact_spot_checks: 0,
        spot_check_seconds: counter(&status, "spot_check_ms") as f64 / 1000.0,
        judge_seconds: counter(&status, "judge_ms") as f64 / 1000.0,
        train_seconds: summaries.values().filter_map(|s| s["train_seconds"].as_f64()).sum(),
        receipts_verified: 0,
        honest_evidence: None,
        attacker_evidence: None,
    };
    let judged: Vec<JudgedSubmission> = get(&url, "/v1/judgements")?;
    let evidence = |honest: bool| -> Option<f64> {
        let xs: Vec<f64> = judged
            .iter()
            .filter(|j| names.get(&j.worker).is_some_and(|n| n.starts_with("honest")) == honest)
            .filter_map(|j| Some(j.gain_assigned? - j.gain_random?))
            .collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    result.honest_evidence = evidence(true);
    result.attacker_evidence = evidence(false);
    let refused_nan = counter(&status, "rejected.non_finite");
    if refused_nan > 0 {
        result.attacker_verdicts.insert("non_finite (refused at upload)".into(), refused_nan);
    }
    for entry in &board {
        let statement: WorkerStatement = get(&url, &format!("/v1/ledger?worker={}", entry.worker.hex()))?;
        let report = agora_ledger::verify_statement(&statement, Some(&info.coordinator_key))
            .with_context(|| format!("{name}: the statement of {} does not verify", entry.worker.short()))?;
        result.receipts_verified += report.receipts;
        let honest = names.get(&entry.worker).is_some_and(|n| n.starts_with("honest"));
        for r in &statement.receipts {
            let verdict = r.receipt.receipt.verdict.clone();
            if honest {
                result.honest_submissions += 1;
                result.honest_rejected += u64::from(verdict != "accepted");
            } else {
                *result.attacker_verdicts.entry(verdict).or_default() += 1;
            }
        }
        if honest {
            result.honest_credits += statement.balance;
        } else {
            result.attacker_credits += statement.balance;
        }
    }
    // Spot checks that reproduced the committed state bit for bit (same thread count on both sides).
    let coordinator_log = std::fs::read_to_string(dir.join("logs/coordinator.log")).unwrap_or_default();
    result.exact_spot_checks =
        coordinator_log.lines().filter(|l| l.contains("spot check re-run") && l.contains("exact=true")).count() as u64;
    Ok(result)
}

/// Refuses to run the suite on a binary built without the misbehaving workers: there `agora worker` has no
/// `--behaviour`, every attacker would die at argument parsing, and every attack would pass for defeated.
fn require_misbehaviours(compiled_in: bool) -> Result<()> {
    ensure!(
        compiled_in,
        "`agora bench trust` needs the misbehaving workers, which this binary lacks: build it with \
         `--features adversary` (bench/trust.sh does: target/adversary/agora)"
    );
    Ok(())
}

/// Whether the attacker's exit leaves its scenario meaningful. A clean exit (the run finished) does; so does
/// stopping, after it joined, because the coordinator refused its upload outright (a worker does not
/// retrain a payload the coordinator refused, as with `nan`'s non-finite Δ). Any other failure — it never
/// joined (e.g. it died at argument parsing), it crashed, it lost the coordinator — means its misbehaviour
/// was never put to the defences, and the scenario fails rather than count as an attack defeated.
fn check_attacker_exit(scenario: &str, exit: ExitStatus, joined: bool, log: &str) -> Result<()> {
    if exit.success() {
        return Ok(());
    }
    let error = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .map_or("no error in its log".to_string(), |e| format!("its error: {e}"));
    ensure!(
        joined,
        "{scenario}: the attacker exited ({exit}) without ever joining the run, so its misbehaviour was never \
         tested: {error}"
    );
    ensure!(
        error.contains("the coordinator refused"),
        "{scenario}: the attacker failed ({exit}) other than by the coordinator refusing its upload, so the \
         scenario does not show its misbehaviour defeated: {error}"
    );
    Ok(())
}

fn counter(status: &StatusReport, name: &str) -> u64 {
    status.counters.iter().find(|c| c.0 == name).map_or(0, |c| c.1)
}

fn describe(verdicts: &BTreeMap<String, u64>) -> String {
    if verdicts.is_empty() {
        return "-".into();
    }
    verdicts.iter().map(|(k, v)| format!("{k}×{v}")).collect::<Vec<_>>().join(", ")
}

pub fn trust(mut args: TrustArgs) -> Result<()> {
    require_misbehaviours(cfg!(feature = "adversary"))?;
    if args.behaviours.is_empty() {
        args.behaviours = BEHAVIOURS.iter().map(|s| s.to_string()).collect();
    }
    for b in &args.behaviours {
        if !BEHAVIOURS.contains(&b.as_str()) {
            bail!("unknown behaviour {b:?}: one of {}", BEHAVIOURS.join(", "));
        }
    }
    let corpus = match args.data.clone().or_else(default_data) {
        Some(p) => std::fs::canonicalize(&p).with_context(|| format!("{}: no such corpus", p.display()))?,
        None => {
            std::fs::create_dir_all(&args.out)?;
            let p = args.out.join("corpus.txt");
            std::fs::write(&p, agora_data::MarkovSource::new(1).generate(200_000, 1))?;
            std::fs::canonicalize(&p)?
        }
    };
    let log = |s: &Scenario| {
        eprintln!(
            "{:<12} attacker: {} (credits {}); honest credits {}; honest refused {}/{}; val loss {:.4}",
            s.behaviour,
            describe(&s.attacker_verdicts),
            s.attacker_credits,
            s.honest_credits,
            s.honest_rejected,
            s.honest_submissions,
            s.final_val_loss
        )
    };
    let baseline = scenario(&args, &corpus, None)?;
    log(&baseline);
    let mut attacks = Vec::new();
    for b in &args.behaviours {
        let s = scenario(&args, &corpus, Some(b))?;
        log(&s);
        attacks.push(s);
    }
    let honest_submissions: u64 = attacks.iter().chain([&baseline]).map(|s| s.honest_submissions).sum();
    let honest_rejected: u64 = attacks.iter().chain([&baseline]).map(|s| s.honest_rejected).sum();
    let report = TrustReport {
        false_positive_rate: honest_rejected as f64 / honest_submissions.max(1) as f64,
        honest_submissions,
        baseline,
        attacks,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let b = &report.baseline;
    println!(
        "adversarial suite: tiny model, {} rounds × H = {}, batch {}×{}, codec {}, aggregation {}, spot checks {:.0}% of submissions",
        args.rounds, args.inner_steps, args.batch_size, args.seq_len, args.codec, args.aggregation, args.spot_check * 100.0
    );
    println!("honest-only run (3 workers): val loss {:.4}, honest credits {}\n", b.final_val_loss, b.honest_credits);
    println!(
        "| attack | attacker's verdicts | attacker credits | honest credits vs honest-only | val loss | vs honest-only | honest refused | assigned − random gain (honest / attacker) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let evidence = |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{e:+.4}"));
    for s in &report.attacks {
        println!(
            "| {} | {} | {} | {:.3} | {:.4} | {:+.2}% | {}/{} | {} / {} |",
            s.behaviour,
            describe(&s.attacker_verdicts),
            s.attacker_credits,
            s.honest_credits as f64 / b.honest_credits.max(1) as f64,
            s.final_val_loss,
            100.0 * (s.final_val_loss / b.final_val_loss - 1.0),
            s.honest_rejected,
            s.honest_submissions,
            evidence(s.honest_evidence),
            evidence(s.attacker_evidence)
        );
    }
    let all = || report.attacks.iter().chain([&report.baseline]);
    let spot: f64 = all().map(|s| s.spot_check_seconds).sum();
    let judge: f64 = all().map(|s| s.judge_seconds).sum();
    let train: f64 = all().map(|s| s.train_seconds).sum();
    let exact: u64 = report.attacks.iter().chain([&report.baseline]).map(|s| s.exact_spot_checks).sum();
    let receipts: usize = report.attacks.iter().chain([&report.baseline]).map(|s| s.receipts_verified).sum();
    println!(
        "\nfalse positives: {} of {} honest submissions refused ({:.2}%)",
        honest_rejected,
        report.honest_submissions,
        100.0 * report.false_positive_rate
    );
    println!(
        "verification cost, as a share of the workers' {train:.1} s of training: spot-check re-runs {spot:.1} s ({:.1}%), \
         judging (decode, similarity, loss before/after) {judge:.1} s ({:.1}%); {exact} spot checks bit-exact",
        100.0 * spot / train.max(1e-9),
        100.0 * judge / train.max(1e-9)
    );
    println!("receipts verified offline against signed round roots: {receipts}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_suite_refuses_a_binary_without_the_misbehaviours() {
        let err = require_misbehaviours(false).unwrap_err().to_string();
        assert!(err.contains("--features adversary") && err.contains("bench/trust.sh"), "{err}");
        require_misbehaviours(true).unwrap();
    }

    #[test]
    fn an_attacker_that_did_not_take_part_fails_its_scenario() {
        let (ok, failed) = (ExitStatus::from_raw(0), ExitStatus::from_raw(1 << 8));
        check_attacker_exit("noise", ok, true, "").unwrap();
        // `nan`: refused at upload, the worker stops; that is the defence working.
        let refused = "WARN ...\nerror: the coordinator refused this worker's pseudo-gradient (422 Unprocessable \
                       Entity non_finite): values are not finite";
        check_attacker_exit("nan", failed, true, refused).unwrap();
        // A binary without `--behaviour`: the attacker dies at argument parsing and never joins.
        let unparsed = "error: unexpected argument '--behaviour' found";
        let err = check_attacker_exit("scaled", failed, false, unparsed).unwrap_err().to_string();
        assert!(
            err.starts_with("scaled: ") && err.contains("without ever joining") && err.contains("--behaviour"),
            "{err}"
        );
        // Joined, then failed for another reason.
        let lost = "error: GET http://127.0.0.1:1/v1/work: connection refused (gave up after 600s)";
        let err = check_attacker_exit("copy", failed, true, lost).unwrap_err().to_string();
        assert!(err.starts_with("copy: ") && err.contains("connection refused"), "{err}");
        let killed = ExitStatus::from_raw(9);
        assert!(check_attacker_exit("replay", killed, true, "").is_err());
    }
}
