//! The orthonormal DCT-II of short chunks (and its inverse, the DCT-III), as a dense matrix product: chunks
//! are tens of elements long, so the O(n²) form is simple, exact to f32 rounding and fast enough.

use std::collections::BTreeMap;

/// Basis matrices for each chunk length in use (a tensor has at most two: `chunk` and its remainder).
#[derive(Default)]
pub struct Dct {
    bases: BTreeMap<usize, Vec<f32>>,
}

impl Dct {
    /// Row k, column n: s_k · cos(π (n + ½) k / L), with s_0 = √(1/L), s_k = √(2/L).
    fn basis(&mut self, len: usize) -> &[f32] {
        self.bases.entry(len).or_insert_with(|| {
            let l = len as f64;
            let mut b = Vec::with_capacity(len * len);
            for k in 0..len {
                let scale = if k == 0 { (1.0 / l).sqrt() } else { (2.0 / l).sqrt() };
                for n in 0..len {
                    b.push((scale * (std::f64::consts::PI * (n as f64 + 0.5) * k as f64 / l).cos()) as f32);
                }
            }
            b
        })
    }

    /// Coefficients of `x` into `out` (same length).
    pub fn forward(&mut self, x: &[f32], out: &mut [f32]) {
        let len = x.len();
        let b = self.basis(len);
        for (k, o) in out.iter_mut().enumerate() {
            *o = b[k * len..(k + 1) * len].iter().zip(x).map(|(a, v)| a * v).sum();
        }
    }

    /// Signal from coefficients `c`, in place of `out`.
    pub fn inverse(&mut self, c: &[f32], out: &mut [f32]) {
        let len = c.len();
        let b = self.basis(len);
        out.iter_mut().for_each(|o| *o = 0.0);
        for (k, &ck) in c.iter().enumerate() {
            if ck != 0.0 {
                for (o, a) in out.iter_mut().zip(&b[k * len..(k + 1) * len]) {
                    *o += ck * a;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_forward_and_energy_is_preserved() {
        let mut dct = Dct::default();
        for len in [1usize, 2, 7, 64] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let mut c = vec![0.0; len];
            dct.forward(&x, &mut c);
            let mut back = vec![0.0; len];
            dct.inverse(&c, &mut back);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 1e-5, "len {len}: {a} vs {b}");
            }
            let (ex, ec): (f32, f32) = (x.iter().map(|v| v * v).sum(), c.iter().map(|v| v * v).sum());
            assert!((ex - ec).abs() < 1e-4 * ex.max(1.0), "len {len}: energy {ex} vs {ec}");
        }
    }

    #[test]
    fn a_constant_chunk_is_one_coefficient() {
        let mut dct = Dct::default();
        let mut c = vec![0.0; 8];
        dct.forward(&[0.5; 8], &mut c);
        assert!((c[0] - 0.5 * 8f32.sqrt()).abs() < 1e-6);
        assert!(c[1..].iter().all(|v| v.abs() < 1e-6));
    }
}
