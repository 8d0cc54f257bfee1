//! Outbound: `cgroup/connect4` and `cgroup/connect6` on each enrolled pod's cgroup.
//!
//! A TCP `connect()` to anything but loopback is rewritten to ztunnel's outbound
//! listener in the same network namespace (`127.0.0.1:15001`); the original destination
//! is parked under the socket's cookie until `sock_ops` sees the source port.

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie,
    macros::cgroup_sock_addr, programs::SockAddrContext,
};
use cairn_capture_common::{Counter, OUTBOUND_PORT, OrigDst};

use super::{PENDING, count};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const LOOPBACK_TARGET: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();

fn is_loopback_or_unspecified(ip_be: u32) -> bool {
    let ip = u32::from_be(ip_be);
    ip >> 24 == 127 || ip == 0
}

/// Parks the destination and points the socket at ztunnel.
fn redirect(ctx: &SockAddrContext, addr: *mut bpf_sock_addr, ip_be: u32) -> i32 {
    // SAFETY: `addr` is the program's context; the verifier checks these accesses.
    let port = u16::from_be(unsafe { (*addr).user_port } as u16);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dst = OrigDst {
        ip: ip_be,
        port,
        _pad: 0,
    };
    if PENDING.insert(&cookie, &dst, 0).is_err() {
        count(Counter::OutboundPendingFull);
        return REFUSE;
    }
    count(Counter::OutboundRedirected);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn cairn_connect4(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: context reads/writes of fields the verifier allows for connect4.
    let (kind, ip) = unsafe { ((*addr).type_, (*addr).user_ip4) };
    if kind != SOCK_STREAM || is_loopback_or_unspecified(ip) {
        count(Counter::OutboundBypassed);
        return ALLOW;
    }
    let verdict = redirect(&ctx, addr, ip);
    if verdict == ALLOW {
        unsafe {
            (*addr).user_ip4 = LOOPBACK_TARGET;
            (*addr).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    verdict
}

/// IPv4-mapped destinations (`::ffff:a.b.c.d`, dual-stack sockets) are captured like
/// connect4; other IPv6 destinations are refused, since IPv6 capture is not built and
/// nothing may bypass ztunnel.
#[cgroup_sock_addr(connect6)]
pub fn cairn_connect6(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: as in connect4.
    let (kind, w) = unsafe {
        (
            (*addr).type_,
            [
                (*addr).user_ip6[0],
                (*addr).user_ip6[1],
                (*addr).user_ip6[2],
                (*addr).user_ip6[3],
            ],
        )
    };
    if kind != SOCK_STREAM {
        count(Counter::OutboundBypassed);
        return ALLOW;
    }
    let loopback6 = w[0] == 0 && w[1] == 0 && w[2] == 0 && u32::from_be(w[3]) == 1;
    let unspecified6 = w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0;
    if loopback6 || unspecified6 {
        count(Counter::OutboundBypassed);
        return ALLOW;
    }
    let v4_mapped = w[0] == 0 && w[1] == 0 && u32::from_be(w[2]) == 0xffff;
    if !v4_mapped {
        count(Counter::OutboundIpv6Refused);
        return REFUSE;
    }
    let ip = w[3];
    if is_loopback_or_unspecified(ip) {
        count(Counter::OutboundBypassed);
        return ALLOW;
    }
    let verdict = redirect(&ctx, addr, ip);
    if verdict == ALLOW {
        unsafe {
            (*addr).user_ip6[3] = LOOPBACK_TARGET;
            (*addr).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    verdict
}
