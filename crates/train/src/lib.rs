//! agora-train: the deterministic inner loop that turns a model and a token shard into better weights.
//!
//! Owns: AdamW and the learning-rate schedule, gradient clipping and accumulation, validation loss,
//! resumable checkpoints (HF model directory + optimizer moments + step), the optimizer's state through model
//! growth, and sampling text from a model.
//! Must not know about: how shards were made (that is `agora-data`), the network, rounds or other
//! workers. A DiLoCo worker calls [`Trainer::update_on`] H times on the windows its round assigns.

pub mod checkpoint;
pub mod generate;
pub mod grow;
pub mod optim;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, Schedule};
pub use trainer::{evaluate, loss_on, StepStats, TrainConfig, Trainer};
