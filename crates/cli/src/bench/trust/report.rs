//! The suite's printed report: the header, one table row per scenario against its honest-only run, false
//! positives, spot-check exactness, verification cost, receipts, and the `lazy` liar's expected share.

use super::{describe, Scenario, TrustArgs, TrustReport};
use std::collections::BTreeMap;

/// Prints `report` as Markdown; `baselines` are the honest-only runs by number of honest workers.
pub(super) fn print(args: &TrustArgs, report: &TrustReport, baselines: &BTreeMap<usize, Scenario>) {
    println!(
        "adversarial suite: tiny model, {} rounds × H = {}, batch {}×{}, codec {}, aggregation {}, spot checks {:.0}% of submissions, \
         vesting 8 rounds, probation 2 verified rounds (the run file's defaults)",
        args.rounds, args.inner_steps, args.batch_size, args.seq_len, args.codec, args.aggregation, args.spot_check * 100.0
    );
    for b in baselines.values() {
        println!(
            "honest-only run ({} workers): val loss {:.4}, honest credits booked {} (posted {})",
            b.honest_workers, b.final_val_loss, b.honest_credits, b.honest_posted
        );
    }
    if let Some(reference) = baselines.get(&3) {
        for r in &report.other_seeds {
            println!(
                "honest-only run (3 workers) at seed {} instead of {}: val loss {:.4} ({:+.2}%): how far the loss moves \
                 with the initial weights and the data order alone",
                r.seed,
                super::SEED,
                r.final_val_loss,
                100.0 * (r.final_val_loss / reference.final_val_loss - 1.0)
            );
        }
    }
    println!();
    println!(
        "| scenario | workers (honest + attackers) | attacker's verdicts | attacker credits paid (pending) | honest credits vs honest-only | val loss | vs honest-only | honest refused | assigned − random gain (honest / attacker) |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    let evidence = |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{e:+.4}"));
    for s in &report.attacks {
        let reference = baselines.get(&s.honest_workers).filter(|_| s.attackers > 0);
        let (credits, loss) = match reference {
            Some(b) => (
                format!("{:.3}", s.honest_credits as f64 / b.honest_credits.max(1) as f64),
                format!("{:+.2}%", 100.0 * (s.final_val_loss / b.final_val_loss - 1.0)),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "| {} | {} + {} | {} | {} ({}) | {} | {:.4} | {} | {}/{} | {} / {} |",
            s.behaviour,
            s.honest_workers,
            s.attackers,
            describe(&s.attacker_verdicts),
            s.attacker_credits,
            s.attacker_pending,
            credits,
            s.final_val_loss,
            loss,
            s.honest_rejected,
            s.honest_submissions,
            evidence(s.honest_evidence),
            evidence(s.attacker_evidence)
        );
    }
    let all = || report.attacks.iter().chain(baselines.values());
    let spot: f64 = all().map(|s| s.spot_check_seconds).sum();
    let judge: f64 = all().map(|s| s.judge_seconds).sum();
    let train: f64 = all().map(|s| s.train_seconds).sum();
    let exact: u64 = all().map(|s| s.exact_spot_checks).sum();
    let tolerance: u64 = all().map(|s| s.tolerance_spot_checks).sum();
    let (passed, checked): (u64, u64) =
        all().fold((0, 0), |(p, c), s| (p + s.honest_spot_checks_passed, c + s.honest_spot_checks));
    let receipts: usize = all().map(|s| s.receipts_verified).sum();
    println!(
        "\nfalse positives: {} of {} honest submissions refused ({:.2}%)",
        report.honest_rejected,
        report.honest_submissions,
        100.0 * report.false_positive_rate
    );
    println!(
        "honest spot checks: {passed} of {checked} passed; re-runs that passed: {exact} bit-exact, {tolerance} within the tolerance (all workers)"
    );
    println!(
        "verification cost, as a share of the workers' {train:.1} s of training: spot checks (re-run and links) {spot:.1} s ({:.1}%), \
         judging (decode, similarity, loss before/after) {judge:.1} s ({:.1}%)",
        100.0 * spot / train.max(1e-9),
        100.0 * judge / train.max(1e-9)
    );
    println!("receipts verified offline against signed round roots: {receipts}");
    if let Some(lazy) = report.attacks.iter().find(|s| s.behaviour == "lazy") {
        // The analytic expectation at these settings (`core::vesting::expected_liar_share`): a liar on one
        // of 4 segments is caught with probability spot_check / 4 per round.
        let q = args.spot_check / 4.0;
        let share = (1.0 - q).powi(8 + 1);
        let honest_each = lazy.honest_credits as f64 / lazy.honest_workers.max(1) as f64;
        println!(
            "lazy (skips segment 0 every round, 75% of the work): expected long-run paid share {:.3} of honest work's credits \
             ({:.3} per unit of work); in this {}-round run it was paid {} and has {} pending, against {:.0} booked per honest worker \
             (of which {:.0} posted)",
            share,
            share / 0.75,
            args.rounds,
            lazy.attacker_credits,
            lazy.attacker_pending,
            honest_each,
            lazy.honest_posted as f64 / lazy.honest_workers.max(1) as f64
        );
    }
}
