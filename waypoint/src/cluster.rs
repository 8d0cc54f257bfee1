//! Upstream clusters: the endpoints behind one backend (`host|subset|port`) and the
//! DestinationRule traffic policy that picks among them — load balancer, connection
//! pool limits (503 with flag `UO` on overflow), outlier detection (ejection).
//!
//! Semantics follow Envoy's (what Istio users know):
//! - `ROUND_ROBIN` cycles, `RANDOM` picks uniformly, `LEAST_REQUEST` takes the less
//!   loaded of two random endpoints (power of two choices), consistent hashing maps
//!   a header, cookie or source IP onto a ring so a key sticks to an endpoint while
//!   the endpoint set holds;
//! - pool: `http2MaxRequests` bounds requests in flight; with HTTP/1.1 each request
//!   holds a connection, so past `maxConnections` requests queue, and past
//!   `maxConnections + http1MaxPendingRequests` they overflow;
//! - outlier detection: `consecutive5xxErrors` 5xx answers (or
//!   `consecutiveGatewayErrors` 502/503/504 and connect failures) in a row eject an
//!   endpoint for `baseEjectionTime` times its multiplier, at most 300 s (Envoy's
//!   `max_ejection_time`, which Istio leaves at its default) or `baseEjectionTime` if
//!   longer; each ejection adds one to the multiplier (while that stays under the
//!   cap), each `interval` the endpoint then stays back takes one off; at most
//!   `maxEjectionPercent` of the endpoints are ejected at once, but at least one may
//!   be. An ejected endpoint gets no traffic until its ejection ends. When every
//!   endpoint is ejected, or fewer than `minHealthPercent` of them are not, all are
//!   used (Envoy's panic mode: better than failing everything).

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{
    ingress::Downstream,
    router::{Body, OpenFuture, RetrySlot, Upstream, UpstreamError, UpstreamFuture},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    ConsistentHash(HashKey),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    pub max_connections: Option<usize>,
    pub http1_max_pending_requests: Option<usize>,
    pub http2_max_requests: Option<usize>,
    /// Requests one upstream connection carries before it is closed.
    pub max_requests_per_connection: Option<usize>,
    /// Retries in flight to this cluster at once; past it a retry is not made.
    pub max_retries: Option<usize>,
}

/// A request's per-connection request cap for the transport (from its cluster's
/// `maxRequestsPerConnection`, in the request's extensions).
#[derive(Clone, Copy, Debug)]
pub struct MaxRequestsPerConnection(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Below this share (percent) of endpoints not ejected, every endpoint takes
    /// traffic (Istio's `minHealthPercent`, Envoy's panic threshold); 0: only when
    /// all are ejected.
    pub min_health_percent: u32,
    /// Each interval an endpoint stays back from an ejection takes one off its
    /// ejection-time multiplier (Envoy decrements it at each sweep).
    pub interval: Duration,
}

/// Envoy's default `max_ejection_time` (Istio does not set it): no ejection lasts
/// longer, unless `baseEjectionTime` itself does.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

impl OutlierDetection {
    /// How long an ejection lasts at `multiplier`.
    fn ejection_time(&self, multiplier: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(multiplier)
            .min(self.max_ejection_time())
    }

    fn max_ejection_time(&self) -> Duration {
        MAX_EJECTION_TIME.max(self.base_ejection_time)
    }
}

impl Default for OutlierDetection {
    /// Istio's defaults when `outlierDetection` is given.
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            interval: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicy {
    pub lb: LoadBalancer,
    pub pool: PoolLimits,
    pub outlier: Option<OutlierDetection>,
    /// `retryBudget`: retries in flight bounded by a share of the requests in flight.
    /// `None`: only `maxRetries` bounds them (Istio's default).
    pub retry_budget: Option<RetryBudget>,
    /// `connectionPool.tcp.connectTimeout`: how long opening a connection (an HBONE
    /// tunnel: TCP, TLS and CONNECT) to an endpoint may take; `None`: the
    /// transport's default.
    pub connect_timeout: Option<std::time::Duration>,
}

/// Retries in flight to a cluster at most `percent` of its requests in flight, but
/// always `min_concurrency` (Envoy's retry budget; Istio's `retryBudget`). A failing
/// service then sees at most about `1 + percent/100` times its load from retries,
/// instead of `attempts` times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: usize,
}

impl RetryBudget {
    /// Retries allowed in flight while `requests` are.
    pub fn allows(&self, requests: usize) -> usize {
        ((requests as f64 * self.percent / 100.0) as usize).max(self.min_concurrency)
    }
}

/// A request's connect timeout for the transport, from its cluster's policy (carried
/// in the request's extensions).
#[derive(Clone, Copy, Debug)]
pub struct ConnectTimeout(pub std::time::Duration);

/// Sends one request to one endpoint (plain HTTP, or HBONE as the waypoint's
/// identity).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, endpoint: SocketAddr, req: Request<Body>) -> UpstreamFuture;
    fn open(&self, endpoint: SocketAddr) -> OpenFuture;
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Envoy's ejection-time backoff: the next ejection lasts `baseEjectionTime`
    /// times this (after the decay since `back_since`, plus one).
    multiplier: u32,
    ejected_until: Option<Instant>,
    /// When the last ejection ended: the multiplier decays from there.
    back_since: Option<Instant>,
}

#[derive(Debug)]
struct Endpoint {
    addr: SocketAddr,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

impl Endpoint {
    fn ejected(&self, now: Instant) -> bool {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match h.ejected_until {
            Some(until) if until > now => true,
            Some(until) => {
                // Back from ejection with a clean slate.
                h.ejected_until = None;
                h.back_since = Some(until);
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                false
            }
            None => false,
        }
    }
}

/// One backend's endpoints and policy.
pub struct Cluster {
    name: String,
    endpoints: Vec<Arc<Endpoint>>,
    policy: TrafficPolicy,
    /// Requests in flight to the cluster (shared with the cluster this one
    /// replaced, whose requests may still be in flight).
    in_flight: Arc<AtomicUsize>,
    /// Retries in flight (for `maxRetries`).
    retrying: Arc<AtomicUsize>,
    cursor: AtomicUsize,
    rng: Mutex<StdRng>,
    /// Consistent hashing's ring over every endpoint, sorted: (point, endpoint index).
    /// Built once per cluster (a config), empty for the other load balancers.
    ring: Vec<(u64, usize)>,
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Counts a request in flight (cluster-wide and on its endpoint) until dropped.
struct InFlight {
    cluster: Arc<AtomicUsize>,
    endpoint: Arc<Endpoint>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cluster.fetch_sub(1, Ordering::AcqRel);
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

const RING_POINTS_PER_ENDPOINT: usize = 64;

impl Cluster {
    pub fn new(
        name: impl Into<String>,
        endpoints: Vec<SocketAddr>,
        policy: TrafficPolicy,
        seed: Option<u64>,
    ) -> Self {
        let ring = match policy.lb {
            LoadBalancer::ConsistentHash(_) => {
                let mut ring: Vec<(u64, usize)> = endpoints
                    .iter()
                    .enumerate()
                    .flat_map(|(i, addr)| {
                        (0..RING_POINTS_PER_ENDPOINT).map(move |p| (hash_of(&(*addr, p)), i))
                    })
                    .collect();
                ring.sort_unstable();
                ring
            }
            _ => Vec::new(),
        };
        Self {
            name: name.into(),
            ring,
            endpoints: endpoints
                .into_iter()
                .map(|addr| {
                    Arc::new(Endpoint {
                        addr,
                        in_flight: AtomicUsize::new(0),
                        health: Mutex::default(),
                    })
                })
                .collect(),
            policy,
            in_flight: Arc::default(),
            retrying: Arc::default(),
            cursor: AtomicUsize::new(0),
            rng: Mutex::new(match seed {
                Some(s) => StdRng::seed_from_u64(s),
                None => StdRng::from_os_rng(),
            }),
        }
    }

    /// Endpoints not ejected now; all of them when fewer than `minHealthPercent` are
    /// (or none is): panic mode.
    fn available(&self, now: Instant) -> Vec<&Arc<Endpoint>> {
        // Without outlier detection nothing ejects (a config change that turns it
        // off resets the health it carries over), so no endpoint's lock is taken.
        if self.policy.outlier.is_none() {
            return self.endpoints.iter().collect();
        }
        let up: Vec<_> = self.endpoints.iter().filter(|e| !e.ejected(now)).collect();
        let threshold = self
            .policy
            .outlier
            .as_ref()
            .map_or(0, |o| o.min_health_percent as usize);
        if up.is_empty() || up.len() * 100 < threshold * self.endpoints.len() {
            self.endpoints.iter().collect()
        } else {
            up
        }
    }

    fn hash_input(key: &HashKey, req: &Request<Body>) -> Option<u64> {
        match key {
            HashKey::Header(name) => req.headers().get(name).map(|v| hash_of(&v.as_bytes())),
            HashKey::Cookie(name) => req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_of(&v)),
            HashKey::SourceIp => req
                .extensions()
                .get::<Arc<Downstream>>()
                .map(|d| hash_of(&d.peer.ip())),
        }
    }

    /// The endpoint for `req` by the load balancer, among those available.
    fn pick(&self, req: &Request<Body>) -> Option<Arc<Endpoint>> {
        let up = self.available(Instant::now());
        if up.is_empty() {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let chosen = match &self.policy.lb {
            LoadBalancer::RoundRobin => up[self.cursor.fetch_add(1, Ordering::Relaxed) % up.len()],
            LoadBalancer::Random => up[rng.random_range(0..up.len())],
            LoadBalancer::LeastRequest => {
                let a = up[rng.random_range(0..up.len())];
                let b = up[rng.random_range(0..up.len())];
                if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
            LoadBalancer::ConsistentHash(key) => match Self::hash_input(key, req) {
                // Without the key (header absent), any endpoint will do.
                None => up[rng.random_range(0..up.len())],
                Some(h) => self.on_ring(h, &up),
            },
        };
        Some(chosen.clone())
    }

    /// The endpoint that owns `h` on the ring among those `up`: the first point at or
    /// after `h` (wrapping) whose endpoint is up. Skipping the points of endpoints not
    /// up gives what a ring of only those up would, without building one per request.
    fn on_ring<'a>(&'a self, h: u64, up: &[&'a Arc<Endpoint>]) -> &'a Arc<Endpoint> {
        let all_up = up.len() == self.endpoints.len();
        let start = self.ring.partition_point(|(point, _)| *point < h);
        (0..self.ring.len())
            .map(|k| &self.endpoints[self.ring[(start + k) % self.ring.len()].1])
            .find(|e| all_up || up.iter().any(|u| Arc::ptr_eq(u, e)))
            .unwrap_or(up[0])
    }

    /// The cluster's traffic policy (tests of the config conversion).
    #[cfg(test)]
    pub(crate) fn policy(&self) -> &TrafficPolicy {
        &self.policy
    }

    /// Takes over what `previous` (the same backend under the config before) knows:
    /// the endpoints both have keep their requests in flight and, unless the
    /// outlier detection settings changed, their health and ejections; the cluster
    /// keeps its requests and retries in flight and its round-robin position. So a
    /// config change (an endpoint added, a route edited) neither brings an ejected
    /// endpoint back early nor lets the pool limits be exceeded while the old
    /// config's requests finish (Envoy keeps a host's state across updates too).
    fn carry_over(&mut self, previous: &Cluster) {
        let same_outlier = self.policy.outlier == previous.policy.outlier;
        for endpoint in &mut self.endpoints {
            let Some(before) = previous.endpoints.iter().find(|e| e.addr == endpoint.addr) else {
                continue;
            };
            if !same_outlier {
                *before.health.lock().unwrap_or_else(|e| e.into_inner()) = Health::default();
            }
            *endpoint = before.clone();
        }
        self.in_flight = previous.in_flight.clone();
        self.retrying = previous.retrying.clone();
        self.cursor = AtomicUsize::new(previous.cursor.load(Ordering::Relaxed));
    }

    /// Admits one more request under the pool limits, or says it overflows.
    fn admit(&self, endpoint: Arc<Endpoint>) -> Option<InFlight> {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            cluster: self.in_flight.clone(),
            endpoint,
        };
        let pool = &self.policy.pool;
        let h1_cap = pool
            .max_connections
            .map(|c| c + pool.http1_max_pending_requests.unwrap_or(usize::MAX - c));
        let over =
            pool.http2_max_requests.is_some_and(|m| now > m) || h1_cap.is_some_and(|m| now > m);
        (!over).then_some(guard)
    }

    /// Counts an attempt's outcome against its endpoint; ejects it when it crosses
    /// a threshold and the ejection cap allows.
    fn observe(&self, endpoint: &Endpoint, outcome: Result<StatusCode, bool>) {
        let Some(od) = &self.policy.outlier else {
            return;
        };
        let now = Instant::now();
        // Ok(status), or Err(connect failure?) for no answer.
        let (is_5xx, is_gateway) = match outcome {
            Ok(s) => (s.is_server_error(), matches!(s.as_u16(), 502..=504)),
            Err(_) => (true, true),
        };
        let mut h = endpoint.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.ejected_until.is_some() {
            return;
        }
        h.consecutive_5xx = if is_5xx { h.consecutive_5xx + 1 } else { 0 };
        h.consecutive_gateway = if is_gateway {
            h.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = od
            .consecutive_5xx
            .is_some_and(|n| n > 0 && h.consecutive_5xx >= n)
            || od
                .consecutive_gateway_errors
                .is_some_and(|n| n > 0 && h.consecutive_gateway >= n);
        if !tripped {
            return;
        }
        // The others' health only when this one trips (not on every answer), and not
        // under this endpoint's lock: two endpoints tripping at once on two threads
        // would each hold one lock and wait for the other's.
        drop(h);
        let ejected_now = self
            .endpoints
            .iter()
            .filter(|e| !std::ptr::eq(e.as_ref(), endpoint) && e.ejected(now))
            .count();
        let cap = (self.endpoints.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected_now + 1 > cap {
            warn!(cluster = %self.name, endpoint = %endpoint.addr, ejected = ejected_now, "outlier not ejected: maxEjectionPercent reached");
            return;
        }
        let mut h = endpoint.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.ejected_until.is_some() {
            return;
        }
        // One off the multiplier per interval spent back since the last ejection,
        // then one on for this one (unless that would pass the cap).
        if let Some(since) = h.back_since.take() {
            let intervals =
                now.saturating_duration_since(since).as_nanos() / od.interval.as_nanos().max(1);
            h.multiplier = h
                .multiplier
                .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
        }
        if od.ejection_time(h.multiplier) < od.max_ejection_time() {
            h.multiplier += 1;
        }
        let duration = od.ejection_time(h.multiplier);
        h.ejected_until = Some(now + duration);
        info!(cluster = %self.name, endpoint = %endpoint.addr, ?duration, multiplier = h.multiplier, "outlier ejected");
    }
}

/// A body that keeps a request counted in flight until it ends or is dropped.
struct Holding {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = crate::router::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The clusters of every backend, over one transport; an [`Upstream`].
pub struct Clusters {
    clusters: HashMap<String, Arc<Cluster>>,
    transport: Arc<dyn Transport>,
}

impl Clusters {
    pub fn new(clusters: Vec<Cluster>, transport: Arc<dyn Transport>) -> Self {
        Self {
            clusters: clusters
                .into_iter()
                .map(|c| (c.name.clone(), Arc::new(c)))
                .collect(),
            transport,
        }
    }

    /// [`Clusters::new`] for a new config, taking over from `previous` (the
    /// clusters of the config it replaces) the state of every backend both have
    /// ([`Cluster::carry_over`]).
    pub fn replacing(
        clusters: Vec<Cluster>,
        transport: Arc<dyn Transport>,
        previous: &Clusters,
    ) -> Self {
        let clusters = clusters
            .into_iter()
            .map(|mut c| {
                if let Some(before) = previous.clusters.get(&c.name) {
                    c.carry_over(before);
                }
                c
            })
            .collect();
        Self::new(clusters, transport)
    }

    /// One endpoint per backend over plain HTTP, round robin, no limits (tests,
    /// benchmarks, endpoints outside the mesh).
    pub fn plain_http(endpoints: HashMap<String, SocketAddr>) -> Self {
        Self::new(
            endpoints
                .into_iter()
                .map(|(name, addr)| Cluster::new(name, vec![addr], TrafficPolicy::default(), None))
                .collect(),
            Arc::new(crate::router::HttpTransport::new(None)),
        )
    }

    /// Requests in flight per endpoint of `backend` (for tests and config dumps).
    pub fn in_flight(&self, backend: &str) -> BTreeMap<SocketAddr, usize> {
        self.clusters
            .get(backend)
            .map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| (e.addr, e.in_flight.load(Ordering::Relaxed)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Upstream for Clusters {
    fn retry_slot(&self, backend: &str) -> Option<RetrySlot> {
        let Some(cluster) = self.clusters.get(backend) else {
            return Some(RetrySlot::unlimited());
        };
        let budget = cluster
            .policy
            .retry_budget
            .map(|b| b.allows(cluster.in_flight.load(Ordering::Acquire)));
        // The tighter of `maxRetries` and the budget, when either is set.
        match cluster
            .policy
            .pool
            .max_retries
            .into_iter()
            .chain(budget)
            .min()
        {
            None => Some(RetrySlot::unlimited()),
            Some(max) => RetrySlot::counted(&cluster.retrying, max),
        }
    }

    fn send(&self, backend: &str, req: Request<Body>) -> UpstreamFuture {
        let fail = |e: UpstreamError| -> UpstreamFuture { Box::pin(async move { Err(e) }) };
        let Some(cluster) = self.clusters.get(backend).cloned() else {
            return fail(UpstreamError::NoEndpoint(backend.to_owned()));
        };
        let Some(endpoint) = cluster.pick(&req) else {
            return fail(UpstreamError::NoEndpoint(backend.to_owned()));
        };
        let Some(guard) = cluster.admit(endpoint.clone()) else {
            return fail(UpstreamError::Overflow(backend.to_owned()));
        };
        let mut req = req;
        if let Some(t) = cluster.policy.connect_timeout {
            req.extensions_mut().insert(ConnectTimeout(t));
        }
        if let Some(n) = cluster.policy.pool.max_requests_per_connection {
            req.extensions_mut().insert(MaxRequestsPerConnection(n));
        }
        let sent = self.transport.send(endpoint.addr, req);
        Box::pin(async move {
            let result = sent.await;
            let outcome = match &result {
                Ok(resp) => Ok(resp.status()),
                Err(e) => Err(matches!(e, UpstreamError::Connect { .. })),
            };
            cluster.observe(&endpoint, outcome);
            // The request stays in flight until its response body is done.
            result.map(|resp| {
                resp.map(|b| {
                    Holding {
                        inner: b,
                        _guard: guard,
                    }
                    .boxed()
                })
            })
        })
    }

    fn open(&self, backend: &str) -> OpenFuture {
        let backend = backend.to_owned();
        let picked = self.clusters.get(&backend).and_then(|c| {
            let probe = Request::new(crate::router::full(""));
            c.pick(&probe).map(|e| e.addr)
        });
        match picked {
            Some(addr) => self.transport.open(addr),
            None => Box::pin(async move { Err(UpstreamError::NoEndpoint(backend)) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(user: &str) -> Request<Body> {
        Request::get("/")
            .header("x-user", user)
            .body(crate::router::full(""))
            .expect("request")
    }

    /// `n` endpoint addresses, 10.0.0.1:8080 on.
    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    /// Ejects endpoint `i` of `c` for an hour.
    fn eject(c: &Cluster, i: usize) {
        c.endpoints[i].health.lock().expect("lock").ejected_until =
            Some(Instant::now() + Duration::from_secs(3600));
    }

    /// The ring is built once over every endpoint; with one ejected, each key goes
    /// where a ring of the others alone would send it, and keys of the endpoints
    /// still up stay where they were.
    #[test]
    fn an_ejected_endpoint_leaves_the_ring_and_only_its_keys_move() {
        let addrs = addrs(5);
        let policy = TrafficPolicy {
            lb: LoadBalancer::ConsistentHash(HashKey::Header(http::HeaderName::from_static(
                "x-user",
            ))),
            outlier: Some(OutlierDetection::default()),
            ..Default::default()
        };
        let all = Cluster::new("c", addrs.clone(), policy.clone(), Some(1));
        let before: Vec<SocketAddr> = (0..500)
            .map(|k| all.pick(&request(&k.to_string())).expect("pick").addr)
            .collect();
        let gone = addrs[2];
        eject(&all, 2);
        let others: Vec<SocketAddr> = addrs.iter().copied().filter(|a| *a != gone).collect();
        let without = Cluster::new("c", others, policy, Some(1));
        let mut moved = 0;
        for (k, was) in before.iter().enumerate() {
            let now = all.pick(&request(&k.to_string())).expect("pick").addr;
            let fresh = without.pick(&request(&k.to_string())).expect("pick").addr;
            assert_eq!(now, fresh, "key {k}");
            assert_ne!(now, gone, "key {k} went to the ejected endpoint");
            if now != *was {
                assert_eq!(*was, gone, "key {k} moved though its endpoint is up");
                moved += 1;
            }
        }
        assert!(moved > 0, "some keys were on the ejected endpoint");
    }

    #[test]
    fn below_min_health_percent_every_endpoint_takes_traffic() {
        let addrs = addrs(4);
        let policy = TrafficPolicy {
            outlier: Some(OutlierDetection {
                min_health_percent: 75,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Cluster::new("c", addrs.clone(), policy, Some(1));
        let picked = || {
            (0..40)
                .map(|_| c.pick(&request("a")).expect("pick").addr)
                .collect::<std::collections::HashSet<_>>()
        };
        eject(&c, 0);
        let seen = picked();
        assert!(
            !seen.contains(&addrs[0]) && seen.len() == 3,
            "3 of 4 up (75%): ejection holds: {seen:?}"
        );
        eject(&c, 1);
        assert_eq!(
            picked().len(),
            4,
            "2 of 4 up (50% < 75%): every endpoint takes traffic"
        );
    }
}
