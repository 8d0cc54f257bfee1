//! Plain TCP relays (outbound passthrough, inbound plaintext) hold read buffers only
//! while bytes flow: an idle keep-alive connection costs its task and sockets, not
//! 2 x 128 KiB. Checked by the bytes this process holds (a counting allocator: this
//! test binary's only test).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use cairn_ztunnel::relay::{READ_CHUNK, relay};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Bytes allocated and not yet freed, over the whole process.
static HELD: AtomicIsize = AtomicIsize::new(0);

struct Held;

// SAFETY: allocation and release go to the system allocator as asked; the only
// addition is a counter of sizes. (A global allocator needs `unsafe`; it exists only
// in this test binary.)
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Held {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated above with the same layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Held = Held;

const CONNECTIONS: usize = 50;

#[tokio::test]
async fn idle_relayed_connections_hold_no_read_buffers() {
    let apps = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app_addr = apps.local_addr().expect("addr");
    let entry = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let entry_addr = entry.local_addr().expect("addr");
    // The application echoes; the relay sits between the clients and it.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = apps.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 || s.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut client_side, _)) = entry.accept().await {
            tokio::spawn(async move {
                let mut app_side = TcpStream::connect(app_addr).await.expect("app");
                let _ = relay(&mut client_side, &mut app_side).await;
            });
        }
    });

    let before = HELD.load(Ordering::Relaxed);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = TcpStream::connect(entry_addr).await.expect("connect");
        // One exchange, so both directions have read and gone idle again.
        c.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"ping");
        clients.push(c);
    }
    tokio::task::yield_now().await;
    let per_connection = (HELD.load(Ordering::Relaxed) - before) / CONNECTIONS as isize;
    eprintln!("{per_connection} bytes held per idle relayed connection");
    assert!(
        per_connection < (READ_CHUNK / 4) as isize,
        "an idle relayed connection holds {per_connection} bytes (one read buffer is {READ_CHUNK})"
    );
}
