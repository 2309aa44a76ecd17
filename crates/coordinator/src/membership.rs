//! Membership: request nonces, joining and leaving, heartbeats, dropping silent workers, and admission
//! (open, allowlist, or the top of an earlier run's reputation).

use crate::error::ApiError;
use crate::run_file::{AdmissionPolicy, RunFile};
use crate::state::*;
use crate::store::*;
use agora_protocol::*;
use anyhow::bail;
use anyhow::{Context, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use sqlx::Row;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The run's admission set (None: open) and what a refused worker is told. Reputations of the run named
/// in `[admission] previous` are carried over first (an identity keeps its standing between phases).
pub(crate) async fn admission(run: &RunFile, db: &AnyPool) -> Result<(Option<HashSet<WorkerId>>, String)> {
    let a = &run.admission;
    let mut ranking: Vec<(WorkerId, f64)> = Vec::new();
    let mut previous_id = String::new();
    // Identities with an accepted upload in the earlier run itself (the cohort's candidates).
    let mut contributed: HashSet<WorkerId> = HashSet::new();
    if let Some(raw_url) = &a.previous {
        let url = crate::redact::redact_url(raw_url);
        sqlx::any::install_default_drivers();
        let previous = AnyPoolOptions::new()
            .max_connections(1)
            .connect(raw_url)
            .await
            .map_err(|e| crate::redact::redact_error(e, raw_url))
            .with_context(|| format!("[admission] previous: cannot open the earlier run's database {url}"))?;
        previous_id = sqlx::query("SELECT id FROM run")
            .fetch_one(&previous)
            .await
            .with_context(|| format!("[admission] previous: {url} holds no agora run"))?
            .try_get("id")?;
        if let Some(expected) = &a.previous_run {
            if *expected != previous_id {
                bail!("[admission] previous: {url} holds run {previous_id}, not previous_run = {expected}");
            }
        }
        let rows = sqlx::query(
            "SELECT worker, rating, accepted, rejected FROM reputation ORDER BY rating DESC, accepted DESC, worker",
        )
        .fetch_all(&previous)
        .await?;
        for row in sqlx::query("SELECT id FROM workers WHERE rounds_accepted > 0").fetch_all(&previous).await? {
            contributed.insert(worker_col(&row, "id")?);
        }
        for row in &rows {
            let worker = worker_col(row, "worker")?;
            let rating: f64 = row.try_get("rating")?;
            sqlx::query(
                "INSERT INTO reputation (worker, rating, accepted, rejected, updated_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (worker) DO NOTHING",
            )
            .bind(worker.hex())
            .bind(rating)
            .bind(row.try_get::<i64, _>("accepted")?)
            .bind(row.try_get::<i64, _>("rejected")?)
            .bind(now_ms())
            .execute(db)
            .await?;
            ranking.push((worker, rating));
        }
        previous.close().await;
    }
    Ok(match a.policy {
        AdmissionPolicy::Open => (None, String::new()),
        AdmissionPolicy::Allowlist => (
            Some(a.allowlist.iter().copied().collect()),
            format!("this run admits only the {} public keys of its allowlist", a.allowlist.len()),
        ),
        AdmissionPolicy::Cohort => {
            let cohort = crate::core::cohort::choose_cohort(&ranking, &contributed, a.cohort_size);
            let cutoff = cohort.last().map_or(0.0, |c| c.1);
            let note = format!(
                "this run admits only the top {} identities by reputation among the {} that contributed to run {previous_id} (rating ≥ {cutoff:.3})",
                a.cohort_size,
                contributed.len()
            );
            tracing::info!(cohort = cohort.len(), cutoff, "cohort admission from run {previous_id}");
            (Some(cohort.into_iter().map(|c| c.0).collect()), note)
        }
    })
}

impl Coordinator {
    /// Records a request nonce; a nonce seen before (within the signature window) is a replay.
    pub async fn record_nonce(&self, worker: &WorkerId, nonce: &str, timestamp_ms: u64) -> Result<(), ApiError> {
        let inserted = sqlx::query(
            "INSERT INTO nonces (worker, nonce, timestamp_ms) VALUES ($1, $2, $3) ON CONFLICT (worker, nonce) DO NOTHING",
        )
        .bind(worker.hex())
        .bind(nonce)
        .bind(timestamp_ms as i64)
        .execute(&self.db)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ApiError::unauthorized(
                "replayed_request",
                format!("nonce {nonce} was already used by worker {}: a request is accepted once", worker.short()),
            ));
        }
        Ok(())
    }
    pub async fn join(&self, worker: WorkerId, name: &str) -> Result<JoinResponse, ApiError> {
        if let Some(admitted) = &self.admitted {
            if !admitted.contains(&worker) {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "not_admitted",
                    format!("worker {} is not admitted: {}", worker.short(), self.admission_note),
                ));
            }
        }
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        let live = self.live.lock().await;
        let existing =
            sqlx::query("SELECT id FROM workers WHERE id = $1").bind(worker.hex()).fetch_optional(&self.db).await?;
        if existing.is_some() {
            sqlx::query("UPDATE workers SET active = 1, name = $2 WHERE id = $1")
                .bind(worker.hex())
                .bind(&name)
                .execute(&self.db)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO workers (id, name, joined_ms, active, rounds_accepted, bytes_sent, bytes_received) \
                 VALUES ($1, $2, $3, 1, 0, 0, 0)",
            )
            .bind(worker.hex())
            .bind(&name)
            .bind(now_ms())
            .execute(&self.db)
            .await?;
        }
        self.known.lock().expect("known lock").insert(worker, name.clone());
        self.touch(&worker);
        tracing::info!(
            worker = worker.short(),
            name,
            returning = existing.is_some(),
            round = live.round,
            "worker joined"
        );
        self.notify();
        Ok(JoinResponse { worker, round: live.round, returning: existing.is_some() })
    }
    /// A worker leaves on purpose: like being dropped, without waiting for the timeout.
    pub async fn leave(self: &Arc<Self>, worker: WorkerId) -> Result<(), ApiError> {
        let mut live = self.live.lock().await;
        self.drop_worker(&live, &worker, "left").await?;
        self.presence.lock().expect("presence lock").remove(&worker);
        self.maybe_close_round(&mut live).await?;
        Ok(())
    }
    pub fn heartbeat(&self, worker: WorkerId, beat: &Heartbeat) -> HeartbeatResponse {
        {
            let mut presence = self.presence.lock().expect("presence lock");
            let p = presence.entry(worker).or_insert(Presence {
                last_seen: Instant::now(),
                round: None,
                step: 0,
                loss: None,
            });
            p.last_seen = Instant::now();
            p.round = beat.round;
            p.step = beat.step;
            p.loss = beat.loss.filter(|l| l.is_finite());
        }
        HeartbeatResponse {
            round: self.open_round.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }
    /// Periodic duties: drop silent workers, close a round whose deadline has passed.
    pub async fn tick(self: &Arc<Self>) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM nonces WHERE timestamp_ms < $1")
            .bind(now_ms() - 2 * crate::http::MAX_SKEW_MS)
            .execute(&self.db)
            .await?;
        let mut live = self.live.lock().await;
        if live.finished {
            return Ok(());
        }
        let timeout = Duration::from_secs(self.run.rounds.heartbeat_timeout_secs);
        let silent: Vec<WorkerId> = {
            let presence = self.presence.lock().expect("presence lock");
            presence.iter().filter(|(_, p)| p.last_seen.elapsed() > timeout).map(|(id, _)| *id).collect()
        };
        for worker in silent {
            self.drop_worker(&live, &worker, "silent").await?;
            self.presence.lock().expect("presence lock").remove(&worker);
        }
        self.maybe_close_round(&mut live).await
    }
    /// Marks a worker inactive and puts its unfinished data for the open round back in the queue.
    pub(crate) async fn drop_worker(&self, live: &Live, worker: &WorkerId, why: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE workers SET active = 0 WHERE id = $1").bind(worker.hex()).execute(&mut *tx).await?;
        // Under overlap the worker may hold the next round's unit too.
        let released = release_training(&mut tx, live.round, Some(worker)).await?
            + release_training(&mut tx, live.round + 1, Some(worker)).await?;
        tx.commit().await?;
        tracing::warn!(worker = worker.short(), why, round = live.round, released, "worker dropped");
        self.notify();
        Ok(())
    }
}
