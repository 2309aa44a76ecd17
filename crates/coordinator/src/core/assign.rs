//! Which units of data a worker gets.
//!
//! The policy: **a unit is never trained by two workers in one round, nor twice by one.** An assignment
//! takes `n` units, the round's length in units (one when every round is `[inner] steps` long and a unit
//! is a round, the default). A worker
//! asking for work gets the first `n` pending entries of the work queue (earliest epoch, then position)
//! whose units nobody holds in the open round, one entry per unit. When fewer than `n` are free, the next
//! epoch is opened if that would free more (some unit is neither held nor pending); otherwise (more
//! workers than data) the worker waits for the next round. Two workers starting from the same global
//! weights on the same unit would compute the same Δ bit for bit, and the later would be judged a copy
//! (issue 11, finding 1).

use std::collections::BTreeSet;

/// One pending entry of the work queue: the unit at `position` of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueEntry {
    pub epoch: u64,
    pub position: u64,
    pub unit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitChoice {
    /// Hand out these entries, in this order.
    Take(Vec<QueueEntry>),
    /// Too few free entries, and the next epoch would add some: open it and choose again.
    OpenEpoch,
    /// Every unit is held this round or already pending: ask again next round.
    Wait,
}

/// `pending`: the queue's pending entries (any order); `busy`: the units held (training or submitted) by
/// an assignment of the open round; `n`: units per assignment; `n_units`: the run's units.
pub fn choose_units(pending: &[QueueEntry], busy: &BTreeSet<u64>, n: usize, n_units: u64) -> UnitChoice {
    assert!(n > 0, "an assignment holds at least one unit");
    let mut sorted: Vec<QueueEntry> = pending.iter().filter(|e| !busy.contains(&e.unit)).copied().collect();
    sorted.sort();
    let mut taken = BTreeSet::new();
    let free: Vec<QueueEntry> = sorted.into_iter().filter(|e| taken.insert(e.unit)).collect();
    if free.len() >= n {
        return UnitChoice::Take(free[..n].to_vec());
    }
    // Opening an epoch adds an entry for every unit; it frees more only for a unit neither held nor pending.
    let pending_units: BTreeSet<u64> = pending.iter().map(|e| e.unit).collect();
    if (0..n_units).any(|u| !busy.contains(&u) && !pending_units.contains(&u)) {
        UnitChoice::OpenEpoch
    } else {
        UnitChoice::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A miniature work queue and round, driven the way the coordinator drives the store.
    struct Sim {
        units: u64,
        queue: BTreeMap<(u64, u64), (u64, &'static str)>,
        next_epoch: u64,
        /// worker → the entries it holds in the open round
        round: BTreeMap<usize, Vec<QueueEntry>>,
        trained: Vec<(u64, u64)>,
    }

    impl Sim {
        fn new(units: u64) -> Sim {
            Sim { units, queue: BTreeMap::new(), next_epoch: 0, round: BTreeMap::new(), trained: Vec::new() }
        }
        fn order(&self, epoch: u64) -> Vec<u64> {
            // Any permutation will do; rotate by the epoch so epochs differ.
            (0..self.units).map(|i| (i + epoch) % self.units).collect()
        }
        fn ask(&mut self, worker: usize) -> bool {
            self.ask_for(worker, 1)
        }
        fn ask_for(&mut self, worker: usize, n: usize) -> bool {
            if self.round.contains_key(&worker) {
                return true;
            }
            loop {
                let pending: Vec<QueueEntry> = self
                    .queue
                    .iter()
                    .filter(|(_, (_, s))| *s == "pending")
                    .map(|(&(epoch, position), &(unit, _))| QueueEntry { epoch, position, unit })
                    .collect();
                let busy: BTreeSet<u64> = self.round.values().flatten().map(|e| e.unit).collect();
                match choose_units(&pending, &busy, n, self.units) {
                    UnitChoice::Take(entries) => {
                        assert_eq!(entries.len(), n);
                        for e in &entries {
                            self.queue.insert((e.epoch, e.position), (e.unit, "assigned"));
                        }
                        self.round.insert(worker, entries);
                        return true;
                    }
                    UnitChoice::OpenEpoch => {
                        assert!(self.next_epoch < 1000, "epochs opened without end");
                        let epoch = self.next_epoch;
                        self.next_epoch += 1;
                        for (p, u) in self.order(epoch).into_iter().enumerate() {
                            self.queue.insert((epoch, p as u64), (u, "pending"));
                        }
                    }
                    UnitChoice::Wait => return false,
                }
            }
        }
        /// Closes the round: `rejected` workers' entries go back to pending, the rest are done.
        fn close(&mut self, rejected: &[usize]) {
            let units: Vec<u64> = self.round.values().flatten().map(|e| e.unit).collect();
            let distinct: BTreeSet<u64> = units.iter().copied().collect();
            assert_eq!(units.len(), distinct.len(), "a unit trained twice in one round: {units:?}");
            for (w, entries) in std::mem::take(&mut self.round) {
                let state = if rejected.contains(&w) { "pending" } else { "done" };
                for e in entries {
                    self.queue.insert((e.epoch, e.position), (e.unit, state));
                    if state == "done" {
                        self.trained.push((e.epoch, e.unit));
                    }
                }
            }
        }
    }

    #[test]
    fn more_workers_than_units_never_share_a_unit_in_a_round() {
        // Issue 11's measurement: 4 units, 6 workers (1.5×), and 2.5× for good measure.
        for workers in [6usize, 10] {
            let mut sim = Sim::new(4);
            for round in 0..12 {
                let served = (0..workers).filter(|&w| sim.ask(w)).count();
                assert_eq!(served, 4, "round {round}: every unit is handed out once, the others wait");
                sim.close(&[]);
            }
            // Every epoch trained each unit exactly once.
            let mut per_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for (e, u) in &sim.trained {
                per_epoch.entry(*e).or_default().push(*u);
            }
            for (e, mut units) in per_epoch {
                units.sort();
                assert_eq!(units, vec![0, 1, 2, 3], "epoch {e}");
            }
        }
    }

    #[test]
    fn a_rejected_unit_returns_and_is_trained_once_in_its_epoch() {
        let mut sim = Sim::new(3);
        for round in 0..9 {
            for w in 0..5 {
                sim.ask(w);
            }
            // Reject whoever holds unit 1 in the even rounds.
            let rejected: Vec<usize> =
                sim.round.iter().filter(|(_, e)| e[0].unit == 1 && round % 2 == 0).map(|(w, _)| *w).collect();
            sim.close(&rejected);
        }
        let mut seen = BTreeSet::new();
        for t in &sim.trained {
            assert!(seen.insert(*t), "(epoch, unit) {t:?} trained twice");
        }
    }

    #[test]
    fn fewer_workers_than_units_walk_the_epoch_in_order() {
        let e = |epoch, position, unit| QueueEntry { epoch, position, unit };
        let pending = [e(1, 0, 2), e(0, 3, 1), e(1, 1, 0)];
        assert_eq!(choose_units(&pending, &BTreeSet::new(), 1, 3), UnitChoice::Take(vec![e(0, 3, 1)]));
        assert_eq!(choose_units(&pending, &BTreeSet::from([1]), 1, 3), UnitChoice::Take(vec![e(1, 0, 2)]));
        assert_eq!(choose_units(&pending, &BTreeSet::from([0, 1, 2]), 1, 3), UnitChoice::Wait);
        assert_eq!(choose_units(&[], &BTreeSet::from([0]), 1, 3), UnitChoice::OpenEpoch);
        assert_eq!(choose_units(&[], &BTreeSet::from([0, 1, 2]), 1, 3), UnitChoice::Wait, "all held: nothing to open");
    }
    /// Rounds of varying length: assignments of 1 to 4 units, more or fewer workers than the data holds,
    /// some rejected. No unit is held twice in a round (the close asserts it), every (epoch, unit) is
    /// trained at most once, an assignment is served whole or not at all, and an epoch is opened only
    /// when it frees a unit.
    #[test]
    fn assignments_of_several_units_never_repeat_a_unit() {
        for (units, workers) in [(10u64, 3usize), (7, 4), (5, 6)] {
            let mut sim = Sim::new(units);
            for round in 0..30usize {
                let n = 1 + round % 4;
                let served = (0..workers).filter(|&w| sim.ask_for(w, n)).count();
                assert_eq!(served, workers.min(units as usize / n), "round {round}: {n} units each");
                let rejected: Vec<usize> = sim.round.keys().copied().filter(|w| (w + round) % 5 == 0).collect();
                sim.close(&rejected);
            }
            let mut seen = BTreeSet::new();
            for t in &sim.trained {
                assert!(seen.insert(*t), "(epoch, unit) {t:?} trained twice");
            }
            assert!(sim.next_epoch as usize <= sim.trained.len() / units as usize + 2, "epochs opened early");
        }
    }

    #[test]
    fn several_units_come_from_the_earliest_entries_one_per_unit() {
        let e = |epoch, position, unit| QueueEntry { epoch, position, unit };
        let pending = [e(1, 0, 2), e(0, 3, 1), e(1, 1, 0), e(1, 2, 1)];
        assert_eq!(
            choose_units(&pending, &BTreeSet::new(), 3, 3),
            UnitChoice::Take(vec![e(0, 3, 1), e(1, 0, 2), e(1, 1, 0)]),
            "unit 1's second entry is skipped"
        );
        assert_eq!(
            choose_units(&pending, &BTreeSet::from([0]), 3, 3),
            UnitChoice::Wait,
            "two free units, none to open"
        );
        assert_eq!(
            choose_units(&pending, &BTreeSet::new(), 3, 4),
            UnitChoice::Take(vec![e(0, 3, 1), e(1, 0, 2), e(1, 1, 0)])
        );
        assert_eq!(
            choose_units(&pending, &BTreeSet::from([0]), 3, 4),
            UnitChoice::OpenEpoch,
            "unit 3 is neither held nor pending"
        );
    }
}
