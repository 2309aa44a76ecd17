//! agora-worker: one contributor's side of a DiLoCo run.
//!
//! Owns: the worker's identity on disk, its HTTP client (signed requests, retries with backoff across
//! coordinator restarts), its blob cache (every download checked against its hash), its persistent AdamW
//! state and error-feedback residual, and the loop: ask for work → download weights and data → H inner
//! steps → compress and upload Δ → (when the run verifies) the round's receipt, checked against the
//! coordinator key pinned on first contact, before the residual of an accepted upload is committed; and,
//! at a campaign (`follow`), the same for each later phase, or a clean exit when a phase does not retain it.
//! Must not know about: other workers, aggregation, the coordinator's storage. It trusts nothing it
//! downloads without checking the hash it was told, and no verdict without checking its signature.

#[cfg(feature = "adversary")]
pub mod adversary;
mod client;
mod receipts;
mod state;

pub use client::{CallError, Client};

use agora_data::Shard;
use agora_diloco::tensors::{from_named, param_specs};
use agora_diloco::tensors::{load_weights, model_weights};
use agora_diloco::{train_steps, CompressionConfig, FragmentPlan};
use agora_model::{Llama, LlamaConfig};
use agora_protocol::messages::delta_meta;
use agora_protocol::{
    decode_tensors, hash_bytes, unit_list, AheadAssignment, Assignment, Hash32, Heartbeat, HeartbeatResponse, Identity,
    JoinRequest, JoinResponse, ProofResponse, ReceiptResponse, RunInfo, SubmitResponse, TensorSpec, WorkResponse,
    WorkerId, PROTOCOL_VERSION,
};
use agora_train::{TrainConfig, Trainer};
use agora_verify::binding;
use agora_verify::chain;
use agora_verify::TrustConfig;
use anyhow::{bail, Context, Result};
use state::{PendingUpload, WorkerState};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::Device;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Base URL of the coordinator, e.g. `http://127.0.0.1:8642`.
    pub coordinator: String,
    /// Identity key, blob cache and optimizer state live here.
    pub data_dir: PathBuf,
    pub name: String,
    pub device: Device,
    /// Leave the run after this many uploads were received by the coordinator.
    pub max_rounds: Option<u64>,
    /// Give up when the coordinator has been unreachable this long.
    pub patience: Duration,
    /// Test-only misbehaviour (the adversarial suite); honest unless built with the `adversary` feature.
    #[cfg(feature = "adversary")]
    pub behaviour: adversary::Behaviour,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerSummary {
    pub worker: String,
    /// The run this summary is about (one phase, in a campaign) ...
    #[serde(default)]
    pub run_id: String,
    /// ... and the key that signed it.
    pub coordinator_key: WorkerId,
    /// Whether the run judges uploads (`[trust] verify`); when it does not, nothing is accepted or rejected,
    /// only received.
    pub verifying: bool,
    /// Uploads the coordinator stored ("received": not a verdict).
    pub rounds_received: u64,
    /// Received uploads whose round's receipt (verified against the pinned coordinator key) accepted them.
    pub rounds_accepted: u64,
    /// Received uploads the round's judgement did not accept; `rejections` counts them by verdict code.
    pub rounds_rejected: u64,
    pub rejections: BTreeMap<String, u64>,
    /// Received uploads of a verifying run whose round closed without judging them.
    pub rounds_not_judged: u64,
    /// Uploads the coordinator refused to store (the round had closed, or the data was reassigned).
    pub rounds_refused: u64,
    /// Micro-credits of the accepted receipts (booked, pending vesting).
    pub credits_booked: u64,
    /// Spot checks answered, and how many the coordinator found wrong.
    pub spot_checks: u64,
    pub spot_checks_failed: u64,
    /// Payload bytes of received uploads ...
    pub bytes_sent: u64,
    /// ... and what the same pseudo-gradients would take as fp32 values.
    pub fp32_bytes: u64,
    pub bytes_received: u64,
    /// Seconds spent in inner steps (what verification costs are compared with).
    pub train_seconds: f64,
    /// Seconds spent between rounds waiting on the coordinator: for an uploaded round to close and be
    /// judged (its receipt) and for the next assignment (`/v1/work` long-polls until a round opens). The
    /// idle time Streaming DiLoCo's overlap would hide; downloads, encoding and uploads are not in it.
    pub waiting_seconds: f64,
    /// Seconds from joining to leaving.
    pub wall_seconds: f64,
    pub finished: bool,
}

/// What the heartbeat thread reports.
#[derive(Default, Clone)]
struct Progress {
    round: Option<u64>,
    step: u64,
    loss: Option<f64>,
}

/// What a worker did at a coordinator: one summary per run it took part in (one, unless the coordinator
/// serves a campaign), and why it stopped following the campaign if it was not retained.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FollowSummary {
    pub runs: Vec<WorkerSummary>,
    /// The refusal of a campaign's phase that did not retain this identity.
    pub not_retained: Option<String>,
}

/// Takes part in the run at `options.coordinator` and, when that coordinator serves a campaign
/// (`GET /v1/campaign`), in each of its later phases: once a phase is finished the worker waits while the
/// next one is prepared and joins it. A phase that does not admit this identity ends the worker cleanly
/// with the coordinator's reason. Leaving early (`max_rounds`) ends it after the run it was in.
pub fn follow(options: &WorkerOptions) -> Result<FollowSummary> {
    let mut runs: Vec<WorkerSummary> = Vec::new();
    let identity = Arc::new(Identity::load_or_create(&options.data_dir.join("identity.key"))?);
    let client = Client::new(&options.coordinator, identity, &options.data_dir, options.patience)?;
    let campaign = || -> Result<Option<agora_protocol::CampaignInfo>> {
        match client.get_json("/v1/campaign") {
            Ok(info) => Ok(Some(info)),
            Err(CallError::Rejected { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context("cannot read the campaign")),
        }
    };
    // A campaign signs every phase with one key: the key of the first run this worker took part in is the
    // key it holds the later phases to (beyond the per-run pin of `run_worker`), kept in its data
    // directory so that a restarted worker holds them to it too.
    let mut pin: Option<(PathBuf, WorkerId)> = match campaign()? {
        Some(c) => {
            let file = campaign_pin_file(&options.data_dir, &options.coordinator, &c.name);
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let key = text.trim().parse().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                    Some((file, key))
                }
                Err(_) => None,
            }
        }
        None => None,
    };
    let mut campaign_key = pin.as_ref().map(|p| p.1);
    loop {
        let summary = match run_in(options, campaign_key) {
            Ok(summary) => summary,
            Err(e) => {
                let refused = match e.downcast_ref::<CallError>() {
                    Some(CallError::Rejected { body, .. }) if body.error == "not_admitted" => {
                        Some(body.message.clone())
                    }
                    _ => None,
                };
                match (refused, campaign()?) {
                    (Some(reason), Some(c)) => {
                        let phase = c.phases.get(c.current).map_or("?", |p| p.name.as_str());
                        let note = format!("not retained for phase {phase:?} of campaign {:?}: {reason}", c.name);
                        tracing::info!("{note}");
                        return Ok(FollowSummary { runs, not_retained: Some(note) });
                    }
                    _ => return Err(e),
                }
            }
        };
        let (finished, run, key) = (summary.finished, summary.run_id.clone(), summary.coordinator_key);
        campaign_key = Some(key);
        runs.push(summary);
        if !finished {
            return Ok(FollowSummary { runs, not_retained: None });
        }
        // The run is over: a campaign may go on with another phase.
        loop {
            let Some(c) = campaign()? else { return Ok(FollowSummary { runs, not_retained: None }) };
            if pin.is_none() {
                let file = campaign_pin_file(&options.data_dir, &options.coordinator, &c.name);
                std::fs::create_dir_all(file.parent().expect("a parent"))?;
                std::fs::write(&file, format!("{}\n", key.hex()))
                    .with_context(|| format!("{}: cannot pin the campaign's key", file.display()))?;
                pin = Some((file, key));
            }
            let Some(phase) = c.phases.get(c.current) else {
                bail!("/v1/campaign names phase {} of {}", c.current, c.phases.len())
            };
            if c.run_id != run {
                tracing::info!(phase = phase.name, run = c.run_id, "the campaign's next phase is open");
                break;
            }
            if c.state == agora_protocol::CampaignState::Finished {
                return Ok(FollowSummary { runs, not_retained: None });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

pub fn run_worker(options: &WorkerOptions) -> Result<WorkerSummary> {
    run_in(options, None)
}

/// [`run_worker`], refusing a run whose coordinator key is not `expected` (a campaign's later phase).
fn run_in(options: &WorkerOptions, expected: Option<WorkerId>) -> Result<WorkerSummary> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("{}: cannot create the worker's data directory", options.data_dir.display()))?;
    let identity = Arc::new(Identity::load_or_create(&options.data_dir.join("identity.key"))?);
    let client = Client::new(&options.coordinator, identity.clone(), &options.data_dir, options.patience)?;
    let info: RunInfo = client.get_json("/v1/run").context("cannot fetch the run description")?;
    if info.protocol_version != PROTOCOL_VERSION {
        bail!(
            "the coordinator speaks protocol {}, this worker {PROTOCOL_VERSION}: use matching agora versions",
            info.protocol_version
        );
    }
    same_campaign_key(expected, &info)?;
    let run_dir = options.data_dir.join("runs").join(&info.run_id);
    // Trust on first use: receipts and round roots must be signed by the key this run's coordinator
    // presented the first time this worker met it.
    let coordinator_key = receipts::pin_coordinator_key(&run_dir, &info.run_id, &info.coordinator_key)?;
    let client = client.for_run(&info.run_id);
    let model_config =
        LlamaConfig::from_json_str(&serde_json::to_string(&info.model)?).context("the run's model config")?;
    let train_config: TrainConfig =
        serde_json::from_value(info.inner.clone()).context("the run's inner-loop config")?;
    let specs = param_specs(&model_config);

    let joined: JoinResponse = client.post_json(
        "/v1/join",
        &JoinRequest { protocol_version: PROTOCOL_VERSION, worker: identity.id(), name: options.name.clone() },
    )?;
    tracing::info!(
        worker = identity.id().short(),
        run = info.run_id,
        round = joined.round,
        returning = joined.returning,
        "joined the run"
    );

    let compression: CompressionConfig =
        serde_json::from_value(info.compression.clone()).context("the run's compression config")?;
    let trust: TrustConfig = serde_json::from_value(info.trust.clone()).context("the run's trust config")?;
    let plan = FragmentPlan::new(&specs, model_config.num_hidden_layers, compression.fragments)?;
    tracing::info!(codec = compression.describe(), "pseudo-gradient encoding");
    let model = Llama::zeros(&model_config, options.device);
    let mut trainer = Trainer::new(model, train_config)?;
    let mut state = match WorkerState::load(&run_dir, &specs, &plan, &compression, options.device)? {
        Some(s) => {
            s.restore_optimizer(&mut trainer.optimizer);
            tracing::info!(step = trainer.optimizer.step, trained_round = s.trained_round, "resumed optimizer state");
            s
        }
        None => WorkerState::fresh(&specs, &compression),
    };
    let ctx = RunContext {
        specs,
        plan,
        compression,
        trust,
        run_dir,
        run_id: info.run_id.clone(),
        coordinator_key,
        device: options.device,
        #[cfg(feature = "adversary")]
        adversary: std::cell::RefCell::new(adversary::Adversary::new(options.behaviour.clone())),
    };

    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let beats = spawn_heartbeats(client.clone(), progress.clone(), stop.clone(), info.heartbeat_interval_ms);

    let mut summary = WorkerSummary {
        worker: identity.id().hex(),
        run_id: info.run_id.clone(),
        coordinator_key: info.coordinator_key,
        verifying: ctx.trust.verify,
        rounds_received: 0,
        rounds_accepted: 0,
        rounds_rejected: 0,
        rejections: BTreeMap::new(),
        rounds_not_judged: 0,
        rounds_refused: 0,
        credits_booked: 0,
        spot_checks: 0,
        spot_checks_failed: 0,
        bytes_sent: 0,
        fp32_bytes: 0,
        bytes_received: 0,
        train_seconds: 0.0,
        waiting_seconds: 0.0,
        wall_seconds: 0.0,
        finished: false,
    };
    let joined_at = Instant::now();
    let overlap = ctx.compression.overlap().is_on();
    // Under overlap: the received upload of the round before the one being trained, whose verdict is
    // settled once that round has closed (when the next round's global weights are fetched anyway).
    let mut unsettled: Option<Received> = None;
    let result = (|| -> Result<()> {
        loop {
            // An upload not yet settled (the worker may have been killed waiting for its answer or for its
            // round's receipt) is sent (again) first: the coordinator answers a repeat of a received upload
            // as received (`newly_received: false`, even once its round has closed), and the receipt is
            // then fetched as for a first upload. Only here is the pending upload dropped from the saved
            // state, after its fate is known (or, under overlap, once it is received), so a restart anywhere
            // before resumes it.
            if let Some(pending) = state.pending.take() {
                let received = send_upload(&client, &ctx, &pending, &mut summary, &identity, &options.name)?;
                progress.lock().expect("progress lock").round = None;
                match received {
                    Some(response) if overlap && ctx.trust.verify => {
                        // Overlap runs keep no residual: nothing waits on the verdict but the summary.
                        state.save(&ctx.run_dir, &ctx.specs, &ctx.plan)?;
                        unsettled = Some(Received { upload: pending, response });
                    }
                    received => settle(&client, &ctx, &mut state, pending, received, &identity, &mut summary)?,
                }
            }
            if options.max_rounds.is_some_and(|n| summary.rounds_received >= n) {
                settle_received(&client, &ctx, &mut state, &mut unsettled, &identity, &mut summary)?;
                client.post_json::<serde_json::Value>("/v1/leave", &serde_json::json!({}))?;
                tracing::info!(rounds = summary.rounds_received, "the requested uploads were received; left the run");
                return Ok(());
            }
            let waiting = Instant::now();
            let work: WorkResponse = client.post_json("/v1/work", &serde_json::json!({}))?;
            summary.waiting_seconds += waiting.elapsed().as_secs_f64();
            if let WorkResponse::Assignment(Assignment { round, .. }) | WorkResponse::Wait { round, .. } = &work {
                client.set_round(*round);
            }
            let job = match work {
                WorkResponse::Finished { rounds, global_hash } => {
                    settle_received(&client, &ctx, &mut state, &mut unsettled, &identity, &mut summary)?;
                    tracing::info!(rounds, %global_hash, "the run is finished");
                    summary.finished = true;
                    return Ok(());
                }
                WorkResponse::Wait { .. } => {
                    // No next round for this worker (yet): the open one's verdict is what there is to wait for.
                    settle_received(&client, &ctx, &mut state, &mut unsettled, &identity, &mut summary)?;
                    continue;
                }
                WorkResponse::Assignment(a) => {
                    settle_received(&client, &ctx, &mut state, &mut unsettled, &identity, &mut summary)?;
                    Job::Open(a)
                }
                WorkResponse::Ahead(a) if state.sync.local.is_some() => Job::Ahead(a),
                // Without its own weights (a fresh or reset state) a worker cannot start early: asking again
                // waits for the round to open, and it starts from the global weights.
                WorkResponse::Ahead(_) => continue,
            };
            #[cfg(feature = "adversary")]
            if ctx.adversary.borrow().never_delivers() {
                // Holds the assignment (heartbeats go on) and asks again, never training or uploading.
                progress.lock().expect("progress lock").round = Some(job.round());
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            let round = job.round();
            let mut trained = TrainedWith { client: &client, identity: &identity, unsettled: &mut unsettled };
            match train_job(&mut trained, &mut trainer, &mut state, &ctx, job, &progress, &mut summary)? {
                Some(pending) => {
                    state.pending = Some(pending);
                    state.capture_optimizer(&trainer.optimizer, &ctx.specs, round);
                    state.save(&ctx.run_dir, &ctx.specs, &ctx.plan)?;
                }
                // An early start that cannot finish (the round gave this worker's unit to someone else, or
                // the run ended): the steps taken are dropped, with the AdamW moments they moved.
                None => state.restore_optimizer(&mut trainer.optimizer),
            }
        }
    })();
    summary.wall_seconds = joined_at.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = beats.join();
    result?;
    Ok(summary)
}

/// Where a worker keeps the key of a campaign it follows (one file per coordinator URL and campaign name).
fn campaign_pin_file(data_dir: &std::path::Path, coordinator: &str, campaign: &str) -> PathBuf {
    let id = blake3::hash(format!("{}\n{campaign}", coordinator.trim_end_matches('/')).as_bytes());
    data_dir.join("campaigns").join(format!("{}.coordinator.key.pub", &id.to_hex()[..16]))
}

/// A campaign's later phase must be signed by the key of its earlier ones (`expected`): a coordinator that
/// changes keys between phases is not followed.
fn same_campaign_key(expected: Option<WorkerId>, info: &RunInfo) -> Result<()> {
    match expected {
        Some(key) if info.coordinator_key != key => bail!(
            "run {} is signed by coordinator key {}, not by the key {} that signed this campaign's earlier \
             phases: refusing to follow it",
            info.run_id,
            info.coordinator_key.hex(),
            key.hex()
        ),
        _ => Ok(()),
    }
}

/// A received upload whose verdict is still to be read (overlap only).
struct Received {
    upload: PendingUpload,
    response: SubmitResponse,
}

/// A job from `/v1/work`: a round whose global weights exist, or (overlap) the next round handed out
/// before they do.
enum Job {
    Open(Assignment),
    Ahead(AheadAssignment),
}

impl Job {
    fn round(&self) -> u64 {
        match self {
            Job::Open(a) => a.round,
            Job::Ahead(a) => a.round,
        }
    }
}

/// What an early start needs at its merge point to settle the previous round and ask for this one.
struct TrainedWith<'a> {
    client: &'a Client,
    identity: &'a Identity,
    unsettled: &'a mut Option<Received>,
}

/// Settles an answered upload: in a verifying run, its round's receipt says whether it was accepted; the
/// error-feedback residual advances only past an accepted upload (otherwise the old one, which still holds
/// what this upload tried to send, is kept). The state is saved either way.
fn settle(
    client: &Client,
    ctx: &RunContext,
    state: &mut WorkerState,
    pending: PendingUpload,
    received: Option<SubmitResponse>,
    identity: &Identity,
    summary: &mut WorkerSummary,
) -> Result<()> {
    let accepted = match received {
        None => false,
        // Nothing is judged: received is as accepted as it gets.
        Some(_) if !ctx.trust.verify => true,
        Some(r) => {
            let waiting = Instant::now();
            let accepted = round_verdict(client, ctx, &pending, &r, &identity.id(), summary)?;
            summary.waiting_seconds += waiting.elapsed().as_secs_f64();
            accepted
        }
    };
    if accepted {
        state.sync.accepted(&ctx.plan, pending.fragment, pending.residual);
    }
    state.save(&ctx.run_dir, &ctx.specs, &ctx.plan)
}

/// Settles the upload left unsettled by an early start, if any.
fn settle_received(
    client: &Client,
    ctx: &RunContext,
    state: &mut WorkerState,
    unsettled: &mut Option<Received>,
    identity: &Identity,
    summary: &mut WorkerSummary,
) -> Result<()> {
    match unsettled.take() {
        Some(r) => settle(client, ctx, state, r.upload, Some(r.response), identity, summary),
        None => Ok(()),
    }
}

/// At the merge point of a round started early: asks until the round is open (the coordinator answers
/// "wait" with a long poll that its close ends) and returns its assignment, then settles the previous
/// round's upload (its receipt exists once the round has closed); None when the round did not keep this
/// worker's unit or the run ended (the early steps are dropped).
fn await_open_round(
    with: &mut TrainedWith<'_>,
    ctx: &RunContext,
    state: &mut WorkerState,
    ahead: &AheadAssignment,
    summary: &mut WorkerSummary,
) -> Result<Option<Assignment>> {
    let waiting = Instant::now();
    let result = loop {
        match with.client.post_json::<WorkResponse>("/v1/work", &serde_json::json!({}))? {
            WorkResponse::Assignment(a) if a.round == ahead.round && a.units == ahead.units => break Some(a),
            WorkResponse::Wait { .. } => continue,
            other => {
                tracing::warn!(
                    round = ahead.round,
                    units = unit_list(&ahead.units),
                    "the early start is void ({other:?})"
                );
                break None;
            }
        }
    };
    summary.waiting_seconds += waiting.elapsed().as_secs_f64();
    if let Some(a) = &result {
        with.client.set_round(a.round);
    }
    settle_received(with.client, ctx, state, with.unsettled, with.identity, summary)?;
    Ok(result)
}

/// What every round of this run shares.
struct RunContext {
    specs: Vec<TensorSpec>,
    plan: FragmentPlan,
    compression: CompressionConfig,
    trust: TrustConfig,
    run_dir: PathBuf,
    run_id: String,
    /// The coordinator key pinned on first contact: receipts and round roots must be signed by it.
    coordinator_key: WorkerId,
    device: Device,
    #[cfg(feature = "adversary")]
    adversary: std::cell::RefCell<adversary::Adversary>,
}

impl RunContext {
    /// The step boundaries of a round: the hash chain's segments (`agora_verify::chain::chain_bounds`), and
    /// under overlap the merge point τ, which is a boundary even when the run keeps no chain.
    fn round_bounds(&self, steps: u64) -> Vec<u64> {
        chain::chain_bounds(steps, self.trust.chain_segments(steps).max(1), self.compression.overlap_steps)
    }

    /// Segments of a round's hash chain (0: the run keeps none).
    fn chain_segments(&self, steps: u64) -> u64 {
        if self.trust.chain_segments(steps) == 0 {
            0
        } else {
            self.round_bounds(steps).len() as u64 - 1
        }
    }

    /// Where the states a round's hash chain commits to are kept until the round is settled.
    fn proof_dir(&self, round: u64) -> PathBuf {
        self.run_dir.join("proofs").join(format!("round-{round}"))
    }

    /// Forgets the chain states of rounds before `round`.
    fn prune_proofs(&self, round: u64) {
        let Ok(entries) = std::fs::read_dir(self.run_dir.join("proofs")) else { return };
        for entry in entries.flatten() {
            let old = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|r| r.parse::<u64>().ok())
                .is_some_and(|r| r < round);
            if old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Uploads a round's payload (and answers its spot check, if challenged). Ok(Some) when the coordinator
/// has it (now or from an earlier attempt): received, not yet judged. Ok(None) when it refused it for
/// being late or reassigned (the run goes on without it).
fn send_upload(
    client: &Client,
    ctx: &RunContext,
    p: &PendingUpload,
    summary: &mut WorkerSummary,
    identity: &Identity,
    name: &str,
) -> Result<Option<SubmitResponse>> {
    let path = format!("/v1/rounds/{}/delta", p.round);
    match client.post_bytes::<SubmitResponse>(&path, p.payload.clone()) {
        Ok(r) => {
            summary.rounds_received += 1;
            summary.bytes_sent += p.payload.len() as u64;
            summary.fp32_bytes += p.fp32_bytes;
            tracing::info!(
                round = r.round,
                bytes = p.payload.len(),
                ratio = format!("{:.1}", p.fp32_bytes as f64 / p.payload.len() as f64),
                new = r.newly_received,
                loss = p.train_loss,
                delta = %r.delta_hash,
                "pseudo-gradient received"
            );
            if let Some(segment) = r.challenge {
                send_proof(client, ctx, p.round, segment, summary)?;
            }
            ctx.prune_proofs(p.round);
            Ok(Some(r))
        }
        // Too late (the round closed, or this worker was dropped and its data reassigned): the work is
        // lost, but the run goes on; ask for the next job.
        Err(CallError::Rejected { status, body: err }) if status == reqwest::StatusCode::CONFLICT => {
            summary.rounds_refused += 1;
            tracing::warn!(round = p.round, code = err.error, "pseudo-gradient refused: {}", err.message);
            Ok(None)
        }
        Err(CallError::Rejected { status, body: err }) if err.error == "unknown_worker" => {
            tracing::warn!(%status, "the coordinator does not know this worker (was its state reset?); joining again");
            client.post_json::<JoinResponse>(
                "/v1/join",
                &JoinRequest { protocol_version: PROTOCOL_VERSION, worker: identity.id(), name: name.to_string() },
            )?;
            summary.rounds_refused += 1;
            Ok(None)
        }
        // The coordinator refuses the payload itself: retraining would produce the same, so stop.
        Err(CallError::Rejected { status, body: err }) => {
            bail!("the coordinator refused this worker's pseudo-gradient ({status} {}): {}", err.error, err.message);
        }
        Err(CallError::Failed(e)) => Err(e),
    }
}

/// Whether a received upload of a verifying run was accepted, by its round's receipt: polled while the
/// round is open, then checked against the pinned coordinator key and this upload before it is believed
/// (a receipt that does not verify is an error, never a silent acceptance).
fn round_verdict(
    client: &Client,
    ctx: &RunContext,
    p: &PendingUpload,
    received: &SubmitResponse,
    worker: &WorkerId,
    summary: &mut WorkerSummary,
) -> Result<bool> {
    let round = p.round;
    let path = format!("/v1/rounds/{round}/receipt?worker={}", worker.hex());
    let mut waiting = false;
    let (receipt, proof, root) = loop {
        // The client retries an unreachable coordinator for its patience; an open round is an answer.
        match client.get_json::<ReceiptResponse>(&path) {
            Ok(ReceiptResponse::Pending { .. }) => {
                if !waiting {
                    tracing::info!(round, "waiting for the round to close and be judged");
                    waiting = true;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            Ok(ReceiptResponse::NotJudged { reason, .. }) => {
                summary.rounds_not_judged += 1;
                tracing::warn!(round, "round {round}: the upload was not judged ({reason}); not counted as accepted");
                return Ok(false);
            }
            Ok(ReceiptResponse::Judged { receipt, proof, root }) => break (receipt, proof, root),
            Err(CallError::Rejected { status, body }) => {
                bail!(
                    "round {round}: the coordinator refused to give this upload's receipt ({status} {}): {}",
                    body.error,
                    body.message
                )
            }
            Err(CallError::Failed(e)) => return Err(e.context(format!("round {round}: fetching the receipt"))),
        }
    };
    let expected = receipts::Expected { run_id: &ctx.run_id, round, worker, delta_hash: &received.delta_hash };
    let r = receipts::parse_judged(&receipt, &proof, &root)
        .and_then(|(signed, proof, root)| {
            receipts::verify_receipt(&ctx.coordinator_key, &expected, &signed, &proof, &root)
        })
        .context("refusing the coordinator's verdict: its receipt does not verify")?;
    if r.accepted() {
        summary.rounds_accepted += 1;
        summary.credits_booked = summary.credits_booked.saturating_add(r.credits);
        tracing::info!(
            round,
            score = r.score,
            credits = r.credits,
            "round {round}: accepted, score {:.2}, {} micro-credits (pending vesting)",
            r.score,
            r.credits
        );
        Ok(true)
    } else {
        summary.rounds_rejected += 1;
        *summary.rejections.entry(r.verdict.clone()).or_default() += 1;
        tracing::warn!(
            round,
            verdict = r.verdict,
            score = r.score,
            "round {round}: rejected ({}), score {:.2}; the error-feedback residual is kept",
            r.verdict,
            r.score
        );
        Ok(false)
    }
}

/// Answers a spot check: the challenged segment's start and end states, exactly as committed.
fn send_proof(client: &Client, ctx: &RunContext, round: u64, segment: u64, summary: &mut WorkerSummary) -> Result<()> {
    let dir = ctx.proof_dir(round);
    let read = |k: u64| {
        let path = dir.join(format!("state-{k}.bin"));
        std::fs::read(&path)
            .with_context(|| format!("{}: the committed state of the challenged segment", path.display()))
    };
    // The challenged segment and both links (agora_verify::binding): the states at 0, j, j + 1 and S, and
    // the residual the round started from.
    // The chain this round committed to: one state per boundary (its length follows the round's steps,
    // which vary when round lengths follow the learning rate).
    let committed = (0..).take_while(|k| dir.join(format!("state-{k}.bin")).exists()).count() as u64;
    if committed < 2 {
        bail!("round {round}: no committed chain in {} to answer the spot check from", dir.display());
    }
    let segments = committed - 1;
    let states: Vec<(u64, Vec<u8>)> =
        binding::proof_boundaries(segment, segments).into_iter().map(|k| Ok((k, read(k)?))).collect::<Result<_>>()?;
    let residual_path = dir.join("residual.bin");
    let residual = if residual_path.exists() {
        std::fs::read(&residual_path).with_context(|| format!("{}: the committed residual", residual_path.display()))?
    } else {
        Vec::new()
    };
    let views: Vec<(u64, &[u8])> = states.iter().map(|(k, s)| (*k, s.as_slice())).collect();
    let path = format!("/v1/rounds/{round}/proof");
    summary.spot_checks += 1;
    match client.post_bytes::<ProofResponse>(&path, binding::encode_proof(&views, &residual)) {
        Ok(r) => {
            tracing::info!(round, segment, spot_check = r.spot_check, "spot check answered");
            if r.spot_check != "passed" {
                summary.spot_checks_failed += 1;
            }
            Ok(())
        }
        Err(CallError::Rejected { body: err, .. }) => {
            summary.spot_checks_failed += 1;
            tracing::warn!(round, segment, code = err.error, "spot check refused: {}", err.message);
            Ok(())
        }
        Err(CallError::Failed(e)) => Err(e),
    }
}

/// Downloads what a job names, trains it and compresses the pseudo-gradient of the fragment the round
/// synchronises. A round started early (overlap) begins from the worker's own weights and, at the merge
/// point τ, waits for its global weights and applies the previous round's late update to its fragment
/// (`SyncState::merge_late`); every other round of an overlap run merges at τ too, where the update is
/// zero for a worker that started from the global weights, so that the verifier, which does not know how
/// a worker started, re-runs every round alike. None: an early start that could not finish.
fn train_job(
    with: &mut TrainedWith<'_>,
    trainer: &mut Trainer,
    state: &mut WorkerState,
    ctx: &RunContext,
    job: Job,
    progress: &Arc<Mutex<Progress>>,
    summary: &mut WorkerSummary,
) -> Result<Option<PendingUpload>> {
    let started = Instant::now();
    let client = with.client;
    let (round, units, first_step, inner_steps) = match &job {
        Job::Open(a) => (a.round, a.units.clone(), a.first_step, a.inner_steps),
        Job::Ahead(a) => (a.round, a.units.clone(), a.first_step, a.inner_steps),
    };
    let fetch_global = |a: &Assignment, summary: &mut WorkerSummary| -> Result<Vec<tch::Tensor>> {
        let (bytes, fetched) = client.blob(&a.global_hash)?;
        summary.bytes_received += fetched;
        let (global, _) = decode_tensors(&bytes, Some(&ctx.specs))
            .map_err(|e| anyhow::anyhow!("global weights {}: {e}", a.global_hash))?;
        Ok(from_named(&global, ctx.device))
    };
    let (mut open, mut global) = match job {
        Job::Open(a) => {
            let global = fetch_global(&a, summary)?;
            (Some(a), Some(global))
        }
        Job::Ahead(_) => (None, None),
    };
    let mut parts = Vec::with_capacity(units.len());
    for u in &units {
        let (bytes, fetched) = client.blob(&u.hash)?;
        summary.bytes_received += fetched;
        parts.push(Shard::from_bytes(&bytes).with_context(|| format!("data unit {} ({})", u.index, u.hash))?);
    }
    // A round longer than one unit trains its units' windows back to back.
    let unit = Shard::concat(&parts).context("the assignment's data units")?;
    *progress.lock().expect("progress lock") = Progress { round: Some(round), step: 0, loss: None };
    tracing::info!(round, units = unit_list(&units), steps = inner_steps, ahead = open.is_none(), "training");
    // With error feedback, the residual this round starts from is committed to (the spot check's start link)
    // and kept with the chain's states until the round is settled.
    let residual_commitment = if ctx.chain_segments(inner_steps) > 0 && ctx.compression.uses_feedback() {
        let fragment = ctx.plan.synced_in(round);
        let indices = ctx.plan.tensors(fragment);
        let fragment_specs: Vec<TensorSpec> = indices.iter().map(|&i| ctx.specs[i].clone()).collect();
        let residual: Vec<Vec<f32>> = indices.iter().map(|&i| state.sync.residual[i].clone()).collect();
        let bytes = binding::encode_residual(&fragment_specs, &residual);
        let dir = ctx.proof_dir(round);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join("residual.bin");
        std::fs::write(&path, &bytes).with_context(|| format!("{}: cannot write", path.display()))?;
        Some(binding::residual_commitment(&bytes))
    } else {
        None
    };
    let start = match &global {
        Some(global) => state.sync.start_weights(&ctx.compression, &ctx.plan, round, global),
        None => state
            .sync
            .local
            .as_ref()
            .expect("an early start has the worker's own weights")
            .iter()
            .map(|t| t.copy())
            .collect(),
    };
    #[cfg(feature = "adversary")]
    let unit = ctx.adversary.borrow_mut().training_data(unit);
    load_weights(&trainer.model, &start);
    // With a hash chain, the round runs segment by segment and the state at every boundary is hashed
    // (and kept on disk until the round is settled, in case that segment is challenged). Under overlap the
    // merge point τ is a boundary too.
    let overlap = ctx.compression.overlap();
    let segments = ctx.chain_segments(inner_steps);
    let bounds = ctx.round_bounds(inner_steps);
    let proofs = ctx.proof_dir(round);
    let mut chain_hashes: Vec<Hash32> = Vec::new();
    let mut commit = |trainer: &Trainer, k: usize| -> Result<()> {
        if segments == 0 {
            return Ok(());
        }
        #[allow(unused_mut)]
        let mut bytes = chain::encode_state(trainer, &ctx.specs);
        #[cfg(feature = "adversary")]
        ctx.adversary.borrow_mut().committed_state(&mut bytes, k, &ctx.specs);
        std::fs::create_dir_all(&proofs).with_context(|| format!("{}: cannot create", proofs.display()))?;
        let path = proofs.join(format!("state-{k}.bin"));
        std::fs::write(&path, &bytes).with_context(|| format!("{}: cannot write", path.display()))?;
        chain_hashes.push(hash_bytes(&bytes));
        Ok(())
    };
    commit(trainer, 0)?;
    let (mut loss_sum, mut steps_run) = (0.0, 0u64);
    let mut training = Instant::now();
    for (k, window) in bounds.windows(2).enumerate() {
        #[cfg(feature = "adversary")]
        let skip = ctx.adversary.borrow().skips_training();
        #[cfg(not(feature = "adversary"))]
        let skip = false;
        if !skip {
            let stats = train_steps(trainer, &unit, first_step, inner_steps, window[0]..window[1], |step, s| {
                let mut p = progress.lock().expect("progress lock");
                p.step = step;
                p.loss = Some(s.loss);
            })?;
            loss_sum += stats.mean_loss * (window[1] - window[0]) as f64;
            steps_run += window[1] - window[0];
        }
        if overlap.is_on() && window[1] == overlap.steps {
            if global.is_none() {
                summary.train_seconds += training.elapsed().as_secs_f64();
                let ahead = AheadAssignment { round, units: units.clone(), first_step, inner_steps };
                let Some(a) = await_open_round(with, ctx, state, &ahead, summary)? else { return Ok(None) };
                global = Some(fetch_global(&a, summary)?);
                open = Some(a);
                training = Instant::now();
            }
            let global = global.as_ref().expect("the round's global weights");
            let mut weights = model_weights(&trainer.model);
            state.sync.merge_late(&ctx.plan, round, global, &start, &mut weights, overlap.merge);
            load_weights(&trainer.model, &weights);
        }
        commit(trainer, k + 1)?;
    }
    let a = open.expect("the round is open once its merge point is passed");
    let global = global.expect("the round's global weights");
    let stats_mean_loss = loss_sum / steps_run.max(1) as f64;
    summary.train_seconds += training.elapsed().as_secs_f64();
    #[allow(unused_mut)]
    let mut local = model_weights(&trainer.model);
    #[cfg(feature = "adversary")]
    ctx.adversary.borrow_mut().transform(&global, &mut local);
    #[cfg(not(feature = "adversary"))]
    {
        let finite = tch::no_grad(|| local.iter().all(|t| t.isfinite().all().int64_value(&[]) != 0));
        if !finite {
            bail!("round {}: training diverged (non-finite weights); not uploading", a.round);
        }
    }
    let mut metadata = BTreeMap::from([
        (delta_meta::ROUND.to_string(), a.round.to_string()),
        (delta_meta::UNIT.to_string(), unit_list(&a.units)),
        (delta_meta::BASE.to_string(), a.global_hash.hex()),
        (delta_meta::TRAIN_LOSS.to_string(), format!("{stats_mean_loss}")),
    ]);
    if !chain_hashes.is_empty() {
        metadata.insert(chain::CHAIN_META.to_string(), chain::chain_to_meta(&chain_hashes));
        if let Some(commitment) = residual_commitment {
            metadata.insert(binding::RESIDUAL_META.to_string(), commitment.hex());
        }
    }
    #[allow(unused_mut)]
    let mut upload =
        state.sync.prepare_upload(&ctx.compression, &ctx.plan, &ctx.specs, a.round, &global, local, &metadata);
    #[cfg(feature = "adversary")]
    ctx.adversary.borrow_mut().payload(
        client,
        &ctx.compression,
        &ctx.plan,
        &ctx.specs,
        a.round,
        &metadata,
        &mut upload.payload,
    );
    tracing::info!(
        round = a.round,
        loss = stats_mean_loss,
        fragment = upload.fragment,
        bytes = upload.payload.len(),
        secs = started.elapsed().as_secs_f64(),
        "inner steps done"
    );
    Ok(Some(PendingUpload {
        round: a.round,
        units: unit_list(&a.units),
        base: a.global_hash,
        train_loss: stats_mean_loss,
        fragment: upload.fragment,
        payload: upload.payload,
        residual: upload.residual,
        fp32_bytes: upload.fp32_bytes,
    }))
}

fn spawn_heartbeats(
    client: Client,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
    interval_ms: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let interval = Duration::from_millis(interval_ms.max(100));
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let p = progress.lock().expect("progress lock").clone();
                let beat = Heartbeat { round: p.round, step: p.step, loss: p.loss };
                // One attempt: a missed beat is harmless, and the main loop does the patient retrying.
                if let Err(e) = client.post_json_once::<HeartbeatResponse>("/v1/heartbeat", &beat) {
                    tracing::debug!("heartbeat failed: {e}");
                }
                next = Instant::now() + interval;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_signed_by(key: WorkerId) -> RunInfo {
        RunInfo {
            protocol_version: PROTOCOL_VERSION,
            run_id: "phase2".into(),
            model: serde_json::Value::Null,
            inner: serde_json::Value::Null,
            inner_steps: 1,
            batch_size: 1,
            seq_len: 1,
            rounds: 1,
            tokenizer_hash: Hash32([0; 32]),
            compression: serde_json::Value::Null,
            trust: serde_json::Value::Null,
            coordinator_key: key,
            max_delta_bytes: 1,
            heartbeat_interval_ms: 1,
        }
    }

    /// Whoever serves a campaign's next phase under another key (a swapped server, a hijacked address)
    /// is not followed; the first run, with nothing pinned yet, is taken on first use.
    #[test]
    fn a_later_phase_under_another_key_is_refused() {
        let (pinned, other) = (WorkerId([1; 32]), WorkerId([2; 32]));
        assert!(same_campaign_key(None, &run_signed_by(other)).is_ok());
        assert!(same_campaign_key(Some(pinned), &run_signed_by(pinned)).is_ok());
        let err = same_campaign_key(Some(pinned), &run_signed_by(other)).unwrap_err().to_string();
        assert!(err.contains("refusing to follow") && err.contains(&other.hex()), "{err}");
    }
}
