//! Talking to Docker through bollard: container lookups for the engine and
//! the events stream that keeps mappings pointed at the right container.
//!
//! The API version is negotiated with the engine (Debian's docker.io 20.10
//! speaks API 1.41, current engines much newer) instead of assuming bollard's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::{ContainerSummary, EndpointSettings, Port};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::runtime::Handle;

use crate::model::{Endpoint, HostIp, Network};

/// Default Docker socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// How long one Docker API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected Docker client usable from the engine's (non-async) thread.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    runtime: Handle,
    /// Where it is connected, for messages.
    pub endpoint: String,
}

/// What natmap needs to know about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// Whether it is running.
    pub running: bool,
    /// Uses the host's network stack (no address of its own).
    pub host_network: bool,
    /// Docker's network mode (`bridge`, `host`, `none`, `container:ID`, a
    /// network name, …).
    pub network_mode: String,
    /// Its address on each network it is attached to.
    pub networks: Vec<NetworkAddrs>,
}

/// A container's addresses on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAddrs {
    /// Network name.
    pub network: String,
    /// IPv4 address and its network.
    pub v4: Option<Endpoint>,
    /// IPv6 address and its network.
    pub v6: Option<Endpoint>,
}

impl ContainerInfo {
    /// The network a mapping uses: the one asked for, or the only one.
    pub fn pick_network(&self, wanted: Option<&str>) -> Result<&NetworkAddrs, String> {
        if self.host_network {
            return Err(format!(
                "container {} uses the host's network: its ports are already the host's ports",
                self.name
            ));
        }
        if self.network_mode == "none" {
            return Err(format!(
                "container {} has no network (--network none): there is no address to forward to",
                self.name
            ));
        }
        if let Some(other) = self.network_mode.strip_prefix("container:") {
            return Err(format!(
                "container {} shares the network of container {other} (--network container:{other}): \
                 map that container's port instead",
                self.name
            ));
        }
        let names = || {
            self.networks
                .iter()
                .map(|n| n.network.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match wanted {
            Some(w) => self
                .networks
                .iter()
                .find(|n| n.network == w)
                .ok_or_else(|| {
                    format!(
                        "container {} is not attached to network {w} (it is on: {})",
                        self.name,
                        names()
                    )
                }),
            None => match self.networks.as_slice() {
                [only] => Ok(only),
                [] => Err(format!("container {} is attached to no network", self.name)),
                _ => Err(format!(
                    "container {} is on several networks ({}); choose one with --network",
                    self.name,
                    names()
                )),
            },
        }
    }
}

/// A lookup's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The container exists.
    Found(ContainerInfo),
    /// No such container.
    NotFound,
    /// An id prefix that several containers share: their names and short ids.
    Ambiguous(Vec<String>),
}

impl DockerClient {
    /// Connects to the Docker socket and negotiates the API version.
    pub async fn connect(socket: &Path) -> Result<DockerClient, String> {
        let endpoint = socket.display().to_string();
        let docker = Docker::connect_with_unix(
            &endpoint,
            CALL_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        );
        DockerClient::negotiate(docker, endpoint).await
    }

    /// Connects to a configured engine (Unix socket or plain TCP).
    pub async fn connect_endpoint(
        endpoint: &crate::config::Endpoint,
    ) -> Result<DockerClient, String> {
        match endpoint {
            crate::config::Endpoint::Unix(path) => DockerClient::connect(path).await,
            crate::config::Endpoint::Tcp(addr) => {
                let url = format!("tcp://{addr}");
                let docker = Docker::connect_with_http(
                    &url,
                    CALL_TIMEOUT.as_secs(),
                    bollard::API_DEFAULT_VERSION,
                );
                DockerClient::negotiate(docker, url).await
            }
        }
    }

    /// Negotiates the API version with the engine (Debian's 20.10 speaks
    /// 1.41; bollard's default is newer), bounded in time.
    async fn negotiate(
        docker: Result<Docker, bollard::errors::Error>,
        endpoint: String,
    ) -> Result<DockerClient, String> {
        let docker = docker.map_err(|e| format!("cannot connect to Docker at {endpoint}: {e}"))?;
        let docker = tokio::time::timeout(CALL_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| format!("Docker at {endpoint} did not answer"))?
            .map_err(|e| format!("cannot reach Docker at {endpoint}: {e}"))?;
        Ok(DockerClient {
            docker,
            runtime: Handle::current(),
            endpoint,
        })
    }

    /// Every container (running or not) carrying `label`, with its label
    /// value, address and published ports: one API call.
    pub async fn labeled(&self, label: &str) -> Result<Vec<LabeledContainer>, String> {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![label.to_owned()]);
        let call = self.docker.list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }));
        let list = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| "Docker did not answer in time".to_owned())?
            .map_err(|e| format!("Docker: {e}"))?;
        Ok(list
            .into_iter()
            .map(|c| labeled_container(c, label))
            .collect())
    }

    /// Looks a container up by full id, id prefix or name. Blocks: call it
    /// from the engine's thread, never from async code.
    pub fn inspect_blocking(&self, reference: &str) -> Result<Lookup, String> {
        self.runtime.block_on(self.inspect(reference))
    }

    /// Looks a container up by full id, id prefix or name.
    pub async fn inspect(&self, reference: &str) -> Result<Lookup, String> {
        let docker = self.docker.clone();
        let reference = reference.to_owned();
        {
            let call = docker.inspect_container(&reference, None::<InspectContainerOptions>);
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Err(_) => Err("Docker did not answer in time".to_owned()),
                Ok(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })) => Ok(Lookup::NotFound),
                // Docker's only signal for an ambiguous prefix is its message.
                Ok(Err(bollard::errors::Error::DockerResponseServerError { message, .. }))
                    if message.to_ascii_lowercase().contains("multiple ids") =>
                {
                    Ok(Lookup::Ambiguous(candidates(&docker, &reference).await))
                }
                Ok(Err(e)) => Err(format!("Docker: {e}")),
                Ok(Ok(c)) => Ok(Lookup::Found(container_info(c))),
            }
        }
    }

    /// The runtime the client's calls run on.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// The container events stream (start, die, destroy, network changes, …).
    pub fn events(&self) -> impl futures_util::Stream<Item = Result<Event, String>> + use<> {
        let mut filters = HashMap::new();
        filters.insert(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        );
        self.docker
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .map(|item| {
                item.map_err(|e| e.to_string()).map(|m| {
                    let attrs = m
                        .actor
                        .as_ref()
                        .and_then(|a| a.attributes.clone())
                        .unwrap_or_default();
                    let actor_id = m.actor.and_then(|a| a.id).unwrap_or_default();
                    let is_network = m.typ.map(|t| t.to_string() == "network").unwrap_or(false);
                    Event {
                        action: m.action.unwrap_or_default(),
                        // Network events name the container in an attribute.
                        container_id: if is_network {
                            attrs.get("container").cloned().unwrap_or_default()
                        } else {
                            actor_id
                        },
                        name: if is_network {
                            None
                        } else {
                            attrs.get("name").cloned()
                        },
                    }
                })
            })
    }
}

/// A listed container carrying `label`, as auto-discovery reads it.
fn labeled_container(c: ContainerSummary, label: &str) -> LabeledContainer {
    LabeledContainer {
        id: c.id.unwrap_or_default(),
        name: c
            .names
            .and_then(|n| n.into_iter().next())
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
        allow_nonlocal: c
            .labels
            .as_ref()
            .and_then(|l| l.get(&format!("{label}.allow_nonlocal")))
            .is_some_and(|v| v == "true"),
        label: c
            .labels
            .and_then(|mut l| l.remove(label))
            .unwrap_or_default(),
        networks: network_addrs(c.network_settings.and_then(|n| n.networks)),
        published: c
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(published_port)
            .collect(),
    }
}

/// A container's addresses on each of its networks (as listed or inspected).
fn network_addrs(networks: Option<HashMap<String, EndpointSettings>>) -> Vec<NetworkAddrs> {
    networks
        .unwrap_or_default()
        .into_iter()
        .map(|(network, ep)| NetworkAddrs {
            v4: endpoint(ep.ip_address, ep.ip_prefix_len),
            v6: endpoint(ep.global_ipv6_address, ep.global_ipv6_prefix_len),
            network,
        })
        .collect()
}

/// A published port as (container port, protocol, host port); none for an
/// unknown protocol, an IPv6 binding (host_ip is the node's address, and
/// only IPv4 or wildcard bindings count) or a port not published.
fn published_port(p: Port) -> Option<(u16, crate::model::Proto, u16)> {
    let proto = match p.typ.map(|t| t.to_string()).as_deref() {
        Some("udp") => crate::model::Proto::Udp,
        Some("tcp") | None => crate::model::Proto::Tcp,
        Some(_) => return None,
    };
    if p.ip.as_deref().is_some_and(|ip| ip.contains(':')) {
        return None;
    }
    Some((p.private_port, proto, p.public_port?))
}

/// A container carrying the auto-discover label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledContainer {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// Whether it runs.
    pub running: bool,
    /// The label's value (mapping specs).
    pub label: String,
    /// `LABEL.allow_nonlocal=true`: its HOST_IPs may be addresses that
    /// arrive later (a VIP), as `docker add --allow-nonlocal`.
    pub allow_nonlocal: bool,
    /// Its addresses.
    pub networks: Vec<NetworkAddrs>,
    /// Published ports: (container port, protocol, host port).
    pub published: Vec<(u16, crate::model::Proto, u16)>,
}

/// One Docker event about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened: `start`, `die`, `destroy`, `connect`, …
    pub action: String,
    /// The container's full id.
    pub container_id: String,
    /// Its name, when the event carries it.
    pub name: Option<String>,
}

impl Event {
    /// Whether the event can change where a mapping should point.
    pub fn matters(&self) -> bool {
        matches!(
            self.action.as_str(),
            "start"
                | "restart"
                | "die"
                | "stop"
                | "kill"
                | "destroy"
                | "rename"
                | "connect"
                | "disconnect"
                | "unpause"
                | "pause"
        )
    }
}

fn container_info(c: bollard::models::ContainerInspectResponse) -> ContainerInfo {
    let mut networks = network_addrs(c.network_settings.and_then(|s| s.networks));
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    let network_mode = c
        .host_config
        .and_then(|h| h.network_mode)
        .unwrap_or_default();
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        running: c.state.and_then(|s| s.running).unwrap_or(false),
        host_network: network_mode == "host",
        network_mode,
        networks,
    }
}

/// The containers whose id starts with `prefix`: `name (short id)`.
async fn candidates(docker: &Docker, prefix: &str) -> Vec<String> {
    let mut filters = HashMap::new();
    filters.insert("id".to_owned(), vec![prefix.to_owned()]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    let Ok(Ok(list)) =
        tokio::time::timeout(CALL_TIMEOUT, docker.list_containers(Some(options))).await
    else {
        return vec!["(Docker did not list them)".to_owned()];
    };
    let mut found: Vec<String> = list
        .into_iter()
        .map(|c| {
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or_default();
            let id: String = c.id.unwrap_or_default().chars().take(12).collect();
            format!("{} ({id})", name.trim_start_matches('/'))
        })
        .collect();
    found.sort();
    found
}

/// A container address and its network, from Docker's strings.
fn endpoint(addr: Option<String>, prefix: Option<i64>) -> Option<Endpoint> {
    let ip: IpAddr = addr.filter(|a| !a.is_empty())?.parse().ok()?;
    let host = HostIp::parse_field("container address", &ip.to_string()).ok()?;
    let subnet = prefix
        .and_then(|p| u8::try_from(p).ok())
        .and_then(|p| Network::new(ip, p));
    Some(Endpoint { ip: host, subnet })
}

/// The socket path from a `--docker-socket` value (`unix://` accepted).
pub fn socket_path(value: &str) -> PathBuf {
    PathBuf::from(value.strip_prefix("unix://").unwrap_or(value))
}
