//! Reading natmap's nftables tables (`table ip natmap`, `table ip6
//! natmap`) in a namespace, and what natmap installed in either backend's
//! terms, so one assertion holds on both passes of the suite
//! ([`test_backend`]).

use super::*;

/// `"ip"` or `"ip6"`: the family of natmap's table.
fn nft_family(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

/// `nft -j list table ip|ip6 natmap` in `ns`, parsed; `None` when the
/// table does not exist.
pub fn nft_natmap_table(ns: &Netns, v6: bool) -> Option<serde_json::Value> {
    let out = ns.exec(&["nft", "-j", "list", "table", nft_family(v6), "natmap"]);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nft -j list table: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    }))
}

/// The elements of natmap's maps and sets in `ns`, each as `MAP KEY` or
/// `MAP KEY : VALUE` (keys and values normalised as the driver reads them
/// back, `natmap::firewall::nftables::render::json_key`), sorted. Empty
/// when the table does not exist.
pub fn nft_elements(ns: &Netns, v6: bool) -> Vec<String> {
    use natmap::firewall::nftables::render::json_key;
    let Some(table) = nft_natmap_table(ns, v6) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let items = table["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(m) = item.get("map").or_else(|| item.get("set")) else {
            continue;
        };
        let name = m["name"].as_str().unwrap_or("?");
        for e in m["elem"].as_array().into_iter().flatten() {
            // A map element is `[key, value]`; a counted key is
            // `{"elem": {"val": key, "counter": …}}`.
            let (key, value) = match e.as_array() {
                Some(kv) => (&kv[0], kv.get(1)),
                None => (e, None),
            };
            let key = key.get("elem").map(|k| &k["val"]).unwrap_or(key);
            let key = json_key(key).unwrap_or_else(|| panic!("{name}: odd key {key}"));
            match value {
                Some(v) => {
                    let v = json_key(v).unwrap_or_else(|| panic!("{name}: odd value {v}"));
                    out.push(format!("{name} {key} : {v}"));
                }
                None => out.push(format!("{name} {key}")),
            }
        }
    }
    out.sort();
    out
}

/// What natmap's table must hold for `state` when every rule is active, in
/// the form of [`nft_elements`]: `(v4, v6)`.
pub fn rendered_elements(state: &natmap::state::State) -> (Vec<String>, Vec<String>) {
    use natmap::firewall::nftables::render;
    use natmap::model::Family;
    let lines = |family| {
        let mut lines: Vec<String> = render::elements(&state.rules, family)
            .unwrap_or_else(|u| panic!("the state does not render on nftables: {u:?}"))
            .into_iter()
            .map(|(map, e)| {
                let value: Vec<String> = e.value.iter().map(|p| p.norm()).collect();
                if value.is_empty() {
                    format!("{} {}", map.name(), e.norm())
                } else {
                    format!("{} {} : {}", map.name(), e.norm(), value.join(" . "))
                }
            })
            .collect();
        lines.sort();
        lines
    };
    (lines(Family::V4), lines(Family::V6))
}

/// What natmap installed in `ns` for `v6`'s family, in the backend's
/// terms: the `-A` lines of its chains ([`natmap_lines`]) on iptables, the
/// elements of its maps ([`nft_elements`]) on nftables. Empty when natmap
/// holds nothing there; for assertions that must hold on both backends
/// ("nothing left", "something installed").
pub fn natmap_installed(ns: &Netns, v6: bool) -> Vec<String> {
    if testing_nftables() {
        nft_elements(ns, v6)
    } else {
        natmap_lines(ns, v6)
    }
}

/// Removes natmap's rules behind the daemon's back, as an operator's
/// mistake or another tool would: `iptables -t nat -F NATMAP` on iptables,
/// `nft flush map ip natmap dnat_port` (and `dnat_addr`) on nftables:
/// every dnat mapping stops forwarding until the daemon repairs it.
pub fn flush_natmap_dnat(ns: &Netns, v6: bool) {
    if testing_nftables() {
        for map in ["dnat_port", "dnat_addr"] {
            ns.run_ok(&["nft", "flush", "map", nft_family(v6), "natmap", map]);
        }
    } else {
        iptables(ns, v6, &["-t", "nat", "-F", "NATMAP"]);
    }
}

/// Packets natmap's static dnat maps (`dnat_addr`, `dnat_port`,
/// `dnat_iif`) counted in `ns`: non-zero once natmap translated a
/// connection there (each connection counts twice: the guard lookup and
/// the translation). 0 when the table does not exist.
pub fn nft_dnat_packets(ns: &Netns, v6: bool) -> u64 {
    use natmap::firewall::nftables::{exec::element_counters, render::Map};
    let Some(table) = nft_natmap_table(ns, v6) else {
        return 0;
    };
    element_counters(&table.to_string())
        .into_iter()
        .filter(|c| matches!(c.map, Map::Dnat | Map::DnatPort | Map::DnatIf))
        .map(|c| c.packets)
        .sum()
}

/// On the nftables pass: natmap's connmark accept is the first rule of
/// `DOCKER-USER` in `ns` (iptables or ip6tables for `v6`), once — where
/// that backend hooks into Docker's FORWARD DROP.
#[track_caller]
pub fn assert_nft_accept_first(ns: &Netns, v6: bool) {
    let lines = iptables_appended_rules(ns, v6, "filter", "DOCKER-USER");
    let ours = |l: &String| l.contains("--comment natmap-nftables");
    assert!(
        lines.first().is_some_and(ours) && lines.iter().filter(|l| ours(l)).count() == 1,
        "DOCKER-USER: {lines:?}"
    );
}

/// A reboot of `ns`'s firewall as natmap finds it at start: on iptables
/// every chain of nat and filter flushed and deleted; on nftables natmap's
/// tables gone and `DOCKER-USER` as Docker makes it again (`-j RETURN`
/// only). The filter FORWARD policy (DROP in a [`Topology`]) stays.
pub fn reboot_firewall(ns: &Netns) {
    if testing_nftables() {
        for family in ["ip", "ip6"] {
            ns.run_ok(&["nft", "delete", "table", family, "natmap"]);
        }
        for v6 in [false, true] {
            iptables(ns, v6, &["-F", "DOCKER-USER"]);
            iptables(ns, v6, &["-A", "DOCKER-USER", "-j", "RETURN"]);
        }
    } else {
        for table in ["nat", "filter"] {
            iptables(ns, false, &["-t", table, "-F"]);
            iptables(ns, false, &["-t", table, "-X"]);
        }
    }
}

/// natmap's dnat entries in `ns` (IPv4): the `-A` lines of nat `NATMAP`
/// (one per rule there, shards folded), or on the nftables pass the
/// elements of its dnat maps (one per port or run of ports).
pub fn natmap_dnat_entries(ns: &Netns) -> usize {
    if testing_nftables() {
        nft_elements(ns, false)
            .iter()
            .filter(|e| {
                ["dnat_port ", "dnat_addr ", "dnat_iif "]
                    .iter()
                    .any(|m| e.starts_with(m))
            })
            .count()
    } else {
        iptables_appended_rules(ns, false, "nat", "NATMAP").len()
    }
}

/// What natmap left in `ns` after it stopped or gave up, in the backend's
/// terms: its chains (`nat NATMAP`, … in either family) on iptables; its
/// tables and its `DOCKER-USER` accept on nftables. Empty when clean.
pub fn natmap_left_behind(ns: &Netns) -> Vec<String> {
    let mut left = Vec::new();
    for v6 in [false, true] {
        if testing_nftables() {
            if nft_natmap_table(ns, v6).is_some() {
                left.push(format!("table {} natmap", nft_family(v6)));
            }
            let save = ns.exec(&[if v6 {
                "ip6tables-save"
            } else {
                "iptables-save"
            }]);
            left.extend(
                String::from_utf8_lossy(&save.stdout)
                    .lines()
                    .filter(|l| l.contains("natmap-nftables"))
                    .map(str::to_owned),
            );
        } else {
            for (table, chain) in NATMAP_TABLE_CHAINS {
                if chain_exists(ns, v6, table, chain) {
                    left.push(format!("{} {table} {chain}", iptables_bin(v6)));
                }
            }
        }
    }
    left
}
