//! Growth: a larger model that computes what a smaller one computes, so that a phase of the ladder starts
//! from the previous phase's weights instead of from noise.
//!
//! Every operator here but [`stack_layers`] is **exact**: the grown model's logits equal the original's up
//! to float rounding (the tests hold them to 1e-5 in fp32). Each keeps the function by making the new
//! weights read nothing or write nothing:
//! - **depth** ([`insert_layers`]): a new pre-norm block whose `o_proj` and `down_proj` are zero adds zero to
//!   the residual stream (LLaMA Pro);
//! - **FFN width** ([`widen_ffn`]): a new SwiGLU unit with a zero `down_proj` column writes nothing, or an
//!   existing unit is split into copies that share its `down_proj` column;
//! - **attention heads** ([`add_heads`]): a new query head whose `o_proj` columns are zero writes nothing;
//!   a key/value head may be copied so that groups of a new size still see the same keys (GQA);
//! - **hidden size** ([`widen_hidden`]): zero padding of the residual stream with the stream and the
//!   RMSNorm gains rescaled so that every norm sees the same root mean square, or HyperCloning's tiling;
//! - **tied → untied head** ([`untie_head`]).
//!
//! **Symmetry.** A copy that computes exactly what its original computes gets exactly the same gradient
//! forever, so growth by copying would add nothing. Each operator breaks the symmetry without changing the
//! function: new weights that *read* are drawn fresh (seeded by name, [`crate::init`]), so new units, heads,
//! blocks and residual dimensions receive gradients from the first step; the copies of a split unit get
//! down columns `d/m + ε_c` with Σ ε_c = 0, and tiled readers get `W/n + ε_c` with Σ ε_c = 0, so the copies'
//! outputs still sum to the original while their gradients differ. Copied key/value heads serve different
//! query heads, which already makes their gradients differ.
//!
//! [`plan`] says which operators take one config to another (configs only: it is how `agora info --ladder`
//! checks the preset ladder without building anything); [`grow`] carries the plan out on weights.

mod depth;
mod heads;
mod width;

pub use depth::{insert_layers, spread_positions, stack_layers};
pub use heads::add_heads;
pub use width::{untie_head, widen_ffn, widen_hidden};

use crate::config::LlamaConfig;
use crate::llama::{parameter_shapes, Llama};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use tch::{Device, Kind, Tensor};

/// A model's config with its weights by Hugging Face name (fp32, CPU): what the operators transform.
pub struct Weights {
    pub config: LlamaConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shapes: BTreeMap<&str, Vec<i64>> = self.tensors.iter().map(|(n, t)| (n.as_str(), t.size())).collect();
        f.debug_struct("Weights").field("config", &self.config).field("shapes", &shapes).finish()
    }
}

impl Weights {
    /// Copies of a model's weights.
    pub fn of(model: &Llama) -> Weights {
        Weights { config: model.config.clone(), tensors: crate::checkpoint::weights_of(model) }
    }

    /// Checks that the tensors are exactly the config's parameters, by name and shape.
    pub fn new(config: LlamaConfig, tensors: BTreeMap<String, Tensor>) -> Result<Weights> {
        config.validate()?;
        let shapes = parameter_shapes(&config);
        for (name, shape) in &shapes {
            let t = tensors.get(name).with_context(|| format!("tensor {name} is missing"))?;
            ensure!(t.size() == *shape, "tensor {name} has shape {:?}, the config implies {shape:?}", t.size());
        }
        ensure!(
            tensors.len() == shapes.len(),
            "{} tensors that the config does not have",
            tensors.len() - shapes.len()
        );
        let tensors = tensors.into_iter().map(|(n, t)| (n, t.to_kind(Kind::Float).to_device(Device::Cpu))).collect();
        Ok(Weights { config, tensors })
    }

    /// An independent copy (new storage for every tensor).
    pub fn deep_copy(&self) -> Weights {
        Weights {
            config: self.config.clone(),
            tensors: self.tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
        }
    }

    /// The model these weights define.
    pub fn into_model(self, device: Device) -> Result<Llama> {
        crate::checkpoint::from_weights(&self.config, self.tensors, device, "grown weights")
    }

    /// Handles onto the same tensors (the operators build new tensors for what they change and share the
    /// rest; nothing here writes into a tensor in place).
    fn shallow_tensors(&self) -> BTreeMap<String, Tensor> {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("{name}: every operator keeps the config's tensors"))
    }

    fn layer(&self, layer: usize, part: &str) -> &Tensor {
        self.get(&layer_name(layer, part))
    }
}

/// `model.layers.{layer}.{part}.weight`.
fn layer_name(layer: usize, part: &str) -> String {
    format!("model.layers.{layer}.{part}.weight")
}

/// The parts of a block that read the normed residual stream (their input dimension is the hidden size).
const READERS: [&str; 5] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"];
/// The parts that write into the residual stream (their output dimension is the hidden size).
const WRITERS: [&str; 2] = ["self_attn.o_proj", "mlp.down_proj"];
/// The RMSNorm gains of a block.
const NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// What the operators fill new entries with.
///
/// [`Fill::Weights`]: the model's weights, as the module docs describe (fresh draws, cancelling noise, the
/// rescalings that keep the function). [`Fill::Companion`]: a per-parameter statistic that travels with the
/// weights, such as an optimizer's moments: every entry derived from an old entry carries that entry's value
/// unscaled, and every new entry is zero. Where a growth rescales a weight (padding: the stream's writers,
/// the embedding and the gains by √(h'/h); tiling: the readers by 1/n; a split: the down column by 1/m) its
/// gradient changes scale as well, so carried moments start at the old scale and adapt over about
/// 1/(1 − β2) steps; Adam's first update from them has the old size, since m/√v is what it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Weights { seed: u64 },
    Companion,
}

impl Fill {
    /// Fresh N(0, std²) entries, reproducible from (seed, what) and independent of libtorch's generator, as
    /// initialisation is; zeros for a companion.
    fn fresh(self, what: &str, shape: &[i64], std: f64) -> Tensor {
        match self {
            Fill::Weights { seed } => {
                let n = shape.iter().product::<i64>() as usize;
                Tensor::from_slice(&crate::init::normal(seed, &format!("grow/{what}"), n, std)).view(shape)
            }
            Fill::Companion => Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
        }
    }

    /// `n` noise tensors whose sum is zero (each draw minus the draws' mean): added to copies whose inputs are
    /// equal, they change no output but give every copy its own gradient. Zeros for a companion.
    fn cancelling_noise(self, what: &str, n: usize, shape: &[i64], std: f64) -> Vec<Tensor> {
        let draws: Vec<Tensor> = (0..n).map(|c| self.fresh(&format!("{what}/{c}"), shape, std)).collect();
        let mean = Tensor::stack(&draws, 0).mean_dim(0, false, Kind::Float);
        draws.iter().map(|d| d - &mean).collect()
    }

    /// A rescaling that keeps the function: `factor` for weights, 1 for a companion.
    fn scale(self, factor: f64) -> f64 {
        match self {
            Fill::Weights { .. } => factor,
            Fill::Companion => 1.0,
        }
    }

    /// New RMSNorm gains: ones for weights, zeros for a companion.
    fn unit_gains(self, shape: &[i64]) -> Tensor {
        match self {
            Fill::Weights { .. } => Tensor::ones(shape, (Kind::Float, Device::Cpu)),
            Fill::Companion => Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
        }
    }
}

/// The standard deviation of a tensor's entries (0 for a constant one).
fn std_of(t: &Tensor) -> f64 {
    if t.numel() < 2 {
        return 0.0;
    }
    t.std(true).double_value(&[])
}

/// How new FFN units are made (see [`widen_ffn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FfnGrowth {
    /// New units with fresh gate/up rows and zero down columns.
    #[default]
    Fresh,
    /// Copies of existing units, the down column split among the copies with cancelling noise.
    Split,
}

/// How the hidden size grows (see [`widen_hidden`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenGrowth {
    /// Zero padding, the residual stream and the gains rescaled; any larger size.
    #[default]
    Pad,
    /// HyperCloning: the residual stream becomes n copies of itself; the new size a multiple of the old.
    Tile,
}

/// How depth grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DepthGrowth {
    /// New identity blocks spread evenly through the stack (exact).
    #[default]
    Insert,
    /// G_stack: the whole stack repeated (layer l copies layer l mod L). Not exact.
    Stack,
}

/// The choices [`grow`] leaves open; the config pair fixes the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrowthOptions {
    pub depth: DepthGrowth,
    pub ffn: FfnGrowth,
    pub hidden: HiddenGrowth,
    /// Seeds every fresh weight and noise draw.
    pub seed: u64,
}

/// One operator application, as [`plan`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrowthStep {
    UntieHead,
    Hidden { from: usize, to: usize, how: HiddenGrowth },
    Heads { from: (usize, usize), to: (usize, usize) },
    Ffn { from: usize, to: usize, how: FfnGrowth },
    Depth { from: usize, to: usize, how: DepthGrowth },
    Context { from: usize, to: usize },
}

impl GrowthStep {
    /// Whether the step keeps the model's function.
    pub fn is_exact(&self) -> bool {
        !matches!(self, GrowthStep::Depth { how: DepthGrowth::Stack, .. })
    }
}

impl fmt::Display for GrowthStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrowthStep::UntieHead => write!(f, "untie the LM head"),
            GrowthStep::Hidden { from, to, how } => {
                let how = match how {
                    HiddenGrowth::Pad => "zero padding",
                    HiddenGrowth::Tile => "tiling",
                };
                write!(f, "hidden {from} → {to} ({how})")
            }
            GrowthStep::Heads { from, to } => write!(f, "heads {}/{} kv → {}/{} kv", from.0, from.1, to.0, to.1),
            GrowthStep::Ffn { from, to, how } => {
                let how = match how {
                    FfnGrowth::Fresh => "fresh units",
                    FfnGrowth::Split => "split units",
                };
                write!(f, "ffn {from} → {to} ({how})")
            }
            GrowthStep::Depth { from, to, how } => {
                let how = match how {
                    DepthGrowth::Insert => "identity blocks",
                    DepthGrowth::Stack => "G_stack, not exact",
                };
                write!(f, "layers {from} → {to} ({how})")
            }
            GrowthStep::Context { from, to } => write!(f, "context {from} → {to}"),
        }
    }
}

/// Which dimensions a growth may change (`agora grow --method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrowthMethod {
    /// Only the number of layers (identity blocks).
    Depth,
    /// Only the widths: hidden size, heads, FFN units (and the head untied).
    Width,
    /// Any dimension, by the exact operators.
    #[default]
    Both,
    /// Depth by G_stack (not exact), widths by the exact operators.
    Stack,
}

impl std::str::FromStr for GrowthMethod {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "depth" => GrowthMethod::Depth,
            "width" => GrowthMethod::Width,
            "both" => GrowthMethod::Both,
            "stack" => GrowthMethod::Stack,
            _ => bail!("unknown growth method {s:?}: depth, width, both or stack"),
        })
    }
}

impl GrowthMethod {
    /// Refuses a plan that changes a dimension the method leaves alone (the context may always grow).
    pub fn check(self, steps: &[GrowthStep]) -> Result<()> {
        for step in steps {
            let allowed = match (self, step) {
                (_, GrowthStep::Context { .. }) => true,
                (GrowthMethod::Depth, GrowthStep::Depth { .. }) => true,
                (GrowthMethod::Depth, _) => false,
                (GrowthMethod::Width, GrowthStep::Depth { .. }) => false,
                _ => true,
            };
            ensure!(
                allowed,
                "--method {} does not change this, but the target needs it: {step} (use --method both)",
                self.name()
            );
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            GrowthMethod::Depth => "depth",
            GrowthMethod::Width => "width",
            GrowthMethod::Both => "both",
            GrowthMethod::Stack => "stack",
        }
    }

    /// The depth operator the method uses.
    pub fn depth(self) -> DepthGrowth {
        if self == GrowthMethod::Stack {
            DepthGrowth::Stack
        } else {
            DepthGrowth::Insert
        }
    }
}

/// The operators that take `from` to `to`, in the order [`grow`] applies them; an error names the first
/// dimension no operator can reach (a shrink, a changed vocabulary, head size or RoPE base, an untied model
/// made tied, too few key/value heads for the new groups).
pub fn plan(from: &LlamaConfig, to: &LlamaConfig, options: &GrowthOptions) -> Result<Vec<GrowthStep>> {
    from.validate().context("the source config")?;
    to.validate().context("the target config")?;
    // (what, source value, target value, the fix): dimensions no operator changes.
    let fixed = [
        ("vocab_size", from.vocab_size.to_string(), to.vocab_size.to_string(), None),
        (
            "head size",
            from.head_size().to_string(),
            to.head_size().to_string(),
            Some(format!(
                "give the target num_attention_heads = hidden_size / {0} or \"head_dim\": {0}",
                from.head_size()
            )),
        ),
        ("rope_theta", from.rope_theta.to_string(), to.rope_theta.to_string(), None),
        ("rms_norm_eps", from.rms_norm_eps.to_string(), to.rms_norm_eps.to_string(), None),
        ("rope_scaling", format!("{:?}", from.rope_scaling), format!("{:?}", to.rope_scaling), None),
    ];
    for (what, a, b, fix) in fixed {
        let fix = fix.unwrap_or_else(|| format!("set the target's {what} to the source's {a}"));
        ensure!(a == b, "{what} differs ({a} → {b}): no growth operator changes it; {fix}");
    }
    let grows = |what: &str, a: usize, b: usize| -> Result<bool> {
        ensure!(b >= a, "{what} shrinks ({a} → {b}): growth only adds");
        Ok(b > a)
    };
    let mut steps = Vec::new();
    if from.tie_word_embeddings && !to.tie_word_embeddings {
        steps.push(GrowthStep::UntieHead);
    }
    ensure!(
        from.tie_word_embeddings || !to.tie_word_embeddings,
        "an untied head cannot be tied again: the target config ties the embeddings and the source does not"
    );
    if grows("hidden_size", from.hidden_size, to.hidden_size)? {
        if options.hidden == HiddenGrowth::Tile {
            ensure!(
                to.hidden_size.is_multiple_of(from.hidden_size),
                "tiling needs a hidden size that is a multiple of {}, not {} (--hidden pad takes any size)",
                from.hidden_size,
                to.hidden_size
            );
        }
        steps.push(GrowthStep::Hidden { from: from.hidden_size, to: to.hidden_size, how: options.hidden });
    }
    let (heads, new_heads) = ((from.num_attention_heads, from.kv_heads()), (to.num_attention_heads, to.kv_heads()));
    grows("num_attention_heads", heads.0, new_heads.0)?;
    grows("num_key_value_heads", heads.1, new_heads.1)?;
    if heads != new_heads {
        heads::check(heads, new_heads)?;
        steps.push(GrowthStep::Heads { from: heads, to: new_heads });
    }
    if grows("intermediate_size", from.intermediate_size, to.intermediate_size)? {
        steps.push(GrowthStep::Ffn { from: from.intermediate_size, to: to.intermediate_size, how: options.ffn });
    }
    if grows("num_hidden_layers", from.num_hidden_layers, to.num_hidden_layers)? {
        steps.push(GrowthStep::Depth { from: from.num_hidden_layers, to: to.num_hidden_layers, how: options.depth });
    }
    if grows("max_position_embeddings", from.max_position_embeddings, to.max_position_embeddings)? {
        steps.push(GrowthStep::Context { from: from.max_position_embeddings, to: to.max_position_embeddings });
    }
    Ok(steps)
}

/// Grows `from` to the shape of `to` by [`plan`]'s steps. The result's config is `to`, keeping the source's
/// token ids (bos, eos, pad) where `to` names none.
pub fn grow(from: &Weights, to: &LlamaConfig, options: &GrowthOptions) -> Result<Weights> {
    grow_with(from, to, options, Fill::Weights { seed: options.seed })
}

/// The same steps as [`grow`] on a companion of the weights (`from.tensors` shaped as the parameters of
/// `from.config`, e.g. an optimizer's moments): entries that move with a weight keep their value, new
/// entries are zero ([`Fill::Companion`]).
pub fn grow_companion(from: &Weights, to: &LlamaConfig, options: &GrowthOptions) -> Result<Weights> {
    grow_with(from, to, options, Fill::Companion)
}

fn grow_with(from: &Weights, to: &LlamaConfig, options: &GrowthOptions, fill: Fill) -> Result<Weights> {
    let steps = plan(&from.config, to, options)?;
    let mut w = Weights { config: from.config.clone(), tensors: from.shallow_tensors() };
    for step in &steps {
        w = match *step {
            GrowthStep::UntieHead => untie_head(&w)?,
            GrowthStep::Hidden { to, how, .. } => widen_hidden(&w, to, how, fill)?,
            GrowthStep::Heads { to: (heads, kv), .. } => add_heads(&w, heads, kv, fill)?,
            GrowthStep::Ffn { to, how, .. } => widen_ffn(&w, to, how, fill)?,
            GrowthStep::Depth { to, how: DepthGrowth::Insert, from } => {
                insert_layers(&w, &spread_positions(from, to - from), fill)?
            }
            GrowthStep::Depth { to, how: DepthGrowth::Stack, .. } => stack_layers(&w, to)?,
            GrowthStep::Context { to, .. } => {
                let mut config = w.config.clone();
                config.max_position_embeddings = to;
                Weights { config, tensors: w.tensors }
            }
        };
    }
    let mut config = to.clone();
    config.bos_token_id = config.bos_token_id.or(from.config.bos_token_id);
    config.eos_token_id = config.eos_token_id.clone().or_else(|| from.config.eos_token_id.clone());
    config.pad_token_id = config.pad_token_id.or(from.config.pad_token_id);
    if parameter_shapes(&config) != parameter_shapes(&w.config) {
        bail!("growth ended at a shape other than the target's (a bug in plan: {steps:?})");
    }
    Weights::new(config, w.tensors)
}

/// A new config with `edit` applied, validated.
fn edited(config: &LlamaConfig, edit: impl FnOnce(&mut LlamaConfig)) -> Result<LlamaConfig> {
    let mut c = config.clone();
    edit(&mut c);
    c.validate()?;
    Ok(c)
}

/// The config's head size, written out when the new hidden size and head count no longer imply it.
fn keep_head_size(c: &mut LlamaConfig, head_size: usize) {
    c.head_dim = (c.hidden_size != head_size * c.num_attention_heads).then_some(head_size);
}
