//! In-pod capture: ztunnel's side of docs/capture.md.
//!
//! For every pod the CNI plugin recorded on this node, [`InPod::reconcile`] makes the
//! kernel state match the config: a pod whose workload is in the mesh (HBONE) is
//! enrolled, one the config no longer lists is released (after the first config only:
//! without config nothing is released, so nothing fails open). An enrolled pod whose
//! workload is known and whose certificate is issued is *adopted*: ztunnel opens three
//! listeners inside the pod's network namespace and serves them until the pod leaves:
//!
//! - `127.0.0.1:15001`: connections the pod's `connect()` hooks redirected; the
//!   original destination comes from the programs' connection map.
//! - `0.0.0.0:15006` (plaintext) and `0.0.0.0:15008` (HBONE): registered with the
//!   pod's `sk_lookup` program, which steers every inbound connection to them; the
//!   accepted socket's local address is the original destination.
//!
//! Outgoing sockets for an adopted pod (HBONE to peers, passthrough, the connection to
//! the application) are made inside the pod's namespace too, so the pod's IP is the
//! address on the wire.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cairn_api::model::TunnelProtocol;
use cairn_capture::{
    Capture, CaptureError, HBONE_PORT, INBOUND_PLAINTEXT_PORT, ListenerKind, Lookups, Netns,
    OUTBOUND_PORT, PodNet, PodRecord, PodRecords,
};
use cairn_hbone::{
    H2Settings,
    dialer::{Dialer, SocketFactory},
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    SharedState,
    certs::Certificates,
    config::CaptureConfig,
    inbound::{self, HboneInbound},
    outbound::Outbound,
};

/// Pending connections per in-pod listener (the kernel default of 128 drops SYNs under
/// a connection burst).
const LISTEN_BACKLOG: u32 = 1024;

/// Sockets made inside a pod's network namespace.
#[derive(Debug)]
struct PodSockets(Netns);

impl SocketFactory for PodSockets {
    fn id(&self) -> u64 {
        self.0.cookie()
    }

    fn tcp_socket(&self, v6: bool) -> std::io::Result<TcpSocket> {
        self.0
            .run(|| {
                if v6 {
                    TcpSocket::new_v6()
                } else {
                    TcpSocket::new_v4()
                }
            })
            .map_err(std::io::Error::other)?
    }
}

/// A pod ztunnel serves: its listener tasks stop when this is dropped.
struct Adopted {
    uid: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Adopted {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

pub struct InPod {
    node: String,
    state: SharedState,
    /// Set once the first config arrived: from then on, a pod absent from config is
    /// out of the mesh.
    synced: Arc<AtomicBool>,
    certs: Arc<dyn Certificates>,
    outbound: Arc<Outbound>,
    capture: Capture,
    lookups: Arc<Lookups>,
    records: PodRecords,
    adopted: HashMap<Ipv4Addr, Adopted>,
    /// Pods and files whose failure was logged (once each until it clears).
    failing: HashSet<String>,
    /// What the last pass saw; a pass with the same inputs would change nothing.
    last_inputs: Option<Inputs>,
    /// A pod still waits (certificate) or failed: the next pass must run anyway.
    retry: bool,
}

struct Inputs {
    /// The config snapshot (swapped whole on every change; held, so its address cannot
    /// be reused by a newer one).
    state: Arc<crate::state::ProxyState>,
    /// The state directory's mtime (records are written by rename, so it moves).
    dir_mtime: Option<std::time::SystemTime>,
    synced: bool,
}

impl Inputs {
    fn same(&self, other: &Inputs) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
            && self.dir_mtime == other.dir_mtime
            && self.synced == other.synced
    }
}

impl InPod {
    /// Loads the capture programs (reusing the node's pinned maps).
    pub fn new(
        node: String,
        config: &CaptureConfig,
        state: SharedState,
        synced: Arc<AtomicBool>,
        certs: Arc<dyn Certificates>,
        outbound: Arc<Outbound>,
    ) -> Result<Self, CaptureError> {
        let capture = Capture::open(&config.pin_root)?;
        let lookups = capture.lookups();
        info!(pins = %config.pin_root.display(), pods = %config.state_dir.display(), "in-pod capture on");
        Ok(InPod {
            node,
            state,
            synced,
            certs,
            outbound,
            capture,
            lookups,
            records: PodRecords::new(config.state_dir.clone()),
            adopted: HashMap::new(),
            failing: HashSet::new(),
            last_inputs: None,
            retry: false,
        })
    }

    /// Pods with listeners, by IP.
    pub fn adopted(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self.adopted.keys().copied().collect();
        v.sort();
        v
    }

    fn fail_once(&mut self, key: String, what: &str, error: &dyn std::fmt::Display) {
        if self.failing.insert(key.clone()) {
            warn!(pod = %key, %error, "{what}");
        }
    }

    /// Brings enrollment and listeners in line with the pod records and the config.
    ///
    /// Cheap when nothing moved: skipped unless the config snapshot, the state
    /// directory or the sync flag changed, or a pod is still waiting (certificate,
    /// failure to retry). The programs' counters are exported on every pass (nine map
    /// reads).
    pub fn reconcile(&mut self) {
        self.export_counters();
        let state = self.state.load_full();
        let synced = self.synced.load(Ordering::Acquire);
        let dir_mtime = std::fs::metadata(self.records.dir())
            .and_then(|m| m.modified())
            .ok();
        let inputs = Inputs {
            state: state.clone(),
            dir_mtime,
            synced,
        };
        if !self.retry && self.last_inputs.as_ref().is_some_and(|l| l.same(&inputs)) {
            return;
        }
        self.last_inputs = Some(inputs);
        self.retry = false;
        let (records, errors) = self.records.list();
        for e in errors {
            self.fail_once(format!("record:{e}"), "unreadable pod record; skipped", &e);
        }
        let mut seen = HashSet::new();
        for record in records {
            seen.insert(record.ip);
            let key = format!("{}/{}", record.namespace, record.name);
            let workload = state
                .workload_by_ip(IpAddr::V4(record.ip))
                .filter(|w| {
                    w.node == self.node
                        && w.tunnel_protocol == TunnelProtocol::Hbone
                        // A waypoint terminates HBONE itself: never captured.
                        && !w.native_tunnel
                })
                .cloned();
            let enrolled = self.capture.is_enrolled(record.ip);
            match (&workload, synced) {
                (Some(_), _) if !enrolled => match self.capture.enroll(&PodNet::from(&record)) {
                    Ok(()) => info!(pod = %key, ip = %record.ip, "pod enrolled"),
                    Err(e) => {
                        self.retry = true;
                        self.fail_once(key, "cannot enroll pod", &e);
                        continue;
                    }
                },
                (None, true) if enrolled => {
                    self.adopted.remove(&record.ip);
                    match self.capture.release(record.ip) {
                        Ok(()) => info!(pod = %key, ip = %record.ip, "pod left the mesh; released"),
                        Err(e) => {
                            self.retry = true;
                            self.fail_once(key, "cannot release pod", &e);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let Some(workload) = workload else {
                // Not in the mesh, or no config yet (then an enrolled pod stays
                // refused until the config names it).
                self.adopted.remove(&record.ip);
                continue;
            };
            if self
                .adopted
                .get(&record.ip)
                .is_some_and(|a| a.uid == workload.uid)
            {
                continue;
            }
            // Adopted = ready to serve: without its certificate the pod could neither
            // open nor accept HBONE, so it stays refused (fail closed) until the CA
            // answers. The node proxy fetches it ahead of first use.
            if let Err(e) = self.certs.server(&workload.identity) {
                self.retry = true;
                self.fail_once(key, "pod waits for its certificate before adoption", &e);
                continue;
            }
            match self.adopt(&record, &workload.uid, &workload.identity) {
                Ok(adopted) => {
                    self.failing.remove(&key);
                    info!(pod = %key, ip = %record.ip, identity = %workload.identity, "pod adopted: listening in its network namespace");
                    self.adopted.insert(record.ip, adopted);
                }
                Err(e) => {
                    self.retry = true;
                    self.fail_once(key, "cannot adopt pod", &e);
                }
            }
        }
        // Pods deleted (their record removed): stop serving and detach.
        self.adopted.retain(|ip, _| seen.contains(ip));
        for ip in self.capture.enrolled() {
            if !seen.contains(&ip) {
                match self.capture.release(ip) {
                    Ok(()) => info!(%ip, "pod record gone; released"),
                    Err(e) => {
                        self.retry = true;
                        self.fail_once(ip.to_string(), "cannot release pod", &e);
                    }
                }
            }
        }
    }

    fn adopt(
        &mut self,
        record: &PodRecord,
        uid: &str,
        identity: &cairn_identity::SpiffeId,
    ) -> Result<Adopted, AdoptError> {
        let netns = Netns::open(&record.netns)?;
        let listen = |addr: SocketAddr| -> std::io::Result<TcpListener> {
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        };
        let any = Ipv4Addr::UNSPECIFIED;
        let (outbound, plaintext, hbone) = netns.run(|| {
            Ok::<_, std::io::Error>((
                listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?,
                listen(SocketAddr::from((any, INBOUND_PLAINTEXT_PORT)))?,
                listen(SocketAddr::from((any, HBONE_PORT)))?,
            ))
        })??;
        self.capture
            .register_listener(record.ip, ListenerKind::Hbone, &hbone)?;
        self.capture
            .register_listener(record.ip, ListenerKind::Plaintext, &plaintext)?;
        let dialer = Dialer::with_factory(Arc::new(PodSockets(netns.clone())));
        let handler = Arc::new(HboneInbound {
            state: self.state.clone(),
            workload_uid: uid.to_owned(),
            dialer: dialer.clone(),
        });
        let tasks = vec![
            tokio::spawn(inbound::serve_hbone(
                hbone,
                self.certs.clone(),
                identity.clone(),
                H2Settings::default(),
                handler,
                inbound::MAX_PENDING_HANDSHAKES,
            )),
            tokio::spawn(serve_plaintext(
                plaintext,
                self.state.clone(),
                dialer.clone(),
            )),
            tokio::spawn(serve_outbound(
                outbound,
                CapturedOutbound {
                    outbound: self.outbound.clone(),
                    state: self.state.clone(),
                    uid: uid.to_owned(),
                    lookups: self.lookups.clone(),
                    netns_cookie: netns.cookie(),
                    dialer,
                },
            )),
        ];
        Ok(Adopted {
            uid: uid.to_owned(),
            tasks,
        })
    }

    fn export_counters(&self) {
        for (counter, value) in self.lookups.counters() {
            metrics::counter!("cairn_capture_events_total", "event" => counter.name(), "drop" => if counter.is_drop() { "true" } else { "false" })
                .absolute(value);
        }
        metrics::gauge!("cairn_capture_pods", "state" => "enrolled")
            .set(self.capture.enrolled().len() as f64);
        metrics::gauge!("cairn_capture_pods", "state" => "adopted").set(self.adopted.len() as f64);
    }

    /// Stops accepting for every pod (enrollment stays: the pods' connections are
    /// refused until a ztunnel adopts them again).
    pub fn stop_listening(&mut self) {
        self.adopted.clear();
    }
}

#[derive(Debug, thiserror::Error)]
enum AdoptError {
    #[error(transparent)]
    Netns(#[from] cairn_capture::NetnsError),
    #[error("listening in the pod's network namespace: {0}")]
    Listen(#[from] std::io::Error),
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(error) => {
                // Out of descriptors, or aborted while queued: keep serving.
                warn!(listener = what, %error, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Plaintext inbound (steered by `sk_lookup`): the original destination is the
/// accepted socket's own address.
async fn serve_plaintext(listener: TcpListener, state: SharedState, dialer: Dialer) {
    loop {
        let (stream, peer) = accept(&listener, "inbound plaintext").await;
        let dst = match stream.local_addr() {
            Ok(a) => a,
            Err(error) => {
                warn!(src.addr = %peer, %error, "inbound plaintext: no local address; closing");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (state, dialer) = (state.clone(), dialer.clone());
        tokio::spawn(async move { inbound::plaintext(&state, stream, dst, &dialer).await });
    }
}

struct CapturedOutbound {
    outbound: Arc<Outbound>,
    state: SharedState,
    uid: String,
    lookups: Arc<Lookups>,
    netns_cookie: u64,
    dialer: Dialer,
}

/// Outbound (redirected by `connect4/6`): the original destination is in the
/// programs' connection map under (this namespace, the client's address). A
/// connection the programs did not redirect (a tool in the pod addressing ztunnel at
/// `127.0.0.1:15001` itself) must say where it goes with a PROXY v1 header, as on the
/// explicit entry; it still leaves with the pod's identity.
async fn serve_outbound(listener: TcpListener, ctx: CapturedOutbound) {
    let ctx = Arc::new(ctx);
    loop {
        let (mut stream, peer) = accept(&listener, "outbound").await;
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let captured = match peer {
                SocketAddr::V4(peer4) => ctx.lookups.original_destination(ctx.netns_cookie, peer4),
                SocketAddr::V6(_) => None,
            };
            let dst = match captured {
                Some(dst) => SocketAddr::V4(dst),
                None => {
                    let header = tokio::time::timeout(
                        Duration::from_secs(5),
                        crate::explicit::read_header(&mut stream),
                    )
                    .await;
                    match header {
                        Ok(Ok(dst)) => dst,
                        _ => {
                            metrics::counter!("cairn_capture_unknown_destination_total")
                                .increment(1);
                            warn!(src.addr = %peer, workload = %ctx.uid, "outbound connection with neither a recorded destination nor a PROXY header; closing");
                            return;
                        }
                    }
                }
            };
            let Some(source) = ctx.state.load().workload(&ctx.uid).cloned() else {
                warn!(workload = %ctx.uid, "captured outbound for a workload no longer in config");
                return;
            };
            // The access log and metrics report the outcome.
            let _ = ctx.outbound.proxy(&source, dst, stream, &ctx.dialer).await;
        });
    }
}
