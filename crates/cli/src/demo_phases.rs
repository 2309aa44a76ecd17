//! `agora demo --phases N`: a tiny campaign on loopback. `agora campaign` serves N phases of a miniature
//! ladder (tiny, then twice as deep, then wider), each grown exactly from the last and admitting only the
//! best of the one before; worker processes follow it from phase to phase. The second phase's recipe is
//! chosen by a call for proposals: three researchers propose patches while the first phase trains, each
//! (and the file's own recipe) trains as a proxy run on the workers, and the best is adopted. Prints a
//! summary per phase and the call's board.

use crate::children::Children;
use crate::demo::DemoArgs;
use crate::net::{fetch_json, spawn_campaign};
use agora_data::MarkovSource;
use agora_model::{preset, LlamaConfig};
use agora_protocol::{CampaignInfo, CampaignState, ProposalBoard};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::time::{Duration, Instant};

/// The miniature ladder: (name, layers, hidden, heads, kv heads, FFN units, growth method from the last).
const LADDER: [(&str, usize, usize, usize, usize, usize, &str); 3] =
    [("seed", 4, 128, 4, 2, 384, ""), ("deeper", 6, 128, 4, 2, 384, "depth"), ("wider", 6, 192, 6, 3, 576, "width")];

#[derive(Serialize)]
struct PhaseSummary {
    name: String,
    parameters: u64,
    grown_by: Vec<String>,
    workers: Vec<String>,
    /// The campaign file's `retain`: how many of the previous phase's best identities it admits at most
    /// (None for the first phase).
    retained: Option<usize>,
    rounds: u64,
    tokens_trained: u64,
    initial_val_loss: f64,
    final_val_loss: f64,
    /// The recipe trained with and who proposed it.
    recipe: String,
}

/// The demo's three researchers and their patches to phase 2's recipe.
const PROPOSALS: [(&str, &str); 3] = [
    ("ada", "[outer]\nlr = 0.8\nmomentum = 0.5\n"),
    ("grace", "[inner]\nlr = 5e-3\n"),
    ("barbara", "[outer]\nwarmup_rounds = 1\nfinal_momentum_fraction = 1.5\n"),
];

/// Phase `phase`'s recipe and who proposed it (`board`'s settled call for it, if it held one).
fn adopted_recipe(board: &ProposalBoard, phase: usize) -> String {
    let Some(call) = board.calls.iter().find(|c| c.phase == phase) else { return "the campaign file's".into() };
    match call.entries.iter().find(|e| e.adopted) {
        Some(e) if e.id > 0 => format!(
            "proposal {} by {} ({}): {}",
            e.id,
            e.name,
            e.researcher.map(|r| r.short()).unwrap_or_default(),
            e.patch.trim().replace('\n', "; ")
        ),
        Some(_) => "the campaign file's (it beat every proposal in the call)".into(),
        None => "the campaign file's (the call was not settled)".into(),
    }
}

/// How many of the previous phase's identities phase k (from 1) retains when `workers` started: two
/// thirds of them, then one fewer each phase (6 workers: 4, then 3), never fewer than 2.
fn retained(workers: usize, k: usize) -> usize {
    ((2 * workers).div_ceil(3) + 1).saturating_sub(k).max(2)
}

pub fn demo_phases(args: &DemoArgs, phases: usize) -> Result<()> {
    if !(2..=LADDER.len()).contains(&phases) {
        bail!("--phases: 2 or 3 (the miniature ladder has {} rungs)", LADDER.len());
    }
    if args.workers < phases + 1 {
        bail!("--workers: {phases} phases need at least {} workers, so that each phase retains fewer", phases + 1);
    }
    let started = Instant::now();
    crate::demo::prepare_out_dir(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut view: Box<dyn Write> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };

    let corpus = match &args.data {
        Some(path) => std::fs::canonicalize(path).with_context(|| format!("{}: no such corpus", path.display()))?,
        None => {
            let path = out.join("corpus.txt");
            std::fs::write(&path, MarkovSource::new(1).generate(400_000, 1))?;
            path
        }
    };
    // The tokenizer first: the later phases' configs must carry its vocabulary.
    let tokenizer = agora_data::train_bpe(std::slice::from_ref(&corpus), 512)?;
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_json_string())?;
    let vocab = tokenizer.vocab_size();
    let rounds = (args.rounds / phases as u64).max(2);
    let mut text = format!(
        "name = \"demo ladder\"\nseed = 0\n[data]\nfiles = [{:?}]\ntokenizer = \"tokenizer.json\"\n",
        corpus.display().to_string()
    );
    for (k, &(name, layers, hidden, heads, kv, ffn, method)) in LADDER.iter().take(phases).enumerate() {
        let mut config: LlamaConfig = preset("tiny", Some(vocab))?;
        (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) = (layers, hidden, heads);
        (config.num_key_value_heads, config.intermediate_size) = (Some(kv), ffn);
        let config_file = format!("{name}.json");
        agora_model::checkpoint::write_json(&out.join(&config_file), &config.to_hf_json())?;
        text += &format!("\n[[phase]]\nname = \"{name}\"\n");
        if k > 0 {
            text += &format!("retain = {}\n[phase.growth]\nmethod = \"{method}\"\n", retained(args.workers, k));
        }
        if k == 1 {
            // The call for the second phase's recipe: each proxy run trains two rounds' tokens of the phase.
            let proxy_tokens = 2 * 2 * args.inner_steps * (args.batch_size * args.seq_len) as u64;
            text += &format!(
                "[phase.research]\nproxy_tokens = {proxy_tokens}\nclose_after_secs = 2\nmax_proposals = 4\nreward = 1000000\n"
            );
        }
        let min_workers = if k == 0 { args.workers.div_ceil(2) } else { 2 };
        let warmup = (rounds * args.inner_steps / 20).max(1);
        text += &format!(
            "[phase.model]\nconfig = \"{config_file}\"\n\
             [phase.inner]\nsteps = {}\nbatch_size = {}\nseq_len = {}\nwarmup_steps = {}\n\
             [phase.rounds]\ncount = {rounds}\nmin_workers = {min_workers}\n[phase.eval]\nbatches = 8\n",
            args.inner_steps, args.batch_size, args.seq_len, warmup,
        );
    }
    let file = out.join("campaign.toml");
    std::fs::write(&file, &text)?;

    let mut children = Children::new();
    writeln!(view, "starting the campaign ({phases} phases, {rounds} rounds each)...")?;
    let (campaign, url) = spawn_campaign(&file, &out.join("campaign"), &logs.join("campaign.log"))?;
    children.push("campaign", campaign);
    let exe = std::env::current_exe().context("cannot find the agora binary")?;
    crate::demo::spawn_workers(&mut children, &exe, &url, args.workers, &out, &logs)?;
    writeln!(view, "campaign: {url}; {} workers follow it", args.workers)?;
    // Three researchers answer the call for phase 2's recipe (what `agora propose` sends).
    for (r, (name, patch)) in PROPOSALS.iter().enumerate() {
        let signed = crate::research::signed_proposal(
            &url,
            patch,
            Some(2),
            name,
            &out.join("researchers").join(format!("r{r}")),
        )?;
        let accepted = crate::research::submit(&url, &signed)?;
        writeln!(
            view,
            "researcher {name} proposed for phase 2 (entry {}): {}",
            accepted.id,
            patch.trim().replace('\n', "; ")
        )?;
    }

    // Watch: a line whenever the phase, its round, the campaign's state or the run served changes.
    let mut last = (usize::MAX, u64::MAX, CampaignState::Running, String::new());
    let info = loop {
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                if name == "campaign" || !status.success() {
                    bail!("{name} exited ({status}); its log is in {}", logs.display());
                }
            }
        }
        let info: CampaignInfo = fetch_json(&url, "/v1/campaign")?;
        let phase = &info.phases[info.current];
        let now = (info.current, phase.rounds, info.state, info.run_id.clone());
        if now != last {
            let elapsed = started.elapsed().as_secs_f64();
            if info.state == CampaignState::Research {
                writeln!(
                    view,
                    "[{elapsed:>5.0}s] phase {} {:?}: call for proposals — proxy run {} (each entry trains the same \
                     tokens, seed and data)",
                    info.current + 1,
                    phase.name,
                    &info.run_id[..12.min(info.run_id.len())]
                )?;
            } else {
                writeln!(
                    view,
                    "[{elapsed:>5.0}s] phase {} {:?}: round {}/{rounds}, validation loss {:.4}, {} workers{}",
                    info.current + 1,
                    phase.name,
                    phase.rounds,
                    phase.val_loss.unwrap_or(f64::NAN),
                    phase.workers.len(),
                    match info.state {
                        CampaignState::Growing => " — finished; growing into the next phase",
                        CampaignState::Finished => " — the campaign is finished",
                        _ => "",
                    }
                )?;
            }
            last = now;
        }
        if info.state == CampaignState::Finished {
            break info;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Every worker ends on its own: after the last phase, or when a phase did not retain it.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, child) in children.iter_mut().skip(1) {
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        match child.try_wait()? {
            Some(status) if status.success() => {}
            other => bail!("{name} did not end cleanly ({other:?}); its log is in {}", logs.display()),
        }
    }

    let board: ProposalBoard = fetch_json(&url, "/v1/campaign/proposals")?;
    let mut summaries = Vec::new();
    for (k, phase) in info.phases.iter().enumerate() {
        let growth = out.join("campaign").join("grown").join(format!("phase-{}", k + 1)).join("growth.json");
        let grown_by: Vec<String> = match std::fs::read_to_string(&growth) {
            Ok(t) => serde_json::from_str::<serde_json::Value>(&t)?["steps"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        summaries.push(PhaseSummary {
            name: phase.name.clone(),
            parameters: phase.parameters.unwrap_or(0),
            grown_by,
            workers: phase.workers.clone(),
            retained: phase.retain,
            rounds: phase.rounds,
            tokens_trained: phase.tokens_trained,
            initial_val_loss: phase.initial_val_loss.unwrap_or(f64::NAN),
            final_val_loss: phase.val_loss.unwrap_or(f64::NAN),
            recipe: adopted_recipe(&board, k + 1),
        });
    }
    drop(children);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "url": url, "phases": summaries, "proposals": board }))?
        );
        return Ok(());
    }
    writeln!(view, "\nthe call for phase 2's recipe (proxy runs of {} tokens each):", board.calls[0].proxy_tokens)?;
    for e in &board.calls[0].entries {
        writeln!(
            view,
            "  rank {} entry {} by {:<12} val loss {:.4}  credits {:>8}  {}{}",
            e.rank.unwrap_or(0),
            e.id,
            e.name.chars().take(12).collect::<String>(),
            e.val_loss.unwrap_or(f64::NAN),
            crate::format::credits(e.credits as i64),
            if e.id == 0 { "(the campaign file's recipe)".into() } else { e.patch.trim().replace('\n', "; ") },
            if e.adopted { "  ← adopted" } else { "" }
        )?;
    }
    writeln!(view, "\nphase   params  grown by                           tokens  val loss (start → end)  workers")?;
    for s in &summaries {
        writeln!(
            view,
            "{:<7} {:>5.2}M  {:<32} {:>8}  {:.4} → {:.4}         {}{}",
            s.name,
            s.parameters as f64 / 1e6,
            if s.grown_by.is_empty() { "(initialised)".to_string() } else { s.grown_by.join(", ") },
            s.tokens_trained,
            s.initial_val_loss,
            s.final_val_loss,
            s.workers.join(" "),
            s.retained.map(|n| format!(" (the best {n} retained)")).unwrap_or_default()
        )?;
    }
    writeln!(
        view,
        "each grown phase starts at its predecessor's final loss (exact growth); phase 2's recipe: {}\nfinished in {:.0}s; the campaign's state is in {}",
        summaries[1].recipe,
        started.elapsed().as_secs_f64(),
        out.join("campaign").display()
    )?;
    Ok(())
}
