//! The research track's messages (`agora propose`, `agora proposals`): a researcher's signed patch to a
//! campaign phase's recipe, and the campaign's public board of calls and their proposals. Field names are
//! the wire format.

use crate::hash::update_str;
use crate::identity::{verify_signature, Identity, WorkerId};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// A patch to the recipe of one phase of a campaign, proposed by a researcher in that phase's call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The campaign's name ...
    pub campaign: String,
    /// ... and the run id of the phase that hosts the call (the one before the phase patched): it binds
    /// the proposal to this campaign's call, so a signed proposal cannot be replayed into another.
    pub call: String,
    /// The phase (from 1) whose recipe the patch changes.
    pub phase: usize,
    pub researcher: WorkerId,
    /// A display name for the board.
    pub name: String,
    /// TOML with `[inner]`, `[outer]`, `[compression]` and `[growth]` tables holding the fields to change.
    pub patch: String,
}

impl Proposal {
    /// What the researcher signs: every field, length-prefixed.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora-protocol v1 research proposal");
        update_str(&mut h, &self.campaign);
        update_str(&mut h, &self.call);
        h.update(&(self.phase as u64).to_le_bytes());
        h.update(&self.researcher.0);
        update_str(&mut h, &self.name);
        update_str(&mut h, &self.patch);
        *h.finalize().as_bytes()
    }

    /// Signs the proposal with the researcher's identity (which must be `researcher`).
    pub fn sign(self, researcher: &Identity) -> SignedProposal {
        let signature = researcher.sign(&self.digest());
        SignedProposal { proposal: self, signature }
    }
}

/// `POST /v1/campaign/proposals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedProposal {
    pub proposal: Proposal,
    /// Hex ed25519 signature by `proposal.researcher` over `proposal.digest()`; empty or absent: unsigned.
    #[serde(default)]
    pub signature: String,
}

impl SignedProposal {
    pub fn is_signed(&self) -> bool {
        !self.signature.is_empty()
    }

    pub fn verify(&self) -> Result<()> {
        ensure!(self.is_signed(), "the proposal is not signed");
        verify_signature(&self.proposal.researcher, &self.proposal.digest(), &self.signature)
    }
}

/// Where a call for proposals stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// The phase that hosts it has not opened yet.
    NotOpen,
    /// Taking proposals.
    Open,
    /// Closed: the proxy runs are being trained.
    Running,
    /// Every proxy run evaluated, the best adopted, the researchers credited.
    Settled,
}

/// `GET /v1/campaign/proposals`: every call of the campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalBoard {
    pub campaign: String,
    /// The key that signs the research receipts (the campaign's one key).
    pub coordinator_key: WorkerId,
    pub calls: Vec<ResearchCall>,
}

/// One call: proposals for phase `phase`'s recipe, taken while the phase before it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResearchCall {
    pub phase: usize,
    pub phase_name: String,
    pub state: CallState,
    /// The run id of the hosting phase, once opened (a proposal's `call`).
    pub host_run: Option<String>,
    /// When the call closes (unix ms), once the hosting phase has finished.
    pub closes_ms: Option<u64>,
    /// The fixed compute of every proxy run.
    pub proxy_tokens: u64,
    pub max_proposals: usize,
    /// The researchers this call admits (the previous call's best); absent: anyone.
    pub admitted: Option<Vec<WorkerId>>,
    /// Micro-credits shared by the proposals that beat the phase's own recipe.
    pub reward: u64,
    /// Ranked once evaluated (best first), else in the order received. Entry 0 is the campaign file's
    /// own recipe, run as a proxy like every proposal.
    pub entries: Vec<ProposalEntry>,
    /// The entry whose recipe the phase was opened with.
    pub adopted: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalEntry {
    /// 0: the campaign file's own recipe; proposals count from 1 in the order received.
    pub id: u64,
    pub researcher: Option<WorkerId>,
    pub name: String,
    pub patch: String,
    pub submitted_ms: u64,
    /// The proxy run that measured it, once opened.
    pub proxy_run: Option<String>,
    /// Its proxy run's final validation loss ...
    pub val_loss: Option<f64>,
    /// ... or why it has none (a recipe its proxy run could not be opened with).
    pub failure: Option<String>,
    /// 1 = best, once the call is settled.
    pub rank: Option<u64>,
    pub credits: u64,
    pub adopted: bool,
    /// Admitted to the next call.
    pub retained: bool,
    /// The coordinator-signed research receipt (`agora_ledger::SignedResearchReceipt`) of a settled
    /// proposal.
    pub receipt: Option<serde_json::Value>,
}

/// `201` for an accepted proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalAccepted {
    pub id: u64,
    pub phase: usize,
    pub closes_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_verifies_only_as_signed() {
        let researcher = Identity::generate().unwrap();
        let proposal = Proposal {
            campaign: "c".into(),
            call: "run1".into(),
            phase: 2,
            researcher: researcher.id(),
            name: "r".into(),
            patch: "[outer]\nlr = 0.8\n".into(),
        };
        let signed = proposal.clone().sign(&researcher);
        signed.verify().unwrap();
        let unsigned = SignedProposal { proposal: proposal.clone(), signature: String::new() };
        assert!(unsigned.verify().unwrap_err().to_string().contains("not signed"));
        for changed in [
            Proposal { patch: "[outer]\nlr = 0.9\n".into(), ..proposal.clone() },
            Proposal { call: "run2".into(), ..proposal.clone() },
            Proposal { phase: 3, ..proposal.clone() },
            Proposal { researcher: Identity::generate().unwrap().id(), ..proposal.clone() },
        ] {
            let forged = SignedProposal { proposal: changed, signature: signed.signature.clone() };
            assert!(forged.verify().is_err(), "{forged:?}");
        }
    }
}
