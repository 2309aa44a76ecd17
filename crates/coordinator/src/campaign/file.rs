//! The campaign file (TOML): the phases of a campaign, each a run of its own (model, token budget, inner
//! and outer recipe, codec, trust) plus how it grows from the phase before and how many of that phase's
//! best contributors it retains. One `[data]` section serves every phase, so every phase reads the same
//! corpus through the same tokenizer (growth keeps the vocabulary).

use super::research::ResearchSection;
use crate::run_file::{
    AdmissionPolicy, AdmissionSection, DataSection, EvalSection, InnerSection, ModelSection, RoundsSection, RunFile,
};
use agora_diloco::{CompressionConfig, OuterConfig};
use agora_model::grow::{plan, FfnGrowth, GrowthMethod, GrowthOptions, HiddenGrowth};
use agora_model::{preset, LlamaConfig};
use agora_verify::TrustConfig;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignFile {
    /// A label for status pages and logs.
    pub name: String,
    /// Phase k (from 0) seeds its initial weights (phase 0), data units and epoch order with `seed + k`.
    #[serde(default)]
    pub seed: u64,
    /// The corpus and tokenizer of every phase. Phases after the first use the first phase's tokenizer.
    pub data: DataSection,
    /// The phases, in order: `[[phase]]`.
    #[serde(rename = "phase")]
    pub phases: Vec<PhaseSection>,
}

/// One phase: a run file's sections (without `[data]` and `[admission]`, which the campaign fills in),
/// plus `retain` and `[phase.growth]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSection {
    pub name: String,
    /// The phase's model: `preset` or `config` (a Hugging Face `config.json`). For every phase but the
    /// first this is the target the previous phase's final weights are grown to.
    pub model: ModelSection,
    /// Admit only the `retain` best identities of the previous phase by reputation (rating above zero).
    /// Absent: anyone may join. Reputations carry over either way.
    pub retain: Option<usize>,
    #[serde(default)]
    pub growth: GrowthSection,
    #[serde(default)]
    pub inner: InnerSection,
    #[serde(default)]
    pub outer: OuterConfig,
    pub rounds: RoundsSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    /// A call for proposals for this phase's recipe, held while the previous phase trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub research: Option<ResearchSection>,
}

/// How the previous phase's final weights become this phase's initial weights (`agora_model::grow`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrowthSection {
    /// depth, width, both (exact) or stack (G_stack, not exact).
    pub method: String,
    /// New FFN units: fresh (zero down-projection columns) or split (existing units halved, with
    /// cancelling noise).
    pub ffn: String,
    /// A wider residual stream: pad (zeros, gains rescaled) or tile (HyperCloning copies).
    pub hidden: String,
    /// Seeds the symmetry-breaking values of new weights.
    pub seed: u64,
    /// The outer Nesterov momentum: reset (zero) or carry (mapped to the new shapes, new entries zero).
    /// Workers start every phase with fresh AdamW state and the inner learning rate re-warms.
    pub outer_momentum: String,
}

impl Default for GrowthSection {
    fn default() -> Self {
        GrowthSection {
            method: "both".into(),
            ffn: "fresh".into(),
            hidden: "pad".into(),
            seed: 0,
            outer_momentum: "reset".into(),
        }
    }
}

impl GrowthSection {
    pub fn method(&self) -> Result<GrowthMethod> {
        self.method.parse::<GrowthMethod>().map_err(|e| anyhow::anyhow!("[phase.growth] method: {e}"))
    }

    pub fn options(&self) -> Result<GrowthOptions> {
        let ffn = match self.ffn.as_str() {
            "fresh" => FfnGrowth::Fresh,
            "split" => FfnGrowth::Split,
            other => bail!("[phase.growth] ffn: {other:?} is not fresh or split"),
        };
        let hidden = match self.hidden.as_str() {
            "pad" => HiddenGrowth::Pad,
            "tile" => HiddenGrowth::Tile,
            other => bail!("[phase.growth] hidden: {other:?} is not pad or tile"),
        };
        Ok(GrowthOptions { depth: self.method()?.depth(), ffn, hidden, seed: self.seed })
    }

    pub fn carries_momentum(&self) -> Result<bool> {
        match self.outer_momentum.as_str() {
            "carry" => Ok(true),
            "reset" => Ok(false),
            other => bail!("[phase.growth] outer_momentum: {other:?} is not carry or reset"),
        }
    }
}

/// What phase k > 0 takes from phase k − 1 once it has finished.
#[derive(Debug, Clone)]
pub struct Handover {
    /// The previous phase's store, whose reputations carry over and whose leaderboard `retain` reads.
    pub previous_database: String,
    pub previous_run: String,
    /// The grown checkpoint: `config.json`, weights, `tokenizer.json` and, when carried,
    /// `outer_momentum.safetensors`.
    pub grown: PathBuf,
}

/// The file in a grown checkpoint directory that holds the carried outer momentum.
pub const MOMENTUM_FILE: &str = "outer_momentum.safetensors";

impl CampaignFile {
    pub fn load(path: &Path) -> Result<CampaignFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the campaign file", path.display()))?;
        let mut campaign: CampaignFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &PathBuf| {
            let joined = if p.is_absolute() { p.clone() } else { base.join(p) };
            std::fs::canonicalize(&joined).unwrap_or(joined)
        };
        campaign.data.files = campaign.data.files.iter().map(resolve).collect();
        campaign.data.tokenizer = campaign.data.tokenizer.as_ref().map(resolve);
        for phase in &mut campaign.phases {
            phase.model.config = phase.model.config.as_ref().map(resolve);
        }
        campaign.validate().with_context(|| format!("{}: invalid campaign file", path.display()))?;
        Ok(campaign)
    }

    /// Every phase a valid run, every growth step possible with its method, and retention that can fill
    /// each phase's rounds.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.name.trim().is_empty(), "name: give the campaign a name");
        ensure!(!self.phases.is_empty(), "[[phase]]: a campaign has at least one phase");
        for (k, phase) in self.phases.iter().enumerate() {
            let at = || format!("[[phase]] {} ({:?})", k + 1, phase.name);
            ensure!(!phase.name.trim().is_empty(), "{}: give the phase a name", at());
            if self.phases[..k].iter().any(|p| p.name == phase.name) {
                bail!("{}: two phases are named {:?}", at(), phase.name);
            }
            if phase.model.checkpoint.is_some() || phase.model.outer_momentum.is_some() {
                bail!(
                    "{}: [phase.model] takes preset or config; a phase starts from the previous phase's grown \
                     weights, never from a checkpoint of its own",
                    at()
                );
            }
            // The run as it will be served (the handover's paths are checked when it exists).
            self.run_without_handover(k).validate().with_context(at)?;
            phase.growth.options().with_context(at)?;
            phase.growth.carries_momentum().with_context(at)?;
            if let Some(research) = &phase.research {
                super::research::validate_section(self, k, research).with_context(at)?;
            }
            match (k, phase.retain) {
                (0, Some(_)) => bail!("{}: retain: the first phase has no previous phase to retain from", at()),
                (_, Some(0)) => bail!("{}: retain must be at least 1 (leave it out to admit anyone)", at()),
                (_, Some(n)) if (n as u64) < phase.rounds.min_workers => bail!(
                    "{}: retain = {n} can never fill a round of [phase.rounds] min_workers = {}",
                    at(),
                    phase.rounds.min_workers
                ),
                _ => {}
            }
            if phase.retain.is_some() && !self.phases[k - 1].trust.verify {
                bail!(
                    "{}: retain needs reputations, and phase {k} does not judge its uploads ([phase.trust] verify = \
                     false): judge it, or leave retain out",
                    at()
                );
            }
        }
        // Growth from each phase to the next, on configs (no weights are built).
        let vocab = self.provisional_vocab()?;
        for k in 1..self.phases.len() {
            let from = self.target_config(k - 1, vocab)?;
            let to = self.target_config(k, vocab)?;
            let growth = &self.phases[k].growth;
            let steps = plan(&from, &to, &growth.options()?).with_context(|| {
                format!("[[phase]] {} ({:?}): cannot grow phase {k}'s model", k + 1, self.phases[k].name)
            })?;
            growth.method()?.check(&steps).with_context(|| format!("[[phase]] {}: [phase.growth] method", k + 1))?;
        }
        Ok(())
    }

    /// The vocabulary size every phase will have: the tokenizer file's, `vocab_size`, or the first
    /// phase's preset default (what `prepare_data` trains).
    fn provisional_vocab(&self) -> Result<usize> {
        if let Some(path) = &self.data.tokenizer {
            return Ok(agora_data::Tokenizer::from_file(path)?.vocab_size());
        }
        Ok(self
            .data
            .vocab_size
            .or_else(|| self.phases[0].model.preset.as_deref().and_then(agora_model::config::preset_vocab_size))
            .unwrap_or(4096))
    }

    /// Phase k's model config for a tokenizer of `vocab` tokens (the growth target of phase k > 0).
    pub fn target_config(&self, k: usize, vocab: usize) -> Result<LlamaConfig> {
        let model = &self.phases[k].model;
        match (&model.preset, &model.config) {
            (Some(name), None) => Ok(preset(name, Some(vocab))?),
            (None, Some(path)) => LlamaConfig::from_file(path),
            _ => bail!("[[phase]] {}: [phase.model] takes preset or config", k + 1),
        }
    }

    fn run_without_handover(&self, k: usize) -> RunFile {
        self.run_of(k, &self.phases[k])
    }

    /// Phase k's proxy run as written (its recipe at `[phase.research] proxy_tokens`), for validation.
    pub(crate) fn proxy_run_without_handover(&self, k: usize) -> RunFile {
        let mut run = self.run_without_handover(k);
        run.rounds = proxy_rounds(&self.phases[k]);
        run
    }

    /// The run of phase k with `phase` as its section (the file's own, or one patched by a proposal).
    fn run_of(&self, k: usize, phase: &PhaseSection) -> RunFile {
        RunFile {
            seed: self.seed + k as u64,
            model: phase.model.clone(),
            data: self.data.clone(),
            inner: phase.inner.clone(),
            outer: phase.outer,
            rounds: phase.rounds.clone(),
            eval: phase.eval.clone(),
            compression: phase.compression,
            trust: phase.trust,
            admission: AdmissionSection::default(),
        }
    }

    /// The run file phase k is served with: the first phase as written; a later one starting from the
    /// grown checkpoint, reading the first phase's tokenizer, with reputations (and, with `retain`, only
    /// the best identities) from the previous phase.
    pub fn phase_run(&self, k: usize, handover: Option<&Handover>) -> Result<RunFile> {
        self.phase_run_with(k, &self.phases[k], handover)
    }

    /// [`CampaignFile::phase_run`] with phase k's section replaced by `phase` (a proposal's patched
    /// recipe).
    pub fn phase_run_with(&self, k: usize, phase: &PhaseSection, handover: Option<&Handover>) -> Result<RunFile> {
        let mut run = self.run_of(k, phase);
        match (k, handover) {
            (0, None) => {}
            (0, Some(_)) => bail!("the first phase has no previous phase"),
            (_, None) => bail!("phase {} needs the previous phase's grown weights", k + 1),
            (_, Some(h)) => {
                let momentum = h.grown.join(MOMENTUM_FILE);
                run.model = ModelSection {
                    preset: None,
                    config: None,
                    checkpoint: Some(h.grown.clone()),
                    // Carried only if the finished phase had momentum to carry.
                    outer_momentum: (phase.growth.carries_momentum()? && momentum.is_file()).then_some(momentum),
                };
                run.data.tokenizer = Some(h.grown.join("tokenizer.json"));
                run.data.vocab_size = None;
                run.admission = AdmissionSection {
                    policy: if self.phases[k].retain.is_some() {
                        AdmissionPolicy::Cohort
                    } else {
                        AdmissionPolicy::Open
                    },
                    allowlist: Vec::new(),
                    previous: Some(h.previous_database.clone()),
                    previous_run: Some(h.previous_run.clone()),
                    cohort_size: self.phases[k].retain.unwrap_or(0),
                };
            }
        }
        run.validate().with_context(|| format!("phase {} ({:?})", k + 1, self.phases[k].name))?;
        Ok(run)
    }

    /// A proxy run of phase k's call for proposals: the phase's run with `phase` as its recipe, the same
    /// seed, data, starting weights and admission, and `[phase.research] proxy_tokens` as its budget.
    pub fn proxy_run(&self, k: usize, phase: &PhaseSection, handover: &Handover) -> Result<RunFile> {
        let mut run = self.phase_run_with(k, phase, Some(handover))?;
        run.rounds = proxy_rounds(phase);
        run.validate().with_context(|| format!("a proxy run of phase {} ({:?})", k + 1, self.phases[k].name))?;
        Ok(run)
    }
}

/// A phase's rounds with the call's fixed compute as the token budget.
fn proxy_rounds(phase: &PhaseSection) -> RoundsSection {
    let mut rounds = phase.rounds.clone();
    rounds.count = None;
    rounds.tokens = phase.research.as_ref().map(|r| r.proxy_tokens);
    rounds
}

/// Phase k's database when the campaign was given one URL: the same server, a database of its own
/// (`NAME_phaseK`, or `NAME_phaseK.db` for SQLite), so each phase keeps its own receipts, roots and ledger.
pub fn phase_database(base: &str, k: usize) -> Result<String> {
    suffixed_database(base, &format!("_phase{}", k + 1))
}

/// The database of entry `id` of phase k's call for proposals (its proxy run) when the campaign was given
/// one URL: `NAME_phaseK_eID`.
pub fn proxy_database(base: &str, k: usize, id: u64) -> Result<String> {
    suffixed_database(base, &format!("_phase{}_e{id}", k + 1))
}

fn suffixed_database(base: &str, suffix: &str) -> Result<String> {
    let shown = crate::redact::redact_url(base);
    if base.starts_with("sqlite:") {
        ensure!(
            !base.contains(":memory:"),
            "--database {shown}: a campaign needs database files that outlive it (sqlite:///path/campaign.db)"
        );
        let (url, query) = match base.split_once('?') {
            Some((u, q)) => (u, Some(q)),
            None => (base, None),
        };
        let stem = url.strip_suffix(".db").unwrap_or(url);
        ensure!(
            !stem.ends_with('/') && !stem.ends_with(':'),
            "--database {shown}: name a database file (sqlite:///path/campaign.db); phase K uses campaign_phaseK.db"
        );
        let named = if url.ends_with(".db") { format!("{stem}{suffix}.db") } else { format!("{stem}{suffix}") };
        return Ok(match query {
            Some(q) => format!("{named}?{q}"),
            None => named,
        });
    }
    let mut url = url::Url::parse(base).map_err(|e| anyhow::anyhow!("--database {shown}: not a URL: {e}"))?;
    ensure!(
        matches!(url.scheme(), "postgres" | "postgresql"),
        "--database {shown}: expected sqlite://… or postgres://…"
    );
    let name = url.path().trim_start_matches('/').to_string();
    ensure!(
        !name.is_empty() && !name.contains('/'),
        "--database {shown}: name the database (postgres://USER@HOST/NAME); phase K uses NAME_phaseK"
    );
    let named = format!("{name}{suffix}");
    // PostgreSQL truncates longer names, which could give two phases one database.
    ensure!(named.len() <= 63, "--database {shown}: {named} is longer than PostgreSQL's 63-byte names; shorten NAME");
    url.set_path(&format!("/{named}"));
    Ok(url.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const CAMPAIGN: &str = r#"
name = "ladder"
seed = 7
[data]
files = ["corpus.txt"]
vocab_size = 300

[[phase]]
name = "small"
[phase.model]
preset = "tiny"
[phase.rounds]
count = 3
min_workers = 2

[[phase]]
name = "deeper"
retain = 3
[phase.growth]
method = "depth"
outer_momentum = "carry"
[phase.model]
config = "deeper.json"
[phase.rounds]
tokens = 10000
min_workers = 2
"#;

    /// Writes a campaign file `text` into `dir` beside what it names: `corpus.txt` and `deeper.json`
    /// (`tiny` with 6 layers, vocabulary 300).
    pub(crate) fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::write(dir.join("corpus.txt"), "some text\n").unwrap();
        let mut deeper = preset("tiny", Some(300)).unwrap();
        deeper.num_hidden_layers = 6;
        agora_model::checkpoint::write_json(&dir.join("deeper.json"), &deeper.to_hf_json()).unwrap();
        let path = dir.join("campaign.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn phases_become_runs_that_grow_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let campaign = CampaignFile::load(&write(dir.path(), CAMPAIGN)).unwrap();
        let first = campaign.phase_run(0, None).unwrap();
        assert_eq!((first.seed, first.model.preset.as_deref()), (7, Some("tiny")));
        assert_eq!(first.admission, AdmissionSection::default(), "anyone may join the first phase");
        assert!(campaign.phase_run(1, None).is_err(), "a later phase needs its handover");

        // A grown checkpoint as the campaign writes it.
        let grown = dir.path().join("grown");
        let mut config = campaign.target_config(1, 300).unwrap();
        config.bos_token_id = Some(1);
        let model = agora_model::Llama::new(&config, tch::Device::Cpu, 0);
        agora_model::save_pretrained(&model, &grown).unwrap();
        std::fs::write(grown.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(grown.join(MOMENTUM_FILE), "momentum").unwrap();
        let handover = Handover {
            previous_database: "sqlite:///x/phase1.db".into(),
            previous_run: "abc".into(),
            grown: grown.clone(),
        };
        let second = campaign.phase_run(1, Some(&handover)).unwrap();
        assert_eq!(second.seed, 8, "each phase draws its own data order");
        assert_eq!(second.model.checkpoint.as_deref(), Some(grown.as_path()));
        assert_eq!(second.model.outer_momentum, Some(grown.join(MOMENTUM_FILE)), "carry names the momentum");
        assert_eq!(second.data.tokenizer, Some(grown.join("tokenizer.json")), "the first phase's tokenizer");
        assert_eq!(second.data.vocab_size, None);
        let a = &second.admission;
        assert_eq!((a.policy, a.cohort_size), (AdmissionPolicy::Cohort, 3));
        assert_eq!((a.previous.as_deref(), a.previous_run.as_deref()), (Some("sqlite:///x/phase1.db"), Some("abc")));

        // Without retain: open admission, reputations still carried; reset: no momentum file.
        let open = CAMPAIGN.replace("retain = 3\n", "").replace("outer_momentum = \"carry\"", "");
        let campaign = CampaignFile::load(&write(dir.path(), &open)).unwrap();
        let second = campaign.phase_run(1, Some(&handover)).unwrap();
        assert_eq!(second.admission.policy, AdmissionPolicy::Open);
        assert!(second.admission.previous.is_some(), "reputations carry over without retain too");
        assert_eq!(second.model.outer_momentum, None);
    }

    #[test]
    fn invalid_campaigns_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (CAMPAIGN.replace("name = \"deeper\"", "name = \"small\""), "two phases are named"),
            (CAMPAIGN.replace("retain = 3", "retain = 1"), "can never fill a round"),
            (CAMPAIGN.replace("retain = 3", "retain = 0"), "at least 1"),
            (CAMPAIGN.replace("name = \"small\"", "name = \"small\"\nretain = 2"), "no previous phase"),
            (CAMPAIGN.replace("method = \"depth\"", "method = \"width\""), "[phase.growth] method"),
            (CAMPAIGN.replace("method = \"depth\"", "method = \"sideways\""), "[phase.growth] method: "),
            (CAMPAIGN.replace("outer_momentum = \"carry\"", "outer_momentum = \"keep\""), "carry or reset"),
            (CAMPAIGN.replace("config = \"deeper.json\"", "preset = \"small\""), "cannot grow"),
            (CAMPAIGN.replace("config = \"deeper.json\"", "checkpoint = \".\""), "never from a checkpoint"),
            (CAMPAIGN.replace("count = 3", "count = 0"), "count must be positive"),
            (
                CAMPAIGN.replace("[[phase]]\nname = \"deeper\"", "[[phase]]\nname = \"deeper\"\nsurprise = 1"),
                "unknown field",
            ),
            (CAMPAIGN.replace("name = \"ladder\"", "name = \" \""), "give the campaign a name"),
            (
                CAMPAIGN.replacen(
                    "[[phase]]\nname = \"deeper\"",
                    "[phase.trust]\nverify = false\n[[phase]]\nname = \"deeper\"",
                    1,
                ),
                "retain needs reputations",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", CampaignFile::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    #[test]
    fn each_phase_gets_its_own_database() {
        let db = |base: &str, k| phase_database(base, k).unwrap();
        assert_eq!(db("postgres://u:p@h:5432/agora", 0), "postgres://u:p@h:5432/agora_phase1");
        assert_eq!(db("postgres://h/agora?sslmode=disable", 2), "postgres://h/agora_phase3?sslmode=disable");
        assert_eq!(db("sqlite:///tmp/c/campaign.db?mode=rwc", 1), "sqlite:///tmp/c/campaign_phase2.db?mode=rwc");
        assert_eq!(db("sqlite:///tmp/c/campaign", 0), "sqlite:///tmp/c/campaign_phase1");
        assert_eq!(db("sqlite://campaign.db", 0), "sqlite://campaign_phase1.db");
        for (bad, expected) in [
            ("postgres://u:p@h:5432", "name the database"),
            ("postgres://h/", "name the database"),
            ("sqlite::memory:", "outlive it"),
            ("sqlite:///tmp/", "name a database file"),
            ("mysql://h/db", "expected sqlite"),
        ] {
            let err = phase_database(bad, 0).unwrap_err().to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
        let long = format!("postgres://h/{}", "a".repeat(60));
        assert!(phase_database(&long, 0).unwrap_err().to_string().contains("63-byte"));
        assert!(!phase_database("postgres://u:secret@h", 0).unwrap_err().to_string().contains("secret"));
    }
}
