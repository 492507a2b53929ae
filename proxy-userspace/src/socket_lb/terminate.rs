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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use proxy_common::{
    MembershipKey, SockKey, SockValue, map_names, membership, proto, sock_flags, sock_kind,
};

use crate::bpf_batch;

/// Entries read per system call while walking SOCK_XLATE.
const WALK_CHUNK: usize = 4096;

/// The pinned maps the terminator reads.
pub struct Terminator {
    xlate: MapData,
    membership: BpfHashMap<MapData, MembershipKey, u8>,
}

impl Terminator {
    pub fn open(root: &Path) -> Result<Self> {
        let open = |name: &str| {
            MapData::from_pin(root.join(name)).with_context(|| format!("opening pinned {name}"))
        };
        Ok(Self {
            xlate: open(map_names::SOCK_XLATE)?,
            membership: aya::maps::Map::HashMap(open(map_names::MEMBERSHIP)?).try_into()?,
        })
    }

    /// Destroys the node's connected UDP sockets whose backend left their frontend;
    /// returns how many were destroyed.
    pub fn run(&mut self) -> Result<usize> {
        // Batched: the walk costs a system call per few thousand sockets, and keeps only
        // the kind that can be stale.
        let mut closable = Vec::new();
        bpf_batch::for_each_entry(
            &self.xlate,
            WALK_CHUNK,
            |key: &SockKey, value: &SockValue| {
                if is_closable(key, value) {
                    closable.push((*key, *value));
                }
                Ok(())
            },
        )
        .context("reading SOCK_XLATE")?;
        let stale = stale(&closable, |rev_nat_id, addr| {
            self.membership
                .get(&MembershipKey { rev_nat_id, addr }, 0)
                .is_ok_and(|bits| bits & membership::SERVING != 0)
        });
        if stale.is_empty() {
            return Ok(0);
        }
        let destroyed = destroy(&stale)?;
        for key in stale.keys() {
            // The socket's release removes it too; whichever comes first.
            let _ = bpf_batch::delete(&self.xlate, std::slice::from_ref(key));
        }
        Ok(destroyed)
    }
}

/// A reverse entry of a connected UDP socket of the node: the only kind that no program
/// sees again (TCP keeps its backend, an unconnected socket's flow moves at its next
/// `sendmsg()`, a pod's UDP is the tc path's).
fn is_closable(key: &SockKey, value: &SockValue) -> bool {
    key.kind == sock_kind::REVERSE
        && key.proto == proto::UDP
        && value.flags & sock_flags::CONNECTED != 0
        && value.flags & sock_flags::HOST != 0
}

/// The closable entries (see [`is_closable`]) whose backend (`key.addr`) no longer serves
/// their frontend, by socket cookie.
fn stale(
    entries: &[(SockKey, SockValue)],
    serving: impl Fn(u32, u32) -> bool,
) -> BTreeMap<SockKey, u64> {
    entries
        .iter()
        .filter(|(key, value)| is_closable(key, value) && !serving(value.rev_nat_id, key.addr))
        .map(|(key, _)| (*key, key.cookie))
        .collect()
}

/// Dumps this namespace's UDP sockets and destroys those with a cookie of `stale`.
fn destroy(stale: &BTreeMap<SockKey, u64>) -> Result<usize> {
    let cookies: Vec<u64> = stale.values().copied().collect();
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let doomed: Vec<SocketId> = dump_udp(&socket)?
        .into_iter()
        .filter(|id| cookies.contains(&u64::from_ne_bytes(id.cookie)))
        .collect();
    let mut destroyed = 0;
    for id in doomed {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut message = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(
                request(id),
            ))),
        );
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        socket.send(&buffer, 0)?;
        let (reply, _) = socket.recv_from_full()?;
        match NetlinkMessage::<SockDiagMessage>::deserialize(&reply)?.payload {
            NetlinkPayload::Error(error) if error.code.is_some() => {
                // Gone meanwhile (closed by its owner): nothing left to do.
                if error.to_io().raw_os_error() != Some(libc::ENOENT) {
                    return Err(error.to_io()).context("SOCK_DESTROY of a UDP socket");
                }
            }
            NetlinkPayload::Error(_) => destroyed += 1,
            other => bail!("unexpected answer to SOCK_DESTROY: {other:?}"),
        }
    }
    Ok(destroyed)
}

fn request(socket_id: SocketId) -> InetRequest {
    InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    }
}

/// Every IPv4 UDP socket of this namespace.
fn dump_udp(socket: &Socket) -> Result<Vec<SocketId>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(request(SocketId::new_v4())).into(),
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
                    if matches!(response.header.socket_id.destination_address, IpAddr::V4(_)) {
                        sockets.push(response.header.socket_id);
                    }
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

    #[test]
    fn only_the_nodes_connected_udp_sockets_whose_backend_left_are_stale() {
        let entry = |cookie: u64, proto: u8, flags: u8, backend: u32| {
            (
                SockKey {
                    cookie,
                    addr: backend,
                    port: 53u16.to_be(),
                    proto,
                    kind: sock_kind::REVERSE,
                },
                SockValue {
                    flags,
                    rev_nat_id: 7,
                    ..SockValue::default()
                },
            )
        };
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
        let stale = stale(&entries, |rev_nat_id, addr| rev_nat_id == 7 && addr == kept);
        assert_eq!(stale.values().copied().collect::<Vec<_>>(), [1]);
    }
}
