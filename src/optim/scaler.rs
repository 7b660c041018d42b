//! The f16 loss scaler.

/// Dynamic loss scaling for f16 training, as PyTorch's `GradScaler`: the loss is multiplied by
/// `scale` so that small gradients survive f16; a step whose gradients overflow is skipped
/// and halves the scale; `growth_interval` finite steps in a row double it.
///
/// The skip itself happens on the device (the optimizer keeps the old values where the
/// step's gradients were not finite); the scaler learns of it when the trainer reads the
/// step's flag back. That read waits for the GPU, so the trainer makes it every step only
/// while the scale is not `settled` (a step at it has yet to come out finite: at the start,
/// and after each change), where an overflow is likeliest and every step that follows it
/// at the same scale would overflow too; otherwise at report steps.
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: u32,
    good_steps: u32,
    /// Steps skipped because their gradients overflowed.
    pub skipped: u64,
    /// A step at the current scale has come out finite.
    pub settled: bool,
}

impl LossScaler {
    pub fn new(initial: f64, growth_interval: u32) -> Self {
        Self {
            scale: initial,
            growth_interval,
            good_steps: 0,
            skipped: 0,
            settled: false,
        }
    }

    /// PyTorch's defaults: 2^16, doubling after 2000 good steps.
    pub fn for_f16() -> Self {
        Self::new(65536.0, 2000)
    }

    /// Takes in whether one step's gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.settled = true;
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
                self.settled = false;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
            self.settled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_lowers_the_scale_and_good_steps_raise_it() {
        let mut s = LossScaler::new(1024.0, 3);
        assert!(!s.settled, "no step at the first scale yet");
        s.update(false);
        assert_eq!((s.scale, s.skipped, s.settled), (512.0, 1, false));
        s.update(true);
        assert!(s.settled);
        s.update(true);
        assert_eq!(s.scale, 512.0);
        s.update(true);
        assert_eq!(
            (s.scale, s.settled),
            (1024.0, false),
            "a grown scale is unproven"
        );
        s.update(true);
        assert!(s.settled);
        s.update(false);
        s.update(true);
        s.update(true);
        s.update(true);
        assert_eq!(
            s.scale, 1024.0,
            "three good steps after the overflow grow it back"
        );
        s = LossScaler::new(1024.0, 3);
        s.update(true);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, 2048.0);
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(
            (s.scale, s.skipped),
            (1024.0, 1),
            "an overflow restarts the count"
        );
    }
}
