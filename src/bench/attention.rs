//! `tuna bench attention`: the causal attention paths (explicit matmul + softmax, burn's fused
//! kernels, burn's composed logsumexp path, and tuna's `recompute` op: one autodiff node whose
//! backward recomputes the probabilities from softmax statistics) on random tensors of real models' attention
//! shapes, under autodiff as training runs them: how far each one's output and q/k/v gradients
//! are from the explicit path (the reference: plain matmuls and an f32 softmax), and how long a
//! forward + backward takes. Inputs come in as the model makes them: `[B, T, H, hd]` with heads
//! swapped to the second axis (strided views).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};
use clap::Args;
use serde_json::{Value, json};

use crate::bench::keep_busy;
use crate::data::dataset::SplitMix64;
use crate::model::device::device_for;
use crate::model::llama::AttentionPath;

#[derive(Args, Debug, Clone)]
pub struct BenchAttentionArgs {
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Timed forward + backward passes per case, after two warmup passes.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Only the cases whose name contains one of these (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
}

/// (name, batch, heads, kv heads, positions, head dim).
const CASES: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("tiny-llama b4", 4, 4, 2, 45, 8),
    ("tiny-llama b1", 1, 4, 2, 45, 8),
    ("hd16 no-gqa", 2, 4, 4, 64, 16),
    ("smollm2 8x512", 8, 9, 3, 512, 64),
    ("tinyllama 8x512", 8, 32, 4, 512, 64),
];

fn random(rng: &mut SplitMix64, shape: [usize; 4], device: &Device, dtype: DType) -> Tensor<4> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32)
        .collect();
    Tensor::<4>::from_data(TensorData::new(data, shape), (device, DType::F32)).cast(dtype)
}

fn rel_l2(a: Tensor<4>, b: Tensor<4>) -> Result<f64> {
    let a = a.cast(DType::F32).try_into_vec_as::<f32>()?;
    let b = b.cast(DType::F32).try_into_vec_as::<f32>()?;
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    Ok((num / den.max(1e-30)).sqrt())
}

/// One forward + backward: the output and the q, k, v gradients of `sum(out · r)`.
fn pass(
    path: AttentionPath,
    inputs: &[Tensor<4>; 4],
    shape: (usize, usize, usize, usize),
) -> [Tensor<4>; 4] {
    let (b, h, t, hd) = shape;
    let [q, k, v, r] = inputs.clone();
    let (q, k, v) = (
        q.autodiff().require_grad(),
        k.autodiff().require_grad(),
        v.autodiff().require_grad(),
    );
    let (qh, kh, vh) = (
        q.clone().swap_dims(1, 2),
        k.clone().swap_dims(1, 2),
        v.clone().swap_dims(1, 2),
    );
    let r = r.reshape([b, t, h * hd]);
    let out = path.causal(qh, kh, vh);
    let g = (out.clone() * r).sum().backward();
    let grad = |x: &Tensor<4>| x.grad(&g).expect("a leaf");
    [
        out.inner().reshape([b, t, h, hd]),
        grad(&q),
        grad(&k),
        grad(&v),
    ]
}

pub fn bench_attention(a: &BenchAttentionArgs) -> Result<Value> {
    let sel = device_for(&a.device, &a.dtype)?;
    let (device, dtype) = (sel.device.clone(), sel.dtype);
    let mut rows = Vec::new();
    let wanted =
        |name: &str| a.cases.is_empty() || a.cases.iter().any(|c| name.contains(c.as_str()));
    for &(name, b, h, kvh, t, hd) in CASES.iter().filter(|c| wanted(c.0)) {
        let mut rng = SplitMix64(t as u64 * 31 + h as u64);
        let inputs = [
            random(&mut rng, [b, t, h, hd], &device, dtype),
            random(&mut rng, [b, t, kvh, hd], &device, dtype),
            random(&mut rng, [b, t, kvh, hd], &device, dtype),
            random(&mut rng, [b, t, h, hd], &device, dtype),
        ];
        let shape = (b, h, t, hd);
        let reference = pass(AttentionPath::Explicit, &inputs, shape);
        let mut paths = serde_json::Map::new();
        for path in [
            AttentionPath::Explicit,
            AttentionPath::Composed,
            AttentionPath::Fused,
            AttentionPath::Recompute,
        ] {
            let got = pass(path, &inputs, shape);
            let mut err = serde_json::Map::new();
            for (label, (x, y)) in ["out", "dq", "dk", "dv"]
                .iter()
                .zip(got.into_iter().zip(reference.clone()))
            {
                err.insert(label.to_string(), json!(rel_l2(x, y)?));
            }
            // Timing: warm up (kernel compiles, autotune), then wait for the device at the end.
            // Then keep the GPU busy for half a second so its clocks are up (`keep_busy`).
            for _ in 0..2 {
                let _ = pass(path, &inputs, shape);
            }
            keep_busy(&device, 0.5, || {
                let _ = pass(path, &inputs, shape);
            });
            let t0 = Instant::now();
            for _ in 0..a.steps {
                let _ = pass(path, &inputs, shape);
            }
            let _ = device.sync();
            let ms = t0.elapsed().as_secs_f64() * 1e3 / a.steps as f64;
            paths.insert(
                format!("{path:?}").to_lowercase(),
                json!({"rel_l2_vs_explicit": err, "ms_fwd_bwd": ms}),
            );
        }
        let row =
            json!({"case": name, "b": b, "h": h, "kv": kvh, "t": t, "hd": hd, "paths": paths});
        // One line per case as it finishes: a slow case (kernel compiles) loses nothing before it.
        eprintln!("{row}");
        rows.push(row);
    }
    Ok(json!({"bench": "attention", "device": sel.kind.to_string(),
              "dtype": format!("{dtype:?}"), "cases": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path's output and gradients agree with the explicit path's on the CPU in f32, the
    /// `recompute` path included (the GPU call runs the same comparison in f16 at real shapes).
    #[test]
    fn every_path_matches_the_explicit_one() {
        let args = BenchAttentionArgs {
            device: "cpu".into(),
            dtype: "f32".into(),
            steps: 1,
            cases: vec!["tiny-llama b4".into()],
        };
        let v = bench_attention(&args).unwrap();
        let paths = &v["cases"][0]["paths"];
        for path in ["composed", "fused", "recompute"] {
            for part in ["out", "dq", "dk", "dv"] {
                let e = paths[path]["rel_l2_vs_explicit"][part].as_f64().unwrap();
                assert!(e < 1e-5, "{path} {part}: rel L2 {e}");
            }
        }
    }
}
