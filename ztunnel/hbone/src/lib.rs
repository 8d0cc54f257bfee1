//! HBONE as Istio defines it: HTTP/2 CONNECT tunnels inside mutual TLS 1.3 (ALPN `h2`)
//! on port 15008, each side proving a SPIFFE identity.
//!
//! - [`tls`]: mesh TLS configs from a workload certificate and the mesh roots.
//! - [`stream`]: one CONNECT stream as `AsyncRead + AsyncWrite`, with half-close.
//! - [`client`]: opens CONNECT streams over pooled, multiplexed connections.
//! - [`server`]: accepts mTLS connections and hands each CONNECT to a handler.
//! - [`splice`]: carries bytes between a TCP connection and a CONNECT stream.
//! - [`dialer`]: where outgoing sockets are made (the proxy's or a pod's namespace).
//!
//! The ztunnel and the waypoint both build on this crate.

pub mod client;
pub mod dialer;
mod keepalive;
pub mod server;
pub mod splice;
pub mod stream;
#[cfg(feature = "test-ca")]
pub mod test_ca;
pub mod tls;

pub mod transport;

pub use transport::Transport;

fn transport(tcp: tokio::net::TcpStream) -> Transport {
    Transport::new(tcp)
}

/// Encrypted bytes rustls holds for the socket at most (its default is 64 KiB). A
/// write is taken only up to this limit minus what is still queued, so with room for
/// two of [`splice`]'s DATA frames a frame is taken whole (as full TLS records, in one
/// `writev`) whenever the socket has drained half of it. Only a connection whose
/// socket is full holds this much.
const TLS_SEND_BUFFER: usize = 2 * (splice::READ_CHUNK + 9);

fn tune_tls<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// The HBONE port.
pub const PORT: u16 = 15008;

/// HTTP/2 settings shared by both sides, sized for throughput: large windows so one
/// stream can fill a fast link, bounded header lists against abuse.
#[derive(Clone, Copy, Debug)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    /// Concurrent CONNECT streams a server accepts per connection.
    pub max_concurrent_streams: u32,
    /// A PING is sent this often on every HBONE connection...
    pub keepalive_interval: std::time::Duration,
    /// ...and the connection is closed if the answer takes longer than this: a peer
    /// that vanished (host down, path black-holed) does not hold streams forever.
    pub keepalive_timeout: std::time::Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 1024 * 1024,
            connection_window: 4 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 100,
            keepalive_interval: std::time::Duration::from_secs(10),
            keepalive_timeout: std::time::Duration::from_secs(20),
        }
    }
}
