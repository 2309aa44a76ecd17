//! One tensor's encoded bytes (a "section") under a [`CompressionConfig`]: its exact length, encoding,
//! validation of untrusted bytes, and decoding by accumulation (`out += decoded`).
//!
//! Layouts (little-endian):
//! - `none`: n × f32. `bf16`: n × bf16.
//! - `int8` / `int4`: ⌈n/block⌉ × f32 scales, then n × i8 (or n two's-complement nibbles, low nibble first,
//!   levels −7..7; −8 is not a valid code).
//! - `topk` / `dct`: per group of `block` chunks its scales (2 × f32 for `2bit`, 1 × f32 for `sign`, none
//!   otherwise); then every kept index within its chunk, ⌈log₂ chunk⌉ bits each, ascending within a chunk;
//!   then the kept values (f32, bf16, 2-bit codes or sign bits). A chunk of length L keeps min(keep, L).
//!
//! Every unused padding bit is zero. Beyond the layout, [`validate`] refuses what the encoder never writes
//! where it would be a second encoding of the same values: a −0 scale; an integer block whose scale is 0
//! but whose codes are not all 0, whose scale is positive but whose codes are all 0, or whose scale is a
//! normal float but whose largest code magnitude is not the level count (7 or 127); a 2-bit group whose low
//! magnitude exceeds its high one, whose codes never use its high magnitude, whose codes never use a
//! nonzero low magnitude, or whose magnitudes are 0 but whose codes are not all 2 ("positive, high"); a
//! kept zero (f32 values, or a 2-bit group of zero magnitudes) at a chunk position above one that is not
//! kept (the encoder keeps a chunk's zeros at its lowest positions). Left, because the encoder's own output
//! has them: the sign of a zero; which positions keep a zero under bf16 or sign values or through a 2-bit
//! low magnitude of 0 (a tiny value rounds to zero there); the high/low bit of a 2-bit code when the two
//! magnitudes are equal; the codes of an integer block with a subnormal scale; and two scales an ulp apart
//! that decode a block to the same values.

use super::bits::{pack, packed_len, Unpacker};
use super::config::{Codec, CompressionConfig, Values};
use super::dct::Dct;
use super::CodecError;

/// No decoded value may exceed this magnitude, so that a sum over any realistic number of workers stays
/// finite in f32 (≈ 3.4·10³⁸).
pub const MAX_MAGNITUDE: f32 = 1e30;

pub(crate) fn index_bits(chunk: usize) -> u32 {
    usize::BITS - (chunk - 1).leading_zeros()
}

fn kept_in(cfg: &CompressionConfig, len: usize) -> usize {
    cfg.keep.min(len)
}

/// Values kept for a tensor of `n` elements.
pub(crate) fn kept_total(cfg: &CompressionConfig, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let chunks = n.div_ceil(cfg.chunk);
    let last = n - (chunks - 1) * cfg.chunk;
    (chunks - 1) * kept_in(cfg, cfg.chunk) + kept_in(cfg, last)
}

fn scales_per_group(values: Values) -> usize {
    match values {
        Values::TwoBit => 2,
        Values::Sign => 1,
        Values::F32 | Values::Bf16 => 0,
    }
}

/// The exact byte length of a tensor of `n` elements' section.
pub fn section_len(cfg: &CompressionConfig, n: usize) -> usize {
    match cfg.codec {
        Codec::None => 4 * n,
        Codec::Bf16 => 2 * n,
        Codec::Int8 => 4 * n.div_ceil(cfg.block) + n,
        Codec::Int4 => 4 * n.div_ceil(cfg.block) + n.div_ceil(2),
        Codec::TopK | Codec::Dct => {
            let k = kept_total(cfg, n);
            let groups = n.div_ceil(cfg.chunk).div_ceil(cfg.block);
            let values = match cfg.values {
                Values::F32 => 4 * k,
                Values::Bf16 => 2 * k,
                Values::TwoBit => packed_len(k, 2),
                Values::Sign => packed_len(k, 1),
            };
            4 * groups * scales_per_group(cfg.values) + packed_len(k, index_bits(cfg.chunk)) + values
        }
    }
}

pub(crate) fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn read_f32(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
}

fn read_bf16(bytes: &[u8], i: usize) -> f32 {
    bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]))
}

fn check_value(v: f32, what: &str) -> Result<(), CodecError> {
    if !v.is_finite() {
        return Err(CodecError::NonFinite(what.to_string()));
    }
    if v.abs() > MAX_MAGNITUDE {
        return Err(CodecError::Malformed(format!("{what} {v:e} exceeds the largest allowed magnitude")));
    }
    Ok(())
}

fn check_scale(s: f32, levels: f32) -> Result<(), CodecError> {
    check_value(s, "scale")?;
    // The encoder's scales are magnitudes (never −0), so the sign bit must be clear.
    if s.is_sign_negative() || s * levels > MAX_MAGNITUDE {
        return Err(CodecError::Malformed(format!("scale {s:e} is negative (or −0) or too large")));
    }
    Ok(())
}

/// The integer code of element `i` (int8 byte, or int4 nibble, low nibble first).
fn int_code(codec: Codec, codes: &[u8], i: usize) -> i8 {
    if codec == Codec::Int8 {
        codes[i] as i8
    } else {
        let byte = codes[i / 2];
        let nibble = if i.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 };
        ((nibble << 4) as i8) >> 4
    }
}

/// Encodes one tensor's values. `dct` caches DCT bases between calls.
pub fn encode(cfg: &CompressionConfig, data: &[f32], dct: &mut Dct) -> Vec<u8> {
    let n = data.len();
    let mut out = Vec::with_capacity(section_len(cfg, n));
    match cfg.codec {
        Codec::None => data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Codec::Bf16 => data.iter().for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        Codec::Int8 | Codec::Int4 => {
            let levels = if cfg.codec == Codec::Int8 { 127.0 } else { 7.0 };
            let mut codes = Vec::with_capacity(n);
            for block in data.chunks(cfg.block) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / levels;
                out.extend_from_slice(&scale.to_le_bytes());
                for v in block {
                    let q = if scale > 0.0 { (v / scale).round().clamp(-levels, levels) } else { 0.0 };
                    codes.push(q as i8);
                }
            }
            if cfg.codec == Codec::Int8 {
                out.extend(codes.iter().map(|&q| q as u8));
            } else {
                out.extend(
                    codes.chunks(2).map(|p| (p[0] as u8 & 0x0F) | ((p.get(1).copied().unwrap_or(0) as u8) << 4)),
                );
            }
        }
        Codec::TopK | Codec::Dct => encode_sparse(cfg, data, dct, &mut out),
    }
    debug_assert_eq!(out.len(), section_len(cfg, n));
    out
}

fn encode_sparse(cfg: &CompressionConfig, data: &[f32], dct: &mut Dct, out: &mut Vec<u8>) {
    let mut coefficients = vec![0f32; if cfg.codec == Codec::Dct { cfg.chunk } else { 0 }];
    let mut indices: Vec<u32> = Vec::with_capacity(kept_total(cfg, data.len()));
    let mut values: Vec<f32> = Vec::with_capacity(indices.capacity());
    let mut order: Vec<u32> = Vec::with_capacity(cfg.chunk);
    for chunk in data.chunks(cfg.chunk) {
        let c: &[f32] = if cfg.codec == Codec::Dct {
            dct.forward(chunk, &mut coefficients[..chunk.len()]);
            &coefficients[..chunk.len()]
        } else {
            chunk
        };
        let k = kept_in(cfg, c.len());
        order.clear();
        order.extend(0..c.len() as u32);
        if k < c.len() {
            // Largest magnitude first; equal magnitudes by position, so the choice is deterministic.
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                c[b as usize].abs().total_cmp(&c[a as usize].abs()).then(a.cmp(&b))
            });
        }
        let kept = &mut order[..k];
        kept.sort_unstable();
        for &i in kept.iter() {
            indices.push(i);
            values.push(c[i as usize]);
        }
    }
    // Scales and codes per group of `block` chunks.
    let per_chunk = kept_in(cfg, cfg.chunk);
    let group_values = per_chunk * cfg.block;
    let mut codes: Vec<u32> = Vec::with_capacity(values.len());
    if scales_per_group(cfg.values) > 0 {
        for group in values.chunks(group_values) {
            let mags: Vec<f64> = group.iter().map(|v| v.abs() as f64).collect();
            let mean = mags.iter().sum::<f64>() / mags.len() as f64;
            if cfg.values == Values::Sign {
                out.extend_from_slice(&(mean as f32).to_le_bytes());
                codes.extend(group.iter().map(|v| (*v < 0.0) as u32));
            } else {
                let (mut lo, mut nlo, mut hi, mut nhi) = (0.0, 0usize, 0.0, 0usize);
                for &m in &mags {
                    if m >= mean {
                        hi += m;
                        nhi += 1;
                    } else {
                        lo += m;
                        nlo += 1;
                    }
                }
                let lo = if nlo > 0 { lo / nlo as f64 } else { 0.0 };
                let hi = if nhi > 0 { hi / nhi as f64 } else { 0.0 };
                out.extend_from_slice(&(lo as f32).to_le_bytes());
                out.extend_from_slice(&(hi as f32).to_le_bytes());
                codes.extend(group.iter().zip(&mags).map(|(v, &m)| (*v < 0.0) as u32 | (((m >= mean) as u32) << 1)));
            }
        }
    }
    let start = out.len();
    out.resize(start + packed_len(indices.len(), index_bits(cfg.chunk)), 0);
    pack(indices.iter().copied(), index_bits(cfg.chunk), &mut out[start..]);
    match cfg.values {
        Values::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Values::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        Values::TwoBit | Values::Sign => {
            let width = if cfg.values == Values::TwoBit { 2 } else { 1 };
            let start = out.len();
            out.resize(start + packed_len(codes.len(), width), 0);
            pack(codes.iter().copied(), width, &mut out[start..]);
        }
    }
}

/// Checks an untrusted section of a tensor of `n` elements (its length is already known to be right):
/// finite, bounded values and scales, indices in range and ascending, canonical codes and padding.
pub fn validate(cfg: &CompressionConfig, n: usize, s: &[u8]) -> Result<(), CodecError> {
    debug_assert_eq!(s.len(), section_len(cfg, n));
    match cfg.codec {
        Codec::None => (0..n).try_for_each(|i| check_value(read_f32(s, i), "value")),
        Codec::Bf16 => (0..n).try_for_each(|i| check_value(read_bf16(s, i), "value")),
        Codec::Int8 | Codec::Int4 => {
            let blocks = n.div_ceil(cfg.block);
            let (levels, name) = if cfg.codec == Codec::Int8 { (127i8, "int8") } else { (7i8, "int4") };
            let codes = &s[4 * blocks..];
            if cfg.codec == Codec::Int4 && n % 2 == 1 && codes.last().is_some_and(|b| b >> 4 != 0) {
                return Err(CodecError::Malformed("int4 padding nibble is not zero".into()));
            }
            for b in 0..blocks {
                let scale = read_f32(s, b);
                check_scale(scale, levels as f32)?;
                let (first, end) = (b * cfg.block, n.min((b + 1) * cfg.block));
                let mut largest = 0u8;
                for i in first..end {
                    let q = int_code(cfg.codec, codes, i);
                    // The code's width already bounds it above by `levels`; only the lowest code is unused.
                    if q < -levels {
                        return Err(CodecError::Malformed(format!(
                            "{name} code {q} at element {i} is outside −{levels}..={levels}, the codes the encoder writes"
                        )));
                    }
                    largest = largest.max(q.unsigned_abs());
                }
                let block = || format!("{name} block {b} (elements {first}..{end})");
                if scale == 0.0 && largest != 0 {
                    return Err(CodecError::Malformed(format!(
                        "{} has scale 0 but nonzero codes: with scale 0 every code must be 0",
                        block()
                    )));
                }
                if scale > 0.0 && largest == 0 {
                    return Err(CodecError::Malformed(format!(
                        "{} has every code 0 but scale {scale:e}: a block of zeros has scale 0",
                        block()
                    )));
                }
                if scale >= f32::MIN_POSITIVE && largest != levels as u8 {
                    return Err(CodecError::Malformed(format!(
                        "{} has scale {scale:e} but its largest code magnitude is {largest}: the encoder \
                         scales a block so that its largest magnitude is coded ±{levels}",
                        block()
                    )));
                }
            }
            Ok(())
        }
        Codec::TopK | Codec::Dct => validate_sparse(cfg, n, s),
    }
}

fn validate_sparse(cfg: &CompressionConfig, n: usize, s: &[u8]) -> Result<(), CodecError> {
    let k = kept_total(cfg, n);
    let groups = n.div_ceil(cfg.chunk).div_ceil(cfg.block);
    let scales = groups * scales_per_group(cfg.values);
    (0..scales).try_for_each(|i| check_scale(read_f32(s, i), 1.0))?;
    if cfg.values == Values::TwoBit {
        for g in 0..groups {
            let (lo, hi) = (read_f32(s, 2 * g), read_f32(s, 2 * g + 1));
            if lo > hi {
                return Err(CodecError::Malformed(format!(
                    "2-bit group {g}: low magnitude {lo:e} exceeds high magnitude {hi:e} (the encoder writes low ≤ high)"
                )));
            }
        }
    }
    let bits = index_bits(cfg.chunk);
    let index_bytes = packed_len(k, bits);
    let index_section = &s[4 * scales..4 * scales + index_bytes];
    let mut u = Unpacker::new(index_section, bits);
    for start in (0..n).step_by(cfg.chunk) {
        let len = cfg.chunk.min(n - start);
        let mut previous: Option<u32> = None;
        for _ in 0..kept_in(cfg, len) {
            let i = u.next_field();
            if i as usize >= len || previous.is_some_and(|p| i <= p) {
                return Err(CodecError::Malformed(format!(
                    "index {i} in the chunk at {start} is out of range or not ascending"
                )));
            }
            previous = Some(i);
        }
    }
    if !u.padding_is_zero() {
        return Err(CodecError::Malformed("index padding bits are not zero".into()));
    }
    // The values, walked with their (now known good) indices.
    let v = &s[4 * scales + index_bytes..];
    let mut indices = Unpacker::new(index_section, bits);
    let mut codes = match cfg.values {
        Values::TwoBit => Some(Unpacker::new(v, 2)),
        Values::Sign => Some(Unpacker::new(v, 1)),
        Values::F32 | Values::Bf16 => None,
    };
    let mut j = 0usize;
    let chunks = n.div_ceil(cfg.chunk);
    // 2-bit: whether the current group's codes use its low and its high magnitude.
    let mut uses = [false; 2];
    for (c, start) in (0..n).step_by(cfg.chunk).enumerate() {
        let len = cfg.chunk.min(n - start);
        let group = c / cfg.block;
        for t in 0..kept_in(cfg, len) {
            let i = indices.next_field() as usize;
            // Whether the kept value is certainly an exact zero in the encoder's input.
            let exact_zero = match cfg.values {
                Values::F32 => {
                    let x = read_f32(v, j);
                    check_value(x, "value")?;
                    x == 0.0
                }
                Values::Bf16 => {
                    check_value(read_bf16(v, j), "value")?;
                    false
                }
                Values::TwoBit => {
                    let code = codes.as_mut().expect("2-bit codes").next_field();
                    uses[(code >> 1) as usize] = true;
                    let zero_group = read_f32(s, 2 * group + 1) == 0.0;
                    if zero_group && code != 2 {
                        return Err(CodecError::Malformed(format!(
                            "2-bit group {group} has magnitudes 0 and 0, so every code must be 2 (positive, high); \
                             code {code} of the chunk at {start} is another encoding of the same 0"
                        )));
                    }
                    zero_group
                }
                Values::Sign => {
                    codes.as_mut().expect("sign codes").next_field();
                    false
                }
            };
            // Indices ascend, so position i is above a dropped position unless it is the t-th position.
            if exact_zero && i != t {
                return Err(CodecError::Malformed(format!(
                    "the chunk at {start} keeps a zero at position {i} but drops a lower position: the encoder \
                     keeps a chunk's zeros at its lowest positions, so this is another encoding of the same values"
                )));
            }
            j += 1;
        }
        if cfg.values == Values::TwoBit && ((c + 1) % cfg.block == 0 || c + 1 == chunks) {
            // The encoder's high magnitude is the mean of the magnitudes at or above the group's mean, so
            // some code uses it; its low magnitude is 0 when no code uses it. An unused magnitude could
            // otherwise take any value.
            let lo = read_f32(s, 2 * group);
            if !uses[1] || (!uses[0] && lo != 0.0) {
                let unused = if uses[1] {
                    format!("low magnitude {lo:e}, which must then be 0")
                } else {
                    "high magnitude".into()
                };
                return Err(CodecError::Malformed(format!(
                    "2-bit group {group}: no code uses its {unused} (another encoding of the same values)"
                )));
            }
            uses = [false; 2];
        }
    }
    if codes.is_some_and(|u| !u.padding_is_zero()) {
        return Err(CodecError::Malformed("value-code padding bits are not zero".into()));
    }
    Ok(())
}

/// `out += decode(section)` for a validated section. For `dct`, `out` is in the coefficient domain (the
/// sum of many workers' coefficients is inverted once, by [`inverse_dct`]).
pub fn accumulate(cfg: &CompressionConfig, s: &[u8], out: &mut [f32]) {
    let n = out.len();
    debug_assert_eq!(s.len(), section_len(cfg, n));
    match cfg.codec {
        Codec::None => out.iter_mut().enumerate().for_each(|(i, o)| *o += read_f32(s, i)),
        Codec::Bf16 => out.iter_mut().enumerate().for_each(|(i, o)| *o += read_bf16(s, i)),
        Codec::Int8 | Codec::Int4 => {
            let blocks = n.div_ceil(cfg.block);
            let codes = &s[4 * blocks..];
            for (i, o) in out.iter_mut().enumerate() {
                *o += int_code(cfg.codec, codes, i) as f32 * read_f32(s, i / cfg.block);
            }
        }
        Codec::TopK | Codec::Dct => {
            let k = kept_total(cfg, n);
            let groups = n.div_ceil(cfg.chunk).div_ceil(cfg.block);
            let spg = scales_per_group(cfg.values);
            let bits = index_bits(cfg.chunk);
            let index_bytes = packed_len(k, bits);
            let mut indices = Unpacker::new(&s[4 * groups * spg..4 * groups * spg + index_bytes], bits);
            let v = &s[4 * groups * spg + index_bytes..];
            let mut codes = match cfg.values {
                Values::TwoBit => Some(Unpacker::new(v, 2)),
                Values::Sign => Some(Unpacker::new(v, 1)),
                _ => None,
            };
            let mut j = 0usize;
            for (c, start) in (0..n).step_by(cfg.chunk).enumerate() {
                let len = cfg.chunk.min(n - start);
                let group = c / cfg.block;
                for _ in 0..kept_in(cfg, len) {
                    let i = indices.next_field() as usize;
                    let value = match cfg.values {
                        Values::F32 => read_f32(v, j),
                        Values::Bf16 => read_bf16(v, j),
                        Values::Sign => {
                            let m = read_f32(s, group);
                            if codes.as_mut().expect("sign codes").next_field() == 1 {
                                -m
                            } else {
                                m
                            }
                        }
                        Values::TwoBit => {
                            let code = codes.as_mut().expect("2-bit codes").next_field();
                            let m = read_f32(s, 2 * group + (code >> 1) as usize);
                            if code & 1 == 1 {
                                -m
                            } else {
                                m
                            }
                        }
                    };
                    out[start + i] += value;
                    j += 1;
                }
            }
        }
    }
}

/// Turns accumulated DCT coefficients back into values, chunk by chunk, in place.
pub fn inverse_dct(cfg: &CompressionConfig, buffer: &mut [f32], dct: &mut Dct) {
    let mut tmp = vec![0f32; cfg.chunk];
    for chunk in buffer.chunks_mut(cfg.chunk) {
        let len = chunk.len();
        dct.inverse(chunk, &mut tmp[..len]);
        chunk.copy_from_slice(&tmp[..len]);
    }
}
