//! What TLS runs over: the TCP connection behind a read buffer that exists only while
//! bytes are flowing.
//!
//! rustls asks its transport for at most 4 KiB at a time; straight from the socket
//! that is one `recv` per 4 KiB of tunnel traffic. A `BufReader` fixes that but keeps
//! its buffer for the connection's life, idle or not: 64 KiB per HBONE connection, for
//! every peer node and identity pair a ztunnel talks to. Here a read fills up to
//! [`READ_BUFFER`] bytes at a time, and the buffer is given back whenever the socket
//! has nothing more to read and everything buffered has been handed out.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::BufMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Bytes read from the socket per `recv` at most.
pub const READ_BUFFER: usize = 64 * 1024;

/// A TCP connection with a read buffer held only while there are bytes to hand out.
#[derive(Debug)]
pub struct Transport {
    tcp: TcpStream,
    /// Bytes read and not handed out yet are `buf[start..]`; empty capacity when idle.
    buf: Vec<u8>,
    start: usize,
}

impl Transport {
    pub fn new(tcp: TcpStream) -> Self {
        Transport {
            tcp,
            buf: Vec::new(),
            start: 0,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes of buffer held right now (0 when idle).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Fills the (empty) buffer from the socket; gives the buffer back and waits if
    /// the socket has nothing to read. (Through `poll_read`, which takes a short read
    /// as proof that the socket is drained: no extra `recv` to see `EAGAIN`.)
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.buf.clear();
        self.start = 0;
        if self.tcp.poll_read_ready(cx).is_pending() {
            // Idle: hold no buffer while waiting.
            self.buf = Vec::new();
            return Poll::Pending;
        }
        self.buf.reserve_exact(READ_BUFFER);
        let limited = &mut (&mut self.buf).limit(READ_BUFFER);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, limited) {
            Poll::Ready(read) => Poll::Ready(read.map(drop)),
            Poll::Pending => {
                self.buf = Vec::new();
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.buf.len() {
            if out.remaining() >= READ_BUFFER {
                // A read this large needs no buffer of ours.
                this.buf = Vec::new();
                this.start = 0;
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            ready!(this.poll_fill(cx))?;
        }
        let buffered = &this.buf[this.start..];
        let n = buffered.len().min(out.remaining());
        out.put_slice(&buffered[..n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (Transport, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            Transport::new(client.expect("connect")),
            accepted.expect("accept").0,
        )
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_fill_and_the_buffer_goes_when_drained() {
        let (mut transport, mut peer) = pair().await;
        assert_eq!(transport.buffer_capacity(), 0, "no buffer before any bytes");
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.expect("write");
        let mut got = vec![0u8; sent.len()];
        let mut small = [0u8; 4096];
        let mut filled = 0;
        while filled < sent.len() {
            let n = transport.read(&mut small).await.expect("read");
            assert!(n > 0, "early EOF");
            got[filled..filled + n].copy_from_slice(&small[..n]);
            filled += n;
        }
        assert!(got == sent, "bytes differ");
        // Nothing more to read: waiting gives the buffer back.
        let wait = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            transport.read(&mut small),
        )
        .await;
        assert!(wait.is_err(), "no bytes yet");
        assert_eq!(transport.buffer_capacity(), 0, "idle holds no buffer");
        // And reading resumes, through to EOF.
        peer.write_all(b"more").await.expect("write");
        drop(peer);
        let mut rest = Vec::new();
        transport.read_to_end(&mut rest).await.expect("read to EOF");
        assert_eq!(rest, b"more");
    }

    #[tokio::test]
    async fn writes_go_straight_to_the_socket() {
        let (mut transport, mut peer) = pair().await;
        transport
            .write_all_buf(&mut bytes::Buf::chain(&b"hello"[..], &b" there"[..]))
            .await
            .expect("write");
        transport.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello there");
    }
}
