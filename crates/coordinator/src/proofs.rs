//! Spot checks: a challenged upload's proof, checked against the worker's commitment and re-run.

use crate::error::ApiError;
use crate::state::*;
use crate::store::hash_col;
use crate::trust;
use agora_data::Shard;
use agora_diloco::tensors::from_named;
use agora_protocol::*;
use agora_verify::binding;
use agora_verify::chain::{self, Merge};
use anyhow::Result;
use bytes::Bytes;
use sqlx::Row;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

impl Coordinator {
    /// Largest proof upload: four training states (weights and both AdamW moments) and a residual, framed.
    pub fn max_proof_bytes(&self) -> u64 {
        let elements: usize = self.specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        4 * (3 * 4 * elements as u64 + 64 * 1024 * 3 + 16) + (4 * elements as u64 + 64 * 1024 + 8) + 4
    }

    /// A spot-check answer: the states at boundaries 0, j, j + 1 and S of the challenged segment j, and (with
    /// error feedback) the residual the round started from. They must hash to the commitment; the start
    /// must be the round's global weights minus that residual, the upload the compression of the global
    /// weights minus the end, and re-running segment j from its start must reproduce its end
    /// (`agora_verify::binding`, `agora_verify::chain`).
    pub async fn proof(self: &Arc<Self>, worker: WorkerId, round: u64, body: Bytes) -> Result<ProofResponse, ApiError> {
        let row = sqlx::query(
            "SELECT s.chain, s.challenge, s.spot_check, s.delta_hash, s.residual_hash, r.global_hash \
             FROM submissions s JOIN rounds r ON r.round = s.round WHERE s.round = $1 AND s.worker = $2",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .fetch_optional(&self.db)
        .await?
        .ok_or_else(|| {
            ApiError::conflict("no_submission", format!("this worker has no submission in round {round}"))
        })?;
        let Some(segment) = row.try_get::<Option<i64>, _>("challenge")?.map(|c| c as u64) else {
            return Err(ApiError::conflict("not_challenged", format!("round {round}'s submission was not challenged")));
        };
        let state: Option<String> = row.try_get("spot_check")?;
        if state.as_deref() != Some("pending") {
            // Answered before (a retry): the verdict stands.
            return Ok(ProofResponse { round, segment, spot_check: state.unwrap_or_default() });
        }
        let chain: String = row.try_get::<Option<String>, _>("chain")?.unwrap_or_default();
        let hashes: Vec<Hash32> = chain.split(',').filter_map(|h| h.parse().ok()).collect();
        let proof = binding::parse_proof(&body).map_err(|e| ApiError::bad_request("malformed_proof", e))?;
        let segments = self.chain_segments(round);
        let needed = binding::proof_boundaries(segment, segments);
        let committed = |k: u64| hashes.get(k as usize).copied();
        let matches = proof.states.len() == needed.len()
            && needed.iter().all(
                |&k| matches!((proof.state(k), committed(k)), (Some(s), Some(c)) if agora_protocol::hash_bytes(s) == c),
            );
        let verdict = if !matches {
            format!("failed: the states sent are not the ones committed to (boundaries {needed:?} are needed)")
        } else {
            // Claim the check, so that the round's close waits for its verdict (`core::liveness`) instead of
            // judging the upload unanswered while it is being re-run.
            let claimed = {
                let live = self.live.lock().await;
                if live.closing && live.round == round {
                    // Judged as it stands: the close decided before this proof arrived.
                    0
                } else {
                    sqlx::query(
                        "UPDATE submissions SET spot_check = 'verifying' WHERE round = $1 AND worker = $2 AND spot_check = 'pending'",
                    )
                    .bind(round as i64)
                    .bind(worker.hex())
                    .execute(&self.db)
                    .await?
                    .rows_affected()
                }
            };
            if claimed == 0 {
                // Answered meanwhile (a concurrent retry), or the round closed first: that state stands.
                let state: Option<String> =
                    sqlx::query("SELECT spot_check FROM submissions WHERE round = $1 AND worker = $2")
                        .bind(round as i64)
                        .bind(worker.hex())
                        .fetch_one(&self.db)
                        .await?
                        .try_get("spot_check")?;
                return Ok(ProofResponse { round, segment, spot_check: state.unwrap_or_default() });
            }
            let timer = Instant::now();
            let mut parts = Vec::new();
            for hash in self.assignment_unit_blobs(round, &worker).await? {
                parts.push(Shard::from_bytes(&self.blobs.get(&hash).await?)?);
            }
            let unit = Shard::concat(&parts)?;
            let global = self.blobs.get(&hash_col(&row, "global_hash")?).await?;
            let payload = self.blobs.get(&hash_col(&row, "delta_hash")?).await?;
            let residual_hash: Option<Hash32> =
                row.try_get::<Option<String>, _>("residual_hash")?.and_then(|h| h.parse().ok());
            let me = self.clone();
            let (first_step, steps) = (self.rounds.first_step(round), self.rounds.steps(round));
            let tolerance = self.run.trust.tolerance;
            let verdict = tokio::task::spawn_blocking(move || -> Result<String> {
                let theta = from_named(&decode_tensors(&global, Some(&me.specs))?.0, Device::Cpu);
                let fragment = me.plan.synced_in(round);
                let fragment_tensors = me.plan.tensors(fragment);
                let links = binding::Round {
                    compression: &me.run.compression,
                    specs: &me.specs,
                    fragment,
                    fragment_tensors: &fragment_tensors,
                    global: &theta,
                };
                let state = |k: u64| proof.state(k).expect("every needed boundary was matched");
                if let Err(why) = binding::check_start(&links, state(0), &proof.residual, residual_hash) {
                    return Ok(format!("failed: start link: {why}"));
                }
                if let Err(why) = binding::check_end(&links, state(segments), &payload) {
                    return Ok(format!("failed: end link: {why}"));
                }
                // Under overlap every round after the first applies the previous round's late update to its
                // fragment at τ: this round's global weights minus the chain's start (`SyncState::merge_late`).
                let merging = me.run.compression.overlap().is_on() && round > 0;
                let start = if merging {
                    match chain::decode_state(state(0), &me.specs) {
                        Ok(s) => from_named(&s.weights, Device::Cpu),
                        Err(e) => return Ok(format!("failed: start state: {e:#}")),
                    }
                } else {
                    Vec::new()
                };
                let merge = merging.then(|| Merge {
                    at: me.run.compression.overlap_steps,
                    alpha: me.run.compression.merge,
                    global: &theta,
                    start: &start,
                    tensors: me.plan.tensors(me.plan.synced_in(round - 1)),
                });
                let check = trust::run_spot_check(
                    &me.model_config,
                    &me.run.train_config(),
                    &me.specs,
                    &unit,
                    first_step,
                    steps,
                    &me.chain_bounds(round),
                    segment,
                    merge,
                    state(segment),
                    state(segment + 1),
                    tolerance,
                );
                // A state that does not even decode is a failed proof, not a coordinator error.
                Ok(check.unwrap_or_else(|e| format!("failed: {e:#}")))
            })
            .await
            .map_err(|e| anyhow::anyhow!("spot-check task failed: {e}"))??;
            self.metrics.spot_check_ms.fetch_add(timer.elapsed().as_millis() as u64, Ordering::Relaxed);
            verdict
        };
        let mut live = self.live.lock().await;
        sqlx::query(
            "UPDATE submissions SET spot_check = $3 WHERE round = $1 AND worker = $2 \
             AND spot_check IN ('pending', 'verifying')",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .bind(&verdict)
        .execute(&self.db)
        .await?;
        if verdict != "passed" {
            self.metrics.reject("spot_check_failed");
        }
        tracing::info!(worker = worker.short(), round, segment, verdict, "spot check");
        self.notify();
        if round == live.round {
            self.maybe_close_round(&mut live).await?;
        }
        Ok(ProofResponse { round, segment, spot_check: verdict })
    }
}
