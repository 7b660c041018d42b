//! The llama-family decoder (llama, mistral, qwen2) on burn, numerically matching transformers.
//!
//! One implementation, switched by [`ModelConfig`]: biases, tied embeddings and RoPE scaling are
//! data, not code paths. Base weights are plain (non-autodiff) tensors in HF layout `[out, in]`;
//! burn treats them as constants when they meet autodiff tensors, so a LoRA-trained model records
//! a graph only from the first adapter on and the frozen base costs no autodiff bookkeeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData, activation};

use crate::model::attention_op::attend_recomputing;
use crate::model::config::ModelConfig;
use crate::model::fused_proj_op::{QkvLayout, group_product, qkv_attention, swiglu};
use crate::model::lora_op::lora_delta;
use crate::model::norm_op::rms_norm;
use crate::model::op_common::{env_switch, joined};
use crate::model::quant::QuantWeight;

/// Additive mask value: large enough that `exp` underflows to exactly 0, finite so that a
/// fully masked row (left padding) softmaxes to a uniform row instead of NaN.
const MASK_VALUE: f32 = -1e30;

/// A LoRA side branch `scale * B(A(dropout(x)))`, in PEFT's layout.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    /// `[r, in]`.
    pub a: Tensor<2>,
    /// `[out, r]`.
    pub b: Tensor<2>,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA's magnitude `m`, `[1, out]` f32: the output is rescaled row by row to
    /// `m / ||W + s·B·A||` (the norm taken per output row and treated as a constant in backward,
    /// as PEFT and the DoRA paper do). `None` for plain LoRA.
    pub magnitude: Option<Tensor<2>>,
}

impl LoraBranch {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// A dense projection `x W^T + b` with an optional LoRA branch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]` (HF layout).
    pub weight: BaseWeight,
    pub bias: Option<Tensor<1>>,
    pub lora: Option<LoraBranch>,
}

/// A base weight: dense in the compute dtype, or quantized and dequantized for each matmul.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor<2>),
    Quant(QuantWeight),
}

impl BaseWeight {
    pub fn dims(&self) -> [usize; 2] {
        match self {
            BaseWeight::Dense(w) => w.dims(),
            BaseWeight::Quant(q) => q.shape,
        }
    }

    /// The dense `[out, in]` weight in `dtype`.
    pub fn dense(&self, dtype: DType) -> Tensor<2> {
        match self {
            BaseWeight::Dense(w) if w.dtype() == dtype => w.clone(),
            BaseWeight::Dense(w) => w.clone().cast(dtype),
            BaseWeight::Quant(q) => q.dequantize(dtype),
        }
    }
}

impl Linear {
    /// A linear layer on a quantized base weight (no bias; set `bias` after).
    pub fn quantized(weight: QuantWeight) -> Self {
        Self {
            weight: BaseWeight::Quant(weight),
            bias: None,
            lora: None,
        }
    }

    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: BaseWeight::Dense(weight),
            bias,
            lora: None,
        }
    }

    /// `||W + s·B·A||` per output row, `[1, out]` f32, detached from the graph.
    pub fn dora_norm(&self, lora: &LoraBranch) -> Tensor<2> {
        let ba = lora
            .b
            .clone()
            .detach()
            .matmul(lora.a.clone().detach())
            .mul_scalar(lora.scale);
        let w = self.weight.dense(DType::F32) + ba.cast(DType::F32);
        w.square().sum_dim(1).sqrt().transpose().detach()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x`: `[B, T, in]` -> `[B, T, out]` (see [`Linear::forward_rows`]).
    pub fn forward(&self, x: Tensor<3>, dropout_seed: Option<u64>) -> Tensor<3> {
        let [b, t, d_in] = x.dims();
        let y = self.forward_rows(x.reshape([b * t, d_in]), dropout_seed);
        let out = y.dims()[1];
        y.reshape([b, t, out])
    }

    /// `x2`: `[rows, in]` -> `[rows, out]`. `dropout_seed` is `Some` only in training: the LoRA
    /// input's dropout mask is drawn from it, so a recomputed forward (block checkpointing) or a
    /// resumed run draws the same mask.
    pub fn forward_rows(&self, x2: Tensor<2>, dropout_seed: Option<u64>) -> Tensor<2> {
        let dtype = x2.dtype();
        let w = self.weight.dense(dtype);
        let mut y = x2.clone().matmul(w.clone().transpose());
        if let Some((lora, branch)) = self.lora.as_ref().zip(self.branch(x2, dropout_seed)) {
            y = match &lora.magnitude {
                None => y + branch.delta,
                // PEFT's DoRA: base(x) + (k - 1)·W·drop(x) + k·s·B·A·drop(x), k = m / ||W + sBA||.
                // k and k - 1 in f32: in f16/bf16 a k within a few 1e-3 of 1 would round to 1.
                Some(m) => {
                    let k = m.clone() / self.dora_norm(lora);
                    let base_d = if branch.dropped {
                        branch.input.matmul(w.transpose())
                    } else {
                        y.clone()
                    };
                    y + base_d * (k.clone() - 1.0).cast(dtype) + branch.delta * k.cast(dtype)
                }
            };
        }
        if let Some(bias) = self.bias_in(dtype) {
            y = y + bias.unsqueeze_dim::<2>(0);
        }
        y
    }

    /// The bias in `dtype`, if there is one.
    fn bias_in(&self, dtype: DType) -> Option<Tensor<1>> {
        self.bias.as_ref().map(|bias| match bias.dtype() == dtype {
            true => bias.clone(),
            false => bias.clone().cast(dtype),
        })
    }

    /// LoRA's branch `s·B·A·drop(x)` on the rows `x2`, in x2's dtype, `None` without an
    /// adapter; dropout is drawn only in training (`dropout_seed` is `Some`).
    fn branch(&self, x2: Tensor<2>, dropout_seed: Option<u64>) -> Option<Branch> {
        let lora = self.lora.as_ref()?;
        let dtype = x2.dtype();
        let mut xin = x2;
        let mut dropped = false;
        if let Some(seed) = dropout_seed
            && lora.dropout > 0.0
        {
            // The backend's random generator is shared by the process: seeding and drawing
            // must not interleave with another thread's (parallel runs, parallel tests).
            let keep = {
                let _one_at_a_time = DROPOUT_RNG.lock().unwrap_or_else(|p| p.into_inner());
                xin.device().seed(seed);
                xin.random_like(Distribution::Bernoulli(1.0 - lora.dropout))
            };
            xin = xin * keep / (1.0 - lora.dropout);
            dropped = true;
        }
        let (a, lb) = (lora.a.clone(), lora.b.clone());
        let delta = match lora_branch_op() {
            // The op reads f32 factors beside half-precision activations as they are.
            true => lora_delta(xin.clone(), a, lb, lora.scale),
            false => {
                // Factors stay f32 (optimizer state); meet half-precision activations in
                // their dtype.
                let (a, lb) = match a.dtype() == dtype {
                    true => (a, lb),
                    false => (a.cast(dtype), lb.cast(dtype)),
                };
                xin.clone()
                    .matmul(a.transpose())
                    .matmul(lb.transpose())
                    .mul_scalar(lora.scale)
            }
        };
        Some(Branch {
            delta,
            input: xin,
            dropped,
        })
    }

    /// The projections `group` (q/k/v, or gate/up) of the same rows `x2` as one product
    /// `[rows, Σ out]`, their outputs side by side in the group's order: the weights (and biases)
    /// joined by rows ([`group_product`]), each adapter's branch added to its own columns
    /// (`seeds`: each one's dropout seed). `None` where one of them is DoRA (its output needs
    /// its base product on its own).
    pub fn fused_rows(
        group: &[&Linear],
        x2: Tensor<2>,
        seeds: &[Option<u64>],
    ) -> Option<Tensor<2>> {
        assert_eq!(group.len(), seeds.len(), "one dropout seed per projection");
        let dora = |l: &&Linear| l.lora.as_ref().is_some_and(|lo| lo.magnitude.is_some());
        if group.iter().any(dora) {
            return None;
        }
        let (dtype, rows, device) = (x2.dtype(), x2.dims()[0], x2.device());
        let weights = group.iter().map(|l| l.weight.dense(dtype)).collect();
        let mut y = group_product(x2.clone(), weights);
        let deltas = group
            .iter()
            .zip(seeds)
            .map(|(l, seed)| l.branch(x2.clone(), *seed).map(|b| b.delta))
            .collect();
        if let Some(d) = side_by_side(group, deltas, |o| [rows, o], &device, dtype) {
            y = y + d;
        }
        let biases = group.iter().map(|l| l.bias_in(dtype)).collect();
        if let Some(b) = side_by_side(group, biases, |o| [o], &device, dtype) {
            y = y + b.unsqueeze_dim::<2>(0);
        }
        Some(y)
    }
}

/// The group's `parts` (one per projection, `None` where it has none) side by side along the
/// last axis, zeros of `shape(out_features)` standing in for the missing ones (joining the
/// others' autodiff graph, if they are in one); `None` where no projection has a part.
fn side_by_side<const D: usize>(
    group: &[&Linear],
    parts: Vec<Option<Tensor<D>>>,
    shape: impl Fn(usize) -> [usize; D],
    device: &Device,
    dtype: DType,
) -> Option<Tensor<D>> {
    if parts.iter().all(Option::is_none) {
        return None;
    }
    let tracked = parts.iter().flatten().any(Tensor::is_autodiff);
    let parts = group
        .iter()
        .zip(parts)
        .map(|(l, p)| {
            p.unwrap_or_else(|| {
                joined(
                    Tensor::zeros(shape(l.out_features()), (device, dtype)),
                    tracked,
                )
            })
        })
        .collect();
    Some(Tensor::cat(parts, D - 1))
}

/// LoRA's branch on some rows: its output, and its input after dropout (DoRA's base product
/// reads it when dropout drew a mask).
struct Branch {
    delta: Tensor<2>,
    input: Tensor<2>,
    dropped: bool,
}

/// Serializes seeding and drawing LoRA dropout masks (see [`Linear::forward_rows`]).
static DROPOUT_RNG: Mutex<()> = Mutex::new(());

/// Whether RMSNorm is one autodiff op ([`crate::model::norm_op`], `TUNA_NORM=op`, neutral in
/// speed on an H200) or the tensor ops of [`RmsNorm::forward_plain`] (the default), read once
/// per process.
fn norm_op() -> bool {
    static OP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OP.get_or_init(|| env_switch("TUNA_NORM", "op", "plain", false))
}

/// Whether LoRA branches go through [`crate::model::lora_op`] (the default) or through two plain
/// matmuls (`TUNA_LORA_BRANCH=plain`, for comparison), read once per process.
fn lora_branch_op() -> bool {
    static OP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OP.get_or_init(|| env_switch("TUNA_LORA_BRANCH", "op", "plain", true))
}

/// Whether a layer's projections that read the same input run as one product per group (q/k/v,
/// gate/up: [`Linear::fused_rows`], `TUNA_PROJECTIONS=fused`; opt-in: on an H100 no faster,
/// 15-17 % less GPU memory) or one product each (the default), read once per process.
fn fused_projections() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| env_switch("TUNA_PROJECTIONS", "fused", "separate", false))
}

/// RMSNorm computed in f32 whatever the model dtype, as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    /// Over the last axis of `x` (`[rows, d]` in the layers and the head).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match norm_op() {
            true => rms_norm(x, self.weight.clone(), self.eps),
            false => self.forward_plain(x),
        }
    }

    /// The norm in tensor ops (autodiff records each; [`crate::model::norm_op`] is one node).
    pub fn forward_plain<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let xf = if dtype != DType::F32 {
            x.cast(DType::F32)
        } else {
            x
        };
        let var = xf.clone().square().mean_dim(D - 1);
        let normed = xf * (var + self.eps).sqrt().recip();
        let normed = if dtype != DType::F32 {
            normed.cast(dtype)
        } else {
            normed
        };
        // A fully fine-tuned norm keeps its weight in f32 (the optimizer's copy).
        let w = match self.weight.dtype() == normed.dtype() {
            true => self.weight.clone(),
            false => self.weight.clone().cast(normed.dtype()),
        };
        normed * w.unsqueeze::<D>()
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// The dropout seed of one module of one layer, derived from the pass's seed.
fn module_seed(pass: &Pass, layer: usize, module: u64) -> Option<u64> {
    pass.dropout_seed.map(|s| {
        let mut z = s ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (module << 56);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

impl Mlp {
    /// `x`: `[rows, hidden]`.
    pub fn forward(&self, x: Tensor<2>, pass: &Pass, layer: usize) -> Tensor<2> {
        let seed = |m| module_seed(pass, layer, m);
        let group = [&self.gate_proj, &self.up_proj];
        let fused = pass
            .fuses(&group, &x)
            .then(|| Linear::fused_rows(&group, x.clone(), &[seed(4), seed(5)]))
            .flatten();
        let hidden = match fused {
            Some(gate_up) => swiglu(gate_up),
            None => {
                let gate = activation::silu(self.gate_proj.forward_rows(x.clone(), seed(4)));
                gate * self.up_proj.forward_rows(x, seed(5))
            }
        };
        self.down_proj.forward_rows(hidden, seed(6))
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// Fully fine-tuned (`model::full`): every weight of the block is trained, kept in f32.
    pub full: bool,
}

/// Per-layer keys and values (after RoPE), `[B, kv_heads, S, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }
}

/// How queries may look at keys.
#[derive(Debug, Clone)]
pub enum Mask {
    /// Causal, aligned bottom-right (query `i` of `T` sees keys `..= S - T + i`), no padding
    /// and no sliding window: the fused attention kernel can take it without a mask tensor.
    /// Right-padded training batches use it too: real tokens never attend to the padding
    /// after them, and padded positions carry no loss.
    Causal,
    /// Additive f32 mask broadcastable to `[B, H, T, S]` (padding, sliding window).
    Additive(Tensor<4>),
}

/// Position-dependent inputs shared by every layer of one forward call.
#[derive(Debug, Clone)]
pub struct Pass {
    /// The positions this call computes per row of the batch: the layers hold the hidden state
    /// as `[B·T, hidden]` rows (no reshape around every projection) and split it by `T`.
    pub seq: usize,
    /// RoPE's `cos` and `[-sin, sin]` (see [`apply_rope`]), `[1, T, 1, 2, head_dim / 2]`,
    /// model dtype.
    pub cos: Tensor<5>,
    pub sin_signed: Tensor<5>,
    pub mask: Mask,
    /// `Some` in training: LoRA dropout is on, its masks drawn from this seed.
    pub dropout_seed: Option<u64>,
    /// The path this pass's causal attention takes, before `TUNA_ATTENTION` and the defaults
    /// (a training step's choice, [`crate::train::step::StepOptions::attention`]).
    pub attention: Option<AttentionPath>,
    /// Whether this pass runs a layer's projection groups as one product each, before
    /// `TUNA_PROJECTIONS` (see [`Linear::fused_rows`]); a test's choice.
    pub projections: Option<bool>,
}

impl Pass {
    /// Panics unless the hidden rows `x` split into rows of this pass's positions.
    fn check_rows(&self, x: &Tensor<2>) {
        let (t, rows) = (self.seq, x.dims()[0]);
        assert!(
            t > 0 && rows % t == 0,
            "{rows} hidden rows do not split into rows of the pass's {t} positions"
        );
    }

    /// Whether the projections of `group` on the rows `x` run as one product: where this pass
    /// (or `TUNA_PROJECTIONS=fused`) asks for it, and only where a gradient flows through them
    /// (training). Elsewhere (evaluation, generation, a checkpointed block's first forward)
    /// joining the weights would copy them for every call and gain nothing.
    fn fuses(&self, group: &[&Linear], x: &Tensor<2>) -> bool {
        let tracked = |l: &&Linear| {
            let lora = l.lora.as_ref();
            lora.is_some_and(|lo| lo.a.is_tracked() || lo.b.is_tracked())
                || matches!(&l.weight, BaseWeight::Dense(w) if w.is_tracked())
        };
        self.projections.unwrap_or_else(fused_projections)
            && (x.is_tracked() || group.iter().any(tracked))
    }
}

/// RoPE on `x` `[B, T, heads, hd]` (HF's half-split layout): `x·cos + rotate_half(x)·sin`
/// with `rotate_half([x1, x2]) = [-x2, x1]`, written as `x·cos + swap(x)·sin±` where `swap`
/// exchanges the halves (one flip of a size-2 axis) and `sin±` is `[-sin, sin]`: the same
/// products, but two ops and one backward op instead of slices, a negation and a concatenation
/// (whose backward under autodiff is a zero tensor and a slice assignment per slice).
/// `cos`, `sin±`: `[1, T, 1, 2, hd / 2]`.
pub(crate) fn apply_rope(x: Tensor<4>, cos: &Tensor<5>, sin_signed: &Tensor<5>) -> Tensor<4> {
    let [b, t, h, hd] = x.dims();
    let x = x.reshape([b, t, h, 2, hd / 2]);
    let swapped = x.clone().flip([3]);
    (x * cos.clone() + swapped * sin_signed.clone()).reshape([b, t, h, hd])
}

/// `softmax(q kᵀ / √hd + mask) v` with the softmax in f32, for masks the fused kernel cannot
/// take (padding, sliding windows): q `[B, H, T, hd]`, k and v `[B, KV, S, hd]`, `mask`
/// additive f32 broadcastable to `[B, H, T, S]`; returns `[B, T, H * hd]`.
pub fn attend_explicit(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4>) -> Tensor<3> {
    weigh_values(activation::softmax(masked_scores(q, k, mask), 3), v)
}

/// `q kᵀ / √hd + mask` in f32, `[B, H, T, S]`. GQA without copying K/V: the query heads
/// sharing a KV head are folded into the row axis.
fn masked_scores(q: Tensor<4>, k: Tensor<4>, mask: Tensor<4>) -> Tensor<4> {
    let [b, h, t, hd] = q.dims();
    let [_, kvh, s, _] = k.dims();
    let scores = q
        .reshape([b, kvh, h / kvh * t, hd])
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt())
        .reshape([b, h, t, s]);
    let scores = match scores.dtype() {
        DType::F32 => scores,
        _ => scores.cast(DType::F32),
    };
    scores + mask
}

/// `probs v` for probabilities `[B, H, T, S]` (f32) and v `[B, KV, S, hd]`, in v's dtype, as
/// `[B, T, H * hd]`.
fn weigh_values(probs: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
    let [b, h, t, s] = probs.dims();
    let [_, kvh, _, hd] = v.dims();
    let probs = match v.dtype() {
        DType::F32 => probs,
        dtype => probs.cast(dtype),
    };
    probs
        .reshape([b, kvh, h / kvh * t, s])
        .matmul(v)
        .reshape([b, h, t, hd])
        .swap_dims(1, 2)
        .reshape([b, t, h * hd])
}

/// Causal attention through burn's fused attention: flash forward that keeps the
/// logsumexp and a fused backward under autodiff on GPU backends, so no `[B, H, T, S]`
/// scores are ever stored; GQA (fewer KV heads) is native. q `[B, H, T, hd]`, k and v
/// `[B, KV, S, hd]`, causal aligned bottom-right; returns `[B, T, H * hd]`.
pub fn attend_fused(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
    let [b, h, t, hd] = q.dims();
    let out = burn::tensor::module::attention(
        q,
        k,
        v,
        None,
        None,
        AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        },
    );
    out.swap_dims(1, 2).reshape([b, t, h * hd])
}

/// Causal attention through burn's composed path with a kept logsumexp: the backward
/// recomputes the probabilities from q, k and the logsumexp, so no `[B, H, T, S]` scores are
/// kept between forward and backward (unlike [`attend_explicit`] under autodiff), while every
/// op is an ordinary, well-tested one (unlike the fused kernels). burn takes this path for a
/// top-left causal mask over more keys than queries, so one zero key is appended: every query
/// is masked off it (it sits after the last position), so it changes nothing and gets no
/// gradient. q `[B, H, T, hd]`, k and v `[B, KV, T, hd]`; returns `[B, T, H * hd]`.
pub fn attend_composed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
    let [b, h, t, hd] = q.dims();
    let [_, kvh, _, _] = k.dims();
    let zero = Tensor::<4>::zeros([b, kvh, 1, hd], (&k.device(), k.dtype()));
    let k = Tensor::cat(vec![k, zero.clone()], 2);
    let v = Tensor::cat(vec![v, zero], 2);
    let out = burn::tensor::module::attention(
        q,
        k,
        v,
        None,
        None,
        AttentionModuleOptions {
            is_causal: true,
            causal_alignment: burn::tensor::ops::CausalAlignment::TopLeft,
            ..Default::default()
        },
    );
    out.swap_dims(1, 2).reshape([b, t, h * hd])
}

/// Which attention implementation a causal pass uses (see [`Llama::attend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    Explicit,
    Fused,
    Composed,
    /// One autodiff node per core that keeps only q, k, v, the output and each row's softmax
    /// statistics, and recomputes the probabilities in backward (flash attention's backward in
    /// plain ops, [`crate::model::attention_op`]): no `[B, H, T, S]` tensor outlives the core.
    Recompute,
}

impl AttentionPath {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "explicit" => Some(Self::Explicit),
            "fused" => Some(Self::Fused),
            "composed" => Some(Self::Composed),
            "recompute" => Some(Self::Recompute),
            _ => None,
        }
    }

    /// The path `TUNA_ATTENTION` asks for, read once per process; a value that names no path
    /// is said once on stderr (with the ones there are) and otherwise ignored.
    pub fn forced() -> Option<Self> {
        static FORCED: std::sync::OnceLock<Option<AttentionPath>> = std::sync::OnceLock::new();
        *FORCED.get_or_init(|| {
            let value = std::env::var("TUNA_ATTENTION").ok()?;
            let path = AttentionPath::parse(&value);
            if path.is_none() {
                eprintln!(
                    "warning: TUNA_ATTENTION is `{value}`, which names no attention path \
                     (explicit, fused, composed or recompute); using the defaults"
                );
            }
            path
        })
    }

    /// Attention under an additive `mask` by this path: the recompute one, or the explicit one
    /// (burn's fused and composed paths take no additive mask).
    pub fn with_mask(self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4>) -> Tensor<3> {
        match self {
            Self::Recompute => attend_recomputing(q, k, v, mask),
            _ => attend_explicit(q, k, v, mask),
        }
    }

    /// Causal attention of q `[B, H, T, hd]` over k, v `[B, KV, S, hd]` by this path (the
    /// composed one only for S = T; with cached keys it is the fused one).
    pub fn causal(self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
        let same = q.dims()[2] == k.dims()[2];
        match self {
            Self::Composed if same => attend_composed(q, k, v),
            Self::Fused | Self::Composed => attend_fused(q, k, v),
            Self::Explicit | Self::Recompute => {
                let (t, s) = (q.dims()[2], k.dims()[2]);
                let mask = causal_mask_tensor(t, s, None, &q.device());
                self.with_mask(q, k, v, mask)
            }
        }
    }
}

/// The additive causal mask `[1, 1, T, S]` (aligned bottom-right), with an optional sliding
/// window.
pub fn causal_mask_tensor(t: usize, s: usize, window: Option<usize>, device: &Device) -> Tensor<4> {
    let start = s - t;
    let mut m = Vec::with_capacity(t * s);
    for i in 0..t {
        let qpos = start + i;
        for j in 0..s {
            let masked = j > qpos || window.is_some_and(|w| qpos - j.min(qpos) >= w);
            m.push(if masked { MASK_VALUE } else { 0.0 });
        }
    }
    Tensor::<4>::from_data(TensorData::new(m, [1, 1, t, s]), (device, DType::F32))
}

impl Attention {
    /// Queries `[B, H, T, hd]`, keys and values `[B, KV, T, hd]`, RoPE applied, from `x`
    /// `[B·T, hidden]` (the pass's `T` positions per row of the batch).
    pub fn qkv(
        &self,
        x: Tensor<2>,
        pass: &Pass,
        layer: usize,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        pass.check_rows(&x);
        match self.fused_qkv(x.clone(), pass, layer) {
            Some(qkv) => self.split_qkv(qkv, pass),
            None => self.qkv_separate(x, pass, layer),
        }
    }

    /// q, k and v of `x` `[B·T, hidden]` as one product `[B·T, (H + 2·KV)·hd]` (see
    /// [`Linear::fused_rows`]), before RoPE; `None` where the pass does not fuse them
    /// ([`Pass::fuses`]).
    pub fn fused_qkv(&self, x: Tensor<2>, pass: &Pass, layer: usize) -> Option<Tensor<2>> {
        let seed = |m| module_seed(pass, layer, m);
        let group = [&self.q_proj, &self.k_proj, &self.v_proj];
        if !pass.fuses(&group, &x) {
            return None;
        }
        Linear::fused_rows(&group, x, &[seed(0), seed(1), seed(2)])
    }

    /// How [`Attention::fused_qkv`]'s columns split, for a pass of `seq` positions.
    pub fn layout(&self, seq: usize) -> QkvLayout {
        QkvLayout {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            seq,
        }
    }

    /// The fused product's columns as queries `[B, H, T, hd]`, keys and values
    /// `[B, KV, T, hd]`, RoPE applied (for the attention paths other than
    /// [`crate::model::fused_proj_op::qkv_attention`], which cuts them itself).
    fn split_qkv(&self, qkv: Tensor<2>, pass: &Pass) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let (t, rows) = (pass.seq, qkv.dims()[0]);
        let (b, h, kvh, hd) = (rows / t, self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |from: usize, n: usize| {
            qkv.clone()
                .slice([0..rows, from * hd..(from + n) * hd])
                .reshape([b, t, n, hd])
        };
        (
            apply_rope(heads(0, h), &pass.cos, &pass.sin_signed).swap_dims(1, 2),
            apply_rope(heads(h, kvh), &pass.cos, &pass.sin_signed).swap_dims(1, 2),
            heads(h + kvh, kvh).swap_dims(1, 2),
        )
    }

    /// [`Attention::qkv`] by one product each (a DoRA adapter among them, or
    /// `TUNA_PROJECTIONS=separate`).
    fn qkv_separate(
        &self,
        x: Tensor<2>,
        pass: &Pass,
        layer: usize,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let (t, rows) = (pass.seq, x.dims()[0]);
        let b = rows / t;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let seed = |m| module_seed(pass, layer, m);
        let q = self
            .q_proj
            .forward_rows(x.clone(), seed(0))
            .reshape([b, t, h, hd]);
        let k = self
            .k_proj
            .forward_rows(x.clone(), seed(1))
            .reshape([b, t, kvh, hd]);
        let v = self
            .v_proj
            .forward_rows(x, seed(2))
            .reshape([b, t, kvh, hd])
            .swap_dims(1, 2);
        (
            apply_rope(q, &pass.cos, &pass.sin_signed).swap_dims(1, 2),
            apply_rope(k, &pass.cos, &pass.sin_signed).swap_dims(1, 2),
            v,
        )
    }
}

impl DecoderLayer {
    /// The attention half's input side: `input_layernorm`, projections, RoPE.
    pub fn attn_in(
        &self,
        x: Tensor<2>,
        pass: &Pass,
        layer: usize,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        self.self_attn
            .qkv(self.input_layernorm.forward(x), pass, layer)
    }

    /// Everything after the attention core: `x + o_proj(a)`, then the MLP half with its
    /// residual. `x`: `[B·T, hidden]`; `a`: `[B·T, H * hd]`.
    pub fn attn_out(&self, x: Tensor<2>, a: Tensor<2>, pass: &Pass, layer: usize) -> Tensor<2> {
        let h = x + self
            .self_attn
            .o_proj
            .forward_rows(a, module_seed(pass, layer, 3));
        h.clone()
            + self
                .mlp
                .forward(self.post_attention_layernorm.forward(h), pass, layer)
    }
}

/// The attention core's output `[B, T, H·hd]` as the layers' rows `[B·T, H·hd]`.
fn rows(a: Tensor<3>) -> Tensor<2> {
    let [b, t, ahd] = a.dims();
    a.reshape([b * t, ahd])
}

/// Device tensors that depend only on positions, made once per model and reused by every
/// step (before, each forward rebuilt them on the host and uploaded them).
#[derive(Debug, Default)]
struct PositionTables {
    /// RoPE `cos` and `[-sin, sin]` `[len, head_dim]` in the model dtype, for positions
    /// `0..len`.
    rope: Option<(usize, Tensor<2>, Tensor<2>)>,
    /// Additive causal (and sliding-window) masks `[1, 1, T, S]` by `(T, S)`.
    masks: HashMap<(usize, usize), Tensor<4>>,
}

/// A llama-family causal LM.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor<2>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<Linear>,
    /// Float dtype of activations and base weights.
    pub dtype: DType,
    /// The (non-autodiff) device holding the base weights.
    pub device: Device,
    inv_freq: Vec<f64>,
    tables: Arc<Mutex<PositionTables>>,
}

impl Llama {
    /// Assembles a model from already-built parts (see `model::load::build_model`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        config: ModelConfig,
        embed_tokens: Tensor<2>,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: Option<Linear>,
        dtype: DType,
        device: Device,
    ) -> Self {
        let inv_freq = config.rope_inv_freq();
        Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype,
            device,
            inv_freq,
            tables: Arc::default(),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, PositionTables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// RoPE tables `cos`, `[-sin, sin]` as `[1, T, 1, 2, hd / 2]` for positions
    /// `start..start + t`, sliced from a device table that grows in powers of two.
    fn rope_tables(&self, start: usize, t: usize) -> (Tensor<5>, Tensor<5>) {
        let hd = self.config.head_dim;
        let need = start + t;
        let mut tables = self.tables();
        if tables.rope.as_ref().is_none_or(|(len, _, _)| *len < need) {
            let len = need.next_power_of_two().max(256);
            let half = hd / 2;
            let mut cos = Vec::with_capacity(len * hd);
            let mut sin = Vec::with_capacity(len * hd);
            for p in 0..len {
                for sign in [-1.0, 1.0] {
                    for f in &self.inv_freq[..half] {
                        let angle = p as f64 * f;
                        cos.push(angle.cos() as f32);
                        sin.push((sign * angle.sin()) as f32);
                    }
                }
            }
            let mk = |v: Vec<f32>| {
                Tensor::<2>::from_data(TensorData::new(v, [len, hd]), (&self.device, self.dtype))
            };
            tables.rope = Some((len, mk(cos), mk(sin)));
        }
        let (_, cos, sin) = tables.rope.as_ref().expect("just built");
        let pick = |x: &Tensor<2>| {
            x.clone()
                .slice([start..need, 0..hd])
                .reshape([1, t, 1, 2, hd / 2])
        };
        (pick(cos), pick(sin))
    }

    /// The additive causal (and sliding-window) mask `[1, 1, T, S]` for queries at positions
    /// `S - T..S`, cached on the device.
    pub fn causal_mask(&self, t: usize, s: usize) -> Tensor<4> {
        let mut tables = self.tables();
        if let Some(m) = tables.masks.get(&(t, s)) {
            return m.clone();
        }
        let mask = causal_mask_tensor(t, s, self.config.sliding_window, &self.device);
        if tables.masks.len() > 64 {
            tables.masks.clear();
        }
        tables.masks.insert((t, s), mask.clone());
        mask
    }

    /// Whether a causal pass over `s` keys needs the explicit mask (a sliding window that
    /// actually cuts).
    fn window_cuts(&self, s: usize) -> bool {
        self.config.sliding_window.is_some_and(|w| s > w)
    }

    /// The per-call inputs for `t` new positions after `start` cached ones. `attention_mask`
    /// (`[B, start + t]`, 1 = real token) adds padding to the causal mask.
    pub fn pass(
        &self,
        start: usize,
        t: usize,
        attention_mask: Option<Tensor<2>>,
        dropout_seed: Option<u64>,
    ) -> Pass {
        let s = start + t;
        let (cos, sin_signed) = self.rope_tables(start, t);
        let mask = match attention_mask {
            None if !self.window_cuts(s) => Mask::Causal,
            None => Mask::Additive(self.causal_mask(t, s)),
            Some(am) => {
                let [b, sm] = am.dims();
                assert_eq!(sm, s, "attention_mask covers {sm} positions, expected {s}");
                let pad = am
                    .cast(DType::F32)
                    .sub_scalar(1.0)
                    .mul_scalar(-MASK_VALUE)
                    .reshape([b, 1, 1, s]);
                Mask::Additive(self.causal_mask(t, s) + pad)
            }
        };
        Pass {
            seq: t,
            cos,
            sin_signed,
            mask,
            dropout_seed,
            attention: None,
            projections: None,
        }
    }

    /// The attention core. Causal attention is fused (flash forward, no scores stored) where no
    /// gradient flows through it: evaluation, generation, and layers below the first adapter.
    /// Where one does (training, checkpointed or not), it is [`AttentionPath::Recompute`]: one
    /// autodiff node that keeps no `[B, H, T, S]` tensor for backward. burn 0.23.0-pre.1's
    /// fused backward gives wrong gradients on Vulkan (an H100: a padded batch-4 LoRA run
    /// learned far slower than on the CPU and overflowed in f16); its composed logsumexp path
    /// and the explicit one are slower or larger. TinyLlama 8 × 512 f16 LoRA on an H200, one
    /// call (`bench/device_where.sh`, `bench/results/h200-2026-12-03d/call2-op`): composed
    /// 12,401 tok/s in 9,717 MiB, recompute 16,647 in 9,681 (PEFT 33,068 in 11,771); SmolLM2
    /// 17,814 and 26,983 (PEFT 32,977); with block checkpointing explicit 11,644 in 4,400 MiB,
    /// recompute 11,645 in 3,391 (PEFT 18,852 in 6,655).
    /// `TUNA_ATTENTION=fused|explicit|composed|recompute` (or [`Pass::attention`]) forces one
    /// path for every causal pass, to compare them (`tuna bench attention` does so on random
    /// tensors).
    pub fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, pass: &Pass) -> Tensor<3> {
        let mask = &pass.mask;
        let tracked = q.is_tracked() || k.is_tracked() || v.is_tracked();
        let path = self.path(tracked, pass);
        // burn's fused and composed paths take causal attention without a mask tensor; the
        // others take this model's cached causal mask, and every path an additive one.
        match mask {
            Mask::Causal if matches!(path, AttentionPath::Fused | AttentionPath::Composed) => {
                path.causal(q, k, v)
            }
            _ => {
                let mask = self.mask_tensor(pass, q.dims()[2], k.dims()[2]);
                path.with_mask(q, k, v, mask)
            }
        }
    }

    /// The pass's mask as an additive tensor for `t` queries over `s` keys: the cached causal
    /// one, or the pass's own.
    fn mask_tensor(&self, pass: &Pass, t: usize, s: usize) -> Tensor<4> {
        match &pass.mask {
            Mask::Causal => self.causal_mask(t, s),
            Mask::Additive(m) => m.clone(),
        }
    }

    /// The attention path of a pass (see [`Llama::attend`]): the forced one, else recompute
    /// where a gradient flows through (`tracked`) and burn's fused forward where none does.
    fn path(&self, tracked: bool, pass: &Pass) -> AttentionPath {
        let forced = pass.attention.or_else(AttentionPath::forced);
        forced.unwrap_or(match tracked {
            true => AttentionPath::Recompute,
            false => AttentionPath::Fused,
        })
    }

    /// The embeddings of `ids` `[B, T]` as rows `[B·T, hidden]`, the layers' layout.
    pub fn embed_rows(&self, ids: Tensor<2, Int>) -> Tensor<2> {
        let [b, t] = ids.dims();
        self.embed_tokens.clone().select(0, ids.reshape([b * t]))
    }

    /// `layer` (this model's layer `i`, or a copy of it with trainable adapters) on `x`
    /// `[B·T, hidden]` (see [`Pass::seq`]).
    ///
    /// Where attention takes the recompute path (training), q, k and v come from one product
    /// and go to [`crate::model::fused_proj_op::qkv_attention`] as it is, which cuts and ropes them itself.
    pub fn layer(&self, layer: &DecoderLayer, i: usize, x: Tensor<2>, pass: &Pass) -> Tensor<2> {
        pass.check_rows(&x);
        let attn = &layer.self_attn;
        let xn = layer.input_layernorm.forward(x.clone());
        let a = match attn.fused_qkv(xn.clone(), pass, i) {
            Some(qkv) if self.path(qkv.is_tracked(), pass) == AttentionPath::Recompute => {
                let mask = self.mask_tensor(pass, pass.seq, pass.seq);
                let (cos, sin) = (pass.cos.clone(), pass.sin_signed.clone());
                qkv_attention(qkv, cos, sin, mask, attn.layout(pass.seq))
            }
            Some(qkv) => {
                let (q, k, v) = attn.split_qkv(qkv, pass);
                rows(self.attend(q, k, v, pass))
            }
            None => {
                let (q, k, v) = attn.qkv_separate(xn, pass, i);
                rows(self.attend(q, k, v, pass))
            }
        };
        layer.attn_out(x, a, pass, i)
    }

    /// Layer `i`, appending to its cache slot when given.
    fn layer_forward(
        &self,
        i: usize,
        x: Tensor<2>,
        pass: &Pass,
        slot: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let Some(slot) = slot else {
            return self.layer(&self.layers[i], i, x, pass);
        };
        let layer = &self.layers[i];
        let (q, mut k, mut v) = layer.attn_in(x.clone(), pass, i);
        if let Some((pk, pv)) = slot.take() {
            k = Tensor::cat(vec![pk, k], 2);
            v = Tensor::cat(vec![pv, v], 2);
        }
        *slot = Some((k.clone(), v.clone()));
        let a = rows(self.attend(q, k, v, pass));
        layer.attn_out(x, a, pass, i)
    }

    /// Final-normed hidden states `[B, T, hidden]` (everything but the LM head); with a cache,
    /// appends to it. Lets a caller apply [`Llama::head`] to selected positions only.
    pub fn run_layers(
        &self,
        ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2>>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, t] = ids.dims();
        let start = cache.as_ref().map_or(0, |c| c.len);
        // No dropout: training draws its masks through `train::step` with a seed.
        let pass = self.pass(start, t, attention_mask, None);
        let mut h = self.embed_rows(ids);
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.layer_forward(i, h, &pass, slot);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.norm
            .forward(h)
            .reshape([b, t, self.config.hidden_size])
    }

    /// LM head (tied or not): `[B, T, hidden]` -> logits `[B, T, vocab]`.
    pub fn head(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(h, None),
            None => {
                let [b, t, d] = h.dims();
                h.reshape([b * t, d])
                    .matmul(self.embed_tokens.clone().transpose())
                    .reshape([b, t, self.config.vocab_size])
            }
        }
    }

    /// Full-sequence forward. `ids`: `[B, T]`; `attention_mask`: `[B, T]` of 0/1 (1 = real
    /// token), combined with the causal mask. Positions count from 0 in every row, so batches
    /// are padded on the right. Returns logits `[B, T, vocab]` in the model dtype.
    pub fn forward(&self, ids: Tensor<2, Int>, attention_mask: Option<Tensor<2>>) -> Tensor<3> {
        let h = self.run_layers(ids, attention_mask, None);
        self.head(h)
    }

    /// Incremental forward for generation: appends `ids` (`[B, T]`) to `cache` and returns the
    /// logits of the last position only, `[B, vocab]`. `attention_mask`, when given, covers
    /// every cached position plus the new ones (`[B, cache.len() + T]`).
    pub fn forward_cached(
        &self,
        ids: Tensor<2, Int>,
        cache: &mut KvCache,
        attention_mask: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let h = self.run_layers(ids, attention_mask, Some(cache));
        let [b, t, d] = h.dims();
        let last = h.slice([0..b, t - 1..t, 0..d]);
        self.head(last).reshape([b, self.config.vocab_size])
    }

    /// Number of values in the base weights (tied embeddings counted once) plus adapters.
    pub fn num_parameters(&self) -> usize {
        let lin = |l: &Linear| {
            l.weight.dims().iter().product::<usize>()
                + l.bias.as_ref().map_or(0, |b| b.shape().num_elements())
                + l.lora.as_ref().map_or(0, |r| {
                    r.a.shape().num_elements() + r.b.shape().num_elements()
                })
        };
        let mut n = self.embed_tokens.shape().num_elements() + self.norm.weight.dims()[0];
        n += self.lm_head.as_ref().map_or(0, lin);
        for l in &self.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            n += [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
            .into_iter()
            .map(lin)
            .sum::<usize>();
            n += l.input_layernorm.weight.dims()[0] + l.post_attention_layernorm.weight.dims()[0];
        }
        n
    }

    /// Builds an id tensor on the model's device.
    pub fn ids_tensor(&self, ids: &[u32], batch: usize) -> Tensor<2, Int> {
        let t = ids.len() / batch.max(1);
        let data: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(data, [batch, t]), &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora_op::tests::rel;

    fn normal(shape: [usize; 2], device: &Device) -> Tensor<2> {
        Tensor::<1>::random(
            [shape[0] * shape[1]],
            Distribution::Normal(0.0, 1.0),
            (device, DType::F32),
        )
        .reshape(shape)
    }

    /// One product for a group equals each projection's own, side by side, and gives the
    /// adapters the same gradients: a group of three (q/k/v's shape: the middle one without an
    /// adapter, biases on two of them, LoRA dropout on), in f32 and f16 with f32 factors.
    #[test]
    fn a_fused_group_equals_its_projections_side_by_side() {
        let device = Device::flex();
        let (rows, d_in, r) = (6, 10, 3);
        let outs = [8, 4, 4];
        let x0 = normal([rows, d_in], &device);
        let g0 = normal([rows, outs.iter().sum()], &device);
        let ws: Vec<_> = outs.iter().map(|&o| normal([o, d_in], &device)).collect();
        let factors: Vec<_> = outs
            .iter()
            .map(|&o| (normal([r, d_in], &device), normal([o, r], &device)))
            .collect();
        let biases: Vec<_> = outs
            .iter()
            .map(|&o| normal([1, o], &device).reshape([o]))
            .collect();
        let seeds = [Some(11), Some(12), Some(13)];
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 3e-3)] {
            let group = || -> Vec<Linear> {
                (0..3)
                    .map(|i| Linear {
                        weight: BaseWeight::Dense(ws[i].clone().cast(dtype)),
                        bias: (i != 1).then(|| biases[i].clone().cast(dtype)),
                        lora: (i != 1).then(|| LoraBranch {
                            a: factors[i].0.clone().autodiff().require_grad(),
                            b: factors[i].1.clone().autodiff().require_grad(),
                            scale: 2.0,
                            dropout: 0.25,
                            magnitude: None,
                        }),
                    })
                    .collect()
            };
            let x = x0.clone().cast(dtype).autodiff().require_grad();
            let g = g0.clone().cast(dtype).autodiff();
            let fused = group();
            let refs: Vec<&Linear> = fused.iter().collect();
            let y = Linear::fused_rows(&refs, x.clone(), &seeds).expect("no DoRA: fused");
            let grads = (y.clone() * g.clone()).sum().backward();
            let apart = group();
            let parts = apart
                .iter()
                .zip(seeds)
                .map(|(l, s)| l.forward_rows(x.clone(), s))
                .collect();
            let yp = Tensor::cat(parts, 1);
            let pgrads = (yp.clone() * g).sum().backward();
            let dy = rel(&y.inner(), &yp.inner());
            let dx = rel(&x.grad(&grads).unwrap(), &x.grad(&pgrads).unwrap());
            assert!(dy < tol && dx < tol, "{dtype:?}: y {dy}, dx {dx}");
            for i in [0, 2] {
                let (f, p) = (
                    fused[i].lora.as_ref().unwrap(),
                    apart[i].lora.as_ref().unwrap(),
                );
                let da = rel(&f.a.grad(&grads).unwrap(), &p.a.grad(&pgrads).unwrap());
                let db = rel(&f.b.grad(&grads).unwrap(), &p.b.grad(&pgrads).unwrap());
                assert!(
                    da < tol && db < tol,
                    "{dtype:?} projection {i}: dA {da}, dB {db}"
                );
            }
        }
    }

    /// A decoder layer in training gives the same output and gradients (its input's, every
    /// adapter's) with its projection groups fused as with one product each: the tiny shape
    /// (GQA), with and without q/k/v biases, adapters on q, v and up (k and gate without),
    /// LoRA dropout on. In evaluation (nothing tracked) the pass does not fuse.
    #[test]
    fn a_layer_trains_alike_with_its_projections_fused_or_apart() {
        use crate::bench::{random_weights, shape_config};
        use crate::model::config::ModelConfig;
        use crate::model::load::build_model;
        use crate::model::lora::{self, LoraConfig};
        let device = Device::flex();
        for bias in [false, true] {
            let mut config =
                ModelConfig::from_json(&shape_config("tiny").unwrap(), "tiny").unwrap();
            config.qkv_bias = bias;
            let mut model =
                build_model(&config, &random_weights(&config, 3), &device, DType::F32).unwrap();
            let lcfg = LoraConfig {
                rank: 4,
                scale: 2.0,
                dropout: 0.1,
                keys: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
                num_layers: -1,
                dora: false,
                full: false,
            };
            lora::apply_fine_tune(&mut model, &lcfg, 0).unwrap();
            // B starts at zero: make every branch count.
            for layer in &mut model.layers {
                let attn = &mut layer.self_attn;
                for l in [&mut attn.q_proj, &mut attn.v_proj, &mut layer.mlp.up_proj] {
                    let lo = l.lora.as_mut().unwrap();
                    lo.b = normal(lo.b.dims(), &device).mul_scalar(0.1);
                }
            }
            let (t, hidden) = (6, config.hidden_size);
            let x0 = normal([2 * t, hidden], &device);
            let g0 = normal([2 * t, hidden], &device);
            let run = |fused: bool| {
                let mut pass = model.pass(0, t, None, Some(9));
                pass.projections = Some(fused);
                let (layer, leaves) = lora::trainable_layer(&model.layers[1], 1);
                let x = x0.clone().autodiff().require_grad();
                let y = model.layer(&layer, 1, x.clone(), &pass);
                let grads = (y.clone() * g0.clone().autodiff()).sum().backward();
                let mut out = vec![
                    ("y".to_string(), y.inner()),
                    ("x".into(), x.grad(&grads).unwrap()),
                ];
                out.extend(
                    leaves
                        .into_iter()
                        .map(|(n, l)| (n, l.grad(&grads).unwrap())),
                );
                out
            };
            let (fused, apart) = (run(true), run(false));
            assert_eq!(fused.len(), 2 + 6, "y, x and three adapters' A and B");
            for ((name, f), (_, p)) in fused.iter().zip(&apart) {
                let d = rel(f, p);
                assert!(d < 1e-5, "bias {bias}: {name} differs by {d}");
            }
            let pass = Pass {
                projections: Some(true),
                ..model.pass(0, t, None, None)
            };
            let attn = &model.layers[1].self_attn;
            let group = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
            assert!(
                !pass.fuses(&group, &x0),
                "an untracked pass copies no weights"
            );
        }
    }

    /// A DoRA adapter in the group keeps it apart: its output needs its own base product.
    #[test]
    fn a_group_with_dora_is_not_fused() {
        let device = Device::flex();
        let dora = Linear {
            weight: BaseWeight::Dense(normal([4, 5], &device)),
            bias: None,
            lora: Some(LoraBranch {
                a: normal([2, 5], &device),
                b: normal([4, 2], &device),
                scale: 1.0,
                dropout: 0.0,
                magnitude: Some(normal([1, 4], &device)),
            }),
        };
        let plain = Linear::new(normal([4, 5], &device), None);
        let x = normal([3, 5], &device);
        assert!(Linear::fused_rows(&[&plain, &dora], x, &[None, None]).is_none());
    }
}
