//! Port numbers and port lists (`25,465,8000-8010`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ParseError;

/// The most ports one rule may forward: every port is a reserved socket in the daemon.
pub const MAX_PORTS_PER_RULE: usize = 1024;

/// `iptables -m multiport` takes at most 15 slots; a range takes two.
const MULTIPORT_SLOTS: usize = 15;

/// Parses one port number, 1–65535.
pub fn parse_port(field: &'static str, s: &str) -> Result<u16, ParseError> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(ParseError::new(field, s, "a port number from 1 to 65535")),
    }
}

/// An inclusive range of ports; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    fn len(self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// iptables' spelling: `25` or `8000:8010`.
    fn iptables(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

/// A non-empty, sorted, de-duplicated set of ports in canonical form.
///
/// Two lists that name the same ports compare equal whatever order or overlap
/// they were written with, which is what makes re-adding a rule idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortList(Vec<PortRange>);

impl PortList {
    /// A list holding one port.
    pub fn single(port: u16) -> PortList {
        PortList(vec![PortRange {
            first: port,
            last: port,
        }])
    }

    /// A list holding the ports `first..=last` (`first <= last`).
    pub fn range(first: u16, last: u16) -> PortList {
        debug_assert!(first <= last);
        PortList(vec![PortRange {
            first,
            last: last.max(first),
        }])
    }

    /// Every port in the list, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(|r| r.first..=r.last)
    }

    /// Number of ports in the list.
    pub fn count(&self) -> usize {
        self.0.iter().map(|r| r.len()).sum()
    }

    /// Whether the two lists share a port.
    pub fn overlaps(&self, other: &PortList) -> bool {
        self.0.iter().any(|a| {
            other
                .0
                .iter()
                .any(|b| a.first <= b.last && b.first <= a.last)
        })
    }

    /// The match arguments for this list, one entry per iptables rule needed.
    ///
    /// A single port or range uses the protocol's own match (`-m tcp --dport 25`),
    /// as `iptables -S` prints it; longer lists use `-m multiport`, split into
    /// chunks of at most 15 slots.
    pub fn match_args(&self, proto: &str, direction: PortDirection) -> Vec<String> {
        let (single, multi) = match direction {
            PortDirection::Destination => ("--dport", "--dports"),
            PortDirection::Source => ("--sport", "--sports"),
        };
        if let [only] = self.0.as_slice() {
            return vec![format!("-m {proto} {single} {}", only.iptables())];
        }
        let mut chunks = Vec::new();
        let mut current: Vec<String> = Vec::new();
        let mut slots = 0;
        for range in &self.0 {
            let need = if range.first == range.last { 1 } else { 2 };
            if slots + need > MULTIPORT_SLOTS {
                chunks.push(std::mem::take(&mut current));
                slots = 0;
            }
            current.push(range.iptables());
            slots += need;
        }
        chunks.push(current);
        chunks
            .into_iter()
            .map(|c| format!("-m multiport {multi} {}", c.join(",")))
            .collect()
    }
}

/// Which side of a packet a port match applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortDirection {
    /// `--dport`.
    Destination,
    /// `--sport`.
    Source,
}

impl FromStr for PortList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "comma-separated ports 1-65535 or ranges, e.g. 25,465 or 8000-8010";
        let bad = || ParseError::new("ports", s, FORM);
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            let range = match item.split_once('-') {
                Some((a, b)) => {
                    let (first, last) = (
                        parse_port("ports", a).map_err(|_| bad())?,
                        parse_port("ports", b).map_err(|_| bad())?,
                    );
                    if first > last {
                        return Err(bad());
                    }
                    PortRange { first, last }
                }
                None => {
                    let p = parse_port("ports", item).map_err(|_| bad())?;
                    PortRange { first: p, last: p }
                }
            };
            ranges.push(range);
        }
        ranges.sort();
        // Merge overlapping and adjacent ranges into canonical form.
        let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(prev) if u32::from(r.first) <= u32::from(prev.last) + 1 => {
                    prev.last = prev.last.max(r.last)
                }
                _ => merged.push(r),
            }
        }
        let list = PortList(merged);
        if list.count() > MAX_PORTS_PER_RULE {
            return Err(ParseError::new(
                "ports",
                s,
                "at most 1024 ports per rule (each one is a reserved socket)",
            ));
        }
        Ok(list)
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.first == r.last {
                write!(f, "{}", r.first)?;
            } else {
                write!(f, "{}-{}", r.first, r.last)?;
            }
        }
        Ok(())
    }
}

impl TryFrom<String> for PortList {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortList> for String {
    fn from(p: PortList) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalises_order_duplicates_and_adjacent_ranges() {
        let p: PortList = "465, 25,25,8001-8010,8000".parse().unwrap();
        assert_eq!(p.to_string(), "25,465,8000-8010");
        assert_eq!(p.count(), 13);
        assert_eq!(p, "8000-8010,25,465".parse().unwrap());
    }

    #[test]
    fn rejects_out_of_range_and_garbage() {
        for s in [
            "", "0", "65536", "-1", "25,", "a", "10-5", "1-2-3", "25\n-A X", "1e3",
        ] {
            let err = s.parse::<PortList>().unwrap_err();
            assert!(err.to_string().contains("ports"), "{s:?}: {err}");
        }
        assert!("1-2000".parse::<PortList>().is_err());
    }

    #[test]
    fn renders_single_and_multiport_matches() {
        let one: PortList = "25".parse().unwrap();
        assert_eq!(
            one.match_args("tcp", PortDirection::Destination),
            ["-m tcp --dport 25"]
        );
        let range: PortList = "8000-8010".parse().unwrap();
        assert_eq!(
            range.match_args("udp", PortDirection::Source),
            ["-m udp --sport 8000:8010"]
        );
        let many: PortList = "25,465".parse().unwrap();
        assert_eq!(
            many.match_args("tcp", PortDirection::Destination),
            ["-m multiport --dports 25,465"]
        );
    }

    #[test]
    fn splits_multiport_at_fifteen_slots() {
        let list: PortList = (1..=20)
            .map(|p| (p * 2).to_string())
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap();
        let args = list.match_args("tcp", PortDirection::Destination);
        assert_eq!(args.len(), 2);
        assert_eq!(args[0].matches(',').count(), 14);
        assert!(list.overlaps(&"40".parse().unwrap()));
        assert!(!list.overlaps(&"41".parse().unwrap()));
    }
}
