//! Test-only misbehaviours, compiled only with the `adversary` feature: what the adversarial suite's
//! cheating worker does instead of (or on top of) honest work. Each one is a hook at the point in the
//! worker's round where a real cheater would deviate.

use agora_data::Shard;
use agora_diloco::codec::{self, Expected};
use agora_diloco::{CompressionConfig, FragmentPlan};
use agora_protocol::{decode_tensors, encode_tensors, TensorSpec};
use agora_verify::chain;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tch::Tensor;

#[derive(Debug, Clone, Default, PartialEq)]
pub enum Behaviour {
    #[default]
    Honest,
    /// Sends a Δ containing NaN and ±inf.
    NonFinite,
    /// Sends 100 × its honest Δ.
    Scaled,
    /// Sends 0.05 × its honest Δ (small uploads that once lowered the norm reference: issue 11,
    /// finding 2).
    Tiny,
    /// Sends Gaussian noise with the norm of its honest Δ.
    Noise,
    /// Sends −Δ.
    SignFlip,
    /// Trains, then sends a copy of another worker's Δ for the same round, read from the blob store at
    /// this path (a leaked bucket, or a second identity of the same operator).
    Copy(PathBuf),
    /// Does no training and sends a zero Δ.
    FreeRide,
    /// Trains (so its chain is honest), then re-sends an old applied Δ of another worker, fetched from
    /// the coordinator's public contributions and blobs (a zero Δ in round 0, when there is none yet).
    Replay,
    /// Trains on other data than its assignment: its unit's tokens in reverse order.
    OtherData,
    /// Trains honestly but commits to states it never reached (each boundary's weights perturbed).
    ChainLie,
    /// The minimal liar: trains honestly except that it skips segment 0 of every round, so its chain
    /// claims the untrained state at boundary 1 (a spot check of segment 0 fails, the others pass).
    Lazy,
    /// Trains honestly and commits its honest chain, but uploads 1.5 × its Δ: a plausible upload (within
    /// the norm limit, along the consensus, a larger held-out gain) that is not the compression of its
    /// chain's end (issue 11, item 3: the end link).
    Inflate,
    /// Joins, takes work every round and heartbeats, but never trains or uploads (issue 11, finding 7).
    Idle,
}

impl FromStr for Behaviour {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "honest" => Behaviour::Honest,
            "nan" => Behaviour::NonFinite,
            "scaled" => Behaviour::Scaled,
            "tiny" => Behaviour::Tiny,
            "noise" => Behaviour::Noise,
            "sign-flip" => Behaviour::SignFlip,
            "free-ride" => Behaviour::FreeRide,
            "replay" => Behaviour::Replay,
            "other-data" => Behaviour::OtherData,
            "chain-lie" => Behaviour::ChainLie,
            "lazy" => Behaviour::Lazy,
            "inflate" => Behaviour::Inflate,
            "idle" => Behaviour::Idle,
            other => match other.strip_prefix("copy:") {
                Some(dir) => Behaviour::Copy(PathBuf::from(dir)),
                None => bail!(
                    "unknown behaviour {other:?}: honest, nan, scaled, tiny, noise, sign-flip, copy:BLOB_DIR, \
                     free-ride, replay, other-data, chain-lie, lazy, inflate, idle"
                ),
            },
        })
    }
}

pub struct Adversary {
    behaviour: Behaviour,
    /// Segments of the current round asked about so far ([`Adversary::skips_training`] is asked once
    /// per segment, after [`Adversary::training_data`] once per round).
    segment: std::cell::Cell<u64>,
}

impl Adversary {
    pub fn new(behaviour: Behaviour) -> Self {
        if behaviour != Behaviour::Honest {
            tracing::warn!(?behaviour, "this worker misbehaves on purpose (adversarial test build)");
        }
        Adversary { behaviour, segment: std::cell::Cell::new(0) }
    }

    /// Asked once per segment of the round, in order: whether to leave that segment untrained.
    pub fn skips_training(&self) -> bool {
        let segment = self.segment.get();
        self.segment.set(segment + 1);
        match self.behaviour {
            Behaviour::FreeRide => true,
            Behaviour::Lazy => segment == 0,
            _ => false,
        }
    }

    /// Whether it holds work without ever delivering it.
    pub fn never_delivers(&self) -> bool {
        self.behaviour == Behaviour::Idle
    }

    /// The data it actually trains on.
    pub fn training_data(&mut self, assigned: Shard) -> Shard {
        // A new round: its segments are counted from 0.
        self.segment.set(0);
        if self.behaviour != Behaviour::OtherData {
            return assigned;
        }
        let mut tokens = assigned.tokens().to_vec();
        tokens.reverse();
        let vocab = tokens.iter().max().map_or(1, |&m| m as usize + 1);
        Shard::from_tokens(tokens, assigned.tokenizer_hash, vocab).expect("the unit's own token ids")
    }

    /// What it writes into its chain instead of the state it reached.
    pub fn committed_state(&mut self, bytes: &mut Vec<u8>, boundary: usize, specs: &[TensorSpec]) {
        if self.behaviour != Behaviour::ChainLie || boundary == 0 {
            return;
        }
        let (mut tensors, meta) = decode_tensors(bytes, None).expect("own state decodes");
        for t in tensors.iter_mut().filter(|t| t.name.starts_with("w.")) {
            for (i, v) in t.data.iter_mut().enumerate() {
                *v += 1e-3 * (((i * 7919 + boundary * 104_729) % 1000) as f32 / 1000.0 - 0.5);
            }
        }
        assert_eq!(tensors.len(), 3 * specs.len());
        *bytes = encode_tensors(&tensors, &meta);
    }

    /// Replaces the honest local weights (Δ = global − local) before compression.
    pub fn transform(&mut self, global: &[Tensor], local: &mut [Tensor]) {
        tch::no_grad(|| match self.behaviour {
            Behaviour::NonFinite => {
                let _ = local[0].get(0).fill_(f64::NAN);
                let _ = local[1].get(0).fill_(f64::INFINITY);
            }
            Behaviour::Scaled => {
                for (l, g) in local.iter_mut().zip(global) {
                    *l = g - (g - &*l) * 100.0;
                }
            }
            Behaviour::Tiny => {
                for (l, g) in local.iter_mut().zip(global) {
                    *l = g - (g - &*l) * 0.05;
                }
            }
            Behaviour::Inflate => {
                for (l, g) in local.iter_mut().zip(global) {
                    *l = g - (g - &*l) * 1.5;
                }
            }
            Behaviour::SignFlip => {
                for (l, g) in local.iter_mut().zip(global) {
                    *l = g + (g - &*l);
                }
            }
            Behaviour::Noise => {
                let norm = |ts: &[Tensor]| {
                    ts.iter().map(|t| t.square().sum(tch::Kind::Double).double_value(&[])).sum::<f64>().sqrt()
                };
                let delta: Vec<Tensor> = local.iter().zip(global).map(|(l, g)| g - l).collect();
                let noise: Vec<Tensor> = delta.iter().map(|d| d.randn_like()).collect();
                let scale = norm(&delta) / norm(&noise).max(1e-30);
                for ((l, g), n) in local.iter_mut().zip(global).zip(&noise) {
                    *l = g - n * scale;
                }
            }
            Behaviour::FreeRide => {
                for (l, g) in local.iter_mut().zip(global) {
                    *l = g.copy();
                }
            }
            _ => {}
        })
    }

    /// Replaces the encoded payload (copies and replays keep the metadata of this round's assignment).
    #[allow(clippy::too_many_arguments)]
    pub fn payload(
        &mut self,
        client: &crate::Client,
        config: &CompressionConfig,
        plan: &FragmentPlan,
        specs: &[TensorSpec],
        round: u64,
        metadata: &BTreeMap<String, String>,
        payload: &mut Vec<u8>,
    ) {
        let fragment = plan.synced_in(round);
        let fragment_specs = plan.specs(specs, fragment);
        let expected = Expected { config, fragment, specs: &fragment_specs };
        let decoded = |bytes: &[u8]| -> Option<Vec<Vec<f32>>> {
            let p = codec::parse(bytes, expected).ok()?;
            Some(codec::decode(config, &fragment_specs, &p).into_iter().map(|t| t.data).collect())
        };
        let replacement = match &self.behaviour {
            Behaviour::Replay => {
                let old = (round > 0)
                    .then(|| client.get_json::<Vec<agora_protocol::Contribution>>("/v1/contributions").ok())
                    .flatten()
                    .and_then(|all| all.into_iter().rev().find(|c| c.round + plan.count() as u64 == round))
                    .and_then(|c| client.blob(&c.delta_hash).ok())
                    .and_then(|(bytes, _)| {
                        let old_fragment = Expected { config, fragment, specs: &fragment_specs };
                        let p = codec::parse(&bytes, old_fragment).ok()?;
                        Some(codec::decode(config, &fragment_specs, &p).into_iter().map(|t| t.data).collect::<Vec<_>>())
                    });
                Some(
                    old.unwrap_or_else(|| {
                        fragment_specs.iter().map(|s| vec![0f32; s.shape.iter().product()]).collect()
                    }),
                )
            }
            Behaviour::Copy(dir) => {
                let own_unit = metadata.get(agora_protocol::messages::delta_meta::UNIT).cloned();
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let found = find_payload(dir, |bytes| {
                        let p = codec::parse(bytes, expected).ok()?;
                        let same_round =
                            p.metadata.get(agora_protocol::messages::delta_meta::ROUND) == Some(&round.to_string());
                        let other = p.metadata.get(agora_protocol::messages::delta_meta::UNIT) != own_unit.as_ref();
                        (same_round && other).then(|| decoded(bytes)).flatten()
                    });
                    if found.is_some() || Instant::now() > deadline {
                        break found;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            _ => None,
        };
        if let Some(delta) = replacement {
            let mut meta = metadata.clone();
            meta.remove(chain::CHAIN_META);
            if let Ok(p) = codec::parse(payload, expected) {
                meta = p.metadata;
            }
            *payload = codec::compress(config, fragment, &fragment_specs, &delta, None, &meta).0;
            tracing::warn!(round, behaviour = ?self.behaviour, "sending someone else's (or an old) pseudo-gradient");
        }
    }
}

/// The first blob under `dir` (two levels, content-addressed) that `accept` maps to something.
fn find_payload<T>(dir: &std::path::Path, mut accept: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
    for shard in std::fs::read_dir(dir).ok()?.flatten() {
        for file in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let Ok(bytes) = std::fs::read(file.path()) else { continue };
            if bytes.starts_with(b"AGDZ") {
                if let Some(found) = accept(&bytes) {
                    return Some(found);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Shard {
        Shard::from_tokens(vec![1, 2, 3, 4], [0u8; 32], 8).unwrap()
    }

    #[test]
    fn behaviours_parse_and_unknown_ones_list_them_all() {
        assert_eq!("tiny".parse::<Behaviour>().unwrap(), Behaviour::Tiny);
        assert_eq!("lazy".parse::<Behaviour>().unwrap(), Behaviour::Lazy);
        assert_eq!("scaled".parse::<Behaviour>().unwrap(), Behaviour::Scaled);
        assert_eq!("copy:/x".parse::<Behaviour>().unwrap(), Behaviour::Copy(PathBuf::from("/x")));
        let message = format!("{}", "bogus".parse::<Behaviour>().unwrap_err());
        for name in ["tiny", "lazy", "chain-lie", "free-ride"] {
            assert!(message.contains(name), "{message}");
        }
    }

    /// `lazy` skips the first segment of every round and trains the rest; the worker asks
    /// `training_data` once per round, then `skips_training` once per segment.
    #[test]
    fn lazy_skips_segment_zero_of_every_round() {
        let mut lazy = Adversary::new(Behaviour::Lazy);
        for _round in 0..3 {
            let _ = lazy.training_data(shard());
            let skipped: Vec<bool> = (0..4).map(|_| lazy.skips_training()).collect();
            assert_eq!(skipped, [true, false, false, false]);
        }
        let mut free = Adversary::new(Behaviour::FreeRide);
        let _ = free.training_data(shard());
        assert!((0..4).all(|_| free.skips_training()));
        let mut honest = Adversary::new(Behaviour::Honest);
        let _ = honest.training_data(shard());
        assert!((0..4).all(|_| !honest.skips_training()));
    }

    #[test]
    fn tiny_sends_a_twentieth_of_its_delta() {
        let global = vec![Tensor::from_slice(&[1.0f32, 2.0, 3.0])];
        let mut local = vec![Tensor::from_slice(&[0.0f32, 4.0, 3.0])];
        Adversary::new(Behaviour::Tiny).transform(&global, &mut local);
        let delta = Vec::<f32>::try_from(&global[0] - &local[0]).unwrap();
        for (got, want) in delta.iter().zip([0.05f32, -0.1, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{delta:?}");
        }
    }
}
