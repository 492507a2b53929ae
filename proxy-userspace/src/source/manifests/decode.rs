//! One document (or List item) of a manifest to one object: kind and name first (so a
//! broken object is reported by name and its last good version can stay), then typed into
//! the Kubernetes API types through serde, checked as the API server would
//! ([`crate::source::validate`]) and interpreted into the model's record. Decoded as the
//! parser completes each, so no document outlives its decoding.

use std::fmt;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tracing::debug;

use super::yaml::{DocumentSink, NodeDeserializer, Tree};
use crate::model::{
    DEFAULT_NAMESPACE, Interner, ObjectKey, ProblemKind, ServiceRecord, SliceRecord, trigger_time,
};
use crate::source::validate::{validate_endpoint_slice, validate_service};

/// The kinds this source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn from_name(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    /// What a problem with an object of this kind counts as.
    pub fn problem_kind(self) -> ProblemKind {
        match self {
            Kind::Service => ProblemKind::Service,
            Kind::EndpointSlice => ProblemKind::EndpointSlice,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// An object's identity across files: kind and `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ObjectId {
    pub kind: Kind,
    pub key: ObjectKey,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// An object as the model keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum ManifestObject {
    Service(ServiceRecord),
    EndpointSlice(SliceRecord, Option<chrono::DateTime<chrono::Utc>>),
}

/// What one document (or `List` item) turned out to be.
#[derive(Debug)]
pub(super) enum Decoded {
    /// Empty, or a kind this source does not read.
    Skipped,
    Object(ObjectId, ManifestObject),
    /// `id` is known when kind and name could be read, which lets a last good version stand in.
    Invalid {
        id: Option<ObjectId>,
        reason: String,
    },
}

/// A decoded object and where it was: its document (and its item, in a List), counted from
/// 0 within the part parsed.
pub(super) struct Located {
    pub document: usize,
    pub item: Option<usize>,
    pub decoded: Decoded,
}

/// Decodes each document (each List item) as the parser completes it, so no document
/// outlives its own decoding.
#[derive(Default)]
pub(super) struct Decoder {
    names: Interner,
    pub decoded: Vec<Located>,
    /// The items of the document being read, in case it turns out a List.
    items: Vec<Decoded>,
}

impl<'a> DocumentSink<'a> for Decoder {
    fn list_item(&mut self, _document: usize, tree: &Tree<'a>, item: u32, error: Option<String>) {
        let decoded = match error {
            Some(reason) => Decoded::Invalid {
                id: object_id(tree, item),
                reason,
            },
            None => decode_object(tree, item, &mut self.names),
        };
        self.items.push(decoded);
    }

    fn document(
        &mut self,
        document: usize,
        tree: &Tree<'a>,
        root: Option<u32>,
        error: Option<String>,
    ) {
        let items = std::mem::take(&mut self.items);
        let Some(root) = root else {
            return;
        };
        let located = |item, decoded| Located {
            document,
            item,
            decoded,
        };
        if let Some(reason) = error {
            let id = object_id(tree, root);
            self.decoded
                .push(located(None, Decoded::Invalid { id, reason }));
            return;
        }
        if tree.get(root, "kind").and_then(|kind| tree.str(kind)) != Some("List") {
            self.decoded
                .push(located(None, decode_object(tree, root, &mut self.names)));
            return;
        }
        match tree.get(root, "items") {
            Some(value) if !tree.is_sequence(value) && !tree.is_null(value) => {
                let reason = "items of a List must be a sequence".to_owned();
                let invalid = Decoded::Invalid { id: None, reason };
                self.decoded.push(located(None, invalid));
            }
            _ => {
                for (item, decoded) in items.into_iter().enumerate() {
                    self.decoded.push(located(Some(item), decoded));
                }
            }
        }
    }
}

/// Checks one object and interprets it into its record.
fn decode_object(tree: &Tree, root: u32, names: &mut Interner) -> Decoded {
    if tree.is_null(root) {
        return Decoded::Skipped;
    }
    let invalid = |id: Option<&ObjectId>, reason: String| Decoded::Invalid {
        id: id.cloned(),
        reason,
    };
    let Some(kind_name) = tree.get(root, "kind").and_then(|kind| tree.str(kind)) else {
        return invalid(None, "not a Kubernetes object: kind is missing".to_owned());
    };
    let Some(kind) = Kind::from_name(kind_name) else {
        debug!(
            kind = kind_name,
            "manifest object skipped: not a Service or EndpointSlice"
        );
        return Decoded::Skipped;
    };
    let Some(id) = object_id(tree, root) else {
        return invalid(None, format!("{kind} has no metadata.name"));
    };
    let expected_api_version = kind.api_version();
    match tree
        .get(root, "apiVersion")
        .and_then(|version| tree.str(version))
    {
        Some(api_version) if api_version == expected_api_version => {}
        Some(api_version) => {
            return invalid(
                Some(&id),
                format!(
                    "apiVersion {api_version} is wrong for {kind}; expected {expected_api_version}"
                ),
            );
        }
        None => {
            return invalid(
                Some(&id),
                format!("apiVersion is missing; expected {expected_api_version}"),
            );
        }
    }
    let document = tree.deserializer(root);
    let object = match kind {
        Kind::Service => deserialize::<Service>(document).and_then(|service| {
            validate_service(&service)?;
            Ok(ManifestObject::Service(ServiceRecord::from_service(
                &id.key, &service,
            )))
        }),
        Kind::EndpointSlice => deserialize::<EndpointSlice>(document).and_then(|slice| {
            validate_endpoint_slice(&slice)?;
            // Validation made sure the service-name label is there.
            let record = SliceRecord::from_slice(&id.key, &slice, names)
                .ok_or_else(|| "the kubernetes.io/service-name label is missing".to_owned())?;
            Ok(ManifestObject::EndpointSlice(record, trigger_time(&slice)))
        }),
    };
    match object {
        Ok(object) => Decoded::Object(id, object),
        Err(reason) => invalid(Some(&id), reason),
    }
}

/// The kind and `namespace/name` of an object, if it has them.
fn object_id(tree: &Tree, root: u32) -> Option<ObjectId> {
    let kind = Kind::from_name(tree.get(root, "kind").and_then(|kind| tree.str(kind))?)?;
    let metadata = tree.get(root, "metadata")?;
    let field = |name: &str| {
        tree.get(metadata, name)
            .and_then(|value| tree.str(value))
            .filter(|value| !value.is_empty())
    };
    let name = field("name")?;
    let namespace = field("namespace").unwrap_or(DEFAULT_NAMESPACE);
    Some(ObjectId {
        kind,
        key: ObjectKey::new(namespace, name),
    })
}

/// Deserializes with the path of the offending field in the error, e.g.
/// `spec.ports[0].port: invalid type: string "http", expected i32`. Read plainly first:
/// following the path took about half of typing a valid object (100 000 slices: 1.3 s of
/// CPU, 0.7 s without), so only a document that fails is read again to name where (the
/// tree is immutable, so it fails the same way).
fn deserialize<'de, T: Deserialize<'de>>(document: NodeDeserializer) -> Result<T, String> {
    if let Ok(object) = T::deserialize(document) {
        return Ok(object);
    }
    serde_path_to_error::deserialize(document).map_err(|error| {
        let path = error.path().to_string();
        if path == "." {
            error.inner().to_string()
        } else {
            format!("{path}: {}", error.inner())
        }
    })
}
