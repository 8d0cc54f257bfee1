//! HTTP/2 PING keepalive: detects a peer that stopped answering without closing.

use h2::{Ping, PingPong};

use crate::H2Settings;

/// Pings every `settings.keepalive_interval`; returns (the reason) once a PING goes
/// unanswered for `settings.keepalive_timeout` or the connection can no longer carry
/// one. `ping` is the connection's `ping_pong()` (`None` if already taken: then it
/// never returns). Run it alongside the connection and drop the connection when it
/// returns.
pub(crate) async fn unresponsive(ping: Option<PingPong>, settings: H2Settings) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no PING answer within {timeout:?}"),
        }
    }
}
