//! Memory this process and its device hold, for training logs, the leaderboard and benchmarks.

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Device memory the GPU allocator holds, in MiB (its reserved pages: what `nvidia-smi` sees
/// of this process, less the driver's context). `None` on the CPU.
pub fn device_mem_mb(device: &burn::tensor::Device) -> Option<f64> {
    device
        .memory_pool_usage()
        .map(|u| u.bytes_reserved as f64 / (1024.0 * 1024.0))
}
