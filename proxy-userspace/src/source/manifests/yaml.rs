//! YAML documents as small trees, built straight from granit-parser's event stream with
//! the limits an API server sets a request (nesting depth, alias expansion), and read by
//! serde through [`NodeDeserializer`].
//!
//! A tree holds one document (or one item of a `kind: List` at a time, see
//! [`DocumentSink`]) as a pre-order array of nodes whose scalars borrow the file's text:
//! building it costs little more than the parser's own events, an alias is a reference to
//! its anchor's node (never a copy), and fields nobody reads are never looked at. The
//! limits hold while the parser reads, so a hostile file costs at most what it takes to
//! reach them: the parser refuses nesting past `max_depth` itself (both flow and block), and
//! every alias adds the size of what it stands for to the document's expansion, refused
//! past `max_alias_expansion` — what one anchor expands to however often it is used, nested
//! aliases counted at their expanded size, so a "billion laughs" stops at the limit.
//!
//! Scalars are typed by what reads them (a port reads `80` as a number, a name reads it as
//! text); read untyped (an `IntOrString`), plain scalars follow the YAML 1.2 core schema
//! plus YAML 1.1's `yes`/`no`/`on`/`off` booleans, as Kubernetes' own YAML reader does.
//! Merge keys (`<<: *defaults`) merge, explicit keys winning; a mapping that repeats a key
//! is refused, as the API server's strict decoding does.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use granit_parser::{ErrorKind, Event, Parser, ScalarStyle, ScanError};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

/// What one document may ask of the reader.
#[derive(Clone, Copy, Debug)]
pub(super) struct TreeLimits {
    /// The deepest nesting of mappings and sequences, aliases counted where they are used.
    pub max_depth: usize,
    /// How many nodes aliases may stand for in one document, all uses together.
    pub max_alias_expansion: usize,
}

/// Why a file could not be read as YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct YamlError {
    /// The metric label: `too_deep`, `alias_expansion` or `invalid_yaml`.
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl YamlError {
    fn invalid(message: String) -> Self {
        YamlError {
            reason: "invalid_yaml",
            message,
        }
    }

    fn from_scan(error: &ScanError, limits: &TreeLimits) -> Self {
        match error.kind() {
            ErrorKind::RecursionLimitExceeded => too_deep(limits, &error.marker().line()),
            _ => YamlError::invalid(error.to_string()),
        }
    }
}

fn too_deep(limits: &TreeLimits, line: &dyn fmt::Display) -> YamlError {
    YamlError {
        reason: "too_deep",
        message: format!(
            "nested deeper than --manifests-max-depth {} at line {line}",
            limits.max_depth
        ),
    }
}

/// One node of a tree. Collections know where their subtree ends; their children follow
/// them (a mapping's as key, value, key, value …).
#[derive(Debug)]
enum Node<'a> {
    Scalar(Scalar<'a>),
    Sequence {
        end: u32,
    },
    Mapping {
        end: u32,
        merges: bool,
    },
    /// Stands for the subtree at `target` (an earlier, complete node of the document).
    Alias {
        target: u32,
    },
}

#[derive(Debug)]
struct Scalar<'a> {
    text: Cow<'a, str>,
    /// Plain scalars are typed by their text; quoted and block scalars are always text.
    plain: bool,
    /// A core-schema tag (`!!str`, `!!int` …), which decides the type instead.
    tag: Option<CoreTag>,
}

/// Stands in for a node that can't be used (the document is refused anyway).
const NULL: Scalar<'static> = Scalar {
    text: Cow::Borrowed(""),
    plain: true,
    tag: None,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CoreTag {
    Str,
    Int,
    Float,
    Bool,
    Null,
}

/// A document's (or a List item's) nodes; index 0 of a document is its root.
#[derive(Debug, Default)]
pub(super) struct Tree<'a> {
    nodes: Vec<Node<'a>>,
}

/// What a complete anchored node stands for, for the aliases that use it.
#[derive(Clone, Copy, Debug)]
struct Anchored {
    node: u32,
    /// The nodes it expands to, aliases inside it counted at their own expansion.
    size: usize,
    /// How many levels of collections it holds.
    height: usize,
}

/// A collection being built.
#[derive(Debug)]
struct Open {
    node: u32,
    anchor: usize,
    size: usize,
    height: usize,
    /// Its children so far, and the last one.
    children: usize,
    last_child: u32,
}

impl Open {
    /// Whether the next child of this collection (if a mapping) is a value.
    fn expects_value(&self) -> bool {
        self.children % 2 == 1
    }
}

/// Receives what a file holds, document by document. `error` says why a document (or item)
/// can't be used although the file parses: a mapping repeats a key, has a key that is not
/// a scalar, or an alias refers to a node that encloses it.
pub(super) trait DocumentSink<'a> {
    /// A complete document (`root` is `None` for one without content).
    fn document(&mut self, index: usize, tree: &Tree<'a>, root: Option<u32>, error: Option<String>);
    /// One complete item of the top-level `items` sequence of document `index`, before the
    /// document is complete: a `kind: List` of thousands of objects is read item by item,
    /// never as one tree. The sink decides at [`document`](Self::document) whether the
    /// document was a List.
    fn list_item(&mut self, index: usize, tree: &Tree<'a>, item: u32, error: Option<String>);
}

/// Reads every document of `text` into `sink`. Err when the text is not YAML or breaks a
/// limit: then the file as a whole can't be used (the parser can't go on past an error).
pub(super) fn read_documents<'a>(
    text: &'a str,
    limits: &TreeLimits,
    sink: &mut impl DocumentSink<'a>,
) -> Result<(), YamlError> {
    let mut options = granit_parser::Options::default();
    options.flow_nesting_limit = limits.max_depth;
    options.block_nesting_limit = limits.max_depth;
    options.set_emit_comments(false);
    let mut parser = Parser::new_from_str_with_options(text, options);
    let mut builder = Builder::new(*limits);
    let mut document = 0;
    for event in &mut parser {
        let (event, span) = event.map_err(|error| YamlError::from_scan(&error, limits))?;
        let line = span.start.line();
        match event {
            Event::StreamStart | Event::StreamEnd => {}
            Event::DocumentStart(..) => builder.reset(),
            Event::DocumentEnd => {
                let root = (!builder.tree.nodes.is_empty()).then_some(0);
                let error = builder.document_error.take();
                sink.document(document, &builder.tree, root, error);
                document += 1;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let tag = match tag.as_deref() {
                    Some(tag) => core_tag(tag),
                    None => None,
                };
                let scalar = Scalar {
                    text,
                    plain: style == ScalarStyle::Plain,
                    tag,
                };
                builder.leaf(Node::Scalar(scalar), anchor, 1, 0);
                builder.item_done(document, sink);
            }
            Event::SequenceStart(_, anchor, _) => builder.open(false, anchor, line)?,
            Event::MappingStart(_, anchor, _) => builder.open(true, anchor, line)?,
            Event::SequenceEnd | Event::MappingEnd => {
                builder.close(line);
                builder.item_done(document, sink);
            }
            Event::Alias(anchor) => {
                match builder.anchors.get(&anchor).copied().flatten() {
                    Some(anchored) => builder.alias(anchored, line)?,
                    None => {
                        builder.fail(format!(
                            "the alias at line {line} refers to a node that encloses it"
                        ));
                        builder.leaf(Node::Scalar(NULL), 0, 1, 0);
                    }
                }
                builder.item_done(document, sink);
            }
            // Not emitted with these options (comments, anchor names, unresolved aliases).
            _ => {}
        }
    }
    Ok(())
}

/// `Some` for the core schema's scalar tags; other tags are ignored (the value is read as
/// if untagged), as Kubernetes' YAML reader does.
fn core_tag(tag: &granit_parser::Tag) -> Option<CoreTag> {
    match tag.core_suffix()? {
        "str" => Some(CoreTag::Str),
        "int" => Some(CoreTag::Int),
        "float" => Some(CoreTag::Float),
        "bool" => Some(CoreTag::Bool),
        "null" => Some(CoreTag::Null),
        _ => None,
    }
}

/// Turns events into a tree, keeping the limits.
struct Builder<'a> {
    limits: TreeLimits,
    tree: Tree<'a>,
    open: Vec<Open>,
    /// Anchor id → the node, once complete (`None` while open).
    anchors: HashMap<usize, Option<Anchored>>,
    expansion: usize,
    /// Where the top-level `items` sequence's node is, while it is open.
    items: Option<u32>,
    /// The first node of the List item being read, and whether it defines anchors.
    item_start: Option<(u32, bool)>,
    /// Why the document, or the List item being read, can't be used.
    document_error: Option<String>,
    item_error: Option<String>,
}

impl<'a> Builder<'a> {
    fn new(limits: TreeLimits) -> Self {
        Builder {
            limits,
            tree: Tree::default(),
            open: Vec::new(),
            anchors: HashMap::new(),
            expansion: 0,
            items: None,
            item_start: None,
            document_error: None,
            item_error: None,
        }
    }

    fn reset(&mut self) {
        self.tree.nodes.clear();
        self.open.clear();
        self.anchors.clear();
        self.expansion = 0;
        self.items = None;
        self.item_start = None;
        self.document_error = None;
        self.item_error = None;
    }

    /// Refuses the List item being read, else the document; the first reason counts.
    fn fail(&mut self, reason: String) {
        let error = if self.item_start.is_some() {
            &mut self.item_error
        } else {
            &mut self.document_error
        };
        error.get_or_insert(reason);
    }

    fn next_index(&self) -> u32 {
        u32::try_from(self.tree.nodes.len()).expect("a document of more than 4 billion nodes")
    }

    /// A node is about to be added at the current position.
    fn entering(&mut self, anchor: usize) {
        // Items of the top-level `items` sequence: the root mapping, its `items` value.
        if self.open.len() == 2
            && self.items.is_some_and(|items| self.open[1].node == items)
            && self.item_start.is_none()
        {
            self.item_start = Some((self.next_index(), false));
        }
        if anchor != 0
            && let Some((_, defines_anchors)) = &mut self.item_start
        {
            *defines_anchors = true;
        }
        if anchor != 0 {
            self.anchors.insert(anchor, None);
        }
    }

    fn open(&mut self, mapping: bool, anchor: usize, line: usize) -> Result<(), YamlError> {
        if self.open.len() >= self.limits.max_depth {
            return Err(too_deep(&self.limits, &line));
        }
        self.entering(anchor);
        let node = self.next_index();
        // The sequence that is the value of the root mapping's `items` key.
        if !mapping
            && let [root] = self.open.as_slice()
            && self.tree.is_mapping(root.node)
            && root.expects_value()
            && (self.tree.scalar(root.last_child)).is_some_and(|key| key.text == "items")
        {
            self.items = Some(node);
        }
        self.tree.nodes.push(if mapping {
            Node::Mapping {
                end: node,
                merges: false,
            }
        } else {
            Node::Sequence { end: node }
        });
        self.open.push(Open {
            node,
            anchor,
            size: 1,
            height: 1,
            children: 0,
            last_child: node,
        });
        Ok(())
    }

    fn leaf(&mut self, node: Node<'a>, anchor: usize, size: usize, height: usize) {
        self.entering(anchor);
        let index = self.next_index();
        if let Node::Scalar(scalar) = &node
            && scalar.plain
            && scalar.text == "<<"
            && let Some(open) = self.open.last()
            && !open.expects_value()
            && let Node::Mapping { merges, .. } = &mut self.tree.nodes[open.node as usize]
        {
            *merges = true;
        }
        self.tree.nodes.push(node);
        if anchor != 0 {
            let anchored = Anchored {
                node: index,
                size,
                height,
            };
            self.anchors.insert(anchor, Some(anchored));
        }
        self.add_to_parent(index, size, height);
    }

    fn alias(&mut self, anchored: Anchored, line: usize) -> Result<(), YamlError> {
        if self.open.len() + anchored.height > self.limits.max_depth {
            return Err(too_deep(&self.limits, &line));
        }
        self.expansion = self.expansion.saturating_add(anchored.size);
        if self.expansion > self.limits.max_alias_expansion {
            return Err(YamlError {
                reason: "alias_expansion",
                message: format!(
                    "aliases expand to more than --manifests-max-alias-expansion {} nodes \
                     (at line {line})",
                    self.limits.max_alias_expansion
                ),
            });
        }
        let alias = Node::Alias {
            target: anchored.node,
        };
        self.leaf(alias, 0, anchored.size, anchored.height);
        Ok(())
    }

    fn add_to_parent(&mut self, child: u32, size: usize, height: usize) {
        if let Some(parent) = self.open.last_mut() {
            parent.size = parent.size.saturating_add(size);
            parent.height = parent.height.max(height + 1);
            parent.children += 1;
            parent.last_child = child;
        }
    }

    fn close(&mut self, line: usize) {
        let open = self.open.pop().expect("the parser balances collections");
        let end = self.next_index();
        match &mut self.tree.nodes[open.node as usize] {
            Node::Sequence { end: slot } => *slot = end,
            Node::Mapping { end: slot, .. } => {
                *slot = end;
                if let Err(reason) = self.tree.check_keys(open.node, line) {
                    self.fail(reason);
                }
            }
            _ => unreachable!("only collections are open"),
        }
        if open.anchor != 0 {
            let anchored = Anchored {
                node: open.node,
                size: open.size,
                height: open.height,
            };
            self.anchors.insert(open.anchor, Some(anchored));
        }
        if self.items == Some(open.node) {
            self.items = None;
        }
        self.add_to_parent(open.node, open.size, open.height);
    }

    /// Hands a complete List item to the sink, and drops its nodes unless an anchor in it
    /// may still be used.
    fn item_done(&mut self, document: usize, sink: &mut impl DocumentSink<'a>) {
        let Some((start, defines_anchors)) = self.item_start else {
            return;
        };
        if self.open.len() != 2 {
            return;
        }
        self.item_start = None;
        sink.list_item(document, &self.tree, start, self.item_error.take());
        if !defines_anchors {
            self.tree.nodes.truncate(start as usize);
        }
    }
}

impl<'a> Tree<'a> {
    fn node(&self, index: u32) -> &Node<'a> {
        &self.nodes[index as usize]
    }

    /// The node itself, or what an alias stands for.
    fn resolve(&self, index: u32) -> u32 {
        match self.node(index) {
            Node::Alias { target } => *target,
            _ => index,
        }
    }

    fn is_mapping(&self, index: u32) -> bool {
        matches!(self.node(index), Node::Mapping { .. })
    }

    fn scalar(&self, index: u32) -> Option<&Scalar<'a>> {
        match self.node(self.resolve(index)) {
            Node::Scalar(scalar) => Some(scalar),
            _ => None,
        }
    }

    /// Where the subtree at `index` ends.
    fn end(&self, index: u32) -> u32 {
        match self.node(index) {
            Node::Sequence { end } | Node::Mapping { end, .. } => *end,
            Node::Scalar(_) | Node::Alias { .. } => index + 1,
        }
    }

    /// The children of the complete collection at `index`.
    fn children(&self, index: u32) -> impl Iterator<Item = u32> + '_ {
        let end = self.end(index);
        let mut next = index + 1;
        std::iter::from_fn(move || {
            if next >= end {
                return None;
            }
            let child = next;
            next = self.end(child);
            Some(child)
        })
    }

    /// The key/value pairs of the mapping at `index`, merge keys resolved: explicit keys
    /// first, then merged ones not already there.
    fn pairs(&self, index: u32) -> Pairs<'_, 'a> {
        let mapping = self.resolve(index);
        match self.node(mapping) {
            Node::Mapping { merges: false, end } => Pairs::Direct {
                tree: self,
                next: mapping + 1,
                end: *end,
            },
            Node::Mapping { merges: true, .. } => Pairs::Merged(self.merged(mapping).into_iter()),
            _ => Pairs::Merged(Vec::new().into_iter()),
        }
    }

    fn merged(&self, mapping: u32) -> Vec<(u32, u32)> {
        let direct = Pairs::Direct {
            tree: self,
            next: mapping + 1,
            end: self.end(mapping),
        };
        let is_merge = |key: u32| self.scalar(key).is_some_and(|s| s.plain && s.text == "<<");
        let (merges, mut entries): (Vec<_>, Vec<_>) = direct.partition(|(key, _)| is_merge(*key));
        let mut seen: HashSet<&str> = (entries.iter())
            .filter_map(|(key, _)| self.scalar(*key).map(|s| s.text.as_ref()))
            .collect();
        for (_, source) in merges {
            let source = self.resolve(source);
            let sources: Vec<u32> = match self.node(source) {
                Node::Sequence { .. } => self.children(source).collect(),
                _ => vec![source],
            };
            for source in sources {
                for (key, value) in self.pairs(source) {
                    if let Some(text) = self.scalar(key).map(|s| s.text.as_ref())
                        && seen.insert(text)
                    {
                        entries.push((key, value));
                    }
                }
            }
        }
        entries
    }

    /// Refuses a complete mapping whose keys repeat or are not scalars. Linear: a hash set
    /// past a handful of keys.
    fn check_keys(&self, mapping: u32, line: usize) -> Result<(), String> {
        let keys: Vec<u32> = self.children(mapping).step_by(2).collect();
        let mut texts = Vec::with_capacity(keys.len());
        for key in keys {
            match self.scalar(key) {
                Some(scalar) => texts.push(scalar.text.as_ref()),
                None => {
                    return Err(format!(
                        "a mapping key is not a scalar (in the mapping ending at line {line})"
                    ));
                }
            }
        }
        let duplicate = if texts.len() <= 8 {
            texts
                .iter()
                .enumerate()
                .find(|(i, text)| texts[..*i].contains(text))
                .map(|(_, text)| *text)
        } else {
            let mut seen = HashSet::with_capacity(texts.len());
            texts.iter().find(|text| !seen.insert(**text)).copied()
        };
        match duplicate {
            Some("<<") | None => Ok(()),
            Some(key) => Err(format!(
                "the mapping ending at line {line} has the key {key:?} twice"
            )),
        }
    }

    /// The value of `key` in the mapping at `index`, merge keys included.
    pub(super) fn get(&self, index: u32, key: &str) -> Option<u32> {
        self.pairs(index)
            .find(|(k, _)| self.scalar(*k).is_some_and(|s| s.text == key))
            .map(|(_, value)| value)
    }

    /// The text of a scalar that reads as a string.
    pub(super) fn str(&self, index: u32) -> Option<&str> {
        let scalar = self.scalar(index)?;
        match scalar.resolve() {
            Resolved::Str(text) => Some(text),
            _ => None,
        }
    }

    /// Whether the node is null (or absent as a value: `key:` with nothing after it).
    pub(super) fn is_null(&self, index: u32) -> bool {
        self.scalar(index).is_some_and(Scalar::is_null)
    }

    /// Whether the node is a sequence.
    pub(super) fn is_sequence(&self, index: u32) -> bool {
        matches!(self.node(self.resolve(index)), Node::Sequence { .. })
    }

    /// A serde deserializer of the node at `index`.
    pub(super) fn deserializer(&self, index: u32) -> NodeDeserializer<'_, 'a> {
        NodeDeserializer { tree: self, index }
    }
}

/// What an untyped scalar is.
enum Resolved<'s> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'s str),
}

impl Scalar<'_> {
    fn is_null(&self) -> bool {
        match self.tag {
            Some(tag) => tag == CoreTag::Null,
            None => self.plain && matches!(self.text.as_ref(), "" | "~" | "null" | "Null" | "NULL"),
        }
    }

    fn resolve(&self) -> Resolved<'_> {
        let text = self.text.as_ref();
        match self.tag {
            Some(CoreTag::Str) => return Resolved::Str(text),
            Some(CoreTag::Null) => return Resolved::Null,
            Some(CoreTag::Bool) => {
                return parse_bool(text).map_or(Resolved::Str(text), Resolved::Bool);
            }
            Some(CoreTag::Int) => return parse_int(text).unwrap_or(Resolved::Str(text)),
            Some(CoreTag::Float) => {
                return parse_float(text).map_or(Resolved::Str(text), Resolved::Float);
            }
            None if !self.plain => return Resolved::Str(text),
            None => {}
        }
        if matches!(text, "" | "~" | "null" | "Null" | "NULL") {
            return Resolved::Null;
        }
        if let Some(value) = parse_bool(text) {
            return Resolved::Bool(value);
        }
        if let Some(number) = parse_int(text) {
            return number;
        }
        match parse_float(text) {
            Some(value) => Resolved::Float(value),
            None => Resolved::Str(text),
        }
    }

    /// Describes the scalar for a type error.
    fn unexpected(&self) -> Unexpected<'_> {
        match self.resolve() {
            Resolved::Null => Unexpected::Unit,
            Resolved::Bool(value) => Unexpected::Bool(value),
            Resolved::Int(value) => Unexpected::Signed(value),
            Resolved::UInt(value) => Unexpected::Unsigned(value),
            Resolved::Float(value) => Unexpected::Float(value),
            Resolved::Str(text) => Unexpected::Str(text),
        }
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Decimal (with `_` separators), `0x` and `0o` integers, signed or not.
fn parse_int(text: &str) -> Option<Resolved<'static>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(octal) = digits.strip_prefix("0o") {
        (8, octal)
    } else {
        (10, digits)
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || !digits
            .bytes()
            .all(|b| b == b'_' || (b as char).is_digit(radix))
    {
        return None;
    }
    let cleaned: Cow<str> = if digits.contains('_') {
        Cow::Owned(digits.replace('_', ""))
    } else {
        Cow::Borrowed(digits)
    };
    let magnitude = u64::from_str_radix(&cleaned, radix).ok()?;
    if negative {
        let value = 0i64.checked_sub_unsigned(magnitude)?;
        Some(Resolved::Int(value))
    } else {
        Some(match i64::try_from(magnitude) {
            Ok(value) => Resolved::Int(value),
            Err(_) => Resolved::UInt(magnitude),
        })
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text.trim_start_matches(['+', '-']) {
        ".inf" | ".Inf" | ".INF" => {
            return Some(if text.starts_with('-') {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            });
        }
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let first = text.trim_start_matches(['+', '-']).bytes().next()?;
    if !(first.is_ascii_digit() || first == b'.') {
        return None;
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE_".contains(&b))
    {
        return None;
    }
    if text.contains('_') {
        text.replace('_', "").parse().ok()
    } else {
        text.parse().ok()
    }
}

/// Why a node does not fit what reads it.
#[derive(Debug)]
pub(super) struct DeError(String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        DeError(message.to_string())
    }
}

/// Reads one node of a [`Tree`] with serde.
#[derive(Clone, Copy)]
pub(super) struct NodeDeserializer<'t, 'a> {
    tree: &'t Tree<'a>,
    index: u32,
}

impl<'t, 'a> NodeDeserializer<'t, 'a> {
    fn target(&self) -> &'t Node<'a> {
        self.tree.node(self.tree.resolve(self.index))
    }

    fn unexpected(&self) -> Unexpected<'t> {
        match self.target() {
            Node::Scalar(scalar) => scalar.unexpected(),
            Node::Sequence { .. } => Unexpected::Seq,
            Node::Mapping { .. } => Unexpected::Map,
            Node::Alias { .. } => unreachable!("resolved"),
        }
    }

    fn scalar(&self) -> Option<&'t Scalar<'a>> {
        match self.target() {
            Node::Scalar(scalar) => Some(scalar),
            _ => None,
        }
    }

    fn integer<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar().map(|scalar| (scalar, scalar.resolve())) {
            Some((_, Resolved::Int(value))) => visitor.visit_i64(value),
            Some((_, Resolved::UInt(value))) => visitor.visit_u64(value),
            // `"80"`: a quoted number where a number belongs (what the API server refuses).
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }
}

macro_rules! integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.integer(visitor)
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDeserializer<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.target() {
            Node::Scalar(scalar) => match scalar.resolve() {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(value) => visitor.visit_bool(value),
                Resolved::Int(value) => visitor.visit_i64(value),
                Resolved::UInt(value) => visitor.visit_u64(value),
                Resolved::Float(value) => visitor.visit_f64(value),
                Resolved::Str(text) => visitor.visit_str(text),
            },
            Node::Sequence { .. } => self.deserialize_seq(visitor),
            Node::Mapping { .. } => self.deserialize_map(visitor),
            Node::Alias { .. } => unreachable!("resolved"),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar().map(Scalar::resolve) {
            Some(Resolved::Bool(value)) => visitor.visit_bool(value),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    integers! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar().map(Scalar::resolve) {
            Some(Resolved::Float(value)) => visitor.visit_f64(value),
            Some(Resolved::Int(value)) => visitor.visit_i64(value),
            Some(Resolved::UInt(value)) => visitor.visit_u64(value),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    /// A plain scalar read as text is its text, whatever it looks like (`name: 80`).
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar() {
            Some(scalar) if !scalar.is_null() => visitor.visit_str(&scalar.text),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar() {
            Some(scalar) if scalar.is_null() => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar().map(Scalar::resolve) {
            Some(Resolved::Null) => visitor.visit_unit(),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let sequence = self.tree.resolve(self.index);
        match self.tree.node(sequence) {
            Node::Sequence { end } => visitor.visit_seq(Elements {
                tree: self.tree,
                next: sequence + 1,
                end: *end,
            }),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.target() {
            Node::Mapping { .. } => visitor.visit_map(Entries {
                tree: self.tree,
                pairs: self.tree.pairs(self.index),
                value: None,
            }),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.scalar() {
            Some(scalar) => visitor.visit_enum(UnitVariant(&scalar.text)),
            None => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    /// A field nobody reads is not looked at.
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct Elements<'t, 'a> {
    tree: &'t Tree<'a>,
    next: u32,
    end: u32,
}

impl<'de> SeqAccess<'de> for Elements<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let element = self.next;
        self.next = self.tree.end(element).max(element + 1);
        seed.deserialize(self.tree.deserializer(element)).map(Some)
    }
}

/// A mapping's pairs: read in place, or, with merge keys, collected.
enum Pairs<'t, 'a> {
    Direct {
        tree: &'t Tree<'a>,
        next: u32,
        end: u32,
    },
    Merged(std::vec::IntoIter<(u32, u32)>),
}

impl Iterator for Pairs<'_, '_> {
    type Item = (u32, u32);

    fn next(&mut self) -> Option<(u32, u32)> {
        match self {
            Pairs::Direct { tree, next, end } => {
                if *next >= *end {
                    return None;
                }
                let key = *next;
                let value = tree.end(key);
                *next = tree.end(value);
                Some((key, value))
            }
            Pairs::Merged(pairs) => pairs.next(),
        }
    }
}

struct Entries<'t, 'a> {
    tree: &'t Tree<'a>,
    pairs: Pairs<'t, 'a>,
    value: Option<u32>,
}

impl<'de> MapAccess<'de> for Entries<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.pairs.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        seed.deserialize(self.tree.deserializer(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let value = self.value.take().expect("next_key before next_value");
        seed.deserialize(self.tree.deserializer(value))
    }
}

/// An enum read from a scalar: a unit variant named by it.
struct UnitVariant<'s>(&'s str);

impl<'de> EnumAccess<'de> for UnitVariant<'_> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let name: de::value::StrDeserializer<'_, DeError> = self.0.into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"a newtype variant",
        ))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"a tuple variant",
        ))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"a struct variant",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    const LIMITS: TreeLimits = TreeLimits {
        max_depth: 64,
        max_alias_expansion: 10_000,
    };

    /// Each document (or List item) as a JSON value, or its error.
    #[derive(Default)]
    struct Collect {
        documents: Vec<Result<serde_json::Value, String>>,
        items: Vec<Result<serde_json::Value, String>>,
        /// The most nodes a tree held at once.
        largest_tree: usize,
    }

    impl<'a> DocumentSink<'a> for Collect {
        fn document(
            &mut self,
            _: usize,
            tree: &Tree<'a>,
            root: Option<u32>,
            error: Option<String>,
        ) {
            self.largest_tree = self.largest_tree.max(tree.nodes.len());
            self.documents.push(match (root, error) {
                (_, Some(error)) => Err(error),
                (None, None) => Ok(serde_json::Value::Null),
                (Some(root), None) => value(tree, root),
            });
        }

        fn list_item(&mut self, _: usize, tree: &Tree<'a>, item: u32, error: Option<String>) {
            self.largest_tree = self.largest_tree.max(tree.nodes.len());
            self.items.push(match error {
                Some(error) => Err(error),
                None => value(tree, item),
            });
        }
    }

    fn value(tree: &Tree, index: u32) -> Result<serde_json::Value, String> {
        serde_json::Value::deserialize(tree.deserializer(index)).map_err(|error| error.to_string())
    }

    fn read(text: &str) -> Result<Collect, YamlError> {
        let mut collect = Collect::default();
        read_documents(text, &LIMITS, &mut collect)?;
        Ok(collect)
    }

    fn documents(text: &str) -> Vec<Result<serde_json::Value, String>> {
        read(text).unwrap().documents
    }

    #[test]
    fn plain_scalars_are_typed_as_kubernetes_yaml_reads_them() {
        let text = "a: 80\nb: '80'\nc: yes\nd: ~\ne:\nf: 0x1F\ng: -1_000\nh: 1.5e3\n\
                    i: !!str 80\nj: 198.19.0.10\nk: \"true\"\nl: 18446744073709551615\n";
        assert_eq!(
            documents(text),
            [Ok(serde_json::json!({
                "a": 80, "b": "80", "c": true, "d": null, "e": null, "f": 31, "g": -1000,
                "h": 1500.0, "i": "80", "j": "198.19.0.10", "k": "true",
                "l": 18446744073709551615u64,
            }))]
        );
    }

    #[test]
    fn what_reads_a_scalar_decides_its_type() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Port {
            name: String,
            port: i32,
            protocol: Option<String>,
        }
        let read_port = |text: &str| -> Result<Port, String> {
            let mut ports = Vec::new();
            struct One<'p>(&'p mut Vec<Result<Port, String>>);
            impl<'a> DocumentSink<'a> for One<'_> {
                fn document(
                    &mut self,
                    _: usize,
                    tree: &Tree<'a>,
                    root: Option<u32>,
                    _: Option<String>,
                ) {
                    let result = Port::deserialize(tree.deserializer(root.unwrap()));
                    self.0.push(result.map_err(|error| error.to_string()));
                }
                fn list_item(&mut self, _: usize, _: &Tree<'a>, _: u32, _: Option<String>) {}
            }
            read_documents(text, &LIMITS, &mut One(&mut ports)).unwrap();
            ports.pop().unwrap()
        };
        assert_eq!(
            read_port("name: 80\nport: 80\nprotocol:\n"),
            Ok(Port {
                name: "80".to_owned(),
                port: 80,
                protocol: None
            })
        );
        assert_eq!(
            read_port("name: a\nport: http\n"),
            Err("invalid type: string \"http\", expected i32".to_owned())
        );
        assert_eq!(
            read_port("name: a\nport: \"80\"\n"),
            Err("invalid type: string \"80\", expected i32".to_owned())
        );
        assert_eq!(
            read_port("name: a\nport: 99999999999\n"),
            Err("invalid value: integer `99999999999`, expected i32".to_owned())
        );
        assert_eq!(
            read_port("name: [a]\nport: 1\n"),
            Err("invalid type: sequence, expected a string".to_owned())
        );
    }

    #[test]
    fn aliases_and_merge_keys_read_as_their_anchors() {
        let text = "defaults: &defaults {protocol: TCP, port: 80}\n\
                    a: *defaults\n\
                    b:\n  <<: *defaults\n  port: 81\n\
                    c:\n  <<: [{x: 1}, *defaults]\n";
        assert_eq!(
            documents(text),
            [Ok(serde_json::json!({
                "defaults": {"protocol": "TCP", "port": 80},
                "a": {"protocol": "TCP", "port": 80},
                "b": {"port": 81, "protocol": "TCP"},
                "c": {"x": 1, "protocol": "TCP", "port": 80},
            }))]
        );
    }

    #[test]
    fn a_document_with_a_repeated_or_complex_key_is_refused_alone() {
        let text = "a: 1\na: 2\n---\n? [x]\n: 1\n---\nok: 1\n---\n&r [*r]\n";
        let documents = documents(text);
        assert_eq!(documents.len(), 4);
        assert!(
            documents[0]
                .as_ref()
                .unwrap_err()
                .contains("has the key \"a\" twice")
        );
        assert!(documents[1].as_ref().unwrap_err().contains("not a scalar"));
        assert_eq!(documents[2], Ok(serde_json::json!({"ok": 1})));
        assert!(documents[3].as_ref().unwrap_err().contains("encloses it"));
    }

    #[test]
    fn a_wide_mapping_is_checked_for_repeated_keys() {
        let mut text = String::from("annotations:\n");
        for key in 0..100_000 {
            text.push_str(&format!("  k{key}: v\n"));
        }
        text.push_str("  k7: again\n");
        let documents = documents(&text);
        assert!(documents[0].as_ref().unwrap_err().contains("\"k7\" twice"));
    }

    #[test]
    fn nesting_past_the_limit_is_refused_as_the_parser_reaches_it() {
        let flow = format!("a: {}{}\n", "[".repeat(60_000), "]".repeat(60_000));
        let mut block = String::new();
        for level in 0..1_000 {
            block.push_str(&format!("{}a{level}:\n", " ".repeat(level)));
        }
        let mixed = format!(
            "{}x: {}{}\n",
            "- ".repeat(40),
            "[".repeat(30),
            "]".repeat(30)
        );
        for text in [flow, block, mixed] {
            let error = read(&text).err().expect("refused");
            assert_eq!(error.reason, "too_deep", "{error}");
        }
        let just_fits = format!("a: {}{}\n", "[".repeat(63), "]".repeat(63));
        assert!(read(&just_fits).is_ok());
    }

    #[test]
    fn aliases_count_what_they_expand_to() {
        // An anchor of 1,000 items used 1,000 times: 1M nodes from a few kilobytes.
        let items: Vec<String> = (0..1_000).map(|i| format!("x{i}")).collect();
        let bomb = format!(
            "a: &a [{}]\nb: [{}]\n",
            items.join(", "),
            vec!["*a"; 1_000].join(", ")
        );
        // Billion laughs: each level aliases the one before ten times.
        let mut laughs = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..9 {
            let uses = vec![format!("*l{}", level - 1); 10].join(", ");
            laughs.push_str(&format!("l{level}: &l{level} [{uses}]\n"));
        }
        for text in [bomb, laughs] {
            let error = read(&text).err().expect("refused");
            assert_eq!(error.reason, "alias_expansion", "{error}");
        }
        // Aliases may still add to the depth: an anchor 40 deep used 40 deep.
        let deep_anchor = format!(
            "a: &a {}{}\nb: {}*a{}\n",
            "[".repeat(40),
            "]".repeat(40),
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(read(&deep_anchor).err().unwrap().reason, "too_deep");
        // Used a little, an anchor is fine.
        assert!(read("a: &a [1, 2]\nb: [*a, *a]\n").is_ok());
    }

    #[test]
    fn list_items_are_read_one_at_a_time() {
        let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for item in 0..1_000 {
            text.push_str(&format!(
                "- {{kind: Service, metadata: {{name: s{item}}}}}\n"
            ));
        }
        text.push_str("- {a: 1, a: 2}\nmetadata: {}\n");
        let collect = read(&text).unwrap();
        assert_eq!(collect.items.len(), 1_001);
        assert_eq!(
            collect.items[999],
            Ok(serde_json::json!({"kind": "Service", "metadata": {"name": "s999"}}))
        );
        assert!(collect.items[1_000].is_err(), "the bad item alone");
        assert!(
            collect.largest_tree < 50,
            "items were held at once: {} nodes",
            collect.largest_tree
        );
        let document = collect.documents[0].as_ref().unwrap();
        assert_eq!(document["kind"], "List");
    }

    #[test]
    fn an_anchor_in_a_list_item_stays_for_the_items_after_it() {
        let text = "kind: List\nitems:\n- &first {kind: Service}\n- *first\n";
        let collect = read(text).unwrap();
        let service = serde_json::json!({"kind": "Service"});
        assert_eq!(collect.items, [Ok(service.clone()), Ok(service)]);
    }

    #[test]
    fn syntax_errors_say_where() {
        let error = read("a: [1, 2\nb: 3\n").err().unwrap();
        assert_eq!(error.reason, "invalid_yaml");
        assert!(error.message.contains("line"), "{error}");
    }

    #[test]
    fn json_is_yaml() {
        let text = r#"{"kind": "Service", "spec": {"ports": [{"port": 80}]}, "n": null}"#;
        let expected: BTreeMap<String, serde_json::Value> = serde_json::from_str(text).unwrap();
        assert_eq!(
            documents(text),
            [Ok(serde_json::to_value(expected).unwrap())]
        );
    }
}
