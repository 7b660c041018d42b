//! Next-token selection from one row of logits, on the host.
//!
//! Order follows transformers' logits processors: repetition penalty, temperature, then the
//! top-k / top-p / min-p filters, then a draw from the renormalized distribution.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability mass reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens with probability below `min_p * p_max` (0 = off).
    pub min_p: f32,
    /// > 1 discourages tokens already in the context (1 = off), as in transformers.
    pub repetition_penalty: f32,
    /// How many trailing context tokens the penalty looks at (`None` = all).
    pub repetition_context: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context: None,
            seed: 0,
        }
    }
}

/// A seeded sampler; the same seed and inputs give the same tokens.
pub struct Sampler {
    pub config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Applies the repetition penalty in place (`context` = prompt + generated ids).
    pub fn apply_repetition_penalty(&self, logits: &mut [f32], context: &[u32]) {
        let p = self.config.repetition_penalty;
        if p == 1.0 {
            return;
        }
        let start = self
            .config
            .repetition_context
            .map_or(0, |n| context.len().saturating_sub(n));
        let mut seen = std::collections::HashSet::new();
        for &id in &context[start..] {
            let i = id as usize;
            if i < logits.len() && seen.insert(i) {
                logits[i] = if logits[i] > 0.0 {
                    logits[i] / p
                } else {
                    logits[i] * p
                };
            }
        }
    }

    /// Picks the next token from `logits` (one vocabulary row).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_repetition_penalty(&mut logits, context);
        let c = &self.config;
        if c.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by descending logit; filters only ever cut a suffix.
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if c.top_k > 0 && c.top_k < idx.len() {
            idx.truncate(c.top_k);
        }
        let t = c.temperature as f64;
        let max = logits[idx[0]] as f64 / t;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i] as f64 / t - max).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= c.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        if c.min_p > 0.0 {
            let cut = probs[0] * c.min_p as f64;
            let keep = probs.iter().take_while(|&&p| p >= cut).count().max(1);
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let z: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * z;
        for (p, &i) in probs.iter().zip(&idx) {
            if r < *p {
                return i as u32;
            }
            r -= p;
        }
        *idx.last().expect("at least one candidate") as u32
    }
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_penalty() {
        let s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let mut l = vec![1.0, 3.0, 2.5, -1.0];
        assert_eq!(argmax(&l), 1);
        s.apply_repetition_penalty(&mut l, &[1, 3]);
        assert_eq!(l, vec![1.0, 1.5, 2.5, -2.0]);
    }

    #[test]
    fn filters_and_seed() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let logits = vec![0.0, 5.0, 4.9, 4.8];
        let mut a = Sampler::new(cfg.clone());
        let mut b = Sampler::new(cfg);
        for _ in 0..50 {
            let x = a.sample(&logits, &[]);
            assert!(x == 1 || x == 2);
            assert_eq!(x, b.sample(&logits, &[]));
        }
        let mut m = Sampler::new(SamplingConfig {
            temperature: 1.0,
            min_p: 0.5,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(m.sample(&[0.0, 10.0, 0.0], &[]), 1);
        }
        let mut p = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(p.sample(&[0.0, 3.0, 0.0], &[]), 1);
        }
    }
}
