//! Tensor payloads: weights, pseudo-gradients and optimizer state travel as safetensors files
//! (readable by every HF tool), f32 little-endian, with string metadata in `__metadata__`.
//!
//! [`decode_tensors`] is the only door for untrusted tensor bytes: it checks structure, dtype, the
//! exact set of names and shapes the receiver expects, and that every value is finite.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};

/// The `__metadata__` key under which agora keeps its (sorted, JSON-encoded) payload metadata.
pub const METADATA_KEY: &str = "agora";

/// Name and shape a receiver expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// One named f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn spec(&self) -> TensorSpec {
        TensorSpec { name: self.name.clone(), shape: self.shape.clone() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("not a valid safetensors payload: {0}")]
    Malformed(String),
    #[error("tensor {name} has dtype {dtype}, expected F32")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name} is missing")]
    Missing { name: String },
    #[error("unexpected tensor {name}")]
    Unexpected { name: String },
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor {name} holds {count} non-finite values (NaN or ±inf)")]
    NonFinite { name: String, count: usize },
}

impl TensorError {
    /// A stable machine-readable code for error bodies and counters.
    pub fn code(&self) -> &'static str {
        match self {
            TensorError::Malformed(_) => "malformed_tensors",
            TensorError::Dtype { .. } => "dtype_mismatch",
            TensorError::Missing { .. } | TensorError::Unexpected { .. } | TensorError::Shape { .. } => {
                "shape_mismatch"
            }
            TensorError::NonFinite { .. } => "non_finite",
        }
    }
}

/// Serialises tensors (in the given order; safetensors stores them sorted by name) with `metadata`.
pub fn encode_tensors(tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len(), "tensor {}: shape and data disagree", t.name);
            (t.name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), b).expect("shape matches data"))
        })
        .collect();
    // One key holding canonical (sorted) JSON: safetensors keeps metadata in a HashMap, whose order
    // would otherwise make the same payload hash differently from one process to the next.
    let info: HashMap<String, String> =
        [(METADATA_KEY.to_string(), serde_json::to_string(metadata).expect("string map serialises"))].into();
    safetensors::serialize(views, Some(info)).expect("f32 tensors with consistent shapes always serialise")
}

/// Parses and validates a payload. With `expected`, the names and shapes must match it exactly and the
/// result follows its order; without, tensors come back sorted by name. Values must be finite.
pub fn decode_tensors(
    bytes: &[u8],
    expected: Option<&[TensorSpec]>,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>), TensorError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| TensorError::Malformed(e.to_string()))?;
    let metadata: BTreeMap<String, String> = match header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| TensorError::Malformed(format!("metadata {METADATA_KEY:?} is not a JSON string map: {e}")))?,
        None => BTreeMap::new(),
    };
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| TensorError::Malformed(e.to_string()))?;
    let mut names: Vec<String> = parsed.names().into_iter().map(str::to_string).collect();
    names.sort();
    let order: Vec<TensorSpec> = match expected {
        Some(specs) => {
            for name in &names {
                if !specs.iter().any(|s| &s.name == name) {
                    return Err(TensorError::Unexpected { name: name.clone() });
                }
            }
            specs.to_vec()
        }
        None => names
            .iter()
            .map(|n| TensorSpec {
                name: n.clone(),
                shape: parsed.tensor(n).map(|t| t.shape().to_vec()).unwrap_or_default(),
            })
            .collect(),
    };
    let mut out = Vec::with_capacity(order.len());
    for spec in order {
        let view = parsed.tensor(&spec.name).map_err(|_| TensorError::Missing { name: spec.name.clone() })?;
        if view.dtype() != Dtype::F32 {
            return Err(TensorError::Dtype { name: spec.name, dtype: format!("{:?}", view.dtype()) });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(TensorError::Shape { name: spec.name, got: view.shape().to_vec(), expected: spec.shape });
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let non_finite = data.iter().filter(|v| !v.is_finite()).count();
        if non_finite > 0 {
            return Err(TensorError::NonFinite { name: spec.name, count: non_finite });
        }
        out.push(NamedTensor { name: spec.name, shape: spec.shape, data });
    }
    Ok((out, metadata))
}
