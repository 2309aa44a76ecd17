//! The outer optimizer: treats the averaged pseudo-gradient as a gradient of the global weights, with a
//! learning rate that may warm up and decay over the run's rounds ([`OuterConfig::lr_at`]).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OuterKind {
    /// SGD with Nesterov momentum (DiLoCo's choice): m ← μm + Δ; θ ← θ − lr·(Δ + μm).
    Nesterov,
    /// SGD with heavy-ball momentum: m ← μm + Δ; θ ← θ − lr·m.
    SgdMomentum,
    /// No momentum: θ ← θ − lr·Δ. With lr = 1 this is plain averaging of the workers' weights (FedAvg).
    Average,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OuterConfig {
    pub kind: OuterKind,
    /// The peak outer learning rate.
    pub lr: f64,
    pub momentum: f64,
    /// Rounds over which the learning rate rises linearly to `lr` (the first step takes
    /// lr / warmup_rounds); 0: `lr` from the first step. Counted in rounds, not in steps of one fragment:
    /// with F fragments each fragment takes about warmup_rounds / F of the warm-up steps.
    pub warmup_rounds: u64,
    /// The learning rate at the last planned round, as a fraction of `lr`, reached by a cosine from the
    /// end of the warmup; 1: constant.
    pub final_lr_fraction: f64,
    /// The momentum at the last planned round, as a fraction of `momentum`, reached by the same cosine
    /// (0: the last outer steps are plain averaging at the learning rate; above 1 it rises, up to a final
    /// momentum below 1); 1: constant.
    pub final_momentum_fraction: f64,
    /// A round that accepted n uploads, fewer than this, steps at lr · √(n / this): the noise of a mean of n
    /// falls as 1/√n, and one worker's Δ alone is the noisiest. 1: every round at the full rate. n counts
    /// the accepted uploads whatever the aggregation rule combines of them. The rate never exceeds the
    /// schedule's lr: added uploads can raise a step from lr · √(n / this) up to lr, not beyond.
    pub full_lr_contributions: u64,
    /// The run's last outer step takes no momentum (θ − lr·Δ̄; at lr 1 and the full rate the mean of the
    /// workers' weights), not Nesterov's look-ahead past them. With fragments it covers the fragment the last
    /// round synchronises; a last round that accepts nothing takes no step at all.
    pub average_last_step: bool,
}

impl Default for OuterConfig {
    fn default() -> Self {
        OuterConfig::RECOMMENDED
    }
}

impl OuterConfig {
    /// The default since issue 12: Nesterov at lr 1 with momentum 0.6 and a 4-round warmup, the momentum
    /// then rising by the cosine to 0.75 at the last planned round. Against the old recipe at k = 4, H = 50
    /// on tinyshakespeare the constant 0.6 took the gap to data-parallel from +7.4% to +3.4% at 2000 inner
    /// steps (momentum 0.9 overshoots with tens of outer steps); the rise to 0.75 took it from +3.42% to
    /// +2.67% over two seeds (BENCHMARKS.md, "Issue 12" and "The outer momentum over the run"). A round
    /// with one applied upload steps at lr/√2, and the run's last step takes no momentum (BENCHMARKS.md,
    /// "The recipe around the default, and the last outer step").
    pub const RECOMMENDED: OuterConfig = OuterConfig {
        final_momentum_fraction: 1.25,
        full_lr_contributions: 2,
        average_last_step: true,
        ..OuterConfig::CONSTANT_NESTEROV.with(1.0, 0.6, 4)
    };

    /// DiLoCo's recipe (lr 0.7, momentum 0.9, constant), agora's default before issue 12.
    pub const CONSTANT_NESTEROV: OuterConfig = OuterConfig::constant(OuterKind::Nesterov, 0.7, 0.9);

    /// A constant-rate optimizer of this kind.
    pub const fn constant(kind: OuterKind, lr: f64, momentum: f64) -> OuterConfig {
        OuterConfig {
            kind,
            lr,
            momentum,
            warmup_rounds: 0,
            final_lr_fraction: 1.0,
            final_momentum_fraction: 1.0,
            full_lr_contributions: 1,
            average_last_step: false,
        }
    }

    /// This recipe at another peak rate, momentum and warmup.
    const fn with(self, lr: f64, momentum: f64, warmup_rounds: u64) -> OuterConfig {
        OuterConfig { lr, momentum, warmup_rounds, ..self }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("outer.lr must be positive, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("outer.momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.final_lr_fraction > 0.0 && self.final_lr_fraction <= 1.0) {
            bail!("outer.final_lr_fraction must be in (0, 1], got {}", self.final_lr_fraction);
        }
        if !(self.final_momentum_fraction >= 0.0 && self.momentum * self.final_momentum_fraction < 1.0) {
            bail!(
                "outer.final_momentum_fraction must be at least 0 and keep the final momentum below 1: {} × \
                 momentum {} = {}; set final_momentum_fraction (1 keeps the momentum constant)",
                self.final_momentum_fraction,
                self.momentum,
                self.final_momentum_fraction * self.momentum
            );
        }
        if self.full_lr_contributions == 0 {
            bail!("outer.full_lr_contributions must be at least 1 (1: every round at the full rate)");
        }
        Ok(())
    }

    /// The learning rate and momentum of the outer step that closes round `round` of a run planned for
    /// `rounds`, which accepted `contributions` uploads; `last`: it is the run's final outer step.
    /// [`OuterConfig::lr_at`] scaled by `full_lr_contributions`, and [`OuterConfig::momentum_at`] or, for the
    /// last step under `average_last_step`, 0. The coordinator and the bench both take their steps from here.
    pub fn step_at(&self, round: u64, rounds: u64, contributions: usize, last: bool) -> (f64, f64) {
        let full = self.full_lr_contributions.max(1) as f64;
        let scale = ((contributions.max(1) as f64).min(full) / full).sqrt();
        let momentum = if last && self.average_last_step { 0.0 } else { self.momentum_at(round, rounds) };
        (self.lr_at(round, rounds) * scale, momentum)
    }

    /// The learning rate of the outer step that closes round `round` (0-based) of a run planned to last
    /// `rounds` rounds: a linear warmup over `warmup_rounds` (reaching `lr` at its last round), then a cosine
    /// from `lr` down to `final_lr_fraction · lr` at the last planned round (and that rate after it).
    pub fn lr_at(&self, round: u64, rounds: u64) -> f64 {
        if round < self.warmup_rounds {
            return self.lr * (round + 1) as f64 / self.warmup_rounds as f64;
        }
        self.lr * self.decayed(round, rounds, self.final_lr_fraction)
    }

    /// The momentum of the outer step that closes round `round`: `momentum` through the warmup, then the
    /// same cosine as [`OuterConfig::lr_at`] down to `final_momentum_fraction · momentum`.
    pub fn momentum_at(&self, round: u64, rounds: u64) -> f64 {
        self.momentum * self.decayed(round, rounds, self.final_momentum_fraction)
    }

    /// 1 up to the first round at the full rate (the warmup's last, or round 0 without one), then a cosine
    /// down to `last` at the last planned round, and `last` after it.
    fn decayed(&self, round: u64, rounds: u64, last: f64) -> f64 {
        let peak = self.warmup_rounds.saturating_sub(1);
        let decay_rounds = rounds.saturating_sub(peak + 1);
        if decay_rounds == 0 || last == 1.0 || round <= peak {
            return 1.0;
        }
        let progress = ((round - peak) as f64 / decay_rounds as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        last + (1.0 - last) * cosine
    }

    /// Whether the optimizer carries a momentum buffer that must be persisted with each round.
    pub fn has_state(&self) -> bool {
        self.kind != OuterKind::Average
    }
}

/// "Nesterov lr 0.7, momentum 0.9, constant" or "... warmup 4 rounds, cosine to 0.2 × lr".
impl std::fmt::Display for OuterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            OuterKind::Nesterov => "Nesterov",
            OuterKind::SgdMomentum => "SGD with momentum",
            OuterKind::Average => "averaging",
        };
        write!(f, "{kind} lr {}", self.lr)?;
        if self.kind != OuterKind::Average {
            write!(f, ", momentum {}", self.momentum)?;
        }
        if self.warmup_rounds > 0 {
            write!(f, ", warmup {} rounds", self.warmup_rounds)?;
        }
        if self.final_momentum_fraction != 1.0 && self.kind != OuterKind::Average {
            write!(f, ", momentum cosine to {} ×", self.final_momentum_fraction)?;
        }
        if self.final_lr_fraction < 1.0 {
            write!(f, ", cosine to {} × lr", self.final_lr_fraction)?;
        } else if self.warmup_rounds == 0 && self.final_momentum_fraction == 1.0 {
            write!(f, ", constant")?;
        }
        if self.full_lr_contributions > 1 {
            write!(f, ", full lr from {} uploads", self.full_lr_contributions)?;
        }
        if self.average_last_step && self.kind != OuterKind::Average {
            write!(f, ", last step averages")?;
        }
        Ok(())
    }
}

/// Outer optimizer state: one momentum buffer per parameter (fp32, same order as the parameters).
pub struct OuterOptimizer {
    pub config: OuterConfig,
    pub momentum: Vec<Tensor>,
}

impl OuterOptimizer {
    pub fn new(config: OuterConfig, parameters: &[Tensor]) -> Self {
        let momentum = parameters.iter().map(|p| p.zeros_like().to_kind(Kind::Float)).collect();
        OuterOptimizer { config, momentum }
    }

    /// Resumes from persisted momentum buffers.
    pub fn with_momentum(config: OuterConfig, momentum: Vec<Tensor>) -> Self {
        OuterOptimizer { config, momentum }
    }

    /// An outer step of some parameters only (a Streaming DiLoCo fragment): `indices` into the full
    /// parameter list, `delta` one tensor per index, at the round's learning rate and momentum
    /// ([`OuterConfig::lr_at`], [`OuterConfig::momentum_at`]). The other parameters and their momentum buffers
    /// stay as they are.
    pub fn step_subset(&mut self, indices: &[usize], global: &[Tensor], delta: &[Tensor], lr: f64, mu: f64) {
        assert_eq!(indices.len(), delta.len(), "one pseudo-gradient per stepped parameter");
        let theta: Vec<Tensor> = indices.iter().map(|&i| global[i].shallow_clone()).collect();
        let momentum: Vec<Tensor> = indices.iter().map(|&i| self.momentum[i].shallow_clone()).collect();
        // Shallow clones share storage, so the sub-optimizer's in-place updates land in `global` and `self`.
        let config = OuterConfig { momentum: mu, ..self.config };
        OuterOptimizer { config, momentum }.step(&theta, delta, lr);
    }

    /// One outer step at learning rate `lr` (the config's [`OuterConfig::lr_at`] the round):
    /// `global` moves against the averaged pseudo-gradient `delta`, in place.
    pub fn step(&mut self, global: &[Tensor], delta: &[Tensor], lr: f64) {
        assert_eq!(global.len(), delta.len(), "one pseudo-gradient per parameter");
        assert_eq!(global.len(), self.momentum.len(), "optimizer built for a different parameter list");
        assert!(lr.is_finite() && lr > 0.0, "outer learning rate {lr}");
        let (kind, mu) = (self.config.kind, self.config.momentum);
        tch::no_grad(|| {
            for ((theta, d), m) in global.iter().zip(delta).zip(self.momentum.iter_mut()) {
                assert_eq!(theta.size(), d.size(), "pseudo-gradient shape differs from its parameter");
                let mut theta = theta.shallow_clone();
                match kind {
                    OuterKind::Average => {
                        let _ = theta.g_sub_(&(d * lr));
                    }
                    OuterKind::SgdMomentum => {
                        let _ = m.g_mul_scalar_(mu).g_add_(d);
                        let _ = theta.g_sub_(&(&*m * lr));
                    }
                    OuterKind::Nesterov => {
                        let _ = m.g_mul_scalar_(mu).g_add_(d);
                        let _ = theta.g_sub_(&((d + &*m * mu) * lr));
                    }
                }
            }
        });
    }
}

/// Δ = θ_global − θ_local, per parameter. Positive where the worker moved the weight down, so that the
/// outer step (which subtracts) moves the global weights the way the worker went.
pub fn pseudo_gradient(global: &[Tensor], local: &[Tensor]) -> Vec<Tensor> {
    assert_eq!(global.len(), local.len(), "pseudo-gradient needs the same parameter list on both sides");
    tch::no_grad(|| global.iter().zip(local).map(|(g, l)| (g - l).to_kind(Kind::Float)).collect())
}

/// Element-wise mean of several workers' pseudo-gradients, summed in the given order (callers sort
/// contributions so every replay of a round computes bit-identical weights).
pub fn mean(deltas: &[Vec<Tensor>]) -> Vec<Tensor> {
    assert!(!deltas.is_empty(), "mean of no pseudo-gradients");
    let n = deltas.len() as f64;
    tch::no_grad(|| {
        (0..deltas[0].len())
            .map(|i| {
                let mut sum = deltas[0][i].to_kind(Kind::Float).copy();
                for d in &deltas[1..] {
                    assert_eq!(d.len(), deltas[0].len(), "pseudo-gradients with different parameter lists");
                    let _ = sum.g_add_(&d[i]);
                }
                sum / n
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(v: f64) -> Tensor {
        Tensor::from_slice(&[v as f32])
    }

    fn value(t: &Tensor) -> f64 {
        t.double_value(&[0])
    }

    /// Two outer steps worked by hand (μ = 0.9, lr = 0.7, θ₀ = 1, Δ₁ = 0.1, Δ₂ = 0.2):
    ///   step 1: m = 0.1;            update = 0.1 + 0.9·0.1  = 0.19;  θ = 1 − 0.7·0.19    = 0.867
    ///   step 2: m = 0.09 + 0.2 = 0.29; update = 0.2 + 0.9·0.29 = 0.461; θ = 0.867 − 0.7·0.461 = 0.5443
    #[test]
    fn nesterov_matches_hand_computation() {
        let theta = [scalar(1.0)];
        let mut opt = OuterOptimizer::new(OuterConfig::CONSTANT_NESTEROV, &theta);
        opt.step(&theta, &[scalar(0.1)], 0.7);
        assert!((value(&theta[0]) - 0.867).abs() < 1e-6, "{}", value(&theta[0]));
        assert!((value(&opt.momentum[0]) - 0.1).abs() < 1e-7);
        opt.step(&theta, &[scalar(0.2)], 0.7);
        assert!((value(&theta[0]) - 0.5443).abs() < 1e-6, "{}", value(&theta[0]));
        assert!((value(&opt.momentum[0]) - 0.29).abs() < 1e-6);
    }

    /// Heavy ball on the same inputs: θ = 1 − 0.7·0.1 = 0.93, then m = 0.29, θ = 0.93 − 0.7·0.29 = 0.727.
    #[test]
    fn sgd_momentum_matches_hand_computation() {
        let theta = [scalar(1.0)];
        let config = OuterConfig { kind: OuterKind::SgdMomentum, ..OuterConfig::CONSTANT_NESTEROV };
        let mut opt = OuterOptimizer::new(config, &theta);
        opt.step(&theta, &[scalar(0.1)], 0.7);
        assert!((value(&theta[0]) - 0.93).abs() < 1e-6);
        opt.step(&theta, &[scalar(0.2)], 0.7);
        assert!((value(&theta[0]) - 0.727).abs() < 1e-6);
    }

    /// Averaging with lr 1 lands exactly on the mean of the workers' weights.
    #[test]
    fn averaging_with_lr_one_is_the_mean_of_local_weights() {
        let global = [Tensor::from_slice(&[1.0f32, -2.0, 0.5])];
        let locals = [Tensor::from_slice(&[0.8f32, -1.0, 0.5]), Tensor::from_slice(&[1.4f32, -2.6, 0.1])];
        let deltas: Vec<Vec<Tensor>> = locals.iter().map(|l| pseudo_gradient(&global, &[l.shallow_clone()])).collect();
        let config = OuterConfig::constant(OuterKind::Average, 1.0, 0.0);
        OuterOptimizer::new(config, &global).step(&global, &mean(&deltas), 1.0);
        let expected = (&locals[0] + &locals[1]) / 2.0;
        assert!(global[0].allclose(&expected, 1e-6, 1e-6, false), "{global:?}");
    }

    /// Momentum cosine to 0 over 10 planned rounds after a 4-round warmup: 0.6 through round 3, then
    /// 0.6 · ½(1 + cos(π·(r − 3)/6)), 0 at round 9; the learning rate is untouched. A step at μ = 0 is plain
    /// averaging at the rate, with the buffer still accumulating.
    #[test]
    fn momentum_decays_by_the_same_cosine_and_a_step_uses_it() {
        let c = OuterConfig { final_momentum_fraction: 0.0, ..OuterConfig::RECOMMENDED };
        assert!((0..4).all(|r| c.momentum_at(r, 10) == 0.6));
        let r5 = 0.6 * 0.5 * (1.0 + (std::f64::consts::PI * 2.0 / 6.0).cos());
        assert!((c.momentum_at(5, 10) - r5).abs() < 1e-12, "{}", c.momentum_at(5, 10));
        assert_eq!(c.momentum_at(9, 10), 0.0);
        assert_eq!(c.momentum_at(30, 10), 0.0);
        assert!((0..10).all(|r| c.lr_at(r, 10) == OuterConfig::RECOMMENDED.lr_at(r, 10)));
        let constant = OuterConfig { final_momentum_fraction: 1.0, ..c };
        assert!((0..10).all(|r| constant.momentum_at(r, 10) == 0.6), "1: constant");
        // The default rises to 0.75: 0.6 through the warmup, 0.75 at the last planned round.
        let d = OuterConfig::RECOMMENDED;
        assert!(d.momentum_at(3, 10) == 0.6 && (d.momentum_at(9, 10) - 0.75).abs() < 1e-12);
        // θ = 1, m = 0.1 from an earlier step; a step of Δ = 0.2 at lr 1, μ = 0: θ = 0.8, m = 0.2.
        let theta = [scalar(1.0)];
        let mut opt = OuterOptimizer::with_momentum(c, vec![scalar(0.1)]);
        opt.step_subset(&[0], &theta, &[scalar(0.2)], 1.0, 0.0);
        assert!((value(&theta[0]) - 0.8).abs() < 1e-6 && (value(&opt.momentum[0]) - 0.2).abs() < 1e-6);
        // At μ = 0.5 instead: m = 0.05 + 0.2 = 0.25, θ = 0.8 − (0.2 + 0.125) = 0.475.
        let mut opt = OuterOptimizer::with_momentum(c, vec![scalar(0.1)]);
        opt.step_subset(&[0], &theta, &[scalar(0.2)], 1.0, 0.5);
        assert!((value(&theta[0]) - 0.475).abs() < 1e-6, "{}", value(&theta[0]));
        assert!(OuterConfig { final_momentum_fraction: 1.5, ..c }.validate().is_ok(), "0.6 rising to 0.9");
        assert!(OuterConfig { final_momentum_fraction: 1.7, ..c }.validate().is_err(), "a final momentum of 1.02");
        assert!(OuterConfig { final_momentum_fraction: -0.1, ..c }.validate().is_err());
    }

    #[test]
    fn config_rejects_bad_values() {
        assert!(OuterConfig { lr: 0.0, ..OuterConfig::default() }.validate().is_err());
        assert!(OuterConfig { momentum: 1.0, ..OuterConfig::default() }.validate().is_err());
        assert!(OuterConfig { final_lr_fraction: 0.0, ..OuterConfig::default() }.validate().is_err());
        assert!(OuterConfig { final_lr_fraction: 1.5, ..OuterConfig::default() }.validate().is_err());
        assert!(OuterConfig::default().validate().is_ok());
        assert!(OuterConfig::CONSTANT_NESTEROV.validate().is_ok());
        // DiLoCo's momentum 0.9 with the default's rise (× 1.25) would end above 1: refused, naming the field.
        let err = OuterConfig { momentum: 0.9, ..OuterConfig::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("final_momentum_fraction"), "{err}");
        assert!(OuterConfig { momentum: 0.9, final_momentum_fraction: 1.0, ..OuterConfig::default() }
            .validate()
            .is_ok());
    }

    /// Warmup 4 of 10 planned rounds, cosine to a fifth: lr/4, lr/2, 3lr/4, lr, then cosine over rounds 3..9
    /// (6 intervals) down to lr/5 at round 9 and after it.
    #[test]
    fn the_schedule_warms_up_then_decays_by_a_cosine() {
        let c = OuterConfig { lr: 2.0, warmup_rounds: 4, final_lr_fraction: 0.2, ..OuterConfig::default() };
        let at = |r| c.lr_at(r, 10);
        for (r, want) in [(0, 0.5), (1, 1.0), (2, 1.5), (3, 2.0)] {
            assert!((at(r) - want).abs() < 1e-12, "round {r}: {}", at(r));
        }
        // Round 4 is 1/6 of the way down the cosine: 0.4 + 1.6 · ½(1 + cos(π/6)).
        let r4 = 0.4 + 1.6 * 0.5 * (1.0 + (std::f64::consts::PI / 6.0).cos());
        assert!((at(4) - r4).abs() < 1e-12, "{}", at(4));
        assert!((at(9) - 0.4).abs() < 1e-12 && (at(50) - 0.4).abs() < 1e-12);
        assert!((1..10).all(|r| at(r) <= at(r - 1) || r < 4), "non-increasing after the warmup");
        // Constant: lr whatever the round; a run shorter than the warmup never reaches lr.
        let constant = OuterConfig::CONSTANT_NESTEROV;
        assert!((0..20).all(|r| constant.lr_at(r, 10) == 0.7));
        assert!((c.lr_at(1, 2) - 1.0).abs() < 1e-12);
    }

    /// A round with fewer pseudo-gradients than `full_lr_contributions` steps at lr · √(n / full); more never
    /// raises the rate above lr (added uploads lift a step at most to lr); 1 turns the rule off.
    #[test]
    fn fewer_contributions_take_a_smaller_step_and_more_never_a_larger_one() {
        assert_eq!(OuterConfig::RECOMMENDED.full_lr_contributions, 2, "one upload alone steps at lr/√2");
        let c = OuterConfig { warmup_rounds: 0, full_lr_contributions: 4, ..OuterConfig::RECOMMENDED };
        let lr = |n: usize| c.step_at(5, 40, n, false).0;
        assert!((lr(1) - 0.5).abs() < 1e-12 && (lr(2) - 0.5f64.sqrt()).abs() < 1e-12, "{} {}", lr(1), lr(2));
        assert!((lr(3) - 0.75f64.sqrt()).abs() < 1e-12);
        assert!([4, 5, 8, 1000].iter().all(|&n| lr(n) == c.lr_at(5, 40)), "capped at the full rate");
        assert_eq!(lr(0), lr(1), "an empty mean never steps, but the rate stays positive");
        let off = OuterConfig { full_lr_contributions: 1, ..c };
        assert!([1, 2, 7].iter().all(|&n| off.step_at(5, 40, n, false).0 == c.lr_at(5, 40)));
        // The warmup and the contributions multiply: round 0 of a 4-round warmup with 1 upload of a full 2.
        let d = OuterConfig::RECOMMENDED;
        assert!((d.step_at(0, 40, 1, false).0 - 0.25 * 0.5f64.sqrt()).abs() < 1e-12);
        assert!((d.step_at(5, 40, 1, false).0 - 0.5f64.sqrt()).abs() < 1e-12 && d.step_at(5, 40, 2, false).0 == 1.0);
        assert!(OuterConfig { full_lr_contributions: 0, ..c }.validate().is_err());
    }

    /// Only the run's last step drops the momentum under `average_last_step`: θ − lr·Δ̄, which at lr 1 lands
    /// on the mean of the workers' weights whatever the buffer holds.
    #[test]
    fn the_last_step_averages() {
        let c = OuterConfig::RECOMMENDED;
        assert!(c.average_last_step);
        assert_eq!(c.step_at(39, 40, 4, false).1, c.momentum_at(39, 40));
        assert_eq!(c.step_at(39, 40, 4, true), (1.0, 0.0));
        let keep = OuterConfig { average_last_step: false, ..c };
        assert_eq!(keep.step_at(39, 40, 4, true).1, c.momentum_at(39, 40));
        // θ = 1 with a buffer of 0.3; workers at 0.9 and 0.7 (Δ̄ = 0.2): the last step lands on 0.8.
        let (lr, mu) = OuterConfig { full_lr_contributions: 4, ..c }.step_at(39, 40, 2, true);
        assert!((lr - 0.5f64.sqrt()).abs() < 1e-12 && mu == 0.0, "two uploads of a full four, no momentum");
        let (lr, mu) = OuterConfig { full_lr_contributions: 1, ..c }.step_at(39, 40, 2, true);
        let theta = [scalar(1.0)];
        OuterOptimizer::with_momentum(c, vec![scalar(0.3)]).step_subset(&[0], &theta, &[scalar(0.2)], lr, mu);
        assert!((value(&theta[0]) - 0.8).abs() < 1e-6, "{}", value(&theta[0]));
        assert!(c.to_string().ends_with("full lr from 2 uploads, last step averages"), "{c}");
    }

    /// The learning rate passed to a step is the one used: a step at 0.35 moves half as far as at 0.7 from
    /// the same state (Nesterov's first step: lr·(1 + μ)·Δ).
    #[test]
    fn a_step_uses_the_rate_it_is_given() {
        let moved = |lr: f64| {
            let theta = [scalar(1.0)];
            OuterOptimizer::new(OuterConfig::CONSTANT_NESTEROV, &theta).step(&theta, &[scalar(0.1)], lr);
            1.0 - value(&theta[0])
        };
        assert!((moved(0.7) - 0.7 * 1.9 * 0.1).abs() < 1e-6);
        assert!((moved(0.35) - moved(0.7) / 2.0).abs() < 1e-6);
    }
}
