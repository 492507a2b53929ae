//! Sources of Services and EndpointSlices: a directory of manifests, or the API server.

pub mod kubernetes;
pub mod manifests;
pub mod validate;
