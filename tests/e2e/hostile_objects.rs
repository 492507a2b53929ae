//! Hostile objects through the real daemon (issue 14), from both sources: the lab crate's
//! catalogue (`proxy_lab::hostile`: 26 kinds of broken or extreme Services and
//! EndpointSlices; through the manifests directory also 6 hostile files and a repeated
//! key), while one object flaps every millisecond and an unrelated change is made to the
//! `echo` Service. Each refusal or skip is logged with the object's name and reason and
//! counted in `ebpf_proxy_objects_rejected_total`; refused Services never reach the maps,
//! the others do; the unrelated change reaches traffic as fast as without them (within
//! the 2 s of `endpoint_update`); the daemon keeps running with bounded memory.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{backends, echo_service, served_by, until_avoided};
use proxy_lab::fake_apiserver::{ApiServerInNetns, Kind};
use proxy_lab::hostile::{self, Expected, HostileObject};
use proxy_lab::{Daemon, Lab, Manifest, NODE_NAME, Service, addr, require_lab};
use serde_json::{Value, json};

const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);
/// The flapping object changes this often, for this long.
const FLAP_EVERY: Duration = Duration::from_millis(1);
const FLAP_FOR: Duration = Duration::from_secs(3);
/// The daemon's peak resident set with every hostile object in (a debug build): far below
/// what one alias bomb took before its limits (335 MiB from 11 KiB).
const PEAK_RSS_LIMIT_KIB: u64 = 128 * 1024;
/// Small, so that `too-large.yaml` is refused without writing hundreds of megabytes.
const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

/// The flapping Service's ClusterIP.
const FLAPPING_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);

/// The flapping Service: one endpoint, moved between pod-1 and pod-2 at every change.
fn flapping() -> Service {
    Service::cluster_ip("flapping", FLAPPING_IP).tcp(common::SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
}

#[test]
fn hostile_objects_in_manifests_are_refused_and_others_keep_working() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .arg("--manifests-max-file-bytes")
        .arg(MAX_FILE_BYTES.to_string())
        .start()?;
    daemon.wait_synced(common::SYNC_TIMEOUT)?;
    let cases = hostile::hostile_objects();
    for case in &cases {
        daemon.apply(&Manifest {
            file_name: format!("{}.json", case.name),
            yaml: hostile::as_list(case),
        })?;
    }
    let files = hostile::hostile_files(MAX_FILE_BYTES);
    for file in &files {
        daemon.apply_bytes(file.file_name, &file.contents)?;
    }
    let (repeated, document) = hostile::repeated_key_document();
    daemon.apply(&Manifest {
        file_name: format!("{repeated}.yaml"),
        yaml: document,
    })?;

    let final_pod = flap_and_change(
        &lab,
        |index| daemon.apply(&flapping().manifest([lab.pod(1 + index % 2)])),
        || daemon.apply(&echo_service().manifest(&backends(&lab)[..2])),
    )?;

    check(&lab, &daemon, &cases, final_pod)?;
    let log = daemon.log();
    for file in files
        .iter()
        .map(|file| (file.file_name, file.reason))
        .chain([("repeated-key.yaml", "invalid")])
    {
        let (name, reason) = file;
        ensure!(
            log.lines()
                .any(|line| line.contains(name) && line.contains(reason)),
            "{name} not refused as {reason}:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn hostile_objects_from_the_api_server_are_refused_and_others_keep_working() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let api = ApiServerInNetns::start(lab.node())?;
    let cases = hostile::hostile_objects();
    api.edit(|cluster| {
        cluster.apply(Kind::Node, node());
        cluster.apply_manifest(&echo_service().manifest(backends(&lab)));
        for object in cases.iter().flat_map(|case| case.objects.iter()) {
            cluster.apply(kind_of(object), object.clone());
        }
    });
    let daemon = lab.daemon().api_server(api.url()).start()?;
    daemon.wait_synced(common::SYNC_TIMEOUT)?;

    let slice_of = |manifest: Manifest| -> Result<Value> {
        (manifest.objects().into_iter())
            .find(|object| object["kind"] == "EndpointSlice")
            .context("a lab manifest holds its EndpointSlice")
    };
    api.edit(|cluster| cluster.apply_manifest(&flapping().manifest([lab.pod(1)])));
    let final_pod = flap_and_change(
        &lab,
        |index| {
            let slice = slice_of(flapping().manifest([lab.pod(1 + index % 2)]))?;
            api.edit(|cluster| cluster.apply(Kind::EndpointSlice, slice));
            Ok(())
        },
        || {
            let slice = slice_of(echo_service().manifest(&backends(&lab)[..2]))?;
            api.edit(|cluster| cluster.apply(Kind::EndpointSlice, slice));
            Ok(())
        },
    )?;
    check(&lab, &daemon, &cases, final_pod)
}

fn kind_of(object: &Value) -> Kind {
    if object["kind"] == "Service" {
        Kind::Service
    } else {
        Kind::EndpointSlice
    }
}

fn node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE_NAME },
        "status": { "addresses": [{ "type": "InternalIP", "address": addr::NODE_IP.to_string() }] },
    })
}

/// Flaps the `flapping` Service (`flap(n)` makes its n-th change) every millisecond for
/// [`FLAP_FOR`] on a thread of its own, and meanwhile makes the unrelated change (pod-3
/// leaves `echo`) and waits until no new connection reaches pod-3. Returns the pod the
/// flapping Service was last moved to.
fn flap_and_change(
    lab: &Lab,
    flap: impl Fn(usize) -> Result<()> + Sync,
    change: impl FnOnce() -> Result<()>,
) -> Result<usize> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<usize> {
        let flapper = scope.spawn(|| -> Result<usize> {
            let started = Instant::now();
            let mut changes = 0;
            while started.elapsed() < FLAP_FOR && !stop.load(Ordering::Relaxed) {
                flap(changes)?;
                changes += 1;
                std::thread::sleep(FLAP_EVERY);
            }
            println!("the flapping Service changed {changes} times");
            Ok(changes)
        });
        let removed = &lab.pod(3).name;
        let changed = Instant::now();
        let outcome = change().and_then(|()| until_avoided(lab, removed, changed, || Ok(())));
        if outcome.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let last_seen = outcome?;
        println!("{removed} last served a new connection {last_seen:?} after its removal");
        ensure!(
            last_seen.is_none_or(|seen| seen <= PROPAGATION_LIMIT),
            "{removed} served new connections until {last_seen:?} after its removal"
        );
        let changes = flapper.join().expect("the flapping thread")?;
        ensure!(changes > 0, "the Service never flapped");
        // The last change moved it to pod-1 for an even index, pod-2 for an odd one.
        Ok(1 + (changes - 1) % 2)
    })
}

/// What the daemon made of the catalogue: every refusal and skip logged with the object's
/// name and reason and counted; refused Services absent from the maps, the others there;
/// the flapping Service settled on its last endpoint; `echo` served; peak memory bounded.
fn check(lab: &Lab, daemon: &Daemon, cases: &[HostileObject], flapping_pod: usize) -> Result<()> {
    let deadline = Instant::now() + PROPAGATION_LIMIT;
    let log = loop {
        let log = daemon.log();
        let missing: Vec<&str> = (cases.iter())
            .filter(|case| !reported(case, &log))
            .map(|case| case.name)
            .collect();
        if missing.is_empty() {
            break log;
        }
        if Instant::now() > deadline {
            bail!("not reported: {missing:?}\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let metrics = rejected_counts(lab)?;
    let mut expected_counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for case in cases {
        if let Expected::Refused(kind, reason) | Expected::Skipped(kind, reason) = case.expected {
            *expected_counts.entry((kind, reason)).or_default() += 1;
        }
    }
    for ((kind, reason), expected) in expected_counts {
        let counted = metrics
            .get(&(kind.to_owned(), reason.to_owned()))
            .copied()
            .unwrap_or(0);
        ensure!(
            counted >= expected,
            "{kind} {reason}: {counted} counted, {expected} expected: {metrics:?}"
        );
    }

    let frontends = daemon.cli(&["services", "-o", "json"])?;
    let frontends: Value = serde_json::from_str(&frontends)?;
    let vips: Vec<&str> = (frontends.as_array().context("services is an array")?.iter())
        .filter_map(|frontend| frontend["address"].as_str())
        .collect();
    for case in cases {
        for service in case
            .objects
            .iter()
            .filter(|object| object["kind"] == "Service")
        {
            let vip = service["spec"]["clusterIP"].as_str().unwrap_or_default();
            let programmed = vips.contains(&vip);
            let expected = !matches!(case.expected, Expected::Refused(..));
            ensure!(
                programmed == expected,
                "{}: {vip} programmed: {programmed}, expected: {expected}",
                case.name
            );
        }
    }

    let flapping_backend = lab.pod(flapping_pod).name.clone();
    let deadline = Instant::now() + PROPAGATION_LIMIT;
    loop {
        let served = caller_request(lab, FLAPPING_IP)?;
        if served == flapping_backend {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the flapping Service still served by {served}, its last change named {flapping_backend}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let backend = served_by(lab)?;
    ensure!(backend != lab.pod(3).name, "{backend} still serves echo");

    let pid = daemon.pid().context("the daemon stopped")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib = (status.lines())
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("no VmHWM")?;
    println!("peak RSS {} MiB", peak_kib / 1024);
    ensure!(
        peak_kib <= PEAK_RSS_LIMIT_KIB,
        "peak RSS {peak_kib} KiB, more than {PEAK_RSS_LIMIT_KIB}\n{log}"
    );
    Ok(())
}

/// Whether the daemon's log tells a refusal or skip of `case` with its name and reason
/// (an accepted case: whether nothing names it).
fn reported(case: &HostileObject, log: &str) -> bool {
    let key = case.key();
    let mut lines = log.lines().filter(|line| line.contains(&key));
    match case.expected {
        Expected::Refused(_, reason) | Expected::Skipped(_, reason) => {
            lines.any(|line| line.contains(reason))
        }
        Expected::Accepted => lines.next().is_none(),
    }
}

/// `ebpf_proxy_objects_rejected_total` by (kind, reason), from `/metrics`.
fn rejected_counts(lab: &Lab) -> Result<BTreeMap<(String, String), u64>> {
    let (code, text) = lab
        .node()
        .http_get(Ipv4Addr::LOCALHOST, 10249, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("ebpf_proxy_objects_rejected_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| -> Option<String> {
            let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
            let end = labels[start..].find('"')? + start;
            Some(labels[start..end].to_owned())
        };
        if let (Some(kind), Some(reason), Ok(value)) =
            (label("kind"), label("reason"), value.trim().parse::<f64>())
        {
            counts.insert((kind, reason), value as u64);
        }
    }
    Ok(counts)
}

/// The pod that answers a new connection from the caller to `vip`.
fn caller_request(lab: &Lab, vip: Ipv4Addr) -> Result<String> {
    Ok(common::caller(lab)
        .tcp_request(vip, common::SERVICE_TCP_PORT)?
        .body)
}
