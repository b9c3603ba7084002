//! The native nftables driver: natmap's own tables (`table ip natmap`,
//! `table ip6 natmap`), where one rule per hook and kind serves every
//! mapping through maps keyed `daddr . l4proto . dport`, so adding or
//! removing a mapping is an element change.
//!
//! # Layout
//! - [`render`]: pure, rules → map elements, the table text, element diffs;
//! - [`exec`]: running `nft -f -` (stdin, never a shell) for whole tables,
//!   counting the kernel's table for drift and element changes over
//!   [`netlink`] (no process per change or check; counters still read
//!   with `nft -j list table`);
//! - [`events`]: the watcher of nf_tables notifications (drift by events);
//! - this file: [`NftablesDriver`], the [`FirewallDriver`] over them, and
//!   its mirror of the elements it applied.
//!
//! One table per family rather than one `inet` table: the driver seam
//! applies, checks and tears down per family, and a host without IPv6 NAT
//! keeps its IPv4 table (an `inet` nat chain would also need kernel ≥ 5.2).
//!
//! Beside Docker (see [`marks`]): natmap marks the connections it
//! translates (`ct mark`) and keeps one accept for that mark first in
//! `DOCKER-USER` ([`docker_user`], Docker ≤ 28 on iptables), and marks
//! their forwarded packets (`meta mark`) for Docker 29's nftables backend
//! (`dockerd --bridge-accept-fwmark`).
//!
//! Counters: every element of the NAT maps and of `fwd_count` carries a
//! counter; [`NftCounters`] reads them back per rule.
//!
//! Drift: [`events`] watches nf_tables notifications and reports changes
//! of natmap's tables and `DOCKER-USER` made by anyone else; the engine
//! then runs [`FirewallDriver::drift`] and repairs at once.
//!
//! Not done yet: snat on every interface (`--ext-if +`, nft has no
//! wildcard for it).

pub mod docker_user;
pub mod events;
pub mod exec;
pub mod marks;
pub mod netlink;
pub mod render;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::firewall::{Desired, Drift, FirewallDriver, FirewallError, Mode, ReadCounters};
use crate::model::{Family, Proto, RuleId};
use crate::proto::Counters;

use docker_user::Accept;
use exec::{Nft, NftExecutor, TableSummary};
use marks::Marks;
use render::Elements;

fn index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// The nftables driver and its mirror of what it applied.
pub struct NftablesDriver {
    exec: Arc<dyn Nft>,
    marks: Marks,
    /// Per family: the elements the kernel holds, as far as natmap knows.
    applied: [Elements; 2],
    /// The rules last applied, for the counter reader to find which rule
    /// each counted element counts for (rendered when counters are read,
    /// not on every change).
    applied_rules: Arc<Mutex<Desired>>,
    /// Per family: the table is known to be in place with its chains.
    table_ok: [bool; 2],
    /// Per family: the last drift check found the table itself changed
    /// (not only the `DOCKER-USER` accept missing).
    table_drift: [bool; 2],
    /// Whether natmap's tables should exist.
    installed: bool,
}

impl NftablesDriver {
    /// A driver over `exec` with the default marks, knowing nothing of the
    /// kernel yet.
    pub fn new(exec: Arc<dyn Nft>) -> NftablesDriver {
        NftablesDriver::with_marks(exec, Marks::default())
    }

    /// A driver over `exec` marking with `marks`.
    pub fn with_marks(exec: Arc<dyn Nft>, marks: Marks) -> NftablesDriver {
        NftablesDriver {
            exec,
            marks,
            applied: [Elements::new(), Elements::new()],
            applied_rules: Arc::default(),
            table_ok: [false; 2],
            table_drift: [false; 2],
            installed: false,
        }
    }

    /// The driver over the `nft` on `PATH`, once it is known to run.
    pub fn detect(marks: Marks) -> Result<NftablesDriver, FirewallError> {
        let exec = NftExecutor::new();
        exec.version().map_err(|e| match e {
            FirewallError::Unavailable { program, message }
            | FirewallError::Refused { program, message }
            | FirewallError::Locked { program, message } => FirewallError::Unavailable {
                program,
                message: format!(
                    "{message}\n--backend nftables needs nft: apt-get install nftables"
                ),
            },
            other => other,
        })?;
        Ok(NftablesDriver::with_marks(Arc::new(exec), marks))
    }

    fn desired(desired: &Desired, family: Family) -> Result<Elements, FirewallError> {
        render::elements(desired.rules(), family).map_err(|u| {
            FirewallError::Incompatible(format!(
                "rule {}: {} (not supported by the nftables backend yet; run the daemon with \
                 --backend iptables)",
                u.id, u.what
            ))
        })
    }

    fn full_apply(&mut self, family: Family, wanted: Elements) -> Result<(), FirewallError> {
        self.exec.run(&render::full(family, &wanted, &self.marks))?;
        self.applied[index(family)] = wanted;
        self.table_ok[index(family)] = true;
        self.installed = true;
        self.ensure_accept(family);
        Ok(())
    }

    /// A repair's rebuild: the table with its chains and empty maps
    /// through `nft -f -`, then every element in one netlink batch. `nft`
    /// parsing the elements took 0.22 s of a repair at 1,000 mappings
    /// (the batch takes milliseconds). The table is broken already when
    /// this runs, so the moment its maps are empty costs nothing; a
    /// refused batch rebuilds it whole through `nft`.
    fn rebuild(&mut self, family: Family, wanted: Elements) -> Result<(), FirewallError> {
        let adds = render::netlink_diff(&Elements::new(), &wanted);
        if adds.is_empty() {
            return self.full_apply(family, wanted);
        }
        self.exec
            .run(&render::full(family, &Elements::new(), &self.marks))?;
        self.table_ok[index(family)] = false;
        if let Err(e) = self.exec.elements(family, &adds) {
            tracing::debug!("{family} elements refused in a rebuild ({e}); rebuilding through nft");
            return self.full_apply(family, wanted);
        }
        self.applied[index(family)] = wanted;
        self.table_ok[index(family)] = true;
        self.installed = true;
        self.ensure_accept(family);
        Ok(())
    }

    /// natmap's accept first in `DOCKER-USER`, where the chain exists. A
    /// failure is logged, not returned: natmap's table serves, and the
    /// drift check tries again.
    fn ensure_accept(&self, family: Family) {
        match self.exec.ensure_accept(family, self.marks.ct) {
            Ok(true) => tracing::info!(
                "natmap's connmark accept ({}) put first in {family} DOCKER-USER",
                self.marks.ct
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot put natmap's connmark accept into {family} DOCKER-USER ({e}); \
                 Docker's FORWARD DROP drops natmap's forwarded traffic until it is in"
            ),
        }
    }

    /// Element changes only, one netlink batch; a refusal means someone
    /// changed the table under natmap: rebuild it whole.
    fn change(&mut self, family: Family, wanted: Elements) -> Result<(), FirewallError> {
        let changes = render::netlink_diff(&self.applied[index(family)], &wanted);
        if changes.is_empty() {
            return Ok(());
        }
        match self.exec.elements(family, &changes) {
            Ok(()) => {
                self.applied[index(family)] = wanted;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "nftables {family} element change refused ({e}); rebuilding natmap's table"
                );
                self.full_apply(family, wanted)
            }
        }
    }
}

impl FirewallDriver for NftablesDriver {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn backend(&self) -> String {
        // How it reaches the kernel: nf_tables over netlink, no iptables
        // flavor ("nft" next to "nftables" in `status` read as a typo).
        "netlink".to_owned()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<(), FirewallError> {
        // Every family is rendered first: an unsupported rule changes nothing.
        let mut wanted = Vec::new();
        for &family in families {
            wanted.push((family, Self::desired(desired, family)?));
        }
        let mut done: Vec<(Family, Elements, bool)> = Vec::new();
        for (family, elements) in wanted {
            let i = index(family);
            if self.table_ok[i] && self.applied[i] == elements {
                continue;
            }
            let before = (family, self.applied[i].clone(), self.table_ok[i]);
            let result = if self.table_ok[i] && mode == Mode::Change {
                self.change(family, elements)
            } else {
                self.full_apply(family, elements)
            };
            if let Err(e) = result {
                for (f, previous, _) in done.into_iter().rev() {
                    if let Err(again) = self.full_apply(f, previous) {
                        tracing::error!("rollback of {f} nftables table failed: {again}");
                        self.table_ok[index(f)] = false;
                    }
                }
                return Err(e);
            }
            done.push(before);
        }
        let mut rules = self.applied_rules.lock().unwrap_or_else(|p| p.into_inner());
        rules.clone_from(desired);
        Ok(())
    }

    fn forget(&mut self) {
        self.table_ok = [false; 2];
    }

    fn preview(
        &self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        let mut out = Vec::new();
        for &family in families {
            let wanted = Self::desired(desired, family)?;
            let i = index(family);
            let text = if mode == Mode::Change && self.table_ok[i] {
                render::diff(family, &self.applied[i], &wanted)
            } else {
                Some(render::full(family, &wanted, &self.marks))
            };
            out.extend(text.map(|t| (family, t)));
        }
        Ok(out)
    }

    fn program(&self, _family: Family) -> String {
        "nft -f -".to_owned()
    }

    fn teardown(&mut self, families: &[Family]) -> Result<(), FirewallError> {
        for &family in families {
            self.exec.run(&render::teardown(family))?;
            self.applied[index(family)].clear();
            self.table_ok[index(family)] = false;
            if let Err(e) = self.exec.remove_accept(family) {
                tracing::warn!("cannot take natmap's accept out of {family} DOCKER-USER: {e}");
            }
        }
        self.installed = false;
        Ok(())
    }

    fn preview_teardown(&self, family: Family) -> Result<String, FirewallError> {
        Ok(render::teardown(family))
    }

    fn installed(&self) -> bool {
        self.installed
    }

    fn drift(&mut self, family: Family) -> Result<Drift, FirewallError> {
        let summary = self.exec.summary(family)?;
        let mut reasons = summary.differences(&self.applied[index(family)], &self.marks);
        self.table_drift[index(family)] = !reasons.is_empty();
        let mut fingerprint = summary.fingerprint();
        let accept = self.exec.accept_state(family, self.marks.ct)?;
        // Docker created DOCKER-USER (it starts after natmap) or flushed
        // it: routine, logged as information after the repair.
        let accept_only = reasons.is_empty() && matches!(accept, Accept::Missing { .. });
        if let Accept::Missing { lines } = &accept {
            reasons.push(format!(
                "DOCKER-USER does not hold natmap's connmark accept ({}) first",
                self.marks.ct
            ));
            fingerprint.extend(lines.iter().cloned());
        }
        Ok(if reasons.is_empty() {
            Drift::default()
        } else {
            Drift {
                first_difference: reasons.first().cloned(),
                fingerprint,
                reasons,
                hooks_displaced_only: accept_only,
            }
        })
    }

    fn repair(&mut self, family: Family) -> Result<(), FirewallError> {
        if !self.table_drift[index(family)] && self.table_ok[index(family)] {
            return self.exec.ensure_accept(family, self.marks.ct).map(drop);
        }
        let wanted = self.applied[index(family)].clone();
        self.rebuild(family, wanted)
    }

    fn export(&self, family: Family) -> String {
        render::table(family, &self.applied[index(family)], &self.marks)
    }

    fn counter_reader(&self) -> Arc<dyn ReadCounters> {
        Arc::new(NftCounters {
            rules: self.applied_rules.clone(),
        })
    }

    fn forward_drops(&self, _family: Family) -> bool {
        // Not read by this backend yet; unknown counts as not dropped.
        false
    }

    fn docker_published_ports(&self) -> Option<HashSet<(Proto, u16)>> {
        None
    }
}

/// Per-rule counters from the element counters of natmap's tables: one
/// `nft -j list table` per family, matched to rules by rendering the rules
/// the driver last applied ([`render::rendered`]). Connections: a NAT map's element
/// counts each translated connection twice (the guard lookup and the
/// translation, see [`render::table`]); packets and bytes: `fwd_count`,
/// both directions of forwarded traffic, as the iptables backend's
/// FORWARD accepts count them.
struct NftCounters {
    rules: Arc<Mutex<Desired>>,
}

impl ReadCounters for NftCounters {
    fn read(&self, families: &[Family]) -> HashMap<RuleId, Counters> {
        let mut out: HashMap<RuleId, Counters> = HashMap::new();
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for &family in families {
            let Ok(Some(json)) = exec::list_json(family) else {
                continue;
            };
            let counted = exec::element_counters(&json);
            let Ok((_, owners)) = render::rendered(rules.rules(), family) else {
                continue;
            };
            for c in counted {
                let Some(&id) = owners.get(&(c.map, c.key)) else {
                    continue;
                };
                let entry = out.entry(id).or_default();
                if c.map.translates() {
                    entry.connections += c.packets / 2;
                } else {
                    entry.packets += c.packets;
                    entry.bytes += c.bytes;
                }
            }
        }
        out
    }
}

/// Removes natmap's nftables tables, if `nft` runs here: what a daemon on
/// the iptables backend does at start, so a state dir switched from
/// nftables leaves nothing of the old backend behind.
pub fn remove_tables() -> Result<(), FirewallError> {
    for family in Family::ALL {
        docker_user::remove(family)?;
    }
    let exec = NftExecutor::new();
    if exec.version().is_err() {
        return Ok(());
    }
    for family in Family::ALL {
        if exec.summary(family)?.exists {
            exec.run(&render::teardown(family))?;
            tracing::info!("removed natmap's nftables table of {family} (backend is iptables)");
        }
    }
    Ok(())
}

/// Reads the kernel's natmap table of `family` (for tests and tools).
pub fn read_summary(family: Family) -> Result<TableSummary, FirewallError> {
    NftExecutor::new().summary(family)
}

#[cfg(test)]
mod tests {
    //! The driver against a recording executor.

    use super::*;
    use crate::firewall::nftables::netlink::SetChange;
    use crate::model::{DnatRule, Rule, RuleSpec, SnatRule};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec {
        sent: Mutex<Vec<String>>,
        fail_next: Mutex<usize>,
        batches: Mutex<usize>,
    }

    impl Nft for Rec {
        fn run(&self, input: &str) -> Result<(), FirewallError> {
            let mut fail = self.fail_next.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(FirewallError::Refused {
                    program: "nft".into(),
                    message: "No such file or directory".into(),
                });
            }
            self.sent.lock().unwrap().push(input.to_owned());
            Ok(())
        }
        fn summary(&self, _: Family) -> Result<TableSummary, FirewallError> {
            Ok(TableSummary::default())
        }
        fn accept_state(
            &self,
            _: Family,
            _: marks::Mark,
        ) -> Result<docker_user::Accept, FirewallError> {
            Ok(docker_user::Accept::NoChain)
        }
        fn ensure_accept(&self, _: Family, _: marks::Mark) -> Result<bool, FirewallError> {
            Ok(false)
        }
        fn remove_accept(&self, _: Family) -> Result<(), FirewallError> {
            Ok(())
        }
        fn elements(&self, family: Family, changes: &[SetChange]) -> Result<(), FirewallError> {
            let mut fail = self.fail_next.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(FirewallError::Refused {
                    program: "netlink".into(),
                    message: "No such file or directory".into(),
                });
            }
            *self.batches.lock().unwrap() += 1;
            for c in changes {
                let verb = if c.add { "add" } else { "delete" };
                self.sent.lock().unwrap().push(format!(
                    "netlink {family} {verb} {} x{}",
                    c.set,
                    c.elements.len()
                ));
            }
            Ok(())
        }
    }

    fn dnat(id: u64, port: u16) -> Rule {
        Rule {
            id,
            spec: RuleSpec::Dnat(DnatRule {
                ext_ip: "192.0.2.1".parse().unwrap(),
                int_ip: "198.51.100.2".parse().unwrap(),
                ports: crate::model::PortList::single(port),
                proto: Default::default(),
                ext_if: None,
                allow_nonlocal: false,
            }),
        }
    }

    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn started() -> (NftablesDriver, Arc<Rec>) {
        let rec = Arc::new(Rec::default());
        let mut d = NftablesDriver::new(rec.clone());
        d.apply(&Desired::default(), &ALL, Mode::Full).unwrap();
        (d, rec)
    }

    #[test]
    fn start_builds_each_table_whole_then_a_change_is_one_element() {
        let (mut d, rec) = started();
        assert_eq!(rec.sent.lock().unwrap().len(), 2);
        assert!(rec.sent.lock().unwrap()[0].contains("table ip natmap {"));
        d.apply(&Desired::new([dnat(1, 25)]), &ALL, Mode::Change)
            .unwrap();
        let sent = rec.sent.lock().unwrap();
        assert_eq!(sent.len(), 4, "one batch, IPv4 only");
        assert_eq!(sent[2], "netlink ipv4 add dnat_port x1");
        assert_eq!(sent[3], "netlink ipv4 add fwd_port x1");
        assert_eq!(
            *rec.batches.lock().unwrap(),
            1,
            "the map and its counter: one batch"
        );
    }

    #[test]
    fn a_refused_element_change_rebuilds_the_table() {
        let (mut d, rec) = started();
        *rec.fail_next.lock().unwrap() = 1;
        d.apply(&Desired::new([dnat(1, 25)]), &ALL, Mode::Change)
            .unwrap();
        let last = rec.sent.lock().unwrap().last().unwrap().clone();
        assert!(
            last.starts_with("add table ip natmap\ndelete table ip natmap\n"),
            "{last}"
        );
        assert!(
            last.contains("192.0.2.1 . tcp . 25 : 198.51.100.2"),
            "{last}"
        );
    }

    #[test]
    fn snat_on_every_interface_is_refused_naming_the_iptables_backend() {
        let (mut d, rec) = started();
        let snat = Rule {
            id: 4,
            spec: RuleSpec::Snat(SnatRule {
                source: "10.0.0.0/24".parse().unwrap(),
                ext_if: "+".parse().unwrap(),
                ext_ip: "192.0.2.1".parse().unwrap(),
                forward: false,
            }),
        };
        let before = rec.sent.lock().unwrap().len();
        let err = d
            .apply(&Desired::new([dnat(1, 25), snat]), &ALL, Mode::Change)
            .unwrap_err();
        assert!(err.to_string().contains("--backend iptables"), "{err}");
        assert!(err.to_string().contains("rule 4"), "{err}");
        assert_eq!(rec.sent.lock().unwrap().len(), before, "nothing sent");
    }
}
