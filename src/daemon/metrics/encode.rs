//! A scrape's registry: every metric natmap exports, filled from one
//! engine snapshot and encoded in the Prometheus text format (0.0.4).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::UNIX_EPOCH;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::{PortList, RuleId, RuleSpec};
use crate::proto::{RuleStatus, RuleView};

use super::super::engine::MetricsSnapshot;
use super::Latency;

/// The labels of a per-rule series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    /// The rule id (`ls` shows it).
    id: String,
    /// `dnat`, `snat`, `hairpin` or `docker`.
    kind: String,
    /// The outside side: address, ports and protocol traffic arrives on
    /// (for snat: the address it leaves with, and the interface).
    ext: String,
    /// The inside side: where traffic goes (for snat: the source network).
    target: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

/// Every status a rule can have, so a status with no rules reads 0 rather
/// than vanishing from a dashboard.
const STATUSES: [RuleStatus; 9] = [
    RuleStatus::Active,
    RuleStatus::PortConflict,
    RuleStatus::Unavailable,
    RuleStatus::Down,
    RuleStatus::Stale,
    RuleStatus::WaitingForAddress,
    RuleStatus::Unknown,
    RuleStatus::Quarantined,
    RuleStatus::WaitingForInterface,
];

fn host_ports(ip: IpAddr, ports: &PortList) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{ports}"),
        IpAddr::V6(v6) => format!("[{v6}]:{ports}"),
    }
}

/// The labels of a rule's series; `None` for a rule without counters: a
/// policy route changes routing, not netfilter, and a quarantined entry is
/// never installed (and may share its id with a rule that is).
fn rule_labels(view: &RuleView) -> Option<RuleLabels> {
    if view.status == RuleStatus::Quarantined {
        return None;
    }
    let rule = &view.rule;
    let (ext, target) = match &rule.spec {
        RuleSpec::Dnat(r) => (
            format!("{}/{}", host_ports(r.ext_ip.ip(), &r.ports), r.proto),
            host_ports(r.int_ip.ip(), &r.ports),
        ),
        RuleSpec::Hairpin(r) => (
            format!("{}/{}", host_ports(r.ext_ip.ip(), &r.ports), r.proto),
            host_ports(r.int_ip.ip(), &r.ports),
        ),
        RuleSpec::Snat(r) => (
            format!("{} out {}", r.ext_ip, r.ext_if),
            r.source.to_string(),
        ),
        RuleSpec::Docker(r) => {
            let port = r.host_ports();
            let ext = match r.host_ip {
                Some(h) => host_ports(h.ip(), &port),
                None => format!("*:{port}"),
            };
            let to = r.container_ports();
            let addr = match r.target_v4.or(r.target_v6) {
                Some(t) => host_ports(t.ip.ip(), &to),
                None => format!("-:{to}"),
            };
            (format!("{ext}/{}", r.proto), format!("{} {addr}", r.name))
        }
        RuleSpec::PolicyRoute(_) => return None,
    };
    Some(RuleLabels {
        id: rule.id.to_string(),
        kind: rule.spec.kind().to_owned(),
        ext,
        target,
    })
}

/// Per-rule counters from `ls -v` and current connections from conntrack
/// (left out when the table could not be read).
fn register_rules(
    registry: &mut Registry,
    snapshot: &MetricsSnapshot,
    connections: Option<&HashMap<RuleId, u64>>,
) {
    let packets = Family::<RuleLabels, Counter>::default();
    let bytes = Family::<RuleLabels, Counter>::default();
    let opened = Family::<RuleLabels, Counter>::default();
    let current = Family::<RuleLabels, Gauge>::default();
    for view in &snapshot.rules {
        let Some(labels) = rule_labels(view) else {
            continue;
        };
        let c = view.counters.unwrap_or_default();
        packets.get_or_create(&labels).inc_by(c.packets);
        bytes.get_or_create(&labels).inc_by(c.bytes);
        opened.get_or_create(&labels).inc_by(c.connections);
        if let Some(conns) = connections {
            let n = conns.get(&view.rule.id).copied().unwrap_or(0);
            current
                .get_or_create(&labels)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        "rule_packets",
        "Packets forwarded by the rule, both directions (filter table counters)",
        packets,
    );
    registry.register(
        "rule_bytes",
        "Bytes forwarded by the rule, both directions (filter table counters)",
        bytes,
    );
    registry.register(
        "rule_connections_opened",
        "Connections the rule translated (nat table counters: a connection's first packet)",
        opened,
    );
    if connections.is_some() {
        registry.register(
            "rule_connections",
            "Connections through the rule tracked now (conntrack; ended TCP connections not counted)",
            current,
        );
    }
}

/// Rules by status, repairs, Docker.
fn register_daemon(registry: &mut Registry, snapshot: &MetricsSnapshot) {
    let mut by_status: BTreeMap<&str, i64> = STATUSES.iter().map(|s| (s.as_str(), 0)).collect();
    for view in &snapshot.rules {
        *by_status.entry(view.status.as_str()).or_default() += 1;
    }
    // As `status` counts them: entries that are not even rules are
    // quarantined too.
    *by_status.entry("quarantined").or_default() += snapshot.unreadable as i64;
    let rules = Family::<StatusLabels, Gauge>::default();
    for (status, n) in by_status {
        rules
            .get_or_create(&StatusLabels {
                status: status.to_owned(),
            })
            .set(n);
    }
    registry.register("rules", "Rules natmap keeps, by status", rules);
    let repairs = Counter::<u64>::default();
    repairs.inc_by(snapshot.repairs);
    registry.register(
        "repairs",
        "Times natmap rewrote its chains after finding them changed (drift repair) since start",
        repairs,
    );
    if let Some(at) = snapshot.last_repair {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = Gauge::<i64>::default();
        last.set(i64::try_from(secs).unwrap_or(i64::MAX));
        registry.register(
            "last_repair_timestamp_seconds",
            "When the last drift repair happened (Unix time); absent until the first",
            last,
        );
    }
    let docker = Gauge::<i64>::default();
    docker.set(i64::from(snapshot.docker_reachable));
    registry.register(
        "docker_reachable",
        "1 while the Docker engine answers, 0 while it does not",
        docker,
    );
}

/// The text a scrape returns.
pub(super) fn encode(
    snapshot: &MetricsSnapshot,
    connections: Option<&HashMap<RuleId, u64>>,
    latency: &Latency,
) -> String {
    let mut registry = Registry::with_prefix("natmap");
    register_rules(&mut registry, snapshot, connections);
    register_daemon(&mut registry, snapshot);
    latency.register(&mut registry);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_named_as_the_wire_names_it() {
        for status in STATUSES {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
    use crate::model::Rule;
    use crate::proto::Counters;

    fn view(id: RuleId, spec: &str, status: RuleStatus, packets: u64) -> RuleView {
        let spec: RuleSpec = serde_json::from_str(spec).unwrap();
        RuleView {
            rule: Rule { id, spec },
            status,
            detail: None,
            counters: Some(Counters {
                connections: 1,
                packets,
                bytes: packets * 60,
            }),
        }
    }

    #[test]
    fn rules_become_labelled_series_and_statuses_are_all_present() {
        let dnat =
            r#"{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25,465"}"#;
        let route = r#"{"kind":"policy_route","src_ip":"10.0.0.2","via":"10.0.0.1","table":100}"#;
        let snapshot = MetricsSnapshot {
            rules: vec![
                view(1, dnat, RuleStatus::Active, 12),
                // A state file entry with a duplicate id: no series of its own.
                view(1, dnat, RuleStatus::Quarantined, 0),
                view(2, route, RuleStatus::Active, 0),
            ],
            unreadable: 1,
            docker_reachable: false,
            repairs: 3,
            last_repair: Some(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)),
        };
        let latency = Latency::new();
        latency.observe("ls", std::time::Duration::from_millis(2));
        let conns = HashMap::from([(1, 2)]);
        let text = encode(&snapshot, Some(&conns), &latency);
        let labels =
            r#"{id="1",kind="dnat",ext="192.0.2.1:25,465/tcp",target="198.51.100.2:25,465"}"#;
        for line in [
            format!("natmap_rule_packets_total{labels} 12"),
            format!("natmap_rule_bytes_total{labels} 720"),
            format!("natmap_rule_connections_opened_total{labels} 1"),
            format!("natmap_rule_connections{labels} 2"),
            r#"natmap_rules{status="active"} 2"#.to_owned(),
            r#"natmap_rules{status="port_conflict"} 0"#.to_owned(),
            r#"natmap_rules{status="quarantined"} 2"#.to_owned(),
            "natmap_repairs_total 3".to_owned(),
            "natmap_last_repair_timestamp_seconds 1700000000".to_owned(),
            "natmap_docker_reachable 0".to_owned(),
            r#"natmap_request_duration_seconds_count{command="ls"} 1"#.to_owned(),
            "# TYPE natmap_rule_packets_total counter".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains(r#"id="2""#), "{text}");
    }

    #[test]
    fn without_conntrack_the_connections_gauge_is_left_out() {
        let snapshot = MetricsSnapshot {
            rules: Vec::new(),
            unreadable: 0,
            docker_reachable: true,
            repairs: 0,
            last_repair: None,
        };
        let text = encode(&snapshot, None, &Latency::new());
        assert!(!text.contains("natmap_rule_connections "), "{text}");
        assert!(!text.contains("last_repair"), "{text}");
        assert!(text.contains("natmap_docker_reachable 1"), "{text}");
    }
}
