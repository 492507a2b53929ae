//! `epx_ct_reap`: the kernel side of the daemon's conntrack garbage collector. The daemon
//! reads the maps in batches and sends the keys of entries whose own expiry passed; this
//! program removes those whose flow is over by the very rule the packet path applies, and
//! under its removal protocol, so a flow created on a key after the daemon read it is never
//! removed by mistake. One request names one map of one family.

use aya_ebpf::programs::TcContext;
use proxy_common::{CtKey, Ipv6, ReapRequest, reap_batch, trace_table};

use crate::{
    conntrack::{self, Table},
    family::Family,
};

/// Removes the finished flows among the request's keys; returns how many it removed.
#[inline(always)]
pub fn batch(ctx: &TcContext) -> u32 {
    let Ok(request) = ctx.load::<ReapRequest>(0) else {
        return 0;
    };
    let table = if request.table == u32::from(trace_table::ASSURED) {
        Table::Assured
    } else {
        Table::Pending
    };
    match request.bits {
        32 => reap_keys::<u32>(ctx, table, request.count),
        128 => reap_keys::<Ipv6>(ctx, table, request.count),
        _ => 0,
    }
}

/// Removes the finished flows among the `count` keys of family `A` after the header.
#[inline(always)]
fn reap_keys<A: Family>(ctx: &TcContext, table: Table, count: u32) -> u32 {
    let now_ns = conntrack::now_ns();
    let mut reaped = 0;
    for index in 0..reap_batch::<A>() {
        if index as u32 >= count {
            break;
        }
        let offset = size_of::<ReapRequest>() + index * size_of::<CtKey<A>>();
        let Ok(key) = ctx.load::<CtKey<A>>(offset) else {
            break;
        };
        if conntrack::reap(table, &key, now_ns) {
            reaped += 1;
        }
    }
    reaped
}
