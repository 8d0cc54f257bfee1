//! Local config: the same model as xDS delivers, from a YAML file, for running a
//! ztunnel without a controller (tests, laptops).
//!
//! ```yaml
//! workloads: [ { uid, name, namespace, addresses, identity, tunnelProtocol, healthy, ... } ]
//! services: [ { name, namespace, hostname, addresses, ports, ... } ]
//! policies: [ { name, namespace, scope, action, rules } ]
//! ```

use std::collections::BTreeMap;

use cairn_api::model::{Address, Authorization, Service, Workload};
use serde::Deserialize;

use crate::state::ProxyState;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
}

impl LocalConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, LocalConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
            path: p.clone(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| LocalConfigError::Parse { path: p, source })
    }

    /// The snapshot, keyed exactly as xDS would key the same resources.
    pub fn into_state(self) -> ProxyState {
        let mut addresses = BTreeMap::new();
        for w in self.workloads {
            addresses.insert(w.uid.clone(), Address::Workload(Box::new(w)));
        }
        for s in self.services {
            addresses.insert(
                format!("{}/{}", s.namespace, s.hostname),
                Address::Service(Box::new(s)),
            );
        }
        let policies = self
            .policies
            .into_iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p))
            .collect();
        ProxyState::new(&addresses, &policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_model_from_yaml() {
        let text = r#"
workloads:
- uid: Kubernetes//Pod/default/web
  name: web
  namespace: default
  addresses: [10.0.0.5]
  identity: spiffe://cluster.local/ns/default/sa/web
  tunnelProtocol: HBONE
  healthy: true
  services:
    default/web.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  addresses: [{address: 10.96.0.5}]
  ports: [{servicePort: 80, targetPort: 8080}]
policies:
- name: deny-all
  namespace: default
  scope: NAMESPACE
  action: ALLOW
  rules: []
"#;
        let cfg: LocalConfig = serde_yaml::from_str(text).expect("valid local config");
        let st = cfg.into_state();
        let w = st
            .workload_by_ip("10.0.0.5".parse().expect("ip"))
            .expect("workload by ip");
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert!(
            st.service_by_vip("10.96.0.5".parse().expect("ip"))
                .is_some()
        );
        assert_eq!(st.policies_for(w).count(), 1);
        let bad = "workloads:\n- uid: x\n  identity: not-a-spiffe-id\n";
        let err = serde_yaml::from_str::<LocalConfig>(bad).expect_err("invalid");
        assert!(err.to_string().contains("workloads[0]"), "{err}");
    }
}
