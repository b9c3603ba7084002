//! Periodic upkeep: the engine's tick. It notices when something else
//! changed natmap's chains, hooks or policy routes, or reset IP forwarding,
//! and puts them back; it retries rules whose ports were busy; it follows
//! br_netfilter and the hairpin mode of container bridge ports; and now and
//! then it re-checks Docker mappings in case an event was lost.

use crate::model::{Family, PolicyRouteRule, RuleId};
use crate::proto::RuleStatus;

use super::super::{host, reserve};
use super::{family_index, Engine, DOCKER_RESYNC_TICKS};

/// Repairs in a row that leave natmap's rules different from what it
/// wrote, with nothing changed from outside in between, before natmap gives
/// up on rewriting them and reports "cannot converge".
pub(super) const FUTILE_REPAIRS: u32 = 3;

/// A drift check that took [`SPACED_DRIFT_CHECK`] or more runs again only
/// after this many times its own duration (and at most once per tick), so
/// at large N it takes at most a tenth of the engine's time.
const DRIFT_CHECK_SPACING: u32 = 10;

/// Below this a drift check runs every tick (small rulesets: every 2 s).
const SPACED_DRIFT_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Per family: whether natmap's own drift repairs take.
#[derive(Debug, Default)]
pub(super) struct Convergence {
    /// Repairs in a row after which the kernel still differed.
    streak: u32,
    /// What the kernel showed right after the last repair, when it still
    /// differed (its fingerprint): seeing it again means nobody changed
    /// anything since.
    after_repair: Option<Vec<String>>,
    /// Set once natmap gave up: the message `status` shows.
    stuck: Option<String>,
}

impl Convergence {
    /// The "cannot converge" problem, once natmap gave up.
    pub(super) fn problem(&self) -> Option<&str> {
        self.stuck.as_deref()
    }
}

impl Engine {
    /// Periodic work: repair drift, re-enable forwarding that someone reset,
    /// and install rules whose ports were busy and are free now.
    pub fn tick(&mut self) {
        // A safety net for Docker events lost in a reconnect window.
        self.upkeep.ticks += 1;
        if self.upkeep.ticks % DOCKER_RESYNC_TICKS == 0 {
            self.refresh_docker(|_| true);
        }
        if self.state.forwarding && host::ipv4_forwarding() == Some(false) {
            tracing::warn!(
                "net.ipv4.ip_forward was reset to 0 by something else; setting it back to 1"
            );
            self.upkeep.repairs += 1;
            self.upkeep.last_repair = Some((
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
        self.follow_bridges();
        // Last: it may lend the firewall driver to the firewall thread,
        // and nothing else in a tick may run without it.
        self.repair_drift();
    }

    /// Puts back policy routes someone removed (`ip rule del`, or a link
    /// going down, which drops the table's default route).
    fn repair_routes(&mut self) {
        let routes: Vec<PolicyRouteRule> = self.host.routes.iter().copied().collect();
        for route in routes {
            if host::route_present(&route) {
                continue;
            }
            match host::route_add(&route) {
                Ok(()) => {
                    self.upkeep.repairs += 1;
                    let reason = format!(
                        "policy route from {} table {} was removed",
                        route.src_ip, route.table
                    );
                    tracing::warn!(repairs = self.upkeep.repairs, "{reason}; repaired");
                    self.upkeep.last_repair = Some((std::time::Instant::now(), vec![reason]));
                }
                Err(e) => tracing::warn!("cannot repair policy route from {}: {e}", route.src_ip),
            }
        }
    }

    /// Asks the firewall driver whether natmap's rules and hooks in the
    /// kernel still match what it applied (someone's `iptables -F`, a
    /// firewalld reload, a Docker restart reordering hooks) and has it put
    /// them back if they differ.
    fn repair_drift(&mut self) {
        if !self.fw().installed() {
            return;
        }
        // With events (nftables), the kernel reports changes as they
        // happen; the tick's check is only a safety net for what events
        // cannot show (an iptables-legacy DOCKER-USER, a watcher that died).
        // Except: the first check after start (did the start take?), and
        // while a repair did not take (natmap's own rewrites send no
        // events, and "cannot converge" needs the checks in a row).
        let events = self
            .upkeep
            .drift_events
            .as_ref()
            .is_some_and(|running| running.load(std::sync::atomic::Ordering::SeqCst));
        let converging = self
            .upkeep
            .convergence
            .iter()
            .any(|c| c.streak > 0 && c.stuck.is_none());
        if let (true, false, Some((at, _))) = (events, converging, self.upkeep.last_drift_check) {
            if at.elapsed() < crate::firewall::nftables::events::safety_net() {
                return;
            }
        }
        // A drift check reads the family's tables, which grows with
        // the ruleset (0.7 s at 20,000 rules on iptables-nft). Spacing the
        // checks by a multiple of their cost keeps them to a small share
        // of the engine's time, so requests rarely wait behind one.
        if let Some((at, cost)) = self.upkeep.last_drift_check {
            if cost >= SPACED_DRIFT_CHECK && at.elapsed() < cost * DRIFT_CHECK_SPACING {
                return;
            }
        }
        self.check_drift(self.families());
    }

    /// Checks `families` and repairs what differs: off this thread when it
    /// can (requests are answered meanwhile).
    fn check_drift(&mut self, families: Vec<Family>) {
        if self.drift_check_off_thread(families.clone()) {
            return;
        }
        let start = std::time::Instant::now();
        for family in families {
            let drift = self.fw_mut().drift(family);
            self.repair_family(family, drift);
        }
        self.upkeep.last_drift_check = Some((start, start.elapsed()));
    }

    /// Drift is reported by events from now on (`running` while the
    /// watcher runs): after the first tick's check, the tick's check runs
    /// only every [`safety_net`](crate::firewall::nftables::events::safety_net).
    pub fn drift_by_events(&mut self, running: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.upkeep.drift_events = Some(running);
    }

    /// Someone else changed natmap's nftables state of a family: the
    /// tick's check and repair, now (not spaced: events come only when
    /// something changed, and a burst is one report).
    pub fn firewall_changed(&mut self, change: &crate::firewall::nftables::events::Change) {
        change.take();
        let family = change.family();
        if !self.fw().installed() || !self.families().contains(&family) {
            return;
        }
        self.check_drift(vec![family]);
    }

    /// Repairs `family` if the drift check found natmap's rules changed.
    pub(super) fn repair_family(
        &mut self,
        family: Family,
        drift: Result<crate::firewall::Drift, crate::firewall::FirewallError>,
    ) {
        let drift = match drift {
            Ok(drift) => drift,
            Err(e) => {
                tracing::warn!("drift check of {family} rules failed: {e}");
                return;
            }
        };
        let i = family_index(family);
        if drift.reasons.is_empty() {
            self.upkeep.convergence[i] = Convergence::default();
            return;
        }
        let conv = &mut self.upkeep.convergence[i];
        if conv.after_repair.as_ref() != Some(&drift.fingerprint) {
            // Something changed since natmap's last repair (or this is the
            // first drift): a fresh start.
            *conv = Convergence::default();
        } else if conv.stuck.is_some() {
            // natmap gave up and nothing has changed since.
            return;
        }
        if let Err(e) = self.fw_mut().repair(family) {
            tracing::error!("cannot repair natmap's {family} rules: {e}");
            return;
        }
        let reasons = drift.reasons;
        self.upkeep.repairs += 1;
        self.upkeep.last_repair = Some((std::time::Instant::now(), reasons.clone()));
        if drift.hooks_displaced_only {
            // Docker inserts its rules above natmap's hooks on every
            // network it creates: routine, and put back, so no warning.
            tracing::info!(
                repairs = self.upkeep.repairs,
                "another program put rules above natmap's {family} hooks ({}); moved them back to first",
                reasons.join("; ")
            );
        } else {
            tracing::warn!(
                repairs = self.upkeep.repairs,
                "natmap's {family} rules were changed from outside ({}); repaired",
                reasons.join("; ")
            );
        }
        self.check_converged(family);
    }

    /// Reads the family back right after a repair. Still different means
    /// the repair did not take (the firewall prints a rule differently from
    /// how natmap wrote it); after [`FUTILE_REPAIRS`] such repairs in a row
    /// with no outside change in between, natmap stops rewriting and
    /// `status` reports "cannot converge" instead.
    fn check_converged(&mut self, family: Family) {
        let Ok(after) = self.fw_mut().drift(family) else {
            return;
        };
        let conv = &mut self.upkeep.convergence[family_index(family)];
        if after.reasons.is_empty() {
            *conv = Convergence::default();
            return;
        }
        conv.streak += 1;
        conv.after_repair = Some(after.fingerprint);
        if conv.streak < FUTILE_REPAIRS {
            return;
        }
        let detail = after
            .first_difference
            .unwrap_or_else(|| after.reasons.join("; "));
        let message = format!(
            "cannot converge: natmap's {family} rules still differ from what it wrote after {} \
             repairs in a row with no outside change ({detail}); natmap stopped rewriting them \
             until they change again (this is a natmap bug, please report it)",
            conv.streak
        );
        tracing::error!("{message}");
        conv.stuck = Some(message);
    }

    fn retry_conflicts(&mut self) {
        let waiting: Vec<RuleId> = self
            .inactive
            .iter()
            .filter(|(_, i)| i.status == RuleStatus::PortConflict)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            let Some(rule) = self.state.rule(id).cloned() else {
                continue;
            };
            let Ok(held) = reserve::bind_all(&rule.spec.port_claims()) else {
                continue;
            };
            let stashed = self.inactive.remove(&id);
            let desired = self.desired(&self.state);
            match self.apply(&desired) {
                Ok(()) => {
                    self.ports.held.insert(id, held);
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
