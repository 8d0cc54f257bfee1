//! The Prometheus recorder keeps every histogram sample until it is folded into its
//! buckets; `telemetry::fold_histograms` folds them on a timer so a waypoint that
//! nobody scrapes does not grow with every request. Checked by the bytes this
//! process holds (a counting allocator: this test binary's only test).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use cairn_waypoint::telemetry::{FOLD_HISTOGRAMS_EVERY, fold_histograms};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counter is
// only arithmetic on the sizes. (A global allocator cannot be written without
// `unsafe`; this one exists only in this test binary.)
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SAMPLES: usize = 100_000;

#[tokio::test(start_paused = true)]
async fn histogram_samples_are_folded_without_a_scrape() {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("istio_request_duration_milliseconds".into()),
            &[1.0, 10.0, 100.0],
        )
        .expect("buckets")
        .build_recorder();
    let prometheus = recorder.handle();
    let duration = metrics::with_local_recorder(&recorder, || {
        metrics::histogram!("istio_request_duration_milliseconds")
    });

    let before = live();
    for i in 0..SAMPLES {
        duration.record(i as f64);
    }
    let held = live() - before;
    assert!(
        held >= (SAMPLES * 8) as isize,
        "{SAMPLES} samples held {held} bytes before folding"
    );

    fold_histograms(prometheus.clone());
    tokio::time::sleep(FOLD_HISTOGRAMS_EVERY * 2).await;
    // Folded samples are freed once no reader can still see them (epoch-based
    // reclamation): later records move the epoch on.
    for _ in 0..10 {
        for _ in 0..1_000 {
            duration.record(1.0);
        }
        tokio::time::sleep(FOLD_HISTOGRAMS_EVERY).await;
    }
    let left = live() - before;
    assert!(
        left < held / 4,
        "{held} bytes of samples before folding, {left} after"
    );
    // Folded, not lost: every sample is counted in the histogram.
    let text = prometheus.render();
    let count = text
        .lines()
        .find(|l| l.starts_with("istio_request_duration_milliseconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .expect("a count line");
    assert_eq!(count, (SAMPLES + 10_000).to_string());
}
