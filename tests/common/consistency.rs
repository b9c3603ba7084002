//! What the kernel, the state file and the daemon's answers must agree on,
//! checked after crashes and under load.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::*;

/// Reads and parses `state.json` alone, without its journal (panics with
/// the text if it does not parse): what a compaction (`save`, a start)
/// wrote. For the committed state use [`current_state`].
pub fn read_state(path: &Path) -> natmap::state::State {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} does not parse: {e}\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// The committed state (empty if the daemon never wrote one).
pub fn state_or_empty(path: &Path) -> natmap::state::State {
    current_state(path)
}

/// The committed state: `state.json` with its journal replayed, as the
/// next start would load it (the empty state when neither exists). While a
/// daemon runs, `state.json` alone lags behind the journal.
pub fn current_state(path: &Path) -> natmap::state::State {
    natmap::state::read_current(path).unwrap_or_else(|e| panic!("{e}"))
}

/// What natmap's chains must hold for `state` when every rule is active,
/// in the form of [`natmap_lines`]: `(v4 lines, v6 lines)`.
pub fn rendered_lines(state: &natmap::state::State) -> (Vec<String>, Vec<String>) {
    use natmap::firewall::iptables::{render, Chain};
    use natmap::model::Family;
    let set = render::desired(&state.rules);
    let lines = |family| {
        let rules = set.family(family);
        Chain::ALL
            .iter()
            .flat_map(|c| {
                rules
                    .chain(*c)
                    .iter()
                    .map(move |l| format!("{} -A {} {l}", c.table(), c.name()))
            })
            .collect::<Vec<_>>()
    };
    (lines(Family::V4), lines(Family::V6))
}

/// The `(port, proto)` of every dnat rule in a state, with its id.
pub fn state_dnat_keys(
    state: &natmap::state::State,
) -> std::collections::BTreeMap<(u16, String), u64> {
    let mut keys = std::collections::BTreeMap::new();
    for rule in &state.rules {
        let natmap::model::RuleSpec::Dnat(r) = &rule.spec else {
            panic!("unexpected rule kind in state: {rule:?}");
        };
        for port in r.ports.iter() {
            let old = keys.insert((port, r.proto.to_string()), rule.id);
            assert!(old.is_none(), "two rules forward {port}/{}", r.proto);
        }
    }
    keys
}

/// Checks that the kernel holds exactly what the state renders: natmap's
/// chains equal the rendering line for line (so every stored rule has its
/// lines, no line lacks a stored rule, nothing is duplicated), every
/// `natmap:dnat:<id>` comment names a stored rule and every stored rule has
/// at least one line, each hook has exactly one jump, `ls` lists exactly
/// the stored rules as active, and every forwarded port is held.
///
/// On the nftables pass ([`testing_nftables`]; `iptables` and `ip6tables`
/// are not read then) the kernel part is natmap's tables: their elements
/// equal the state's rendering ([`rendered_elements`]), so every stored
/// rule has its elements and nothing else is there.
#[track_caller]
pub fn assert_kernel_matches_state(ns: &Netns, d: &Daemon, iptables: &str, ip6tables: &str) {
    let state = state_or_empty(&d.state_path());
    if testing_nftables() {
        let (want4, want6) = rendered_elements(&state);
        assert_eq!(
            nft_elements(ns, false),
            want4,
            "ip natmap differs from the state's rendering"
        );
        assert_eq!(
            nft_elements(ns, true),
            want6,
            "ip6 natmap differs from the state's rendering"
        );
        assert_listed_and_held(ns, d, &state);
        return;
    }
    let (want4, want6) = rendered_lines(&state);
    // iptables -S quotes the comment; the rendering does not (natmap's
    // comments have no spaces): compare without the quotes, as the daemon does.
    let unquote = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .map(|l| {
                if l.contains("--comment \"natmap:") {
                    l.replace('"', "")
                } else {
                    l
                }
            })
            .collect()
    };
    let got4 = unquote(natmap_lines_with(ns, iptables));
    let got6 = unquote(natmap_lines_with(ns, ip6tables));
    assert_eq!(got4, want4, "IPv4 chains differ from the state's rendering");
    assert_eq!(got6, want6, "IPv6 chains differ from the state's rendering");

    let ids: std::collections::BTreeSet<u64> = state.rules.iter().map(|r| r.id).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut unique = std::collections::BTreeSet::new();
    for line in &got4 {
        assert!(unique.insert(line.clone()), "duplicate line: {line}");
        let id = line
            .split("natmap:dnat:")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("line without a natmap:dnat:<id> comment: {line}"));
        assert!(ids.contains(&id), "line of rule #{id} not in state: {line}");
        seen.insert(id);
    }
    assert_eq!(seen, ids, "every stored rule has its lines");

    let save = String::from_utf8_lossy(&ns.exec(&[format!("{iptables}-save")]).stdout).into_owned();
    if !state.rules.is_empty() {
        for (table, hook, target) in [
            ("nat", "PREROUTING", "NATMAP"),
            ("nat", "OUTPUT", "NATMAP-OUTPUT"),
            ("nat", "POSTROUTING", "NATMAP-POSTROUTING"),
            ("filter", "DOCKER-USER", "NATMAP"),
        ] {
            let jump = format!("-A {hook} -j {target}");
            let count = save.lines().filter(|l| *l == jump).count();
            assert_eq!(
                count, 1,
                "{table} {hook}: {count} jumps to {target}\n{save}"
            );
        }
    }

    assert_listed_and_held(ns, d, &state);
}

/// `ls` lists exactly the stored rules, all active, and every forwarded
/// port of `state` is held by the daemon.
#[track_caller]
fn assert_listed_and_held(ns: &Netns, d: &Daemon, state: &natmap::state::State) {
    let ids: std::collections::BTreeSet<u64> = state.rules.iter().map(|r| r.id).collect();
    let ls = d.call(serde_json::json!({"cmd": "ls"}));
    let listed: Vec<&serde_json::Value> = ls["data"]["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("ls: {ls}"))
        .iter()
        .collect();
    let listed_ids: std::collections::BTreeSet<u64> =
        listed.iter().filter_map(|r| r["id"].as_u64()).collect();
    assert_eq!(listed_ids, ids, "ls lists the stored rules");
    for r in &listed {
        assert_eq!(r["status"], "active", "{r}");
    }
    for ((port, proto), id) in state_dnat_keys(state) {
        assert!(
            port_is_held(ns, &proto, SocketAddr::new(IpAddr::V4(ROUTER_EXT_V4), port)),
            "port {port}/{proto} of rule #{id} is not held by the daemon"
        );
    }
}
