//! The fast reader against the parser: whatever it reads, it reads into the very trees
//! the parser's events build; whatever it is not sure of, it hands over.

use super::super::{
    DocumentSink, Tree, TreeLimits, YamlError, parse_documents, read_documents as read_all,
};
use super::*;

const LIMITS: TreeLimits = TreeLimits {
    max_depth: 64,
    max_alias_expansion: 10_000,
};

/// Each document and List item as its nodes, in the order the sink got them.
#[derive(Debug, Default, PartialEq)]
struct Trees(Vec<String>);

impl<'a> DocumentSink<'a> for Trees {
    fn document(
        &mut self,
        index: usize,
        tree: &Tree<'a>,
        root: Option<u32>,
        error: Option<String>,
    ) {
        let nodes = root.map(|root| format!("{:?}", &tree.nodes[root as usize..]));
        self.0
            .push(format!("document {index}: {nodes:?} {error:?}"));
    }

    fn list_item(&mut self, index: usize, tree: &Tree<'a>, item: u32, error: Option<String>) {
        let nodes = &tree.nodes[item as usize..tree.end(item) as usize];
        self.0
            .push(format!("document {index} item: {nodes:?} {error:?}"));
    }
}

fn parsed(text: &str) -> Result<Trees, YamlError> {
    let mut trees = Trees::default();
    parse_documents(text, &LIMITS, &mut trees)?;
    Ok(trees)
}

/// Reads `text` fast; asserts it reads what the parser reads (the documents it hands on
/// before it hands over included). Whether it read it all.
fn reads_like_the_parser(text: &str) -> bool {
    let mut fast = Trees::default();
    let read = super::read_documents(text, &LIMITS, &mut fast);
    let mut whole = Trees::default();
    let whole_read = read_all(text, &LIMITS, &mut whole);
    let Ok(expected) = parsed(text) else {
        assert!(read.is_err(), "read fast what the parser refuses: {text:?}");
        assert_eq!(whole_read, parsed(text).map(|_| ()), "{text:?}");
        return false;
    };
    match read {
        Ok(()) => assert_eq!(fast, expected, "{text}"),
        Err(HandedOver { delivered }) => {
            assert_eq!(fast.0.len(), delivered, "{text:?}");
            assert_eq!(fast.0[..], expected.0[..fast.0.len()], "{text:?}");
        }
    }
    // And the reader as a whole gives what the parser gives.
    assert_eq!(whole_read, Ok(()));
    assert_eq!(whole, expected, "{text:?}");
    read.is_ok()
}

const SERVICE: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: svc-0
  namespace: bench
  labels:
    app.kubernetes.io/name: web
  annotations:
    ebpf-proxy.io/lb-algorithm: maglev
    note: 'it''s here'
    other: \"a \\\"quoted\\\" \\\\ text\"
spec:
  type: ClusterIP   # the default
  clusterIP: 198.19.0.0
  clusterIPs: [198.19.0.0]
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 8080
  selector: {}
  externalIPs: []
  sessionAffinityConfig:
    clientIP: {timeoutSeconds: 10800}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-0-bench
  namespace: bench
  labels:
    kubernetes.io/service-name: svc-0
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
endpoints:
  - addresses: [198.18.2.0]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: lab-node
    hints:
      forZones:
      - name: zone-a
  - addresses:
    - \"198.18.2.1\"
    conditions:
      ready: false
    zone:
    nodeName: ~
";

#[test]
fn what_tools_write_is_read_fast_into_the_parsers_trees() {
    assert!(reads_like_the_parser(SERVICE));
    assert!(reads_like_the_parser("a: 1\n---\nb: 2\n"));
    assert!(reads_like_the_parser(
        "# a comment first\n\n---\nkind: x\n\n# between\nb: -1\n"
    ));
    assert!(reads_like_the_parser("a:\n  - x\n  -\n    b: c\n"));
    assert!(reads_like_the_parser(
        "addresses: [2001:db8::1, \"2001:db8::2\"]\nurl: http://x/y?z#w\n"
    ));
    assert!(reads_like_the_parser(
        "k: v\ne:\nf: []\ng: {a: [1, {b: c}]}\nh: 'x'\n"
    ));
    assert!(reads_like_the_parser("a:\n- b\n- c\nd: e\n"));
    assert!(reads_like_the_parser("- a\n- b: c\n  d: e\n-\n  - f\n"));
    assert!(reads_like_the_parser("\"quoted key\": 1\n'single': 2\n"));
}

#[test]
fn a_list_is_handed_on_item_by_item_as_the_parser_does() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  metadata: {name: a}\n\
                - kind: Service\n  metadata:\n    name: b\n";
    assert!(reads_like_the_parser(text));
}

#[test]
fn what_it_is_not_sure_of_goes_to_the_parser() {
    for text in [
        // Anchors, aliases, merge keys, tags, block and multi-line scalars.
        "a: &x 1\nb: *x\n",
        "base: {a: 1}\nc:\n  <<: {a: 2}\n",
        "a: !!str 80\n",
        "a: |\n  text\n",
        "a: >-\n  folded\n",
        "a: plain\n  continued\n",
        "a: \"open\n  quote\"\n",
        // Tabs, CRLF, non-ASCII, directives, document ends, flow across lines.
        "a:\tb\n",
        "a: b\r\n",
        "a: é\n",
        "%YAML 1.2\n---\na: b\n",
        "a: b\n...\n",
        "a: [1,\n  2]\n",
        // JSON, a scalar document, an empty document, a repeated key.
        "{\"a\": 1}\n",
        "just text\n",
        "a: 1\n---\n---\nb: 2\n",
        "a: 1\na: 2\n",
        "a: {b: 1, b: 2}\n",
        // Odd indentation, a mapping in a value, trailing commas, comments without space.
        "a:\n    b: 1\n  c: 2\n",
        "a: b: c\n",
        "a: [1, ]\n",
        "a: 'x'#c\n",
        "a: [x #c]\n",
        "",
        "# only a comment\n",
    ] {
        assert!(!reads_like_the_parser(text), "read fast: {text:?}");
    }
}

#[test]
fn errors_are_the_parsers_documents_before_them_are_not_handed_on_twice() {
    // The second document repeats a key: the parser reports it, and the first document
    // reaches the sink once.
    let text = "a: 1\n---\nb: 1\nb: 2\n---\nc: 3\n";
    let mut whole = Trees::default();
    read_all(text, &LIMITS, &mut whole).unwrap();
    assert_eq!(Ok(&whole), parsed(text).as_ref());
    assert_eq!(whole.0.len(), 3);
    assert!(whole.0[1].contains("twice"), "{:?}", whole.0[1]);
    // A syntax error after documents read fast is the parser's error.
    let text = "a: 1\n---\nb: [\n";
    let mut trees = Trees::default();
    assert!(read_all(text, &LIMITS, &mut trees).is_err());
}

#[test]
fn nesting_near_the_limit_is_left_to_the_parser() {
    let limits = TreeLimits {
        max_depth: 3,
        max_alias_expansion: 10,
    };
    assert!(reads_like_the_parser("a:\n  b: 1\n"));
    // Three levels: the parser reads it, the fast reader leaves it to the parser.
    let three = "a:\n  b:\n    c: 1\n";
    assert_eq!(
        super::read_documents(three, &limits, &mut Trees::default()),
        Err(HandedOver { delivered: 0 })
    );
    assert!(read_all(three, &limits, &mut Trees::default()).is_ok());
    let four = "a:\n  b:\n    c:\n      d: 1\n";
    let error = read_all(four, &limits, &mut Trees::default()).unwrap_err();
    assert_eq!(error.reason, "too_deep");
}
