//! Data assignment: who trains which units in the open round (and, under Streaming DiLoCo's overlap, in
//! the next one, for a worker that has uploaded the open round). A round of `s` steps takes
//! `s / [inner] unit_steps` units (the run's `RoundPlan`). The choice is `core::assign` (a unit is never
//! trained twice in one round; extra workers wait); this module reads the queue and writes the choice, in
//! one transaction.

use crate::core::assign::{choose_units, QueueEntry, UnitChoice};
use crate::error::ApiError;
use crate::state::{now_ms, Coordinator, Live};
use agora_diloco::unit_order;
use agora_protocol::{AheadAssignment, Assignment, DataUnit, Hash32, WorkResponse, WorkerId};
use anyhow::Context;
use sqlx::Row;
use std::collections::BTreeSet;

/// One assignment: its units in training order, and its state.
pub(crate) struct AssignmentRow {
    pub(crate) units: Vec<QueueEntry>,
    pub(crate) state: String,
}

impl AssignmentRow {
    /// The first unit (the one the `assignments` row names).
    pub(crate) fn first(&self) -> QueueEntry {
        self.units[0]
    }
}

/// A row's `epoch`, `position` and `unit` (of `work_queue` or `assignment_units`).
fn queue_entry(r: &sqlx::any::AnyRow) -> Result<QueueEntry, sqlx::Error> {
    Ok(QueueEntry {
        epoch: r.try_get::<i64, _>("epoch")? as u64,
        position: r.try_get::<i64, _>("position")? as u64,
        unit: r.try_get::<i64, _>("unit")? as u64,
    })
}

/// How long a waiting worker is told to wait before asking again (it long-polls meanwhile).
const RETRY_AFTER_MS: u64 = 1000;

impl Coordinator {
    pub(crate) async fn assignment_row(
        &self,
        round: u64,
        worker: &WorkerId,
    ) -> Result<Option<AssignmentRow>, ApiError> {
        let Some(row) = sqlx::query("SELECT state FROM assignments WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .fetch_optional(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let units = self.assignment_units(round, worker).await?;
        Ok(Some(AssignmentRow { units, state: row.try_get("state")? }))
    }

    /// The units of `worker`'s assignment in `round`, in training order.
    pub(crate) async fn assignment_units(&self, round: u64, worker: &WorkerId) -> Result<Vec<QueueEntry>, ApiError> {
        let rows = sqlx::query(
            "SELECT epoch, position, unit FROM assignment_units WHERE round = $1 AND worker = $2 ORDER BY seq",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .fetch_all(&self.db)
        .await?;
        let units = rows.iter().map(queue_entry).collect::<Result<Vec<_>, sqlx::Error>>()?;
        assert!(!units.is_empty(), "assignment of round {round} holds no units");
        Ok(units)
    }

    /// The blobs of `worker`'s units in `round`, in training order (what the judge and a spot check re-read).
    pub(crate) async fn assignment_unit_blobs(&self, round: u64, worker: &WorkerId) -> Result<Vec<Hash32>, ApiError> {
        Ok(self.assignment_units(round, worker).await?.iter().map(|e| self.units[e.unit as usize]).collect())
    }

    /// The units of an assignment as the protocol names them.
    pub(crate) fn data_units(&self, entries: &[QueueEntry]) -> Vec<DataUnit> {
        entries.iter().map(|e| DataUnit { epoch: e.epoch, index: e.unit, hash: self.units[e.unit as usize] }).collect()
    }

    pub(crate) fn assignment(&self, live: &Live, row: &AssignmentRow) -> Assignment {
        Assignment {
            round: live.round,
            global_hash: live.global_hash,
            units: self.data_units(&row.units),
            first_step: self.rounds.first_step(live.round),
            inner_steps: self.rounds.steps(live.round),
            deadline_unix_ms: self.deadline_ms(live) as u64,
        }
    }

    /// The worker's job for the open round: its current assignment, a new one, or "wait" (it has
    /// submitted, it is benched for no-shows, or every free unit is being trained this round).
    pub async fn next_work(&self, worker: WorkerId) -> Result<WorkResponse, ApiError> {
        let live = self.live.lock().await;
        self.touch(&worker);
        if live.finished {
            return Ok(WorkResponse::Finished { rounds: live.round, global_hash: live.global_hash });
        }
        let wait = WorkResponse::Wait { round: live.round, retry_after_ms: RETRY_AFTER_MS };
        let current = self.assignment_row(live.round, &worker).await?;
        // Streaming DiLoCo's overlap: a worker whose upload for the open round is in is handed the next
        // round now, even while this one is closing, so that it never idles waiting for the outer step.
        let uploaded = current.as_ref().is_some_and(|row| row.state == "submitted");
        if uploaded && self.run.compression.overlap().is_on() {
            return self.work_ahead(&live, &worker).await;
        }
        if live.closing {
            return Ok(wait);
        }
        match current {
            Some(row) if row.state == "training" => return Ok(WorkResponse::Assignment(self.assignment(&live, &row))),
            Some(row) if row.state != "released" => return Ok(wait),
            _ => {}
        }
        if self.benched(&worker, live.round).await? {
            return Ok(wait);
        }
        sqlx::query("UPDATE workers SET active = 1 WHERE id = $1 AND active = 0")
            .bind(worker.hex())
            .execute(&self.db)
            .await?;
        let Some(row) = self.take_unit(live.round, &worker).await? else {
            return Ok(wait);
        };
        let first = row.first();
        let units = row.units.len();
        tracing::info!(
            worker = worker.short(),
            round = live.round,
            unit = first.unit,
            epoch = first.epoch,
            units,
            "assigned"
        );
        self.notify();
        Ok(WorkResponse::Assignment(self.assignment(&live, &row)))
    }

    /// The next round's job for a worker that has uploaded the open round (overlap only), handed out once;
    /// otherwise "wait": the worker holds it already (and waits for the round to open), the open round is
    /// the run's last planned one, the worker is benched in the next, or no unit is free for it.
    async fn work_ahead(&self, live: &Live, worker: &WorkerId) -> Result<WorkResponse, ApiError> {
        let next = live.round + 1;
        let wait = WorkResponse::Wait { round: live.round, retry_after_ms: RETRY_AFTER_MS };
        let ahead = |row: &AssignmentRow| {
            WorkResponse::Ahead(AheadAssignment {
                round: next,
                units: self.data_units(&row.units),
                first_step: self.rounds.first_step(next),
                inner_steps: self.rounds.steps(next),
            })
        };
        if next >= self.run.planned_rounds() {
            return Ok(wait);
        }
        if self.assignment_row(next, worker).await?.is_some_and(|row| row.state != "released") {
            // Handed out already: the worker is asking for the round to open, and waits (a long poll that
            // the close ends) for its assignment there.
            return Ok(wait);
        }
        if self.benched(worker, next).await? {
            return Ok(wait);
        }
        let Some(row) = self.take_unit(next, worker).await? else {
            return Ok(wait);
        };
        let first = row.first();
        tracing::info!(worker = worker.short(), round = next, unit = first.unit, epoch = first.epoch, "assigned ahead");
        self.notify();
        Ok(ahead(&row))
    }

    /// Whether the identity is benched (for no-shows) in `round`.
    async fn benched(&self, worker: &WorkerId, round: u64) -> Result<bool, ApiError> {
        let benched_until: i64 = sqlx::query("SELECT benched_until FROM workers WHERE id = $1")
            .bind(worker.hex())
            .fetch_optional(&self.db)
            .await?
            .map(|r| r.try_get("benched_until"))
            .transpose()?
            .unwrap_or(0);
        Ok((round as i64) < benched_until)
    }

    /// Hands the worker the units `core::assign` chooses for `round` (opening the next epoch when that
    /// frees some), in one transaction; None when too few free units are left in that round.
    async fn take_unit(&self, round: u64, worker: &WorkerId) -> Result<Option<AssignmentRow>, ApiError> {
        let n = self.rounds.units(round) as usize;
        let mut tx = self.db.begin().await?;
        let busy: BTreeSet<u64> = sqlx::query(
            "SELECT u.unit FROM assignments a JOIN assignment_units u ON u.round = a.round AND u.worker = a.worker \
             WHERE a.round = $1 AND a.state IN ('training', 'submitted', 'applied')",
        )
        .bind(round as i64)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>("unit").map(|u| u as u64))
        .collect::<Result<_, _>>()?;
        let mut opened = false;
        let entries = loop {
            let pending: Vec<QueueEntry> =
                sqlx::query("SELECT epoch, position, unit FROM work_queue WHERE state = 'pending'")
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(queue_entry)
                    .collect::<Result<_, sqlx::Error>>()?;
            match choose_units(&pending, &busy, n, self.units.len() as u64) {
                UnitChoice::Take(entries) => break entries,
                UnitChoice::Wait => {
                    tx.commit().await?;
                    return Ok(None);
                }
                UnitChoice::OpenEpoch => {
                    assert!(!opened, "a freshly opened epoch leaves every unit held or pending");
                    opened = true;
                    let next: i64 = sqlx::query("SELECT COALESCE(MAX(epoch) + 1, 0) AS next FROM work_queue")
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get("next")?;
                    for (position, unit) in
                        unit_order(self.run.seed, next as u64, self.units.len()).into_iter().enumerate()
                    {
                        sqlx::query(
                            "INSERT INTO work_queue (epoch, position, unit, state) VALUES ($1, $2, $3, 'pending')",
                        )
                        .bind(next)
                        .bind(position as i64)
                        .bind(unit as i64)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
        };
        for e in &entries {
            sqlx::query("UPDATE work_queue SET state = 'assigned' WHERE epoch = $1 AND position = $2")
                .bind(e.epoch as i64)
                .bind(e.position as i64)
                .execute(&mut *tx)
                .await?;
        }
        // A released assignment of this worker in this round (its units already back in the queue) is
        // replaced.
        for table in ["assignments", "assignment_units"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE round = $1 AND worker = $2"))
                .bind(round as i64)
                .bind(worker.hex())
                .execute(&mut *tx)
                .await?;
        }
        let first = entries[0];
        sqlx::query(
            "INSERT INTO assignments (round, worker, epoch, position, unit, state, assigned_ms) \
             VALUES ($1, $2, $3, $4, $5, 'training', $6)",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .bind(first.epoch as i64)
        .bind(first.position as i64)
        .bind(first.unit as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .context("recording an assignment")?;
        for (seq, e) in entries.iter().enumerate() {
            sqlx::query(
                "INSERT INTO assignment_units (round, worker, seq, epoch, position, unit) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(round as i64)
            .bind(worker.hex())
            .bind(seq as i64)
            .bind(e.epoch as i64)
            .bind(e.position as i64)
            .bind(e.unit as i64)
            .execute(&mut *tx)
            .await
            .context("recording an assignment's units")?;
        }
        tx.commit().await?;
        Ok(Some(AssignmentRow { units: entries, state: "training".into() }))
    }
}
