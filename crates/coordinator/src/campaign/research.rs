//! The research track's rules, apart from storage and HTTP: what a call for proposals is (`[phase.research]`),
//! which fields a proposal may patch and how a patch is applied and checked, who may propose, and how a
//! settled call ranks, credits, adopts and retains.
//!
//! A call for phase k's recipe is hosted by phase k − 1: it opens with that phase and closes
//! `close_after_secs` after it finishes. Every accepted proposal, and the campaign file's own recipe
//! (entry 0), then trains as a proxy run at the same fixed compute (`proxy_tokens`, the phase's seed, data
//! and grown starting weights) on the campaign's workers; the lowest final validation loss is adopted for
//! phase k.

use super::file::{CampaignFile, PhaseSection};
use agora_protocol::WorkerId;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// `[phase.research]`: a call for proposals for this phase's recipe, held while the phase before it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResearchSection {
    /// Tokens of every proxy run: the fixed compute each proposal (and the file's own recipe) is given.
    pub proxy_tokens: u64,
    /// The call closes this many seconds after the previous phase finishes (it opens when that phase
    /// opens).
    #[serde(default)]
    pub close_after_secs: u64,
    /// At most this many proposals (each costs the campaign's workers a proxy run); one per researcher.
    #[serde(default = "default_max_proposals")]
    pub max_proposals: usize,
    /// Admit only the `retain` best researchers of the previous call (absent: anyone may propose).
    pub retain: Option<usize>,
    /// Micro-credits shared by the proposals whose proxy run beat the phase's own recipe by at least
    /// `min_gain`, pro rata to how much lower their validation loss ended.
    #[serde(default)]
    pub reward: u64,
    /// A proposal is adopted, and paid, only if its validation loss is below the phase's own recipe's by
    /// at least this fraction of it: differences within run-to-run noise (or a patch that changes nothing
    /// that matters) earn nothing.
    #[serde(default = "default_min_gain")]
    pub min_gain: f64,
    /// A proxy run that has not finished this long after it opened (its uploads all refused, say) is
    /// recorded as the entry's failure.
    #[serde(default = "default_proxy_timeout_secs")]
    pub proxy_timeout_secs: u64,
}

fn default_max_proposals() -> usize {
    8
}

fn default_min_gain() -> f64 {
    0.002
}

fn default_proxy_timeout_secs() -> u64 {
    3600
}

/// How far a proposal may take a numeric field from the phase's own value: a patch is anyone's input,
/// and the checks (round plans, token counts) cost time and memory in these fields.
pub const MAX_STEPS_FACTOR: u64 = 4;

/// The fields a proposal may change, by table: the inner learning rate and its schedule, the batch and H,
/// the outer recipe, the codec, and the growth method and state handling. Everything else (the model,
/// the token budget, data, evaluation, trust, retention) is the campaign's.
pub const ALLOWED: &[(&str, &[&str])] = &[
    ("inner", &["steps", "round_lr_power", "unit_steps", "batch_size", "lr", "min_lr", "warmup_steps"]),
    (
        "outer",
        &[
            "kind",
            "lr",
            "momentum",
            "warmup_rounds",
            "final_lr_fraction",
            "final_momentum_fraction",
            "full_lr_contributions",
            "average_last_step",
        ],
    ),
    (
        "compression",
        &[
            "codec",
            "block",
            "chunk",
            "keep",
            "values",
            "error_feedback",
            "feedback_decay",
            "fragments",
            "overlap_steps",
            "merge",
        ],
    ),
    ("growth", &["method", "ffn", "hidden", "outer_momentum"]),
];

/// Why a patch is refused; each is a 400 with its own code.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchError {
    /// Not TOML, or not tables of fields.
    Malformed(String),
    /// A field no phase has.
    UnknownField(String),
    /// A field a phase has, outside [`ALLOWED`].
    Disallowed(String),
    /// A value of the wrong type, out of range, or a recipe the phase cannot run (or grow into).
    OutOfRange(String),
    /// Changes nothing.
    Empty,
}

impl PatchError {
    pub fn code(&self) -> &'static str {
        match self {
            PatchError::Malformed(_) => "malformed_patch",
            PatchError::UnknownField(_) => "unknown_field",
            PatchError::Disallowed(_) => "disallowed_field",
            PatchError::OutOfRange(_) => "out_of_range",
            PatchError::Empty => "empty_patch",
        }
    }
}

impl std::fmt::Display for PatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allowed =
            || ALLOWED.iter().map(|(t, fs)| format!("[{t}] {}", fs.join(", "))).collect::<Vec<_>>().join("; ");
        match self {
            PatchError::Malformed(e) => write!(f, "the patch is not a TOML table of [section] fields: {e}"),
            PatchError::UnknownField(field) => {
                write!(f, "{field}: no phase has this field; a proposal may change {}", allowed())
            }
            PatchError::Disallowed(field) => {
                write!(f, "{field}: the campaign fixes this field; a proposal may change only {}", allowed())
            }
            PatchError::OutOfRange(e) => write!(f, "the patched recipe is invalid: {e}"),
            PatchError::Empty => write!(f, "the patch changes nothing in the phase's recipe"),
        }
    }
}

/// Phase `k`'s section with `patch` applied, checked as the campaign would serve it (the whole campaign
/// validated with the patched phase in place, and its proxy run too).
pub fn apply_patch(file: &CampaignFile, k: usize, patch: &str) -> Result<PhaseSection, PatchError> {
    let base = &file.phases[k];
    let table: toml::Table = patch.parse().map_err(|e: toml::de::Error| PatchError::Malformed(e.message().into()))?;
    let mut value = toml::Value::try_from(base).map_err(|e| PatchError::Malformed(e.to_string()))?;
    let phase = value.as_table_mut().expect("a phase serializes to a table");
    for (section, fields) in &table {
        let Some(fields) = fields.as_table() else {
            if ALLOWED.iter().any(|(s, _)| s == section) {
                return Err(PatchError::Malformed(format!("{section} must be a table ([{section}])")));
            }
            return Err(field_error(base, section, None));
        };
        let Some((_, allowed)) = ALLOWED.iter().find(|(s, _)| s == section) else {
            return Err(field_error(base, section, fields.keys().next().map(String::as_str)));
        };
        for (field, v) in fields {
            if !allowed.contains(&field.as_str()) {
                return Err(field_error(base, section, Some(field)));
            }
            let target = phase.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let target = target.as_table_mut().ok_or_else(|| PatchError::Malformed(format!("[{section}]")))?;
            target.insert(field.clone(), v.clone());
        }
    }
    let mut patched: PhaseSection =
        value.try_into().map_err(|e: toml::de::Error| PatchError::OutOfRange(e.message().to_string()))?;
    // Every entry of a call is measured on the same validation windows: `[eval] batches` batches of
    // `batch_size` windows, so a new batch size takes the batch count that keeps their product.
    let windows = base.eval.batches * base.inner.batch_size;
    if patched.inner.batch_size != base.inner.batch_size {
        let batch = patched.inner.batch_size;
        if batch == 0 || !windows.is_multiple_of(batch) {
            return Err(PatchError::OutOfRange(format!(
                "[inner] batch_size = {batch}: every proxy run is measured on the phase's {windows} validation windows \
                 ([eval] batches × batch_size), so the batch size must divide {windows}"
            )));
        }
        patched.eval.batches = windows / batch;
    }
    if &patched == base {
        return Err(PatchError::Empty);
    }
    check_bounds(base, &patched).map_err(|e| PatchError::OutOfRange(format!("{e:#}")))?;
    let mut campaign = file.clone();
    campaign.phases[k] = patched.clone();
    campaign.validate().map_err(|e| PatchError::OutOfRange(format!("{e:#}")))?;
    Ok(patched)
}

/// Bounds on the numeric fields a patch may set, checked before the campaign's own validation (whose
/// round plans cost time and memory in the number of steps): H within [`MAX_STEPS_FACTOR`] of the
/// phase's, in both directions, and a round of one worker at most that factor more tokens than the
/// phase's (so that a proxy run, which ends with the round that reaches its budget, cannot train much
/// past it); every other count and rate within a range no sane recipe leaves.
fn check_bounds(base: &PhaseSection, p: &PhaseSection) -> Result<()> {
    let (i, b) = (&p.inner, &base.inner);
    let f = MAX_STEPS_FACTOR;
    ensure!(
        i.steps >= b.steps.div_ceil(f) && i.steps <= b.steps * f,
        "[inner] steps = {}: a proposal keeps H within {f}× of the phase's {}",
        i.steps,
        b.steps
    );
    let tokens = |x: &crate::run_file::InnerSection| x.steps as u128 * x.batch_size as u128;
    ensure!(
        tokens(i) <= tokens(b) * f as u128,
        "[inner] steps × batch_size = {}: a proposal's round holds at most {f}× the phase's {} windows per worker",
        tokens(i),
        tokens(b)
    );
    ensure!(i.round_lr_power.is_finite() && i.round_lr_power <= 4.0, "[inner] round_lr_power: at most 4");
    ensure!(i.lr.is_finite() && i.lr > 0.0 && i.lr <= 1.0, "[inner] lr: in (0, 1]");
    ensure!(i.min_lr.is_finite() && i.min_lr >= 0.0 && i.min_lr <= i.lr, "[inner] min_lr: in [0, lr]");
    ensure!(i.warmup_steps <= 1_000_000, "[inner] warmup_steps: at most 1,000,000");
    let o = &p.outer;
    ensure!(o.lr.is_finite() && o.lr <= 10.0, "[outer] lr: at most 10");
    ensure!(o.warmup_rounds <= 100_000, "[outer] warmup_rounds: at most 100,000");
    ensure!(o.final_momentum_fraction.is_finite(), "[outer] final_momentum_fraction: a number");
    ensure!(o.full_lr_contributions <= 100_000, "[outer] full_lr_contributions: at most 100,000");
    let c = &p.compression;
    ensure!(
        c.block <= 1 << 20 && c.chunk <= 1 << 20 && c.keep <= 1 << 20 && c.fragments <= 1024,
        "[compression] block, chunk and keep: at most 2^20; fragments: at most 1024"
    );
    ensure!(c.overlap_steps <= i.steps, "[compression] overlap_steps: at most [inner] steps");
    ensure!(c.feedback_decay.is_finite() && c.merge.is_finite(), "[compression] feedback_decay and merge: numbers");
    Ok(())
}

/// `[section] field` outside the allow-list: unknown if no phase has it (the phase does not deserialize
/// with it), else disallowed.
fn field_error(base: &PhaseSection, section: &str, field: Option<&str>) -> PatchError {
    let name = match field {
        Some(f) => format!("[{section}] {f}"),
        None => section.to_string(),
    };
    let mut value = toml::Value::try_from(base).expect("a phase serializes");
    let phase = value.as_table_mut().expect("a table");
    let probe = match field {
        // Any value: a known field fails on its type at worst, an unknown one as unknown.
        Some(f) => {
            let mut t = toml::Table::new();
            t.insert(f.to_string(), toml::Value::Integer(1));
            match phase.get_mut(section).and_then(|s| s.as_table_mut()) {
                Some(existing) => {
                    existing.insert(f.to_string(), toml::Value::Integer(1));
                }
                None => {
                    phase.insert(section.to_string(), toml::Value::Table(t));
                }
            }
            value
        }
        None => {
            phase.insert(section.to_string(), toml::Value::Integer(1));
            value
        }
    };
    match probe.try_into::<PhaseSection>() {
        Err(e) if e.message().contains("unknown field") => PatchError::UnknownField(name),
        _ => PatchError::Disallowed(name),
    }
}

/// Checks a `[phase.research]` section of phase `k` (from 0).
pub fn validate_section(file: &CampaignFile, k: usize, research: &ResearchSection) -> Result<()> {
    ensure!(k > 0, "[phase.research]: the first phase has no phase before it to host a call for proposals");
    ensure!(research.proxy_tokens > 0, "[phase.research] proxy_tokens must be positive");
    ensure!(research.max_proposals >= 1, "[phase.research] max_proposals must be at least 1");
    ensure!(
        research.min_gain.is_finite() && (0.0..1.0).contains(&research.min_gain),
        "[phase.research] min_gain must be in [0, 1), got {}",
        research.min_gain
    );
    ensure!(research.proxy_timeout_secs > 0, "[phase.research] proxy_timeout_secs must be positive");
    // A proxy is a cheaper measurement of the phase; at the phase's own budget the file's entry would also
    // be the phase's very run (the same run id).
    if let (None, Some(tokens)) = (file.phases[k].rounds.count, file.phases[k].rounds.tokens) {
        ensure!(
            research.proxy_tokens < tokens,
            "[phase.research] proxy_tokens = {} must be below the phase's [phase.rounds] tokens = {tokens}",
            research.proxy_tokens
        );
    }
    if let Some(n) = research.retain {
        ensure!(n >= 1, "[phase.research] retain must be at least 1 (leave it out to admit anyone)");
        ensure!(
            file.phases[..k].iter().any(|p| p.research.is_some()),
            "[phase.research] retain: no earlier phase holds a call to retain researchers from"
        );
    }
    // The proxy run: the phase's recipe at the fixed compute.
    file.proxy_run_without_handover(k).validate().map_err(|e| e.context("[phase.research] the proxy run"))?;
    Ok(())
}

/// Who may propose in a call: anyone, or (with `retain`) the researchers the previous call retained.
pub fn check_admission(researcher: &WorkerId, admitted: Option<&[WorkerId]>) -> Result<()> {
    match admitted {
        Some(list) if !list.contains(researcher) => bail!(
            "researcher {} was not retained by the previous call for proposals (this call admits its {} best)",
            researcher.short(),
            list.len()
        ),
        _ => Ok(()),
    }
}

/// One evaluated entry of a call: its id (0 = the file's own recipe), author and proxy result.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub id: u64,
    pub researcher: Option<WorkerId>,
    /// None: its proxy run failed, it ranks last and earns nothing.
    pub val_loss: Option<f64>,
}

/// What a settled call decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    /// Entry ids, best first (lowest validation loss; ties to the lower id, so the file's own recipe wins a
    /// tie and an earlier proposal beats a later copy); failed entries last, by id.
    pub ranking: Vec<u64>,
    /// The entry whose recipe the phase opens with.
    pub adopted: u64,
    /// Credits by entry id (only proposals that beat the file's own recipe earn any).
    pub credits: Vec<(u64, u64)>,
    /// The researchers admitted to the next call, best first.
    pub retained: Vec<WorkerId>,
}

/// Ranks a call's entries (entry 0, the file's own recipe, must be among them), adopts the best, splits
/// `reward` among the proposals that beat entry 0 pro rata to their gain, and retains the best `retain`
/// researchers whose proxy runs completed (all of them without `retain`).
pub fn settle(entries: &[Evaluated], reward: u64, min_gain: f64, retain: Option<usize>) -> Result<Settlement> {
    let Some(baseline) = entries.iter().find(|e| e.id == 0) else { bail!("a call's entries include entry 0") };
    ensure!(
        entries.iter().all(|e| e.val_loss.is_none_or(f64::is_finite)),
        "a non-finite loss is a failure, not a result"
    );
    // What a proposal must reach to count as better than the phase's own recipe.
    let bar = baseline.val_loss.map(|b| b - min_gain * b.abs());
    let mut ranking: Vec<&Evaluated> = entries.iter().collect();
    ranking.sort_by(|a, b| match (a.val_loss, b.val_loss) {
        (Some(x), Some(y)) => x.total_cmp(&y).then(a.id.cmp(&b.id)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.id.cmp(&b.id),
    });
    let best = ranking.iter().find(|e| e.val_loss.is_some());
    let adopted = match (best, bar) {
        // The best proposal, if it clears the bar; else the phase's own recipe.
        (Some(e), Some(bar)) if e.val_loss.is_some_and(|v| v <= bar) => e.id,
        (Some(_), Some(_)) => 0,
        // The phase's own recipe failed: the best completed entry.
        (Some(e), None) => e.id,
        (None, _) => 0,
    };
    let gains: Vec<(u64, f64)> = entries
        .iter()
        .filter(|e| e.id != 0)
        .map(|e| match (e.val_loss, baseline.val_loss, bar) {
            (Some(v), Some(b), Some(bar)) if v <= bar => (e.id, b - v),
            _ => (e.id, 0.0),
        })
        .collect();
    let shares = agora_ledger::split_pro_rata(reward, &gains.iter().map(|g| g.1).collect::<Vec<_>>());
    let credits = gains.iter().zip(shares).map(|(g, s)| (g.0, s)).collect();
    let retained = ranking
        .iter()
        .filter(|e| e.val_loss.is_some())
        .filter_map(|e| e.researcher)
        .take(retain.unwrap_or(usize::MAX))
        .collect();
    Ok(Settlement { ranking: ranking.iter().map(|e| e.id).collect(), adopted, credits, retained })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::file::tests::write;

    const CAMPAIGN: &str = r#"
name = "research"
[data]
files = ["corpus.txt"]
vocab_size = 300

[[phase]]
name = "small"
[phase.model]
preset = "tiny"
[phase.inner]
steps = 6
[phase.rounds]
count = 3
min_workers = 2

[[phase]]
name = "deeper"
retain = 3
[phase.growth]
method = "depth"
[phase.model]
config = "deeper.json"
[phase.inner]
steps = 6
[phase.rounds]
tokens = 10000
min_workers = 2
[phase.research]
proxy_tokens = 2000
reward = 1000
"#;

    fn campaign() -> (tempfile::TempDir, CampaignFile) {
        let dir = tempfile::tempdir().unwrap();
        let file = CampaignFile::load(&write(dir.path(), CAMPAIGN)).unwrap();
        (dir, file)
    }

    #[test]
    fn a_patch_changes_only_allowed_fields() {
        let (_dir, file) = campaign();
        let patched = apply_patch(&file, 1, "[outer]\nlr = 0.8\nmomentum = 0.7\n[inner]\nlr = 2e-3\n").unwrap();
        assert_eq!((patched.outer.lr, patched.outer.momentum, patched.inner.lr), (0.8, 0.7, 2e-3));
        assert_eq!(patched.inner.steps, 6, "fields the patch leaves out keep the phase's values");
        assert_eq!(patched.rounds, file.phases[1].rounds);
        let grown = apply_patch(&file, 1, "[growth]\nouter_momentum = \"carry\"\n").unwrap();
        assert_eq!(grown.growth.outer_momentum, "carry");
        let codec = apply_patch(&file, 1, "[compression]\ncodec = \"int8\"\n").unwrap();
        assert_ne!(codec.compression, file.phases[1].compression);
        // A new batch size is measured on the same validation windows.
        let base = &file.phases[1];
        let batch = apply_patch(&file, 1, &format!("[inner]\nbatch_size = {}\n", base.inner.batch_size * 2)).unwrap();
        assert_eq!(batch.eval.batches * batch.inner.batch_size, base.eval.batches * base.inner.batch_size);
    }

    /// Every refusal of a patch, each with its code: the research track's input is anyone's TOML.
    #[test]
    fn bad_patches_are_refused_with_a_reason() {
        let (_dir, file) = campaign();
        let cases: &[(&str, &str)] = &[
            ("this is not toml = = ", "malformed_patch"),
            ("lr = 0.5\n", "unknown_field"),
            ("[outer]\nlearning_rate = 0.5\n", "unknown_field"),
            ("[surprise]\nx = 1\n", "unknown_field"),
            ("[rounds]\ntokens = 99999999\n", "disallowed_field"),
            ("[trust]\nverify = false\n", "disallowed_field"),
            ("[inner]\nseq_len = 8\n", "disallowed_field"),
            ("[growth]\nseed = 4\n", "disallowed_field"),
            ("[model]\npreset = \"small\"\n", "disallowed_field"),
            ("[research]\nreward = 10\n", "disallowed_field"),
            ("retain = 1\n", "disallowed_field"),
            ("[outer]\nlr = \"fast\"\n", "out_of_range"),
            ("[outer]\nlr = -1.0\n", "out_of_range"),
            ("[outer]\nmomentum = 1.5\n", "out_of_range"),
            ("[inner]\nbatch_size = 0\n", "out_of_range"),
            ("[inner]\nbatch_size = 7\n", "out_of_range"),
            ("[growth]\nmethod = \"width\"\n", "out_of_range"),
            ("[growth]\nmethod = \"sideways\"\n", "out_of_range"),
            ("[inner]\nsteps = 1000000000000000\n", "out_of_range"),
            ("[inner]\nsteps = 1\n", "out_of_range"),
            ("[inner]\nsteps = 24\nbatch_size = 32\n", "out_of_range"),
            ("[inner]\nlr = 5.0\n", "out_of_range"),
            ("[inner]\nround_lr_power = 50.0\n", "out_of_range"),
            ("[compression]\nfragments = 100000\n", "out_of_range"),
            ("inner = 5\n", "malformed_patch"),
            ("", "empty_patch"),
            ("[outer]\n", "empty_patch"),
        ];
        for (patch, code) in cases {
            let err = apply_patch(&file, 1, patch).unwrap_err();
            assert_eq!(err.code(), *code, "{patch:?}: {err}");
        }
        // The messages say what may be changed.
        let err = apply_patch(&file, 1, "[trust]\nverify = false\n").unwrap_err().to_string();
        assert!(err.contains("[trust] verify") && err.contains("[outer] kind, lr"), "{err}");
    }

    #[test]
    fn a_call_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (CAMPAIGN.replace("proxy_tokens = 2000", "proxy_tokens = 0"), "proxy_tokens must be positive"),
            (CAMPAIGN.replace("reward = 1000", "reward = 1000\nmax_proposals = 0"), "max_proposals"),
            (CAMPAIGN.replace("proxy_tokens = 2000", "proxy_tokens = 10000"), "must be below the phase's"),
            (CAMPAIGN.replace("reward = 1000", "reward = 1000\nmin_gain = 1.5"), "min_gain must be in"),
            (CAMPAIGN.replace("reward = 1000", "reward = 1000\nproxy_timeout_secs = 0"), "proxy_timeout_secs"),
            (CAMPAIGN.replace("reward = 1000", "reward = 1000\nretain = 0"), "retain must be at least 1"),
            (CAMPAIGN.replace("reward = 1000", "reward = 1000\nretain = 2"), "no earlier phase holds a call"),
            (
                CAMPAIGN.replace(
                    "[phase.rounds]\ncount = 3",
                    "[phase.research]\nproxy_tokens = 5\n[phase.rounds]\ncount = 3",
                ),
                "the first phase has no phase before it",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", CampaignFile::load(&write(dir.path(), &text)).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    #[test]
    fn only_retained_researchers_may_propose() {
        let (a, b) = (WorkerId([1; 32]), WorkerId([2; 32]));
        check_admission(&a, None).unwrap();
        check_admission(&a, Some(&[a])).unwrap();
        let err = check_admission(&b, Some(&[a])).unwrap_err().to_string();
        assert!(err.contains("not retained"), "{err}");
        assert!(check_admission(&b, Some(&[])).is_err(), "a call that retained nobody admits nobody");
    }

    fn entry(id: u64, researcher: u8, val_loss: Option<f64>) -> Evaluated {
        Evaluated { id, researcher: (id > 0).then_some(WorkerId([researcher; 32])), val_loss }
    }

    #[test]
    fn the_best_proxy_is_adopted_and_only_gains_over_the_baseline_are_paid() {
        let entries = [
            entry(0, 0, Some(3.0)),
            entry(1, 1, Some(2.9)), // gain 0.1
            entry(2, 2, Some(3.2)), // worse than the baseline: nothing
            entry(3, 3, Some(2.7)), // gain 0.3: the best
            entry(4, 4, None),      // its proxy failed
        ];
        let s = settle(&entries, 1000, 0.0, Some(2)).unwrap();
        assert_eq!(s.ranking, vec![3, 1, 0, 2, 4]);
        assert_eq!(s.adopted, 3);
        assert_eq!(s.credits, vec![(1, 250), (2, 0), (3, 750), (4, 0)]);
        assert_eq!(s.retained, vec![WorkerId([3; 32]), WorkerId([1; 32])]);
        // Without retain every researcher whose proxy completed is retained; a failed one is not.
        let all = settle(&entries, 1000, 0.0, None).unwrap();
        assert_eq!(all.retained.len(), 3);
        assert!(!all.retained.contains(&WorkerId([4; 32])));
    }

    #[test]
    fn the_file_recipe_wins_ties_and_a_copy_earns_nothing_more() {
        // A proposal equal to the baseline's loss earns nothing and is not adopted.
        let s = settle(&[entry(0, 0, Some(3.0)), entry(1, 1, Some(3.0))], 1000, 0.0, None).unwrap();
        assert_eq!((s.adopted, s.credits.clone()), (0, vec![(1, 0)]));
        // Two proposals with the same result: the earlier is ranked and adopted first.
        let s =
            settle(&[entry(0, 0, Some(3.0)), entry(1, 1, Some(2.0)), entry(2, 2, Some(2.0))], 1001, 0.0, None).unwrap();
        assert_eq!((s.adopted, s.ranking[0]), (1, 1));
        assert_eq!(s.credits, vec![(1, 501), (2, 500)], "nothing created or lost");
        // The baseline's own proxy failed: the best completed proposal is adopted, and nothing is paid
        // (no gain can be measured).
        let s = settle(&[entry(0, 0, None), entry(1, 1, Some(2.0))], 1000, 0.0, None).unwrap();
        assert_eq!((s.adopted, s.credits.clone()), (1, vec![(1, 0)]));
        // Everything failed: the file's own recipe.
        let s = settle(&[entry(0, 0, None), entry(1, 1, None)], 1000, 0.0, None).unwrap();
        assert_eq!(s.adopted, 0);
        assert!(settle(&[entry(1, 1, Some(2.0))], 10, 0.0, None).is_err());
        assert!(
            settle(&[entry(0, 0, Some(3.0)), entry(1, 1, Some(f64::NAN))], 10, 0.0, None).is_err(),
            "NaN is a failure"
        );
    }

    /// A gain within `min_gain` of the phase's own recipe (noise, or a patch that changes nothing that
    /// matters) is neither adopted nor paid; one past it is both.
    #[test]
    fn a_gain_below_min_gain_earns_nothing() {
        let entries = [entry(0, 0, Some(3.0)), entry(1, 1, Some(2.999)), entry(2, 2, Some(2.98))];
        let s = settle(&entries, 1000, 0.002, None).unwrap();
        assert_eq!(s.adopted, 2, "2.98 clears 3.0 − 0.2% = 2.994");
        assert_eq!(s.credits, vec![(1, 0), (2, 1000)]);
        let s = settle(&entries[..2], 1000, 0.002, None).unwrap();
        assert_eq!((s.adopted, s.credits.clone()), (0, vec![(1, 0)]), "2.999 is within the noise bar");
        assert_eq!(s.ranking, vec![1, 0], "it still ranks first");
    }
}
