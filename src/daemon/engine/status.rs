//! `status` and per-rule counters: reading the kernel and the host, never
//! changing them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;

use crate::firewall::iptables::exec::Netfilter;
use crate::firewall::iptables::saved::SavedTables;
use crate::model::{Family, Proto, RuleId, RuleSpec};
use crate::proto::{Counters, DockerStatus, LastRepair, OpenFiles, RuleStatus, StatusReport};

use super::super::{fds, host, reserve};
use super::Engine;

impl Engine {
    pub(super) fn status(&self) -> StatusReport {
        let mut rules: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut inactive = 0;
        for rule in &self.state.rules {
            let view = self.view(rule);
            let status = match view.status {
                RuleStatus::Active => "active",
                RuleStatus::PortConflict => "port_conflict",
                RuleStatus::Unavailable => "unavailable",
                RuleStatus::Down => "down",
                RuleStatus::Stale => "stale",
                RuleStatus::WaitingForAddress => "waiting_for_address",
                RuleStatus::Unknown => "unknown",
                RuleStatus::Quarantined => "quarantined",
                RuleStatus::WaitingForInterface => "waiting_for_interface",
            };
            // Installed, waiting for its interface: said below, not inactive.
            if !matches!(
                view.status,
                RuleStatus::Active | RuleStatus::WaitingForInterface
            ) {
                inactive += 1;
            }
            *rules
                .entry(rule.spec.kind().to_owned())
                .or_default()
                .entry(status.to_owned())
                .or_default() += 1;
        }
        let mut problems = Vec::new();
        let forwarding = host::ipv4_forwarding();
        let forwards = self
            .state
            .rules
            .iter()
            .any(|r| !matches!(r.spec, RuleSpec::Snat(_)));
        if forwards && forwarding == Some(false) {
            problems.push(
                "net.ipv4.ip_forward is 0: forwarded traffic is dropped (run `lab-ops natmap fwd`)"
                    .into(),
            );
        }
        if inactive > 0 {
            problems.push(format!(
                "{inactive} rule(s) are not active (see `lab-ops natmap ls`)"
            ));
        }
        let has_docker_rules = self
            .state
            .rules
            .iter()
            .any(|r| matches!(&r.spec, RuleSpec::Docker(d) if !d.external));
        if has_docker_rules && self.docker.is_none() {
            problems.push(format!(
                "Docker is unreachable ({}); mappings keep their last targets",
                self.docker_error
            ));
        }
        if let Some(corrupt) = &self.state_warning {
            problems.push(corrupt.clone());
        }
        problems.extend(self.quarantine_problems(&mut rules));
        problems.extend(
            self.convergence
                .iter()
                .filter_map(|c| c.problem().map(str::to_owned)),
        );
        problems.extend(self.dropped_snat_problems());
        let mut conflicts = self.conflicts();
        let discovery = self.discovery_problems();
        conflicts.extend(discovery.iter().filter(|p| p.contains("conflict")).cloned());
        problems.extend(discovery.into_iter().filter(|p| !p.contains("conflict")));
        let mut warnings = Vec::new();
        if self.discovery.config.enabled && self.discovery.config.preserve_src_ip {
            let (note, no_replies) = self.preserve_src_ip_check();
            if no_replies {
                problems.push(format!(
                    "preserve_src_ip: no forwarded connection to a remote node saw a reply; \
                     check the service nodes' policy routes ({note})"
                ));
            }
            warnings.push(note);
        }
        warnings.extend(self.waiting_warnings());
        for (engine, _) in self.discovery.connected.iter().filter(|(_, ok)| **ok) {
            warnings.push(format!("auto-discover engine {engine} connected"));
        }
        if !conflicts.is_empty() {
            problems.push(format!("{} port conflict(s)", conflicts.len()));
        }
        let open_files = open_files(&mut problems);
        StatusReport {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            backend: self.backend.clone(),
            ipv6_nat: self.v6_nat,
            ipv4_forwarding: forwarding,
            docker: DockerStatus {
                reachable: self.docker.is_some(),
                error: self.docker.is_none().then(|| self.docker_error.clone()),
            },
            rules,
            repairs: self.repairs,
            last_repair: self.last_repair.as_ref().map(|(at, reasons)| LastRepair {
                secs_ago: at.elapsed().as_secs(),
                reasons: reasons.clone(),
            }),
            conflicts,
            problems,
            warnings,
            open_files,
        }
    }

    /// One problem per quarantined state file entry (the first few), and
    /// their count by kind in `rules`.
    fn quarantine_problems(
        &self,
        rules: &mut BTreeMap<String, BTreeMap<String, usize>>,
    ) -> Vec<String> {
        const SHOWN: usize = 5;
        let quarantined = &self.state.quarantined;
        for q in quarantined {
            let kind = q.rule.as_ref().map_or("unreadable", |r| r.spec.kind());
            *rules
                .entry(kind.to_owned())
                .or_default()
                .entry("quarantined".to_owned())
                .or_default() += 1;
        }
        let mut problems: Vec<String> = quarantined
            .iter()
            .take(SHOWN)
            .map(|q| match q.id {
                Some(id) => format!("rule #{id}: {}", super::quarantine_detail(q)),
                None => super::quarantine_detail(q),
            })
            .collect();
        if quarantined.len() > SHOWN {
            problems.push(format!(
                "{} more quarantined state file entries (see `lab-ops natmap ls`)",
                quarantined.len() - SHOWN
            ));
        }
        problems
    }

    /// Whether forwarded traffic of `family` is dropped unless a rule
    /// accepts it: the `FORWARD` policy is `DROP` and `FORWARD` has no
    /// unconditional `-j ACCEPT`. Unknown (no dump) counts as not dropped.
    pub(super) fn forward_drops(&self, family: Family) -> bool {
        let Ok(text) = self.nf.save(family) else {
            return false;
        };
        let saved = SavedTables::parse(&text);
        saved.policy("filter", "FORWARD") == Some("DROP")
            && !saved
                .chain_rules("filter", "FORWARD")
                .iter()
                .any(|l| l == "-j ACCEPT")
    }

    /// `snat` rules without `--forward` on a host that drops forwarded
    /// traffic: their traffic never leaves (one `iptables-save` per family).
    fn dropped_snat_problems(&self) -> Vec<String> {
        let mut drops: HashMap<Family, bool> = HashMap::new();
        let mut found = Vec::new();
        for rule in &self.state.rules {
            let RuleSpec::Snat(s) = &rule.spec else {
                continue;
            };
            let family = s.ext_ip.family();
            if !s.forward
                && *drops
                    .entry(family)
                    .or_insert_with(|| self.forward_drops(family))
            {
                found.push(format!(
                    "snat rule #{}: {}",
                    rule.id,
                    super::batch::snat_dropped_note(s)
                ));
            }
        }
        found
    }

    /// Installed rules whose interface does not exist yet.
    fn waiting_warnings(&self) -> Vec<String> {
        self.state
            .rules
            .iter()
            .map(|r| (r.id, self.view(r)))
            .filter(|(_, v)| v.status == RuleStatus::WaitingForInterface)
            .map(|(id, v)| {
                format!(
                    "rule #{id} is waiting for its interface: {}",
                    v.detail.unwrap_or_default()
                )
            })
            .collect()
    }

    /// With `preserve_src_ip`, a service node must route replies back
    /// through this host. What can be checked from here: whether forwarded
    /// connections to remote nodes saw replies (conntrack ASSURED).
    fn preserve_src_ip_check(&self) -> (String, bool) {
        let nodes: HashSet<String> = self
            .state
            .rules
            .iter()
            .filter_map(|r| match &r.spec {
                RuleSpec::Docker(d)
                    if d.auto.as_ref().is_some_and(|a| !a.masquerade) && d.external =>
                {
                    d.target_v4.map(|t| t.ip.to_string())
                }
                _ => None,
            })
            .collect();
        let (mut total, mut assured) = (0, 0);
        for node in &nodes {
            if let Ok(out) = std::process::Command::new("conntrack")
                .args(["-L", "-p", "tcp", "--reply-src", node])
                .stderr(std::process::Stdio::null())
                .output()
            {
                let text = String::from_utf8_lossy(&out.stdout);
                total += text.lines().count();
                assured += text.lines().filter(|l| l.contains("ASSURED")).count();
            }
        }
        (
            format!(
                "preserve_src_ip is on: service nodes must send replies back through this host \
                 (lab-ops natmap policy-route on each node); {assured} of {total} forwarded connections \
                 to remote nodes saw replies (conntrack ASSURED)"
            ),
            total > 0 && assured == 0,
        )
    }

    /// Ports natmap forwards that another tool also claims: Docker's own
    /// `-p` publishing (a DNAT in Docker's chain; natmap's jump comes first,
    /// so natmap wins) and other processes listening on the port.
    fn conflicts(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut claims: Vec<(Proto, u16)> = Vec::new();
        for held in self.held.values() {
            for r in held {
                claims.push((r.claim.proto, r.claim.bind.port()));
            }
        }
        if claims.is_empty() {
            return found;
        }
        // The drift check reads the tables every tick; a save of its own
        // here cost `status` most of its time at large N (0.7 s at 20,000).
        let fresh;
        let published = match &self.docker_published {
            Some(ports) => Some(ports),
            None => {
                fresh = self
                    .nf
                    .save(Family::V4)
                    .ok()
                    .map(|s| docker_published_ports(&SavedTables::parse(&s)));
                fresh.as_ref()
            }
        };
        for (proto, port) in claims
            .iter()
            .filter(|c| published.as_ref().is_some_and(|p| p.contains(c)))
        {
            found.push(format!(
                "port {port}/{proto} is also published by Docker (`docker run -p`); natmap's rule wins, remove one of them"
            ));
        }
        let mine = own_socket_inodes();
        let ports: Vec<(Proto, u16)> = claims
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for ((proto, port), owner) in reserve::other_holders(&ports, &mine) {
            found.push(format!(
                "port {port}/{proto} is also open in {owner} on another address"
            ));
        }
        found.sort();
        found.dedup();
        found
    }

    /// Adds kernel counters to the views of `ls -v`: one `iptables-save -c`
    /// per family, matched to rules by their comment.
    pub(super) fn counters(&self) -> HashMap<RuleId, Counters> {
        read_counters(&*self.nf, &self.families())
    }
}

/// Per-rule counters from one `iptables-save -c` per family. Needs no
/// engine state, so a metrics scrape runs it off the engine thread.
pub(super) fn read_counters(nf: &dyn Netfilter, families: &[Family]) -> HashMap<RuleId, Counters> {
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
/// The daemon's descriptors against its limit; a problem once the reserve
/// is being used (changes that reserve ports are then refused).
fn open_files(problems: &mut Vec<String>) -> Option<OpenFiles> {
    let now = fds::usage().ok()?;
    if now.open + fds::reserve() > now.limit {
        problems.push(format!(
            "{} of {} open files used (LimitNOFILE): new ports are refused; raise the limit",
            now.open, now.limit
        ));
    }
    Some(OpenFiles {
        open: now.open,
        limit: now.limit,
        reserve: fds::reserve(),
    })
}

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

/// Inodes of the sockets this process holds (its reservations).
fn own_socket_inodes() -> HashSet<String> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if link.starts_with("socket:[") {
                    inodes.insert(link);
                }
            }
        }
    }
    inodes
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
