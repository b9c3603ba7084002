//! Running `nft`: one `nft -f -` per transaction (the input on stdin, argv
//! fixed, never a shell) and `nft -j list table` read back with serde_json
//! (counters; the drift check's counts come over netlink, with this as
//! the fallback).
//!
//! Per change this is one process (~3–4 ms measured here, flat in N); the
//! netlink path (`NFT_MSG_NEWSETELEM`/`DELSETELEM` in one batch over a
//! `NETLINK_NETFILTER` socket) would replace [`Nft::run`] for element
//! changes only, behind the same trait.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::firewall::FirewallError;
use crate::model::Family;

use super::docker_user::{self, Accept};
use super::marks::{Mark, Marks};
use super::netlink::{Netlink, SetChange};
use super::render::{self, Elements, Map, TABLE};

/// What the driver needs of nftables; the real one runs `nft`.
pub trait Nft: Send + Sync {
    /// Applies `input` (nft syntax) as one transaction.
    fn run(&self, input: &str) -> Result<(), FirewallError>;
    /// What the kernel holds in natmap's table of `family`.
    fn summary(&self, family: Family) -> Result<TableSummary, FirewallError>;
    /// Element changes in natmap's table of `family`, one atomic batch.
    fn elements(&self, family: Family, changes: &[SetChange]) -> Result<(), FirewallError>;
    /// What `DOCKER-USER` of `family` holds of natmap's accept for `mark`.
    fn accept_state(&self, family: Family, mark: Mark) -> Result<Accept, FirewallError>;
    /// Puts natmap's accept first in `DOCKER-USER` of `family` if the
    /// chain exists; whether it changed anything.
    fn ensure_accept(&self, family: Family, mark: Mark) -> Result<bool, FirewallError>;
    /// Takes natmap's accept out of `DOCKER-USER` of `family`.
    fn remove_accept(&self, family: Family) -> Result<(), FirewallError>;
}

/// The `nft` binary on `PATH` for whole tables and reads; a netlink socket
/// (opened at the first change, in the daemon's namespace) for elements.
#[derive(Default)]
pub struct NftExecutor {
    netlink: Mutex<Option<Netlink>>,
}

const NFT: &str = "nft";

impl NftExecutor {
    /// An executor with no socket open yet.
    pub fn new() -> NftExecutor {
        NftExecutor::default()
    }

    /// `nft --version`: whether it runs at all.
    pub fn version(&self) -> Result<String, FirewallError> {
        run(&["--version"], None)
    }
}

impl Nft for NftExecutor {
    fn run(&self, input: &str) -> Result<(), FirewallError> {
        run(&["-f", "-"], Some(input)).map(drop)
    }

    fn summary(&self, family: Family) -> Result<TableSummary, FirewallError> {
        // Counted over netlink: `nft -j list table` lists (and this
        // parsed) every element, 0.19 s at 1,000 mappings, where the
        // counts are a few ms. `nft` if the socket fails.
        let mut socket = self.netlink.lock().unwrap_or_else(|p| p.into_inner());
        if socket.is_none() {
            *socket = Netlink::open().ok();
        }
        if let Some(netlink) = socket.as_mut() {
            match netlink.count_table(family, TABLE) {
                Ok(None) => return Ok(TableSummary::default()),
                Ok(Some((chains, maps))) => {
                    return Ok(TableSummary {
                        exists: true,
                        chains,
                        maps,
                    })
                }
                Err(e) => {
                    tracing::debug!(
                        "counting natmap's {family} table over netlink: {e}; asking nft"
                    );
                    *socket = None;
                }
            }
        }
        drop(socket);
        summary_nft(family)
    }

    fn accept_state(&self, family: Family, mark: Mark) -> Result<Accept, FirewallError> {
        docker_user::read(family, mark)
    }

    fn ensure_accept(&self, family: Family, mark: Mark) -> Result<bool, FirewallError> {
        docker_user::ensure(family, mark)
    }

    fn remove_accept(&self, family: Family) -> Result<(), FirewallError> {
        docker_user::remove(family)
    }

    fn elements(&self, family: Family, changes: &[SetChange]) -> Result<(), FirewallError> {
        let fail = |e: std::io::Error| FirewallError::Refused {
            program: "netlink".to_owned(),
            message: format!("nftables element change: {e}"),
        };
        let mut socket = self.netlink.lock().unwrap_or_else(|p| p.into_inner());
        if socket.is_none() {
            *socket = Some(Netlink::open().map_err(fail)?);
        }
        let result = socket
            .as_mut()
            .expect("opened above")
            .batch(family, TABLE, changes);
        if result.is_err() {
            // A socket that failed may hold unread answers: open a new one next time.
            *socket = None;
        }
        result.map_err(fail)
    }
}

/// [`Nft::summary`] through `nft -j list table`.
pub fn summary_nft(family: Family) -> Result<TableSummary, FirewallError> {
    let f = render::table_family(family);
    match run(&["-j", "list", "table", f, TABLE], None) {
        Ok(json) => TableSummary::parse(&json),
        Err(FirewallError::Refused { message, .. })
            if message.contains("No such file or directory") =>
        {
            Ok(TableSummary::default())
        }
        Err(e) => Err(e),
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    crate::firewall::run_tool(NFT, "nftables", args, stdin)
}

/// What the kernel holds in natmap's table of one family, counted: enough
/// to see a flushed or deleted table, a missing chain or rule, an element
/// deleted or added by someone else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSummary {
    /// Whether the table exists.
    pub exists: bool,
    /// Rules per chain, by chain name.
    pub chains: BTreeMap<String, usize>,
    /// Elements per map or set, by name.
    pub maps: BTreeMap<String, usize>,
}

impl TableSummary {
    /// Parses `nft -j list table` output.
    pub fn parse(json: &str) -> Result<TableSummary, FirewallError> {
        let bad = |e: String| FirewallError::Refused {
            program: NFT.to_owned(),
            message: format!("unreadable `nft -j` output: {e}"),
        };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let items = v
            .get("nftables")
            .and_then(|n| n.as_array())
            .ok_or_else(|| bad("no nftables array".into()))?;
        let mut s = TableSummary::default();
        for item in items {
            if item.get("table").is_some() {
                s.exists = true;
            } else if let Some(c) = item.get("chain") {
                let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("");
                s.chains.entry(name.to_owned()).or_insert(0);
            } else if let Some(r) = item.get("rule") {
                let name = r.get("chain").and_then(|n| n.as_str()).unwrap_or("");
                *s.chains.entry(name.to_owned()).or_insert(0) += 1;
            } else if let Some(m) = item.get("map").or_else(|| item.get("set")) {
                let name = m.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let n = m.get("elem").and_then(|e| e.as_array()).map_or(0, Vec::len);
                s.maps.insert(name.to_owned(), n);
            }
        }
        Ok(s)
    }

    /// Why the kernel's table differs from one holding `applied` under
    /// `marks`, one reason a line; empty when it matches.
    pub fn differences(&self, applied: &Elements, marks: &Marks) -> Vec<String> {
        if !self.exists {
            return vec![format!("table {TABLE} is missing")];
        }
        let mut out = Vec::new();
        for (chain, rules) in render::chain_rules(marks) {
            match self.chains.get(chain) {
                None => out.push(format!("chain {chain} is missing")),
                Some(&n) if n != rules => out.push(format!(
                    "chain {chain} holds {n} rule(s), natmap applied {rules}"
                )),
                Some(_) => {}
            }
        }
        for map in Map::ALL {
            let want = applied.iter().filter(|(m, _)| *m == map).count();
            match self.maps.get(map.name()) {
                None => out.push(format!("map {} is missing", map.name())),
                Some(&n) if n != want => out.push(format!(
                    "map {} holds {n} element(s), natmap applied {want}",
                    map.name()
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// An opaque fingerprint of what was read.
    pub fn fingerprint(&self) -> Vec<String> {
        let mut out = vec![format!("exists={}", self.exists)];
        out.extend(self.chains.iter().map(|(c, n)| format!("chain {c}={n}")));
        out.extend(self.maps.iter().map(|(m, n)| format!("map {m}={n}")));
        out
    }
}

/// One element's counter as `nft -j list table` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementCounter {
    /// Its map.
    pub map: Map,
    /// Its key, normalised ([`render::json_key`]).
    pub key: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// `nft -j list table <family> natmap`, or `None` when there is no table.
pub fn list_json(family: Family) -> Result<Option<String>, FirewallError> {
    let f = render::table_family(family);
    match run(&["-j", "list", "table", f, TABLE], None) {
        Ok(json) => Ok(Some(json)),
        Err(FirewallError::Refused { message, .. })
            if message.contains("No such file or directory") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The counters of every counted element in `nft -j list table` output.
pub fn element_counters(json: &str) -> Vec<ElementCounter> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let items = v.get("nftables").and_then(|n| n.as_array());
    for item in items.into_iter().flatten() {
        let Some(m) = item.get("map").or_else(|| item.get("set")) else {
            continue;
        };
        let name = m.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let Some(map) = Map::ALL.into_iter().find(|m| m.name() == name) else {
            continue;
        };
        for e in m
            .get("elem")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
        {
            // A map element is `[key, value]`; a key with a counter is
            // `{"elem": {"val": key, "counter": {…}}}`.
            let key = e.as_array().and_then(|kv| kv.first()).unwrap_or(e);
            let Some(inner) = key.get("elem") else {
                continue;
            };
            let (Some(val), Some(c)) = (inner.get("val"), inner.get("counter")) else {
                continue;
            };
            let Some(key) = render::json_key(val) else {
                continue;
            };
            let n = |f: &str| c.get(f).and_then(|x| x.as_u64()).unwrap_or(0);
            out.push(ElementCounter {
                map,
                key,
                packets: n("packets"),
                bytes: n("bytes"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_counted_per_chain_and_map() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "natmap"}},
          {"map": {"name": "dnat_addr", "elem": [[{"concat": ["192.0.2.1", "tcp", 80]}, "10.0.0.2"]]}},
          {"set": {"name": "masq_dnat"}},
          {"chain": {"name": "prerouting"}}, {"chain": {"name": "output"}},
          {"rule": {"chain": "prerouting"}}, {"rule": {"chain": "prerouting"}}]}"#;
        let s = TableSummary::parse(json).unwrap();
        assert!(s.exists);
        assert_eq!(s.chains["prerouting"], 2);
        assert_eq!(s.chains["output"], 0);
        assert_eq!(s.maps["dnat_addr"], 1);
        assert_eq!(s.maps["masq_dnat"], 0);
        let reasons = s.differences(&Elements::new(), &Marks::default());
        assert!(
            reasons.contains(&"map dnat_addr holds 1 element(s), natmap applied 0".to_owned()),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&"chain postrouting is missing".to_owned()),
            "{reasons:?}"
        );
    }

    #[test]
    fn element_counters_are_read_with_normalised_keys() {
        let json = r#"{"nftables": [{"map": {"name": "dnat_addr", "elem": [[{"elem": {"val": {"concat": ["192.0.2.1", "tcp", {"range": [8000, 8010]}]}, "counter": {"packets": 4, "bytes": 240}}}, "10.0.0.2"]]}},
          {"map": {"name": "snat_out", "elem": [[{"elem": {"val": {"concat": ["eth*", {"prefix": {"addr": "10.0.0.0", "len": 24}}]}, "counter": {"packets": 2, "bytes": 0}}}, "192.0.2.1"]]}},
          {"set": {"name": "fwd_count", "elem": [{"elem": {"val": {"concat": ["2001:db8:0:0::2", "udp", 53]}, "counter": {"packets": 9, "bytes": 900}}}]}},
          {"set": {"name": "masq_dnat", "elem": [{"concat": ["10.0.0.0", "10.0.0.2", "tcp", 80]}]}}]}"#;
        let got: Vec<(Map, String, u64, u64)> = element_counters(json)
            .into_iter()
            .map(|c| (c.map, c.key, c.packets, c.bytes))
            .collect();
        assert_eq!(
            got,
            [
                (Map::Dnat, "192.0.2.1 . tcp . 8000-8010".to_owned(), 4, 240),
                (Map::Snat, "eth* . 10.0.0.0/24".to_owned(), 2, 0),
                (Map::Fwd, "2001:db8::2 . udp . 53".to_owned(), 9, 900),
            ]
        );
    }

    #[test]
    fn a_missing_table_is_one_reason() {
        assert_eq!(
            TableSummary::default().differences(&Elements::new(), &Marks::default()),
            ["table natmap is missing"]
        );
    }
}
