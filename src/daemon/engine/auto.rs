//! Auto-discovery: mappings from container labels on local and remote
//! Docker engines.
//!
//! Each engine's watcher sends a snapshot of its labelled containers (at
//! connect and after every container event). The engine turns a snapshot
//! into the mappings that engine should have and reconciles them with the
//! ones it has, in one commit: add, remove, re-point. Manual mappings always
//! win a port; an unreachable engine's mappings stay, marked stale.

use std::collections::BTreeMap;
use std::sync::mpsc;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::config::{AutoDiscover, Config, EngineConfig};
use crate::docker::{LabeledContainer, NetworkAddrs};
use crate::model::{AutoSource, DockerRule, Endpoint, PortList, PortSpec, Rule, RuleId, RuleSpec};
use crate::proto::{ErrorCode, Response};

use super::super::{reserve, EngineMsg};
use super::{forget_flows, Engine, Failure, Outcome};

/// Auto-discovery's runtime state, owned by the engine.
#[derive(Default)]
pub struct Discovery {
    /// The current `[auto_discover]` section.
    pub config: AutoDiscover,
    /// Where the config came from, for reloads: the path, and whether the
    /// operator named it (then it must exist).
    pub source: Option<(std::path::PathBuf, bool)>,
    /// Engines that do not answer, and why.
    pub stale: BTreeMap<String, String>,
    /// Per engine: what was wrong with its last snapshot (bad labels,
    /// unpublished ports, conflicts with manual mappings).
    pub problems: BTreeMap<String, Vec<String>>,
    /// Engines that sent a snapshot since the last (re)configuration.
    pub connected: BTreeMap<String, bool>,
    /// Each engine's last snapshot, re-read while one of its mappings waits
    /// for a port held by another mapping (it gets the port once free).
    last: BTreeMap<String, Vec<LabeledContainer>>,
    /// Running watcher tasks.
    tasks: Vec<AbortHandle>,
    /// How to start watchers.
    spawner: Option<(Handle, mpsc::Sender<EngineMsg>)>,
}

impl Engine {
    /// Gives the engine what it needs to start engine watchers, with the
    /// config loaded at start, and starts them.
    pub(crate) fn start_discovery(
        &mut self,
        config: Config,
        source: Option<(std::path::PathBuf, bool)>,
        runtime: Handle,
        tx: mpsc::Sender<EngineMsg>,
    ) {
        self.discovery.spawner = Some((runtime, tx));
        self.discovery.source = source;
        self.use_config(config.auto_discover);
    }

    /// The tick's part: engines with a mapping waiting for a port that
    /// another mapping held read their last snapshot again, so the mapping
    /// is installed within a tick of the port coming free.
    pub(super) fn retry_auto_conflicts(&mut self) {
        let waiting: Vec<String> = self
            .discovery
            .problems
            .iter()
            .filter(|(name, problems)| {
                !self.discovery.stale.contains_key(*name)
                    && problems.iter().any(|p| p.starts_with("conflict:"))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in waiting {
            if let Some(containers) = self.discovery.last.get(&name).cloned() {
                self.auto_snapshot(name, containers);
            }
        }
    }

    /// The engine's own message channel, for answers of work done off its
    /// thread (set by [`Engine::start_discovery`]).
    pub(super) fn messages(&self) -> Option<mpsc::Sender<EngineMsg>> {
        self.discovery.spawner.as_ref().map(|(_, tx)| tx.clone())
    }

    /// `reload` and SIGHUP: reads the config again; a broken file keeps the
    /// running config.
    pub fn reload(&mut self) -> Outcome<Response> {
        let Some((path, explicit)) = self.discovery.source.clone() else {
            return Err(Failure::new(
                ErrorCode::InvalidConfig,
                "this daemon has no config file to reload",
            ));
        };
        let config = Config::load(&path, explicit).map_err(|e| {
            tracing::error!("config reload failed, keeping the running config: {e}");
            Failure::new(ErrorCode::InvalidConfig, e)
        })?;
        self.use_config(config.auto_discover);
        if path.exists() {
            tracing::info!(path = %path.display(), "config reloaded");
        } else {
            tracing::info!(path = %path.display(), "no config file: auto-discover is off");
        }
        let engines: Vec<String> = if self.discovery.config.enabled {
            self.discovery
                .config
                .effective_engines()
                .iter()
                .map(|e| e.name.to_string())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::ok(serde_json::json!({
            "auto_discover": self.discovery.config.enabled,
            "engines": engines,
        })))
    }

    fn use_config(&mut self, config: AutoDiscover) {
        for task in self.discovery.tasks.drain(..) {
            task.abort();
        }
        self.discovery.config = config;
        self.discovery.stale.clear();
        self.discovery.problems.clear();
        self.discovery.connected.clear();
        self.discovery.last.clear();
        let engines = if self.discovery.config.enabled {
            self.discovery.config.effective_engines()
        } else {
            Vec::new()
        };
        // Mappings of engines no longer configured go; remote mappings
        // follow a changed preserve_src_ip.
        let masquerade = !self.discovery.config.preserve_src_ip;
        let mut next = self.state.clone();
        let mut removed = Vec::new();
        let mut changed = false;
        next.rules.retain(|r| match &r.spec {
            RuleSpec::Docker(d) => match &d.auto {
                Some(a) if !engines.iter().any(|e| e.name.as_str() == a.engine) => {
                    removed.push(r.clone());
                    false
                }
                _ => true,
            },
            _ => true,
        });
        for rule in next.rules.iter_mut() {
            if let RuleSpec::Docker(d) = &mut rule.spec {
                if let Some(a) = d.auto.as_mut() {
                    let remote = engines
                        .iter()
                        .any(|e| e.name.as_str() == a.engine && e.is_remote());
                    if remote && a.masquerade != masquerade {
                        a.masquerade = masquerade;
                        changed = true;
                    }
                }
            }
        }
        if !removed.is_empty() || changed {
            match self.commit(next) {
                Ok(()) => {
                    for rule in &removed {
                        self.release(rule.id);
                        forget_flows(&rule.spec);
                        tracing::info!(
                            rule = rule.id,
                            "auto mapping removed: its engine is no longer configured"
                        );
                    }
                }
                Err(f) => {
                    tracing::error!("cannot apply the new auto-discover config: {}", f.message)
                }
            }
        }
        let Some((runtime, tx)) = self.discovery.spawner.clone() else {
            return;
        };
        let label = self.discovery.config.label.0.clone();
        for engine in engines {
            let task = runtime.spawn(super::super::watch_engine(
                engine,
                label.clone(),
                tx.clone(),
            ));
            self.discovery.tasks.push(task.abort_handle());
        }
    }

    /// An engine went away: its mappings stay, marked stale.
    ///
    /// Mappings to a remote node's published ports stay as they are
    /// (stale); mappings to container addresses on a local engine are
    /// withdrawn, since nothing confirms those addresses any more.
    pub fn auto_engine_down(&mut self, engine: String, reason: String) {
        self.discovery.connected.insert(engine.clone(), false);
        if !self.discovery.stale.contains_key(&engine) {
            tracing::warn!(engine = %engine, "engine unreachable: mappings to its nodes stay (stale), mappings to its containers are withdrawn: {reason}");
        }
        self.discovery.stale.insert(engine.clone(), reason);
        let of_engine = |d: &DockerRule| d.auto.as_ref().is_some_and(|a| a.engine == engine);
        self.withdraw(of_engine, "its Docker engine is unreachable");
    }

    /// Whether a rule belongs to an unreachable engine.
    pub(super) fn is_stale(&self, rule: &DockerRule) -> Option<&String> {
        rule.auto
            .as_ref()
            .and_then(|a| self.discovery.stale.get(&a.engine))
    }

    /// Reconciles one engine's mappings with a snapshot of its containers.
    pub fn auto_snapshot(&mut self, engine_name: String, containers: Vec<LabeledContainer>) {
        // A snapshot still queued from a watcher that a reload stopped
        // (auto-discovery disabled) must not bring its mappings back.
        if !self.discovery.config.enabled {
            return;
        }
        self.discovery
            .last
            .insert(engine_name.clone(), containers.clone());
        let Some(engine) = self
            .discovery
            .config
            .effective_engines()
            .into_iter()
            .find(|e| e.name.as_str() == engine_name)
        else {
            return;
        };
        if self.discovery.stale.remove(&engine_name).is_some() {
            tracing::info!(engine = %engine_name, "engine answers again; refreshing its mappings");
        } else if !self.discovery.connected.contains_key(&engine_name) {
            tracing::info!(
                engine = %engine_name,
                containers = containers.len(),
                "auto-discover engine connected"
            );
        }
        self.discovery.connected.insert(engine_name.clone(), true);
        let mut problems = Vec::new();
        let label = self.discovery.config.label.0.clone();
        let masquerade = !self.discovery.config.preserve_src_ip;
        let mut wanted: Vec<DockerRule> = Vec::new();
        for c in &containers {
            match desired_for(&engine, c, &label, masquerade) {
                Ok((rules, notes)) => {
                    wanted.extend(rules);
                    problems.extend(notes);
                }
                Err(e) => problems.push(e),
            }
        }
        let key = |d: &DockerRule| {
            (
                d.name.clone(),
                d.host_ip,
                d.host_port,
                d.port_count,
                d.proto,
            )
        };
        // A stopped container on a remote node publishes no port, so its
        // mapping cannot be derived again: keep the known one, down.
        if engine.is_remote() {
            for rule in &self.state.rules {
                let RuleSpec::Docker(d) = &rule.spec else {
                    continue;
                };
                let ours = d.auto.as_ref().is_some_and(|a| a.engine == engine_name);
                let stopped = containers.iter().any(|c| c.name == d.name && !c.running);
                if ours && stopped && !wanted.iter().any(|w| key(w) == key(d)) {
                    let mut down = d.clone();
                    down.target_v4 = None;
                    down.target_v6 = None;
                    wanted.push(down);
                }
            }
        }
        let mine = |r: &Rule| matches!(&r.spec, RuleSpec::Docker(d) if d.auto.as_ref().is_some_and(|a| a.engine == engine_name));
        let mut next = self.state.clone();
        let mut moved: Vec<(RuleId, RuleSpec)> = Vec::new();
        let mut removed: Vec<Rule> = Vec::new();
        next.rules.retain(|r| {
            if !mine(r) {
                return true;
            }
            let RuleSpec::Docker(d) = &r.spec else {
                return true;
            };
            let keep = wanted.iter().any(|w| key(w) == key(d));
            if !keep {
                removed.push(r.clone());
            }
            keep
        });
        for rule in next.rules.iter_mut().filter(|r| mine(r)) {
            let before = rule.spec.clone();
            let RuleSpec::Docker(d) = &mut rule.spec else {
                continue;
            };
            if let Some(w) = wanted.iter().find(|w| key(w) == key(d)) {
                if w != d {
                    *d = w.clone();
                    moved.push((rule.id, before));
                }
            }
        }
        let mut added: Vec<(Rule, Vec<reserve::Reservation>)> = Vec::new();
        for w in wanted {
            if next.rules.iter().any(|r| matches!(&r.spec, RuleSpec::Docker(d) if d.auto.is_some() && key(d) == key(&w) && mine(r))) {
                continue;
            }
            let spec = RuleSpec::Docker(w.clone());
            if let Err(f) = self.check_addresses(&spec) {
                problems.push(format!("{}: {}", w.name, f.message));
                continue;
            }
            let claims = spec.port_claims();
            let owner = next.rules.iter().find(|r| {
                r.spec
                    .port_claims()
                    .iter()
                    .any(|o| claims.iter().any(|c| reserve::claims_collide(c, o)))
            });
            if let Some(owner) = owner {
                problems.push(format!(
                    "conflict: {} ({label}={}) wants host port {}/{}, which {} holds; the \
                     existing mapping wins, and {} gets the port as soon as it is free",
                    w.name,
                    label_of(&containers, &w.name),
                    w.host_ports(),
                    w.proto,
                    holder(owner),
                    w.name
                ));
                continue;
            }
            let first = added.iter().find(|(r, _)| {
                r.spec
                    .port_claims()
                    .iter()
                    .any(|o| claims.iter().any(|c| reserve::claims_collide(c, o)))
            });
            if let Some((first, _)) = first {
                let RuleSpec::Docker(other) = &first.spec else {
                    continue;
                };
                problems.push(format!(
                    "conflict: {} ({label}={}) and {} ({label}={}) both want host port {}/{} \
                     on engine {engine_name}; {} has it",
                    w.name,
                    label_of(&containers, &w.name),
                    other.name,
                    label_of(&containers, &other.name),
                    w.host_ports(),
                    w.proto,
                    other.name
                ));
                continue;
            }
            // A stopped local container holds no port (see `hold_while_up`).
            let reserved = if !w.external && !w.is_up() {
                Ok(Vec::new())
            } else {
                reserve::bind_all(&claims)
            };
            match reserved {
                Ok(held) => {
                    let rule = Rule {
                        id: next.next_id,
                        spec,
                    };
                    next.next_id += 1;
                    next.rules.push(rule.clone());
                    added.push((rule, held));
                }
                Err(busy) => problems.push(format!("{}: {}", w.name, busy.message)),
            }
        }
        for p in &problems {
            if !self
                .discovery
                .problems
                .get(&engine_name)
                .is_some_and(|old| old.contains(p))
            {
                tracing::warn!(engine = %engine_name, "{p}");
            }
        }
        self.discovery
            .problems
            .insert(engine_name.clone(), problems);
        if added.is_empty() && removed.is_empty() && moved.is_empty() {
            return;
        }
        if let Err(f) = self.commit(next) {
            tracing::error!(engine = %engine_name, "cannot apply auto-discovered mappings: {}", f.message);
            return;
        }
        for (rule, held) in added {
            if !held.is_empty() {
                self.ports.held.insert(rule.id, held);
            }
            if let Err(f) = self.start_listening(rule.id) {
                tracing::error!(rule = rule.id, "{}", f.message);
            }
            tracing::info!(rule = rule.id, engine = %engine_name, "auto mapping added");
        }
        for rule in &removed {
            self.release(rule.id);
            forget_flows(&rule.spec);
            tracing::info!(rule = rule.id, engine = %engine_name, "auto mapping removed");
        }
        for (id, old) in moved {
            self.repointed(id, &old);
            tracing::info!(rule = id, engine = %engine_name, "auto mapping updated");
        }
    }

    /// Lines for `status`: every engine problem, and stale engines.
    pub(super) fn discovery_problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .discovery
            .problems
            .iter()
            .flat_map(|(engine, ps)| {
                ps.iter()
                    .map(move |p| format!("auto-discover ({engine}): {p}"))
            })
            .collect();
        for (engine, reason) in &self.discovery.stale {
            out.push(format!(
                "auto-discover engine {engine} is unreachable: {reason}"
            ));
        }
        out
    }
}

/// The network an auto mapping uses: the only one, else `bridge`, else the
/// first by name.
fn pick(networks: &[NetworkAddrs]) -> Option<&NetworkAddrs> {
    match networks {
        [only] => Some(only),
        many => many
            .iter()
            .find(|n| n.network == "bridge")
            .or_else(|| many.first()),
    }
}

/// The label value of the container `name` in a snapshot, for messages.
fn label_of(containers: &[LabeledContainer], name: &str) -> String {
    containers
        .iter()
        .find(|c| c.name == name)
        .map_or_else(String::new, |c| c.label.clone())
}

/// Who holds a port, for a conflict message: a labelled container of an
/// engine, or a manual rule.
fn holder(rule: &Rule) -> String {
    match &rule.spec {
        RuleSpec::Docker(d) => match &d.auto {
            Some(a) => format!(
                "container {} of engine {} (natmap rule #{})",
                d.name, a.engine, rule.id
            ),
            None => format!("natmap rule #{} (docker {})", rule.id, d.name),
        },
        other => format!("natmap rule #{} ({})", rule.id, other.kind()),
    }
}

/// The mappings a labelled container asks for on `engine`, and notes about
/// label ports that cannot be mapped.
fn desired_for(
    engine: &EngineConfig,
    c: &LabeledContainer,
    label: &str,
    masquerade: bool,
) -> Result<(Vec<DockerRule>, Vec<String>), String> {
    let mut specs = Vec::new();
    for item in c.label.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let spec: PortSpec = item.parse().map_err(|e| {
            format!(
                "container {}: invalid label {label}={:?}: {e}",
                c.name, c.label
            )
        })?;
        if spec.target_ip.is_some() {
            return Err(format!(
                "container {}: invalid label {label}={:?}: a label maps the container's own ports, not another address",
                c.name, c.label
            ));
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(format!("container {}: label {label} is empty", c.name));
    }
    let mut rules = Vec::new();
    let mut notes = Vec::new();
    for spec in specs {
        let rule = match engine.host_ip {
            None => {
                let net = pick(&c.networks);
                DockerRule {
                    name: c.name.clone(),
                    container_id: Some(c.id.clone()),
                    network: net.map(|n| n.network.clone()),
                    host_ip: spec.host_ip,
                    host_port: spec.host_port,
                    container_port: spec.target_port,
                    port_count: spec.port_count,
                    proto: spec.proto,
                    external: false,
                    target_v4: net.and_then(|n| n.v4).filter(|_| c.running),
                    target_v6: net.and_then(|n| n.v6).filter(|_| c.running),
                    auto: Some(AutoSource {
                        engine: engine.name.to_string(),
                        masquerade: false,
                    }),
                    allow_nonlocal: c.allow_nonlocal,
                }
            }
            Some(node) => {
                let published_as = |private: u16| {
                    c.published
                        .iter()
                        .find(|(p, proto, _)| *p == private && *proto == spec.proto)
                        .map(|(_, _, public)| *public)
                };
                // A range: every port published, at the same offsets.
                let first = published_as(spec.target_port);
                let whole = first.filter(|&public| {
                    (1..spec.port_count).all(|i| {
                        published_as(spec.target_port.saturating_add(i)) == public.checked_add(i)
                    })
                });
                let Some(public) = whole else {
                    if c.running {
                        let ports = PortList::range(
                            spec.target_port,
                            spec.target_port
                                .saturating_add(spec.port_count.saturating_sub(1)),
                        );
                        let how = if spec.port_count > 1 {
                            " as one range of consecutive ports"
                        } else {
                            ""
                        };
                        notes.push(format!(
                            "container {}: label port {ports}/{} is not published{how} on node {} (docker run -p); no mapping",
                            c.name, spec.proto, engine.name
                        ));
                    }
                    continue;
                };
                DockerRule {
                    name: c.name.clone(),
                    container_id: Some(c.id.clone()),
                    network: None,
                    host_ip: spec.host_ip,
                    host_port: spec.host_port,
                    container_port: public,
                    port_count: spec.port_count,
                    proto: spec.proto,
                    external: true,
                    target_v4: c.running.then_some(Endpoint {
                        ip: node,
                        subnet: None,
                    }),
                    target_v6: None,
                    auto: Some(AutoSource {
                        engine: engine.name.to_string(),
                        masquerade,
                    }),
                    allow_nonlocal: c.allow_nonlocal,
                }
            }
        };
        rules.push(rule);
    }
    Ok((rules, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(host_ip: Option<&str>) -> EngineConfig {
        serde_json::from_value(serde_json::json!({
            "name": "node",
            "endpoint": "unix:///var/run/docker.sock",
            "host_ip": host_ip,
        }))
        .unwrap()
    }

    fn container(label: &str, published: Vec<(u16, crate::model::Proto, u16)>) -> LabeledContainer {
        LabeledContainer {
            id: "ab".repeat(32),
            name: "web".into(),
            running: true,
            label: label.into(),
            allow_nonlocal: false,
            networks: vec![NetworkAddrs {
                network: "bridge".into(),
                v4: Some(Endpoint {
                    ip: "172.17.0.2".parse().unwrap(),
                    subnet: None,
                }),
                v6: None,
            }],
            published,
        }
    }

    /// Labels share `docker add`'s parser: a range is one mapping, and a
    /// loopback HOST_IP publishes on loopback only.
    #[test]
    fn a_label_range_is_one_mapping_and_loopback_is_accepted() {
        let c = container("8160-8161:80-81, 127.0.0.1:8152:80/udp", Vec::new());
        let (rules, notes) = desired_for(&engine(None), &c, "natmap.ports", false).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (
                rules[0].host_port,
                rules[0].container_port,
                rules[0].port_count
            ),
            (8160, 80, 2)
        );
        assert!(rules[1].loopback_only());
        let err = desired_for(
            &engine(None),
            &container("8160-8162:80-81", Vec::new()),
            "natmap.ports",
            false,
        )
        .unwrap_err();
        assert!(err.contains("equal length"), "{err}");
    }

    /// On a remote node, a range maps when every port of it is published
    /// at the same offsets; otherwise a note says why not.
    #[test]
    fn a_remote_range_needs_every_port_published_consecutively() {
        use crate::model::Proto::Tcp;
        let node = engine(Some("192.0.2.7"));
        let whole = container("8160-8161:80-81", vec![(80, Tcp, 32080), (81, Tcp, 32081)]);
        let (rules, notes) = desired_for(&node, &whole, "natmap.ports", true).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!((rules[0].container_port, rules[0].port_count), (32080, 2));
        for published in [
            vec![(80, Tcp, 32080)],
            vec![(80, Tcp, 32080), (81, Tcp, 40000)],
        ] {
            let partial = container("8160-8161:80-81", published);
            let (rules, notes) = desired_for(&node, &partial, "natmap.ports", true).unwrap();
            assert!(rules.is_empty());
            assert!(
                notes[0].contains("80-81/tcp is not published as one range"),
                "{notes:?}"
            );
        }
    }
}
