//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), over named
//! f32 parameters. With `weight_decay = 0` it is Adam.

use std::collections::HashMap;

use burn::tensor::{Bool, DType, Tensor};

#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: i32,
    moments: HashMap<String, (Tensor<2>, Tensor<2>)>,
}

impl AdamW {
    /// PyTorch's defaults for betas and eps.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments: HashMap::new(),
        }
    }

    pub fn steps_taken(&self) -> i32 {
        self.step
    }

    /// One update of every parameter that has a gradient in `grads` (possibly accumulated or
    /// clipped by the caller).
    pub fn step(&mut self, params: &mut [(String, Tensor<2>)], grads: &[(String, Tensor<2>)]) {
        self.step_where(params, grads, None, 1.0);
    }

    /// [`AdamW::step`] with the gradients multiplied by `grad_mul` (to undo a loss scale) and,
    /// with `apply`, kept on the device as a condition: where it is false (an overflowed f16
    /// step) parameters and moments keep their old values, with no host sync.
    pub fn step_where(
        &mut self,
        params: &mut [(String, Tensor<2>)],
        grads: &[(String, Tensor<2>)],
        apply: Option<&Tensor<1, Bool>>,
        grad_mul: f64,
    ) {
        self.step += 1;
        let grads: HashMap<&str, &Tensor<2>> = grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        let (lr, b1, b2, eps, wd) = (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay);
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name.as_str()) else {
                continue;
            };
            let mut g = (*g).clone().inner().cast(DType::F32);
            if grad_mul != 1.0 {
                g = g.mul_scalar(grad_mul);
            }
            let old = p.clone().inner();
            let mut w = old.clone();
            if wd != 0.0 {
                w = w.mul_scalar(1.0 - lr * wd);
            }
            let (m0, v0) = self
                .moments
                .remove(name.as_str())
                .unwrap_or_else(|| (g.zeros_like(), g.zeros_like()));
            let m = m0.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            let v = v0.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
            let denom = v.clone().div_scalar(bc2).sqrt().add_scalar(eps);
            w = w - m.clone().div_scalar(bc1).div(denom).mul_scalar(lr);
            let (w, m, v) = match apply {
                None => (w, m, v),
                Some(ok) => {
                    let keep = ok.clone().bool_not().reshape([1, 1]).expand(w.dims());
                    (
                        w.mask_where(keep.clone(), old),
                        m.mask_where(keep.clone(), m0),
                        v.mask_where(keep, v0),
                    )
                }
            };
            self.moments.insert(name.clone(), (m, v));
            *p = w;
        }
    }

    /// Takes back the step count of a step that [`AdamW::step_where`] skipped on the device
    /// (its bias correction then matches PyTorch's, which never counts a skipped step).
    pub fn uncount_skipped(&mut self) {
        self.step -= 1;
    }

    /// For checkpoints: (steps taken, [(name, first moment, second moment)]), sorted by name.
    pub fn export_state(&self) -> (i32, Vec<(String, Tensor<2>, Tensor<2>)>) {
        let mut m: Vec<_> = self
            .moments
            .iter()
            .map(|(n, (a, b))| (n.clone(), a.clone(), b.clone()))
            .collect();
        m.sort_by(|a, b| a.0.cmp(&b.0));
        (self.step, m)
    }

    /// Restores what [`AdamW::export_state`] returned.
    pub fn import_state(&mut self, step: i32, moments: Vec<(String, Tensor<2>, Tensor<2>)>) {
        self.step = step;
        self.moments = moments.into_iter().map(|(n, a, b)| (n, (a, b))).collect();
    }
}
