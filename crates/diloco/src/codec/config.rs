//! The run file's `[compression]` section: how every pseudo-gradient of a run is encoded.

use crate::overlap::Overlap;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// fp32, as trained: lossless.
    #[serde(rename = "none")]
    None,
    /// bfloat16, round to nearest even: relative error ≤ 2⁻⁸.
    #[serde(rename = "bf16")]
    Bf16,
    /// Symmetric 8-bit integers, one f32 scale per `block` values: error ≤ max|block| / 254.
    #[serde(rename = "int8")]
    Int8,
    /// Symmetric 4-bit integers (−7..7), one f32 scale per `block` values: error ≤ max|block| / 14.
    #[serde(rename = "int4")]
    Int4,
    /// The `keep` largest-magnitude values of every `chunk` consecutive values.
    #[serde(rename = "topk")]
    TopK,
    /// DeMo-style: DCT-II of every `chunk` consecutive values, keep the `keep` largest coefficients.
    #[serde(rename = "dct")]
    Dct,
}

/// How the values kept by `topk` and `dct` travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Values {
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
    /// Sign and one magnitude bit: two magnitudes (the mean of the small and of the large values, split at
    /// their mean) per group of `block` chunks.
    #[serde(rename = "2bit")]
    TwoBit,
    /// Sign only, times the group's mean magnitude.
    #[serde(rename = "sign")]
    Sign,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    pub codec: Codec,
    /// int8/int4: values per scale. topk/dct with `2bit` or `sign` values: chunks per scale group.
    pub block: usize,
    /// topk/dct: values per chunk (the last chunk of a tensor may be shorter).
    pub chunk: usize,
    /// topk/dct: values (or coefficients) kept per chunk; density = keep / chunk.
    pub keep: usize,
    /// topk/dct: the kept values' encoding.
    pub values: Values,
    /// Keep what compression dropped on the worker (in its weights: it starts the next round from
    /// global − decay · residual) so that it is sent later. Off by default; for `topk` and `dct` turn it on
    /// (with the default decay 0.5 it beat no feedback on tinyshakespeare; with decay 1 it was worse, see
    /// BENCHMARKS.md, "Pseudo-gradient codecs").
    pub error_feedback: bool,
    /// The kept residual is multiplied by this before the worker starts from it (1 = keep all of it).
    pub feedback_decay: f64,
    /// Streaming DiLoCo: the parameters are split into this many fragments (strided groups of layers);
    /// round r synchronises fragment r mod `fragments` only, so each upload carries 1/fragments of the model.
    pub fragments: usize,
    /// Streaming DiLoCo's overlap, τ: a worker starts round r + 1 from its own weights as soon as it has
    /// uploaded round r, and applies round r's outer step to them `overlap_steps` inner steps later
    /// ([`crate::overlap`]); 0: no overlap (it waits for the close and starts from the new global weights).
    pub overlap_steps: u64,
    /// α of that late update: θ_f ← θ_f + (1 − α)·(g_f − s_f), in [0, 1) (0: the whole update).
    pub merge: f64,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            codec: Codec::None,
            block: 64,
            chunk: 64,
            keep: 1,
            values: Values::F32,
            error_feedback: false,
            feedback_decay: 0.5,
            fragments: 1,
            overlap_steps: 0,
            merge: 0.0,
        }
    }
}

/// Upper bounds that keep every size computed from a payload header far from overflow.
pub const MAX_BLOCK: usize = 1 << 20;
pub const MAX_CHUNK: usize = 1 << 16;

impl CompressionConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_BLOCK).contains(&self.block) {
            bail!("block must be between 1 and {MAX_BLOCK}, got {}", self.block);
        }
        if !(2..=MAX_CHUNK).contains(&self.chunk) {
            bail!("chunk must be between 2 and {MAX_CHUNK}, got {}", self.chunk);
        }
        if self.keep == 0 || self.keep > self.chunk {
            bail!("keep must be between 1 and chunk ({}), got {}", self.chunk, self.keep);
        }
        if !(self.feedback_decay > 0.0 && self.feedback_decay <= 1.0) {
            bail!("feedback_decay must be in (0, 1], got {}", self.feedback_decay);
        }
        if self.fragments == 0 || self.fragments > 4096 {
            bail!("fragments must be between 1 and 4096, got {}", self.fragments);
        }
        if !(0.0..1.0).contains(&self.merge) {
            bail!("merge must be in [0, 1), got {} (1 would never take the global weights in)", self.merge);
        }
        if self.overlap_steps > 0 && self.uses_feedback() {
            // The residual an overlapped round starts from would be the one of an upload whose verdict is not
            // known yet; not supported.
            bail!("overlap_steps needs error_feedback = false (overlap with error feedback is not supported)");
        }
        Ok(())
    }

    /// The overlap settings as [`Overlap`] (off when `overlap_steps` is 0).
    pub fn overlap(&self) -> Overlap {
        Overlap { steps: self.overlap_steps, merge: self.merge }
    }

    pub fn is_lossless(&self) -> bool {
        self.codec == Codec::None
    }

    /// Whether the worker keeps a residual between rounds.
    pub fn uses_feedback(&self) -> bool {
        self.error_feedback && !self.is_lossless()
    }

    pub fn is_sparse(&self) -> bool {
        matches!(self.codec, Codec::TopK | Codec::Dct)
    }

    /// A short human description, e.g. `topk 1/64 2bit +EF`.
    pub fn describe(&self) -> String {
        let base = match self.codec {
            Codec::None => "fp32".to_string(),
            Codec::Bf16 => "bf16".to_string(),
            Codec::Int8 => format!("int8/{}", self.block),
            Codec::Int4 => format!("int4/{}", self.block),
            Codec::TopK | Codec::Dct => {
                let name = if self.codec == Codec::TopK { "topk" } else { "dct-topk" };
                let values = match self.values {
                    Values::F32 => "f32",
                    Values::Bf16 => "bf16",
                    Values::TwoBit => "2bit",
                    Values::Sign => "sign",
                };
                format!("{name} {}/{} {values}", self.keep, self.chunk)
            }
        };
        let feedback = if self.uses_feedback() {
            if self.feedback_decay < 1.0 {
                format!(" +EF({})", self.feedback_decay)
            } else {
                " +EF".to_string()
            }
        } else if self.is_lossless() {
            String::new()
        } else {
            " no EF".to_string()
        };
        let fragments = if self.fragments > 1 { format!(", {} fragments", self.fragments) } else { String::new() };
        let overlap = if self.overlap_steps > 0 {
            format!(", overlap {} steps (merge {})", self.overlap_steps, self.merge)
        } else {
            String::new()
        };
        format!("{base}{feedback}{fragments}{overlap}")
    }

    pub(crate) fn codec_id(&self) -> u8 {
        match self.codec {
            Codec::None => 0,
            Codec::Bf16 => 1,
            Codec::Int8 => 2,
            Codec::Int4 => 3,
            Codec::TopK => 4,
            Codec::Dct => 5,
        }
    }

    pub(crate) fn values_id(&self) -> u8 {
        match self.values {
            Values::F32 => 0,
            Values::Bf16 => 1,
            Values::TwoBit => 2,
            Values::Sign => 3,
        }
    }
}
