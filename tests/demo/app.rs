//! The demo's sample app, one binary in three roles (the "image" of each pod):
//!
//! - `ratings`: answers `GET /ratings/...` with a rating.
//! - `reviews --version vN [--ratings ip:port]`: answers with header `x-version: vN`;
//!   with `--ratings` it asks ratings first (bookinfo's reviews v2 does).
//! - `frontend --target ip:port --host h --rate r --stats file`: calls reviews at a
//!   steady rate over keep-alive connections, one request in four as user `jason`
//!   (header `end-user`), and writes what it saw (per version, per status code,
//!   latency) to `file` twice a second for the live view.
//!
//! Plain HTTP/1.1 apps: the mesh (capture, ztunnels, the waypoint) adds the mTLS.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde::{Deserialize, Serialize};

/// How far back the view's "recent" numbers look.
pub const WINDOW: Duration = Duration::from_secs(5);
const PORT: u16 = 9080;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Keep-alive connections are dropped after 5 s idle, long before the waypoint
/// would close them (idle 1 h): the client closes, so no request races a close.
fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// Serves `handle` on 0.0.0.0:9080, HTTP/1.1 with keep-alive.
async fn serve<F, Fut>(handle: F) -> Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", PORT))
        .await
        .with_context(|| format!("binding port {PORT}"))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, headers: &[(&str, &str)], body: String) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub async fn ratings() -> Result<()> {
    serve(|_req| async { text(StatusCode::OK, &[], "4/5".into()) }).await
}

/// How a reviews pod misbehaves, for the e2e suite's resilience scenarios.
#[derive(Clone, Copy, Debug, Default)]
pub struct Misbehaviour {
    /// Every Nth request (the 1st, N+1th, ...) answers 500 (a 503 would be retried
    /// by Istio's default retry policy, and hidden without any VirtualService).
    pub fail_every: Option<u64>,
    /// Waited before answering.
    pub delay: Duration,
}

pub async fn reviews(
    version: String,
    ratings: Option<SocketAddr>,
    misbehaviour: Misbehaviour,
) -> Result<()> {
    let client = client();
    let version: Arc<str> = version.into();
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    serve(move |_req| {
        let (client, version, served) = (client.clone(), version.clone(), served.clone());
        async move {
            let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !misbehaviour.delay.is_zero() {
                tokio::time::sleep(misbehaviour.delay).await;
            }
            if misbehaviour.fail_every.is_some_and(|k| k > 0 && n % k == 0) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &[("x-version", &version)],
                    format!("reviews {version} failing request {n} on purpose"),
                );
            }
            let rating = match ratings {
                Some(addr) => match get(&client, &format!("http://{addr}/ratings/0"), &[]).await {
                    Ok((200, body, _)) => body,
                    Ok((code, _, _)) => format!("ratings answered {code}"),
                    Err(e) => format!("ratings unavailable: {e}"),
                },
                None => "none".into(),
            };
            text(
                StatusCode::OK,
                &[("x-version", &version)],
                format!("reviews {version} (rating: {rating})"),
            )
        }
    })
    .await
}

/// `count` GETs of `http://target/reviews/i` with `host` and `headers`, `concurrency`
/// at a time over keep-alive connections; what they got, as the frontend tallies it
/// (the e2e suite runs this in a client pod and reads the JSON it prints).
pub async fn load(
    target: SocketAddr,
    host: String,
    headers: Vec<(String, String)>,
    count: u64,
    concurrency: u64,
) -> Result<Tally> {
    let client = client();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, recorder) = (client.clone(), next.clone(), recorder.clone());
        let (host, headers) = (host.clone(), headers.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let mut list = vec![("host", host.as_str())];
                list.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let start = Instant::now();
                let (code, version) =
                    match get(&client, &format!("http://{target}/reviews/{i}"), &list).await {
                        Ok((code, _, version)) => (code.to_string(), version.unwrap_or("-".into())),
                        Err(e) => {
                            eprintln!("request {i}: {e:#}");
                            ("error".into(), "-".into())
                        }
                    };
                if let Ok(mut r) = recorder.lock() {
                    r.record(Outcome {
                        at: Instant::now(),
                        version,
                        code,
                        micros: start.elapsed().as_micros() as u64,
                    });
                }
            }
        }));
    }
    for w in workers {
        w.await.context("a load worker panicked")?;
    }
    let stats = recorder
        .lock()
        .map(|mut r| r.snapshot(0))
        .map_err(|_| anyhow::anyhow!("recorder poisoned"))?;
    Ok(stats.total)
}

/// Status, body and `x-version` of a GET with `headers`, answered within 5 s.
async fn get(
    client: &HttpClient,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, Option<String>)> {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::new()).context("request")?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .context("no answer within 5 s")??;
    let status = response.status().as_u16();
    let version = response
        .headers()
        .get("x-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), version))
}

/// What the frontend has seen: the view reads this from the stats file.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub requests: u64,
    /// By `x-version` ("-" when the answer had none, e.g. an abort or a denial).
    pub versions: BTreeMap<String, u64>,
    /// By status code ("error" when there was no answer).
    pub codes: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests sent per second.
    pub rate: u32,
    /// Since the frontend started.
    pub total: Tally,
    /// The last [`WINDOW`].
    pub recent: Tally,
    pub last_error: Option<String>,
}

struct Outcome {
    at: Instant,
    version: String,
    code: String,
    micros: u64,
}

#[derive(Default)]
struct Recorder {
    recent: VecDeque<Outcome>,
    total: Tally,
    /// Every latency since start, in microseconds (a demo runs minutes, not days).
    all_micros: Vec<u64>,
    last_error: Option<String>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

impl Recorder {
    fn record(&mut self, o: Outcome) {
        self.total.requests += 1;
        *self.total.versions.entry(o.version.clone()).or_default() += 1;
        *self.total.codes.entry(o.code.clone()).or_default() += 1;
        self.all_micros.push(o.micros);
        self.recent.push_back(o);
    }

    fn snapshot(&mut self, rate: u32) -> Stats {
        let cutoff = Instant::now() - WINDOW;
        while self.recent.front().is_some_and(|o| o.at < cutoff) {
            self.recent.pop_front();
        }
        let mut recent = Tally::default();
        let mut micros: Vec<u64> = Vec::with_capacity(self.recent.len());
        for o in &self.recent {
            recent.requests += 1;
            *recent.versions.entry(o.version.clone()).or_default() += 1;
            *recent.codes.entry(o.code.clone()).or_default() += 1;
            micros.push(o.micros);
        }
        micros.sort_unstable();
        recent.p50_ms = percentile(&micros, 0.50);
        recent.p99_ms = percentile(&micros, 0.99);
        let mut total = self.total.clone();
        let mut all = self.all_micros.clone();
        all.sort_unstable();
        total.p50_ms = percentile(&all, 0.50);
        total.p99_ms = percentile(&all, 0.99);
        Stats {
            rate,
            total,
            recent,
            last_error: self.last_error.clone(),
        }
    }
}

fn write_stats(path: &Path, stats: &Stats) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(stats)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads the stats file the frontend writes.
pub fn read_stats(path: &Path) -> Option<Stats> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub async fn frontend(target: SocketAddr, host: String, rate: u32, stats: PathBuf) -> Result<()> {
    let client = client();
    // A pod starts before its node's ztunnel has taken it in (connections are refused,
    // never sent in plaintext, until then: docs/capture.md). Like an app with a
    // startup probe, wait until reviews answers once before the steady load.
    let began = Instant::now();
    loop {
        match get(
            &client,
            &format!("http://{target}/reviews/ready"),
            &[("host", &host)],
        )
        .await
        {
            Ok(_) => break,
            Err(e) if began.elapsed() < Duration::from_secs(30) => {
                eprintln!(
                    "{:.3}s waiting for reviews: {e:#}",
                    began.elapsed().as_secs_f64()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("reviews did not answer within 30 s")),
        }
    }
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let snapshot = recorder
                    .lock()
                    .map(|mut r| r.snapshot(rate))
                    .unwrap_or_default();
                if let Err(e) = write_stats(&stats, &snapshot) {
                    eprintln!("writing {}: {e}", stats.display());
                }
            }
        });
    }
    // At most 64 requests in flight: a stalled mesh shows as errors, not a pile-up.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let uri = format!("http://{target}");
    let began = Instant::now();
    for i in 0u64.. {
        tick.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let (client, recorder, host) = (client.clone(), recorder.clone(), host.clone());
        let uri = format!("{uri}/reviews/{i}");
        tokio::spawn(async move {
            let start = Instant::now();
            let mut headers = vec![("host", host.as_str())];
            if i % 4 == 3 {
                headers.push(("end-user", "jason"));
            }
            let result = get(&client, &uri, &headers)
                .await
                .map(|(code, _, version)| (code, version))
                .map_err(|e| format!("{e:#}"));
            let micros = start.elapsed().as_micros() as u64;
            drop(permit);
            if let Ok(mut r) = recorder.lock() {
                let (code, version) = match result {
                    Ok((code, version)) => (code.to_string(), version.unwrap_or("-".into())),
                    Err(e) => {
                        // Each failure with its time: rare, and what a test that
                        // fails on them shows.
                        eprintln!("{:.3}s request {i}: {e}", began.elapsed().as_secs_f64());
                        r.last_error = Some(e);
                        ("error".into(), "-".into())
                    }
                };
                r.record(Outcome {
                    at: Instant::now(),
                    version,
                    code,
                    micros,
                });
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_recorded_latencies() {
        let mut r = Recorder::default();
        for (i, code) in ["200", "200", "503", "200"].iter().enumerate() {
            r.record(Outcome {
                at: Instant::now(),
                version: if *code == "200" {
                    "v1".into()
                } else {
                    "-".into()
                },
                code: (*code).into(),
                micros: (i as u64 + 1) * 1000,
            });
        }
        let s = r.snapshot(10);
        assert_eq!(s.recent.requests, 4);
        assert_eq!(s.recent.codes["503"], 1);
        assert_eq!(s.recent.versions["v1"], 3);
        assert_eq!(s.recent.p50_ms, 3.0);
        assert_eq!(s.recent.p99_ms, 4.0);
        assert_eq!(
            s.total,
            Tally {
                p50_ms: 3.0,
                p99_ms: 4.0,
                ..s.recent.clone()
            }
        );
    }
}
