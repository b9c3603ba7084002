//! The single owner of natmap's state, rules and reservations.
//!
//! Requests are applied one at a time, each through the same pipeline:
//! validate → reserve ports → new state → desired rules → the firewall
//! driver (one transaction per changed family) → persist → listen → answer.
//! A failure at any step undoes the steps before it, so nothing is ever
//! half-applied.
//!
//! # Layout
//! - this file: the engine's state, recovery at start, handing the desired
//!   rules to the firewall driver and committing states, the request dispatcher,
//!   `ls`, `fwd`, `save`, `clear`, shutdown;
//! - `batch`: rule changes planned together, one commit per batch;
//! - `apply`: `apply` and `export` documents;
//! - `docker`: `docker add/rm/remap`, following containers (withdrawn on
//!   the events that end a container's claim to its address; inspects run
//!   off this thread and come back as messages);
//! - `auto`: auto-discovery from container labels;
//! - `hairpin`: hairpin mode on the bridge ports of containers with
//!   mappings (a container reaching its own published port);
//! - `addresses`: forwarding only for addresses this host has
//!   (`--allow-nonlocal`, rules that wait for their address);
//! - `routes`: policy routes and the tables they share;
//! - `status`: `status` and per-rule counters;
//! - `repair`: the periodic tick (drift repair, routes, busy ports);
//! - `metrics`: the snapshot a `/metrics` scrape reads.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

mod addresses;
mod apply;
mod auto;
mod batch;
mod docker;
mod hairpin;
mod held;
mod identity;
mod metrics;
mod offload;
mod repair;
mod routes;
mod status;

use crate::docker::DockerClient;
use crate::firewall::{Desired, FirewallDriver, FirewallError, Mode, RuleChange};
use crate::model::{
    DnatRule, Family, HairpinRule, PolicyRouteRule, PortClaim, Rule, RuleId, RuleSpec, SnatRule,
};
use crate::proto::{
    ClearReport, DryRunReport, ErrorCode, ForwardingReport, HairpinRequest, LsRequest, Pong,
    Request, Response, RuleList, RuleStatus, RuleView, SaveReport, Transaction, UnreadableEntry,
};
use crate::state::{self, Delta, Loaded, State};

use super::host;
use super::local::{AddressSource, LocalAddresses};
use super::relay::Relays;
use super::reserve;
use batch::Change;
pub use batch::MAX_BATCH;
pub use docker::{Observation, PendingAdd, PendingApply};
pub use metrics::{CounterReader, MetricsSnapshot};
pub use offload::FirewallDone;

/// Who sent a request (from `SO_PEERCRED`), for the change log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Process id, when known.
    pub pid: Option<i32>,
}

/// A failed request: its stable code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

type Outcome<T> = Result<T, Failure>;

/// Why a stored rule is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inactive {
    status: RuleStatus,
    reason: String,
}

/// The state owner. Not `Sync`: one thread drives it. Its parts each own
/// one job; a change goes through one door ([`Engine::commit_next`]) that
/// composes them.
pub struct Engine {
    /// The rules and settings natmap keeps (what `state.json` holds).
    state: State,
    /// The state's rules by identity, kept with it (a lookup per request).
    /// An eleventh field beside the state rather than inside `State`: the
    /// state is the file's plain data, built and edited in many places; the
    /// index changes only where the engine changes the state (`persist`).
    identities: identity::Identities,
    /// Where and how the state is written.
    persist: Persist,
    /// natmap's packet filter, and the thread its transactions run on.
    firewall: FirewallSide,
    /// Reserved sockets of active rules, and their loopback relays.
    ports: Ports,
    /// Rules kept in state but not installed, and why.
    inactive: BTreeMap<RuleId, Inactive>,
    /// What natmap knows of Docker.
    docker: DockerView,
    /// The host as natmap sees it: addresses, IPv6 NAT, routes, bridges.
    host: HostView,
    /// Auto-discovery (config, engine watchers, problems).
    discovery: auto::Discovery,
    /// While handling a `--dry-run` request: what the change would have done.
    simulated: Option<DryRunReport>,
    /// The periodic tick's record: drift repairs, convergence, uptime.
    upkeep: Upkeep,
}

/// Where and how the state is written.
struct Persist {
    path: PathBuf,
    /// Writes every change to `state.json`'s journal (compacting it now and then).
    store: state::Store,
    /// Set when the state file was corrupt at start (shown by `status`).
    warning: Option<String>,
}

/// natmap's packet filter.
struct FirewallSide {
    /// The driver; it keeps its own mirror of what it applied. `None`
    /// while a transaction runs off this thread ([`offload`]).
    driver: Option<Box<dyn FirewallDriver>>,
    /// The driver's name, for answers given while it is out.
    name: &'static str,
    /// Runs large transactions off this thread ([`offload`]).
    thread: offload::FirewallThread,
    /// The commit whose transaction runs there, if one does.
    in_flight: Option<offload::InFlight>,
}

/// Reserved sockets of active rules, and the loopback relays beside them.
struct Ports {
    /// Reservations, indexed by port.
    held: held::Held,
    relays: Relays,
}

/// What natmap knows of Docker.
struct DockerView {
    /// Docker, while it answers.
    client: Option<DockerClient>,
    /// Why Docker is not connected.
    error: String,
    /// Docker's answers for the containers an `apply` document names,
    /// looked up off this thread before the document is applied (see
    /// [`Engine::apply_begin`]); empty otherwise.
    prefetched: HashMap<String, Result<crate::docker::Lookup, String>>,
    /// Why a Docker mapping is down, as last seen.
    down_reason: BTreeMap<RuleId, String>,
    /// The order of container events against Docker's answers, so an
    /// answer older than an event about its mapping is dropped.
    event_order: docker::EventOrder,
}

/// The host as natmap sees it.
struct HostView {
    /// Whether IPv6 NAT works here.
    v6_nat: bool,
    /// Where the host's addresses come from.
    addresses: AddressSource,
    /// The host's addresses, as last read (every request and tick).
    local: LocalAddresses,
    /// Policy routes natmap has installed.
    routes: std::collections::BTreeSet<PolicyRouteRule>,
    /// br_netfilter and the bridge ports natmap put in hairpin mode.
    hairpin: hairpin::Hairpin,
}

/// The periodic tick's record.
struct Upkeep {
    /// When the daemon started.
    started: std::time::Instant,
    /// Periodic ticks so far.
    ticks: u64,
    /// Drift repairs done since start.
    repairs: u64,
    /// The last drift repair: when and why.
    last_repair: Option<(std::time::Instant, Vec<String>)>,
    /// Per family: whether drift repairs take (see `repair`).
    convergence: [repair::Convergence; 2],
    /// When the last drift check ran and how long it held the engine.
    last_drift_check: Option<(std::time::Instant, std::time::Duration)>,
    /// Set (true) while a watcher reports changes of natmap's rules
    /// (nftables events): the periodic drift check is then a safety net.
    drift_events: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What a commit makes the next state.
pub(super) enum Next {
    /// A whole state: start, `apply` documents, Docker, auto-discovery,
    /// repairs; the firewall diffs the whole desired set.
    Whole(State),
    /// A change to the state: rule requests, whose cost follows the change.
    Delta(Delta),
}

/// What the firewall driver does for a commit.
pub(super) enum FirewallWork {
    /// Bring the kernel to the whole desired set.
    Whole(Desired),
    /// Make this change to what the driver applied.
    Change(RuleChange),
}

impl FirewallWork {
    /// Does it, for `families`.
    fn run(&self, fw: &mut dyn FirewallDriver, families: &[Family]) -> Result<(), FirewallError> {
        match self {
            FirewallWork::Whole(desired) => fw.apply(desired, families, Mode::Change),
            FirewallWork::Change(change) => fw.apply_change(change, families),
        }
    }

    /// What it would send, without sending it (dry run).
    fn preview(
        &self,
        fw: &dyn FirewallDriver,
        families: &[Family],
    ) -> Result<Vec<(Family, String)>, FirewallError> {
        match self {
            FirewallWork::Whole(desired) => fw.preview(desired, families, Mode::Change),
            FirewallWork::Change(change) => fw.preview_change(change, families),
        }
    }
}

/// Where a commit's time went before its state write.
struct CommitTiming {
    render: std::time::Duration,
    firewall: std::time::Duration,
}

/// Every this many ticks, every Docker mapping is checked against Docker
/// even without an event.
const DOCKER_RESYNC_TICKS: u64 = 15;

/// The message of the internal failure that stops a dry run at the commit.
const DRY_RUN_STOP: &str = "dry run: stopped before changing anything";

/// The state to start from, logged; and for a corrupt state file, the
/// warning `status` shows until the next change.
fn loaded_state(state_path: &Path, loaded: Loaded) -> (State, Option<String>) {
    match loaded {
        Loaded::Fresh(s) => {
            tracing::info!(path = %state_path.display(), "no state file yet, starting empty");
            (s, None)
        }
        Loaded::Existing(s) => {
            tracing::info!(path = %state_path.display(), rules = s.rules.len(), "state loaded");
            for q in &s.quarantined {
                tracing::error!(
                    path = %state_path.display(),
                    entry = q.index,
                    id = ?q.id,
                    "state entry QUARANTINED, not installed (kept in the file): {}",
                    q.reason
                );
            }
            (s, None)
        }
        Loaded::Corrupt {
            state,
            moved_to,
            error,
        } => {
            tracing::error!(
                path = %state_path.display(),
                moved_to = %moved_to.display(),
                %error,
                "STATE FILE IS CORRUPT: it was moved aside and natmap starts with NO rules; \
                 inspect the moved file and re-add the rules"
            );
            let warning = format!(
                "the state file was corrupt at start and was moved to {}; natmap started with no rules \
                 (inspect it and re-add the rules; the next change clears this warning)",
                moved_to.display()
            );
            (state, Some(warning))
        }
    }
}

/// The internal network of a hairpin request: given, or the host's
/// connected network of `--int-ip` (a delete matches without it: the host
/// prefix).
fn hairpin_int_net(r: &HairpinRequest) -> Outcome<crate::model::Network> {
    match r.int_net {
        Some(net) => Ok(net),
        // A delete matches without the derived network.
        None if r.delete => {
            crate::model::Network::new(r.int_ip.ip(), r.int_ip.family().host_prefix())
                .ok_or_else(|| Failure::new(ErrorCode::Internal, "bad host prefix"))
        }
        None => host::connected_network(r.int_ip.ip()).map_err(|e| {
            Failure::new(
                ErrorCode::InvalidArgument,
                format!(
                    "cannot find the internal network of --int-ip {}: {e}; \
                     give it with --int-net CIDR",
                    r.int_ip
                ),
            )
        }),
    }
}

fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Engine {
    /// Loads the state and rebuilds exactly its rules: reserves ports (rules
    /// whose ports are taken are kept but skipped, with a warning), rewrites
    /// natmap's chains and hooks in one transaction per family, then listens.
    /// Fails when IPv4 rules cannot be applied at all or the state cannot be read.
    /// Entries of the file that fail the checks of a request never get here:
    /// `state::load` quarantines them (shown by `ls` and `status`).
    pub fn open(
        state_path: PathBuf,
        fw: Box<dyn FirewallDriver>,
        relays: Relays,
        addresses: AddressSource,
    ) -> Result<Engine, String> {
        let (loaded, store) = state::load(&state_path).map_err(|e| e.to_string())?;
        let (state, corrupt) = loaded_state(&state_path, loaded);
        let persist = Persist {
            path: state_path,
            store,
            warning: corrupt,
        };
        let mut engine = Engine::new(state, persist, fw, relays, addresses);
        engine.read_bridge_netfilter();
        if engine.state.forwarding {
            match host::enable_forwarding(engine.state.forwarding_ipv6) {
                Ok(changes) => {
                    for c in changes.iter().filter(|c| c.before != c.after) {
                        tracing::info!(sysctl = %c.name, "forwarding re-enabled from state");
                    }
                }
                Err(e) => tracing::warn!("cannot re-enable forwarding: {e}"),
            }
        }
        engine.recover()?;
        Ok(engine)
    }

    /// An engine over `state` with nothing applied, reserved or connected
    /// yet.
    fn new(
        state: State,
        persist: Persist,
        fw: Box<dyn FirewallDriver>,
        relays: Relays,
        addresses: AddressSource,
    ) -> Engine {
        Engine {
            identities: identity::Identities::of(&state),
            state,
            persist,
            firewall: FirewallSide {
                name: fw.name(),
                driver: Some(fw),
                thread: Default::default(),
                in_flight: None,
            },
            ports: Ports {
                held: Default::default(),
                relays,
            },
            inactive: BTreeMap::new(),
            docker: DockerView {
                client: None,
                error: docker::NOT_CONNECTED_YET.into(),
                prefetched: HashMap::new(),
                down_reason: BTreeMap::new(),
                event_order: Default::default(),
            },
            host: HostView {
                v6_nat: true,
                addresses,
                local: addresses.snapshot().unwrap_or_default(),
                routes: Default::default(),
                hairpin: Default::default(),
            },
            discovery: Default::default(),
            simulated: None,
            upkeep: Upkeep {
                started: std::time::Instant::now(),
                ticks: 0,
                repairs: 0,
                last_repair: None,
                convergence: Default::default(),
                last_drift_check: None,
                drift_events: None,
            },
        }
    }

    fn recover(&mut self) -> Result<(), String> {
        // IPv6 first: if its NAT table is missing, v6 rules become inactive and
        // IPv4 carries on.
        if let Err(e) = self
            .fw_mut()
            .apply(&Desired::default(), &[Family::V6], Mode::Full)
        {
            tracing::warn!("IPv6 NAT is unavailable, IPv6 rules stay inactive: {e}");
            self.host.v6_nat = false;
        }
        self.withhold_unconfirmed_containers();
        let rules = self.state.rules.clone();
        for rule in &rules {
            if let Some(waiting) = self.missing_address(rule) {
                tracing::warn!(rule = rule.id, "rule waits: {}", waiting.reason);
                self.inactive.insert(rule.id, waiting);
                continue;
            }
            if rule.spec.needs_v6_nat() && !self.host.v6_nat {
                self.inactive.insert(
                    rule.id,
                    Inactive {
                        status: RuleStatus::Unavailable,
                        reason: "IPv6 NAT is not available in this kernel (ip6table_nat)".into(),
                    },
                );
                continue;
            }
            if matches!(&rule.spec, RuleSpec::Docker(d) if d.auto.is_some() && !d.external && !d.is_up())
            {
                // A labelled local container, withheld until its engine
                // confirms it: it reserves its port when it is up.
                continue;
            }
            self.reserve_or_wait(rule);
        }
        let desired = self.desired(&self.state);
        for family in self.families() {
            // The IPv6 probe above already installed an empty v6 ruleset:
            // a full apply skips a family that matches.
            self.fw_mut()
                .apply(&desired, &[family], Mode::Full)
                .map_err(|e| format!("cannot install natmap's {family} rules: {e}"))?;
        }
        for id in rules.iter().map(|r| r.id) {
            self.start_listening(id).map_err(|f| f.message)?;
        }
        self.sync_hairpin();
        let state = self.state.clone();
        if let Err(e) = self.sync_routes(&state) {
            tracing::warn!("cannot restore policy routes: {e}");
        }
        tracing::info!(
            active = self.ports.held.len(),
            inactive = self.inactive.len(),
            "rules restored from state"
        );
        Ok(())
    }

    fn families(&self) -> Vec<Family> {
        if self.host.v6_nat {
            Family::ALL.to_vec()
        } else {
            vec![Family::V4]
        }
    }

    /// The firewall driver. Messages that need it wait while a transaction
    /// runs off this thread (see [`offload`]), so it is always here.
    fn fw(&self) -> &dyn FirewallDriver {
        self.firewall.driver.as_deref().expect(offload::LENT)
    }

    /// The firewall driver, to change the kernel (see [`Engine::fw`]).
    fn fw_mut(&mut self) -> &mut dyn FirewallDriver {
        self.firewall.driver.as_deref_mut().expect(offload::LENT)
    }

    /// The rules of `state` that are active: what the firewall installs,
    /// on this host's bridges (br_netfilter decides whom container mappings
    /// masquerade).
    fn desired(&self, state: &State) -> Desired {
        Desired::on(
            state
                .rules
                .iter()
                .filter(|r| !self.inactive.contains_key(&r.id))
                .cloned(),
            self.host.hairpin.netfilter,
        )
    }

    /// Brings the kernel to `desired` in one transaction per family that
    /// differs (the driver puts back the first family if the second fails).
    fn apply(&mut self, desired: &Desired) -> Result<(), FirewallError> {
        let families = self.families();
        self.fw_mut().apply(desired, &families, Mode::Change)
    }

    /// Applies `next` and persists it; on a failed write puts the previous
    /// rules back. On success `next` becomes the state.
    fn commit(&mut self, next: State) -> Outcome<()> {
        self.commit_next(Next::Whole(next))
    }

    /// Commits `delta`, made to the state: the request path, whose work
    /// follows the change, not the number of rules.
    fn commit_delta(&mut self, delta: Delta) -> Outcome<()> {
        self.commit_next(Next::Delta(delta))
    }

    /// The one door of every change on this thread: the firewall, then
    /// routes and the state write ([`Engine::after_firewall`]); a dry run
    /// stops before the firewall with what it would send.
    fn commit_next(&mut self, next: Next) -> Outcome<()> {
        let started = std::time::Instant::now();
        let work = self.firewall_work(&next);
        if self.simulated.is_some() {
            return self.simulate(&work, &next);
        }
        let rendered = std::time::Instant::now();
        let families = self.families();
        let applied = work.run(self.fw_mut(), &families);
        let timing = CommitTiming {
            render: rendered - started,
            firewall: rendered.elapsed(),
        };
        self.after_firewall(next, applied, timing)
    }

    /// What the firewall must do for `next`: the whole desired set, or the
    /// change a delta makes to it.
    fn firewall_work(&self, next: &Next) -> FirewallWork {
        match next {
            Next::Whole(state) => FirewallWork::Whole(self.desired(state)),
            Next::Delta(delta) => FirewallWork::Change(self.rule_change(delta)),
        }
    }

    /// `delta` as a change of the active rules: a rule kept inactive (its
    /// address is missing, its port busy) is not installed.
    fn rule_change(&self, delta: &Delta) -> RuleChange {
        let mut change = RuleChange {
            remove: delta.del.clone(),
            ..RuleChange::default()
        };
        for rule in &delta.put {
            if self.inactive.contains_key(&rule.id) {
                change.remove.push(rule.id);
            } else {
                change.put.push(rule.clone());
            }
        }
        change
    }

    /// A dry run ends at the commit: records the transactions and the route
    /// effects, and unwinds like a failure, so reservations taken on the way
    /// are released.
    fn simulate(&mut self, work: &FirewallWork, next: &Next) -> Outcome<()> {
        // A change preview reads nothing, so it cannot fail.
        let plans = work.preview(self.fw(), &Family::ALL);
        let transactions: Vec<Transaction> = plans
            .unwrap_or_default()
            .into_iter()
            .map(|(family, restore)| Transaction {
                family,
                program: self.fw().program(family),
                restore,
            })
            .collect();
        let mut effects = Vec::new();
        if let Some(next) = self.next_with_routes(next) {
            let next = next.as_ref();
            let (add, del) = route_changes(&self.host.routes, next);
            for r in &del {
                let keep = routes::table_still_used(next, r);
                effects.extend(host::route_plan(r, false, keep));
            }
            for r in &add {
                effects.extend(host::route_plan(r, true, false));
            }
        }
        let report = self.simulated.as_mut().expect("a dry run is simulated");
        report.transactions.extend(transactions);
        report.effects.extend(effects);
        Err(Failure::new(ErrorCode::Internal, DRY_RUN_STOP))
    }

    /// The state `next` makes, when its policy routes may differ from the
    /// state's (a delta that names no policy route leaves them, and needs
    /// no copy of the state).
    fn next_with_routes<'a>(&self, next: &'a Next) -> Option<std::borrow::Cow<'a, State>> {
        match next {
            Next::Whole(state) => Some(std::borrow::Cow::Borrowed(state)),
            Next::Delta(delta)
                if self.touches(delta, |s| matches!(s, RuleSpec::PolicyRoute(_))) =>
            {
                let mut state = self.state.clone();
                state.apply(delta);
                Some(std::borrow::Cow::Owned(state))
            }
            Next::Delta(_) => None,
        }
    }

    /// Whether `delta` puts, replaces or takes out a rule `kind` picks.
    fn touches(&self, delta: &Delta, kind: impl Fn(&RuleSpec) -> bool) -> bool {
        delta.put.iter().any(|r| kind(&r.spec))
            || delta
                .put
                .iter()
                .map(|r| r.id)
                .chain(delta.del.iter().copied())
                .filter_map(|id| self.state.rule(id))
                .any(|r| kind(&r.spec))
    }

    /// The rest of a commit once the firewall has (or has not) taken
    /// `next`'s rules: routes, then the state write; a failure puts the
    /// previous rules and routes back.
    fn after_firewall(
        &mut self,
        next: Next,
        applied: Result<(), FirewallError>,
        timing: CommitTiming,
    ) -> Outcome<()> {
        applied.map_err(|e| {
            Failure::new(
                ErrorCode::ApplyFailed,
                format!("the firewall refused the change, nothing was changed: {e}"),
            )
        })?;
        let applied = std::time::Instant::now();
        let undo = match &next {
            Next::Delta(delta) => Some(self.state.undo_of(delta)),
            Next::Whole(_) => None,
        };
        let bridged = match &next {
            Next::Delta(delta) => self.touches(delta, |s| matches!(s, RuleSpec::Docker(_))),
            Next::Whole(_) => true,
        };
        let routes_before = self.host.routes.clone();
        let routed = match self.next_with_routes(&next) {
            Some(state) => self.sync_routes(&state),
            None => Ok(()),
        };
        if let Err(e) = routed {
            self.firewall_back(undo.as_ref());
            self.routes_back();
            return Err(Failure::new(
                ErrorCode::ApplyFailed,
                format!("routing refused the change, nothing was changed: {e}"),
            ));
        }
        if let Err(e) = self.persist(next, undo.as_ref()) {
            self.firewall_back(undo.as_ref());
            if self.host.routes != routes_before {
                self.routes_back();
            }
            return Err(Failure::new(
                ErrorCode::StateWriteFailed,
                format!("cannot save state, the change was rolled back: {e}"),
            ));
        }
        // Where a change's time goes (docs/reliability.md, item 8).
        tracing::debug!(
            render_ms = timing.render.as_secs_f64() * 1e3,
            iptables_ms = timing.firewall.as_secs_f64() * 1e3,
            routes_and_state_ms = applied.elapsed().as_secs_f64() * 1e3,
            "change committed"
        );
        if bridged {
            self.sync_hairpin();
        }
        Ok(())
    }

    /// Writes `next` and makes it the state; on a failed write the state
    /// stays as it was (`undo` takes a delta back out).
    fn persist(&mut self, next: Next, undo: Option<&Delta>) -> Result<(), state::StateError> {
        match next {
            Next::Whole(state) => {
                self.persist.store.commit(&self.state, &state)?;
                self.identities = identity::Identities::of(&state);
                self.state = state;
            }
            Next::Delta(delta) => {
                self.identities.apply(&self.state, &delta);
                self.state.apply(&delta);
                if let Err(e) = self.persist.store.commit_delta(&delta, &self.state) {
                    let undo = undo.expect("a delta's undo is taken before it");
                    self.identities.apply(&self.state, undo);
                    self.state.apply(undo);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Puts the state's rules back in the firewall after a later step of a
    /// commit failed: `undo` of a delta, or the whole state.
    fn firewall_back(&mut self, undo: Option<&Delta>) {
        let families = self.families();
        let result = match undo {
            Some(undo) => {
                let change = self.rule_change(undo);
                self.fw_mut().apply_change(&change, &families)
            }
            None => {
                let previous = self.desired(&self.state);
                self.fw_mut().apply(&previous, &families, Mode::Change)
            }
        };
        if let Err(again) = result {
            tracing::error!("putting the previous rules back failed too: {again}");
            self.fw_mut().forget();
        }
    }

    /// Puts the state's policy routes back after a later step failed.
    fn routes_back(&mut self) {
        let state = self.state.clone();
        if let Err(e) = self.sync_routes(&state) {
            tracing::error!("putting policy routes back failed: {e}");
        }
    }

    /// Brings the kernel's policy routes to those of `state`.
    fn sync_routes(&mut self, state: &State) -> Result<(), String> {
        let (add, del) = route_changes(&self.host.routes, state);
        for r in del {
            // A table another policy route still uses keeps its default route.
            host::route_del(&r, routes::table_still_used(state, &r))?;
            self.host.routes.remove(&r);
        }
        for r in add {
            host::route_add(&r)?;
            self.host.routes.insert(r);
        }
        Ok(())
    }

    /// Handles one request and answers it.
    pub fn handle(&mut self, request: Request, peer: Peer) -> Response {
        if Engine::batchable(&request) {
            return self
                .handle_batch(vec![(request, peer)])
                .pop()
                .expect("one request, one response");
        }
        self.refresh_addresses();
        self.log_change(&request, peer);
        let change = request.is_change();
        let result = match request {
            Request::Ping(_) => Ok(Response::ok(Pong {
                daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
            Request::Ls(ls) => Ok(Response::ok(self.list(&ls))),
            request @ (Request::Dnat(_)
            | Request::Snat(_)
            | Request::Hairpin(_)
            | Request::PolicyRoute(_)) => {
                // `handle` sends these through the batch path first; kept total for safety.
                self.static_change(request).and_then(|c| {
                    self.apply_changes(vec![c])
                        .pop()
                        .expect("one change, one outcome")
                })
            }
            Request::Fwd(f) => self.forwarding(f.ipv6),
            Request::Clear(_) => self.clear(),
            Request::DockerAdd(r) => self.docker_add(r),
            Request::DockerRm(r) => self.docker_rm(r),
            Request::DockerRemap(r) => self.docker_remap(r),
            Request::Apply(r) => self.apply_document(r),
            Request::Export(_) => Ok(Response::ok(self.export())),
            Request::Status(_) => Ok(Response::ok(self.status())),
            Request::Save(r) => self.save(r.dry_run),
            Request::Reload(_) => self.reload(),
            Request::DryRun(d) => self.dry_run(*d.request, peer),
        };
        let response = respond(result);
        if change && response.ok {
            // The operator acted on the state: the corrupt-file warning was seen.
            self.persist.warning = None;
        }
        response
    }

    /// Handles one request whose answer may come later: an `apply` and a
    /// `docker rm` commit with their firewall transaction off this thread
    /// ([`offload`]); every other request (and any request inside a dry
    /// run) is answered at once, as [`Engine::handle`] does.
    pub(crate) fn handle_later(
        &mut self,
        request: Request,
        peer: Peer,
        reply: tokio::sync::oneshot::Sender<Response>,
    ) {
        let later = matches!(&request, Request::Apply(a) if !a.dry_run)
            || matches!(&request, Request::DockerRm(_));
        if !later || self.simulated.is_some() {
            let _ = reply.send(self.handle(request, peer));
            return;
        }
        self.refresh_addresses();
        self.log_change(&request, peer);
        match request {
            Request::Apply(r) => self.apply_document_later(r, reply),
            Request::DockerRm(r) => self.docker_rm_later(r, reply),
            _ => unreachable!("only these are answered later"),
        }
    }

    /// Runs a change up to its commit, then reports what it would have sent.
    fn dry_run(&mut self, request: Request, peer: Peer) -> Outcome<Response> {
        self.simulated = Some(DryRunReport {
            dry_run: true,
            transactions: Vec::new(),
            effects: Vec::new(),
        });
        let response = if Engine::batchable(&request) {
            let change = self.static_change(request);
            change.and_then(|c| self.apply_changes(vec![c]).pop().expect("one outcome"))
        } else {
            let r = self.handle(request, peer);
            if r.ok {
                Ok(r)
            } else {
                let e = r.error.expect("failed response has an error");
                Err(Failure::new(e.code, e.message))
            }
        };
        let report = self.simulated.take().expect("set above");
        match response {
            Err(f) if f.message == DRY_RUN_STOP => Ok(Response::ok(report)),
            Err(f) => Err(f),
            // Nothing to commit (already present, …): the answer says so.
            Ok(r) if report.transactions.is_empty() && report.effects.is_empty() => Ok(r),
            Ok(_) => Ok(Response::ok(report)),
        }
    }

    fn log_change(&self, request: &Request, peer: Peer) {
        if request.is_change() {
            tracing::info!(
                uid = peer.uid,
                pid = peer.pid.unwrap_or(-1),
                cmd = request.name(),
                "change requested"
            );
        }
    }

    /// The rule change a `dnat`, `snat` or `hairpin` request asks for.
    fn static_change(&self, request: Request) -> Outcome<Change> {
        let (spec, delete) = match request {
            Request::Dnat(r) => (
                RuleSpec::Dnat(DnatRule {
                    ext_ip: r.ext_ip,
                    int_ip: r.int_ip,
                    ports: r.ports,
                    proto: r.proto,
                    ext_if: r.ext_if,
                    allow_nonlocal: r.allow_nonlocal,
                }),
                r.delete,
            ),
            Request::Snat(r) => (
                RuleSpec::Snat(SnatRule {
                    source: r.int_ip,
                    ext_if: r.ext_if,
                    ext_ip: r.ext_ip,
                    forward: r.forward,
                }),
                r.delete,
            ),
            Request::Hairpin(r) => {
                let int_net = hairpin_int_net(&r)?;
                (
                    RuleSpec::Hairpin(HairpinRule {
                        ext_ip: r.ext_ip,
                        int_ip: r.int_ip,
                        ports: r.ports,
                        proto: r.proto,
                        int_net,
                        allow_nonlocal: r.allow_nonlocal,
                    }),
                    r.delete,
                )
            }
            Request::PolicyRoute(r) => (
                RuleSpec::PolicyRoute(PolicyRouteRule {
                    src_ip: r.src_ip,
                    via: r.via,
                    table: r.table,
                }),
                r.delete,
            ),
            other => {
                return Err(Failure::new(
                    ErrorCode::Internal,
                    format!("{} is not a rule change", other.name()),
                ))
            }
        };
        Ok(if delete {
            Change::Delete(spec)
        } else {
            Change::Add(spec)
        })
    }

    fn view(&self, rule: &Rule) -> RuleView {
        let (status, detail) = self.status_of(rule);
        RuleView {
            rule: rule.clone(),
            status,
            detail,
            counters: None,
        }
    }

    /// A rule's status and why it is not active: set aside at start or
    /// by a change, waiting for its interface, its Docker engine or
    /// container away, or its addresses.
    fn status_of(&self, rule: &Rule) -> (RuleStatus, Option<String>) {
        if let Some(i) = self.inactive.get(&rule.id) {
            return (i.status, Some(i.reason.clone()));
        }
        if let Some(iface) = missing_interface(&rule.spec, &self.host.local) {
            return (
                RuleStatus::WaitingForInterface,
                Some(format!(
                    "{iface} does not exist; the rule is installed and matches once it appears"
                )),
            );
        }
        match &rule.spec {
            RuleSpec::Docker(d) if !d.external && self.is_stale(d).is_some() => (
                RuleStatus::Unknown,
                self.is_stale(d).map(|reason| {
                    format!(
                        "engine unreachable ({reason}); no rules until it confirms the container"
                    )
                }),
            ),
            RuleSpec::Docker(d) if self.is_stale(d).is_some() => (
                RuleStatus::Stale,
                self.is_stale(d)
                    .map(|reason| format!("engine unreachable, rules kept: {reason}")),
            ),
            RuleSpec::Docker(d) if !d.is_up() && self.unconfirmed(d) => {
                (RuleStatus::Unknown, Some(self.unconfirmed_reason()))
            }
            RuleSpec::Docker(d) if !d.is_up() => (
                RuleStatus::Down,
                Some(
                    self.docker
                        .down_reason
                        .get(&rule.id)
                        .cloned()
                        .unwrap_or_else(|| "container is not running".into()),
                ),
            ),
            _ => match self.address_status(rule) {
                Some((status, why)) => (status, Some(why)),
                None => (RuleStatus::Active, None),
            },
        }
    }

    fn list(&self, ls: &LsRequest) -> RuleList {
        let filter = ls.filter.as_deref().map(str::to_ascii_lowercase);
        let counters = if ls.counters {
            Some(self.counters())
        } else {
            None
        };
        let rules = self
            .state
            .rules
            .iter()
            .filter(|r| filter.as_deref().is_none_or(|f| rule_matches(r, f)))
            .map(|r| {
                let mut view = self.view(r);
                if let Some(c) = &counters {
                    view.counters = Some(c.get(&r.id).copied().unwrap_or_default());
                }
                view
            })
            .collect();
        let mut list = RuleList {
            rules,
            unreadable: Vec::new(),
            firewall: self.firewall.name.to_owned(),
        };
        self.list_quarantined(filter.as_deref(), &mut list);
        list
    }

    /// Adds the state file's quarantined entries to `ls`: those that parse
    /// as rules among the rules (in id order), the others apart.
    fn list_quarantined(&self, filter: Option<&str>, list: &mut RuleList) {
        if self.state.quarantined.is_empty() {
            return;
        }
        for q in &self.state.quarantined {
            match &q.rule {
                Some(rule) if filter.is_none_or(|f| rule_matches(rule, f)) => {
                    list.rules.push(RuleView {
                        rule: rule.clone(),
                        status: RuleStatus::Quarantined,
                        detail: Some(quarantine_detail(q)),
                        counters: None,
                    });
                }
                None if filter.is_none_or(|f| q.id.is_some_and(|id| id.to_string() == f)) => {
                    list.unreadable.push(UnreadableEntry {
                        index: q.index,
                        id: q.id,
                        reason: quarantine_detail(q),
                    })
                }
                _ => {}
            }
        }
        // Stable: a rule and a quarantined one with the same id keep their order.
        list.rules.sort_by_key(|v| v.rule.id);
    }

    /// Adds one rule (through the same path as a batch of one).
    fn add(&mut self, spec: RuleSpec) -> Outcome<Response> {
        self.apply_changes(vec![Change::Add(spec)])
            .pop()
            .expect("one change, one outcome")
    }

    /// A port natmap already holds for another rule gets a message naming that rule.
    fn check_own_claims(&self, claims: &[PortClaim]) -> Outcome<()> {
        self.check_own_claims_except(claims, RuleId::MAX)
    }

    /// [`Self::check_own_claims`], ignoring the ports of rule `except`.
    fn check_own_claims_except(&self, claims: &[PortClaim], except: RuleId) -> Outcome<()> {
        for c in claims {
            let same_port = self.ports.held.at(c.proto, c.bind.port());
            let taken = same_port
                .iter()
                .find(|(id, held)| *id != except && reserve::claims_collide(c, held));
            if let Some((id, _)) = taken {
                let owner = self.state.rule(*id);
                return Err(batch::port_taken(c, *id, owner.map(|r| &r.spec)));
            }
        }
        Ok(())
    }

    /// Reserves the rule's ports; when one is taken, the rule waits as a
    /// port conflict (retried every tick) and holds nothing. Returns whether
    /// it holds its ports.
    fn reserve_or_wait(&mut self, rule: &Rule) -> bool {
        match reserve::bind_all(&rule.spec.port_claims()) {
            Ok(held) => {
                self.inactive.remove(&rule.id);
                self.ports.held.insert(rule.id, held);
                true
            }
            Err(busy) => {
                tracing::warn!(rule = rule.id, "rule skipped: {busy}");
                let waiting = Inactive {
                    status: RuleStatus::PortConflict,
                    reason: busy.message,
                };
                self.inactive.insert(rule.id, waiting);
                false
            }
        }
    }

    /// Serves loopback for the rule (its relay, see `daemon::relay`), once
    /// its rules are in and the state is on disk.
    fn start_listening(&mut self, id: RuleId) -> Outcome<()> {
        let Some(held) = self.ports.held.get(id) else {
            return Ok(());
        };
        // The rule's current targets (held claims keep those of their bind),
        // for the ports actually held (an IPv6 half may be missing).
        let Some(rule) = self.state.rule(id) else {
            return Ok(());
        };
        let claims: Vec<PortClaim> = rule
            .spec
            .port_claims()
            .into_iter()
            .filter(|c| {
                held.iter()
                    .any(|h| h.claim.bind == c.bind && h.claim.proto == c.proto)
            })
            .collect();
        self.ports.relays.serve(id, &claims, held).map_err(|e| {
            Failure::new(
                ErrorCode::PortInUse,
                format!("cannot serve loopback on the ports of rule #{id}: {e}"),
            )
        })
    }

    /// Undoes an add whose last step failed: rules and state go back.
    fn remove_rule_after_failure(&mut self, id: RuleId) {
        let delta = Delta {
            del: vec![id],
            next_id: self.state.next_id,
            ..Delta::default()
        };
        if let Err(f) = self.commit_delta(delta) {
            tracing::error!(rule = id, "could not undo a failed add: {}", f.message);
        }
        self.release(id);
    }

    fn release(&mut self, id: RuleId) {
        self.ports.relays.stop(id);
        self.ports.held.remove(id);
        self.inactive.remove(&id);
        self.docker.down_reason.remove(&id);
    }

    /// Removes one stored rule: rules, state, reservation, tracked flows.
    fn delete_rule(&mut self, rule: Rule) -> Outcome<Response> {
        self.apply_changes(vec![Change::DeleteId(rule.id)])
            .pop()
            .expect("one change, one outcome")
    }

    fn forwarding(&mut self, ipv6: bool) -> Outcome<Response> {
        if let Some(report) = self.simulated.as_mut() {
            report.effects = host::forwarding_plan(ipv6);
            return Err(Failure::new(ErrorCode::Internal, DRY_RUN_STOP));
        }
        let sysctls =
            host::enable_forwarding(ipv6).map_err(|e| Failure::new(ErrorCode::SysctlFailed, e))?;
        if !self.state.forwarding || self.state.forwarding_ipv6 != ipv6 {
            // Through the one door like any change: the rules do not
            // differ, so the firewall sends nothing; the state write is the
            // step that matters.
            let mut next = self.state.clone();
            next.forwarding = true;
            next.forwarding_ipv6 = ipv6;
            self.commit(next)?;
        }
        Ok(Response::ok(ForwardingReport { sysctls }))
    }

    /// Removes natmap's chains and hooks from both families (never anyone else's).
    fn teardown(&mut self) -> Result<(), String> {
        let families = self.families();
        self.fw_mut()
            .teardown(&families)
            .map_err(|e| e.to_string())?;
        self.release_hairpin();
        self.sync_routes(&State::default())
    }

    /// `save`: writes and fsyncs the whole state again, folding the journal
    /// into `state.json` (every change already is durable; this makes one
    /// file hold it) and returns the boot fragments.
    /// A dry run only returns the fragments.
    fn save(&mut self, dry_run: bool) -> Outcome<Response> {
        if !dry_run {
            self.persist.store.compact(&self.state).map_err(|e| {
                Failure::new(
                    ErrorCode::StateWriteFailed,
                    format!("cannot save state: {e}"),
                )
            })?;
        }
        let fragments = self
            .families()
            .into_iter()
            .map(|family| Transaction {
                family,
                program: self.fw().program(family),
                restore: self.fw().export(family),
            })
            .collect();
        Ok(Response::ok(SaveReport {
            state_path: self.persist.path.display().to_string(),
            rule_count: self.state.rules.len(),
            dry_run,
            fragments,
            exported: Vec::new(),
        }))
    }

    /// Re-installs the current state's rules and routes after a failed clear.
    fn put_back(&mut self) {
        let previous = self.desired(&self.state);
        if let Err(e) = self.apply(&previous) {
            tracing::error!("putting natmap's rules back failed: {e}");
        }
        let state = self.state.clone();
        if let Err(e) = self.sync_routes(&state) {
            tracing::error!("putting policy routes back failed: {e}");
        }
        self.sync_hairpin();
    }

    fn clear(&mut self) -> Outcome<Response> {
        if self.simulated.is_some() {
            for family in self.families() {
                let restore = self
                    .fw()
                    .preview_teardown(family)
                    .map_err(|e| Failure::new(ErrorCode::ApplyFailed, e.to_string()))?;
                let program = self.fw().program(family);
                if let Some(report) = self.simulated.as_mut() {
                    report.transactions.push(Transaction {
                        family,
                        program,
                        restore,
                    });
                }
            }
            return Err(Failure::new(ErrorCode::Internal, DRY_RUN_STOP));
        }
        // `clear` is the operator's explicit reset: quarantined entries go too.
        let removed = self.state.rules.len() + self.state.quarantined.len();
        let next = State {
            rules: Vec::new(),
            quarantined: Vec::new(),
            ..self.state.clone()
        };
        if let Err(e) = self.teardown() {
            // Put back whatever part of the teardown went through.
            self.put_back();
            return Err(Failure::new(
                ErrorCode::ApplyFailed,
                format!("cannot remove natmap's rules: {e}"),
            ));
        }
        if let Err(e) = self.persist.store.compact(&next) {
            self.put_back();
            return Err(Failure::new(
                ErrorCode::StateWriteFailed,
                format!("cannot save state, the rules were put back: {e}"),
            ));
        }
        self.identities = identity::Identities::default();
        let old = std::mem::replace(&mut self.state, next);
        for rule in &old.rules {
            self.release(rule.id);
        }
        forget_all_flows(old.rules.iter().map(|r| &r.spec));
        self.persist.warning = None;
        tracing::info!(removed, "all rules cleared");
        Ok(Response::ok(ClearReport { removed }))
    }

    /// On daemon shutdown: removes natmap's rules and releases every port.
    /// The state stays, so the next start restores everything.
    pub fn shutdown(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("removing natmap's rules at shutdown failed: {e}");
        }
        let ids: Vec<RuleId> = self.ports.held.ids().collect();
        for id in ids {
            self.release(id);
        }
        // One file for the operator to read, back up or edit while stopped.
        if let Err(e) = self.persist.store.compact_if_journaled(&self.state) {
            tracing::warn!("cannot fold the state journal into the state file at shutdown (the next start does): {e}");
        }
        tracing::info!("natmap rules removed, ports released; state kept for the next start");
    }
}

/// Policy routes to add and to remove to get from `applied` to `state`'s.
fn route_changes(
    applied: &std::collections::BTreeSet<PolicyRouteRule>,
    state: &State,
) -> (Vec<PolicyRouteRule>, Vec<PolicyRouteRule>) {
    let wanted: std::collections::BTreeSet<PolicyRouteRule> = state
        .rules
        .iter()
        .filter_map(|r| match &r.spec {
            RuleSpec::PolicyRoute(p) => Some(*p),
            _ => None,
        })
        .collect();
    (
        wanted.difference(applied).copied().collect(),
        applied.difference(&wanted).copied().collect(),
    )
}

/// Turns an outcome into the response line, logging failures.
fn respond(result: Outcome<Response>) -> Response {
    result.unwrap_or_else(|f| {
        if f.message != DRY_RUN_STOP {
            tracing::info!(code = %f.code, "request failed: {}", f.message);
        }
        Response::err(f.code, f.message)
    })
}

/// What `ls` and `status` say about a quarantined state file entry.
fn quarantine_detail(q: &state::Quarantined) -> String {
    format!(
        "state file entry rules[{}] is not installed: {}; kept in the file as it is \
         (fix or remove it there while natmap is stopped, or `lab-ops natmap clear`)",
        q.index, q.reason
    )
}

/// Cuts conntrack entries of connections the rule forwarded.
fn forget_flows(spec: &RuleSpec) {
    forget_all_flows([spec]);
}

/// Cuts conntrack entries of connections the rules forwarded: one listing
/// of the kernel's connections per family for all of them
/// (`host::forget_connections_all`), each distinct filter once.
fn forget_all_flows<'a>(specs: impl IntoIterator<Item = &'a RuleSpec>) {
    let mut seen = std::collections::HashSet::new();
    let flows: Vec<host::Flows> = specs
        .into_iter()
        .flat_map(flows_of)
        .filter(|f| seen.insert(format!("{f:?}")))
        .collect();
    host::forget_connections_all(&flows);
}

/// Up to this many ports, a range mapping's flows are cut port by port.
const FLOW_CUT_PORTS: u16 = 16;

/// The conntrack filters of connections a rule forwarded.
fn flows_of(spec: &RuleSpec) -> Vec<host::Flows> {
    let flows = |proto, orig_dst: IpAddr, reply_src: IpAddr| host::Flows {
        proto,
        orig_dst: Some(orig_dst),
        orig_port: None,
        reply_src,
    };
    match spec {
        RuleSpec::Dnat(r) => vec![flows(r.proto, r.ext_ip.ip(), r.int_ip.ip())],
        RuleSpec::Hairpin(r) => vec![flows(r.proto, r.ext_ip.ip(), r.int_ip.ip())],
        RuleSpec::Snat(_) | RuleSpec::PolicyRoute(_) => Vec::new(),
        // No kernel rule forwards a loopback-only mapping: the relay's
        // connections end with the relay.
        RuleSpec::Docker(r) if r.loopback_only() => Vec::new(),
        RuleSpec::Docker(r) => {
            // `conntrack -D` takes one port: a long range is cut by target
            // address alone (every flow natmap DNATed to that container on
            // this host address), rather than by a process per port.
            let ports: Vec<Option<u16>> = if r.port_count <= FLOW_CUT_PORTS {
                r.host_ports().iter().map(Some).collect()
            } else {
                vec![None]
            };
            [r.target_v4, r.target_v6]
                .into_iter()
                .flatten()
                .flat_map(|target| {
                    ports.iter().map(move |port| host::Flows {
                        proto: r.proto,
                        orig_dst: r.host_ip.map(|h| h.ip()),
                        orig_port: *port,
                        reply_src: target.ip.ip(),
                    })
                })
                .collect()
        }
    }
}

/// The interface a `snat` (or an interface-bound `dnat`) names, when no
/// such interface exists in the daemon's network namespace. iptables takes
/// any name, so the rule stays installed and starts matching when the
/// interface appears (a WireGuard or PPP link that comes up later); this
/// only tells the operator why nothing matches yet. A wildcard (`ppp+`)
/// always counts as present.
fn missing_interface<'a>(
    spec: &'a RuleSpec,
    local: &LocalAddresses,
) -> Option<&'a crate::model::IfName> {
    let iface = match spec {
        RuleSpec::Snat(r) => &r.ext_if,
        RuleSpec::Dnat(r) => r.ext_if.as_ref()?,
        _ => return None,
    };
    (!local.has_interface(iface.as_str())).then_some(iface)
}

/// `ls FILTER`: a rule id, a kind (`policy-route` or `policy_route`), an
/// address, interface, table or host port of the rule, a container name, a
/// container id prefix (4+ characters) or an auto-discover engine. Whole
/// values only: `ls 10.0.0.2` does not match 10.0.0.25. `filter` is lowercase.
fn rule_matches(rule: &Rule, filter: &str) -> bool {
    let kind = rule.spec.kind();
    if filter.parse::<RuleId>().ok() == Some(rule.id)
        || kind == filter
        || kind.replace('_', "-") == filter
    {
        return true;
    }
    let is = |value: String| value.to_ascii_lowercase() == filter;
    match &rule.spec {
        RuleSpec::Dnat(r) => {
            is(r.ext_ip.to_string())
                || is(r.int_ip.to_string())
                || r.ext_if.as_ref().is_some_and(|i| is(i.to_string()))
        }
        RuleSpec::Snat(r) => {
            is(r.source.to_string())
                || is(r.ext_if.to_string())
                || is(r.ext_ip.to_string())
                || r.source
                    .to_string()
                    .split('/')
                    .next()
                    .is_some_and(|ip| is(ip.to_owned()))
        }
        RuleSpec::Hairpin(r) => {
            is(r.ext_ip.to_string()) || is(r.int_ip.to_string()) || is(r.int_net.to_string())
        }
        RuleSpec::PolicyRoute(r) => {
            is(r.src_ip.to_string()) || is(r.via.to_string()) || is(r.table.to_string())
        }
        RuleSpec::Docker(r) => {
            is(r.name.clone())
                || (filter.len() >= 4
                    && r.container_id
                        .as_deref()
                        .is_some_and(|id| id.starts_with(filter)))
                || filter.parse::<u16>().is_ok_and(|p| r.has_host_port(p))
                || is(r.host_ports().to_string())
                || r.host_ip.is_some_and(|h| is(h.to_string()))
                || r.target_v4.is_some_and(|t| is(t.ip.to_string()))
                || r.auto.as_ref().is_some_and(|a| is(a.engine.clone()))
        }
    }
}

#[cfg(test)]
mod tests;
