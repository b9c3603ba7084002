//! What a `/metrics` scrape needs from the engine, read in one step from
//! data the engine already keeps (the `ls -v` views and counters, the
//! `status` facts). The HTTP side (`daemon::metrics`) does everything else
//! off the engine thread.

use std::time::SystemTime;

use crate::proto::{LsRequest, RuleView};

use super::Engine;

/// One scrape's worth of engine facts.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// Every rule as `ls -v` shows it: status and kernel counters.
    pub rules: Vec<RuleView>,
    /// Whether Docker answers.
    pub docker_reachable: bool,
    /// Drift repairs since start.
    pub repairs: u64,
    /// When the last drift repair happened, if any.
    pub last_repair: Option<SystemTime>,
}

impl Engine {
    /// The snapshot a scrape serves: one `iptables-save -c` per family (the
    /// cost of `ls -v`), nothing changed.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let ls = LsRequest {
            filter: None,
            counters: true,
        };
        let now = SystemTime::now();
        MetricsSnapshot {
            rules: self.list(&ls).rules,
            docker_reachable: self.docker.is_some(),
            repairs: self.repairs,
            // The engine keeps a monotonic instant; a wall-clock time is
            // what a dashboard can show.
            last_repair: self
                .last_repair
                .as_ref()
                .and_then(|(at, _)| now.checked_sub(at.elapsed())),
        }
    }
}
