//! The plain block YAML that tools write (kubectl, Helm, client libraries, generators), read
//! line by line into the same trees the parser's events build, several times faster than
//! the parser: at 100 000 Services the parser was most of the first programming.
//!
//! It reads only what it is sure of, and hands the rest of the file over (see
//! [`super::read_documents`]): block mappings and sequences indented with spaces, keys
//! of letters, digits and `-_./`, plain scalars on one line, quoted scalars on one line
//! (simple escapes), flow sequences and mappings on one line, comments, `---` between
//! documents. Anything else — anchors, aliases, tags, block scalars, multi-line scalars,
//! tabs, non-ASCII text, directives, a repeated key, an empty document, nesting near the
//! limit — and the parser reads the file, so its errors and its reading of every corner
//! of YAML stay what they were.

use std::borrow::Cow;

use super::{Builder, DocumentSink, Node, Scalar, TreeLimits};

/// The fast reader met a document it does not read; `delivered` documents before it went
/// to the sink.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct HandedOver {
    pub delivered: usize,
}

/// Nesting left to the parser (Kubernetes objects stay under 20 levels).
const MAX_DEPTH: usize = 32;

/// Reads every document of `text` into `sink`, or stops at the first it does not read.
pub(super) fn read_documents<'a>(
    text: &'a str,
    limits: &TreeLimits,
    sink: &mut impl DocumentSink<'a>,
) -> Result<(), HandedOver> {
    let max_depth = limits.max_depth.min(MAX_DEPTH);
    let mut builder = Builder::new(*limits);
    let mut lines: Vec<Line<'a>> = Vec::new();
    let mut steps: Vec<Step<'a>> = Vec::new();
    let mut delivered = 0;
    let mut in_document = false;
    let mut document = |lines: &[Line<'a>], steps: &mut Vec<Step<'a>>, delivered: &mut usize| {
        steps.clear();
        let mut reader = Reader {
            lines,
            at: 0,
            depth: 0,
            max_depth,
            steps,
        };
        let read = reader.document();
        if read.is_none() {
            return Err(HandedOver {
                delivered: *delivered,
            });
        }
        builder.replay(steps.drain(..), *delivered, sink);
        *delivered += 1;
        Ok(())
    };
    for raw in text.split_inclusive('\n') {
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        if !line.bytes().all(|byte| (0x20..0x7f).contains(&byte)) {
            return Err(HandedOver { delivered });
        }
        let content = line.trim_end_matches(' ');
        let indent = content.len() - content.trim_start_matches(' ').len();
        let content = &content[indent..];
        if indent == 0 && content.starts_with("---") {
            if content != "---" {
                return Err(HandedOver { delivered });
            }
            if in_document {
                if lines.is_empty() {
                    return Err(HandedOver { delivered });
                }
                document(&lines, &mut steps, &mut delivered)?;
                lines.clear();
            }
            in_document = true;
            continue;
        }
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent == 0 && (content.starts_with("...") || content.starts_with('%')) {
            return Err(HandedOver { delivered });
        }
        in_document = true;
        lines.push(Line { indent, content });
    }
    if !in_document || lines.is_empty() {
        return Err(HandedOver { delivered });
    }
    document(&lines, &mut steps, &mut delivered)
}

/// A line with content: its indentation and the rest, trailing spaces cut.
#[derive(Clone, Copy, Debug)]
struct Line<'a> {
    indent: usize,
    content: &'a str,
}

/// What the parser's events would be, for the builder.
#[derive(Debug)]
enum Step<'a> {
    Scalar(Scalar<'a>),
    Open { mapping: bool },
    Close,
}

impl<'a> Builder<'a> {
    /// Builds one document from `steps` and hands it (and its List items) to the sink.
    fn replay(
        &mut self,
        steps: impl Iterator<Item = Step<'a>>,
        document: usize,
        sink: &mut impl DocumentSink<'a>,
    ) {
        self.reset();
        for step in steps {
            match step {
                Step::Scalar(scalar) => {
                    self.leaf(Node::Scalar(scalar), 0, 1, 0);
                    self.item_done(document, sink);
                }
                Step::Open { mapping } => {
                    // The reader keeps below the depth limit: this can't be refused.
                    let _ = self.open(mapping, 0, 0);
                }
                Step::Close => {
                    self.close(0);
                    self.item_done(document, sink);
                }
            }
        }
        self.document_done(document, sink);
    }
}

/// `None`: not read here (the parser reads it).
type Read = Option<()>;

struct Reader<'l, 'a, 's> {
    lines: &'l [Line<'a>],
    at: usize,
    depth: usize,
    max_depth: usize,
    steps: &'s mut Vec<Step<'a>>,
}

impl<'a> Reader<'_, 'a, '_> {
    fn document(&mut self) -> Read {
        let first = self.peek()?;
        if first.indent != 0 {
            return None;
        }
        self.block(0)?;
        // Everything read: a line left over is indented in a way the reader does not know.
        (self.at == self.lines.len()).then_some(())
    }

    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.at).copied()
    }

    /// Whether the next line is indented more than `indent`.
    fn deeper_than(&self, indent: usize) -> bool {
        self.peek().is_some_and(|line| line.indent > indent)
    }

    fn open(&mut self, mapping: bool) -> Read {
        if self.depth + 1 >= self.max_depth {
            return None;
        }
        self.depth += 1;
        self.steps.push(Step::Open { mapping });
        Some(())
    }

    fn close(&mut self) {
        self.depth -= 1;
        self.steps.push(Step::Close);
    }

    /// An empty value, as the parser gives it.
    fn null(&mut self) {
        self.steps.push(Step::Scalar(plain("~")));
    }

    /// The block node whose first line is the next, at `indent`.
    fn block(&mut self, indent: usize) -> Read {
        let line = self.peek()?;
        if is_entry(line.content) {
            return self.sequence(indent);
        }
        let (key, rest) = split_key(line.content)?;
        self.at += 1;
        self.mapping(indent, key, rest)
    }

    /// A block sequence whose entries (`- `) sit at `indent`, the first one next.
    fn sequence(&mut self, indent: usize) -> Read {
        self.open(false)?;
        while let Some(line) = self.peek()
            && line.indent == indent
            && is_entry(line.content)
        {
            self.at += 1;
            let after_dash = &line.content[1..];
            let item = after_dash.trim_start_matches(' ');
            if item.is_empty() {
                match self.peek() {
                    Some(next) if next.indent > indent => self.block(next.indent)?,
                    _ => self.null(),
                }
                continue;
            }
            if is_entry(item) || item.starts_with('#') {
                return None;
            }
            let column = indent + 1 + (after_dash.len() - item.len());
            match split_key(item) {
                // A mapping starting on the entry's line: its keys line up with the first.
                Some((key, rest)) => self.mapping(column, key, rest)?,
                None => {
                    self.value(item)?;
                    if self.deeper_than(indent) {
                        return None;
                    }
                }
            }
        }
        if self.deeper_than(indent) {
            return None;
        }
        self.close();
        Some(())
    }

    /// A block mapping whose keys sit at `indent`; the first key's line is read already.
    fn mapping(&mut self, indent: usize, first_key: &'a str, first_rest: &'a str) -> Read {
        self.open(true)?;
        let mut keys: Vec<Cow<'a, str>> = Vec::new();
        let mut entry = Some((first_key, first_rest));
        loop {
            let (key, rest) = match entry.take() {
                Some(entry) => entry,
                None => match self.peek() {
                    Some(line) if line.indent == indent && !is_entry(line.content) => {
                        self.at += 1;
                        split_key(line.content)?
                    }
                    _ => break,
                },
            };
            let key = key_scalar(key)?;
            // A repeated key is the parser's to report.
            if keys.contains(&key.text) {
                return None;
            }
            keys.push(key.text.clone());
            self.steps.push(Step::Scalar(key));
            if rest.is_empty() {
                match self.peek() {
                    Some(next) if next.indent > indent => self.block(next.indent)?,
                    // A sequence may sit at its key's indentation.
                    Some(next) if next.indent == indent && is_entry(next.content) => {
                        self.sequence(indent)?;
                    }
                    _ => self.null(),
                }
            } else {
                self.value(rest)?;
                if self.deeper_than(indent) {
                    return None;
                }
            }
        }
        if self.deeper_than(indent) {
            return None;
        }
        self.close();
        Some(())
    }

    /// A value on the rest of a line: flow collection, quoted or plain scalar, and maybe a
    /// comment after it.
    fn value(&mut self, text: &'a str) -> Read {
        let rest = match text.as_bytes()[0] {
            b'[' | b'{' => self.flow(text)?,
            b'"' | b'\'' => {
                let (scalar, rest) = quoted(text)?;
                self.steps.push(Step::Scalar(scalar));
                rest
            }
            _ => {
                let (scalar, rest) = plain_in_block(text)?;
                self.steps.push(Step::Scalar(plain(scalar)));
                rest
            }
        };
        comment_or_nothing(rest)
    }

    /// A flow collection at the start of `text`, on one line; what follows it.
    fn flow(&mut self, text: &'a str) -> Option<&'a str> {
        let mapping = text.starts_with('{');
        let close = if mapping { '}' } else { ']' };
        self.open(mapping)?;
        let mut rest = text[1..].trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(close) {
            self.close();
            return Some(after);
        }
        let mut keys: Vec<Cow<'a, str>> = Vec::new();
        loop {
            if mapping {
                let (key, after) = match rest.as_bytes().first()? {
                    b'"' | b'\'' => quoted(rest)?,
                    _ => {
                        let (key, after) = plain_in_flow(rest)?;
                        (key_scalar(key)?, after)
                    }
                };
                if keys.contains(&key.text) {
                    return None;
                }
                keys.push(key.text.clone());
                self.steps.push(Step::Scalar(key));
                rest = after.strip_prefix(": ")?.trim_start_matches(' ');
            }
            rest = match rest.as_bytes().first()? {
                b'[' | b'{' => self.flow(rest)?,
                b'"' | b'\'' => {
                    let (scalar, after) = quoted(rest)?;
                    self.steps.push(Step::Scalar(scalar));
                    after
                }
                _ => {
                    let (scalar, after) = plain_in_flow(rest)?;
                    self.steps.push(Step::Scalar(plain(scalar)));
                    after
                }
            }
            .trim_start_matches(' ');
            if let Some(after) = rest.strip_prefix(close) {
                self.close();
                return Some(after);
            }
            rest = rest.strip_prefix(',')?.trim_start_matches(' ');
            // `[a, ]`, `[a,,b]`: the parser's to read.
            if rest.starts_with([',', ']', '}']) {
                return None;
            }
        }
    }
}

fn plain(text: &str) -> Scalar<'_> {
    Scalar {
        text: Cow::Borrowed(text),
        plain: true,
        tag: None,
    }
}

/// A block sequence entry: `-` alone or followed by a space.
fn is_entry(content: &str) -> bool {
    content == "-" || content.starts_with("- ")
}

/// `key: rest` (or `key:` at the end of the line): the key's text and the rest, spaces
/// and a comment after the colon cut. `None` when the line is no simple key.
fn split_key(content: &str) -> Option<(&str, &str)> {
    let end = if content.starts_with(['"', '\'']) {
        let (_, after) = quoted(content)?;
        content.len() - after.len()
    } else {
        content
            .bytes()
            .position(|byte| !is_key_byte(byte))
            .unwrap_or(content.len())
    };
    let (key, after) = content.split_at(end);
    let rest = match after.strip_prefix(':')? {
        "" => "",
        rest if rest.starts_with(' ') => rest.trim_start_matches(' '),
        _ => return None,
    };
    let rest = if rest.starts_with('#') { "" } else { rest };
    (!key.is_empty()).then_some((key, rest))
}

/// Bytes of a plain key: what Kubernetes field names, label and annotation keys use.
fn is_key_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/')
}

/// A key as a scalar: quoted, or plain of key bytes not starting like an indicator.
fn key_scalar(key: &str) -> Option<Scalar<'_>> {
    if key.starts_with(['"', '\'']) {
        let (scalar, rest) = quoted(key)?;
        return rest.is_empty().then_some(scalar);
    }
    let first = *key.as_bytes().first()?;
    (first.is_ascii_alphanumeric() && key.bytes().all(is_key_byte)).then(|| plain(key))
}

/// Whether a plain scalar may start with this byte here (not an indicator; `-` only as
/// in `-1`).
fn starts_plain(text: &str) -> bool {
    match text.as_bytes() {
        [b'-', next, ..] => next.is_ascii_alphanumeric() || *next == b'.',
        [first, ..] => !b"-?:,[]{}#&*!|>'\"%@`".contains(first),
        [] => false,
    }
}

/// A plain scalar taking the rest of a block line: up to a comment; `None` when it holds
/// what would make it something else (`: `, a trailing `:`) or flow indicators.
fn plain_in_block(text: &str) -> Option<(&str, &str)> {
    if !starts_plain(text) {
        return None;
    }
    let end = text.find(" #").unwrap_or(text.len());
    let scalar = text[..end].trim_end_matches(' ');
    if scalar.contains(": ") || scalar.ends_with(':') || scalar.contains(['[', ']', '{', '}']) {
        return None;
    }
    Some((scalar, &text[end..]))
}

/// A plain scalar inside a flow collection: up to `,`, `]`, `}` or `: `; `None` for what
/// the reader leaves to the parser (a `:` before one of those, a comment).
fn plain_in_flow(text: &str) -> Option<(&str, &str)> {
    if !starts_plain(text) {
        return None;
    }
    let bytes = text.as_bytes();
    let mut end = 0;
    while end < bytes.len() {
        match bytes[end] {
            b',' | b']' | b'}' | b'[' | b'{' => break,
            b':' if bytes
                .get(end + 1)
                .is_none_or(|next| b" ,]}[{".contains(next)) =>
            {
                break;
            }
            b'#' if bytes[end - 1] == b' ' => return None,
            _ => end += 1,
        }
    }
    let scalar = text[..end].trim_end_matches(' ');
    (!scalar.is_empty()).then_some((scalar, &text[end..]))
}

/// A quoted scalar at the start of `text`, on one line: its text and what follows.
/// Double-quoted ones with escapes other than `\"`, `\\`, `\/`, `\n`, `\t` are left to
/// the parser.
fn quoted(text: &str) -> Option<(Scalar<'_>, &str)> {
    let quote = text.as_bytes()[0];
    let body = &text[1..];
    let bytes = body.as_bytes();
    let mut owned: Option<String> = None;
    let mut start = 0;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if quote == b'\'' && byte == b'\'' {
            if bytes.get(at + 1) == Some(&b'\'') {
                owned
                    .get_or_insert_with(String::new)
                    .push_str(&body[start..=at]);
                at += 2;
                start = at;
                continue;
            }
            break;
        }
        if quote == b'"' && byte == b'"' {
            break;
        }
        if quote == b'"' && byte == b'\\' {
            let unescaped = match bytes.get(at + 1)? {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'n' => '\n',
                b't' => '\t',
                _ => return None,
            };
            let text = owned.get_or_insert_with(String::new);
            text.push_str(&body[start..at]);
            text.push(unescaped);
            at += 2;
            start = at;
            continue;
        }
        at += 1;
    }
    if at >= bytes.len() {
        return None; // not closed on this line
    }
    let text = match owned {
        Some(mut text) => {
            text.push_str(&body[start..at]);
            Cow::Owned(text)
        }
        None => Cow::Borrowed(&body[..at]),
    };
    let scalar = Scalar {
        text,
        plain: false,
        tag: None,
    };
    Some((scalar, &body[at + 1..]))
}

/// What may follow a value on its line: nothing, or a comment after a space.
fn comment_or_nothing(rest: &str) -> Read {
    let comment = rest.trim_start_matches(' ');
    (comment.is_empty() || (comment.starts_with('#') && rest.starts_with(' '))).then_some(())
}

#[cfg(test)]
mod tests;
