//! Manifests -> typed objects: multi-document YAML in, per-document objects with
//! warnings (fields Cairn does not implement) or an error naming the field path.
//!
//! The controller's local source and `cairn analyze` both decode through here, so what
//! `analyze` accepts is exactly what the controller applies.

use std::{fmt, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    resources::{Kind, Object, gateway, istio},
    validate,
};

/// A field the manifest sets that Cairn does not implement. The object still applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A document that cannot apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {index}{}: {}{message}", describe(.kind, .name), .path.as_ref().map(|p| format!("{p}: ")).unwrap_or_default())]
pub struct DocumentError {
    /// Zero-based index of the document in its file.
    pub index: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub path: Option<String>,
    pub message: String,
    /// The object this document defines, when that much could be read.
    pub object: Option<crate::resources::ObjectRef>,
}

fn describe(kind: &Option<String>, name: &Option<String>) -> String {
    match (kind, name) {
        (Some(k), Some(n)) => format!(" ({k} {n})"),
        (Some(k), None) => format!(" ({k})"),
        _ => String::new(),
    }
}

/// One decoded document.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub index: usize,
    pub object: Object,
    pub warnings: Vec<Warning>,
}

/// Decodes every document of a multi-document YAML text. Empty documents are skipped;
/// a `kind: List` document expands to its items.
pub fn decode_documents(text: &str) -> Vec<Result<Decoded, DocumentError>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(Err(DocumentError {
                    index,
                    kind: None,
                    name: None,
                    path: None,
                    message: format!("invalid YAML: {e}"),
                    object: None,
                }));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        let json = match serde_json::to_value(value) {
            Ok(j) => j,
            Err(e) => {
                out.push(Err(DocumentError {
                    index,
                    kind: None,
                    name: None,
                    path: None,
                    message: format!("document is not a JSON-compatible object: {e}"),
                    object: None,
                }));
                continue;
            }
        };
        if json.get("kind").and_then(Value::as_str) == Some("List") {
            let items = json
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            out.extend(items.into_iter().map(|item| decode_value(index, item)));
        } else {
            out.push(decode_value(index, json));
        }
    }
    out
}

/// Decodes one document already parsed to JSON.
pub fn decode_value(index: usize, value: Value) -> Result<Decoded, DocumentError> {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let kind_str = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let (api_version, kind_str) = (api_version.as_deref(), kind_str.as_deref());
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let object = match (
        api_version.and_then(|a| Kind::from_manifest(a, kind_str?)),
        &name,
    ) {
        (Some(kind), Some(n)) => Some(crate::resources::ObjectRef {
            kind,
            namespace: if kind.is_namespaced() {
                value
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_owned()
            } else {
                String::new()
            },
            name: n.clone(),
        }),
        _ => None,
    };
    let err = |path: Option<String>, message: String| DocumentError {
        index,
        kind: kind_str.map(str::to_owned),
        name: name.clone(),
        path,
        message,
        object: object.clone(),
    };
    let (Some(api_version), Some(kind_name)) = (api_version, kind_str) else {
        return Err(err(
            None,
            "missing apiVersion or kind: is this a Kubernetes manifest?".into(),
        ));
    };
    let Some(kind) = Kind::from_manifest(api_version, kind_name) else {
        return Err(err(
            Some("kind".into()),
            format!(
                "{api_version} {kind_name} is not a kind Cairn serves (see docs/api.md for the list)"
            ),
        ));
    };
    if name.as_deref().is_none_or(str::is_empty) {
        return Err(err(
            Some("metadata.name".into()),
            "required: every object needs a name".into(),
        ));
    }

    let mut warnings = Vec::new();
    let object = decode_kind(kind, value, &mut warnings)
        .map_err(|(path, message)| err(Some(path), message))?;
    warnings.extend(validate::validate(&object).map_err(|e| err(Some(e.path), e.message))?);
    Ok(Decoded {
        index,
        object,
        warnings,
    })
}

type FieldError = (String, String);

fn decode_kind(
    kind: Kind,
    mut value: Value,
    warnings: &mut Vec<Warning>,
) -> Result<Object, FieldError> {
    // Namespaced objects without a namespace land in "default", as with kubectl.
    if kind.is_namespaced() && value.pointer("/metadata/namespace").is_none() {
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String("default".into()));
        }
    } else if !kind.is_namespaced()
        && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.remove("namespace");
    }
    // A custom resource: the derive's `new(name, spec)` with the decoded metadata.
    macro_rules! crd {
        ($variant:ident, $ty:ty) => {
            Object::$variant(custom(value, warnings, |metadata, spec| {
                let mut o = <$ty>::new("", spec);
                o.metadata = metadata;
                o
            })?)
        };
    }
    Ok(match kind {
        Kind::Namespace => Object::Namespace(core(value, warnings)?),
        Kind::Node => Object::Node(core(value, warnings)?),
        Kind::Pod => Object::Pod(core(value, warnings)?),
        Kind::Service => Object::Service(core(value, warnings)?),
        Kind::EndpointSlice => Object::EndpointSlice(core(value, warnings)?),
        Kind::ServiceAccount => Object::ServiceAccount(core(value, warnings)?),
        Kind::VirtualService => crd!(VirtualService, istio::VirtualService),
        Kind::DestinationRule => crd!(DestinationRule, istio::DestinationRule),
        Kind::ServiceEntry => crd!(ServiceEntry, istio::ServiceEntry),
        Kind::AuthorizationPolicy => crd!(AuthorizationPolicy, istio::AuthorizationPolicy),
        Kind::PeerAuthentication => crd!(PeerAuthentication, istio::PeerAuthentication),
        Kind::RequestAuthentication => crd!(RequestAuthentication, istio::RequestAuthentication),
        Kind::Gateway => crd!(Gateway, gateway::Gateway),
        Kind::HttpRoute => crd!(HttpRoute, gateway::HTTPRoute),
        Kind::GrpcRoute => crd!(GrpcRoute, gateway::GRPCRoute),
    })
}

/// Kubernetes core kinds: k8s-openapi's full schemas. Fields unknown to Kubernetes
/// itself (typos) are reported; Cairn reads only what it needs of the rest.
fn core<T: DeserializeOwned>(
    value: Value,
    warnings: &mut Vec<Warning>,
) -> Result<Arc<T>, FieldError> {
    let mut ignored = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(field_path(&path));
    let de = serde_ignored::Deserializer::new(value, &mut on_ignored);
    let obj = serde_path_to_error::deserialize(de)
        .map(Arc::new)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))?;
    warnings.extend(ignored.into_iter().map(|path| Warning {
        path,
        message: "field is not part of this Kubernetes kind and is ignored".into(),
    }));
    Ok(obj)
}

/// Custom resources: metadata and spec decoded separately so unknown spec fields are
/// reported with their path.
fn custom<S: DeserializeOwned, T>(
    value: Value,
    warnings: &mut Vec<Warning>,
    build: impl FnOnce(ObjectMeta, S) -> T,
) -> Result<Arc<T>, FieldError> {
    let Value::Object(mut map) = value else {
        return Err((".".into(), "document must be a mapping".into()));
    };
    let meta_value = map.remove("metadata").unwrap_or(Value::Null);
    let meta: ObjectMeta = serde_path_to_error::deserialize(meta_value)
        .map_err(|e| (format!("metadata.{}", e.path()), e.inner().to_string()))?;
    let spec_value = map
        .remove("spec")
        .unwrap_or(Value::Object(Default::default()));
    let mut ignored = Vec::new();
    let spec: S = {
        let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(field_path(&path));
        let de = serde_ignored::Deserializer::new(spec_value, &mut on_ignored);
        serde_path_to_error::deserialize(de)
            .map_err(|e| (format!("spec.{}", e.path()), e.inner().to_string()))?
    };
    warnings.extend(ignored.into_iter().map(|p| Warning {
        path: format!("spec.{p}"),
        message: "field is not implemented by Cairn and is ignored".into(),
    }));
    for key in map.keys() {
        if !["apiVersion", "kind", "status"].contains(&key.as_str()) {
            warnings.push(Warning {
                path: key.clone(),
                message: "unknown top-level field is ignored".into(),
            });
        }
    }
    Ok(Arc::new(build(meta, spec)))
}

/// Formats an ignored field's path like serde_path_to_error does: `a.b[0].c`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let p = field_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests;
