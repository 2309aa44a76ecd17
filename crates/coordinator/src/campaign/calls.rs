//! Calls for proposals, run by the campaign: taking signed proposals (`POST /v1/campaign/proposals`),
//! training each as a proxy run on the campaign's workers once the call closes, settling the call (ranks,
//! signed research receipts, credits in the hosting phase's ledger, researchers retained for the next call)
//! and the board (`GET /v1/campaign/proposals`). The rules themselves are in [`super::research`].
//!
//! A call lives in the store of the phase that hosts it (tables `research_calls` and `proposals`), so it is
//! as durable as that phase: its deadline is recorded once, every proxy run is a run with its own store
//! (reopened, not redone, after a restart), and the settlement is one transaction.

use super::research::{self, apply_patch, Evaluated, PatchError};
use super::{Campaign, PhaseSection};
use crate::error::ApiError;
use crate::state::{now_ms, Coordinator, Options};
use agora_protocol::{
    hash_bytes, CallState, ProposalAccepted, ProposalBoard, ProposalEntry, ResearchCall, SignedProposal, WorkerId,
};
use anyhow::{Context, Result};
use axum::http::StatusCode;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;

/// The longest display name and patch a proposal may carry.
pub const MAX_NAME: usize = 64;
pub const MAX_PATCH: usize = 16 * 1024;

/// One stored entry of a call.
#[derive(Debug, Clone)]
struct Stored {
    id: u64,
    researcher: Option<WorkerId>,
    name: String,
    patch: String,
    submitted_ms: u64,
    proxy_run: Option<String>,
    val_loss: Option<f64>,
    failure: Option<String>,
    rank: Option<u64>,
    credits: u64,
    retained: bool,
    receipt: Option<String>,
}

impl Campaign {
    /// The coordinator of phase `k` (from 0), if opened.
    fn phase_app(&self, k: usize) -> Option<Arc<Coordinator>> {
        self.opened.read().expect("campaign lock").get(k).map(|(app, _)| app.clone())
    }

    /// Phase `next`'s call, if it has one that is not settled: it must be run before `next` opens.
    pub(crate) async fn call_pending(&self, next: usize) -> Result<bool> {
        if self.file.phases[next].research.is_none() {
            return Ok(false);
        }
        let host = self.phase_app(next - 1).context("the hosting phase is opened before its call")?;
        Ok(call_row(&host, next).await?.is_none_or(|row| row.settled.is_none()))
    }

    /// The section phase `next` opens with: the file's own, or the adopted proposal's once its call settled.
    pub(crate) async fn adopted_section(&self, next: usize) -> Result<PhaseSection> {
        let own = self.file.phases[next].clone();
        if own.research.is_none() {
            return Ok(own);
        }
        let host = self.phase_app(next - 1).context("the hosting phase")?;
        match call_row(&host, next).await?.and_then(|row| row.settled) {
            None | Some(0) => Ok(own),
            Some(id) => {
                let entry = entries(&host, next).await?.into_iter().find(|e| e.id == id);
                let entry = entry.context("the adopted proposal is in the call's store")?;
                self.entry_section(next, &entry).map_err(|e| {
                    anyhow::anyhow!("the adopted proposal {id} no longer applies to the campaign file: {e}")
                })
            }
        }
    }

    /// `POST /v1/campaign/proposals`: every check a proposal must pass, in the order a researcher can fix
    /// them; the call's mutex makes the count, one-per-researcher and deadline checks and the insert atomic.
    pub(crate) async fn propose(&self, signed: SignedProposal) -> Result<ProposalAccepted, ApiError> {
        if !signed.is_signed() {
            return Err(ApiError::unauthorized("unsigned", "a proposal must be signed by its researcher's key"));
        }
        if let Err(e) = signed.verify() {
            return Err(ApiError::unauthorized("bad_signature", format!("the proposal's signature: {e}")));
        }
        let p = &signed.proposal;
        if p.campaign != self.file.name {
            return Err(ApiError::bad_request(
                "wrong_campaign",
                format!("this is campaign {:?}, not {:?}", self.file.name, p.campaign),
            ));
        }
        if p.name.trim().is_empty() || p.name.len() > MAX_NAME {
            return Err(ApiError::bad_request("bad_name", format!("name: 1 to {MAX_NAME} bytes")));
        }
        if p.patch.len() > MAX_PATCH {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "patch_too_large",
                format!("a patch is at most {MAX_PATCH} bytes"),
            ));
        }
        if p.phase == 0 || p.phase > self.file.phases.len() || self.file.phases[p.phase - 1].research.is_none() {
            return Err(ApiError::conflict(
                "no_such_call",
                format!("phase {} of campaign {:?} holds no call for proposals", p.phase, self.file.name),
            ));
        }
        let next = p.phase - 1;
        // The patch's checks (the whole campaign validated with it) need no lock.
        let patched = apply_patch(&self.file, next, &p.patch).map_err(patch_refusal)?;
        let _call = self.research_lock.lock().await;
        let (host_k, host) = self.serving();
        let closed = if next > host_k + 1 {
            Some("it opens when the phase before it opens")
        } else if next <= host_k || self.proxy_active() {
            Some("it has closed (see GET /v1/campaign/proposals)")
        } else {
            match call_row(&host, next).await? {
                Some(row) if !row.taking_proposals() => Some("its deadline has passed"),
                _ => None,
            }
        };
        if let Some(why) = closed {
            return Err(ApiError::conflict(
                "call_closed",
                format!("the call for phase {}'s recipe is not taking proposals: {why}", p.phase),
            ));
        }
        if p.call != host.run_id {
            return Err(ApiError::conflict(
                "wrong_call",
                format!("the open call is hosted by run {}, the proposal names {:?}", host.run_id, p.call),
            ));
        }
        let admitted = self.admitted_researchers(next).await?;
        if let Err(e) = research::check_admission(&p.researcher, admitted.as_deref()) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "not_retained", e.to_string()));
        }
        let existing = entries(&host, next).await?;
        if let Some(mine) = existing.iter().find(|e| e.researcher == Some(p.researcher)) {
            return Err(ApiError::conflict(
                "already_proposed",
                format!("researcher {} already proposed entry {} in this call", p.researcher.short(), mine.id),
            ));
        }
        for e in &existing {
            if apply_patch(&self.file, next, &e.patch).ok().as_ref() == Some(&patched) {
                return Err(ApiError::conflict(
                    "duplicate_recipe",
                    format!("entry {} ({}) already proposes this recipe", e.id, e.name),
                ));
            }
        }
        let research = self.file.phases[next].research.as_ref().expect("an open call has a section");
        if existing.len() >= research.max_proposals {
            return Err(ApiError::conflict(
                "call_full",
                format!("the call has taken its {} proposals", research.max_proposals),
            ));
        }
        let id = existing.iter().map(|e| e.id).max().unwrap_or(0) + 1;
        let signed_json = serde_json::to_string(&signed).map_err(anyhow::Error::from)?;
        sqlx::query(
            "INSERT INTO proposals (phase, id, researcher, name, patch, signed, submitted_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind((next + 1) as i64)
        .bind(id as i64)
        .bind(p.researcher.hex())
        .bind(&p.name)
        .bind(&p.patch)
        .bind(signed_json)
        .bind(now_ms())
        .execute(&host.db)
        .await?;
        tracing::info!(phase = next + 1, id, researcher = %p.researcher.short(), name = p.name, "proposal accepted");
        let closes_ms = call_row(&host, next).await?.map(|row| row.closes_ms as u64);
        Ok(ProposalAccepted { id, phase: next + 1, closes_ms })
    }

    /// The researchers phase `next`'s call admits: the previous call's retained ones when it has `retain`.
    async fn admitted_researchers(&self, next: usize) -> Result<Option<Vec<WorkerId>>> {
        let research = self.file.phases[next].research.as_ref().context("a call")?;
        if research.retain.is_none() {
            return Ok(None);
        }
        let Some(previous) = (1..next).rev().find(|&j| self.file.phases[j].research.is_some()) else {
            return Ok(None);
        };
        let host = self.phase_app(previous - 1).context("the previous call's host")?;
        let mut retained: Vec<(u64, WorkerId)> = entries(&host, previous)
            .await?
            .into_iter()
            .filter(|e| e.retained)
            .filter_map(|e| Some((e.rank?, e.researcher?)))
            .collect();
        retained.sort();
        // A previous call that measured no proposal retained nobody: this one is open to anyone, as the
        // first call was (rather than closed to all).
        if retained.is_empty() {
            return Ok(None);
        }
        Ok(Some(retained.into_iter().map(|r| r.1).collect()))
    }

    fn proxy_active(&self) -> bool {
        self.proxy.read().expect("campaign lock").is_some()
    }

    /// Runs phase `next`'s call to its end once its host has finished: waits out the deadline, trains
    /// every entry's proxy run on the campaign's workers (served at the campaign's URL in turn), and
    /// settles it. Idempotent: a restarted campaign resumes where it was.
    pub(crate) async fn run_call(&self, next: usize) -> Result<()> {
        let host = self.phase_app(next - 1).context("the hosting phase")?;
        let research = self.file.phases[next].research.clone().context("a call")?;
        {
            let _call = self.research_lock.lock().await;
            sqlx::query(
                "INSERT INTO research_calls (phase, closes_ms) SELECT $1, $2 \
                 WHERE NOT EXISTS (SELECT 1 FROM research_calls WHERE phase = $1)",
            )
            .bind((next + 1) as i64)
            .bind(now_ms() + (research.close_after_secs * 1000) as i64)
            .execute(&host.db)
            .await?;
        }
        let CallRow { closes_ms, settled, .. } = call_row(&host, next).await?.context("the call's row")?;
        if settled.is_some() {
            return Ok(());
        }
        while now_ms() < closes_ms {
            tokio::time::sleep(Duration::from_millis((closes_ms - now_ms()).clamp(1, 500) as u64)).await;
        }
        // Closed: marked under the lock, so no proposal is inserted once the entries to measure are read
        // (whatever the clock does next).
        {
            let _call = self.research_lock.lock().await;
            sqlx::query("UPDATE research_calls SET closed = 1 WHERE phase = $1")
                .bind((next + 1) as i64)
                .execute(&host.db)
                .await?;
        }
        sqlx::query(
            "INSERT INTO proposals (phase, id, researcher, name, patch, signed, submitted_ms) \
             SELECT $1, 0, NULL, $2, '', NULL, $3 WHERE NOT EXISTS (SELECT 1 FROM proposals WHERE phase = $1 AND id = 0)",
        )
        .bind((next + 1) as i64)
        .bind(format!("the campaign file's {:?}", self.file.phases[next].name))
        .bind(now_ms())
        .execute(&host.db)
        .await?;
        let to_measure = entries(&host, next).await?;
        tracing::info!(phase = next + 1, entries = to_measure.len(), "call for proposals closed");
        for entry in to_measure {
            if entry.val_loss.is_some() || entry.failure.is_some() {
                continue;
            }
            let (run, outcome) = self.proxy(next, &host, &entry).await?;
            sqlx::query(
                "UPDATE proposals SET proxy_run = $1, val_loss = $2, failure = $3 WHERE phase = $4 AND id = $5",
            )
            .bind(run)
            .bind(outcome.as_ref().ok().copied())
            .bind(outcome.err())
            .bind((next + 1) as i64)
            .bind(entry.id as i64)
            .execute(&host.db)
            .await?;
        }
        self.settle_call(next, &host).await
    }

    /// The recipe an entry stands for: the file's own (entry 0) or its patch applied to it.
    fn entry_section(&self, next: usize, entry: &Stored) -> Result<PhaseSection, PatchError> {
        match entry.id {
            0 => Ok(self.file.phases[next].clone()),
            _ => apply_patch(&self.file, next, &entry.patch),
        }
    }

    /// Opens one entry's proxy run (creating its store, or reopening it after a restart): the run, or why
    /// the entry's recipe cannot be run (its failure). Errors that are not the recipe's (storage) are
    /// returned as errors, and the entry is tried again after a restart.
    async fn open_proxy(
        &self,
        next: usize,
        host: &Arc<Coordinator>,
        entry: &Stored,
    ) -> Result<Result<Arc<Coordinator>, String>> {
        let section = match self.entry_section(next, entry) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let handover = match self.handover(next, host, &section.growth).await {
            Ok(h) => h,
            // A proposal's own growth that fails is its failure; the file's own is the campaign's error.
            Err(e) if section.growth != self.file.phases[next].growth => return Ok(Err(format!("growth: {e:#}"))),
            Err(e) => return Err(e),
        };
        let run = match self.file.proxy_run(next, &section, &handover) {
            Ok(run) => run,
            Err(e) => return Ok(Err(format!("{e:#}"))),
        };
        let dir =
            self.options.dir.join("research").join(format!("phase-{}", next + 1)).join(format!("entry-{}", entry.id));
        let database = match &self.options.database {
            Some(base) => super::file::proxy_database(base, next, entry.id)?,
            None => format!("sqlite://{}?mode=rwc", dir.join("coordinator.db").display()),
        };
        let options = Options {
            run_file: self.options.campaign_file.clone(),
            dir,
            database: Some(database),
            blobs: Some(self.blobs_location()),
            key: Some(self.options.dir.join("coordinator.key")),
        };
        match Coordinator::open_with(run, &options).await {
            Ok(app) => Ok(Ok(app)),
            // A recipe the data cannot feed is the entry's failure.
            Err(e) if e.chain().any(|c| c.is::<crate::prepare::DataDoesNotFit>()) => Ok(Err(format!("{e:#}"))),
            Err(e) => Err(e),
        }
    }

    /// Trains one entry's proxy run, served to the workers: its run id and final validation loss, or why
    /// it could not run.
    async fn proxy(
        &self,
        next: usize,
        host: &Arc<Coordinator>,
        entry: &Stored,
    ) -> Result<(Option<String>, Result<f64, String>)> {
        let app = match self.open_proxy(next, host, entry).await? {
            Ok(app) => app,
            Err(failure) => return Ok((None, Err(failure))),
        };
        tracing::info!(phase = next + 1, entry = entry.id, run = app.run_id, "proxy run opened");
        let router = crate::http::router(app.clone());
        self.proxies.write().expect("campaign lock").push((app.clone(), router.clone()));
        *self.proxy.write().expect("campaign lock") = Some((app.clone(), router));
        let research = self.file.phases[next].research.as_ref().context("a call")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(research.proxy_timeout_secs);
        if !super::until_finished(&app, Some(deadline)).await {
            tracing::warn!(phase = next + 1, entry = entry.id, "proxy run timed out");
            let failure = format!("the proxy run did not finish within {} s", research.proxy_timeout_secs);
            return Ok((Some(app.run_id.clone()), Err(failure)));
        }
        let status = app.status().await.map_err(|e| anyhow::anyhow!("the proxy run's status: {}", e.message))?;
        let loss = status.history.iter().rev().find_map(|h| h.val_loss);
        tracing::info!(phase = next + 1, entry = entry.id, val_loss = ?loss, "proxy run finished");
        let outcome = match measured(loss) {
            Ok(v) => match self.phase_infeasible(next, host, entry, app.units.len()).await? {
                Some(why) => Err(why),
                None => Ok(v),
            },
            Err(why) => Err(why),
        };
        Ok((Some(app.run_id.clone()), outcome))
    }

    /// Why entry's recipe could not run as the whole phase, if it could not: the proxy run measured it at
    /// the proxy's budget, and the phase's longer run has a longer longest round, which must still find
    /// `min_workers` assignments' worth of the data's `units` (the proxy's, cut the same way). An entry
    /// adopted without this check would stop the campaign when its phase opens.
    async fn phase_infeasible(
        &self,
        next: usize,
        host: &Arc<Coordinator>,
        entry: &Stored,
        units: usize,
    ) -> Result<Option<String>> {
        let section = match self.entry_section(next, entry) {
            Ok(s) => s,
            Err(e) => return Ok(Some(e.to_string())),
        };
        let handover = self.handover(next, host, &section.growth).await?;
        let run = match self.file.phase_run_with(next, &section, Some(&handover)) {
            Ok(run) => run,
            Err(e) => return Ok(Some(format!("as the whole phase: {e:#}"))),
        };
        let windows = units * run.windows_per_unit();
        Ok(crate::prepare::data_fits(units, windows, &run).err().map(|e| format!("as the whole phase: {e:#}")))
    }

    /// Reopens the proxy runs an earlier process measured (of every call whose host is open), so that a
    /// request naming one (a worker settling its last round there when the campaign was killed) is answered
    /// by it, as a finished phase's are.
    pub(crate) async fn reopen_measured_proxies(&self) -> Result<()> {
        for next in 1..self.file.phases.len() {
            if self.file.phases[next].research.is_none() {
                continue;
            }
            let Some(host) = self.phase_app(next - 1) else { break };
            for entry in entries(&host, next).await? {
                if entry.proxy_run.is_none() {
                    continue;
                }
                if let Ok(app) = self.open_proxy(next, &host, &entry).await? {
                    let router = crate::http::router(app.clone());
                    self.proxies.write().expect("campaign lock").push((app, router));
                }
            }
        }
        Ok(())
    }

    /// Ranks, credits, signs and retains in one transaction of the host's store (once).
    async fn settle_call(&self, next: usize, host: &Arc<Coordinator>) -> Result<()> {
        let research = self.file.phases[next].research.clone().context("a call")?;
        let stored = entries(host, next).await?;
        let evaluated: Vec<Evaluated> =
            stored.iter().map(|e| Evaluated { id: e.id, researcher: e.researcher, val_loss: e.val_loss }).collect();
        // The researchers kept for the next call: as many as it admits.
        let next_retain = self.file.phases[next + 1..].iter().find_map(|p| p.research.as_ref()).and_then(|r| r.retain);
        let settlement = research::settle(&evaluated, research.reward, research.min_gain, next_retain)?;
        let baseline = stored.iter().find(|e| e.id == 0).and_then(|e| e.val_loss).unwrap_or(f64::NAN);
        let mut tx = host.db.begin().await?;
        let settled: Option<i64> = sqlx::query("SELECT settled_ms FROM research_calls WHERE phase = $1")
            .bind((next + 1) as i64)
            .fetch_one(&mut *tx)
            .await?
            .try_get("settled_ms")?;
        if settled.is_some() {
            return Ok(());
        }
        let mut seq: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(seq) + 1, 0) AS BIGINT) AS n FROM ledger")
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        for (position, &id) in settlement.ranking.iter().enumerate() {
            let entry = stored.iter().find(|e| e.id == id).expect("ranked entries are stored");
            let credits = settlement.credits.iter().find(|c| c.0 == id).map_or(0, |c| c.1);
            let retained = entry.researcher.is_some_and(|r| settlement.retained.contains(&r));
            let receipt = match entry.researcher {
                Some(researcher) => {
                    let receipt = agora_ledger::ResearchReceipt {
                        campaign: self.file.name.clone(),
                        call: host.run_id.clone(),
                        phase: (next + 1) as u64,
                        proposal: id,
                        researcher,
                        patch_hash: hash_bytes(entry.patch.as_bytes()),
                        proxy_run: entry.proxy_run.clone().unwrap_or_default(),
                        val_loss: entry.val_loss.unwrap_or(f64::NAN),
                        baseline_val_loss: baseline,
                        rank: position as u64 + 1,
                        credits,
                        adopted: id == settlement.adopted,
                    };
                    for posting in agora_ledger::research_postings(&receipt) {
                        sqlx::query(
                            "INSERT INTO ledger (seq, round, account, amount, memo, created_ms) VALUES ($1, NULL, $2, $3, $4, $5)",
                        )
                        .bind(seq)
                        .bind(posting.account)
                        .bind(posting.amount)
                        .bind(format!("research phase {} proposal {id}", next + 1))
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await?;
                        seq += 1;
                    }
                    Some(serde_json::to_string(&receipt.sign(&host.key))?)
                }
                None => None,
            };
            sqlx::query(
                "UPDATE proposals SET rank = $1, credits = $2, retained = $3, receipt = $4 WHERE phase = $5 AND id = $6",
            )
            .bind(position as i64 + 1)
            .bind(credits.min(i64::MAX as u64) as i64)
            .bind(retained as i64)
            .bind(receipt)
            .bind((next + 1) as i64)
            .bind(id as i64)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE research_calls SET settled_ms = $1, adopted = $2 WHERE phase = $3")
            .bind(now_ms())
            .bind(settlement.adopted as i64)
            .bind((next + 1) as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(phase = next + 1, adopted = settlement.adopted, "call for proposals settled");
        Ok(())
    }

    /// `GET /v1/campaign/proposals`.
    pub(crate) async fn board(&self) -> Result<ProposalBoard, ApiError> {
        let mut calls = Vec::new();
        for (next, phase) in self.file.phases.iter().enumerate() {
            let Some(research) = &phase.research else { continue };
            let host = self.phase_app(next - 1);
            let (mut state, mut closes_ms, mut adopted, mut list) = (CallState::NotOpen, None, None, Vec::new());
            if let Some(host) = &host {
                state = CallState::Open;
                if let Some(row) = call_row(host, next).await? {
                    closes_ms = Some(row.closes_ms as u64);
                    if row.settled.is_some() {
                        (state, adopted) = (CallState::Settled, row.settled);
                    } else if !row.taking_proposals() {
                        state = CallState::Running;
                    }
                }
                list = entries(host, next).await?;
            }
            list.sort_by_key(|e| (e.rank.unwrap_or(u64::MAX), e.id));
            let admitted = if host.is_some() { self.admitted_researchers(next).await? } else { None };
            calls.push(ResearchCall {
                phase: next + 1,
                phase_name: phase.name.clone(),
                state,
                host_run: host.map(|h| h.run_id.clone()),
                closes_ms,
                proxy_tokens: research.proxy_tokens,
                max_proposals: research.max_proposals,
                admitted,
                reward: research.reward,
                entries: list
                    .into_iter()
                    .map(|e| ProposalEntry {
                        adopted: adopted == Some(e.id),
                        id: e.id,
                        researcher: e.researcher,
                        name: e.name,
                        // Hidden while the call takes proposals, so that nobody copies a patch before it
                        // is measured; its hash binds what will be shown.
                        patch: if state == CallState::Open && e.id > 0 {
                            format!("(hidden until the call closes; blake3 {})", hash_bytes(e.patch.as_bytes()).hex())
                        } else {
                            e.patch
                        },
                        submitted_ms: e.submitted_ms,
                        proxy_run: e.proxy_run,
                        val_loss: e.val_loss,
                        failure: e.failure,
                        rank: e.rank,
                        credits: e.credits,
                        retained: e.retained,
                        receipt: e.receipt.and_then(|r| serde_json::from_str(&r).ok()),
                    })
                    .collect(),
                adopted,
            });
        }
        let key = self.current().key.id();
        Ok(ProposalBoard { campaign: self.file.name.clone(), coordinator_key: key, calls })
    }
}

/// A finished proxy run's result: its final validation loss, or why it has none (a diverged loss is a
/// failure, never a rank: NaN would sort anywhere).
fn measured(loss: Option<f64>) -> Result<f64, String> {
    match loss {
        Some(v) if v.is_finite() => Ok(v),
        Some(v) => Err(format!("the proxy run ended at a validation loss of {v}")),
        None => Err("the proxy run ended without a validation loss".to_string()),
    }
}

fn patch_refusal(e: PatchError) -> ApiError {
    ApiError::bad_request(e.code(), e.to_string())
}

/// Phase `next`'s call as its host's store has it (no row until the host is first seen finished).
struct CallRow {
    closes_ms: i64,
    /// Its entries have been read for measuring: no proposal is taken.
    closed: bool,
    /// Settled, and the entry adopted.
    settled: Option<u64>,
}

impl CallRow {
    fn taking_proposals(&self) -> bool {
        !self.closed && now_ms() < self.closes_ms
    }
}

async fn call_row(host: &Coordinator, next: usize) -> Result<Option<CallRow>> {
    let row = sqlx::query("SELECT closes_ms, closed, settled_ms, adopted FROM research_calls WHERE phase = $1")
        .bind((next + 1) as i64)
        .fetch_optional(&host.db)
        .await?;
    let Some(r) = row else { return Ok(None) };
    let settled = match r.try_get::<Option<i64>, _>("settled_ms")? {
        Some(_) => Some(r.try_get::<Option<i64>, _>("adopted")?.unwrap_or(0) as u64),
        None => None,
    };
    Ok(Some(CallRow { closes_ms: r.try_get("closes_ms")?, closed: r.try_get::<i64, _>("closed")? != 0, settled }))
}

/// Phase `next`'s call entries, by id.
async fn entries(host: &Coordinator, next: usize) -> Result<Vec<Stored>> {
    sqlx::query(
        "SELECT id, researcher, name, patch, submitted_ms, proxy_run, val_loss, failure, rank, credits, retained, receipt \
         FROM proposals WHERE phase = $1 ORDER BY id",
    )
    .bind((next + 1) as i64)
    .fetch_all(&host.db)
    .await?
    .iter()
    .map(|r| {
        Ok(Stored {
            id: r.try_get::<i64, _>("id")? as u64,
            researcher: r
                .try_get::<Option<String>, _>("researcher")?
                .map(|h| h.parse::<WorkerId>().map_err(|e| anyhow::anyhow!("a stored researcher id: {e}")))
                .transpose()?,
            name: r.try_get("name")?,
            patch: r.try_get("patch")?,
            submitted_ms: r.try_get::<i64, _>("submitted_ms")? as u64,
            proxy_run: r.try_get("proxy_run")?,
            val_loss: r.try_get("val_loss")?,
            failure: r.try_get("failure")?,
            rank: r.try_get::<Option<i64>, _>("rank")?.map(|x| x as u64),
            credits: r.try_get::<Option<i64>, _>("credits")?.unwrap_or(0).max(0) as u64,
            retained: r.try_get::<Option<i64>, _>("retained")?.unwrap_or(0) != 0,
            receipt: r.try_get("receipt")?,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::CampaignOptions;
    use agora_protocol::{Identity, Proposal};

    /// A campaign of three phases whose second and third hold calls (the third retaining 1 researcher),
    /// opened in process with its first phase served: the call for phase 2 is open.
    async fn campaign(dir: &std::path::Path) -> Arc<Campaign> {
        std::fs::write(dir.join("corpus.txt"), agora_data::MarkovSource::new(1).generate(20_000, 1)).unwrap();
        let mut deeper = agora_model::preset("tiny", Some(300)).unwrap();
        deeper.num_hidden_layers = 6;
        agora_model::checkpoint::write_json(&dir.join("deeper.json"), &deeper.to_hf_json()).unwrap();
        deeper.num_hidden_layers = 8;
        agora_model::checkpoint::write_json(&dir.join("deepest.json"), &deeper.to_hf_json()).unwrap();
        let body =
            "[phase.inner]\nsteps = 4\nbatch_size = 4\nseq_len = 32\n[phase.rounds]\ncount = 2\nmin_workers = 1\n\
                    [phase.eval]\nbatches = 2\n";
        let text = format!(
            "name = \"calls\"\n[data]\nfiles = [\"corpus.txt\"]\nvocab_size = 300\n\
             [[phase]]\nname = \"one\"\n[phase.model]\npreset = \"tiny\"\n{body}\
             [[phase]]\nname = \"two\"\n[phase.growth]\nmethod = \"depth\"\n[phase.model]\nconfig = \"deeper.json\"\n\
             [phase.research]\nproxy_tokens = 512\nmax_proposals = 2\n{body}\
             [[phase]]\nname = \"three\"\n[phase.growth]\nmethod = \"depth\"\n[phase.model]\nconfig = \"deepest.json\"\n\
             [phase.research]\nproxy_tokens = 512\nretain = 1\n{body}"
        );
        std::fs::write(dir.join("campaign.toml"), text).unwrap();
        let options = CampaignOptions {
            campaign_file: dir.join("campaign.toml"),
            dir: dir.join("state"),
            database: None,
            blobs: None,
        };
        Campaign::open(options).await.unwrap()
    }

    fn proposal(c: &Campaign, who: &Identity, phase: usize, patch: &str) -> SignedProposal {
        Proposal {
            campaign: c.file.name.clone(),
            call: c.current().run_id.clone(),
            phase,
            researcher: who.id(),
            name: "r".into(),
            patch: patch.into(),
        }
        .sign(who)
    }

    /// Every refusal of `POST /v1/campaign/proposals` that the patch checks (`research`) do not cover,
    /// each with its status and code: who can trigger it against whom.
    #[tokio::test]
    async fn proposals_are_refused_for_each_reason() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(dir.path()).await;
        let (a, b, x) = (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
        let refused = |r: Result<ProposalAccepted, ApiError>| {
            let e = r.unwrap_err();
            (e.status.as_u16(), e.code)
        };
        let accepted = c.propose(proposal(&c, &a, 2, "[outer]\nlr = 0.8\n")).await.unwrap();
        assert_eq!((accepted.id, accepted.phase, accepted.closes_ms), (1, 2, None));

        // Unsigned, or signed by someone else than the researcher it names.
        let mut unsigned = proposal(&c, &b, 2, "[outer]\nlr = 0.9\n");
        unsigned.signature.clear();
        assert_eq!(refused(c.propose(unsigned).await), (401, "unsigned"));
        let mut forged = proposal(&c, &b, 2, "[outer]\nlr = 0.9\n");
        forged.proposal.researcher = x.id();
        assert_eq!(refused(c.propose(forged).await), (401, "bad_signature"));
        // Another campaign, or another call of this one (a replay).
        let mut other = proposal(&c, &b, 2, "[outer]\nlr = 0.9\n").proposal;
        other.campaign = "another".into();
        assert_eq!(refused(c.propose(other.sign(&b)).await), (400, "wrong_campaign"));
        let mut replay = proposal(&c, &b, 2, "[outer]\nlr = 0.9\n").proposal;
        replay.call = "an earlier run".into();
        assert_eq!(refused(c.propose(replay.sign(&b)).await), (409, "wrong_call"));
        // A phase without a call, and a call that has not opened (phase 3's opens with phase 2).
        assert_eq!(refused(c.propose(proposal(&c, &b, 1, "[outer]\nlr = 0.9\n")).await), (409, "no_such_call"));
        assert_eq!(refused(c.propose(proposal(&c, &b, 9, "[outer]\nlr = 0.9\n")).await), (409, "no_such_call"));
        assert_eq!(refused(c.propose(proposal(&c, &b, 3, "[outer]\nlr = 0.9\n")).await), (409, "call_closed"));
        // A bad patch (each kind is unit-tested in `research`).
        assert_eq!(
            refused(c.propose(proposal(&c, &b, 2, "[trust]\nverify = false\n")).await),
            (400, "disallowed_field")
        );
        // A second proposal by one researcher, and a recipe already proposed (a copy under a fresh identity).
        assert_eq!(refused(c.propose(proposal(&c, &a, 2, "[outer]\nlr = 0.9\n")).await), (409, "already_proposed"));
        assert_eq!(refused(c.propose(proposal(&c, &b, 2, "[outer]\nlr = 0.80\n")).await), (409, "duplicate_recipe"));
        // Too long a name or patch.
        let mut long = proposal(&c, &b, 2, "[outer]\nlr = 0.9\n").proposal;
        long.name = "n".repeat(MAX_NAME + 1);
        assert_eq!(refused(c.propose(long.sign(&b)).await), (400, "bad_name"));
        let big = format!("[outer]\nlr = 0.9\n#{}\n", "x".repeat(MAX_PATCH));
        assert_eq!(refused(c.propose(proposal(&c, &b, 2, &big)).await), (413, "patch_too_large"));
        // The call takes max_proposals = 2.
        c.propose(proposal(&c, &b, 2, "[outer]\nlr = 0.9\n")).await.unwrap();
        assert_eq!(refused(c.propose(proposal(&c, &x, 2, "[outer]\nlr = 0.7\n")).await), (409, "call_full"));
        // Past the deadline (recorded once the host finished): closed.
        sqlx::query("INSERT INTO research_calls (phase, closes_ms) VALUES (2, $1)")
            .bind(now_ms() - 1)
            .execute(&c.current().db)
            .await
            .unwrap();
        assert_eq!(refused(c.propose(proposal(&c, &x, 2, "[outer]\nlr = 0.6\n")).await), (409, "call_closed"));

        // The board shows the call and its two entries, in the order received.
        let board = c.board().await.unwrap();
        assert_eq!(board.calls.len(), 2);
        let call = &board.calls[0];
        assert_eq!((call.phase, call.state, call.entries.len()), (2, CallState::Running, 2));
        assert_eq!(board.calls[1].state, CallState::NotOpen);
        assert_eq!(call.entries[0].researcher, Some(a.id()));

        // Phase 3's call (retain = 1) admits only the best researcher phase 2's call retained; had that
        // call measured nobody, anyone.
        assert_eq!(c.admitted_researchers(2).await.unwrap(), None, "phase 2's call retained nobody yet");
        let db = &c.current().db;
        sqlx::query("UPDATE proposals SET rank = 2, retained = 1 WHERE phase = 2 AND id = 1")
            .execute(db)
            .await
            .unwrap();
        sqlx::query("UPDATE proposals SET rank = 1, retained = 0 WHERE phase = 2 AND id = 2")
            .execute(db)
            .await
            .unwrap();
        assert_eq!(c.admitted_researchers(2).await.unwrap(), Some(vec![a.id()]));
        let err = research::check_admission(&b.id(), Some(&[a.id()])).unwrap_err().to_string();
        assert!(err.contains("not retained"), "{err}");

        // Settlement, run twice (a restart between the transaction and the next phase): ranks, receipts
        // and postings once. Entry 2 (lr 0.9) beats the file's recipe past min_gain, entry 1 does not.
        let host = c.current();
        sqlx::query(
            "INSERT INTO proposals (phase, id, researcher, name, patch, signed, submitted_ms, val_loss) \
             VALUES (2, 0, NULL, 'file', '', NULL, 0, 3.0)",
        )
        .execute(db)
        .await
        .unwrap();
        for (id, loss) in [(1, 2.999), (2, 2.9)] {
            sqlx::query("UPDATE proposals SET val_loss = $1, proxy_run = 'p' WHERE phase = 2 AND id = $2")
                .bind(loss)
                .bind(id)
                .execute(db)
                .await
                .unwrap();
        }
        c.settle_call(1, &host).await.unwrap();
        c.settle_call(1, &host).await.unwrap();
        let board = c.board().await.unwrap();
        let call = &board.calls[0];
        assert_eq!((call.state, call.adopted), (CallState::Settled, Some(2)));
        let ids: Vec<u64> = call.entries.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![2, 1, 0], "ranked by loss");
        assert_eq!(call.entries.iter().map(|e| e.credits).collect::<Vec<_>>(), vec![0, 0, 0], "reward = 0 here");
        for e in call.entries.iter().filter(|e| e.id > 0) {
            let receipt: agora_ledger::SignedResearchReceipt =
                serde_json::from_value(e.receipt.clone().unwrap()).unwrap();
            receipt.verify(&board.coordinator_key).unwrap();
            assert_eq!(receipt.receipt.adopted, e.id == 2);
        }
        assert_eq!(c.adopted_section(1).await.unwrap().outer.lr, 0.9, "the phase opens with entry 2's recipe");
        let receipts: i64 = sqlx::query("SELECT COUNT(*) AS n FROM proposals WHERE receipt IS NOT NULL")
            .fetch_one(db)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(receipts, 2);
    }

    /// A recipe whose longest round at the phase's budget needs more data units than there are is the
    /// entry's failure (measured fine as a proxy, it would stop the campaign once adopted).
    #[tokio::test]
    async fn a_recipe_the_phase_cannot_feed_is_refused_at_measurement() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(dir.path()).await;
        let host = c.current();
        let stored = |id, patch: &str| Stored {
            id,
            researcher: None,
            name: "r".into(),
            patch: patch.into(),
            submitted_ms: 0,
            proxy_run: None,
            val_loss: None,
            failure: None,
            rank: None,
            credits: 0,
            retained: false,
            receipt: None,
        };
        assert_eq!(c.phase_infeasible(1, &host, &stored(0, ""), 10_000).await.unwrap(), None);
        let steep = stored(1, "[inner]\nround_lr_power = 4.0\nunit_steps = 1\n");
        assert_eq!(c.phase_infeasible(1, &host, &steep, 10_000).await.unwrap(), None);
        let why = c.phase_infeasible(1, &host, &steep, 2).await.unwrap().expect("2 units cannot feed it");
        assert!(why.contains("as the whole phase") && why.contains("needs"), "{why}");
    }

    /// A proxy run that diverged, ended unmeasured or outlived its timeout is its entry's failure.
    #[tokio::test]
    async fn a_proxy_that_diverges_or_stalls_is_a_failure() {
        assert_eq!(measured(Some(2.5)), Ok(2.5));
        for bad in [Some(f64::NAN), Some(-f64::NAN), Some(f64::INFINITY), None] {
            assert!(measured(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(dir.path()).await;
        let past = tokio::time::Instant::now();
        assert!(!super::super::until_finished(&c.current(), Some(past)).await, "an unfinished run times out");
    }

    /// A body that is not a signed proposal: 400, over the campaign's router.
    #[tokio::test]
    async fn a_body_that_is_not_a_proposal_is_a_400() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(dir.path()).await;
        let router = crate::campaign::router(c);
        for body in ["not json", "{}", "{\"proposal\": {\"campaign\": 1}}"] {
            let request = axum::http::Request::post("/v1/campaign/proposals")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 400, "{body}");
        }
        let get = axum::http::Request::get("/v1/campaign/proposals").body(axum::body::Body::empty()).unwrap();
        let response = router.oneshot(get).await.unwrap();
        assert_eq!(response.status(), 200);
    }
}
