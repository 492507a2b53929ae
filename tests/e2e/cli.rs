//! The node-admin CLI against a running daemon: each view's JSON, `explain` against golden
//! text, `trace` against the backend real traffic reaches, and `conntrack` (and its flush)
//! against a flow opened by a real client.
//!
//! The CLI runs in the test's own namespace: it only reads the daemon's private bpffs and,
//! for `trace`, runs a program with BPF_PROG_TEST_RUN, which sends nothing anywhere.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::{
    SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, cli_json, echo_service, flows_of, in_netns,
    kube_rules,
};
use proxy_lab::{Daemon, Lab, Manifest, NODE_NAME, Service, addr, daemon_binary, require_lab};
use serde_json::Value;

/// The single-backend Service of the trace test, and its only endpoint (pod-2).
const SOLO_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const SOLO_BACKEND: usize = 2;

fn started<'lab>(lab: &'lab Lab, manifests: Vec<Manifest>) -> Result<Daemon<'lab>> {
    let mut builder = lab.daemon();
    for manifest in manifests {
        builder = builder.manifest(manifest);
    }
    let daemon = builder.start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

#[test]
fn listings_describe_the_daemons_services_as_json_and_tables() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = started(&lab, vec![echo_service().manifest(backends(&lab))])?;

    let services = cli_json(&daemon, &["services"])?;
    let frontends = services.as_array().context("services is an array")?;
    ensure!(frontends.len() == 2, "tcp and udp frontends: {services:#}");
    let tcp = frontends
        .iter()
        .find(|f| f["protocol"] == "tcp")
        .context("the tcp frontend")?;
    ensure!(tcp["address"] == addr::CLUSTER_IP.to_string(), "{tcp:#}");
    ensure!(tcp["port"] == SERVICE_TCP_PORT, "{tcp:#}");
    ensure!(tcp["kind"] == "ClusterIP", "{tcp:#}");
    ensure!(tcp["service"] == "default/echo:tcp-80", "{tcp:#}");
    let mut slots: Vec<String> = tcp["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|slot| {
            ensure!(slot["state"] == "active", "{slot:#}");
            ensure!(slot["port"] == addr::ECHO_TCP_PORT, "{slot:#}");
            Ok(slot["address"].as_str().unwrap_or_default().to_owned())
        })
        .collect::<Result<_>>()?;
    slots.sort();
    let pods: Vec<String> = backends(&lab).iter().map(|p| p.ip.to_string()).collect();
    ensure!(slots == pods, "backends {slots:?}, pods {pods:?}");

    let backends_json = cli_json(&daemon, &["backends"])?;
    let rows = backends_json.as_array().context("backends is an array")?;
    ensure!(rows.len() == 6, "3 pods × 2 ports: {backends_json:#}");
    for row in rows {
        ensure!(row["state"] == "active", "{row:#}");
        let service = row["services"][0].as_str().unwrap_or_default();
        ensure!(service.starts_with("default/echo:"), "{row:#}");
    }

    let stats = cli_json(&daemon, &["stats"])?;
    let counters = stats["counters"].as_array().context("counters")?;
    ensure!(
        counters.iter().any(|c| c["name"] == "new_flow"),
        "{stats:#}"
    );
    let fill = |name: &str| {
        stats["maps"]
            .as_array()
            .context("maps")?
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .with_context(|| format!("{name} fill level"))
    };
    // Two frontends, three slots each.
    let services_map = fill("SERVICES")?;
    ensure!(services_map["entries"] == 2, "{services_map:#}");
    ensure!(services_map["max_entries"] == 65_536, "{services_map:#}");
    let slots = fill("BACKEND_SLOTS")?;
    ensure!(slots["entries"] == 6, "{slots:#}");
    ensure!(slots["max_entries"] == 262_144, "{slots:#}");

    let table = daemon.cli(&["services", "--wide"])?;
    println!("{table}");
    ensure!(table.contains("FRONTEND"), "{table}");
    ensure!(
        table.contains("198.19.0.10:80/tcp") && table.contains("default/echo:tcp-80"),
        "{table}"
    );
    let table = daemon.cli(&["stats"])?;
    ensure!(table.contains("CONNTRACK"), "{table}");

    // --watch refreshes, bounded here by --watch-count: one JSON document per line.
    let watched = daemon.cli(&[
        "backends",
        "-o",
        "json",
        "--watch",
        "0.2",
        "--watch-count",
        "3",
    ])?;
    let documents: Vec<&str> = watched.lines().collect();
    ensure!(documents.len() == 3, "{watched}");
    for document in documents {
        serde_json::from_str::<Value>(document).with_context(|| document.to_owned())?;
    }
    Ok(())
}

#[test]
fn conntrack_shows_a_real_clients_flow_and_trace_and_flush_agree() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = started(&lab, vec![echo_service().manifest(backends(&lab))])?;
    let client = lab.pod(4).ip;

    let mut session = caller(&lab).tcp_session(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    let served_by = session.request()?;
    let backend = backends(&lab)
        .iter()
        .find(|pod| pod.name == served_by)
        .with_context(|| format!("answered by {served_by}"))?;

    let flows = flows_of(&daemon, client, &[])?;
    ensure!(flows.len() == 1, "one flow from {client}: {flows:#?}");
    let flow = &flows[0];
    ensure!(flow["protocol"] == "tcp", "{flow:#}");
    ensure!(
        flow["frontend"]["address"] == addr::CLUSTER_IP.to_string(),
        "{flow:#}"
    );
    ensure!(
        flow["backend"]["address"] == backend.ip.to_string(),
        "{flow:#}"
    );
    ensure!(flow["backend"]["port"] == addr::ECHO_TCP_PORT, "{flow:#}");
    ensure!(flow["service"] == "default/echo:tcp-80", "{flow:#}");
    ensure!(flow["state"] == "open", "{flow:#}");
    // A request answered: the handshake completed, the flow is assured, and lives 24 h.
    ensure!(flow["flow_state"] == "established", "{flow:#}");
    ensure!(flow["assured"] == true, "{flow:#}");
    ensure!(flow["kind"] == "service", "{flow:#}");
    ensure!(
        flow["backend_sees"]["address"] == client.to_string(),
        "{flow:#}"
    );
    ensure!(
        flow["expires_in_seconds"].as_u64() > Some(86_000),
        "{flow:#}"
    );
    ensure!(
        flow["entries"] == serde_json::json!(["forward", "reply"]),
        "{flow:#}"
    );
    ensure!(flow["packets_to_backend"].as_u64() >= Some(3), "{flow:#}");
    ensure!(flow["packets_from_backend"].as_u64() >= Some(2), "{flow:#}");

    let backend_ip = backend.ip.to_string();
    let other_pod = backends(&lab)
        .iter()
        .find(|pod| pod.ip != backend.ip)
        .context("a second pod")?;
    let other_ip = other_pod.ip.to_string();
    for (filter, expected) in [
        (vec!["--service", "default/echo"], 1),
        (vec!["--service", "default/echo:tcp-80"], 1),
        (vec!["--service", "default/echo:udp-53"], 0),
        (vec!["--service", "198.19.0.10:80"], 1),
        (vec!["--backend", backend_ip.as_str()], 1),
        (vec!["--backend", other_ip.as_str()], 0),
    ] {
        let flows = flows_of(&daemon, client, &filter)?;
        ensure!(flows.len() == expected, "{filter:?}: {flows:#?}");
    }

    // The live flow's own tuple: trace follows its conntrack entry to the same backend.
    let client_port = flow["client"]["port"].to_string();
    let source = format!("{client}:{client_port}");
    let destination = format!("{}:{SERVICE_TCP_PORT}/tcp", addr::CLUSTER_IP);
    let trace = cli_json(&daemon, &["trace", &source, &destination])?;
    ensure!(trace["path"] == "ct_hit", "{trace:#}");
    ensure!(trace["conntrack"]["direction"] == "forward", "{trace:#}");
    ensure!(trace["backend"]["address"] == backend_ip, "{trace:#}");
    let packets_after_trace = flows_of(&daemon, client, &[])?[0]["packets_to_backend"].clone();
    ensure!(
        packets_after_trace == flow["packets_to_backend"],
        "the dry run counted a packet: {packets_after_trace} after {}",
        flow["packets_to_backend"]
    );

    let refused = daemon.cli_output(&["conntrack", "flush"])?;
    ensure!(
        !refused.status.success(),
        "flush without a filter must be refused"
    );
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("--all"),
        "{refused:?}"
    );
    let client_ip = client.to_string();
    let flushed = cli_json(&daemon, &["conntrack", "flush", "--client", &client_ip])?;
    ensure!(
        flushed["flows"] == 1 && flushed["entries"] == 2,
        "{flushed:#}"
    );
    let left = flows_of(&daemon, client, &[])?;
    ensure!(left.is_empty(), "after the flush: {left:#?}");
    Ok(())
}

#[test]
fn trace_agrees_with_real_traffic_for_a_single_backend_service() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let solo = Service::cluster_ip("solo", SOLO_IP).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT);
    let daemon = started(&lab, vec![solo.manifest([lab.pod(SOLO_BACKEND)])])?;
    let client = lab.pod(4).ip;

    let reply = caller(&lab).tcp_request(SOLO_IP, SERVICE_TCP_PORT)?;
    let reached = backends(&lab)
        .iter()
        .find(|pod| pod.name == reply.body)
        .with_context(|| format!("answered by {reply:?}"))?;
    let flows_before = flows_of(&daemon, client, &[])?;

    // A new port: no flow yet, so the program selects, as for a new connection.
    let source = format!("{client}:45678");
    let destination = format!("{SOLO_IP}:{SERVICE_TCP_PORT}/tcp");
    let trace = cli_json(&daemon, &["trace", &source, &destination])?;
    ensure!(trace["verdict"] == "accept", "{trace:#}");
    ensure!(trace["path"] == "new_flow", "{trace:#}");
    ensure!(
        trace["frontend"]["service"] == "default/solo:tcp-80",
        "{trace:#}"
    );
    ensure!(
        trace["backend"]["address"] == reached.ip.to_string(),
        "{trace:#}"
    );
    ensure!(
        trace["output"]["destination"]["address"] == reached.ip.to_string(),
        "{trace:#}"
    );
    ensure!(
        trace["output"]["destination"]["port"] == addr::ECHO_TCP_PORT,
        "{trace:#}"
    );
    ensure!(trace["output"]["source"]["port"] == 45678, "{trace:#}");
    let decided_by = trace["decided_by"].as_array().context("decided_by")?;
    ensure!(
        decided_by.len() == 2,
        "frontend, and the slot with its backend: {trace:#}"
    );

    let flows_after = flows_of(&daemon, client, &[])?;
    ensure!(
        flows_after.len() == flows_before.len(),
        "the dry run created a flow: {flows_after:#?}"
    );
    let table = daemon.cli(&["trace", &source, &destination])?;
    println!("{table}");
    ensure!(
        table.contains(&format!("backend     {}:", reached.ip)),
        "{table}"
    );
    Ok(())
}

/// `default/kubernetes:https` and `kube-system/kube-dns:dns`, the hash vectors,
/// with lab pods as endpoints.
fn cluster_services(lab: &Lab) -> Vec<Manifest> {
    let service = |namespace: &str,
                   name: &str,
                   ip: &str,
                   port_name: &str,
                   protocol: &str,
                   port: u16,
                   target: u16,
                   pods: &[usize]| {
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs:\n    - {ip}\n  ports:\n\
             \x20   - name: {port_name}\n      protocol: {protocol}\n      port: {port}\n      targetPort: {target}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-lab\n\
             \x20 namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {name}\n\
             addressType: IPv4\nports:\n  - name: {port_name}\n    protocol: {protocol}\n    port: {target}\n\
             endpoints:\n"
        );
        for i in pods {
            yaml.push_str(&format!(
                "  - addresses:\n      - {}\n    conditions:\n      ready: true\n    nodeName: {NODE_NAME}\n",
                lab.pod(*i).ip
            ));
        }
        Manifest {
            file_name: format!("{namespace}-{name}.yaml"),
            yaml,
        }
    };
    vec![
        service(
            "default",
            "kubernetes",
            "198.19.0.1",
            "https",
            "TCP",
            443,
            6443,
            &[1],
        ),
        service(
            "kube-system",
            "kube-dns",
            "198.19.0.53",
            "dns",
            "UDP",
            53,
            5353,
            &[2, 3],
        ),
    ]
}

/// What kube-proxy writes for [`cluster_services`]: chain names from the vectors,
/// endpoint chains hashed from the lab's pod addresses.
const EXPLAIN_GOLDEN: &str = "\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-HGPFDHKH2OVRC5EH - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SEP-WVFM5DTUOXAF2XYT - [0:0]
:KUBE-SEP-LKZLBMVLDOOWNHV2 - [0:0]
-A KUBE-SERVICES -m comment --comment \"default/kubernetes:https cluster IP\" -m tcp -p tcp -d 198.19.0.1 --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment \"default/kubernetes:https -> 198.18.1.11:6443\" -j KUBE-SEP-HGPFDHKH2OVRC5EH
-A KUBE-SEP-HGPFDHKH2OVRC5EH -m comment --comment default/kubernetes:https -m tcp -p tcp -j DNAT --to-destination 198.18.1.11:6443
-A KUBE-SERVICES -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp -p udp -d 198.19.0.53 --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment \"kube-system/kube-dns:dns -> 198.18.1.12:5353\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-WVFM5DTUOXAF2XYT
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment \"kube-system/kube-dns:dns -> 198.18.1.13:5353\" -j KUBE-SEP-LKZLBMVLDOOWNHV2
-A KUBE-SEP-WVFM5DTUOXAF2XYT -m comment --comment kube-system/kube-dns:dns -m udp -p udp -j DNAT --to-destination 198.18.1.12:5353
-A KUBE-SEP-LKZLBMVLDOOWNHV2 -m comment --comment kube-system/kube-dns:dns -m udp -p udp -j DNAT --to-destination 198.18.1.13:5353
COMMIT
";

#[test]
fn explain_writes_what_kube_proxy_would() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = started(&lab, cluster_services(&lab))?;
    let text = daemon.cli(&["explain"])?;
    let rules: String = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    ensure!(rules == EXPLAIN_GOLDEN, "got:\n{rules}");

    let saved = daemon.cli(&["explain", "--form", "iptables-save"])?;
    ensure!(
        saved.contains(
            "-A KUBE-SERVICES -d 198.19.0.53/32 -p udp -m comment --comment \
             \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU"
        ),
        "{saved}"
    );
    ensure!(saved.contains("--probability 0.50000000000"), "{saved}");
    Ok(())
}

#[test]
fn missing_pins_ask_whether_the_daemon_runs() -> Result<()> {
    let binary = daemon_binary()?;
    let nowhere = PathBuf::from("/nonexistent/ebpf-proxy-cli-test");
    for view in ["services", "backends", "conntrack", "stats", "explain"] {
        let output = Command::new(&binary)
            .args([view, "--bpffs-root"])
            .arg(&nowhere)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{view} succeeded without pins");
        ensure!(
            stderr.contains("is the daemon running?") && stderr.contains("/nonexistent"),
            "{view}: {stderr}"
        );
    }
    Ok(())
}

/// `explain` is text that `iptables-restore` takes, and `explain --form iptables-save` is
/// what `iptables-save` prints back for it, chain by chain and rule by rule: session
/// affinity (`recent` lists), a NodePort, and a Service without endpoints, loaded into
/// the lab client's namespace (where nothing jumps to the KUBE chains).
#[test]
fn explain_round_trips_through_iptables() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let sticky = Service::node_port("sticky", Ipv4Addr::new(198, 19, 0, 13))
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, 30081)
        .client_ip_affinity(600);
    let empty = Service::cluster_ip("empty", Ipv4Addr::new(198, 19, 0, 14))
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT);
    let daemon = started(
        &lab,
        vec![
            sticky.manifest(backends(&lab)),
            empty.manifest([]),
            echo_service().manifest(backends(&lab)),
        ],
    )?;
    let restore_input = daemon.cli(&["explain"])?;
    ensure!(
        restore_input.contains("--rcheck --seconds 600 --reap"),
        "{restore_input}"
    );
    let saved_form = daemon.cli(&["explain", "--form", "iptables-save"])?;

    in_netns(lab.client(), "iptables-restore", &[], &restore_input)?;
    let saved = in_netns(lab.client(), "iptables-save", &[], "")?;
    let (expected, got) = (kube_rules(&saved_form), kube_rules(&saved));
    ensure!(
        expected == got,
        "explain --form iptables-save:\n{saved_form}\niptables-save:\n{saved}"
    );
    Ok(())
}
