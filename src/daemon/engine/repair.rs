//! Periodic upkeep: the engine's tick. It notices when something else
//! changed natmap's chains, hooks or policy routes, or reset IP forwarding,
//! and puts them back; it retries rules whose ports were busy; and now and
//! then it re-checks Docker mappings in case an event was lost.

use crate::model::{PolicyRouteRule, RuleId};
use crate::proto::RuleStatus;
use crate::rules::restore;
use crate::rules::saved::SavedTables;

use super::super::{host, reserve};
use super::{family_index, Engine, DOCKER_RESYNC_TICKS};

impl Engine {
    /// Periodic work: repair drift, re-enable forwarding that someone reset,
    /// and install rules whose ports were busy and are free now.
    pub fn tick(&mut self) {
        self.repair_drift();
        // A safety net for Docker events lost in a reconnect window.
        self.ticks += 1;
        if self.ticks % DOCKER_RESYNC_TICKS == 0 {
            self.refresh_docker(|_| true);
        }
        if self.state.forwarding && host::ipv4_forwarding() == Some(false) {
            tracing::warn!(
                "net.ipv4.ip_forward was reset to 0 by something else; setting it back to 1"
            );
            self.repairs += 1;
            self.last_repair = Some((
                std::time::Instant::now(),
                vec!["net.ipv4.ip_forward was reset to 0".into()],
            ));
            if let Err(e) = host::enable_forwarding(self.state.forwarding_ipv6) {
                tracing::error!("cannot re-enable forwarding: {e}");
            }
        }
        self.repair_routes();
        self.retry_conflicts();
        self.follow_addresses();
        self.retry_auto_conflicts();
    }

    /// Puts back policy routes someone removed (`ip rule del`, or a link
    /// going down, which drops the table's default route).
    fn repair_routes(&mut self) {
        let routes: Vec<PolicyRouteRule> = self.routes.iter().copied().collect();
        for route in routes {
            if host::route_present(&route) {
                continue;
            }
            match host::route_add(&route) {
                Ok(()) => {
                    self.repairs += 1;
                    let reason = format!(
                        "policy route from {} table {} was removed",
                        route.src_ip, route.table
                    );
                    tracing::warn!(repairs = self.repairs, "{reason}; repaired");
                    self.last_repair = Some((std::time::Instant::now(), vec![reason]));
                }
                Err(e) => tracing::warn!("cannot repair policy route from {}: {e}", route.src_ip),
            }
        }
    }

    /// Compares natmap's chains and hooks in the kernel with what natmap
    /// applied (someone's `iptables -F`, a firewalld reload, a Docker
    /// restart reordering hooks) and rewrites them in one transaction if
    /// they differ.
    fn repair_drift(&mut self) {
        if !self.installed {
            return;
        }
        for family in self.families() {
            let saved = match self.nf.save(family) {
                Ok(s) => SavedTables::parse(&s),
                Err(e) => {
                    tracing::warn!("drift check of {family} rules failed: {e}");
                    continue;
                }
            };
            let reasons = saved.drift(self.applied.family(family));
            if reasons.is_empty() {
                continue;
            }
            let desired = self.applied.clone();
            let text = restore::full(desired.family(family), &saved);
            match self.nf.restore(family, &text) {
                Ok(()) => {
                    self.repairs += 1;
                    self.last_repair = Some((std::time::Instant::now(), reasons.clone()));
                    self.hooks_ok[family_index(family)] = true;
                    tracing::warn!(
                        repairs = self.repairs,
                        "natmap's {family} rules were changed from outside ({}); repaired",
                        reasons.join("; ")
                    );
                }
                Err(e) => tracing::error!("cannot repair natmap's {family} rules: {e}"),
            }
        }
    }

    fn retry_conflicts(&mut self) {
        let waiting: Vec<RuleId> = self
            .inactive
            .iter()
            .filter(|(_, i)| i.status == RuleStatus::PortConflict)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            let Some(rule) = self.state.rules.iter().find(|r| r.id == id).cloned() else {
                continue;
            };
            let Ok(held) = reserve::bind_all(&rule.spec.port_claims()) else {
                continue;
            };
            let stashed = self.inactive.remove(&id);
            let desired = self.desired(&self.state);
            match self.apply(&desired) {
                Ok(()) => {
                    self.held.insert(id, held);
                    if let Err(f) = self.start_listening(id) {
                        tracing::warn!(rule = id, "{}", f.message);
                    } else {
                        tracing::info!(rule = id, "port is free again, rule installed");
                    }
                }
                Err(e) => {
                    tracing::warn!(rule = id, "cannot install rule: {e}");
                    if let Some(s) = stashed {
                        self.inactive.insert(id, s);
                    }
                }
            }
        }
    }
}
