//! Splicing a TCP connection and a CONNECT stream without copying through an
//! intermediate buffer.
//!
//! `tokio::io::copy_bidirectional` over [`H2Stream`]'s `AsyncRead`/`AsyncWrite` copies
//! every byte twice more than needed: once from the copy buffer into a fresh `Bytes`
//! for h2, and once from h2's `Bytes` into the copy buffer on the way out. Here bytes
//! read from TCP are frozen and handed to h2 as they are, and DATA payloads from h2
//! are written to TCP as they are (the frames already received together, in one
//! `writev`). Per direction, at most one read chunk, one write batch and h2's
//! flow-control windows are in flight, so memory stays bounded.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io::{self, IoSlice},
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::{
    client::{ClientError, EarlyTunnel, answer},
    stream::{H2Stream, to_io},
};

/// Plaintext per TLS record (the TLS 1.3 maximum).
const RECORD: usize = 16 * 1024;

/// Bytes read from TCP per syscall at most, and so the largest DATA frame we send:
/// with its 9-byte frame header, exactly eight full TLS records, so a frame goes out
/// as full records in one `writev` (a 64 KiB payload used to need a fifth, 9-byte
/// record and a second `writev`, i.e. a 31-byte TCP segment, per frame). See
/// [`crate::TLS_SEND_BUFFER`].
pub(crate) const READ_CHUNK: usize = 8 * RECORD - 9;

/// DATA frames already received are written to TCP together, up to this many bytes
/// (or [`WRITE_FRAMES`] frames) per `writev`.
const WRITE_BATCH: usize = 256 * 1024;
const WRITE_FRAMES: usize = 32;

/// Carries bytes both ways between `tcp` and `tunnel` until both directions are done.
/// An EOF on either side half-closes the other (FIN <-> END_STREAM); an error on
/// either side ends both (the tunnel is reset when dropped). Returns
/// `(tcp -> tunnel, tunnel -> tcp)` byte counts.
pub async fn splice(tcp: &mut TcpStream, tunnel: H2Stream) -> io::Result<(u64, u64)> {
    let parts = tunnel.into_parts();
    let _guard = parts.guard;
    let (read, write) = tcp.split();
    let up = async {
        tcp_to_tunnel(read, parts.send, parts.write_closed)
            .await
            .map_err(UpError::into_io)
    };
    tokio::try_join!(up, tunnel_to_tcp(parts.recv, parts.pending, write))
}

/// Why [`splice_early`] ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The CONNECT was refused, timed out or failed: nothing reached the destination.
    #[error(transparent)]
    Tunnel(#[from] ClientError),
    /// The tunnel was up; copying failed (a reset, a closed socket).
    #[error("copying: {0}")]
    Io(#[from] io::Error),
}

/// [`splice`] for a CONNECT whose answer has not arrived yet: bytes from `tcp` go out
/// at once (the peer holds them until it accepts), bytes back start after the 200.
/// A refusal is reported as [`SpliceError::Tunnel`], as [`Client::connect`] would.
pub async fn splice_early(
    tcp: &mut TcpStream,
    tunnel: EarlyTunnel,
) -> Result<(u64, u64), SpliceError> {
    let EarlyTunnel {
        send,
        response,
        guard: _guard,
        addr,
        authority,
        timeout,
    } = tunnel;
    let (read, write) = tcp.split();
    let down = async {
        let recv = answer(response, addr, authority, timeout).await?;
        Ok::<_, SpliceError>(tunnel_to_tcp(recv, Bytes::new(), write).await?)
    };
    let up = tcp_to_tunnel(read, send, false);
    tokio::pin!(up, down);
    let (mut sent, mut received) = (None, None);
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut up, if sent.is_none() => match r {
                Ok(n) => sent = Some(n),
                Err(UpError::Tcp(e)) => return Err(SpliceError::Io(e)),
                // h2 refused the bytes (the peer reset the stream): its answer, if any,
                // says why (a 403 is a policy refusal, not a copy error).
                Err(UpError::Tunnel(e)) => {
                    if received.is_some() {
                        return Err(SpliceError::Io(e));
                    }
                    return Err(match (&mut down).await {
                        Err(why) => why,
                        Ok(_) => SpliceError::Io(e),
                    });
                }
            },
            r = &mut down, if received.is_none() => received = Some(r?),
        }
    }
    Ok((sent.unwrap_or(0), received.unwrap_or(0)))
}

/// Which side of [`tcp_to_tunnel`] failed.
enum UpError {
    Tcp(io::Error),
    Tunnel(io::Error),
}

impl UpError {
    fn into_io(self) -> io::Error {
        match self {
            UpError::Tcp(e) | UpError::Tunnel(e) => e,
        }
    }
}

/// Whether the peer reset the stream with NO_ERROR: it has said all it will and
/// reads no more (RFC 9113 §8.1: an answer complete before the request ended). h2
/// does this when a server drops a stream it already half-closed. Our direction is
/// then over, not failed: what the peer sent still reaches the client, and the close
/// is orderly. (After a reset h2 refuses our frames with a local "inactive stream"
/// error; the peer's reason is on the stream.)
fn peer_finished(e: &h2::Error, send: &mut SendStream<Bytes>) -> bool {
    if e.is_reset() && e.is_remote() {
        return e.reason() == Some(h2::Reason::NO_ERROR);
    }
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        send.poll_reset(&mut cx),
        Poll::Ready(Ok(h2::Reason::NO_ERROR))
    )
}

async fn tcp_to_tunnel(
    mut tcp: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    write_closed: bool,
) -> Result<u64, UpError> {
    if write_closed {
        return Ok(0);
    }
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    let ended = |e: h2::Error, send: &mut SendStream<Bytes>, total: u64| {
        if peer_finished(&e, send) {
            Ok(total)
        } else {
            Err(UpError::Tunnel(to_io(e)))
        }
    };
    loop {
        // Wait for bytes before taking a buffer: an idle connection holds none.
        tcp.as_ref().readable().await.map_err(UpError::Tcp)?;
        // Reclaims the previous allocation when h2 has already written it out.
        buf.reserve(READ_CHUNK);
        // `read_buf` (not `try_read_buf`): tokio takes a short read as proof that the
        // socket is drained, saving a `recv` that would only see `EAGAIN`.
        let n = tcp
            .read_buf(&mut (&mut buf).limit(READ_CHUNK))
            .await
            .map_err(UpError::Tcp)?;
        if n == 0 {
            return match send.send_data(Bytes::new(), true) {
                Ok(()) => Ok(total),
                Err(e) => ended(e, &mut send, total),
            };
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => n,
                Some(Err(e)) => return ended(e, &mut send, total),
                None => {
                    return Err(UpError::Tunnel(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel closed by peer",
                    )));
                }
            };
            let chunk = data.split_to(granted.min(data.len()));
            let len = chunk.len() as u64;
            if let Err(e) = send.send_data(chunk, false) {
                return ended(e, &mut send, total);
            }
            total += len;
        }
    }
}

async fn tunnel_to_tcp(
    mut recv: RecvStream,
    pending: Bytes,
    mut tcp: WriteHalf<'_>,
) -> io::Result<u64> {
    tcp.write_all(&pending).await?;
    let mut total = pending.len() as u64;
    let mut batch = VecDeque::with_capacity(WRITE_FRAMES);
    loop {
        let received = next_batch(&mut recv, &mut batch).await;
        // What arrived before an error or the end still goes out, in order.
        total += write_all_frames(&mut tcp, &mut batch).await?;
        if received? == Received::End {
            break;
        }
    }
    tcp.shutdown().await?;
    Ok(total)
}

#[derive(PartialEq)]
enum Received {
    More,
    End,
}

/// Waits for one DATA frame, then takes the frames already received without waiting,
/// up to [`WRITE_BATCH`] bytes or [`WRITE_FRAMES`] frames.
async fn next_batch(recv: &mut RecvStream, batch: &mut VecDeque<Bytes>) -> io::Result<Received> {
    let mut bytes = 0;
    while bytes < WRITE_BATCH && batch.len() < WRITE_FRAMES {
        let next = if batch.is_empty() {
            poll_fn(|cx| recv.poll_data(cx)).await
        } else {
            match poll_fn(|cx| Poll::Ready(recv.poll_data(cx))).await {
                Poll::Ready(next) => next,
                Poll::Pending => break,
            }
        };
        let Some(data) = next else {
            return Ok(Received::End);
        };
        let data = data.map_err(to_io)?;
        // The window comes back once the bytes are ours; writing them is bounded by
        // one batch.
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(to_io)?;
        if !data.is_empty() {
            bytes += data.len();
            batch.push_back(data);
        }
    }
    Ok(Received::More)
}

/// Writes `frames` out with vectored writes, emptying it; returns the bytes written.
async fn write_all_frames(
    tcp: &mut WriteHalf<'_>,
    frames: &mut VecDeque<Bytes>,
) -> io::Result<u64> {
    let mut written = 0;
    while !frames.is_empty() {
        let mut n = {
            let mut slices = [IoSlice::new(&[]); WRITE_FRAMES];
            let count = frames.len().min(WRITE_FRAMES);
            for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
                *slice = IoSlice::new(frame);
            }
            tcp.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n as u64;
        while let Some(front) = frames.front_mut() {
            if n < front.len() {
                front.advance(n);
                break;
            }
            n -= front.len();
            frames.pop_front();
        }
    }
    Ok(written)
}
