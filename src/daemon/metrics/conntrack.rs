//! Current connections per rule: the kernel's connection tracking table
//! (`conntrack -L`, one run per family in use), matched to rules by the
//! addresses and ports they translate. Runs off the engine thread: a large
//! table costs a scrape time, never another client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::model::{Network, PortList, Proto, RuleId, RuleSpec};
use crate::proto::RuleView;

/// How long one `conntrack -L` may take before the scrape goes on without it.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Which tracked connections belong to a rule.
#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    /// DNAT (dnat, hairpin, docker): to `orig_dst` (any local address when
    /// `None`) on one of `ports`, answered by one of `targets`.
    Forward {
        proto: Proto,
        orig_dst: Option<IpAddr>,
        ports: PortList,
        targets: Vec<IpAddr>,
    },
    /// SNAT: from `source`, rewritten to `to` (replies come back to it).
    Snat { source: Network, to: IpAddr },
}

impl Matcher {
    /// The matcher of a rule; `None` for a rule that translates nothing
    /// (a policy route) or a Docker mapping without a target.
    fn of(spec: &RuleSpec) -> Option<Matcher> {
        let forward = |proto, orig_dst, ports, targets: Vec<IpAddr>| {
            (!targets.is_empty()).then_some(Matcher::Forward {
                proto,
                orig_dst,
                ports,
                targets,
            })
        };
        match spec {
            RuleSpec::Dnat(r) => forward(
                r.proto,
                Some(r.ext_ip.ip()),
                r.ports.clone(),
                vec![r.int_ip.ip()],
            ),
            RuleSpec::Hairpin(r) => forward(
                r.proto,
                Some(r.ext_ip.ip()),
                r.ports.clone(),
                vec![r.int_ip.ip()],
            ),
            RuleSpec::Docker(r) => forward(
                r.proto,
                r.host_ip.map(|h| h.ip()),
                r.host_ports(),
                [r.target_v4, r.target_v6]
                    .into_iter()
                    .flatten()
                    .map(|t| t.ip.ip())
                    .collect(),
            ),
            RuleSpec::Snat(r) => Some(Matcher::Snat {
                source: r.source,
                to: r.ext_ip.ip(),
            }),
            RuleSpec::PolicyRoute(_) => None,
        }
    }

    fn matches(&self, e: &Entry) -> bool {
        match self {
            Matcher::Forward {
                proto,
                orig_dst,
                ports,
                targets,
            } => {
                e.proto == proto.as_str()
                    && orig_dst.is_none_or(|d| d == e.orig_dst)
                    && e.orig_dport
                        .is_some_and(|p| ports.overlaps(&PortList::single(p)))
                    && targets.contains(&e.reply_src)
                    && e.reply_src != e.orig_dst
            }
            Matcher::Snat { source, to } => {
                source.contains(&e.orig_src) && e.reply_dst == *to && e.orig_src != *to
            }
        }
    }

    fn v6(&self) -> bool {
        match self {
            Matcher::Forward { targets, .. } => targets.iter().any(IpAddr::is_ipv6),
            Matcher::Snat { to, .. } => to.is_ipv6(),
        }
    }
}

/// One line of `conntrack -L`.
#[derive(Debug, PartialEq)]
struct Entry<'a> {
    proto: &'a str,
    /// The TCP state (`ESTABLISHED`, `TIME_WAIT`, …); none for UDP.
    state: Option<&'a str>,
    orig_src: IpAddr,
    orig_dst: IpAddr,
    orig_dport: Option<u16>,
    reply_src: IpAddr,
    reply_dst: IpAddr,
}

impl Entry<'_> {
    /// A TCP connection that has ended but is still tracked is not current.
    fn is_open(&self) -> bool {
        !matches!(self.state, Some("TIME_WAIT" | "CLOSE"))
    }
}

/// `tcp 6 431999 ESTABLISHED src=A dst=B sport=1 dport=2 src=C dst=D …`:
/// the first src/dst/dport are the original direction, the second src/dst
/// the reply direction.
fn parse(line: &str) -> Option<Entry<'_>> {
    let mut words = line.split_whitespace();
    let proto = words.next()?;
    let (mut src, mut dst, mut dport) = (Vec::new(), Vec::new(), None);
    let mut state = None;
    for word in words {
        match word.split_once('=') {
            Some(("src", v)) => src.push(v.parse().ok()?),
            Some(("dst", v)) => dst.push(v.parse().ok()?),
            Some(("dport", v)) if dport.is_none() => dport = v.parse().ok(),
            Some(_) => {}
            None if state.is_none()
                && word.len() > 2
                && word.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
            {
                state = Some(word)
            }
            None => {}
        }
    }
    Some(Entry {
        proto,
        state,
        orig_src: *src.first()?,
        orig_dst: *dst.first()?,
        orig_dport: dport,
        reply_src: *src.get(1)?,
        reply_dst: *dst.get(1)?,
    })
}

/// Open tracked connections per rule in `listing` (conntrack's output).
fn count_in(listing: &str, matchers: &[(RuleId, Matcher)]) -> HashMap<RuleId, u64> {
    let mut counts: HashMap<RuleId, u64> = matchers.iter().map(|(id, _)| (*id, 0)).collect();
    for entry in listing.lines().filter_map(parse).filter(Entry::is_open) {
        for (id, m) in matchers {
            if m.matches(&entry) {
                *counts.entry(*id).or_default() += 1;
            }
        }
    }
    counts
}

/// Current connections of every rule that translates connections, or
/// `None` when the table cannot be read (no `conntrack` tool, say).
pub(super) async fn count(rules: &[RuleView]) -> Option<HashMap<RuleId, u64>> {
    let matchers: Vec<(RuleId, Matcher)> = rules
        .iter()
        .filter_map(|v| Matcher::of(&v.rule.spec).map(|m| (v.rule.id, m)))
        .collect();
    let mut listing = list("ipv4").await?;
    if matchers.iter().any(|(_, m)| m.v6()) {
        listing.push_str(&list("ipv6").await?);
    }
    tokio::task::spawn_blocking(move || count_in(&listing, &matchers))
        .await
        .ok()
}

/// `conntrack -L -f FAMILY`, bounded in time; warns once when it cannot run.
async fn list(family: &str) -> Option<String> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let run = tokio::process::Command::new("conntrack")
        .args(["-L", "-f", family])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let problem = match tokio::time::timeout(LIST_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => {
            return Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => format!("conntrack -L exited with {}", out.status),
        Ok(Err(e)) => format!("cannot run conntrack ({e}; install the conntrack package)"),
        Err(_) => format!("conntrack -L took longer than {LIST_TIMEOUT:?}"),
    };
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("metrics: natmap_rule_connections is left out: {problem}");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
tcp      6 431999 ESTABLISHED src=192.0.2.2 dst=192.0.2.1 sport=40000 dport=25 src=198.51.100.2 dst=192.0.2.2 sport=25 dport=40000 [ASSURED] mark=0 use=1
tcp      6 118 TIME_WAIT src=192.0.2.2 dst=192.0.2.1 sport=40001 dport=25 src=198.51.100.2 dst=192.0.2.2 sport=25 dport=40001 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=192.0.2.2 dst=198.51.100.2 sport=40002 dport=25 src=198.51.100.2 dst=192.0.2.2 sport=25 dport=40002 [ASSURED] mark=0 use=1
udp      17 29 src=10.0.0.5 dst=203.0.113.9 sport=5000 dport=53 [UNREPLIED] src=203.0.113.9 dst=192.0.2.1 sport=53 dport=5000 mark=0 use=1
tcp      6 300 ESTABLISHED src=2001:db8:1::2 dst=2001:db8:1::1 sport=1 dport=8080 src=2001:db8:2::2 dst=2001:db8:1::2 sport=8080 dport=1 mark=0 use=1
";

    fn dnat(ext: &str, int: &str, ports: &str) -> Matcher {
        Matcher::Forward {
            proto: Proto::Tcp,
            orig_dst: Some(ext.parse().unwrap()),
            ports: ports.parse().unwrap(),
            targets: vec![int.parse().unwrap()],
        }
    }

    #[test]
    fn open_translated_connections_are_counted_per_rule() {
        let matchers = [
            (1, dnat("192.0.2.1", "198.51.100.2", "25,465")),
            (2, dnat("192.0.2.1", "198.51.100.2", "80")),
            (
                3,
                Matcher::Snat {
                    source: Network::parse_field("source", "10.0.0.0/24").unwrap(),
                    to: "192.0.2.1".parse().unwrap(),
                },
            ),
            (4, dnat("2001:db8:1::1", "2001:db8:2::2", "8080")),
        ];
        let counts = count_in(LISTING, &matchers);
        // Rule 1: the ESTABLISHED one; not the TIME_WAIT one, not the
        // connection made straight to the server (no DNAT).
        assert_eq!(counts[&1], 1);
        assert_eq!(counts[&2], 0);
        assert_eq!(counts[&3], 1);
        assert_eq!(counts[&4], 1);
    }

    #[test]
    fn lines_that_are_not_entries_are_skipped() {
        assert_eq!(
            parse("conntrack v1.4.7: 3 flow entries have been shown."),
            None
        );
        assert_eq!(parse(""), None);
        let e = parse(LISTING.lines().next().unwrap()).unwrap();
        assert_eq!(e.state, Some("ESTABLISHED"));
        assert_eq!(e.orig_dport, Some(25));
    }
}
