//! A driver that records what it is asked, for fast tests of the engine:
//! which rules each apply wanted, in which mode, and whether a change
//! failed. It renders nothing; the iptables driver's own tests check what
//! reaches the kernel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::model::{Family, Proto, RuleId};
use crate::proto::Counters;

use super::{Desired, Drift, FirewallDriver, FirewallError, Mode, ReadCounters, RuleChange};

/// One call that would have changed the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`FirewallDriver::apply`]: the families, the mode and the ids of
    /// the desired rules.
    Apply {
        /// The families asked for.
        families: Vec<Family>,
        /// The mode asked for.
        mode: Mode,
        /// The desired rules' ids, in order.
        rules: Vec<RuleId>,
    },
    /// [`FirewallDriver::apply_change`]: the families, the ids the change
    /// put and removed, and the ids of the rules applied after it.
    Change {
        /// The families asked for.
        families: Vec<Family>,
        /// Ids of the rules put.
        put: Vec<RuleId>,
        /// Ids removed.
        remove: Vec<RuleId>,
        /// The applied rules' ids after the change, in order.
        rules: Vec<RuleId>,
    },
    /// [`FirewallDriver::teardown`] of these families.
    Teardown(Vec<Family>),
}

#[derive(Debug, Default)]
struct Log {
    calls: Vec<Call>,
    fail_next: u32,
    installed: bool,
    applied: Vec<RuleId>,
}

/// Records calls; clones share one log, so a test keeps one clone while
/// the engine owns another. Can be told to fail the next applies, to test
/// rollback.
#[derive(Debug, Clone, Default)]
pub struct RecordingDriver {
    log: Arc<Mutex<Log>>,
}

impl RecordingDriver {
    /// Every successful call that would have changed the kernel, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.log.lock().expect("lock").calls.clone()
    }

    /// Makes the next `n` applies fail (as the kernel refusing them).
    pub fn fail_next(&self, n: u32) {
        self.log.lock().expect("lock").fail_next = n;
    }
}

/// The ids of `applied` with `change` made, in order.
fn changed_ids(applied: &[RuleId], change: &RuleChange) -> Vec<RuleId> {
    let mut ids: Vec<RuleId> = applied
        .iter()
        .copied()
        .filter(|id| !change.remove.contains(id))
        .collect();
    for rule in &change.put {
        if let Err(i) = ids.binary_search(&rule.id) {
            ids.insert(i, rule.id);
        }
    }
    ids
}

impl Log {
    /// Fails the call when a failure was asked for ([`RecordingDriver::fail_next`]).
    fn injected_failure(&mut self) -> Result<(), FirewallError> {
        if self.fail_next == 0 {
            return Ok(());
        }
        self.fail_next -= 1;
        Err(FirewallError::Refused {
            program: "recording".into(),
            message: "injected failure".into(),
        })
    }
}

struct NoCounters;

impl ReadCounters for NoCounters {
    fn read(&self, _families: &[Family]) -> HashMap<RuleId, Counters> {
        HashMap::new()
    }
}

impl FirewallDriver for RecordingDriver {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn backend(&self) -> String {
        "recording".into()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<(), FirewallError> {
        let mut log = self.log.lock().expect("lock");
        log.injected_failure()?;
        let rules: Vec<RuleId> = desired.rules().iter().map(|r| r.id).collect();
        log.applied.clone_from(&rules);
        log.installed = true;
        log.calls.push(Call::Apply {
            families: families.to_vec(),
            mode,
            rules,
        });
        Ok(())
    }

    fn apply_change(
        &mut self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<(), FirewallError> {
        let mut log = self.log.lock().expect("lock");
        log.injected_failure()?;
        let rules = changed_ids(&log.applied, change);
        log.applied.clone_from(&rules);
        log.installed = true;
        log.calls.push(Call::Change {
            families: families.to_vec(),
            put: change.put.iter().map(|r| r.id).collect(),
            remove: change.remove.clone(),
            rules,
        });
        Ok(())
    }

    fn preview_change(
        &self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        if change.is_empty() {
            return Ok(Vec::new());
        }
        let ids = changed_ids(&self.log.lock().expect("lock").applied, change);
        Ok(families
            .iter()
            .map(|f| (*f, format!("rules {ids:?}\n")))
            .collect())
    }

    fn forget(&mut self) {}

    fn preview(
        &self,
        desired: &Desired,
        families: &[Family],
        _mode: Mode,
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        let ids: Vec<RuleId> = desired.rules().iter().map(|r| r.id).collect();
        let log = self.log.lock().expect("lock");
        if ids == log.applied {
            return Ok(Vec::new());
        }
        Ok(families
            .iter()
            .map(|f| (*f, format!("rules {ids:?}\n")))
            .collect())
    }

    fn program(&self, _family: Family) -> String {
        "recording".into()
    }

    fn teardown(&mut self, families: &[Family]) -> Result<(), FirewallError> {
        let mut log = self.log.lock().expect("lock");
        log.calls.push(Call::Teardown(families.to_vec()));
        log.applied.clear();
        log.installed = false;
        Ok(())
    }

    fn preview_teardown(&self, _family: Family) -> Result<String, FirewallError> {
        Ok("teardown\n".into())
    }

    fn installed(&self) -> bool {
        self.log.lock().expect("lock").installed
    }

    fn drift(&mut self, _family: Family) -> Result<Drift, FirewallError> {
        Ok(Drift::default())
    }

    fn repair(&mut self, _family: Family) -> Result<(), FirewallError> {
        Ok(())
    }

    fn export(&self, _family: Family) -> String {
        String::new()
    }

    fn counter_reader(&self) -> Arc<dyn ReadCounters> {
        Arc::new(NoCounters)
    }

    fn forward_drops(&self, _family: Family) -> bool {
        false
    }

    fn docker_published_ports(&self) -> Option<HashSet<(Proto, u16)>> {
        None
    }
}
