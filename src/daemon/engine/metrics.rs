//! What a `/metrics` scrape needs from the engine, read in one step from
//! data the engine already keeps (the `ls` views, the `status` facts). The
//! kernel counters (`ls -v`) are read by the scrape itself, off the engine
//! thread: at 1000 rules one read (`iptables-save -c`) takes 0.1-0.2 s, which
//! every other client would otherwise wait for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::firewall::ReadCounters;
use crate::model::{Family, RuleId};
use crate::proto::{Counters, LsRequest, RuleView};

use super::Engine;

/// One scrape's worth of engine facts.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// Every rule as `ls` shows it, quarantined ones included; `counters`
    /// are filled by [`CounterReader::fill`].
    pub rules: Vec<RuleView>,
    /// Quarantined state file entries that are not even rules.
    pub unreadable: usize,
    /// Whether Docker answers.
    pub docker_reachable: bool,
    /// Drift repairs since start.
    pub repairs: u64,
    /// When the last drift repair happened, if any.
    pub last_repair: Option<SystemTime>,
}

/// Reads the rules' kernel counters the way `ls -v` does, from any thread.
pub struct CounterReader {
    counters: Arc<dyn ReadCounters>,
    families: Vec<Family>,
}

impl CounterReader {
    /// Sets the counters of every view (zero for a rule without any).
    /// Blocking: reads the firewall's counters once per family.
    pub fn fill(&self, rules: &mut [RuleView]) {
        let counters: HashMap<RuleId, Counters> = self.counters.read(&self.families);
        for view in rules {
            view.counters = Some(counters.get(&view.rule.id).copied().unwrap_or_default());
        }
    }
}

impl Engine {
    /// The snapshot a scrape serves, and how to read its counters. Changes
    /// nothing and runs no program.
    pub fn metrics_snapshot(&self) -> (MetricsSnapshot, CounterReader) {
        let ls = LsRequest {
            filter: None,
            counters: false,
        };
        let now = SystemTime::now();
        let list = self.list(&ls);
        let snapshot = MetricsSnapshot {
            rules: list.rules,
            unreadable: list.unreadable.len(),
            docker_reachable: self.docker.client.is_some(),
            repairs: self.upkeep.repairs,
            // The engine keeps a monotonic instant; a wall-clock time is
            // what a dashboard can show.
            last_repair: self
                .upkeep
                .last_repair
                .as_ref()
                .and_then(|(at, _)| now.checked_sub(at.elapsed())),
        };
        let reader = CounterReader {
            counters: self.fw().counter_reader(),
            families: self.families(),
        };
        (snapshot, reader)
    }
}
