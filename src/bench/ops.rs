//! `tuna bench ops`: what one tensor operation costs the host, by kind and by how it is tracked.
//!
//! SmolLM2's training step on an H200 is bound by the host (the GPU idles 20–40 % of it and twice
//! the batch runs in the same step time, README *Measured speed*), so the question for the next
//! factor is where the host's time per operation goes: burn's dispatch and fusion's stream
//! (`plain`), autodiff's bookkeeping on top (`tracked`), and the backward's own operations
//! (`tracked+backward`). Each case chains `n` operations on an activation-sized tensor; the loop
//! never waits for the device, so its time is the host's (`enqueue_us_per_op`, per chained
//! operation, its backward included in `tracked+backward`), and the wait at the final sync is
//! what was still to do (`drain_us_per_op`): the device's work and whatever host work fusion had
//! deferred to its flush.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Device, Distribution, Tensor};
use serde_json::{Value, json};

use crate::model::device::device_for;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchOpsArgs {
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Operations chained per case (tracked cases keep every intermediate: 1,000 of SmolLM2's
    /// f16 activations are 4.7 GB).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Rows and columns of the chained tensor (SmolLM2's activations: 8 × 512 rows of 576).
    #[arg(long, default_value_t = 4096)]
    pub rows: usize,
    #[arg(long, default_value_t = 576)]
    pub cols: usize,
}

/// The operation kinds: `elementwise` (x · a + b, which fusion merges into few kernels),
/// `reduce` (x − mean(x) per row: a reduction and a broadcast, a kernel or more each time),
/// `matmul` (x · W, one product each time). Returns the operations one step adds.
fn chain(kind: &str, x: Tensor<2>, w: &Tensor<2>, n: usize) -> (Tensor<2>, usize) {
    let mut x = x;
    let mut ops = 0;
    while ops < n {
        x = match kind {
            "elementwise" => {
                ops += 2;
                x.mul_scalar(0.999).add_scalar(0.001)
            }
            "reduce" => {
                ops += 2;
                x.clone() - x.mean_dim(1)
            }
            _ => {
                ops += 1;
                x.matmul(w.clone())
            }
        };
    }
    (x, ops)
}

pub fn bench_ops(a: &BenchOpsArgs) -> Result<Value> {
    if a.n == 0 || a.rows == 0 || a.cols == 0 {
        anyhow::bail!(
            "tuna bench ops: --n, --rows and --cols must be at least 1 (got {}, {}, {})",
            a.n,
            a.rows,
            a.cols
        );
    }
    let sel = device_for(&a.device, &a.dtype)?;
    let (device, dtype) = (sel.device.clone(), sel.dtype);
    let x0 = Tensor::<2>::random(
        [a.rows, a.cols],
        Distribution::Normal(0.0, 1.0),
        (&device, dtype),
    );
    // Near-orthogonal scale so a long matmul chain neither overflows nor vanishes in f16.
    let w = Tensor::<2>::random(
        [a.cols, a.cols],
        Distribution::Normal(0.0, 1.0 / (a.cols as f64).sqrt()),
        (&device, dtype),
    );
    let mut rows = Vec::new();
    for kind in ["elementwise", "reduce", "matmul"] {
        for mode in ["plain", "tracked", "tracked+backward"] {
            let run = |n: usize| -> Result<(f64, f64, usize)> {
                let x = match mode {
                    "plain" => x0.clone(),
                    _ => x0.clone().autodiff().require_grad(),
                };
                let t = Instant::now();
                let (y, ops) = chain(kind, x.clone(), &w, n);
                // The results stay alive through the sync, so fusion cannot drop the chain.
                let kept = match mode {
                    "tracked+backward" => (None, Some(y.cast(DType::F32).sum().backward())),
                    _ => (Some(y), None),
                };
                let enqueue = t.elapsed().as_secs_f64();
                sync(&device)?;
                let drain = t.elapsed().as_secs_f64() - enqueue;
                drop(kept);
                Ok((enqueue, drain, ops))
            };
            // A short run first compiles (and tunes) the case's kernels.
            run(a.n.min(64))?;
            let (enqueue, drain, ops) = run(a.n)?;
            let row = json!({
                "kind": kind, "mode": mode, "ops": ops,
                "enqueue_us_per_op": enqueue / ops as f64 * 1e6,
                "drain_us_per_op": drain / ops as f64 * 1e6,
            });
            eprintln!("{row}");
            rows.push(row);
        }
    }
    Ok(
        json!({"bench": "ops", "device": sel.kind.to_string(), "dtype": format!("{dtype:?}"),
        "rows_x_cols": [a.rows, a.cols], "cases": rows}),
    )
}

fn sync(device: &Device) -> Result<()> {
    device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind in every mode runs and reports finite, non-negative times for its operations.
    #[test]
    fn zero_operations_are_refused() {
        let a = BenchOpsArgs {
            device: "cpu".into(),
            dtype: "f32".into(),
            n: 0,
            rows: 16,
            cols: 8,
        };
        let err = bench_ops(&a).unwrap_err().to_string();
        assert!(err.contains("--n"), "{err}");
    }

    #[test]
    fn every_case_runs_on_the_cpu() {
        let a = BenchOpsArgs {
            device: "cpu".into(),
            dtype: "f32".into(),
            n: 8,
            rows: 16,
            cols: 8,
        };
        let out = bench_ops(&a).unwrap();
        let cases = out["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 9);
        for c in cases {
            assert!(c["ops"].as_u64().unwrap() >= 8, "{c}");
            for key in ["enqueue_us_per_op", "drain_us_per_op"] {
                let v = c[key].as_f64().unwrap();
                assert!(v.is_finite() && v >= 0.0, "{c}");
            }
        }
    }
}
