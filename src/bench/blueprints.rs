//! `tuna bench matmul --blueprints`: the step's large products through cubek's Cmma routines
//! with tile plans forced one by one, beside the plans its autotuner infers. burn's autotuner only
//! tries inferred plans (one per routine), and on Vulkan the best of them runs at 15–17 % of
//! cuBLAS; this measures whether another plan of the same routines runs faster before anything in
//! the model is built on it. GPU builds only: it launches kernels on burn's cubecl tensors
//! directly, below burn's tensor API.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};
use burn_cubecl::cubecl::{Device as CubeDevice, client::Client, future};
use burn_cubecl::tensor::CubeTensor;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulProblem};
use cubek::matmul::multi_level::Strategy as Multi;
use cubek::matmul::multi_level::components::stage::PartitionBuffering;
use cubek::matmul::multi_level::components::tile::TileMatmulKind;
use cubek::matmul::multi_level::definition::{BatchMatmulBlueprint, TilingScheme};
use cubek::matmul::multi_level::routines::batch::double_buffering::DoubleBufferingArgs;
use cubek::matmul::multi_level::routines::batch::simple::SimpleArgs;
use cubek::matmul::routine::BlueprintStrategy;
use cubek::matmul::strategy::Strategy;
use cubek::std::InputBinding;
use cubek::std::cube_count::{CubeCountStrategy, GlobalOrder, HypercubeBlueprint, SmAllocation};
use serde_json::{Value, json};

use crate::data::dataset::SplitMix64;

/// One of the step's products: (name, m, k, n, rhs transposed).
type Case = (&'static str, usize, usize, usize, bool);

/// The sweep runs every plan on the first case, then the best few on all of them.
const CASES: &[Case] = &[
    ("tinyllama up fwd", 4096, 2048, 5632, true),
    ("tinyllama q fwd", 4096, 2048, 2048, true),
    ("tinyllama down fwd", 4096, 5632, 2048, true),
    ("tinyllama up dx", 4096, 5632, 2048, false),
    ("tinyllama down dx", 4096, 2048, 5632, false),
    ("smollm2 up fwd", 4096, 576, 1536, true),
];

/// A forced plan: tiles of 16 × 16 × 16 per instruction, `partition` tiles per plane (m, n,
/// k), `stage` planes per cube (m, n), through the single-stage or the double-buffered routine.
#[derive(Clone, Copy, Debug)]
struct Plan {
    double: bool,
    partition: (u32, u32, u32),
    stage: (u32, u32),
    swizzle_row: u32,
}

fn plans() -> Vec<Plan> {
    let mut out = Vec::new();
    for double in [false, true] {
        for partition in [
            (2, 8, 2),
            (2, 4, 2),
            (4, 4, 2),
            (4, 2, 2),
            (2, 8, 4),
            (4, 4, 4),
            (4, 8, 2),
            (2, 4, 4),
            (1, 8, 2),
            (8, 2, 2),
            (4, 2, 4),
            (2, 2, 4),
        ] {
            for stage in [(4, 1), (2, 2), (8, 1), (2, 1), (4, 2), (1, 4)] {
                out.push(Plan {
                    double,
                    partition,
                    stage,
                    swizzle_row: 4,
                });
            }
        }
    }
    out
}

impl Plan {
    fn name(&self) -> String {
        let (pm, pn, pk) = self.partition;
        let (sm, sn) = self.stage;
        format!(
            "{} p{pm}x{pn}x{pk} s{sm}x{sn} block {}x{}x{} planes {}",
            if self.double { "double" } else { "simple" },
            16 * pm * sm,
            16 * pn * sn,
            16 * pk * if self.double { 2 } else { 1 },
            sm * sn
        )
    }

    fn strategy(&self, client: &Client, problem: &MatmulProblem) -> Result<Strategy> {
        let (pm, pn, pk) = self.partition;
        let (sm, sn) = self.stage;
        let scheme = TilingScheme::builder()
            .with_tile_size((16, 16, 16).into())
            .with_partition_size((pm, pn, pk).into())
            .with_stage_size((sm, sn, 1).into())
            .build()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let cubes = match client.properties().hardware.num_streaming_multiprocessors {
            Some(num_sms) => CubeCountStrategy::Sm {
                num_sms,
                sm_usage: SmAllocation::Exact,
                cubes_first: true,
            },
            None => CubeCountStrategy::FromProblem,
        };
        let hypercube = HypercubeBlueprint::builder()
            .global_order(GlobalOrder::SwizzleRow(self.swizzle_row))
            .cube_count_strategy(cubes)
            .build();
        let plane_dim = client.properties().hardware.plane_size_max;
        let buffering = if pn * sn > 1 && self.double {
            PartitionBuffering::Double
        } else {
            PartitionBuffering::Single
        };
        let blueprint =
            BatchMatmulBlueprint::builder(TileMatmulKind::Cmma, scheme, plane_dim, problem)
                .partition_buffering(buffering)
                .hypercube_blueprint(hypercube)
                .build();
        Ok(Strategy::from(if self.double {
            Multi::DoubleCyclicCmma(BlueprintStrategy::Forced(blueprint))
        } else {
            Multi::SimpleCyclicCmma(BlueprintStrategy::Forced(blueprint))
        }))
    }
}

/// The routines' own plans, as burn's autotuner launches them.
fn inferred() -> Vec<(String, Strategy)> {
    let simple = |multi_rows| {
        Strategy::from(Multi::SimpleCyclicCmma(BlueprintStrategy::Inferred(
            SimpleArgs {
                multi_rows,
                tile_matmul: TileMatmulKind::Cmma,
            },
        )))
    };
    let double = Strategy::from(Multi::DoubleCyclicCmma(BlueprintStrategy::Inferred(
        DoubleBufferingArgs {
            specialized: false,
            tile_matmul: TileMatmulKind::Cmma,
        },
    )));
    vec![
        ("inferred simple multi_rows".into(), simple(true)),
        ("inferred simple".into(), simple(false)),
        ("inferred double".into(), double),
    ]
}

struct Operands {
    client: Client,
    lhs: CubeTensor,
    rhs: CubeTensor,
    out: CubeTensor,
    problem: MatmulProblem,
}

fn tensor(client: &Client, device: &CubeDevice, shape: [usize; 2], seed: u64) -> CubeTensor {
    let mut rng = SplitMix64(seed);
    let n = shape[0] * shape[1];
    let bytes: Vec<u8> = (0..n)
        .flat_map(|_| {
            let x = ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32;
            half::f16::from_f32(x).to_le_bytes()
        })
        .collect();
    let handle = client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        shape.into(),
        handle,
        DType::F16,
    )
}

fn operands(device: &CubeDevice, &(_, m, k, n, transposed): &Case) -> Operands {
    let client = device.client();
    let lhs = tensor(&client, device, [m, k], 1);
    let rhs = if transposed {
        let mut w = tensor(&client, device, [n, k], 2);
        w.meta.swap(0, 1);
        w
    } else {
        tensor(&client, device, [k, n], 2)
    };
    let out = CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        [m, n].into(),
        client.empty(m * n * 2),
        DType::F16,
    );
    let problem = MatmulProblem::from_shapes_and_strides(
        lhs.meta.shape().clone(),
        rhs.meta.shape().clone(),
        out.meta.shape().clone(),
        lhs.meta.strides().clone(),
        rhs.meta.strides().clone(),
        out.meta.strides().clone(),
        elems(),
        Default::default(),
        None,
        None,
    )
    .expect("a plain f16 product's layout");
    Operands {
        client,
        lhs,
        rhs,
        out,
        problem,
    }
}

fn elems() -> MatmulGlobalElems {
    let f16 = burn_cubecl::cubecl::ir::ElemType::Float(burn_cubecl::cubecl::ir::FloatKind::F16);
    MatmulGlobalElems {
        lhs: f16,
        rhs: f16,
        out: f16,
    }
}

fn launch(ops: &Operands, strategy: &Strategy) -> Result<()> {
    let f16 = elems();
    let mut dtypes = MatmulElems::from_globals(&f16);
    let run = catch_unwind(AssertUnwindSafe(|| {
        cubek::matmul::launch::launch_ref(
            strategy,
            &ops.client,
            InputBinding::new(ops.lhs.clone().binding(), f16.lhs),
            InputBinding::new(ops.rhs.clone().binding(), f16.rhs),
            ops.out.clone().binding(),
            &mut dtypes,
        )
    }));
    match run {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("{e:?}"),
        Err(_) => bail!("panicked"),
    }
}

fn sync(client: &Client) -> Result<()> {
    future::block_on(client.sync()).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Milliseconds per product: compiled and run once, then kept running for `busy_s` (the GPU's
/// clocks up), then `iters` timed.
fn time(ops: &Operands, strategy: &Strategy, iters: usize, busy_s: f64) -> Result<f64> {
    launch(ops, strategy)?;
    sync(&ops.client)?;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < busy_s {
        for _ in 0..10 {
            launch(ops, strategy)?;
        }
        sync(&ops.client)?;
    }
    let t0 = Instant::now();
    for _ in 0..iters {
        launch(ops, strategy)?;
    }
    sync(&ops.client)?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64 * 1e3)
}

pub fn sweep(device: &Device, iters: usize, top: usize) -> Result<Value> {
    let burn::backend::DispatchDevice::Cube(cube) = device.as_dispatch().clone() else {
        bail!("--blueprints needs a GPU device (cubecl), not {device:?}");
    };
    let mut rows = Vec::new();
    let row = |case: &Case, plan: &str, ms: Result<f64>| {
        let (name, m, k, n, t) = *case;
        let v = match ms {
            Ok(ms) => json!({"case": name, "plan": plan, "ms": ms,
                "tflops": 2.0 * (m * k * n) as f64 / ms / 1e9, "nt": t}),
            Err(e) => json!({"case": name, "plan": plan, "error": e.to_string()}),
        };
        eprintln!("{v}");
        v
    };
    let first = &CASES[0];
    let ops = operands(&cube, first);
    let mut scored: Vec<(f64, Plan)> = Vec::new();
    for (name, s) in inferred() {
        rows.push(row(first, &name, time(&ops, &s, iters, 0.3)));
    }
    for plan in plans() {
        let ms = plan
            .strategy(&ops.client, &ops.problem)
            .and_then(|s| time(&ops, &s, iters, 0.2));
        if let Ok(ms) = ms {
            scored.push((ms, plan));
        }
        rows.push(row(first, &plan.name(), ms));
    }
    drop(ops);
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let best: Vec<Plan> = scored.iter().take(top).map(|p| p.1).collect();
    for case in &CASES[1..] {
        let ops = operands(&cube, case);
        for (name, s) in inferred() {
            rows.push(row(case, &name, time(&ops, &s, iters, 0.3)));
        }
        for plan in &best {
            let ms = plan
                .strategy(&ops.client, &ops.problem)
                .and_then(|s| time(&ops, &s, iters, 0.3));
            rows.push(row(case, &plan.name(), ms));
        }
    }
    Ok(json!({"bench": "matmul-blueprints", "rows": rows}))
}
