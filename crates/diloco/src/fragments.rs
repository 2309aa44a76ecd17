//! Streaming DiLoCo's fragments: the parameters split into strided groups of layers (layer l belongs to
//! fragment l mod F; the embedding to fragment 0, the final norm and output head to fragment F − 1). Round r
//! synchronises fragment r mod F only, so one upload carries about 1/F of the model and the peak bandwidth
//! drops F-fold; each fragment is still synchronised every F rounds.

use agora_protocol::TensorSpec;
use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentPlan {
    count: usize,
    /// Fragment of each tensor, in model order.
    of_tensor: Vec<usize>,
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

impl FragmentPlan {
    pub fn new(specs: &[TensorSpec], layers: usize, count: usize) -> Result<FragmentPlan> {
        if count == 0 {
            bail!("fragments must be at least 1");
        }
        if count > layers.max(1) {
            bail!("{count} fragments for a model of {layers} layers: every fragment needs at least one layer");
        }
        let of_tensor = specs
            .iter()
            .map(|s| match layer_of(&s.name) {
                Some(l) => l % count,
                None if s.name.starts_with("model.embed_tokens") => 0,
                None => count - 1,
            })
            .collect();
        Ok(FragmentPlan { count, of_tensor })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The fragment round `round` synchronises.
    pub fn synced_in(&self, round: u64) -> usize {
        (round % self.count as u64) as usize
    }

    /// Indices (into the model's tensor list) of a fragment's tensors.
    pub fn tensors(&self, fragment: usize) -> Vec<usize> {
        (0..self.of_tensor.len()).filter(|&i| self.of_tensor[i] == fragment).collect()
    }

    pub fn fragment_of(&self, tensor: usize) -> usize {
        self.of_tensor[tensor]
    }

    /// The specs of a fragment's tensors.
    pub fn specs(&self, all: &[TensorSpec], fragment: usize) -> Vec<TensorSpec> {
        self.tensors(fragment).into_iter().map(|i| all[i].clone()).collect()
    }

    /// The last round before `round` whose outer step changed `fragment`, if any.
    pub fn last_sync_before(&self, fragment: usize, round: u64) -> Option<u64> {
        let f = fragment as u64;
        let p = self.count as u64;
        (round > f).then(|| f + (round - 1 - f) / p * p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(layers: usize) -> Vec<TensorSpec> {
        let mut v = vec![TensorSpec { name: "model.embed_tokens.weight".into(), shape: vec![4, 2] }];
        for l in 0..layers {
            v.push(TensorSpec { name: format!("model.layers.{l}.mlp.up_proj.weight"), shape: vec![2, 2] });
        }
        v.push(TensorSpec { name: "model.norm.weight".into(), shape: vec![2] });
        v.push(TensorSpec { name: "lm_head.weight".into(), shape: vec![4, 2] });
        v
    }

    #[test]
    fn layers_are_strided_and_every_tensor_has_one_fragment() {
        let plan = FragmentPlan::new(&specs(4), 4, 2).unwrap();
        assert_eq!(plan.tensors(0), vec![0, 1, 3]);
        assert_eq!(plan.tensors(1), vec![2, 4, 5, 6]);
        let one = FragmentPlan::new(&specs(4), 4, 1).unwrap();
        assert_eq!(one.tensors(0).len(), 7);
        assert!(FragmentPlan::new(&specs(2), 2, 3).is_err());
    }

    #[test]
    fn last_sync_before_matches_a_scan() {
        let plan = FragmentPlan::new(&specs(3), 3, 3).unwrap();
        for round in 0..20u64 {
            for f in 0..3 {
                let scan = (0..round).rev().find(|q| plan.synced_in(*q) == f);
                assert_eq!(plan.last_sync_before(f, round), scan, "fragment {f} before round {round}");
            }
        }
    }
}
