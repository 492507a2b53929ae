//! Connected UDP sockets of the node whose backend left: closed, so their owners open
//! new ones (Cilium terminates them too).
//!
//! A connected UDP socket was connected to its backend at `connect()`, and its datagrams
//! never pass the socket programs again (the kernel runs `sendmsg4` for unconnected sends
//! only) nor any tc program (the node's own output). Where kube-proxy clears such a
//! flow's conntrack entry so its next datagram goes elsewhere (`CleanStaleEntries`), the
//! socket would keep sending to a removed pod. So after a sync the daemon finds the
//! sockets whose backend no longer serves their frontend (MEMBERSHIP, as the datapath
//! checks a UDP flow) and destroys them through sock_diag (`SOCK_DESTROY`, like `ss -K`):
//! the owner's next call fails with ECONNABORTED. TCP connections keep their backend, as
//! with kube-proxy. Only sockets of the daemon's own network namespace can be reached this
//! way — and only those are translated at the socket for UDP.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use proxy_common::{
    Address, Ipv6, MembershipKey, SockKey, SockValue, map_names, membership, proto, sock_flags,
    sock_kind,
};

use crate::bpf_batch;

/// Entries read per system call while walking SOCK_XLATE.
const WALK_CHUNK: usize = 4096;

/// The pinned maps the terminator reads: each family's translations (SOCK_XLATE holds the
/// IPv4-mapped peers of IPv6 sockets too) and memberships.
pub struct Terminator {
    ipv4: FamilyMaps<u32>,
    ipv6: FamilyMaps<Ipv6>,
}

struct FamilyMaps<A> {
    xlate: MapData,
    membership: BpfHashMap<MapData, MembershipKey<A>, u8>,
}

impl<A: Address> FamilyMaps<A> {
    fn open(root: &Path, xlate: &str) -> Result<Self> {
        let open = |name: &str| {
            MapData::from_pin(root.join(name)).with_context(|| format!("opening pinned {name}"))
        };
        Ok(Self {
            xlate: open(xlate)?,
            membership: aya::maps::Map::HashMap(open(A::MAPS.membership)?).try_into()?,
        })
    }

    /// The reverse entries of the node's connected UDP sockets whose backend left.
    fn stale(&self) -> Result<Vec<SockKey<A>>> {
        // Batched: the walk costs a system call per few thousand sockets, and keeps only
        // the kind that can be stale.
        let mut closable = Vec::new();
        bpf_batch::for_each_entry(
            &self.xlate,
            WALK_CHUNK,
            |key: &SockKey<A>, value: &SockValue<A>| {
                if is_closable(key, value) {
                    closable.push((*key, *value));
                }
                Ok(())
            },
        )
        .context("reading the socket translations")?;
        Ok(stale(&closable, |rev_nat_id, addr| {
            self.membership
                .get(&MembershipKey { rev_nat_id, addr }, 0)
                .is_ok_and(|bits| bits & membership::SERVING != 0)
        }))
    }

    fn forget(&self, keys: &[SockKey<A>]) {
        for key in keys {
            // The socket's release removes it too; whichever comes first.
            let _ = bpf_batch::delete(&self.xlate, std::slice::from_ref(key));
        }
    }
}

impl Terminator {
    pub fn open(root: &Path) -> Result<Self> {
        Ok(Self {
            ipv4: FamilyMaps::open(root, map_names::SOCK_XLATE)?,
            ipv6: FamilyMaps::open(root, map_names::SOCK_XLATE6)?,
        })
    }

    /// Destroys the node's connected UDP sockets whose backend left their frontend;
    /// returns how many were destroyed.
    pub fn run(&mut self) -> Result<usize> {
        let (stale4, stale6) = (self.ipv4.stale()?, self.ipv6.stale()?);
        if stale4.is_empty() && stale6.is_empty() {
            return Ok(0);
        }
        let cookies: BTreeSet<u64> = (stale4.iter().map(|key| key.cookie))
            .chain(stale6.iter().map(|key| key.cookie))
            .collect();
        let destroyed = destroy(&cookies)?;
        self.ipv4.forget(&stale4);
        self.ipv6.forget(&stale6);
        Ok(destroyed)
    }
}

/// A reverse entry of a connected UDP socket of the node: the only kind that no program
/// sees again (TCP keeps its backend, an unconnected socket's flow moves at its next
/// `sendmsg()`, a pod's UDP is the tc path's).
fn is_closable<A: Address>(key: &SockKey<A>, value: &SockValue<A>) -> bool {
    key.kind == sock_kind::REVERSE
        && key.proto == proto::UDP
        && value.flags & sock_flags::CONNECTED != 0
        && value.flags & sock_flags::HOST != 0
}

/// The closable entries (see [`is_closable`]) whose backend (`key.addr`) no longer serves
/// their frontend.
fn stale<A: Address>(
    entries: &[(SockKey<A>, SockValue<A>)],
    serving: impl Fn(u32, A) -> bool,
) -> Vec<SockKey<A>> {
    entries
        .iter()
        .filter(|(key, value)| is_closable(key, value) && !serving(value.rev_nat_id, key.addr))
        .map(|(key, _)| *key)
        .collect()
}

/// Dumps this namespace's UDP sockets of both families and destroys those with a cookie
/// of `stale` (an IPv6 socket to an IPv4-mapped peer is among the IPv6 ones).
fn destroy(stale: &BTreeSet<u64>) -> Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut destroyed = 0;
    for family in [AF_INET, AF_INET6] {
        let doomed: Vec<SocketId> = dump_udp(&socket, family)?
            .into_iter()
            .filter(|id| stale.contains(&u64::from_ne_bytes(id.cookie)))
            .collect();
        for id in doomed {
            destroyed += usize::from(destroy_one(&socket, family, id)?);
        }
    }
    Ok(destroyed)
}

/// SOCK_DESTROY of one socket; false when it was gone meanwhile (closed by its owner).
fn destroy_one(socket: &Socket, family: u8, id: SocketId) -> Result<bool> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(request(
            family, id,
        )))),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    match NetlinkMessage::<SockDiagMessage>::deserialize(&reply)?.payload {
        NetlinkPayload::Error(error) if error.code.is_some() => {
            if error.to_io().raw_os_error() == Some(libc::ENOENT) {
                Ok(false)
            } else {
                Err(error.to_io()).context("SOCK_DESTROY of a UDP socket")
            }
        }
        NetlinkPayload::Error(_) => Ok(true),
        other => bail!("unexpected answer to SOCK_DESTROY: {other:?}"),
    }
}

fn request(family: u8, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    }
}

/// Every UDP socket of `family` in this namespace.
fn dump_udp(socket: &Socket, family: u8) -> Result<Vec<SocketId>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let any = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(request(family, any)).into(),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut sockets = Vec::new();
    loop {
        let (received, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < received.len() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..])?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    sockets.push(response.header.socket_id);
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(error) => {
                    return Err(error.to_io()).context("dumping UDP sockets (sock_diag)");
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reverse entry of socket `cookie` to `backend`, of the frontend 7.
    fn entry<A: Address>(
        cookie: u64,
        proto: u8,
        flags: u8,
        backend: A,
    ) -> (SockKey<A>, SockValue<A>) {
        (
            SockKey {
                cookie,
                addr: backend,
                port: 53u16.to_be(),
                proto,
                kind: sock_kind::REVERSE,
                _pad: Default::default(),
            },
            SockValue {
                flags,
                rev_nat_id: 7,
                ..SockValue::default()
            },
        )
    }

    fn stale_cookies<A: Address>(entries: &[(SockKey<A>, SockValue<A>)], kept: A) -> Vec<u64> {
        stale(entries, |rev_nat_id, addr| rev_nat_id == 7 && addr == kept)
            .iter()
            .map(|key| key.cookie)
            .collect()
    }

    #[test]
    fn only_the_nodes_connected_udp_sockets_whose_backend_left_are_stale() {
        let host_connected = sock_flags::HOST | sock_flags::CONNECTED;
        let (kept, left) = (11, 12);
        let entries = [
            entry(1, proto::UDP, host_connected, left),
            entry(2, proto::UDP, host_connected, kept),
            // TCP keeps its backend; unconnected UDP moves by itself at its next
            // sendmsg(); a pod's socket is not the node's.
            entry(3, proto::TCP, host_connected, left),
            entry(4, proto::UDP, sock_flags::HOST, left),
            entry(5, proto::UDP, sock_flags::CONNECTED, left),
        ];
        assert_eq!(stale_cookies(&entries, kept), [1]);
    }

    #[test]
    fn ipv6_sockets_are_judged_by_their_ipv6_backends() {
        let host_connected = sock_flags::HOST | sock_flags::CONNECTED;
        let address = |last: u8| {
            let mut octets = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            octets[15] = last;
            Ipv6::from_octets(octets)
        };
        let (kept, left) = (address(11), address(12));
        let entries = [
            entry(1, proto::UDP, host_connected, kept),
            entry(2, proto::UDP, host_connected, left),
            entry(3, proto::TCP, host_connected, left),
        ];
        assert_eq!(stale_cookies(&entries, kept), [2]);
    }
}
