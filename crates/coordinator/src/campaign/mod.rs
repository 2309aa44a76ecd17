//! Campaigns: the phases of a campaign file served one after another at one URL.
//!
//! Each phase is an ordinary run with its own store (receipts, round roots, ledger) and coordinator; the
//! campaign serves the current phase's API at its root and `GET /v1/campaign` beside it. When a phase
//! finishes, its final global weights (and, if asked, its outer momentum) are grown to the next phase's
//! model, and the next phase opens from them with `cohort` admission from the finished phase's
//! reputations. Workers that were in the finished phase see `Finished`, read `/v1/campaign` and follow.
//!
//! Durable by construction, with nothing but the phases' own stores and the grown directories:
//! - a phase's store is created in one transaction (`Coordinator::open_with`), and is finished or not;
//! - a grown checkpoint is written to `NAME.partial`, fsynced, and renamed into place, so it is whole or
//!   absent, and growth is a deterministic function of the finished phase's weights and the campaign
//!   file, so growing again after a crash gives the same bytes (the next phase's run id hashes them);
//! - on start the campaign walks the phases in order: finished ones are passed, a missing grown
//!   checkpoint is grown, and the first unfinished phase is served.

mod calls;
pub mod file;
pub mod research;

pub use file::{phase_database, proxy_database, CampaignFile, Handover, PhaseSection, MOMENTUM_FILE};

use crate::state::{Coordinator, Options};
use agora_diloco::tensors::{from_named, param_specs};
use agora_model::grow::{grow, grow_companion, plan, Weights};
use agora_model::LlamaConfig;
use agora_protocol::{decode_tensors, CampaignInfo, CampaignPhase, CampaignState};
use anyhow::{Context, Result};
use axum::Router;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tch::{Device, Tensor};

mod http;
pub use http::router;

/// Where a campaign keeps its state.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    pub campaign_file: PathBuf,
    /// Each phase's coordinator directory (`phase-K`), the grown checkpoints (`grown/phase-K`) and, unless
    /// given elsewhere, the blobs (shared by every phase: content-addressed) and SQLite databases.
    pub dir: PathBuf,
    /// A database URL for the whole campaign: phase k uses [`phase_database`] of it. Default: SQLite in
    /// each phase's directory.
    pub database: Option<String>,
    pub blobs: Option<String>,
}

pub struct Campaign {
    pub file: CampaignFile,
    options: CampaignOptions,
    /// The phases opened so far (index = phase) and their routers: the one served (the last), and the
    /// earlier ones' summaries and public reads at `/v1/campaign/phases/K/...`.
    opened: RwLock<Vec<(Arc<Coordinator>, Router)>>,
    /// The summaries of the phases before the served one: they are finished, so each is read from its
    /// store once, not on every `GET /v1/campaign`.
    past: tokio::sync::Mutex<Vec<CampaignPhase>>,
    /// The proxy run of a call for proposals being served instead of a phase (until the phase it measures
    /// for opens) ...
    proxy: RwLock<Option<(Arc<Coordinator>, Router)>>,
    /// ... and every proxy run opened since this process started, for requests that name one.
    proxies: RwLock<Vec<(Arc<Coordinator>, Router)>>,
    /// Serialises the checks and insert of a proposal with the closing of its call.
    research_lock: tokio::sync::Mutex<()>,
}

impl Campaign {
    /// Loads the campaign file, opens its first phase (creating its store on first start) and moves past
    /// every phase that has already finished (growing what a killed campaign left ungrown), so that the
    /// phase served from the first request on is the one in progress. Call [`Campaign::drive`] to go on.
    pub async fn open(mut options: CampaignOptions) -> Result<Arc<Campaign>> {
        let file = CampaignFile::load(&options.campaign_file)?;
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("{}: cannot create the campaign directory", options.dir.display()))?;
        // Absolute, so that the paths derived from it (and hashed into later phases' run ids) do not depend
        // on how the directory was named on the command line.
        options.dir = std::fs::canonicalize(&options.dir)?;
        for k in 0..file.phases.len() {
            phase_database_url(&options, k)?;
        }
        let app = open_phase(&file, &options, 0, &file.phases[0], None).await?;
        let router = crate::http::router(app.clone());
        let opened = RwLock::new(vec![(app, router)]);
        let campaign = Campaign {
            file,
            options,
            opened,
            past: tokio::sync::Mutex::new(Vec::new()),
            proxy: RwLock::new(None),
            proxies: RwLock::new(Vec::new()),
            research_lock: tokio::sync::Mutex::new(()),
        };
        // Past every finished phase, up to one whose successor's call for proposals is still to be run
        // (`drive` runs it: it needs the workers).
        while campaign.current().finished.load(Ordering::SeqCst) {
            let next = campaign.serving().0 + 1;
            if next == campaign.file.phases.len() || campaign.call_pending(next).await? {
                break;
            }
            campaign.advance().await?;
        }
        campaign.reopen_measured_proxies().await?;
        tracing::info!(
            campaign = campaign.file.name,
            phases = campaign.file.phases.len(),
            serving = campaign.serving().0 + 1,
            "campaign opened"
        );
        Ok(Arc::new(campaign))
    }

    /// The served phase is finished (and the next phase's call, if any, settled): grows it into the next
    /// phase, with the adopted recipe, and serves that one.
    async fn advance(&self) -> Result<()> {
        let (phase, app) = self.serving();
        let next = phase + 1;
        let section = self.adopted_section(next).await?;
        let handover = self.handover(next, &app, &section.growth).await?;
        let opened = open_phase(&self.file, &self.options, next, &section, Some(&handover)).await?;
        tracing::info!(phase = next + 1, run = opened.run_id, "phase opened");
        let router = crate::http::router(opened.clone());
        self.opened.write().expect("campaign lock").push((opened, router));
        // The last proxy run stays served until now, so that its workers see a new run id only once the
        // phase is there to join.
        *self.proxy.write().expect("campaign lock") = None;
        Ok(())
    }

    /// Where the campaign's blobs are (shared by every phase and proxy run: content-addressed).
    fn blobs_location(&self) -> String {
        self.options.blobs.clone().unwrap_or_else(|| self.options.dir.join("blobs").display().to_string())
    }

    /// The coordinator of the phase being served.
    pub fn current(&self) -> Arc<Coordinator> {
        self.serving().1
    }

    /// The phase being served (the last one opened, from 0) and its coordinator.
    fn serving(&self) -> (usize, Arc<Coordinator>) {
        let opened = self.opened.read().expect("campaign lock");
        let (app, _) = opened.last().expect("the first phase is opened with the campaign");
        (opened.len() - 1, app.clone())
    }

    /// The router of phase `k` (from 0), once it has been opened.
    pub(crate) fn phase_router(&self, k: usize) -> Option<Router> {
        self.opened.read().expect("campaign lock").get(k).map(|(_, router)| router.clone())
    }

    /// Serves phase after phase: waits for the served phase to finish, grows its weights into the next
    /// phase's model, opens that phase and serves it; returns once the last phase has finished.
    pub async fn drive(self: Arc<Self>) -> Result<()> {
        loop {
            until_finished(&self.current(), None).await;
            let next = self.serving().0 + 1;
            if next == self.file.phases.len() {
                tracing::info!(campaign = self.file.name, "the campaign's last phase is finished");
                return Ok(());
            }
            if self.call_pending(next).await? {
                self.run_call(next).await?;
            }
            self.advance().await?;
        }
    }

    /// The router for a request that names `run` (its `x-agora-run` header): that phase's or proxy run's,
    /// if the campaign has opened it, so that a worker still settling a finished run (its last upload,
    /// receipt or `Finished`) talks to that run; otherwise the served run's. None when `run` is unknown
    /// while the campaign is between runs (a restarted campaign reopens a proxy run only when it resumes
    /// the call): the caller is told to retry rather than that its run is not this coordinator's.
    pub(crate) fn router_for(&self, run: Option<&str>) -> Option<Router> {
        if let Some(run) = run {
            let opened = self.opened.read().expect("campaign lock");
            let proxies = self.proxies.read().expect("campaign lock");
            if let Some((_, router)) = opened.iter().chain(proxies.iter()).find(|(app, _)| app.run_id == run) {
                return Some(router.clone());
            }
            if self.proxy.read().expect("campaign lock").is_none()
                && self.current().finished.load(Ordering::SeqCst)
                && self.serving().0 + 1 < self.file.phases.len()
            {
                return None;
            }
        }
        if let Some((_, router)) = self.proxy.read().expect("campaign lock").as_ref() {
            return Some(router.clone());
        }
        Some(self.opened.read().expect("campaign lock").last().expect("the first phase is opened").1.clone())
    }

    /// The coordinator whose periodic duties run: the proxy run being served, else the served phase.
    pub fn served(&self) -> Arc<Coordinator> {
        match self.proxy.read().expect("campaign lock").as_ref() {
            Some((proxy, _)) => proxy.clone(),
            None => self.current(),
        }
    }

    /// What phase `next` takes from the finished phase `app`: its store and run id, and its final
    /// weights grown to `next`'s model (grown now unless a previous start already wrote them).
    /// `growth` is the file's own for the phase, or a proposal's (grown into a directory of its own).
    async fn handover(&self, next: usize, app: &Arc<Coordinator>, growth: &file::GrowthSection) -> Result<Handover> {
        let name = if growth == &self.file.phases[next].growth {
            format!("phase-{}", next + 1)
        } else {
            let settings = serde_json::to_vec(growth)?;
            format!("phase-{}-{}", next + 1, &agora_protocol::hash_bytes(&settings).hex()[..12])
        };
        let grown = self.options.dir.join("grown").join(name);
        let (global, momentum) = {
            let live = app.live.lock().await;
            (live.global_hash, live.momentum_hash)
        };
        let carried = momentum.filter(|_| growth.carries_momentum().unwrap_or(false));
        let mut to = self.file.target_config(next, app.model_config.vocab_size)?;
        (to.bos_token_id, to.eos_token_id) = (app.model_config.bos_token_id, app.model_config.eos_token_id.clone());
        let record = growth_record(&app.run_id, &global, carried.as_ref(), &to, growth)?;
        if grown.is_dir() {
            check_growth_record(&grown, &record)?;
        } else {
            let weights = app.blobs.get(&global).await.context("the finished phase's final weights")?;
            let momentum = match carried {
                Some(hash) => Some(app.blobs.get(&hash).await.context("the finished phase's outer momentum")?),
                None => None,
            };
            let tokenizer = app.blobs.get(&app.info.tokenizer_hash).await.context("the campaign's tokenizer")?;
            let (from, growth, out) = (app.model_config.clone(), growth.clone(), grown.clone());
            tracing::info!(phase = next + 1, "growing the finished phase's weights into the next phase's model");
            tokio::task::spawn_blocking(move || {
                let job = GrowthJob { from: &from, to: &to, growth: &growth, record: &record };
                write_grown(&job, &weights, momentum.as_deref(), &tokenizer, &out)
            })
            .await??;
        }
        Ok(Handover {
            previous_database: phase_database_url(&self.options, next - 1)?,
            previous_run: app.run_id.clone(),
            grown,
        })
    }

    /// Phase k's summary, and whether its store answered: from the store once it has been opened (`app`).
    async fn summary(&self, k: usize, app: Option<&Arc<Coordinator>>, finished: bool) -> (CampaignPhase, bool) {
        let p = &self.file.phases[k];
        let mut phase = CampaignPhase {
            name: p.name.clone(),
            run_id: None,
            retain: p.retain,
            finished,
            parameters: None,
            rounds: 0,
            tokens_trained: 0,
            initial_val_loss: None,
            val_loss: None,
            workers: Vec::new(),
        };
        let mut read = false;
        if let Some(app) = app {
            phase.run_id = Some(app.run_id.clone());
            phase.parameters = Some(app.model_config.num_parameters());
            if let Ok(status) = app.status().await {
                phase.rounds = status.history.len().saturating_sub(1) as u64;
                phase.tokens_trained = status.tokens_trained;
                phase.initial_val_loss = status.history.first().and_then(|h| h.val_loss);
                phase.val_loss = status.history.iter().rev().find_map(|h| h.val_loss);
                phase.workers = status.workers.iter().map(|w| w.name.clone()).collect();
                read = true;
            }
        }
        (phase, read)
    }

    /// `GET /v1/campaign`.
    pub async fn info(&self) -> CampaignInfo {
        let (mut current, app) = self.serving();
        let opened = self.opened.read().expect("campaign lock").clone();
        let last = current + 1 == self.file.phases.len();
        let finished = app.finished.load(Ordering::SeqCst);
        let state = match (finished, last) {
            (false, _) => CampaignState::Running,
            (true, true) => CampaignState::Finished,
            // The served phase is finished and the next is being grown and opened.
            (true, false) => CampaignState::Growing,
        };
        let mut phases = {
            let mut past = self.past.lock().await;
            while past.len() < current {
                let (phase, read) = self.summary(past.len(), opened.get(past.len()).map(|o| &o.0), true).await;
                if !read {
                    break; // asked again next time
                }
                past.push(phase);
            }
            past.clone()
        };
        for k in phases.len()..self.file.phases.len() {
            let finished = k < current || (k == current && finished);
            phases.push(self.summary(k, opened.get(k).map(|o| &o.0), finished).await.0);
        }
        let mut run_id = app.run_id.clone();
        let mut state = state;
        if let Some((proxy, _)) = self.proxy.read().expect("campaign lock").as_ref() {
            // A proxy run of the next phase's call is what the workers train now.
            (current, state, run_id) = (current + 1, CampaignState::Research, proxy.run_id.clone());
        }
        CampaignInfo { name: self.file.name.clone(), phases, current, state, run_id, coordinator_key: app.key.id() }
    }
}

/// Waits until `app`'s run has finished, or `deadline` has passed: whether it finished.
async fn until_finished(app: &Coordinator, deadline: Option<tokio::time::Instant>) -> bool {
    let mut changes = app.subscribe();
    while !app.finished.load(Ordering::SeqCst) {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return false;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
    }
    true
}

/// Phase k's database URL as [`Options`] will use it (needed by the next phase's admission).
fn phase_database_url(options: &CampaignOptions, k: usize) -> Result<String> {
    Ok(match &options.database {
        Some(base) => phase_database(base, k)?,
        None => format!("sqlite://{}?mode=rwc", phase_dir(options, k).join("coordinator.db").display()),
    })
}

fn phase_dir(options: &CampaignOptions, k: usize) -> PathBuf {
    options.dir.join(format!("phase-{}", k + 1))
}

async fn open_phase(
    file: &CampaignFile,
    options: &CampaignOptions,
    k: usize,
    section: &PhaseSection,
    handover: Option<&Handover>,
) -> Result<Arc<Coordinator>> {
    let run = file.phase_run_with(k, section, handover)?;
    let phase = Options {
        run_file: options.campaign_file.clone(),
        dir: phase_dir(options, k),
        database: Some(phase_database_url(options, k)?),
        blobs: Some(options.blobs.clone().unwrap_or_else(|| options.dir.join("blobs").display().to_string())),
        // One signing key for every phase (workers hold later phases to the key of the first).
        key: Some(options.dir.join("coordinator.key")),
    };
    Coordinator::open_with(run, &phase).await.with_context(|| format!("phase {} ({:?})", k + 1, file.phases[k].name))
}

/// One growth between phases: from which config to which, with which settings, and its record.
struct GrowthJob<'a> {
    from: &'a LlamaConfig,
    to: &'a LlamaConfig,
    growth: &'a file::GrowthSection,
    record: &'a serde_json::Value,
}

/// Grows a finished phase's final weights (a payload of `from`'s parameters) to `to` and writes the
/// result as a Hugging Face directory at `out`, with the campaign's tokenizer and, when given, the outer
/// momentum grown alongside ([`MOMENTUM_FILE`]). Written beside `out`, its record ([`GROWTH_RECORD`])
/// last, everything fsynced, and renamed into place.
fn write_grown(job: &GrowthJob, weights: &[u8], momentum: Option<&[u8]>, tokenizer: &[u8], out: &Path) -> Result<()> {
    let GrowthJob { from, to, growth, record } = *job;
    let options = growth.options()?;
    let steps = plan(from, to, &options)?;
    growth.method()?.check(&steps)?;
    let partial = out.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("{}: cannot remove an unfinished growth", partial.display()))?;
    }
    let source = decode_weights(from, weights).context("the finished phase's final weights")?;
    let grown = grow(&source, to, &options)?;
    agora_model::save_pretrained(&grown.into_model(Device::Cpu)?, &partial)?;
    std::fs::write(partial.join("tokenizer.json"), tokenizer)
        .with_context(|| format!("{}: cannot write the tokenizer", partial.display()))?;
    if let Some(bytes) = momentum {
        let source = decode_weights(from, bytes).context("the finished phase's outer momentum")?;
        let carried = grow_companion(&source, to, &options)?;
        let named: Vec<(String, Tensor)> = carried.tensors.into_iter().collect();
        Tensor::write_safetensors(&named, partial.join(MOMENTUM_FILE))
            .map_err(|e| anyhow::anyhow!("{}: cannot write the outer momentum: {e}", partial.display()))?;
    }
    let mut report = record.clone();
    report["parameters_before"] = from.num_parameters().into();
    report["parameters_after"] = to.num_parameters().into();
    report["steps"] = steps.iter().map(|s| s.to_string()).collect::<Vec<_>>().into();
    report["exact"] = steps.iter().all(|s| s.is_exact()).into();
    for entry in std::fs::read_dir(&partial)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    // The record last: a directory that has it is whole.
    agora_model::checkpoint::write_json(&partial.join(GROWTH_RECORD), &report)?;
    std::fs::File::open(partial.join(GROWTH_RECORD))?.sync_all()?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("{}: cannot move the grown checkpoint into place", out.display()))?;
    if let Some(parent) = out.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    tracing::info!(out = %out.display(), before = from.num_parameters(), after = to.num_parameters(), "grown");
    Ok(())
}

/// The file in a grown directory that records what it was grown from and to.
pub const GROWTH_RECORD: &str = "growth.json";

/// What a grown directory must have been grown from and to: the finished phase's run and final weights
/// (and carried momentum), the target config and the growth settings. Reusing a directory whose record
/// differs (the campaign file was edited after growth) is refused rather than silently trained.
fn growth_record(
    from_run: &str,
    global: &agora_protocol::Hash32,
    momentum: Option<&agora_protocol::Hash32>,
    to: &LlamaConfig,
    growth: &file::GrowthSection,
) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "from_run": from_run,
        "from_weights": global.hex(),
        "outer_momentum": momentum.map(|m| m.hex()),
        "target": to.to_hf_json(),
        "growth": serde_json::to_value(growth)?,
    }))
}

fn check_growth_record(dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = dir.join(GROWTH_RECORD);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let stored: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    for key in ["from_run", "from_weights", "outer_momentum", "target", "growth"] {
        if stored[key] != record[key] {
            anyhow::bail!(
                "{}: was grown with another {key} than the campaign file now asks for (was the file edited after \
                 this phase was grown?): restore the file, or remove the directory to grow again if the phase \
                 it feeds has not opened",
                dir.display()
            );
        }
    }
    Ok(())
}

/// A payload of every parameter of `config` (global weights or outer momentum) as [`Weights`].
fn decode_weights(config: &LlamaConfig, bytes: &[u8]) -> Result<Weights> {
    let specs = param_specs(config);
    let (named, _) = decode_tensors(bytes, Some(&specs))?;
    let tensors = from_named(&named, Device::Cpu);
    let by_name: BTreeMap<String, Tensor> = specs.iter().map(|s| s.name.clone()).zip(tensors).collect();
    Weights::new(config.clone(), by_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_diloco::tensors::{model_weights, to_named};
    use agora_protocol::encode_tensors;

    /// Growing again after a crash gives the same bytes (the next phase's run id hashes them), a
    /// half-written `.partial` is replaced, and a carried momentum is written in the grown shapes.
    #[test]
    fn growth_between_phases_is_deterministic_and_replaces_a_partial_one() {
        let from = agora_model::preset("tiny", Some(300)).unwrap();
        let mut to = from.clone();
        to.num_hidden_layers = 6;
        let specs = param_specs(&from);
        let model = agora_model::Llama::new(&from, Device::Cpu, 5);
        let weights = encode_tensors(&to_named(&specs, &model_weights(&model)), &BTreeMap::new());
        let momentum = encode_tensors(
            &to_named(&specs, &model_weights(&agora_model::Llama::new(&from, Device::Cpu, 6))),
            &BTreeMap::new(),
        );
        let growth = file::GrowthSection { method: "depth".into(), ..Default::default() };
        let hash = agora_protocol::hash_bytes(&weights);
        let record = growth_record("run1", &hash, None, &to, &growth).unwrap();
        let job = GrowthJob { from: &from, to: &to, growth: &growth, record: &record };
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_grown(&job, &weights, Some(&momentum), b"{}", &a).unwrap();
        std::fs::create_dir_all(b.with_extension("partial")).unwrap();
        std::fs::write(b.with_extension("partial").join("model.safetensors"), b"torn").unwrap();
        write_grown(&job, &weights, Some(&momentum), b"{}", &b).unwrap();
        assert!(!b.with_extension("partial").exists());
        check_growth_record(&b, &record).unwrap();
        // The campaign file edited after growth: another target, other settings or other source weights.
        let mut wider = to.clone();
        wider.intermediate_size = 512;
        let split = file::GrowthSection { ffn: "split".into(), ..growth.clone() };
        for (other, what) in [
            (growth_record("run1", &hash, None, &wider, &growth).unwrap(), "target"),
            (growth_record("run1", &hash, None, &to, &split).unwrap(), "growth"),
            (growth_record("run1", &agora_protocol::hash_bytes(b"x"), None, &to, &growth).unwrap(), "from_weights"),
        ] {
            let err = format!("{:#}", check_growth_record(&b, &other).unwrap_err());
            assert!(err.contains(&format!("another {what}")), "{err}");
        }
        for file in ["model.safetensors", "config.json", MOMENTUM_FILE, "tokenizer.json"] {
            assert_eq!(std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap(), "{file} differs");
        }
        let grown = agora_model::load_pretrained(&b, Device::Cpu).unwrap();
        assert_eq!(grown.config.num_hidden_layers, 6);
        let carried: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(b.join(MOMENTUM_FILE)).unwrap().into_iter().collect();
        assert_eq!(carried.len(), param_specs(&to).len(), "a momentum tensor for every grown parameter");
        // New blocks start with zero momentum; carried blocks keep theirs.
        let new_block = carried
            .keys()
            .filter(|n| n.starts_with("model.layers."))
            .map(|n| carried[n].abs().sum(tch::Kind::Float).double_value(&[]));
        assert!(new_block.clone().any(|s| s == 0.0) && new_block.clone().any(|s| s > 0.0));
    }
}
