//! Quantized base weights for QLoRA, in mlx's affine format: each row is cut into groups of
//! `group_size` input values that share a scale and a bias (`w ≈ scale · q + bias`), and the
//! `bits`-bit codes `q` are packed into u32 words, lowest bits first. mlx-community checkpoints
//! store exactly this (`weight` as u32, `scales`, `biases`), so they load without conversion.
//!
//! The packed words stay on the device (4 bits: an eighth of f32, a quarter of f16) and a layer's
//! weight is dequantized only for the matmul that needs it; under block checkpointing only the
//! block being recomputed holds dense weights.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rayon::prelude::*;

/// The bit widths whose codes tile a u32 word exactly.
pub const SUPPORTED_BITS: &[usize] = &[2, 4, 8];

/// How a weight is quantized (mlx's `quantization: {group_size, bits}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: usize,
    pub group_size: usize,
}

impl QuantSpec {
    /// Checks the spec against a weight of `[out, in]`.
    pub fn check(&self, shape: [usize; 2]) -> Result<()> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            bail!(
                "{}-bit quantization is not supported; use one of {SUPPORTED_BITS:?}",
                self.bits
            );
        }
        let per_word = 32 / self.bits;
        if self.group_size == 0 || self.group_size % per_word != 0 {
            bail!(
                "group size {} must be a positive multiple of {per_word} for {} bits",
                self.group_size,
                self.bits
            );
        }
        if shape[1] % self.group_size != 0 {
            bail!(
                "a weight with {} inputs cannot be cut into groups of {}",
                shape[1],
                self.group_size
            );
        }
        Ok(())
    }
}

/// A `[out, in]` weight kept packed on the device.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    /// `[out, in · bits / 32]` words, their bits stored as i32 (every backend has i32).
    packed: Tensor<2, Int>,
    /// `[out, in / group_size]`, f32.
    scales: Tensor<2>,
    biases: Tensor<2>,
    pub spec: QuantSpec,
    pub shape: [usize; 2],
}

impl QuantWeight {
    /// Uploads mlx-layout parts: `words` row-major `[out, in · bits / 32]`, `scales` and
    /// `biases` `[out, in / group_size]` in any float type.
    pub fn new(
        words: &[u32],
        scales: TensorData,
        biases: TensorData,
        shape: [usize; 2],
        spec: QuantSpec,
        device: &Device,
    ) -> Result<Self> {
        spec.check(shape)?;
        let [out, inp] = shape;
        let width = inp * spec.bits / 32;
        if words.len() != out * width {
            bail!(
                "{} packed words for a [{out}, {inp}] weight at {} bits; expected {}",
                words.len(),
                spec.bits,
                out * width
            );
        }
        let groups = [out, inp / spec.group_size];
        for (what, d) in [("scales", &scales), ("biases", &biases)] {
            if d.shape().as_slice() != groups {
                bail!(
                    "{what} have shape {:?}; a [{out}, {inp}] weight in groups of {} needs {groups:?}",
                    d.shape().as_slice(),
                    spec.group_size
                );
            }
        }
        // The words' bits, reinterpreted: shifts and masks below read them the same either way.
        let bits: Vec<i32> = words.iter().map(|&w| w as i32).collect();
        let packed = Tensor::from_data(TensorData::new(bits, [out, width]), (device, DType::I32));
        let float = |d: TensorData| Tensor::<2>::from_data(d, (device, DType::F32));
        Ok(Self {
            packed,
            scales: float(scales),
            biases: float(biases),
            spec,
            shape,
        })
    }

    /// Quantizes a dense `[out, in]` f32 weight on the host and uploads it.
    pub fn from_dense(
        w: &[f32],
        shape: [usize; 2],
        spec: QuantSpec,
        device: &Device,
    ) -> Result<Self> {
        spec.check(shape)?;
        let (words, scales, biases) = quantize(w, shape, spec);
        let groups = [shape[0], shape[1] / spec.group_size];
        Self::new(
            &words,
            TensorData::new(scales, groups),
            TensorData::new(biases, groups),
            shape,
            spec,
            device,
        )
    }

    /// The same weight with its scales and biases held in `dtype` (mlx keeps them in the
    /// model's float type: f16 halves their share of a 4-bit model's memory). The
    /// dequantization itself still runs in f32.
    pub fn scales_as(self, dtype: DType) -> Self {
        Self {
            scales: self.scales.cast(dtype),
            biases: self.biases.cast(dtype),
            ..self
        }
    }

    /// The dense `[out, in]` weight in `dtype`, computed on the device.
    ///
    /// Written as one chain of elementwise ops over broadcast views (words, shifts, scales and
    /// biases all expanded to `[out, groups, words per group, codes per word]`), so that with
    /// fusion it runs as one kernel whose only output is the dense weight. Unpacking code by
    /// code and stacking instead held `in · out` i32 codes and two f32 copies at once: about
    /// 700 MB per Mistral-7B MLP weight, on top of its 117 MB f16 result. In f16/bf16 the
    /// scale and bias are applied in that type, as mlx does: the codes (0..2^bits) are exact in
    /// it, and the result differs from an f32 computation by at most one rounding.
    pub fn dequantize(&self, dtype: DType) -> Tensor<2> {
        let [out, inp] = self.shape;
        let QuantSpec { bits, group_size } = self.spec;
        let per_word = 32 / bits;
        let groups = inp / group_size;
        let words_per_group = group_size / per_word;
        let mask = (1i64 << bits) - 1;
        let full = [out, groups, words_per_group, per_word];
        let device = self.packed.device();
        let shifts: Vec<i32> = (0..per_word).map(|j| (j * bits) as i32).collect();
        let shifts =
            Tensor::<1, Int>::from_data(TensorData::new(shifts, [per_word]), (&device, DType::I32))
                .reshape([1, 1, 1, per_word])
                .expand(full);
        // Code j of word k is input k · per_word + j.
        let q = self
            .packed
            .clone()
            .reshape([out, groups, words_per_group, 1])
            .expand(full)
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(mask)
            .float();
        let compute = dtype;
        let q = if q.dtype() == compute {
            q
        } else {
            q.cast(compute)
        };
        let per_group = |t: &Tensor<2>| {
            let t = if t.dtype() == compute {
                t.clone()
            } else {
                t.clone().cast(compute)
            };
            t.reshape([out, groups, 1, 1]).expand(full)
        };
        let w = q * per_group(&self.scales) + per_group(&self.biases);
        w.reshape([out, inp])
    }

    /// Bytes the weight takes on the device (codes, scales and biases).
    pub fn device_bytes(&self) -> usize {
        let [out, inp] = self.shape;
        let scale_bytes = self.scales.dtype().size();
        out * inp * self.spec.bits / 8 + 2 * scale_bytes * out * (inp / self.spec.group_size)
    }
}

/// mlx's affine quantization of a row-major `[out, in]` weight: per group, the scale spans
/// `[min, max]` in `2^bits - 1` steps (negative when the larger-magnitude end is the max), the
/// bias is that end, and the scale is nudged so the bias is a whole number of steps from zero. Returns the packed words,
/// scales and biases.
pub fn quantize(w: &[f32], shape: [usize; 2], spec: QuantSpec) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let [out, inp] = shape;
    let QuantSpec { bits, group_size } = spec;
    let n_bins = ((1u32 << bits) - 1) as f32;
    let per_word = 32 / bits;
    let groups = inp / group_size;
    let row_words = inp / per_word;
    let mut words = vec![0u32; out * row_words];
    let mut scales = vec![0f32; out * groups];
    let mut biases = vec![0f32; out * groups];
    // Rows are independent: one row's words, scales and biases per task (a 7B model's weights
    // are quantized at load in seconds on a many-core host, not minutes).
    words
        .par_chunks_mut(row_words.max(1))
        .zip(scales.par_chunks_mut(groups.max(1)))
        .zip(biases.par_chunks_mut(groups.max(1)))
        .enumerate()
        .for_each(|(r, ((row, scales), biases))| {
            for g in 0..groups {
                let vals = &w[r * inp + g * group_size..r * inp + (g + 1) * group_size];
                let (lo, hi) = vals
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let min_is_edge = lo.abs() > hi.abs();
                let mut scale = ((hi - lo) / n_bins).max(1e-7);
                if !min_is_edge {
                    scale = -scale;
                }
                let edge = if min_is_edge { lo } else { hi };
                let q0 = (edge / scale).round();
                let (scale, bias) = if q0 != 0.0 {
                    (edge / q0, edge)
                } else {
                    (scale, 0.0)
                };
                scales[g] = scale;
                biases[g] = bias;
                for (i, &v) in vals.iter().enumerate() {
                    let q = ((v - bias) / scale).round().clamp(0.0, n_bins) as u32;
                    let idx = g * group_size + i;
                    row[idx / per_word] |= q << ((idx % per_word) * bits);
                }
            }
        });
    (words, scales, biases)
}

/// The dense values of mlx-layout parts on the host, row-major `[out, in]` (for fusing and
/// converting, which write dense weights).
pub fn dequantize_host(
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    shape: [usize; 2],
    spec: QuantSpec,
) -> Result<Vec<f32>> {
    spec.check(shape)?;
    let [out, inp] = shape;
    let QuantSpec { bits, group_size } = spec;
    let per_word = 32 / bits;
    let groups = inp / group_size;
    if words.len() != out * inp / per_word
        || scales.len() != out * groups
        || biases.len() != out * groups
    {
        bail!(
            "quantized parts do not fit a [{out}, {inp}] weight at {bits} bits in groups of {group_size}"
        );
    }
    let mask = (1u32 << bits) - 1;
    Ok((0..out * inp)
        .map(|i| {
            let q = (words[i / per_word] >> ((i % per_word) * bits)) & mask;
            let g = i / group_size;
            scales[g] * q as f32 + biases[g]
        })
        .collect())
}
