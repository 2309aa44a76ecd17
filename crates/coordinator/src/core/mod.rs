//! The coordinator's decisions, with no I/O: which unit goes to whom, when a round closes, who is benched
//! for not delivering, and how credits vest. Every input (the state read from the store, the time) is
//! passed in and every output is a value the caller records, so these functions run the same in the
//! server, in unit tests and in a deterministic simulation. The judge's rules live beside them in
//! `agora_verify::rules`, under the same discipline.

pub mod assign;
pub mod cohort;
pub mod liveness;
pub mod vesting;
