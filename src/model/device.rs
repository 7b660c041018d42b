//! `--device` selection and the float dtype that goes with each device.
//!
//! GPU discovery goes through `Device::wgpu_options().init()`, which returns an error when no
//! adapter matches instead of panicking on first use as `Device::wgpu(..)` would. A wgpu runtime
//! can be initialized once per (adapter kind, API), so results are cached for the process.

use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceChoice {
    /// Best GPU available, else CPU.
    #[default]
    Auto,
    Cpu,
    Wgpu,
    Vulkan,
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "cpu" | "flex" => Self::Cpu,
            "wgpu" | "gpu" => Self::Wgpu,
            "vulkan" => Self::Vulkan,
            "metal" => Self::Metal,
            other => {
                bail!("unknown device `{other}`; expected one of auto, cpu, wgpu, vulkan, metal")
            }
        })
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
        })
    }
}

/// A ready device, the float dtype to run the model in, and a human-readable name.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub dtype: DType,
    /// `cpu`, `wgpu`, `vulkan` or `metal`.
    pub kind: DeviceChoice,
}

/// The CPU device (burn's pure-Rust flex backend).
pub fn cpu_device() -> Device {
    Device::flex()
}

/// Float dtype for a device kind: f32 on CPU; f16 on wgpu/vulkan; bf16 (else f16) on metal,
/// each only where the device reports support, falling back to f32.
pub fn dtype_for(device: &Device, kind: DeviceChoice) -> DType {
    let wanted: &[DType] = match kind {
        DeviceChoice::Cpu | DeviceChoice::Auto => &[],
        DeviceChoice::Wgpu | DeviceChoice::Vulkan => &[DType::F16],
        DeviceChoice::Metal => &[DType::BF16, DType::F16],
    };
    wanted
        .iter()
        .copied()
        .find(|d| device.supports_dtype(*d))
        .unwrap_or(DType::F32)
}

#[cfg(feature = "gpu")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use burn::tensor::wgpu::WgpuBackend;
    use burn::tensor::{Device, DeviceKind};

    use super::DeviceChoice;

    type Key = (DeviceChoice, u8, usize);
    static CACHE: OnceLock<Mutex<HashMap<Key, Result<Device, String>>>> = OnceLock::new();

    fn api(choice: DeviceChoice) -> WgpuBackend {
        match choice {
            DeviceChoice::Vulkan => WgpuBackend::Vulkan,
            DeviceChoice::Metal => WgpuBackend::Metal,
            _ => WgpuBackend::Auto,
        }
    }

    /// `kind`: 0 = wgpu's default pick (may be a software adapter), 1 = discrete, 2 = integrated.
    /// `index`: which discrete GPU (for `kind` 1).
    pub fn try_init(choice: DeviceChoice, kind: u8, index: usize) -> Result<Device, String> {
        super::configure_cubecl();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((choice, kind, index))
            .or_insert_with(|| {
                let device_kind = match kind {
                    1 => DeviceKind::DiscreteGpu(index),
                    2 => DeviceKind::IntegratedGpu(0),
                    _ => DeviceKind::DefaultDevice,
                };
                Device::wgpu_options()
                    .device_kind(device_kind)
                    .graphics_api(api(choice))
                    .init()
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// A tuna built without the `gpu` cargo feature (as the CPU test suite is) has no GPU to find.
#[cfg(not(feature = "gpu"))]
mod gpu {
    use super::DeviceChoice;
    use burn::tensor::Device;

    pub fn try_init(_: DeviceChoice, _: u8, _: usize) -> Result<Device, String> {
        Err(
            "this tuna was built without GPU support (cargo feature `gpu`, on by default; \
             build without `--no-default-features`)"
                .to_string(),
        )
    }
}

/// cubecl's settings for tuna, set before the first GPU is: what a GPU process learns (autotune
/// results, compiled kernels) is kept in `$TUNA_CACHE/kernels`, so every run of a sweep and every
/// later process starts warm whatever folder tuna runs in (cubecl's own default is
/// `target/environment` under the outermost `Cargo.toml` above the working directory, else
/// `~/.cache/cubecl`); and the autotuner measures every matmul candidate on exact shapes
/// (`full`). At cubecl's default level (`balanced`) each candidate's time is cut off at a
/// fraction of a modelled peak that Vulkan's matmuls never reach, so the pick is made on
/// truncated timings. On an H200 the whole TinyLlama step ran about as fast at `full` (12,853 vs
/// 13,251 tok/s) in less GPU memory (9,733 vs 11,496 MiB, `bench/results/h200-2026-12-02`);
/// that call's per-product figures were taken before the benches kept the GPU's clocks up and
/// say little (README, *GPU clocks*).
///
/// A configuration file of the user's, found as cubecl finds it (`cubecl.toml` or `CubeCL.toml`,
/// or the `[cubecl]` section of `burn.toml`/`Burn.toml`, in the working directory or above), is
/// read as cubecl would read it; tuna's two choices fill in only what it leaves out (no
/// `[autotune]`, no `[environment]` table). cubecl's environment variables
/// (`CUBECL_AUTOTUNE_LEVEL=balanced`) come last and win.
#[cfg(feature = "gpu")]
pub fn configure_cubecl() {
    use burn::cubecl::config::autotune::AutotuneLevel;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let user = user_cubecl_file();
        let says = |table: &str| user.as_deref().is_some_and(|t| mentions_table(t, table));
        let mut config = CubeClRuntimeConfig::from_current_dir();
        if !says("autotune") {
            config.autotune.level = AutotuneLevel::Full;
        }
        if !says("environment")
            && let Ok(dir) = crate::files::tuna_cache_dir()
        {
            config.environment.path =
                burn::cubecl::config::cache::CacheConfig::Directory(dir.join("kernels"));
        }
        // Already read (a GPU was used before tuna could say): keep what cubecl chose.
        let _ = CubeClRuntimeConfig::try_set(config.override_from_env());
    });
}

/// Without the `gpu` feature there is no cubecl runtime to configure.
#[cfg(not(feature = "gpu"))]
pub fn configure_cubecl() {}

/// The text of the cubecl settings cubecl itself would read: the first of `cubecl.toml`,
/// `CubeCL.toml`, or a `burn.toml`/`Burn.toml` with a `[cubecl]` section, from the working
/// directory up.
#[cfg(feature = "gpu")]
fn user_cubecl_file() -> Option<String> {
    let cwd = std::env::current_dir().ok()?;
    for dir in cwd.ancestors() {
        for name in ["cubecl.toml", "CubeCL.toml"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
                return Some(text);
            }
        }
        for name in ["burn.toml", "Burn.toml"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(name))
                && mentions_table(&text, "cubecl")
            {
                return Some(text);
            }
        }
    }
    None
}

/// Whether TOML `text` has a table `name` or one under it (`[name]`, `[name.x]`, `[cubecl.name]`).
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn mentions_table(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        let Some(header) = l.strip_prefix('[').map(|h| h.trim_start_matches('[')) else {
            return false;
        };
        let raw = header.split(']').next().unwrap_or("").trim();
        let under = |h: &str| h == name || h.starts_with(&format!("{name}."));
        under(raw) || raw.strip_prefix("cubecl.").is_some_and(under)
    })
}

fn try_gpu(choice: DeviceChoice, kind: u8) -> Result<Device, String> {
    gpu::try_init(choice, kind, 0)
}

fn try_gpu_at(choice: DeviceChoice, index: usize) -> Result<Device, String> {
    gpu::try_init(choice, 1, index)
}

/// `vulkan:1` → (`vulkan`, Some(1)); a name without `:N` has no index.
pub fn split_index(device: &str) -> Result<(&str, Option<usize>)> {
    match device.split_once(':') {
        None => Ok((device, None)),
        Some((name, i)) => match i.parse::<usize>() {
            Ok(i) => Ok((name, Some(i))),
            Err(_) => {
                bail!("device `{device}`: the part after `:` must be a GPU number, as in vulkan:1")
            }
        },
    }
}

/// The `index`-th discrete GPU of an API (`vulkan:1`), for sweeps that put one run on each GPU.
pub fn select_gpu(choice: DeviceChoice, index: usize) -> Result<SelectedDevice> {
    let choice = match choice {
        DeviceChoice::Cpu => {
            bail!("device `cpu:{index}`: the CPU has no numbered devices; use cpu")
        }
        DeviceChoice::Auto => {
            if cfg!(target_os = "macos") {
                DeviceChoice::Metal
            } else {
                DeviceChoice::Vulkan
            }
        }
        c => c,
    };
    match try_gpu_at(choice, index) {
        Ok(device) => Ok(SelectedDevice {
            dtype: dtype_for(&device, choice),
            device,
            kind: choice,
        }),
        Err(e) => bail!("device `{choice}:{index}`: no such GPU: {e}"),
    }
}

/// Resolves `--device`. `auto` tries a real (discrete, then integrated) GPU on Metal, Vulkan or
/// whatever wgpu picks, and otherwise falls back to the CPU with a one-line notice on stderr.
pub fn select_device(choice: DeviceChoice) -> Result<SelectedDevice> {
    let done = |device: Device, kind: DeviceChoice| SelectedDevice {
        dtype: dtype_for(&device, kind),
        device,
        kind,
    };
    match choice {
        DeviceChoice::Cpu => Ok(done(cpu_device(), DeviceChoice::Cpu)),
        DeviceChoice::Wgpu | DeviceChoice::Vulkan | DeviceChoice::Metal => {
            match try_gpu(choice, 0) {
                Ok(d) => Ok(done(d, choice)),
                Err(e) => bail!("--device {choice}: no usable GPU adapter: {e}"),
            }
        }
        DeviceChoice::Auto => {
            // The native API first (its compiler gets tensor-core matmuls), then whatever wgpu
            // finds, which compiles to WGSL where SPIR-V is not available.
            let native = if cfg!(target_os = "macos") {
                DeviceChoice::Metal
            } else {
                DeviceChoice::Vulkan
            };
            let apis = [native, DeviceChoice::Wgpu];
            let mut last_err = String::new();
            for api in apis {
                for kind in [1u8, 2u8] {
                    match try_gpu(api, kind) {
                        Ok(d) => return Ok(done(d, api)),
                        Err(e) => last_err = e,
                    }
                }
            }
            // Once per process: a sweep asks for every run.
            static NOTICE: std::sync::Once = std::sync::Once::new();
            NOTICE.call_once(|| {
                let why = last_err
                    .split(", adapters")
                    .next()
                    .unwrap_or(&last_err)
                    .trim()
                    .to_string();
                eprintln!("tuna: no GPU found ({why}); running on the CPU");
            });
            Ok(done(cpu_device(), DeviceChoice::Cpu))
        }
    }
}

/// Picks the device and float type a config asks for.
pub fn device_for(device: &str, dtype: &str) -> Result<SelectedDevice> {
    let (name, index) = split_index(device)?;
    let choice: DeviceChoice = name.parse()?;
    let mut sel = match index {
        None => select_device(choice)?,
        Some(i) => select_gpu(choice, i)?,
    };
    sel.dtype = match dtype {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => sel.dtype,
    };
    if !sel.device.supports_dtype(sel.dtype) {
        bail!(
            "dtype {:?} is not supported on the {} device; use dtype: auto",
            sel.dtype,
            sel.kind
        );
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_cubecl_tables_are_found_as_cubecl_nests_them() {
        let profiling = "[profiling.logger]\nlevel = \"basic\"\n";
        assert!(!mentions_table(profiling, "autotune"));
        assert!(mentions_table(profiling, "profiling"));
        assert!(mentions_table(
            "[autotune]\nlevel = \"balanced\"",
            "autotune"
        ));
        assert!(mentions_table(
            "  [ environment ]\nname = \"h100\"",
            "environment"
        ));
        // burn.toml nests cubecl's settings under [cubecl].
        let burn = "[other]\n[cubecl.autotune]\nlevel = \"minimal\"\n";
        assert!(mentions_table(burn, "cubecl"));
        assert!(mentions_table(burn, "autotune"));
        assert!(!mentions_table(burn, "environment"));
        assert!(!mentions_table("[autotuner]", "autotune"));
    }

    #[test]
    fn parses_choices() {
        assert_eq!("AUTO".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_never_panics() {
        // Without a GPU this falls back to the CPU (with a notice); with one it picks it.
        let d = select_device(DeviceChoice::Auto).unwrap();
        if d.kind == DeviceChoice::Cpu {
            assert_eq!(d.dtype, DType::F32);
        }
    }

    #[test]
    fn cpu_runs_in_f32() {
        let d = select_device(DeviceChoice::Cpu).unwrap();
        assert_eq!(d.dtype, DType::F32);
    }
}
