//! Maps and the programs that share them.

mod connect;
mod lookup;
mod sockops;

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
};
use cairn_capture_common::{ConnKey, Counter, ListenerKey, OrigDst, PodConfig};

/// Connections between `connect()` and the SYN: at most this many in flight per node.
#[map(name = "CAIRN_PENDING")]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(16_384, 0);

/// Captured connections not yet accepted and looked up by ztunnel.
#[map(name = "CAIRN_CONNS")]
static CONNS: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65_536, 0);

#[map(name = "CAIRN_PODS")]
static PODS: HashMap<u32, PodConfig> = HashMap::pinned(4_096, 0);

#[map(name = "CAIRN_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(8_192, 0);

#[map(name = "CAIRN_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot of this map; programs do not migrate CPUs mid-run.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Programs must declare a GPL-compatible license to use the socket helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
