//! Settlement: a judged round's verdicts, signed receipts and Merkle root, credits booked as pending
//! transfers that vest (`core::vesting`), and reputations, all inside the round's commit transaction.

use crate::close::SubmissionRow;
use crate::core::vesting::{next_verified, resolve, PendingCredit, Resolution, Standing, VestingPolicy};
use crate::error::ApiError;
use crate::state::*;
use crate::store::*;
use crate::trust;
use agora_protocol::*;
use anyhow::{Context, Result};
use sqlx::Row;
use std::collections::HashMap;

impl Coordinator {
    /// Records a judged round inside its commit transaction: each submission's verdict and score, its
    /// signed receipt, the round's Merkle root, its credits booked as pending transfers (double entry
    /// against the reward pool), the reputations and verified counts, the data of rejected submissions back
    /// in the queue; then the vesting decisions of `core::vesting` (voids for this round's cheats, posts
    /// for credits that have vested).
    pub(crate) async fn settle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        round: u64,
        subs: &[SubmissionRow],
        judged: &trust::RoundJudgement,
    ) -> Result<(), ApiError> {
        let trust_config = &self.run.trust;
        let pool = agora_ledger::pool_account(&self.run_id);
        let mut pool_left: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS n FROM ledger WHERE account = $1")
                .bind(&pool)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?;
        let mut seq: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(seq) + 1, 0) AS BIGINT) AS n FROM ledger")
            .fetch_one(&mut **tx)
            .await?
            .try_get("n")?;
        let tokens = self.run.tokens_per_steps(self.rounds.steps(round));
        let mut leaves = Vec::with_capacity(subs.len());
        let mut standing: HashMap<WorkerId, Standing> = HashMap::new();
        for (position, (sub, j)) in subs.iter().zip(&judged.judgements).enumerate() {
            let accepted = j.verdict == trust::ACCEPTED;
            let credits = if accepted {
                agora_ledger::credits_for(tokens, j.score, trust_config.micro_credits_per_token)
                    .min(pool_left.max(0) as u64)
            } else {
                0
            };
            pool_left -= credits as i64;
            let receipt = agora_ledger::Receipt {
                run_id: self.run_id.clone(),
                round,
                worker: sub.worker,
                delta_hash: sub.delta_hash,
                tokens,
                score: j.score,
                credits,
                verdict: j.verdict.to_string(),
            };
            leaves.push(receipt.digest());
            let memo = format!("round {round} receipt {}", hex_digest(&receipt.digest()));
            for posting in agora_ledger::postings(&receipt) {
                insert_posting(tx, seq, round, posting, &memo).await?;
                seq += 1;
            }
            let signed = receipt.sign(&self.key);
            sqlx::query("INSERT INTO receipts (round, worker, position, receipt) VALUES ($1, $2, $3, $4)")
                .bind(round as i64)
                .bind(sub.worker.hex())
                .bind(position as i64)
                .bind(serde_json::to_string(&signed).map_err(anyhow::Error::from)?)
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "UPDATE submissions SET verdict = $3, score = $4, credits = $5, gain_random = $6, gain_assigned = $7, \
                 similarity = $8, norm = $9, applied = $10, \
                 spot_check = CASE WHEN spot_check = 'pending' THEN 'failed: no proof before the round closed' ELSE spot_check END \
                 WHERE round = $1 AND worker = $2",
            )
            .bind(round as i64)
            .bind(sub.worker.hex())
            .bind(j.verdict)
            .bind(j.score)
            .bind(credits as i64)
            .bind_f64(j.gains.map(|g| g.random))
            .bind_f64(j.gains.map(|g| g.assigned))
            .bind(j.similarity)
            .bind(j.norm)
            .bind(if accepted { 1i64 } else { 2 })
            .execute(&mut **tx)
            .await?;
            if !accepted {
                set_queue_state(tx, "pending", round, Some(&sub.worker), None).await?;
                sqlx::query("UPDATE assignments SET state = 'rejected' WHERE round = $1 AND worker = $2")
                    .bind(round as i64)
                    .bind(sub.worker.hex())
                    .execute(&mut **tx)
                    .await?;
            }
            let outcome = if trust::is_slashing(j.verdict) {
                agora_verify::Outcome::Slashed
            } else {
                agora_verify::Outcome::Scored(j.score)
            };
            update_reputation(tx, &sub.worker, outcome, trust_config.reputation_alpha, accepted).await?;
            let cheated = trust::is_slashing(j.verdict);
            let verified = next_verified(verified_count(tx, &sub.worker).await?, cheated, sub.verified);
            sqlx::query("UPDATE reputation SET verified = $2 WHERE worker = $1")
                .bind(sub.worker.hex())
                .bind(verified as i64)
                .execute(&mut **tx)
                .await?;
            standing.insert(sub.worker, Standing { verified, cheated });
            if credits > 0 {
                book_transfer(tx, "pending", None, round, &sub.worker, credits).await?;
            }
            tracing::info!(
                worker = sub.worker.short(),
                round,
                verdict = j.verdict,
                score = j.score,
                credits,
                gain_random = j.gains.map(|g| g.random),
                gain_assigned = j.gains.map(|g| g.assigned),
                similarity = j.similarity,
                "judged"
            );
        }
        let root = agora_ledger::RoundRoot::signed(&self.run_id, round, &leaves, &self.key);
        sqlx::query("INSERT INTO round_roots (round, root, receipts, signed) VALUES ($1, $2, $3, $4)")
            .bind(round as i64)
            .bind(root.root.hex())
            .bind(leaves.len() as i64)
            .bind(serde_json::to_string(&root).map_err(anyhow::Error::from)?)
            .execute(&mut **tx)
            .await?;
        self.vest(tx, round, &standing).await
    }

    /// Resolves pending credits at the close of `round`: `standing` holds this round's judged identities;
    /// the others keep their verified counts and did not cheat.
    async fn vest(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        round: u64,
        standing: &HashMap<WorkerId, Standing>,
    ) -> Result<(), ApiError> {
        let pending = unresolved(tx, None).await?;
        let mut known: HashMap<WorkerId, Standing> = standing.clone();
        for p in &pending {
            if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(p.worker) {
                let verified = verified_count(tx, &p.worker).await?;
                slot.insert(Standing { verified, cheated: false });
            }
        }
        let policy = VestingPolicy {
            vesting_rounds: self.run.trust.vesting_rounds,
            probation_rounds: self.run.trust.probation_rounds,
        };
        let decisions = resolve(policy, round, &pending, |w| known.get(w).copied().unwrap_or_default());
        self.apply_resolutions(tx, round, &pending, &decisions).await
    }

    /// Voids every pending credit of `worker` (a cheat proven outside a round's judgement: a poisoned
    /// upload refused on arrival).
    pub(crate) async fn void_pending(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        round: u64,
        worker: &WorkerId,
    ) -> Result<(), ApiError> {
        let pending = unresolved(tx, Some(worker)).await?;
        let decisions: Vec<Resolution> = pending.iter().map(|p| Resolution::Void(p.id)).collect();
        sqlx::query("UPDATE reputation SET verified = 0 WHERE worker = $1")
            .bind(worker.hex())
            .execute(&mut **tx)
            .await?;
        self.apply_resolutions(tx, round, &pending, &decisions).await
    }

    async fn apply_resolutions(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        round: u64,
        pending: &[PendingCredit<WorkerId>],
        decisions: &[Resolution],
    ) -> Result<(), ApiError> {
        let by_id: HashMap<u64, &PendingCredit<WorkerId>> = pending.iter().map(|p| (p.id, p)).collect();
        let mut seq: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(seq) + 1, 0) AS BIGINT) AS n FROM ledger")
            .fetch_one(&mut **tx)
            .await?
            .try_get("n")?;
        for decision in decisions {
            let (id, post) = match *decision {
                Resolution::Post(id) => (id, true),
                Resolution::Void(id) => (id, false),
            };
            let p = by_id.get(&id).context("a resolution names a pending credit")?;
            book_transfer(tx, if post { "post" } else { "void" }, Some(id), round, &p.worker, p.amount).await?;
            let memo = format!(
                "round {round}: {} pending credit {id} of round {}",
                if post { "post" } else { "void" },
                p.round
            );
            for posting in agora_ledger::resolution_postings(&self.run_id, &p.worker, p.amount, post) {
                insert_posting(tx, seq, round, posting, &memo).await?;
                seq += 1;
            }
            tracing::info!(
                worker = p.worker.short(),
                round,
                credit_round = p.round,
                amount = p.amount,
                post,
                "credit resolved"
            );
        }
        Ok(())
    }
}

/// Appends one ledger entry (the ledger is append-only: no code path updates or deletes one).
async fn insert_posting(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    seq: i64,
    round: u64,
    posting: agora_ledger::Posting,
    memo: &str,
) -> Result<(), ApiError> {
    sqlx::query("INSERT INTO ledger (seq, round, account, amount, memo, created_ms) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(seq)
        .bind(round as i64)
        .bind(posting.account)
        .bind(posting.amount)
        .bind(memo)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An identity's verified rounds since its last proven cheat (0 for one never judged).
async fn verified_count(tx: &mut sqlx::Transaction<'_, sqlx::Any>, worker: &WorkerId) -> Result<u64, ApiError> {
    Ok(sqlx::query("SELECT verified FROM reputation WHERE worker = $1")
        .bind(worker.hex())
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get::<i64, _>("verified"))
        .transpose()?
        .unwrap_or(0)
        .max(0) as u64)
}

/// Appends one transfer (`pending`, or the `post`/`void` resolving `pending_id`).
async fn book_transfer(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: &str,
    pending_id: Option<u64>,
    round: u64,
    worker: &WorkerId,
    amount: u64,
) -> Result<(), ApiError> {
    let id: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(id) + 1, 0) AS BIGINT) AS n FROM transfers")
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?;
    sqlx::query(
        "INSERT INTO transfers (id, kind, pending_id, round, worker, amount, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(kind)
    .bind(pending_id.map(|p| p as i64))
    .bind(round as i64)
    .bind(worker.hex())
    .bind(amount.min(i64::MAX as u64) as i64)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Pending transfers not yet posted or voided (one worker's, or everyone's), oldest first.
pub(crate) async fn unresolved(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    worker: Option<&WorkerId>,
) -> Result<Vec<PendingCredit<WorkerId>>, ApiError> {
    let worker = worker.map(|w| w.hex()).unwrap_or_default();
    sqlx::query(
        "SELECT t.id, t.worker, t.round, t.amount FROM transfers t WHERE t.kind = 'pending' AND ($1 = '' OR t.worker = $1) \
         AND NOT EXISTS (SELECT 1 FROM transfers r WHERE r.pending_id = t.id) ORDER BY t.id",
    )
    .bind(&worker)
    .fetch_all(&mut **tx)
    .await?
    .iter()
    .map(|r| {
        Ok(PendingCredit {
            id: r.try_get::<i64, _>("id")? as u64,
            worker: worker_col(r, "worker")?,
            round: r.try_get::<i64, _>("round")? as u64,
            amount: r.try_get::<i64, _>("amount")?.max(0) as u64,
        })
    })
    .collect::<Result<Vec<_>>>()
    .map_err(ApiError::from)
}
