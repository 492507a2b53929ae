use proxy_common::{Translation, ct_state, proto, service_flags};

use super::*;

const SECOND: u64 = 1_000_000_000;

fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        address: IpAddr::from(address),
        port,
    }
}

fn endpoint6(address: &str, port: u16) -> Endpoint {
    Endpoint {
        address: address.parse().unwrap(),
        port,
    }
}

/// An established flow's two entries as the datapath writes them: created at 100 s,
/// the client's last packet at 130 s, the backend's at 140 s.
fn flow<A: Address>(
    client: Endpoint,
    frontend: Endpoint,
    backend: Endpoint,
    rev_nat_id: u32,
) -> [CtEntry<A>; 2] {
    let wire = |e: Endpoint| (A::from_ip(e.address).unwrap(), e.port.to_be());
    let translation = Translation::service(
        proto::TCP,
        wire(client),
        wire(frontend),
        service_flags::CLUSTER_IP,
        rev_nat_id,
        wire(backend),
        7,
        None,
    );
    let timeouts = CtTimeouts::DEFAULT;
    let state = ct_state::REPLIED | ct_state::ASSURED;
    let created = ct_seconds(100 * SECOND);
    let mut forward =
        translation.forward_entry(created, timeouts.expiry_ns(proto::TCP, state, 130 * SECOND));
    (forward.state, forward.packets, forward.bytes) = (state, 3, 180);
    let mut reply =
        translation.reply_entry(created, timeouts.expiry_ns(proto::TCP, state, 140 * SECOND));
    (reply.state, reply.packets, reply.bytes) = (state, 2, 120);
    [
        CtEntry {
            table: CtTable::Assured,
            key: translation.forward_key(),
            value: forward,
        },
        CtEntry {
            table: CtTable::Assured,
            key: translation.reply_key(),
            value: reply,
        },
    ]
}

#[test]
fn entries_pair_into_flows_that_filters_select() {
    let vip = endpoint([198, 19, 0, 10], 80);
    let node_port = endpoint([198, 18, 0, 1], 30080);
    let pod_1 = endpoint([198, 18, 1, 11], 8080);
    let pod_2 = endpoint([198, 18, 1, 12], 8080);
    let caller = endpoint([198, 18, 1, 14], 40000);
    let outside = endpoint([198, 18, 0, 2], 50000);
    let [web_forward, web_reply] = flow::<u32>(caller, vip, pod_1, 1);
    let [np_forward, np_reply] = flow::<u32>(outside, node_port, pod_2, 2);
    // The LRU evicted this flow's forward entry.
    let entries = [web_forward, web_reply, np_reply];
    let names = BTreeMap::from([
        (1, ServiceName::new("default", "web", "http").unwrap()),
        (2, ServiceName::new("default", "web-np", "").unwrap()),
    ]);
    let _ = np_forward;

    let flows = flows(&entries, &names, 150 * SECOND, &CtTimeouts::DEFAULT);
    assert_eq!(flows.len(), 2);
    let web = &flows[1];
    assert_eq!(
        (web.client, web.frontend, web.backend),
        (caller, vip, pod_1)
    );
    assert_eq!(web.service.as_deref(), Some("default/web:http"));
    assert_eq!((web.age_seconds, web.idle_seconds), (50, 10));
    // An open TCP flow expires after 24 h of idleness.
    assert_eq!(web.expires_in_seconds, 86_400 - 10);
    assert_eq!((web.packets_to_backend, web.packets_from_backend), (3, 2));
    assert_eq!(web.entries, ["forward", "reply"]);
    assert_eq!(
        (web.flow_state, web.assured, web.kind),
        ("established", true, "service")
    );
    assert_eq!(web.backend_sees, caller);
    assert!(web.translation.is_empty());
    let orphan = &flows[0];
    assert_eq!(
        (orphan.client, orphan.frontend, orphan.backend),
        (outside, node_port, pod_2)
    );
    assert_eq!(orphan.entries, ["reply"]);

    let select = |filter: FlowFilter| -> Vec<Endpoint> {
        flows
            .iter()
            .filter(|f| filter.matches(f))
            .map(|f| f.client)
            .collect()
    };
    let service = |text: &str| FlowFilter {
        service: Some(text.parse().unwrap()),
        ..FlowFilter::default()
    };
    assert_eq!(select(service("default/web")), [caller]);
    assert_eq!(select(service("default/web:http")), [caller]);
    assert_eq!(select(service("default/web:dns")), []);
    assert_eq!(select(service("default/web-np")), [outside]);
    assert_eq!(select(service("198.18.0.1")), [outside]);
    assert_eq!(select(service("198.19.0.10:80")), [caller]);
    let backend = FlowFilter {
        backend: Some("198.18.1.11".parse().unwrap()),
        ..FlowFilter::default()
    };
    assert_eq!(select(backend), [caller]);
    let client = FlowFilter {
        client: Some("198.18.0.2:50000".parse().unwrap()),
        backend: Some("198.18.1.12:8080".parse().unwrap()),
        ..FlowFilter::default()
    };
    assert_eq!(select(client), [outside]);

    let json = serde_json::to_value(&flows[1]).unwrap();
    assert_eq!(json["family"], "IPv4");
    assert_eq!(json["client"]["address"], "198.18.1.14");
    assert_eq!(json["frontend"]["port"], 80);
    assert_eq!(json["state"], "open");
    assert!(json.get("keys").is_none());
    let table = render(&flows);
    assert!(table.contains("198.18.1.14:40000"), "{table}");
    assert!(table.contains("3/2"), "{table}");
}

#[test]
fn ipv6_flows_are_read_from_their_own_entries_and_filtered_by_ipv6_patterns() {
    let vip = endpoint6("2001:db8:ff::10", 80);
    let pod = endpoint6("2001:db8:1::11", 8080);
    let caller = endpoint6("2001:db8:1::14", 40000);
    let entries = flow::<Ipv6>(caller, vip, pod, 1);
    let names = BTreeMap::from([(1, ServiceName::new("default", "web6", "http").unwrap())]);

    let flows = flows(&entries, &names, 150 * SECOND, &CtTimeouts::DEFAULT);
    assert_eq!(flows.len(), 1);
    let web = &flows[0];
    assert_eq!((web.client, web.frontend, web.backend), (caller, vip, pod));
    assert_eq!(web.family, "IPv6");
    assert_eq!(web.service.as_deref(), Some("default/web6:http"));
    assert_eq!(web.entries, ["forward", "reply"]);
    assert_eq!(
        web.keys,
        [
            EntryKey::Ipv6(CtTable::Assured, entries[0].key),
            EntryKey::Ipv6(CtTable::Assured, entries[1].key)
        ]
    );

    let matches = |filter: FlowFilter| filter.matches(web);
    let service = |text: &str| FlowFilter {
        service: Some(text.parse().unwrap()),
        ..FlowFilter::default()
    };
    assert!(matches(service("[2001:db8:ff::10]:80")));
    assert!(matches(service("2001:db8:ff::10")));
    assert!(!matches(service("[2001:db8:ff::10]:81")));
    assert!(matches(service("default/web6")));
    assert!(matches(FlowFilter {
        backend: Some("[2001:db8:1::11]:8080".parse().unwrap()),
        client: Some("[2001:db8:1::14]".parse().unwrap()),
        ..FlowFilter::default()
    }));
    // An IPv4 address never matches an IPv6 flow.
    assert!(!matches(FlowFilter {
        client: Some("198.18.1.14".parse().unwrap()),
        ..FlowFilter::default()
    }));

    let json = serde_json::to_value(web).unwrap();
    assert_eq!(json["family"], "IPv6");
    assert_eq!(json["client"]["address"], "2001:db8:1::14");
    assert_eq!(json["backend"]["port"], 8080);
    let table = render(&flows);
    assert!(table.contains("[2001:db8:1::14]:40000"), "{table}");
    assert!(table.contains("[2001:db8:ff::10]:80"), "{table}");
}

#[test]
fn patterns_parse_or_explain_why_not() {
    assert_eq!("198.18.0.2".parse::<EndpointPattern>().unwrap().port, None);
    assert!("198.18.0.2:x".parse::<EndpointPattern>().is_err());
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    for (text, port) in [
        ("[2001:db8::10]:80", Some(80)),
        ("2001:db8::10", None),
        ("[2001:db8::10]", None),
    ] {
        assert_eq!(
            text.parse::<EndpointPattern>(),
            Ok(EndpointPattern { address: v6, port }),
            "{text}"
        );
    }
    assert!(
        "[198.18.0.2]:80"
            .parse::<EndpointPattern>()
            .unwrap_err()
            .contains("brackets")
    );
    assert!("[2001:db8::10]80".parse::<EndpointPattern>().is_err());
    assert!(
        "[2001:db8::10:80"
            .parse::<EndpointPattern>()
            .unwrap_err()
            .contains("no ']'")
    );
    assert!("web".parse::<ServicePattern>().is_err());
    assert_eq!(
        "kube-system/kube-dns:dns".parse::<ServicePattern>(),
        Ok(ServicePattern::Name("kube-system/kube-dns:dns".into()))
    );
}

#[test]
fn durations_read_at_a_glance() {
    assert_eq!(duration(42), "42s");
    assert_eq!(duration(187), "3m07s");
    assert_eq!(duration(5 * 3600 + 120), "5h02m");
    assert_eq!(duration(2 * 86400 + 3 * 3600), "2d03h");
}
