//! Text generation: greedy (temperature 0) or nucleus sampling, reproducible from a seed.

use agora_model::{KvCache, Llama};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct SamplingConfig {
    pub max_tokens: usize,
    /// 0 picks the most likely token every time.
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probabilities sum to at least `top_p`.
    pub top_p: f64,
    pub seed: u64,
}

/// Continues `prompt` by up to `max_tokens` tokens, stopping early at `stop_id`. Returns the new ids.
/// The context is truncated to the model's window when the prompt plus completion would exceed it.
pub fn generate(model: &Llama, prompt: &[u32], config: &SamplingConfig, stop_id: Option<u32>) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let temperature_ok = config.temperature >= 0.0 && config.temperature.is_finite();
    let top_p_ok = config.top_p > 0.0 && config.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
    }
    let window = model.config.max_position_embeddings;
    let mut context: Vec<u32> = prompt[prompt.len().saturating_sub(window)..].to_vec();
    let mut out = Vec::with_capacity(config.max_tokens);
    let mut cache = KvCache::default();
    let mut fed = 0usize;
    tch::no_grad(|| -> Result<()> {
        for i in 0..config.max_tokens {
            if context.len() > window || fed == window {
                // Slide the window: drop the cache and re-read the last `window - 1` tokens.
                let keep = window - 1;
                context.drain(..context.len() - keep);
                cache = KvCache::default();
                fed = 0;
            }
            let new: Vec<i64> = context[fed..].iter().map(|&t| i64::from(t)).collect();
            let ids = Tensor::from_slice(&new).view([1, -1]).to_device(model.device());
            let logits = model.forward_from(&ids, fed as i64, Some(&mut cache));
            fed = context.len();
            let last = logits.select(1, -1).squeeze_dim(0).to_kind(Kind::Double).to_device(tch::Device::Cpu);
            let logits: Vec<f64> = last.try_into()?;
            let next = pick(&logits, config, i as u64);
            out.push(next);
            if Some(next) == stop_id {
                break;
            }
            context.push(next);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Chooses the next token from logits: argmax at temperature 0, else nucleus sampling.
fn pick(logits: &[f64], config: &SamplingConfig, position: u64) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0);
    if config.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) / config.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (k, p) in probs.iter().enumerate() {
        mass += p.1;
        if mass >= config.top_p {
            keep = k + 1;
            break;
        }
    }
    let nucleus = &probs[..keep];
    let mut u = uniform(config.seed, position) * nucleus.iter().map(|p| p.1).sum::<f64>();
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus.last().map_or_else(argmax, |p| p.0 as u32)
}

/// A uniform draw in [0, 1) that depends only on (seed, position): generation is reproducible and
/// independent of libtorch's global generator.
fn uniform(seed: u64, position: u64) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(b"agora generate v1");
    h.update(&seed.to_le_bytes());
    h.update(&position.to_le_bytes());
    let bytes: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_restricts_the_choice() {
        let logits = [0.0, 3.0, 1.0, -2.0];
        let greedy = SamplingConfig { max_tokens: 1, temperature: 0.0, top_p: 1.0, seed: 0 };
        assert_eq!(pick(&logits, &greedy, 0), 1);
        // top_p tiny: only the most likely token is in the nucleus.
        let narrow = SamplingConfig { temperature: 1.0, top_p: 1e-9, ..greedy };
        assert!((0..50).all(|i| pick(&logits, &narrow, i) == 1));
        // Full sampling reaches other tokens, reproducibly.
        let wide = SamplingConfig { temperature: 1.0, top_p: 1.0, ..greedy };
        let draws: Vec<u32> = (0..200).map(|i| pick(&logits, &wide, i)).collect();
        assert!(draws.iter().any(|&t| t != 1));
        assert_eq!(draws, (0..200).map(|i| pick(&logits, &wide, i)).collect::<Vec<_>>());
    }
}
