//! `agora bench diloco` and Streaming DiLoCo's overlap in `agora bench compression`, end to end on a small
//! synthetic corpus (a few seconds; no ../shared/data needed).

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn agora() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn sweep(corpus: &Path) -> Value {
    let out = agora()
        .args(["bench", "diloco", "--quick", "--data"])
        .arg(corpus)
        .args(["--steps", "8", "--global-batch", "4", "--seq-len", "16", "--workers", "2", "--inner-steps", "2"])
        .args(["--outer-compare", "2:2", "--seeds", "2", "--outer", "default,average:1", "--threads", "1", "--json"])
        .output()
        .expect("agora runs");
    assert!(out.status.success(), "bench diloco failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn diloco_sweep_runs_and_every_configuration_learns() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let made =
        agora().args(["data", "synthetic", "--words", "20000", "--out"]).arg(&corpus).output().expect("agora runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    let r = sweep(&corpus);
    let initial = r["initial_val_loss"].as_f64().unwrap();
    let baseline = &r["baseline"];
    assert_eq!(baseline["rounds"], 8);
    let grid = r["grid"].as_array().unwrap();
    assert_eq!(grid.len(), 2, "one row per --outer recipe");
    assert_eq!((grid[0]["recipe"].as_str(), grid[1]["recipe"].as_str()), (Some("default"), Some("average:1")));
    let diloco = &grid[0];
    assert_eq!((diloco["workers"].as_u64(), diloco["inner_steps"].as_u64()), (Some(2), Some(2)));
    assert_eq!(diloco["rounds"], 4);
    let fewer = diloco["fewer_bytes"].as_f64().unwrap();
    assert!((1.99..=2.0).contains(&fewer), "H = 2: half the syncs of data-parallel, less the headers: {fewer}");
    let params = r["parameters"].as_u64().unwrap();
    // Four fp32 payloads: the values plus agora's header (names digest, tensor table, checksum).
    let sent = diloco["bytes_sent_per_worker"].as_u64().unwrap();
    assert!(sent > 4 * 4 * params && sent < 4 * (4 * params + 2048), "4 rounds of fp32 pseudo-gradients: {sent}");

    let compare = r["outer_comparison"].as_array().unwrap();
    let kinds: Vec<&str> = compare.iter().map(|o| o["outer"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["nesterov", "average", "sgd_momentum"]);
    let base_mean = baseline["mean_val_loss"].as_f64().unwrap();
    for o in std::iter::once(baseline).chain(grid).chain(compare) {
        // Every row: the mean of one run per seed, each seed its own initial weights and data order.
        let runs = o["runs"].as_array().unwrap();
        let seeds: Vec<u64> = runs.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
        assert_eq!(seeds, [0, 1]);
        let losses: Vec<f64> = runs.iter().map(|r| r["val_loss"].as_f64().unwrap()).collect();
        assert_ne!(losses[0], losses[1], "{o}: the seeds differ");
        let mean = o["mean_val_loss"].as_f64().unwrap();
        assert!((mean - (losses[0] + losses[1]) / 2.0).abs() < 1e-12);
        assert!(mean.is_finite() && mean < initial - 0.3, "{o}: validation loss {mean} did not fall from {initial}");
        let gap = o["gap_percent"].as_f64().unwrap();
        assert!((gap - 100.0 * (mean - base_mean) / base_mean).abs() < 1e-9);
    }
    // The baseline's lr was swept (--quick: --lr only) and the best mean kept.
    assert_eq!(r["baselines"].as_array().unwrap().len(), 1);

    // Workers run one after another in one process: a rerun computes the same weights.
    let again = sweep(&corpus);
    assert_eq!(again["grid"][0]["mean_val_loss"], diloco["mean_val_loss"]);
    assert_eq!(again["baseline"]["mean_val_loss"], baseline["mean_val_loss"]);
}

#[test]
fn bad_sweeps_are_refused_with_one_line() {
    let out = agora().args(["bench", "diloco", "--steps", "100", "--inner-steps", "30"]).output().expect("agora runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().starts_with("error: --steps 100 is not divisible by H = 30"), "{stderr}");
    let out = agora().args(["bench", "diloco", "--data", "/nonexistent/corpus.txt"]).output().expect("agora runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such corpus"));
}

/// Overlap changes training (the previous round's outer step on its fragment is applied τ steps late),
/// still learns, and a τ that does not fit in the round is refused.
#[test]
fn overlapped_fragments_learn_and_a_tau_beyond_the_round_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let made =
        agora().args(["data", "synthetic", "--words", "20000", "--out"]).arg(&corpus).output().expect("agora runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let run = |codecs: &str| {
        agora()
            .args(["bench", "compression", "--quick", "--data"])
            .arg(&corpus)
            .args(["--steps", "16", "--global-batch", "4", "--seq-len", "16", "--workers", "2", "--inner-steps", "4"])
            .args(["--codecs", codecs, "--threads", "1", "--json", "--round-lr-power", "0"])
            .output()
            .expect("agora runs")
    };
    let out = run("none,none:f2,none:f2:overlap=1:merge=0.5");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let (plain, overlapped) = (&rows[1], &rows[2]);
    assert_eq!((plain["overlap"]["steps"].as_u64(), overlapped["overlap"]["steps"].as_u64()), (Some(0), Some(1)));
    let initial = r["initial_val_loss"].as_f64().unwrap();
    let (a, b) = (plain["val_loss"].as_f64().unwrap(), overlapped["val_loss"].as_f64().unwrap());
    assert!(b.is_finite() && b < initial, "overlapped DiLoCo learns: {b} from {initial}");
    assert_ne!(a, b, "the late merge changes the trajectory");
    assert_eq!(plain["bytes_per_worker"], overlapped["bytes_per_worker"], "overlap sends the same bytes");
    // Two fragments of a 4-step round: rounds of 2 steps, so τ = 2 is the whole round.
    let out = run("none,none:f2:overlap=2");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("overlap τ = 2 must be fewer than the round's 2 inner steps"), "{err}");
}

/// Rounds whose lengths follow the inner rate (--round-lr-power; by default the run file's 0) keep the
/// run's steps and rounds, are short at the peak rate and long at the end in whole units (--unit-steps),
/// learn, and train differently from equal rounds; bench compression takes the same plan.
#[test]
fn round_lengths_that_follow_the_rate_learn() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let made =
        agora().args(["data", "synthetic", "--words", "20000", "--out"]).arg(&corpus).output().expect("agora runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let run = |bench: &str, extra: &[&str]| {
        agora()
            .args(["bench", bench, "--quick", "--data"])
            .arg(&corpus)
            .args(["--steps", "24", "--global-batch", "4", "--seq-len", "16", "--workers", "2", "--inner-steps", "4"])
            .args(["--threads", "1", "--json"])
            .args(extra)
            .output()
            .expect("agora runs")
    };
    let sweep = |extra: &[&str]| {
        let out = run("diloco", &[&["--outer-compare", "none"], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let row = &r["grid"][0];
        assert_eq!(row["rounds"], 6, "the same number of rounds whatever their lengths");
        let lengths: Vec<u64> =
            row["runs"][0]["round_lengths"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).collect();
        assert_eq!((lengths.len(), lengths.iter().sum::<u64>()), (6, 24), "6 rounds, every one of the 24 steps");
        (r["initial_val_loss"].as_f64().unwrap(), row["mean_val_loss"].as_f64().unwrap(), lengths)
    };
    let (initial, equal, equal_lengths) = sweep(&["--round-lr-power", "0"]);
    assert_eq!(equal_lengths, [4; 6]);
    let (_, following, lengths) = sweep(&["--round-lr-power", "2"]);
    assert!(lengths[0] < 4 && lengths[5] > 4, "short rounds first, long ones last: {lengths:?}");
    assert!(following.is_finite() && following < initial - 0.3, "{following} from {initial}");
    assert_ne!(equal, following, "other round lengths, another trajectory");
    let (_, _, default_lengths) = sweep(&[]);
    assert_eq!(default_lengths, [4; 6], "the run file's default: equal rounds");
    let (_, _, units) = sweep(&["--round-lr-power", "1", "--unit-steps", "2"]);
    assert!(units.iter().all(|l| l % 2 == 0) && units != [4; 6], "whole units of 2 steps: {units:?}");
    let out = run("compression", &["--round-lr-power", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
