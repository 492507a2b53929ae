//! The map contents as data: [`MapImage`] (what SERVICES, BACKEND_SLOTS, BACKEND_IDS,
//! MEMBERSHIP, SOURCE_RANGES and SVC_NAMES hold), [`DesiredImage`] (what they should hold,
//! each frontend's slots listed with its header, not yet placed), the one place that turns
//! a frontend's plan into its entries ([`frontend_entries`], with stable ids from an
//! [`IdRegistry`]), [`place`] (where new slices go in BACKEND_SLOTS) and [`diff`], the one
//! ordering rule that keeps every packet consistent while entries change.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use proxy_common::maglev::{self, CHUNK_POSITIONS, MaglevChunk, MaglevKey};
use proxy_common::{
    Address, Backend, FrontendKey, FrontendValue, MembershipKey, ServiceName, Slot, SourceRange,
    membership, service_flags,
};

use super::ids::IdRegistry;
use super::slots::{Slice, SlotAllocator};
use crate::plan::{
    BackendAddr, DesiredState, EmptyFrontend, Frontend, FrontendKind, FrontendPlan, Selection,
};

/// The contents of the maps the writer owns, of one address family (`A`, see
/// [`Address`]: IPv4's SERVICES, BACKEND_SLOTS, …, or IPv6's SERVICES6, BACKEND_SLOTS6, …).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapImage<A = u32> {
    /// SERVICES: each frontend's header.
    pub services: BTreeMap<FrontendKey<A>, FrontendValue>,
    /// BACKEND_SLOTS: the slots headers name, and the slices written for headers to come.
    pub slots: BTreeMap<u32, Slot<A>>,
    /// BACKEND_IDS, inverted: id → backend.
    pub backends: BTreeMap<u32, Backend<A>>,
    /// Each frontend's endpoint addresses: selectable, serving (`proxy_common::membership`).
    pub membership: BTreeMap<MembershipKey<A>, u8>,
    /// rev_nat_id → the Service port of that frontend.
    pub names: BTreeMap<u32, ServiceName>,
    /// The client prefixes of each restricted frontend (SOURCE_RANGES' keys).
    pub source_ranges: BTreeSet<SourceRangeEntry<A>>,
    /// MAGLEV: the chunks the maps hold (their contents follow from the slices they belong
    /// to, see [`maglev_table`], and are not kept here).
    pub maglev: BTreeSet<MaglevKey>,
}

/// What the maps should hold: like [`MapImage`], but each frontend's slots are listed with
/// its header (whose `base` means nothing yet) rather than placed in BACKEND_SLOTS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredImage<A = u32> {
    pub frontends: BTreeMap<FrontendKey<A>, FrontendEntry<A>>,
    pub backends: BTreeMap<u32, Backend<A>>,
    pub membership: BTreeMap<MembershipKey<A>, u8>,
    pub names: BTreeMap<u32, ServiceName>,
    pub source_ranges: BTreeSet<SourceRangeEntry<A>>,
}

/// A frontend's header and its slots in order: its own set, then its Cluster set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendEntry<A = u32> {
    pub header: FrontendValue,
    pub slots: Vec<Slot<A>>,
}

/// One SOURCE_RANGES key: a frontend's prefix of `prefix_len` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRangeEntry<A = u32> {
    pub range: SourceRange<A>,
    pub prefix_len: u8,
}

impl<A: Address> SourceRangeEntry<A> {
    pub fn key(&self) -> Key<SourceRange<A>> {
        Key::new(
            SourceRange::<A>::FRONTEND_BITS + u32::from(self.prefix_len),
            self.range,
        )
    }

    pub fn from_key(key: &Key<SourceRange<A>>) -> Self {
        Self {
            range: key.data(),
            prefix_len: key
                .prefix_len()
                .saturating_sub(SourceRange::<A>::FRONTEND_BITS) as u8,
        }
    }
}

/// The header flags: the frontend's kind, whether it drops while empty, whether its
/// clients are restricted to source ranges, and whether pods use a Cluster set.
fn header_flags(plan: &FrontendPlan) -> u16 {
    let kind = match plan.kind {
        FrontendKind::ClusterIp => service_flags::CLUSTER_IP,
        FrontendKind::NodePort => service_flags::NODE_PORT,
        FrontendKind::ExternalIp => service_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => service_flags::LOAD_BALANCER,
    };
    let mut flags = kind;
    if plan.backends.is_empty() && plan.when_empty == EmptyFrontend::Drop {
        flags |= service_flags::NO_LOCAL_ENDPOINTS;
    }
    if !plan.source_ranges.is_empty() {
        flags |= service_flags::SOURCE_RANGES;
    }
    if plan.cluster_backends.is_some() {
        flags |= service_flags::CLUSTER_SET;
    }
    flags
}

/// The key of a frontend of family `A` in its SERVICES map; `None` for a frontend of the
/// other family, which the other family's maps hold.
pub fn frontend_key<A: Address>(frontend: &Frontend) -> Option<FrontendKey<A>> {
    Some(FrontendKey {
        addr: A::from_ip(frontend.addr)?,
        port: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    })
}

/// The map contents for `desired`'s frontends of family `A` (the caller forgets the ids
/// nothing names any more).
pub fn materialize<A: Address>(desired: &DesiredState, ids: &mut IdRegistry<A>) -> DesiredImage<A> {
    let (frontends, backends) = family_counts::<A>(desired);
    ids.reserve(frontends, backends);
    let mut entries = Entries::with_capacity(frontends, backends);
    for (frontend, plan) in &desired.frontends {
        frontend_entries(frontend, plan, ids, &mut entries);
    }
    entries.into_image()
}

/// How many frontends of family `A` `desired` holds, and how many slots they name: what
/// the ids and entries grow to, reserved at once rather than grown by doubling (a
/// million backends at 100 000 Services).
fn family_counts<A: Address>(desired: &DesiredState) -> (usize, usize) {
    let ours = |backends: &[BackendAddr]| {
        (backends.iter())
            .filter(|backend| A::from_ip(backend.addr).is_some())
            .count()
    };
    (desired.frontends.iter())
        .filter(|(frontend, _)| frontend_key::<A>(frontend).is_some())
        .fold((0, 0), |(frontends, slots), (_, plan)| {
            let cluster = plan.cluster_backends.as_deref().map_or(0, ours);
            (frontends + 1, slots + ours(&plan.backends) + cluster)
        })
}

/// Frontends' entries as [`frontend_entries`] lists them, to become a [`DesiredImage`] at
/// once: each map is sorted and built in one pass (at 100 000 Services, a million backends
/// and members inserted one at a time cost a second).
pub struct Entries<A: Address> {
    frontends: Vec<(FrontendKey<A>, FrontendEntry<A>)>,
    backends: Vec<(u32, Backend<A>)>,
    /// Membership bits, a key listed once per bit it gains.
    membership: Vec<(MembershipKey<A>, u8)>,
    names: Vec<(u32, ServiceName)>,
    source_ranges: Vec<SourceRangeEntry<A>>,
}

impl<A: Address> Default for Entries<A> {
    fn default() -> Self {
        Self {
            frontends: Vec::new(),
            backends: Vec::new(),
            membership: Vec::new(),
            names: Vec::new(),
            source_ranges: Vec::new(),
        }
    }
}

impl<A: Address> Entries<A> {
    /// Room for `frontends` frontends naming `slots` slots in all.
    fn with_capacity(frontends: usize, slots: usize) -> Self {
        Self {
            frontends: Vec::with_capacity(frontends),
            backends: Vec::with_capacity(slots),
            membership: Vec::with_capacity(slots),
            names: Vec::with_capacity(frontends),
            source_ranges: Vec::new(),
        }
    }

    /// The image of these entries: of a key listed twice, the later entry (a membership
    /// key: the union of its bits).
    pub fn into_image(self) -> DesiredImage<A> {
        let mut membership = self.membership;
        membership.sort_by_key(|(key, _)| *key);
        membership.dedup_by(|(key, bits), (kept, kept_bits)| {
            let same = key == kept;
            if same {
                *kept_bits |= *bits;
            }
            same
        });
        DesiredImage {
            frontends: self.frontends.into_iter().collect(),
            backends: self.backends.into_iter().collect(),
            membership: membership.into_iter().collect(),
            names: self.names.into_iter().collect(),
            source_ranges: self.source_ranges.into_iter().collect(),
        }
    }
}

/// Adds one frontend's entries to `image`: its header, its slots (its own set, then the
/// Cluster set pods use, each in the plan's sorted order) and their backends, its
/// MEMBERSHIP entries, the SOURCE_RANGES prefixes of a restricted one, and its SVC_NAMES
/// name. The one place that knows how a plan becomes map entries. A Service port whose
/// name exceeds Kubernetes' limits (possible only in hand-written manifests) is balanced
/// all the same, just listed without a name. A frontend of the other family adds nothing
/// (see [`frontend_key`]); the planner gives a frontend only backends, serving addresses
/// and source ranges of its own family.
pub fn frontend_entries<A: Address>(
    frontend: &Frontend,
    plan: &FrontendPlan,
    ids: &mut IdRegistry<A>,
    image: &mut Entries<A>,
) {
    let proto = frontend.protocol.number();
    let Some(key) = frontend_key(frontend) else {
        return;
    };
    let rev_nat_id = ids.rev_nat_id(key);
    let cluster_backends = plan.cluster_backends.as_deref().unwrap_or_default();
    let mut slots = Vec::with_capacity(plan.backends.len() + cluster_backends.len());
    let sets = [
        (&plan.backends[..], membership::SELECTABLE),
        (cluster_backends, membership::CLUSTER_SELECTABLE),
    ];
    for (backends, bit) in sets {
        for backend in backends {
            let Some(addr) = A::from_ip(backend.addr) else {
                continue;
            };
            let backend = Backend {
                addr,
                port: backend.port.to_be(),
                proto,
                _pad: 0,
            };
            let backend_id = ids.backend_id(backend);
            image.backends.push((backend_id, backend));
            slots.push(Slot {
                backend,
                backend_id,
                _pad: 0,
            });
            let member = MembershipKey {
                rev_nat_id,
                addr: backend.addr,
            };
            image.membership.push((member, bit));
        }
    }
    for addr in plan
        .serving_addrs
        .iter()
        .filter_map(|addr| A::from_ip(*addr))
    {
        let member = MembershipKey { rev_nat_id, addr };
        image.membership.push((member, membership::SERVING));
    }
    for network in &plan.source_ranges {
        let Some(addr) = A::from_ip(network.network()) else {
            continue;
        };
        image.source_ranges.push(SourceRangeEntry {
            range: SourceRange { rev_nat_id, addr },
            prefix_len: network.prefix_len(),
        });
    }
    let count = |backends: &[BackendAddr]| u16::try_from(backends.len()).unwrap_or(u16::MAX);
    let maglev = match plan.selection {
        Selection::Maglev { table_size } if !plan.backends.is_empty() => {
            maglev::header_value(table_size).unwrap_or(0)
        }
        _ => 0,
    };
    let header = FrontendValue {
        rev_nat_id,
        service_port_id: ids.service_port_id(&plan.service, proto),
        base: 0,
        count: count(&plan.backends),
        cluster_count: plan.cluster_backends.as_deref().map_or(0, count),
        flags: header_flags(plan),
        maglev,
        // The planner keeps timeouts within the API's 1..=86400 s.
        affinity_timeout_s: plan.session_affinity.map_or(0, |timeout| {
            u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX)
        }),
    };
    image.frontends.push((key, FrontendEntry { header, slots }));
    let service = &plan.service;
    if let Some(name) = ServiceName::new(&service.namespace, &service.name, &service.port_name) {
        image.names.push((rev_nat_id, name));
    }
}

/// The MAGLEV keys of the table `header` names (none for a random one).
pub fn maglev_keys(header: &FrontendValue) -> impl Iterator<Item = MaglevKey> + '_ {
    let chunks = maglev::table_size(header.maglev).map_or(0, maglev::chunks);
    (0..chunks).map(|chunk| MaglevKey {
        base: header.base,
        maglev: header.maglev,
        _pad: 0,
        chunk,
    })
}

/// The Maglev table of a header whose own set is `own` (its first `count` slots, in the
/// plan's sorted order, as every node writes them), as MAGLEV entries.
pub fn maglev_table<A: Address>(
    header: &FrontendValue,
    own: &[Slot<A>],
) -> Vec<(MaglevKey, MaglevChunk)> {
    let Some(size) = maglev::table_size(header.maglev) else {
        return Vec::new();
    };
    let backends: Vec<BackendAddr> = own
        .iter()
        .map(|slot| BackendAddr {
            addr: slot.backend.addr.to_ip(),
            port: u16::from_be(slot.backend.port),
        })
        .collect();
    let table = crate::plan::maglev::table(&backends, size);
    maglev_keys(header)
        .zip(table.chunks(CHUNK_POSITIONS))
        .map(|(key, positions)| {
            let mut chunk = MaglevChunk {
                positions: [0; CHUNK_POSITIONS],
            };
            chunk.positions[..positions.len()].copy_from_slice(positions);
            (key, chunk)
        })
        .collect()
}

/// The slice a header names.
pub fn slice_of(header: &FrontendValue) -> Slice {
    Slice {
        base: header.base,
        len: header.slots(),
    }
}

impl<A: Address> MapImage<A> {
    /// The slots `header` names, in order; `None` if one is missing.
    pub fn slots_of(&self, header: &FrontendValue) -> Option<Vec<Slot<A>>> {
        slice_of(header)
            .range()
            .map(|index| self.slots.get(&index).copied())
            .collect()
    }

    /// What a packet would find wrong if `header` were the header of `key` now: a slot it
    /// names missing, a slot naming a backend BACKEND_IDS does not hold, a backend that is
    /// no member of its set in MEMBERSHIP, a restriction without source ranges. `None`:
    /// the header can be written. The writer writes no header before this holds, and the
    /// tests check it after every write.
    pub fn missing_for(&self, key: &FrontendKey<A>, header: &FrontendValue) -> Option<String> {
        // The slice's slots and the frontend's members, each read as one range (at 100 000
        // Services a full sync checks a million slots).
        let slice = slice_of(header).range();
        let mut slots = self.slots.range(slice.clone());
        let members: Vec<(A, u8)> = (self.membership.range(member_bounds(header.rev_nat_id)))
            .map(|(member, bits)| (member.addr, *bits))
            .collect();
        for (position, index) in slice.enumerate() {
            let Some((_, slot)) = slots.next().filter(|(at, _)| **at == index) else {
                return Some(format!("{key:?}: slot {index} is not written"));
            };
            if self.backends.get(&slot.backend_id) != Some(&slot.backend) {
                return Some(format!(
                    "{key:?}: slot {index} names backend {} that BACKEND_IDS lacks",
                    slot.backend_id
                ));
            }
            let bit = if position < usize::from(header.count) {
                membership::SELECTABLE
            } else {
                membership::CLUSTER_SELECTABLE
            };
            let bits = (members.binary_search_by_key(&slot.backend.addr, |(addr, _)| *addr))
                .map_or(0, |found| members[found].1);
            if bits & bit == 0 {
                return Some(format!(
                    "{key:?}: the backend of slot {index} is no member of its set"
                ));
            }
        }
        let restricted = header.flags & service_flags::SOURCE_RANGES != 0;
        if restricted && !self.has_source_ranges(header.rev_nat_id) {
            return Some(format!("{key:?}: restricted to source ranges it lacks"));
        }
        if let Some(chunk) = maglev_keys(header).find(|chunk| !self.maglev.contains(chunk)) {
            return Some(format!("{key:?}: Maglev chunk {chunk:?} is not written"));
        }
        None
    }

    fn has_source_ranges(&self, rev_nat_id: u32) -> bool {
        self.source_ranges
            .range(range_bounds(rev_nat_id))
            .next()
            .is_some()
    }

    /// The entries this image holds for one frontend (header, slots, membership, source
    /// ranges, name), without its backends, which frontends share.
    pub fn frontend_part(&self, key: &FrontendKey<A>) -> MapImage<A> {
        let mut part = MapImage::default();
        let Some(header) = self.services.get(key) else {
            return part;
        };
        part.services.insert(*key, *header);
        for index in slice_of(header).range() {
            if let Some(slot) = self.slots.get(&index) {
                part.slots.insert(index, *slot);
            }
        }
        let rev_nat_id = header.rev_nat_id;
        part.membership
            .extend(self.membership.range(member_bounds(rev_nat_id)));
        part.source_ranges
            .extend(self.source_ranges.range(range_bounds(rev_nat_id)));
        part.names
            .extend(self.names.get(&rev_nat_id).map(|name| (rev_nat_id, *name)));
        part.maglev
            .extend(maglev_keys(header).filter(|chunk| self.maglev.contains(chunk)));
        part
    }

    /// One frontend as desired: what it holds now, backends included.
    fn desired_part(&self, key: &FrontendKey<A>) -> DesiredImage<A> {
        let part = self.frontend_part(key);
        let mut desired = DesiredImage {
            membership: part.membership,
            names: part.names,
            source_ranges: part.source_ranges,
            ..DesiredImage::default()
        };
        if let Some(header) = part.services.get(key) {
            let slots = self.slots_of(header).unwrap_or_default();
            for slot in &slots {
                desired.backends.insert(slot.backend_id, slot.backend);
            }
            desired.frontends.insert(
                *key,
                FrontendEntry {
                    header: *header,
                    slots,
                },
            );
        }
        desired
    }

    /// The whole image in desired form (slices read through their headers): what
    /// listings and comparisons want.
    pub fn desired(&self) -> DesiredImage<A> {
        let mut desired = DesiredImage {
            backends: self.backends.clone(),
            membership: self.membership.clone(),
            names: self.names.clone(),
            source_ranges: self.source_ranges.clone(),
            ..DesiredImage::default()
        };
        for (key, header) in &self.services {
            let slots = self.slots_of(header).unwrap_or_default();
            desired.frontends.insert(
                *key,
                FrontendEntry {
                    header: *header,
                    slots,
                },
            );
        }
        desired
    }

    /// The backend ids named by the slots of every header, once per slot (each slice read
    /// as one range of the slots: a walk, not a search per slot).
    pub fn slot_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .values()
            .flat_map(|header| self.slots.range(slice_of(header).range()))
            .map(|(_, slot)| slot.backend_id)
    }

    /// Adds `other`'s entries.
    pub fn extend(&mut self, other: MapImage<A>) {
        self.services.extend(other.services);
        self.slots.extend(other.slots);
        self.backends.extend(other.backends);
        self.membership.extend(other.membership);
        self.names.extend(other.names);
        self.source_ranges.extend(other.source_ranges);
        self.maglev.extend(other.maglev);
    }

    /// Applies one operation to this in-memory image.
    pub fn apply(&mut self, op: &MapOp<A>) {
        match op {
            MapOp::PutName(id, name) => {
                self.names.insert(*id, *name);
            }
            MapOp::PutBackend(id, backend) => {
                self.backends.insert(*id, *backend);
            }
            MapOp::PutSlot(index, slot) => {
                self.slots.insert(*index, *slot);
            }
            MapOp::PutService(key, value) => {
                self.services.insert(*key, *value);
            }
            MapOp::PutMembership(key, bits) => {
                self.membership.insert(*key, *bits);
            }
            MapOp::PutSourceRange(entry) => {
                self.source_ranges.insert(*entry);
            }
            MapOp::DeleteService(key) => {
                self.services.remove(key);
            }
            MapOp::DeleteMembership(key) => {
                self.membership.remove(key);
            }
            MapOp::DeleteSourceRange(entry) => {
                self.source_ranges.remove(entry);
            }
            MapOp::DeleteBackend(id, _) => {
                self.backends.remove(id);
            }
            MapOp::DeleteName(id) => {
                self.names.remove(id);
            }
            MapOp::PutMaglev(key, _) => {
                self.maglev.insert(*key);
            }
            MapOp::DeleteMaglev(key) => {
                self.maglev.remove(key);
            }
            MapOp::Barrier => {}
        }
    }
}

impl<A: Address> DesiredImage<A> {
    /// The backend ids named by the slots, once per slot.
    pub fn slot_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.frontends
            .values()
            .flat_map(|entry| &entry.slots)
            .map(|slot| slot.backend_id)
    }

    /// Adds `other`'s entries.
    pub fn extend(&mut self, other: DesiredImage<A>) {
        self.frontends.extend(other.frontends);
        self.backends.extend(other.backends);
        self.membership.extend(other.membership);
        self.names.extend(other.names);
        self.source_ranges.extend(other.source_ranges);
    }

    /// Removes one frontend's entries (not the backends, which frontends share).
    fn remove_frontend(&mut self, key: &FrontendKey<A>) {
        let Some(entry) = self.frontends.remove(key) else {
            return;
        };
        // Its own entries only, found by range: a frontend left out of a full batch must
        // not cost a walk over every frontend's (at 100 000 frontends short of slots, that
        // was a million entries for each of tens of thousands left out).
        let rev_nat_id = entry.header.rev_nat_id;
        let members: Vec<MembershipKey<A>> = (self.membership.range(member_bounds(rev_nat_id)))
            .map(|(member, _)| *member)
            .collect();
        for member in members {
            self.membership.remove(&member);
        }
        let ranges: Vec<SourceRangeEntry<A>> = (self.source_ranges.range(range_bounds(rev_nat_id)))
            .copied()
            .collect();
        for range in ranges {
            self.source_ranges.remove(&range);
        }
        self.names.remove(&rev_nat_id);
    }

    /// Keeps only the backends some slot names.
    fn retain_named_backends(&mut self) {
        let named: BTreeSet<u32> = self.slot_backends().collect();
        self.backends.retain(|id, _| named.contains(id));
    }
}

/// Puts waiting to be merged into an image, in the order they came, per map. A full sync's
/// puts into one map, large beside it, are merged in one pass: its nodes come out full,
/// where inserting ascending keys one at a time leaves each node about half empty (at
/// 10 000 Services, 5 MiB of the image), and no key is searched for. A few puts are
/// inserted one by one.
pub(super) struct Puts<A: Address> {
    names: Vec<(u32, ServiceName)>,
    backends: Vec<(u32, Backend<A>)>,
    slots: Vec<(u32, Slot<A>)>,
    membership: Vec<(MembershipKey<A>, u8)>,
    source_ranges: Vec<SourceRangeEntry<A>>,
    maglev: Vec<MaglevKey>,
}

impl<A: Address> Default for Puts<A> {
    fn default() -> Self {
        Self {
            names: Vec::new(),
            backends: Vec::new(),
            slots: Vec::new(),
            membership: Vec::new(),
            source_ranges: Vec::new(),
            maglev: Vec::new(),
        }
    }
}

impl<A: Address> Puts<A> {
    /// Keeps `op` if it is a plain put; hands back any other operation.
    pub fn take(&mut self, op: MapOp<A>) -> Option<MapOp<A>> {
        match op {
            MapOp::PutName(id, name) => self.names.push((id, name)),
            MapOp::PutBackend(id, backend) => self.backends.push((id, backend)),
            MapOp::PutSlot(index, slot) => self.slots.push((index, slot)),
            MapOp::PutMembership(key, bits) => self.membership.push((key, bits)),
            MapOp::PutSourceRange(entry) => self.source_ranges.push(entry),
            MapOp::PutMaglev(key, _) => self.maglev.push(key),
            op => return Some(op),
        }
        None
    }

    /// Puts what waits into `image`, the later of equal keys winning.
    pub fn merge_into(&mut self, image: &mut MapImage<A>) {
        merge(&mut image.names, &mut self.names);
        merge(&mut image.backends, &mut self.backends);
        merge(&mut image.slots, &mut self.slots);
        merge(&mut image.membership, &mut self.membership);
        merge_set(&mut image.source_ranges, &mut self.source_ranges);
        merge_set(&mut image.maglev, &mut self.maglev);
    }
}

/// A batch at least this large beside its map is merged in one pass rather than inserted
/// entry by entry (a pass costs the map's size, an insert its depth).
const MERGE_FROM_FRACTION: usize = 8;

/// Whether a batch of `len` entries is large beside a map of `map_len`: taken in one pass
/// over the map rather than entry by entry.
pub(super) fn is_bulk(len: usize, map_len: usize) -> bool {
    len >= map_len / MERGE_FROM_FRACTION
}

/// Takes `entries` into `map`, the later of equal keys winning, as inserting them in order.
pub(super) fn merge<K: Ord, V>(map: &mut BTreeMap<K, V>, entries: &mut Vec<(K, V)>) {
    if !is_bulk(entries.len(), map.len()) {
        map.extend(entries.drain(..));
        return;
    }
    // Sorted stably in place and built bottom-up, keeping the last of equal keys.
    let mut batch: BTreeMap<K, V> = std::mem::take(entries).into_iter().collect();
    map.append(&mut batch);
}

fn merge_set<K: Ord>(set: &mut BTreeSet<K>, entries: &mut Vec<K>) {
    if !is_bulk(entries.len(), set.len()) {
        set.extend(entries.drain(..));
        return;
    }
    let mut batch: BTreeSet<K> = std::mem::take(entries).into_iter().collect();
    set.append(&mut batch);
}

fn member_bounds<A: Address>(rev_nat_id: u32) -> std::ops::RangeInclusive<MembershipKey<A>> {
    MembershipKey {
        rev_nat_id,
        addr: A::LOWEST,
    }..=MembershipKey {
        rev_nat_id,
        addr: A::HIGHEST,
    }
}

fn range_bounds<A: Address>(rev_nat_id: u32) -> std::ops::RangeInclusive<SourceRangeEntry<A>> {
    SourceRangeEntry {
        range: SourceRange {
            rev_nat_id,
            addr: A::LOWEST,
        },
        prefix_len: 0,
    }..=SourceRangeEntry {
        range: SourceRange {
            rev_nat_id,
            addr: A::HIGHEST,
        },
        prefix_len: u8::MAX,
    }
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp<A = u32> {
    PutName(u32, ServiceName),
    PutBackend(u32, Backend<A>),
    /// BACKEND_SLOTS[index] (never a slot a header names, or named since the last barrier).
    PutSlot(u32, Slot<A>),
    PutService(FrontendKey<A>, FrontendValue),
    PutMembership(MembershipKey<A>, u8),
    PutSourceRange(SourceRangeEntry<A>),
    DeleteService(FrontendKey<A>),
    DeleteMembership(MembershipKey<A>),
    DeleteSourceRange(SourceRangeEntry<A>),
    /// The backend's id and the backend (BACKEND_IDS is keyed by the backend).
    DeleteBackend(u32, Backend<A>),
    DeleteName(u32),
    /// A chunk of a slice's Maglev table (never of a table a header names).
    PutMaglev(MaglevKey, MaglevChunk),
    DeleteMaglev(MaglevKey),
    /// Waits until no program run that started before can still be going (an RCU grace
    /// period): the slices headers stopped naming may be written again.
    Barrier,
}

impl<A: Address> MapOp<A> {
    /// The map the operation writes (`None` for a barrier).
    pub fn map(&self) -> Option<&'static str> {
        let maps = A::MAPS;
        Some(match self {
            MapOp::PutName(..) | MapOp::DeleteName(_) => maps.svc_names,
            MapOp::PutBackend(..) | MapOp::DeleteBackend(..) => maps.backend_ids,
            MapOp::PutSlot(..) => maps.backend_slots,
            MapOp::PutService(..) | MapOp::DeleteService(_) => maps.services,
            MapOp::PutMembership(..) | MapOp::DeleteMembership(_) => maps.membership,
            MapOp::PutSourceRange(_) | MapOp::DeleteSourceRange(_) => maps.source_ranges,
            MapOp::PutMaglev(..) | MapOp::DeleteMaglev(_) => maps.maglev,
            MapOp::Barrier => return None,
        })
    }
}

/// Where the slices of a batch go.
#[derive(Clone, Debug, Default)]
pub struct Placement<A = u32> {
    /// The base of each frontend of the desired image.
    bases: BTreeMap<FrontendKey<A>, u32>,
    /// Slices to write: base → slots (new slices and the copies of moved ones).
    writes: BTreeMap<u32, Vec<Slot<A>>>,
    /// Frontends moved out of a window being evacuated, with their new header (their
    /// contents unchanged).
    moved: BTreeMap<FrontendKey<A>, FrontendValue>,
    /// The Maglev chunks of the slices those frontends leave.
    left_tables: Vec<MaglevKey>,
    /// A barrier must pass before the slices are written (they reuse quarantined slots).
    barrier: bool,
    /// Frontends left as they are: no room for their slice.
    pub unplaced: Vec<FrontendKey<A>>,
    /// Frontends left as they are for now: room is being made (an evacuation), they are
    /// placed by the next pass.
    pub deferred: Vec<FrontendKey<A>>,
}

/// Which frontends a batch is about.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a, A = u32> {
    /// All: a frontend missing from the desired image is deleted.
    Full,
    /// These (a delta): the others stay as they are.
    Frontends(&'a BTreeSet<FrontendKey<A>>),
}

/// Decides where the slices of `next` go: a frontend whose slots are unchanged keeps its
/// slice; another gets a new one from `slots`. A frontend for which there is no room, or
/// not yet (see [`Placement::deferred`]), is set back in `next` to what `current` holds
/// for it, so the batch leaves it as it is. `current` is everything the maps hold; `scope`
/// says which frontends `next` speaks for.
pub fn place<A: Address>(
    current: &MapImage<A>,
    next: &mut DesiredImage<A>,
    scope: Scope<'_, A>,
    slots: &mut SlotAllocator,
) -> Placement<A> {
    let mut placement = Placement::default();
    // The live slices, looked at only once a slice finds no room (a walk over every
    // header: a change must not cost what the maps hold).
    let mut live: Option<LiveSlices<A>> = None;
    // The smallest slice no evacuation could make room for: larger ones need not try.
    let mut no_room_from = u32::MAX;
    let keys: Vec<FrontendKey<A>> = next.frontends.keys().copied().collect();
    for key in keys {
        let entry = &next.frontends[&key];
        if let Some(header) = current.services.get(&key)
            && current.slots_of(header).as_ref() == Some(&entry.slots)
        {
            let base = placement
                .moved
                .get(&key)
                .map_or(header.base, |moved| moved.base);
            placement.bases.insert(key, base);
            continue;
        }
        let wanted = entry.slots.len() as u32;
        if wanted == 0 {
            placement.bases.insert(key, 0);
            continue;
        }
        if let Some(reservation) = slots.reserve(wanted) {
            placement.bases.insert(key, reservation.slice.base);
            placement
                .writes
                .insert(reservation.slice.base, entry.slots.clone());
            continue;
        }
        if wanted >= no_room_from {
            placement.unplaced.push(key);
            continue;
        }
        let LiveSlices { movable, fixed } =
            live.get_or_insert_with(|| LiveSlices::of(current, next, scope));
        let candidates: Vec<Slice> = movable.keys().copied().collect();
        let Some(moves) = slots.evacuation(wanted, &candidates, fixed) else {
            no_room_from = wanted;
            placement.unplaced.push(key);
            continue;
        };
        for (old, new) in moves {
            let Some(moved_key) = movable.remove(&old) else {
                continue;
            };
            // Its old slice stays live until its header switches.
            fixed.push(old);
            let header = current.services[&moved_key];
            let contents = current.slots_of(&header).unwrap_or_default();
            placement.writes.insert(new.base, contents);
            let moved = FrontendValue {
                base: new.base,
                ..header
            };
            placement
                .left_tables
                .extend(maglev_keys(&header).filter(|chunk| current.maglev.contains(chunk)));
            placement.moved.insert(moved_key, moved);
            if next.frontends.contains_key(&moved_key) {
                placement.bases.insert(moved_key, new.base);
            }
        }
        placement.deferred.push(key);
    }
    for key in placement.unplaced.iter().chain(&placement.deferred) {
        next.remove_frontend(key);
        next.extend(current.desired_part(key));
        match current.services.get(key) {
            Some(header) => placement.bases.insert(*key, header.base),
            None => placement.bases.remove(key),
        };
    }
    if !placement.unplaced.is_empty() || !placement.deferred.is_empty() {
        next.retain_named_backends();
    }
    placement.barrier = slots.barrier_pending();
    placement
}

/// The live slices of BACKEND_SLOTS, for an evacuation.
struct LiveSlices<A> {
    /// Slices that may move: those of frontends the batch leaves as they are.
    movable: BTreeMap<Slice, FrontendKey<A>>,
    /// The others: live until their headers switch or go.
    fixed: Vec<Slice>,
}

impl<A: Address> LiveSlices<A> {
    fn of(current: &MapImage<A>, next: &DesiredImage<A>, scope: Scope<'_, A>) -> Self {
        let untouched = |key: &FrontendKey<A>, header: &FrontendValue| match next.frontends.get(key)
        {
            Some(entry) => current.slots_of(header).as_ref() == Some(&entry.slots),
            None => matches!(scope, Scope::Frontends(keys) if !keys.contains(key)),
        };
        let mut live = LiveSlices {
            movable: BTreeMap::new(),
            fixed: Vec::new(),
        };
        for (key, header) in &current.services {
            if untouched(key, header) {
                live.movable.insert(slice_of(header), *key);
            } else {
                live.fixed.push(slice_of(header));
            }
        }
        live
    }
}

/// The writes that turn one image into another, phase by phase in the one order that keeps
/// every packet consistent (see [`diff`]). The writes of one phase are independent of each
/// other — any order of them is as safe as another — so each phase goes to the kernel as
/// one batch, whose elements the kernel applies in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapWrites<A = u32> {
    pub put_names: Vec<(u32, ServiceName)>,
    pub put_backends: Vec<(u32, Backend<A>)>,
    /// Membership entries that gain bits (or appear), keeping the bits they lose.
    pub grow_membership: Vec<(MembershipKey<A>, u8)>,
    /// A grace period must pass before the slots are written: they reuse slots headers
    /// named until lately.
    pub barrier: bool,
    pub put_slots: Vec<(u32, Slot<A>)>,
    /// The Maglev tables of new slices (and of sizes new to a slice), with the slots.
    pub put_maglev: Vec<(MaglevKey, MaglevChunk)>,
    pub put_source_ranges: Vec<SourceRangeEntry<A>>,
    /// New and changed headers, and headers moved out of a window being evacuated.
    pub put_headers: Vec<(FrontendKey<A>, FrontendValue)>,
    pub delete_headers: Vec<FrontendKey<A>>,
    /// Membership entries that lose bits.
    pub shrink_membership: Vec<(MembershipKey<A>, u8)>,
    pub delete_membership: Vec<MembershipKey<A>>,
    pub delete_source_ranges: Vec<SourceRangeEntry<A>>,
    pub delete_backends: Vec<(u32, Backend<A>)>,
    /// Maglev chunks no header names any more.
    pub delete_maglev: Vec<MaglevKey>,
    pub delete_names: Vec<u32>,
}

impl<A: Address> MapWrites<A> {
    /// How many single writes these are (a barrier is no write).
    pub fn len(&self) -> usize {
        self.put_names.len()
            + self.put_backends.len()
            + self.grow_membership.len()
            + self.put_slots.len()
            + self.put_maglev.len()
            + self.put_source_ranges.len()
            + self.put_headers.len()
            + self.delete_headers.len()
            + self.shrink_membership.len()
            + self.delete_membership.len()
            + self.delete_source_ranges.len()
            + self.delete_backends.len()
            + self.delete_maglev.len()
            + self.delete_names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a barrier goes before the slots.
    pub fn needs_barrier(&self) -> bool {
        self.barrier && !self.put_slots.is_empty()
    }

    /// Every write, one at a time, in order: what the kernel does with the batches.
    pub fn ops(&self) -> impl Iterator<Item = MapOp<A>> + '_ {
        let puts = (self.put_names.iter())
            .map(|(id, name)| MapOp::PutName(*id, *name))
            .chain((self.put_backends.iter()).map(|(id, backend)| MapOp::PutBackend(*id, *backend)))
            .chain(put_membership(&self.grow_membership))
            .chain(self.needs_barrier().then_some(MapOp::Barrier))
            .chain((self.put_slots.iter()).map(|(index, slot)| MapOp::PutSlot(*index, *slot)))
            .chain((self.put_maglev.iter()).map(|(key, chunk)| MapOp::PutMaglev(*key, *chunk)))
            .chain((self.put_source_ranges.iter()).map(|entry| MapOp::PutSourceRange(*entry)))
            .chain((self.put_headers.iter()).map(|(key, header)| MapOp::PutService(*key, *header)));
        let deletes = (self.delete_headers.iter())
            .map(|key| MapOp::DeleteService(*key))
            .chain(put_membership(&self.shrink_membership))
            .chain((self.delete_membership.iter()).map(|key| MapOp::DeleteMembership(*key)))
            .chain((self.delete_source_ranges.iter()).map(|entry| MapOp::DeleteSourceRange(*entry)))
            .chain(
                (self.delete_backends.iter())
                    .map(|(id, backend)| MapOp::DeleteBackend(*id, *backend)),
            )
            .chain((self.delete_maglev.iter()).map(|key| MapOp::DeleteMaglev(*key)))
            .chain((self.delete_names.iter()).map(|id| MapOp::DeleteName(*id)));
        puts.chain(deletes)
    }
}

fn put_membership<A: Address>(
    entries: &[(MembershipKey<A>, u8)],
) -> impl Iterator<Item = MapOp<A>> + '_ {
    (entries.iter()).map(|(key, bits)| MapOp::PutMembership(*key, *bits))
}

/// The writes that turn `current` into `next` (its slices placed by `placement`), ordered
/// so that at every step each header names only slots that are written, each naming a
/// backend BACKEND_IDS holds that is a member of the frontend's set in MEMBERSHIP (see
/// [`MapImage::missing_for`]): new backends, grown membership, a barrier when slots are
/// reused, new slices, new source ranges, then headers; then removed headers, shrunk
/// membership, source ranges, backends and Maglev tables. So a header flagged
/// `SOURCE_RANGES` never lacks its ranges, which would drop every client, a flow to a new
/// backend never looks as if its backend had left, a header never names a Maglev table
/// not yet written, and no slice is written while a packet may read it. Names come first
/// and go last, so a listing never shows a live frontend without its name.
pub fn diff<A: Address>(
    current: &MapImage<A>,
    next: &DesiredImage<A>,
    placement: &Placement<A>,
) -> MapWrites<A> {
    let mut writes = MapWrites {
        barrier: placement.barrier,
        ..MapWrites::default()
    };
    writes.put_names = (next.names.iter())
        .filter(|(id, name)| current.names.get(id) != Some(name))
        .map(|(id, name)| (*id, *name))
        .collect();
    writes.put_backends = (next.backends.iter())
        .filter(|(id, backend)| current.backends.get(id) != Some(backend))
        .map(|(id, backend)| (*id, *backend))
        .collect();
    // Membership grows first (a changed entry gains its new bits, keeping the old ones)
    // and shrinks with the removals (it loses the bits it no longer has).
    for (key, bits) in &next.membership {
        let before = current.membership.get(key).copied().unwrap_or(0);
        if *bits & !before != 0 {
            writes.grow_membership.push((*key, before | *bits));
        }
        if before & !*bits != 0 {
            writes.shrink_membership.push((*key, *bits));
        }
    }
    for (base, slots) in &placement.writes {
        writes
            .put_slots
            .extend((*base..).zip(slots.iter().copied()));
    }
    writes.put_source_ranges = (next.source_ranges)
        .difference(&current.source_ranges)
        .copied()
        .collect();
    for (key, moved) in &placement.moved {
        if !next.frontends.contains_key(key) {
            writes.put_headers.push((*key, *moved));
        }
    }
    // Maglev tables: a header's table is keyed by its slice and size, so a new slice or
    // size means new keys, written with the slots; a table a header names is never
    // rewritten. Its contents follow from the slice's own set.
    let mut named_tables: BTreeSet<MaglevKey> = BTreeSet::new();
    let mut put_maglev = Vec::new();
    let mut table_of = |header: &FrontendValue, slots: &[Slot<A>]| {
        let keys: Vec<MaglevKey> = maglev_keys(header).collect();
        if keys.iter().any(|chunk| !current.maglev.contains(chunk)) {
            let own = &slots[..usize::from(header.count).min(slots.len())];
            put_maglev.extend(maglev_table(header, own));
        }
        named_tables.extend(keys);
    };
    for (key, moved) in &placement.moved {
        if !next.frontends.contains_key(key)
            && let Some(slots) = placement.writes.get(&moved.base)
        {
            table_of(moved, slots);
        }
    }
    for (key, entry) in &next.frontends {
        let header = FrontendValue {
            base: placement.bases.get(key).copied().unwrap_or(0),
            ..entry.header
        };
        table_of(&header, &entry.slots);
        if current.services.get(key) != Some(&header) {
            writes.put_headers.push((*key, header));
        }
    }
    writes.put_maglev = put_maglev;
    writes.delete_maglev = (current.maglev.iter())
        .filter(|chunk| !named_tables.contains(chunk))
        .chain(&placement.left_tables)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    writes.delete_headers = (current.services.keys())
        .filter(|key| !next.frontends.contains_key(key))
        .copied()
        .collect();
    writes.delete_membership = (current.membership.keys())
        .filter(|key| !next.membership.contains_key(key))
        .copied()
        .collect();
    writes.delete_source_ranges = (current.source_ranges)
        .difference(&next.source_ranges)
        .copied()
        .collect();
    writes.delete_backends = (current.backends.iter())
        .filter(|(id, _)| !next.backends.contains_key(id))
        .map(|(id, backend)| (*id, *backend))
        .collect();
    writes.delete_names = (current.names.keys())
        .filter(|id| !next.names.contains_key(id))
        .copied()
        .collect();
    writes
}
