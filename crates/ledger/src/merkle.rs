//! Merkle tree over receipt digests. Same shape as RFC 6962 (an odd node is carried up, never duplicated,
//! so distinct leaf lists cannot share a root), with blake3 derive_key domain separation.

use agora_protocol::Hash32;
use serde::{Deserialize, Serialize};

/// Proof that one leaf is in a tree of `leaf_count` leaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub index: u64,
    pub leaf_count: u64,
    /// Bottom-up sibling hashes; levels where the node is carried up have none.
    pub siblings: Vec<Hash32>,
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("agora-ledger v1 node");
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

fn next_level(level: &[[u8; 32]]) -> Vec<[u8; 32]> {
    level.chunks(2).map(|pair| if let [l, r] = pair { node(l, r) } else { pair[0] }).collect()
}

/// Root over leaf digests (already domain-separated, so used as-is).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.is_empty() {
        return *blake3::Hasher::new_derive_key("agora-ledger v1 empty").finalize().as_bytes();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level[0]
}

/// Proof for `leaves[index]`; None when `index` is out of range.
pub fn inclusion_proof(leaves: &[[u8; 32]], index: usize) -> Option<InclusionProof> {
    if index >= leaves.len() {
        return None;
    }
    let mut siblings = Vec::new();
    let mut level = leaves.to_vec();
    let mut i = index;
    while level.len() > 1 {
        // i ^ 1 is the partner; it is missing only for an unpaired last node, which is carried up.
        if let Some(sibling) = level.get(i ^ 1) {
            siblings.push(Hash32(*sibling));
        }
        level = next_level(&level);
        i /= 2;
    }
    Some(InclusionProof { index: index as u64, leaf_count: leaves.len() as u64, siblings })
}

/// Recomputes the root from a leaf and its proof; None when the proof's shape is inconsistent
/// (leaf_count 0, index out of range, too few or too many siblings).
pub fn root_from_proof(leaf: &[u8; 32], proof: &InclusionProof) -> Option<[u8; 32]> {
    let (mut i, mut n) = (proof.index, proof.leaf_count);
    if i >= n {
        return None;
    }
    let mut siblings = proof.siblings.iter();
    let mut acc = *leaf;
    while n > 1 {
        if i % 2 == 1 {
            acc = node(&siblings.next()?.0, &acc);
        } else if i + 1 < n {
            acc = node(&acc, &siblings.next()?.0);
        }
        i /= 2;
        // (n + 1) / 2 without overflow for untrusted n.
        n = n / 2 + n % 2;
    }
    siblings.next().is_none().then_some(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_trees_have_the_expected_shape() {
        let [a, b, c] = [[1u8; 32], [2u8; 32], [3u8; 32]];
        assert_eq!(merkle_root(&[a]), a);
        assert_eq!(merkle_root(&[a, b]), node(&a, &b));
        assert_eq!(merkle_root(&[a, b, c]), node(&node(&a, &b), &c));
        assert_eq!(inclusion_proof(&[a, b, c], 2).unwrap().siblings, vec![Hash32(node(&a, &b))]);
        assert!(inclusion_proof(&[a], 1).is_none());
    }

    #[test]
    fn huge_leaf_count_does_not_overflow() {
        let proof = InclusionProof { index: u64::MAX - 1, leaf_count: u64::MAX, siblings: vec![] };
        assert_eq!(root_from_proof(&[0; 32], &proof), None);
    }
}
