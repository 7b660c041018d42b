//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), over named
//! f32 parameters. With `weight_decay = 0` it is Adam.
//!
//! When every parameter has a gradient (the usual step) the update runs on one flat f32 vector
//! holding all of them, as PyTorch's multi-tensor ("foreach") AdamW does: about twenty device
//! ops per step instead of twenty per parameter. A LoRA run of SmolLM2 has 120 factors, and on a
//! GPU each op costs host time to record and launch whatever its size, so per-parameter updates
//! were thousands of launches a step. The elementwise math is the same either way.

use std::collections::HashMap;

use burn::tensor::{Bool, DType, Tensor};

/// The most values the flat update gathers: it copies the parameters and their gradients into
/// new vectors each step, which is nothing for adapters (SmolLM2's 120 LoRA factors are 0.5 M
/// values) but would be several f32 copies of every trained weight in a full fine-tune, whose
/// few large tensors gain nothing from it.
pub const FLAT_MAX_VALUES: usize = 1 << 24;

/// Where each named parameter sits in one flat f32 vector: name, shape, first index.
///
/// Parameters with the same number of columns sit side by side, stacked by rows (the vector is
/// one `[Σ rows, cols]` block per column count), so gathering them is one concatenation per
/// column count and cutting them back out is one row range each: no reshape per parameter. A
/// LoRA run has two column counts (the A factors' input width, the B factors' rank), so SmolLM2's
/// 120 factors cost 5 operations to gather instead of 121, and 124 to cut instead of 240;
/// on a GPU each one is host time whatever its size (bench::host_profile).
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    pub entries: Vec<(String, [usize; 2], usize)>,
    pub len: usize,
    /// Per column count, in order of first appearance: the columns and the entries (indices
    /// into `entries`, in their order) whose rows are stacked there.
    groups: Vec<(usize, Vec<usize>)>,
}

impl FlatLayout {
    /// The layout of `params` (entries in their order; values grouped by column count).
    pub fn of(params: &[(String, Tensor<2>)]) -> Self {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, (_, p)) in params.iter().enumerate() {
            let cols = p.dims()[1];
            match groups.iter_mut().find(|(c, _)| *c == cols) {
                Some((_, members)) => members.push(i),
                None => groups.push((cols, vec![i])),
            }
        }
        let mut entries: Vec<_> = params
            .iter()
            .map(|(name, p)| (name.clone(), p.dims(), 0))
            .collect();
        let mut len = 0;
        for (_, members) in &groups {
            for &i in members {
                entries[i].2 = len;
                len += entries[i].1[0] * entries[i].1[1];
            }
        }
        Self {
            entries,
            len,
            groups,
        }
    }

    /// The tensors `named` lists for this layout's entries as one f32 vector; `None` when one
    /// of the entries has no tensor there, or one of another shape, or when the vector would be
    /// over [`FLAT_MAX_VALUES`].
    pub fn flatten(&self, named: &[(String, Tensor<2>)]) -> Option<Tensor<1>> {
        if self.len > FLAT_MAX_VALUES {
            return None;
        }
        let by_name: HashMap<&str, &Tensor<2>> =
            named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut blocks = Vec::with_capacity(self.groups.len());
        for (cols, members) in &self.groups {
            let mut parts = Vec::with_capacity(members.len());
            let mut rows = 0;
            for &i in members {
                let (name, dims, _) = &self.entries[i];
                let t = *by_name.get(name.as_str())?;
                if t.dims() != *dims {
                    return None;
                }
                let t = t.clone().inner();
                parts.push(match t.dtype() {
                    DType::F32 => t,
                    _ => t.cast(DType::F32),
                });
                rows += dims[0];
            }
            let block = match parts.len() {
                1 => parts.pop().expect("one part"),
                _ => Tensor::cat(parts, 0),
            };
            blocks.push(block.reshape([rows * cols]));
        }
        match blocks.len() {
            0 => None,
            1 => blocks.pop(),
            _ => Some(Tensor::cat(blocks, 0)),
        }
    }

    /// The flat vector cut back into named `[rows, cols]` tensors (views of it), in the
    /// entries' order.
    pub fn split(&self, flat: &Tensor<1>) -> Vec<(String, Tensor<2>)> {
        let mut out: Vec<Option<(String, Tensor<2>)>> = vec![None; self.entries.len()];
        for (cols, members) in &self.groups {
            let start = self.entries[members[0]].2;
            let rows: usize = members.iter().map(|&i| self.entries[i].1[0]).sum();
            let block = flat
                .clone()
                .slice([start..start + rows * cols])
                .reshape([rows, *cols]);
            let mut row = 0;
            for &i in members {
                let (name, [r, _], _) = &self.entries[i];
                let t = match members.len() {
                    1 => block.clone(),
                    _ => block.clone().slice([row..row + r, 0..*cols]),
                };
                out[i] = Some((name.clone(), t));
                row += r;
            }
        }
        out.into_iter()
            .map(|e| e.expect("every entry is in a group"))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: i32,
    /// Moments by parameter name (steps where some parameter had no gradient, and restored
    /// checkpoints until the next flat step).
    moments: HashMap<String, (Tensor<2>, Tensor<2>)>,
    /// Moments of the flat steps, in their layout.
    flat: Option<(FlatLayout, Tensor<1>, Tensor<1>)>,
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
            flat: None,
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
        let layout = FlatLayout::of(params);
        match layout.flatten(grads) {
            Some(g) => self.step_flat(params, &layout, g, apply, grad_mul),
            None => self.step_named(params, grads, apply, grad_mul),
        }
    }

    /// [`AdamW::step_where`] one parameter at a time, skipping those without a gradient; a step
    /// in which no parameter has one is no step at all (PyTorch's optimizer does nothing then).
    pub fn step_named(
        &mut self,
        params: &mut [(String, Tensor<2>)],
        grads: &[(String, Tensor<2>)],
        apply: Option<&Tensor<1, Bool>>,
        grad_mul: f64,
    ) {
        if !params
            .iter()
            .any(|(n, _)| grads.iter().any(|(g, _)| g == n))
        {
            return;
        }
        self.step += 1;
        self.step_each(params, grads, apply, grad_mul);
    }

    /// [`AdamW::step_where`] with every gradient given as one flat vector `g` in `layout`, which
    /// should be [`FlatLayout::of`] `params` (another layout is taken by name, one at a time).
    pub fn step_flat(
        &mut self,
        params: &mut [(String, Tensor<2>)],
        layout: &FlatLayout,
        g: Tensor<1>,
        apply: Option<&Tensor<1, Bool>>,
        grad_mul: f64,
    ) {
        let old = match layout.flatten(params) {
            Some(old) if *layout == FlatLayout::of(params) => old,
            // Not the layout of `params`: by name, so no update lands on another parameter.
            _ => return self.step_named(params, &layout.split(&g), apply, grad_mul),
        };
        self.step += 1;
        let (m0, v0) = self.flat_moments(layout, &old);
        let g = if grad_mul != 1.0 {
            g.mul_scalar(grad_mul)
        } else {
            g
        };
        let (w, m, v) = self.update(old, g, m0, v0, apply);
        for ((_, p), (_, new)) in params.iter_mut().zip(layout.split(&w)) {
            *p = new;
        }
        self.flat = Some((layout.clone(), m, v));
    }

    /// The moments of `layout`'s parameters as flat vectors (zeros for a parameter not seen
    /// before), taking over any kept by name.
    fn flat_moments(&mut self, layout: &FlatLayout, like: &Tensor<1>) -> (Tensor<1>, Tensor<1>) {
        if let Some((l, m, v)) = &self.flat
            && l == layout
        {
            return (m.clone(), v.clone());
        }
        self.unflatten_moments();
        if self.moments.is_empty() {
            return (like.zeros_like(), like.zeros_like());
        }
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for (name, [r, c], _) in &layout.entries {
            let (m, v) = self.moments.remove(name).unwrap_or_else(|| {
                let z = Tensor::<2>::zeros([*r, *c], (&like.device(), DType::F32));
                (z.clone(), z)
            });
            ms.push((name.clone(), m));
            vs.push((name.clone(), v));
        }
        let flat = |x: &[(String, Tensor<2>)]| layout.flatten(x).expect("every entry filled");
        (flat(&ms), flat(&vs))
    }

    /// Moves flat moments into the by-name map.
    fn unflatten_moments(&mut self) {
        if let Some((layout, m, v)) = self.flat.take() {
            for ((name, m), (_, v)) in layout.split(&m).into_iter().zip(layout.split(&v)) {
                self.moments.insert(name, (m, v));
            }
        }
    }

    /// One parameter at a time: for steps where some parameter has no gradient, which it then
    /// skips, as PyTorch does.
    fn step_each(
        &mut self,
        params: &mut [(String, Tensor<2>)],
        grads: &[(String, Tensor<2>)],
        apply: Option<&Tensor<1, Bool>>,
        grad_mul: f64,
    ) {
        self.unflatten_moments();
        let grads: HashMap<&str, &Tensor<2>> = grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name.as_str()) else {
                continue;
            };
            let mut g = (*g).clone().inner().cast(DType::F32);
            if grad_mul != 1.0 {
                g = g.mul_scalar(grad_mul);
            }
            let old = p.clone().inner();
            let (m0, v0) = self
                .moments
                .remove(name.as_str())
                .unwrap_or_else(|| (g.zeros_like(), g.zeros_like()));
            let (w, m, v) = self.update(old, g, m0, v0, apply);
            self.moments.insert(name.clone(), (m, v));
            *p = w;
        }
    }

    /// The AdamW update of parameters `old` with gradient `g` and moments `m0`, `v0` at step
    /// `self.step`; returns the new parameters and moments. Where `apply` is false, the old ones.
    fn update<const D: usize>(
        &self,
        old: Tensor<D>,
        g: Tensor<D>,
        m0: Tensor<D>,
        v0: Tensor<D>,
        apply: Option<&Tensor<1, Bool>>,
    ) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        let (lr, b1, b2, eps, wd) = (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay);
        let mut w = old.clone();
        if wd != 0.0 {
            w = w.mul_scalar(1.0 - lr * wd);
        }
        let m = m0.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        let v = v0.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let denom = v.clone().div_scalar(bc2).sqrt().add_scalar(eps);
        w = w - m.clone().div_scalar(bc1).div(denom).mul_scalar(lr);
        match apply {
            None => (w, m, v),
            Some(ok) => {
                let keep = ok.clone().bool_not().reshape([1; D]).expand(w.dims());
                (
                    w.mask_where(keep.clone(), old),
                    m.mask_where(keep.clone(), m0),
                    v.mask_where(keep, v0),
                )
            }
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
        if let Some((layout, fm, fv)) = &self.flat {
            for ((name, a), (_, b)) in layout.split(fm).into_iter().zip(layout.split(fv)) {
                m.push((name, a, b));
            }
        }
        m.sort_by(|a, b| a.0.cmp(&b.0));
        (self.step, m)
    }

    /// Restores what [`AdamW::export_state`] returned.
    pub fn import_state(&mut self, step: i32, moments: Vec<(String, Tensor<2>, Tensor<2>)>) {
        self.step = step;
        self.flat = None;
        self.moments = moments.into_iter().map(|(n, a, b)| (n, (a, b))).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: &[f32], shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), &Device::flex())
    }

    fn vals(x: &Tensor<2>) -> Vec<f32> {
        x.clone().into_data().try_to_vec::<f32>().unwrap()
    }

    fn params() -> Vec<(String, Tensor<2>)> {
        vec![
            ("a".into(), t(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.75], [2, 3])),
            ("b".into(), t(&[1.0, -2.0], [2, 1])),
        ]
    }

    fn grads(k: f32) -> Vec<(String, Tensor<2>)> {
        vec![
            (
                "a".into(),
                t(&[0.1 * k, -0.2, 0.3, 0.05, -0.4 * k, 0.6], [2, 3]),
            ),
            ("b".into(), t(&[-0.3, 0.7 * k], [2, 1])),
        ]
    }

    #[test]
    fn the_flat_update_equals_the_per_parameter_one_and_checkpoints_round_trip() {
        let (mut flat, mut each) = (AdamW::new(1e-2, 0.1), AdamW::new(1e-2, 0.1));
        let (mut pf, mut pe) = (params(), params());
        for step in 0..3 {
            let g = grads(step as f32 + 1.0);
            flat.step_where(&mut pf, &g, None, 0.5);
            each.step_named(&mut pe, &g, None, 0.5);
            assert!(flat.flat.is_some() && each.flat.is_none());
        }
        for ((n, a), (_, b)) in pf.iter().zip(&pe) {
            assert_eq!(a.dims(), b.dims(), "{n}");
            for (x, y) in vals(a).iter().zip(vals(b)) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{n}: {x} vs {y}");
            }
        }
        // The flat moments export by name like the per-parameter ones, and a restored
        // optimizer goes on as the original would.
        let (steps, mf) = flat.export_state();
        let (_, me) = each.export_state();
        assert_eq!(steps, 3);
        assert_eq!(
            mf.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        for ((n, m1, v1), (_, m2, v2)) in mf.iter().zip(&me) {
            for (x, y) in vals(m1)
                .iter()
                .chain(&vals(v1))
                .zip(vals(m2).iter().chain(&vals(v2)))
            {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{n}: {x} vs {y}");
            }
        }
        let mut restored = AdamW::new(1e-2, 0.1);
        restored.import_state(steps, mf);
        let mut pr = pf.clone();
        let g = grads(-2.0);
        restored.step_where(&mut pr, &g, None, 1.0);
        flat.step_where(&mut pf, &g, None, 1.0);
        for ((_, a), (_, b)) in pr.iter().zip(&pf) {
            assert_eq!(vals(a), vals(b));
        }
    }

    /// LoRA's shape: A and B factors interleaved, two column counts with several members each.
    fn lora_like(k: f32) -> Vec<(String, Tensor<2>)> {
        let seq = |n: usize, at: f32| {
            (0..n)
                .map(|i| k * (at + i as f32 * 0.25))
                .collect::<Vec<_>>()
        };
        vec![
            ("l0.a".into(), t(&seq(6, 0.0), [2, 3])),
            ("l0.b".into(), t(&seq(8, 1.0), [4, 2])),
            ("l1.a".into(), t(&seq(6, -2.0), [2, 3])),
            ("l1.b".into(), t(&seq(6, 3.0), [3, 2])),
            ("l2.a".into(), t(&seq(6, 0.5), [2, 3])),
        ]
    }

    /// Entries keep the parameters' order, each entry's offset indexes its own values in the
    /// flat vector, same-width parameters are contiguous, and split undoes flatten exactly.
    #[test]
    fn the_grouped_layout_round_trips_and_its_offsets_index_the_values() {
        let p = lora_like(1.0);
        let layout = FlatLayout::of(&p);
        let names: Vec<_> = layout.entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["l0.a", "l0.b", "l1.a", "l1.b", "l2.a"]);
        let at: Vec<_> = layout.entries.iter().map(|e| e.2).collect();
        // The three 3-wide A factors first (6 values each), then the 2-wide B factors.
        assert_eq!(at, [0, 18, 6, 26, 12]);
        assert_eq!(layout.len, 32);
        let flat = layout.flatten(&p).unwrap();
        let all = flat.clone().into_data().try_to_vec::<f32>().unwrap();
        for ((name, [r, c], at), (_, x)) in layout.entries.iter().zip(&p) {
            assert_eq!(all[*at..at + r * c], vals(x)[..], "{name}");
        }
        for ((n1, a), (n2, b)) in layout.split(&flat).iter().zip(&p) {
            assert_eq!((n1, a.dims(), vals(a)), (n2, b.dims(), vals(b)));
        }
        // A missing entry or one of another shape is no flat vector.
        assert!(layout.flatten(&p[1..]).is_none());
        let mut wrong = p.clone();
        wrong[3].1 = t(&[0.0; 6], [2, 3]);
        assert!(layout.flatten(&wrong).is_none());
    }

    #[test]
    fn the_grouped_flat_update_equals_the_per_parameter_one() {
        let (mut flat, mut each) = (AdamW::new(1e-2, 0.1), AdamW::new(1e-2, 0.1));
        let (mut pf, mut pe) = (lora_like(1.0), lora_like(1.0));
        for step in 0..3 {
            let g = lora_like(0.1 * (step as f32 + 1.0));
            flat.step_where(&mut pf, &g, None, 0.5);
            each.step_named(&mut pe, &g, None, 0.5);
        }
        assert!(flat.flat.is_some());
        for ((n, a), (_, b)) in pf.iter().zip(&pe) {
            assert_eq!(a.dims(), b.dims(), "{n}");
            for (x, y) in vals(a).iter().zip(vals(b)) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn a_parameter_without_a_gradient_is_left_alone() {
        let mut opt = AdamW::new(1e-1, 0.0);
        let mut p = params();
        let before = vals(&p[1].1);
        let only_a: Vec<_> = grads(1.0).into_iter().take(1).collect();
        opt.step_where(&mut p, &only_a, None, 1.0);
        assert_eq!(vals(&p[1].1), before, "b had no gradient");
        assert_ne!(vals(&p[0].1), vals(&params()[0].1));
        // A later full step goes flat and still knows a's moments.
        opt.step_where(&mut p, &grads(1.0), None, 1.0);
        assert!(opt.flat.is_some() && opt.moments.is_empty());
    }

    #[test]
    fn a_false_apply_flag_keeps_parameters_and_moments() {
        let mut opt = AdamW::new(1e-1, 0.0);
        let mut p = params();
        opt.step_where(&mut p, &grads(1.0), None, 1.0);
        let kept: Vec<_> = p.iter().map(|(_, x)| vals(x)).collect();
        let (_, m_before) = opt.export_state();
        let no = Tensor::<1>::from_data(TensorData::new(vec![0.0f32], [1]), &Device::flex())
            .greater_elem(1.0);
        opt.step_where(&mut p, &grads(5.0), Some(&no), 1.0);
        assert_eq!(p.iter().map(|(_, x)| vals(x)).collect::<Vec<_>>(), kept);
        let (_, m_after) = opt.export_state();
        for ((_, a, b), (_, c, d)) in m_before.iter().zip(&m_after) {
            assert_eq!((vals(a), vals(b)), (vals(c), vals(d)));
        }
    }
}
