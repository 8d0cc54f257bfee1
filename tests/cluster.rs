//! A local Kubernetes control plane for tests and `cargo xtask cluster`: a real etcd
//! and a real kube-apiserver (built by `cargo xtask k8s-bins` into the cache that
//! `CAIRN_K8S_BIN` names), on loopback ports, with certificates, a service-account
//! signing key and an admin token generated per cluster (docs/kubernetes.md).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The admin's bearer token (group `system:masters`) in every local cluster.
pub const ADMIN_TOKEN: &str = "cairn-local-admin";

/// Where the Kubernetes binaries are: `$CAIRN_K8S_BIN`, which `cargo xtask test` and
/// `cargo xtask cluster` set after building them.
pub fn bin_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("CAIRN_K8S_BIN")?);
    ["etcd", "kube-apiserver"]
        .iter()
        .all(|b| dir.join(b).is_file())
        .then_some(dir)
}

/// Why tests that need an API server cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    match bin_dir() {
        Some(_) => None,
        None => Some(
            "no kube-apiserver/etcd: set CAIRN_K8S_BIN (cargo xtask test builds them and sets it)"
                .into(),
        ),
    }
}

pub struct LocalCluster {
    dir: PathBuf,
    bin: PathBuf,
    etcd: Child,
    apiserver: Child,
    apiserver_args: Vec<String>,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    pub kubeconfig: PathBuf,
}

/// `N` distinct free loopback ports: the listeners are held until all are chosen (a
/// port released at once may be handed out again by the next bind: etcd then finds
/// its client and peer ports equal and exits).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port"))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Certificates and keys of one cluster, as PEM files in `dir`.
fn write_pki(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "cairn-local-cluster-ca");
    let ca_cert = ca.self_signed(&ca_key).context("CA cert")?;
    let ca_issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().context("serving key")?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ])
    .context("serving params")?;
    serving
        .subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    let cert = serving
        .signed_by(&key, &ca_issuer)
        .context("serving cert")?;
    let sa = KeyPair::generate().context("service-account key")?;
    for (name, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("apiserver.crt", cert.pem()),
        ("apiserver.key", key.serialize_pem()),
        ("sa.key", sa.serialize_pem()),
        ("sa.pub", sa.public_key_pem()),
    ] {
        std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
    }
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{ADMIN_TOKEN},cairn-admin,cairn-admin,\"system:masters\"\n"),
    )
    .context("writing tokens.csv")?;
    Ok(())
}

impl LocalCluster {
    /// Starts etcd and kube-apiserver with their state under `dir`; returns once the
    /// API server answers `/readyz`.
    pub fn start(dir: &Path) -> Result<LocalCluster> {
        let bin = bin_dir().context("kube-apiserver/etcd not built (CAIRN_K8S_BIN)")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_pki(dir)?;
        let [client, peer, secure] = free_ports::<3>()?;
        let d = |p: &str| dir.join(p).display().to_string();
        let etcd_args = vec![
            "--name=local".to_string(),
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=local=http://127.0.0.1:{peer}"),
            // A test cluster's data is disposable; fsync is most of etcd's latency.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let etcd = spawn(&bin.join("etcd"), &etcd_args, &dir.join("etcd.log"))?;
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{client}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", d("certs")),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--token-auth-file={}", d("tokens.csv")),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--api-audiences=https://kubernetes.default.svc.cluster.local,istio-ca".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=RBAC".into(),
            // No kube-controller-manager makes each namespace's `default` service
            // account; pods name theirs, and the node agent runs them.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--v=1".into(),
        ];
        let apiserver = spawn(
            &bin.join("kube-apiserver"),
            &apiserver_args,
            &dir.join("kube-apiserver.log"),
        )?;
        let server = format!("https://127.0.0.1:{secure}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: local\n  context: {{cluster: local, user: admin}}\ncurrent-context: local\n",
                ca = d("ca.crt")
            ),
        )
        .context("writing kubeconfig")?;
        let mut cluster = LocalCluster {
            dir: dir.to_owned(),
            bin,
            etcd,
            apiserver,
            apiserver_args,
            server,
            kubeconfig,
        };
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// Polls `/readyz` until it answers 200.
    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let port: u16 = self
            .server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("server port")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.apiserver.try_wait()? {
                bail!(
                    "kube-apiserver exited ({status}):\n{}",
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            if let Some(status) = self.etcd.try_wait()? {
                bail!(
                    "etcd exited ({status}):\n{}",
                    tail(&self.dir.join("etcd.log"))
                );
            }
            if readyz(addr, &self.dir.join("ca.crt")).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {within:?}:\n{}",
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops kube-apiserver (SIGKILL: no graceful watch close) and starts it again on
    /// the same port and etcd.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        self.apiserver = spawn(
            &self.bin.join("kube-apiserver"),
            &self.apiserver_args,
            &self.dir.join("kube-apiserver.log"),
        )?;
        self.wait_ready(Duration::from_secs(60))
    }

    /// A kube client as the admin.
    pub async fn client(&self) -> Result<kube::Client> {
        let file = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs the built `kubectl` as the admin; its output, or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl(&self.bin, &self.kubeconfig, args)
    }

    /// What ships, as a user installs it: Gateway API's CRDs (this cluster has none),
    /// `kubectl apply -k deploy/`, and every CRD established.
    pub fn install_deploy(&self) -> Result<()> {
        let root = crate::workspace_root();
        let path = |p: &str| root.join(p).display().to_string();
        self.kubectl(&["apply", "-f", &path("deploy/crds/gateway-api.yaml")])?;
        self.kubectl(&["apply", "-k", &path("deploy")])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd",
            "--all",
        ])?;
        Ok(())
    }

    /// [`LocalCluster::kubectl`] for another thread.
    pub fn kubectl_fn(&self) -> impl Fn(&[&str]) -> Result<String> + Send + 'static {
        let (bin, kubeconfig) = (self.bin.clone(), self.kubeconfig.clone());
        move |args| kubectl(&bin, &kubeconfig, args)
    }

    /// Writes a kubeconfig at `path` that authenticates with `token` (a service
    /// account's, to run a component with exactly its RBAC).
    pub fn kubeconfig_with_token(&self, token: &str, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa}}\ncurrent-context: local\n",
                self.server,
                self.dir.join("ca.crt").display()
            ),
        )
        .with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `GET /readyz` over TLS with the admin token; true on 200.
fn readyz(addr: SocketAddr, ca: &Path) -> Result<bool> {
    use std::io::{Read, Write};
    let pem = std::fs::read(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost")?.to_owned();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "GET /readyz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    tls.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.1 200"))
}
