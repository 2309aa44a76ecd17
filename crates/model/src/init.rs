//! Reproducible initial weights, independent of libtorch's global generator (which other threads may be
//! drawing from) and of its version: every tensor gets its own stream, seeded by (seed, tensor name).

/// xoshiro256++ (Blackman & Vigna), seeded through SplitMix64.
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 { s: [next(), next(), next(), next()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// `n` draws from N(0, std²) for the tensor `name`, by Box–Muller.
pub fn normal(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut stream =
        u64::from_le_bytes(blake3::hash(format!("{seed}/{name}").as_bytes()).as_bytes()[..8].try_into().unwrap());
    stream ^= seed;
    let mut rng = Xoshiro256::new(stream);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_unit(), rng.next_unit());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_are_reproducible_per_name_and_normal() {
        let a = super::normal(3, "w", 100_000, 0.02);
        assert_eq!(a, super::normal(3, "w", 100_000, 0.02));
        assert_ne!(a[..10], super::normal(3, "v", 10, 0.02)[..]);
        assert_ne!(a[..10], super::normal(4, "w", 10, 0.02)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 3e-4 && (var.sqrt() / 0.02 - 1.0).abs() < 0.01, "mean {mean}, std {}", var.sqrt());
    }
}
