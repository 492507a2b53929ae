//! healthCheckNodePort servers, kube-proxy compatible (`pkg/proxy/healthcheck`).
//!
//! A Service with `externalTrafficPolicy: Local` sends outside traffic only to endpoints on
//! the node it lands on, and nodes without one drop it. Its cloud load balancer learns which
//! nodes to use by probing `healthCheckNodePort` on every node: 200 where this node has
//! ready endpoints of the Service (and the proxy is healthy), 503 elsewhere, with the same
//! JSON body kube-proxy writes. One HTTP server per Service, answering on every path.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use axum::Router;
use axum::http::{StatusCode, header};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::health::Health;
use crate::model::ObjectKey;
use crate::plan::ServiceHealthCheck;

/// The running health-check servers, kept equal to the plan's `health_checks`.
#[derive(Debug)]
pub struct ServiceHealthServers {
    health: Arc<Health>,
    servers: BTreeMap<ObjectKey, Server>,
}

/// One Service's server: its listeners and the count they report.
#[derive(Debug)]
struct Server {
    node_port: u16,
    addresses: Vec<IpAddr>,
    /// Updated by every sync, read by every probe.
    local_endpoints: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    /// Stops serving: the listeners close with their tasks, so the port is free again.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ServiceHealthServers {
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            servers: BTreeMap::new(),
        }
    }

    /// Opens, updates and closes servers to match `checks`, listening on `addresses`
    /// (the node's addresses in kube-proxy's `--nodeport-addresses`, loopback included;
    /// `0.0.0.0` and `::` for a family left unrestricted; none when no address matches,
    /// which is logged once).
    /// Must run inside the tokio runtime. A port that cannot be bound is logged and tried
    /// again on the next sync, as kube-proxy does.
    pub fn sync(&mut self, checks: &BTreeMap<ObjectKey, ServiceHealthCheck>, addresses: &[IpAddr]) {
        self.servers.retain(|service, server| {
            let keep = checks.get(service).is_some_and(|check| {
                check.node_port == server.node_port && server.addresses == addresses
            });
            if !keep {
                info!(%service, port = server.node_port, "health check closed");
            }
            keep
        });
        for (service, check) in checks {
            if let Some(server) = self.servers.get(service) {
                server
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(service, check, addresses) {
                Ok(server) => {
                    if addresses.is_empty() {
                        warn!(
                            %service,
                            port = check.node_port,
                            "health check not served: no node address is inside \
                             --nodeport-addresses"
                        );
                    } else {
                        info!(%service, port = check.node_port, addresses = ?addresses, "health check listening");
                    }
                    self.servers.insert(service.clone(), server);
                }
                Err(error) => {
                    warn!(%service, port = check.node_port, %error, "health check cannot listen; retried on the next sync");
                }
            }
        }
    }

    fn open(
        &self,
        service: &ObjectKey,
        check: &ServiceHealthCheck,
        addresses: &[IpAddr],
    ) -> std::io::Result<Server> {
        let local_endpoints = Arc::new(AtomicUsize::new(check.local_endpoints));
        let router = router(
            service.clone(),
            local_endpoints.clone(),
            self.health.clone(),
        );
        // Bind everything first, so a failure leaves nothing half open.
        let listeners = addresses
            .iter()
            .map(|&address| bind(SocketAddr::from((address, check.node_port))))
            .collect::<std::io::Result<Vec<_>>>()?;
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                let router = router.clone();
                tokio::spawn(async move {
                    if let Err(error) = axum::serve(listener, router).await {
                        warn!(%error, "health check server stopped");
                    }
                })
            })
            .collect();
        Ok(Server {
            node_port: check.node_port,
            addresses: addresses.to_vec(),
            local_endpoints,
            tasks,
        })
    }
}

/// A non-blocking listener for tokio, bound synchronously so the sync loop stays sync. An
/// IPv6 one is IPv6 only, so `::` and `0.0.0.0` hold the same port side by side (each
/// family has its own listener, as kube-proxy has one health server per family).
fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Answers every path of one Service's health check.
fn router(service: ObjectKey, local_endpoints: Arc<AtomicUsize>, health: Arc<Health>) -> Router {
    Router::new().fallback(move || {
        let count = local_endpoints.load(Ordering::Relaxed);
        let proxy_healthy = health.status(SystemTime::now()).healthy;
        let (code, body) = response(&service, count, proxy_healthy);
        async move {
            (
                code,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body,
            )
        }
    })
}

/// kube-proxy's answer: 200 when this node has local endpoints and the proxy is healthy,
/// else 503; the body is its JSON, byte for byte (tab-indented).
pub fn response(
    service: &ObjectKey,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let code = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quoted(&service.namespace),
        quoted(&service.name),
    );
    (code, body)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn answers_200_only_with_local_endpoints_and_a_healthy_proxy() {
        let service = ObjectKey::new("web", "lb");
        // (local endpoints, proxy healthy, expected code)
        let cases = [
            (2, true, StatusCode::OK),
            (0, true, StatusCode::SERVICE_UNAVAILABLE),
            (2, false, StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (count, healthy, expected) in cases {
            assert_eq!(
                response(&service, count, healthy).0,
                expected,
                "{count} local endpoints, proxy healthy {healthy}"
            );
        }
    }

    #[test]
    fn body_is_kube_proxys() {
        let (_, body) = response(&ObjectKey::new("web", "lb"), 2, true);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"web\",\n\t\t\"name\": \"lb\"\n\t},\n\
             \t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["service"]["namespace"], "web");
        assert_eq!(parsed["service"]["name"], "lb");
        assert_eq!(parsed["localEndpoints"], 2);
        assert_eq!(parsed["serviceProxyHealthy"], true);
    }

    #[tokio::test]
    async fn servers_open_follow_counts_and_close_with_the_plan() {
        let service = ObjectKey::new("web", "lb");
        let health = Health::new(std::time::Duration::from_secs(60));
        let mut servers = ServiceHealthServers::new(health);
        let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        // Port 0: the kernel picks a free one; the test reads it back from the listener.
        let check = |local_endpoints| {
            BTreeMap::from([(
                service.clone(),
                ServiceHealthCheck {
                    node_port: 0,
                    local_endpoints,
                },
            )])
        };
        servers.sync(&check(1), &loopback);
        let shared = servers.servers[&service].local_endpoints.clone();
        assert_eq!(shared.load(Ordering::Relaxed), 1);
        servers.sync(&check(0), &loopback);
        assert!(
            Arc::ptr_eq(&shared, &servers.servers[&service].local_endpoints),
            "a count change keeps the server"
        );
        assert_eq!(shared.load(Ordering::Relaxed), 0);
        servers.sync(&BTreeMap::new(), &loopback);
        assert!(servers.servers.is_empty());
    }

    /// A free port on loopback, for a server the test talks to.
    fn free_port() -> u16 {
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        probe.local_addr().unwrap().port()
    }

    /// One HTTP/1.0 GET to `127.0.0.1:port` (blocking, off the runtime's thread): the
    /// status code, or the connect error.
    async fn probe(port: u16) -> std::io::Result<u16> {
        probe_at(IpAddr::V4(Ipv4Addr::LOCALHOST), port).await
    }

    async fn probe_at(addr: IpAddr, port: u16) -> std::io::Result<u16> {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect((addr, port))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let code = response.split_whitespace().nth(1).unwrap_or_default();
            Ok(code.parse().unwrap_or_default())
        })
        .await
        .expect("the probe thread")
    }

    /// Servers for one Service `web/lb` with one local endpoint, on a free port.
    fn one_check_on_a_free_port() -> (
        ObjectKey,
        ServiceHealthServers,
        u16,
        BTreeMap<ObjectKey, ServiceHealthCheck>,
    ) {
        let service = ObjectKey::new("web", "lb");
        let health = Health::new(std::time::Duration::from_secs(60));
        let port = free_port();
        let checks = BTreeMap::from([(
            service.clone(),
            ServiceHealthCheck {
                node_port: port,
                local_endpoints: 1,
            },
        )]);
        (service, ServiceHealthServers::new(health), port, checks)
    }

    /// `--nodeport-addresses 127.0.0.0/8`: the node's loopback address is where the check
    /// listens, and it answers there; with no matching address nothing listens.
    #[tokio::test]
    async fn a_loopback_address_is_served_and_no_address_serves_nothing() {
        let (service, mut servers, port, checks) = one_check_on_a_free_port();
        servers.sync(&checks, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(probe(port).await.unwrap(), 200);

        servers.sync(&checks, &[]);
        assert!(servers.servers[&service].tasks.is_empty());
        // The listener closes with its aborted task; give the runtime a turn to drop it.
        tokio::task::yield_now().await;
        let refused = probe(port).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    /// Both families at once: an IPv4 and an IPv6 listener share the port (the IPv6 one is
    /// IPv6 only), and each answers.
    #[tokio::test]
    async fn both_families_listen_on_one_port() {
        let (service, mut servers, port, checks) = one_check_on_a_free_port();
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        servers.sync(&checks, &[v4, v6]);
        assert_eq!(servers.servers[&service].tasks.len(), 2);
        assert_eq!(probe_at(v4, port).await.unwrap(), 200);
        assert_eq!(probe_at(v6, port).await.unwrap(), 200);
    }
}
