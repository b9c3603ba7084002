//! natmap's packet filter behind one trait, [`FirewallDriver`], above rule
//! syntax: the engine hands a driver the rules it wants active
//! ([`Desired`], driver-neutral model rules) and the driver renders,
//! installs, checks and removes them in its own terms.
//!
//! # Layout
//! - this file: the trait, the neutral types it speaks ([`Desired`],
//!   [`Mode`], [`Drift`], [`ReadCounters`]), the one error type of the
//!   layer ([`FirewallError`], matched by variant) and the factory
//!   ([`detect`], [`driver`]);
//! - [`iptables`]: the iptables driver — rendering, `iptables-restore`
//!   transactions, `iptables-save` parsing, the executor processes;
//! - [`recording`]: a driver that records what it is asked, for fast
//!   tests of the engine.
//!
//! - [`nftables`]: the native nftables driver — natmap's own tables with
//!   maps keyed `daddr . l4proto . dport`, changes as element changes.
//!
//! [`Backend`] picks one (`daemon --backend`, `backend = …` in the config).

pub mod iptables;
pub mod nftables;
pub mod recording;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::{Family, Proto, Rule, RuleId};
use crate::proto::Counters;

pub use recording::RecordingDriver;

/// The rules natmap wants active, in id order: what every driver renders
/// in its own syntax. Rules that cannot be active (a busy port, a missing
/// address) are left out by the engine; a Docker mapping whose container is
/// down is in it and renders nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    rules: Vec<Rule>,
    /// What the host's bridges do with forwarded frames: decides whom a
    /// container mapping must masquerade for the container to reach its
    /// own published port.
    bridges: BridgeNetfilter,
}

impl Desired {
    /// The desired set of `rules`, sorted by id, on a host whose bridges
    /// do not pass frames to the firewall.
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Desired {
        Desired::on(rules, BridgeNetfilter::default())
    }

    /// The desired set of `rules`, sorted by id, on a host whose bridges
    /// do what `bridges` says.
    pub fn on(rules: impl IntoIterator<Item = Rule>, bridges: BridgeNetfilter) -> Desired {
        let mut rules: Vec<Rule> = rules.into_iter().collect();
        rules.sort_by_key(|r| r.id);
        Desired { rules, bridges }
    }

    /// The rules, in id order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What the host's bridges do with forwarded frames.
    pub fn bridges(&self) -> BridgeNetfilter {
        self.bridges
    }

    /// The rule with this id (a binary search).
    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        let i = self.rules.binary_search_by_key(&id, |r| r.id).ok()?;
        Some(&self.rules[i])
    }

    /// A copy with `change` made (a driver that renders whole: O(N)).
    pub fn with(&self, change: &RuleChange) -> Desired {
        let mut next = self.clone();
        next.change(change);
        next
    }

    /// Applies `change` in place, keeping id order: a binary search per
    /// rule it names.
    pub fn change(&mut self, change: &RuleChange) {
        for id in &change.remove {
            if let Ok(i) = self.rules.binary_search_by_key(id, |r| r.id) {
                self.rules.remove(i);
            }
        }
        for rule in &change.put {
            match self.rules.binary_search_by_key(&rule.id, |r| r.id) {
                Ok(i) => self.rules[i] = rule.clone(),
                Err(i) => self.rules.insert(i, rule.clone()),
            }
        }
    }
}

/// A change to the rules a driver applied: what one request changes, so a
/// driver whose kernel interface allows it (nftables: map elements) works
/// in proportion to the change, not to every rule natmap has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleChange {
    /// Rules that become active, or replace the active rule of their id.
    pub put: Vec<Rule>,
    /// Ids of rules no longer active (an id the driver does not have is
    /// ignored).
    pub remove: Vec<RuleId>,
}

impl RuleChange {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty()
    }
}

/// Whether frames crossing a bridge pass the host's iptables (br_netfilter:
/// `net.bridge.bridge-nf-call-iptables` / `-ip6tables`), per family. It
/// decides whom a container mapping must masquerade (see the iptables driver's `render_docker`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeNetfilter {
    /// Bridged IPv4 passes iptables.
    pub iptables: bool,
    /// Bridged IPv6 passes ip6tables.
    pub ip6tables: bool,
}

impl BridgeNetfilter {
    /// Whether bridged traffic of `family` passes the host's filters.
    pub fn filters(self, family: Family) -> bool {
        match family {
            Family::V4 => self.iptables,
            Family::V6 => self.ip6tables,
        }
    }
}

/// How much of the kernel an [`FirewallDriver::apply`] rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The smallest change from what the driver applied last, for every
    /// request; the driver falls back to [`Mode::Full`] by itself when the
    /// kernel refuses the change (someone changed natmap's rules under it).
    Change,
    /// Everything again from a fresh read of the kernel, hooks included:
    /// at start and recovery. A family already known to match is skipped.
    Full,
}

/// What a drift check found in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Why the kernel differs from what the driver applied, one reason a
    /// line; empty when it matches (rules, order, hooks).
    pub reasons: Vec<String>,
    /// What the kernel holds of natmap's rules and their hooks, opaque:
    /// two equal fingerprints mean nobody changed anything in between.
    /// Empty when nothing differs.
    pub fingerprint: Vec<String>,
    /// The first differing rule, worded for an operator; `None` when
    /// nothing differs.
    pub first_difference: Option<String>,
    /// Only the place of natmap's hooks changed: another program inserted
    /// its rules above them (Docker does on every `docker network
    /// create`). Routine, so the repair is logged as information, not as a
    /// warning.
    pub hooks_displaced_only: bool,
}

/// The one error type of the firewall layer. Callers match the variant;
/// the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirewallError {
    /// The firewall's program could not be run (not installed, not
    /// executable, its pipes broke).
    #[error("{program} failed: {message}")]
    Unavailable {
        /// The program.
        program: String,
        /// Why, and what to install.
        message: String,
    },
    /// Another tool (Docker, firewalld) held the firewall's lock longer
    /// than natmap's bounded wait. Trying again at once only doubles the
    /// wait.
    #[error("{program} failed: {message}")]
    Locked {
        /// The program that waited.
        program: String,
        /// What it printed.
        message: String,
    },
    /// The kernel or the program refused the transaction; nothing of it
    /// was applied.
    #[error("{program} failed: {message}")]
    Refused {
        /// The program.
        program: String,
        /// What it printed.
        message: String,
    },
    /// The driver cannot work beside the host's other firewall users (e.g.
    /// Docker's rules live where natmap's would never match its traffic).
    #[error("{0}")]
    Incompatible(String),
}

/// Per-rule kernel counters, readable from any thread (a metrics scrape
/// reads them off the engine thread).
pub trait ReadCounters: Send + Sync {
    /// The counters of every rule of `families` that has any, by rule id.
    /// Blocking; a family that cannot be read is left out.
    fn read(&self, families: &[Family]) -> HashMap<RuleId, Counters>;
}

/// A firewall implementation: installs, checks and removes natmap's rules.
/// One engine thread drives it, so methods that change the kernel take
/// `&mut self` and the driver keeps its own mirror of what it applied.
pub trait FirewallDriver: Send {
    /// The driver's name (`iptables`).
    fn name(&self) -> &'static str;

    /// The kernel interface it drives, as `status` shows it (`nft` or
    /// `legacy` for iptables, `netlink` for nftables).
    fn backend(&self) -> String;

    /// Brings natmap's rules of `families` to `desired` (all or nothing:
    /// a family that fails puts back the families done before it).
    fn apply(
        &mut self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<(), FirewallError>;

    /// Brings natmap's rules of `families` from what the driver applied to
    /// that with `change` made (all or nothing, like [`Self::apply`]). The
    /// request path: a driver that can works in proportion to the change.
    fn apply_change(
        &mut self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<(), FirewallError>;

    /// What [`Self::apply_change`] would send, per family that would
    /// change, without sending it (dry run).
    fn preview_change(
        &self,
        change: &RuleChange,
        families: &[Family],
    ) -> Result<Vec<(Family, String)>, FirewallError>;

    /// Forgets what it knows of the kernel, so the next apply is a full
    /// one (after a rollback that failed too).
    fn forget(&mut self);

    /// What [`Self::apply`] would send, per family that would change, in
    /// the driver's own syntax, without sending it (dry run). [`Mode::Full`]
    /// reads the kernel.
    fn preview(
        &self,
        desired: &Desired,
        families: &[Family],
        mode: Mode,
    ) -> Result<Vec<(Family, String)>, FirewallError>;

    /// The program the driver's transaction text of `family` is input
    /// for (`iptables-restore --noflush`), as a dry run names it.
    fn program(&self, family: Family) -> String;

    /// Removes natmap's rules and hooks of `families`, and nothing else.
    fn teardown(&mut self, families: &[Family]) -> Result<(), FirewallError>;

    /// What [`Self::teardown`] of one family would send (dry run).
    fn preview_teardown(&self, family: Family) -> Result<String, FirewallError>;

    /// Whether natmap's rules are installed (false before the first apply
    /// and after a teardown): a drift check means nothing otherwise.
    fn installed(&self) -> bool;

    /// Compares the kernel's natmap rules of `family` with what the driver
    /// applied.
    fn drift(&mut self, family: Family) -> Result<Drift, FirewallError>;

    /// Puts back what the driver applied in `family`, hooks included (after
    /// a [`Self::drift`] that found differences).
    fn repair(&mut self, family: Family) -> Result<(), FirewallError>;

    /// A boot fragment of what the driver applied in `family`, for hosts
    /// that restore rules without the daemon (`save --export`).
    fn export(&self, family: Family) -> String;

    /// A reader of per-rule counters (`ls -v`, metrics).
    fn counter_reader(&self) -> Arc<dyn ReadCounters>;

    /// Whether forwarded traffic of `family` is dropped unless a rule
    /// accepts it (a FORWARD policy of DROP). Unknown counts as not dropped.
    fn forward_drops(&self, family: Family) -> bool;

    /// The ports Docker publishes itself (`docker run -p`), as last read
    /// (or read now); `None` when they cannot be read.
    fn docker_published_ports(&self) -> Option<HashSet<(Proto, u16)>>;
}

/// Which firewall driver the daemon runs (`--backend`, `backend = …`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// natmap's chains through `iptables-restore` (the default).
    #[default]
    Iptables,
    /// natmap's own nftables tables: maps keyed `daddr . l4proto . dport`,
    /// changes as element changes over netlink.
    Nftables,
}

impl Backend {
    /// Its name on the command line and in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = crate::model::ParseError;
    fn from_str(s: &str) -> Result<Backend, Self::Err> {
        match s {
            "iptables" => Ok(Backend::Iptables),
            "nftables" => Ok(Backend::Nftables),
            _ => Err(crate::model::ParseError::new(
                "backend",
                s,
                "iptables or nftables",
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The driver the daemon runs, after checking it can work here (which
/// iptables flavor, and that Docker's rules are in the same one; that `nft`
/// runs).
/// `marks` are the nftables backend's (`[nftables]` in the config).
pub fn detect(
    backend: Backend,
    marks: nftables::marks::Marks,
) -> Result<Box<dyn FirewallDriver>, FirewallError> {
    Ok(match backend {
        Backend::Iptables => Box::new(iptables::IptablesDriver::detect()?),
        Backend::Nftables => Box::new(nftables::NftablesDriver::detect(marks)?),
    })
}

/// Removes natmap's rules of every backend but `backend`, so a state dir
/// switched from one backend to the other leaves nothing behind. Called
/// once the daemon installed its rules from state: a start that is refused
/// (a rule the new backend cannot express) leaves the old rules serving.
pub fn remove_other_backends(backend: Backend) {
    match backend {
        Backend::Iptables => {
            // The default backend must start wherever it started before,
            // `nft` or not: a table left behind is worth a line, not a refusal.
            if let Err(e) = nftables::remove_tables() {
                tracing::warn!("removing natmap's nftables tables (backend is iptables): {e}");
            }
        }
        Backend::Nftables => remove_iptables_chains(),
    }
}

/// Takes natmap's iptables chains and hooks out, where iptables runs at
/// all (a host with nft only has none to remove).
fn remove_iptables_chains() {
    let Ok(mut old) = iptables::IptablesDriver::detect() else {
        return;
    };
    for family in Family::ALL {
        // A family without NAT support (no ip6table_nat) has nothing of
        // natmap's either; anything else is worth a loud line.
        if let Err(e) = old.teardown(&[family]) {
            tracing::warn!("removing natmap's {family} iptables chains (backend is nftables): {e}");
        }
    }
}

/// The driver without any check, for reading the kernel only (`daemon
/// --dry-run` previews).
pub fn driver(backend: Backend, marks: nftables::marks::Marks) -> Box<dyn FirewallDriver> {
    match backend {
        Backend::Iptables => Box::new(iptables::IptablesDriver::new(Arc::new(
            iptables::exec::IptablesExecutor,
        ))),
        Backend::Nftables => Box::new(nftables::NftablesDriver::with_marks(
            Arc::new(nftables::exec::NftExecutor::new()),
            marks,
        )),
    }
}

/// Runs a firewall tool (`iptables-restore`, `nft`, …) with fixed
/// arguments and optional input on stdin, never through a shell, and
/// returns its stdout. A tool that cannot be started is
/// [`FirewallError::Unavailable`] (naming `package`); one that exits with
/// an error is [`FirewallError::Refused`], its stderr and exit status as
/// the message. Both drivers run their tools through here.
pub(crate) fn run_tool(
    program: &str,
    package: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, FirewallError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let fail = |message: String| FirewallError::Unavailable {
        program: program.to_owned(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run it: {e} (is the {package} package installed?)"
            ))
        })?;
    // Its nftables changes are natmap's own, not drift.
    nftables::events::spawned(child.id());
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes())
            .map_err(|e| fail(format!("writing its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(FirewallError::Refused {
            program: program.to_owned(),
            message: format!("{} ({})", stderr.trim(), out.status),
        })
    }
}
