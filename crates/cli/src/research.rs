//! The research track's subcommands: `agora propose URL --file patch.toml` (a signed proposal for the
//! campaign's open call) and `agora proposals URL` (the board of calls and their ranked proposals).

use crate::format::credits;
use crate::net::fetch_json;
use agora_protocol::{
    CampaignInfo, ErrorBody, Identity, Proposal, ProposalAccepted, ProposalBoard, ResearchCall, SignedProposal,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct ProposeArgs {
    /// The campaign's URL.
    pub url: String,
    /// The patch: TOML tables `[inner]`, `[outer]`, `[compression]`, `[growth]` with the fields to change
    /// (`agora proposals URL` lists what the open call allows in its refusals).
    #[arg(long)]
    pub file: PathBuf,
    /// The phase (from 1) whose recipe it patches (default: the one whose call is open).
    #[arg(long)]
    pub phase: Option<usize>,
    /// A display name for the board (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// The researcher's identity key is DIR/identity.key (created on first use).
    #[arg(long, default_value = "agora-researcher")]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ProposalsArgs {
    /// The campaign's URL.
    pub url: String,
    #[arg(long)]
    pub json: bool,
}

/// Signs `patch` for the campaign's open call (or `phase`'s) with the identity in `data_dir`.
pub fn signed_proposal(
    url: &str,
    patch: &str,
    phase: Option<usize>,
    name: &str,
    data_dir: &Path,
) -> Result<SignedProposal> {
    let identity = Identity::load_or_create(&data_dir.join("identity.key"))?;
    let campaign: CampaignInfo = fetch_json(url, "/v1/campaign").context("is this a campaign's URL?")?;
    let board: ProposalBoard = fetch_json(url, "/v1/campaign/proposals")?;
    let open = |c: &&ResearchCall| c.state == agora_protocol::CallState::Open;
    let call = match phase {
        Some(p) => board.calls.iter().find(|c| c.phase == p),
        None => board.calls.iter().find(open),
    };
    let Some(call) = call else {
        bail!(
            "campaign {:?} has no call for proposals {} (GET {url}/v1/campaign/proposals)",
            campaign.name,
            phase.map_or("open now".to_string(), |p| format!("for phase {p}"))
        )
    };
    let proposal = Proposal {
        campaign: campaign.name,
        call: call.host_run.clone().unwrap_or_default(),
        phase: call.phase,
        researcher: identity.id(),
        name: name.to_string(),
        patch: patch.to_string(),
    };
    Ok(proposal.sign(&identity))
}

/// Sends a signed proposal; the coordinator's refusal (status, code and reason) as the error.
pub fn submit(url: &str, signed: &SignedProposal) -> Result<ProposalAccepted> {
    let url = format!("{}/v1/campaign/proposals", url.trim_end_matches('/'));
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?
        .post(&url)
        .json(signed)
        .send()
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.text()?;
    if !status.is_success() {
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => bail!("the campaign refused the proposal ({status}, {}): {}", body.error, body.message),
            Err(_) => bail!("{url}: {status}: {text}"),
        }
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: not the answer agora expects"))
}

pub fn propose(args: ProposeArgs) -> Result<()> {
    let patch = std::fs::read_to_string(&args.file).with_context(|| format!("{}: cannot read", args.file.display()))?;
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "researcher".into())
    });
    let signed = signed_proposal(&args.url, &patch, args.phase, &name, &args.data_dir)?;
    let accepted = submit(&args.url, &signed)?;
    if args.json {
        println!("{}", serde_json::to_string(&accepted)?);
    } else {
        println!(
            "proposal {} for phase {} accepted from researcher {}; its proxy run is measured once the call closes",
            accepted.id,
            accepted.phase,
            signed.proposal.researcher.short()
        );
    }
    Ok(())
}

pub fn proposals(args: ProposalsArgs) -> Result<()> {
    let board: ProposalBoard = fetch_json(&args.url, "/v1/campaign/proposals")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&board)?);
        return Ok(());
    }
    if board.calls.is_empty() {
        println!("campaign {:?} holds no calls for proposals", board.campaign);
    }
    for call in &board.calls {
        let admitted = match &call.admitted {
            None => "anyone".to_string(),
            Some(list) => format!("{} retained researchers", list.len()),
        };
        println!(
            "phase {} ({}): {:?}, {} proxy tokens each, up to {} proposals from {admitted}, reward {}",
            call.phase,
            call.phase_name,
            call.state,
            call.proxy_tokens,
            call.max_proposals,
            credits(call.reward.min(i64::MAX as u64) as i64)
        );
        println!(
            "{:>4}  {:>3}  {:<10} {:<16} {:>9} {:>12}  patch",
            "rank", "id", "researcher", "name", "val loss", "credits"
        );
        for e in &call.entries {
            let loss = match (e.val_loss, &e.failure) {
                (Some(v), _) => format!("{v:.4}"),
                (None, Some(_)) => "failed".into(),
                _ => "-".into(),
            };
            let mark = if e.adopted { "  (adopted)" } else { "" };
            println!(
                "{:>4}  {:>3}  {:<10} {:<16} {:>9} {:>12}  {}{mark}",
                e.rank.map_or("-".into(), |r| r.to_string()),
                e.id,
                e.researcher.map_or("campaign".into(), |r| r.short()),
                e.name.chars().take(16).collect::<String>(),
                loss,
                credits(e.credits.min(i64::MAX as u64) as i64),
                if e.id == 0 { "(the campaign file's recipe)".to_string() } else { e.patch.trim().replace('\n', "; ") }
            );
        }
    }
    Ok(())
}
