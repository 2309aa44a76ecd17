//! agora-diloco: the algorithm of a DiLoCo run, independent of how its messages travel.
//!
//! Owns: the outer optimizer (Nesterov momentum by default; SGD with momentum and plain averaging for
//! comparison), pseudo-gradients Δ = θ_global − θ_local, their average, one worker's inner round (H AdamW
//! steps on its data unit), how a corpus is cut into data units, conversion between libtorch parameters and
//! protocol tensor payloads; how Δ is compressed on the wire (`codec`: quantisation, top-k and DCT top-k,
//! error feedback, the payload format and the coordinator's running sum), Streaming DiLoCo's fragments and
//! its overlap of communication with computation (`overlap`), what a worker carries between rounds
//! (`sync`), and where rounds start when their lengths follow the learning rate (`rounds`; measured in
//! `agora bench diloco` only so far: the coordinator's rounds are all `[inner] steps` long).
//! Must not know about: HTTP, storage, identities or clocks. The coordinator and worker crates move bytes
//! around; the in-process simulation in `agora bench diloco` calls exactly the same functions.

pub mod codec;
pub mod fragments;
pub mod inner;
pub mod outer;
pub mod overlap;
pub mod rounds;
pub mod sync;
pub mod tensors;
pub mod units;

pub use codec::{Accumulator, CompressionConfig};
pub use fragments::FragmentPlan;
pub use inner::{train_round, train_steps, RoundStats};
pub use outer::{mean, pseudo_gradient, OuterConfig, OuterKind, OuterOptimizer};
pub use overlap::{train_round_overlapped, Overlap};
pub use rounds::{default_unit_steps, round_starts, RoundPlan, DEFAULT_ROUND_LR_POWER};
pub use sync::{SyncState, Upload};
pub use units::{cut_units, unit_batches, unit_order};
