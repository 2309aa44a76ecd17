//! Pseudo-gradient uploads: validation against the run's codec, poisoned uploads, durable receipt of an
//! upload (a `submissions` row), and the open round's streaming sum when the run does not verify.

use crate::error::ApiError;
use crate::state::*;
use crate::store::*;
use crate::trust;
use agora_diloco::codec::{self, Accumulator};
use agora_protocol::*;
use anyhow::Result;
use bytes::Bytes;
use sqlx::Row;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Coordinator {
    /// Validates a pseudo-gradient upload for `round` without touching state (runs before taking the lock);
    /// returns its metadata.
    pub fn check_delta(&self, round: u64, body: &[u8]) -> Result<CheckedDelta, ApiError> {
        let expected = self.expected(round);
        let payload = codec::parse(body, expected)?;
        let content_hash =
            self.run.trust.verify.then(|| trust::content_hash(&self.run.compression, expected.specs, &payload));
        Ok(CheckedDelta { metadata: payload.metadata, content_hash })
    }
    /// An upload whose values are not finite (behind a valid checksum) is a poisoned contribution, not a
    /// transmission error: the worker's assignment is rejected (its data goes back to the queue, so the
    /// round need not wait for it) and its reputation reset.
    pub async fn reject_upload(self: &Arc<Self>, worker: WorkerId, round: u64, code: &str) -> Result<(), ApiError> {
        if !self.run.trust.verify {
            return Ok(());
        }
        let mut live = self.live.lock().await;
        if round != live.round || live.finished || live.closing {
            return Ok(());
        }
        match self.assignment_row(round, &worker).await? {
            Some(row) if row.state == "training" => {}
            _ => return Ok(()),
        }
        let mut tx = self.db.begin().await?;
        set_queue_state(&mut tx, "pending", round, Some(&worker), None).await?;
        sqlx::query("UPDATE assignments SET state = 'rejected' WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .execute(&mut *tx)
            .await?;
        update_reputation(&mut tx, &worker, agora_verify::Outcome::Slashed, self.run.trust.reputation_alpha, false)
            .await?;
        self.void_pending(&mut tx, round, &worker).await?;
        tx.commit().await?;
        tracing::warn!(worker = worker.short(), round, code, "poisoned upload: assignment rejected, reputation reset");
        self.notify();
        self.maybe_close_round(&mut live).await
    }
    /// Adds a payload to `sum` off the async runtime. `checked`: this very buffer passed [`Self::check_delta`]
    /// in the same request, so only its structure is parsed again; a payload read back from the blob store is
    /// validated in full.
    pub(crate) async fn add_to_sum(
        self: &Arc<Self>,
        round: u64,
        mut sum: Accumulator,
        body: Bytes,
        checked: bool,
    ) -> Result<Accumulator> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> Result<Accumulator> {
            let expected = me.expected(round);
            let payload = if checked { codec::parse_accepted(&body, expected) } else { codec::parse(&body, expected) }
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sum.add(&payload);
            Ok(sum)
        })
        .await
        .map_err(|e| anyhow::anyhow!("accumulation task failed: {e}"))?
    }
    /// The open round's sum: the live one, or rebuilt from the stored payloads in acceptance order.
    pub(crate) async fn round_sum(self: &Arc<Self>, live: &mut Live) -> Result<Accumulator, ApiError> {
        let rows = sqlx::query("SELECT delta_hash FROM submissions WHERE round = $1 AND applied = 0 ORDER BY seq")
            .bind(live.round as i64)
            .fetch_all(&self.db)
            .await?;
        if let Some(sum) = live.sum.take() {
            if sum.count() == rows.len() {
                return Ok(sum);
            }
            tracing::warn!(round = live.round, held = sum.count(), stored = rows.len(), "rebuilding the round's sum");
        }
        let fragment = self.plan.synced_in(live.round);
        let mut sum = Accumulator::new(self.run.compression, self.fragment_specs[fragment].clone());
        for row in &rows {
            let body = self.blobs.get(&hash_col(row, "delta_hash")?).await?;
            sum = self.add_to_sum(live.round, sum, body, false).await?;
        }
        Ok(sum)
    }

    /// Receives a validated pseudo-gradient for `round`, durably, then closes the round if it is complete.
    /// Received is not accepted: the verdict is the round's judgement, in the worker's receipt.
    pub async fn submit(
        self: &Arc<Self>,
        worker: WorkerId,
        round: u64,
        body: Bytes,
        checked: &CheckedDelta,
    ) -> Result<SubmitResponse, ApiError> {
        let meta = &checked.metadata;
        let mut live = self.live.lock().await;
        self.touch(&worker);
        // A retried upload (the answer to the first was lost, perhaps to a coordinator restart) is
        // answered as received, even if its round has closed since: it was, and it was judged.
        let existing = sqlx::query("SELECT delta_hash, challenge FROM submissions WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .fetch_optional(&self.db)
            .await?;
        if let Some(existing) = existing {
            return Ok(SubmitResponse {
                round,
                delta_hash: hash_col(&existing, "delta_hash")?,
                newly_received: false,
                challenge: existing.try_get::<Option<i64>, _>("challenge")?.map(|c| c as u64),
            });
        }
        if live.finished {
            return Err(ApiError::conflict("run_finished", format!("the run finished after round {}", live.round)));
        }
        if round < live.round || (round == live.round && live.closing) {
            return Err(ApiError::conflict(
                "round_closed",
                format!("round {round} is closed (the run is at round {}); ask for new work", live.round),
            ));
        }
        if round > live.round {
            return Err(ApiError::conflict(
                "wrong_round",
                format!("round {round} is not open; the open round is {}", live.round),
            ));
        }
        let Some(row) = self.assignment_row(round, &worker).await? else {
            return Err(ApiError::conflict("no_assignment", format!("this worker has no assignment in round {round}")));
        };
        match row.state.as_str() {
            "training" => {}
            "released" => {
                return Err(ApiError::conflict(
                    "assignment_released",
                    format!(
                        "this worker's round-{round} data was reassigned (it was dropped or left); ask for new work"
                    ),
                ))
            }
            other => {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "assignment of {} in round {round} is {other:?} but it has no submission",
                    worker.short()
                )))
            }
        }
        let expect = |key: &str, want: String| -> Result<(), ApiError> {
            match meta.get(key) {
                Some(v) if *v == want => Ok(()),
                Some(v) => Err(ApiError::unprocessable(
                    "wrong_metadata",
                    format!("metadata {key} is {v:?}, expected {want:?}"),
                )),
                None => Err(ApiError::unprocessable("wrong_metadata", format!("metadata {key} is missing"))),
            }
        };
        expect(delta_meta::ROUND, round.to_string())?;
        expect(delta_meta::UNIT, agora_protocol::unit_list(&self.data_units(&row.units)))?;
        expect(delta_meta::BASE, live.global_hash.hex())?;
        let train_loss: Option<f64> =
            meta.get(delta_meta::TRAIN_LOSS).and_then(|v| v.parse().ok()).filter(|v: &f64| v.is_finite());
        let segments = self.chain_segments(round);
        let chain = if segments > 0 {
            let hashes = agora_verify::chain::parse_chain(meta, segments)
                .map_err(|e| ApiError::unprocessable("wrong_metadata", e))?;
            Some(agora_verify::chain::chain_to_meta(&hashes))
        } else {
            None
        };
        // With error feedback the worker commits to the residual it started from (the spot check's start link).
        let residual_hash: Option<Hash32> = if segments > 0 && self.run.compression.uses_feedback() {
            let text = meta.get(agora_verify::binding::RESIDUAL_META).ok_or_else(|| {
                ApiError::unprocessable(
                    "wrong_metadata",
                    format!(
                        "metadata {} is missing: this run needs a residual commitment",
                        agora_verify::binding::RESIDUAL_META
                    ),
                )
            })?;
            Some(text.parse().map_err(|e| {
                ApiError::unprocessable(
                    "wrong_metadata",
                    format!("metadata {}: {e}", agora_verify::binding::RESIDUAL_META),
                )
            })?)
        } else {
            None
        };
        let payload_hash = agora_protocol::hash_bytes(&body);
        let challenge = trust::challenge_for(
            self.key.keyed_hash("agora-coordinator v1 spot check", &payload_hash.0),
            self.run.trust.spot_check,
            segments,
        );

        let bytes = body.len() as i64;
        let fp32_bytes =
            4 * self.expected(round).specs.iter().map(|s| s.shape.iter().product::<usize>()).sum::<usize>();
        let hash = self.blobs.put(body.clone()).await?;
        let mut tx = self.db.begin().await?;
        let seq: i64 = sqlx::query("SELECT COUNT(*) AS n FROM submissions WHERE round = $1")
            .bind(round as i64)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        sqlx::query(
            "INSERT INTO submissions (round, worker, epoch, unit, delta_hash, bytes, train_loss, received_ms, applied, seq, \
             fp32_bytes, chain, challenge, spot_check, content_hash, residual_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .bind(row.first().epoch as i64)
        .bind(row.first().unit as i64)
        .bind(hash.hex())
        .bind(bytes)
        .bind_f64(train_loss)
        .bind(now_ms())
        .bind(seq)
        .bind(fp32_bytes as i64)
        .bind(chain)
        .bind(challenge.map(|c| c as i64))
        .bind(challenge.map(|_| "pending"))
        .bind(checked.content_hash.map(|h| h.hex()))
        .bind(residual_hash.map(|h| h.hex()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE assignments SET state = 'submitted' WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .execute(&mut *tx)
            .await?;
        // Delivering ends a run of no-shows.
        sqlx::query("UPDATE workers SET bytes_sent = bytes_sent + $2, no_shows = 0 WHERE id = $1")
            .bind(worker.hex())
            .bind(bytes)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // The sum follows the acceptance order (seq). Any failure here only costs a rebuild at close. A
        // verifying run judges the round's uploads together at close instead.
        let held = live.sum.take().filter(|s| s.count() == seq as usize && !self.run.trust.verify);
        if let Some(sum) = held.or_else(|| {
            (seq == 0 && !self.run.trust.verify).then(|| {
                Accumulator::new(self.run.compression, self.fragment_specs[self.plan.synced_in(round)].clone())
            })
        }) {
            match self.add_to_sum(round, sum, body, true).await {
                Ok(sum) => live.sum = Some(sum),
                Err(e) => {
                    tracing::error!("could not add an accepted payload to the round's sum (rebuilt at close): {e:#}")
                }
            }
        }
        self.metrics.uploads_received.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            worker = worker.short(),
            round,
            unit = row.first().unit,
            units = row.units.len(),
            bytes,
            train_loss,
            "pseudo-gradient received"
        );
        self.notify();
        self.maybe_close_round(&mut live).await?;
        Ok(SubmitResponse { round, delta_hash: hash, newly_received: true, challenge })
    }
}
