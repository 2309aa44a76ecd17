//! Where each round of a run starts: every round H inner steps long, or rounds whose lengths follow the
//! inner learning rate (short while the rate is high, longer as it decays), the run's step and round counts
//! unchanged.
//!
//! Why: a worker's drift from the others over a round grows with the size of its steps, so a run that
//! synchronises as often where the rate is high as where it has decayed spends its exchanges unevenly. With
//! `lr_power` p the rounds are placed so that each holds an equal share of Σ_t (lr_t / peak)^p over the
//! run's inner steps: p = 0 gives equal rounds, p = 1 rounds about inversely proportional to the rate (the
//! "quadratic synchronisation rule" of Gu et al., arXiv 2310.14423, is p = 2 with a floor). The warmup
//! counts as the peak rate: its steps are the ones that move the weights fastest.

use agora_train::Schedule;
use anyhow::{ensure, Result};

/// The first inner step of every round and, last, the run's step count: `rounds + 1` strictly increasing
/// values from 0 to `steps`, round r covering steps `bounds[r] .. bounds[r + 1]`. `lr_power` 0 gives rounds
/// of `steps / rounds` each (when it divides); otherwise see the module doc.
pub fn round_bounds(schedule: &Schedule, steps: u64, rounds: u64, lr_power: f64) -> Result<Vec<u64>> {
    ensure!(rounds > 0 && rounds <= steps, "{rounds} rounds cannot split {steps} inner steps");
    ensure!(lr_power.is_finite() && lr_power >= 0.0, "the round lengths' lr power must be ≥ 0, got {lr_power}");
    if lr_power == 0.0 {
        return Ok((0..=rounds).map(|r| r * steps / rounds).collect());
    }
    let peak = schedule.peak;
    ensure!(schedule.min > 0.0, "round lengths that follow the learning rate need a final rate above 0");
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
    debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "every round holds at least one step");
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
        assert_eq!(round_bounds(&cosine(2000), 2000, 40, 0.0).unwrap(), (0..=40).map(|r| r * 50).collect::<Vec<_>>());
    }

    /// With p = 1 the rounds lengthen as the rate decays, keep the run's steps, and each holds the same sum
    /// of rates (within one step's).
    #[test]
    fn rounds_lengthen_as_the_rate_decays() {
        let s = cosine(2000);
        let b = round_bounds(&s, 2000, 40, 1.0).unwrap();
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

    /// However steep the power, every round keeps at least one step and the bounds stay in order.
    #[test]
    fn every_round_keeps_a_step() {
        for (steps, rounds, p) in [(50, 50, 4.0), (100, 60, 8.0), (7, 3, 1.0), (2000, 40, 2.0)] {
            let b = round_bounds(&cosine(steps), steps, rounds, p).unwrap();
            assert_eq!(b.len() as u64, rounds + 1);
            assert_eq!(*b.last().unwrap(), steps);
            assert!(lengths(&b).iter().all(|&l| l >= 1), "{steps}/{rounds} at p {p}: {b:?}");
        }
    }

    #[test]
    fn impossible_plans_are_refused() {
        assert!(round_bounds(&cosine(10), 10, 11, 1.0).is_err(), "more rounds than steps");
        assert!(round_bounds(&cosine(10), 10, 0, 1.0).is_err());
        assert!(round_bounds(&cosine(10), 10, 2, -1.0).is_err());
        let to_zero = Schedule { min: 0.0, ..cosine(100) };
        assert!(round_bounds(&to_zero, 100, 4, 1.0).is_err(), "a rate that reaches 0 would leave no last round");
        assert!(round_bounds(&to_zero, 100, 4, 0.0).is_ok());
    }
}
