//! `sock_ops` on each enrolled pod's cgroup: when a captured socket sends its SYN its
//! source port is known, so the parked destination moves to `CAIRN_CONNS` under
//! (network namespace, source address) — the key ztunnel's outbound listener has for
//! the connection it accepts. The SYN has not left yet, so the entry always exists
//! before ztunnel can accept.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use cairn_capture_common::{ConnKey, Counter};

use super::{CONNS, PENDING, count};

const AF_INET6: u32 = 10;

#[sock_ops]
pub fn cairn_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: helpers valid for sock_ops on a full socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dst) = (unsafe { PENDING.get(&cookie) }).copied() else {
        // Not a captured socket (loopback, or the pod's own listener's peers).
        return 1;
    };
    let _ = PENDING.remove(&cookie);
    // Both fields read unconditionally, each at its own fixed offset: a load whose
    // context offset depends on a branch is rejected by the verifier.
    // SAFETY: context reads the verifier allows for sock_ops.
    let (ip4, ip6_low) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ops).local_ip4),
            core::ptr::read_volatile(&raw const (*ctx.ops).local_ip6[3]),
        )
    };
    // Captured dual-stack sockets talk IPv4 on the wire (`::ffff:127.0.0.1`).
    let ip = if ctx.family() == AF_INET6 {
        ip6_low
    } else {
        ip4
    };
    let key = ConnKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip,
        port: ctx.local_port(),
    };
    if CONNS.insert(&key, &dst, 0).is_err() {
        count(Counter::OutboundConnsFull);
    }
    1
}
