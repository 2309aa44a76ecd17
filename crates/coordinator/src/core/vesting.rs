//! Credits vest: cheating must not pay in expectation.
//!
//! A judged credit is booked as a **pending** transfer (pool → the identity's pending account) and, like a
//! TigerBeetle two-phase transfer, later either **posted** (pending → the identity's account) or
//! **voided** (back to the pool); a pending transfer is resolved exactly once, and nothing is ever
//! updated or deleted. At the close of round r:
//! - every pending credit of an identity proven to cheat in round r is voided (a cheat forfeits all it has
//!   not yet been paid);
//! - a pending credit booked at round t posts once r ≥ t + `vesting_rounds`, provided the identity has at
//!   least `probation_rounds` verified rounds (uploads whose spot check passed) since its last proven
//!   cheat. Until then it waits; it is never paid early.
//!
//! A proven cheat also resets the identity's verified count, so after a cheat an old identity stands
//! where a fresh one does: under open admission identities are free, and the rule makes a new one worth
//! nothing more than a caught one. An identity that lies on every challenge never has a verified round,
//! so it never posts anything however lucky it is.

/// One unresolved pending transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCredit<W> {
    pub id: u64,
    pub worker: W,
    /// The round whose judgement booked it.
    pub round: u64,
    pub amount: u64,
}

/// What a round's judgement says about one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    /// Verified rounds since its last proven cheat, this round's included.
    pub verified: u64,
    /// Proven to cheat in the round being closed.
    pub cheated: bool,
}

/// How a verified count moves with one judged upload: a proven cheat resets it, a passed spot check adds one.
pub fn next_verified(verified: u64, cheated: bool, spot_check_passed: bool) -> u64 {
    if cheated {
        0
    } else {
        verified + u64::from(spot_check_passed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Post(u64),
    Void(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VestingPolicy {
    pub vesting_rounds: u64,
    pub probation_rounds: u64,
}

/// The resolutions at the close of round `closing`, in the order of `pending`.
pub fn resolve<W>(
    policy: VestingPolicy,
    closing: u64,
    pending: &[PendingCredit<W>],
    standing: impl Fn(&W) -> Standing,
) -> Vec<Resolution> {
    pending
        .iter()
        .filter_map(|p| {
            let s = standing(&p.worker);
            if s.cheated {
                Some(Resolution::Void(p.id))
            } else if closing >= p.round.saturating_add(policy.vesting_rounds) && s.verified >= policy.probation_rounds
            {
                Some(Resolution::Post(p.id))
            } else {
                None
            }
        })
        .collect()
}

/// Expected credits per round, relative to honest work's 1, of an identity that lies on `lying` of a
/// round's `segments` segments every round (or, `lying = None`, on a binding: its upload is not what its
/// chain computed), when a fraction `spot_check` of uploads is challenged and a challenge re-runs one
/// segment chosen uniformly and always checks both bindings. Ignores probation (which only lowers it) and
/// assumes the liar earns honest work's score. Used by TRUST.md's table and tested against a simulation.
pub fn expected_liar_share(spot_check: f64, segments: u64, lying: Option<u64>, vesting_rounds: u64) -> f64 {
    let caught = match lying {
        None => spot_check,
        Some(m) => spot_check * m.min(segments) as f64 / segments as f64,
    };
    // A round that is caught earns nothing; a credit posts if none of the vesting rounds after it catches
    // the identity either. A caught identity starts over, which changes nothing of the per-round rate.
    (1.0 - caught).powi(vesting_rounds as i32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: VestingPolicy = VestingPolicy { vesting_rounds: 8, probation_rounds: 2 };

    fn credit(id: u64, worker: &'static str, round: u64) -> PendingCredit<&'static str> {
        PendingCredit { id, worker, round, amount: 100 }
    }

    #[test]
    fn credits_post_only_after_vesting_and_probation() {
        let pending = [credit(1, "a", 0), credit(2, "a", 3), credit(3, "b", 0)];
        let verified = |w: &&str| Standing { verified: if *w == "a" { 2 } else { 1 }, cheated: false };
        assert_eq!(resolve(POLICY, 7, &pending, verified), vec![], "nothing vests before 8 rounds");
        assert_eq!(resolve(POLICY, 8, &pending, verified), vec![Resolution::Post(1)], "b is on probation");
        assert_eq!(resolve(POLICY, 11, &pending, verified), vec![Resolution::Post(1), Resolution::Post(2)]);
    }

    #[test]
    fn a_proven_cheat_voids_everything_pending_and_only_its_own() {
        let pending = [credit(1, "a", 0), credit(2, "cheat", 1), credit(3, "cheat", 9)];
        let standing = |w: &&str| Standing { verified: 5, cheated: *w == "cheat" };
        assert_eq!(
            resolve(POLICY, 9, &pending, standing),
            vec![Resolution::Post(1), Resolution::Void(2), Resolution::Void(3)]
        );
    }

    #[test]
    fn a_cheat_resets_the_verified_count() {
        assert_eq!(next_verified(7, true, true), 0);
        assert_eq!(next_verified(7, false, true), 8);
        assert_eq!(next_verified(7, false, false), 7);
    }

    /// An identity lying on every challenge (every segment, or a binding) never has a verified round, so
    /// nothing it earns ever posts, however many rounds pass.
    #[test]
    fn a_liar_on_every_challenge_never_posts() {
        let mut verified = 0;
        let mut pending = Vec::new();
        let mut posted = 0u64;
        for round in 0..200u64 {
            // Challenged every 4th round and caught: the cheat resets it; unchallenged rounds add nothing.
            let challenged = round % 4 == 0;
            verified = next_verified(verified, challenged, false);
            if !challenged {
                pending.push(credit(round, "liar", round));
            }
            let standing = |_: &&str| Standing { verified, cheated: challenged };
            for r in resolve(POLICY, round, &pending, standing) {
                match r {
                    Resolution::Post(id) => {
                        posted += 100;
                        pending.retain(|p| p.id != id);
                    }
                    Resolution::Void(id) => pending.retain(|p| p.id != id),
                }
            }
        }
        assert_eq!(posted, 0);
    }

    /// The closed form against a simulation of a liar caught with probability q per round, with the
    /// same deterministic "random" draws for every credit.
    #[test]
    fn the_expected_share_matches_a_simulation() {
        let q: f64 = 0.25 / 4.0;
        let expected = expected_liar_share(0.25, 4, Some(1), 8);
        assert!((expected - (1.0 - q).powi(9)).abs() < 1e-12);
        let mut x: u64 = 0x1234_5678;
        let mut draw = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let rounds = 400_000u64;
        let mut pending: Vec<u64> = Vec::new();
        let mut posted = 0u64;
        for round in 0..rounds {
            if draw() < q {
                pending.clear();
                continue;
            }
            pending.push(round);
            let before = pending.len();
            pending.retain(|&t| round < t + 8);
            posted += (before - pending.len()) as u64;
        }
        let measured = posted as f64 / rounds as f64;
        assert!((measured - expected).abs() < 0.01, "measured {measured}, expected {expected}");
        assert!(expected_liar_share(0.25, 4, None, 8) < 0.08);
        assert!(expected_liar_share(0.25, 4, Some(4), 8) < 0.08);
    }
}
