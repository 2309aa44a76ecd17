//! Where each round of a run starts: every round H inner steps long, or rounds whose lengths follow the
//! inner learning rate (short while the rate is high, longer as it decays), the run's step and round counts
//! unchanged.
//!
//! Why: a worker's drift from the others over a round grows with the size of its steps, so a run that
//! synchronises as often where the rate is high as where it has decayed spends its exchanges unevenly. With
//! `lr_power` p the rounds are placed so that each holds an equal share of Σ_t (lr_t / peak)^p over the
//! run's inner steps: p = 0 gives equal rounds, p = 1 rounds about inversely proportional to the rate (the
//! "quadratic synchronisation rule" of Gu et al., arXiv 2310.14423, is p = 2 with a floor). The warmup
//! counts as the peak rate: counted at its lower, rising rate it would all fall into the first round.

use agora_train::Schedule;
use anyhow::{ensure, Result};

/// The first inner step of every round and, last, the run's step count: `rounds + 1` strictly increasing
/// values from 0 to `steps`, round r covering steps `bounds[r] .. bounds[r + 1]`. `lr_power` 0 gives rounds
/// of `steps / rounds` each (when it divides); otherwise see the module doc.
pub fn round_starts(schedule: &Schedule, steps: u64, rounds: u64, lr_power: f64) -> Result<Vec<u64>> {
    ensure!(rounds > 0 && rounds <= steps, "{rounds} rounds cannot split {steps} inner steps");
    ensure!(lr_power.is_finite() && lr_power >= 0.0, "the round lengths' lr power must be ≥ 0, got {lr_power}");
    if lr_power == 0.0 {
        return Ok((0..=rounds).map(|r| r * steps / rounds).collect());
    }
    let peak = schedule.peak;
    // cumulative[t]: the weight of steps 0 .. t.
    let mut cumulative = Vec::with_capacity(steps as usize + 1);
    cumulative.push(0.0);
    for t in 0..steps {
        let weight = if t < schedule.warmup { 1.0 } else { (schedule.lr(t) / peak).powf(lr_power) };
        cumulative.push(cumulative[t as usize] + weight);
    }
    let total = cumulative[steps as usize];
    let mut bounds = vec![0u64];
    for r in 1..rounds {
        let target = total * r as f64 / rounds as f64;
        // The first step count whose weight reaches this round's share, leaving every round at least a step.
        let reached = cumulative.partition_point(|&c| c < target) as u64;
        let lowest = bounds[bounds.len() - 1] + 1;
        bounds.push(reached.clamp(lowest, steps - (rounds - r)));
    }
    bounds.push(steps);
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "every round holds at least one step: {bounds:?}");
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(steps: u64) -> Schedule {
        Schedule { peak: 3e-3, min: 3e-4, warmup: steps / 20, total: steps }
    }

    fn lengths(bounds: &[u64]) -> Vec<u64> {
        bounds.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn power_zero_gives_equal_rounds() {
        assert_eq!(round_starts(&cosine(2000), 2000, 40, 0.0).unwrap(), (0..=40).map(|r| r * 50).collect::<Vec<_>>());
    }

    /// With p = 1 the rounds lengthen as the rate decays, keep the run's steps, and each holds the same sum
    /// of rates (within one step's).
    #[test]
    fn rounds_lengthen_as_the_rate_decays() {
        let s = cosine(2000);
        let b = round_starts(&s, 2000, 40, 1.0).unwrap();
        assert_eq!((b.len(), b[0], b[40]), (41, 0, 2000));
        let len = lengths(&b);
        assert!(len[0] < 35 && len[39] > 150, "short rounds at the peak, long ones at the end: {len:?}");
        assert!(len.windows(2).skip(12).all(|w| w[0] <= w[1] + 1), "non-decreasing once the cosine bites: {len:?}");
        let weight = |t: u64| if t < s.warmup { 1.0 } else { s.lr(t) / s.peak };
        let share = (0..2000).map(weight).sum::<f64>() / 40.0;
        for r in 0..40 {
            let held: f64 = (b[r]..b[r + 1]).map(weight).sum();
            assert!((held - share).abs() <= 1.0, "round {r} holds {held}, the share is {share}");
        }
    }

    /// However steep the power or odd the schedule (a rate decaying to 0, no decay, no warmup, a warmup
    /// longer than the run, weights that underflow to 0), every round keeps at least one step, the bounds
    /// stay strictly in order from 0 to the run's steps.
    #[test]
    fn every_round_keeps_a_step() {
        let odd = [
            cosine(100),
            Schedule { min: 0.0, ..cosine(100) },
            Schedule { min: 3e-3, ..cosine(100) },
            Schedule { warmup: 0, ..cosine(100) },
            Schedule { warmup: 500, ..cosine(100) },
        ];
        for schedule in odd {
            for (steps, rounds) in [(100, 100), (100, 60), (100, 7), (100, 1), (7, 3)] {
                for p in [0.0, 0.5, 1.0, 2.0, 8.0, 1e300] {
                    let b = round_starts(&schedule, steps, rounds, p).unwrap();
                    assert_eq!(b.len() as u64, rounds + 1);
                    assert_eq!((b[0], b[rounds as usize]), (0, steps));
                    assert!(b.windows(2).all(|w| w[0] < w[1]), "{schedule:?} {steps}/{rounds} at p {p}: {b:?}");
                }
            }
        }
    }

    /// A rate that never decays gives equal rounds at any power.
    #[test]
    fn a_constant_rate_gives_equal_rounds() {
        let flat = Schedule { min: 3e-3, warmup: 0, ..cosine(2000) };
        assert_eq!(round_starts(&flat, 2000, 40, 1.0).unwrap(), round_starts(&flat, 2000, 40, 0.0).unwrap());
    }

    #[test]
    fn impossible_plans_are_refused() {
        assert!(round_starts(&cosine(10), 10, 11, 1.0).is_err(), "more rounds than steps");
        assert!(round_starts(&cosine(10), 10, 0, 1.0).is_err());
        assert!(round_starts(&cosine(10), 10, 2, -1.0).is_err());
        assert!(round_starts(&cosine(10), 10, 2, f64::NAN).is_err());
    }
}
