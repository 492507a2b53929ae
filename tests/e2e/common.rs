//! Shared set-up of the daemon tests: pod-1..pod-3 are the Services' endpoints and pod-4
//! is the caller. The caller is never a backend (hairpin has its own test, `hairpin`).
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proxy_lab::{
    Cluster, ClusterNode, Daemon, Endpoint, Lab, Netns, Pod, Reply, Service, Tally, addr,
};
use serde_json::Value;

/// Service ports of the test Services (the pods listen on the lab's echo ports).
pub const SERVICE_TCP_PORT: u16 = 80;
pub const SERVICE_UDP_PORT: u16 = 53;
/// Generous: the first sync loads and attaches the eBPF programs.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
pub const BACKEND_NAMES: [&str; 3] = ["pod-1", "pod-2", "pod-3"];

/// The daemon's `stats` counter `name`, read now.
pub fn counter(daemon: &Daemon, name: &str) -> Result<u64> {
    let stats = cli_json(daemon, &["stats"])?;
    counter_in(&stats, name).with_context(|| format!("in {stats}"))
}

/// A lab with three backends and a caller pod.
pub fn lab() -> Result<Lab> {
    Lab::builder().pods(4).build()
}

pub fn backends(lab: &Lab) -> &[Pod] {
    &lab.pods()[..3]
}

pub fn caller(lab: &Lab) -> &Netns {
    &lab.pod(4).ns
}

/// ClusterIP Service `echo` at [`addr::CLUSTER_IP`]: TCP 80 and UDP 53 to the echo ports.
pub fn echo_service() -> Service {
    Service::cluster_ip("echo", addr::CLUSTER_IP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT)
}

/// Starts the daemon with `echo` over the three backends and waits for its first sync.
pub fn daemon_with_echo(lab: &Lab) -> Result<Daemon<'_>> {
    daemon_with_echo_and(lab, &[])
}

/// [`daemon_with_echo`] with extra command-line arguments.
pub fn daemon_with_echo_and<'lab>(lab: &'lab Lab, args: &[&str]) -> Result<Daemon<'lab>> {
    let mut builder = lab
        .daemon()
        .manifest(echo_service().manifest(backends(lab)));
    for arg in args {
        builder = builder.arg(*arg);
    }
    let daemon = builder.start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

/// A healthCheckNodePort's status code and `localEndpoints`, asked from `ns`.
pub fn health_check(ns: &Netns, address: impl Into<IpAddr>, port: u16) -> Result<(u16, u64)> {
    let (code, body) = ns.http_get(address, port, "/")?;
    let body: Value = serde_json::from_str(&body)?;
    Ok((code, body["localEndpoints"].as_u64().unwrap_or_default()))
}

/// With two of three backends left, a backend that still got new connections would go
/// unseen this many times in a row with probability (2/3)^30 ≈ 5e-6.
pub const CLEAN_STREAK: usize = 30;
/// How long [`until_avoided`] keeps trying.
pub const GIVE_UP: Duration = Duration::from_secs(10);

/// The pod that answers a new connection from the caller to the `echo` ClusterIP.
pub fn served_by(lab: &Lab) -> Result<String> {
    Ok(caller(lab)
        .tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?
        .body)
}

/// Opens new connections until [`CLEAN_STREAK`] in a row avoid `avoided`, running
/// `after_each` after every one (e.g. to check an open session); fails after [`GIVE_UP`].
/// Returns when `avoided` last served a new connection, counted from `since`.
pub fn until_avoided(
    lab: &Lab,
    avoided: &str,
    since: Instant,
    mut after_each: impl FnMut() -> Result<()>,
) -> Result<Option<Duration>> {
    let mut last_seen = None;
    let mut streak = 0;
    while streak < CLEAN_STREAK {
        if since.elapsed() > GIVE_UP {
            bail!("{avoided} still gets new connections {GIVE_UP:?} after the change");
        }
        if served_by(lab)? == avoided {
            last_seen = Some(since.elapsed());
            streak = 0;
        } else {
            streak += 1;
        }
        after_each()?;
    }
    Ok(last_seen)
}

/// Runs the CLI with `-o json` and parses what it printed.
pub fn cli_json(daemon: &Daemon, args: &[&str]) -> Result<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let stdout = daemon.cli(&args)?;
    serde_json::from_str(&stdout).with_context(|| format!("parsing {stdout}"))
}

/// `trace --connect destination -o json`: the dry run of a `connect()` of the node's, from
/// a trace cgroup under the daemon's (the lab's private one).
pub fn trace_connect(daemon: &Daemon, destination: &str) -> Result<Value> {
    let cgroup = daemon.cgroup().path().to_string_lossy().into_owned();
    cli_json(
        daemon,
        &["trace", "--connect", destination, "--cgroup-root", &cgroup],
    )
}

/// The STATS counter `name` from `stats -o json` read once (several counters of one
/// moment).
pub fn counter_in(stats: &Value, name: &str) -> Result<u64> {
    (stats["counters"].as_array().into_iter().flatten())
        .find(|counter| counter["name"] == name)
        .and_then(|counter| counter["value"].as_u64())
        .with_context(|| format!("no counter {name}"))
}

/// A refusal at the socket is immediate: no packet, no timeout.
pub const REFUSAL_WITHIN: Duration = Duration::from_millis(100);
/// How long [`spread`] may take.
pub const SPREAD_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `request` (each with a fresh socket) until `requests` answered, every answer from
/// `frontend`: the backends' tally, which must be uniform over [`BACKEND_NAMES`].
pub fn spread(
    what: &str,
    frontend: SocketAddr,
    requests: usize,
    mut request: impl FnMut() -> Result<Reply>,
) -> Result<Tally> {
    let mut tally = Tally::new(BACKEND_NAMES);
    let started = Instant::now();
    for _ in 0..requests {
        ensure!(
            started.elapsed() < SPREAD_DEADLINE,
            "{what}: only {} requests within {SPREAD_DEADLINE:?}",
            tally.total()
        );
        let reply = request()?;
        ensure!(
            reply.peer == frontend,
            "{what}: an answer from {}, not {frontend}",
            reply.peer
        );
        tally.record(&reply.body);
    }
    println!("{what}:\n{tally}chi² = {:.3}", tally.chi_square());
    ensure!(
        tally.unexpected().is_empty() && tally.looks_uniform(),
        "{what}: not spread over the backends (chi² = {:.3} ≥ {}):\n{tally}",
        tally.chi_square(),
        tally.chi_square_critical()
    );
    Ok(tally)
}

/// A UDP socket of `node`, of `frontend`'s family, connected to `frontend`:
/// `getpeername()` must show the frontend; one request's answer (and where `recvfrom()`
/// says it came from).
pub fn connected_udp_request(node: &Netns, frontend: SocketAddr) -> Result<Reply> {
    let unspecified: IpAddr = match frontend {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = node.run(|| UdpSocket::bind((unspecified, 0)))??;
    socket.set_read_timeout(Some(proxy_lab::REQUEST_TIMEOUT))?;
    socket.connect(frontend)?;
    let peer = socket.peer_addr()?;
    ensure!(peer == frontend, "getpeername: {peer}, not {frontend}");
    socket.send(b"ping")?;
    let mut buffer = [0u8; 512];
    let (length, peer) = socket.recv_from(&mut buffer)?;
    Ok(Reply {
        body: String::from_utf8_lossy(&buffer[..length]).into_owned(),
        peer,
    })
}

/// The flows of a client, as `conntrack -o json --client` lists them.
pub fn flows_of(daemon: &Daemon, client: impl Into<IpAddr>, extra: &[&str]) -> Result<Vec<Value>> {
    let client = client.into().to_string();
    let mut args = vec!["conntrack", "--client", client.as_str()];
    args.extend(extra);
    match cli_json(daemon, &args)? {
        Value::Array(flows) => Ok(flows),
        other => bail!("conntrack JSON is not an array: {other}"),
    }
}

/// The pods of a cluster node, as endpoints on that node.
pub fn endpoints_on(node: &ClusterNode) -> Vec<Endpoint> {
    node.pods()
        .iter()
        .map(|pod| Endpoint::of(pod).on_node(&node.name))
        .collect()
}

/// One daemon on each of nodes 1 and 2 of `cluster`, each with `service` over `endpoints`
/// and `--xdp xdp`, synced.
pub fn daemons_on_nodes_1_and_2<'lab>(
    cluster: &'lab Cluster,
    service: &Service,
    endpoints: &[Endpoint],
    xdp: &str,
) -> Result<Vec<Daemon<'lab>>> {
    let daemons = (1..=2)
        .map(|k| {
            cluster
                .daemon(k)
                .manifest(service.manifest_with(endpoints))
                .args(["--xdp", xdp])
                .start()
        })
        .collect::<Result<Vec<_>>>()?;
    for daemon in &daemons {
        daemon.wait_synced(SYNC_TIMEOUT)?;
    }
    Ok(daemons)
}

/// Runs `program args` inside `ns` (`nsenter --net`), with `stdin` as its input; its stdout.
pub fn in_netns(ns: &Netns, program: &str, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} in netns {}", ns.name()))?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The KUBE chains of iptables-save-style text: per table, each chain's rules in order.
pub fn kube_rules(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut rules: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
        } else if let Some(chain) = line.strip_prefix(':') {
            let chain = chain.split(' ').next().unwrap_or_default();
            if chain.starts_with("KUBE-") {
                rules.entry((table.clone(), chain.to_owned())).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            rules
                .entry((table.clone(), chain.to_owned()))
                .or_default()
                .push(line.to_owned());
        }
    }
    rules
}
