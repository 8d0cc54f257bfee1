//! Loading the programs, enrolling and releasing pods, and the lookups ztunnel makes.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use cairn_capture_common::{ConnKey, Counter, ListenerKey, ListenerKind, OrigDst, PodConfig, maps};
use tracing::{debug, info};

use crate::pods::PodRecord;

/// The programs' object, built by `build.rs`.
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cairn-capture-programs"));

const CONNECT4: &str = "cairn_connect4";
const CONNECT6: &str = "cairn_connect6";
const SOCKOPS: &str = "cairn_sockops";
const SK_LOOKUP: &str = "cairn_sk_lookup";
/// Cgroup attachments are BPF links (`bpf_link_create`, kernel >= 5.7), which the
/// kernel always runs alongside every other program on the cgroup (multi-attach
/// semantics) and which reject any flag: aya's `Single` is the flag-less mode. A link
/// never replaces a program someone else attached, and cannot be replaced by one.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
const PROGRAMS: [&str; 4] = [SK_LOOKUP, CONNECT4, CONNECT6, SOCKOPS];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the capture programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the capture object has no {0}")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("program {name}: its attachment is not a BPF link: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("unpinning {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
}

/// What enrolling a pod needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub probe_ip: Option<Ipv4Addr>,
}

impl From<&PodRecord> for PodNet {
    fn from(p: &PodRecord) -> Self {
        PodNet {
            ip: p.ip,
            netns: p.netns.clone(),
            cgroup: p.cgroup.clone(),
            probe_ip: p.probe_ip,
        }
    }
}

/// A cgroup attachment as a pinnable link (it is one on kernels >= 5.7).
fn fd_link<L>(link: L, name: &'static str) -> Result<FdLink, CaptureError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// The loaded programs and the node's pinned maps. One per process (the CNI plugin,
/// ztunnel); the maps are shared through their pins.
pub struct Capture {
    ebpf: Ebpf,
    root: PathBuf,
    pods: HashMap<MapData, u32, PodConfig>,
    listeners: SockHash<MapData, ListenerKey>,
    lookups: Arc<Lookups>,
}

/// The read-only questions of the data path, shareable across tasks.
pub struct Lookups {
    conns: HashMap<MapData, ConnKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
}

impl Capture {
    /// Loads the programs, creating or reusing the maps pinned under `root/maps`.
    pub fn open(root: &Path) -> Result<Self, CaptureError> {
        crate::bpffs::ensure_mounted(root).map_err(|source| CaptureError::Bpffs {
            path: root.to_owned(),
            source,
        })?;
        for dir in [root.join("maps"), root.join("pods")] {
            std::fs::create_dir_all(&dir).map_err(|source| CaptureError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(root.join("maps"))
            .load(OBJECT)?;
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
            let loaded = match name {
                SK_LOOKUP => <&mut SkLookup>::try_from(program).and_then(|p| p.load()),
                SOCKOPS => <&mut SockOps>::try_from(program).and_then(|p| p.load()),
                _ => <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load()),
            };
            loaded.map_err(|source| CaptureError::Program { name, source })?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(CaptureError::Missing(name));
        let map_err = |name| move |source| CaptureError::Map { name, source };
        let pods = HashMap::try_from(take(maps::PODS)?).map_err(map_err(maps::PODS))?;
        let listeners =
            SockHash::try_from(take(maps::LISTENERS)?).map_err(map_err(maps::LISTENERS))?;
        let conns = HashMap::try_from(take(maps::CONNS)?).map_err(map_err(maps::CONNS))?;
        let counters =
            PerCpuArray::try_from(take(maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
        Ok(Capture {
            ebpf,
            root: root.to_owned(),
            pods,
            listeners,
            lookups: Arc::new(Lookups { conns, counters }),
        })
    }

    pub fn lookups(&self) -> Arc<Lookups> {
        self.lookups.clone()
    }

    /// bpffs refuses names with dots: `pods/10-1-2-3/`.
    fn pod_dir(&self, ip: Ipv4Addr) -> PathBuf {
        self.root
            .join("pods")
            .join(ip.to_string().replace('.', "-"))
    }

    /// Whether the node's pod map has `ip` (its traffic is captured, or refused while
    /// no ztunnel listens for it).
    pub fn is_enrolled(&self, ip: Ipv4Addr) -> bool {
        self.pods.get(&be(ip), 0).is_ok()
    }

    /// Every enrolled pod's IP.
    pub fn enrolled(&self) -> Vec<Ipv4Addr> {
        self.pods
            .keys()
            .flatten()
            .map(|k| Ipv4Addr::from(u32::from_be(k)))
            .collect()
    }

    /// Puts a pod in the mesh: marks it enrolled (from here on its inbound traffic
    /// reaches ztunnel or nothing), then attaches the programs to its network namespace
    /// and cgroup, pinning each link under `pods/<ip>/`. Idempotent: links already
    /// pinned are kept. On failure the pod is released again.
    pub fn enroll(&mut self, pod: &PodNet) -> Result<(), CaptureError> {
        let config = PodConfig {
            probe_ip: pod.probe_ip.map(be).unwrap_or(0),
            flags: 0,
        };
        self.pods
            .insert(be(pod.ip), config, 0)
            .map_err(|source| CaptureError::Map {
                name: maps::PODS,
                source,
            })?;
        if let Err(e) = self.attach(pod) {
            let _ = self.release(pod.ip);
            return Err(e);
        }
        Ok(())
    }

    fn attach(&mut self, pod: &PodNet) -> Result<(), CaptureError> {
        let dir = self.pod_dir(pod.ip);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaptureError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let netns = File::open(&pod.netns).map_err(io(&pod.netns))?;
        let cgroup = File::open(&pod.cgroup).map_err(io(&pod.cgroup))?;
        let mut attached = Vec::new();
        for name in PROGRAMS {
            let pin = dir.join(name);
            if pin.exists() {
                continue;
            }
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?;
            let prog_err = |source| CaptureError::Program { name, source };
            let link: FdLink = match name {
                SK_LOOKUP => {
                    let p = <&mut SkLookup>::try_from(program).map_err(prog_err)?;
                    let id = p.attach(&netns).map_err(prog_err)?;
                    p.take_link(id).map_err(prog_err)?.into()
                }
                SOCKOPS => {
                    let p = <&mut SockOps>::try_from(program).map_err(prog_err)?;
                    let id = p.attach(&cgroup, LINK_MODE).map_err(prog_err)?;
                    fd_link(p.take_link(id).map_err(prog_err)?, name)?
                }
                _ => {
                    let p = <&mut CgroupSockAddr>::try_from(program).map_err(prog_err)?;
                    let id = p.attach(&cgroup, LINK_MODE).map_err(prog_err)?;
                    fd_link(p.take_link(id).map_err(prog_err)?, name)?
                }
            };
            link.pin(&pin).map_err(|source| CaptureError::Pin {
                path: pin.clone(),
                source,
            })?;
            attached.push(name);
        }
        if attached.is_empty() {
            debug!(pod = %pod.ip, "capture already attached");
        } else {
            info!(pod = %pod.ip, programs = ?attached, "capture attached");
        }
        Ok(())
    }

    /// Takes a pod out of the mesh: forgets it in the pod map and detaches its links.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<(), CaptureError> {
        let _ = self.pods.remove(&be(ip));
        for kind in [ListenerKind::Hbone, ListenerKind::Plaintext] {
            let _ = self.listeners.remove(&ListenerKey {
                pod_ip: be(ip),
                kind: kind as u32,
            });
        }
        let dir = self.pod_dir(ip);
        for name in PROGRAMS {
            let pin = dir.join(name);
            if !pin.exists() {
                continue;
            }
            let link = PinnedLink::from_pin(&pin).map_err(|source| CaptureError::Unpin {
                path: pin.clone(),
                source,
            })?;
            // Unpinned and dropped: the last reference, so the kernel detaches it.
            drop(link.unpin().map_err(|source| CaptureError::Io {
                path: pin.clone(),
                source,
            })?);
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CaptureError::Io { path: dir, source }),
        }
        info!(pod = %ip, "capture released");
        Ok(())
    }

    /// Hands a listening socket of ztunnel's (inside the pod's network namespace) to
    /// the pod's `sk_lookup` program. The entry goes away when the socket closes.
    pub fn register_listener(
        &mut self,
        ip: Ipv4Addr,
        kind: ListenerKind,
        socket: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let key = ListenerKey {
            pod_ip: be(ip),
            kind: kind as u32,
        };
        self.listeners
            .insert(key, socket.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map {
                name: maps::LISTENERS,
                source,
            })
    }
}

impl Lookups {
    /// The destination a captured connection asked for, by the network namespace of
    /// ztunnel's outbound listener and the client's address as the listener sees it.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        peer: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        let key = ConnKey {
            netns_cookie,
            ip: be(*peer.ip()),
            port: u32::from(peer.port()),
        };
        let dst = self.conns.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(dst.ip)),
            dst.port,
        ))
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let sum = self
                    .counters
                    .get(&(c as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (c, sum)
            })
            .collect()
    }
}
