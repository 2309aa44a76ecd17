//! Closing a round: when (`core::liveness`), judging its uploads, the outer step, and the one transaction
//! that commits it.

use crate::core::liveness::{decide_close, CloseDecision, NoShowPolicy, RoundView};
use crate::error::ApiError;
use crate::state::*;
use crate::store::*;
use crate::trust;
use agora_diloco::codec;
use agora_diloco::tensors::{from_named, load_weights, to_named};
use agora_diloco::OuterOptimizer;
use agora_model::Llama;
use agora_protocol::*;
use anyhow::{Context, Result};
use bytes::Bytes;
use sqlx::Row;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// What the outer step computes off the async runtime: the new global weights, momentum and val loss.
pub(crate) struct OuterStepOutput {
    global_bytes: Vec<u8>,
    momentum_bytes: Option<Vec<u8>>,
    val_loss: Option<f64>,
}

/// One upload of a round being closed, in acceptance order.
pub(crate) struct SubmissionRow {
    pub(crate) worker: WorkerId,
    pub(crate) delta_hash: Hash32,
    pub(crate) train_loss: Option<f64>,
    /// Its spot check passed (a verified round, for probation).
    pub(crate) verified: bool,
}

impl Coordinator {
    /// Closes the open round when `core::liveness` says so.
    pub(crate) async fn maybe_close_round(self: &Arc<Self>, live: &mut Live) -> Result<(), ApiError> {
        if live.finished || live.closing {
            return Ok(());
        }
        let round = live.round as i64;
        let training: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM assignments WHERE round = $1 AND state = 'training'")
                .bind(round)
                .fetch_one(&self.db)
                .await?
                .try_get("n")?;
        let mut view = RoundView {
            opened_ms: live.opened_ms.max(0) as u64,
            deadline_ms: self.deadline_ms(live).max(0) as u64,
            min_workers: self.run.rounds.min_workers,
            training: training as u64,
            ..RoundView::default()
        };
        for row in sqlx::query("SELECT received_ms, spot_check FROM submissions WHERE round = $1 AND applied = 0")
            .bind(round)
            .fetch_all(&self.db)
            .await?
        {
            let received = row.try_get::<i64, _>("received_ms")?.max(0) as u64;
            view.uploads_ms.push(received);
            match row.try_get::<Option<String>, _>("spot_check")?.as_deref() {
                Some("pending") => view.proofs_awaited_ms.push(received),
                Some("verifying") => view.proofs_verifying += 1,
                _ => {}
            }
        }
        let now = crate::clock::now_ms();
        if decide_close(&view, now, self.run.rounds.grace_fraction) == CloseDecision::Close {
            // The heavy part (judging, the outer step, evaluation) runs in its own task without the lock, so
            // status, metrics, heartbeats and the request that triggered the close are not held up by it.
            live.closing = true;
            let snapshot = Live {
                round: live.round,
                opened_ms: live.opened_ms,
                global_hash: live.global_hash,
                momentum_hash: live.momentum_hash,
                finished: live.finished,
                sum: live.sum.take(),
                closing: true,
            };
            let me = self.clone();
            tokio::spawn(async move {
                let round = snapshot.round;
                if let Err(e) = me.close_round(snapshot).await {
                    tracing::error!(round, "closing the round failed (retried at the next tick): {}", e.message);
                    me.live.lock().await.closing = false;
                }
            });
        }
        Ok(())
    }

    /// A stored payload's hash and where its sections lie (from its header alone).
    async fn stored_payload(&self, hash: &Hash32) -> Result<trust::StoredPayload, ApiError> {
        let header = self.blobs.get_range(hash, 0..codec::HEADER_LEN).await?;
        let metadata_len = codec::header_metadata_len(&header)
            .with_context(|| format!("stored payload {hash} has no agora header"))?;
        Ok(trust::StoredPayload { hash: *hash, metadata_len })
    }

    /// Judges the open round's uploads (verifying runs): loads them in acceptance order with what each
    /// verdict needs, then decodes, compares, scores and aggregates off the async runtime.
    pub(crate) async fn judge(
        self: &Arc<Self>,
        live: &Live,
    ) -> Result<(Vec<SubmissionRow>, trust::RoundJudgement), ApiError> {
        let round = live.round;
        let rows = sqlx::query(
            "SELECT worker, delta_hash, train_loss, spot_check, content_hash FROM submissions \
             WHERE round = $1 AND applied = 0 ORDER BY seq",
        )
        .bind(round as i64)
        .fetch_all(&self.db)
        .await?;
        let mut subs = Vec::with_capacity(rows.len());
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let sub = SubmissionRow {
                worker: worker_col(row, "worker")?,
                delta_hash: hash_col(row, "delta_hash")?,
                train_loss: row.try_get("train_loss")?,
                verified: row.try_get::<Option<String>, _>("spot_check")?.as_deref() == Some("passed"),
            };
            let content: Option<String> = row.try_get("content_hash")?;
            let replayed = match &content {
                Some(c) => {
                    sqlx::query("SELECT 1 AS one FROM submissions WHERE content_hash = $1 AND round < $2 LIMIT 1")
                        .bind(c)
                        .bind(round as i64)
                        .fetch_optional(&self.db)
                        .await?
                        .is_some()
                }
                None => false,
            };
            candidates.push(trust::Candidate {
                worker: sub.worker,
                payload: self.stored_payload(&sub.delta_hash).await?,
                units: self.assignment_unit_blobs(round, &sub.worker).await?,
                spot_check: row.try_get("spot_check")?,
                replayed,
            });
            subs.push(sub);
        }
        // The same fragment's accepted pseudo-gradients of its previous round: a near-copy is a replay.
        let fragments = self.plan.count() as u64;
        let mut previous = Vec::new();
        if round >= fragments {
            for row in
                sqlx::query("SELECT delta_hash FROM submissions WHERE round = $1 AND verdict = 'accepted' ORDER BY seq")
                    .bind((round - fragments) as i64)
                    .fetch_all(&self.db)
                    .await?
            {
                previous.push(self.stored_payload(&hash_col(&row, "delta_hash")?).await?);
            }
        }
        let global = self.blobs.get(&live.global_hash).await?;
        let me = self.clone();
        let seed = u64::from_le_bytes(
            self.key.keyed_hash("agora-coordinator v1 score batches", &round.to_le_bytes())[..8].try_into().expect("8"),
        );
        let timer = Instant::now();
        // Judging reads the stored payloads one tensor at a time (and each whole payload once, alone), so
        // its memory is O(model + uploads × largest tensor), not O(uploads × model).
        let (handle, blobs) = (tokio::runtime::Handle::current(), self.blobs.clone());
        let judgement = tokio::task::spawn_blocking(move || -> Result<trust::RoundJudgement> {
            let read = |hash: &Hash32, range: Option<std::ops::Range<usize>>| -> Result<Bytes> {
                handle.block_on(async {
                    match range {
                        Some(r) => blobs.get_range(hash, r).await,
                        None => blobs.get(hash).await,
                    }
                })
            };
            let theta = from_named(&decode_tensors(&global, Some(&me.specs))?.0, Device::Cpu);
            let fragment = me.plan.synced_in(round);
            let fragment_tensors = me.plan.tensors(fragment);
            let mut ctx = trust::JudgeContext {
                trust: &me.run.trust,
                compression: &me.run.compression,
                model: &me.model_config,
                specs: &me.specs,
                fragment,
                fragment_tensors: &fragment_tensors,
                global: &theta,
                val: &me.val,
                seq_len: me.run.inner.seq_len,
                batch_size: me.run.inner.batch_size,
                inner_steps: me.rounds.steps(round),
                seed,
                previous: &[],
                read: &read,
            };
            ctx.previous = &previous;
            trust::judge_round(&ctx, &candidates)
        })
        .await
        .map_err(|e| anyhow::anyhow!("judging task failed: {e}"))??;
        self.metrics.judge_ms.fetch_add(timer.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok((subs, judgement))
    }
    /// The outer step: the round's pseudo-gradients combined (verifying runs: judged, and only the
    /// accepted ones aggregated by the run's rule; otherwise their mean, summed in acceptance order, so a
    /// replay after a crash computes the same bits), the outer optimizer on the fragment the round
    /// synchronises, the new global weights and momentum published as blobs, then the round committed in
    /// one transaction (with, when verifying, its receipts, their Merkle root, credits and reputations).
    pub(crate) async fn close_round(self: &Arc<Self>, mut snapshot: Live) -> Result<(), ApiError> {
        let live = &mut snapshot;
        let round = live.round;
        let started = Instant::now();
        let (subs, mean, judged) = if self.run.trust.verify {
            let (subs, judgement) = self.judge(live).await?;
            (subs, judgement.aggregate.clone(), Some(judgement))
        } else {
            let rows = sqlx::query(
                "SELECT worker, delta_hash, train_loss FROM submissions WHERE round = $1 AND applied = 0 ORDER BY seq",
            )
            .bind(round as i64)
            .fetch_all(&self.db)
            .await?;
            let subs = rows
                .iter()
                .map(|row| {
                    Ok(SubmissionRow {
                        worker: worker_col(row, "worker")?,
                        delta_hash: hash_col(row, "delta_hash")?,
                        train_loss: row.try_get("train_loss")?,
                        verified: false,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let sum = self.round_sum(live).await?;
            assert_eq!(sum.count(), subs.len(), "the sum holds every accepted payload of the round");
            (subs, Some(sum.mean()), None)
        };
        let verdict_of = |i: usize| judged.as_ref().map_or(trust::ACCEPTED, |j| j.judgements[i].verdict);
        let accepted: Vec<usize> = (0..subs.len()).filter(|&i| verdict_of(i) == trust::ACCEPTED).collect();
        let losses: Vec<f64> = accepted.iter().filter_map(|&i| subs[i].train_loss).collect();
        let global = self.blobs.get(&live.global_hash).await?;
        let momentum = match &live.momentum_hash {
            Some(h) => Some(self.blobs.get(h).await?),
            None => None,
        };
        let next = round + 1;
        let tokens_now = self.run.tokens_per_steps(self.rounds.steps(round)) * accepted.len() as u64;
        let finished = self.run.is_finished(next, self.tokens_applied().await? + tokens_now);
        let evaluate = next.is_multiple_of(self.run.eval.every_rounds) || finished;
        let (specs, outer, config, val) =
            (self.specs.clone(), self.run.outer, self.model_config.clone(), self.val.clone());
        let stepped = self.plan.tensors(self.plan.synced_in(round));
        // The outer schedule spans the planned rounds (a token budget's at `min_workers` units a round).
        let (outer_lr, outer_momentum) = outer.step_at(round, self.run.planned_rounds(), accepted.len(), finished);
        let (seq, batch, eval_batches) = (self.run.inner.seq_len, self.run.inner.batch_size, self.run.eval.batches);
        let OuterStepOutput { global_bytes, momentum_bytes, val_loss } =
            tokio::task::spawn_blocking(move || -> Result<OuterStepOutput> {
                let decode = |b: &[u8]| -> Result<Vec<tch::Tensor>> {
                    Ok(from_named(&decode_tensors(b, Some(&specs))?.0, Device::Cpu))
                };
                let theta = decode(&global)?;
                let mut optimizer = match &momentum {
                    Some(m) => OuterOptimizer::with_momentum(outer, decode(m)?),
                    None => OuterOptimizer::new(outer, &theta),
                };
                // Nothing accepted: the weights and momentum stay as they are.
                if let Some(mean) = &mean {
                    optimizer.step_subset(&stepped, &theta, &from_named(mean, Device::Cpu), outer_lr, outer_momentum);
                }
                let global_bytes = encode_tensors(&to_named(&specs, &theta), &round_meta(next));
                let momentum_bytes = outer
                    .has_state()
                    .then(|| encode_tensors(&to_named(&specs, &optimizer.momentum), &round_meta(next)));
                let val_loss = if evaluate {
                    let model = Llama::zeros(&config, Device::Cpu);
                    load_weights(&model, &theta);
                    Some(agora_train::evaluate(&model, &val, seq, batch, eval_batches)?)
                } else {
                    None
                };
                Ok(OuterStepOutput { global_bytes, momentum_bytes, val_loss })
            })
            .await
            .map_err(|e| anyhow::anyhow!("outer step task failed: {e}"))??;
        let global_hash = self.blobs.put(Bytes::from(global_bytes)).await?;
        let momentum_hash = match momentum_bytes {
            Some(b) => Some(self.blobs.put(Bytes::from(b)).await?),
            None => None,
        };
        let train_loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        let now = now_ms();

        // The commit itself: under the lock, in one transaction.
        let mut live = self.live.lock().await;
        assert!(live.closing && live.round == round, "one close at a time, of the open round");
        let mut tx = self.db.begin().await?;
        if let Some(judged) = &judged {
            self.settle(&mut tx, round, &subs, judged).await?;
        }
        sqlx::query("UPDATE rounds SET closed_ms = $2, contributions = $3, train_loss = $4 WHERE round = $1")
            .bind(round as i64)
            .bind(now)
            .bind(accepted.len() as i64)
            .bind_f64(train_loss)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE submissions SET applied = 1 WHERE round = $1 AND applied = 0")
            .bind(round as i64)
            .execute(&mut *tx)
            .await?;
        set_queue_state(&mut tx, "done", round, None, Some("submitted")).await?;
        sqlx::query("UPDATE assignments SET state = 'applied' WHERE round = $1 AND state = 'submitted'")
            .bind(round as i64)
            .execute(&mut *tx)
            .await?;
        self.record_no_shows(&mut tx, round).await?;
        let late = release_training(&mut tx, round, None).await?;
        for &i in &accepted {
            sqlx::query("UPDATE workers SET rounds_accepted = rounds_accepted + 1 WHERE id = $1")
                .bind(subs[i].worker.hex())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO rounds (round, global_hash, momentum_hash, opened_ms, closed_ms, contributions, train_loss, val_loss) \
             VALUES ($1, $2, $3, $4, NULL, 0, NULL, $5)",
        )
        .bind(next as i64)
        .bind(global_hash.hex())
        .bind(momentum_hash.map(|h| h.hex()))
        .bind(now)
        .bind_f64(val_loss)
        .execute(&mut *tx)
        .await?;
        if finished {
            sqlx::query("UPDATE run SET finished = 1").execute(&mut *tx).await?;
        }
        for (name, value) in self.metrics.snapshot() {
            sqlx::query(
                "INSERT INTO counters (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        *live = Live { round: next, opened_ms: now, global_hash, momentum_hash, finished, sum: None, closing: false };
        self.open_round.store(next, Ordering::Relaxed);
        self.finished.store(finished, Ordering::Relaxed);
        tracing::info!(
            round,
            contributions = accepted.len(),
            rejected = subs.len() - accepted.len(),
            released_late = late,
            train_loss,
            val_loss,
            secs = started.elapsed().as_secs_f64(),
            finished,
            "round closed: outer step committed"
        );
        self.notify();
        Ok(())
    }

    /// Workers still training when the round closes held a unit without delivering it: each such no-show
    /// scores 0 in the identity's reputation, and a run of them benches it (`core::liveness`).
    async fn record_no_shows(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>, round: u64) -> Result<(), ApiError> {
        let policy = NoShowPolicy::default();
        let rows = sqlx::query(
            "SELECT a.worker, w.no_shows FROM assignments a JOIN workers w ON w.id = a.worker \
             WHERE a.round = $1 AND a.state = 'training'",
        )
        .bind(round as i64)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let worker = worker_col(&row, "worker")?;
            let no_shows = row.try_get::<i64, _>("no_shows")?.max(0) as u64 + 1;
            let until = policy.benched_until(round, no_shows);
            sqlx::query("UPDATE workers SET no_shows = $2, benched_until = $3 WHERE id = $1")
                .bind(worker.hex())
                .bind(no_shows as i64)
                .bind(until as i64)
                .execute(&mut **tx)
                .await?;
            if self.run.trust.verify {
                update_reputation(
                    tx,
                    &worker,
                    agora_verify::Outcome::Scored(0.0),
                    self.run.trust.reputation_alpha,
                    false,
                )
                .await?;
            }
            tracing::warn!(
                worker = worker.short(),
                round,
                no_shows,
                benched_until = until,
                "no-show: held work, delivered nothing"
            );
        }
        Ok(())
    }
}
