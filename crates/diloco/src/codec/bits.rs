//! Fixed-width bit packing, least significant bit first. Used for top-k indices and 1–2-bit value codes.

/// Bytes that `count` fields of `width` bits occupy.
pub fn packed_len(count: usize, width: u32) -> usize {
    (count * width as usize).div_ceil(8)
}

/// Packs `values` (each below 2^width) into `out`, which must be zeroed and exactly `packed_len` long.
pub fn pack(values: impl IntoIterator<Item = u32>, width: u32, out: &mut [u8]) {
    debug_assert!((1..=16).contains(&width));
    let mut bit = 0usize;
    for v in values {
        debug_assert!(v < (1 << width), "value {v} does not fit in {width} bits");
        let mut v = v as u64;
        let mut left = width as usize;
        while left > 0 {
            let (byte, offset) = (bit / 8, bit % 8);
            let take = left.min(8 - offset);
            out[byte] |= ((v & ((1 << take) - 1)) << offset) as u8;
            v >>= take;
            bit += take;
            left -= take;
        }
    }
}

/// Reads fields back one at a time.
pub struct Unpacker<'a> {
    bytes: &'a [u8],
    width: u32,
    bit: usize,
}

impl<'a> Unpacker<'a> {
    pub fn new(bytes: &'a [u8], width: u32) -> Self {
        debug_assert!((1..=16).contains(&width));
        Unpacker { bytes, width, bit: 0 }
    }

    /// The next field. The caller knows how many there are; reading past the end panics.
    pub fn next_field(&mut self) -> u32 {
        let mut value = 0u32;
        let mut got = 0usize;
        while got < self.width as usize {
            let (byte, offset) = (self.bit / 8, self.bit % 8);
            let take = (self.width as usize - got).min(8 - offset);
            let bits = (self.bytes[byte] >> offset) as u32 & ((1 << take) - 1);
            value |= bits << got;
            got += take;
            self.bit += take;
        }
        value
    }

    /// Whether every bit after the fields read so far is zero (canonical padding).
    pub fn padding_is_zero(&self) -> bool {
        let (byte, offset) = (self.bit / 8, self.bit % 8);
        if byte >= self.bytes.len() {
            return true;
        }
        let first_ok = offset == 0 || self.bytes[byte] >> offset == 0;
        let rest = if offset == 0 { &self.bytes[byte..] } else { &self.bytes[byte + 1..] };
        first_ok && rest.iter().all(|&b| b == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for width in 1..=16u32 {
            let values: Vec<u32> = (0..37u32).map(|i| i.wrapping_mul(2654435761u32) % (1 << width)).collect();
            let mut out = vec![0u8; packed_len(values.len(), width)];
            pack(values.iter().copied(), width, &mut out);
            let mut u = Unpacker::new(&out, width);
            let back: Vec<u32> = (0..values.len()).map(|_| u.next_field()).collect();
            assert_eq!(back, values, "width {width}");
            assert!(u.padding_is_zero());
        }
    }

    #[test]
    fn nonzero_padding_is_noticed() {
        let mut out = vec![0u8; packed_len(3, 6)];
        pack([1, 2, 3], 6, &mut out);
        *out.last_mut().unwrap() |= 0x80;
        let mut u = Unpacker::new(&out, 6);
        (0..3).for_each(|_| {
            u.next_field();
        });
        assert!(!u.padding_is_zero());
    }
}
