//! agora-protocol: what crosses the wire between workers and the coordinator, and nothing else.
//!
//! Owns: the JSON messages (versioned by [`PROTOCOL_VERSION`]), ed25519 worker identities and request
//! signatures, researchers' signed proposals and the proposals board (`research`), blake3 content hashes, and the tensor payload codec (safetensors, f32 only, validated
//! against an expected shape list, finite values only).
//! Must not know about: libtorch, HTTP frameworks, storage, or how rounds are scheduled. Every decoder
//! here takes untrusted bytes and returns an error, never panics (property-tested).

pub mod hash;
pub mod identity;
pub mod messages;
pub mod research;
pub mod tensors;

pub use hash::{hash_bytes, update_str, Hash32};
pub use identity::{new_nonce, verify_signature, Identity, SignedRequest, WorkerId};
pub use messages::*;
pub use research::*;
pub use tensors::{decode_tensors, encode_tensors, NamedTensor, TensorError, TensorSpec};

/// Bumped whenever a message or payload changes incompatibly; the coordinator refuses other versions.
pub const PROTOCOL_VERSION: u32 = 7;

/// Request headers. Every worker request carries all six; the signature covers the other five and the body.
pub const HEADER_RUN: &str = "x-agora-run";
pub const HEADER_WORKER: &str = "x-agora-worker";
pub const HEADER_ROUND: &str = "x-agora-round";
pub const HEADER_TIMESTAMP: &str = "x-agora-timestamp";
pub const HEADER_NONCE: &str = "x-agora-nonce";
pub const HEADER_SIGNATURE: &str = "x-agora-signature";
