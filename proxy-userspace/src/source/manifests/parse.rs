//! Reading one manifest file, off the daemon's event loop: refused unread when too large,
//! skipped unparsed when its contents did not change, else parsed as a stream of YAML
//! documents (JSON is YAML) straight into records.
//!
//! The parser is serde-saphyr, which enforces limits while it reads, as an API server
//! limits a request: nesting depth (the 60 000-deep file that took libyaml seconds is
//! refused at level 65 in microseconds), events replayed through aliases (a small file
//! can't expand into gigabytes) and the input size. Each document becomes a small JSON
//! value (a `kind: List` one item at a time), is checked, typed and interpreted into a
//! record, and dropped: no file's value trees are ever held at once.

use std::fmt;
use std::fs::File;
use std::hash::Hasher;
use std::io::{self, BufReader, Read};
use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tracing::debug;

use super::validate::{validate_endpoint_slice, validate_service};
use crate::model::{
    DEFAULT_NAMESPACE, Interner, ObjectKey, ServiceRecord, SliceRecord, trigger_time,
};

/// How much one file may ask of the parser (`--manifests-max-file-bytes`,
/// `--manifests-max-depth`, `--manifests-max-alias-expansion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// A larger file is refused before it is read.
    pub max_file_bytes: u64,
    /// The deepest nesting of mappings and sequences in a document (Kubernetes objects
    /// stay under 20, `managedFields` included).
    pub max_depth: usize,
    /// How many parser events aliases (`*name`) may replay in a document: what one anchor
    /// expands to, however often it is used.
    pub max_alias_expansion: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_file_bytes: 256 * 1024 * 1024,
            max_depth: 64,
            max_alias_expansion: 10_000,
        }
    }
}

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

/// A file's identity by contents.
pub(super) type ContentHash = u64;

/// The outcome of reading one file.
#[derive(Debug)]
pub(super) enum FileRead {
    /// Same contents as the last time it was parsed.
    Unchanged,
    /// Its documents, each with where it is (`document 3`, `document 1 item 2`).
    Parsed {
        hash: ContentHash,
        documents: Vec<(String, Decoded)>,
    },
    /// The file as a whole can't be used; `reason` is the metric label.
    Failed {
        /// `None` when the contents could not be read (retry on the next look).
        hash: Option<ContentHash>,
        reason: &'static str,
        message: String,
    },
}

/// Reads `file` unless its contents hash to `previous`. Blocking: run it off the event loop.
pub(super) fn read_file(
    file: &Path,
    limits: &ParseLimits,
    previous: Option<ContentHash>,
) -> FileRead {
    let failed = |reason, message| FileRead::Failed {
        hash: None,
        reason,
        message,
    };
    let size = match std::fs::metadata(file) {
        Ok(metadata) => metadata.len(),
        Err(error) => return failed("unreadable", format!("can't be read: {error}")),
    };
    if size > limits.max_file_bytes {
        return failed(
            "too_large",
            format!(
                "is {size} bytes, more than --manifests-max-file-bytes {}; not read",
                limits.max_file_bytes
            ),
        );
    }
    // The contents first (cheap): a file that was only touched or rewritten alike is not
    // parsed again.
    let hash = match content_hash(file, limits.max_file_bytes) {
        Ok(hash) => hash,
        Err(error) => return failed("unreadable", format!("can't be read: {error}")),
    };
    if previous == Some(hash) {
        return FileRead::Unchanged;
    }
    // Truncated by a writer that has not written yet, most likely: removing objects takes
    // deleting the file (or their documents).
    if size == 0 {
        return FileRead::Failed {
            hash: Some(hash),
            reason: "empty",
            message: "is empty".to_owned(),
        };
    }
    match parse_file(file, limits, size) {
        Ok(documents) => FileRead::Parsed { hash, documents },
        Err((reason, message)) => FileRead::Failed {
            hash: Some(hash),
            reason,
            message,
        },
    }
}

/// A hash of the file's bytes (at most `limit` of them: a file growing past the limit
/// meanwhile is caught by the parser's own limit).
fn content_hash(file: &Path, limit: u64) -> io::Result<ContentHash> {
    let mut reader = File::open(file)?.take(limit.saturating_add(1));
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok(hasher.finish());
        }
        hasher.write(&buffer[..read]);
    }
}

/// The documents of a file. Err (reason label, message) when the file as a whole can't be
/// parsed: then none of its new contents is used. A large file is cut at its document
/// markers and its parts parsed side by side, one thread a core.
fn parse_file(
    file: &Path,
    limits: &ParseLimits,
    size: u64,
) -> Result<Vec<(String, Decoded)>, (&'static str, String)> {
    let language = if file
        .extension()
        .is_some_and(|extension| extension == "json")
    {
        "JSON"
    } else {
        "YAML"
    };
    let failed =
        |error: &serde_saphyr::Error| (error_reason(error), format!("invalid {language}: {error}"));
    let unreadable = |error: io::Error| ("unreadable", format!("can't be read: {error}"));
    let opened = File::open(file).map_err(unreadable)?;
    let mut reader = BufReader::with_capacity(
        64 * 1024,
        opened.take(limits.max_file_bytes.saturating_add(1)),
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut text = String::new();
    let parts = if size >= PARALLEL_FROM_BYTES && cores > 1 {
        match reader.read_to_string(&mut text) {
            Ok(_) => split_documents(&text, cores),
            // Not UTF-8: the parser says where.
            Err(_) => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let parsed: Vec<Result<Vec<Located>, serde_saphyr::Error>> = if parts.len() > 1 {
        std::thread::scope(|scope| {
            let threads: Vec<_> = parts
                .iter()
                .map(|part| scope.spawn(|| parse_documents(&mut part.as_bytes(), limits)))
                .collect();
            threads
                .into_iter()
                .map(|thread| thread.join().expect("a parser thread panicked"))
                .collect()
        })
    } else if parts.len() == 1 {
        vec![parse_documents(&mut parts[0].as_bytes(), limits)]
    } else {
        let reopened = File::open(file).map_err(unreadable)?;
        let mut reader = BufReader::with_capacity(
            64 * 1024,
            reopened.take(limits.max_file_bytes.saturating_add(1)),
        );
        vec![parse_documents(&mut reader, limits)]
    };
    let mut decoded = Vec::new();
    let mut documents_before = 0;
    for part in parsed {
        let part = part.map_err(|error| failed(&error))?;
        let mut documents_here = 0;
        for located in part {
            documents_here = documents_here.max(located.document + 1);
            let document = documents_before + located.document + 1;
            let location = match located.item {
                None => format!("document {document}"),
                Some(item) => format!("document {document} item {}", item + 1),
            };
            decoded.push((location, located.decoded));
        }
        documents_before += documents_here;
    }
    Ok(decoded)
}

/// Files at least this large are parsed in parts, side by side.
pub(super) const PARALLEL_FROM_BYTES: u64 = 1 << 20;

/// A decoded object and where it was: its document (and its item, in a List), counted from
/// 0 within the part parsed.
struct Located {
    document: usize,
    item: Option<usize>,
    decoded: Decoded,
}

/// The documents read from `reader`.
fn parse_documents(
    reader: &mut impl Read,
    limits: &ParseLimits,
) -> Result<Vec<Located>, serde_saphyr::Error> {
    let mut names = Interner::default();
    let mut decoded = Vec::new();
    for (document, parsed) in
        serde_saphyr::read_with_options::<_, Document>(reader, options(limits)).enumerate()
    {
        match parsed? {
            Document::Object(object) => decoded.push(Located {
                document,
                item: None,
                decoded: decode_object(object, &mut names),
            }),
            Document::List(items) => {
                for (item, object) in items.into_iter().enumerate() {
                    decoded.push(Located {
                        document,
                        item: Some(item),
                        decoded: decode_object(object, &mut names),
                    });
                }
            }
            Document::InvalidList(reason) => decoded.push(Located {
                document,
                item: None,
                decoded: Decoded::Invalid { id: None, reason },
            }),
        }
    }
    Ok(decoded)
}

/// `text` cut into about `parts` pieces at document markers (`---` at the start of a line:
/// YAML forbids that line inside any scalar, so it always starts a document). Whole when
/// it has directives (`%YAML`, which belong to the document after them) or few markers.
fn split_documents(text: &str, parts: usize) -> Vec<&str> {
    let is_marker = |line: &str| {
        line.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    if text.lines().any(|line| line.starts_with('%')) {
        return vec![text];
    }
    let target = text.len() / parts.max(1) + 1;
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset - start >= target && is_marker(line) {
            pieces.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    pieces.push(&text[start..]);
    pieces
}

fn options(limits: &ParseLimits) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = limits.max_depth;
    budget.flow_nesting_limit = limits.max_depth;
    // Bounded by the file size; a `kind: List` of 100 000 Services is one document.
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_total_scalar_bytes = usize::try_from(limits.max_file_bytes).unwrap_or(usize::MAX);
    budget.max_reader_input_bytes = usize::try_from(limits.max_file_bytes).ok();
    // The replay limit below bounds expansion itself; a ratio would refuse an anchor used
    // often for little.
    budget.enforce_alias_anchor_ratio = false;
    let mut options = serde_saphyr::options! { with_snippet: false };
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = limits.max_alias_expansion;
    options
}

/// The metric label of a parse failure (the parser's errors carry their kind in the text
/// whatever wraps them).
fn error_reason(error: &serde_saphyr::Error) -> &'static str {
    let text = error.to_string();
    if text.contains("budget breached: Depth") || text.starts_with("recursion limit exceeded") {
        "too_deep"
    } else if text.contains("budget breached: InputBytes") {
        "too_large"
    } else if text.contains("alias") || text.contains("budget breached") {
        "alias_expansion"
    } else {
        "invalid_yaml"
    }
}

/// One YAML document: an object (as a JSON value, to be checked and typed), or the items of
/// a `kind: List`, each its own value so a list of thousands is never one tree.
enum Document {
    Object(Value),
    List(Vec<Value>),
    InvalidList(String),
}

impl<'de> serde::Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut fields = Map::new();
        let mut items = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = Some(map.next_value::<Items>()?);
            } else {
                let value = map.next_value::<Value>()?;
                fields.insert(key, value);
            }
        }
        let is_list = fields.get("kind").and_then(Value::as_str) == Some("List");
        Ok(match (is_list, items) {
            (true, Some(Items::Values(items))) => Document::List(items),
            (true, None | Some(Items::Null)) => Document::List(Vec::new()),
            (true, Some(Items::NotASequence)) => {
                Document::InvalidList("items of a List must be a sequence".to_owned())
            }
            (false, items) => {
                if let Some(items) = items {
                    fields.insert("items".to_owned(), items.into_value());
                }
                Document::Object(Value::Object(fields))
            }
        })
    }

    // Not a mapping: left to `decode_object`, which says what it is not.
    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Document, E> {
        Ok(Document::Object(Value::String(value.to_owned())))
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Document, E> {
        Ok(Document::Object(Value::Bool(value)))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Document, E> {
        Ok(Document::Object(Value::from(value)))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Document, E> {
        Ok(Document::Object(Value::from(value)))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Document, E> {
        Ok(Document::Object(Value::from(value)))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Document, E> {
        Ok(Document::Object(Value::Null))
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Document, E> {
        Ok(Document::Object(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document::Object(Value::Array(Vec::new())))
    }
}

/// A document's `items`: a List's objects, one value each.
enum Items {
    Values(Vec<Value>),
    Null,
    NotASequence,
}

impl Items {
    fn into_value(self) -> Value {
        match self {
            Items::Values(values) => Value::Array(values),
            Items::Null | Items::NotASequence => Value::Null,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemsVisitor;
        impl<'de> Visitor<'de> for ItemsVisitor {
            type Value = Items;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element_seed(ItemSeed)? {
                    items.push(item);
                }
                Ok(Items::Values(items))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Items, E> {
                Ok(Items::Null)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Items, E> {
                Ok(Items::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Items::NotASequence)
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Items, E> {
                Ok(Items::NotASequence)
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Items, E> {
                Ok(Items::NotASequence)
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Items, E> {
                Ok(Items::NotASequence)
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Items, E> {
                Ok(Items::NotASequence)
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Items, E> {
                Ok(Items::NotASequence)
            }
        }
        deserializer.deserialize_any(ItemsVisitor)
    }
}

/// One item of a List: a value of its own.
struct ItemSeed;

impl<'de> DeserializeSeed<'de> for ItemSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        serde::Deserialize::deserialize(deserializer)
    }
}

/// Checks one object and interprets it into its record.
pub(super) fn decode_object(document: Value, names: &mut Interner) -> Decoded {
    if document.is_null() {
        return Decoded::Skipped;
    }
    let invalid = |id: Option<&ObjectId>, reason: String| Decoded::Invalid {
        id: id.cloned(),
        reason,
    };
    let Some(kind_name) = document.get("kind").and_then(Value::as_str) else {
        return invalid(None, "not a Kubernetes object: kind is missing".to_owned());
    };
    let Some(kind) = Kind::from_name(kind_name) else {
        debug!(
            kind = kind_name,
            "manifest object skipped: not a Service or EndpointSlice"
        );
        return Decoded::Skipped;
    };
    let metadata = document.get("metadata");
    let metadata_field = |field: &str| {
        metadata
            .and_then(|metadata| metadata.get(field))
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
    };
    let Some(name) = metadata_field("name") else {
        return invalid(None, format!("{kind} has no metadata.name"));
    };
    let namespace = metadata_field("namespace").unwrap_or(DEFAULT_NAMESPACE);
    let id = ObjectId {
        kind,
        key: ObjectKey::new(namespace, name),
    };
    let expected_api_version = kind.api_version();
    match document.get("apiVersion").and_then(Value::as_str) {
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

/// Deserializes with the path of the offending field in the error, e.g.
/// `spec.ports[0].port: invalid type: string "http", expected i32`.
fn deserialize<T: DeserializeOwned>(document: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(document).map_err(|error| {
        let path = error.path().to_string();
        if path == "." {
            error.inner().to_string()
        } else {
            format!("{path}: {}", error.inner())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_split_at_document_markers_only() {
        let text = "a: 1\n---\nb: |\n  ---x\n  text\n--- # c\nc: 3\n---\nd: 4\n";
        let parts = split_documents(text, 3);
        assert_eq!(parts.concat(), text, "nothing lost or doubled");
        assert!(parts.len() > 1);
        for part in &parts[1..] {
            assert!(part.starts_with("---"), "{part:?}");
        }
        assert_eq!(
            split_documents("%YAML 1.2\n---\na: 1\n---\nb: 2\n", 2).len(),
            1
        );
    }
}
