//! A synthetic corpus with a known entropy rate.
//!
//! [`MarkovSource`] is a stationary first-order Markov chain whose states are ~128 generated
//! pronounceable words plus two punctuation states, `.` and newline. Text is the chain's states
//! rendered as `word word word. word word.\nword ...`. Because rendering is invertible, the text
//! carries exactly the chain's entropy, which is computed analytically from the stationary
//! distribution and the transition matrix. That gives training a known loss floor:
//!
//! - [`MarkovSource::entropy_rate_bits_per_word`]: bits per chain step (a "word" here is any
//!   state, punctuation included);
//! - [`MarkovSource::entropy_rate_nats_per_char`]: nats per character of text;
//! - [`MarkovSource::loss_floor_nats_per_token`]: the cross-entropy (natural log, per token) an
//!   ideal model reaches, given the tokenizer's measured characters per token. A deterministic
//!   tokenizer preserves the text's total information, so the per-token floor is just the
//!   per-character rate times characters per token.

use anyhow::{bail, Result};

/// Number of generated words in the vocabulary.
pub const NUM_WORDS: usize = 128;
/// Probability that a sentence end (`.`) is followed by a line break rather than another word.
const NEWLINE_AFTER_PERIOD: f64 = 0.3;

/// A stationary Markov source over words; see the module docs.
#[derive(Clone, Debug)]
pub struct MarkovSource {
    words: Vec<String>,
    /// Sparse transition matrix: for each state, `(next state, probability)`.
    rows: Vec<Vec<(usize, f64)>>,
    stationary: Vec<f64>,
}

/// SplitMix64: tiny, fast, and fully determined by its seed (no global RNG state).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (the modulo bias is below 2^-56 for the small `n` used here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Zipf-like weights `1/(r+1)^s` for ranks `0..n`, normalized to sum to `total`.
fn zipf(n: usize, s: f64, total: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|r| 1.0 / ((r + 1) as f64).powf(s)).collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w * total / sum).collect()
}

impl MarkovSource {
    const PERIOD: usize = NUM_WORDS;
    const NEWLINE: usize = NUM_WORDS + 1;
    const NUM_STATES: usize = NUM_WORDS + 2;

    /// Builds the source's vocabulary and transition matrix from `seed`.
    ///
    /// Each word is followed by 2–6 possible words with skewed (Zipf) probabilities, or ends the
    /// sentence with probability 0.1–0.25. After a sentence end comes a newline (probability 0.3)
    /// or a word; after a newline, a word. Sentence starts may be any word (Zipf over a random
    /// order), which makes the chain irreducible; the mix of 2- and 3-step cycles through `.`
    /// makes it aperiodic, so the stationary distribution is unique.
    pub fn new(seed: u64) -> MarkovSource {
        let mut rng = SplitMix64(seed ^ 0x6167_6f72_615f_6d6b); // "agora_mk"
        let words = generate_words(&mut rng);

        let mut rows = Vec::with_capacity(Self::NUM_STATES);
        for _ in 0..NUM_WORDS {
            let p_end = 0.1 + 0.15 * rng.next_f64();
            let degree = 2 + rng.below(5);
            let mut successors: Vec<usize> = (0..NUM_WORDS).collect();
            rng.shuffle(&mut successors);
            successors.truncate(degree);
            let mut row: Vec<(usize, f64)> = successors.into_iter().zip(zipf(degree, 1.3, 1.0 - p_end)).collect();
            row.push((Self::PERIOD, p_end));
            rows.push(row);
        }
        let mut starters: Vec<usize> = (0..NUM_WORDS).collect();
        rng.shuffle(&mut starters);
        let mut after_period: Vec<(usize, f64)> =
            starters.iter().copied().zip(zipf(NUM_WORDS, 1.0, 1.0 - NEWLINE_AFTER_PERIOD)).collect();
        after_period.push((Self::NEWLINE, NEWLINE_AFTER_PERIOD));
        rows.push(after_period);
        rng.shuffle(&mut starters);
        rows.push(starters.into_iter().zip(zipf(NUM_WORDS, 1.0, 1.0)).collect());

        let stationary = stationary_distribution(&rows);
        MarkovSource { words, rows, stationary }
    }

    /// The word vocabulary (state `i < NUM_WORDS` renders as `words()[i]`).
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The stationary distribution over states: words, then `.`, then newline.
    pub fn stationary_distribution(&self) -> &[f64] {
        &self.stationary
    }

    /// Generates text of at least `n_words` chain steps (words and punctuation), continuing to
    /// the end of the current line so the text ends with `"\n"`. Deterministic in
    /// (source seed, `seed`, `n_words`). The chain starts as if just after a newline.
    pub fn generate(&self, n_words: usize, seed: u64) -> String {
        let mut rng = SplitMix64(seed ^ 0x6167_6f72_615f_6765); // "agora_ge"
        let mut text = String::with_capacity(n_words * 6);
        let mut prev = Self::NEWLINE;
        let mut steps = 0;
        while steps < n_words || prev != Self::NEWLINE {
            let next = self.sample_next(prev, rng.next_f64());
            self.render(prev, next, &mut text);
            prev = next;
            steps += 1;
        }
        text
    }

    fn sample_next(&self, state: usize, u: f64) -> usize {
        let row = &self.rows[state];
        let mut acc = 0.0;
        for &(next, p) in row {
            acc += p;
            if u < acc {
                return next;
            }
        }
        // Rounding can leave the cumulative sum a hair below 1.
        row.last().expect("every state has successors").0
    }

    fn render(&self, prev: usize, next: usize, out: &mut String) {
        match next {
            Self::PERIOD => out.push('.'),
            Self::NEWLINE => out.push('\n'),
            word => {
                if prev != Self::NEWLINE {
                    out.push(' ');
                }
                out.push_str(&self.words[word]);
            }
        }
    }

    fn transition_prob(&self, from: usize, to: usize) -> f64 {
        self.rows[from].iter().find(|&&(next, _)| next == to).map_or(0.0, |&(_, p)| p)
    }

    /// Exact entropy rate in bits per chain step: `sum_i pi_i H(P[i, .])`.
    pub fn entropy_rate_bits_per_word(&self) -> f64 {
        self.stationary
            .iter()
            .zip(&self.rows)
            .map(|(&pi, row)| pi * row.iter().map(|&(_, p)| -p * p.log2()).sum::<f64>())
            .sum()
    }

    /// Expected characters of text per chain step under the stationary distribution.
    pub fn mean_chars_per_word(&self) -> f64 {
        let mut scratch = String::new();
        let mut total = 0.0;
        for (state, (&pi, row)) in self.stationary.iter().zip(&self.rows).enumerate() {
            for &(next, p) in row {
                scratch.clear();
                self.render(state, next, &mut scratch);
                total += pi * p * scratch.len() as f64;
            }
        }
        total
    }

    /// Entropy rate of the rendered text in nats per character (all characters are ASCII, so
    /// this is also per byte).
    pub fn entropy_rate_nats_per_char(&self) -> f64 {
        self.entropy_rate_bits_per_word() * std::f64::consts::LN_2 / self.mean_chars_per_word()
    }

    /// The lowest achievable mean cross-entropy per token, in nats (the unit of the usual
    /// training loss), for a tokenizer that averages `chars_per_token` characters per token on
    /// this source's text (measure it on a long generated sample: `text.len() / n_tokens`).
    pub fn loss_floor_nats_per_token(&self, chars_per_token: f64) -> f64 {
        self.entropy_rate_nats_per_char() * chars_per_token
    }

    /// `-mean log2 p(next | prev)` over the transitions in `text` (text from
    /// [`MarkovSource::generate`] of this source), in bits per chain step. For long samples it
    /// converges to [`MarkovSource::entropy_rate_bits_per_word`].
    pub fn empirical_bits_per_word(&self, text: &str) -> Result<f64> {
        let states = self.parse(text)?;
        if states.is_empty() {
            bail!("text holds no words");
        }
        let mut prev = Self::NEWLINE;
        let mut bits = 0.0;
        for (i, &next) in states.iter().enumerate() {
            let p = self.transition_prob(prev, next);
            if p == 0.0 {
                bail!("step {i}: transition impossible under this source (text is from another source?)");
            }
            bits -= p.log2();
            prev = next;
        }
        Ok(bits / states.len() as f64)
    }

    /// Inverts rendering: text back to the state sequence.
    fn parse(&self, text: &str) -> Result<Vec<usize>> {
        let index: std::collections::HashMap<&str, usize> =
            self.words.iter().enumerate().map(|(i, w)| (w.as_str(), i)).collect();
        let mut states = Vec::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match c {
                '.' => states.push(Self::PERIOD),
                '\n' => states.push(Self::NEWLINE),
                ' ' => {}
                c if c.is_ascii_lowercase() => {
                    let len = rest.find(|c: char| !c.is_ascii_lowercase()).unwrap_or(rest.len());
                    let word = &rest[..len];
                    let Some(&state) = index.get(word) else {
                        bail!("unknown word {word:?}");
                    };
                    states.push(state);
                    rest = &rest[len..];
                    continue;
                }
                other => bail!("unexpected character {other:?}"),
            }
            rest = &rest[c.len_utf8()..];
        }
        Ok(states)
    }
}

/// `NUM_WORDS` distinct pronounceable words of 1–3 consonant-vowel syllables, some ending in a
/// consonant, e.g. `"tavo"`, `"ke"`, `"mirosan"`.
fn generate_words(rng: &mut SplitMix64) -> Vec<String> {
    const CONSONANTS: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    const CODAS: &[u8] = b"nrs";
    let mut seen = std::collections::HashSet::new();
    let mut words = Vec::with_capacity(NUM_WORDS);
    while words.len() < NUM_WORDS {
        let syllables = 1 + rng.below(3);
        let mut word = String::new();
        for _ in 0..syllables {
            word.push(CONSONANTS[rng.below(CONSONANTS.len())] as char);
            word.push(VOWELS[rng.below(VOWELS.len())] as char);
        }
        if rng.below(4) == 0 {
            word.push(CODAS[rng.below(CODAS.len())] as char);
        }
        if seen.insert(word.clone()) {
            words.push(word);
        }
    }
    words
}

/// Stationary distribution by power iteration on the lazy chain `(I + P) / 2`, which has the
/// same stationary distribution and converges even if `P` were periodic.
fn stationary_distribution(rows: &[Vec<(usize, f64)>]) -> Vec<f64> {
    let n = rows.len();
    let mut pi = vec![1.0 / n as f64; n];
    let mut next = vec![0.0; n];
    for _ in 0..100_000 {
        next.iter_mut().zip(&pi).for_each(|(x, &p)| *x = 0.5 * p);
        for (from, row) in rows.iter().enumerate() {
            for &(to, p) in row {
                next[to] += 0.5 * pi[from] * p;
            }
        }
        let sum: f64 = next.iter().sum();
        next.iter_mut().for_each(|x| *x /= sum);
        let delta: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
        std::mem::swap(&mut pi, &mut next);
        if delta < 1e-14 {
            break;
        }
    }
    pi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_distributions() {
        let src = MarkovSource::new(7);
        for row in &src.rows {
            let sum: f64 = row.iter().map(|&(_, p)| p).sum();
            assert!((sum - 1.0).abs() < 1e-12, "row sums to {sum}");
        }
        let pi_sum: f64 = src.stationary.iter().sum();
        assert!((pi_sum - 1.0).abs() < 1e-12);
        assert!(src.stationary.iter().all(|&p| p > 0.0), "chain is irreducible");
    }

    #[test]
    fn stationary_is_fixed_point() {
        let src = MarkovSource::new(3);
        let mut next = vec![0.0; src.rows.len()];
        for (from, row) in src.rows.iter().enumerate() {
            for &(to, p) in row {
                next[to] += src.stationary[from] * p;
            }
        }
        let err: f64 = next.iter().zip(&src.stationary).map(|(a, b)| (a - b).abs()).sum();
        assert!(err < 1e-10, "|pi P - pi| = {err}");
    }
}
