//! Who a `cohort` run admits: the best of the earlier run by reputation, among those who contributed to
//! that run.
//!
//! Reputations carry over from run to run, so an earlier run's reputation table also rates identities that
//! only took part in the run before it. Ranking them would let an identity sit a phase out and keep its
//! place ahead of those who did the phase's work; so only identities with an accepted upload in the
//! earlier run itself are candidates, and only with a rating above zero (proven cheating resets it to 0).
//! One accepted upload makes a candidate: its rating (an EMA) still carries what it earned before.

use agora_protocol::WorkerId;
use std::collections::HashSet;

/// `ranking`: the earlier run's reputation table, best first; `contributed`: the identities with at least
/// one accepted upload in that run. Returns the admitted identities, best first.
pub fn choose_cohort(
    ranking: &[(WorkerId, f64)],
    contributed: &HashSet<WorkerId>,
    size: usize,
) -> Vec<(WorkerId, f64)> {
    ranking.iter().copied().filter(|(id, rating)| *rating > 0.0 && contributed.contains(id)).take(size).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> WorkerId {
        WorkerId([n; 32])
    }

    #[test]
    fn the_best_contributors_are_admitted_in_rank_order() {
        let ranking = [(id(1), 0.9), (id(2), 0.7), (id(3), 0.5), (id(4), 0.3)];
        let all: HashSet<WorkerId> = (1..=4).map(id).collect();
        let chosen: Vec<WorkerId> = choose_cohort(&ranking, &all, 2).into_iter().map(|c| c.0).collect();
        assert_eq!(chosen, vec![id(1), id(2)]);
        assert_eq!(choose_cohort(&ranking, &all, 10).len(), 4, "a cohort larger than the field admits all of it");
    }

    /// An identity rated in the earlier run only because its rating was carried into it (it sat that
    /// run out) is not a candidate, however high its rating.
    #[test]
    fn sitting_a_phase_out_forfeits_the_place() {
        let ranking = [(id(9), 0.99), (id(1), 0.6), (id(2), 0.4)];
        let contributed: HashSet<WorkerId> = [id(1), id(2)].into();
        let chosen: Vec<WorkerId> = choose_cohort(&ranking, &contributed, 2).into_iter().map(|c| c.0).collect();
        assert_eq!(chosen, vec![id(1), id(2)]);
    }

    /// A cheater's reset rating (0) never admits it, even when the cohort has room.
    #[test]
    fn a_zero_rating_is_never_admitted() {
        let ranking = [(id(1), 0.6), (id(5), 0.0), (id(6), -0.1)];
        let contributed: HashSet<WorkerId> = [id(1), id(5), id(6)].into();
        let chosen: Vec<WorkerId> = choose_cohort(&ranking, &contributed, 3).into_iter().map(|c| c.0).collect();
        assert_eq!(chosen, vec![id(1)]);
    }
}
