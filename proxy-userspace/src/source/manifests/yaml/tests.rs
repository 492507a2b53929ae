//! The YAML reader against what Kubernetes manifests and hostile files hold: typing, aliases
//! and merge keys, repeated keys, nesting and expansion limits, List items one at a time.

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
    fn document(&mut self, _: usize, tree: &Tree<'a>, root: Option<u32>, error: Option<String>) {
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
