//! Reading one manifest file, off the daemon's event loop: refused unread when too large,
//! skipped unparsed when its contents did not change, else parsed as a stream of YAML
//! documents (JSON is YAML) straight into records.
//!
//! Each document is read by [`super::yaml`] into a small tree of borrowed scalars (a `kind:
//! List` one item at a time) under the limits an API server sets a request — nesting
//! depth (the 60 000-deep file that took libyaml seconds is refused at level 65 in
//! microseconds), alias expansion (a small file can't expand into gigabytes), input size —
//! then typed, checked and interpreted into a record, and dropped: no file's trees are
//! ever held at once.

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::decode::{Decoded, Decoder, Located};
use super::yaml::{TreeLimits, YamlError, read_documents};

/// How much one file may ask of the parser (`--manifests-max-file-bytes`,
/// `--manifests-max-depth`, `--manifests-max-alias-expansion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// A larger file is refused before it is read.
    pub max_file_bytes: u64,
    /// The deepest nesting of mappings and sequences in a document (Kubernetes objects
    /// stay under 20, `managedFields` included).
    pub max_depth: usize,
    /// How many nodes aliases (`*name`) may stand for in a document, all uses together
    /// (nested aliases at their expanded size): what anchors expand to.
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
        documents: Vec<(Location, Decoded)>,
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
/// meanwhile is caught by the parser's own limit). foldhash, several times faster than
/// SipHash on long input (a 168 MB file: SipHash took 0.1 s before parsing could start).
fn content_hash(file: &Path, limit: u64) -> io::Result<ContentHash> {
    let mut reader = File::open(file)?.take(limit.saturating_add(1));
    let mut hasher = foldhash::quality::FixedState::with_seed(0).build_hasher();
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
/// markers and its parts parsed side by side, one thread a core ([`parse_parts`]).
fn parse_file(
    file: &Path,
    limits: &ParseLimits,
    size: u64,
) -> Result<Vec<(Location, Decoded)>, (&'static str, String)> {
    let unreadable = |error: io::Error| ("unreadable", format!("can't be read: {error}"));
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    File::open(file)
        .and_then(|opened| {
            opened
                .take(limits.max_file_bytes.saturating_add(1))
                .read_to_end(&mut bytes)
        })
        .map_err(unreadable)?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err((
            "too_large",
            format!(
                "grew past --manifests-max-file-bytes {} while being read; not read",
                limits.max_file_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(&bytes).map_err(|error| not_utf8(&bytes, &error))?;
    let language = if file
        .extension()
        .is_some_and(|extension| extension == "json")
    {
        "JSON"
    } else {
        "YAML"
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let parts = if text.len() as u64 >= PARALLEL_FROM_BYTES && cores > 1 {
        split_documents(text, cores * PARTS_PER_CORE)
    } else {
        vec![text]
    };
    let tree_limits = TreeLimits {
        max_depth: limits.max_depth,
        max_alias_expansion: limits.max_alias_expansion,
    };
    let parse = |part: &str| -> Result<Vec<Located>, YamlError> {
        let mut decoder = Decoder::default();
        read_documents(part, &tree_limits, &mut decoder)?;
        Ok(decoder.decoded)
    };
    let parsed = parse_parts(&parts, cores, parse);
    let mut decoded = Vec::new();
    let mut documents_before = 0;
    for part in parsed {
        let part = part.map_err(|error| {
            (
                error.reason,
                format!("invalid {language}: {}", error.message),
            )
        })?;
        let mut documents_here = 0;
        for located in part {
            documents_here = documents_here.max(located.document + 1);
            let document = documents_before + located.document + 1;
            let location = Location {
                document,
                item: located.item.map(|item| item + 1),
            };
            decoded.push((location, located.decoded));
        }
        documents_before += documents_here;
    }
    Ok(decoded)
}

/// Where a document is in its file, counted from 1 (`document 3`, `document 1 item 2`);
/// written out only for a document that is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Location {
    document: usize,
    item: Option<usize>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {}", self.document)?;
        match self.item {
            Some(item) => write!(f, " item {item}"),
            None => Ok(()),
        }
    }
}

/// Files at least this large are parsed in parts, side by side.
pub(super) const PARALLEL_FROM_BYTES: u64 = 1 << 20;

/// A large file is cut into this many parts a core, which the cores take one at a time:
/// when a core is busy with something else, the others parse its share instead of
/// waiting for its one half.
const PARTS_PER_CORE: usize = 4;

/// Each of `parts` parsed, in order: the calling thread and `cores - 1` more take the
/// next unparsed part until none is left.
fn parse_parts<'a, T: Send>(
    parts: &[&'a str],
    cores: usize,
    parse: impl Fn(&'a str) -> T + Sync,
) -> Vec<T> {
    if parts.len() == 1 {
        return vec![parse(parts[0])];
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(part) = parts.get(index) else {
                return done;
            };
            done.push((index, parse(part)));
        }
    };
    let mut parsed: Vec<(usize, T)> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..cores.min(parts.len()))
            .map(|_| scope.spawn(work))
            .collect();
        let mut parsed = work();
        for helper in helpers {
            parsed.extend(helper.join().expect("a parser thread panicked"));
        }
        parsed
    });
    parsed.sort_unstable_by_key(|(index, _)| *index);
    parsed.into_iter().map(|(_, part)| part).collect()
}

/// Where a file stops being UTF-8, which YAML and JSON must be.
fn not_utf8(bytes: &[u8], error: &std::str::Utf8Error) -> (&'static str, String) {
    let offset = error.valid_up_to();
    let line = bytes[..offset]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1;
    (
        "not_utf8",
        format!("is not UTF-8: invalid bytes at line {line} (byte offset {offset})"),
    )
}

/// `text` cut into about `parts` pieces at document markers (`---` at the start of a line:
/// YAML forbids that line inside any scalar, so it always starts a document). Whole when
/// it has directives (`%YAML`, which belong to the document after them) or few markers.
/// Found by substring search, not line by line: a 170 MB file is cut in milliseconds.
fn split_documents(text: &str, parts: usize) -> Vec<&str> {
    if text.starts_with('%') || text.contains("\n%") {
        return vec![text];
    }
    let target = text.len() / parts.max(1) + 1;
    let mut pieces = Vec::new();
    let mut start = 0;
    // The first marker line that starts at least `target` bytes into the piece.
    while let Some(at) = next_marker(text, start + target) {
        pieces.push(&text[start..at]);
        start = at;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Where the first document marker line at or after `from` starts.
fn next_marker(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut search = from.checked_sub(1)?;
    loop {
        let found = search
            + bytes
                .get(search..)?
                .windows(4)
                .position(|window| window == b"\n---")?;
        let at = found + 1;
        if matches!(bytes.get(at + 3), None | Some(b' ' | b'\t' | b'\r' | b'\n')) {
            return Some(at);
        }
        search = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_in_order_whichever_core_parsed_them() {
        let parts: Vec<String> = (0..37).map(|i| i.to_string()).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        for cores in [1, 2, 3, 64] {
            let parsed = parse_parts(&parts, cores, |part| part.parse::<usize>().unwrap());
            assert_eq!(parsed, (0..37).collect::<Vec<_>>(), "{cores} cores");
        }
    }

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
        let later = "a: 1\n---\nb: 2\n...\n%YAML 1.2\n---\nc: 3\n";
        assert_eq!(split_documents(later, 3), [later]);
        // A marker needs the end of its line or a space after it.
        assert_eq!(
            split_documents("a: 1\n---x\n---\tb\n", 3),
            ["a: 1\n---x\n", "---\tb\n"]
        );
    }
}
