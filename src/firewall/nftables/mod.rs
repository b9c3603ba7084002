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

use crate::firewall::{
    Desired, Drift, FirewallDriver, FirewallError, Mode, ReadCounters, RuleChange,
};
use crate::model::{Family, Proto, RuleId};
use crate::proto::Counters;

use docker_user::Accept;
use exec::{Nft, NftExecutor, TableSummary};
use marks::Marks;
use render::{Element, Elements, Shared};

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
    /// Per family: the applied elements more than one rule renders, so a
    /// [`RuleChange`] knows which of its rule's elements stay.
    shared: [Shared; 2],
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
            shared: [Shared::new(), Shared::new()],
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
        render::elements(desired.rules(), family).map_err(incompatible)
    }

    /// What `change` does to `family`'s elements, given the rules applied.
    fn plan(
        &self,
        rules: &Desired,
        change: &RuleChange,
        family: Family,
    ) -> Result<ElementPlan, FirewallError> {
        let i = index(family);
        // How many more (or fewer) rules render each element afterwards.
        let mut delta: HashMap<Element, i64> = HashMap::new();
        let replaced = change.put.iter().map(|r| r.id);
        for id in change.remove.iter().copied().chain(replaced) {
            if let Some(old) = rules.rule(id) {
                for e in render::of_rule(old, family).map_err(incompatible)? {
                    *delta.entry(e).or_insert(0) -= 1;
                }
            }
        }
        for rule in &change.put {
            for e in render::of_rule(rule, family).map_err(incompatible)? {
                *delta.entry(e).or_insert(0) += 1;
            }
        }
        let mut plan = ElementPlan {
            family,
            gone: Elements::new(),
            new: Elements::new(),
            counts: Vec::new(),
        };
        for (e, d) in delta {
            if d == 0 {
                continue;
            }
            let now = if self.applied[i].contains(&e) {
                1 + i64::from(self.shared[i].get(&e).copied().unwrap_or(0))
            } else {
                0
            };
            let after = (now + d).max(0);
            if now == 0 && after > 0 {
                plan.new.insert(e.clone());
            }
            if now > 0 && after == 0 {
                plan.gone.insert(e.clone());
            }
            plan.counts
                .push((e, u32::try_from(after).unwrap_or(u32::MAX)));
        }
        Ok(plan)
    }

    /// Records a plan the kernel took.
    fn took(&mut self, plan: ElementPlan) {
        let i = index(plan.family);
        for (e, count) in plan.counts {
            match count {
                0 => {
                    self.applied[i].remove(&e);
                    self.shared[i].remove(&e);
                }
                1 => {
                    self.shared[i].remove(&e);
                    self.applied[i].insert(e);
                }
                n => {
                    self.applied[i].insert(e.clone());
                    self.shared[i].insert(e, n - 1);
                }
            }
        }
    }

    /// `change` made to the rules applied, installed as a whole table per
    /// family (a table that is not known good, or refused an element change).
    fn apply_whole(
        &mut self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<(), FirewallError> {
        let next = self
            .applied_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .with(change);
        self.apply(&next, families, Mode::Full)
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
            let counted = render::counted(desired.rules(), family).map_err(incompatible)?;
            wanted.push((family, counted));
        }
        let mut done: Vec<(Family, Elements, Shared)> = Vec::new();
        for (family, (elements, shared)) in wanted {
            let i = index(family);
            if self.table_ok[i] && self.applied[i] == elements {
                self.shared[i] = shared;
                continue;
            }
            let before = (family, self.applied[i].clone(), self.shared[i].clone());
            let result = if self.table_ok[i] && mode == Mode::Change {
                self.change(family, elements)
            } else {
                self.full_apply(family, elements)
            };
            if let Err(e) = result {
                for (f, previous, shared) in done.into_iter().rev() {
                    self.shared[index(f)] = shared;
                    if let Err(again) = self.full_apply(f, previous) {
                        tracing::error!("rollback of {f} nftables table failed: {again}");
                        self.table_ok[index(f)] = false;
                    }
                }
                return Err(e);
            }
            self.shared[i] = shared;
            done.push(before);
        }
        let mut rules = self.applied_rules.lock().unwrap_or_else(|p| p.into_inner());
        rules.clone_from(desired);
        Ok(())
    }

    fn apply_change(
        &mut self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<(), FirewallError> {
        if families.iter().any(|f| !self.table_ok[index(*f)]) {
            return self.apply_whole(change, families);
        }
        // Every family is planned first: an unsupported rule changes nothing.
        let plans = {
            let rules = self.applied_rules.lock().unwrap_or_else(|p| p.into_inner());
            families
                .iter()
                .map(|&f| self.plan(&rules, change, f))
                .collect::<Result<Vec<_>, _>>()?
        };
        let mut done: Vec<&ElementPlan> = Vec::new();
        for plan in &plans {
            if plan.gone.is_empty() && plan.new.is_empty() {
                continue;
            }
            let sent = self
                .exec
                .elements(plan.family, &render::netlink_changes(&plan.gone, &plan.new));
            if let Err(e) = sent {
                for p in done.into_iter().rev() {
                    let back = render::netlink_changes(&p.new, &p.gone);
                    if let Err(again) = self.exec.elements(p.family, &back) {
                        tracing::error!(
                            "rollback of {} nftables elements failed: {again}",
                            p.family
                        );
                        self.table_ok[index(p.family)] = false;
                    }
                }
                tracing::warn!(
                    "nftables {} element change refused ({e}); rebuilding natmap's table",
                    plan.family
                );
                return self.apply_whole(change, families);
            }
            done.push(plan);
        }
        for plan in plans {
            self.took(plan);
        }
        self.applied_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .change(change);
        Ok(())
    }

    fn preview_change(
        &self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        let rules = self.applied_rules.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for &family in families {
            let plan = self.plan(&rules, change, family)?;
            out.extend(render::changes_text(family, &plan.gone, &plan.new).map(|t| (family, t)));
        }
        Ok(out)
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
            self.shared[index(family)].clear();
            self.table_ok[index(family)] = false;
            if let Err(e) = self.exec.remove_accept(family) {
                tracing::warn!("cannot take natmap's accept out of {family} DOCKER-USER: {e}");
            }
        }
        // The engine tears down every family it uses: no rule is applied.
        *self.applied_rules.lock().unwrap_or_else(|p| p.into_inner()) = Desired::default();
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

    fn forward_drops(&self, family: Family) -> bool {
        // natmap's table accepts nothing another filter drops: iptables'
        // FORWARD policy decides, as on the iptables backend.
        docker_user::forward_drops(family)
    }

    fn docker_published_ports(&self) -> Option<HashSet<(Proto, u16)>> {
        None
    }
}

/// What a [`RuleChange`] does to one family's elements.
struct ElementPlan {
    family: Family,
    /// Elements no rule renders any more.
    gone: Elements,
    /// Elements no rule rendered before.
    new: Elements,
    /// Every element whose number of rendering rules changes, with the new
    /// number.
    counts: Vec<(Element, u32)>,
}

/// An unsupported rule as the driver's error.
fn incompatible(u: render::Unsupported) -> FirewallError {
    FirewallError::Incompatible(format!(
        "rule {}: {} (not supported by the nftables backend yet; run the daemon with \
         --backend iptables)",
        u.id, u.what
    ))
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

    /// `dnat` of `port` on `ext` to 198.51.100.2, port kept.
    fn dnat_on(id: u64, ext: &str, port: u16) -> Rule {
        let mut rule = dnat(id, port);
        if let RuleSpec::Dnat(d) = &mut rule.spec {
            d.ext_ip = ext.parse().unwrap();
        }
        rule
    }

    fn change(put: Vec<Rule>, remove: Vec<u64>) -> RuleChange {
        RuleChange { put, remove }
    }

    #[test]
    fn a_rule_change_sends_its_own_elements_and_keeps_the_mirror_whole() {
        let (mut d, rec) = started();
        let before = rec.sent.lock().unwrap().len();
        // Two mappings to one target port share its forwarding counter.
        d.apply_change(&change(vec![dnat_on(1, "192.0.2.1", 25)], vec![]), &ALL)
            .unwrap();
        d.apply_change(&change(vec![dnat_on(2, "192.0.2.7", 25)], vec![]), &ALL)
            .unwrap();
        let sent = rec.sent.lock().unwrap()[before..].to_vec();
        assert_eq!(
            sent,
            [
                "netlink ipv4 add dnat_port x1",
                "netlink ipv4 add fwd_port x1",
                "netlink ipv4 add dnat_port x1",
            ],
            "the second mapping adds its dnat element only: the counter is there"
        );
        // Taking the first out leaves the counter the second still renders.
        d.apply_change(&change(vec![], vec![1]), &ALL).unwrap();
        assert_eq!(
            rec.sent.lock().unwrap().last().unwrap(),
            "netlink ipv4 delete dnat_port x1"
        );
        // The last one takes it with it.
        d.apply_change(&change(vec![], vec![2]), &ALL).unwrap();
        let sent = rec.sent.lock().unwrap();
        assert_eq!(
            sent[sent.len() - 2..],
            [
                "netlink ipv4 delete dnat_port x1",
                "netlink ipv4 delete fwd_port x1"
            ]
        );
        drop(sent);
        // What the changes left is what a whole apply of no rules finds.
        assert!(d.applied[0].is_empty() && d.shared[0].is_empty());
        let n = rec.sent.lock().unwrap().len();
        d.apply(&Desired::default(), &ALL, Mode::Change).unwrap();
        assert_eq!(rec.sent.lock().unwrap().len(), n, "nothing left to send");
    }

    #[test]
    fn a_replaced_rule_swaps_its_elements_and_a_refused_change_rebuilds() {
        let (mut d, rec) = started();
        d.apply_change(&change(vec![dnat(1, 25)], vec![]), &ALL)
            .unwrap();
        let moved = dnat_on(1, "192.0.2.9", 25);
        d.apply_change(&change(vec![moved.clone()], vec![]), &ALL)
            .unwrap();
        assert_eq!(
            *rec.sent.lock().unwrap().last().unwrap(),
            "netlink ipv4 add dnat_port x1",
            "the old element out, the new one in: {:?}",
            rec.sent.lock().unwrap()
        );
        let mirror = d.applied_rules.lock().unwrap().clone();
        assert_eq!(mirror.rules(), std::slice::from_ref(&moved));
        // Refused (someone changed the table): rebuilt whole, with the change.
        *rec.fail_next.lock().unwrap() = 1;
        d.apply_change(&change(vec![dnat(2, 26)], vec![]), &ALL)
            .unwrap();
        let last = rec.sent.lock().unwrap().last().unwrap().clone();
        assert!(last.starts_with("add table ip natmap\n"), "{last}");
        assert!(
            last.contains("192.0.2.9 . tcp . 25") && last.contains("192.0.2.1 . tcp . 26"),
            "{last}"
        );
        let preview = d.preview_change(&change(vec![], vec![2]), &ALL).unwrap();
        assert_eq!(preview.len(), 1, "{preview:?}");
        assert!(
            preview[0]
                .1
                .starts_with("delete element ip natmap dnat_port"),
            "{preview:?}"
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
