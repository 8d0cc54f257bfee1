//! Whether a new pod belongs in the mesh: the controller's own rule
//! (`compile::workload::enrolled`) on the pod and its namespace, read from the
//! controller's config directory (local mode) or the API server (Kubernetes mode,
//! with the kubeconfig the plugin config names).

use std::{path::Path, sync::Arc, time::Duration};

use cairn_controller::{
    compile::workload::enrolled, local::LocalSource, resources::Object, store::Store,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};

/// Where membership is read from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    ConfigDir(&'a Path),
    Kubeconfig(&'a Path),
}

/// Decides membership from the namespace and pod labels.
pub trait Membership {
    /// `Ok(None)`: the pod is unknown to the source (not in the mesh).
    fn in_mesh(
        &self,
        source: Source<'_>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<bool>, String>;
}

/// Reads the source the plugin config names.
pub struct FromSource;

impl Membership for FromSource {
    fn in_mesh(
        &self,
        source: Source<'_>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<bool>, String> {
        match source {
            Source::ConfigDir(dir) => from_config_dir(dir, namespace, name),
            Source::Kubeconfig(path) => from_api_server(path, namespace, name),
        }
    }
}

fn from_config_dir(config_dir: &Path, namespace: &str, name: &str) -> Result<Option<bool>, String> {
    if !config_dir.is_dir() {
        return Err(format!(
            "config_dir {} is not a directory",
            config_dir.display()
        ));
    }
    let mut store = Store::default();
    let scan = LocalSource::new(config_dir).scan(&mut store);
    if let Some(e) = scan.errors.first() {
        // A broken file elsewhere must not decide this pod: say so, decide with
        // what parsed.
        eprintln!("cairn-cni: warning: {e}");
    }
    let pod = store
        .pods_in(namespace)
        .find(|p| p.metadata.name.as_deref() == Some(name));
    Ok(pod.map(|p| enrolled(&store, p)))
}

/// How long the plugin waits for the API server before failing the pod's start (the
/// kubelet retries it): never guess "not in the mesh".
const API_TIMEOUT: Duration = Duration::from_secs(5);

fn from_api_server(kubeconfig: &Path, namespace: &str, name: &str) -> Result<Option<bool>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the API client: {e}"))?;
    runtime.block_on(async {
        let file = kube::config::Kubeconfig::read_from(kubeconfig)
            .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
        let client = kube::Client::try_from(config).map_err(|e| format!("API client: {e}"))?;
        let fetch = async {
            let pod = kube::Api::<Pod>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?;
            let ns = kube::Api::<Namespace>::all(client)
                .get_opt(namespace)
                .await?;
            Ok::<_, kube::Error>((pod, ns))
        };
        let (pod, ns) = tokio::time::timeout(API_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("the API server did not answer within {API_TIMEOUT:?}"))?
            .map_err(|e| format!("reading pod {namespace}/{name} from the API server: {e}"))?;
        let Some(pod) = pod else {
            return Ok(None);
        };
        let mut store = Store::default();
        if let Some(ns) = ns {
            store.apply(Object::Namespace(Arc::new(ns)));
        }
        Ok(Some(enrolled(&store, &pod)))
    })
}
