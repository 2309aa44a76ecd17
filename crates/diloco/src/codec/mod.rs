//! Compressed pseudo-gradients: the codecs a run can choose (`[compression]` in the run file), the wire
//! format every Δ travels in, the worker's side (error feedback: what compression drops is kept and sent
//! later) and the coordinator's side (decode-and-accumulate in one model-sized buffer, whatever the number
//! of workers).
//!
//! Wire format, version 1 (little-endian):
//! ```text
//! "AGDZ"  u16 version  u8 codec  u8 values  u32 block  u32 chunk  u32 keep  u32 fragment  u32 fragments
//! u32 tensors  u32 metadata_len  [32] blake3 digest of the tensors' names and shapes
//! tensors × (u64 elements, u64 section_len)
//! metadata: JSON object of strings (round, unit, base hash, train loss), exactly as serde_json::to_vec
//!           writes a BTreeMap<String, String> (compact, keys sorted)
//! sections, in tensor order (see `section`)
//! [32] blake3 of everything before it
//! ```
//! A receiver knows the run's codec and the tensors of each fragment, so it can compute every length in the
//! header before reading further: [`parse`] refuses any payload that differs by a byte from what the run
//! allows, and never allocates more than the payload's own size.

pub mod bits;
pub mod config;
pub mod dct;
pub mod section;

pub use config::{Codec, CompressionConfig, Values};

use agora_protocol::{NamedTensor, TensorSpec};
use dct::Dct;
use std::collections::BTreeMap;

pub const MAGIC: &[u8; 4] = b"AGDZ";
pub const WIRE_VERSION: u16 = 1;
const FIXED_HEADER: usize = 4 + 2 + 1 + 1 + 4 * 7 + 32;
const CHECKSUM: usize = 32;
/// Largest metadata object a payload may carry.
pub const MAX_METADATA: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed compressed pseudo-gradient: {0}")]
    Malformed(String),
    #[error("{0}")]
    WrongCodec(String),
    #[error("{0}")]
    Shape(String),
    #[error("the payload is fragment {got}, this round synchronises fragment {expected}")]
    WrongFragment { got: usize, expected: usize },
    #[error("non-finite {0} (NaN or ±inf)")]
    NonFinite(String),
}

impl CodecError {
    /// A stable machine-readable code for error bodies and counters.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::Malformed(_) => "malformed_delta",
            CodecError::WrongCodec(_) => "wrong_codec",
            CodecError::Shape(_) => "shape_mismatch",
            CodecError::WrongFragment { .. } => "wrong_fragment",
            CodecError::NonFinite(_) => "non_finite",
        }
    }

    /// Whether the request was unreadable (400) rather than readable but unacceptable (422).
    pub fn is_malformed(&self) -> bool {
        matches!(self, CodecError::Malformed(_))
    }
}

/// A digest of the tensors a payload covers (names and shapes, in order).
pub fn specs_digest(specs: &[TensorSpec]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for s in specs {
        h.update(&(s.name.len() as u32).to_le_bytes());
        h.update(s.name.as_bytes());
        h.update(&(s.shape.len() as u32).to_le_bytes());
        for d in &s.shape {
            h.update(&(*d as u64).to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}

fn elements(spec: &TensorSpec) -> usize {
    spec.shape.iter().product()
}

/// Bytes of a payload for these tensors, header and checksum included, with `metadata_len` bytes of metadata.
pub fn payload_len(config: &CompressionConfig, specs: &[TensorSpec], metadata_len: usize) -> usize {
    FIXED_HEADER
        + 16 * specs.len()
        + metadata_len
        + specs.iter().map(|s| section::section_len(config, elements(s))).sum::<usize>()
        + CHECKSUM
}

/// What a receiver expects of a payload: the run's codec, the fragment this round synchronises, and that
/// fragment's tensors.
#[derive(Clone, Copy)]
pub struct Expected<'a> {
    pub config: &'a CompressionConfig,
    pub fragment: usize,
    pub specs: &'a [TensorSpec],
}

/// A payload that passed every check; its sections borrow the received bytes.
pub struct Payload<'a> {
    pub metadata: BTreeMap<String, String>,
    sections: Vec<&'a [u8]>,
}

fn write_header(
    out: &mut Vec<u8>,
    config: &CompressionConfig,
    fragment: usize,
    specs: &[TensorSpec],
    sections: &[Vec<u8>],
    metadata: &[u8],
) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.push(config.codec_id());
    out.push(config.values_id());
    for v in [config.block, config.chunk, config.keep, fragment, config.fragments, specs.len(), metadata.len()] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&specs_digest(specs));
    for (spec, s) in specs.iter().zip(sections) {
        out.extend_from_slice(&(elements(spec) as u64).to_le_bytes());
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
}

/// Assembles a payload from encoded sections (one per spec, in order).
pub fn assemble(
    config: &CompressionConfig,
    fragment: usize,
    specs: &[TensorSpec],
    sections: &[Vec<u8>],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    assert_eq!(specs.len(), sections.len(), "one section per tensor");
    let metadata = canonical_metadata(metadata);
    assert!(metadata.len() <= MAX_METADATA, "payload metadata too large");
    let mut out = Vec::with_capacity(payload_len(config, specs, metadata.len()));
    write_header(&mut out, config, fragment, specs, sections, &metadata);
    out.extend_from_slice(&metadata);
    sections.iter().for_each(|s| out.extend_from_slice(s));
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

/// The one encoding of a payload's metadata, which [`assemble`] writes and [`parse`] requires.
fn canonical_metadata(metadata: &BTreeMap<String, String>) -> Vec<u8> {
    serde_json::to_vec(metadata).expect("a string map serialises")
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            CodecError::Malformed(format!("truncated: needs {n} bytes at offset {} of {}", self.at, self.bytes.len()))
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Parses and fully validates an untrusted payload against what the run expects.
pub fn parse<'a>(bytes: &'a [u8], expected: Expected<'_>) -> Result<Payload<'a>, CodecError> {
    parse_checked(bytes, expected, true)
}

/// Parses bytes that [`parse`] has already accepted (the same buffer, within one request): the header and
/// every length are checked again, which is all decoding relies on for its bounds, but the checksum and the
/// per-value checks are not repeated.
pub fn parse_accepted<'a>(bytes: &'a [u8], expected: Expected<'_>) -> Result<Payload<'a>, CodecError> {
    parse_checked(bytes, expected, false)
}

fn parse_checked<'a>(bytes: &'a [u8], expected: Expected<'_>, values: bool) -> Result<Payload<'a>, CodecError> {
    let config = expected.config;
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(CodecError::Malformed("not an agora pseudo-gradient (bad magic bytes)".into()));
    }
    let version = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
    if version != WIRE_VERSION {
        return Err(CodecError::Malformed(format!("wire version {version}, this coordinator reads {WIRE_VERSION}")));
    }
    let ids = r.take(2)?;
    let [block, chunk, keep, fragment, fragments, tensors, metadata_len] =
        [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?].map(|v| v as usize);
    if ids != [config.codec_id(), config.values_id()]
        || (block, chunk, keep, fragments) != (config.block, config.chunk, config.keep, config.fragments)
    {
        return Err(CodecError::WrongCodec(format!(
            "the payload's codec (id {}, values {}, block {block}, chunk {chunk}, keep {keep}, {fragments} fragments) \
             is not the run's ({})",
            ids[0],
            ids[1],
            config.describe()
        )));
    }
    if fragment != expected.fragment {
        return Err(CodecError::WrongFragment { got: fragment, expected: expected.fragment });
    }
    if tensors != expected.specs.len() {
        return Err(CodecError::Shape(format!(
            "the payload has {tensors} tensors, fragment {fragment} has {}",
            expected.specs.len()
        )));
    }
    if r.take(32)? != specs_digest(expected.specs) {
        return Err(CodecError::Shape("the payload's tensor names and shapes are not the run's model".into()));
    }
    for spec in expected.specs {
        let (n, len) = (r.u64()?, r.u64()?);
        let want = (elements(spec) as u64, section::section_len(config, elements(spec)) as u64);
        if (n, len) != want {
            return Err(CodecError::Shape(format!(
                "{}: header says {n} elements in {len} bytes, expected {} in {}",
                spec.name, want.0, want.1
            )));
        }
    }
    if metadata_len > MAX_METADATA {
        return Err(CodecError::Malformed(format!("metadata of {metadata_len} bytes exceeds {MAX_METADATA}")));
    }
    let total = payload_len(config, expected.specs, metadata_len);
    if bytes.len() != total {
        return Err(CodecError::Malformed(format!("{} bytes, the header implies {total}", bytes.len())));
    }
    let (body, checksum) = bytes.split_at(total - CHECKSUM);
    if values && blake3::hash(body).as_bytes() != checksum {
        return Err(CodecError::Malformed("checksum mismatch (corrupted in transit?)".into()));
    }
    let raw_metadata = r.take(metadata_len)?;
    let metadata: BTreeMap<String, String> = serde_json::from_slice(raw_metadata)
        .map_err(|e| CodecError::Malformed(format!("metadata is not a JSON object of strings: {e}")))?;
    // One encoding: exactly the bytes `assemble` writes for this map (compact, keys sorted and unique,
    // serde_json's escaping), not merely JSON that parses to it.
    if canonical_metadata(&metadata) != raw_metadata {
        return Err(CodecError::Malformed(
            "metadata is not in canonical form: write it as serde_json::to_vec of a sorted string map (compact, \
             keys sorted and unique, no whitespace, only the escapes JSON requires)"
                .into(),
        ));
    }
    let mut sections = Vec::with_capacity(expected.specs.len());
    for spec in expected.specs {
        let s = r.take(section::section_len(config, elements(spec)))?;
        if values {
            section::validate(config, elements(spec), s).map_err(|e| match e {
                CodecError::Malformed(m) => CodecError::Malformed(format!("{}: {m}", spec.name)),
                CodecError::NonFinite(m) => CodecError::NonFinite(format!("{m} in {}", spec.name)),
                other => other,
            })?;
        }
        sections.push(s);
    }
    debug_assert_eq!(r.at, total - CHECKSUM);
    Ok(Payload { metadata, sections })
}

/// Compresses `delta` (one fragment's tensors, in spec order) for sending. With error feedback, `residual`
/// (what earlier rounds' compression dropped, same tensors) is scaled by the decay and added first; the
/// second result is the residual to keep if this payload is accepted: (residual + Δ) − decode(payload).
/// Without error feedback (or for `none`) the new residual is empty.
pub fn compress(
    config: &CompressionConfig,
    fragment: usize,
    specs: &[TensorSpec],
    delta: &[Vec<f32>],
    residual: Option<&[Vec<f32>]>,
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<Vec<f32>>) {
    assert_eq!(specs.len(), delta.len(), "one Δ tensor per spec");
    let mut dct = Dct::default();
    let feedback = config.uses_feedback();
    let decay = config.feedback_decay as f32;
    let mut sections = Vec::with_capacity(specs.len());
    let mut residual_out = Vec::new();
    for (i, (spec, d)) in specs.iter().zip(delta).enumerate() {
        assert_eq!(d.len(), elements(spec), "{}: Δ has the wrong size", spec.name);
        let target: Vec<f32> = match residual.filter(|_| feedback) {
            Some(res) => d.iter().zip(&res[i]).map(|(d, e)| d + decay * e).collect(),
            None => d.clone(),
        };
        let s = section::encode(config, &target, &mut dct);
        if feedback {
            let mut sent = vec![0f32; target.len()];
            section::accumulate(config, &s, &mut sent);
            if config.codec == Codec::Dct {
                section::inverse_dct(config, &mut sent, &mut dct);
            }
            residual_out.push(target.iter().zip(&sent).map(|(t, s)| t - s).collect());
        }
        sections.push(s);
    }
    (assemble(config, fragment, specs, &sections, metadata), residual_out)
}

/// Bytes of a payload's fixed header: enough to learn its metadata length ([`header_metadata_len`]) and
/// so where every section lies ([`section_ranges`]) without reading the rest.
pub const HEADER_LEN: usize = FIXED_HEADER;

/// The metadata length a payload's fixed header announces; None when `header` is not an agora header.
pub fn header_metadata_len(header: &[u8]) -> Option<usize> {
    if header.len() < FIXED_HEADER || &header[..4] != MAGIC {
        return None;
    }
    // magic (4), version (2), codec and values ids (2), then 7 u32: block, chunk, keep, fragment,
    // fragments, tensors, metadata length.
    Some(u32::from_le_bytes(header[32..36].try_into().expect("4 bytes")) as usize)
}

/// Where each tensor's section lies in a payload for `specs` with `metadata_len` bytes of metadata: lets a
/// receiver that stored a payload it had fully [`parse`]d read one tensor of it at a time.
pub fn section_ranges(
    config: &CompressionConfig,
    specs: &[TensorSpec],
    metadata_len: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut at = FIXED_HEADER + 16 * specs.len() + metadata_len;
    specs
        .iter()
        .map(|s| {
            let len = section::section_len(config, elements(s));
            at += len;
            at - len..at
        })
        .collect()
}

/// Decodes one tensor's section (of a payload [`parse`] accepted): the same values, bit for bit, as that
/// tensor of [`decode`].
pub fn decode_section(config: &CompressionConfig, spec: &TensorSpec, section_bytes: &[u8]) -> Vec<f32> {
    assert_eq!(section_bytes.len(), section::section_len(config, elements(spec)), "{}: section length", spec.name);
    let mut data = vec![0f32; elements(spec)];
    section::accumulate(config, section_bytes, &mut data);
    if config.codec == Codec::Dct {
        section::inverse_dct(config, &mut data, &mut Dct::default());
    }
    data
}

/// Decodes a whole payload into dense tensors (what its receiver adds to the sum).
pub fn decode(config: &CompressionConfig, specs: &[TensorSpec], payload: &Payload<'_>) -> Vec<NamedTensor> {
    let mut acc = Accumulator::new(*config, specs.to_vec());
    acc.add(payload);
    acc.mean()
}

/// The sum of a round's payloads, one model-sized (or fragment-sized) f32 buffer however many there are.
/// Payloads are added in the order given; the coordinator replays a round in its acceptance order, so
/// the result is bit-identical after a restart.
pub struct Accumulator {
    config: CompressionConfig,
    specs: Vec<TensorSpec>,
    sums: Vec<Vec<f32>>,
    count: usize,
}

impl Accumulator {
    pub fn new(config: CompressionConfig, specs: Vec<TensorSpec>) -> Self {
        let sums = specs.iter().map(|s| vec![0f32; elements(s)]).collect();
        Accumulator { config, specs, sums, count: 0 }
    }

    /// Adds a payload parsed against this accumulator's specs.
    pub fn add(&mut self, payload: &Payload<'_>) {
        assert_eq!(payload.sections.len(), self.sums.len(), "payload parsed for other tensors");
        for (sum, s) in self.sums.iter_mut().zip(&payload.sections) {
            section::accumulate(&self.config, s, sum);
        }
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The mean of everything added.
    pub fn mean(self) -> Vec<NamedTensor> {
        assert!(self.count > 0, "mean of no pseudo-gradients");
        let count = self.count as f32;
        let mut dct = Dct::default();
        self.specs
            .into_iter()
            .zip(self.sums)
            .map(|(spec, mut data)| {
                if self.config.codec == Codec::Dct {
                    section::inverse_dct(&self.config, &mut data, &mut dct);
                }
                data.iter_mut().for_each(|v| *v /= count);
                NamedTensor { name: spec.name, shape: spec.shape, data }
            })
            .collect()
    }
}
