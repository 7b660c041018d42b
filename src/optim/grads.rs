//! Gradient checks that stay on the device: the global norm, clipping to it, and the
//! finite flag an f16 step is skipped on, none of which reads a value back to the host.
//! A step's gradients travel as one flat vector ([`StepGradients::Flat`]) so that each of
//! these is a couple of device ops, not a few per parameter.

use burn::tensor::{Bool, DType, Tensor};

use super::adamw::FlatLayout;

/// One step's gradients, as the optimizer takes them.
pub enum StepGradients {
    /// Every parameter's gradient, f32, in the parameters' [`FlatLayout`].
    Flat(FlatLayout, Tensor<1>),
    /// By name, when some parameter got none (the optimizer then skips it).
    Named(Vec<(String, Tensor<2>)>),
}

impl StepGradients {
    /// `grads` for parameters laid out as `layout`: flat when they cover it.
    pub fn new(grads: Vec<(String, Tensor<2>)>, layout: FlatLayout) -> Self {
        match layout.flatten(&grads) {
            Some(flat) => Self::Flat(layout, flat),
            None => Self::Named(grads),
        }
    }

    /// The squared global L2 norm, f32 `[1]`; `None` without gradients.
    pub fn norm_sq(&self) -> Option<Tensor<1>> {
        match self {
            Self::Flat(_, g) => Some(g.clone().square().sum()),
            Self::Named(g) => global_norm_sq(g),
        }
    }

    /// Scales the gradients so that their global norm (whose square is `norm_sq`) is at most
    /// `max_norm`.
    pub fn clip(&mut self, norm_sq: &Tensor<1>, max_norm: f64) {
        match self {
            Self::Flat(_, g) => *g = g.clone() * clip_factor(norm_sq, max_norm),
            Self::Named(g) => clip_to_norm(g, norm_sq, max_norm),
        }
    }
}

/// The squared global L2 norm of all gradients, f32 `[1]`, on the device.
pub fn global_norm_sq(grads: &[(String, Tensor<2>)]) -> Option<Tensor<1>> {
    let parts: Vec<Tensor<1>> = grads
        .iter()
        .map(|(_, g)| {
            let n = g.shape().num_elements();
            g.clone().cast(DType::F32).reshape([n])
        })
        .collect();
    (!parts.is_empty()).then(|| Tensor::cat(parts, 0).square().sum())
}

/// `min(1, max_norm / (norm + 1e-6))`, f32 `[1]`.
fn clip_factor(norm_sq: &Tensor<1>, max_norm: f64) -> Tensor<1> {
    norm_sq
        .clone()
        .sqrt()
        .add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0)
}

/// Scales all gradients so that their global L2 norm (given squared, as from
/// [`global_norm_sq`]) is at most `max_norm`, without a host sync.
pub fn clip_to_norm(grads: &mut [(String, Tensor<2>)], norm_sq: &Tensor<1>, max_norm: f64) {
    let k = clip_factor(norm_sq, max_norm).reshape([1, 1]);
    for (_, g) in grads.iter_mut() {
        let dtype = g.dtype();
        let k = if dtype != DType::F32 {
            k.clone().cast(dtype)
        } else {
            k.clone()
        };
        *g = g.clone() * k;
    }
}

/// True (on the device) when `norm_sq` is finite: no gradient overflowed to inf or NaN.
pub fn finite(norm_sq: &Tensor<1>) -> Tensor<1, Bool> {
    // NaN compares false; inf is not below f32::MAX.
    norm_sq.clone().lower_elem(f32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: f32) -> Tensor<1> {
        Tensor::from_data(TensorData::new(vec![v], [1]), &Device::flex())
    }

    fn flag(x: Tensor<1, Bool>) -> bool {
        x.into_data().try_to_vec::<bool>().unwrap()[0]
    }

    #[test]
    fn finite_flags_inf_and_nan() {
        assert!(flag(finite(&t(3.0))));
        assert!(!flag(finite(&t(f32::INFINITY))));
        assert!(!flag(finite(&t(f32::NAN))));
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let dev = Device::flex();
        let mk = |v: f32| {
            (
                "g".to_string(),
                Tensor::<2>::from_data(TensorData::new(vec![v], [1, 1]), &dev),
            )
        };
        let mut g = vec![mk(3.0), mk(4.0)];
        let n = global_norm_sq(&g).unwrap();
        clip_to_norm(&mut g, &n, 1.0);
        let v: Vec<f32> = g
            .iter()
            .map(|(_, x)| x.clone().into_scalar::<f32>())
            .collect();
        assert!(
            (v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5,
            "{v:?}"
        );
        let mut small = vec![mk(0.3)];
        let n = global_norm_sq(&small).unwrap();
        clip_to_norm(&mut small, &n, 1.0);
        assert!((small[0].1.clone().into_scalar::<f32>() - 0.3).abs() < 1e-6);
    }

    #[test]
    fn flat_and_named_gradients_give_the_same_norm_and_clipping() {
        let dev = Device::flex();
        let named = vec![
            (
                "a".to_string(),
                Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 0.0, -1.0, 2.0], [2, 2]), &dev),
            ),
            (
                "b".to_string(),
                Tensor::<2>::from_data(TensorData::new(vec![4.0f32, -2.0], [1, 2]), &dev),
            ),
        ];
        let layout = FlatLayout::of(&named);
        let mut flat = StepGradients::new(named.clone(), layout.clone());
        assert!(matches!(flat, StepGradients::Flat(..)));
        let mut by_name = StepGradients::Named(named.clone());
        let (nf, nn) = (flat.norm_sq().unwrap(), by_name.norm_sq().unwrap());
        assert_eq!(nf.clone().into_scalar::<f32>(), 34.0);
        assert_eq!(nn.clone().into_scalar::<f32>(), 34.0);
        flat.clip(&nf, 1.0);
        by_name.clip(&nn, 1.0);
        let (StepGradients::Flat(_, f), StepGradients::Named(n)) = (flat, by_name) else {
            unreachable!()
        };
        let f: Vec<f32> = f.into_data().try_to_vec().unwrap();
        let n: Vec<f32> = n
            .iter()
            .flat_map(|(_, t)| t.clone().into_data().try_to_vec::<f32>().unwrap())
            .collect();
        assert_eq!(f.len(), 6);
        for (x, y) in f.iter().zip(&n) {
            assert!((x - y).abs() < 1e-6, "{f:?} vs {n:?}");
        }
        let clipped: f32 = f.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
        // A gradient missing or of another shape keeps them by name.
        let short = StepGradients::new(named[..1].to_vec(), layout.clone());
        assert!(matches!(short, StepGradients::Named(_)));
        let mut wrong = named.clone();
        wrong[1].1 = wrong[1].1.clone().reshape([2, 1]);
        assert!(matches!(
            StepGradients::new(wrong, layout),
            StepGradients::Named(_)
        ));
    }
}
