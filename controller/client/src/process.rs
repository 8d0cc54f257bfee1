//! Process life shared by the proxies: allocator settings at start, SIGTERM (or
//! Ctrl-C), and waiting for connections in flight to finish up to a deadline.

use std::time::Duration;

use tracing::warn;
use tracing_subscriber::{
    Layer, filter::LevelFilter, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

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
/// colours only on a terminal (log files and collectors get plain text). Access log
/// lines are written in batches ([`logs`]); call [`flush_logs`] before exiting.
pub fn start() {
    tune_malloc();
    let policy = SchedPolicy::from_env(std::env::var("CAIRN_SCHED_POLICY").ok().as_deref());
    let applied = policy.as_ref().ok().map(|p| p.apply());
    let (filter, bad) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .with_writer(logs::Stdout::start())
                .with_filter(filter),
        )
        .init();
    if let Some(why) = bad {
        tracing::warn!(error = %why, "RUST_LOG is not a valid filter; logging at info");
    }
    match (&policy, applied) {
        (Err(why), _) => {
            warn!(error = %why, "CAIRN_SCHED_POLICY is not valid; the scheduler's default stays")
        }
        (Ok(SchedPolicy::Batch), Some(Ok(()))) => {
            tracing::info!(policy = "batch", "CPU scheduling policy set")
        }
        (Ok(_), Some(Err(e))) => {
            warn!(error = %e, "CAIRN_SCHED_POLICY could not be applied; the default stays")
        }
        _ => {}
    }
}

/// The Linux CPU scheduling policy of every thread of the proxy (`CAIRN_SCHED_POLICY`).
///
/// `batch` (`SCHED_BATCH`): a woken proxy thread does not preempt the task running on
/// its CPU; it runs once that task sleeps or its time slice ends. Where a proxy and
/// the processes it serves take turns on the same cores (ping-pong over sockets), it
/// then handles more ready connections per wake-up with fewer context switches: in the
/// l4 bench ~10% more keep-alive HTTP requests/s at 16 connections for ~10% less CPU
/// per request (docs/benchmarks.md). The price is latency when every core is busy with
/// CPU-bound work: a woken proxy waits up to a time slice (milliseconds). Hence opt-in;
/// `other` (the default) is the kernel's normal policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedPolicy {
    Other,
    Batch,
}

impl SchedPolicy {
    /// From the variable's value; unset or empty is `Other`.
    pub fn from_env(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim).unwrap_or_default() {
            "" | "other" => Ok(SchedPolicy::Other),
            "batch" => Ok(SchedPolicy::Batch),
            v => Err(format!("{v:?}: write other or batch")),
        }
    }

    /// Sets the policy of the calling thread, which threads it starts later inherit
    /// (so: before the runtime exists). `Other` changes nothing.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub fn apply(self) -> std::io::Result<()> {
        if self == SchedPolicy::Other {
            return Ok(());
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that
        // outlives the call.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn apply(self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log filter from `RUST_LOG`: comma-separated `target=level` directives and a
/// bare default level (`info,access=off,cairn_hbone=debug`); `info` when unset.
/// Targets only: the span and field filters of tracing's `EnvFilter` would put a regex
/// engine in every proxy. An invalid value gives `info` and the reason.
fn log_filter(value: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(LevelFilter::INFO);
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => (info(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (info(), Some(format!("{v:?}: {e}"))),
        },
    }
}

/// The proxy's runtime. With one worker it is tokio's current-thread scheduler: a task
/// woken by another runs after the tasks already ready, where the multi-thread
/// scheduler's LIFO slot runs it next. That order is what lets one HTTP/2 connection
/// task write the frames of many streams in one `writev`.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// Writes out the access log lines not yet written.
pub fn flush_logs() {
    logs::flush();
}

/// Log output. Access log lines (target `access`: one per request or connection)
/// are the bulk of a busy proxy's output; written one `write` each, they cost a
/// system call per request. They are collected and written together every
/// [`logs::FLUSH_EVERY`], or at once past [`logs::BATCH_BYTES`] (Envoy buffers its
/// access log files the same way). Everything else is written as it happens.
pub mod logs {
    use std::{
        io::{self, Write},
        sync::{Mutex, MutexGuard, OnceLock},
        time::Duration,
    };

    use tracing_subscriber::fmt::MakeWriter;

    /// How late an access log line may be written.
    pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
    /// Access log bytes collected before they are written without waiting.
    pub const BATCH_BYTES: usize = 32 * 1024;

    static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static FLUSHER: OnceLock<()> = OnceLock::new();

    fn pending() -> MutexGuard<'static, Vec<u8>> {
        PENDING.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_out(batch: &mut Vec<u8>) {
        if batch.is_empty() {
            return;
        }
        // Nowhere to report a failed log write; the batch is dropped either way.
        let _ = io::stdout().lock().write_all(batch);
        batch.clear();
    }

    pub(super) fn flush() {
        let mut batch = std::mem::take(&mut *pending());
        write_out(&mut batch);
    }

    /// The subscriber's writer: stdout, access lines batched.
    pub struct Stdout;

    impl Stdout {
        /// Starts the thread that writes batches out.
        pub fn start() -> Stdout {
            FLUSHER.get_or_init(|| {
                let spawned = std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(|| {
                        loop {
                            std::thread::sleep(FLUSH_EVERY);
                            flush();
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("access log flusher not started ({e}); lines are written at {BATCH_BYTES} bytes and at exit");
                }
            });
            Stdout
        }
    }

    /// One log line being written.
    pub enum Line<'a> {
        Now(io::StdoutLock<'a>),
        Batched(MutexGuard<'static, Vec<u8>>),
    }

    impl Write for Line<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self {
                Line::Now(out) => out.write(buf),
                Line::Batched(pending) => {
                    pending.extend_from_slice(buf);
                    Ok(buf.len())
                }
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            match self {
                Line::Now(out) => out.flush(),
                Line::Batched(_) => Ok(()),
            }
        }
    }

    impl Drop for Line<'_> {
        fn drop(&mut self) {
            if let Line::Batched(pending) = self
                && pending.len() >= BATCH_BYTES
            {
                write_out(pending);
            }
        }
    }

    impl<'a> MakeWriter<'a> for Stdout {
        type Writer = Line<'a>;

        fn make_writer(&'a self) -> Line<'a> {
            Line::Now(io::stdout().lock())
        }

        fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
            match meta.target() {
                "access" => Line::Batched(pending()),
                _ => self.make_writer(),
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use tracing::Level;

    use tokio::runtime::RuntimeFlavor;

    use super::{SchedPolicy, log_filter, runtime};

    #[test]
    fn sched_policy_values() {
        for unset in [None, Some(""), Some("other"), Some(" other ")] {
            assert_eq!(SchedPolicy::from_env(unset), Ok(SchedPolicy::Other));
        }
        assert_eq!(SchedPolicy::from_env(Some("batch")), Ok(SchedPolicy::Batch));
        let why = SchedPolicy::from_env(Some("fifo")).expect_err("not offered");
        assert!(why.contains("fifo"), "{why}");
    }

    /// Batch applies to the calling thread and the threads it starts afterwards (a
    /// runtime's workers); run on a thread of its own so the test harness keeps its
    /// policy.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(unsafe_code)]
    fn batch_is_inherited_by_threads_started_after_it() {
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let (own, child) = std::thread::spawn(move || {
            assert_eq!(policy(), libc::SCHED_OTHER);
            SchedPolicy::Batch
                .apply()
                .expect("lowering the policy needs no privilege");
            let child = std::thread::spawn(policy).join().expect("child");
            (policy(), child)
        })
        .join()
        .expect("thread");
        assert_eq!((own, child), (libc::SCHED_BATCH, libc::SCHED_BATCH));
        assert_eq!(policy(), libc::SCHED_OTHER, "other threads keep theirs");
    }

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let flavor = |n| runtime(n).expect("runtime").handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(0), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(2), RuntimeFlavor::MultiThread);
    }

    #[test]
    fn rust_log_sets_levels_per_target_and_bad_values_fall_back_to_info() {
        let (filter, bad) = log_filter(Some("info,access=off,cairn_hbone=debug"));
        assert!(bad.is_none());
        assert!(filter.would_enable("cairn_ztunnel::inbound", &Level::INFO));
        assert!(!filter.would_enable("cairn_ztunnel::inbound", &Level::DEBUG));
        assert!(
            !filter.would_enable("access", &Level::INFO),
            "access lines off"
        );
        assert!(filter.would_enable("cairn_hbone::client", &Level::DEBUG));

        for unset in [None, Some(""), Some("  ")] {
            let (filter, bad) = log_filter(unset);
            assert!(bad.is_none(), "{unset:?}");
            assert!(filter.would_enable("x", &Level::INFO));
            assert!(!filter.would_enable("x", &Level::DEBUG));
        }

        let (filter, bad) = log_filter(Some("cairn=loud"));
        let why = bad.expect("an invalid level is reported");
        assert!(why.contains("cairn=loud"), "{why}");
        assert!(filter.would_enable("cairn", &Level::INFO));
        assert!(!filter.would_enable("cairn", &Level::DEBUG));
    }
}
