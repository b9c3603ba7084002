//! Golden-file tests of rendering and of the restore transactions.
//!
//! Set `NATMAP_BLESS=1` to rewrite the golden files after an intended change,
//! then review the diff.

use std::path::PathBuf;

use crate::model::{DnatRule, Family, HairpinRule, Rule, RuleSpec, SnatRule};

use super::saved::SavedTables;
use super::{render, restore, FamilyRules};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/firewall/iptables/testdata")
        .join(name);
    if std::env::var_os("NATMAP_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with NATMAP_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "golden file {name} differs (NATMAP_BLESS=1 rewrites it)"
    );
}

fn sample_rules() -> Vec<Rule> {
    vec![
        Rule {
            id: 1,
            spec: RuleSpec::Dnat(DnatRule {
                ext_ip: "203.0.113.10".parse().unwrap(),
                int_ip: "10.0.0.25".parse().unwrap(),
                ports: "25,465,587".parse().unwrap(),
                proto: "tcp".parse().unwrap(),
                ext_if: None,
                allow_nonlocal: false,
            }),
        },
        Rule {
            id: 2,
            spec: RuleSpec::Dnat(DnatRule {
                ext_ip: "203.0.113.10".parse().unwrap(),
                int_ip: "10.0.0.53".parse().unwrap(),
                ports: "53".parse().unwrap(),
                proto: "udp".parse().unwrap(),
                ext_if: Some("eth0".parse().unwrap()),
                allow_nonlocal: false,
            }),
        },
        Rule {
            id: 3,
            spec: RuleSpec::Snat(SnatRule {
                source: "10.0.0.0/24".parse().unwrap(),
                ext_if: "eth0".parse().unwrap(),
                ext_ip: "203.0.113.10".parse().unwrap(),
                forward: false,
            }),
        },
        Rule {
            id: 4,
            spec: RuleSpec::Hairpin(HairpinRule {
                ext_ip: "203.0.113.10".parse().unwrap(),
                int_ip: "10.0.0.80".parse().unwrap(),
                ports: "80,443".parse().unwrap(),
                proto: "tcp".parse().unwrap(),
                int_net: "10.0.0.0/24".parse().unwrap(),
                allow_nonlocal: false,
            }),
        },
        Rule {
            id: 5,
            spec: RuleSpec::Dnat(DnatRule {
                ext_ip: "2001:db8:1::1".parse().unwrap(),
                int_ip: "2001:db8:2::2".parse().unwrap(),
                ports: "8000-8010".parse().unwrap(),
                proto: "tcp".parse().unwrap(),
                ext_if: None,
                allow_nonlocal: false,
            }),
        },
    ]
}

#[test]
fn rewrite_of_both_families_matches_golden() {
    let set = render::desired(&sample_rules());
    golden(
        "rewrite-v4.rules",
        &restore::rewrite_chains(set.family(Family::V4)),
    );
    golden(
        "rewrite-v6.rules",
        &restore::rewrite_chains(set.family(Family::V6)),
    );
}

/// A Docker host whose hooks are out of place: PREROUTING's jump is second,
/// OUTPUT has two, POSTROUTING none; DOCKER-USER exists.
const DOCKER_HOST_SAVE: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:NATMAP - [0:0]
:NATMAP-OUTPUT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -j NATMAP
-A OUTPUT -j NATMAP-OUTPUT
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -j NATMAP-OUTPUT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A NATMAP -d 203.0.113.10/32 -p tcp -m tcp --dport 25 -m comment --comment \"natmap:dnat:1\" -j DNAT --to-destination 10.0.0.25
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A DOCKER-USER -j RETURN
COMMIT
";

#[test]
fn full_apply_repairs_hooks_without_touching_other_rules() {
    let set = render::desired(&sample_rules()[..1]);
    let saved = SavedTables::parse(DOCKER_HOST_SAVE);
    let text = restore::full(set.family(Family::V4), &saved);
    golden("full-docker-host-v4.rules", &text);
    // Nothing but natmap's chains is declared (declaring flushes).
    for line in text.lines().filter(|l| l.starts_with(':')) {
        assert!(line.starts_with(":NATMAP"), "{line}");
    }
}

#[test]
fn full_apply_on_an_empty_host_creates_docker_user_and_its_hook() {
    let set = render::desired(&sample_rules()[..1]);
    let saved = SavedTables::parse(
        "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
    );
    golden(
        "full-empty-host-v4.rules",
        &restore::full(set.family(Family::V4), &saved),
    );
}

#[test]
fn teardown_removes_only_natmap() {
    let saved = SavedTables::parse(DOCKER_HOST_SAVE);
    // Docker's DOCKER-USER stays even if natmap thinks it made it.
    let text = restore::teardown(&saved, true);
    golden("teardown-v4.rules", &text);
    assert!(!text.contains("DOCKER-USER -j RETURN"));
    assert!(!text.contains(":DOCKER"));
}

/// What iptables-save shows after a full apply of `rules` (IPv4): natmap's
/// parents and shards, their hooks, Docker's DOCKER-USER; comments quoted
/// as iptables-nft quotes them.
fn applied_save(rules: &FamilyRules) -> String {
    let kernel = rules.kernel();
    let mut after = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    let dump = |after: &mut String, table: &str| {
        for kc in kernel.iter().filter(|c| c.table == table) {
            after.push_str(&format!(":{} - [0:0]\n", kc.name));
        }
        for kc in kernel.iter().filter(|c| c.table == table) {
            for line in &kc.lines {
                // iptables-nft quotes comments; parsing must not care.
                after.push_str(&format!(
                    "-A {} {}\n",
                    kc.name,
                    line.replace("natmap:dnat:1", "\"natmap:dnat:1\"")
                ));
            }
        }
    };
    dump(&mut after, "nat");
    after.push_str("-A PREROUTING -j NATMAP\n-A OUTPUT -j NATMAP-OUTPUT\n-A POSTROUTING -j NATMAP-POSTROUTING\n");
    after.push_str("COMMIT\n*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n");
    dump(&mut after, "filter");
    after.push_str(
        "-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j NATMAP\n-A DOCKER-USER -j RETURN\n",
    );
    after.push_str("COMMIT\n");
    after
}

#[test]
fn drift_is_detected_and_an_applied_state_has_none() {
    let set = render::desired(&sample_rules()[..1]);
    let rules = set.family(Family::V4);
    let saved = SavedTables::parse(DOCKER_HOST_SAVE);
    let reasons = saved.drift(rules);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("PREROUTING's jump to NATMAP is no longer its first rule")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("OUTPUT has 2 jumps")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("chain NATMAP-POSTROUTING is missing")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("nat chain NATMAP differs")),
        "{reasons:?}"
    );

    // What iptables-save shows after the full apply has no drift: the
    // parents hold their jumps to the shards, the shards the lines.
    let after = applied_save(rules);
    assert!(after.contains("-A NATMAP-T0 -d 203.0.113.10/32"), "{after}");
    assert_eq!(
        SavedTables::parse(&after).drift(rules),
        Vec::<String>::new()
    );
    assert!(!saved.hooks_displaced_only(rules), "chains differ too");
    assert!(!SavedTables::parse(&after).hooks_displaced_only(rules));

    // Docker creating a network inserts its MASQUERADE above natmap's
    // hook: only the hook's place changed, a routine repair.
    let displaced = after.replace(
        "-A POSTROUTING -j NATMAP-POSTROUTING\n",
        "-A POSTROUTING -s 172.18.0.0/16 ! -o br-1 -j MASQUERADE\n-A POSTROUTING -j NATMAP-POSTROUTING\n",
    );
    let saved = SavedTables::parse(&displaced);
    assert_eq!(
        saved.drift(rules),
        ["nat POSTROUTING's jump to NATMAP-POSTROUTING is no longer its first rule"]
    );
    assert!(saved.hooks_displaced_only(rules));
}

#[test]
fn diff_sends_only_the_change_in_order() {
    let rules = sample_rules();
    let before = render::desired(&rules[..3]);
    // Rule 2 goes, rule 4 comes: deletes by spec, inserts at their positions.
    let after = render::desired(rules.iter().filter(|r| r.id != 2 && r.id != 5));
    let text = restore::diff(before.family(Family::V4), after.family(Family::V4)).unwrap();
    golden("diff-v4.rules", &text);
    // Only the shard that empties is declared (flushed) and deleted; the
    // parents and the shard that stays are edited line by line.
    let declared: Vec<&str> = text.lines().filter(|l| l.starts_with(':')).collect();
    assert_eq!(
        declared,
        [":NATMAP-U0 - [0:0]", ":NATMAP-U0 - [0:0]"],
        "{text}"
    );
    assert_eq!(
        restore::diff(after.family(Family::V4), after.family(Family::V4)),
        None
    );
}

#[test]
fn diff_reorders_when_a_kept_line_is_out_of_place() {
    use super::{Chain, FamilyRules};
    let mut applied = FamilyRules::default();
    let mut desired = FamilyRules::default();
    for l in ["b", "a", "c"] {
        applied.push(Chain::NatPrerouting, l.into());
    }
    for l in ["a", "b", "c", "d"] {
        desired.push(Chain::NatPrerouting, l.into());
    }
    let text = restore::diff(&applied, &desired).unwrap();
    // Simulate the transaction on a list and check the result is `desired`.
    let mut chain: Vec<String> = applied.chain(Chain::NatPrerouting).to_vec();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("-D NATMAP ") {
            let i = chain
                .iter()
                .position(|l| l == rest)
                .expect("deleted line exists");
            chain.remove(i);
        } else if let Some(rest) = line.strip_prefix("-I NATMAP ") {
            let (pos, l) = rest.split_once(' ').unwrap();
            chain.insert(pos.parse::<usize>().unwrap() - 1, l.to_owned());
        } else if let Some(rest) = line.strip_prefix("-A NATMAP ") {
            chain.push(rest.to_owned());
        }
    }
    assert_eq!(chain, desired.chain(Chain::NatPrerouting));
}

#[test]
fn export_fragment_holds_only_natmap_and_its_hooks() {
    let set = render::desired(&sample_rules()[..4]);
    let text = restore::export(set.family(Family::V4));
    golden("export-v4.rules", &text);
    for line in text.lines() {
        let ours = line.starts_with('*')
            || line == "COMMIT"
            || line.starts_with(":NATMAP")
            || line.starts_with("-A NATMAP")
            || line.starts_with('#');
        assert!(ours, "not natmap's: {line}");
    }
    // No built-in chain is written to: restoring it twice changes nothing.
    assert!(!text.lines().any(|l| l.starts_with("-I ")), "{text}");
    let hooks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(restore::HOOK_MARK))
        .collect();
    assert_eq!(
        hooks,
        [
            " nat PREROUTING NATMAP",
            " nat OUTPUT NATMAP-OUTPUT",
            " nat POSTROUTING NATMAP-POSTROUTING",
            " filter FORWARD NATMAP"
        ]
    );
    // The daemon replaces the boot hook with its DOCKER-USER hook.
    let booted = SavedTables::parse(
        "*filter\n:FORWARD ACCEPT [0:0]\n:NATMAP - [0:0]\n-A FORWARD -j NATMAP\nCOMMIT\n",
    );
    let full = restore::full(set.family(Family::V4), &booted);
    assert!(full.contains("-D FORWARD -j NATMAP"), "{full}");
    assert!(restore::teardown(&booted, false).contains("-D FORWARD -j NATMAP"));
}

#[test]
fn teardown_removes_docker_user_only_when_natmap_made_it_and_nobody_uses_it() {
    let ours = "*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n:NATMAP - [0:0]\n\
                -A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j NATMAP\nCOMMIT\n";
    let removes = |save: &str, own: bool| {
        restore::teardown(&SavedTables::parse(save), own).contains("-X DOCKER-USER")
    };
    assert!(removes(ours, true));
    assert!(!removes(ours, false), "not natmap's creation");
    let with_rule = ours.replace("COMMIT", "-A DOCKER-USER -s 192.0.2.9/32 -j DROP\nCOMMIT");
    assert!(!removes(&with_rule, true), "someone put a rule in it");
    let docker = ours.replace(":NATMAP", ":DOCKER-FORWARD - [0:0]\n:NATMAP");
    assert!(!removes(&docker, true), "Docker has adopted it");
    let text = restore::teardown(&SavedTables::parse(ours), true);
    assert!(text.contains("-D FORWARD -j DOCKER-USER\n"), "{text}");
}

#[test]
fn a_nonlocal_address_matches_only_while_it_is_local() {
    let mut rules = sample_rules();
    for rule in &mut rules {
        match &mut rule.spec {
            RuleSpec::Dnat(r) => r.allow_nonlocal = true,
            RuleSpec::Hairpin(r) => r.allow_nonlocal = true,
            _ => {}
        }
    }
    let set = render::desired(&rules);
    let text = crate::firewall::iptables::restore::rewrite_chains(set.family(Family::V4));
    let dnat: Vec<&str> = text.lines().filter(|l| l.contains("-j DNAT")).collect();
    assert!(!dnat.is_empty());
    for line in dnat {
        assert!(
            line.contains(" -m addrtype --dst-type LOCAL -m comment"),
            "unguarded: {line}"
        );
    }
    // The FORWARD accepts and the masquerade need no guard: they match
    // only connections a guarded DNAT translated.
    assert!(!text
        .lines()
        .filter(|l| !l.contains("-j DNAT"))
        .any(|l| l.contains("addrtype")));
}

/// `snat --forward` adds the accepts of the source's traffic out of the
/// interface and of the replies back in; without it, only the SNAT line.
#[test]
fn snat_forward_accepts_the_traffic_and_its_replies() {
    let snat = |id, source: &str, forward| Rule {
        id,
        spec: RuleSpec::Snat(SnatRule {
            source: source.parse().unwrap(),
            ext_if: "eth0".parse().unwrap(),
            ext_ip: "203.0.113.10".parse().unwrap(),
            forward,
        }),
    };
    let set = render::desired(&[snat(1, "10.0.0.0/24", true), snat(2, "10.0.1.7", false)]);
    golden(
        "snat-forward-v4.rules",
        &restore::rewrite_chains(set.family(Family::V4)),
    );
}

/// A published container port of `web` (172.17.0.2 on the default bridge).
fn docker_rule(id: u64, spec: &str) -> Rule {
    let spec: crate::model::PortSpec = spec.parse().unwrap();
    let target = crate::model::Endpoint {
        ip: "172.17.0.2".parse().unwrap(),
        subnet: Some("172.17.0.0/16".parse().unwrap()),
    };
    Rule {
        id,
        spec: RuleSpec::Docker(crate::model::DockerRule {
            name: "web".into(),
            container_id: None,
            network: Some("bridge".into()),
            host_ip: spec.host_ip,
            host_port: spec.host_port,
            container_port: spec.target_port,
            port_count: spec.port_count,
            proto: spec.proto,
            external: false,
            target_v4: Some(target),
            target_v6: None,
            auto: None,
            allow_nonlocal: false,
        }),
    }
}

/// Ranges: a shifted range is one DNAT line per port (DNAT to a port
/// range would pick any port of it, not the one at the same offset); a
/// range onto the same ports is one line that keeps the port; the
/// masquerade and the accepts match the container's range. A mapping
/// published on loopback only has no kernel rule at all (the relay serves
/// it).
#[test]
fn docker_ranges_map_each_port_to_its_offset_and_loopback_has_no_rule() {
    let rules = [
        docker_rule(1, "8160-8161:80-81"),
        docker_rule(2, "10000-10004/udp"),
        docker_rule(3, "203.0.113.10:8170-8171:90-91"),
        docker_rule(4, "127.0.0.1:8152:80"),
        docker_rule(5, "[::1]:8153:80/udp"),
    ];
    let set = render::desired(&rules);
    let text = restore::rewrite_chains(set.family(Family::V4));
    golden("docker-ranges-v4.rules", &text);
    let dnat_of = |id: u64| -> Vec<&str> {
        text.lines()
            .filter(|l| l.contains(&format!("natmap:docker:{id} ")) && l.contains("-j DNAT"))
            .collect()
    };
    for (host, container) in [(8160, 80), (8161, 81)] {
        let lines: Vec<&str> = dnat_of(1)
            .into_iter()
            .filter(|l| l.contains(&format!("--dport {host} ")))
            .collect();
        assert_eq!(lines.len(), 2, "PREROUTING and OUTPUT for {host}: {text}");
        for l in lines {
            assert!(
                l.ends_with(&format!("--to-destination 172.17.0.2:{container}")),
                "{l}"
            );
        }
    }
    let same = dnat_of(2);
    assert_eq!(same.len(), 2, "{text}");
    assert!(same
        .iter()
        .all(|l| l.contains("--dport 10000:10004") && l.ends_with("--to-destination 172.17.0.2")));
    assert!(text.contains("-d 172.17.0.2/32 -p tcp -m tcp --dport 80:81 -m conntrack --ctstate DNAT -m comment --comment natmap:docker:1 -j ACCEPT"), "{text}");
    assert!(
        !text.contains("natmap:docker:4 "),
        "loopback-only has no rule: {text}"
    );
    assert!(
        set.family(Family::V6).is_empty(),
        "[::1] has no rule either"
    );
}

/// Container mappings (TCP and UDP, IPv4 and IPv6 targets) and a fixed
/// target, in their stored form.
fn docker_rules() -> Vec<Rule> {
    let target = |ip: &str, subnet: &str| serde_json::json!({"ip": ip, "subnet": subnet});
    let v4 = target("172.17.0.2", "172.17.0.0/16");
    let v6 = target("fd00:db8:1::2", "fd00:db8:1::/64");
    [
        serde_json::json!({"id": 1, "kind": "docker", "name": "web", "network": "bridge",
            "host_port": 8080, "container_port": 80, "proto": "tcp",
            "target_v4": v4, "target_v6": v6}),
        serde_json::json!({"id": 2, "kind": "docker", "name": "web", "network": "bridge",
            "host_port": 8080, "container_port": 5353, "proto": "udp",
            "target_v4": v4, "target_v6": v6}),
        serde_json::json!({"id": 3, "kind": "docker", "name": "nas", "external": true,
            "host_port": 8081, "container_port": 80, "proto": "tcp",
            "target_v4": {"ip": "192.0.2.10", "subnet": null}}),
    ]
    .into_iter()
    .map(|doc| serde_json::from_value(doc).expect("a stored docker rule"))
    .collect()
}

/// A container reaching its own mapping through the host's address is
/// masqueraded. With bridge netfilter only that flow is (`-s C -d C`, other
/// containers keep their address); without, the container's whole network
/// is (a neighbour's replies would bypass the host). A fixed target is
/// never masqueraded.
#[test]
fn a_container_mapping_masquerades_the_container_itself_or_its_network() {
    use render::BridgeNetfilter;
    let rules = docker_rules();
    let bridged = BridgeNetfilter {
        iptables: true,
        ip6tables: true,
    };
    for (name, bridges) in [
        ("docker-bridged", bridged),
        ("docker-routed", BridgeNetfilter::default()),
    ] {
        let set = render::desired_on(&rules, bridges);
        for (family, suffix) in [(Family::V4, "v4"), (Family::V6, "v6")] {
            golden(
                &format!("{name}-{suffix}.rules"),
                &restore::rewrite_chains(set.family(family)),
            );
        }
    }
    assert_eq!(
        render::desired(&rules),
        render::desired_on(&rules, BridgeNetfilter::default())
    );
    // Only IPv4 bridged: the IPv6 rules are those of the routed case.
    let mixed = BridgeNetfilter {
        iptables: true,
        ip6tables: false,
    };
    let (m, b, r) = (
        render::desired_on(&rules, mixed),
        render::desired_on(&rules, bridged),
        render::desired(&rules),
    );
    assert_eq!(m.family(Family::V4), b.family(Family::V4));
    assert_eq!(m.family(Family::V6), r.family(Family::V6));
}

fn dnat_on(id: u64, ports: &str) -> Rule {
    Rule {
        id,
        spec: RuleSpec::Dnat(DnatRule {
            ext_ip: "203.0.113.10".parse().unwrap(),
            int_ip: "10.0.0.25".parse().unwrap(),
            ports: ports.parse().unwrap(),
            proto: "tcp".parse().unwrap(),
            ext_if: None,
            allow_nonlocal: false,
        }),
    }
}

#[test]
fn a_line_is_keyed_on_its_protocol_and_port_blocks() {
    use super::{shard_keys, PortSide, ShardKey};
    let t = |block| ShardKey {
        proto: "tcp",
        block,
    };
    let keys = shard_keys;
    assert_eq!(
        keys("-d 1.2.3.4/32 -p tcp -m tcp --dport 25 -j DNAT"),
        Some((PortSide::Destination, vec![t(0)]))
    );
    assert_eq!(
        keys("-p tcp -m tcp --dport 1020:1300 -j DNAT"),
        Some((PortSide::Destination, vec![t(3), t(4), t(5)]))
    );
    assert_eq!(
        keys("-p udp -m multiport --sports 53,65535 -j ACCEPT"),
        Some((
            PortSide::Source,
            vec![
                ShardKey {
                    proto: "udp",
                    block: 0
                },
                ShardKey {
                    proto: "udp",
                    block: 255
                }
            ]
        ))
    );
    assert_eq!(keys("-s 10.0.0.0/24 -o eth0 -j ACCEPT"), None);
    assert_eq!(keys("-p tcp -m tcp ! --dport 25 -j ACCEPT"), None);
    assert_eq!(t(255).ports(), "65280:65535");
    assert_eq!(t(4).ports(), "1024:1279");
    assert_eq!(t(12).to_string(), "T12");
    let c = super::Chain::NatOutput;
    assert!(c.is_shard_name("NATMAP-OUTPUT-T12"));
    assert!(!c.is_shard_name("NATMAP-OUTPUT-T012"));
    assert!(!c.is_shard_name("NATMAP-OUTPUT-T256"));
    assert!(!super::Chain::NatPrerouting.is_shard_name("NATMAP-OUTPUT-T1"));
    assert!(!super::Chain::NatPostrouting.is_shard_name("NATMAP-POSTROUTING-T1"));
}

/// Every port of a range that crosses a shard boundary reaches the line:
/// for each port exactly one of the parent's jumps matches, and the shard
/// it leads to holds the line.
#[test]
fn a_range_across_a_shard_boundary_is_reachable_on_every_port() {
    let set = render::desired(&[dnat_on(1, "1000-2000"), dnat_on(2, "1500")]);
    let kernel = set.family(Family::V4).kernel();
    let parent = kernel
        .iter()
        .find(|c| c.table == "nat" && c.name == "NATMAP")
        .unwrap();
    let jumps: Vec<(u32, u32, &str)> = parent
        .lines
        .iter()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w[..5], ["-p", "tcp", "-m", "tcp", "--dport"], "{l}");
            let (a, b) = w[5].split_once(':').unwrap();
            (a.parse().unwrap(), b.parse().unwrap(), w[7])
        })
        .collect();
    assert_eq!(jumps.len(), 5, "blocks 3 to 7: {jumps:?}");
    for port in 1000..=2000u32 {
        let hits: Vec<&str> = jumps
            .iter()
            .filter(|(a, b, _)| (*a..=*b).contains(&port))
            .map(|(_, _, name)| *name)
            .collect();
        assert_eq!(hits.len(), 1, "port {port}: {hits:?}");
        let shard = kernel
            .iter()
            .find(|c| c.table == "nat" && c.name == hits[0])
            .unwrap();
        let lines: Vec<&str> = shard.lines.iter().map(|l| l.as_ref()).collect();
        assert!(
            lines.iter().any(|l| l.contains("--dport 1000:2000")),
            "port {port} reaches {}: {lines:?}",
            hits[0]
        );
    }
    // Lines for the same port keep their order: rule 1's range before
    // rule 2's single port, both in block 5.
    let t1 = kernel
        .iter()
        .find(|c| c.table == "nat" && c.name == "NATMAP-T5")
        .unwrap();
    assert!(t1.lines[0].contains("natmap:dnat:1") && t1.lines[1].contains("natmap:dnat:2"));
}

#[test]
fn a_diff_touches_only_the_changed_shard() {
    let kept = [dnat_on(1, "25"), dnat_on(2, "14000")];
    let before = render::desired(&kept);
    let added = dnat_on(3, "14001");
    let after = render::desired(kept.iter().chain([&added]));
    let text = restore::diff(before.family(Family::V4), after.family(Family::V4)).unwrap();
    for line in text.lines().filter(|l| l.starts_with('-')) {
        let chain = line.split_whitespace().nth(1).unwrap();
        assert!(chain.ends_with("-T54"), "{line}\n{text}");
    }
    // The last line of a shard takes the shard and its jump with it.
    let text = restore::diff(
        after.family(Family::V4),
        render::desired(&kept[..1]).family(Family::V4),
    )
    .unwrap();
    assert!(
        text.contains(":NATMAP-T54 - [0:0]\n") && text.contains("-X NATMAP-T54\n"),
        "{text}"
    );
    assert!(
        text.contains("-D NATMAP -p tcp -m tcp --dport 13824:14079 -j NATMAP-T54\n"),
        "{text}"
    );
    assert!(!text.contains("NATMAP-T0"), "{text}");
}

/// Shards natmap no longer fills are drift, and a full apply and a
/// teardown remove them; missing shards are one reason per parent.
#[test]
fn left_over_and_missing_shards() {
    let set = render::desired(&[dnat_on(1, "25")]);
    let rules = set.family(Family::V4);
    let stale = DOCKER_HOST_SAVE.replace(
        ":NATMAP-OUTPUT - [0:0]\n",
        ":NATMAP-OUTPUT - [0:0]\n:NATMAP-T63 - [0:0]\n:NATMAP-OUTPUT-T62 - [0:0]\n",
    );
    let saved = SavedTables::parse(&stale);
    assert_eq!(
        saved.shard_chains("nat"),
        ["NATMAP-OUTPUT-T62", "NATMAP-T63"]
    );
    let reasons = saved.drift(rules);
    assert!(
        reasons.contains(&"nat chain NATMAP-T63 is left over".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons
            .contains(&"1 shard(s) of nat chain NATMAP are missing (first NATMAP-T0)".to_owned()),
        "{reasons:?}"
    );
    let full = restore::full(rules, &saved);
    for line in [
        ":NATMAP-T63 - [0:0]",
        "-X NATMAP-T63",
        "-X NATMAP-OUTPUT-T62",
        ":NATMAP-T0 - [0:0]",
    ] {
        assert!(full.lines().any(|l| l == line), "{line}: {full}");
    }
    assert!(!full.contains("-X NATMAP-T0"), "{full}");
    let down = restore::teardown(&saved, false);
    for line in ["-X NATMAP-T63", "-X NATMAP-OUTPUT-T62", "-X NATMAP"] {
        assert!(down.lines().any(|l| l == line), "{line}: {down}");
    }
    assert_ne!(
        saved.fingerprint(),
        SavedTables::parse(DOCKER_HOST_SAVE).fingerprint()
    );
}
