//! Talking to Docker through bollard: container lookups for the engine and
//! the events stream that keeps mappings pointed at the right container.
//!
//! The API version is negotiated with the engine (Debian's docker.io 20.10
//! speaks API 1.41, current engines much newer) instead of assuming bollard's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::query_parameters::{EventsOptions, InspectContainerOptions};
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
}

impl DockerClient {
    /// Connects to the Docker socket and negotiates the API version.
    pub async fn connect(socket: &Path) -> Result<DockerClient, String> {
        let endpoint = socket.display().to_string();
        let docker = Docker::connect_with_unix(
            &endpoint,
            CALL_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| format!("cannot connect to Docker at {endpoint}: {e}"))?;
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

    /// Looks a container up by full id, id prefix or name. Blocks: call it
    /// from the engine's thread, never from async code.
    pub fn inspect_blocking(&self, reference: &str) -> Result<Lookup, String> {
        let docker = self.docker.clone();
        let reference = reference.to_owned();
        self.runtime.block_on(async move {
            let call = docker.inspect_container(&reference, None::<InspectContainerOptions>);
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Err(_) => Err("Docker did not answer in time".to_owned()),
                Ok(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })) => Ok(Lookup::NotFound),
                Ok(Err(e)) => Err(format!("Docker: {e}")),
                Ok(Ok(c)) => Ok(Lookup::Found(container_info(c))),
            }
        })
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
    let networks = c
        .network_settings
        .and_then(|s| s.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(network, ep)| {
            let endpoint = |addr: Option<String>, prefix: Option<i64>| {
                let ip: IpAddr = addr.filter(|a| !a.is_empty())?.parse().ok()?;
                let host = HostIp::parse_field("container address", &ip.to_string()).ok()?;
                let subnet = prefix
                    .and_then(|p| u8::try_from(p).ok())
                    .and_then(|p| Network::new(ip, p));
                Some(Endpoint { ip: host, subnet })
            };
            NetworkAddrs {
                v4: endpoint(ep.ip_address, ep.ip_prefix_len),
                v6: endpoint(ep.global_ipv6_address, ep.global_ipv6_prefix_len),
                network,
            }
        })
        .collect::<Vec<_>>();
    let mut networks = networks;
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        running: c.state.and_then(|s| s.running).unwrap_or(false),
        host_network: c
            .host_config
            .and_then(|h| h.network_mode)
            .is_some_and(|m| m == "host"),
        networks,
    }
}

/// The socket path from a `--docker-socket` value (`unix://` accepted).
pub fn socket_path(value: &str) -> PathBuf {
    PathBuf::from(value.strip_prefix("unix://").unwrap_or(value))
}
