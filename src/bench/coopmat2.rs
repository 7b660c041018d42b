//! `tuna bench matmul --coopmat2`: the step's large products as one workgroup-scope cooperative
//! matrix per cube (NVIDIA's VK_NV_cooperative_matrix2, which cubecl compiles but cubek's matmul
//! routines never use). Each cube loads its `bm × bk` and `bk × bn` tiles straight from global
//! memory through tensor layouts and multiply-adds them into one `bm × bn` accumulator; how the
//! tile is staged through shared memory and spread over the subgroups is left to the driver.
//! cubek's subgroup-scope routines stage by hand with synchronous 64-bit copies and no prefetch
//! and stop at 15–17 % of cuBLAS on an H200; this measures whether the driver does better.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Device;
use burn_cubecl::cubecl::ir::{ElemType, FloatKind};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, client::Client, cmma, future};
use half::f16;
use serde_json::{Value, json};

use crate::data::dataset::SplitMix64;

/// `out[m, n] = lhs[m, k] · rhs`, rhs `[n, k]` (`rhs_nk`: the forward's `x Wᵀ`) or `[k, n]`
/// (the input gradient's `dY W`); all row-major f16, f32 accumulation. The grid is
/// `(n / bn, m / bm)`; shapes must be multiples of the tile (the bench's are).
#[cube(launch_unchecked)]
fn gemm_workgroup(
    lhs: &[f16],
    rhs: &[f16],
    out: &mut [f16],
    m: u32,
    n: u32,
    k: u32,
    #[comptime] bm: usize,
    #[comptime] bn: usize,
    #[comptime] bk: usize,
    #[comptime] rhs_nk: bool,
) {
    let row0 = CUBE_POS_Y * bm as u32;
    let col0 = CUBE_POS_X * bn as u32;
    let lhs_view = TensorView::new(lhs, seq![m, k]).finish();
    let mut a = unsafe {
        cmma::Matrix::<f16, cmma::Cube>::uninitialized(
            cmma::MatrixIdent::A,
            bm,
            bn,
            bk,
            cmma::MatrixLayout::Undefined,
        )
    };
    let mut b = unsafe {
        cmma::Matrix::<f16, cmma::Cube>::uninitialized(
            cmma::MatrixIdent::B,
            bm,
            bn,
            bk,
            cmma::MatrixLayout::Undefined,
        )
    };
    let c = cmma::Matrix::<f32, cmma::Cube>::from_value(
        cmma::MatrixIdent::Accumulator,
        bm,
        bn,
        bk,
        cmma::MatrixLayout::Undefined,
        0.0,
    );
    if comptime!(rhs_nk) {
        let rhs_view = TensorView::new(rhs, seq![n, k]).finish();
        for k0 in range_stepped(0, k, bk as u32) {
            let l = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
            cmma::load_tensor(&mut a, &l);
            let r = rhs_view.slice(seq![col0, k0], seq![bn as u32, bk as u32]);
            let r = r.permuted(seq![1, 0]);
            cmma::load_tensor(&mut b, &r);
            cmma::execute(&a, &b, &c, &c);
        }
    } else {
        let rhs_view = TensorView::new(rhs, seq![k, n]).finish();
        for k0 in range_stepped(0, k, bk as u32) {
            let l = lhs_view.slice(seq![row0, k0], seq![bm as u32, bk as u32]);
            cmma::load_tensor(&mut a, &l);
            let r = rhs_view.slice(seq![k0, col0], seq![bk as u32, bn as u32]);
            cmma::load_tensor(&mut b, &r);
            cmma::execute(&a, &b, &c, &c);
        }
    }
    let half = cmma::cast::<f32, f16, cmma::Cube>(&c);
    let out_view = TensorView::new(&*out, seq![m, n]).finish();
    let mut o = out_view.slice(seq![row0, col0], seq![bm as u32, bn as u32]);
    cmma::store_tensor(&mut o, &half);
}

/// (name, m, k, n, rhs `[n, k]`).
type Case = (&'static str, usize, usize, usize, bool);

const CASES: &[Case] = &[
    ("tinyllama up fwd", 4096, 2048, 5632, true),
    ("tinyllama q fwd", 4096, 2048, 2048, true),
    ("tinyllama down fwd", 4096, 5632, 2048, true),
    ("tinyllama up dx", 4096, 5632, 2048, false),
    ("tinyllama down dx", 4096, 2048, 5632, false),
    ("smollm2 up fwd", 4096, 576, 1536, true),
];

/// (bm, bn, bk) tiles per cube.
const TILES: &[(usize, usize, usize)] = &[
    (128, 128, 32),
    (128, 128, 64),
    (128, 256, 32),
    (256, 128, 32),
    (128, 64, 64),
    (64, 128, 64),
    (256, 256, 32),
    (64, 64, 64),
];

fn random_f16(seed: u64, n: usize) -> Vec<half::f16> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| {
            half::f16::from_f32(
                ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32,
            )
        })
        .collect()
}

fn bytes(x: &[half::f16]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

struct Operands {
    lhs: Vec<half::f16>,
    rhs: Vec<half::f16>,
    lhs_h: cubecl::server::Handle,
    rhs_h: cubecl::server::Handle,
    out_h: cubecl::server::Handle,
}

#[allow(clippy::too_many_arguments)]
fn launch(client: &Client, ops: &Operands, case: &Case, tile: (usize, usize, usize), units: u32) {
    let &(_, m, k, n, nk) = case;
    let (bm, bn, bk) = tile;
    unsafe {
        gemm_workgroup::launch_unchecked(
            client,
            CubeCount::Static((n / bn) as u32, (m / bm) as u32, 1),
            CubeDim::new_1d(units),
            BufferArg::from_raw_parts(ops.lhs_h.clone(), m * k),
            BufferArg::from_raw_parts(ops.rhs_h.clone(), k * n),
            BufferArg::from_raw_parts(ops.out_h.clone(), m * n),
            m as u32,
            n as u32,
            k as u32,
            bm,
            bn,
            bk,
            nk,
        )
    }
}

fn sync(client: &Client) -> Result<()> {
    future::block_on(client.sync()).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Largest relative error over sampled entries of the product against the host's f32 sums.
fn check(client: &Client, ops: &Operands, case: &Case) -> Result<f64> {
    let &(_, m, k, n, nk) = case;
    let raw = client
        .read_one(ops.out_h.clone())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let out: Vec<f32> = raw
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let mut rng = SplitMix64(7);
    let mut worst = 0.0f64;
    for _ in 0..64 {
        let (i, j) = ((rng.next() as usize) % m, (rng.next() as usize) % n);
        let mut want = 0.0f64;
        let mut scale = 0.0f64;
        for p in 0..k {
            let r = if nk {
                ops.rhs[j * k + p]
            } else {
                ops.rhs[p * n + j]
            };
            let t = ops.lhs[i * k + p].to_f64() * r.to_f64();
            want += t;
            scale += t.abs();
        }
        worst = worst.max((out[i * n + j] as f64 - want).abs() / scale.max(1e-6));
    }
    Ok(worst)
}

pub fn sweep(device: &Device, iters: usize) -> Result<Value> {
    let burn::backend::DispatchDevice::Cube(cube) = device.as_dispatch().clone() else {
        bail!("--coopmat2 needs a GPU device (cubecl), not {device:?}");
    };
    let client = cube.client();
    let f16 = ElemType::Float(FloatKind::F16);
    let f32_ = ElemType::Float(FloatKind::F32);
    let configs: Vec<_> = client
        .properties()
        .features
        .matmul
        .cube_mma
        .iter()
        .filter(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32_)
        .cloned()
        .collect();
    eprintln!("workgroup-scope f16 configs: {configs:?}");
    eprintln!(
        "reserved shared memory: {}",
        client.properties().hardware.cube_mma_reserved_shared_memory
    );
    if configs.is_empty() {
        bail!(
            "the device offers no workgroup-scope cooperative matrix (VK_NV_cooperative_matrix2)"
        );
    }
    let mut units: Vec<u32> = configs.iter().filter_map(|c| c.units_per_block).collect();
    units.sort();
    units.dedup();
    let mut rows = Vec::new();
    for case in CASES {
        let &(name, m, k, n, _) = case;
        let lhs = random_f16(1, m * k);
        let rhs = random_f16(2, k * n);
        let ops = Operands {
            lhs_h: client.create_from_slice(&bytes(&lhs)),
            rhs_h: client.create_from_slice(&bytes(&rhs)),
            out_h: client.empty(m * n * 2),
            lhs,
            rhs,
        };
        for &tile in TILES {
            for &u in &units {
                let plan = format!("{}x{}x{} units {u}", tile.0, tile.1, tile.2);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                    || -> Result<(f64, f64)> {
                        launch(&client, &ops, case, tile, u);
                        sync(&client)?;
                        let err = check(&client, &ops, case)?;
                        let t = Instant::now();
                        while t.elapsed().as_secs_f64() < 0.3 {
                            for _ in 0..10 {
                                launch(&client, &ops, case, tile, u);
                            }
                            sync(&client)?;
                        }
                        let t0 = Instant::now();
                        for _ in 0..iters {
                            launch(&client, &ops, case, tile, u);
                        }
                        sync(&client)?;
                        Ok((t0.elapsed().as_secs_f64() / iters as f64 * 1e3, err))
                    },
                ));
                let row = match run {
                    Ok(Ok((ms, err))) => json!({"case": name, "plan": plan, "ms": ms,
                        "tflops": 2.0 * (m * k * n) as f64 / ms / 1e9, "rel_err": err}),
                    Ok(Err(e)) => json!({"case": name, "plan": plan, "error": e.to_string()}),
                    Err(_) => json!({"case": name, "plan": plan, "error": "panicked"}),
                };
                eprintln!("{row}");
                rows.push(row);
            }
        }
    }
    Ok(json!({"bench": "matmul-coopmat2", "configs": format!("{configs:?}"), "rows": rows}))
}
