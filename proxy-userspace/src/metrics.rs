//! Prometheus metrics on `--metrics-bind-address`: kube-proxy's names where they mean the
//! same thing (so existing dashboards and alerts keep working), plus the datapath's own
//! counters and map fill levels under `ebpf_proxy_`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;
use proxy_common::stat;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

/// `ebpf_proxy_objects_rejected_total`'s labels: what was skipped, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabel {
    pub kind: &'static str,
    pub reason: &'static str,
}

/// The daemon's handles to its metrics; cheap to clone, all clones share values.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// kubeproxy_sync_proxy_rules_duration_seconds: plan + diff + map writes.
    pub sync_duration: Histogram,
    /// kubeproxy_network_programming_duration_seconds: from the change (EndpointSlice
    /// trigger time, or when the source saw it) until the datapath reflects it.
    pub network_programming: Histogram,
    pub endpoint_changes: Counter,
    pub service_changes: Counter,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_max_entries: Family<MapLabel, Gauge>,
    /// Writes refused because a map was full, by map.
    pub map_full: Family<MapLabel, Counter>,
    pub conntrack_gc_removed: Counter,
    /// How long each conntrack sweep took.
    pub conntrack_gc_duration: Histogram,
    /// The sweep interval chosen after the latest sweep.
    pub conntrack_gc_interval: Gauge<f64, AtomicU64>,
    /// Objects and fields skipped (invalid, unsupported, in conflict, over a limit).
    pub objects_rejected: Family<RejectedLabel, Counter>,
}

impl Metrics {
    /// Creates the metrics and a registry that also exports the datapath counters read
    /// from `stats` at scrape time.
    pub fn new(stats: Option<PerCpuArray<MapData, u64>>) -> (Self, Arc<Registry>) {
        let metrics = Self {
            // kube-proxy's buckets: 1 ms doubling to ~16 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // kube-proxy's buckets: 0.25 s … 30 min.
            network_programming: Histogram::new(
                linear_buckets(0.25, 0.25, 2)
                    .chain(linear_buckets(1.0, 1.0, 59))
                    .chain(linear_buckets(60.0, 5.0, 12))
                    .chain(linear_buckets(120.0, 30.0, 7)),
            ),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            last_sync_timestamp: Gauge::default(),
            map_entries: Family::default(),
            map_max_entries: Family::default(),
            map_full: Family::default(),
            conntrack_gc_removed: Counter::default(),
            // 100 µs … ~13 s.
            conntrack_gc_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            conntrack_gc_interval: Gauge::default(),
            objects_rejected: Family::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            metrics.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules EndpointSlice changes",
            metrics.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            metrics.last_sync_timestamp.clone(),
        );
        registry.register(
            "ebpf_proxy_map_entries",
            "Entries in each eBPF map (the conntrack maps: as of the last garbage collection)",
            metrics.map_entries.clone(),
        );
        registry.register(
            "ebpf_proxy_map_max_entries",
            "Capacity of each eBPF map",
            metrics.map_max_entries.clone(),
        );
        registry.register(
            "ebpf_proxy_map_full_writes",
            "Map writes refused because the map was full (BACKEND_SLOTS: frontends whose \
             backends found no room)",
            metrics.map_full.clone(),
        );
        registry.register(
            "ebpf_proxy_conntrack_gc_removed_entries",
            "Conntrack entries of finished flows removed by the garbage collector",
            metrics.conntrack_gc_removed.clone(),
        );
        registry.register(
            "ebpf_proxy_conntrack_gc_duration_seconds",
            "How long a sweep of both conntrack maps took",
            metrics.conntrack_gc_duration.clone(),
        );
        registry.register(
            "ebpf_proxy_conntrack_gc_interval_seconds",
            "The garbage collector's current interval between sweeps",
            metrics.conntrack_gc_interval.clone(),
        );
        registry.register(
            "ebpf_proxy_objects_rejected",
            "Objects and fields skipped, each logged with its name and reason",
            metrics.objects_rejected.clone(),
        );
        if let Some(stats) = stats {
            registry.register_collector(Box::new(DatapathCounters { stats }));
        }
        (metrics, Arc::new(registry))
    }
}

impl Metrics {
    /// Counts one skipped object or field.
    pub fn count_rejected(&self, problem: &crate::model::Problem) {
        let label = RejectedLabel {
            kind: problem.kind.as_str(),
            reason: problem.reason,
        };
        self.objects_rejected.get_or_create(&label).inc();
    }
}

/// Exports the per-CPU STATS array, summed, as `ebpf_proxy_datapath_packets_total{counter}`.
struct DatapathCounters {
    stats: PerCpuArray<MapData, u64>,
}

impl fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCounters")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "ebpf_proxy_datapath_packets",
            "Packets by datapath outcome, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (index, name) in stat::NAMES.iter().enumerate() {
            // A failed read (map gone) leaves the series out rather than reporting zero.
            let Ok(per_cpu) = self.stats.get(&(index as u32), 0) else {
                continue;
            };
            let value: u64 = per_cpu.iter().sum();
            let label = CounterLabel { counter: name };
            ConstCounter::new(value).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// The routes of the metrics server (`--metrics-bind-address`).
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(registry): State<Arc<Registry>>| async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }),
        )
        .with_state(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_kube_proxy_names() {
        let (metrics, registry) = Metrics::new(None);
        metrics.endpoint_changes.inc_by(3);
        metrics.count_rejected(&crate::model::Problem::new(
            crate::model::ProblemKind::Service,
            "frontend_conflict",
            "default/b:http: 198.19.0.10:80/tcp (ClusterIp) is already taken".to_owned(),
        ));
        metrics.sync_duration.observe(0.002);
        metrics
            .map_max_entries
            .get_or_create(&MapLabel { map: "SERVICES" })
            .set(1024);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for expected in [
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 3",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "ebpf_proxy_map_max_entries{map=\"SERVICES\"} 1024",
            "ebpf_proxy_objects_rejected_total{kind=\"Service\",reason=\"frontend_conflict\"} 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }
}
