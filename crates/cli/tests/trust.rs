//! Trust across real processes: the adversarial suite (one cheating worker per misbehaviour beside three
//! honest ones), offline verification of receipts against the signed round roots, and cohort admission
//! between two runs. The cheating workers exist only in builds with the `adversary` feature (the README's
//! test command enables it).
#![cfg(feature = "adversary")]

mod common;

use agora_protocol::{LeaderboardEntry, RunInfo};
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(600);

/// Every misbehaviour is detected or neutralised: the cheater earns nothing, the honest workers are
/// neither refused nor short-changed, and the model ends within 2.5% of the honest-only run.
#[test]
fn adversarial_suite() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(AGORA)
        .args(["bench", "trust", "--rounds", "3", "--inner-steps", "8", "--batch-size", "4", "--seq-len", "32"])
        // Every upload challenged, so that three rounds show each spot-check-caught attack caught.
        .args([
            "--spot-check",
            "1",
            "--behaviours",
            "nan,scaled,noise,sign-flip,copy,free-ride,replay,other-data,chain-lie",
        ])
        .args(["--json", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let baselines = report["baselines"].as_array().unwrap();
    assert_eq!(baselines.len(), 1, "one honest-only reference for 3 honest workers");
    let baseline = &baselines[0];
    assert_eq!(baseline["honest_workers"], 3);
    let attacks = report["attacks"].as_array().unwrap();
    assert_eq!(attacks.len(), 9);
    // What each misbehaviour must be caught by.
    let expected: [(&str, &[&str]); 9] = [
        ("nan", &["non_finite (refused at upload)"]),
        ("scaled", &["norm"]),
        // Their uploads are not the compression of their chains' end: the end link fails first.
        ("noise", &["spot_check_failed", "off_consensus", "zero_score"]),
        ("sign-flip", &["spot_check_failed", "off_consensus", "zero_score"]),
        ("copy", &["copy"]),
        ("free-ride", &["spot_check_failed", "replay", "zero_score"]),
        ("replay", &["replay", "spot_check_failed", "off_consensus", "zero_score"]),
        ("other-data", &["spot_check_failed"]),
        ("chain-lie", &["spot_check_failed"]),
    ];
    for (attack, (name, caught_by)) in attacks.iter().zip(expected) {
        assert_eq!(attack["behaviour"], name);
        let verdicts = attack["attacker_verdicts"].as_object().unwrap();
        assert!(!verdicts.is_empty(), "{name}: the attacker was never judged: {attack}");
        for verdict in verdicts.keys() {
            assert!(caught_by.contains(&verdict.as_str()), "{name}: verdict {verdict} ({attack})");
        }
        assert_eq!(attack["attacker_credits"], 0, "{name}: {attack}");
        assert_eq!(attack["attacker_pending"], 0, "{name}: nothing of a caught cheater stays pending: {attack}");
        assert_eq!(attack["honest_rejected"], 0, "{name}: an honest upload was refused: {attack}");
        // Credits per judged honest upload: an honest worker that misses a round under CPU load (a
        // liveness matter, not a verdict) must not read as honest work short-changed.
        let per_upload = |credits: &Value, uploads: &Value| credits.as_f64().unwrap() / uploads.as_f64().unwrap();
        let honest = per_upload(&attack["honest_credits"], &attack["honest_submissions"])
            / per_upload(&baseline["credits"], &baseline["honest_submissions"]);
        assert!(honest > 0.85, "{name}: honest uploads earned {honest:.3} of the honest-only run's: {attack}");
        assert!(attack["honest_submissions"].as_u64().unwrap() >= 6, "{name}: honest workers mostly absent: {attack}");
        let gap = attack["final_val_loss"].as_f64().unwrap() / baseline["final_val_loss"].as_f64().unwrap() - 1.0;
        assert!(gap < 0.025, "{name}: final validation loss {:+.2}% against the honest-only run", 100.0 * gap);
        assert!(attack["receipts_verified"].as_u64().unwrap() >= 9, "{name}: {attack}");
    }
    assert!(report["honest_submissions"].as_u64().unwrap() >= 50);
    assert!(report["false_positive_rate"].as_f64().unwrap() <= 0.01, "{report}");
}

fn agora(args: &[&str]) -> std::process::Output {
    Command::new(AGORA).args(args).output().unwrap()
}

/// Run A: six workers, two of them cheating. Every worker checks its receipts offline with `agora ledger
/// verify`; a tampered statement fails. Run B admits only A's top three identities by reputation (the
/// three best honest ones) and refuses the rest with a message that says why.
#[test]
fn cohort_admission_and_offline_receipts() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let spec =
        RunSpec { rounds: 3, inner_steps: 6, min_workers: 4, trust: "spot_check = 1.0".into(), ..RunSpec::default() };
    let mut a = Cluster::start(&a_dir, &spec, None);
    let workers_dir = dir.path().join("identities");
    // The same identities (key files) in both runs.
    let start = |cluster: &mut Cluster, name: &str, extra: &[&str]| {
        cluster.start_worker_with(name, &workers_dir.join(name), extra);
    };
    let honest = ["h0", "h1", "h2", "h3"];
    for name in honest {
        start(&mut a, name, &[]);
    }
    start(&mut a, "free", &["--behaviour", "free-ride"]);
    start(&mut a, "flip", &["--behaviour", "sign-flip"]);
    let report = a.wait_for("run A to finish", LONG, |r| r.finished);
    a.finish_workers(Duration::from_secs(60));
    assert_eq!(report.round, 3);

    // Offline receipts: every worker's statement verifies against the coordinator key it pinned.
    let info: RunInfo = reqwest::blocking::get(format!("{}/v1/run", a.url)).unwrap().json().unwrap();
    let key = info.coordinator_key.hex();
    let board: Vec<LeaderboardEntry> =
        reqwest::blocking::get(format!("{}/v1/leaderboard", a.url)).unwrap().json().unwrap();
    assert_eq!(board.len(), 6);
    for entry in &board {
        let out = agora(&["ledger", &a.url, "--worker", &entry.worker.hex(), "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = dir.path().join(format!("statement-{}.json", entry.worker.short()));
        std::fs::write(&file, &out.stdout).unwrap();
        let verify = agora(&["ledger", "verify", file.to_str().unwrap(), "--coordinator-key", &key]);
        let text = String::from_utf8_lossy(&verify.stdout);
        assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
        let receipts: usize = text.strip_prefix("ok: ").and_then(|t| t.split(' ').next()?.parse().ok()).unwrap_or(0);
        assert!(receipts >= 1, "{text}");
        assert!(text.contains(&key) && text.contains("key from --coordinator-key"), "{text}");
        // Without a key to trust nothing verifies: the key a statement carries proves nothing.
        let unkeyed = agora(&["ledger", "verify", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&unkeyed.stderr);
        assert!(!unkeyed.status.success() && stderr.contains("proves nothing"), "{stderr}");
        // The key a worker data directory pinned for the run: DIR/runs/RUN_ID/coordinator.key.pub.
        let pinned_dir = dir.path().join("pinned");
        let key_file = pinned_dir.join("runs").join(&info.run_id).join("coordinator.key.pub");
        std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        let pinned = agora(&["ledger", "verify", file.to_str().unwrap(), "--pinned", pinned_dir.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&pinned.stdout);
        assert!(pinned.status.success(), "{}", String::from_utf8_lossy(&pinned.stderr));
        assert!(text.contains("key from --pinned"), "{text}");
        // Claiming more credits than the signed receipts give is caught offline.
        let mut statement: Value = serde_json::from_slice(&out.stdout).unwrap();
        statement["receipts"][0]["receipt"]["receipt"]["credits"] = Value::from(10_000_000u64);
        statement["balance"] = Value::from(statement["balance"].as_u64().unwrap() + 10_000_000);
        std::fs::write(&file, serde_json::to_vec(&statement).unwrap()).unwrap();
        let forged = agora(&["ledger", "verify", file.to_str().unwrap(), "--coordinator-key", &key]);
        assert!(!forged.status.success(), "a tampered receipt verified");
    }
    let names: std::collections::HashMap<_, _> = board.iter().map(|e| (e.worker, e.name.clone())).collect();
    let ranked: Vec<&str> = board.iter().map(|e| names[&e.worker].as_str()).collect();
    assert!(ranked[..4].iter().all(|n| n.starts_with('h')), "the cheaters rank last: {ranked:?}");
    for cheat in &board[4..] {
        assert!(cheat.rating == 0.0 && cheat.credits == 0, "{cheat:?}");
    }
    // The ledger balances: every credit has its debit.
    let ledger = agora(&["ledger", &a.url, "--json"]);
    let ledger: Value = serde_json::from_slice(&ledger.stdout).unwrap();
    let total: i64 = ledger["balances"].as_array().unwrap().iter().map(|b| b[1].as_i64().unwrap()).sum();
    assert_eq!(total, 0);
    let table = agora(&["leaderboard", &a.url]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("rating"));
    drop(a);

    // Run B: the cohort of A's three best.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let previous = format!("sqlite://{}", a_dir.join("coordinator/coordinator.db").display());
    let spec_b = RunSpec {
        rounds: 2,
        inner_steps: 6,
        min_workers: 3,
        admission: format!("policy = \"cohort\"\nprevious = \"{previous}\"\ncohort_size = 3"),
        ..RunSpec::default()
    };
    let mut b = Cluster::start(&b_dir, &spec_b, None);
    for name in ["h0", "h1", "h2", "h3", "free", "flip"] {
        start(&mut b, name, &[]);
    }
    let cohort: Vec<&str> = ranked[..3].to_vec();
    let report = b.wait_for("run B to finish", LONG, |r| r.finished);
    let joined: Vec<String> = report.workers.iter().map(|w| w.name.clone()).collect();
    let mut sorted_joined = joined.clone();
    sorted_joined.sort();
    let mut sorted_cohort: Vec<String> = cohort.iter().map(|s| s.to_string()).collect();
    sorted_cohort.sort();
    assert_eq!(sorted_joined, sorted_cohort, "run B admits exactly A's top three");
    for (name, child) in &mut b.workers {
        let status = child.wait().unwrap();
        let log = std::fs::read_to_string(b_dir.join(format!("{name}.log"))).unwrap();
        if cohort.contains(&name.as_str()) {
            assert!(status.success(), "{name}: {log}");
        } else {
            assert!(!status.success(), "{name} was not refused");
            assert!(log.contains("not_admitted") && log.contains("top 3 identities by reputation"), "{name}: {log}");
        }
    }
    // Reputations carried over: B's leaderboard starts from A's ratings.
    let board_b: Vec<LeaderboardEntry> =
        reqwest::blocking::get(format!("{}/v1/leaderboard", b.url)).unwrap().json().unwrap();
    assert_eq!(board_b.len(), 6, "all of A's ratings were carried over");
}
