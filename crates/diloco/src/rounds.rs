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

/// The run file's `[inner] round_lr_power` when it names none (and `agora bench diloco`'s).
pub const DEFAULT_ROUND_LR_POWER: f64 = 0.0;

/// The first inner step of every round and, last, the run's step count: `rounds + 1` strictly increasing
/// multiples of `unit_steps` from 0 to `steps`, round r covering steps `bounds[r] .. bounds[r + 1]`.
/// `lr_power` 0 gives rounds of `steps / rounds` each (when it divides in whole units); otherwise see the
/// module doc. `unit_steps` is the run's data unit (a round trains a whole number of units, see
/// `units`): with `unit_steps` 1 the bounds fall on any step.
pub fn round_starts(schedule: &Schedule, steps: u64, rounds: u64, lr_power: f64, unit_steps: u64) -> Result<Vec<u64>> {
    ensure!(unit_steps > 0, "a data unit must hold at least one inner step");
    ensure!(
        steps.is_multiple_of(unit_steps),
        "{steps} inner steps are not a whole number of units of {unit_steps} steps"
    );
    let units = steps / unit_steps;
    ensure!(
        rounds > 0 && rounds <= units,
        "{rounds} rounds cannot split {steps} inner steps in units of {unit_steps} steps"
    );
    ensure!(lr_power.is_finite() && lr_power >= 0.0, "the round lengths' lr power must be ≥ 0, got {lr_power}");
    if lr_power == 0.0 {
        return Ok((0..=rounds).map(|r| r * units / rounds * unit_steps).collect());
    }
    let peak = schedule.peak;
    // cumulative[u]: the weight of the steps of units 0 .. u.
    let mut cumulative = Vec::with_capacity(units as usize + 1);
    cumulative.push(0.0);
    for u in 0..units {
        let weight: f64 = (u * unit_steps..(u + 1) * unit_steps)
            .map(|t| if t < schedule.warmup { 1.0 } else { (schedule.lr(t) / peak).powf(lr_power) })
            .sum();
        cumulative.push(cumulative[u as usize] + weight);
    }
    let total = cumulative[units as usize];
    let mut bounds = vec![0u64];
    for r in 1..rounds {
        let target = total * r as f64 / rounds as f64;
        // The first unit count whose weight reaches this round's share, leaving every round at least a unit.
        let reached = cumulative.partition_point(|&c| c < target) as u64;
        let lowest = bounds[bounds.len() - 1] + 1;
        bounds.push(reached.clamp(lowest, units - (rounds - r)));
    }
    bounds.push(units);
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "every round holds at least one unit: {bounds:?}");
    Ok(bounds.into_iter().map(|b| b * unit_steps).collect())
}

/// A run's rounds as the coordinator hands them out and the bench runs them: where each starts, how many
/// inner steps and data units it holds. Rounds past the planned ones (a token budget that needs more
/// rounds than planned, when uploads are refused) are `mean_steps` long, after the last planned step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundPlan {
    bounds: Vec<u64>,
    mean_steps: u64,
    unit_steps: u64,
}

impl RoundPlan {
    /// `rounds` rounds of `mean_steps` steps on average (H), lengths following `schedule` to `lr_power`
    /// ([`round_starts`]), in whole data units of `unit_steps` steps.
    pub fn new(schedule: &Schedule, rounds: u64, mean_steps: u64, lr_power: f64, unit_steps: u64) -> Result<RoundPlan> {
        ensure!(mean_steps > 0, "a round must hold at least one inner step");
        ensure!(
            unit_steps > 0 && mean_steps.is_multiple_of(unit_steps),
            "a data unit of {unit_steps} steps does not divide a round of {mean_steps} steps"
        );
        let bounds = round_starts(schedule, rounds * mean_steps, rounds, lr_power, unit_steps)?;
        Ok(RoundPlan { bounds, mean_steps, unit_steps })
    }

    /// The round's first inner step (its place in the learning-rate schedule).
    pub fn first_step(&self, round: u64) -> u64 {
        match self.bounds.get(round as usize) {
            Some(&b) => b,
            None => self.total_steps() + (round - self.planned_rounds()) * self.mean_steps,
        }
    }

    /// Inner steps in the round.
    pub fn steps(&self, round: u64) -> u64 {
        self.first_step(round + 1) - self.first_step(round)
    }

    /// Data units one worker trains in the round.
    pub fn units(&self, round: u64) -> u64 {
        self.steps(round) / self.unit_steps
    }

    pub fn unit_steps(&self) -> u64 {
        self.unit_steps
    }

    pub fn planned_rounds(&self) -> u64 {
        self.bounds.len() as u64 - 1
    }

    /// Inner steps of the planned rounds together.
    pub fn total_steps(&self) -> u64 {
        *self.bounds.last().expect("at least one bound")
    }

    /// Every planned round's length.
    pub fn lengths(&self) -> Vec<u64> {
        self.bounds.windows(2).map(|b| b[1] - b[0]).collect()
    }

    /// The shortest round's length, rounds past the plan (`mean_steps` long) included.
    pub fn shortest(&self) -> u64 {
        self.lengths().into_iter().min().expect("at least one round").min(self.mean_steps)
    }
}

/// The default data unit of a run whose rounds average `h` steps: the whole round when rounds are equal
/// (`lr_power` 0), else the largest divisor of `h` that is at most a fifth of it (10 steps at H = 50), so
/// that round lengths can vary in steps of a fifth of the mean or finer.
pub fn default_unit_steps(h: u64, lr_power: f64) -> u64 {
    if lr_power == 0.0 {
        return h;
    }
    (1..=(h / 5).max(1)).rev().find(|&d| h.is_multiple_of(d)).unwrap_or(1)
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
        assert_eq!(
            round_starts(&cosine(2000), 2000, 40, 0.0, 1).unwrap(),
            (0..=40).map(|r| r * 50).collect::<Vec<_>>()
        );
    }

    /// With p = 1 the rounds lengthen as the rate decays, keep the run's steps, and each holds the same sum
    /// of rates (within one step's).
    #[test]
    fn rounds_lengthen_as_the_rate_decays() {
        let s = cosine(2000);
        let b = round_starts(&s, 2000, 40, 1.0, 1).unwrap();
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
                    let b = round_starts(&schedule, steps, rounds, p, 1).unwrap();
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
        assert_eq!(round_starts(&flat, 2000, 40, 1.0, 1).unwrap(), round_starts(&flat, 2000, 40, 0.0, 1).unwrap());
    }

    #[test]
    fn impossible_plans_are_refused() {
        assert!(round_starts(&cosine(10), 10, 11, 1.0, 1).is_err(), "more rounds than steps");
        assert!(round_starts(&cosine(10), 10, 0, 1.0, 1).is_err());
        assert!(round_starts(&cosine(10), 10, 2, -1.0, 1).is_err());
        assert!(round_starts(&cosine(10), 10, 2, f64::NAN, 1).is_err());
    }
    /// Whole units: every bound a multiple of the unit, at most a unit from the unquantised bound, and
    /// unit 1 the unquantised plan itself.
    #[test]
    fn bounds_fall_on_whole_units() {
        let s = cosine(2000);
        let fine = round_starts(&s, 2000, 40, 1.0, 1).unwrap();
        let coarse = round_starts(&s, 2000, 40, 1.0, 10).unwrap();
        assert_eq!((coarse.len(), coarse[0], coarse[40]), (41, 0, 2000));
        assert!(coarse.iter().all(|b| b % 10 == 0), "{coarse:?}");
        assert!(coarse.windows(2).all(|w| w[0] < w[1]));
        for (f, c) in fine.iter().zip(&coarse) {
            assert!(f.abs_diff(*c) <= 10, "a unit bound {c} strays from {f}");
        }
        assert_eq!(round_starts(&s, 2000, 40, 0.0, 10).unwrap(), round_starts(&s, 2000, 40, 0.0, 1).unwrap());
        assert_eq!(round_starts(&s, 2000, 40, 0.0, 50).unwrap(), (0..=40).map(|r| r * 50).collect::<Vec<_>>());
        assert!(round_starts(&s, 2000, 40, 1.0, 7).is_err(), "2000 steps are not whole units of 7");
        assert!(round_starts(&s, 2000, 201, 1.0, 10).is_err(), "more rounds than units");
        assert!(round_starts(&s, 2000, 40, 1.0, 0).is_err());
    }

    #[test]
    fn default_units_divide_the_round() {
        assert_eq!(default_unit_steps(50, 0.0), 50, "equal rounds: a unit is a round, as before");
        assert_eq!(default_unit_steps(50, 1.0), 10);
        assert_eq!(default_unit_steps(20, 1.0), 4);
        assert_eq!(default_unit_steps(10, 0.5), 2);
        assert_eq!(default_unit_steps(7, 1.0), 1);
        assert_eq!(default_unit_steps(3, 1.0), 1);
        for h in 1..200 {
            let u = default_unit_steps(h, 1.0);
            assert!(h % u == 0 && u >= 1 && (u == 1 || u <= h / 5), "H {h}: unit {u}");
        }
    }
    #[test]
    fn a_plan_gives_each_round_its_span_and_units() {
        let s = cosine(2000);
        let plan = RoundPlan::new(&s, 40, 50, 1.0, 10).unwrap();
        assert_eq!((plan.planned_rounds(), plan.total_steps(), plan.unit_steps()), (40, 2000, 10));
        let bounds = round_starts(&s, 2000, 40, 1.0, 10).unwrap();
        for r in 0..40u64 {
            assert_eq!(plan.first_step(r), bounds[r as usize]);
            assert_eq!(plan.steps(r), bounds[r as usize + 1] - bounds[r as usize]);
            assert_eq!(plan.units(r) * 10, plan.steps(r));
        }
        assert_eq!(plan.lengths().iter().sum::<u64>(), 2000);
        assert_eq!((plan.first_step(40), plan.steps(40), plan.units(40)), (2000, 50, 5), "past the plan: H steps");
        assert_eq!(plan.first_step(42), 2100);
        assert!(plan.shortest() <= 30, "{:?}", plan.lengths());
        let equal = RoundPlan::new(&s, 40, 50, 0.0, 50).unwrap();
        assert!((0..45).all(|r| equal.first_step(r) == r * 50 && equal.units(r) == 1), "equal rounds, as before");
        assert!(RoundPlan::new(&s, 40, 50, 1.0, 15).is_err(), "15 does not divide 50");
        assert!(RoundPlan::new(&s, 40, 0, 1.0, 1).is_err());
    }
}
