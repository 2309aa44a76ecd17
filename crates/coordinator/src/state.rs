//! The run's state machine: membership, data assignment, submissions, and the round commit.
//!
//! The database is the truth. Every change is one transaction, taken under one async lock (`live`), so
//! requests are serialised and each sees the state the previous one committed. Blobs are written (and
//! fsynced) before the transaction that names them, so after a crash at any instant the store holds
//! either the round before a commit or the round after it, never a mixture: an accepted pseudo-gradient
//! is in `submissions` before the worker hears "accepted", and it is marked applied in the same
//! transaction that records the outer step that used it.
//!
//! Aggregation takes one model-sized buffer whatever the number of workers: each accepted payload is
//! decoded and added to the open round's sum as it arrives (at most `DELTA_PERMITS` uploads are read at
//! once), in acceptance order (`submissions.seq`). After a restart the sum is rebuilt from the stored
//! payloads in that same order, so the outer step computes the same bits either way.

use crate::blobs::BlobStore;
use crate::error::ApiError;
use crate::metrics::{Gauges, Metrics};
use crate::prepare::prepare_data;
use crate::run_file::{AdmissionPolicy, RunFile};
use crate::trust;
use agora_data::Shard;
use agora_diloco::codec::{self, Accumulator, Expected, MAX_METADATA};
use agora_diloco::tensors::{from_named, load_weights, model_weights, param_specs, to_named};
use agora_diloco::{unit_order, FragmentPlan, OuterOptimizer};
use agora_model::{Llama, LlamaConfig};
use agora_protocol::messages::delta_meta;
use agora_protocol::{
    decode_tensors, encode_tensors, Assignment, Contribution, Hash32, Heartbeat, HeartbeatResponse, Identity,
    JoinResponse, JudgedSubmission, LeaderboardEntry, LedgerReport, ProofResponse, RoundSummary, RunInfo, StatusReport,
    SubmitResponse, TensorSpec, WorkResponse, WorkerId, WorkerStatus, PROTOCOL_VERSION,
};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::Device;
use tokio::sync::{watch, Mutex};

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub struct Options {
    pub run_file: PathBuf,
    /// Working directory: the SQLite database, blobs and prepared data unless given elsewhere.
    pub dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; default `sqlite://DIR/coordinator.db`.
    pub database: Option<String>,
    /// A directory or object-store URL; default `DIR/blobs`.
    pub blobs: Option<String>,
}

/// What changes between rounds, cached from the database.
struct Live {
    round: u64,
    opened_ms: i64,
    global_hash: Hash32,
    momentum_hash: Option<Hash32>,
    finished: bool,
    /// The sum of the open round's accepted payloads, in acceptance order; None when it must be rebuilt
    /// from the stored payloads (after a restart, or if adding one failed).
    sum: Option<Accumulator>,
}

/// How many pseudo-gradient uploads are read and decoded at once: bounds the coordinator's memory to a
/// few payloads plus one sum, however many workers upload together.
pub const DELTA_PERMITS: usize = 2;

/// What a worker last told us; kept outside `live` so heartbeats never wait for an outer step.
#[derive(Clone)]
struct Presence {
    last_seen: Instant,
    round: Option<u64>,
    step: u64,
    loss: Option<f64>,
}

pub struct Coordinator {
    pub run: RunFile,
    pub run_id: String,
    pub info: RunInfo,
    pub model_config: LlamaConfig,
    pub specs: Vec<TensorSpec>,
    /// Streaming DiLoCo's fragments (one, covering every tensor, unless the run asks for more).
    pub plan: FragmentPlan,
    /// Each fragment's tensors, what its payloads carry.
    pub fragment_specs: Vec<Vec<TensorSpec>>,
    pub max_delta_bytes: u64,
    /// Held while an upload is read and decoded (see [`DELTA_PERMITS`]).
    pub delta_permits: tokio::sync::Semaphore,
    pub blobs: BlobStore,
    pub metrics: Metrics,
    db: AnyPool,
    val: Shard,
    units: Vec<Hash32>,
    live: Mutex<Live>,
    /// Known worker ids (joined at some point) and their names.
    known: std::sync::Mutex<HashMap<WorkerId, String>>,
    presence: std::sync::Mutex<HashMap<WorkerId, Presence>>,
    /// Bumped on every state change that a long-polling worker may be waiting for.
    changes: watch::Sender<u64>,
    started: Instant,
    /// Mirrors of `live.round` and `live.finished` for readers that must not wait for the lock.
    open_round: AtomicU64,
    finished: AtomicBool,
    /// The coordinator's own key: signs receipts and round roots, and keys its secret choices.
    pub key: Identity,
    /// Who may join when the run restricts admission (allowlist or cohort), with the reason shown to others.
    admitted: Option<HashSet<WorkerId>>,
    admission_note: String,
}

/// What a pseudo-gradient upload carries besides its values, found before the lock is taken.
pub struct CheckedDelta {
    pub metadata: BTreeMap<String, String>,
    /// blake3 of the decoded values (replay detection), when the run verifies.
    pub content_hash: Option<Hash32>,
}

fn hash_col(row: &AnyRow, col: &str) -> Result<Hash32> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| anyhow::anyhow!("database column {col} holds {s:?}, not a hash: {e}"))
}

fn worker_col(row: &AnyRow, col: &str) -> Result<WorkerId> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| anyhow::anyhow!("database column {col} holds {s:?}, not a worker id: {e}"))
}

/// What the outer step computes off the async runtime: the new global weights, momentum and val loss.
struct OuterStepOutput {
    global_bytes: Vec<u8>,
    momentum_bytes: Option<Vec<u8>>,
    val_loss: Option<f64>,
}

/// One upload of a round being closed, in acceptance order.
struct SubmissionRow {
    worker: WorkerId,
    delta_hash: Hash32,
    unit: u64,
    train_loss: Option<f64>,
}

fn hex_digest(d: &[u8; 32]) -> String {
    Hash32(*d).hex()
}

/// Applies a judgement to an identity's reputation (created at 0 on its first judgement).
async fn update_reputation(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    worker: &WorkerId,
    outcome: agora_verify::Outcome,
    alpha: f64,
    accepted: bool,
) -> Result<(), ApiError> {
    let old: f64 = sqlx::query("SELECT rating FROM reputation WHERE worker = $1")
        .bind(worker.hex())
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get("rating"))
        .transpose()?
        .unwrap_or(0.0);
    let rating = agora_verify::update_rating(old, outcome, alpha);
    let (a, r) = if accepted { (1i64, 0i64) } else { (0, 1) };
    sqlx::query(
        "INSERT INTO reputation (worker, rating, accepted, rejected, updated_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (worker) DO UPDATE SET rating = excluded.rating, accepted = reputation.accepted + excluded.accepted, \
         rejected = reputation.rejected + excluded.rejected, updated_ms = excluded.updated_ms",
    )
    .bind(worker.hex())
    .bind(rating)
    .bind(a)
    .bind(r)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One assignment row.
struct AssignmentRow {
    epoch: u64,
    unit: u64,
    state: String,
}

impl Coordinator {
    /// Opens (or creates) the run's store and, on first start, prepares its data and initial weights.
    pub async fn open(options: &Options) -> Result<Arc<Coordinator>> {
        let run = RunFile::load(&options.run_file)?;
        let run_id = run.run_id()?;
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("{}: cannot create the coordinator directory", options.dir.display()))?;
        let database = match &options.database {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", options.dir.join("coordinator.db").display()),
        };
        let db = connect(&database).await?;
        let key =
            Identity::load_or_create(&options.dir.join("coordinator.key")).context("the coordinator's signing key")?;
        let blobs = match &options.blobs {
            Some(location) => BlobStore::open(location)?,
            None => BlobStore::local(&options.dir.join("blobs"))?,
        };

        let existing = sqlx::query("SELECT id, model_config, tokenizer_hash, val_hash, finished FROM run")
            .fetch_optional(&db)
            .await?;
        let (model_config, tokenizer_hash, val_hash) = match existing {
            Some(row) => {
                let stored: String = row.try_get("id")?;
                if stored != run_id {
                    bail!(
                        "{database} holds run {stored}, but {} defines run {run_id} (the run file or its corpus changed); \
                         use a new --dir/--database for a new run",
                        options.run_file.display()
                    );
                }
                let config: String = row.try_get("model_config")?;
                let config = LlamaConfig::from_json_str(&config)?;
                (config, hash_col(&row, "tokenizer_hash")?, hash_col(&row, "val_hash")?)
            }
            None => Self::initialise(&run, &run_id, &options.dir, &db, &blobs).await?,
        };
        let val_bytes = blobs.get(&val_hash).await.context("the validation shard blob")?;
        let val = Shard::from_bytes(&val_bytes)?;
        let units: Vec<Hash32> = sqlx::query("SELECT hash FROM units ORDER BY id")
            .fetch_all(&db)
            .await?
            .iter()
            .map(|r| hash_col(r, "hash"))
            .collect::<Result<_>>()?;

        let round_row =
            sqlx::query("SELECT round, global_hash, momentum_hash, opened_ms FROM rounds ORDER BY round DESC LIMIT 1")
                .fetch_one(&db)
                .await?;
        let finished: i64 = sqlx::query("SELECT finished FROM run").fetch_one(&db).await?.try_get("finished")?;
        let momentum: Option<String> = round_row.try_get("momentum_hash")?;
        let live = Live {
            round: round_row.try_get::<i64, _>("round")? as u64,
            opened_ms: round_row.try_get("opened_ms")?,
            global_hash: hash_col(&round_row, "global_hash")?,
            momentum_hash: momentum.map(|m| m.parse()).transpose().map_err(|e: String| anyhow::anyhow!(e))?,
            finished: finished != 0,
            sum: None,
        };

        let specs = param_specs(&model_config);
        let plan = FragmentPlan::new(&specs, model_config.num_hidden_layers, run.compression.fragments)
            .context("[compression] fragments")?;
        let fragment_specs: Vec<Vec<TensorSpec>> = (0..plan.count()).map(|f| plan.specs(&specs, f)).collect();
        let max_delta_bytes = fragment_specs
            .iter()
            .map(|s| codec::payload_len(&run.compression, s, MAX_METADATA) as u64)
            .max()
            .expect("at least one fragment");
        let info = RunInfo {
            protocol_version: PROTOCOL_VERSION,
            run_id: run_id.clone(),
            model: model_config.to_hf_json(),
            inner: serde_json::to_value(run.train_config())?,
            inner_steps: run.inner.steps,
            batch_size: run.inner.batch_size,
            seq_len: run.inner.seq_len,
            rounds: run.planned_rounds(),
            tokenizer_hash,
            compression: serde_json::to_value(run.compression)?,
            trust: serde_json::to_value(run.trust)?,
            coordinator_key: key.id(),
            max_delta_bytes,
            heartbeat_interval_ms: (run.rounds.heartbeat_timeout_secs * 1000 / 6).clamp(200, 5000),
        };

        let now = Instant::now();
        let mut known = HashMap::new();
        let mut presence = HashMap::new();
        for row in sqlx::query("SELECT id, name, active FROM workers").fetch_all(&db).await? {
            let id = worker_col(&row, "id")?;
            known.insert(id, row.try_get::<String, _>("name")?);
            if row.try_get::<i64, _>("active")? != 0 {
                // A restart is not the workers' fault: everyone active gets a fresh timeout.
                presence.insert(id, Presence { last_seen: now, round: None, step: 0, loss: None });
            }
        }
        let (live_round, live_finished) = (live.round, live.finished);
        let metrics = Metrics::default();
        let counters: Vec<(String, u64)> = sqlx::query("SELECT name, value FROM counters")
            .fetch_all(&db)
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("name")?, r.try_get::<i64, _>("value")? as u64)))
            .collect::<Result<_>>()?;
        metrics.restore(&counters);
        let (admitted, admission_note) = admission(&run, &db).await?;
        tracing::info!(run_id, round = live.round, finished = live.finished, units = units.len(), "run opened");
        Ok(Arc::new(Coordinator {
            run,
            run_id,
            info,
            model_config,
            specs,
            plan,
            fragment_specs,
            max_delta_bytes,
            delta_permits: tokio::sync::Semaphore::new(DELTA_PERMITS),
            blobs,
            metrics,
            db,
            val,
            units,
            live: Mutex::new(live),
            known: std::sync::Mutex::new(known),
            presence: std::sync::Mutex::new(presence),
            changes: watch::channel(0).0,
            started: now,
            open_round: AtomicU64::new(live_round),
            finished: AtomicBool::new(live_finished),
            key,
            admitted,
            admission_note,
        }))
    }

    /// First start: data, tokenizer and initial weights into blobs, then the run, its units and round 0 in
    /// one transaction (a crash before it commits just repeats the preparation).
    async fn initialise(
        run: &RunFile,
        run_id: &str,
        dir: &std::path::Path,
        db: &AnyPool,
        blobs: &BlobStore,
    ) -> Result<(LlamaConfig, Hash32, Hash32)> {
        let (run2, work_dir) = (run.clone(), dir.join("prepared"));
        let prepared = tokio::task::spawn_blocking(move || prepare_data(&run2, &work_dir)).await??;
        let tokenizer_hash = blobs.put(Bytes::from(prepared.tokenizer.to_json_string().into_bytes())).await?;
        let val_hash = blobs.put(Bytes::from(prepared.val.to_bytes())).await?;
        let mut unit_hashes = Vec::with_capacity(prepared.units.len());
        for unit in &prepared.units {
            unit_hashes.push((blobs.put(Bytes::from(unit.to_bytes())).await?, unit.len()));
        }
        let (config, seed, val, seq, batch, eval_batches) = (
            prepared.model_config.clone(),
            run.seed,
            prepared.val.clone(),
            run.inner.seq_len,
            run.inner.batch_size,
            run.eval.batches,
        );
        let (init_bytes, val_loss) = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, f64)> {
            let model = Llama::new(&config, Device::Cpu, seed);
            let specs = param_specs(&config);
            let bytes = encode_tensors(&to_named(&specs, &model_weights(&model)), &round_meta(0));
            let loss = agora_train::evaluate(&model, &val, seq, batch, eval_batches)?;
            Ok((bytes, loss))
        })
        .await??;
        let init_hash = blobs.put(Bytes::from(init_bytes)).await?;

        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO run (id, run_file, model_config, tokenizer_hash, val_hash, units, created_ms, finished) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0)",
        )
        .bind(run_id)
        .bind(serde_json::to_string(run)?)
        .bind(serde_json::to_string(&prepared.model_config.to_hf_json())?)
        .bind(tokenizer_hash.hex())
        .bind(val_hash.hex())
        .bind(unit_hashes.len() as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        for (i, (hash, tokens)) in unit_hashes.iter().enumerate() {
            sqlx::query("INSERT INTO units (id, hash, tokens) VALUES ($1, $2, $3)")
                .bind(i as i64)
                .bind(hash.hex())
                .bind(*tokens as i64)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO rounds (round, global_hash, momentum_hash, opened_ms, closed_ms, contributions, train_loss, val_loss) \
             VALUES (0, $1, NULL, $2, NULL, 0, NULL, $3)",
        )
        .bind(init_hash.hex())
        .bind(now_ms())
        .bind(val_loss)
        .execute(&mut *tx)
        .await?;
        // The reward pool is funded once, from the run's issuance account: the first double entry.
        let pool = run.trust.reward_pool.min(i64::MAX as u64) as i64;
        for (seq, (account, amount)) in
            [(format!("issuance:{run_id}"), -pool), (agora_ledger::pool_account(run_id), pool)].into_iter().enumerate()
        {
            sqlx::query(
                "INSERT INTO ledger (seq, round, account, amount, memo, created_ms) VALUES ($1, NULL, $2, $3, 'fund the reward pool', $4)",
            )
            .bind(seq as i64)
            .bind(account)
            .bind(amount)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(run_id, units = unit_hashes.len(), val_loss, "run initialised");
        Ok((prepared.model_config, tokenizer_hash, val_hash))
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    pub fn is_known(&self, worker: &WorkerId) -> bool {
        self.known.lock().expect("known lock").contains_key(worker)
    }

    fn touch(&self, worker: &WorkerId) {
        let mut presence = self.presence.lock().expect("presence lock");
        let p =
            presence.entry(*worker).or_insert(Presence { last_seen: Instant::now(), round: None, step: 0, loss: None });
        p.last_seen = Instant::now();
    }

    /// The round's deadline: its opening time plus the run's deadline, but never earlier than a
    /// heartbeat timeout after this process started (workers need a moment to find a restarted coordinator).
    fn deadline_ms(&self, live: &Live) -> i64 {
        let by_round = live.opened_ms + (self.run.rounds.deadline_secs * 1000) as i64;
        let started_ago = self.started.elapsed().as_millis() as i64;
        let grace = now_ms() - started_ago + (self.run.rounds.heartbeat_timeout_secs * 1000) as i64;
        by_round.max(grace)
    }

    /// Records a request nonce; a nonce seen before (within the signature window) is a replay.
    pub async fn record_nonce(&self, worker: &WorkerId, nonce: &str, timestamp_ms: u64) -> Result<(), ApiError> {
        let inserted = sqlx::query(
            "INSERT INTO nonces (worker, nonce, timestamp_ms) VALUES ($1, $2, $3) ON CONFLICT (worker, nonce) DO NOTHING",
        )
        .bind(worker.hex())
        .bind(nonce)
        .bind(timestamp_ms as i64)
        .execute(&self.db)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ApiError::unauthorized(
                "replayed_request",
                format!("nonce {nonce} was already used by worker {}: a request is accepted once", worker.short()),
            ));
        }
        Ok(())
    }

    pub async fn join(&self, worker: WorkerId, name: &str) -> Result<JoinResponse, ApiError> {
        if let Some(admitted) = &self.admitted {
            if !admitted.contains(&worker) {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "not_admitted",
                    format!("worker {} is not admitted: {}", worker.short(), self.admission_note),
                ));
            }
        }
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        let live = self.live.lock().await;
        let existing =
            sqlx::query("SELECT id FROM workers WHERE id = $1").bind(worker.hex()).fetch_optional(&self.db).await?;
        if existing.is_some() {
            sqlx::query("UPDATE workers SET active = 1, name = $2 WHERE id = $1")
                .bind(worker.hex())
                .bind(&name)
                .execute(&self.db)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO workers (id, name, joined_ms, active, rounds_accepted, bytes_sent, bytes_received) \
                 VALUES ($1, $2, $3, 1, 0, 0, 0)",
            )
            .bind(worker.hex())
            .bind(&name)
            .bind(now_ms())
            .execute(&self.db)
            .await?;
        }
        self.known.lock().expect("known lock").insert(worker, name.clone());
        self.touch(&worker);
        tracing::info!(
            worker = worker.short(),
            name,
            returning = existing.is_some(),
            round = live.round,
            "worker joined"
        );
        self.notify();
        Ok(JoinResponse { worker, round: live.round, returning: existing.is_some() })
    }

    /// A worker leaves on purpose: like being dropped, without waiting for the timeout.
    pub async fn leave(self: &Arc<Self>, worker: WorkerId) -> Result<(), ApiError> {
        let mut live = self.live.lock().await;
        self.drop_worker(&live, &worker, "left").await?;
        self.presence.lock().expect("presence lock").remove(&worker);
        self.maybe_close_round(&mut live).await?;
        Ok(())
    }

    pub fn heartbeat(&self, worker: WorkerId, beat: &Heartbeat) -> HeartbeatResponse {
        {
            let mut presence = self.presence.lock().expect("presence lock");
            let p = presence.entry(worker).or_insert(Presence {
                last_seen: Instant::now(),
                round: None,
                step: 0,
                loss: None,
            });
            p.last_seen = Instant::now();
            p.round = beat.round;
            p.step = beat.step;
            p.loss = beat.loss.filter(|l| l.is_finite());
        }
        HeartbeatResponse {
            round: self.open_round.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }

    async fn assignment_row(&self, round: u64, worker: &WorkerId) -> Result<Option<AssignmentRow>, ApiError> {
        let row = sqlx::query("SELECT epoch, unit, state FROM assignments WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .fetch_optional(&self.db)
            .await?;
        Ok(match row {
            Some(r) => Some(AssignmentRow {
                epoch: r.try_get::<i64, _>("epoch")? as u64,
                unit: r.try_get::<i64, _>("unit")? as u64,
                state: r.try_get("state")?,
            }),
            None => None,
        })
    }

    fn assignment(&self, live: &Live, row: &AssignmentRow) -> Assignment {
        Assignment {
            round: live.round,
            global_hash: live.global_hash,
            unit: row.unit,
            unit_hash: self.units[row.unit as usize],
            epoch: row.epoch,
            first_step: live.round * self.run.inner.steps,
            inner_steps: self.run.inner.steps,
            deadline_unix_ms: self.deadline_ms(live) as u64,
        }
    }

    /// The worker's job for the open round: its current assignment, a new one, or "wait".
    pub async fn next_work(&self, worker: WorkerId) -> Result<WorkResponse, ApiError> {
        let live = self.live.lock().await;
        self.touch(&worker);
        if live.finished {
            return Ok(WorkResponse::Finished { rounds: live.round, global_hash: live.global_hash });
        }
        sqlx::query("UPDATE workers SET active = 1 WHERE id = $1 AND active = 0")
            .bind(worker.hex())
            .execute(&self.db)
            .await?;
        match self.assignment_row(live.round, &worker).await? {
            Some(row) if row.state == "training" => return Ok(WorkResponse::Assignment(self.assignment(&live, &row))),
            Some(row) if row.state == "submitted" || row.state == "applied" => {
                return Ok(WorkResponse::Wait { round: live.round, retry_after_ms: 1000 })
            }
            _ => {}
        }
        let row = self.take_unit(&live, &worker).await?;
        tracing::info!(worker = worker.short(), round = live.round, unit = row.unit, epoch = row.epoch, "assigned");
        self.notify();
        Ok(WorkResponse::Assignment(self.assignment(&live, &row)))
    }

    /// Hands the worker the first pending unit of the earliest epoch (opening the next epoch when every
    /// unit of the current ones is assigned or done), in one transaction.
    async fn take_unit(&self, live: &Live, worker: &WorkerId) -> Result<AssignmentRow, ApiError> {
        let mut tx = self.db.begin().await?;
        let pending =
            "SELECT epoch, position, unit FROM work_queue WHERE state = 'pending' ORDER BY epoch, position LIMIT 1";
        let mut row = sqlx::query(pending).fetch_optional(&mut *tx).await?;
        if row.is_none() {
            let next: i64 = sqlx::query("SELECT COALESCE(MAX(epoch) + 1, 0) AS next FROM work_queue")
                .fetch_one(&mut *tx)
                .await?
                .try_get("next")?;
            for (position, unit) in unit_order(self.run.seed, next as u64, self.units.len()).into_iter().enumerate() {
                sqlx::query("INSERT INTO work_queue (epoch, position, unit, state) VALUES ($1, $2, $3, 'pending')")
                    .bind(next)
                    .bind(position as i64)
                    .bind(unit as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            row = sqlx::query(pending).fetch_optional(&mut *tx).await?;
        }
        let row = row.context("a freshly opened epoch has pending units")?;
        let (epoch, position, unit): (i64, i64, i64) =
            (row.try_get("epoch")?, row.try_get("position")?, row.try_get("unit")?);
        sqlx::query("UPDATE work_queue SET state = 'assigned' WHERE epoch = $1 AND position = $2")
            .bind(epoch)
            .bind(position)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM assignments WHERE round = $1 AND worker = $2")
            .bind(live.round as i64)
            .bind(worker.hex())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO assignments (round, worker, epoch, position, unit, state, assigned_ms) \
             VALUES ($1, $2, $3, $4, $5, 'training', $6)",
        )
        .bind(live.round as i64)
        .bind(worker.hex())
        .bind(epoch)
        .bind(position)
        .bind(unit)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AssignmentRow { epoch: epoch as u64, unit: unit as u64, state: "training".into() })
    }

    /// What a payload for `round` must be: the run's codec, and the tensors of the fragment it synchronises.
    fn expected(&self, round: u64) -> Expected<'_> {
        let fragment = self.plan.synced_in(round);
        Expected { config: &self.run.compression, fragment, specs: &self.fragment_specs[fragment] }
    }

    /// Validates a pseudo-gradient upload for `round` without touching state (runs before taking the lock);
    /// returns its metadata.
    pub fn check_delta(&self, round: u64, body: &[u8]) -> Result<CheckedDelta, ApiError> {
        let expected = self.expected(round);
        let payload = codec::parse(body, expected)?;
        let content_hash =
            self.run.trust.verify.then(|| trust::content_hash(&self.run.compression, expected.specs, &payload));
        Ok(CheckedDelta { metadata: payload.metadata, content_hash })
    }

    /// Segments of a round's hash chain (0: the run does not spot-check).
    fn chain_segments(&self) -> u64 {
        if self.run.trust.verify {
            self.run.trust.chain_segments(self.run.inner.steps)
        } else {
            0
        }
    }

    /// An upload whose values are not finite (behind a valid checksum) is a poisoned contribution, not a
    /// transmission error: the worker's assignment is rejected (its data goes back to the queue, so the
    /// round need not wait for it) and its reputation reset.
    pub async fn reject_upload(self: &Arc<Self>, worker: WorkerId, round: u64, code: &str) -> Result<(), ApiError> {
        if !self.run.trust.verify {
            return Ok(());
        }
        let mut live = self.live.lock().await;
        if round != live.round || live.finished {
            return Ok(());
        }
        match self.assignment_row(round, &worker).await? {
            Some(row) if row.state == "training" => {}
            _ => return Ok(()),
        }
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE work_queue SET state = 'pending' WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.round = $1 \
             AND a.worker = $2 AND a.epoch = work_queue.epoch AND a.position = work_queue.position)",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE assignments SET state = 'rejected' WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .execute(&mut *tx)
            .await?;
        update_reputation(&mut tx, &worker, agora_verify::Outcome::Slashed, self.run.trust.reputation_alpha, false)
            .await?;
        tx.commit().await?;
        tracing::warn!(worker = worker.short(), round, code, "poisoned upload: assignment rejected, reputation reset");
        self.notify();
        self.maybe_close_round(&mut live).await
    }

    /// Adds a payload to `sum` off the async runtime. `checked`: this very buffer passed [`Self::check_delta`]
    /// in the same request, so only its structure is parsed again; a payload read back from the blob store is
    /// validated in full.
    async fn add_to_sum(
        self: &Arc<Self>,
        round: u64,
        mut sum: Accumulator,
        body: Bytes,
        checked: bool,
    ) -> Result<Accumulator> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> Result<Accumulator> {
            let expected = me.expected(round);
            let payload = if checked { codec::parse_accepted(&body, expected) } else { codec::parse(&body, expected) }
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sum.add(&payload);
            Ok(sum)
        })
        .await
        .map_err(|e| anyhow::anyhow!("accumulation task failed: {e}"))?
    }

    /// The open round's sum: the live one, or rebuilt from the stored payloads in acceptance order.
    async fn round_sum(self: &Arc<Self>, live: &mut Live) -> Result<Accumulator, ApiError> {
        let rows = sqlx::query("SELECT delta_hash FROM submissions WHERE round = $1 AND applied = 0 ORDER BY seq")
            .bind(live.round as i64)
            .fetch_all(&self.db)
            .await?;
        if let Some(sum) = live.sum.take() {
            if sum.count() == rows.len() {
                return Ok(sum);
            }
            tracing::warn!(round = live.round, held = sum.count(), stored = rows.len(), "rebuilding the round's sum");
        }
        let fragment = self.plan.synced_in(live.round);
        let mut sum = Accumulator::new(self.run.compression, self.fragment_specs[fragment].clone());
        for row in &rows {
            let body = self.blobs.get(&hash_col(row, "delta_hash")?).await?;
            sum = self.add_to_sum(live.round, sum, body, false).await?;
        }
        Ok(sum)
    }

    /// Accepts a validated pseudo-gradient for `round`, durably, then closes the round if it is complete.
    pub async fn submit(
        self: &Arc<Self>,
        worker: WorkerId,
        round: u64,
        body: Bytes,
        checked: &CheckedDelta,
    ) -> Result<SubmitResponse, ApiError> {
        let meta = &checked.metadata;
        let mut live = self.live.lock().await;
        self.touch(&worker);
        // A retried upload (the answer to the first was lost, perhaps to a coordinator restart) is
        // answered as accepted, even if its round has closed since: it was, and it was applied.
        let existing = sqlx::query("SELECT delta_hash, challenge FROM submissions WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .fetch_optional(&self.db)
            .await?;
        if let Some(existing) = existing {
            return Ok(SubmitResponse {
                round,
                delta_hash: hash_col(&existing, "delta_hash")?,
                newly_accepted: false,
                challenge: existing.try_get::<Option<i64>, _>("challenge")?.map(|c| c as u64),
            });
        }
        if live.finished {
            return Err(ApiError::conflict("run_finished", format!("the run finished after round {}", live.round)));
        }
        if round < live.round {
            return Err(ApiError::conflict(
                "round_closed",
                format!("round {round} is closed (the run is at round {}); ask for new work", live.round),
            ));
        }
        if round > live.round {
            return Err(ApiError::conflict(
                "wrong_round",
                format!("round {round} is not open; the open round is {}", live.round),
            ));
        }
        let Some(row) = self.assignment_row(round, &worker).await? else {
            return Err(ApiError::conflict("no_assignment", format!("this worker has no assignment in round {round}")));
        };
        match row.state.as_str() {
            "training" => {}
            "released" => {
                return Err(ApiError::conflict(
                    "assignment_released",
                    format!(
                        "this worker's round-{round} data was reassigned (it was dropped or left); ask for new work"
                    ),
                ))
            }
            other => {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "assignment of {} in round {round} is {other:?} but it has no submission",
                    worker.short()
                )))
            }
        }
        let expect = |key: &str, want: String| -> Result<(), ApiError> {
            match meta.get(key) {
                Some(v) if *v == want => Ok(()),
                Some(v) => Err(ApiError::unprocessable(
                    "wrong_metadata",
                    format!("metadata {key} is {v:?}, expected {want:?}"),
                )),
                None => Err(ApiError::unprocessable("wrong_metadata", format!("metadata {key} is missing"))),
            }
        };
        expect(delta_meta::ROUND, round.to_string())?;
        expect(delta_meta::UNIT, row.unit.to_string())?;
        expect(delta_meta::BASE, live.global_hash.hex())?;
        let train_loss: Option<f64> =
            meta.get(delta_meta::TRAIN_LOSS).and_then(|v| v.parse().ok()).filter(|v: &f64| v.is_finite());
        let segments = self.chain_segments();
        let chain = if segments > 0 {
            let hashes = agora_verify::chain::parse_chain(meta, segments)
                .map_err(|e| ApiError::unprocessable("wrong_metadata", e))?;
            Some(agora_verify::chain::chain_to_meta(&hashes))
        } else {
            None
        };
        let payload_hash = agora_protocol::hash_bytes(&body);
        let challenge = trust::challenge_for(
            self.key.keyed_hash("agora-coordinator v1 spot check", &payload_hash.0),
            self.run.trust.spot_check,
            segments,
        );

        let bytes = body.len() as i64;
        let fp32_bytes =
            4 * self.expected(round).specs.iter().map(|s| s.shape.iter().product::<usize>()).sum::<usize>();
        let hash = self.blobs.put(body.clone()).await?;
        let mut tx = self.db.begin().await?;
        let seq: i64 = sqlx::query("SELECT COUNT(*) AS n FROM submissions WHERE round = $1")
            .bind(round as i64)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        sqlx::query(
            "INSERT INTO submissions (round, worker, epoch, unit, delta_hash, bytes, train_loss, received_ms, applied, seq, \
             fp32_bytes, chain, challenge, spot_check, content_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11, $12, $13, $14)",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .bind(row.epoch as i64)
        .bind(row.unit as i64)
        .bind(hash.hex())
        .bind(bytes)
        .bind(train_loss)
        .bind(now_ms())
        .bind(seq)
        .bind(fp32_bytes as i64)
        .bind(chain)
        .bind(challenge.map(|c| c as i64))
        .bind(challenge.map(|_| "pending"))
        .bind(checked.content_hash.map(|h| h.hex()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE assignments SET state = 'submitted' WHERE round = $1 AND worker = $2")
            .bind(round as i64)
            .bind(worker.hex())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE workers SET bytes_sent = bytes_sent + $2 WHERE id = $1")
            .bind(worker.hex())
            .bind(bytes)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // The sum follows the acceptance order (seq). Any failure here only costs a rebuild at close. A
        // verifying run judges the round's uploads together at close instead.
        let held = live.sum.take().filter(|s| s.count() == seq as usize && !self.run.trust.verify);
        if let Some(sum) = held.or_else(|| {
            (seq == 0 && !self.run.trust.verify).then(|| {
                Accumulator::new(self.run.compression, self.fragment_specs[self.plan.synced_in(round)].clone())
            })
        }) {
            match self.add_to_sum(round, sum, body, true).await {
                Ok(sum) => live.sum = Some(sum),
                Err(e) => {
                    tracing::error!("could not add an accepted payload to the round's sum (rebuilt at close): {e:#}")
                }
            }
        }
        self.metrics.submissions_accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(worker = worker.short(), round, unit = row.unit, bytes, train_loss, "pseudo-gradient accepted");
        self.notify();
        self.maybe_close_round(&mut live).await?;
        Ok(SubmitResponse { round, delta_hash: hash, newly_accepted: true, challenge })
    }

    /// Largest proof upload: two training states (weights and both AdamW moments) plus their framing.
    pub fn max_proof_bytes(&self) -> u64 {
        let elements: usize = self.specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        2 * (3 * 4 * elements as u64 + 64 * 1024 * 3) + 8
    }

    /// A spot-check answer: the challenged segment's start and end states. They must hash to the committed
    /// boundary states, and re-running the segment from the start must reproduce the end.
    pub async fn proof(self: &Arc<Self>, worker: WorkerId, round: u64, body: Bytes) -> Result<ProofResponse, ApiError> {
        let row =
            sqlx::query("SELECT unit, chain, challenge, spot_check FROM submissions WHERE round = $1 AND worker = $2")
                .bind(round as i64)
                .bind(worker.hex())
                .fetch_optional(&self.db)
                .await?
                .ok_or_else(|| {
                    ApiError::conflict("no_submission", format!("this worker has no submission in round {round}"))
                })?;
        let Some(segment) = row.try_get::<Option<i64>, _>("challenge")?.map(|c| c as u64) else {
            return Err(ApiError::conflict("not_challenged", format!("round {round}'s submission was not challenged")));
        };
        let state: Option<String> = row.try_get("spot_check")?;
        if state.as_deref() != Some("pending") {
            // Answered before (a retry): the verdict stands.
            return Ok(ProofResponse { round, segment, spot_check: state.unwrap_or_default() });
        }
        let chain: String = row.try_get::<Option<String>, _>("chain")?.unwrap_or_default();
        let hashes: Vec<Hash32> = chain.split(',').filter_map(|h| h.parse().ok()).collect();
        let (start, end) =
            agora_verify::chain::split_proof(&body).map_err(|e| ApiError::bad_request("malformed_proof", e))?;
        let committed = |k: u64| hashes.get(k as usize).copied();
        let verdict = if committed(segment) != Some(agora_protocol::hash_bytes(start))
            || committed(segment + 1) != Some(agora_protocol::hash_bytes(end))
        {
            "failed: the states sent are not the ones committed to".to_string()
        } else {
            let timer = Instant::now();
            let unit = Shard::from_bytes(&self.blobs.get(&self.units[row.try_get::<i64, _>("unit")? as usize]).await?)?;
            let me = self.clone();
            let steps = self.run.inner.steps;
            let segments = self.chain_segments();
            let tolerance = self.run.trust.tolerance;
            let body = body.clone();
            let verdict = tokio::task::spawn_blocking(move || -> Result<String> {
                let (start, end) = agora_verify::chain::split_proof(&body).map_err(|e| anyhow::anyhow!(e))?;
                let check = trust::run_spot_check(
                    &me.model_config,
                    &me.run.train_config(),
                    &me.specs,
                    &unit,
                    round * steps,
                    steps,
                    segments,
                    segment,
                    start,
                    end,
                    tolerance,
                );
                // A state that does not even decode is a failed proof, not a coordinator error.
                Ok(check.unwrap_or_else(|e| format!("failed: {e:#}")))
            })
            .await
            .map_err(|e| anyhow::anyhow!("spot-check task failed: {e}"))??;
            self.metrics.spot_check_ms.fetch_add(timer.elapsed().as_millis() as u64, Ordering::Relaxed);
            verdict
        };
        let mut live = self.live.lock().await;
        sqlx::query(
            "UPDATE submissions SET spot_check = $3 WHERE round = $1 AND worker = $2 AND spot_check = 'pending'",
        )
        .bind(round as i64)
        .bind(worker.hex())
        .bind(&verdict)
        .execute(&self.db)
        .await?;
        if verdict != "passed" {
            self.metrics.reject("spot_check_failed");
        }
        tracing::info!(worker = worker.short(), round, segment, verdict, "spot check");
        self.notify();
        if round == live.round {
            self.maybe_close_round(&mut live).await?;
        }
        Ok(ProofResponse { round, segment, spot_check: verdict })
    }

    /// Every judged upload, in round and acceptance order.
    pub async fn judgements(&self) -> Result<Vec<JudgedSubmission>, ApiError> {
        sqlx::query(
            "SELECT round, worker, delta_hash, verdict, score, credits, gain_random, gain_assigned, similarity, spot_check \
             FROM submissions WHERE verdict IS NOT NULL ORDER BY round, seq",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| {
            Ok(JudgedSubmission {
                round: r.try_get::<i64, _>("round")? as u64,
                worker: worker_col(r, "worker")?,
                delta_hash: hash_col(r, "delta_hash")?,
                verdict: r.try_get("verdict")?,
                score: r.try_get::<Option<f64>, _>("score")?.unwrap_or(0.0),
                credits: r.try_get::<Option<i64>, _>("credits")?.unwrap_or(0) as u64,
                gain_random: r.try_get("gain_random")?,
                gain_assigned: r.try_get("gain_assigned")?,
                similarity: r.try_get("similarity")?,
                spot_check: r.try_get("spot_check")?,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map_err(ApiError::from)
    }

    /// Every worker account's balance (micro-credits), by ledger account name.
    async fn worker_credits(&self) -> Result<HashMap<String, i64>, ApiError> {
        sqlx::query(
            "SELECT account, CAST(SUM(amount) AS BIGINT) AS balance FROM ledger WHERE account LIKE 'worker:%' GROUP BY account",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>("account")?, r.try_get::<i64, _>("balance")?)))
        .collect::<Result<_>>()
        .map_err(ApiError::from)
    }

    /// Identities by reputation, best first.
    pub async fn leaderboard(&self) -> Result<Vec<LeaderboardEntry>, ApiError> {
        let names = self.known.lock().expect("known lock").clone();
        let credits = self.worker_credits().await?;
        let rows = sqlx::query(
            "SELECT worker, rating, accepted, rejected FROM reputation ORDER BY rating DESC, accepted DESC, worker",
        )
        .fetch_all(&self.db)
        .await?;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let worker = worker_col(r, "worker")?;
                Ok(LeaderboardEntry {
                    rank: i as u64 + 1,
                    worker,
                    name: names.get(&worker).cloned().unwrap_or_default(),
                    rating: r.try_get("rating")?,
                    accepted: r.try_get::<i64, _>("accepted")? as u64,
                    rejected: r.try_get::<i64, _>("rejected")? as u64,
                    credits: credits.get(&agora_ledger::worker_account(&worker)).copied().unwrap_or(0).max(0) as u64,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }

    async fn roots(&self) -> Result<Vec<agora_ledger::RoundRoot>, ApiError> {
        sqlx::query("SELECT signed FROM round_roots ORDER BY round")
            .fetch_all(&self.db)
            .await?
            .iter()
            .map(|r| Ok(serde_json::from_str(&r.try_get::<String, _>("signed")?)?))
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }

    /// Every account's balance and every round's signed root.
    pub async fn ledger_report(&self) -> Result<LedgerReport, ApiError> {
        let balances = sqlx::query(
            "SELECT account, CAST(SUM(amount) AS BIGINT) AS balance FROM ledger GROUP BY account ORDER BY account",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>("account")?, r.try_get::<i64, _>("balance")?)))
        .collect::<Result<Vec<_>>>()?;
        let entries: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ledger").fetch_one(&self.db).await?.try_get("n")?;
        let roots = self
            .roots()
            .await?
            .into_iter()
            .map(|r| serde_json::to_value(r).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
        Ok(LedgerReport {
            run_id: self.run_id.clone(),
            coordinator: self.key.id(),
            balances,
            entries: entries as u64,
            roots,
        })
    }

    /// One worker's receipts with their inclusion proofs, and the signed roots they lead to: everything
    /// `agora ledger verify` needs to check the worker's credits offline.
    pub async fn worker_statement(&self, worker: &WorkerId) -> Result<agora_ledger::WorkerStatement, ApiError> {
        let mine = sqlx::query("SELECT round FROM receipts WHERE worker = $1 ORDER BY round")
            .bind(worker.hex())
            .fetch_all(&self.db)
            .await?;
        let mut receipts = Vec::with_capacity(mine.len());
        for r in &mine {
            let round: i64 = r.try_get("round")?;
            let all: Vec<(String, agora_ledger::SignedReceipt)> =
                sqlx::query("SELECT worker, receipt FROM receipts WHERE round = $1 ORDER BY position")
                    .bind(round)
                    .fetch_all(&self.db)
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get("worker")?, serde_json::from_str(&r.try_get::<String, _>("receipt")?)?)))
                    .collect::<Result<_>>()?;
            let leaves: Vec<[u8; 32]> = all.iter().map(|(_, s)| s.receipt.digest()).collect();
            let index = all.iter().position(|(w, _)| *w == worker.hex()).context("the worker's receipt")?;
            let proof = agora_ledger::inclusion_proof(&leaves, index).context("an inclusion proof")?;
            receipts.push(agora_ledger::ProvenReceipt { receipt: all[index].1.clone(), proof });
        }
        let rounds: HashSet<u64> = receipts.iter().map(|r| r.receipt.receipt.round).collect();
        let roots = self.roots().await?.into_iter().filter(|r| rounds.contains(&r.round)).collect();
        let balance = receipts.iter().map(|r| r.receipt.receipt.credits).sum();
        Ok(agora_ledger::WorkerStatement {
            run_id: self.run_id.clone(),
            coordinator: self.key.id(),
            worker: *worker,
            balance,
            roots,
            receipts,
        })
    }

    /// Periodic duties: drop silent workers, close a round whose deadline has passed.
    pub async fn tick(self: &Arc<Self>) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM nonces WHERE timestamp_ms < $1")
            .bind(now_ms() - 2 * crate::http::MAX_SKEW_MS)
            .execute(&self.db)
            .await?;
        let mut live = self.live.lock().await;
        if live.finished {
            return Ok(());
        }
        let timeout = Duration::from_secs(self.run.rounds.heartbeat_timeout_secs);
        let silent: Vec<WorkerId> = {
            let presence = self.presence.lock().expect("presence lock");
            presence.iter().filter(|(_, p)| p.last_seen.elapsed() > timeout).map(|(id, _)| *id).collect()
        };
        for worker in silent {
            self.drop_worker(&live, &worker, "silent").await?;
            self.presence.lock().expect("presence lock").remove(&worker);
        }
        self.maybe_close_round(&mut live).await
    }

    /// Marks a worker inactive and puts its unfinished data for the open round back in the queue.
    async fn drop_worker(&self, live: &Live, worker: &WorkerId, why: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        sqlx::query("UPDATE workers SET active = 0 WHERE id = $1").bind(worker.hex()).execute(&mut *tx).await?;
        let released = release_training(&mut tx, live.round, Some(worker)).await?;
        tx.commit().await?;
        tracing::warn!(worker = worker.short(), why, round = live.round, released, "worker dropped");
        self.notify();
        Ok(())
    }

    async fn maybe_close_round(self: &Arc<Self>, live: &mut Live) -> Result<(), ApiError> {
        if live.finished {
            return Ok(());
        }
        let counts = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN state = 'submitted' THEN 1 ELSE 0 END), 0) AS submitted, \
                    COALESCE(SUM(CASE WHEN state = 'training' THEN 1 ELSE 0 END), 0) AS training \
             FROM assignments WHERE round = $1",
        )
        .bind(live.round as i64)
        .fetch_one(&self.db)
        .await?;
        let submitted: i64 = counts.try_get("submitted")?;
        let training: i64 = counts.try_get("training")?;
        // A challenged submission is waited for until its proof arrives (or the deadline passes).
        let proofs_pending: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM submissions WHERE round = $1 AND spot_check = 'pending'")
                .bind(live.round as i64)
                .fetch_one(&self.db)
                .await?
                .try_get("n")?;
        let enough = submitted as u64 >= self.run.rounds.min_workers;
        let past_deadline = now_ms() >= self.deadline_ms(live);
        if enough && ((training == 0 && proofs_pending == 0) || past_deadline) {
            self.close_round(live).await?;
        }
        Ok(())
    }

    /// Judges the open round's uploads (verifying runs): loads them in acceptance order with what each
    /// verdict needs, then decodes, compares, scores and aggregates off the async runtime.
    async fn judge(self: &Arc<Self>, live: &Live) -> Result<(Vec<SubmissionRow>, trust::RoundJudgement), ApiError> {
        let round = live.round;
        let rows = sqlx::query(
            "SELECT worker, delta_hash, unit, train_loss, spot_check, content_hash FROM submissions \
             WHERE round = $1 AND applied = 0 ORDER BY seq",
        )
        .bind(round as i64)
        .fetch_all(&self.db)
        .await?;
        let mut subs = Vec::with_capacity(rows.len());
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let sub = SubmissionRow {
                worker: worker_col(row, "worker")?,
                delta_hash: hash_col(row, "delta_hash")?,
                unit: row.try_get::<i64, _>("unit")? as u64,
                train_loss: row.try_get("train_loss")?,
            };
            let content: Option<String> = row.try_get("content_hash")?;
            let replayed = match &content {
                Some(c) => {
                    sqlx::query("SELECT 1 AS one FROM submissions WHERE content_hash = $1 AND round < $2 LIMIT 1")
                        .bind(c)
                        .bind(round as i64)
                        .fetch_optional(&self.db)
                        .await?
                        .is_some()
                }
                None => false,
            };
            let unit = Shard::from_bytes(&self.blobs.get(&self.units[sub.unit as usize]).await?)?;
            candidates.push(trust::Candidate {
                worker: sub.worker,
                payload: self.blobs.get(&sub.delta_hash).await?,
                unit,
                spot_check: row.try_get("spot_check")?,
                replayed,
            });
            subs.push(sub);
        }
        // The same fragment's accepted pseudo-gradients of its previous round: a near-copy is a replay.
        let fragments = self.plan.count() as u64;
        let mut previous = Vec::new();
        if round >= fragments {
            for row in
                sqlx::query("SELECT delta_hash FROM submissions WHERE round = $1 AND verdict = 'accepted' ORDER BY seq")
                    .bind((round - fragments) as i64)
                    .fetch_all(&self.db)
                    .await?
            {
                previous.push(self.blobs.get(&hash_col(&row, "delta_hash")?).await?);
            }
        }
        let global = self.blobs.get(&live.global_hash).await?;
        let me = self.clone();
        let seed = u64::from_le_bytes(
            self.key.keyed_hash("agora-coordinator v1 score batches", &round.to_le_bytes())[..8].try_into().expect("8"),
        );
        let timer = Instant::now();
        let judgement = tokio::task::spawn_blocking(move || -> Result<trust::RoundJudgement> {
            let theta = from_named(&decode_tensors(&global, Some(&me.specs))?.0, Device::Cpu);
            let fragment = me.plan.synced_in(round);
            let fragment_tensors = me.plan.tensors(fragment);
            let mut ctx = trust::JudgeContext {
                trust: &me.run.trust,
                compression: &me.run.compression,
                model: &me.model_config,
                specs: &me.specs,
                fragment,
                fragment_tensors: &fragment_tensors,
                global: &theta,
                val: &me.val,
                seq_len: me.run.inner.seq_len,
                batch_size: me.run.inner.batch_size,
                inner_steps: me.run.inner.steps,
                seed,
                previous: &[],
            };
            let fragment_specs = &me.fragment_specs[fragment];
            let previous: Vec<Vec<f32>> =
                previous.iter().map(|p| trust::decode_flat(&ctx, fragment_specs, p)).collect::<Result<_>>()?;
            ctx.previous = &previous;
            trust::judge_round(&ctx, &candidates)
        })
        .await
        .map_err(|e| anyhow::anyhow!("judging task failed: {e}"))??;
        self.metrics.judge_ms.fetch_add(timer.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok((subs, judgement))
    }

    /// The outer step: the round's pseudo-gradients combined (verifying runs: judged, and only the
    /// accepted ones aggregated by the run's rule; otherwise their mean, summed in acceptance order, so a
    /// replay after a crash computes the same bits), the outer optimizer on the fragment the round
    /// synchronises, the new global weights and momentum published as blobs, then the round committed in
    /// one transaction (with, when verifying, its receipts, their Merkle root, credits and reputations).
    async fn close_round(self: &Arc<Self>, live: &mut Live) -> Result<(), ApiError> {
        let round = live.round;
        let started = Instant::now();
        let (subs, mean, judged) = if self.run.trust.verify {
            let (subs, judgement) = self.judge(live).await?;
            (subs, judgement.aggregate.clone(), Some(judgement))
        } else {
            let rows = sqlx::query(
                "SELECT worker, delta_hash, unit, train_loss FROM submissions WHERE round = $1 AND applied = 0 ORDER BY seq",
            )
            .bind(round as i64)
            .fetch_all(&self.db)
            .await?;
            let subs = rows
                .iter()
                .map(|row| {
                    Ok(SubmissionRow {
                        worker: worker_col(row, "worker")?,
                        delta_hash: hash_col(row, "delta_hash")?,
                        unit: row.try_get::<i64, _>("unit")? as u64,
                        train_loss: row.try_get("train_loss")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let sum = self.round_sum(live).await?;
            assert_eq!(sum.count(), subs.len(), "the sum holds every accepted payload of the round");
            (subs, Some(sum.mean()), None)
        };
        let verdict_of = |i: usize| judged.as_ref().map_or(trust::ACCEPTED, |j| j.judgements[i].verdict);
        let accepted: Vec<usize> = (0..subs.len()).filter(|&i| verdict_of(i) == trust::ACCEPTED).collect();
        let losses: Vec<f64> = accepted.iter().filter_map(|&i| subs[i].train_loss).collect();
        let global = self.blobs.get(&live.global_hash).await?;
        let momentum = match &live.momentum_hash {
            Some(h) => Some(self.blobs.get(h).await?),
            None => None,
        };
        let next = round + 1;
        let applied_before: i64 = sqlx::query("SELECT COUNT(*) AS n FROM submissions WHERE applied = 1")
            .fetch_one(&self.db)
            .await?
            .try_get("n")?;
        let finished = self.run.is_finished(next, applied_before as u64 + accepted.len() as u64);
        let evaluate = next.is_multiple_of(self.run.eval.every_rounds) || finished;
        let (specs, outer, config, val) =
            (self.specs.clone(), self.run.outer, self.model_config.clone(), self.val.clone());
        let stepped = self.plan.tensors(self.plan.synced_in(round));
        let (seq, batch, eval_batches) = (self.run.inner.seq_len, self.run.inner.batch_size, self.run.eval.batches);
        let OuterStepOutput { global_bytes, momentum_bytes, val_loss } =
            tokio::task::spawn_blocking(move || -> Result<OuterStepOutput> {
                let decode = |b: &[u8]| -> Result<Vec<tch::Tensor>> {
                    Ok(from_named(&decode_tensors(b, Some(&specs))?.0, Device::Cpu))
                };
                let theta = decode(&global)?;
                let mut optimizer = match &momentum {
                    Some(m) => OuterOptimizer::with_momentum(outer, decode(m)?),
                    None => OuterOptimizer::new(outer, &theta),
                };
                // Nothing accepted: the weights and momentum stay as they are.
                if let Some(mean) = &mean {
                    optimizer.step_subset(&stepped, &theta, &from_named(mean, Device::Cpu));
                }
                let global_bytes = encode_tensors(&to_named(&specs, &theta), &round_meta(next));
                let momentum_bytes = outer
                    .has_state()
                    .then(|| encode_tensors(&to_named(&specs, &optimizer.momentum), &round_meta(next)));
                let val_loss = if evaluate {
                    let model = Llama::zeros(&config, Device::Cpu);
                    load_weights(&model, &theta);
                    Some(agora_train::evaluate(&model, &val, seq, batch, eval_batches)?)
                } else {
                    None
                };
                Ok(OuterStepOutput { global_bytes, momentum_bytes, val_loss })
            })
            .await
            .map_err(|e| anyhow::anyhow!("outer step task failed: {e}"))??;
        let global_hash = self.blobs.put(Bytes::from(global_bytes)).await?;
        let momentum_hash = match momentum_bytes {
            Some(b) => Some(self.blobs.put(Bytes::from(b)).await?),
            None => None,
        };
        let train_loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        let now = now_ms();

        let mut tx = self.db.begin().await?;
        if let Some(judged) = &judged {
            self.settle(&mut tx, round, &subs, judged).await?;
        }
        sqlx::query("UPDATE rounds SET closed_ms = $2, contributions = $3, train_loss = $4 WHERE round = $1")
            .bind(round as i64)
            .bind(now)
            .bind(accepted.len() as i64)
            .bind(train_loss)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE submissions SET applied = 1 WHERE round = $1 AND applied = 0")
            .bind(round as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE work_queue SET state = 'done' WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.round = $1 \
             AND a.state = 'submitted' AND a.epoch = work_queue.epoch AND a.position = work_queue.position)",
        )
        .bind(round as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE assignments SET state = 'applied' WHERE round = $1 AND state = 'submitted'")
            .bind(round as i64)
            .execute(&mut *tx)
            .await?;
        let late = release_training(&mut tx, round, None).await?;
        for &i in &accepted {
            sqlx::query("UPDATE workers SET rounds_accepted = rounds_accepted + 1 WHERE id = $1")
                .bind(subs[i].worker.hex())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO rounds (round, global_hash, momentum_hash, opened_ms, closed_ms, contributions, train_loss, val_loss) \
             VALUES ($1, $2, $3, $4, NULL, 0, NULL, $5)",
        )
        .bind(next as i64)
        .bind(global_hash.hex())
        .bind(momentum_hash.map(|h| h.hex()))
        .bind(now)
        .bind(val_loss)
        .execute(&mut *tx)
        .await?;
        if finished {
            sqlx::query("UPDATE run SET finished = 1").execute(&mut *tx).await?;
        }
        for (name, value) in self.metrics.snapshot() {
            sqlx::query(
                "INSERT INTO counters (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        *live = Live { round: next, opened_ms: now, global_hash, momentum_hash, finished, sum: None };
        self.open_round.store(next, Ordering::Relaxed);
        self.finished.store(finished, Ordering::Relaxed);
        tracing::info!(
            round,
            contributions = accepted.len(),
            rejected = subs.len() - accepted.len(),
            released_late = late,
            train_loss,
            val_loss,
            secs = started.elapsed().as_secs_f64(),
            finished,
            "round closed: outer step committed"
        );
        self.notify();
        Ok(())
    }

    /// Records a judged round inside its commit transaction: each submission's verdict and score, its
    /// signed receipt, the round's Merkle root, the credits (double entry against the reward pool), the
    /// reputations, and the data of rejected submissions back in the queue.
    async fn settle(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        round: u64,
        subs: &[SubmissionRow],
        judged: &trust::RoundJudgement,
    ) -> Result<(), ApiError> {
        let trust_config = &self.run.trust;
        let pool = agora_ledger::pool_account(&self.run_id);
        let mut pool_left: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS n FROM ledger WHERE account = $1")
                .bind(&pool)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?;
        let mut seq: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(seq) + 1, 0) AS BIGINT) AS n FROM ledger")
            .fetch_one(&mut **tx)
            .await?
            .try_get("n")?;
        let tokens = self.run.tokens_per_unit();
        let mut leaves = Vec::with_capacity(subs.len());
        for (position, (sub, j)) in subs.iter().zip(&judged.judgements).enumerate() {
            let accepted = j.verdict == trust::ACCEPTED;
            let credits = if accepted {
                agora_ledger::credits_for(tokens, j.score, trust_config.micro_credits_per_token)
                    .min(pool_left.max(0) as u64)
            } else {
                0
            };
            pool_left -= credits as i64;
            let receipt = agora_ledger::Receipt {
                run_id: self.run_id.clone(),
                round,
                worker: sub.worker,
                delta_hash: sub.delta_hash,
                tokens,
                score: j.score,
                credits,
                verdict: j.verdict.to_string(),
            };
            leaves.push(receipt.digest());
            for posting in agora_ledger::postings(&receipt) {
                sqlx::query(
                    "INSERT INTO ledger (seq, round, account, amount, memo, created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(seq)
                .bind(round as i64)
                .bind(posting.account)
                .bind(posting.amount)
                .bind(format!("round {round} receipt {}", hex_digest(&receipt.digest())))
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
                seq += 1;
            }
            let signed = receipt.sign(&self.key);
            sqlx::query("INSERT INTO receipts (round, worker, position, receipt) VALUES ($1, $2, $3, $4)")
                .bind(round as i64)
                .bind(sub.worker.hex())
                .bind(position as i64)
                .bind(serde_json::to_string(&signed).map_err(anyhow::Error::from)?)
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "UPDATE submissions SET verdict = $3, score = $4, credits = $5, gain_random = $6, gain_assigned = $7, \
                 similarity = $8, norm = $9, applied = $10, \
                 spot_check = CASE WHEN spot_check = 'pending' THEN 'failed: no proof before the round closed' ELSE spot_check END \
                 WHERE round = $1 AND worker = $2",
            )
            .bind(round as i64)
            .bind(sub.worker.hex())
            .bind(j.verdict)
            .bind(j.score)
            .bind(credits as i64)
            .bind(j.gains.map(|g| g.random))
            .bind(j.gains.map(|g| g.assigned))
            .bind(j.similarity)
            .bind(j.norm)
            .bind(if accepted { 1i64 } else { 2 })
            .execute(&mut **tx)
            .await?;
            if !accepted {
                sqlx::query(
                    "UPDATE work_queue SET state = 'pending' WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.round = $1 \
                     AND a.worker = $2 AND a.epoch = work_queue.epoch AND a.position = work_queue.position)",
                )
                .bind(round as i64)
                .bind(sub.worker.hex())
                .execute(&mut **tx)
                .await?;
                sqlx::query("UPDATE assignments SET state = 'rejected' WHERE round = $1 AND worker = $2")
                    .bind(round as i64)
                    .bind(sub.worker.hex())
                    .execute(&mut **tx)
                    .await?;
            }
            let outcome = if trust::is_slashing(j.verdict) {
                agora_verify::Outcome::Slashed
            } else {
                agora_verify::Outcome::Scored(j.score)
            };
            update_reputation(tx, &sub.worker, outcome, trust_config.reputation_alpha, accepted).await?;
            tracing::info!(
                worker = sub.worker.short(),
                round,
                verdict = j.verdict,
                score = j.score,
                credits,
                gain_random = j.gains.map(|g| g.random),
                gain_assigned = j.gains.map(|g| g.assigned),
                similarity = j.similarity,
                "judged"
            );
        }
        let root = agora_ledger::RoundRoot::signed(&self.run_id, round, &leaves, &self.key);
        sqlx::query("INSERT INTO round_roots (round, root, receipts, signed) VALUES ($1, $2, $3, $4)")
            .bind(round as i64)
            .bind(root.root.hex())
            .bind(leaves.len() as i64)
            .bind(serde_json::to_string(&root).map_err(anyhow::Error::from)?)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn blob(&self, hash: &Hash32, worker: Option<WorkerId>) -> Result<Bytes, ApiError> {
        if !self.blobs.contains(hash).await {
            return Err(ApiError::not_found("unknown_blob", format!("no blob {hash}")));
        }
        let bytes = self.blobs.get(hash).await?;
        self.metrics.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(worker) = worker {
            self.touch(&worker);
            sqlx::query("UPDATE workers SET bytes_received = bytes_received + $2 WHERE id = $1")
                .bind(worker.hex())
                .bind(bytes.len() as i64)
                .execute(&self.db)
                .await?;
        }
        Ok(bytes)
    }

    pub async fn status(&self) -> Result<StatusReport, ApiError> {
        let (round, finished, global_hash, opened_ms, deadline) = {
            let live = self.live.lock().await;
            (live.round, live.finished, live.global_hash, live.opened_ms, self.deadline_ms(&live))
        };
        let history = sqlx::query(
            "SELECT r.round, r.contributions, r.train_loss, r.val_loss, r.global_hash, \
                    CAST(COALESCE(SUM(s.bytes), 0) AS BIGINT) AS bytes, \
                    CAST(COALESCE(SUM(s.fp32_bytes), 0) AS BIGINT) AS fp32_bytes \
             FROM rounds r LEFT JOIN submissions s ON s.round = r.round AND s.applied = 1 \
             GROUP BY r.round, r.contributions, r.train_loss, r.val_loss, r.global_hash ORDER BY r.round",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| {
            Ok(RoundSummary {
                round: r.try_get::<i64, _>("round")? as u64,
                contributions: r.try_get::<i64, _>("contributions")? as u64,
                train_loss: r.try_get("train_loss")?,
                val_loss: r.try_get("val_loss")?,
                global_hash: hash_col(r, "global_hash")?,
                delta_bytes: r.try_get::<i64, _>("bytes")? as u64,
                fp32_bytes: r.try_get::<i64, _>("fp32_bytes")? as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let assigned: HashMap<String, (String, u64, u64)> =
            sqlx::query("SELECT worker, state, epoch, unit FROM assignments WHERE round = $1")
                .bind(round as i64)
                .fetch_all(&self.db)
                .await?
                .iter()
                .map(|r| {
                    let (epoch, unit): (i64, i64) = (r.try_get("epoch")?, r.try_get("unit")?);
                    Ok((r.try_get("worker")?, (r.try_get("state")?, epoch as u64, unit as u64)))
                })
                .collect::<Result<_>>()?;
        let presence = self.presence.lock().expect("presence lock").clone();
        let rejected: HashMap<String, i64> = sqlx::query(
            "SELECT worker, CAST(COUNT(*) AS BIGINT) AS n FROM submissions WHERE applied = 2 GROUP BY worker",
        )
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("worker")?, r.try_get("n")?)))
        .collect::<Result<_>>()?;
        let credits = self.worker_credits().await?;
        let mut workers = Vec::new();
        for r in sqlx::query(
            "SELECT id, name, active, rounds_accepted, bytes_sent, bytes_received FROM workers ORDER BY joined_ms, id",
        )
        .fetch_all(&self.db)
        .await?
        {
            let id = worker_col(&r, "id")?;
            let active = r.try_get::<i64, _>("active")? != 0;
            let p = presence.get(&id);
            let state = if !active {
                "dropped"
            } else {
                match assigned.get(&id.hex()).map(|a| a.0.as_str()) {
                    Some("training") => "training",
                    Some("submitted") | Some("applied") => "submitted",
                    _ => "idle",
                }
            };
            workers.push(WorkerStatus {
                id,
                name: r.try_get("name")?,
                state: state.to_string(),
                active,
                assignment: assigned.get(&id.hex()).filter(|a| a.0 != "released").map(|a| (a.1, a.2)),
                inner_step: p.filter(|p| p.round == Some(round)).map_or(0, |p| p.step),
                last_loss: p.and_then(|p| p.loss),
                last_seen_ms_ago: p.map_or(u64::MAX, |p| p.last_seen.elapsed().as_millis() as u64),
                rounds_accepted: r.try_get::<i64, _>("rounds_accepted")? as u64,
                rounds_rejected: rejected.get(&id.hex()).copied().unwrap_or(0) as u64,
                credits: credits.get(&agora_ledger::worker_account(&id)).copied().unwrap_or(0).max(0) as u64,
                bytes_sent: r.try_get::<i64, _>("bytes_sent")? as u64,
                bytes_received: r.try_get::<i64, _>("bytes_received")? as u64,
            });
        }
        let applied: i64 = sqlx::query("SELECT COUNT(*) AS n FROM submissions WHERE applied = 1")
            .fetch_one(&self.db)
            .await?
            .try_get("n")?;
        let tokens_trained = applied as u64 * self.run.tokens_per_unit();
        let counters = self.metrics.snapshot();
        Ok(StatusReport {
            run_id: self.run_id.clone(),
            round,
            rounds: self.run.planned_rounds(),
            finished,
            global_hash,
            round_opened_unix_ms: opened_ms as u64,
            round_deadline_unix_ms: deadline as u64,
            submissions_this_round: assigned.values().filter(|a| a.0 == "submitted").count() as u64,
            tokens_trained,
            codec: self.run.compression.describe(),
            workers,
            history,
            counters,
        })
    }

    pub async fn contributions(&self) -> Result<Vec<Contribution>, ApiError> {
        sqlx::query("SELECT round, worker, epoch, unit, delta_hash, bytes FROM submissions WHERE applied = 1 ORDER BY round, worker")
            .fetch_all(&self.db)
            .await?
            .iter()
            .map(|r| {
                Ok(Contribution {
                    round: r.try_get::<i64, _>("round")? as u64,
                    worker: worker_col(r, "worker")?,
                    epoch: r.try_get::<i64, _>("epoch")? as u64,
                    unit: r.try_get::<i64, _>("unit")? as u64,
                    delta_hash: hash_col(r, "delta_hash")?,
                    bytes: r.try_get::<i64, _>("bytes")? as u64,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(ApiError::from)
    }

    pub async fn gauges(&self) -> Gauges {
        let (round, finished) = {
            let live = self.live.lock().await;
            (live.round, live.finished)
        };
        let last = sqlx::query("SELECT train_loss FROM rounds WHERE closed_ms IS NOT NULL ORDER BY round DESC LIMIT 1")
            .fetch_optional(&self.db)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<Option<f64>, _>("train_loss").ok().flatten());
        let val = sqlx::query("SELECT val_loss FROM rounds WHERE val_loss IS NOT NULL ORDER BY round DESC LIMIT 1")
            .fetch_optional(&self.db)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<Option<f64>, _>("val_loss").ok().flatten());
        let active = sqlx::query("SELECT COUNT(*) AS n FROM workers WHERE active = 1")
            .fetch_one(&self.db)
            .await
            .ok()
            .and_then(|r| r.try_get::<i64, _>("n").ok())
            .unwrap_or(0) as u64;
        Gauges { round, rounds_closed: round, active_workers: active, train_loss: last, val_loss: val, finished }
    }
}

/// Releases the `training` assignments of `round` (one worker's, or all) and puts their units back in
/// the queue for whoever asks next. Returns how many were released.
async fn release_training(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    round: u64,
    worker: Option<&WorkerId>,
) -> Result<u64, ApiError> {
    let worker = worker.map(|w| w.hex()).unwrap_or_default();
    let filter = "round = $1 AND state = 'training' AND ($2 = '' OR worker = $2)";
    let requeue = "UPDATE work_queue SET state = 'pending' WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.round = $1 \
         AND a.state = 'training' AND ($2 = '' OR a.worker = $2) AND a.epoch = work_queue.epoch AND a.position = work_queue.position)";
    sqlx::query(requeue).bind(round as i64).bind(&worker).execute(&mut **tx).await?;
    let released = sqlx::query(&format!("UPDATE assignments SET state = 'released' WHERE {filter}"))
        .bind(round as i64)
        .bind(&worker)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(released)
}

/// The run's admission set (None: open) and what a refused worker is told. Reputations of the run named
/// in `[admission] previous` are carried over first (an identity keeps its standing between phases).
async fn admission(run: &RunFile, db: &AnyPool) -> Result<(Option<HashSet<WorkerId>>, String)> {
    let a = &run.admission;
    let mut ranking: Vec<(WorkerId, f64)> = Vec::new();
    let mut previous_id = String::new();
    if let Some(url) = &a.previous {
        sqlx::any::install_default_drivers();
        let previous = AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .with_context(|| format!("[admission] previous: cannot open the earlier run's database {url}"))?;
        previous_id = sqlx::query("SELECT id FROM run")
            .fetch_one(&previous)
            .await
            .with_context(|| format!("[admission] previous: {url} holds no agora run"))?
            .try_get("id")?;
        if let Some(expected) = &a.previous_run {
            if *expected != previous_id {
                bail!("[admission] previous: {url} holds run {previous_id}, not previous_run = {expected}");
            }
        }
        let rows = sqlx::query(
            "SELECT worker, rating, accepted, rejected FROM reputation ORDER BY rating DESC, accepted DESC, worker",
        )
        .fetch_all(&previous)
        .await?;
        for row in &rows {
            let worker = worker_col(row, "worker")?;
            let rating: f64 = row.try_get("rating")?;
            sqlx::query(
                "INSERT INTO reputation (worker, rating, accepted, rejected, updated_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (worker) DO NOTHING",
            )
            .bind(worker.hex())
            .bind(rating)
            .bind(row.try_get::<i64, _>("accepted")?)
            .bind(row.try_get::<i64, _>("rejected")?)
            .bind(now_ms())
            .execute(db)
            .await?;
            ranking.push((worker, rating));
        }
        previous.close().await;
    }
    Ok(match a.policy {
        AdmissionPolicy::Open => (None, String::new()),
        AdmissionPolicy::Allowlist => (
            Some(a.allowlist.iter().copied().collect()),
            format!("this run admits only the {} public keys of its allowlist", a.allowlist.len()),
        ),
        AdmissionPolicy::Cohort => {
            let cohort: Vec<(WorkerId, f64)> =
                ranking.iter().copied().filter(|(_, r)| *r > 0.0).take(a.cohort_size).collect();
            let cutoff = cohort.last().map_or(0.0, |c| c.1);
            let note = format!(
                "this run admits only the top {} identities by reputation from run {previous_id} (rating ≥ {cutoff:.3}; {} rated there)",
                a.cohort_size,
                ranking.len()
            );
            tracing::info!(cohort = cohort.len(), cutoff, "cohort admission from run {previous_id}");
            (Some(cohort.into_iter().map(|c| c.0).collect()), note)
        }
    })
}

fn round_meta(round: u64) -> BTreeMap<String, String> {
    BTreeMap::from([("agora.round".to_string(), round.to_string())])
}

async fn connect(url: &str) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::Any::database_exists(url).await.unwrap_or(false) {
        tracing::info!("creating database {url}");
        sqlx::Any::create_database(url).await.with_context(|| format!("cannot create the database {url}"))?;
    }
    let pool = AnyPoolOptions::new()
        // SQLite has one writer anyway; one connection also keeps `:memory:` databases whole.
        .max_connections(if sqlite { 1 } else { 8 })
        .connect(url)
        .await
        .with_context(|| format!("cannot open the database {url}"))?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .with_context(|| format!("cannot apply the schema migrations to {url}"))?;
    Ok(pool)
}
