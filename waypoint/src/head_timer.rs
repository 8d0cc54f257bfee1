//! Two timers for a downstream HTTP/1 connection: a request head that arrives too
//! slowly, and a keep-alive connection idle too long.
//!
//! hyper has one timer for both. Its `header_read_timeout` starts when it begins
//! reading a head, and on a keep-alive connection that is as soon as the previous
//! response is written, so a 10 s slowloris bound also closes every connection idle
//! for 10 s. Clients keep idle connections far longer (hyper and Go 90 s, OkHttp
//! 5 min) and reuse them; closing them under the client races its next request,
//! which then fails. Envoy (Istio's waypoint) separates the two, with an idle
//! timeout of an hour.
//!
//! Here the timer hyper asks for is ours: armed when hyper starts waiting for a head,
//! it allows `idle` while no byte arrives, and `head` from the first byte on. The
//! connection's I/O counts the bytes read ([`Counted`]), which is how the timer
//! tells the two apart. hyper's HTTP/1 server uses its timer for the head only.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes read from the client so far, shared by its I/O and its timer.
#[derive(Debug, Default)]
struct Activity {
    read: AtomicU64,
}

/// The client's I/O, counting what it reads.
pub struct Counted<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO> Counted<IO> {
    pub fn into_inner(self) -> IO {
        self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

/// The timer to give hyper for one connection (see the module docs).
#[derive(Clone, Debug)]
pub struct HeadTimer {
    activity: Arc<Activity>,
    idle: Duration,
    head: Duration,
}

impl HeadTimer {
    /// The timer and the counted I/O of one connection.
    pub fn wrap<IO>(io: IO, idle: Duration, head: Duration) -> (Counted<IO>, HeadTimer) {
        let activity = Arc::new(Activity::default());
        let timer = HeadTimer {
            activity: activity.clone(),
            idle,
            head,
        };
        (
            Counted {
                inner: io,
                activity,
            },
            timer,
        )
    }

    fn arm(&self) -> HeadSleep {
        let idle_deadline = Instant::now() + self.idle;
        HeadSleep {
            activity: self.activity.clone(),
            read_when_armed: self.activity.read.load(Ordering::Relaxed),
            head: self.head,
            head_started: false,
            sleep: Box::pin(tokio::time::sleep_until(idle_deadline)),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, _duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.arm())
    }

    /// hyper's deadline is now + its header timeout; ours depends on whether bytes
    /// come, so it is ignored.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.arm())
    }
}

/// Fires `idle` after arming if no byte came, else `head` after the first byte.
struct HeadSleep {
    activity: Arc<Activity>,
    read_when_armed: u64,
    head: Duration,
    head_started: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls its timer each time a read leaves the head incomplete, so the
        // first poll after bytes arrive is (close to) the head's start.
        if !self.head_started && self.activity.read.load(Ordering::Relaxed) != self.read_when_armed
        {
            self.head_started = true;
            let head_deadline = Instant::now() + self.head;
            if head_deadline < self.sleep.deadline() {
                self.sleep.as_mut().reset(head_deadline);
            }
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn idle_until_the_first_byte_then_the_head_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let (mut io, timer) =
            HeadTimer::wrap(server, Duration::from_secs(60), Duration::from_secs(10));
        let start = Instant::now();
        let mut sleep = timer.sleep_until(std::time::Instant::now());
        // No byte for 30 s: still waiting (idle allows 60).
        tokio::select! {
            _ = &mut sleep => panic!("fired while idle"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        client.write_all(b"GE").await.expect("write");
        let mut buf = [0u8; 8];
        tokio::io::AsyncReadExt::read(&mut io, &mut buf)
            .await
            .expect("read");
        // From the first byte, ten seconds for the head.
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_after_the_idle_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let (_io, timer) =
            HeadTimer::wrap(server, Duration::from_secs(60), Duration::from_secs(10));
        let start = Instant::now();
        timer.sleep(Duration::from_secs(10)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }
}
