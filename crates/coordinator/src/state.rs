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
use crate::membership::admission;
use crate::metrics::Metrics;
use crate::prepare::prepare_data;
use crate::run_file::RunFile;
use crate::store::{connect, hash_col, worker_col};
use agora_data::Shard;
use agora_diloco::codec::{self, Accumulator, Expected, MAX_METADATA};
use agora_diloco::tensors::{model_weights, param_specs, to_named};
use agora_diloco::FragmentPlan;
use agora_model::{Llama, LlamaConfig};
use agora_protocol::{encode_tensors, Hash32, Identity, RunInfo, TensorSpec, WorkerId, PROTOCOL_VERSION};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use sqlx::{AnyPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
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
    /// The coordinator's signing key; default `DIR/coordinator.key`. A campaign signs every phase with one
    /// key, so its workers can hold each phase to the key they pinned in the first.
    pub key: Option<PathBuf>,
}

/// What changes between rounds, cached from the database.
pub(crate) struct Live {
    pub(crate) round: u64,
    pub(crate) opened_ms: i64,
    pub(crate) global_hash: Hash32,
    pub(crate) momentum_hash: Option<Hash32>,
    pub(crate) finished: bool,
    /// The sum of the open round's accepted payloads, in acceptance order; None when it must be rebuilt
    /// from the stored payloads (after a restart, or if adding one failed).
    pub(crate) sum: Option<Accumulator>,
    /// The round's close is under way (judging and the outer step run without this lock): uploads for it
    /// are refused as closed, and nobody is handed new work in it.
    pub(crate) closing: bool,
}

/// How many pseudo-gradient uploads are read and decoded at once: bounds the coordinator's memory to a
/// few payloads plus one sum, however many workers upload together.
pub const DELTA_PERMITS: usize = 2;

/// What a worker last told us; kept outside `live` so heartbeats never wait for an outer step.
#[derive(Clone)]
pub(crate) struct Presence {
    pub(crate) last_seen: Instant,
    pub(crate) round: Option<u64>,
    pub(crate) step: u64,
    pub(crate) loss: Option<f64>,
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
    pub(crate) db: AnyPool,
    pub(crate) val: Shard,
    pub(crate) units: Vec<Hash32>,
    /// Where each round starts and how many steps and units it holds.
    pub(crate) rounds: agora_diloco::RoundPlan,
    pub(crate) live: Mutex<Live>,
    /// Known worker ids (joined at some point) and their names.
    pub(crate) known: std::sync::Mutex<HashMap<WorkerId, String>>,
    pub(crate) presence: std::sync::Mutex<HashMap<WorkerId, Presence>>,
    /// Bumped on every state change that a long-polling worker may be waiting for.
    pub(crate) changes: watch::Sender<u64>,
    pub(crate) started: Instant,
    /// Mirrors of `live.round` and `live.finished` for readers that must not wait for the lock.
    pub(crate) open_round: AtomicU64,
    pub(crate) finished: AtomicBool,
    /// The coordinator's own key: signs receipts and round roots, and keys its secret choices.
    pub key: Identity,
    /// Who may join when the run restricts admission (allowlist or cohort), with the reason shown to others.
    pub(crate) admitted: Option<HashSet<WorkerId>>,
    pub(crate) admission_note: String,
}

/// What a pseudo-gradient upload carries besides its values, found before the lock is taken.
pub struct CheckedDelta {
    pub metadata: BTreeMap<String, String>,
    /// blake3 of the decoded values (replay detection), when the run verifies.
    pub content_hash: Option<Hash32>,
}

impl Coordinator {
    /// Opens (or creates) the run's store and, on first start, prepares its data and initial weights.
    pub async fn open(options: &Options) -> Result<Arc<Coordinator>> {
        Self::open_with(RunFile::load(&options.run_file)?, options).await
    }

    /// [`Coordinator::open`] for a run file already loaded and validated (a campaign's phase);
    /// `options.run_file` only names where it came from in errors.
    pub async fn open_with(run: RunFile, options: &Options) -> Result<Arc<Coordinator>> {
        let run_id = run.run_id()?;
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("{}: cannot create the coordinator directory", options.dir.display()))?;
        let database = match &options.database {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", options.dir.join("coordinator.db").display()),
        };
        let db = connect(&database).await?;
        let key_file = options.key.clone().unwrap_or_else(|| options.dir.join("coordinator.key"));
        let key = Identity::load_or_create(&key_file).context("the coordinator's signing key")?;
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
                        "{} holds run {stored}, but {} defines run {run_id} (the run file or its corpus changed); \
                         use a new --dir/--database for a new run",
                        crate::redact::redact_url(&database),
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
        // A spot check being re-run when the process stopped is answered again: the worker retries its proof.
        sqlx::query("UPDATE submissions SET spot_check = 'pending' WHERE spot_check = 'verifying'")
            .execute(&db)
            .await?;
        let momentum: Option<String> = round_row.try_get("momentum_hash")?;
        let live = Live {
            round: round_row.try_get::<i64, _>("round")? as u64,
            opened_ms: round_row.try_get("opened_ms")?,
            global_hash: hash_col(&round_row, "global_hash")?,
            momentum_hash: momentum.map(|m| m.parse()).transpose().map_err(|e: String| anyhow::anyhow!(e))?,
            finished: finished != 0,
            sum: None,
            closing: false,
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
        let rounds = run.round_plan()?;
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
            rounds,
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
        let model_section = run.model.clone();
        let (init_bytes, momentum_bytes, val_loss) =
            tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Option<Vec<u8>>, f64)> {
                let specs = param_specs(&config);
                let model = match &model_section.checkpoint {
                    Some(dir) => {
                        let source = format!("[model] checkpoint {}", dir.display());
                        agora_model::from_weights(
                            &config,
                            agora_model::checkpoint::read_weights(dir)?,
                            Device::Cpu,
                            &source,
                        )?
                    }
                    None => Llama::new(&config, Device::Cpu, seed),
                };
                let bytes = encode_tensors(&to_named(&specs, &model_weights(&model)), &round_meta(0));
                let momentum = match &model_section.outer_momentum {
                    Some(file) => {
                        Some(encode_tensors(&to_named(&specs, &read_momentum(file, &specs)?), &round_meta(0)))
                    }
                    None => None,
                };
                let loss = agora_train::evaluate(&model, &val, seq, batch, eval_batches)?;
                Ok((bytes, momentum, loss))
            })
            .await??;
        let init_hash = blobs.put(Bytes::from(init_bytes)).await?;
        let momentum_hash = match momentum_bytes {
            Some(bytes) => Some(blobs.put(Bytes::from(bytes)).await?),
            None => None,
        };

        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO run (id, run_file, model_config, tokenizer_hash, val_hash, units, created_ms, finished) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0)",
        )
        .bind(run_id)
        .bind(serde_json::to_string(&stored_run_file(run))?)
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
             VALUES (0, $1, $2, $3, NULL, 0, NULL, $4)",
        )
        .bind(init_hash.hex())
        .bind(momentum_hash.map(|h| h.hex()))
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
    pub(crate) fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
    pub fn is_known(&self, worker: &WorkerId) -> bool {
        self.known.lock().expect("known lock").contains_key(worker)
    }
    pub(crate) fn touch(&self, worker: &WorkerId) {
        let mut presence = self.presence.lock().expect("presence lock");
        let p =
            presence.entry(*worker).or_insert(Presence { last_seen: Instant::now(), round: None, step: 0, loss: None });
        p.last_seen = Instant::now();
    }
    /// The round's deadline: its opening time plus the run's deadline, but never earlier than a
    /// heartbeat timeout after this process started (workers need a moment to find a restarted coordinator).
    pub(crate) fn deadline_ms(&self, live: &Live) -> i64 {
        let by_round = live.opened_ms + (self.run.deadline_secs(self.rounds.steps(live.round)) * 1000) as i64;
        let started_ago = self.started.elapsed().as_millis() as i64;
        let grace = now_ms() - started_ago + (self.run.rounds.heartbeat_timeout_secs * 1000) as i64;
        by_round.max(grace)
    }
    /// What a payload for `round` must be: the run's codec, and the tensors of the fragment it synchronises.
    pub(crate) fn expected(&self, round: u64) -> Expected<'_> {
        let fragment = self.plan.synced_in(round);
        Expected { config: &self.run.compression, fragment, specs: &self.fragment_specs[fragment] }
    }
    /// The step boundaries of `round`'s hash chain (empty: the run does not spot-check): the `[trust]`
    /// segments of its steps, and under overlap the merge point τ (`agora_verify::chain::chain_bounds`).
    pub(crate) fn chain_bounds(&self, round: u64) -> Vec<u64> {
        let steps = self.rounds.steps(round);
        let segments = if self.run.trust.verify { self.run.trust.chain_segments(steps) } else { 0 };
        if segments == 0 {
            return Vec::new();
        }
        agora_verify::chain::chain_bounds(steps, segments, self.run.compression.overlap_steps)
    }

    /// Segments of `round`'s hash chain (0: the run does not spot-check).
    pub(crate) fn chain_segments(&self, round: u64) -> u64 {
        self.chain_bounds(round).len().saturating_sub(1) as u64
    }
}

/// The run file as the store keeps it: an earlier run's database URL without its password.
fn stored_run_file(run: &RunFile) -> RunFile {
    let mut stored = run.clone();
    stored.admission.previous = stored.admission.previous.as_deref().map(crate::redact::redact_url);
    stored
}

/// The outer momentum a run starts from (`[model] outer_momentum`): one fp32 tensor per parameter, by
/// Hugging Face name, in the order of `specs`; a missing or misshapen tensor is an error that names it.
fn read_momentum(file: &std::path::Path, specs: &[TensorSpec]) -> Result<Vec<tch::Tensor>> {
    let read = tch::Tensor::read_safetensors(file)
        .map_err(|e| anyhow::anyhow!("[model] outer_momentum {}: unreadable safetensors: {e}", file.display()))?;
    let mut by_name: HashMap<String, tch::Tensor> = read.into_iter().collect();
    let tensors = specs
        .iter()
        .map(|spec| {
            let t = by_name.remove(&spec.name).with_context(|| {
                format!("[model] outer_momentum {}: no tensor {} (the model has it)", file.display(), spec.name)
            })?;
            let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            if t.size() != shape {
                bail!(
                    "[model] outer_momentum {}: {} has shape {:?}, the model's is {shape:?}",
                    file.display(),
                    spec.name,
                    t.size()
                );
            }
            Ok(t.to_kind(tch::Kind::Float))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(name) = by_name.keys().next() {
        bail!("[model] outer_momentum {}: tensor {name} is not a parameter of the model", file.display());
    }
    Ok(tensors)
}

pub(crate) fn round_meta(round: u64) -> BTreeMap<String, String> {
    BTreeMap::from([("agora.round".to_string(), round.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// `[model] outer_momentum` is every parameter in its shape, nothing else: a missing, misshapen or
    /// foreign tensor is refused by name rather than loaded into the outer step.
    #[test]
    fn a_starting_momentum_holds_exactly_the_models_parameters() {
        let config = agora_model::preset("tiny", Some(300)).unwrap();
        let specs = param_specs(&config);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("momentum.safetensors");
        let tensor = |shape: &[usize]| {
            Tensor::ones(shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), (Kind::Float, Device::Cpu))
        };
        let full: Vec<(String, Tensor)> = specs.iter().map(|s| (s.name.clone(), tensor(&s.shape))).collect();
        let write = |tensors: &[(String, Tensor)]| Tensor::write_safetensors(tensors, &file).unwrap();

        write(&full);
        let read = read_momentum(&file, &specs).unwrap();
        assert_eq!(read.len(), specs.len());
        assert!(read
            .iter()
            .zip(&specs)
            .all(|(t, s)| t.size() == s.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()));

        write(&full[1..]);
        let err = format!("{:#}", read_momentum(&file, &specs).unwrap_err());
        assert!(err.contains(&format!("no tensor {}", specs[0].name)), "{err}");

        let mut misshapen: Vec<(String, Tensor)> = full.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        misshapen[2].1 = tensor(&[3, 3]);
        write(&misshapen);
        let err = format!("{:#}", read_momentum(&file, &specs).unwrap_err());
        assert!(err.contains(&specs[2].name) && err.contains("shape"), "{err}");

        let mut extra: Vec<(String, Tensor)> = full.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        extra.push(("model.layers.99.mlp.up_proj.weight".into(), tensor(&[2])));
        write(&extra);
        let err = format!("{:#}", read_momentum(&file, &specs).unwrap_err());
        assert!(err.contains("model.layers.99") && err.contains("not a parameter"), "{err}");
    }
}
