//! agora-worker: one contributor's side of a DiLoCo run.
//!
//! Owns: the worker's identity on disk, its HTTP client (signed requests, retries with backoff across
//! coordinator restarts), its blob cache (every download checked against its hash), its persistent AdamW
//! state, and the loop: ask for work → download weights and data → H inner steps → upload Δ.
//! Must not know about: other workers, aggregation, the coordinator's storage. It trusts nothing it
//! downloads without checking the hash it was told.

mod client;
mod state;

pub use client::{CallError, Client};

use agora_data::Shard;
use agora_diloco::tensors::{from_named, param_specs, to_named};
use agora_diloco::train_round;
use agora_model::{Llama, LlamaConfig};
use agora_protocol::messages::delta_meta;
use agora_protocol::{
    decode_tensors, encode_tensors, Assignment, Heartbeat, HeartbeatResponse, Identity, JoinRequest, JoinResponse,
    RunInfo, SubmitResponse, TensorSpec, WorkResponse, PROTOCOL_VERSION,
};
use agora_train::{TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use state::{PendingDelta, WorkerState};
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
    /// Leave the run after contributing this many rounds.
    pub max_rounds: Option<u64>,
    /// Give up when the coordinator has been unreachable this long.
    pub patience: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerSummary {
    pub worker: String,
    pub rounds_contributed: u64,
    pub rounds_rejected: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub finished: bool,
}

/// What the heartbeat thread reports.
#[derive(Default, Clone)]
struct Progress {
    round: Option<u64>,
    step: u64,
    loss: Option<f64>,
}

pub fn run_worker(options: &WorkerOptions) -> Result<WorkerSummary> {
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

    let run_dir = options.data_dir.join("runs").join(&info.run_id);
    let model = Llama::zeros(&model_config, options.device);
    let mut trainer = Trainer::new(model, train_config)?;
    let mut saved = WorkerState::load(&run_dir, &specs, options.device)?;
    if let Some(s) = &saved {
        s.restore_optimizer(&mut trainer.optimizer);
        tracing::info!(step = trainer.optimizer.step, trained_round = s.trained_round, "resumed optimizer state");
    }

    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let beats = spawn_heartbeats(client.clone(), progress.clone(), stop.clone(), info.heartbeat_interval_ms);

    let mut summary = WorkerSummary {
        worker: identity.id().hex(),
        rounds_contributed: 0,
        rounds_rejected: 0,
        bytes_sent: 0,
        bytes_received: 0,
        finished: false,
    };
    let result = (|| -> Result<()> {
        loop {
            if options.max_rounds.is_some_and(|n| summary.rounds_contributed >= n) {
                client.post_json::<serde_json::Value>("/v1/leave", &serde_json::json!({}))?;
                tracing::info!(rounds = summary.rounds_contributed, "contributed the requested rounds; left the run");
                return Ok(());
            }
            let work: WorkResponse = client.post_json("/v1/work", &serde_json::json!({}))?;
            let assignment = match work {
                WorkResponse::Finished { rounds, global_hash } => {
                    tracing::info!(rounds, %global_hash, "the run is finished");
                    summary.finished = true;
                    return Ok(());
                }
                WorkResponse::Wait { .. } => continue,
                WorkResponse::Assignment(a) => a,
            };
            let pending = match saved.as_ref().and_then(|s| s.pending.as_ref()) {
                Some(p)
                    if p.round == assignment.round && p.unit == assignment.unit && p.base == assignment.global_hash =>
                {
                    tracing::info!(round = p.round, "re-sending the pseudo-gradient saved before a restart");
                    p.clone()
                }
                _ => {
                    let (pending, state) = train_assignment(
                        &client,
                        &mut trainer,
                        &specs,
                        &assignment,
                        &progress,
                        &mut summary,
                        options.device,
                    )?;
                    state.save(&run_dir)?;
                    saved = Some(state);
                    pending
                }
            };
            let body = encode_tensors(&pending.delta, &pending.metadata());
            let path = format!("/v1/rounds/{}/delta", assignment.round);
            match client.post_bytes::<SubmitResponse>(&path, body.clone()) {
                Ok(r) => {
                    summary.rounds_contributed += 1;
                    summary.bytes_sent += body.len() as u64;
                    tracing::info!(
                        round = r.round,
                        bytes = body.len(),
                        new = r.newly_accepted,
                        loss = pending.train_loss,
                        "pseudo-gradient accepted"
                    );
                }
                // Too late (the round closed, or this worker was dropped and its data reassigned): the
                // work is lost, but the run goes on; ask for the next job.
                Err(CallError::Rejected { status, body: err }) if status == reqwest::StatusCode::CONFLICT => {
                    summary.rounds_rejected += 1;
                    tracing::warn!(
                        round = assignment.round,
                        code = err.error,
                        "pseudo-gradient refused: {}",
                        err.message
                    );
                }
                Err(CallError::Rejected { status, body: err }) if err.error == "unknown_worker" => {
                    tracing::warn!(%status, "the coordinator does not know this worker (was its state reset?); joining again");
                    client.post_json::<JoinResponse>(
                        "/v1/join",
                        &JoinRequest {
                            protocol_version: PROTOCOL_VERSION,
                            worker: identity.id(),
                            name: options.name.clone(),
                        },
                    )?;
                }
                // The coordinator refuses the payload itself: retraining would produce the same, so stop.
                Err(CallError::Rejected { status, body: err }) => {
                    bail!(
                        "the coordinator refused this worker's pseudo-gradient ({status} {}): {}",
                        err.error,
                        err.message
                    );
                }
                Err(CallError::Failed(e)) => return Err(e),
            }
            progress.lock().expect("progress lock").round = None;
        }
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = beats.join();
    result?;
    Ok(summary)
}

/// Downloads what an assignment names and trains it; returns the Δ to upload and the state to persist.
fn train_assignment(
    client: &Client,
    trainer: &mut Trainer,
    specs: &[TensorSpec],
    a: &Assignment,
    progress: &Arc<Mutex<Progress>>,
    summary: &mut WorkerSummary,
    device: Device,
) -> Result<(PendingDelta, WorkerState)> {
    let started = Instant::now();
    let (global_bytes, fetched_global) = client.blob(&a.global_hash)?;
    let (unit_bytes, fetched_unit) = client.blob(&a.unit_hash)?;
    summary.bytes_received += fetched_global + fetched_unit;
    let (global, _) = decode_tensors(&global_bytes, Some(specs))
        .map_err(|e| anyhow::anyhow!("global weights {}: {e}", a.global_hash))?;
    let global = from_named(&global, device);
    let unit = Shard::from_bytes(&unit_bytes).with_context(|| format!("data unit {}", a.unit_hash))?;
    *progress.lock().expect("progress lock") = Progress { round: Some(a.round), step: 0, loss: None };
    tracing::info!(round = a.round, unit = a.unit, epoch = a.epoch, steps = a.inner_steps, "training");
    let (delta, stats) = train_round(trainer, &global, &unit, a.first_step, a.inner_steps, |step, s| {
        let mut p = progress.lock().expect("progress lock");
        p.step = step;
        p.loss = Some(s.loss);
    })?;
    tracing::info!(round = a.round, loss = stats.mean_loss, secs = started.elapsed().as_secs_f64(), "inner steps done");
    let pending = PendingDelta {
        round: a.round,
        unit: a.unit,
        base: a.global_hash,
        train_loss: stats.mean_loss,
        delta: to_named(specs, &delta),
    };
    let state = WorkerState::capture(&trainer.optimizer, specs, a.round, pending.clone());
    Ok((pending, state))
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

impl PendingDelta {
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (delta_meta::ROUND.to_string(), self.round.to_string()),
            (delta_meta::UNIT.to_string(), self.unit.to_string()),
            (delta_meta::BASE.to_string(), self.base.hex()),
            (delta_meta::TRAIN_LOSS.to_string(), format!("{}", self.train_loss)),
        ])
    }
}
