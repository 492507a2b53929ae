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

pub(super) use de::NodeDeserializer;
use scalar::Resolved;

mod de;
mod fast;
mod scalar;
#[cfg(test)]
mod tests;

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
///
/// The plain block YAML that tools write is read by [`fast`], several times faster than
/// the parser; at the first document it does not read (anything past that subset, or a
/// document the parser would refuse or report on), the parser reads the text from the
/// start and the documents [`fast`] handed on already are not handed on again — so every
/// error and every document is exactly what the parser alone would give.
pub(super) fn read_documents<'a>(
    text: &'a str,
    limits: &TreeLimits,
    sink: &mut impl DocumentSink<'a>,
) -> Result<(), YamlError> {
    let Err(fast::HandedOver { delivered }) = fast::read_documents(text, limits, sink) else {
        return Ok(());
    };
    let mut rest = Skipping {
        sink,
        skip: delivered,
    };
    parse_documents(text, limits, &mut rest)
}

/// A sink that leaves out the first `skip` documents (read already).
struct Skipping<'s, S> {
    sink: &'s mut S,
    skip: usize,
}

impl<'a, S: DocumentSink<'a>> DocumentSink<'a> for Skipping<'_, S> {
    fn document(
        &mut self,
        index: usize,
        tree: &Tree<'a>,
        root: Option<u32>,
        error: Option<String>,
    ) {
        if index >= self.skip {
            self.sink.document(index, tree, root, error);
        }
    }

    fn list_item(&mut self, index: usize, tree: &Tree<'a>, item: u32, error: Option<String>) {
        if index >= self.skip {
            self.sink.list_item(index, tree, item, error);
        }
    }
}

/// [`read_documents`] with granit-parser's events: all of YAML.
fn parse_documents<'a>(
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
                builder.document_done(document, sink);
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

    /// Hands the complete document to the sink.
    fn document_done(&mut self, document: usize, sink: &mut impl DocumentSink<'a>) {
        let root = (!self.tree.nodes.is_empty()).then_some(0);
        let error = self.document_error.take();
        sink.document(document, &self.tree, root, error);
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
