//! The tensor payload decoder takes untrusted bytes: round trips are exact, and nothing panics.

use agora_protocol::{decode_tensors, encode_tensors, NamedTensor, TensorError, TensorSpec};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn sample() -> (Vec<NamedTensor>, Vec<TensorSpec>) {
    let tensors = vec![
        NamedTensor {
            name: "model.embed_tokens.weight".into(),
            shape: vec![3, 2],
            data: vec![0.5, -1.0, 2.0, 0.0, 1e-8, 3.25],
        },
        NamedTensor { name: "model.norm.weight".into(), shape: vec![2], data: vec![1.0, 1.5] },
    ];
    let specs = tensors.iter().map(NamedTensor::spec).collect();
    (tensors, specs)
}

fn meta() -> BTreeMap<String, String> {
    BTreeMap::from([("agora.round".to_string(), "7".to_string()), ("agora.unit".to_string(), "3".to_string())])
}

#[test]
fn round_trip_keeps_values_order_and_metadata() {
    let (tensors, specs) = sample();
    let bytes = encode_tensors(&tensors, &meta());
    let (decoded, metadata) = decode_tensors(&bytes, Some(&specs)).unwrap();
    assert_eq!(decoded, tensors);
    assert_eq!(metadata, meta());
    // Encoding is deterministic, so a retried upload hashes the same.
    assert_eq!(encode_tensors(&tensors, &meta()), bytes);
}

#[test]
fn wrong_shape_missing_extra_and_non_finite_are_refused() {
    let (tensors, specs) = sample();
    let mut wrong = specs.clone();
    wrong[1].shape = vec![3];
    let bytes = encode_tensors(&tensors, &meta());
    assert!(matches!(decode_tensors(&bytes, Some(&wrong)), Err(TensorError::Shape { .. })));
    let mut more = specs.clone();
    more.push(TensorSpec { name: "lm_head.weight".into(), shape: vec![2] });
    assert!(matches!(decode_tensors(&bytes, Some(&more)), Err(TensorError::Missing { .. })));
    assert!(matches!(decode_tensors(&bytes, Some(&specs[..1])), Err(TensorError::Unexpected { .. })));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut t = tensors.clone();
        t[0].data[4] = bad;
        let err = decode_tensors(&encode_tensors(&t, &meta()), Some(&specs)).unwrap_err();
        assert_eq!(err, TensorError::NonFinite { name: "model.embed_tokens.weight".into(), count: 1 });
        assert_eq!(err.code(), "non_finite");
    }
}

#[test]
fn other_dtypes_are_refused() {
    // A hand-made safetensors file holding one F16 tensor.
    let header = br#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0, 60, 0, 60]);
    let specs = [TensorSpec { name: "x".into(), shape: vec![2] }];
    assert!(matches!(decode_tensors(&bytes, Some(&specs)), Err(TensorError::Dtype { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (_, specs) = sample();
        let _ = decode_tensors(&bytes, Some(&specs));
        let _ = decode_tensors(&bytes, None);
    }

    /// Corrupting any byte of a valid payload gives an error or a payload that still satisfies the spec.
    #[test]
    fn corrupted_payloads_decode_or_fail_cleanly(index in any::<usize>(), value in any::<u8>(), cut in any::<bool>()) {
        let (tensors, specs) = sample();
        let mut bytes = encode_tensors(&tensors, &meta());
        let i = index % bytes.len();
        if cut {
            bytes.truncate(i);
        } else {
            bytes[i] = value;
        }
        if let Ok((decoded, _)) = decode_tensors(&bytes, Some(&specs)) {
            prop_assert_eq!(decoded.len(), specs.len());
            for (t, s) in decoded.iter().zip(&specs) {
                prop_assert_eq!(&t.shape, &s.shape);
                prop_assert!(t.data.iter().all(|v| v.is_finite()));
            }
        }
    }

    /// Any finite values round-trip bit-exactly.
    #[test]
    fn finite_values_round_trip(data in proptest::collection::vec(-1e30f32..1e30f32, 1..64)) {
        let t = vec![NamedTensor { name: "w".into(), shape: vec![data.len()], data: data.clone() }];
        let specs = [t[0].spec()];
        let (decoded, _) = decode_tensors(&encode_tensors(&t, &BTreeMap::new()), Some(&specs)).unwrap();
        prop_assert_eq!(&decoded[0].data, &data);
    }
}
