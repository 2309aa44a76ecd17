//! The worker's side of the ledger: the coordinator key it pinned on first contact, and the check of a
//! round's receipt (signed by that key, for this upload, included under the round's signed root) before
//! the worker believes its verdict.

use agora_ledger::{root_from_proof, InclusionProof, Receipt, RoundRoot, SignedReceipt};
use agora_protocol::{Hash32, WorkerId};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the coordinator key of a run is pinned, under the run's directory (`<data_dir>/runs/<run_id>`).
/// `agora ledger verify --pinned` reads the same file.
pub const PINNED_KEY_FILE: &str = "coordinator.key.pub";

pub fn pinned_key_path(run_dir: &Path) -> PathBuf {
    run_dir.join(PINNED_KEY_FILE)
}

/// Pins `presented` as the coordinator key of `run_id` on first contact (written atomically, hex on one
/// line); later, refuses a coordinator that presents another key. Returns the pinned key.
pub fn pin_coordinator_key(run_dir: &Path, run_id: &str, presented: &WorkerId) -> Result<WorkerId> {
    let path = pinned_key_path(run_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pinned: WorkerId = text
                .trim()
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{}: not a coordinator key ({e})", path.display()))?;
            if pinned != *presented {
                bail!(
                    "the coordinator of run {run_id} now presents key {}, but this worker pinned key {} on first \
                     contact: refusing to trust it; remove {} only if you know why the key changed",
                    presented.hex(),
                    pinned.hex(),
                    path.display()
                );
            }
            Ok(pinned)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(run_dir).with_context(|| format!("{}: cannot create", run_dir.display()))?;
            crate::state::write_atomically(run_dir, PINNED_KEY_FILE, format!("{}\n", presented.hex()).as_bytes())?;
            tracing::info!(run = run_id, key = presented.short(), "pinned the coordinator's key");
            Ok(*presented)
        }
        Err(e) => Err(e).with_context(|| format!("{}: cannot read the pinned coordinator key", path.display())),
    }
}

/// What a receipt must be about: this run, this round, this worker, this upload.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub run_id: &'a str,
    pub round: u64,
    pub worker: &'a WorkerId,
    pub delta_hash: &'a Hash32,
}

/// The three JSON values of a `ReceiptResponse::Judged`, typed.
pub fn parse_judged(
    receipt: &serde_json::Value,
    proof: &serde_json::Value,
    root: &serde_json::Value,
) -> Result<(SignedReceipt, InclusionProof, RoundRoot)> {
    let receipt: SignedReceipt =
        serde_json::from_value(receipt.clone()).context("the coordinator's receipt is malformed")?;
    let proof: InclusionProof =
        serde_json::from_value(proof.clone()).context("the receipt's inclusion proof is malformed")?;
    let root: RoundRoot = serde_json::from_value(root.clone()).context("the round's signed root is malformed")?;
    Ok((receipt, proof, root))
}

/// Checks a judged upload's receipt before its verdict is believed: the receipt and the round's root are
/// signed by the pinned coordinator key, the receipt is about `expected`, and the inclusion proof leads
/// from the receipt to the root. Returns the receipt; any failure names what did not verify.
pub fn verify_receipt(
    pinned: &WorkerId,
    expected: &Expected,
    signed: &SignedReceipt,
    proof: &InclusionProof,
    root: &RoundRoot,
) -> Result<Receipt> {
    let r = &signed.receipt;
    let round = expected.round;
    signed.verify(pinned).with_context(|| {
        format!("round {round}: the receipt's signature does not verify against the pinned coordinator key")
    })?;
    root.verify(pinned).with_context(|| {
        format!("round {round}: the round root's signature does not verify against the pinned coordinator key")
    })?;
    if r.run_id != expected.run_id {
        bail!("round {round}: the receipt is for run {:?}, not this run ({:?})", r.run_id, expected.run_id);
    }
    if r.round != round {
        bail!("round {round}: the receipt is for round {}", r.round);
    }
    if r.worker != *expected.worker {
        bail!(
            "round {round}: the receipt is for worker {}, not this worker ({})",
            r.worker.hex(),
            expected.worker.hex()
        );
    }
    if r.delta_hash != *expected.delta_hash {
        bail!(
            "round {round}: the receipt is for upload {}, not the one the coordinator received ({})",
            r.delta_hash,
            expected.delta_hash
        );
    }
    if root.run_id != expected.run_id || root.round != round {
        bail!("round {round}: the signed root is for run {:?} round {}, not this round", root.run_id, root.round);
    }
    if proof.leaf_count != root.receipts {
        bail!(
            "round {round}: the inclusion proof is for a tree of {} receipts, but the signed root covers {}",
            proof.leaf_count,
            root.receipts
        );
    }
    if root_from_proof(&r.digest(), proof) != Some(root.root.0) {
        bail!("round {round}: the inclusion proof does not lead from the receipt to the round's signed root");
    }
    Ok(r.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_ledger::inclusion_proof;
    use agora_protocol::Identity;

    struct Fixture {
        coordinator: Identity,
        worker: WorkerId,
        delta: Hash32,
        receipts: Vec<SignedReceipt>,
        root: RoundRoot,
    }

    fn receipt(worker: WorkerId, delta: Hash32, verdict: &str) -> Receipt {
        Receipt {
            run_id: "run-1".into(),
            round: 4,
            worker,
            delta_hash: delta,
            tokens: 1000,
            score: 0.93,
            credits: if verdict == "accepted" { 1234 } else { 0 },
            verdict: verdict.into(),
        }
    }

    fn fixture() -> Fixture {
        let coordinator = Identity::generate().unwrap();
        let worker = Identity::generate().unwrap().id();
        let other = Identity::generate().unwrap().id();
        let delta = Hash32([7; 32]);
        let receipts = vec![
            receipt(other, Hash32([1; 32]), "norm").sign(&coordinator),
            receipt(worker, delta, "accepted").sign(&coordinator),
            receipt(Identity::generate().unwrap().id(), Hash32([2; 32]), "accepted").sign(&coordinator),
        ];
        let leaves: Vec<[u8; 32]> = receipts.iter().map(|r| r.receipt.digest()).collect();
        let root = RoundRoot::signed("run-1", 4, &leaves, &coordinator);
        Fixture { coordinator, worker, delta, receipts, root }
    }

    impl Fixture {
        fn expected(&self) -> Expected<'_> {
            Expected { run_id: "run-1", round: 4, worker: &self.worker, delta_hash: &self.delta }
        }
        fn proof(&self, index: usize) -> InclusionProof {
            let leaves: Vec<[u8; 32]> = self.receipts.iter().map(|r| r.receipt.digest()).collect();
            inclusion_proof(&leaves, index).unwrap()
        }
        fn check(&self, signed: &SignedReceipt, proof: &InclusionProof) -> Result<Receipt> {
            verify_receipt(&self.coordinator.id(), &self.expected(), signed, proof, &self.root)
        }
    }

    fn fails(result: Result<Receipt>, needle: &str) {
        let err = format!("{:#}", result.expect_err("should not verify"));
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }

    #[test]
    fn a_genuine_receipt_verifies_even_after_a_json_round_trip() {
        let f = fixture();
        let r = f.check(&f.receipts[1], &f.proof(1)).unwrap();
        assert!(r.accepted());
        assert_eq!(r.credits, 1234);
        let json = |v: String| serde_json::from_str::<serde_json::Value>(&v).unwrap();
        let (signed, proof, root) = parse_judged(
            &json(serde_json::to_string(&f.receipts[1]).unwrap()),
            &json(serde_json::to_string(&f.proof(1)).unwrap()),
            &json(serde_json::to_string(&f.root).unwrap()),
        )
        .unwrap();
        let r = verify_receipt(&f.coordinator.id(), &f.expected(), &signed, &proof, &root).unwrap();
        assert_eq!(r.score, 0.93);
    }

    #[test]
    fn a_tampered_verdict_fails() {
        let f = fixture();
        let mut forged = f.receipts[1].clone();
        forged.receipt.verdict = "copy".into();
        forged.receipt.credits = 0;
        fails(f.check(&forged, &f.proof(1)), "receipt's signature");
    }

    #[test]
    fn a_wrong_key_fails() {
        let f = fixture();
        let impostor = Identity::generate().unwrap();
        fails(
            verify_receipt(&impostor.id(), &f.expected(), &f.receipts[1], &f.proof(1), &f.root),
            "receipt's signature",
        );
        // The receipt re-signed by the impostor still fails on the root.
        let resigned = f.receipts[1].receipt.sign(&impostor);
        fails(verify_receipt(&impostor.id(), &f.expected(), &resigned, &f.proof(1), &f.root), "round root's signature");
    }

    #[test]
    fn a_receipt_for_another_worker_or_upload_fails() {
        let f = fixture();
        fails(f.check(&f.receipts[0], &f.proof(0)), "for worker");
        let mut expected = f.expected();
        let other_delta = Hash32([9; 32]);
        expected.delta_hash = &other_delta;
        fails(verify_receipt(&f.coordinator.id(), &expected, &f.receipts[1], &f.proof(1), &f.root), "for upload");
        let mut expected = f.expected();
        expected.round = 5;
        fails(verify_receipt(&f.coordinator.id(), &expected, &f.receipts[1], &f.proof(1), &f.root), "for round 4");
        let mut expected = f.expected();
        expected.run_id = "run-2";
        fails(verify_receipt(&f.coordinator.id(), &expected, &f.receipts[1], &f.proof(1), &f.root), "not this run");
    }

    #[test]
    fn a_proof_for_another_leaf_or_tree_fails() {
        let f = fixture();
        fails(f.check(&f.receipts[1], &f.proof(2)), "does not lead");
        fails(f.check(&f.receipts[1], &f.proof(0)), "does not lead");
        let mut short = f.proof(1);
        short.leaf_count = 2;
        fails(f.check(&f.receipts[1], &short), "tree of 2 receipts");
        // A receipt signed by the coordinator but left out of the round's root.
        let mut outside = receipt(f.worker, f.delta, "accepted");
        outside.tokens = 2000;
        let outside = outside.sign(&f.coordinator);
        fails(f.check(&outside, &f.proof(1)), "does not lead");
    }

    #[test]
    fn the_key_is_pinned_on_first_contact_and_a_new_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("runs").join("run-1");
        let a = Identity::generate().unwrap().id();
        let b = Identity::generate().unwrap().id();
        assert_eq!(pin_coordinator_key(&run_dir, "run-1", &a).unwrap(), a);
        let text = std::fs::read_to_string(run_dir.join("coordinator.key.pub")).unwrap();
        assert_eq!(text, format!("{}\n", a.hex()));
        assert_eq!(pin_coordinator_key(&run_dir, "run-1", &a).unwrap(), a);
        let err = format!("{:#}", pin_coordinator_key(&run_dir, "run-1", &b).unwrap_err());
        assert!(err.contains(&b.hex()) && err.contains(&a.hex()) && err.contains("coordinator.key.pub"), "{err}");
        assert_eq!(std::fs::read_to_string(run_dir.join("coordinator.key.pub")).unwrap(), text);
    }
}
