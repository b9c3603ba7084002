//! Reading `iptables-save` for facts other than natmap's own chains:
//! per-rule counters (`iptables-save -c`, matched to rules by their
//! comment) and the ports Docker publishes itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::firewall::ReadCounters;
use crate::model::{Family, Proto, RuleId};
use crate::proto::Counters;

use super::exec::Netfilter;
use super::saved::SavedTables;

/// Reads counters with one `iptables-save -c` per family; needs no engine
/// state, so a metrics scrape runs it off the engine thread.
pub(super) struct SaveCounters {
    exec: Arc<dyn Netfilter>,
}

impl SaveCounters {
    pub(super) fn new(exec: Arc<dyn Netfilter>) -> SaveCounters {
        SaveCounters { exec }
    }
}

impl ReadCounters for SaveCounters {
    fn read(&self, families: &[Family]) -> HashMap<RuleId, Counters> {
        read_counters(&*self.exec, families)
    }
}

/// Per-rule counters from one `iptables-save -c` per family. Needs no
/// engine state, so a metrics scrape runs it off the engine thread.
fn read_counters(nf: &dyn Netfilter, families: &[Family]) -> HashMap<RuleId, Counters> {
    let mut out: HashMap<RuleId, Counters> = HashMap::new();
    for &family in families {
        let Ok(text) = nf.save_counters(family) else {
            continue;
        };
        let mut table = "";
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = if t == "nat" {
                    "nat"
                } else if t == "filter" {
                    "filter"
                } else {
                    ""
                };
                continue;
            }
            let Some((pkts, bytes, rest)) = parse_counted(line) else {
                continue;
            };
            let Some(id) = natmap_id(rest) else {
                continue;
            };
            let c = out.entry(id).or_default();
            match table {
                // Only a connection's first packet passes the nat table;
                // count the DNAT/SNAT lines (a MASQUERADE line of the same
                // rule sees the same connection again).
                "nat" if rest.contains("-j DNAT") || rest.contains("-j SNAT") => {
                    c.connections += pkts
                }
                "filter" => {
                    c.packets += pkts;
                    c.bytes += bytes;
                }
                _ => {}
            }
        }
    }
    out
}

/// The ports Docker publishes itself: the DNAT lines of its nat `DOCKER`
/// chain.
pub(super) fn docker_published_ports(saved: &SavedTables) -> HashSet<(Proto, u16)> {
    saved
        .chain_rules("nat", "DOCKER")
        .iter()
        .filter_map(|line| docker_published(line))
        .collect()
}

/// The protocol and port a DNAT line of Docker's `DOCKER` chain publishes
/// (`… -p tcp -m tcp --dport 8080 -j DNAT …`), read token by token.
fn docker_published(line: &str) -> Option<(Proto, u16)> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| tokens.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    if after("-j") != Some("DNAT") {
        return None;
    }
    let proto = match after("-p")? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some((proto, after("--dport")?.parse().ok()?))
}

/// `[12:720] -A CHAIN …` → (12, 720, "-A CHAIN …").
fn parse_counted(line: &str) -> Option<(u64, u64, &str)> {
    let rest = line.strip_prefix('[')?;
    let (counts, rest) = rest.split_once("] ")?;
    let (p, b) = counts.split_once(':')?;
    Some((p.parse().ok()?, b.parse().ok()?, rest))
}

/// The rule id in a natmap comment (`natmap:dnat:12`, quoted or not).
fn natmap_id(line: &str) -> Option<RuleId> {
    let at = line.find("natmap:")?;
    let tail = &line[at + "natmap:".len()..];
    let (_, rest) = tail.split_once(':')?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines_are_read_with_or_without_quotes() {
        let (p, b, rest) =
            parse_counted("[12:720] -A NATMAP -m comment --comment \"natmap:dnat:7\" -j DNAT")
                .unwrap();
        assert_eq!((p, b), (12, 720));
        assert_eq!(natmap_id(rest), Some(7));
        assert_eq!(
            natmap_id("-m comment --comment natmap:docker:31 -j ACCEPT"),
            Some(31)
        );
        assert_eq!(natmap_id("-j DOCKER"), None);
        assert!(parse_counted(":NATMAP - [0:0]").is_none());
    }

    #[test]
    fn docker_published_ports_are_read_by_token() {
        let line = "! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80";
        assert_eq!(docker_published(line), Some((Proto::Tcp, 8080)));
        assert_eq!(docker_published("-i docker0 -j RETURN"), None);
        assert_eq!(
            docker_published("-p udp -m udp --dport 53 -j DNAT --to-destination 172.17.0.3:53"),
            Some((Proto::Udp, 53))
        );
    }
}
