//! `agora bench trust`: the adversarial suite. For each misbehaviour, a real coordinator and real worker
//! processes (3 honest, 1 adversarial) train the same run; the table says whether the cheater was
//! detected or neutralised and by what, what it earned, what the honest workers earned against the
//! honest-only run, the final validation loss against that run, and how often honest work was refused.
//! Needs a binary built with `--features adversary` (the misbehaviours are compiled only there); refuses to
//! run without them, and fails a scenario whose attacker did not really take part.

mod report;

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

/// Every scenario of the suite: the nine misbehaviours of issue 5 (3 honest workers and 1 attacker), then
/// issue 11's: honest workers outnumbering the data units, two tiny uploads out of four, an upload that is
/// not the compression of its chain's end (`inflate`), and a worker that skips one segment every round
/// (`lazy`, the cheapest lie, against vesting).
pub const BEHAVIOURS: [&str; 13] = [
    "nan",
    "scaled",
    "noise",
    "sign-flip",
    "copy",
    "free-ride",
    "replay",
    "other-data",
    "chain-lie",
    "duplicate-units",
    "tiny",
    "inflate",
    "lazy",
];

/// Who takes part in a scenario.
#[derive(Debug, Clone, PartialEq)]
struct Cast {
    honest: usize,
    /// One misbehaving worker per entry.
    attackers: Vec<String>,
    /// Cut the corpus down to this many data units (more workers than units).
    units: Option<usize>,
    /// The run file's seed: initial weights, data units and their order.
    seed: u64,
}

/// Every scenario's seed; the honest-only runs at [`OTHER_SEEDS`] show how far the final loss moves with
/// the initial weights and the data order alone.
const SEED: u64 = 7;
const OTHER_SEEDS: [u64; 2] = [8, 9];

fn cast(behaviour: Option<&str>) -> Cast {
    let seed = SEED;
    match behaviour {
        None => Cast { honest: 3, attackers: vec![], units: None, seed },
        Some("duplicate-units") => Cast { honest: 6, attackers: vec![], units: Some(4), seed },
        Some("tiny") => Cast { honest: 2, attackers: vec!["tiny".into(), "tiny".into()], units: None, seed },
        Some(b) => Cast { honest: 3, attackers: vec![b.to_string()], units: None, seed },
    }
}

#[derive(Args, Clone)]
pub struct TrustArgs {
    /// Corpus (default: tinyshakespeare when present, else a generated Markov corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 12)]
    pub rounds: u64,
    #[arg(long, default_value_t = 20)]
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
    /// Fraction of submissions spot-checked (the run file's default).
    #[arg(long, default_value_t = 0.25)]
    pub spot_check: f64,
    /// Which scenarios (comma-separated; default: all of them).
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
    /// Credits the attackers were paid (posted: vested after probation), and what is still pending for
    /// them (voided if they are caught first, never posted without verified rounds).
    pub attacker_credits: u64,
    pub attacker_pending: u64,
    /// Credits booked for the honest workers (posted + pending), and of those posted.
    pub honest_credits: u64,
    pub honest_posted: u64,
    /// Workers in the scenario.
    pub honest_workers: usize,
    pub attackers: usize,
    /// Honest submissions judged, and how many were not accepted (false positives).
    pub honest_submissions: u64,
    pub honest_rejected: u64,
    pub final_val_loss: f64,
    /// Spot-checked honest uploads that passed / were challenged, and re-runs (anyone's) that reproduced the
    /// committed state bit for bit or only within the tolerance.
    pub honest_spot_checks_passed: u64,
    pub honest_spot_checks: u64,
    pub exact_spot_checks: u64,
    pub tolerance_spot_checks: u64,
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
    pub baselines: Vec<Baseline>,
    pub attacks: Vec<Scenario>,
    pub false_positive_rate: f64,
    pub honest_submissions: u64,
    pub honest_rejected: u64,
    /// The 3-worker honest-only run at other seeds.
    pub other_seeds: Vec<SeedRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedRun {
    pub seed: u64,
    pub final_val_loss: f64,
    pub honest_credits: u64,
}

pub(super) fn run_file(args: &TrustArgs, corpus: &Path, min_workers: usize, seed: u64) -> Result<String> {
    let compression = toml::to_string(&parse_codec(&args.codec)?)?;
    let aggregation: agora_verify::AggregationRule = args.aggregation.parse()?;
    Ok(format!(
        r#"# Written by `agora bench trust`.
seed = {seed}
[model]
preset = "tiny"
[data]
files = [{corpus:?}]
vocab_size = 512
val_fraction = 0.05
[inner]
# Equal rounds: the suite's scenarios count data units of one round (duplicate-units) and TRUST.md's
# figures were measured so; rounds of varying length are verified by tests/distributed.rs.
round_lr_power = 0.0
steps = {h}
batch_size = {b}
seq_len = {t}
lr = 3e-3
min_lr = 3e-4
warmup_steps = {warmup}
[rounds]
count = {r}
min_workers = {min_workers}
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
        seed = seed,
        h = args.inner_steps,
        b = args.batch_size,
        t = args.seq_len,
        warmup = (args.rounds * args.inner_steps / 20).max(1),
        r = args.rounds,
        min_workers = min_workers,
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

/// Runs one scenario: its honest workers and its attackers (none for an honest-only run).
fn scenario(args: &TrustArgs, corpus: &Path, name: &str, cast: &Cast) -> Result<Scenario> {
    let dir = args.out.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let dir = std::fs::canonicalize(&dir)?;
    let run = dir.join("run.toml");
    let corpus = match cast.units {
        Some(units) => units_slice(args, corpus, &dir, units)?,
        None => corpus.to_path_buf(),
    };
    let min_workers = (cast.honest + cast.attackers.len()).min(3);
    std::fs::write(&run, run_file(args, &corpus, min_workers, cast.seed)?)?;
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    // The coordinator and the workers, killed when the scenario ends, however it ends.
    let mut procs = Children::new();
    let log = |n: &str| std::fs::File::create(dir.join("logs").join(format!("{n}.log")));
    let (coordinator, url) =
        crate::net::spawn_coordinator(&run, &dir.join("coordinator"), &dir.join("logs/coordinator.log"))
            .with_context(|| format!("{name}: see {}", dir.join("logs").display()))?;
    procs.push("coordinator", coordinator);
    let info: RunInfo = get(&url, "/v1/run")?;
    if let Some(units) = cast.units {
        let log = std::fs::read_to_string(dir.join("logs/coordinator.log")).unwrap_or_default();
        ensure!(
            log.contains(&format!("units={units}")),
            "{name}: the corpus slice did not cut into {units} units (see {})",
            dir.join("logs/coordinator.log").display()
        );
    }
    let mut workers: Vec<(String, Option<&str>)> = (0..cast.honest).map(|i| (format!("honest-{i}"), None)).collect();
    for (i, b) in cast.attackers.iter().enumerate() {
        workers.push((if cast.attackers.len() == 1 { "attacker".into() } else { format!("attacker-{i}") }, Some(b)));
    }
    for (w, behaviour) in &workers {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--coordinator", &url, "--threads", "1", "--json", "--name", w, "--data-dir"])
            .arg(dir.join("workers").join(w))
            .stdout(Stdio::piped())
            .stderr(log(w)?);
        if let Some(b) = behaviour {
            let arg =
                if *b == "copy" { format!("copy:{}", dir.join("coordinator/blobs").display()) } else { b.to_string() };
            cmd.args(["--behaviour", &arg]);
        }
        procs.push(w.clone(), cmd.spawn().with_context(|| format!("{name}: cannot start {w}"))?);
    }
    // Every worker exits once the run is finished (a refused attacker may exit earlier, with an error).
    let started = Instant::now();
    let mut summaries: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut attacker_exits = Vec::new();
    for ((w, behaviour), (_, child)) in workers.iter().zip(procs.iter_mut().skip(1)) {
        let honest = &behaviour.is_none();
        loop {
            if let Some(status) = child.try_wait()? {
                if *honest && !status.success() {
                    bail!("{name}: honest worker {w} failed ({status}); see {}", dir.join("logs").display());
                }
                if !honest {
                    attacker_exits.push((w.clone(), status));
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
    for (w, exit) in attacker_exits {
        let log = dir.join(format!("logs/{w}.log"));
        let joined = status.workers.iter().any(|x| x.name == w);
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
        attacker_pending: 0,
        honest_credits: 0,
        honest_posted: 0,
        honest_workers: cast.honest,
        attackers: cast.attackers.len(),
        honest_submissions: 0,
        honest_rejected: 0,
        final_val_loss: status.history.last().and_then(|h| h.val_loss).context("no final validation loss")?,
        honest_spot_checks_passed: 0,
        honest_spot_checks: 0,
        exact_spot_checks: 0,
        tolerance_spot_checks: 0,
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
            result.honest_credits += entry.credits + entry.pending_credits;
            result.honest_posted += entry.credits;
        } else {
            result.attacker_credits += entry.credits;
            result.attacker_pending += entry.pending_credits;
        }
    }
    for j in judged.iter().filter(|j| names.get(&j.worker).is_some_and(|n| n.starts_with("honest"))) {
        if let Some(check) = &j.spot_check {
            result.honest_spot_checks += 1;
            result.honest_spot_checks_passed += u64::from(check == "passed");
        }
    }
    // Spot checks that reproduced the committed state bit for bit (same thread count on both sides).
    let coordinator_log = std::fs::read_to_string(dir.join("logs/coordinator.log")).unwrap_or_default();
    let reruns = || coordinator_log.lines().filter(|l| l.contains("spot check re-run") && l.contains("passed=true"));
    result.exact_spot_checks = reruns().filter(|l| l.contains("exact=true")).count() as u64;
    result.tolerance_spot_checks = reruns().filter(|l| l.contains("exact=false")).count() as u64;
    Ok(result)
}

/// Refuses to run the suite on a binary built without the misbehaving workers: there `agora worker` has no
/// `--behaviour`, every attacker would die at argument parsing, and every attack would pass for defeated.
pub(super) fn require_misbehaviours(compiled_in: bool) -> Result<()> {
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

/// The first part of `corpus` that cuts into `units` data units of this suite's rounds (H × B windows of
/// seq_len + 1 tokens; the BPE tokenizer of tinyshakespeare averages about 2.2 bytes a token), written into
/// the scenario's directory. The coordinator's log confirms the count before any worker starts.
fn units_slice(args: &TrustArgs, corpus: &Path, dir: &Path, units: usize) -> Result<PathBuf> {
    let text = std::fs::read_to_string(corpus).with_context(|| format!("{}: cannot read", corpus.display()))?;
    let tokens_per_unit = args.inner_steps as usize * args.batch_size * (args.seq_len + 1);
    // 4.5 units of tokens (the unit count rounds down; the validation split takes 5%).
    let bytes = (tokens_per_unit as f64 * (units as f64 + 0.5) * 2.2 / 0.95) as usize;
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..end])?;
    Ok(path)
}

/// What the honest-only run of the same shape (honest workers and data) earned and reached.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub honest_workers: usize,
    pub credits: u64,
    /// Honest uploads judged (credits per upload are what an attack row is read against).
    pub honest_submissions: u64,
    pub final_val_loss: f64,
}

pub fn trust(mut args: TrustArgs) -> Result<()> {
    require_misbehaviours(cfg!(feature = "adversary"))?;
    if args.behaviours.is_empty() {
        args.behaviours = BEHAVIOURS.iter().map(|s| s.to_string()).collect();
    }
    for b in &args.behaviours {
        if !BEHAVIOURS.contains(&b.as_str()) {
            bail!("unknown scenario {b:?}: one of {}", BEHAVIOURS.join(", "));
        }
    }
    let corpus = super::corpus(args.data.clone(), &args.out)?;
    let log = |s: &Scenario| {
        eprintln!(
            "{:<16} attacker: {} (paid {}, pending {}); honest credits {}; honest refused {}/{}; val loss {:.4}",
            s.behaviour,
            describe(&s.attacker_verdicts),
            s.attacker_credits,
            s.attacker_pending,
            s.honest_credits,
            s.honest_rejected,
            s.honest_submissions,
            s.final_val_loss
        )
    };
    // One honest-only reference per number of honest workers (the attackers' runs are compared with it).
    let mut baselines: BTreeMap<usize, Scenario> = BTreeMap::new();
    let mut attacks = Vec::new();
    for b in &args.behaviours {
        let cast = cast(Some(b));
        if !cast.attackers.is_empty() && !baselines.contains_key(&cast.honest) {
            let reference = Cast { honest: cast.honest, attackers: vec![], units: None, seed: SEED };
            let s = scenario(&args, &corpus, &format!("honest-only-{}", cast.honest), &reference)?;
            log(&s);
            baselines.insert(cast.honest, s);
        }
        let s = scenario(&args, &corpus, b, &cast)?;
        log(&s);
        attacks.push(s);
    }
    // The 3-worker honest-only run again at other seeds: the spread the attack rows are read against.
    let mut other_seeds = Vec::new();
    if baselines.contains_key(&3) {
        for seed in OTHER_SEEDS {
            let cast = Cast { honest: 3, attackers: vec![], units: None, seed };
            let s = scenario(&args, &corpus, &format!("honest-only-3-seed-{seed}"), &cast)?;
            log(&s);
            other_seeds.push((seed, s));
        }
    }
    let everything = || attacks.iter().chain(baselines.values()).chain(other_seeds.iter().map(|(_, s)| s));
    let honest_submissions: u64 = everything().map(|s| s.honest_submissions).sum();
    let honest_rejected: u64 = everything().map(|s| s.honest_rejected).sum();
    let report = TrustReport {
        false_positive_rate: honest_rejected as f64 / honest_submissions.max(1) as f64,
        honest_submissions,
        honest_rejected,
        baselines: baselines
            .values()
            .map(|b| Baseline {
                honest_workers: b.honest_workers,
                credits: b.honest_credits,
                honest_submissions: b.honest_submissions,
                final_val_loss: b.final_val_loss,
            })
            .collect(),
        attacks: attacks.clone(),
        other_seeds: other_seeds
            .iter()
            .map(|(seed, s)| SeedRun {
                seed: *seed,
                final_val_loss: s.final_val_loss,
                honest_credits: s.honest_credits,
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    report::print(&args, &report, &baselines);
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
