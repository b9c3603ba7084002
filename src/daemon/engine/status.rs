//! `status` and per-rule counters: reading the kernel and the host, never
//! changing them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;

use crate::model::{Family, Proto, RuleId, RuleSpec};
use crate::proto::{Counters, DockerStatus, LastRepair, OpenFiles, RuleStatus, StatusReport};

use super::super::{fds, host, reserve};
use super::Engine;

impl Engine {
    pub(super) fn status(&self) -> StatusReport {
        let (mut rules, inactive) = self.rule_counts();
        let forwarding = host::ipv4_forwarding();
        let mut problems = self.setup_problems(forwarding, inactive);
        problems.extend(self.quarantine_problems(&mut rules));
        problems.extend(
            self.upkeep
                .convergence
                .iter()
                .filter_map(|c| c.problem().map(str::to_owned)),
        );
        problems.extend(self.dropped_snat_problems());
        let mut conflicts = self.conflicts();
        let discovery = self.discovery_problems();
        conflicts.extend(discovery.iter().filter(|p| p.contains("conflict")).cloned());
        problems.extend(discovery.into_iter().filter(|p| !p.contains("conflict")));
        let warnings = self.status_warnings(&mut problems);
        if !conflicts.is_empty() {
            problems.push(format!("{} port conflict(s)", conflicts.len()));
        }
        let open_files = open_files(&mut problems);
        StatusReport {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.upkeep.started.elapsed().as_secs(),
            backend: self.fw().backend(),
            firewall: self.fw().name().to_owned(),
            ipv6_nat: self.host.v6_nat,
            ipv4_forwarding: forwarding,
            docker: DockerStatus {
                reachable: self.docker.client.is_some(),
                error: self
                    .docker
                    .client
                    .is_none()
                    .then(|| self.docker.error.clone()),
            },
            rules,
            repairs: self.upkeep.repairs,
            last_repair: self
                .upkeep
                .last_repair
                .as_ref()
                .map(|(at, reasons)| LastRepair {
                    secs_ago: at.elapsed().as_secs(),
                    reasons: reasons.clone(),
                }),
            conflicts,
            problems,
            warnings,
            open_files,
        }
    }

    /// The rules counted by kind and status, and how many are not active.
    fn rule_counts(&self) -> (BTreeMap<String, BTreeMap<String, usize>>, usize) {
        let mut rules: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut inactive = 0;
        for rule in &self.state.rules {
            let view = self.view(rule);
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
                .entry(view.status.as_str().to_owned())
                .or_default() += 1;
        }
        (rules, inactive)
    }

    /// Problems of the setup around the rules: forwarding off, rules not
    /// active, Docker away, a corrupt state file.
    fn setup_problems(&self, forwarding: Option<bool>, inactive: usize) -> Vec<String> {
        let mut problems = Vec::new();
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
        if has_docker_rules && self.docker.client.is_none() {
            problems.push(format!(
                "Docker is unreachable ({}); mappings keep their last targets",
                self.docker.error
            ));
        }
        if let Some(corrupt) = &self.persist.warning {
            problems.push(corrupt.clone());
        }
        problems
    }

    /// The warnings of `status`: preserve_src_ip's check (a problem too
    /// when no reply was seen), rules waiting, engines connected.
    fn status_warnings(&self, problems: &mut Vec<String>) -> Vec<String> {
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
        warnings
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
    /// accepts it (see [`crate::firewall::FirewallDriver::forward_drops`]).
    pub(super) fn forward_drops(&self, family: Family) -> bool {
        self.fw().forward_drops(family)
    }

    /// `snat` rules without `--forward` on a host that drops forwarded
    /// traffic: their traffic never leaves (one firewall read per family).
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
        for (_, held) in self.ports.held.iter() {
            for r in held {
                claims.push((r.claim.proto, r.claim.bind.port()));
            }
        }
        if claims.is_empty() {
            return found;
        }
        let published = self.fw().docker_published_ports();
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

    /// Kernel counters for the views of `ls -v`, by rule id.
    pub(super) fn counters(&self) -> HashMap<RuleId, Counters> {
        self.fw().counter_reader().read(&self.families())
    }
}

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
