//! Read-only views of the run: status, judgements, leaderboard, ledger and statements, contributions,
//! blobs and metrics gauges.

use crate::error::ApiError;
use crate::metrics::Gauges;
use crate::state::*;
use crate::store::*;
use agora_protocol::*;
use anyhow::{Context, Result};
use bytes::Bytes;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

impl Coordinator {
    /// Every judged upload, in round and acceptance order.
    pub async fn judgements(&self) -> Result<Vec<JudgedSubmission>, ApiError> {
        sqlx::query(
            "SELECT round, worker, delta_hash, verdict, score, credits, gain_random, gain_assigned, similarity, spot_check \
             FROM submissions WHERE verdict IS NOT NULL ORDER BY round, seq",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| {
            Ok(JudgedSubmission {
                round: r.try_get::<i64, _>("round")? as u64,
                worker: worker_col(r, "worker")?,
                delta_hash: hash_col(r, "delta_hash")?,
                verdict: r.try_get("verdict")?,
                score: r.try_get::<Option<f64>, _>("score")?.unwrap_or(0.0),
                credits: r.try_get::<Option<i64>, _>("credits")?.unwrap_or(0) as u64,
                gain_random: r.try_get("gain_random")?,
                gain_assigned: r.try_get("gain_assigned")?,
                similarity: r.try_get("similarity")?,
                spot_check: r.try_get("spot_check")?,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map_err(ApiError::from)
    }
    /// Every worker's posted (`worker:`) and vesting (`pending:`) balance (micro-credits), by account name.
    pub(crate) async fn worker_credits(&self) -> Result<HashMap<String, i64>, ApiError> {
        sqlx::query(
            "SELECT account, CAST(SUM(amount) AS BIGINT) AS balance FROM ledger \
             WHERE account LIKE 'worker:%' OR account LIKE 'pending:%' GROUP BY account",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>("account")?, r.try_get::<i64, _>("balance")?)))
        .collect::<Result<_>>()
        .map_err(ApiError::from)
    }
    /// Identities by reputation, best first.
    pub async fn leaderboard(&self) -> Result<Vec<LeaderboardEntry>, ApiError> {
        let names = self.known.lock().expect("known lock").clone();
        let credits = self.worker_credits().await?;
        let rows = sqlx::query(
            "SELECT worker, rating, accepted, rejected FROM reputation ORDER BY rating DESC, accepted DESC, worker",
        )
        .fetch_all(&self.db)
        .await?;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let worker = worker_col(r, "worker")?;
                Ok(LeaderboardEntry {
                    rank: i as u64 + 1,
                    worker,
                    name: names.get(&worker).cloned().unwrap_or_default(),
                    rating: r.try_get("rating")?,
                    accepted: r.try_get::<i64, _>("accepted")? as u64,
                    rejected: r.try_get::<i64, _>("rejected")? as u64,
                    credits: credits.get(&agora_ledger::worker_account(&worker)).copied().unwrap_or(0).max(0) as u64,
                    pending_credits: credits.get(&agora_ledger::pending_account(&worker)).copied().unwrap_or(0).max(0)
                        as u64,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }
    pub(crate) async fn roots(&self) -> Result<Vec<agora_ledger::RoundRoot>, ApiError> {
        sqlx::query("SELECT signed FROM round_roots ORDER BY round")
            .fetch_all(&self.db)
            .await?
            .iter()
            .map(|r| Ok(serde_json::from_str(&r.try_get::<String, _>("signed")?)?))
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }
    /// Every account's balance and every round's signed root.
    pub async fn ledger_report(&self) -> Result<LedgerReport, ApiError> {
        let balances = sqlx::query(
            "SELECT account, CAST(SUM(amount) AS BIGINT) AS balance FROM ledger GROUP BY account ORDER BY account",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>("account")?, r.try_get::<i64, _>("balance")?)))
        .collect::<Result<Vec<_>>>()?;
        let entries: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ledger").fetch_one(&self.db).await?.try_get("n")?;
        let roots = self
            .roots()
            .await?
            .into_iter()
            .map(|r| serde_json::to_value(r).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
        Ok(LedgerReport {
            run_id: self.run_id.clone(),
            coordinator: self.key.id(),
            balances,
            entries: entries as u64,
            roots,
        })
    }
    /// One worker's receipts with their inclusion proofs, and the signed roots they lead to: everything
    /// `agora ledger verify` needs to check the worker's credits offline.
    pub async fn worker_statement(&self, worker: &WorkerId) -> Result<agora_ledger::WorkerStatement, ApiError> {
        let mine = sqlx::query("SELECT round FROM receipts WHERE worker = $1 ORDER BY round")
            .bind(worker.hex())
            .fetch_all(&self.db)
            .await?;
        let mut receipts = Vec::with_capacity(mine.len());
        for r in &mine {
            let round = r.try_get::<i64, _>("round")? as u64;
            receipts.push(self.proven_receipt(round, worker).await?.context("the worker's receipt")?);
        }
        let rounds: HashSet<u64> = receipts.iter().map(|r| r.receipt.receipt.round).collect();
        let roots = self.roots().await?.into_iter().filter(|r| rounds.contains(&r.round)).collect();
        let balance = receipts.iter().map(|r| r.receipt.receipt.credits).sum();
        Ok(agora_ledger::WorkerStatement {
            run_id: self.run_id.clone(),
            coordinator: self.key.id(),
            worker: *worker,
            balance,
            roots,
            receipts,
        })
    }

    /// `worker`'s signed receipt of `round` with its inclusion proof under the round's root (None: it has
    /// no receipt in that round).
    async fn proven_receipt(
        &self,
        round: u64,
        worker: &WorkerId,
    ) -> Result<Option<agora_ledger::ProvenReceipt>, ApiError> {
        let all: Vec<(String, agora_ledger::SignedReceipt)> =
            sqlx::query("SELECT worker, receipt FROM receipts WHERE round = $1 ORDER BY position")
                .bind(round as i64)
                .fetch_all(&self.db)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("worker")?, serde_json::from_str(&r.try_get::<String, _>("receipt")?)?)))
                .collect::<Result<_>>()?;
        let Some(index) = all.iter().position(|(w, _)| *w == worker.hex()) else {
            return Ok(None);
        };
        let leaves: Vec<[u8; 32]> = all.iter().map(|(_, s)| s.receipt.digest()).collect();
        let proof = agora_ledger::inclusion_proof(&leaves, index).context("an inclusion proof")?;
        Ok(Some(agora_ledger::ProvenReceipt { receipt: all[index].1.clone(), proof }))
    }

    /// `worker`'s judged upload of `round`: its signed receipt with the inclusion proof under the round's
    /// signed root (what the worker needs to learn and check its verdict), or why there is none yet.
    pub async fn round_receipt(&self, round: u64, worker: &WorkerId) -> Result<ReceiptResponse, ApiError> {
        if round >= self.open_round.load(Ordering::Relaxed) && !self.finished.load(Ordering::Relaxed) {
            return Ok(ReceiptResponse::Pending { round });
        }
        let Some(proven) = self.proven_receipt(round, worker).await? else {
            let reason = if self.run.trust.verify {
                format!(
                    "round {round} closed without an upload of worker {} (late, released or never sent)",
                    worker.short()
                )
            } else {
                "this run does not verify uploads: nothing is judged or credited".to_string()
            };
            return Ok(ReceiptResponse::NotJudged { round, reason });
        };
        let root = self.roots().await?.into_iter().find(|r| r.round == round).context("the round's signed root")?;
        Ok(ReceiptResponse::Judged {
            receipt: serde_json::to_value(&proven.receipt).map_err(anyhow::Error::from)?,
            proof: serde_json::to_value(&proven.proof).map_err(anyhow::Error::from)?,
            root: serde_json::to_value(&root).map_err(anyhow::Error::from)?,
        })
    }

    pub async fn blob(&self, hash: &Hash32, worker: Option<WorkerId>) -> Result<Bytes, ApiError> {
        if !self.blobs.contains(hash).await {
            return Err(ApiError::not_found("unknown_blob", format!("no blob {hash}")));
        }
        let bytes = self.blobs.get(hash).await?;
        self.metrics.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(worker) = worker {
            self.touch(&worker);
            sqlx::query("UPDATE workers SET bytes_received = bytes_received + $2 WHERE id = $1")
                .bind(worker.hex())
                .bind(bytes.len() as i64)
                .execute(&self.db)
                .await?;
        }
        Ok(bytes)
    }
    pub async fn status(&self) -> Result<StatusReport, ApiError> {
        let (round, finished, global_hash, opened_ms, deadline) = {
            let live = self.live.lock().await;
            (live.round, live.finished, live.global_hash, live.opened_ms, self.deadline_ms(&live))
        };
        let history = sqlx::query(
            "SELECT r.round, r.contributions, r.train_loss, r.val_loss, r.global_hash, \
                    CAST(COALESCE(SUM(s.bytes), 0) AS BIGINT) AS bytes, \
                    CAST(COALESCE(SUM(s.fp32_bytes), 0) AS BIGINT) AS fp32_bytes \
             FROM rounds r LEFT JOIN submissions s ON s.round = r.round AND s.applied = 1 \
             GROUP BY r.round, r.contributions, r.train_loss, r.val_loss, r.global_hash ORDER BY r.round",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| {
            Ok(RoundSummary {
                round: r.try_get::<i64, _>("round")? as u64,
                contributions: r.try_get::<i64, _>("contributions")? as u64,
                train_loss: r.try_get("train_loss")?,
                val_loss: r.try_get("val_loss")?,
                global_hash: hash_col(r, "global_hash")?,
                delta_bytes: r.try_get::<i64, _>("bytes")? as u64,
                fp32_bytes: r.try_get::<i64, _>("fp32_bytes")? as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let assigned: HashMap<String, (String, u64, u64)> =
            sqlx::query("SELECT worker, state, epoch, unit FROM assignments WHERE round = $1")
                .bind(round as i64)
                .fetch_all(&self.db)
                .await?
                .iter()
                .map(|r| {
                    let (epoch, unit): (i64, i64) = (r.try_get("epoch")?, r.try_get("unit")?);
                    Ok((r.try_get("worker")?, (r.try_get("state")?, epoch as u64, unit as u64)))
                })
                .collect::<Result<_>>()?;
        let presence = self.presence.lock().expect("presence lock").clone();
        let rejected: HashMap<String, i64> = sqlx::query(
            "SELECT worker, CAST(COUNT(*) AS BIGINT) AS n FROM submissions WHERE applied = 2 GROUP BY worker",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("worker")?, r.try_get("n")?)))
        .collect::<Result<_>>()?;
        let credits = self.worker_credits().await?;
        let mut workers = Vec::new();
        for r in sqlx::query(
            "SELECT id, name, active, rounds_accepted, bytes_sent, bytes_received FROM workers ORDER BY joined_ms, id",
        )
        .fetch_all(&self.db)
        .await?
        {
            let id = worker_col(&r, "id")?;
            let active = r.try_get::<i64, _>("active")? != 0;
            let p = presence.get(&id);
            let state = if !active {
                "dropped"
            } else {
                match assigned.get(&id.hex()).map(|a| a.0.as_str()) {
                    Some("training") => "training",
                    Some("submitted") | Some("applied") => "submitted",
                    _ => "idle",
                }
            };
            workers.push(WorkerStatus {
                id,
                name: r.try_get("name")?,
                state: state.to_string(),
                active,
                assignment: assigned.get(&id.hex()).filter(|a| a.0 != "released").map(|a| (a.1, a.2)),
                inner_step: p.filter(|p| p.round == Some(round)).map_or(0, |p| p.step),
                last_loss: p.and_then(|p| p.loss),
                last_seen_ms_ago: p.map_or(u64::MAX, |p| p.last_seen.elapsed().as_millis() as u64),
                rounds_accepted: r.try_get::<i64, _>("rounds_accepted")? as u64,
                rounds_rejected: rejected.get(&id.hex()).copied().unwrap_or(0) as u64,
                credits: credits.get(&agora_ledger::worker_account(&id)).copied().unwrap_or(0).max(0) as u64,
                pending_credits: credits.get(&agora_ledger::pending_account(&id)).copied().unwrap_or(0).max(0) as u64,
                bytes_sent: r.try_get::<i64, _>("bytes_sent")? as u64,
                bytes_received: r.try_get::<i64, _>("bytes_received")? as u64,
            });
        }
        let tokens_trained = self.tokens_applied().await?;
        let counters = self.metrics.snapshot();
        Ok(StatusReport {
            run_id: self.run_id.clone(),
            round,
            rounds: self.run.planned_rounds(),
            finished,
            global_hash,
            round_opened_unix_ms: opened_ms as u64,
            round_deadline_unix_ms: deadline as u64,
            submissions_this_round: assigned.values().filter(|a| a.0 == "submitted").count() as u64,
            tokens_trained,
            codec: self.run.compression.describe(),
            workers,
            history,
            counters,
        })
    }
    pub async fn contributions(&self) -> Result<Vec<Contribution>, ApiError> {
        let rows = sqlx::query(
            "SELECT round, worker, delta_hash, bytes FROM submissions WHERE applied = 1 ORDER BY round, worker",
        )
        .fetch_all(&self.db)
        .await?;
        let mut units: HashMap<(i64, String), Vec<(u64, u64)>> = HashMap::new();
        for r in sqlx::query(
            "SELECT u.round, u.worker, u.epoch, u.unit FROM assignment_units u JOIN submissions s \
             ON s.round = u.round AND s.worker = u.worker WHERE s.applied = 1 ORDER BY u.round, u.worker, u.seq",
        )
        .fetch_all(&self.db)
        .await?
        {
            let key = (r.try_get::<i64, _>("round")?, r.try_get::<String, _>("worker")?);
            let unit = (r.try_get::<i64, _>("epoch")? as u64, r.try_get::<i64, _>("unit")? as u64);
            units.entry(key).or_default().push(unit);
        }
        rows.iter()
            .map(|r| {
                let round: i64 = r.try_get("round")?;
                let worker: String = r.try_get("worker")?;
                Ok(Contribution {
                    round: round as u64,
                    worker: worker_col(r, "worker")?,
                    units: units.remove(&(round, worker)).unwrap_or_default(),
                    delta_hash: hash_col(r, "delta_hash")?,
                    bytes: r.try_get::<i64, _>("bytes")? as u64,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }

    /// Training tokens in the applied pseudo-gradients: each trained its round's steps.
    pub(crate) async fn tokens_applied(&self) -> Result<u64, ApiError> {
        let mut tokens = 0;
        for r in
            sqlx::query("SELECT round, CAST(COUNT(*) AS BIGINT) AS n FROM submissions WHERE applied = 1 GROUP BY round")
                .fetch_all(&self.db)
                .await?
        {
            let (round, n): (i64, i64) = (r.try_get("round")?, r.try_get("n")?);
            tokens += self.run.tokens_per_steps(self.rounds.steps(round as u64)) * n as u64;
        }
        Ok(tokens)
    }
    pub async fn gauges(&self) -> Gauges {
        let (round, finished) = {
            let live = self.live.lock().await;
            (live.round, live.finished)
        };
        let last = sqlx::query("SELECT train_loss FROM rounds WHERE closed_ms IS NOT NULL ORDER BY round DESC LIMIT 1")
            .fetch_optional(&self.db)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<Option<f64>, _>("train_loss").ok().flatten());
        let val = sqlx::query("SELECT val_loss FROM rounds WHERE val_loss IS NOT NULL ORDER BY round DESC LIMIT 1")
            .fetch_optional(&self.db)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<Option<f64>, _>("val_loss").ok().flatten());
        let active = sqlx::query("SELECT COUNT(*) AS n FROM workers WHERE active = 1")
            .fetch_one(&self.db)
            .await
            .ok()
            .and_then(|r| r.try_get::<i64, _>("n").ok())
            .unwrap_or(0) as u64;
        Gauges { round, rounds_closed: round, active_workers: active, train_loss: last, val_loss: val, finished }
    }
}
