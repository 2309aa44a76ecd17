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
    /// Inner AdamW steps per round (H).
    pub steps: u64,
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
    /// Seconds after a round opens when it closes without the workers still training (if it has
    /// `min_workers` submissions).
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
        self.train_config().validate().context("[inner]")?;
        self.outer.validate().context("[outer]")?;
        self.compression.validate().context("[compression]")?;
        self.compression.overlap().validate(i.steps).context("[compression] overlap_steps")?;
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

    /// Rounds the run is planned for: `count`, or the token budget at `min_workers` units per round.
    pub fn planned_rounds(&self) -> u64 {
        match (self.rounds.count, self.rounds.tokens) {
            (Some(count), _) => count,
            (None, Some(tokens)) => tokens.div_ceil(self.rounds.min_workers * self.tokens_per_unit()).max(1),
            (None, None) => unreachable!("validated: count or tokens"),
        }
    }

    /// Training tokens (predicted positions) in one data unit.
    pub fn tokens_per_unit(&self) -> u64 {
        (self.windows_per_unit() * self.inner.seq_len) as u64
    }

    /// Whether the run is over after `rounds` closed rounds that applied `units_applied` units in all.
    pub fn is_finished(&self, rounds: u64, units_applied: u64) -> bool {
        match (self.rounds.count, self.rounds.tokens) {
            (Some(count), _) => rounds >= count,
            (None, Some(tokens)) => units_applied * self.tokens_per_unit() >= tokens,
            (None, None) => unreachable!("validated: count or tokens"),
        }
    }

    /// Windows in one data unit: one worker's data for one round.
    pub fn windows_per_unit(&self) -> usize {
        self.inner.steps as usize * self.inner.batch_size
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
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::write(dir.join("corpus.txt"), "some text\n").unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_readme_diloco_run_file_is_valid() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| &b[..b.find("```").expect("closed code block")])
            .find(|b| b.contains("[rounds]"))
            .expect("README has a DiLoCo run file");
        let dir = tempfile::tempdir().unwrap();
        let run = RunFile::load(&write(dir.path(), block)).unwrap();
        assert_eq!(run.inner.steps, 50);
        assert_eq!(run.outer, OuterConfig::default());
        assert_eq!(run.rounds.count, Some(40));
        assert_eq!(run.train_config().steps, 40 * 50, "the schedule spans every inner step of the run");
        assert_eq!(run.data.files, vec![std::fs::canonicalize(dir.path().join("corpus.txt")).unwrap()]);
        assert_eq!(run.run_id().unwrap(), run.run_id().unwrap());
    }

    #[test]
    fn invalid_run_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let base =
            "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\nvocab_size = 300\n[rounds]\ncount = 3\n";
        assert!(RunFile::load(&write(dir.path(), base)).is_ok());
        let cases = [
            (base.replace("preset = \"tiny\"", "preset = \"huge\""), "huge"),
            (base.replace("corpus.txt", "missing.txt"), "does not exist"),
            (base.replace("count = 3", "count = 0"), "count must be positive"),
            (base.replace("count = 3", "count = 3\ntokens = 100"), "exactly one of count"),
            (base.replace("count = 3", "min_workers = 1"), "exactly one of count"),
            (format!("{base}min_workers = 0\n"), "min_workers"),
            (format!("{base}[outer]\nmomentum = 1.5\n"), "outer.momentum"),
            (format!("{base}[outer]\nkind = \"adam\"\n"), "unknown variant"),
            (format!("{base}[inner]\nsteps = 0\n"), "[inner]"),
            (format!("{base}[inner]\nlr = -1.0\n"), "lr must be positive"),
            (format!("{base}surprise = 1\n"), "unknown field"),
            (base.replace("vocab_size = 300", "vocab_size = 10"), "at least 260"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", RunFile::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    #[test]
    fn a_token_budget_plans_rounds_and_ends_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[inner]\nsteps = 10\nbatch_size = 4\nseq_len = 32\n[rounds]\ntokens = 25600\nmin_workers = 2\n";
        let run = RunFile::load(&write(dir.path(), text)).unwrap();
        assert_eq!(run.tokens_per_unit(), 10 * 4 * 32);
        assert_eq!(run.planned_rounds(), 10, "25600 tokens at 2 units of 1280 tokens per round");
        assert_eq!(run.train_config().steps, 100);
        assert!(!run.is_finished(5, 19));
        assert!(run.is_finished(5, 20), "the budget counts applied units, however many rounds they took");
    }

    #[test]
    fn the_run_id_changes_with_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n";
        let a = RunFile::load(&write(dir.path(), base)).unwrap().run_id().unwrap();
        let b = RunFile::load(&write(dir.path(), &base.replace("count = 3", "count = 4"))).unwrap().run_id().unwrap();
        assert_ne!(a, b);
    }

    /// A run that starts from a checkpoint: it must name the checkpoint's tokenizer, momentum only comes
    /// with a checkpoint, and the run id covers the checkpoint's weights and the momentum file.
    #[test]
    fn a_checkpoint_start_is_validated_and_hashed_into_the_run_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = agora_model::preset("tiny", Some(300)).unwrap();
        let ckpt = dir.path().join("ckpt");
        agora_model::save_pretrained(&agora_model::Llama::new(&config, tch::Device::Cpu, 0), &ckpt).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(dir.path().join("momentum.safetensors"), "m1").unwrap();
        let base = "[model]\ncheckpoint = \"ckpt\"\n[data]\nfiles = [\"corpus.txt\"]\ntokenizer = \"tokenizer.json\"\n[rounds]\ncount = 3\n";
        let run = RunFile::load(&write(dir.path(), base)).unwrap();
        assert_eq!(run.model.checkpoint, Some(std::fs::canonicalize(&ckpt).unwrap()), "resolved beside the file");
        let a = run.run_id().unwrap();
        let with_momentum = base.replace("ckpt\"\n", "ckpt\"\nouter_momentum = \"momentum.safetensors\"\n");
        let momentum_run = RunFile::load(&write(dir.path(), &with_momentum)).unwrap();
        let b = momentum_run.run_id().unwrap();
        assert_ne!(a, b, "the momentum is part of the run");
        std::fs::write(dir.path().join("momentum.safetensors"), "m2").unwrap();
        assert_ne!(momentum_run.run_id().unwrap(), b, "and so are its contents");
        // Other weights in the same directory: another run.
        agora_model::save_pretrained(&agora_model::Llama::new(&config, tch::Device::Cpu, 1), &ckpt).unwrap();
        assert_ne!(run.run_id().unwrap(), a, "the checkpoint's weights are part of the run");

        let cases = [
            (base.replace("tokenizer = \"tokenizer.json\"", "vocab_size = 300"), "name its tokenizer"),
            (base.replace("checkpoint = \"ckpt\"", "checkpoint = \"nowhere\""), "not a checkpoint directory"),
            (base.replace("checkpoint = \"ckpt\"", "checkpoint = \"ckpt\"\npreset = \"tiny\""), "exactly one of"),
            (
                base.replace("checkpoint = \"ckpt\"", "preset = \"tiny\"\nouter_momentum = \"momentum.safetensors\""),
                "only a run that starts from a checkpoint",
            ),
            (with_momentum.replace("momentum.safetensors", "missing.safetensors"), "does not exist"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", RunFile::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    /// An earlier run pinned by its id is the same earlier run however its store is reached (a moved file,
    /// a rotated password): its URL is not part of the run id then; unpinned, it is.
    #[test]
    fn a_pinned_previous_run_is_identified_by_its_id_not_its_url() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n[admission]\n";
        let id = |admission: &str| {
            RunFile::load(&write(dir.path(), &format!("{base}{admission}"))).unwrap().run_id().unwrap()
        };
        let pinned = |url: &str, run: &str| id(&format!("previous = \"{url}\"\nprevious_run = \"{run}\"\n"));
        assert_eq!(pinned("postgres://u:old@h/db", "abc"), pinned("postgres://u:new@h/db", "abc"));
        assert_ne!(pinned("postgres://u:old@h/db", "abc"), pinned("postgres://u:old@h/db", "abd"));
        assert_ne!(id("previous = \"sqlite:///a.db\"\n"), id("previous = \"sqlite:///b.db\"\n"));
    }

    /// A changed byte of the corpus (same size, same path, same run file) is a different run.
    #[test]
    fn the_run_id_hashes_the_corpus_contents_not_their_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n";
        let run = RunFile::load(&write(dir.path(), base)).unwrap();
        let a = run.run_id().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "some test\n").unwrap();
        let b = run.run_id().unwrap();
        assert_ne!(a, b, "one byte of the corpus changed, its size did not");
        std::fs::write(&corpus, "some text\n").unwrap();
        assert_eq!(run.run_id().unwrap(), a, "the same contents are the same run");

        // A corpus directory: a byte of a file inside it.
        std::fs::create_dir(dir.path().join("shards")).unwrap();
        std::fs::write(dir.path().join("shards/a.txt"), "alpha\n").unwrap();
        std::fs::write(dir.path().join("shards/b.jsonl"), "{\"text\": \"beta\"}\n").unwrap();
        let run = RunFile::load(&write(dir.path(), &base.replace("corpus.txt", "shards"))).unwrap();
        let c = run.run_id().unwrap();
        std::fs::write(dir.path().join("shards/b.jsonl"), "{\"text\": \"beto\"}\n").unwrap();
        assert_ne!(run.run_id().unwrap(), c);

        // A tokenizer file, likewise.
        std::fs::write(dir.path().join("tokenizer.json"), "{\"v\": 1}").unwrap();
        let with_tokenizer =
            base.replace("files = [\"corpus.txt\"]", "files = [\"corpus.txt\"]\ntokenizer = \"tokenizer.json\"");
        let run = RunFile::load(&write(dir.path(), &with_tokenizer)).unwrap();
        let d = run.run_id().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{\"v\": 2}").unwrap();
        assert_ne!(run.run_id().unwrap(), d);

        // A file that cannot be read is an error that names it.
        std::fs::remove_file(&corpus).unwrap();
        let err = format!("{:#}", run.run_id().unwrap_err());
        assert!(err.contains("corpus.txt"), "{err}");
    }
}
