//! Whether a new pod belongs in the mesh.

use std::path::Path;

use cairn_controller::{compile::workload::enrolled, local::LocalSource, store::Store};

/// Decides membership from the namespace and pod labels.
pub trait Membership {
    /// `Ok(None)`: the pod is unknown to the source (not in the mesh).
    fn in_mesh(
        &self,
        config_dir: &Path,
        namespace: &str,
        name: &str,
    ) -> Result<Option<bool>, String>;
}

/// Local mode: the controller's config directory, read with the controller's own
/// loader and rule. (Kubernetes mode asks the API server instead.)
pub struct ConfigDir;

impl Membership for ConfigDir {
    fn in_mesh(
        &self,
        config_dir: &Path,
        namespace: &str,
        name: &str,
    ) -> Result<Option<bool>, String> {
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
}
