//! The rules kube-proxy would install for a [`Cluster`], in the shape its proxiers write
//! them, as the baselines: `iptables-restore` input (iptables mode) and an `nft -f`
//! transaction (nftables mode).
//!
//! Only what a new connection to a ClusterIP meets is written: the nat rules and the
//! masquerade marking. kube-proxy's filter-table checks (firewall, Services without
//! endpoints) cost the same at any number of Services when every Service has endpoints,
//! so they are left out. The iptables chain names come from `ebpf-proxy explain`'s
//! kube-proxy hashing; nftables mode hashes its own (longer) names.

use std::fmt::Write as _;
use std::net::SocketAddr;

use data_encoding::BASE32;
use proxy_userspace::inspect::explain::{endpoint_chain, service_chain};
use sha2::{Digest, Sha256};

use crate::cluster::{BenchService, Cluster, NAMESPACE, PORT_NAME};

/// kube-proxy's `--cluster-cidr` (its local-traffic detector): the whole lab, so no lab
/// connection is masqueraded (ebpf-proxy does no SNAT either), while the rule that checks
/// it still runs for every new connection, as on a real node.
const CLUSTER_CIDR: &str = "198.18.0.0/15";
const PROTOCOL: &str = "tcp";
const NFT_TABLE: &str = "ip kube-proxy";

/// The Service's endpoints as kube-proxy orders them: sorted as `ip:port` text.
fn sorted_endpoints(service: &BenchService) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = service
        .endpoints
        .iter()
        .map(|address| SocketAddr::new((*address).into(), service.target_port))
        .collect();
    endpoints.sort_by_key(ToString::to_string);
    endpoints
}

/// The nat table kube-proxy's iptables mode restores (`iptables-restore` input).
pub fn iptables_restore(cluster: &Cluster) -> String {
    iptables_restore_with_node_port(cluster, None)
}

/// [`iptables_restore`], the first Service also open on `node_port` of every node address
/// (externalTrafficPolicy Cluster): KUBE-NODEPORTS jumps to its KUBE-EXT chain, which marks
/// the connection for masquerade and goes on to the Service's chain.
pub fn iptables_restore_with_node_port(cluster: &Cluster, node_port: Option<u16>) -> String {
    let mut chains = String::from(
        ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    for (index, service) in cluster.iter().enumerate() {
        let name = service.port_name();
        let service_chain = service_chain("KUBE-SVC-", &name, PROTOCOL);
        let (vip, port) = (service.vip, service.port);
        let _ = writeln!(chains, ":{service_chain} - [0:0]");
        if let Some(node_port) = node_port.filter(|_| index == 0) {
            let external_chain =
                proxy_userspace::inspect::explain::service_chain("KUBE-EXT-", &name, PROTOCOL);
            let _ = writeln!(chains, ":{external_chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {node_port} \
                 -j {external_chain}\n\
                 -A {external_chain} -m comment --comment \"masquerade traffic for {name} \
                 external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {external_chain} -j {service_chain}"
            );
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp \
             -d {vip} --dport {port} -j {service_chain}"
        );
        let _ = writeln!(
            rules,
            "-A {service_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp \
             -d {vip} --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        );
        let endpoints = sorted_endpoints(&service);
        let endpoint_chains: Vec<String> = endpoints
            .iter()
            .map(|endpoint| endpoint_chain(&name, PROTOCOL, endpoint))
            .collect();
        // kube-proxy's statistic chain: the i-th of n rules matches with probability
        // 1/(n-i) of what reaches it, so each endpoint gets 1/n; the last always matches.
        for (index, (endpoint, chain)) in endpoints.iter().zip(&endpoint_chains).enumerate() {
            let remaining = endpoints.len() - index;
            let _ = write!(
                rules,
                "-A {service_chain} -m comment --comment \"{name} -> {endpoint}\""
            );
            if remaining > 1 {
                let probability = 1.0 / remaining as f64;
                let _ = write!(
                    rules,
                    " -m statistic --mode random --probability {probability:.10}"
                );
            }
            let _ = writeln!(rules, " -j {chain}");
        }
        for (endpoint, chain) in endpoints.iter().zip(&endpoint_chains) {
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A {chain} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                endpoint.ip()
            );
            let _ = writeln!(
                rules,
                "-A {chain} -m comment --comment {name} -m tcp -p tcp -j DNAT \
                 --to-destination {endpoint}"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must \
         be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables-mode `hashAndTruncate`: base32(sha256(name)), first 8
/// characters, before the name itself.
fn hashed(name: &str) -> String {
    let mut hash = BASE32.encode(&Sha256::digest(name.as_bytes()));
    hash.truncate(8);
    format!("{hash}-{name}")
}

fn nft_service_chain(service: &BenchService) -> String {
    let base = format!("{NAMESPACE}/{}/{PROTOCOL}/{PORT_NAME}", service.name);
    format!("service-{}", hashed(&base))
}

fn nft_endpoint_chain(service: &BenchService, endpoint: &SocketAddr) -> String {
    let base = format!(
        "{NAMESPACE}/{}/{PROTOCOL}/{PORT_NAME}__{}/{}",
        service.name,
        endpoint.ip(),
        endpoint.port()
    );
    format!("endpoint-{}", hashed(&base))
}

/// The transaction kube-proxy's nftables mode hands to `nft -f`: a `service-ips`
/// verdict map from `ip . proto . port` to a chain per Service port, whose anonymous
/// `numgen random mod n` verdict map picks an endpoint chain that DNATs. Priorities are
/// spelled as numbers (dstnat = -100, srcnat = 100): Debian's nft 1.0.6 refuses the names
/// on the output hook.
pub fn nft_script(cluster: &Cluster) -> String {
    let mut script = nft_base();
    for service in cluster.iter() {
        write_nft_service(&mut script, &service);
    }
    script
}

/// The same rules as [`nft_script`], split into transactions of at most
/// `services_per_transaction` Services each (the first also holds the table, base chains
/// and map). The kernel binds each anonymous set by walking the whole transaction
/// (`__nft_set_trans_bind`), so one transaction of N Services costs O(N²): 10,000
/// Services take minutes. Where only the rules in place matter, not how long loading them
/// took, loading them in parts gives the same ruleset in a fraction of the time.
pub fn nft_transactions(cluster: &Cluster, services_per_transaction: usize) -> Vec<String> {
    let services: Vec<BenchService> = cluster.iter().collect();
    let mut transactions = vec![nft_base()];
    for (index, part) in services.chunks(services_per_transaction.max(1)).enumerate() {
        if index > 0 {
            transactions.push(String::new());
        }
        let transaction = transactions.last_mut().expect("one transaction at least");
        for service in part {
            write_nft_service(transaction, service);
        }
    }
    transactions
}

/// The table, its base chains, the masquerade chains and the `service-ips` map.
fn nft_base() -> String {
    format!(
        "add table {NFT_TABLE} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain {NFT_TABLE} mark-for-masquerade\n\
         add rule {NFT_TABLE} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {NFT_TABLE} masquerading\n\
         add rule {NFT_TABLE} masquerading mark and 0x4000 == 0 return\n\
         add rule {NFT_TABLE} masquerading mark set mark xor 0x4000\n\
         add rule {NFT_TABLE} masquerading masquerade fully-random\n\
         add map {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add chain {NFT_TABLE} services\n\
         add rule {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {NFT_TABLE} nat-prerouting jump services\n\
         add rule {NFT_TABLE} nat-output jump services\n\
         add rule {NFT_TABLE} nat-postrouting jump masquerading\n"
    )
}

/// One Service's chain, its endpoint chains and its `service-ips` element.
fn write_nft_service(script: &mut String, service: &BenchService) {
    let service_chain = nft_service_chain(service);
    let endpoints = sorted_endpoints(service);
    let _ = writeln!(script, "add chain {NFT_TABLE} {service_chain}");
    let mut choices = Vec::with_capacity(endpoints.len());
    for (index, endpoint) in endpoints.iter().enumerate() {
        let chain = nft_endpoint_chain(service, endpoint);
        let _ = writeln!(
            script,
            "add chain {NFT_TABLE} {chain}\n\
             add rule {NFT_TABLE} {chain} ip saddr {} jump mark-for-masquerade\n\
             add rule {NFT_TABLE} {chain} meta l4proto tcp dnat to {endpoint}",
            endpoint.ip()
        );
        choices.push(format!("{index} : goto {chain}"));
    }
    let _ = writeln!(
        script,
        "add rule {NFT_TABLE} {service_chain} ip daddr {vip} tcp dport {port} \
         ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
         add rule {NFT_TABLE} {service_chain} numgen random mod {count} vmap {{ {choices} }}\n\
         add element {NFT_TABLE} service-ips {{ {vip} . tcp . {port} : goto {service_chain} }}",
        vip = service.vip,
        port = service.port,
        count = endpoints.len(),
        choices = choices.join(", "),
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cluster::Endpoints;

    fn cluster(services: usize) -> Cluster {
        Cluster::new(services, Endpoints::Distinct { per_service: 10 }).unwrap()
    }

    #[test]
    fn nft_chain_names_hash_like_kube_proxy() {
        // kube-proxy's own test fixtures (pkg/proxy/nftables/proxier_test.go).
        assert_eq!(hashed("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            hashed("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn iptables_rules_have_kube_proxys_shape() {
        let text = iptables_restore(&cluster(2));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let service = cluster(2).service(1);
        let chain = service_chain("KUBE-SVC-", &service.port_name(), "tcp");
        let svc_rules: Vec<&&str> = lines
            .iter()
            .filter(|line| line.starts_with(&format!("-A {chain} ")))
            .collect();
        // The masquerade check, then one rule per endpoint.
        assert_eq!(svc_rules.len(), 11);
        assert!(svc_rules[0].ends_with(&format!("! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ")));
        assert!(svc_rules[1].contains("--probability 0.1000000000 "));
        assert!(svc_rules[9].contains("--probability 0.5000000000 "));
        assert!(!svc_rules[10].contains("statistic"));
        let dnat = lines
            .iter()
            .filter(|line| line.contains("-j DNAT --to-destination "))
            .count();
        assert_eq!(dnat, 20);
        assert!(lines[lines.len() - 2].ends_with("-j KUBE-NODEPORTS"));
    }

    #[test]
    fn a_node_port_masquerades_and_joins_its_service_chain() {
        let cluster = cluster(2);
        let text = iptables_restore_with_node_port(&cluster, Some(30_080));
        let name = cluster.service(0).port_name();
        let external = service_chain("KUBE-EXT-", &name, "tcp");
        let service = service_chain("KUBE-SVC-", &name, "tcp");
        assert!(text.contains(&format!("--dport 30080 -j {external}\n")));
        assert!(text.contains(&format!("-A {external} -j {service}\n")));
        assert_eq!(text.matches("-A KUBE-NODEPORTS ").count(), 1);
        assert!(!iptables_restore(&cluster).contains("KUBE-EXT-"));
    }

    #[test]
    fn nft_transaction_maps_every_service_to_its_chain() {
        let script = nft_script(&cluster(3));
        assert_eq!(
            script
                .matches("add element ip kube-proxy service-ips")
                .count(),
            3
        );
        assert_eq!(script.matches("numgen random mod 10 vmap").count(), 3);
        assert_eq!(script.matches(" dnat to ").count(), 30);
        let service = cluster(3).service(0);
        let first = SocketAddr::new(Ipv4Addr::new(198, 18, 2, 0).into(), 8080);
        assert!(script.contains(&format!(
            "0 : goto {}",
            nft_endpoint_chain(&service, &first)
        )));
    }

    #[test]
    fn nft_transactions_in_parts_hold_the_one_transactions_rules() {
        let cluster = cluster(5);
        let parts = nft_transactions(&cluster, 2);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat(), nft_script(&cluster));
        assert!(parts[0].starts_with("add table ip kube-proxy"));
        for part in &parts[1..] {
            assert!(!part.contains("add table"));
            assert!(part.starts_with(&format!("add chain {NFT_TABLE} service-")));
        }
        let elements = |part: &String| part.matches("add element ").count();
        assert_eq!(parts.iter().map(elements).collect::<Vec<_>>(), [2, 2, 1]);
    }
}
