//! Inbound: `sk_lookup` on each enrolled pod's network namespace. A TCP connection to
//! the pod's IP is handed to ztunnel's listener for that pod — port 15008 to the HBONE
//! listener, anything else to the plaintext one — before the kernel looks for the
//! application's socket. The accepted socket keeps the original destination as its
//! local address (nothing is rewritten).
//!
//! Passed through untouched: connections from the pod's own address (the pod talking to
//! itself, and ztunnel's own connection to the application, which it opens from inside
//! the pod), and from the pod's probe address (the node, where the kubelet probes from).
//! An enrolled pod without a ztunnel listener refuses everything else (fail closed).

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use cairn_capture_common::{Counter, HBONE_PORT, ListenerKey, ListenerKind};

use super::{LISTENERS, PODS, count};

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn cairn_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: context reads the verifier allows for sk_lookup.
    let (protocol, local_ip, remote_ip, local_port) = unsafe {
        (
            (*l).protocol,
            (*l).local_ip4,
            (*l).remote_ip4,
            (*l).local_port,
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // SAFETY: the value is copied out.
    let Some(pod) = (unsafe { PODS.get(&local_ip) }).copied() else {
        // Not an enrolled pod's address (loopback, or the pod left the mesh).
        return SK_PASS;
    };
    if remote_ip == local_ip || (pod.probe_ip != 0 && remote_ip == pod.probe_ip) {
        count(Counter::InboundPassed);
        return SK_PASS;
    }
    let kind = if local_port == u32::from(HBONE_PORT) {
        ListenerKind::Hbone
    } else {
        ListenerKind::Plaintext
    };
    let key = ListenerKey {
        pod_ip: local_ip,
        kind: kind as u32,
    };
    match LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(Counter::InboundSteered);
            SK_PASS
        }
        Err(e) if e == -2 => {
            // ENOENT: ztunnel has not adopted this pod (yet).
            count(Counter::InboundNoListener);
            SK_DROP
        }
        Err(_) => {
            count(Counter::InboundAssignFailed);
            SK_DROP
        }
    }
}
