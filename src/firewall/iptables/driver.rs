//! The iptables [`FirewallDriver`]: renders the desired rules into natmap's
//! chains, applies them with one `iptables-restore --noflush` per family
//! (only the difference once the hooks are known to be in place, a full
//! rewrite at start, on recovery and when a difference is refused), and
//! reads `iptables-save` for drift, counters and Docker's own ports.

use std::collections::HashSet;
use std::sync::Arc;

use crate::firewall::{
    Desired, Drift, FirewallDriver, FirewallError, Mode, ReadCounters, RuleChange,
};
use crate::model::{Family, Proto};

use super::counters::{docker_published_ports, SaveCounters};
use super::exec::{IptablesExecutor, IptablesFlavor, Netfilter};
use super::saved::SavedTables;
use super::{render, restore, Ruleset};

/// The iptables driver and its mirror of what it applied.
pub struct IptablesDriver {
    exec: Arc<dyn Netfilter>,
    /// `None` until detected (a driver that only previews never asks).
    flavor: Option<IptablesFlavor>,
    /// What the kernel holds in natmap's chains, as far as natmap knows.
    applied: Ruleset,
    /// The rules `applied` was rendered from, for a [`RuleChange`] to be
    /// made to.
    rules: Desired,
    /// Per family: hooks verified in place since the last full apply.
    hooks_ok: [bool; 2],
    /// Per family: natmap created DOCKER-USER (Docker had not), so teardown
    /// may remove it again (see `restore::teardown`).
    own_docker_user: [bool; 2],
    /// Whether natmap's chains should exist (false after a teardown until
    /// the next apply).
    installed: bool,
    /// Per family: the tables the last drift check read, for the repair
    /// that follows it (no second `iptables-save`).
    last_read: [Option<SavedTables>; 2],
    /// Ports Docker publishes itself, as of the last IPv4 `iptables-save`
    /// (`status` reads them here instead of running a save of its own).
    docker_published: Option<HashSet<(Proto, u16)>>,
    /// Per family: whether FORWARD dropped unaccepted traffic, as of the
    /// last `iptables-save` (the drift check reads one every tick).
    forward_dropped: [Option<bool>; 2],
}

fn index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl IptablesDriver {
    /// A driver over `exec`, knowing nothing of the kernel yet.
    pub fn new(exec: Arc<dyn Netfilter>) -> IptablesDriver {
        IptablesDriver {
            exec,
            flavor: None,
            applied: Ruleset::default(),
            rules: Desired::default(),
            hooks_ok: [false; 2],
            own_docker_user: [false; 2],
            installed: false,
            last_read: [None, None],
            docker_published: None,
            forward_dropped: [None, None],
        }
    }

    /// The driver over the iptables on `PATH`, once it is known to work
    /// here: which flavor it is, and that Docker's rules are not in the
    /// other one (natmap's rules would never see Docker's traffic).
    pub fn detect() -> Result<IptablesDriver, FirewallError> {
        let exec = IptablesExecutor;
        let flavor = exec.flavor().map_err(|e| match e {
            FirewallError::Unavailable { program, message }
            | FirewallError::Refused { program, message }
            | FirewallError::Locked { program, message } => FirewallError::Unavailable {
                program,
                message: format!("{message}\nnatmap needs iptables: apt-get install iptables"),
            },
            other => other,
        })?;
        tracing::info!(backend = flavor.name(), "iptables backend detected");
        if let Some(mismatch) = exec.docker_backend_mismatch(flavor) {
            return Err(FirewallError::Incompatible(mismatch));
        }
        let mut driver = IptablesDriver::new(Arc::new(exec));
        driver.flavor = Some(flavor);
        Ok(driver)
    }

    /// A fresh `iptables-save` of the family, parsed.
    fn read(&mut self, family: Family) -> Result<SavedTables, FirewallError> {
        let saved = SavedTables::parse(&self.exec.save(family)?);
        if family == Family::V4 {
            self.docker_published = Some(docker_published_ports(&saved));
        }
        self.forward_dropped[index(family)] = Some(forward_drops_in(&saved));
        Ok(saved)
    }

    /// Rewrites the family's chains and repairs its hooks, from a fresh
    /// `iptables-save`.
    fn full_apply(&mut self, family: Family, desired: &Ruleset) -> Result<(), FirewallError> {
        let saved = self.read(family)?;
        let text = restore::full(desired.family(family), &saved);
        self.exec.restore(family, &text)?;
        self.own_docker_user[index(family)] |= restore::creates_docker_user(&saved);
        *self.applied.family_mut(family) = desired.family(family).clone();
        self.hooks_ok[index(family)] = true;
        self.installed = true;
        Ok(())
    }

    /// Sends only the difference between what natmap applied and `desired`
    /// (one transaction). If the kernel refuses it, someone changed natmap's
    /// chains under it: fall back to a full rewrite from a fresh save.
    fn diff_apply(&mut self, family: Family, desired: &Ruleset) -> Result<(), FirewallError> {
        let Some(text) = restore::diff(self.applied.family(family), desired.family(family)) else {
            return Ok(());
        };
        match self.exec.restore(family, &text) {
            Ok(()) => {
                *self.applied.family_mut(family) = desired.family(family).clone();
                Ok(())
            }
            // Waiting for the xtables lock again would only double the wait.
            Err(e @ FirewallError::Locked { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(
                    "incremental {family} update refused ({e}); rewriting natmap's chains"
                );
                self.full_apply(family, desired)
            }
        }
    }

    /// One transaction per family that differs. If a later family fails,
    /// the earlier ones are put back.
    fn apply_rendered(
        &mut self,
        desired: &Ruleset,
        families: &[Family],
    ) -> Result<(), FirewallError> {
        let mut done: Vec<(Family, Ruleset)> = Vec::new();
        for &family in families {
            let ok = self.hooks_ok[index(family)];
            if ok && self.applied.family(family) == desired.family(family) {
                continue;
            }
            let before = self.applied.clone();
            let result = if ok {
                self.diff_apply(family, desired)
            } else {
                self.full_apply(family, desired)
            };
            if let Err(e) = result {
                for (f, previous) in done.into_iter().rev() {
                    if let Err(again) = self.full_apply(f, &previous) {
                        tracing::error!("rollback of {f} rules failed: {again}");
                        self.hooks_ok[index(f)] = false;
                    }
                }
                return Err(e);
            }
            done.push((family, before));
        }
        Ok(())
    }
}

impl FirewallDriver for IptablesDriver {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn backend(&self) -> String {
        self.flavor
            .map_or("unknown", IptablesFlavor::name)
            .to_owned()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<(), FirewallError> {
        let rendered = render::desired_on(desired.rules(), desired.bridges());
        match mode {
            Mode::Change => self.apply_rendered(&rendered, families)?,
            Mode::Full => {
                for &family in families {
                    if self.hooks_ok[index(family)]
                        && self.applied.family(family) == rendered.family(family)
                    {
                        continue;
                    }
                    self.full_apply(family, &rendered)?;
                }
            }
        }
        self.rules.clone_from(desired);
        Ok(())
    }

    /// The change made to the rules last applied, rendered whole: natmap's
    /// chains are diffed per shard, and `iptables-restore` reads the whole
    /// table for any change anyway, so rendering only the change would not
    /// make this backend's change flat in N.
    fn apply_change(
        &mut self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<(), FirewallError> {
        let next = self.rules.with(change);
        self.apply(&next, families, Mode::Change)
    }

    fn preview_change(
        &self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        self.preview(&self.rules.with(change), families, Mode::Change)
    }

    fn forget(&mut self) {
        self.hooks_ok = [false; 2];
    }

    fn preview(
        &self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        let desired = render::desired_on(desired.rules(), desired.bridges());
        let mut out = Vec::new();
        for &family in families {
            let (applied, wanted) = (self.applied.family(family), desired.family(family));
            let text = match mode {
                Mode::Full => {
                    let saved = SavedTables::parse(&self.exec.save(family)?);
                    Some(restore::full(wanted, &saved))
                }
                Mode::Change if self.hooks_ok[index(family)] => restore::diff(applied, wanted),
                Mode::Change if applied != wanted || !self.installed => {
                    Some(restore::rewrite_chains(wanted))
                }
                Mode::Change => None,
            };
            out.extend(text.map(|t| (family, t)));
        }
        Ok(out)
    }

    fn program(&self, family: Family) -> String {
        match family {
            Family::V4 => "iptables-restore --noflush",
            Family::V6 => "ip6tables-restore --noflush",
        }
        .to_owned()
    }

    fn teardown(&mut self, families: &[Family]) -> Result<(), FirewallError> {
        for &family in families {
            let text = self.preview_teardown(family)?;
            if !text.is_empty() {
                self.exec.restore(family, &text)?;
            }
            self.own_docker_user[index(family)] = false;
            *self.applied.family_mut(family) = Default::default();
            self.rules = Desired::default();
            self.hooks_ok[index(family)] = false;
        }
        self.installed = false;
        Ok(())
    }

    fn preview_teardown(&self, family: Family) -> Result<String, FirewallError> {
        let saved = SavedTables::parse(&self.exec.save(family)?);
        Ok(restore::teardown(
            &saved,
            self.own_docker_user[index(family)],
        ))
    }

    fn installed(&self) -> bool {
        self.installed
    }

    fn drift(&mut self, family: Family) -> Result<Drift, FirewallError> {
        let saved = self.read(family)?;
        let expected = self.applied.family(family);
        let reasons = saved.drift(expected);
        let drift = if reasons.is_empty() {
            Drift::default()
        } else {
            Drift {
                fingerprint: saved.fingerprint(),
                first_difference: saved.first_difference(expected),
                hooks_displaced_only: saved.hooks_displaced_only(expected),
                reasons,
            }
        };
        self.last_read[index(family)] = Some(saved);
        Ok(drift)
    }

    fn repair(&mut self, family: Family) -> Result<(), FirewallError> {
        let saved = match self.last_read[index(family)].take() {
            Some(saved) => saved,
            None => self.read(family)?,
        };
        let text = restore::full(self.applied.family(family), &saved);
        self.exec.restore(family, &text)?;
        self.hooks_ok[index(family)] = true;
        Ok(())
    }

    fn export(&self, family: Family) -> String {
        restore::export(self.applied.family(family))
    }

    fn counter_reader(&self) -> Arc<dyn ReadCounters> {
        Arc::new(SaveCounters::new(self.exec.clone()))
    }

    fn forward_drops(&self, family: Family) -> bool {
        // As of the last read (the drift check's, at most a tick old): a
        // save of its own cost `status` 0.6 s per family at 20,000 rules.
        if let Some(drops) = self.forward_dropped[index(family)] {
            return drops;
        }
        self.exec
            .save(family)
            .is_ok_and(|text| forward_drops_in(&SavedTables::parse(&text)))
    }

    fn docker_published_ports(&self) -> Option<HashSet<(Proto, u16)>> {
        // The drift check reads the tables every tick; a save of its own
        // here cost `status` most of its time at large N (0.7 s at 20,000).
        if let Some(ports) = &self.docker_published {
            return Some(ports.clone());
        }
        self.exec
            .save(Family::V4)
            .ok()
            .map(|s| docker_published_ports(&SavedTables::parse(&s)))
    }
}

/// Whether `saved`'s FORWARD drops what no rule accepts: policy DROP and
/// no blanket ACCEPT.
fn forward_drops_in(saved: &SavedTables) -> bool {
    saved.policy("filter", "FORWARD") == Some("DROP")
        && !saved
            .chain_rules("filter", "FORWARD")
            .iter()
            .any(|l| l == "-j ACCEPT")
}

#[cfg(test)]
mod tests {
    //! The driver against the recording executor: which transactions a
    //! change sends, the fallback to a full rewrite, and rollback.

    use super::*;
    use crate::firewall::iptables::exec::RecordingExecutor;
    use crate::model::{DnatRule, Rule, RuleSpec};

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

    /// A driver started the way the engine starts it: the IPv6 probe, then
    /// a full apply of each family.
    fn started() -> (IptablesDriver, Arc<RecordingExecutor>) {
        let exec = Arc::new(RecordingExecutor::default());
        let mut driver = IptablesDriver::new(exec.clone());
        let all = [Family::V4, Family::V6];
        driver
            .apply(&Desired::default(), &[Family::V6], Mode::Full)
            .unwrap();
        for family in all {
            driver
                .apply(&Desired::default(), &[family], Mode::Full)
                .unwrap();
        }
        (driver, exec)
    }

    fn payloads(exec: &RecordingExecutor) -> Vec<String> {
        exec.restores
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }

    const ALL: [Family; 2] = [Family::V4, Family::V6];

    #[test]
    fn a_change_sends_one_incremental_transaction() {
        let (mut driver, exec) = started();
        let at_start = payloads(&exec).len();
        assert_eq!(at_start, 2, "one full apply per family at start");
        let desired = Desired::new([dnat(1, 47011)]);
        driver.apply(&desired, &ALL, Mode::Change).unwrap();
        let sent = payloads(&exec);
        assert_eq!(sent.len(), at_start + 1, "one transaction for the change");
        let last = sent.last().unwrap();
        // Port 47011 is in tcp block 183: its shard is created with it.
        assert!(last.contains("-A NATMAP-T183 -d 192.0.2.1/32"), "{last}");
        assert!(last.contains(":NATMAP-T183 - [0:0]"), "{last}");
        assert!(
            !last.contains(":NATMAP - [0:0]") && !last.contains(":NATMAP-OUTPUT - [0:0]"),
            "no parent rewrite: {last}"
        );
    }

    #[test]
    fn a_refused_diff_falls_back_to_a_full_rewrite() {
        let (mut driver, exec) = started();
        *exec.fail_next.lock().unwrap() = 1;
        let desired = Desired::new([dnat(1, 47012)]);
        driver.apply(&desired, &ALL, Mode::Change).unwrap();
        let last = payloads(&exec).pop().unwrap();
        assert!(
            last.contains(":NATMAP - [0:0]"),
            "full rewrite after the failed diff: {last}"
        );
        assert!(last.contains("--dport 47012"), "{last}");
    }

    #[test]
    fn a_refused_diff_and_rewrite_leave_the_mirror_as_it_was() {
        let (mut driver, exec) = started();
        *exec.fail_next.lock().unwrap() = 2;
        let desired = Desired::new([dnat(1, 47013)]);
        assert!(driver.apply(&desired, &ALL, Mode::Change).is_err());
        // The rule never went in: the next change adds it again.
        driver.apply(&desired, &ALL, Mode::Change).unwrap();
        let last = payloads(&exec).pop().unwrap();
        assert!(last.contains("-A NATMAP-T183 -d 192.0.2.1/32"), "{last}");
    }

    #[test]
    fn taking_a_rule_out_again_deletes_it_by_spec() {
        let (mut driver, exec) = started();
        let with = Desired::new([dnat(1, 47015)]);
        driver.apply(&with, &ALL, Mode::Change).unwrap();
        driver
            .apply(&Desired::default(), &ALL, Mode::Change)
            .unwrap();
        let sent = payloads(&exec);
        let (add, undo) = (&sent[sent.len() - 2], &sent[sent.len() - 1]);
        assert!(add.contains("-A NATMAP-T183 -d 192.0.2.1/32"), "{add}");
        // Its shard held only it: the jump and the shard go with it.
        for line in [
            "-D NATMAP -p tcp -m tcp --dport 46848:47103 -j NATMAP-T183",
            "-X NATMAP-T183",
            "-X NATMAP-OUTPUT-T183",
        ] {
            assert!(undo.contains(line), "the rule is taken out again: {undo}");
        }
    }

    #[test]
    fn a_change_that_changes_nothing_sends_nothing() {
        let (mut driver, exec) = started();
        let desired = Desired::new([dnat(1, 47021), dnat(2, 47022)]);
        driver.apply(&desired, &ALL, Mode::Change).unwrap();
        let before = payloads(&exec).len();
        driver.apply(&desired, &ALL, Mode::Change).unwrap();
        assert_eq!(payloads(&exec).len(), before);
    }

    #[test]
    fn a_held_lock_is_not_waited_for_twice() {
        struct Locked;
        impl Netfilter for Locked {
            fn restore(&self, _: Family, _: &str) -> Result<(), FirewallError> {
                Err(FirewallError::Locked {
                    program: "iptables-restore".into(),
                    message: "Another app is currently holding the xtables lock".into(),
                })
            }
            fn save(&self, _: Family) -> Result<String, FirewallError> {
                Ok(String::new())
            }
        }
        let mut driver = IptablesDriver::new(Arc::new(Locked));
        driver.hooks_ok = [true; 2];
        let err = driver
            .apply(&Desired::new([dnat(1, 47031)]), &ALL, Mode::Change)
            .unwrap_err();
        assert!(matches!(err, FirewallError::Locked { .. }), "{err:?}");
    }
}
