//! When a round closes, and who is benched for holding work without delivering it.
//!
//! A round closes
//! - at once when every assignment of the round has been submitted and every spot check answered;
//! - otherwise once a **quorum** has uploaded — q = max(`min_workers`, ⌈holders / 2⌉), holders being the
//!   assignments of the round still training or submitted — and a **grace** period has passed since the
//!   q-th upload: `grace_fraction` × the time the quorum took (at least [`MIN_GRACE_MS`]). Workers still
//!   training then are released (their units go back to the queue): they were that much slower than half
//!   of the round. A challenged upload's proof is waited for as long again after that upload (at least
//!   [`MIN_PROOF_WAIT_MS`]);
//! - at the deadline in any case, once it has `min_workers` uploads.
//!
//! A proof being verified (the coordinator's own re-run) always holds the close: its verdict is needed.
//!
//! So one identity that takes work and never uploads cannot hold rounds open for the deadline: it costs
//! at most the grace. And it is benched: after [`NoShowPolicy::limit`] consecutive rounds in which it
//! held an assignment it did not deliver, it gets no work for 2^(no-shows − limit) rounds (capped), and
//! each no-show scores 0 in its reputation.

/// The least grace, so that a quorum reached within milliseconds of the round's opening does not cut
/// off workers a scheduler tick behind it.
pub const MIN_GRACE_MS: u64 = 1000;

/// The least time a challenged upload's proof is waited for after the upload, whatever the grace: an
/// unanswered challenge is a failed spot check (a proven cheat: otherwise a caught cheater would just not
/// answer), so an honest worker on a slow link, or one that crashed between its upload and its proof and
/// restarts, must have time to send its states. A worker that withholds its proof costs the round this much.
pub const MIN_PROOF_WAIT_MS: u64 = 60_000;

/// The open round as the close decision sees it (times in unix ms).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundView {
    pub opened_ms: u64,
    pub deadline_ms: u64,
    pub min_workers: u64,
    /// Assignments still training.
    pub training: u64,
    /// Arrival times of the round's uploads (any order).
    pub uploads_ms: Vec<u64>,
    /// Arrival times of the uploads whose challenge is not answered yet.
    pub proofs_awaited_ms: Vec<u64>,
    /// Proofs received and being verified now.
    pub proofs_verifying: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseDecision {
    Close,
    /// Not yet; decide again at or before this time (None: only when something happens).
    Wait(Option<u64>),
}

/// The quorum of a round with `holders` assignments training or submitted.
pub fn quorum(min_workers: u64, holders: u64) -> u64 {
    min_workers.max(holders.div_ceil(2))
}

pub fn decide_close(view: &RoundView, now_ms: u64, grace_fraction: f64) -> CloseDecision {
    let submitted = view.uploads_ms.len() as u64;
    if submitted < view.min_workers.max(1) || view.proofs_verifying > 0 {
        return CloseDecision::Wait(None);
    }
    if view.training == 0 && view.proofs_awaited_ms.is_empty() {
        return CloseDecision::Close;
    }
    if now_ms >= view.deadline_ms {
        return CloseDecision::Close;
    }
    let q = quorum(view.min_workers, view.training + submitted);
    if submitted < q {
        return CloseDecision::Wait(Some(view.deadline_ms));
    }
    let mut times = view.uploads_ms.clone();
    times.sort_unstable();
    let quorum_at = times[q as usize - 1];
    let took = quorum_at.saturating_sub(view.opened_ms) as f64;
    let grace = ((grace_fraction * took) as u64).max(MIN_GRACE_MS);
    let proof_wait = grace.max(MIN_PROOF_WAIT_MS);
    let proofs_due = view.proofs_awaited_ms.iter().map(|t| t.saturating_add(proof_wait)).max().unwrap_or(0);
    let close_at = quorum_at.saturating_add(grace).max(proofs_due).min(view.deadline_ms);
    if now_ms >= close_at {
        CloseDecision::Close
    } else {
        CloseDecision::Wait(Some(close_at))
    }
}

/// How holding work without delivering it is answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoShowPolicy {
    /// Consecutive no-shows tolerated before the identity is benched.
    pub limit: u64,
    /// Longest bench, in rounds.
    pub max_bench_rounds: u64,
}

impl Default for NoShowPolicy {
    fn default() -> Self {
        NoShowPolicy { limit: 2, max_bench_rounds: 64 }
    }
}

impl NoShowPolicy {
    /// After `consecutive` no-shows ending with round `round`, the first round the identity gets work in
    /// again (`round + 1` while under the limit).
    pub fn benched_until(&self, round: u64, consecutive: u64) -> u64 {
        if consecutive < self.limit {
            return round + 1;
        }
        let exponent = (consecutive - self.limit).min(32);
        round + 1 + (1u64 << exponent).min(self.max_bench_rounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(training: u64, uploads: &[u64]) -> RoundView {
        RoundView {
            opened_ms: 0,
            deadline_ms: 600_000,
            min_workers: 2,
            training,
            uploads_ms: uploads.to_vec(),
            proofs_awaited_ms: vec![],
            proofs_verifying: 0,
        }
    }

    #[test]
    fn a_complete_round_closes_at_once() {
        assert_eq!(decide_close(&view(0, &[10_000, 11_000]), 11_000, 0.5), CloseDecision::Close);
    }

    #[test]
    fn too_few_uploads_wait_even_past_the_deadline() {
        assert_eq!(decide_close(&view(2, &[10_000]), 700_000, 0.5), CloseDecision::Wait(None));
    }

    /// Issue 11, finding 7: one identity that takes work and never uploads held every round for the
    /// deadline (600 s). Now it costs the grace: half the time the quorum took.
    #[test]
    fn an_idle_holder_costs_the_grace_not_the_deadline() {
        let v = view(1, &[10_000, 12_000]);
        assert_eq!(decide_close(&v, 12_000, 0.5), CloseDecision::Wait(Some(18_000)));
        assert_eq!(decide_close(&v, 17_999, 0.5), CloseDecision::Wait(Some(18_000)));
        assert_eq!(decide_close(&v, 18_000, 0.5), CloseDecision::Close);
    }

    #[test]
    fn the_quorum_is_half_the_holders() {
        assert_eq!(quorum(2, 3), 2);
        assert_eq!(quorum(2, 6), 3);
        assert_eq!(quorum(1, 1), 1);
        // 6 holders: two uploads are not a quorum; the round waits for a third (or the deadline).
        let v = view(4, &[10_000, 10_500]);
        assert_eq!(decide_close(&v, 500_000, 0.5), CloseDecision::Wait(Some(600_000)));
        assert_eq!(decide_close(&v, 600_000, 0.5), CloseDecision::Close);
    }

    #[test]
    fn proofs_are_waited_for_and_verification_holds_the_close() {
        let mut v = view(0, &[10_000, 12_000]);
        v.proofs_awaited_ms = vec![12_000];
        // The proof gets at least MIN_PROOF_WAIT_MS after its upload (here more than the 6 s grace).
        assert_eq!(decide_close(&v, 12_500, 0.5), CloseDecision::Wait(Some(72_000)));
        assert_eq!(decide_close(&v, 72_000, 0.5), CloseDecision::Close, "an unanswered challenge is late");
        v.proofs_verifying = 1;
        assert_eq!(decide_close(&v, 72_000, 0.5), CloseDecision::Wait(None));
        // A long round's grace exceeds the floor.
        let mut slow = view(0, &[200_000, 240_000]);
        slow.proofs_awaited_ms = vec![240_000];
        assert_eq!(decide_close(&slow, 241_000, 0.5), CloseDecision::Wait(Some(360_000)));
    }

    #[test]
    fn the_grace_has_a_floor() {
        let v = view(1, &[100, 200]);
        assert_eq!(decide_close(&v, 300, 0.5), CloseDecision::Wait(Some(200 + MIN_GRACE_MS)));
    }

    #[test]
    fn no_shows_bench_exponentially() {
        let p = NoShowPolicy::default();
        assert_eq!(p.benched_until(5, 1), 6, "one no-show is forgiven");
        assert_eq!(p.benched_until(5, 2), 7);
        assert_eq!(p.benched_until(5, 3), 8);
        assert_eq!(p.benched_until(5, 4), 10);
        assert_eq!(p.benched_until(5, 100), 6 + 64, "capped");
    }
}
