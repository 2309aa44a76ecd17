//! The model configuration, field for field Hugging Face's `LlamaConfig`, and agora's presets.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Mirrors `transformers.LlamaConfig` (the `config.json` of a `LlamaForCausalLM` checkpoint).
///
/// Fields agora does not use (`use_cache`, `pretraining_tp`, ...) are still read and written so that a
/// config survives a round trip through agora unchanged in meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: each key/value head serves `num_attention_heads / num_key_value_heads`
    /// query heads. HF defaults it to `num_attention_heads` (plain multi-head attention) when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// HF allows an explicit head size; by default it is `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 moves `rope_theta` into `{"rope_type": "default", "rope_theta": θ}`; agora reads
    /// both layouts and writes both (see [`LlamaConfig::to_hf_json`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_pretraining_tp")]
    pub pretraining_tp: usize,
    #[serde(default = "default_true")]
    pub use_cache: bool,
    #[serde(default = "default_torch_dtype")]
    pub torch_dtype: String,
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_pretraining_tp() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_torch_dtype() -> String {
    "float32".into()
}

/// A configuration that agora cannot run, with the field to blame.
#[derive(Debug, thiserror::Error)]
#[error("invalid model config: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field, reason: reason.into() }
}

impl LlamaConfig {
    /// A config with HF's defaults for everything but the shape.
    #[allow(clippy::too_many_arguments)] // one argument per shape field, as in the HF constructor
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        LlamaConfig {
            architectures: default_architectures(),
            model_type: default_model_type(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            hidden_act: default_hidden_act(),
            max_position_embeddings,
            initializer_range: default_initializer_range(),
            rms_norm_eps: 1e-5,
            rope_theta: default_rope_theta(),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            attention_dropout: 0.0,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            pretraining_tp: 1,
            use_cache: true,
            torch_dtype: default_torch_dtype(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rejects what the model cannot run, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model_type != "llama" {
            return Err(bad("model_type", format!("expected \"llama\", got {:?}", self.model_type)));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(field, "must be positive"));
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads = {}", self.num_attention_heads),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!("{} does not divide hidden_size = {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(bad("head_dim", format!("rotary embeddings need an even head size, got {}", self.head_size())));
        }
        if self.hidden_act != "silu" {
            return Err(bad("hidden_act", format!("only \"silu\" (SwiGLU) is supported, got {:?}", self.hidden_act)));
        }
        for (field, rope) in [("rope_scaling", &self.rope_scaling), ("rope_parameters", &self.rope_parameters)] {
            let kind = rope.as_ref().filter(|v| !v.is_null()).map(|v| v["rope_type"].as_str().unwrap_or("?"));
            if kind.is_some_and(|k| k != "default") {
                return Err(bad(field, format!("RoPE variant {:?} is not supported yet", kind.unwrap())));
            }
        }
        if self.attention_bias || self.mlp_bias {
            return Err(bad("attention_bias/mlp_bias", "biases in linear layers are not supported"));
        }
        if self.pretraining_tp != 1 {
            return Err(bad("pretraining_tp", "only 1 is supported"));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 || self.rope_theta.is_nan() || self.rope_theta <= 0.0
        {
            return Err(bad("rms_norm_eps/rope_theta", "must be positive"));
        }
        Ok(())
    }

    /// Parses a `config.json` of any transformers version (4.x top-level `rope_theta`, 5.x `rope_parameters`).
    pub fn from_json_str(text: &str) -> serde_json::Result<Self> {
        let mut config: LlamaConfig = serde_json::from_str(text)?;
        if let Some(theta) = config.rope_parameters.as_ref().and_then(|p| p["rope_theta"].as_f64()) {
            config.rope_theta = theta;
        }
        // Once read, the default layout is fully described by `rope_theta`; keep others to reject them.
        if config.rope_parameters.as_ref().is_some_and(|p| p["rope_type"].as_str().unwrap_or("default") == "default") {
            config.rope_parameters = None;
        }
        Ok(config)
    }

    /// The `config.json` agora writes: readable by transformers 4.x and 5.x alike.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serializes");
        value["rope_parameters"] = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        value["torch_dtype"] = "float32".into();
        value["dtype"] = "float32".into();
        value
    }

    /// Reads a `config.json`, with an error naming the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read model config", path.display()))?;
        let config = LlamaConfig::from_json_str(&text)
            .with_context(|| format!("{}: not a valid Llama config.json", path.display()))?;
        config.validate().with_context(|| path.display().to_string())?;
        Ok(config)
    }

    /// The number of trainable parameters.
    pub fn num_parameters(&self) -> u64 {
        let (h, i, v) = (self.hidden_size as u64, self.intermediate_size as u64, self.vocab_size as u64);
        let q = (self.num_attention_heads * self.head_size()) as u64;
        let kv = (self.kv_heads() * self.head_size()) as u64;
        let attention = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * i;
        let norms = 2 * h;
        let per_layer = attention + mlp + norms;
        let embeddings = v * h * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_hidden_layers as u64 * per_layer + embeddings + h
    }

    /// Parameters that take part in matrix multiplies per token (everything but the embedding lookup).
    pub fn num_matmul_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let norms = (2 * self.num_hidden_layers as u64 + 1) * h;
        let lookup = if self.tie_word_embeddings { 0 } else { v * h };
        self.num_parameters() - norms - lookup
    }

    /// Training FLOPs per token at context length `seq_len`: 6 per matmul parameter (forward + backward)
    /// plus the attention score and value products (PaLM appendix B counting, causal mask not discounted).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let attention = 12.0
            * self.num_hidden_layers as f64
            * (self.num_attention_heads * self.head_size()) as f64
            * seq_len as f64;
        6.0 * self.num_matmul_parameters() as f64 + attention
    }

    /// Bytes of memory to train with AdamW in fp32: weights, gradients and two moments, plus activations
    /// for one micro-batch (a rough upper bound: ~34·h + 5·heads·seq bytes-per-token-per-layer, fp32).
    pub fn training_memory_bytes(&self, micro_batch: usize, seq_len: usize) -> u64 {
        let states = 16 * self.num_parameters();
        let tokens = (micro_batch * seq_len) as u64;
        let per_layer = 4 * (17 * self.hidden_size as u64 + 4 * self.intermediate_size as u64)
            + 4 * (self.num_attention_heads * seq_len) as u64 / 2;
        let logits = 4 * 2 * self.vocab_size as u64;
        states + tokens * (per_layer * self.num_hidden_layers as u64 + logits)
    }
}

/// Named model sizes. The `tiny`..`base` presets train on a laptop; `phase1`..`phase7` are the seed plan's
/// seven-model ladder (0.5 → 1.9 → 7 → 26 → 99 → 373 → 1400 B parameters), configs only on a CPU machine.
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", "~1M parameters, for tests"),
    ("small", "~10M parameters"),
    ("base", "~30M parameters, benchmarks"),
    ("phase1", "~0.5B, the seed model"),
    ("phase2", "~1.9B"),
    ("phase3", "~7B"),
    ("phase4", "~26B"),
    ("phase5", "~99B"),
    ("phase6", "~373B"),
    ("phase7", "~1.4T"),
];

/// The vocabulary size each preset is designed for; training replaces it with the tokenizer's.
pub fn preset_vocab_size(name: &str) -> Option<usize> {
    Some(match name {
        "tiny" => 512,
        "small" => 4096,
        "base" => 8192,
        n if n.starts_with("phase") => 65536,
        _ => return None,
    })
}

/// Looks up a preset by name with the given vocabulary size (`None`: the preset's own).
pub fn preset(name: &str, vocab_size: Option<usize>) -> Result<LlamaConfig, ConfigError> {
    let unknown = || {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        bad("preset", format!("unknown preset {name:?}; known presets: {}", names.join(", ")))
    };
    let v = vocab_size.or_else(|| preset_vocab_size(name)).ok_or_else(unknown)?;
    // (hidden, intermediate, layers, heads, kv_heads, context, tied)
    let (h, i, l, nh, kv, ctx, tied) = match name {
        "tiny" => (128, 384, 4, 4, 2, 256, true),
        "small" => (384, 1024, 6, 6, 2, 512, true),
        "base" => (512, 1408, 8, 8, 4, 1024, true),
        "phase1" => (1536, 4096, 12, 12, 4, 4096, false),
        "phase2" => (2560, 6912, 22, 20, 4, 4096, false),
        "phase3" => (4096, 11008, 36, 32, 8, 8192, false),
        // From phase 3 on, groups of 4 query heads per key/value head: a phase's kv heads are at least the
        // previous phase's, so every step only grows (`grow::plan`; the head count must not shrink a group's
        // kv heads below what its old query heads need).
        "phase4" => (6656, 17920, 54, 52, 13, 8192, false),
        "phase5" => (9216, 28160, 100, 72, 18, 8192, false),
        "phase6" => (16384, 52224, 115, 128, 32, 8192, false),
        "phase7" => (24576, 83456, 183, 192, 48, 8192, false),
        _ => return Err(unknown()),
    };
    let mut config = LlamaConfig::new(v, h, i, l, nh, kv, ctx, tied);
    if name.starts_with("phase") {
        config.rope_theta = 500000.0;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_hit_their_sizes() {
        let within = |name: &str, target: f64, tol: f64| {
            let n = preset(name, None).unwrap().num_parameters() as f64;
            assert!((n / target - 1.0).abs() <= tol, "{name}: {n:.3e} params, want ~{target:.3e}");
        };
        within("tiny", 1e6, 0.25);
        within("small", 10e6, 0.2);
        within("base", 30e6, 0.2);
        for (name, billions) in [
            ("phase1", 0.5),
            ("phase2", 1.9),
            ("phase3", 7.0),
            ("phase4", 26.0),
            ("phase5", 99.0),
            ("phase6", 373.0),
            ("phase7", 1400.0),
        ] {
            within(name, billions * 1e9, 0.08);
        }
        for (name, _) in PRESETS {
            preset(name, None).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = preset("huge", None).unwrap_err().to_string();
        assert!(err.contains("unknown preset \"huge\"") && err.contains("tiny"), "{err}");
    }

    #[test]
    fn hf_config_round_trips_and_defaults_apply() {
        let json = r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "transformers_version": "4.50"}"#;
        let c = LlamaConfig::from_json_str(json).unwrap();
        assert_eq!(c.kv_heads(), 4);
        assert_eq!(c.head_size(), 8);
        assert_eq!(c.rope_theta, 10000.0);
        c.validate().unwrap();
        let back = LlamaConfig::from_json_str(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back.rope_theta, c.rope_theta);
        assert_eq!(back.kv_heads(), c.kv_heads());
        // transformers 5 layout.
        let v5 = r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}"#;
        assert_eq!(LlamaConfig::from_json_str(v5).unwrap().rope_theta, 50000.0);
        let yarn = v5.replace("\"default\"", "\"yarn\"");
        let err = LlamaConfig::from_json_str(&yarn).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("rope_parameters") && err.contains("yarn"), "{err}");
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let mut c = preset("tiny", None).unwrap();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().to_string().contains("num_key_value_heads"));
        let mut c = preset("tiny", None).unwrap();
        c.hidden_act = "gelu".into();
        assert!(c.validate().unwrap_err().to_string().contains("hidden_act"));
    }
}
