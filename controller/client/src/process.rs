//! Process life shared by the proxies: allocator settings at start, SIGTERM (or
//! Ctrl-C), and waiting for connections in flight to finish up to a deadline.

use std::time::Duration;

use tracing::warn;

/// Allocator settings both proxies start with (called by [`start`], before
/// any other thread). glibc's malloc defaults cost the data path dearly: h2 reads each DATA frame into a
/// fresh buffer that lives until the bytes are written out, and with the default
/// (dynamic) thresholds glibc hands the freed heap tops back to the kernel and faults
/// them in again on the next frame. Measured in the two-namespace bench: 1-stream
/// CPU per GB 2.8 -> 2.1 CPU-s with fixed thresholds. Two arenas (one per worker
/// thread) instead of eight per core keep idle and loaded RSS down.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any other
    // thread exists and the return values (0 = rejected) leave the defaults in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
pub fn tune_malloc() {}

/// What a proxy's `main` does first, before any other thread exists: the allocator
/// settings, then logging to stdout filtered by `RUST_LOG` (default `info`), with
/// colours only on a terminal (log files and collectors get plain text).
pub fn start() {
    tune_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
}

/// Returns on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Waits until `active()` is 0 or `deadline` passes; says what was left.
pub async fn drain(active: impl Fn() -> usize, deadline: Duration) {
    let until = tokio::time::Instant::now() + deadline;
    while active() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = active();
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline reached; closing remaining connections"
        );
    }
}
