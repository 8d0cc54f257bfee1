//! What a client connection speaks, from its first bytes: HTTP/2 with prior knowledge
//! (the connection preface), HTTP/1.x (a request line starting with a known method),
//! or anything else (opaque TCP, passed through). Client-first protocols say so at
//! once; a client that sends nothing within the sniff timeout (a server-first
//! protocol such as MySQL or SMTP) is opaque.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Bytes the longest decision needs (the HTTP/2 preface).
pub const SNIFF_BYTES: usize = H2_PREFACE.len();

/// The protocol `prefix` starts, or `None` while more bytes could still decide.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let could_be = |token: &[u8]| {
        let n = prefix.len().min(token.len());
        prefix[..n] == token[..n]
    };
    if prefix.len() >= H2_PREFACE.len() && prefix.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if METHODS.iter().any(|m| prefix.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    let undecided = prefix.len() < H2_PREFACE.len() && could_be(H2_PREFACE)
        || METHODS
            .iter()
            .any(|m| prefix.len() < m.len() && could_be(m));
    (!undecided).then_some(Protocol::Opaque)
}

/// Reads until the protocol is known, the peer half-closes, or `timeout` passes
/// (then: opaque). Returns the protocol and the bytes read, which belong to the
/// connection and must be replayed ([`Prefixed`]).
pub async fn sniff<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(SNIFF_BYTES);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Prefixed<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn first_bytes_decide_the_protocol() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"PATCH "), Some(Protocol::Http1));
        // "P" could start the preface, POST, PUT or PATCH; "PR" only the preface.
        for undecided in [&b""[..], b"P", b"PR", b"PRI * HTTP/2", b"GE", b"OPTIONS"] {
            assert_eq!(classify(undecided), None, "{undecided:?}");
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"SSH-2.0-OpenSSH",
            b"PRI * HTTP/1.1\r\n",
            b"GET/",
            b"\0",
        ] {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
    }

    #[tokio::test]
    async fn sniffing_keeps_the_bytes_and_times_out_to_opaque() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GE").await.expect("write");
        let sniffed = tokio::spawn(async move {
            let r = sniff(&mut server, Duration::from_secs(5)).await;
            (r, server)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"T /a HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let (r, server) = sniffed.await.expect("task");
        let (proto, prefix) = r.expect("sniff");
        assert_eq!(proto, Protocol::Http1);
        let mut replay = Prefixed::new(prefix, server);
        let mut line = vec![0; 6];
        replay.read_exact(&mut line).await.expect("read");
        assert_eq!(
            &line, b"GET /a",
            "the sniffed bytes come first, then the rest"
        );

        // A server-first protocol: the client says nothing.
        let (_quiet, mut server) = tokio::io::duplex(1024);
        let (proto, prefix) = sniff(&mut server, Duration::from_millis(50))
            .await
            .expect("sniff");
        assert_eq!((proto, prefix.len()), (Protocol::Opaque, 0));
    }
}
