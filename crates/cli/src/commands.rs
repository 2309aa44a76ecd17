//! The smaller subcommands: eval, generate, tokenizer, data, info.

use crate::run::resolve_checkpoint;
use agora_data::shard::DEFAULT_VAL_FRACTION;
use agora_data::{prepare, train_bpe, MarkovSource, Shard, Tokenizer};
use agora_model::{config::PRESETS, load_pretrained, preset, Llama, LlamaConfig};
use agora_train::checkpoint::{self, check_tokenizer_matches};
use agora_train::evaluate;
use agora_train::generate::{generate as sample, SamplingConfig};
use agora_train::trainer::{default_compute_kind, parse_device};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sets libtorch's intra-op threads (default: all cores) and returns the count.
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    tch::set_num_threads(n as i32);
    n
}

/// Where and how wide libtorch runs.
#[derive(Args, Clone, Default)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N (bf16 matmuls on CUDA).
    #[arg(long)]
    pub device: Option<String>,
    /// libtorch threads (default: all cores). Bit-identical reruns need the same count.
    #[arg(long)]
    pub threads: Option<usize>,
}

/// A checkpoint's model (on the requested device) and tokenizer, for inference.
fn load_for_inference(checkpoint: &Path, runtime: &RuntimeArgs) -> Result<(PathBuf, Llama, Tokenizer)> {
    set_threads(runtime.threads);
    let dir = resolve_checkpoint(checkpoint);
    let device = parse_device(runtime.device.as_deref().unwrap_or("cpu"))?;
    let mut model = load_pretrained(&dir, device)?;
    model.set_compute_kind(default_compute_kind(device));
    let tokenizer = checkpoint::read_tokenizer(&dir)?;
    Ok((dir, model, tokenizer))
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A shard directory, a .shard file, or a corpus (its held-out split is used). Default: the run's data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Window length (default: the training run's).
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// At most this many batches (default: the whole validation shard).
    #[arg(long)]
    pub batches: Option<usize>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let (dir, model, tokenizer) = load_for_inference(&args.checkpoint, &args.runtime)?;
    let state = checkpoint::read_state(&dir).ok();
    let scratch = tempfile::tempdir()?;
    let shard_path = match &args.data {
        Some(p) if p.is_dir() && p.join("val.shard").is_file() => p.join("val.shard"),
        Some(p) if p.extension().is_some_and(|e| e == "shard") => p.clone(),
        Some(p) => prepare(std::slice::from_ref(p), &tokenizer, scratch.path(), DEFAULT_VAL_FRACTION)?.val_path,
        None => match state.as_ref().and_then(|s| s.data_dir.clone()) {
            Some(d) => d.join("val.shard"),
            None => bail!("{}: no --data given and the checkpoint records no data directory", dir.display()),
        },
    };
    let shard = Shard::open(&shard_path)?;
    check_tokenizer_matches(&shard_path, &shard.tokenizer_hash, &tokenizer)?;
    let seq_len = args.seq_len.or(state.as_ref().map(|s| s.train.seq_len)).unwrap_or(128);
    let batches = args.batches.unwrap_or(usize::MAX);
    let loss = evaluate(&model, &shard, seq_len, args.batch_size, batches)?;
    let windows = agora_data::eval_offsets(shard.len(), seq_len, batches, args.batch_size).concat().len();
    if args.json {
        let out = serde_json::json!({
            "checkpoint": dir, "data": shard_path, "loss": loss, "perplexity": loss.exp(),
            "tokens": windows * seq_len, "seq_len": seq_len,
        });
        println!("{out}");
    } else {
        println!(
            "validation loss {loss:.4} nats/token, perplexity {:.3} ({} tokens of {})",
            loss.exp(),
            windows * seq_len,
            shard_path.display()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Print {"prompt", "text" (prompt + completion), "tokens"} as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let (_, model, tokenizer) = load_for_inference(&args.checkpoint, &args.runtime)?;
    let text = complete(&model, &tokenizer, &args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed)?;
    if args.json {
        let out = serde_json::json!({
            "prompt": args.prompt, "text": text.text, "tokens": text.completion_ids.len(),
            "completion_ids": text.completion_ids,
        });
        println!("{out}");
    } else {
        println!("{}", text.text);
    }
    Ok(())
}

pub struct Completion {
    pub text: String,
    pub completion_ids: Vec<u32>,
}

/// Prompt + sampled continuation (an empty prompt starts from the beginning-of-text token).
pub fn complete(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
) -> Result<Completion> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tokenizer.bos_id());
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= model.config.vocab_size) {
        bail!("the tokenizer produced id {bad}, outside the model's vocabulary of {}", model.config.vocab_size);
    }
    let config = SamplingConfig { max_tokens, temperature, top_p, seed };
    let completion_ids = sample(model, &ids, &config, Some(tokenizer.eos_id()))?;
    let visible: Vec<u32> = completion_ids.iter().copied().filter(|&t| t != tokenizer.eos_id()).collect();
    Ok(Completion { text: format!("{prompt}{}", tokenizer.decode(&visible)?), completion_ids })
}

pub fn tokenizer_train(data: &[PathBuf], vocab_size: usize, out: &Path) -> Result<()> {
    let started = Instant::now();
    let tok = train_bpe(data, vocab_size)?;
    tok.save(out)?;
    println!(
        "trained {} tokens in {:.1}s → {} (hash {})",
        tok.vocab_size(),
        started.elapsed().as_secs_f64(),
        out.display(),
        &tok.hash_hex()[..16]
    );
    Ok(())
}

pub fn data_prepare(data: &[PathBuf], tokenizer: &Path, out: &Path, val_fraction: f64) -> Result<()> {
    let tok = Tokenizer::from_file(tokenizer)?;
    let r = prepare(data, &tok, out, val_fraction)?;
    println!(
        "{} documents → {} ({} tokens, {}…) and {} ({} tokens, {}…)",
        r.documents,
        r.train_path.display(),
        r.train_tokens,
        &agora_data::shard::hex(&r.train_content_hash)[..16],
        r.val_path.display(),
        r.val_tokens,
        &agora_data::shard::hex(&r.val_content_hash)[..16]
    );
    Ok(())
}

pub fn data_synthetic(out: &Path, words: usize, seed: u64) -> Result<()> {
    let source = MarkovSource::new(seed);
    let text = source.generate(words, seed);
    std::fs::write(out, &text).with_context(|| format!("{}: cannot write", out.display()))?;
    println!(
        "wrote {} bytes to {}; entropy rate {:.4} bits/word = {:.4} nats/char",
        text.len(),
        out.display(),
        source.entropy_rate_bits_per_word(),
        source.entropy_rate_nats_per_char()
    );
    Ok(())
}

#[derive(Args)]
pub struct InfoArgs {
    /// A preset name (default: a table of all presets).
    #[arg(long)]
    pub preset: Option<String>,
    /// A Hugging Face config.json instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Context length for FLOPs and memory (default: the model's maximum).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch for the memory estimate.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
    /// Print the preset's Hugging Face config.json instead of the summary.
    #[arg(long, requires = "preset")]
    pub hf_config: bool,
    /// Vocabulary size for --hf-config (default: the preset's).
    #[arg(long, requires = "hf_config")]
    pub vocab_size: Option<usize>,
    /// The seven-phase ladder: each phase, its factor over the previous one and the growth operators
    /// that reach it.
    #[arg(long, conflicts_with_all = ["preset", "config", "hf_config"])]
    pub ladder: bool,
}

fn info_row(name: &str, c: &LlamaConfig, seq_len: Option<usize>, batch: usize) -> serde_json::Value {
    let seq = seq_len.unwrap_or(c.max_position_embeddings);
    serde_json::json!({
        "name": name,
        "parameters": c.num_parameters(),
        "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
        "kv_heads": c.kv_heads(), "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
        "seq_len": seq,
        "train_flops_per_token": c.train_flops_per_token(seq),
        "weights_bytes_fp32": 4 * c.num_parameters(),
        "training_memory_bytes": c.training_memory_bytes(batch, seq),
    })
}

pub fn info(args: InfoArgs) -> Result<()> {
    if args.ladder {
        return crate::grow::ladder(args.json);
    }
    if args.hf_config {
        let name = args.preset.as_deref().expect("clap requires --preset");
        println!("{}", serde_json::to_string_pretty(&preset(name, args.vocab_size)?.to_hf_json())?);
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = match (&args.preset, &args.config) {
        (Some(_), Some(_)) => bail!("give --preset or --config, not both"),
        (Some(name), None) => vec![info_row(name, &preset(name, None)?, args.seq_len, args.batch_size)],
        (None, Some(path)) => {
            vec![info_row(&path.display().to_string(), &LlamaConfig::from_file(path)?, args.seq_len, args.batch_size)]
        }
        (None, None) => PRESETS
            .iter()
            .map(|(name, _)| Ok(info_row(name, &preset(name, None)?, args.seq_len, args.batch_size)))
            .collect::<Result<_>>()?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:>10} {:>6} {:>6} {:>5} {:>4} {:>7} {:>6} {:>12} {:>11} {:>13}",
        "preset", "params", "layers", "hidden", "heads", "kv", "ffn", "ctx", "FLOPs/token", "weights", "train memory"
    );
    for r in rows {
        let gb = |k: &str| r[k].as_f64().unwrap_or(0.0) / 1e9;
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{:<8} {:>10} {:>6} {:>6} {:>5} {:>4} {:>7} {:>6} {:>12.3e} {:>9.2}GB {:>11.1}GB",
            r["name"].as_str().unwrap_or(""),
            human(r["parameters"].as_f64().unwrap_or(0.0)),
            n("layers"),
            n("hidden_size"),
            n("heads"),
            n("kv_heads"),
            n("intermediate_size"),
            n("seq_len"),
            r["train_flops_per_token"].as_f64().unwrap_or(0.0),
            gb("weights_bytes_fp32"),
            gb("training_memory_bytes"),
        );
    }
    println!(
        "(training memory: fp32 weights, gradients and AdamW moments plus activations for --batch-size sequences)"
    );
    Ok(())
}

pub(crate) fn human(n: f64) -> String {
    match n {
        n if n >= 1e12 => format!("{:.2}T", n / 1e12),
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n => format!("{:.0}K", n / 1e3),
    }
}
