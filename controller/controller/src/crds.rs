//! The CustomResourceDefinitions for the kinds Cairn reads, generated from the same
//! Rust types the decoder uses (`cairn crds`, written to `deploy/crds/` by
//! `cargo xtask codegen`). Istio's and Gateway API's kinds are separate files: a
//! cluster that already runs Gateway API keeps its own CRDs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceSubresourceStatus, CustomResourceSubresources,
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::resources::{gateway, istio};

/// Which CRDs: Istio's API subset, or the Gateway API kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Set {
    Istio,
    GatewayApi,
}

pub fn definitions(set: Set) -> Vec<CustomResourceDefinition> {
    let mut crds = match set {
        Set::Istio => vec![
            istio::AuthorizationPolicy::crd(),
            istio::PeerAuthentication::crd(),
            istio::RequestAuthentication::crd(),
            istio::VirtualService::crd(),
            istio::DestinationRule::crd(),
            istio::ServiceEntry::crd(),
        ],
        Set::GatewayApi => vec![
            gateway::Gateway::crd(),
            gateway::HTTPRoute::crd(),
            gateway::GRPCRoute::crd(),
        ],
    };
    for crd in &mut crds {
        if set == Set::GatewayApi {
            // `*.k8s.io` groups are protected: the API server wants the approval
            // record Gateway API's own CRDs carry.
            crd.metadata.annotations.get_or_insert_default().insert(
                "api-approved.kubernetes.io".into(),
                "https://github.com/kubernetes-sigs/gateway-api/pull/2466".into(),
            );
        }
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                make_structural(schema);
                keep_unknown_fields(schema);
                if set == Set::Istio {
                    // As Istio's CRDs: a free-form status on its own subresource,
                    // where the controller reports what it could not apply
                    // (policy_status.rs).
                    schema.properties.get_or_insert_default().insert(
                        "status".into(),
                        JSONSchemaProps {
                            type_: Some("object".into()),
                            x_kubernetes_preserve_unknown_fields: Some(true),
                            ..JSONSchemaProps::default()
                        },
                    );
                }
            }
            if set == Set::Istio {
                version.subresources = Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(serde_json::json!({}))),
                    scale: None,
                });
            }
        }
        if set == Set::Istio {
            serve_older_versions(crd);
        }
    }
    crds
}

/// Istio's older API versions, served with the same schema (Istio's v1 is its
/// v1beta1 promoted; manifests in either form apply): security v1beta1, networking
/// v1beta1 and v1alpha3. v1 stays the storage version, so no conversion is needed.
fn serve_older_versions(crd: &mut CustomResourceDefinition) {
    let older: &[&str] = match crd.spec.group.as_str() {
        "security.istio.io" => &["v1beta1"],
        "networking.istio.io" => &["v1beta1", "v1alpha3"],
        _ => &[],
    };
    let Some(v1) = crd.spec.versions.iter().find(|v| v.name == "v1").cloned() else {
        return;
    };
    for name in older {
        let mut version = v1.clone();
        version.name = (*name).into();
        version.storage = false;
        crd.spec.versions.push(version);
    }
}

/// Every object in the schema keeps fields Cairn does not model (Istio's
/// `delegate`, `tcp` routes, `trafficPolicy.tls`, ...): a manifest written for
/// Istio must apply unchanged. The controller's decoder names what it ignores
/// (docs/api.md); the API server still checks the types of the fields Cairn knows.
fn keep_unknown_fields(schema: &mut JSONSchemaProps) {
    for_each_schema(schema, &mut |s| {
        if s.properties.is_some() {
            s.x_kubernetes_preserve_unknown_fields = Some(true);
        }
    });
}

/// Rewrites what JSON Schema allows but a CRD's structural schema does not:
/// `patternProperties` (schemars' form for maps with integer keys, such as
/// PeerAuthentication's `portLevelMtls`) becomes `additionalProperties`; the key
/// pattern is checked by Cairn's decoder instead.
fn make_structural(schema: &mut JSONSchemaProps) {
    for_each_schema(schema, &mut |s| {
        if let Some(patterns) = s.pattern_properties.take()
            && let Some((_, value)) = patterns.into_iter().next()
        {
            s.additional_properties = Some(JSONSchemaPropsOrBool::Schema(Box::new(value)));
            if s.type_.is_none() {
                s.type_ = Some("object".into());
            }
        }
    });
}

/// Calls `f` on `schema`, then on every schema below it (as `f` left them).
fn for_each_schema(schema: &mut JSONSchemaProps, f: &mut impl FnMut(&mut JSONSchemaProps)) {
    f(schema);
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.all_of.iter_mut().flatten())
        .chain(schema.any_of.iter_mut().flatten())
        .chain(schema.one_of.iter_mut().flatten());
    for child in children {
        for_each_schema(child, f);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        for_each_schema(items, f);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        for_each_schema(extra, f);
    }
}

/// The set as multi-document YAML, with a header saying where it comes from.
pub fn to_yaml(set: Set) -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated by `cargo xtask codegen` from controller/controller/src/resources: do not edit.\n",
    );
    for crd in definitions(set) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(schema: &JSONSchemaProps, path: &str, found: &mut Vec<String>) {
        if schema.pattern_properties.is_some() {
            found.push(path.to_owned());
        }
        for (name, child) in schema.properties.iter().flatten() {
            walk(child, &format!("{path}.{name}"), found);
        }
        if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
            walk(items, &format!("{path}[]"), found);
        }
        if let Some(JSONSchemaPropsOrBool::Schema(extra)) = &schema.additional_properties {
            walk(extra, &format!("{path}{{}}"), found);
        }
    }

    #[test]
    fn generated_schemas_have_no_pattern_properties_and_keep_the_map() {
        let mut found = Vec::new();
        for crd in definitions(Set::Istio)
            .into_iter()
            .chain(definitions(Set::GatewayApi))
        {
            for v in &crd.spec.versions {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref());
                walk(schema.expect("schema"), &crd.spec.names.kind, &mut found);
            }
        }
        assert!(found.is_empty(), "patternProperties at {found:?}");
        let pa = definitions(Set::Istio)
            .into_iter()
            .find(|c| c.spec.names.kind == "PeerAuthentication")
            .expect("PeerAuthentication");
        let spec = &pa.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .expect("properties")["spec"];
        let port_level = &spec.properties.as_ref().expect("spec properties")["portLevelMtls"];
        assert!(matches!(
            port_level.additional_properties,
            Some(JSONSchemaPropsOrBool::Schema(_))
        ));
    }
}
