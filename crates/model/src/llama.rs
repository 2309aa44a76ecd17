//! The Llama decoder: embedding → N × (RMSNorm → attention → residual, RMSNorm → SwiGLU → residual)
//! → RMSNorm → LM head. Tensor names are Hugging Face's, so a checkpoint is a plain name → tensor map.

use crate::config::LlamaConfig;
use tch::{Device, Kind, Tensor};

/// One decoder block's weights (shallow handles onto the tensors in [`Llama::parameters`]).
struct Block {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// Per-layer key/value cache for incremental decoding: `[batch, kv_heads, positions, head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.layers.first().filter(|(k, _)| k.dim() == 4).map_or(0, |(k, _)| k.size()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Every trainable tensor in a fixed order (the order of [`parameter_shapes`]); the optimizer, the
    /// gradient norm and checkpoints all walk this list, which keeps them deterministic.
    parameters: Vec<(String, Tensor)>,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` when the LM head is tied to the embedding.
    lm_head: Option<Tensor>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    device: Device,
    /// Matmuls run in this precision (fp32 on CPU; bf16 on CUDA when asked); norms, softmax statistics,
    /// the residual stream, logits and the master weights stay fp32.
    compute_kind: Kind,
}

/// The names and shapes of a config's parameters, in the canonical order.
pub fn parameter_shapes(c: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let h = c.hidden_size as i64;
    let q = (c.num_attention_heads * c.head_size()) as i64;
    let kv = (c.kv_heads() * c.head_size()) as i64;
    let i = c.intermediate_size as i64;
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size as i64, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![c.vocab_size as i64, h]));
    }
    shapes
}

impl Llama {
    /// A model with every weight zero; fill it with [`Llama::initialize`] or a checkpoint.
    pub fn zeros(config: &LlamaConfig, device: Device) -> Self {
        config.validate().expect("config validated by the caller");
        let parameters: Vec<(String, Tensor)> = parameter_shapes(config)
            .into_iter()
            .map(|(name, shape)| (name, Tensor::zeros(shape.as_slice(), (Kind::Float, device)).set_requires_grad(true)))
            .collect();
        let get = |name: &str| {
            parameters
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .expect("name from parameter_shapes")
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let p = |s: &str| get(&format!("model.layers.{l}.{s}.weight"));
                Block {
                    input_layernorm: p("input_layernorm"),
                    q_proj: p("self_attn.q_proj"),
                    k_proj: p("self_attn.k_proj"),
                    v_proj: p("self_attn.v_proj"),
                    o_proj: p("self_attn.o_proj"),
                    post_attention_layernorm: p("post_attention_layernorm"),
                    gate_proj: p("mlp.gate_proj"),
                    up_proj: p("mlp.up_proj"),
                    down_proj: p("mlp.down_proj"),
                }
            })
            .collect();
        let (rope_cos, rope_sin) = rope_tables(config, device);
        Llama {
            embed_tokens: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            lm_head: (!config.tie_word_embeddings).then(|| get("lm_head.weight")),
            blocks,
            rope_cos,
            rope_sin,
            config: config.clone(),
            parameters,
            device,
            compute_kind: Kind::Float,
        }
    }

    /// A freshly initialised model. Weights are drawn on the CPU from `seed` by agora's own generator (so a
    /// seed gives the same model on every device and libtorch version): every matrix ~ N(0, initializer_range²), except the two projections that
    /// write into the residual stream (`o_proj`, `down_proj`), whose std is divided by √(2·layers) so the
    /// residual variance stays O(1) with depth (GPT-2); RMSNorm gains are 1.
    pub fn new(config: &LlamaConfig, device: Device, seed: u64) -> Self {
        let model = Llama::zeros(config, device);
        model.initialize(seed);
        model
    }

    pub fn initialize(&self, seed: u64) {
        let std = self.config.initializer_range;
        let residual_std = std / (2.0 * self.config.num_hidden_layers as f64).sqrt();
        tch::no_grad(|| {
            for (name, p) in &self.parameters {
                let shape = p.size();
                let value = if name.ends_with("norm.weight") {
                    Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
                } else {
                    let s = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                        residual_std
                    } else {
                        std
                    };
                    Tensor::from_slice(&crate::init::normal(seed, name, p.numel(), s)).view(shape.as_slice())
                };
                p.shallow_clone().copy_(&value);
            }
        });
    }

    /// Runs matmuls in bf16 (CUDA mixed precision); master weights stay fp32.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The trainable tensors in canonical order, with their HF names.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.parameters
    }

    pub fn num_parameters(&self) -> i64 {
        self.parameters.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if self.compute_kind == Kind::Float {
            x.linear::<Tensor>(w, None)
        } else {
            x.to_kind(self.compute_kind).linear::<Tensor>(&w.to_kind(self.compute_kind), None)
        }
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        x.rms_norm([self.config.hidden_size as i64], Some(weight), self.config.rms_norm_eps)
    }

    /// Rotary embeddings, HF convention: pairs are (i, i + head_dim/2), not interleaved.
    fn rotate(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.rope_cos.narrow(0, start, t).to_kind(x.kind());
        let sin = self.rope_sin.narrow(0, start, t).to_kind(x.kind());
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
        x * cos + rotated * sin
    }

    fn attention(&self, block: &Block, x: &Tensor, start: i64, cache: Option<&mut (Tensor, Tensor)>) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, kvh, hd) =
            (self.config.num_attention_heads as i64, self.config.kv_heads() as i64, self.config.head_size() as i64);
        let q = self.linear(x, &block.q_proj).view([b, t, nh, hd]).transpose(1, 2);
        let k = self.linear(x, &block.k_proj).view([b, t, kvh, hd]).transpose(1, 2);
        let v = self.linear(x, &block.v_proj).view([b, t, kvh, hd]).transpose(1, 2);
        let q = self.rotate(&q, start);
        let mut k = self.rotate(&k, start);
        let mut v = v;
        if let Some((ck, cv)) = cache {
            if ck.numel() > 0 {
                k = Tensor::cat(&[&*ck, &k], 2);
                v = Tensor::cat(&[&*cv, &v], 2);
            }
            *ck = k.shallow_clone();
            *cv = v.shallow_clone();
        }
        // A single new query attends to every cached key; otherwise the queries start at key 0 and the
        // usual causal mask applies.
        let causal = t > 1;
        assert!(!causal || start == 0, "multi-token decode steps after a prefix are not supported");
        let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, causal, None, kvh != nh);
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hd]);
        self.linear(&y, &block.o_proj)
    }

    fn mlp(&self, block: &Block, x: &Tensor) -> Tensor {
        let gate = self.linear(x, &block.gate_proj).silu();
        let up = self.linear(x, &block.up_proj);
        self.linear(&(gate * up), &block.down_proj)
    }

    /// Logits `[batch, seq, vocab]` (fp32) for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.forward_from(ids, 0, None)
    }

    /// Forward pass for positions `start..start+seq`, reading and extending `cache` when given.
    pub fn forward_from(&self, ids: &Tensor, start: i64, mut cache: Option<&mut KvCache>) -> Tensor {
        let t = ids.size()[1];
        assert!(
            start + t <= self.config.max_position_embeddings as i64,
            "positions {start}..{} exceed max_position_embeddings = {}",
            start + t,
            self.config.max_position_embeddings
        );
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.is_empty() {
                let empty = || Tensor::zeros([0], (Kind::Float, self.device));
                c.layers = (0..self.blocks.len()).map(|_| (empty(), empty())).collect();
            }
            assert_eq!(c.len(), start, "the cache holds {} positions but the step starts at {start}", c.len());
        }
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        for (l, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let h = self.attention(block, &self.rms_norm(&x, &block.input_layernorm), start, layer_cache);
            x = &x + h.to_kind(Kind::Float);
            let h = self.mlp(block, &self.rms_norm(&x, &block.post_attention_layernorm));
            x = &x + h.to_kind(Kind::Float);
        }
        let x = self.rms_norm(&x, &self.norm);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        self.linear(&x, head).to_kind(Kind::Float)
    }

    /// Mean next-token cross-entropy (nats) of `targets` given `inputs`, both `[batch, seq]`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(inputs);
        let v = self.config.vocab_size as i64;
        logits.view([-1, v]).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::Mean, -100, 0.0)
    }
}

/// cos/sin tables `[max_positions, head_dim]`, computed as HF does (fp32 inverse frequencies).
fn rope_tables(c: &LlamaConfig, device: Device) -> (Tensor, Tensor) {
    let hd = c.head_size() as i64;
    let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::from(c.rope_theta as f32).pow(&exponents).reciprocal();
    let positions = Tensor::arange(c.max_position_embeddings as i64, (Kind::Float, Device::Cpu));
    let freqs = positions.outer(&inv_freq);
    let angles = Tensor::cat(&[&freqs, &freqs], 1);
    (angles.cos().to_device(device), angles.sin().to_device(device))
}
