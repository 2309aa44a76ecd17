//! agora-model: the Llama-architecture transformer on libtorch and its Hugging Face checkpoint format.
//!
//! Owns: the config (mirroring `transformers.LlamaConfig`), presets from the 1M test model to the 1.4T
//! phase-7 model, initialisation, the forward pass, reading/writing `config.json` + `model.safetensors`, and
//! growth: the operators that turn one phase's weights into a larger model computing the same function (and
//! G_stack's stacking, which does not, for comparison).
//! Must not know about: tokenizers, data, optimizers, training schedules or the network. It sees token ids
//! in and logits out; everything about *how* the weights change lives in `agora-train`.

pub mod checkpoint;
pub mod config;
pub mod grow;
mod init;
pub mod llama;

pub use checkpoint::{from_weights, load_pretrained, save_pretrained, weights_of};
pub use config::{preset, LlamaConfig, PRESETS};
pub use llama::{KvCache, Llama};
