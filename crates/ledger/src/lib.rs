//! agora-ledger: who earned what, in a form a worker can check without trusting the coordinator's database.
//!
//! Owns: coordinator-signed receipts (one per submission) and research receipts (one per settled proposal
//! of a campaign's call, with the pro-rata split of its reward), per-round Merkle roots over receipt digests with
//! inclusion proofs, double-entry postings (every worker credit debits the run's pool), the credit formula,
//! and offline verification of a worker's statement.
//! Must not know about: storage, HTTP, tensors. Statements arrive from the network, so every check here
//! returns an error instead of panicking.

mod merkle;
mod statement;

pub use merkle::{inclusion_proof, merkle_root, root_from_proof, InclusionProof};
pub use statement::{verify_statement, ProvenReceipt, VerifyReport, WorkerStatement};

use agora_protocol::{update_str, verify_signature, Hash32, Identity, WorkerId};
use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The verdict of a receipt that earned credits; anything else is a rejection code.
pub const ACCEPTED: &str = "accepted";

/// One submission's outcome, signed by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub run_id: String,
    pub round: u64,
    pub worker: WorkerId,
    pub delta_hash: Hash32,
    pub tokens: u64,
    /// Bounded score in [0, 1].
    pub score: f64,
    /// Micro-credits (1e-6 credit) paid from the run's pool; 0 when rejected.
    pub credits: u64,
    /// "accepted", or the rejection code (e.g. "spot_check_failed", "copy", "replay", "norm", "zero_score").
    pub verdict: String,
}

impl Receipt {
    /// The Merkle leaf: blake3 keyed by derive_key("agora-ledger v1 receipt") over every field.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora-ledger v1 receipt");
        update_str(&mut h, &self.run_id);
        h.update(&self.round.to_le_bytes());
        h.update(&self.worker.0);
        h.update(&self.delta_hash.0);
        h.update(&self.tokens.to_le_bytes());
        h.update(&self.score.to_bits().to_le_bytes());
        h.update(&self.credits.to_le_bytes());
        update_str(&mut h, &self.verdict);
        *h.finalize().as_bytes()
    }

    pub fn sign(&self, coordinator: &Identity) -> SignedReceipt {
        SignedReceipt { receipt: self.clone(), signature: coordinator.sign(&self.digest()) }
    }

    pub fn accepted(&self) -> bool {
        self.verdict == ACCEPTED
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    /// Hex ed25519 signature by the coordinator over `receipt.digest()`.
    pub signature: String,
}

impl SignedReceipt {
    pub fn verify(&self, coordinator: &WorkerId) -> anyhow::Result<()> {
        verify_signature(coordinator, &self.receipt.digest(), &self.signature)
            .with_context(|| format!("receipt is not signed by coordinator {}", coordinator.short()))
    }
}

/// A round's published root, signed by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRoot {
    pub run_id: String,
    pub round: u64,
    pub root: Hash32,
    /// Number of receipts (leaves) under `root`; pins the tree's shape for proofs.
    pub receipts: u64,
    /// Hex ed25519 signature by the coordinator over `digest(..)`.
    pub signature: String,
}

impl RoundRoot {
    pub fn digest(run_id: &str, round: u64, root: &Hash32, receipts: u64) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora-ledger v1 round root");
        update_str(&mut h, run_id);
        h.update(&round.to_le_bytes());
        h.update(&root.0);
        h.update(&receipts.to_le_bytes());
        *h.finalize().as_bytes()
    }

    /// Roots and signs a round's receipt digests (in the order proofs will index them).
    pub fn signed(run_id: &str, round: u64, leaves: &[[u8; 32]], coordinator: &Identity) -> RoundRoot {
        let root = Hash32(merkle_root(leaves));
        let receipts = leaves.len() as u64;
        let signature = coordinator.sign(&Self::digest(run_id, round, &root, receipts));
        RoundRoot { run_id: run_id.to_string(), round, root, receipts, signature }
    }

    pub fn verify(&self, coordinator: &WorkerId) -> anyhow::Result<()> {
        let digest = Self::digest(&self.run_id, self.round, &self.root, self.receipts);
        verify_signature(coordinator, &digest, &self.signature)
            .with_context(|| format!("round {} root is not signed by coordinator {}", self.round, coordinator.short()))
    }
}

/// A settled proposal of a campaign's research call, signed by the coordinator: what its proxy run
/// measured, its rank, whether it was adopted, and the credits it earned (paid from the call's research
/// pool, [`research_postings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResearchReceipt {
    pub campaign: String,
    /// The run id of the phase that hosted the call.
    pub call: String,
    /// The phase (from 1) whose recipe the proposal patched.
    pub phase: u64,
    pub proposal: u64,
    pub researcher: WorkerId,
    /// blake3 of the patch text as signed by the researcher.
    pub patch_hash: Hash32,
    pub proxy_run: String,
    /// The proxy run's final validation loss (NaN when it had none), and that of the phase's own recipe.
    pub val_loss: f64,
    pub baseline_val_loss: f64,
    /// 1 = best among the call's entries (the phase's own recipe included).
    pub rank: u64,
    pub credits: u64,
    pub adopted: bool,
}

impl ResearchReceipt {
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora-ledger v1 research receipt");
        update_str(&mut h, &self.campaign);
        update_str(&mut h, &self.call);
        h.update(&self.phase.to_le_bytes());
        h.update(&self.proposal.to_le_bytes());
        h.update(&self.researcher.0);
        h.update(&self.patch_hash.0);
        update_str(&mut h, &self.proxy_run);
        h.update(&self.val_loss.to_bits().to_le_bytes());
        h.update(&self.baseline_val_loss.to_bits().to_le_bytes());
        h.update(&self.rank.to_le_bytes());
        h.update(&self.credits.to_le_bytes());
        h.update(&[self.adopted as u8]);
        *h.finalize().as_bytes()
    }

    pub fn sign(&self, coordinator: &Identity) -> SignedResearchReceipt {
        SignedResearchReceipt { receipt: self.clone(), signature: coordinator.sign(&self.digest()) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedResearchReceipt {
    pub receipt: ResearchReceipt,
    /// Hex ed25519 signature by the coordinator over `receipt.digest()`.
    pub signature: String,
}

impl SignedResearchReceipt {
    pub fn verify(&self, coordinator: &WorkerId) -> anyhow::Result<()> {
        verify_signature(coordinator, &self.receipt.digest(), &self.signature)
            .with_context(|| format!("research receipt is not signed by coordinator {}", coordinator.short()))
    }
}

/// Double-entry: every credit to a worker has a matching debit of the run's pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Posting {
    pub account: String,
    pub amount: i64,
}

pub fn pool_account(run_id: &str) -> String {
    format!("pool:{run_id}")
}

/// Where a worker's posted (vested) credits are.
pub fn worker_account(worker: &WorkerId) -> String {
    format!("worker:{}", worker.hex())
}

/// Where a worker's credits wait while they vest: booked from the pool, then posted to
/// [`worker_account`] or voided back to the pool (two-phase transfers; the coordinator decides when).
pub fn pending_account(worker: &WorkerId) -> String {
    format!("pending:{}", worker.hex())
}

/// The two postings of a receipt: its credits booked as pending (+credits to the worker's pending account,
/// −credits to the pool); empty when it paid nothing. Amounts beyond i64::MAX saturate on both sides, so
/// the pair still sums to zero.
pub fn postings(receipt: &Receipt) -> Vec<Posting> {
    if receipt.credits == 0 {
        return Vec::new();
    }
    let amount = i64::try_from(receipt.credits).unwrap_or(i64::MAX);
    vec![
        Posting { account: pending_account(&receipt.worker), amount },
        Posting { account: pool_account(&receipt.run_id), amount: -amount },
    ]
}

/// The postings that resolve a pending credit of `amount`: posting it moves it from the worker's pending
/// account to its account; voiding it returns it to the pool. Each pair sums to zero.
pub fn resolution_postings(run_id: &str, worker: &WorkerId, amount: u64, post: bool) -> Vec<Posting> {
    if amount == 0 {
        return Vec::new();
    }
    let amount = i64::try_from(amount).unwrap_or(i64::MAX);
    let to = if post { worker_account(worker) } else { pool_account(run_id) };
    vec![Posting { account: pending_account(worker), amount: -amount }, Posting { account: to, amount }]
}

/// A research call's pool: researchers' credits are paid from it (it goes negative by what was paid).
pub fn research_pool_account(call: &str) -> String {
    format!("research:{call}")
}

/// Where a researcher's credits are.
pub fn researcher_account(researcher: &WorkerId) -> String {
    format!("researcher:{}", researcher.hex())
}

/// The two postings of a research receipt's credits (the researcher's account credited, the call's pool
/// debited); empty when it earned nothing.
pub fn research_postings(receipt: &ResearchReceipt) -> Vec<Posting> {
    if receipt.credits == 0 {
        return Vec::new();
    }
    let amount = i64::try_from(receipt.credits).unwrap_or(i64::MAX);
    vec![
        Posting { account: researcher_account(&receipt.researcher), amount },
        Posting { account: research_pool_account(&receipt.call), amount: -amount },
    ]
}

/// Splits `reward` among claims (≥ 0) pro rata with largest-remainder rounding: the shares sum to
/// exactly `reward` when any claim is positive (nothing created or lost), ties in the remainder going to
/// the earlier claim; all zero when no claim is positive.
pub fn split_pro_rata(reward: u64, claims: &[f64]) -> Vec<u64> {
    let total: f64 = claims.iter().filter(|c| c.is_finite() && **c > 0.0).sum();
    // Integer weights (each claim's share of 2^40), so that the split itself is exact arithmetic.
    let weights: Vec<u128> = claims
        .iter()
        .map(|&c| {
            if c.is_finite() && c > 0.0 && total > 0.0 {
                ((c / total) * (1u64 << 40) as f64).round() as u128
            } else {
                0
            }
        })
        .collect();
    let sum: u128 = weights.iter().sum();
    if sum == 0 {
        return vec![0; claims.len()];
    }
    let mut shares: Vec<u64> = weights.iter().map(|w| (reward as u128 * w / sum) as u64).collect();
    let mut left = reward - shares.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0).collect();
    // Largest remainder first; ties to the earlier claim. `left` is below the number of positive claims.
    order.sort_by_key(|&i| (std::cmp::Reverse(reward as u128 * weights[i] % sum), i));
    for &i in &order {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    debug_assert_eq!(left, 0);
    shares
}

/// Micro-credits for a submission: floor(tokens × clamp(score, 0, 1) × micro_per_token), saturating.
/// A NaN or negative score or rate pays nothing.
pub fn credits_for(tokens: u64, score: f64, micro_per_token: f64) -> u64 {
    let score = if score.is_nan() { 0.0 } else { score.clamp(0.0, 1.0) };
    let credits = tokens as f64 * score * micro_per_token;
    if credits.is_nan() || credits <= 0.0 {
        0
    } else {
        // `as` saturates at u64::MAX (and +inf), which is the intended behaviour.
        credits.floor() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn research_rewards_split_exactly() {
        assert_eq!(split_pro_rata(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3], "the remainder to the earlier claim");
        assert_eq!(split_pro_rata(100, &[3.0, 1.0]), vec![75, 25]);
        assert_eq!(split_pro_rata(7, &[0.0, -1.0, f64::NAN]), vec![0, 0, 0], "no positive claim: nothing paid");
        assert_eq!(split_pro_rata(7, &[0.0, 2.0, f64::INFINITY]), vec![0, 7, 0]);
        for (reward, claims) in [(1_000_003u64, vec![0.013, 0.2, 0.0007, 1e-9]), (u64::MAX, vec![1.0, 2.0, 3.0])] {
            let shares = split_pro_rata(reward, &claims);
            assert_eq!(shares.iter().map(|&s| s as u128).sum::<u128>(), reward as u128, "{shares:?}");
        }
    }

    #[test]
    fn research_receipts_sign_every_field() {
        let key = Identity::generate().unwrap();
        let receipt = ResearchReceipt {
            campaign: "c".into(),
            call: "run".into(),
            phase: 2,
            proposal: 1,
            researcher: Identity::generate().unwrap().id(),
            patch_hash: agora_protocol::hash_bytes(b"[outer]\nlr = 0.8\n"),
            proxy_run: "proxy".into(),
            val_loss: 2.5,
            baseline_val_loss: 2.6,
            rank: 1,
            credits: 10,
            adopted: true,
        };
        let signed = receipt.sign(&key);
        signed.verify(&key.id()).unwrap();
        let forged =
            SignedResearchReceipt { receipt: ResearchReceipt { credits: 11, ..receipt.clone() }, ..signed.clone() };
        assert!(forged.verify(&key.id()).is_err());
        let postings = research_postings(&receipt);
        assert_eq!(postings.iter().map(|p| p.amount).sum::<i64>(), 0);
        assert!(research_postings(&ResearchReceipt { credits: 0, ..receipt }).is_empty());
    }

    #[test]
    fn credits_edge_cases() {
        assert_eq!(credits_for(1000, 0.5, 2.0), 1000);
        assert_eq!(credits_for(1000, f64::NAN, 2.0), 0);
        assert_eq!(credits_for(1000, -1.0, 2.0), 0);
        assert_eq!(credits_for(1000, 7.0, 2.0), 2000);
        assert_eq!(credits_for(1000, 1.0, f64::NAN), 0);
        assert_eq!(credits_for(1000, 1.0, -3.0), 0);
        assert_eq!(credits_for(u64::MAX, 1.0, f64::INFINITY), u64::MAX);
        assert_eq!(credits_for(3, 0.5, 1.0), 1);
    }

    #[test]
    fn saturated_postings_still_balance() {
        let receipt = Receipt {
            run_id: "r".into(),
            round: 0,
            worker: WorkerId([1; 32]),
            delta_hash: Hash32([2; 32]),
            tokens: 1,
            score: 1.0,
            credits: u64::MAX,
            verdict: ACCEPTED.into(),
        };
        let p = postings(&receipt);
        assert_eq!(p[0].amount + p[1].amount, 0);
    }
}
