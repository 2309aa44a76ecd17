use agora_ledger::*;
use agora_protocol::{Hash32, Identity, WorkerId};
use proptest::prelude::*;

const RUN: &str = "run-1";

fn leaf(i: u32) -> [u8; 32] {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

fn leaves(n: u32) -> Vec<[u8; 32]> {
    (0..n).map(leaf).collect()
}

fn coordinator() -> Identity {
    Identity::from_secret([200; 32])
}

fn worker(i: u8) -> Identity {
    Identity::from_secret([i + 1; 32])
}

fn receipt(round: u64, w: &WorkerId, tokens: u64, score: f64, verdict: &str) -> Receipt {
    let credits = if verdict == ACCEPTED { credits_for(tokens, score, 1.5) } else { 0 };
    Receipt {
        run_id: RUN.into(),
        round,
        worker: *w,
        delta_hash: Hash32(*blake3::hash(&[round as u8, w.0[0]]).as_bytes()),
        tokens,
        score,
        credits,
        verdict: verdict.into(),
    }
}

/// 3 rounds × 4 workers; worker 3 is rejected in round 1. Returns the statements of all 4 workers.
fn statements() -> Vec<WorkerStatement> {
    let coord = coordinator();
    let workers: Vec<WorkerId> = (0..4).map(|i| worker(i).id()).collect();
    let mut out: Vec<WorkerStatement> = workers
        .iter()
        .map(|w| WorkerStatement {
            run_id: RUN.into(),
            coordinator: coord.id(),
            worker: *w,
            balance: 0,
            roots: vec![],
            receipts: vec![],
        })
        .collect();
    for round in 0..3u64 {
        let signed: Vec<SignedReceipt> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let verdict = if round == 1 && i == 3 { "copy" } else { ACCEPTED };
                receipt(round, w, 1000 + 10 * i as u64, 0.25 * i as f64 + 0.1, verdict).sign(&coord)
            })
            .collect();
        let digests: Vec<[u8; 32]> = signed.iter().map(|s| s.receipt.digest()).collect();
        let root = RoundRoot::signed(RUN, round, &digests, &coord);
        for (i, s) in signed.into_iter().enumerate() {
            let st = &mut out[i];
            st.balance += s.receipt.credits;
            st.roots.push(root.clone());
            st.receipts.push(ProvenReceipt { receipt: s, proof: inclusion_proof(&digests, i).unwrap() });
        }
    }
    out
}

fn rejects(statement: &WorkerStatement, pinned: Option<&WorkerId>, needle: &str) {
    let err = format!("{:#}", verify_statement(statement, pinned).unwrap_err());
    assert!(err.contains(needle), "error {err:?} should mention {needle:?}");
}

#[test]
fn every_proof_verifies_for_1_to_33_leaves() {
    for n in 1..=33 {
        let ls = leaves(n);
        let root = merkle_root(&ls);
        for (i, l) in ls.iter().enumerate() {
            let proof = inclusion_proof(&ls, i).unwrap();
            assert_eq!(root_from_proof(l, &proof), Some(root), "n={n} i={i}");
        }
        assert!(inclusion_proof(&ls, n as usize).is_none());
    }
}

#[test]
fn tampered_proofs_fail() {
    let ls = leaves(11);
    let root = merkle_root(&ls);
    for i in 0..ls.len() {
        let proof = inclusion_proof(&ls, i).unwrap();
        assert_ne!(root_from_proof(&leaf(99), &proof), Some(root), "changed leaf");
        for s in 0..proof.siblings.len() {
            let mut p = proof.clone();
            p.siblings[s].0[0] ^= 1;
            assert_ne!(root_from_proof(&ls[i], &p), Some(root), "changed sibling");
        }
        for index in [(i as u64 + 1) % 11, 11, u64::MAX] {
            let p = InclusionProof { index, ..proof.clone() };
            assert_ne!(root_from_proof(&ls[i], &p), Some(root), "wrong index {index}");
        }
        // A leaf_count that changes the tree's depth or excludes the index is malformed. (One that keeps
        // the same sibling path, e.g. 10 for index 0 of 11, recomputes the same root: the signed
        // RoundRoot::receipts pins the real count, and verify_statement checks it.)
        for leaf_count in [0, i as u64, 1000] {
            let p = InclusionProof { leaf_count, ..proof.clone() };
            assert_eq!(root_from_proof(&ls[i], &p), None, "wrong leaf_count {leaf_count}");
        }
        let mut extra = proof.clone();
        extra.siblings.push(Hash32(leaf(0)));
        assert_eq!(root_from_proof(&ls[i], &extra), None);
    }
}

#[test]
fn distinct_leaf_lists_have_distinct_roots() {
    let [a, b, c] = [leaf(0), leaf(1), leaf(2)];
    assert_ne!(merkle_root(&[a, b, c]), merkle_root(&[a, b, c, c]));
    assert_ne!(merkle_root(&[a, b]), merkle_root(&[a, b, b]));
    assert_ne!(merkle_root(&[]), merkle_root(&[a]));
    assert_ne!(merkle_root(&[a, b]), merkle_root(&[b, a]));
}

#[test]
fn receipts_sign_and_tampering_breaks_them() {
    let coord = coordinator();
    let signed = receipt(4, &worker(0).id(), 500, 0.5, ACCEPTED).sign(&coord);
    signed.verify(&coord.id()).unwrap();
    assert!(signed.verify(&worker(1).id()).is_err());
    let tampers: Vec<fn(&mut Receipt)> = vec![
        |r| r.score = 0.75,
        |r| r.credits += 1,
        |r| r.worker = worker(1).id(),
        |r| r.round += 1,
        |r| r.tokens += 1,
        |r| r.run_id.push('x'),
        |r| r.verdict = "copy".into(),
        |r| r.delta_hash.0[31] ^= 1,
    ];
    for tamper in tampers {
        let mut t = signed.clone();
        tamper(&mut t.receipt);
        assert!(t.verify(&coord.id()).is_err());
    }
}

#[test]
fn round_roots_sign_and_verify() {
    let coord = coordinator();
    let root = RoundRoot::signed(RUN, 2, &leaves(5), &coord);
    assert_eq!(root.receipts, 5);
    root.verify(&coord.id()).unwrap();
    assert!(root.verify(&worker(0).id()).is_err());
    assert!(RoundRoot { receipts: 6, ..root.clone() }.verify(&coord.id()).is_err());
    assert!(RoundRoot { round: 3, ..root }.verify(&coord.id()).is_err());
}

#[test]
fn good_statements_verify() {
    let coord = coordinator().id();
    for (i, st) in statements().iter().enumerate() {
        let report = verify_statement(st, Some(&coord)).unwrap();
        assert_eq!((report.receipts, report.rounds, report.credits), (3, 3, st.balance));
        assert_eq!((report.accepted, report.rejected), if i == 3 { (2, 1) } else { (3, 0) });
        // The statement survives the wire: JSON round trip keeps every digest and signature intact.
        let json = serde_json::to_string(st).unwrap();
        let back: WorkerStatement = serde_json::from_str(&json).unwrap();
        assert_eq!(verify_statement(&back, None).unwrap(), report);
    }
}

#[test]
fn forged_receipt_signature_is_rejected() {
    let mut st = statements().remove(0);
    st.receipts[1].receipt = st.receipts[1].receipt.receipt.sign(&worker(0));
    rejects(&st, None, "receipt #1 (round 1) was forged");
    let mut st = statements().remove(0);
    st.receipts[2].receipt.receipt.credits += 1_000_000;
    st.balance += 1_000_000;
    rejects(&st, None, "receipt #2 (round 2) was forged");
}

#[test]
fn receipt_moved_to_another_worker_is_rejected() {
    let mut all = statements();
    let stolen = all[1].receipts[0].clone();
    let st = &mut all[0];
    st.receipts[0] = stolen.clone();
    st.balance = st.receipts.iter().map(|p| p.receipt.receipt.credits).sum();
    rejects(st, None, "belongs to worker");
    // Relabelling the worker field instead breaks the coordinator's signature.
    st.receipts[0].receipt.receipt.worker = st.worker;
    rejects(st, None, "forged or altered");
}

#[test]
fn inflated_balance_is_rejected() {
    let mut st = statements().remove(2);
    st.balance += 1;
    rejects(&st, None, "receipts add up to");
}

#[test]
fn root_signed_by_another_key_is_rejected() {
    let mut st = statements().remove(0);
    let digests = [st.receipts[0].receipt.receipt.digest()];
    st.roots[0] = RoundRoot::signed(RUN, 0, &digests, &worker(0));
    rejects(&st, None, "round 0 root is not signed by coordinator");

    // Re-signing everything with another key only passes when nobody pins the real coordinator.
    let mut st = statements().remove(0);
    let impostor = worker(9);
    st.coordinator = impostor.id();
    for r in &mut st.roots {
        *r = RoundRoot { signature: impostor.sign(&RoundRoot::digest(RUN, r.round, &r.root, r.receipts)), ..r.clone() };
    }
    for p in &mut st.receipts {
        p.receipt = p.receipt.receipt.sign(&impostor);
    }
    verify_statement(&st, None).unwrap();
    rejects(&st, Some(&coordinator().id()), "pinned coordinator key");
}

#[test]
fn missing_root_is_rejected() {
    let mut st = statements().remove(1);
    st.roots.remove(1);
    rejects(&st, None, "no signed root for round 1");
}

#[test]
fn duplicate_round_and_bad_proofs_are_rejected() {
    let mut st = statements().remove(1);
    st.receipts.push(st.receipts[0].clone());
    st.balance += st.receipts[0].receipt.receipt.credits;
    rejects(&st, None, "second receipt for round 0");

    let mut st = statements().remove(1);
    st.receipts[0].proof.index = 0;
    rejects(&st, None, "does not lead to the signed root of round 0");

    let mut st = statements().remove(1);
    st.receipts[0].proof.leaf_count = 3;
    rejects(&st, None, "proof is for a tree of 3 receipts, but round 0 was signed with 4");

    let mut st = statements().remove(1);
    st.receipts[0].proof.siblings.pop();
    rejects(&st, None, "malformed");

    let mut st = statements().remove(1);
    st.roots.push(st.roots[0].clone());
    rejects(&st, None, "two signed roots");
}

#[test]
fn postings_balance() {
    let r = receipt(0, &worker(0).id(), 1000, 0.5, ACCEPTED);
    let p = postings(&r);
    assert_eq!(p.len(), 2);
    assert_eq!(p.iter().map(|p| p.amount).sum::<i64>(), 0);
    // A receipt books its credits as pending; resolving them posts (to the worker) or voids (to the pool).
    assert_eq!(p[0], Posting { account: agora_ledger::pending_account(&r.worker), amount: r.credits as i64 });
    assert_eq!(p[1].account, pool_account(RUN));
    for (post, to) in [(true, worker_account(&r.worker)), (false, pool_account(RUN))] {
        let q = agora_ledger::resolution_postings(RUN, &r.worker, r.credits, post);
        assert_eq!(q.iter().map(|p| p.amount).sum::<i64>(), 0);
        assert_eq!(q[0], Posting { account: agora_ledger::pending_account(&r.worker), amount: -(r.credits as i64) });
        assert_eq!(q[1], Posting { account: to, amount: r.credits as i64 });
    }
    assert!(agora_ledger::resolution_postings(RUN, &r.worker, 0, true).is_empty());
    assert_eq!(pool_account("x"), "pool:x");
    assert!(worker_account(&r.worker).starts_with("worker:") && worker_account(&r.worker).len() == 7 + 64);
    assert!(postings(&receipt(0, &worker(0).id(), 1000, 0.5, "copy")).is_empty());
}

#[test]
fn credits_bounds() {
    assert_eq!(credits_for(1000, -0.5, 1.0), 0);
    assert_eq!(credits_for(1000, f64::NAN, 1.0), 0);
    assert_eq!(credits_for(1000, 3.0, 1.0), 1000);
    assert_eq!(credits_for(1000, 0.5, 1.0), 500);
    assert_eq!(credits_for(0, 1.0, 1.0), 0);
    assert_eq!(credits_for(u64::MAX, 1.0, 1e9), u64::MAX);
}

proptest! {
    #[test]
    fn proof_round_trip(n in 1usize..200, pick in any::<prop::sample::Index>(), seed in any::<u32>()) {
        let ls: Vec<[u8; 32]> = (0..n as u32).map(|i| leaf(i ^ seed)).collect();
        let i = pick.index(n);
        let proof = inclusion_proof(&ls, i).unwrap();
        prop_assert_eq!(root_from_proof(&ls[i], &proof), Some(merkle_root(&ls)));
    }

    #[test]
    fn any_sibling_byte_change_fails(n in 2usize..100, pick in any::<prop::sample::Index>(),
                                     which in any::<prop::sample::Index>(), byte in 0usize..32, flip in 1u8..=255) {
        let ls = leaves(n as u32);
        let i = pick.index(n);
        let mut proof = inclusion_proof(&ls, i).unwrap();
        let s = which.index(proof.siblings.len());
        proof.siblings[s].0[byte] ^= flip;
        prop_assert_ne!(root_from_proof(&ls[i], &proof), Some(merkle_root(&ls)));
    }

    #[test]
    fn arbitrary_proofs_never_panic(leaf_bytes in any::<[u8; 32]>(), index in any::<u64>(), leaf_count in any::<u64>(),
                                    siblings in prop::collection::vec(any::<[u8; 32]>(), 0..70)) {
        let proof = InclusionProof { index, leaf_count, siblings: siblings.into_iter().map(Hash32).collect() };
        let _ = root_from_proof(&leaf_bytes, &proof);
    }

    #[test]
    fn receipt_digest_survives_json(score in any::<f64>().prop_filter("finite", |s| s.is_finite()), tokens in any::<u64>()) {
        let r = Receipt { score, tokens, ..receipt(1, &WorkerId([3; 32]), 1, 0.5, ACCEPTED) };
        let back: Receipt = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        prop_assert_eq!(back.digest(), r.digest());
    }
}
