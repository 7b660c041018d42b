//! Learning-rate schedules.
//!
//! Steps are 0-based: a run of `iters` steps evaluates the LR at `0..iters`.
//! - `constant`: `learning_rate` at every step.
//! - `cosine` / `linear`: decay from `learning_rate` to `final_lr` over the steps after warmup
//!   (the last step gets exactly `final_lr`).
//! - phases `"400:2e-5,400:1e-5,200:2e-6"`: piecewise constant, each `steps:lr`.
//!   **Rule:** the phases must add up to `train.iters` exactly; any other total is an error
//!   that says both numbers, because silently truncating or holding the last LR hides a typo.
//! - `warmup` scales any schedule by `(step + 1) / warmup` for `step < warmup`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant,
    Cosine,
    Linear,
    /// (steps, lr) in order.
    Phases(Vec<(u64, f64)>),
}

/// A schedule with the numbers it needs, ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub schedule: Schedule,
    pub learning_rate: f64,
    pub final_lr: f64,
    pub warmup: u64,
    pub iters: u64,
}

impl Schedule {
    /// Parses a schedule string: a name or a phase list.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let t = s.trim();
        match t {
            "constant" => return Ok(Schedule::Constant),
            "cosine" | "cosine_decay" => return Ok(Schedule::Cosine),
            "linear" | "linear_decay" => return Ok(Schedule::Linear),
            "" => return Err("empty schedule".into()),
            _ => {}
        }
        if !t.contains(':') {
            return Err(
                "expected `constant`, `cosine`, `linear`, or phases like `400:2e-5,600:1e-5`"
                    .into(),
            );
        }
        let mut phases = Vec::new();
        for (i, part) in t.split(',').enumerate() {
            let part = part.trim();
            let (steps, lr) = part
                .split_once(':')
                .ok_or_else(|| format!("phase {} `{part}` is not `steps:lr`", i + 1))?;
            let steps: u64 = steps.trim().parse().map_err(|_| {
                format!(
                    "phase {} `{part}`: steps `{}` is not a whole number",
                    i + 1,
                    steps.trim()
                )
            })?;
            let lr: f64 = lr.trim().parse().map_err(|_| {
                format!(
                    "phase {} `{part}`: learning rate `{}` is not a number",
                    i + 1,
                    lr.trim()
                )
            })?;
            if steps == 0 {
                return Err(format!("phase {} `{part}` has 0 steps", i + 1));
            }
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(format!(
                    "phase {} `{part}`: learning rate must be ≥ 0",
                    i + 1
                ));
            }
            phases.push((steps, lr));
        }
        Ok(Schedule::Phases(phases))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant => write!(f, "constant"),
            Schedule::Cosine => write!(f, "cosine"),
            Schedule::Linear => write!(f, "linear"),
            Schedule::Phases(p) => {
                let parts: Vec<String> = p.iter().map(|(s, lr)| format!("{s}:{lr:e}")).collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}

impl LrSchedule {
    /// Builds and checks a schedule against the run length; the error says what to change.
    pub fn new(
        schedule: Schedule,
        learning_rate: f64,
        final_lr: f64,
        warmup: u64,
        iters: u64,
    ) -> Result<Self, String> {
        if let Schedule::Phases(p) = &schedule {
            let total: u64 = p.iter().map(|(s, _)| s).sum();
            if total != iters {
                return Err(format!(
                    "the phases add up to {total} steps but train.iters is {iters}; they must be equal \
                     (set train.iters: {total}, or change the phase lengths)"
                ));
            }
        }
        if warmup >= iters && warmup > 0 {
            return Err(format!(
                "train.warmup ({warmup}) must be smaller than train.iters ({iters})"
            ));
        }
        Ok(LrSchedule {
            schedule,
            learning_rate,
            final_lr,
            warmup,
            iters,
        })
    }

    /// The learning rate at 0-based `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = match &self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Cosine | Schedule::Linear => {
                let span = self.iters.saturating_sub(self.warmup).saturating_sub(1);
                let t = step.saturating_sub(self.warmup).min(span);
                let frac = if span == 0 {
                    1.0
                } else {
                    t as f64 / span as f64
                };
                let shape = match self.schedule {
                    Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
                    _ => 1.0 - frac,
                };
                self.final_lr + (self.learning_rate - self.final_lr) * shape
            }
            Schedule::Phases(p) => {
                let mut end = 0;
                let mut lr = p.last().map(|x| x.1).unwrap_or(0.0);
                for (steps, phase_lr) in p {
                    end += steps;
                    if step < end {
                        lr = *phase_lr;
                        break;
                    }
                }
                lr
            }
        };
        if step < self.warmup {
            base * (step + 1) as f64 / self.warmup as f64
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-30)
    }

    #[test]
    fn seed_003_phases() {
        let s = Schedule::parse("400:2e-5,400:1e-5,200:2e-6").unwrap();
        let lr = LrSchedule::new(s, 1e-5, 0.0, 0, 1000).unwrap();
        assert_eq!(lr.lr_at(0), 2e-5);
        assert_eq!(lr.lr_at(399), 2e-5);
        assert_eq!(lr.lr_at(400), 1e-5);
        assert_eq!(lr.lr_at(799), 1e-5);
        assert_eq!(lr.lr_at(800), 2e-6);
        assert_eq!(lr.lr_at(999), 2e-6);
    }

    #[test]
    fn phases_must_add_up_to_iters() {
        let s = Schedule::parse("400:2e-5,400:1e-5").unwrap();
        let e = LrSchedule::new(s.clone(), 1e-5, 0.0, 0, 1000).unwrap_err();
        assert!(e.contains("800") && e.contains("1000"), "{e}");
        assert!(LrSchedule::new(s, 1e-5, 0.0, 0, 700).is_err());
    }

    #[test]
    fn cosine_and_linear_hit_both_ends() {
        let c = LrSchedule::new(Schedule::Cosine, 1e-4, 1e-6, 0, 101).unwrap();
        assert!(close(c.lr_at(0), 1e-4));
        assert!(close(c.lr_at(50), (1e-4 + 1e-6) / 2.0));
        assert!(close(c.lr_at(100), 1e-6));
        let l = LrSchedule::new(Schedule::Linear, 1e-4, 0.0, 0, 11).unwrap();
        assert!(close(l.lr_at(5), 5e-5));
        assert_eq!(l.lr_at(10), 0.0);
    }

    #[test]
    fn warmup_ramps_then_decays() {
        let c = LrSchedule::new(Schedule::Cosine, 1e-4, 0.0, 10, 111).unwrap();
        assert!(close(c.lr_at(0), 1e-5));
        assert!(close(c.lr_at(4), 5e-5));
        assert!(close(c.lr_at(10), 1e-4));
        assert!(close(c.lr_at(60), 5e-5));
        assert_eq!(c.lr_at(110), 0.0);
    }

    #[test]
    fn bad_strings_say_what_is_wrong() {
        assert!(Schedule::parse("400:abc").unwrap_err().contains("abc"));
        assert!(Schedule::parse("0:1e-5").unwrap_err().contains("0 steps"));
        assert!(Schedule::parse("cosin").unwrap_err().contains("cosine"));
        assert!(
            Schedule::parse("400-1e-5")
                .unwrap_err()
                .contains("expected")
        );
    }
}
