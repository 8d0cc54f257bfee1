//! `cairn waypoint ... --kube`: the waypoint commands against a cluster's API server.
//! Same checks and status computation as local mode ([`crate::waypoint`]); only
//! where the objects live changes. Gateways are written with server-side apply
//! (field manager `cairn`), namespaces labelled with a merge patch.
//!
//! The CLI is synchronous, so this store owns a small current-thread runtime and
//! blocks on each API call.

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    kubernetes::{Change, KubeSource, api_resource},
    resources::{Kind, gateway::Gateway},
    store::Store,
    waypoint::{Manifests, WaypointError},
};

/// The kinds `apply`, `delete`, `list` and `status` read.
const KINDS: [Kind; 4] = [Kind::Namespace, Kind::Service, Kind::Pod, Kind::Gateway];

/// A cluster's API server as the place waypoints are declared.
pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    client: Client,
    server: String,
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> WaypointError {
    let action = action.into();
    move |source| WaypointError::Kube { action, source }
}

impl Cluster {
    /// Connects with `kubeconfig`, or the usual inference (in-cluster, then
    /// `$KUBECONFIG`, then `~/.kube/config`).
    pub fn connect(kubeconfig: Option<&std::path::Path>) -> Result<Cluster, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a runtime: {e}"))?;
        let config = runtime.block_on(async {
            match kubeconfig {
                Some(path) => {
                    let file = kube::config::Kubeconfig::read_from(path)
                        .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
                    kube::Config::from_custom_kubeconfig(file, &Default::default())
                        .await
                        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))
                }
                None => kube::Config::infer().await.map_err(|e| {
                    format!("no Kubernetes config (not in a pod, no $KUBECONFIG or ~/.kube/config; pass --kubeconfig): {e}")
                }),
            }
        })?;
        let server = config.cluster_url.to_string();
        let client = {
            let _guard = runtime.enter();
            Client::try_from(config).map_err(|e| format!("building the API client: {e}"))?
        };
        Ok(Cluster {
            runtime,
            client,
            server,
        })
    }

    fn gateways(&self, namespace: &str) -> Api<Gateway> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

impl Manifests for Cluster {
    fn store(&self) -> Result<Store, WaypointError> {
        let mut store = Store::default();
        let mut source = KubeSource::new();
        for kind in KINDS {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &api_resource(kind));
            let action = match kind {
                Kind::Gateway => format!(
                    "listing {kind}s (are Gateway API's CRDs installed? kubectl apply -f deploy/crds/gateway-api.yaml)"
                ),
                _ => format!("listing {kind}s"),
            };
            let list = self
                .runtime
                .block_on(api.list(&ListParams::default()))
                .map_err(kube_err(action))?;
            let resource = api_resource(kind);
            for mut obj in list.items {
                // List items carry no type: the decoder needs it.
                obj.types = Some(kube::api::TypeMeta {
                    api_version: resource.api_version.clone(),
                    kind: resource.kind.clone(),
                });
                if let Ok(value) = serde_json::to_value(obj) {
                    source.apply(&mut store, Change::Apply(kind, value));
                }
            }
        }
        Ok(store)
    }

    fn gateway_source(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(String, bool)>, WaypointError> {
        // As `istioctl waypoint`: every waypoint Gateway in a cluster is the CLI's to
        // replace or delete, whoever created it.
        let found = self
            .runtime
            .block_on(self.gateways(namespace).get_opt(name))
            .map_err(kube_err(format!("reading Gateway {namespace}/{name}")))?;
        Ok(found.map(|_| (self.describe(), true)))
    }

    fn write_gateway(
        &self,
        namespace: &str,
        name: &str,
        manifest: &str,
    ) -> Result<String, WaypointError> {
        let value: serde_json::Value = serde_yaml::from_str(manifest)
            .map_err(|e| WaypointError::Rejected(format!("the Gateway manifest: {e}")))?;
        let params = PatchParams::apply("cairn").force();
        self.runtime
            .block_on(
                self.gateways(namespace)
                    .patch(name, &params, &Patch::Apply(&value)),
            )
            .map_err(kube_err(format!("applying Gateway {namespace}/{name}")))?;
        Ok(self.describe())
    }

    fn remove_gateway(&self, namespace: &str, name: &str) -> Result<(), WaypointError> {
        self.runtime
            .block_on(
                self.gateways(namespace)
                    .delete(name, &DeleteParams::default()),
            )
            .map_err(kube_err(format!("deleting Gateway {namespace}/{name}")))?;
        Ok(())
    }

    fn label_namespace(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<String, WaypointError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.runtime
            .block_on(api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)))
            .map_err(kube_err(format!("labelling namespace {namespace}")))?;
        Ok(self.describe())
    }

    fn describe(&self) -> String {
        format!("the cluster at {}", self.server)
    }
}
