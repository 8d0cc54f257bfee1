//! Where a proxy's outgoing TCP sockets are created. By default in the proxy's own
//! network namespace; with capture, in the pod's (so the pod's IP is the source on
//! the wire and NetworkPolicy keeps seeing pods, not the node).

use std::{
    fmt,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpSocket, TcpStream};

/// Makes unconnected sockets somewhere else (a pod's network namespace).
pub trait SocketFactory: Send + Sync + fmt::Debug + 'static {
    /// Identifies the place: two factories with the same id make interchangeable
    /// sockets (pooled connections may be shared between them).
    fn id(&self) -> u64;
    fn tcp_socket(&self, v6: bool) -> std::io::Result<TcpSocket>;
}

/// Connects TCP sockets from the proxy's namespace or through a [`SocketFactory`].
#[derive(Clone, Default)]
pub struct Dialer {
    factory: Option<Arc<dyn SocketFactory>>,
}

impl Dialer {
    /// The proxy's own network namespace.
    pub fn host() -> Self {
        Dialer { factory: None }
    }

    pub fn with_factory(factory: Arc<dyn SocketFactory>) -> Self {
        Dialer {
            factory: Some(factory),
        }
    }

    /// Connects to `addr`, from `source_ip` if given.
    pub async fn connect(
        &self,
        source_ip: Option<IpAddr>,
        addr: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let v6 = addr.is_ipv6();
        let socket = match &self.factory {
            None if source_ip.is_none() => return TcpStream::connect(addr).await,
            None if v6 => TcpSocket::new_v6()?,
            None => TcpSocket::new_v4()?,
            Some(f) => f.tcp_socket(v6)?,
        };
        if let Some(ip) = source_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    }

    fn id(&self) -> u64 {
        self.factory.as_ref().map_or(0, |f| f.id())
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.factory {
            None => f.write_str("Dialer(host)"),
            Some(factory) => write!(f, "Dialer({factory:?})"),
        }
    }
}

impl PartialEq for Dialer {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Dialer {}

impl Hash for Dialer {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}
