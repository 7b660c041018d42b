//! Stopping the runs of a sweep that are clearly losing (`early_stop:`), decided from what the
//! runs' folders hold, so that it works the same for runs trained one after another, side by
//! side, or by other processes:
//!
//! - `asha`: asynchronous successive halving. Rungs at `min_steps · reduction_factor^k` steps;
//!   a run reaching a rung goes on only if its validation loss is within the best
//!   `1 / reduction_factor` of the losses every run of the experiment recorded at that rung so
//!   far (Ray Tune's rule: at most the `1/η` quantile). The first run at a rung always goes on.
//! - `median`: at each evaluation from `min_steps` on, a run stops when its best validation
//!   loss so far is worse than the median of the other runs' losses at that step (once
//!   `min_runs` other runs reached it).
//! - `divergence`: with any method (or alone), a run stops when its validation loss exceeds
//!   `divergence ×` the untrained model's, or is not a number.
//!
//! A stopped run ends as `pruned` with its step; it keeps its adapter, stays in the
//! leaderboard, and is not trained again.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::Value as J;

use crate::config::keys::Resolved;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    None,
    Asha,
    Median,
}

/// The `early_stop:` settings of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStop {
    pub method: Method,
    pub min_steps: u64,
    pub reduction_factor: f64,
    pub min_runs: usize,
    pub divergence: Option<f64>,
}

impl EarlyStop {
    /// The settings of a resolved config; `None` when nothing is on.
    pub fn from_config(c: &J) -> Result<Option<Self>> {
        let r = Resolved(c);
        let method = match r.str("early_stop.method")?.as_str() {
            "asha" => Method::Asha,
            "median" => Method::Median,
            _ => Method::None,
        };
        let divergence = r.opt_f64("early_stop.divergence")?;
        if method == Method::None && divergence.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            method,
            min_steps: r.u64("early_stop.min_steps")?,
            reduction_factor: r.f64("early_stop.reduction_factor")?,
            min_runs: r.u64("early_stop.min_runs")? as usize,
            divergence,
        }))
    }

    /// Steps at which the decision needs a validation loss (ASHA's rungs), below `iters`.
    pub fn rungs(&self, iters: u64) -> Vec<u64> {
        if self.method != Method::Asha || self.min_steps == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut s = self.min_steps as f64;
        while (s.round() as u64) < iters {
            let step = s.round() as u64;
            if out.last() != Some(&step) {
                out.push(step);
            }
            s *= self.reduction_factor.max(1.0 + 1e-9);
        }
        out
    }

    /// Why a run should stop after validation loss `val` at `step` (`best` is its best loss so
    /// far, `base` the untrained model's), given the losses `peers` (other runs of the
    /// experiment) recorded at that same step; `None` to go on.
    pub fn decide(
        &self,
        step: u64,
        val: f64,
        best: f64,
        base: Option<f64>,
        iters: u64,
        peers: &[f64],
    ) -> Option<String> {
        if !val.is_finite() {
            return Some(format!("validation loss {val} at step {step}"));
        }
        if let (Some(k), Some(b)) = (self.divergence, base)
            && val > k * b
        {
            return Some(format!(
                "diverged: validation loss {val:.4} at step {step} is over {k} × the base model's {b:.4}"
            ));
        }
        match self.method {
            Method::None => None,
            Method::Asha => {
                if !self.rungs(iters).contains(&step) {
                    return None;
                }
                let mut all: Vec<f64> = peers.iter().copied().filter(|x| x.is_finite()).collect();
                all.push(val);
                let cutoff = quantile(&mut all, 1.0 / self.reduction_factor);
                (val > cutoff).then(|| {
                    format!(
                        "asha rung at step {step}: validation loss {val:.4} is not in the best 1/{} of the {} runs there (cutoff {cutoff:.4})",
                        self.reduction_factor,
                        all.len()
                    )
                })
            }
            Method::Median => {
                if step < self.min_steps || peers.len() < self.min_runs.max(1) {
                    return None;
                }
                let mut p: Vec<f64> = peers.to_vec();
                let median = quantile(&mut p, 0.5);
                (best > median).then(|| {
                    format!(
                        "median rule at step {step}: best validation loss {best:.4} is worse than the other runs' median {median:.4}"
                    )
                })
            }
        }
    }
}

/// The `q` quantile with linear interpolation (numpy's default).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// What a trainer asks during a run: where to evaluate, and whether to stop.
pub struct Pruner {
    pub rules: EarlyStop,
    /// The experiment folder, whose other run folders hold the peers' losses.
    pub experiment_dir: PathBuf,
    pub run_id: String,
    pub iters: u64,
}

impl Pruner {
    /// Extra evaluation steps the rules need.
    pub fn eval_steps(&self) -> Vec<u64> {
        self.rules.rungs(self.iters)
    }

    /// The decision after a validation at `step` (see [`EarlyStop::decide`]).
    pub fn check(&self, step: u64, val: f64, best: f64, base: Option<f64>) -> Option<String> {
        let peers = peer_losses(&self.experiment_dir, &self.run_id, step);
        self.rules.decide(step, val, best, base, self.iters, &peers)
    }
}

/// The validation losses other runs of the experiment logged at `step`.
pub fn peer_losses(experiment_dir: &Path, run_id: &str, step: u64) -> Vec<f64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(experiment_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy() == run_id {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join("metrics.jsonl")) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<J>(line) else {
                continue;
            };
            if v["kind"] == "val"
                && v["step"].as_u64() == Some(step)
                && let Some(x) = v["val_loss"].as_f64()
            {
                out.push(x);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asha() -> EarlyStop {
        EarlyStop {
            method: Method::Asha,
            min_steps: 10,
            reduction_factor: 3.0,
            min_runs: 2,
            divergence: None,
        }
    }

    #[test]
    fn rungs_grow_by_the_reduction_factor() {
        assert_eq!(asha().rungs(100), vec![10, 30, 90]);
        assert_eq!(asha().rungs(90), vec![10, 30]);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        assert_eq!(quantile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        assert!((quantile(&mut [1.0, 2.0], 1.0 / 3.0) - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn divergence_and_nan_stop_any_method() {
        let mut e = asha();
        e.divergence = Some(2.0);
        assert!(e.decide(5, 5.0, 5.0, Some(2.0), 100, &[]).is_some());
        assert!(e.decide(5, 3.9, 3.9, Some(2.0), 100, &[]).is_none());
        assert!(e.decide(5, f64::NAN, 1.0, Some(2.0), 100, &[]).is_some());
    }

    #[test]
    fn median_rule_stops_a_run_worse_than_the_others_median_once_enough_reached_the_step() {
        let e = EarlyStop {
            method: Method::Median,
            min_steps: 20,
            reduction_factor: 3.0,
            min_runs: 3,
            divergence: None,
        };
        let peers = [1.0, 2.0, 3.0];
        // Its best loss so far (not this evaluation's) is held against the peers' median, 2.0.
        assert!(e.decide(20, 2.5, 2.5, None, 100, &peers).is_some());
        assert!(e.decide(20, 2.5, 1.5, None, 100, &peers).is_none());
        assert!(
            e.decide(20, 2.0, 2.0, None, 100, &peers).is_none(),
            "equal to the median goes on"
        );
        // Before min_steps, or with fewer than min_runs peers at the step, nothing stops.
        assert!(e.decide(10, 9.0, 9.0, None, 100, &peers).is_none());
        assert!(e.decide(20, 9.0, 9.0, None, 100, &peers[..2]).is_none());
        // An even number of peers: the median interpolates (2.5).
        let four = [1.0, 2.0, 3.0, 4.0];
        assert!(e.decide(40, 2.6, 2.6, None, 100, &four).is_some());
        assert!(e.decide(40, 2.4, 2.4, None, 100, &four).is_none());
        // Any step from min_steps on counts, not only ASHA rungs.
        assert!(e.decide(37, 5.0, 5.0, None, 100, &peers).is_some());
    }
}
