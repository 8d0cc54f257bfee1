//! The layout contract between the capture programs (`cairn-capture-ebpf`, kernel side)
//! and their loader (`cairn-capture`, userspace). Every map key and value is `repr(C)`
//! with explicit padding, so both sides agree byte for byte.
//!
//! Byte order: IPv4 addresses are stored as the kernel hands them to the programs
//! (network order in a `u32`); ports are host order.
#![no_std]

/// ztunnel's outbound listener inside each enrolled pod's network namespace
/// (`127.0.0.1:15001`); captured connections are rewritten to it.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's plaintext inbound listener inside the pod's network namespace.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS), Istio's port.
pub const HBONE_PORT: u16 = 15008;

/// Maps pinned under the capture pin root (`/sys/fs/bpf/cairn/maps/<NAME>`).
pub mod maps {
    /// socket cookie -> [`super::OrigDst`], written at `connect()`, moved to
    /// `CAIRN_CONNS` once the source port is known.
    pub const PENDING: &str = "CAIRN_PENDING";
    /// [`super::ConnKey`] -> [`super::OrigDst`]: what ztunnel's outbound listener looks up.
    pub const CONNS: &str = "CAIRN_CONNS";
    /// pod IPv4 -> [`super::PodConfig`]: the enrolled pods of this node.
    pub const PODS: &str = "CAIRN_PODS";
    /// [`super::ListenerKey`] -> ztunnel's listening socket for that pod.
    pub const LISTENERS: &str = "CAIRN_LISTENERS";
    /// Per-CPU event counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "CAIRN_COUNTERS";
}

/// The destination a captured connection asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4, network order.
    pub ip: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// A captured connection as ztunnel's outbound listener sees its peer: the client's
/// network namespace (its cookie) and the client's local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// IPv4, network order.
    pub ip: u32,
    /// Host order.
    pub port: u32,
}

/// Per enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// Inbound connections from this IPv4 (network order) skip ztunnel: the node's
    /// address, from which the kubelet sends health probes. 0 = none.
    pub probe_ip: u32,
    pub flags: u32,
}

/// Which of ztunnel's per-pod listeners.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Hbone = 1,
    Plaintext = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Pod IPv4, network order.
    pub pod_ip: u32,
    /// A [`ListenerKind`].
    pub kind: u32,
}

/// Every path through the programs that redirects, passes on purpose, drops or fails.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4: rewritten to ztunnel's outbound listener.
    OutboundRedirected = 0,
    /// connect4/6: left alone (loopback, not TCP).
    OutboundBypassed = 1,
    /// connect6: a non-loopback IPv6 destination refused (IPv6 capture not built; fail closed).
    OutboundIpv6Refused = 2,
    /// connect4: the pending-destination map rejected the insert: the connection is refused.
    OutboundPendingFull = 3,
    /// sock_ops: the connection map rejected the insert.
    OutboundConnsFull = 4,
    /// sk_lookup: steered to ztunnel's HBONE or plaintext listener.
    InboundSteered = 5,
    /// sk_lookup: passed (the pod itself, ztunnel's own connection to the app, a probe).
    InboundPassed = 6,
    /// sk_lookup: enrolled pod without a ztunnel listener: dropped (fail closed).
    InboundNoListener = 7,
    /// sk_lookup: the kernel refused the socket assignment: dropped.
    InboundAssignFailed = 8,
}

impl Counter {
    pub const COUNT: u32 = 9;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::OutboundRedirected,
        Counter::OutboundBypassed,
        Counter::OutboundIpv6Refused,
        Counter::OutboundPendingFull,
        Counter::OutboundConnsFull,
        Counter::InboundSteered,
        Counter::InboundPassed,
        Counter::InboundNoListener,
        Counter::InboundAssignFailed,
    ];

    /// The `event` label of `cairn_capture_events_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundRedirected => "outbound_redirected",
            Counter::OutboundBypassed => "outbound_bypassed",
            Counter::OutboundIpv6Refused => "outbound_ipv6_refused",
            Counter::OutboundPendingFull => "outbound_pending_full",
            Counter::OutboundConnsFull => "outbound_conns_full",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundPassed => "inbound_passed",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundAssignFailed => "inbound_assign_failed",
        }
    }

    /// Whether the event refuses or loses a connection (an error/drop path).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::OutboundIpv6Refused
                | Counter::OutboundPendingFull
                | Counter::OutboundConnsFull
                | Counter::InboundNoListener
                | Counter::InboundAssignFailed
        )
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all four): plain `repr(C)` structs of integers with explicit padding
    // fields, so every byte is initialised and any bit pattern is valid.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::OrigDst {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::PodConfig {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ListenerKey {}
}
