//! libtorch parameters ⇄ protocol tensor payloads.

use agora_model::llama::parameter_shapes;
use agora_model::{Llama, LlamaConfig};
use agora_protocol::{NamedTensor, TensorSpec};
use tch::{Device, Kind, Tensor};

/// The names and shapes a model's weights, pseudo-gradients and momentum buffers have, in model order.
pub fn param_specs(config: &LlamaConfig) -> Vec<TensorSpec> {
    parameter_shapes(config)
        .into_iter()
        .map(|(name, shape)| TensorSpec { name, shape: shape.into_iter().map(|d| d as usize).collect() })
        .collect()
}

/// Copies tensors to host f32 payload form.
pub fn to_named(specs: &[TensorSpec], tensors: &[Tensor]) -> Vec<NamedTensor> {
    assert_eq!(specs.len(), tensors.len(), "one tensor per spec");
    specs
        .iter()
        .zip(tensors)
        .map(|(spec, t)| {
            let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
            let data = Vec::<f32>::try_from(&flat).expect("f32 tensor converts to Vec<f32>");
            assert_eq!(data.len(), spec.shape.iter().product::<usize>(), "tensor {} has the wrong size", spec.name);
            NamedTensor { name: spec.name.clone(), shape: spec.shape.clone(), data }
        })
        .collect()
}

pub fn from_named(tensors: &[NamedTensor], device: Device) -> Vec<Tensor> {
    tensors
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            Tensor::from_slice(&t.data).view(shape.as_slice()).to_device(device)
        })
        .collect()
}

/// Detached copies of a model's weights.
pub fn model_weights(model: &Llama) -> Vec<Tensor> {
    tch::no_grad(|| model.parameters().iter().map(|(_, p)| p.detach().copy()).collect())
}

/// Overwrites a model's weights in place.
pub fn load_weights(model: &Llama, weights: &[Tensor]) {
    assert_eq!(model.parameters().len(), weights.len(), "one tensor per model parameter");
    tch::no_grad(|| {
        for ((name, p), w) in model.parameters().iter().zip(weights) {
            assert_eq!(p.size(), w.size(), "{name}: shape differs");
            p.shallow_clone().copy_(w);
        }
    });
}
