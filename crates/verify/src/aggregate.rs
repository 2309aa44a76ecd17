//! Robust aggregation of a round's admitted pseudo-gradients, and the similarity used to find copies.
//!
//! Each pseudo-gradient is one flat f32 vector (its tensors concatenated in spec order). Rules that look
//! at every coordinate of every submission (median, trimmed mean) hold all n vectors, which the
//! coordinator has in memory at close anyway (copy detection compares every pair).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregationRule {
    Mean,
    /// Each Δ longer than `clip` × the round's median norm is scaled down to that length, then the mean.
    ClippedMean {
        clip: f64,
    },
    /// Per coordinate, the `trim` largest and `trim` smallest values are dropped, then the mean.
    TrimmedMean {
        trim: usize,
    },
    /// Per coordinate, the median.
    Median,
    /// The mean of the `n` best-scored.
    TopN {
        n: usize,
    },
}

impl AggregationRule {
    pub fn validate(&self) -> Result<()> {
        match *self {
            AggregationRule::ClippedMean { clip } if clip.is_nan() || clip <= 0.0 => {
                bail!("trust.aggregation clipped_mean: clip must be positive, got {clip}")
            }
            AggregationRule::TopN { n: 0 } => bail!("trust.aggregation top_n: n must be at least 1"),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for AggregationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AggregationRule::Mean => write!(f, "mean"),
            AggregationRule::ClippedMean { clip } => write!(f, "clipped_mean:{clip}"),
            AggregationRule::TrimmedMean { trim } => write!(f, "trimmed_mean:{trim}"),
            AggregationRule::Median => write!(f, "median"),
            AggregationRule::TopN { n } => write!(f, "top_n:{n}"),
        }
    }
}

/// `mean`, `clipped_mean[:C]`, `trimmed_mean[:T]`, `median`, `top_n[:N]`.
impl FromStr for AggregationRule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let number = |default: f64| -> Result<f64> {
            arg.map(|a| a.parse::<f64>().map_err(|_| anyhow::anyhow!("aggregation {s:?}: {a:?} is not a number")))
                .unwrap_or(Ok(default))
        };
        let rule = match name {
            "mean" => AggregationRule::Mean,
            "clipped_mean" => AggregationRule::ClippedMean { clip: number(1.0)? },
            "trimmed_mean" => AggregationRule::TrimmedMean { trim: number(1.0)? as usize },
            "median" => AggregationRule::Median,
            "top_n" => AggregationRule::TopN { n: number(3.0)? as usize },
            other => bail!(
                "unknown aggregation {other:?}: use mean, clipped_mean[:C], trimmed_mean[:T], median or top_n[:N]"
            ),
        };
        rule.validate()?;
        Ok(rule)
    }
}

pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Cosine similarity; 0 when either vector is zero (a zero Δ copies nobody).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let (na, nb) = (l2_norm(a), l2_norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn median_of(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Combines `deltas` (same length each, at least one) by `rule`; `scores` (one per Δ) rank them for `top_n`.
pub fn aggregate(rule: AggregationRule, deltas: &[&[f32]], scores: &[f64]) -> Vec<f32> {
    let norms: Vec<f64> = deltas.iter().map(|d| l2_norm(d)).collect();
    aggregate_chunk(rule, deltas, scores, &norms)
}

/// [`aggregate`] of one chunk of coordinates of the pseudo-gradients, given their whole norms (what
/// `clipped_mean` scales by): every rule is per coordinate once the weights are known, so aggregating chunk
/// by chunk gives the same result as aggregating the whole vectors, bit for bit.
pub fn aggregate_chunk(rule: AggregationRule, deltas: &[&[f32]], scores: &[f64], norms: &[f64]) -> Vec<f32> {
    assert!(!deltas.is_empty(), "aggregate of no pseudo-gradients");
    assert_eq!(deltas.len(), scores.len(), "one score per pseudo-gradient");
    assert_eq!(deltas.len(), norms.len(), "one norm per pseudo-gradient");
    let len = deltas[0].len();
    assert!(deltas.iter().all(|d| d.len() == len), "pseudo-gradients of different lengths");
    let n = deltas.len();
    match rule {
        AggregationRule::Mean => weighted_mean(deltas, &vec![1.0; n]),
        AggregationRule::ClippedMean { clip } => {
            let limit = clip * median_of(&mut norms.to_vec());
            let weights: Vec<f64> = norms.iter().map(|&norm| if norm > limit { limit / norm } else { 1.0 }).collect();
            weighted_mean(deltas, &weights)
        }
        AggregationRule::TrimmedMean { trim } if n > 2 * trim => per_coordinate(deltas, |column| {
            column.sort_by(f32::total_cmp);
            let kept = &column[trim..n - trim];
            (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
        }),
        // Too few to trim that many from each side: the median is the most that can be trimmed.
        AggregationRule::TrimmedMean { .. } | AggregationRule::Median => per_coordinate(deltas, |column| {
            column.sort_by(f32::total_cmp);
            if n % 2 == 1 {
                column[n / 2]
            } else {
                ((f64::from(column[n / 2 - 1]) + f64::from(column[n / 2])) / 2.0) as f32
            }
        }),
        AggregationRule::TopN { n: keep } => {
            let mut order: Vec<usize> = (0..n).collect();
            // Best score first; ties keep submission order.
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut weights = vec![0.0; n];
            for &i in order.iter().take(keep) {
                weights[i] = 1.0;
            }
            weighted_mean(deltas, &weights)
        }
    }
}

/// Σ wᵢ·Δᵢ / (number of nonzero weights), accumulated in f64 in submission order.
fn weighted_mean(deltas: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let count = weights.iter().filter(|&&w| w > 0.0).count().max(1) as f64;
    (0..deltas[0].len())
        .map(|j| {
            let sum: f64 = deltas.iter().zip(weights).map(|(d, &w)| w * f64::from(d[j])).sum();
            (sum / count) as f32
        })
        .collect()
}

fn per_coordinate(deltas: &[&[f32]], mut combine: impl FnMut(&mut [f32]) -> f32) -> Vec<f32> {
    let mut column = vec![0f32; deltas.len()];
    (0..deltas[0].len())
        .map(|j| {
            for (c, d) in column.iter_mut().zip(deltas) {
                *c = d[j];
            }
            combine(&mut column)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_on_a_small_example() {
        let a = [1.0f32, 10.0];
        let b = [2.0f32, 20.0];
        let c = [3.0f32, -1000.0];
        let d: Vec<&[f32]> = vec![&a, &b, &c];
        let s = [0.5, 0.9, 0.1];
        assert_eq!(aggregate(AggregationRule::Mean, &d, &s), vec![2.0, -970.0 / 3.0]);
        assert_eq!(aggregate(AggregationRule::Median, &d, &s), vec![2.0, 10.0]);
        assert_eq!(aggregate(AggregationRule::TrimmedMean { trim: 1 }, &d, &s), vec![2.0, 10.0]);
        assert_eq!(aggregate(AggregationRule::TopN { n: 2 }, &d, &s), vec![1.5, 15.0]);
        let clipped = aggregate(AggregationRule::ClippedMean { clip: 1.0 }, &d, &s);
        // c is scaled down to the median norm (b's), so the outlier moves the mean by at most that much.
        assert!(clipped[1] > -10.0 && clipped[1] < 10.0, "{clipped:?}");
        let even: Vec<&[f32]> = vec![&a, &b];
        assert_eq!(aggregate(AggregationRule::Median, &even, &[0.0, 0.0]), vec![1.5, 15.0]);
        assert_eq!(aggregate(AggregationRule::TrimmedMean { trim: 1 }, &even, &[0.0, 0.0]), vec![1.5, 15.0]);
    }

    #[test]
    fn chunk_by_chunk_equals_the_whole() {
        let a: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..50).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let c: Vec<f32> = (0..50).map(|i| i as f32 - 20.0).collect();
        let d: Vec<&[f32]> = vec![&a, &b, &c];
        let norms: Vec<f64> = d.iter().map(|v| l2_norm(v)).collect();
        let s = [0.5, 0.9, 0.1];
        for rule in ["mean", "clipped_mean:1", "trimmed_mean:1", "median", "top_n:2"] {
            let rule: AggregationRule = rule.parse().unwrap();
            let whole = aggregate(rule, &d, &s);
            let mut chunked = aggregate_chunk(rule, &d.iter().map(|v| &v[..17]).collect::<Vec<_>>(), &s, &norms);
            chunked.extend(aggregate_chunk(rule, &d.iter().map(|v| &v[17..]).collect::<Vec<_>>(), &s, &norms));
            assert_eq!(whole, chunked, "{rule}");
        }
    }

    #[test]
    fn cosine_and_rule_names() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        for s in ["mean", "clipped_mean:2", "trimmed_mean:1", "median", "top_n:3"] {
            assert_eq!(s.parse::<AggregationRule>().unwrap().to_string(), s);
        }
        assert!("top_n:0".parse::<AggregationRule>().is_err());
        assert!("krum".parse::<AggregationRule>().is_err());
    }
}
