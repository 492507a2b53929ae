//! A dual-stack LoadBalancer Service (`ipFamilies: [IPv4, IPv6]`, `externalTrafficPolicy:
//! Local`, a healthCheckNodePort) on a node with an address of each family, as far as
//! issue 12 has come: its IPv4 half serves (ClusterIP from a pod, NodePort from outside),
//! its IPv6 half is planned from the IPv6 EndpointSlice and written into the IPv6 maps,
//! reported as not served (no IPv6 packet path yet), and the health check answers over
//! both families. The lab's
//! IPv6 addresses are in 2001:db8::/32, inside the lab's namespaces only.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SYNC_TIMEOUT, caller, cli_json, health_check, in_netns, kube_rules};
use proxy_lab::{Lab, Manifest, NODE_NAME, addr, require_lab};

const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLUSTER_IPV6: &str = "2001:db8:ff::10";
const LOAD_BALANCER_IPV6: &str = "2001:db8:1b::1";
const STICKY_IPV6: &str = "2001:db8:ff::11";
const EMPTY_IPV6: &str = "2001:db8:ff::12";
const HEALTH_CHECK_NODE_PORT: u16 = 32002;

/// The Service, its IPv4 slice (pod-1..pod-3) and its IPv6 slice (addresses the datapath
/// does not reach yet: the pods have none).
fn dual_stack_manifest(lab: &Lab) -> Manifest {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  clusterIP: {v4}\n  clusterIPs: [{v4}, \"{v6}\"]\n\
         \x20 ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n\
         \x20 externalTrafficPolicy: Local\n  healthCheckNodePort: {health}\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {echo}\n\
         \x20   nodePort: {node_port}\n\
         status:\n  loadBalancer:\n    ingress:\n    - ip: {lb}\n    - ip: \"{lb6}\"\n",
        v4 = addr::NODE_PORT_SERVICE_IP,
        v6 = CLUSTER_IPV6,
        health = HEALTH_CHECK_NODE_PORT,
        echo = addr::ECHO_TCP_PORT,
        node_port = addr::NODE_PORT_TCP,
        lb = addr::LOAD_BALANCER_IP,
        lb6 = LOAD_BALANCER_IPV6,
    );
    for (family, name, addresses) in [
        (
            "IPv4",
            "dual-v4",
            lab.pods()[..3]
                .iter()
                .map(|pod| pod.ip.to_string())
                .collect::<Vec<_>>(),
        ),
        (
            "IPv6",
            "dual-v6",
            (1..=3).map(|i| format!("2001:db8:1::{i}")).collect(),
        ),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
             \x20 name: {name}\n  namespace: default\n  labels:\n\
             \x20   kubernetes.io/service-name: dual\naddressType: {family}\n\
             ports:\n  - name: http\n    protocol: TCP\n    port: {echo}\nendpoints:\n",
            echo = addr::ECHO_TCP_PORT,
        ));
        for address in addresses {
            yaml.push_str(&format!(
                "  - addresses: [\"{address}\"]\n    nodeName: {NODE_NAME}\n\
                 \x20   conditions: {{ready: true}}\n"
            ));
        }
    }
    // Single-stack IPv6 Services: one with session affinity, one without endpoints.
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: sticky6\n  namespace: default\n\
         spec:\n  clusterIP: \"{STICKY_IPV6}\"\n  ipFamilies: [IPv6]\n\
         \x20 sessionAffinity: ClientIP\n\
         \x20 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 600}}}}\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {echo}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
         \x20 name: sticky6\n  namespace: default\n  labels:\n\
         \x20   kubernetes.io/service-name: sticky6\naddressType: IPv6\n\
         ports:\n  - name: http\n    protocol: TCP\n    port: {echo}\nendpoints:\n\
         \x20 - addresses: [\"2001:db8:1::1\"]\n    conditions: {{ready: true}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: empty6\n  namespace: default\n\
         spec:\n  clusterIP: \"{EMPTY_IPV6}\"\n  ipFamilies: [IPv6]\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n",
        echo = addr::ECHO_TCP_PORT,
    ));
    Manifest {
        file_name: "dual.yaml".to_owned(),
        yaml,
    }
}

/// Gives the node's and the client's `eth0` an IPv6 address each (no duplicate address
/// detection, so they are usable at once).
fn add_ipv6(lab: &Lab) -> Result<()> {
    for (ns, address) in [(lab.node(), NODE_IPV6), (lab.client(), CLIENT_IPV6)] {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    Ok(())
}

#[test]
fn a_dual_stack_service_serves_ipv4_plans_ipv6_and_answers_health_checks_on_both() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    add_ipv6(&lab)?;
    let daemon = lab.daemon().manifest(dual_stack_manifest(&lab)).start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    // The IPv4 half: the ClusterIP from a pod, the NodePort from outside.
    let reply = caller(&lab).tcp_request(addr::NODE_PORT_SERVICE_IP, 80)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");
    let reply = lab
        .client()
        .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");

    // The health check over both families: three local endpoints in each.
    for address in [IpAddr::V4(addr::NODE_IP), IpAddr::V6(NODE_IPV6)] {
        let (code, local_endpoints) = health_check(lab.client(), address, HEALTH_CHECK_NODE_PORT)?;
        ensure!(
            code == 200 && local_endpoints == 3,
            "{address}: {code}, {local_endpoints}"
        );
    }

    // The IPv6 half: its ClusterIP, the NodePort on the node's IPv6 address and the IPv6
    // load-balancer IP are written into the IPv6 maps, with the two IPv6-only ClusterIPs,
    // and served by the IPv6 packet path: the sync line counts them.
    let log = daemon.log();
    ensure!(
        log.contains("ipv6=5") && !log.contains("not served: the packet path"),
        "no sync line counting the 5 IPv6 frontends:\n{log}"
    );
    ensure!(
        log.contains(&NODE_IPV6.to_string()),
        "the node's IPv6 address is not among its addresses:\n{log}"
    );

    // The CLI reads them back from the IPv6 maps: the three frontends with the IPv6
    // slice's endpoints, and as ip6tables rules.
    let services = cli_json(&daemon, &["services"])?;
    let ipv6: Vec<&serde_json::Value> = (services.as_array().into_iter().flatten())
        .filter(|row| row["family"] == "IPv6" && row["service"] == "default/dual:http")
        .collect();
    let addresses: Vec<&str> = ipv6
        .iter()
        .filter_map(|row| row["address"].as_str())
        .collect();
    ensure!(
        addresses.len() == 3
            && addresses.contains(&CLUSTER_IPV6)
            && addresses.contains(&LOAD_BALANCER_IPV6)
            && addresses.contains(&NODE_IPV6.to_string().as_str()),
        "IPv6 frontends in `services`: {addresses:?}"
    );
    for row in &ipv6 {
        let backends = row["backends"].as_array().map_or(0, Vec::len);
        ensure!(backends == 3, "{row}");
    }
    let stats = cli_json(&daemon, &["stats"])?;
    let entries = |name: &str| {
        (stats["maps"].as_array().into_iter().flatten())
            .find(|map| map["name"] == name)
            .and_then(|map| map["entries"].as_u64())
    };
    // Three distinct backends: sticky6's endpoint is one of dual's.
    ensure!(
        entries("SERVICES6") == Some(5) && entries("BACKEND_IDS6") == Some(3),
        "stats: {stats:#}"
    );
    let rules = daemon.cli(&["explain", "--family", "ipv6"])?;
    ensure!(
        rules.contains(&format!("-d {CLUSTER_IPV6} --dport 80 -j KUBE-SVC-"))
            && rules.contains(&format!("-d {EMPTY_IPV6} --dport 80 -j REJECT"))
            && rules.contains("--rcheck --seconds 600 --reap")
            && rules.matches("-j DNAT --to-destination [2001:db8:").count() == 4,
        "explain --family ipv6:\n{rules}"
    );
    // ip6tables takes them (session affinity's `recent` lists and REJECT included), and ip6tables-save prints back exactly the iptables-save form
    // (in the client's namespace, where nothing jumps to the KUBE chains).
    let saved_form = daemon.cli(&["explain", "--family", "ipv6", "--form", "iptables-save"])?;
    in_netns(lab.client(), "ip6tables-restore", &[], &rules)?;
    let saved = in_netns(lab.client(), "ip6tables-save", &[], "")?;
    ensure!(
        kube_rules(&saved_form) == kube_rules(&saved),
        "explain --family ipv6 --form iptables-save:\n{saved_form}\nip6tables-save:\n{saved}"
    );
    Ok(())
}
