//! Ids that stay the same across syncs and daemon restarts (they are learned back from the
//! pinned maps), so conntrack entries and session affinities keep naming the right things:
//! a backend's id (BACKEND_IDS), a frontend's `rev_nat_id` and a Service port's
//! `service_port_id`.

use foldhash::HashMap;

use proxy_common::{Address, Backend, FrontendKey};

use super::image::MapImage;
use crate::plan::ServicePortName;

/// Gives out the ids. They grow monotonically and are not reused soon after release, so a
/// listing never attributes an old flow to a new backend, nor an affinity to another
/// Service port.
/// One per address family (`A`): each family's maps count their ids apart.
#[derive(Clone, Debug, Default)]
pub struct IdRegistry<A = u32> {
    backends: HashMap<Backend<A>, u32>,
    frontends: HashMap<FrontendKey<A>, u32>,
    service_ports: HashMap<(ServicePortName, u8), u32>,
    last_backend_id: u32,
    last_rev_nat_id: u32,
    last_service_port_id: u32,
}

impl<A: Address> IdRegistry<A> {
    /// Learns the ids already in the maps. A Service port is known by its frontends' names
    /// (SVC_NAMES); one without a name gets a new id, and its clients a new affinity.
    pub fn from_image(image: &MapImage<A>) -> Self {
        let mut ids = Self::default();
        for (id, backend) in &image.backends {
            ids.backends.insert(*backend, *id);
            ids.last_backend_id = ids.last_backend_id.max(*id);
        }
        for (key, header) in &image.services {
            ids.frontends.insert(*key, header.rev_nat_id);
            ids.last_rev_nat_id = ids.last_rev_nat_id.max(header.rev_nat_id);
            ids.last_service_port_id = ids.last_service_port_id.max(header.service_port_id);
            if let Some(name) = image.names.get(&header.rev_nat_id) {
                let port = ServicePortName {
                    namespace: name.namespace().into(),
                    name: name.name().into(),
                    port_name: name.port_name().into(),
                };
                ids.service_ports
                    .insert((port, key.proto), header.service_port_id);
            }
        }
        ids
    }

    pub fn backend_id(&mut self, backend: Backend<A>) -> u32 {
        if let Some(id) = self.backends.get(&backend) {
            return *id;
        }
        let id = next_free(&mut self.last_backend_id, |id| {
            self.backends.values().any(|used| *used == id)
        });
        self.backends.insert(backend, id);
        id
    }

    pub fn rev_nat_id(&mut self, frontend: FrontendKey<A>) -> u32 {
        if let Some(id) = self.frontends.get(&frontend) {
            return *id;
        }
        let id = next_free(&mut self.last_rev_nat_id, |id| {
            self.frontends.values().any(|used| *used == id)
        });
        self.frontends.insert(frontend, id);
        id
    }

    /// The id of the Service port `port` of protocol `proto`.
    pub fn service_port_id(&mut self, port: &ServicePortName, proto: u8) -> u32 {
        let key = (port.clone(), proto);
        if let Some(id) = self.service_ports.get(&key) {
            return *id;
        }
        let id = next_free(&mut self.last_service_port_id, |id| {
            self.service_ports.values().any(|used| *used == id)
        });
        self.service_ports.insert(key, id);
        id
    }

    /// Makes room for the ids of `frontends` frontends and `backends` backends in all.
    pub fn reserve(&mut self, frontends: usize, backends: usize) {
        self.frontends
            .reserve(frontends.saturating_sub(self.frontends.len()));
        self.backends
            .reserve(backends.saturating_sub(self.backends.len()));
    }

    /// Forgets a frontend's id (it left the maps).
    pub fn release_frontend(&mut self, key: FrontendKey<A>) {
        self.frontends.remove(&key);
    }

    /// Forgets a backend's id (no slot names it any more).
    pub fn release_backend(&mut self, backend: &Backend<A>) {
        self.backends.remove(backend);
    }

    /// How many backend, frontend and Service port ids are given out.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.backends.len(),
            self.frontends.len(),
            self.service_ports.len(),
        )
    }

    /// Gives unused buckets back after most ids were released.
    pub fn shrink_sparse(&mut self) {
        crate::allocator::shrink_sparse(&mut self.backends);
        crate::allocator::shrink_sparse(&mut self.frontends);
        crate::allocator::shrink_sparse(&mut self.service_ports);
    }

    /// Forgets the ids of everything that is no longer named: backends not in `backends`,
    /// frontends not in `frontends`, Service ports no frontend belongs to.
    pub fn retain(
        &mut self,
        backends: impl Fn(u32) -> bool,
        frontends: impl Fn(&FrontendKey<A>) -> bool,
        service_ports: impl Fn(u32) -> bool,
    ) {
        self.backends.retain(|_, id| backends(*id));
        self.frontends.retain(|key, _| frontends(key));
        self.service_ports.retain(|_, id| service_ports(*id));
    }
}

/// The id after `last` that is not 0 and not in use. The in-use check only runs after the
/// 32-bit counter wraps, which in practice never happens.
fn next_free(last: &mut u32, in_use: impl Fn(u32) -> bool) -> u32 {
    let mut wrapped = false;
    loop {
        *last = last.wrapping_add(1);
        if *last == 0 {
            *last = 1;
            wrapped = true;
        }
        if !wrapped || !in_use(*last) {
            return *last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_free_skips_zero_and_used_ids_after_wrapping() {
        let mut last = u32::MAX - 1;
        assert_eq!(next_free(&mut last, |_| false), u32::MAX);
        assert_eq!(next_free(&mut last, |id| id == 1 || id == 2), 3);
    }

    #[test]
    fn service_ports_get_one_id_per_name_and_protocol() {
        let port = |name: &str| ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
        };
        let mut ids: IdRegistry = IdRegistry::default();
        let web = ids.service_port_id(&port("web"), 6);
        assert_eq!(ids.service_port_id(&port("web"), 6), web);
        assert_ne!(ids.service_port_id(&port("web"), 17), web);
        assert_ne!(ids.service_port_id(&port("api"), 6), web);
    }
}
