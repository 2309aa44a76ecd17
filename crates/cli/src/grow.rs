//! `agora grow` (a checkpoint grown to a larger config, written as a Hugging Face directory) and
//! `agora info --ladder` (the seven phases and the operators between them).

use crate::run::resolve_checkpoint;
use agora_model::grow::{grow, plan, FfnGrowth, GrowthMethod, GrowthOptions, HiddenGrowth, Weights};
use agora_model::{load_pretrained, preset, save_pretrained, LlamaConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Args)]
pub struct GrowArgs {
    /// The checkpoint to grow: a Hugging Face directory, an agora run directory or its checkpoint/.
    #[arg(long)]
    pub from: PathBuf,
    /// The target: a preset name (its vocabulary replaced by the checkpoint's) or a config.json.
    #[arg(long)]
    pub to: String,
    /// depth: only layers; width: hidden size, heads, FFN; both; stack: depth by G_stack (not exact).
    #[arg(long, default_value = "both")]
    pub method: GrowthMethod,
    /// New FFN units: fresh (zero down columns) or split (copies of existing units).
    #[arg(long, default_value = "fresh", value_parser = ["fresh", "split"])]
    pub ffn: String,
    /// A wider residual stream: pad (zero padding, any size) or tile (HyperCloning, a multiple).
    #[arg(long, default_value = "pad", value_parser = ["pad", "tile"])]
    pub hidden: String,
    /// Seeds the new weights and the symmetry-breaking noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the grown model (config.json, model.safetensors, the tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// The tokenizer files a checkpoint directory may carry (agora's and Hugging Face's); the grown model reads
/// the same tokens, so they are copied as they are.
const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json"];

/// A preset name, a config.json, or a model directory holding one; a preset takes the checkpoint's vocabulary.
fn target_config(to: &str, vocab_size: usize) -> Result<LlamaConfig> {
    let path = Path::new(to);
    if path.is_file() {
        return LlamaConfig::from_file(path);
    }
    if path.join("config.json").is_file() {
        return LlamaConfig::from_file(&path.join("config.json"));
    }
    preset(to, Some(vocab_size))
        .with_context(|| format!("--to {to}: neither a preset nor a config.json (or a directory with one)"))
}

pub fn grow_command(args: GrowArgs) -> Result<()> {
    let dir = resolve_checkpoint(&args.from);
    if args.out.is_file() {
        bail!("{}: is a file; --out names a directory to create", args.out.display());
    }
    if args.out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!("{}: exists and is not empty; choose a new --out", args.out.display());
    }
    let source = Weights::of(&load_pretrained(&dir, Device::Cpu)?);
    let to = target_config(&args.to, source.config.vocab_size)?;
    let options = GrowthOptions {
        depth: args.method.depth(),
        ffn: if args.ffn == "split" { FfnGrowth::Split } else { FfnGrowth::Fresh },
        hidden: if args.hidden == "tile" { HiddenGrowth::Tile } else { HiddenGrowth::Pad },
        seed: args.seed,
    };
    let steps = plan(&source.config, &to, &options)?;
    args.method.check(&steps)?;
    let grown = grow(&source, &to, &options)?;
    let (before, after) = (source.config.num_parameters(), grown.config.num_parameters());
    save_pretrained(&grown.into_model(Device::Cpu)?, &args.out)?;
    let mut copied = Vec::new();
    for file in TOKENIZER_FILES {
        if dir.join(file).is_file() {
            std::fs::copy(dir.join(file), args.out.join(file))
                .with_context(|| format!("{}: cannot copy {file}", args.out.display()))?;
            copied.push(file);
        }
    }
    if copied.is_empty() {
        tracing::warn!("{}: no tokenizer files to copy; the grown directory has none", dir.display());
    }
    if dir.join(agora_train::checkpoint::STATE_FILE).is_file() {
        tracing::info!(
            "the optimizer state of {} is not carried: the grown directory holds weights only \
             (agora_train::grow::grow_trainer carries or resets it in process)",
            dir.display()
        );
    }
    let exact = steps.iter().all(|s| s.is_exact());
    if args.json {
        let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
        let out = serde_json::json!({
            "from": dir, "out": args.out, "parameters_before": before, "parameters_after": after,
            "factor": after as f64 / before as f64, "steps": steps, "exact": exact,
        });
        println!("{out}");
    } else {
        println!(
            "{} → {}: {before} → {after} parameters ({:.2}×)",
            dir.display(),
            args.out.display(),
            after as f64 / before as f64
        );
        for step in &steps {
            println!("  {step}");
        }
        println!(
            "{}",
            if exact {
                "exact: the grown model computes the same logits"
            } else {
                "not exact (G_stack): train on before comparing"
            }
        );
    }
    Ok(())
}

/// The preset ladder: each phase's size, its factor over the previous phase, and the operators from it.
pub fn ladder(json: bool) -> Result<()> {
    let names: Vec<String> = (1..=7).map(|k| format!("phase{k}")).collect();
    let configs: Vec<LlamaConfig> = names.iter().map(|n| preset(n, None)).collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for (k, c) in configs.iter().enumerate() {
        let previous = k.checked_sub(1).map(|p| &configs[p]);
        let steps = match previous {
            Some(p) => plan(p, c, &GrowthOptions::default())
                .with_context(|| format!("{} → {}", names[k - 1], names[k]))?
                .iter()
                .map(|s| s.to_string())
                .collect(),
            None => Vec::new(),
        };
        rows.push(serde_json::json!({
            "phase": names[k], "parameters": c.num_parameters(),
            "factor": previous.map(|p| c.num_parameters() as f64 / p.num_parameters() as f64),
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": c.kv_heads(), "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings, "grown_by": steps,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>9} {:>7} {:>6} {:>6} {:>5} {:>4} {:>6} {:>5}",
        "phase", "params", "factor", "layers", "hidden", "heads", "kv", "ffn", "ctx"
    );
    for r in &rows {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let factor = r["factor"].as_f64().map_or("—".to_string(), |f| format!("{f:.2}×"));
        println!(
            "{:<7} {:>9} {:>7} {:>6} {:>6} {:>5} {:>4} {:>6} {:>5}",
            r["phase"].as_str().unwrap_or(""),
            crate::commands::human(n("parameters") as f64),
            factor,
            n("layers"),
            n("hidden_size"),
            n("heads"),
            n("kv_heads"),
            n("intermediate_size"),
            n("max_position_embeddings"),
        );
        for step in r["grown_by"].as_array().into_iter().flatten() {
            println!("          grown by: {}", step.as_str().unwrap_or(""));
        }
    }
    println!("(every step exact: `agora grow --from CHECKPOINT --to phaseN --out DIR`)");
    Ok(())
}
