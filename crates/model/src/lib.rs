//! agora-model: the Llama-architecture transformer on libtorch and its Hugging Face checkpoint format.
//!
//! Owns: the config (mirroring `transformers.LlamaConfig`), presets from the 1M test model to the 1.4T
//! phase-7 model, initialisation, the forward pass, and reading/writing `config.json` + `model.safetensors`.
//! Must not know about: tokenizers, data, optimizers, training schedules or the network. It sees token ids
//! in and logits out; everything about *how* the weights change lives in `agora-train`.

pub mod checkpoint;
pub mod config;
mod init;
pub mod llama;

pub use checkpoint::{load_pretrained, save_pretrained};
pub use config::{preset, LlamaConfig, PRESETS};
pub use llama::{KvCache, Llama};
