//! The run file (TOML): everything that defines a run. Validated on load; its canonical JSON form is
//! hashed into the run id, so a coordinator restarted with a different file refuses to continue.

use agora_diloco::{CompressionConfig, OuterConfig};
use agora_protocol::WorkerId;
use agora_train::AdamWConfig;
use agora_verify::TrustConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Seeds the initial weights, the data units and their epoch order.
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub inner: InnerSection,
    #[serde(default)]
    pub outer: OuterConfig,
    pub rounds: RoundsSection,
    #[serde(default)]
    pub eval: EvalSection,
    /// How pseudo-gradients travel: codec, error feedback, Streaming DiLoCo fragments.
    #[serde(default)]
    pub compression: CompressionConfig,
    /// How contributions are judged, aggregated and credited.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Who may join.
    #[serde(default)]
    pub admission: AdmissionSection,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionPolicy {
    /// Anyone with a key.
    #[default]
    Open,
    /// Only the public keys in `allowlist`.
    Allowlist,
    /// Only the `cohort_size` best-rated identities of the run in `previous` (how only the best
    /// contributors of one phase are retained for the next).
    Cohort,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionSection {
    pub policy: AdmissionPolicy,
    pub allowlist: Vec<WorkerId>,
    /// The database URL of an earlier run's coordinator: its reputations carry over into this run, and
    /// `cohort` admits from its leaderboard.
    pub previous: Option<String>,
    /// The run id expected in `previous` (a guard against naming the wrong store).
    pub previous_run: Option<String>,
    pub cohort_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A preset name (`agora info` lists them) ...
    pub preset: Option<String>,
    /// ... or a Hugging Face `config.json` ...
    pub config: Option<PathBuf>,
    /// ... or a Hugging Face directory (`config.json` and safetensors weights, e.g. written by `agora grow`
    /// or by a campaign between phases): the run starts from its weights instead of a seeded
    /// initialisation. `[data] tokenizer` must then name the tokenizer the checkpoint was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// With `checkpoint`: the outer Nesterov momentum the run starts from (a safetensors file holding
    /// every parameter of the model, by Hugging Face name), e.g. carried through growth. Without it the
    /// momentum starts at zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<PathBuf>,
}

impl ModelSection {
    /// Exactly one source of the model, and each file it names present.
    pub fn validate(&self) -> Result<()> {
        match (&self.preset, &self.config, &self.checkpoint) {
            (Some(name), None, None) => {
                agora_model::preset(name, None)?;
            }
            (None, Some(path), None) => {
                if !path.is_file() {
                    bail!("[model] config: {} does not exist", path.display());
                }
            }
            (None, None, Some(dir)) => {
                let config = dir.join(agora_model::checkpoint::CONFIG_FILE);
                if !config.is_file() {
                    bail!("[model] checkpoint: {} is not a checkpoint directory (no config.json)", dir.display());
                }
                agora_model::checkpoint::weight_files(dir).context("[model] checkpoint")?;
            }
            _ => bail!(
                "[model]: give exactly one of preset = \"NAME\", config = \"config.json\" or checkpoint = \"DIR\""
            ),
        }
        match &self.outer_momentum {
            Some(_) if self.checkpoint.is_none() => {
                bail!("[model] outer_momentum: only a run that starts from a checkpoint can start with momentum")
            }
            Some(file) if !file.is_file() => bail!("[model] outer_momentum: {} does not exist", file.display()),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Corpus files or directories (.txt, .jsonl, .parquet); relative paths are relative to the run file.
    pub files: Vec<PathBuf>,
    /// A `tokenizer.json`; without it a byte-level BPE of `vocab_size` tokens is trained on the corpus.
    pub tokenizer: Option<PathBuf>,
    pub vocab_size: Option<usize>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

fn default_val_fraction() -> f64 {
    0.1
}

/// The inner loop every worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InnerSection {
    /// Inner AdamW steps per round (H): every round's length, or their mean when `round_lr_power` > 0.
    pub steps: u64,
    /// Round lengths that follow the inner learning rate: each round holds an equal share of
    /// Σ (lr_t / peak)^P over the run's steps (`agora_diloco::round_starts`), so rounds are short while the
    /// rate is high and long once it has decayed; the number of rounds and of steps stay the same. 0: every
    /// round `steps` long. (Left out of the run id's canonical form at 0, so earlier runs keep their ids.)
    #[serde(skip_serializing_if = "is_zero")]
    pub round_lr_power: f64,
    /// Inner steps in one data unit; a round trains a whole number of units. Default: the whole round when
    /// rounds are equal, else the largest divisor of `steps` up to a fifth of it (10 at H = 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_steps: Option<u64>,
    /// Windows per inner step, per worker.
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
}

impl Default for InnerSection {
    fn default() -> Self {
        InnerSection {
            steps: 50,
            round_lr_power: agora_diloco::DEFAULT_ROUND_LR_POWER,
            unit_steps: None,
            batch_size: 16,
            seq_len: 128,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            grad_clip: 1.0,
            adamw: AdamWConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsSection {
    /// Outer steps in the run ...
    pub count: Option<u64>,
    /// ... or a token budget: the run ends with the round that brings the tokens trained into applied
    /// pseudo-gradients to at least this many. The learning-rate schedule then assumes `min_workers`
    /// contributions per round.
    pub tokens: Option<u64>,
    /// A round needs at least this many accepted pseudo-gradients to close.
    #[serde(default = "one")]
    pub min_workers: u64,
    /// Seconds after a round of H steps opens when it closes without the workers still training (if it has
    /// `min_workers` submissions); a longer round gets its share more (`RunFile::deadline_secs`).
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// A worker silent (no heartbeat or request) for this long is dropped and its data reassigned.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_secs: u64,
    /// Once a quorum (half the round's holders, at least `min_workers`) has uploaded, the others get this
    /// fraction of the time the quorum took before the round closes without them (at least 1 s; see
    /// `core::liveness`). A worker that holds work without delivering costs this much, not the deadline.
    #[serde(default = "default_grace_fraction")]
    pub grace_fraction: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn one() -> u64 {
    1
}
fn default_deadline() -> u64 {
    600
}
fn default_heartbeat_timeout() -> u64 {
    30
}
fn default_grace_fraction() -> f64 {
    0.5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Validation loss of the global weights every this many rounds (and always after the last).
    pub every_rounds: u64,
    /// Validation batches (of `inner.batch_size` windows) per evaluation.
    pub batches: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every_rounds: 1, batches: 20 }
    }
}

impl RunFile {
    pub fn load(path: &Path) -> Result<RunFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read run file", path.display()))?;
        let mut run: RunFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &PathBuf| {
            let joined = if p.is_absolute() { p.clone() } else { base.join(p) };
            std::fs::canonicalize(&joined).unwrap_or(joined)
        };
        run.data.files = run.data.files.iter().map(resolve).collect();
        run.data.tokenizer = run.data.tokenizer.as_ref().map(resolve);
        run.model.config = run.model.config.as_ref().map(resolve);
        run.model.checkpoint = run.model.checkpoint.as_ref().map(resolve);
        run.model.outer_momentum = run.model.outer_momentum.as_ref().map(resolve);
        run.validate().with_context(|| format!("{}: invalid run file", path.display()))?;
        Ok(run)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.model.checkpoint.is_some() && self.data.tokenizer.is_none() {
            bail!(
                "[model] checkpoint: name its tokenizer in [data] tokenizer = \"DIR/tokenizer.json\" (the weights \
                 only fit the vocabulary they were trained with)"
            );
        }
        if self.data.files.is_empty() {
            bail!("[data] files: name at least one corpus file");
        }
        for f in &self.data.files {
            if !f.exists() {
                bail!("[data] files: {} does not exist", f.display());
            }
        }
        match (&self.data.tokenizer, self.data.vocab_size) {
            (Some(t), None) if !t.is_file() => bail!("[data] tokenizer: {} does not exist", t.display()),
            (Some(_), Some(_)) => bail!("[data]: give tokenizer or vocab_size, not both"),
            (None, Some(v)) if v < 260 => bail!("[data] vocab_size must be at least 260 (bytes + specials), got {v}"),
            _ => {}
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            bail!("[data] val_fraction must be strictly between 0 and 1, got {}", self.data.val_fraction);
        }
        let r = &self.rounds;
        match (r.count, r.tokens) {
            (Some(0), None) => bail!("[rounds] count must be positive"),
            (None, Some(0)) => bail!("[rounds] tokens must be positive"),
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("[rounds]: give exactly one of count = ROUNDS or tokens = BUDGET"),
        }
        if r.min_workers == 0 {
            bail!("[rounds] min_workers must be at least 1");
        }
        let i = &self.inner;
        if i.steps == 0 || i.batch_size == 0 || i.seq_len == 0 {
            bail!("[inner] steps, batch_size and seq_len must be positive");
        }
        if !(i.round_lr_power.is_finite() && i.round_lr_power >= 0.0) {
            bail!("[inner] round_lr_power must be a number ≥ 0 (0: equal rounds), got {}", i.round_lr_power);
        }
        if let Some(u) = i.unit_steps {
            if u == 0 || !i.steps.is_multiple_of(u) {
                bail!("[inner] unit_steps must divide steps ({}), got {u}", i.steps);
            }
        }
        self.train_config().validate().context("[inner]")?;
        self.outer.validate().context("[outer]")?;
        self.compression.validate().context("[compression]")?;
        let plan = self.round_plan().context("[inner]")?;
        self.compression
            .overlap()
            .validate(plan.shortest())
            .context("[compression] overlap_steps (the shortest round)")?;
        if r.deadline_secs == 0 || r.heartbeat_timeout_secs == 0 {
            bail!("[rounds] deadline_secs and heartbeat_timeout_secs must be positive");
        }
        if !(r.grace_fraction.is_finite() && r.grace_fraction >= 0.0) {
            bail!("[rounds] grace_fraction must be a non-negative number, got {}", r.grace_fraction);
        }
        if self.eval.every_rounds == 0 || self.eval.batches == 0 {
            bail!("[eval] every_rounds and batches must be positive");
        }
        self.trust.validate().context("[trust]")?;
        let a = &self.admission;
        match a.policy {
            AdmissionPolicy::Allowlist if a.allowlist.is_empty() => {
                bail!("[admission] policy = \"allowlist\" needs allowlist = [\"<worker public key hex>\", ...]")
            }
            AdmissionPolicy::Cohort if a.previous.is_none() || a.cohort_size == 0 => bail!(
                "[admission] policy = \"cohort\" needs previous = \"<database URL of the earlier run>\" and cohort_size = N"
            ),
            _ => {}
        }
        Ok(())
    }

    /// The inner loop as `agora-train` runs it: the schedule spans every inner step of the run.
    pub fn train_config(&self) -> agora_train::TrainConfig {
        let i = &self.inner;
        agora_train::TrainConfig {
            seed: self.seed,
            steps: self.planned_rounds() * i.steps,
            batch_size: i.batch_size,
            seq_len: i.seq_len,
            grad_accum: 1,
            lr: i.lr,
            min_lr: i.min_lr,
            warmup_steps: i.warmup_steps,
            grad_clip: i.grad_clip,
            adamw: i.adamw,
            eval_every: 0,
            eval_batches: self.eval.batches,
            checkpoint_every: 0,
        }
    }

    /// Rounds the run is planned for: `count`, or the token budget at `min_workers` contributions of H
    /// steps per round.
    pub fn planned_rounds(&self) -> u64 {
        match (self.rounds.count, self.rounds.tokens) {
            (Some(count), _) => count,
            (None, Some(tokens)) => tokens.div_ceil(self.rounds.min_workers * self.tokens_per_round()).max(1),
            (None, None) => unreachable!("validated: count or tokens"),
        }
    }

    /// Training tokens (predicted positions) one worker trains in a round of `steps` inner steps.
    pub fn tokens_per_steps(&self, steps: u64) -> u64 {
        steps * (self.inner.batch_size * self.inner.seq_len) as u64
    }

    /// Training tokens in one round of the mean length (H steps).
    pub fn tokens_per_round(&self) -> u64 {
        self.tokens_per_steps(self.inner.steps)
    }

    /// Whether the run is over after `rounds` closed rounds that applied `tokens_applied` training tokens.
    pub fn is_finished(&self, rounds: u64, tokens_applied: u64) -> bool {
        match (self.rounds.count, self.rounds.tokens) {
            (Some(count), _) => rounds >= count,
            (None, Some(tokens)) => tokens_applied >= tokens,
            (None, None) => unreachable!("validated: count or tokens"),
        }
    }

    /// Seconds after a round of `steps` inner steps opens when it closes without its stragglers:
    /// `[rounds] deadline_secs` for a round of H steps or fewer, in proportion for a longer one (rounds that
    /// follow the rate end up to several times H long).
    pub fn deadline_secs(&self, steps: u64) -> u64 {
        let d = self.rounds.deadline_secs;
        d.saturating_mul(steps).div_ceil(self.inner.steps).max(d)
    }

    /// Inner steps in one data unit.
    pub fn unit_steps(&self) -> u64 {
        let i = &self.inner;
        i.unit_steps.unwrap_or_else(|| agora_diloco::default_unit_steps(i.steps, i.round_lr_power))
    }

    /// Windows in one data unit.
    pub fn windows_per_unit(&self) -> usize {
        self.unit_steps() as usize * self.inner.batch_size
    }

    /// Where each round starts and how many steps and data units it holds (the inner schedule decides the
    /// lengths when `round_lr_power` > 0).
    pub fn round_plan(&self) -> Result<agora_diloco::RoundPlan> {
        let i = &self.inner;
        agora_diloco::RoundPlan::new(
            &self.train_config().schedule(),
            self.planned_rounds(),
            i.steps,
            i.round_lr_power,
            self.unit_steps(),
        )
    }

    /// The run id: a hash of the canonical form of this file (paths included; `[admission] previous` left
    /// out when `previous_run` pins the earlier run by its id) and of the contents of every
    /// file the run reads: the corpus (each file, or each corpus file directly inside a directory, in the
    /// order the corpus reader takes them), the tokenizer and the model config. Contents are streamed
    /// through blake3, never read whole into memory.
    pub fn run_id(&self) -> Result<String> {
        let mut h = blake3::Hasher::new_derive_key("agora-coordinator run id v2");
        // An earlier run pinned by its id is the same earlier run wherever its store is reached from (a
        // moved SQLite file, a rotated database password): its URL is not part of this run's identity.
        let mut hashed = self.clone();
        if hashed.admission.previous_run.is_some() {
            hashed.admission.previous = None;
        }
        h.update(serde_json::to_string(&hashed)?.as_bytes());
        for f in &self.data.files {
            if f.is_dir() {
                let files = corpus_files_in(f)?;
                h.update(b"dir");
                h.update(&(files.len() as u64).to_le_bytes());
                for file in &files {
                    let name = file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
                    h.update(&(name.len() as u64).to_le_bytes());
                    h.update(name);
                    hash_contents(&mut h, file)?;
                }
            } else {
                h.update(b"file");
                hash_contents(&mut h, f)?;
            }
        }
        // A starting checkpoint (absent from older run files, whose ids stay as they were).
        if let Some(dir) = &self.model.checkpoint {
            h.update(b"checkpoint");
            hash_contents(&mut h, &dir.join(agora_model::checkpoint::CONFIG_FILE))?;
            for file in agora_model::checkpoint::weight_files(dir)? {
                hash_contents(&mut h, &file)?;
            }
        }
        if let Some(file) = &self.model.outer_momentum {
            h.update(b"outer momentum");
            hash_contents(&mut h, file)?;
        }
        for (what, path) in [("tokenizer", &self.data.tokenizer), ("model config", &self.model.config)] {
            h.update(what.as_bytes());
            match path {
                Some(p) => {
                    h.update(&[1]);
                    hash_contents(&mut h, p)?;
                }
                None => {
                    h.update(&[0]);
                }
            }
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }
}

/// The corpus files directly inside `dir` that the corpus reader takes, in its (file-name) order.
fn corpus_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let cannot = || format!("{}: cannot list the corpus directory to hash it into the run id", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(cannot)? {
        let path = entry.with_context(cannot)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if ext.is_some_and(|e| agora_data::corpus::SUPPORTED_EXTENSIONS.contains(&e.as_str())) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Streams a file's length and contents into `h` (1 MiB at a time); the length is checked against what
/// was read, so a file that changes while it is hashed is an error rather than a wrong id.
fn hash_contents(h: &mut blake3::Hasher, path: &Path) -> Result<()> {
    use std::io::Read;
    let cannot = || format!("{}: cannot read it to hash it into the run id", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot)?;
    let len = file.metadata().with_context(cannot)?.len();
    h.update(&len.to_le_bytes());
    let mut buffer = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(cannot),
        };
        h.update(&buffer[..n]);
        read += n as u64;
    }
    if read != len {
        bail!("{}: changed while it was hashed into the run id ({len} bytes, then {read})", path.display());
    }
    Ok(())
}

#[cfg(test)]
#[path = "run_file_tests.rs"]
mod tests;
