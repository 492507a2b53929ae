//! An EndpointSlice as the planner reads it: the ports and, per endpoint, the address,
//! node, conditions and hints (kube-proxy's `EndpointSliceCache` keeps the same), with node
//! and zone names shared between endpoints. About 50 bytes an endpoint instead of the API
//! object's kilobyte.

use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::address::{Family, parse_ip_sloppy};
use super::service::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, has_label, port_number};
use super::{Interner, ObjectKey, Protocol};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the planner needs of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The Service it belongs to: its namespace and its service-name label.
    pub service: ObjectKey,
    /// Its `addressType`; `None` for FQDN (never proxied, as in kube-proxy).
    pub family: Option<Family>,
    /// Ports and endpoints; empty when the slice is not proxied (FQDN, or labelled for
    /// another proxy or as headless), which is all the planner needs to know of it.
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Unset counts as "" (what the EndpointSlice controller writes for an unnamed port).
    pub name: Box<str>,
    /// `None` for a protocol that is not proxied: it never matches a Service port.
    pub protocol: Option<Protocol>,
    /// `None` when unset or out of range: no backends.
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The first address (kube-proxy uses it; the others are its aliases), of the slice's
    /// family.
    pub addr: std::net::IpAddr,
    pub node_name: Option<Arc<str>>,
    /// Unset ready and serving mean true, unset terminating false (API docs).
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `None` when the endpoint has no hints (most do not).
    pub hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forZones`: the zones whose nodes should use this endpoint.
    pub for_zones: Vec<Arc<str>>,
    /// `hints.forNodes`: the nodes that should use this endpoint.
    pub for_nodes: Vec<Arc<str>>,
}

impl EndpointRecord {
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.hints.as_ref().map_or(&[], |hints| &hints.for_zones)
    }

    pub fn node_hints(&self) -> &[Arc<str>] {
        self.hints.as_ref().map_or(&[], |hints| &hints.for_nodes)
    }
}

impl SliceRecord {
    /// Interprets a slice; `None` when it names no Service (no service-name label). Names
    /// of nodes and zones are shared through `names`.
    pub fn from_slice(
        key: &ObjectKey,
        slice: &EndpointSlice,
        names: &mut Interner,
    ) -> Option<Self> {
        let labels = slice.metadata.labels.as_ref();
        let service_name = labels?
            .get(SERVICE_NAME_LABEL)
            .filter(|name| !name.is_empty())?;
        let service = ObjectKey::new(key.namespace.clone(), service_name.clone());
        let family = Family::from_api(&slice.address_type);
        let proxied = family.is_some()
            && !has_label(labels, SERVICE_PROXY_NAME_LABEL)
            && !has_label(labels, HEADLESS_LABEL);
        if !proxied {
            return Some(SliceRecord {
                service,
                family,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|port| SlicePort {
                name: port.name.clone().unwrap_or_default().into_boxed_str(),
                protocol: super::service::service_protocol(port.protocol.as_deref()).ok(),
                port: port.port.and_then(port_number),
            })
            .collect();
        let all = slice.endpoints.as_deref().unwrap_or_default();
        // Sized for all: collecting a filtered iterator would double its way up to twice that.
        let mut endpoints = Vec::with_capacity(all.len());
        endpoints.extend(all.iter().filter_map(|endpoint| {
            let addr = endpoint
                .addresses
                .first()
                .and_then(|addr| parse_ip_sloppy(addr))
                .filter(|addr| Some(Family::of(*addr)) == family)?;
            let conditions = endpoint.conditions.as_ref();
            let hints = endpoint.hints.as_ref().map(|hints| Hints {
                for_zones: (hints.for_zones.iter().flatten())
                    .map(|zone| names.intern(&zone.name))
                    .collect(),
                for_nodes: (hints.for_nodes.iter().flatten())
                    .map(|node| names.intern(&node.name))
                    .collect(),
            });
            Some(EndpointRecord {
                addr,
                node_name: endpoint.node_name.as_deref().map(|name| names.intern(name)),
                ready: conditions.and_then(|c| c.ready) != Some(false),
                serving: conditions.and_then(|c| c.serving) != Some(false),
                terminating: conditions.and_then(|c| c.terminating) == Some(true),
                hints: hints
                    .filter(|hints| !hints.for_zones.is_empty() || !hints.for_nodes.is_empty())
                    .map(Box::new),
            })
        }));
        Some(SliceRecord {
            service,
            family,
            ports,
            endpoints,
        })
    }

    /// Re-interns the names of a record built with another interner (a parser thread's).
    pub(super) fn share_names(&mut self, names: &mut Interner) {
        for endpoint in &mut self.endpoints {
            if let Some(node) = &mut endpoint.node_name {
                *node = names.intern(node);
            }
            if let Some(hints) = &mut endpoint.hints {
                for name in hints.for_zones.iter_mut().chain(&mut hints.for_nodes) {
                    *name = names.intern(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EndpointRecord;

    /// The model keeps one record per endpoint of the cluster: its size is what 100 000
    /// endpoints cost. An address of either family inline makes it 48 bytes (32 while it
    /// held IPv4 only).
    #[test]
    fn an_endpoint_record_takes_48_bytes() {
        assert_eq!(std::mem::size_of::<EndpointRecord>(), 48);
    }
}
