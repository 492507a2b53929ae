//! Hostile and broken objects, as an operator's typo, a bad generator or a misbehaving API
//! server would hand them to the daemon: one catalogue for every test that feeds them in —
//! through the manifests directory and through the test API server, in process and to the
//! real daemon — so both sources are held to the same outcome for each.
//!
//! Every object lives in namespace [`NAMESPACE`], away from the lab's Services, and names
//! what is wrong with it. [`HostileObject::expected`] says how the daemon must take it: a
//! refusal of the whole object (logged with its name and reason, counted in
//! `ebpf_proxy_objects_rejected_total{kind,reason}`, never programmed), a field or port
//! skipped while the rest is programmed, or nothing to report at all (an extreme but valid
//! object). [`hostile_files`] adds what only a file can be: not YAML, not UTF-8, too deep,
//! an alias bomb, a key given twice, too large.

use serde_json::{Value, json};

/// Where the hostile objects live.
pub const NAMESPACE: &str = "hostile";

/// How the daemon must take an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Refused whole: `(kind, reason)` as counted in the metric.
    Refused(&'static str, &'static str),
    /// Programmed, one field or port skipped and reported: `(kind, reason)`.
    Skipped(&'static str, &'static str),
    /// Valid, if extreme: programmed (or, for a slice whose Service does not exist, kept
    /// until the Service comes), nothing reported.
    Accepted,
}

/// One hostile object, or a few that are hostile together (a contested frontend).
#[derive(Clone, Debug)]
pub struct HostileObject {
    /// What is wrong with it, and the name its objects carry.
    pub name: &'static str,
    /// The objects, as the API server stores them (JSON with kind and apiVersion).
    pub objects: Vec<Value>,
    pub expected: Expected,
}

impl HostileObject {
    /// The `namespace/name` that its problem must name (its last object's).
    pub fn key(&self) -> String {
        let last = self
            .objects
            .last()
            .expect("every hostile case has an object");
        let name = last["metadata"]["name"].as_str().unwrap_or_default();
        let shown: String = name.chars().take(64).collect();
        format!("{NAMESPACE}/{shown}")
    }
}

/// A ClusterIP Service of one TCP port, in [`NAMESPACE`]; `change` edits its JSON.
fn service(name: &str, cluster_ip: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    });
    change(&mut service);
    service
}

/// An IPv4 EndpointSlice of Service `service` with one endpoint; `change` edits its JSON.
fn slice(name: &str, service: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [{ "addresses": ["198.18.1.11"], "conditions": { "ready": true } }],
    });
    change(&mut slice);
    slice
}

fn case(name: &'static str, objects: Vec<Value>, expected: Expected) -> HostileObject {
    HostileObject {
        name,
        objects,
        expected,
    }
}

/// Every hostile object kind (25), none of which may disturb any other Service. Their
/// ClusterIPs are in 198.19.200.0/24, clear of the lab's.
pub fn hostile_objects() -> Vec<HostileObject> {
    use Expected::{Accepted, Refused, Skipped};
    let huge = "a".repeat(10_000);
    let many_endpoints: Vec<Value> = (0..10_000u32)
        .map(|i| {
            let address = format!("198.18.{}.{}", 100 + i / 250, 1 + i % 250);
            json!({ "addresses": [address], "conditions": { "ready": true } })
        })
        .collect();
    vec![
        case(
            "bad-cluster-ip",
            vec![service("bad-cluster-ip", "198.19.300.1", |_| {})],
            Refused("Service", "invalid"),
        ),
        case(
            "two-ipv4-cluster-ips",
            vec![service("two-ipv4-cluster-ips", "198.19.200.2", |s| {
                s["spec"]["clusterIPs"] = json!(["198.19.200.2", "198.19.200.3"]);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "ipv6-cluster-ip-in-ipv4-first",
            vec![service(
                "ipv6-cluster-ip-in-ipv4-first",
                "198.19.200.4",
                |s| {
                    s["spec"]["clusterIPs"] = json!(["198.19.200.4", "2001:db8::4"]);
                    s["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
                },
            )],
            Accepted,
        ),
        case(
            "port-zero",
            vec![service("port-zero", "198.19.200.5", |s| {
                s["spec"]["ports"][0]["port"] = json!(0);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "port-too-large",
            vec![service("port-too-large", "198.19.200.6", |s| {
                s["spec"]["ports"][0]["port"] = json!(70_000);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "node-port-too-large",
            vec![service("node-port-too-large", "198.19.200.7", |s| {
                s["spec"]["type"] = json!("NodePort");
                s["spec"]["ports"][0]["nodePort"] = json!(99_999);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "duplicate-port-names",
            vec![service("duplicate-port-names", "198.19.200.8", |s| {
                s["spec"]["ports"] = json!([
                    { "name": "http", "port": 80, "protocol": "TCP" },
                    { "name": "http", "port": 81, "protocol": "TCP" },
                ]);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "duplicate-ports",
            vec![service("duplicate-ports", "198.19.200.9", |s| {
                s["spec"]["ports"] = json!([
                    { "name": "a", "port": 80, "protocol": "TCP" },
                    { "name": "b", "port": 80, "protocol": "TCP" },
                ]);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "unknown-protocol",
            vec![service("unknown-protocol", "198.19.200.10", |s| {
                s["spec"]["ports"][0]["protocol"] = json!("HTTP");
            })],
            Refused("Service", "invalid"),
        ),
        // One port number, two protocols (valid): two frontends, as kube-proxy serves
        // them (SCTP was skipped before issue 13).
        case(
            "sctp-port",
            vec![service("sctp-port", "198.19.200.11", |s| {
                s["spec"]["ports"] = json!([
                    { "name": "http", "port": 80, "protocol": "TCP" },
                    { "name": "sctp", "port": 80, "protocol": "SCTP" },
                ]);
            })],
            Accepted,
        ),
        case(
            "huge-name",
            vec![service(
                &format!("huge-name-{huge}"),
                "198.19.200.12",
                |_| {},
            )],
            Refused("Service", "invalid"),
        ),
        case(
            "unknown-type",
            vec![service("unknown-type", "198.19.200.13", |s| {
                s["spec"]["type"] = json!("Balancer");
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "bad-external-ip",
            vec![service("bad-external-ip", "198.19.200.14", |s| {
                s["spec"]["externalIPs"] = json!(["999.1.1.1"]);
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "bad-source-ranges",
            vec![service("bad-source-ranges", "198.19.200.15", |s| {
                s["spec"]["type"] = json!("LoadBalancer");
                s["spec"]["loadBalancerSourceRanges"] = json!(["not-a-cidr"]);
            })],
            Skipped("Service", "skipped_field"),
        ),
        case(
            "affinity-timeout-zero",
            vec![service("affinity-timeout-zero", "198.19.200.16", |s| {
                s["spec"]["sessionAffinity"] = json!("ClientIP");
                s["spec"]["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": 0 } });
            })],
            Refused("Service", "invalid"),
        ),
        case(
            "contested-frontend",
            vec![
                service("contested-frontend-a", "198.19.200.17", |_| {}),
                service("contested-frontend-b", "198.19.200.17", |_| {}),
            ],
            Skipped("Service", "frontend_conflict"),
        ),
        case(
            "slice-bad-address",
            vec![slice("slice-bad-address", "slice-target", |s| {
                s["endpoints"][0]["addresses"] = json!(["198.18.1.300"]);
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-ipv6-in-ipv4",
            vec![slice("slice-ipv6-in-ipv4", "slice-target", |s| {
                s["endpoints"][0]["addresses"] = json!(["2001:db8::5"]);
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-no-addresses",
            vec![slice("slice-no-addresses", "slice-target", |s| {
                s["endpoints"][0]["addresses"] = json!([]);
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-port-too-large",
            vec![slice("slice-port-too-large", "slice-target", |s| {
                s["ports"][0]["port"] = json!(70_000);
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-unknown-protocol",
            vec![slice("slice-unknown-protocol", "slice-target", |s| {
                s["ports"][0]["protocol"] = json!("QUIC");
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-10k-endpoints",
            vec![slice("slice-10k-endpoints", "slice-target", |s| {
                s["endpoints"] = Value::Array(many_endpoints);
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-without-label",
            vec![slice("slice-without-label", "slice-target", |s| {
                s["metadata"]["labels"] = json!({});
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-huge-label",
            vec![slice("slice-huge-label", &huge, |_| {})],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-unknown-address-type",
            vec![slice("slice-unknown-address-type", "slice-target", |s| {
                s["addressType"] = json!("IPX");
            })],
            Refused("EndpointSlice", "invalid"),
        ),
        case(
            "slice-without-its-service",
            vec![slice("slice-without-its-service", "never-created", |_| {})],
            Accepted,
        ),
    ]
}

/// A whole file that can't be used: its name, contents, and the `file` reason counted.
#[derive(Clone, Debug)]
pub struct HostileFile {
    pub file_name: &'static str,
    pub contents: Vec<u8>,
    pub reason: &'static str,
}

/// Files no parser should choke on (issue 17): each refused whole with its reason; with
/// `max_file_bytes` the size limit the daemon runs with, which `too-large.yaml` exceeds.
pub fn hostile_files(max_file_bytes: usize) -> Vec<HostileFile> {
    let object = "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: hostile}\n";
    let deep = format!(
        "{object}spec: {}{}\n",
        "[".repeat(60_000),
        "]".repeat(60_000)
    );
    let anchor: Vec<String> = (0..2_000).map(|i| format!("item-{i}")).collect();
    let bomb = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bomb, namespace: hostile, \
         annotations: {{a: &a [{}]}}}}\nspec: {{externalIPs: [{}]}}\n",
        anchor.join(", "),
        vec!["*a"; 2_000].join(", ")
    );
    let mut laughs = String::from("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for level in 1..10 {
        let uses = vec![format!("*l{}", level - 1); 10].join(", ");
        laughs.push_str(&format!("l{level}: &l{level} [{uses}]\n"));
    }
    let mut not_utf8 = format!("{object}spec: {{clusterIP: 198.19.200.30}}\n").into_bytes();
    not_utf8.extend_from_slice(b"# \xff\xfe broken\n");
    vec![
        HostileFile {
            file_name: "deep.yaml",
            contents: deep.into_bytes(),
            reason: "too_deep",
        },
        HostileFile {
            file_name: "alias-bomb.yaml",
            contents: bomb.into_bytes(),
            reason: "alias_expansion",
        },
        HostileFile {
            file_name: "billion-laughs.yaml",
            contents: laughs.into_bytes(),
            reason: "alias_expansion",
        },
        HostileFile {
            file_name: "not-utf8.yaml",
            contents: not_utf8,
            reason: "not_utf8",
        },
        HostileFile {
            file_name: "not-yaml.yaml",
            contents: b"apiVersion: v1\nkind: [Service\n  - {\n".to_vec(),
            reason: "invalid_yaml",
        },
        HostileFile {
            file_name: "too-large.yaml",
            contents: format!("# {}\n", "x".repeat(max_file_bytes)).into_bytes(),
            reason: "too_large",
        },
    ]
}

/// A document that repeats a key: refused alone, as the object it would be (not a file
/// problem: the file's other documents load).
pub fn repeated_key_document() -> (&'static str, String) {
    (
        "repeated-key",
        "apiVersion: v1\nkind: Service\nmetadata: {name: repeated-key, namespace: hostile}\n\
         spec: {clusterIP: 198.19.200.31, clusterIP: 198.19.200.32, ports: [{port: 80}]}\n"
            .to_owned(),
    )
}

/// A problem as the daemon reported it: the `kind` and `reason` labels of
/// `ebpf_proxy_objects_rejected_total`, and the logged sentence.
#[derive(Clone, Debug)]
pub struct Reported {
    pub kind: String,
    pub reason: String,
    pub message: String,
}

/// Checks each case's outcome against what the daemon reported and took in: a refused
/// object reported with its kind, reason and name, and not taken in; a skipped field
/// reported, its object taken in; an accepted object taken in without a word.
/// `present(object)` says whether the source took an object in. Every failure is listed.
pub fn check_outcomes(
    cases: &[HostileObject],
    reported: &[Reported],
    present: impl Fn(&Value) -> bool,
) -> Result<(), String> {
    let mut failures = Vec::new();
    for case in cases {
        let key = case.key();
        let about: Vec<&Reported> = (reported.iter())
            .filter(|problem| problem.message.contains(&key))
            .collect();
        let matches = |kind: &str, reason: &str| {
            about
                .iter()
                .any(|problem| problem.kind == kind && problem.reason == reason)
        };
        let taken_in: Vec<bool> = case.objects.iter().map(&present).collect();
        match case.expected {
            Expected::Refused(kind, reason) => {
                if !matches(kind, reason) {
                    failures.push(format!(
                        "{}: not refused as {kind} {reason}: {about:?}",
                        case.name
                    ));
                }
                if taken_in.iter().any(|taken| *taken) {
                    failures.push(format!("{}: refused, yet taken in", case.name));
                }
            }
            Expected::Skipped(kind, reason) => {
                if !matches(kind, reason) {
                    failures.push(format!(
                        "{}: no {kind} {reason} reported: {about:?}",
                        case.name
                    ));
                }
                if !taken_in.iter().all(|taken| *taken) {
                    failures.push(format!("{}: not taken in", case.name));
                }
            }
            Expected::Accepted => {
                if !about.is_empty() {
                    failures.push(format!("{}: reported: {about:?}", case.name));
                }
                if !taken_in.iter().all(|taken| *taken) {
                    failures.push(format!("{}: not taken in", case.name));
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// The objects of a case as one JSON `List` (how a manifests directory gets them).
pub fn as_list(case: &HostileObject) -> String {
    json!({ "apiVersion": "v1", "kind": "List", "items": case.objects }).to_string()
}
