//! `tuna bench train --host-profile FILE`: where the host's time goes while training steps run.
//!
//! SmolLM2's step on an H200 is bound by the host: the GPU idles a quarter of it, and three
//! threads share the work (tuna's own, which states the step; fusion's stream, `DSU-…`; the
//! compute server that launches kernels, `DSD-…`). Counting operations did not say which of
//! their costs to cut (a third fewer autodiff nodes in RMSNorm and 480 fewer launches in LoRA's
//! branch both ran at the same speed), so this samples every thread's stack (pprof-rs: a
//! `SIGPROF` timer, unwound in the signal handler) and writes the samples as folded stacks,
//! `thread;outermost;…;innermost count` per line, the input of `bench/host_profile_top.py` and
//! of any flame-graph tool. Symbols come from the binary's symbol table: strip the debug
//! information only (`strip --strip-debug`), not the symbols.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// A running sampler; dropping it without [`HostProfile::write`] discards the samples.
pub struct HostProfile {
    // Dropped first: the sampler stops before the lock lets another start.
    guard: pprof::ProfilerGuard<'static>,
    _one: std::sync::MutexGuard<'static, ()>,
}

/// pprof's sampler is the process's (one timer, one signal handler): a second one started while
/// the first runs would share its samples, so starts wait their turn (parallel tests).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl HostProfile {
    /// Starts sampling every thread of the process `hz` times a second of CPU time.
    pub fn start(hz: i32) -> Result<Self> {
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(hz)
            // Unwinding through these from a signal handler can deadlock or crash (pprof-rs's
            // own advice). A sample taken inside them is dropped, not cut there: time in libc
            // (malloc, memcpy, futex waits, sched_yield), libgcc, pthread and the vDSO is not
            // in the profile, so its shares are of the time outside them.
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .context("starting the host profiler (pprof)")?;
        Ok(Self { guard, _one: one })
    }

    /// Writes the samples so far as folded stacks to `path`; returns the number of samples.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let report = self
            .guard
            .report()
            .build()
            .context("building the host profile")?;
        let mut folded: HashMap<String, isize> = HashMap::new();
        for (frames, count) in &report.data {
            let mut line = frames.thread_name_or_id().replace([';', ' '], "_");
            // pprof keeps the innermost frame first; folded stacks start at the outermost.
            for symbols in frames.frames.iter().rev() {
                for s in symbols.iter().rev() {
                    line.push(';');
                    line.push_str(&short_name(&s.name()));
                }
            }
            *folded.entry(line).or_default() += count;
        }
        let mut lines: Vec<_> = folded.into_iter().collect();
        lines.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut text = String::new();
        let mut total = 0u64;
        for (stack, count) in &lines {
            let _ = writeln!(text, "{stack} {count}");
            total += *count as u64;
        }
        crate::files::write_atomic(path, text.as_bytes())?;
        Ok(total)
    }
}

/// A demangled symbol without its hash suffix (`::h0123456789abcdef`) and with no `;`, which
/// the folded format reserves (the count follows the last space, so spaces may stay).
fn short_name(name: &str) -> String {
    let trimmed = match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].bytes().all(|b| b.is_ascii_hexdigit()) => {
            &name[..i]
        }
        _ => name,
    };
    trimmed.replace(';', ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_name_drops_the_hash_and_reserved_characters() {
        assert_eq!(
            short_name("burn_fusion::stream::Stream::add::h0123456789abcdef"),
            "burn_fusion::stream::Stream::add"
        );
        assert_eq!(
            short_name("<T as core::ops::Fn<(A; B)>>::call"),
            "<T as core::ops::Fn<(A: B)>>::call"
        );
        // Not a hash: left as it is.
        assert_eq!(short_name("a::hb"), "a::hb");
    }

    /// Busy work on this thread is sampled, and its frames name this test's function.
    #[test]
    fn samples_a_busy_thread_into_folded_stacks() {
        let p = HostProfile::start(999).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 400 {
            x = std::hint::black_box(busy(x));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.folded");
        let n = p.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(n >= 20, "{n} samples in 400 ms at 999 Hz:\n{text}");
        let counted: u64 = text
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(counted, n);
        assert!(
            text.contains("busy"),
            "no frame names the busy function:\n{text}"
        );
    }

    #[inline(never)]
    fn busy(mut x: u64) -> u64 {
        for i in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        x
    }
}
