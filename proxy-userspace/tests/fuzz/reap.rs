//! The property of `epx_ct_reap`, the garbage collector's kernel side, under any input:
//! it removes only entries whose flow is over (the entry and its partner idle past their
//! timeouts, or the partner gone or another flow's), says exactly how many it removed,
//! creates nothing, and leaves its input as it was.

use std::collections::BTreeSet;

use proxy_common::{CtKey, CtValue, REAP_BATCH, ReapRequest, flow_expired, trace_table};
use proxy_userspace::conntrack::monotonic_now_ns;

use crate::cluster::FuzzedNode;

/// What the program reads of a request: which table and the distinct keys it gets to.
pub struct Request {
    pub assured: bool,
    pub keys: BTreeSet<CtKey>,
}

impl Request {
    /// Reads `input` as `epx_ct_reap` does: a header, then up to `count` keys (at most
    /// [`REAP_BATCH`]) while whole keys remain.
    pub fn parse(input: &[u8]) -> Self {
        let header = size_of::<ReapRequest>();
        let Some(head) = input.get(..header) else {
            return Self {
                assured: false,
                keys: BTreeSet::new(),
            };
        };
        let word = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        let count = (word(4) as usize).min(REAP_BATCH);
        let keys = (input[header..].chunks_exact(size_of::<CtKey>()))
            .take(count)
            .map(|bytes| {
                // SAFETY: CtKey is plain old data of exactly this many bytes; the read
                // tolerates any alignment.
                unsafe { bytes.as_ptr().cast::<CtKey>().read_unaligned() }
            })
            .collect();
        Self {
            assured: word(0) == u32::from(trace_table::ASSURED),
            keys,
        }
    }
}

/// The entries the request names, before the run: each key's entry and its partner's.
pub struct Before(Vec<(CtKey, Option<CtValue>, Option<CtValue>)>);

pub fn before(node: &FuzzedNode, request: &Request) -> Before {
    Before(
        (request.keys.iter())
            .map(|key| {
                let entry = node.flow_in(request.assured, key);
                let partner = entry.and_then(|entry| {
                    node.flow_in(request.assured, &CtKey::partner(&entry, key.proto))
                });
                (*key, entry, partner)
            })
            .collect(),
    )
}

pub fn check(
    node: &FuzzedNode,
    request: &Request,
    before: &Before,
    input: &[u8],
    (reaped, output): (u32, &[u8]),
) -> Result<(), String> {
    if output != input {
        return Err("epx_ct_reap changed its input".into());
    }
    let now = monotonic_now_ns();
    let mut removed = 0;
    for (key, entry, partner) in &before.0 {
        let after = node.flow_in(request.assured, key);
        match (entry, after) {
            (None, Some(_)) => return Err(format!("epx_ct_reap created an entry at {key:?}")),
            (Some(entry), None) => {
                removed += 1;
                if !flow_expired(key, entry, partner.as_ref(), now) {
                    return Err(format!(
                        "epx_ct_reap removed {key:?}, whose flow is live: {entry:?}, partner \
                         {partner:?}"
                    ));
                }
            }
            _ => {}
        }
    }
    if reaped != removed {
        return Err(format!("epx_ct_reap said {reaped} removed, {removed} were"));
    }
    Ok(())
}
