//! agora-verify: how a contribution is judged, independent of where it came from or where the verdict goes.
//!
//! Owns: the run's `[trust]` settings; the worker's hash-chain commitment to its training states and the
//! spot check that re-runs one committed segment (`chain`); the links that bind the chain to the round's
//! global weights and to the upload (`binding`); loss-based scores that are bounded and
//! sign-safe, with the assigned-vs-random evidence (`score`); similarity for copy detection and robust
//! aggregation rules (`aggregate`); the judge's rules from measurements to verdicts, with references no
//! minority of a round can move (`rules`); the reputation update (`score::update_rating`).
//! Must not know about: HTTP, storage, identities or money. The coordinator feeds it bytes and records
//! what it decides; the ledger turns scores into credits.

pub mod aggregate;
pub mod binding;
pub mod chain;
pub mod config;
pub mod rules;
pub mod score;

pub use aggregate::{aggregate, aggregate_chunk, cosine, l2_norm, AggregationRule};
pub use chain::{SpotCheck, TrainerState};
pub use config::TrustConfig;
pub use rules::{rule_verdicts, upper_median, Gram, RuleVerdict, SpotCheckState, UploadFacts};
pub use score::{bounded_scores, relative_gain, update_rating, Gains, Outcome};
