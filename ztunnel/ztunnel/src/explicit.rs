//! The explicit-addressing outbound entry, until traffic capture exists: a client in a
//! local workload connects to `<its pod ip>:15001` and starts the connection with a
//! PROXY protocol v1 line naming the original destination
//! (`PROXY TCP4 <src> <dst> <sport> <dport>\r\n`). The outbound proxy then treats the
//! rest of the connection exactly as a captured one. The source workload is the one
//! owning the listener's address, never what the header claims.

use std::{net::SocketAddr, sync::Arc};

use cairn_hbone::dialer::Dialer;

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};
use tracing::warn;

use crate::{SharedState, outbound::Outbound};

/// The port of the explicit outbound entry.
pub const PORT: u16 = 15001;
/// The longest v1 header the PROXY protocol allows.
const MAX_HEADER: usize = 107;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("connection closed before the PROXY header ended")]
    Truncated,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("not a PROXY v1 TCP header: {0:?}")]
    Malformed(String),
}

/// Parses `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>` (without the CRLF).
pub fn parse_v1(line: &str) -> Result<(SocketAddr, SocketAddr), HeaderError> {
    let bad = || HeaderError::Malformed(line.to_owned());
    let parts: Vec<&str> = line.split(' ').collect();
    let ["PROXY", "TCP4" | "TCP6", src, dst, sport, dport] = parts.as_slice() else {
        return Err(bad());
    };
    let src = SocketAddr::new(
        src.parse().map_err(|_| bad())?,
        sport.parse().map_err(|_| bad())?,
    );
    let dst = SocketAddr::new(
        dst.parse().map_err(|_| bad())?,
        dport.parse().map_err(|_| bad())?,
    );
    Ok((src, dst))
}

/// Reads the header and nothing after it. Senders write the header in one segment
/// (the PROXY protocol asks them to), so it is normally found with one `peek` and
/// taken with one read; a header split across segments is read byte by byte.
pub async fn read_header(s: &mut TcpStream) -> Result<SocketAddr, HeaderError> {
    let mut peeked = [0u8; MAX_HEADER + 2];
    let n = s
        .peek(&mut peeked)
        .await
        .map_err(|_| HeaderError::Truncated)?;
    if n == 0 {
        return Err(HeaderError::Truncated);
    }
    if let Some(end) = peeked[..n].windows(2).position(|w| w == b"\r\n") {
        let mut line = vec![0u8; end + 2];
        s.read_exact(&mut line)
            .await
            .map_err(|_| HeaderError::Truncated)?;
        line.truncate(end);
        let line = String::from_utf8(line).map_err(|e| HeaderError::Malformed(e.to_string()))?;
        return parse_v1(&line).map(|(_, dst)| dst);
    }
    read_header_slowly(s).await
}

async fn read_header_slowly(s: &mut TcpStream) -> Result<SocketAddr, HeaderError> {
    let mut buf = Vec::with_capacity(MAX_HEADER);
    loop {
        let b = s.read_u8().await.map_err(|_| HeaderError::Truncated)?;
        if b == b'\n' && buf.last() == Some(&b'\r') {
            buf.pop();
            let line = String::from_utf8(buf).map_err(|e| HeaderError::Malformed(e.to_string()))?;
            return parse_v1(&line).map(|(_, dst)| dst);
        }
        if buf.len() >= MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
        buf.push(b);
    }
}

/// Serves the explicit outbound entry of one local workload.
pub async fn serve(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    state: SharedState,
    workload_uid: String,
) {
    loop {
        let (mut s, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Transient (out of descriptors, aborted while queued): keep serving.
                warn!(error = %e, "explicit outbound accept failed; retrying in 100ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let (ob, state, uid) = (outbound.clone(), state.clone(), workload_uid.clone());
        tokio::spawn(async move {
            let header =
                tokio::time::timeout(std::time::Duration::from_secs(5), read_header(&mut s)).await;
            let dst = match header {
                Ok(Ok(dst)) => dst,
                Ok(Err(e)) => {
                    warn!(src.addr = %peer, error = %e, "explicit outbound: bad PROXY header");
                    return;
                }
                Err(_) => {
                    warn!(src.addr = %peer, "explicit outbound: no PROXY header within 5s");
                    return;
                }
            };
            let Some(source) = state.load().workload(&uid).cloned() else {
                warn!(workload = %uid, "explicit outbound for a workload no longer in config");
                return;
            };
            // Errors are logged by the proxy's access log.
            let _ = ob.proxy(&source, dst, s, &Dialer::host()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on loopback: (what the client writes to, what the proxy reads).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_whole_or_split() {
        use tokio::io::AsyncWriteExt;
        let dst: SocketAddr = "10.96.0.12:9080".parse().expect("addr");
        // Whole header and payload in one segment: the payload stays unread.
        let (mut c, mut s) = pair().await;
        c.write_all(b"PROXY TCP4 10.0.0.1 10.96.0.12 40000 9080\r\nhello")
            .await
            .expect("write");
        assert_eq!(read_header(&mut s).await, Ok(dst));
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.expect("payload");
        assert_eq!(&rest, b"hello");
        // Split across segments: still read, still nothing beyond it.
        let (mut c, mut s) = pair().await;
        let writer = tokio::spawn(async move {
            c.write_all(b"PROXY TCP4 10.0.0.1 ").await.expect("write");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.write_all(b"10.96.0.12 40000 9080\r\nhi")
                .await
                .expect("write");
            c
        });
        assert_eq!(read_header(&mut s).await, Ok(dst));
        let mut rest = [0u8; 2];
        s.read_exact(&mut rest).await.expect("payload");
        assert_eq!(&rest, b"hi");
        drop(writer.await);
        // Endless garbage is cut off at the limit; an early close is reported.
        let (mut c, mut s) = pair().await;
        c.write_all(&[b'A'; 300]).await.expect("write");
        assert_eq!(read_header(&mut s).await, Err(HeaderError::TooLong));
        let (c, mut s) = pair().await;
        drop(c);
        assert_eq!(read_header(&mut s).await, Err(HeaderError::Truncated));
    }

    #[test]
    fn parses_v1_headers() {
        assert_eq!(
            parse_v1("PROXY TCP4 10.0.0.1 10.96.0.12 40000 9080"),
            Ok((
                "10.0.0.1:40000".parse().expect("a"),
                "10.96.0.12:9080".parse().expect("a")
            ))
        );
        assert!(parse_v1("PROXY TCP6 ::1 ::2 1 2").is_ok());
        for bad in [
            "PROXY UNKNOWN",
            "GET / HTTP/1.1",
            "PROXY TCP4 a b 1 2",
            "PROXY TCP4 1.1.1.1 2.2.2.2 1 99999",
        ] {
            assert!(parse_v1(bad).is_err(), "{bad}");
        }
    }
}
