//! JSON messages of the coordinator's HTTP API (`/v1/...`). Field names are the wire format: renaming
//! one is a protocol change.

use crate::hash::Hash32;
use crate::identity::WorkerId;
use serde::{Deserialize, Serialize};

/// `GET /v1/campaign` (served by `agora campaign`, absent from a single run): the phases, and which one
/// `/v1/run` and the rest of the API serve now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignInfo {
    pub name: String,
    pub phases: Vec<CampaignPhase>,
    /// Index of the phase being served.
    pub current: usize,
    pub state: CampaignState,
    /// The run id of the phase being served (what `GET /v1/run` describes).
    pub run_id: String,
    /// The key that signs every phase's receipts and round roots (one key for the whole campaign).
    pub coordinator_key: WorkerId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignPhase {
    pub name: String,
    /// Set once the phase has been opened.
    pub run_id: Option<String>,
    /// How many of the previous phase's best identities it admits (None: anyone).
    pub retain: Option<usize>,
    pub finished: bool,
    /// The rest is known once the phase has been opened.
    pub parameters: Option<u64>,
    /// Rounds closed so far.
    pub rounds: u64,
    pub tokens_trained: u64,
    /// Validation loss of the phase's initial weights (for a grown phase: the previous phase's final
    /// weights, grown) ...
    pub initial_val_loss: Option<f64>,
    /// ... and of its latest global weights.
    pub val_loss: Option<f64>,
    /// The names of the identities that joined it.
    pub workers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// The current phase is training.
    Running,
    /// The current phase's call for proposals is being measured: `run_id` is one of its proxy runs (each
    /// proposal trained at the same fixed compute), which the phase's workers train like a phase.
    Research,
    /// The current phase has finished and the next one is being prepared (its weights grown): ask again.
    Growing,
    /// The last phase has finished.
    Finished,
}

/// `GET /v1/run`: everything a worker needs to take part, fixed for the life of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub protocol_version: u32,
    pub run_id: String,
    /// The model, as a Hugging Face `config.json` object.
    pub model: serde_json::Value,
    /// The inner loop: an `agora-train` `TrainConfig` object (`steps` is the whole run's inner-step count,
    /// which the learning-rate schedule spans).
    pub inner: serde_json::Value,
    /// Inner steps per round (H), their mean when round lengths follow the rate; each round's own count is
    /// its [`Assignment::inner_steps`].
    pub inner_steps: u64,
    /// Windows per inner step, and tokens per window (+1 for the target).
    pub batch_size: usize,
    pub seq_len: usize,
    pub rounds: u64,
    pub tokenizer_hash: Hash32,
    /// The run's `[compression]` section: how every pseudo-gradient must be encoded.
    pub compression: serde_json::Value,
    /// The run's `[trust]` section: how contributions are judged (the worker reads its hash-chain length).
    pub trust: serde_json::Value,
    /// The coordinator's ed25519 key: it signs receipts and round roots.
    pub coordinator_key: WorkerId,
    /// Largest pseudo-gradient upload the coordinator accepts, in bytes.
    pub max_delta_bytes: u64,
    pub heartbeat_interval_ms: u64,
}

/// `POST /v1/join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub protocol_version: u32,
    pub worker: WorkerId,
    /// Free text for tables (host name, operator); not trusted for anything.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub worker: WorkerId,
    /// The round open now.
    pub round: u64,
    /// True when this id had joined before (a restart, or a rejoin after being dropped).
    pub returning: bool,
}

/// `POST /v1/work` (long-poll): the worker's next job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkResponse {
    Assignment(Assignment),
    /// Streaming DiLoCo's overlap (`[compression] overlap_steps` τ > 0): the next round's job, handed to a
    /// worker that has uploaded the open round before that round's outer step exists. The worker starts
    /// it from its own weights, trains τ steps, then asks again: once the round is open the answer is its
    /// [`Assignment`] (the same unit, and the global weights whose late update it applies).
    Ahead(AheadAssignment),
    /// Nothing for this worker now (it has submitted for the open round, or no data is free): ask again.
    Wait {
        round: u64,
        retry_after_ms: u64,
    },
    /// The run is over; `global_hash` holds the final weights.
    Finished {
        rounds: u64,
        global_hash: Hash32,
    },
}

/// One round's job for one worker: start from `global_hash`, train `inner_steps` steps on `units`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub round: u64,
    pub global_hash: Hash32,
    /// The data to train, in order: the units' windows back to back, `inner_steps / units.len()` steps
    /// each (one unit when every round is `[inner] steps` long and `unit_steps` is left at its default;
    /// more in a round longer than its unit).
    pub units: Vec<DataUnit>,
    /// Position of this round's first inner step in the run's learning-rate schedule.
    pub first_step: u64,
    pub inner_steps: u64,
    /// When the round closes without this worker if it has enough other submissions (unix ms).
    pub deadline_unix_ms: u64,
}

/// One data unit of an assignment: its index among the run's units, the epoch of the work queue it was
/// drawn from, and the hash of its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataUnit {
    pub epoch: u64,
    pub index: u64,
    pub hash: Hash32,
}

/// The upload metadata naming the units trained (`agora.unit`): their indices, comma-separated.
pub fn unit_list(units: &[DataUnit]) -> String {
    units.iter().map(|u| u.index.to_string()).collect::<Vec<_>>().join(",")
}

/// The next round's job before its global weights exist ([`WorkResponse::Ahead`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AheadAssignment {
    pub round: u64,
    pub units: Vec<DataUnit>,
    pub first_step: u64,
    pub inner_steps: u64,
}

/// `POST /v1/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Round being trained, if any.
    pub round: Option<u64>,
    /// Inner steps done in that round.
    pub step: u64,
    pub loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The round open now: a worker training an older one can stop and ask for work.
    pub round: u64,
    pub finished: bool,
}

/// Metadata keys every pseudo-gradient upload (`POST /v1/rounds/{round}/delta`, a safetensors body) carries.
pub mod delta_meta {
    pub const ROUND: &str = "agora.round";
    /// The indices of the units trained, comma-separated ([`super::unit_list`]).
    pub const UNIT: &str = "agora.unit";
    pub const BASE: &str = "agora.base";
    pub const TRAIN_LOSS: &str = "agora.train_loss";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub round: u64,
    pub delta_hash: Hash32,
    /// False when the same upload had already been received (a retried upload): nothing changed.
    /// Received is not accepted: the verdict comes with the round's receipt
    /// (`GET /v1/rounds/{round}/receipt`).
    pub newly_received: bool,
    /// The hash-chain segment the worker must now prove (`POST /v1/rounds/{round}/proof`), if challenged.
    pub challenge: Option<u64>,
}

/// `GET /v1/rounds/{round}/receipt` (signed): the worker's judged upload of a closed round, signed by the
/// coordinator, with its inclusion proof under the round's signed root. The worker checks both against
/// the coordinator key it pinned and learns its verdict from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReceiptResponse {
    /// The round is not judged yet: ask again shortly.
    Pending { round: u64 },
    /// The round closed without judging this worker's upload: the run does not verify (nothing is
    /// credited), or the upload was never received.
    NotJudged { round: u64, reason: String },
    /// The signed receipt (`agora_ledger::SignedReceipt`), its inclusion proof and the round's signed root
    /// (`agora_ledger::InclusionProof`, `agora_ledger::RoundRoot`), as JSON values: the protocol crate does
    /// not know the ledger's types.
    Judged { receipt: serde_json::Value, proof: serde_json::Value, root: serde_json::Value },
}

/// `POST /v1/rounds/{round}/proof`: the answer to a spot check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProofResponse {
    pub round: u64,
    pub segment: u64,
    /// `passed`, or `failed: <why>`.
    pub spot_check: String,
}

/// `GET /v1/judgements`: how each judged upload fared, round by round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedSubmission {
    pub round: u64,
    pub worker: WorkerId,
    pub delta_hash: Hash32,
    /// `accepted`, or why not (`norm`, `replay`, `copy`, `spot_check_failed`, `off_consensus`, `zero_score`).
    pub verdict: String,
    pub score: f64,
    pub credits: u64,
    /// Relative loss improvement of a step along the Δ on random held-out batches, and on the worker's
    /// assigned batches (assigned > random is evidence it trained on its assignment); None when a hard
    /// check rejected it first.
    pub gain_random: Option<f64>,
    pub gain_assigned: Option<f64>,
    /// Largest cosine with an earlier upload of the round.
    pub similarity: Option<f64>,
    /// None: not challenged; else `passed` or `failed: ...`.
    pub spot_check: Option<String>,
}

/// `GET /v1/leaderboard`: one identity's standing, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardEntry {
    pub rank: u64,
    pub worker: WorkerId,
    pub name: String,
    /// EMA of bounded scores in [0, 1]; reset to 0 by proven cheating. Carried over between runs.
    pub rating: f64,
    pub accepted: u64,
    pub rejected: u64,
    /// Micro-credits posted (vested) in this run ...
    pub credits: u64,
    /// ... and booked but still vesting (voided if the identity is proven to cheat first).
    #[serde(default)]
    pub pending_credits: u64,
}

/// `GET /v1/ledger`: every account's balance and every round's signed receipt root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerReport {
    pub run_id: String,
    pub coordinator: WorkerId,
    /// (account, micro-credits); the balances sum to zero (double entry).
    pub balances: Vec<(String, i64)>,
    pub entries: u64,
    pub roots: Vec<serde_json::Value>,
}

/// Every 4xx/5xx body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code (`round_closed`, `unknown_worker`, `shape_mismatch`, ...).
    pub error: String,
    pub message: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub run_id: String,
    pub round: u64,
    pub rounds: u64,
    pub finished: bool,
    pub global_hash: Hash32,
    pub round_opened_unix_ms: u64,
    pub round_deadline_unix_ms: u64,
    pub submissions_this_round: u64,
    pub tokens_trained: u64,
    /// The run's pseudo-gradient encoding, e.g. `topk 1/64 2bit +EF`.
    pub codec: String,
    pub workers: Vec<WorkerStatus>,
    pub history: Vec<RoundSummary>,
    pub counters: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: WorkerId,
    pub name: String,
    /// `training`, `submitted`, `idle` or `dropped`.
    pub state: String,
    pub active: bool,
    /// The data this worker holds in the open round: (epoch, unit) of its first unit.
    pub assignment: Option<(u64, u64)>,
    pub inner_step: u64,
    pub last_loss: Option<f64>,
    pub last_seen_ms_ago: u64,
    pub rounds_accepted: u64,
    /// Uploads judged and not accepted (verifying runs).
    pub rounds_rejected: u64,
    /// Micro-credits posted (vested) in this run, and booked but still vesting.
    pub credits: u64,
    #[serde(default)]
    pub pending_credits: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub contributions: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub global_hash: Hash32,
    /// Payload bytes of the round's applied pseudo-gradients, all workers together ...
    pub delta_bytes: u64,
    /// ... and what the same tensors would take as fp32 values.
    pub fp32_bytes: u64,
}

/// `GET /v1/contributions`: every applied pseudo-gradient, in application order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub round: u64,
    pub worker: WorkerId,
    /// The data units it was trained on, in order: (epoch, unit index).
    pub units: Vec<(u64, u64)>,
    pub delta_hash: Hash32,
    pub bytes: u64,
}
