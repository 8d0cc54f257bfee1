//! Network namespaces: ztunnel creates each enrolled pod's sockets inside the pod's
//! namespace, so the pod's IP stays the source and destination on the wire.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open handle on a network namespace (keeps it alive while held).
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut netns = Netns {
            inner: Arc::new(Inner {
                file,
                path: path.to_owned(),
                cookie: 0,
            }),
        };
        let cookie = netns
            .run(|| {
                let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
                netns_cookie(probe.as_fd())
            })?
            .map_err(|source| NetnsError::Cookie {
                path: path.to_owned(),
                source,
            })?;
        if let Some(inner) = Arc::get_mut(&mut netns.inner) {
            inner.cookie = cookie;
        }
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The kernel's id for this namespace (`SO_NETNS_COOKIE`), the key the programs use.
    pub fn cookie(&self) -> u64 {
        self.inner.cookie
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }

    /// Runs `f` on the calling thread inside this namespace, then returns the thread to
    /// the namespace it was in. Sockets created by `f` stay in this namespace.
    ///
    /// If the thread cannot return (the kernel refusing `setns` to a namespace we hold
    /// open), the process aborts: a proxy thread left in a pod's namespace would serve
    /// other pods from the wrong place.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })?;
        setns(self.inner.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetnsError::Enter {
                path: self.inner.path.clone(),
                source,
            }
        })?;
        let out = f();
        if let Err(error) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(%error, "cannot return a thread to its network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.inner.cookie == other.inner.cookie
    }
}

impl Eq for Netns {}

impl std::hash::Hash for Netns {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.cookie.hash(state);
    }
}

/// `SO_NETNS_COOKIE` of a socket: the id of the network namespace it lives in.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; the kernel
    // writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
