//! The ztunnel's xDS subscription: Address and Authorization resources, converted to
//! the model at the edge and swapped into the proxy state atomically. The stream
//! itself (ACK/NACK, reconnects, `initial_resource_versions`) is `cairn_client::xds`.
//!
//! A response that does not convert is NACKed as a whole and the previous state stays.

use std::{collections::BTreeMap, sync::Arc};

use cairn_api::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
    model::{Address, Authorization},
    proto::{
        discovery::DeltaDiscoveryResponse,
        istio::{security as sec, workload as wl},
    },
};
pub use cairn_client::xds::{Subscriber, XdsConfig, XdsError, XdsStats};
use prost::Message;

use crate::{SharedState, state::ProxyState};

/// The resources held, as converted models plus their versions.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pub addresses: BTreeMap<String, Address>,
    pub authorizations: BTreeMap<String, Authorization>,
}

impl Held {
    /// Applies one response; on a conversion error nothing changes.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<usize, String> {
        enum Converted {
            Address(Address),
            Authorization(Authorization),
        }
        let mut converted = Vec::with_capacity(resp.resources.len());
        for r in &resp.resources {
            let body = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("resource {} has no body", r.name))?;
            let c = match resp.type_url.as_str() {
                ADDRESS_TYPE_URL => {
                    let p = wl::Address::decode(body.value.as_slice())
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    Converted::Address(
                        Address::try_from(p).map_err(|e| format!("resource {}: {e}", r.name))?,
                    )
                }
                AUTHORIZATION_TYPE_URL => {
                    let p = sec::Authorization::decode(body.value.as_slice())
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    Converted::Authorization(
                        Authorization::try_from(p)
                            .map_err(|e| format!("resource {}: {e}", r.name))?,
                    )
                }
                other => return Err(format!("unexpected type {other}")),
            };
            converted.push((r.name.clone(), c));
        }
        let n = converted.len() + resp.removed_resources.len();
        for (name, c) in converted {
            match c {
                Converted::Address(a) => {
                    self.addresses.insert(name, a);
                }
                Converted::Authorization(a) => {
                    self.authorizations.insert(name, a);
                }
            }
        }
        for name in &resp.removed_resources {
            self.addresses.remove(name);
            self.authorizations.remove(name);
        }
        Ok(n)
    }
}

/// The ztunnel's side of the xDS stream: Address and Authorization resources into
/// [`Held`], then a new [`ProxyState`] swapped in.
pub struct StateSink {
    held: Held,
    state: SharedState,
}

impl StateSink {
    pub fn new(state: SharedState) -> Self {
        Self {
            held: Held::default(),
            state,
        }
    }
}

impl Subscriber for StateSink {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<usize, String> {
        // `apply` converts everything before changing anything.
        let n = self.held.apply(resp)?;
        self.state.store(Arc::new(ProxyState::new(
            &self.held.addresses,
            &self.held.authorizations,
        )));
        Ok(n)
    }
}

/// The ztunnel's xDS client.
pub type XdsClient = cairn_client::xds::XdsClient<StateSink>;

#[cfg(test)]
mod tests;
