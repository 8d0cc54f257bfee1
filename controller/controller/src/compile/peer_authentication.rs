//! PeerAuthentication -> Authorization, as Istio does for ambient.
//!
//! The effective mode of a workload is resolved here (workload selector > namespace >
//! mesh (root namespace) > PERMISSIVE; UNSET inherits; the oldest policy wins ties), and
//! the workload lists the DENY policy that implements it:
//! - STRICT on every port: the shared `<root>/istio_converted_static_strict`, which
//!   denies connections without a peer identity (plaintext);
//! - port-level exceptions: `<ns>/converted_peer_authentication_<name>`, which denies
//!   plaintext only on the ports that are STRICT.

use std::collections::BTreeMap;

use cairn_api::proto::istio::security as sec;
use k8s_openapi::api::core::v1::Pod;

use super::{MeshConfig, selector_matches};
use crate::{
    resources::istio::{MtlsMode, PeerAuthentication},
    store::Store,
};

pub const STATIC_STRICT: &str = "istio_converted_static_strict";

fn converted_name(pa_name: &str) -> String {
    format!("converted_peer_authentication_{pa_name}")
}

/// The shared "deny plaintext" policy.
pub fn static_strict(mesh: &MeshConfig) -> sec::Authorization {
    sec::Authorization {
        name: STATIC_STRICT.to_owned(),
        namespace: mesh.root_namespace.clone(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![no_identity()],
        }],
        ..Default::default()
    }
}

fn no_identity() -> sec::Clause {
    sec::Clause {
        matches: vec![sec::Match {
            not_principals: vec![super::authorization::string_match("*")],
            ..Default::default()
        }],
    }
}

fn oldest<'a>(
    it: impl Iterator<Item = &'a std::sync::Arc<PeerAuthentication>>,
) -> Option<&'a PeerAuthentication> {
    it.min_by(|a, b| {
        let ka = (&a.metadata.creation_timestamp, &a.metadata.name);
        let kb = (&b.metadata.creation_timestamp, &b.metadata.name);
        ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
    })
    .map(|a| a.as_ref())
}

fn mode(pa: Option<&PeerAuthentication>) -> MtlsMode {
    pa.and_then(|p| p.spec.mtls.as_ref())
        .map(|m| m.mode)
        .unwrap_or(MtlsMode::Unset)
}

fn inherit(child: MtlsMode, parent: MtlsMode) -> MtlsMode {
    if child == MtlsMode::Unset {
        parent
    } else {
        child
    }
}

/// The policy selecting this pod, if any (workload level).
fn workload_policy<'a>(store: &'a Store, pod: &'a Pod) -> Option<&'a PeerAuthentication> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    oldest(store.peer_authentications_in(ns).filter(|p| {
        p.spec
            .selector
            .as_ref()
            .is_some_and(|s| selector_matches(&s.match_labels, labels))
    }))
}

fn namespace_mode(store: &Store, mesh: &MeshConfig, ns: &str) -> MtlsMode {
    let mesh_mode = mode(oldest(
        store
            .peer_authentications_in(&mesh.root_namespace)
            .filter(|p| p.spec.selector.is_none()),
    ));
    let ns_mode = mode(oldest(
        store
            .peer_authentications_in(ns)
            .filter(|p| p.spec.selector.is_none()),
    ));
    inherit(inherit(ns_mode, mesh_mode), MtlsMode::Permissive)
}

/// The converted policy a pod lists (see module docs), if its mode needs one.
pub fn selecting(store: &Store, mesh: &MeshConfig, pod: &Pod) -> Option<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let parent = namespace_mode(store, mesh, ns);
    let wp = workload_policy(store, pod);
    let base = inherit(mode(wp), parent);
    if let Some(wp) = wp
        && wp
            .spec
            .port_level_mtls
            .values()
            .any(|m| inherit(m.mode, base) != base)
    {
        return Some(format!(
            "{ns}/{}",
            converted_name(wp.metadata.name.as_deref().unwrap_or_default())
        ));
    }
    (base == MtlsMode::Strict).then(|| format!("{}/{STATIC_STRICT}", mesh.root_namespace))
}

/// The converted policy for a workload-level PeerAuthentication with port-level
/// exceptions. Its effective base depends on the namespace/mesh policies too.
pub fn compile(
    store: &Store,
    mesh: &MeshConfig,
    pa: &PeerAuthentication,
) -> Option<sec::Authorization> {
    let name = pa.metadata.name.as_deref()?;
    let ns = pa.metadata.namespace.as_deref()?;
    pa.spec.selector.as_ref()?;
    let base = inherit(mode(Some(pa)), namespace_mode(store, mesh, ns));
    let exceptions: Vec<(u32, MtlsMode)> = pa
        .spec
        .port_level_mtls
        .iter()
        .map(|(p, m)| (*p, inherit(m.mode, base)))
        .filter(|(_, m)| *m != base)
        .collect();
    if exceptions.is_empty() {
        return None;
    }
    let ports_clause = if base == MtlsMode::Strict {
        // Strict except some ports: deny plaintext unless the port is an exception.
        sec::Match {
            not_destination_ports: exceptions.iter().map(|(p, _)| *p).collect(),
            ..Default::default()
        }
    } else {
        // Permissive except some ports: deny plaintext on the strict ones.
        let strict: Vec<u32> = exceptions
            .iter()
            .filter(|(_, m)| *m == MtlsMode::Strict)
            .map(|(p, _)| *p)
            .collect();
        sec::Match {
            destination_ports: strict,
            ..Default::default()
        }
    };
    let rules = if ports_clause.destination_ports.is_empty()
        && ports_clause.not_destination_ports.is_empty()
    {
        // Exceptions only between non-strict modes: nothing to deny.
        Vec::new()
    } else {
        vec![sec::Rule {
            clauses: vec![
                no_identity(),
                sec::Clause {
                    matches: vec![ports_clause],
                },
            ],
        }]
    };
    Some(sec::Authorization {
        name: converted_name(name),
        namespace: ns.to_owned(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Deny as i32,
        rules,
        ..Default::default()
    })
}
