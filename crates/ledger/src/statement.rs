//! A worker's statement: its receipts with inclusion proofs and the signed roots they lead to, checkable
//! offline against a pinned coordinator key.

use crate::{root_from_proof, InclusionProof, RoundRoot, SignedReceipt};
use agora_protocol::WorkerId;
use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What `GET /v1/ledger?worker=ID` returns for one worker, and what `agora ledger verify FILE` checks offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatement {
    pub run_id: String,
    /// The coordinator's public key (the worker pins it, e.g. from an earlier statement or out of band).
    pub coordinator: WorkerId,
    pub worker: WorkerId,
    /// Sum of credits in the receipts (micro-credits).
    pub balance: u64,
    pub roots: Vec<RoundRoot>,
    pub receipts: Vec<ProvenReceipt>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenReceipt {
    pub receipt: SignedReceipt,
    pub proof: InclusionProof,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub receipts: usize,
    /// Signed roots in the statement.
    pub rounds: usize,
    /// Sum of the receipts' credits (equals the statement's balance).
    pub credits: u64,
    pub accepted: usize,
    pub rejected: usize,
}

/// Checks a statement offline: every root's and receipt's signature by the coordinator (`pinned`, when given,
/// must equal `statement.coordinator`), that each receipt is for this run and worker, that its proof leads
/// to the signed root of its round, that no two receipts claim the same round, that rejected receipts pay
/// nothing, and that the balance equals the sum of credits.
pub fn verify_statement(statement: &WorkerStatement, pinned: Option<&WorkerId>) -> anyhow::Result<VerifyReport> {
    let coordinator = &statement.coordinator;
    if let Some(pinned) = pinned {
        // Without pinning, anyone could re-sign a statement with their own key and call it the coordinator.
        ensure!(
            pinned == coordinator,
            "statement names coordinator {coordinator}, but the pinned coordinator key is {pinned}; \
             this statement was not issued by the coordinator you trust"
        );
    }

    let mut roots = BTreeMap::new();
    for root in &statement.roots {
        ensure!(
            root.run_id == statement.run_id,
            "round {} root is for run {:?}, but the statement is for run {:?}",
            root.round,
            root.run_id,
            statement.run_id
        );
        root.verify(coordinator).context("the round root was forged or altered")?;
        if roots.insert(root.round, root).is_some() {
            bail!(
                "round {} has two signed roots; the coordinator equivocated or the statement is malformed",
                root.round
            );
        }
    }

    let (mut credits, mut accepted, mut rejected) = (0u64, 0usize, 0usize);
    let mut rounds_seen = BTreeSet::new();
    for (i, proven) in statement.receipts.iter().enumerate() {
        let r = &proven.receipt.receipt;
        let which = format!("receipt #{i} (round {})", r.round);
        proven.receipt.verify(coordinator).with_context(|| format!("{which} was forged or altered"))?;
        ensure!(r.run_id == statement.run_id, "{which} is for run {:?}, not {:?}", r.run_id, statement.run_id);
        ensure!(
            r.worker == statement.worker,
            "{which} belongs to worker {}, not to this statement's worker {}",
            r.worker,
            statement.worker
        );
        ensure!(
            rounds_seen.insert(r.round),
            "{which} is a second receipt for round {}; a worker gets one per round",
            r.round
        );
        let Some(root) = roots.get(&r.round) else {
            bail!("{which} has no signed root for round {} in the statement, so it cannot be checked", r.round);
        };
        ensure!(
            proven.proof.leaf_count == root.receipts,
            "{which}: its proof is for a tree of {} receipts, but round {} was signed with {}",
            proven.proof.leaf_count,
            r.round,
            root.receipts
        );
        let Some(computed) = root_from_proof(&r.digest(), &proven.proof) else {
            bail!("{which}: its inclusion proof is malformed (index or sibling count does not fit the tree)");
        };
        ensure!(
            computed == root.root.0,
            "{which}: its inclusion proof does not lead to the signed root of round {}; \
             the receipt was not published in that round",
            r.round
        );
        if r.accepted() {
            accepted += 1;
        } else {
            ensure!(r.credits == 0, "{which} is rejected ({}) but pays {} micro-credits", r.verdict, r.credits);
            rejected += 1;
        }
        credits = credits.checked_add(r.credits).with_context(|| format!("{which}: total credits overflow u64"))?;
    }
    ensure!(
        statement.balance == credits,
        "statement claims a balance of {} micro-credits, but its receipts add up to {credits}",
        statement.balance
    );
    Ok(VerifyReport { receipts: statement.receipts.len(), rounds: roots.len(), credits, accepted, rejected })
}
