//! `tuna bench matmul`: throughput of the matrix products a LoRA training step makes, one shape
//! at a time, so the engine's matmul speed can be set beside the peer's (`bench/peer_matmul.py`
//! times the same cases with `torch.matmul`). A training step is mostly these products; if a
//! shape runs far below the peer here, no change to the model code closes the gap.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};
use clap::Args;
use serde_json::{Value, json};

use crate::bench::keep_busy;
use crate::data::dataset::SplitMix64;
use crate::model::device::device_for;

#[derive(Args, Debug, Clone)]
pub struct BenchMatmulArgs {
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Timed products per case, after warmup (autotune, shader compiles).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also time each product this many times more, each on freshly allocated operands.
    #[arg(long, default_value_t = 0)]
    pub rounds: usize,
    /// Only the cases whose name contains one of these (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Instead of the cases: TinyLlama's large products through cubek's Cmma routines with
    /// forced tile plans, every plan on up_proj's forward, then the best `--top` on the rest.
    #[arg(long)]
    pub blueprints: bool,
    /// Instead of the cases: the large products as one workgroup-scope cooperative matrix per
    /// cube (VK_NV_cooperative_matrix2), at several tile sizes, each checked against host sums.
    #[arg(long)]
    pub coopmat2: bool,
    /// Instead of the cases: LoRA's six skinny products per adapter, each stated several ways
    /// (plain, split-k, transposed, outer sums), timed and checked against the plain one.
    #[arg(long)]
    pub lora: bool,
    #[arg(long, default_value_t = 6)]
    pub top: usize,
}

/// How the right-hand side is laid out, as the model calls it.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Forward `x W^T`: `W` is `[n, k]`, the product reads a transposed view.
    Nt,
    /// Backward `dY W`: `W` is `[k, n]` contiguous.
    Nn,
    /// Weight-gradient-like `X^T dY`: the left side is a transposed view (LoRA's dA, dB).
    Tn,
    /// Both sides transposed views: `(dY W)ᵀ = Wᵀ dYᵀ`, the input gradient computed transposed.
    Tt,
}

/// How long each timed loop is preceded by untimed products (see `keep_busy`).
const BUSY_S: f64 = 0.5;

/// (name, m, k, n, layout, batch). Rows of 4096 are a batch of 8 × 512 tokens.
const CASES: &[(&str, usize, usize, usize, Layout, usize)] = &[
    ("smollm2 q fwd", 4096, 576, 576, Layout::Nt, 1),
    ("smollm2 kv fwd", 4096, 576, 192, Layout::Nt, 1),
    ("smollm2 up fwd", 4096, 576, 1536, Layout::Nt, 1),
    ("smollm2 down fwd", 4096, 1536, 576, Layout::Nt, 1),
    ("smollm2 up dx", 4096, 1536, 576, Layout::Nn, 1),
    ("smollm2 head fwd", 4096, 576, 49152, Layout::Nt, 1),
    ("tinyllama q fwd", 4096, 2048, 2048, Layout::Nt, 1),
    ("tinyllama kv fwd", 4096, 2048, 256, Layout::Nt, 1),
    ("tinyllama up fwd", 4096, 2048, 5632, Layout::Nt, 1),
    ("tinyllama down fwd", 4096, 5632, 2048, Layout::Nt, 1),
    ("tinyllama up dx", 4096, 5632, 2048, Layout::Nn, 1),
    ("tinyllama down dx", 4096, 2048, 5632, Layout::Nn, 1),
    ("tinyllama lora a fwd", 4096, 2048, 8, Layout::Nt, 1),
    ("tinyllama lora b fwd", 4096, 8, 2048, Layout::Nt, 1),
    ("tinyllama lora dA", 8, 4096, 2048, Layout::Tn, 1),
    // What autodiff runs for the factor behind `x @ Aᵀ`: (x)ᵀ · dY, then per sequence (a
    // batched product whose results are summed: split-K across the batch).
    ("tinyllama lora dAt", 2048, 4096, 8, Layout::Tn, 1),
    ("tinyllama lora dAt b8", 2048, 512, 8, Layout::Tn, 8),
    ("tinyllama scores", 512, 64, 512, Layout::Nt, 256),
    ("tinyllama probs v", 512, 512, 64, Layout::Nn, 256),
    ("mistral7b up fwd b1", 512, 4096, 14336, Layout::Nt, 1),
    // The same products in the layouts weights held `[in, out]` would give: the forward reading
    // the weight as it is (nn), the input gradient through a view (nt).
    ("tinyllama q fwd nn", 4096, 2048, 2048, Layout::Nn, 1),
    ("tinyllama q dx nt", 4096, 2048, 2048, Layout::Nt, 1),
    ("tinyllama up fwd nn", 4096, 2048, 5632, Layout::Nn, 1),
    ("tinyllama down fwd nn", 4096, 5632, 2048, Layout::Nn, 1),
    ("tinyllama up dx nt", 4096, 5632, 2048, Layout::Nt, 1),
    ("tinyllama down dx nt", 4096, 2048, 5632, Layout::Nt, 1),
    ("smollm2 up fwd nn", 4096, 576, 1536, Layout::Nn, 1),
    ("smollm2 up dx nt", 4096, 1536, 576, Layout::Nt, 1),
    // Attention's products in the other layouts: a copy of K or V into another layout (one
    // small kernel) pays if the product then runs much faster.
    ("tinyllama scores nn", 512, 64, 512, Layout::Nn, 256),
    ("tinyllama scores tn", 512, 64, 512, Layout::Tn, 256),
    ("tinyllama probs v nt", 512, 512, 64, Layout::Nt, 256),
    ("tinyllama probs v tn", 512, 512, 64, Layout::Tn, 256),
    // One product in each layout: which of them the engine runs fast decides how the backward's
    // input gradient (today `dY W`, nn) is best stated.
    ("layout nn", 4096, 2048, 5632, Layout::Nn, 1),
    ("layout nt", 4096, 2048, 5632, Layout::Nt, 1),
    ("layout tn", 4096, 2048, 5632, Layout::Tn, 1),
    ("layout tt", 4096, 2048, 5632, Layout::Tt, 1),
];

fn random(rng: &mut SplitMix64, shape: [usize; 3], device: &Device, dtype: DType) -> Tensor<3> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32)
        .collect();
    Tensor::<3>::from_data(TensorData::new(data, shape), (device, DType::F32)).cast(dtype)
}

/// A case's two operands, laid out as `layout` says (`[batch, m, k, n]`).
fn inputs(
    rng: &mut SplitMix64,
    layout: Layout,
    [batch, m, k, n]: [usize; 4],
    device: &Device,
    dtype: DType,
) -> (Tensor<3>, Tensor<3>) {
    let (l, r) = match layout {
        Layout::Nt => ([batch, m, k], [batch, n, k]),
        Layout::Nn => ([batch, m, k], [batch, k, n]),
        Layout::Tn => ([batch, k, m], [batch, k, n]),
        Layout::Tt => ([batch, k, m], [batch, n, k]),
    };
    (random(rng, l, device, dtype), random(rng, r, device, dtype))
}

/// The product of [`inputs`]' operands, each read through the view its layout names.
fn multiply(lhs: &Tensor<3>, rhs: &Tensor<3>, layout: Layout) -> Tensor<3> {
    let (l, r) = (lhs.clone(), rhs.clone());
    match layout {
        Layout::Nt => l.matmul(r.swap_dims(1, 2)),
        Layout::Nn => l.matmul(r),
        Layout::Tn => l.swap_dims(1, 2).matmul(r),
        Layout::Tt => l.swap_dims(1, 2).matmul(r.swap_dims(1, 2)),
    }
}

pub fn bench_matmul(a: &BenchMatmulArgs) -> Result<Value> {
    let sel = device_for(&a.device, &a.dtype)?;
    let (device, dtype) = (sel.device.clone(), sel.dtype);
    if a.lora {
        return crate::bench::lora_products::bench(&device, dtype, a.iters);
    }
    if a.coopmat2 {
        #[cfg(all(feature = "gpu", not(target_os = "macos")))]
        return crate::bench::coopmat2::sweep(&device, a.iters);
        #[cfg(not(all(feature = "gpu", not(target_os = "macos"))))]
        anyhow::bail!("--coopmat2 needs a GPU build of tuna on Linux or Windows");
    }
    if a.blueprints {
        #[cfg(all(feature = "gpu", not(target_os = "macos")))]
        return crate::bench::blueprints::sweep(&device, a.iters, a.top);
        #[cfg(not(all(feature = "gpu", not(target_os = "macos"))))]
        anyhow::bail!("--blueprints needs a GPU build of tuna on Linux or Windows");
    }
    let wanted =
        |name: &str| a.cases.is_empty() || a.cases.iter().any(|c| name.contains(c.as_str()));
    let mut rows = Vec::new();
    for &(name, m, k, n, layout, batch) in CASES.iter().filter(|c| wanted(c.0)) {
        let mut rng = SplitMix64((m * 31 + k * 7 + n) as u64);
        let (lhs, rhs) = inputs(&mut rng, layout, [batch, m, k, n], &device, dtype);
        let product = || multiply(&lhs, &rhs, layout);
        // Warmup until a product takes about as long as the one before (autotune done).
        let t_warm = Instant::now();
        for _ in 0..3 {
            let _ = product().into_data();
        }
        let warmup_s = t_warm.elapsed().as_secs_f64();
        // Two timed passes, each after the GPU has been kept busy with the same product (its
        // clocks up, see `keep_busy`): the first also pays for the memory its outputs take the
        // first time (the allocator's pages), the second is what a training step, whose pages
        // are in place, sees. Both are reported; `ms` is the faster.
        let mut passes = [0.0f64; 2];
        for pass in passes.iter_mut() {
            keep_busy(&device, BUSY_S, || {
                let _ = product();
            });
            let t0 = Instant::now();
            let mut keep = Vec::with_capacity(a.iters);
            for _ in 0..a.iters {
                keep.push(product());
            }
            let _ = device.sync();
            *pass = t0.elapsed().as_secs_f64() / a.iters as f64;
            drop(keep);
        }
        let s = passes[0].min(passes[1]);
        // The same product on fresh inputs, round after round, each behind a spacer tensor of
        // a different size that moves where the allocator places them: whether the kernel's
        // speed depends on where its operands live rather than on their shape.
        let mut rounds = Vec::with_capacity(a.rounds);
        for r in 0..a.rounds {
            let spacer = Tensor::<1>::zeros([(r * 3 + 1) << 19], (&device, dtype));
            let (l, rh) = inputs(&mut rng, layout, [batch, m, k, n], &device, dtype);
            keep_busy(&device, BUSY_S, || {
                let _ = multiply(&l, &rh, layout);
            });
            let t0 = Instant::now();
            let keep: Vec<_> = (0..a.iters).map(|_| multiply(&l, &rh, layout)).collect();
            let _ = device.sync();
            rounds.push(t0.elapsed().as_secs_f64() / a.iters as f64 * 1e3);
            drop((keep, spacer));
        }
        let flops = 2.0 * (batch * m * k * n) as f64;
        let row = json!({"case": name, "m": m, "k": k, "n": n, "batch": batch,
            "layout": format!("{layout:?}").to_lowercase(), "ms": s * 1e3,
            "tflops": flops / s / 1e12, "warmup_s": warmup_s,
            "ms_passes": [passes[0] * 1e3, passes[1] * 1e3], "round_ms": rounds});
        eprintln!("{row}");
        rows.push(row);
    }
    Ok(json!({"bench": "matmul", "device": sel.kind.to_string(),
              "dtype": format!("{dtype:?}"), "cases": rows}))
}
