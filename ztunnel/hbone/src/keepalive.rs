//! HTTP/2 PING keepalive: detects a peer that stopped answering without closing.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Pings every `interval`; returns (the reason) once a PING goes unanswered for
/// `timeout` or the connection can no longer carry one. Run it alongside the
/// connection and drop the connection when it returns.
pub(crate) async fn unresponsive(
    mut ping: PingPong,
    interval: Duration,
    timeout: Duration,
) -> String {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no PING answer within {timeout:?}"),
        }
    }
}
