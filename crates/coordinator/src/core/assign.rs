//! Which unit of data a worker gets.
//!
//! The policy: **a unit is never trained by two workers in one round.** A worker asking for work gets the
//! first pending entry of the work queue (earliest epoch, then position) whose unit nobody holds in the
//! open round; the next epoch is opened only when no entry is pending at all. When every free entry's
//! unit is already being trained this round (more workers than units), the extra workers wait for the
//! next round. Two workers starting from the same global weights on the same unit would compute the same
//! Δ bit for bit, and the later would be judged a copy (issue 11, finding 1).

use std::collections::BTreeSet;

/// One pending entry of the work queue: the unit at `position` of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueEntry {
    pub epoch: u64,
    pub position: u64,
    pub unit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitChoice {
    /// Hand out this entry.
    Take(QueueEntry),
    /// No entry is pending: open the next epoch and choose again.
    OpenEpoch,
    /// Every pending entry's unit is being trained this round: ask again next round.
    Wait,
}

/// `pending`: the queue's pending entries (any order); `busy`: the units held (training or submitted) by
/// an assignment of the open round.
pub fn choose_unit(pending: &[QueueEntry], busy: &BTreeSet<u64>) -> UnitChoice {
    if pending.is_empty() {
        return UnitChoice::OpenEpoch;
    }
    pending.iter().filter(|e| !busy.contains(&e.unit)).min().map_or(UnitChoice::Wait, |e| UnitChoice::Take(*e))
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
        /// worker → (epoch, position, unit) held in the open round
        round: BTreeMap<usize, QueueEntry>,
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
                let busy: BTreeSet<u64> = self.round.values().map(|e| e.unit).collect();
                match choose_unit(&pending, &busy) {
                    UnitChoice::Take(e) => {
                        self.queue.insert((e.epoch, e.position), (e.unit, "assigned"));
                        self.round.insert(worker, e);
                        return true;
                    }
                    UnitChoice::OpenEpoch => {
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
            let units: Vec<u64> = self.round.values().map(|e| e.unit).collect();
            let distinct: BTreeSet<u64> = units.iter().copied().collect();
            assert_eq!(units.len(), distinct.len(), "a unit trained twice in one round: {units:?}");
            for (w, e) in std::mem::take(&mut self.round) {
                let state = if rejected.contains(&w) { "pending" } else { "done" };
                self.queue.insert((e.epoch, e.position), (e.unit, state));
                if state == "done" {
                    self.trained.push((e.epoch, e.unit));
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
                sim.round.iter().filter(|(_, e)| e.unit == 1 && round % 2 == 0).map(|(w, _)| *w).collect();
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
        assert_eq!(choose_unit(&pending, &BTreeSet::new()), UnitChoice::Take(e(0, 3, 1)));
        assert_eq!(choose_unit(&pending, &BTreeSet::from([1])), UnitChoice::Take(e(1, 0, 2)));
        assert_eq!(choose_unit(&pending, &BTreeSet::from([0, 1, 2])), UnitChoice::Wait);
        assert_eq!(choose_unit(&[], &BTreeSet::from([0])), UnitChoice::OpenEpoch);
    }
}
