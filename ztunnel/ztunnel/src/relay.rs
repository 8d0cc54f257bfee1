//! Plain TCP to plain TCP (outbound passthrough, inbound plaintext): both directions
//! until both sides are done, each side's EOF half-closing the other.
//!
//! A direction holds a read buffer only while bytes flow: it waits for the socket to
//! be readable without one, and gives it back once a read comes up short (the socket
//! is drained). tokio's `copy_bidirectional` keeps a buffer per direction for the
//! connection's whole life, allocated and zeroed up front: at the 128 KiB that bulk
//! transfers want, 256 KiB for every idle keep-alive connection to a service outside
//! the mesh.

use std::{io, task::Poll};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Read size while bytes flow: bulk transfers move 128 KiB per `recv`.
pub const READ_CHUNK: usize = 128 * 1024;

/// Copies `a` to `b` and `b` to `a` until both directions reach EOF; returns the
/// bytes `(a to b, b to a)`. The first error ends both directions.
pub async fn relay(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    tokio::try_join!(one_way(a_read, b_write), one_way(b_read, a_write))
}

async fn one_way(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // A read that came back `None` because the task's cooperative budget ran out
        // (tokio's `poll_read` then says Pending without touching the socket) must
        // yield here: `readable()` takes no budget and would answer at once, and the
        // loop would spin without ever giving the runtime back.
        tokio::task::consume_budget().await;
        // No buffer while waiting: an idle connection holds none.
        from.as_ref().readable().await?;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        loop {
            buf.clear();
            match read_now(&mut from, &mut buf).await? {
                // Drained: the buffer goes back until the next bytes.
                None => break,
                Some(0) => {
                    to.shutdown().await?;
                    return Ok(total);
                }
                Some(n) => {
                    to.write_all(&buf).await?;
                    total += n as u64;
                }
            }
        }
    }
}

/// One read of what the socket holds now; `None` when it would block (tokio then
/// clears the socket's readiness, as it does after a short read, so the next wait
/// sleeps instead of paying a `recv` that sees EAGAIN, and no buffer is held while
/// waiting) or when the task has used up its cooperative budget.
async fn read_now(from: &mut ReadHalf<'_>, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut read = std::pin::pin!(from.read_buf(buf));
    std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r.map(Some)),
        Poll::Pending => Poll::Ready(Ok(None)),
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::relay;

    /// A connected loopback pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    /// A relay whose task runs out of its cooperative budget with bytes waiting must
    /// yield and carry on, not spin. The task spends its whole budget (128 units)
    /// before the relay starts, so the first read is refused by the budget while the
    /// socket is readable. Run on a thread of its own so that a spin fails the test
    /// instead of hanging it.
    #[test]
    fn a_relay_out_of_budget_yields_instead_of_spinning() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let moved = rt.block_on(async {
                let (mut client, mut client_side) = pair().await;
                let (mut server_side, mut server) = pair().await;
                client.write_all(&[7u8; 256 * 1024]).await.expect("preload");
                client.shutdown().await.expect("half-close");
                let reader = tokio::spawn(async move {
                    let mut all = Vec::new();
                    server.read_to_end(&mut all).await.expect("read");
                    all.len()
                });
                tokio::spawn(async move {
                    for _ in 0..128 {
                        tokio::task::consume_budget().await;
                    }
                    let _ = relay(&mut client_side, &mut server_side).await;
                });
                reader.await.expect("reader")
            });
            let _ = done.send(moved);
        });
        let moved = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the relay yields and finishes (a spin never does)");
        assert_eq!(moved, 256 * 1024);
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_each_eof_half_closes_the_other_side() {
        let (mut client, mut client_side) = pair().await;
        let (mut server_side, mut server) = pair().await;
        let relayed = tokio::spawn(async move { relay(&mut client_side, &mut server_side).await });
        // More than one read's worth up, a short answer down after the client's EOF.
        let upload: Vec<u8> = (0..700_000u32).map(|i| i as u8).collect();
        let sent = upload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("upload");
            client.shutdown().await.expect("half-close");
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.expect("answer");
            answer
        });
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, upload);
        server.write_all(b"thanks").await.expect("answer");
        server.shutdown().await.expect("close");
        assert_eq!(writer.await.expect("client"), b"thanks");
        let (up, down) = relayed.await.expect("task").expect("relay");
        assert_eq!((up, down), (700_000, 6));
    }
}
