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
}

impl FromStr for Behaviour {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "honest" => Behaviour::Honest,
            "nan" => Behaviour::NonFinite,
            "scaled" => Behaviour::Scaled,
            "noise" => Behaviour::Noise,
            "sign-flip" => Behaviour::SignFlip,
            "free-ride" => Behaviour::FreeRide,
            "replay" => Behaviour::Replay,
            "other-data" => Behaviour::OtherData,
            "chain-lie" => Behaviour::ChainLie,
            other => match other.strip_prefix("copy:") {
                Some(dir) => Behaviour::Copy(PathBuf::from(dir)),
                None => bail!(
                    "unknown behaviour {other:?}: honest, nan, scaled, noise, sign-flip, copy:BLOB_DIR, free-ride, \
                     replay, other-data, chain-lie"
                ),
            },
        })
    }
}

pub struct Adversary {
    behaviour: Behaviour,
}

impl Adversary {
    pub fn new(behaviour: Behaviour) -> Self {
        if behaviour != Behaviour::Honest {
            tracing::warn!(?behaviour, "this worker misbehaves on purpose (adversarial test build)");
        }
        Adversary { behaviour }
    }

    pub fn skips_training(&self) -> bool {
        self.behaviour == Behaviour::FreeRide
    }

    /// The data it actually trains on.
    pub fn training_data(&mut self, assigned: Shard) -> Shard {
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
