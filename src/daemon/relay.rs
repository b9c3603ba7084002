//! User-space relay on reserved sockets.
//!
//! Kernel DNAT cannot forward a loopback connection to another host: the
//! kernel drops 127.0.0.0/8-sourced packets on the wire unless
//! `route_localnet` is on, which re-opens CVE-2020-8558. The daemon already
//! holds a socket on every forwarded port, and only traffic that no DNAT rule
//! caught reaches it, which is loopback traffic. So it relays what arrives
//! there to the rule's target, as Docker's userland proxy does: TCP streams
//! and UDP datagrams (one upstream socket per client, closed when idle).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::model::RuleId;

use super::reserve::{HeldSocket, Reservation};

/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client with no traffic for this long loses its upstream socket.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Bound on concurrent relayed TCP connections per port.
const MAX_TCP_PER_PORT: usize = 512;
/// Bound on concurrent UDP clients per port.
const MAX_UDP_CLIENTS: usize = 1024;

/// Where a rule's relays send traffic; changes when a container moves.
type TargetCell = Arc<RwLock<Option<IpAddr>>>;

/// The relay tasks of every active rule.
pub struct Relays {
    runtime: Option<Handle>,
    tasks: BTreeMap<RuleId, (Vec<AbortHandle>, TargetCell)>,
}

impl Relays {
    /// Relays run on `runtime`.
    pub fn new(runtime: Handle) -> Relays {
        Relays {
            runtime: Some(runtime),
            tasks: BTreeMap::new(),
        }
    }

    /// No relaying (unit tests of the engine).
    pub fn disabled() -> Relays {
        Relays {
            runtime: None,
            tasks: BTreeMap::new(),
        }
    }

    /// Starts relaying on the rule's listening sockets to `target` (the
    /// port of each socket's claim); `None` refuses connections.
    pub fn start(&mut self, id: RuleId, held: &[Reservation], target: Option<IpAddr>) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        let _guard = rt.enter();
        let cell: TargetCell = Arc::new(RwLock::new(target));
        let mut handles = Vec::new();
        for r in held {
            let port = r.claim.target.port();
            let to = Target {
                cell: cell.clone(),
                port,
            };
            let task = match &r.socket {
                HeldSocket::TcpListening(l) => l
                    .try_clone()
                    .and_then(TcpListener::from_std)
                    .map(|l| rt.spawn(relay_tcp(l, to)).abort_handle()),
                HeldSocket::Udp(s) => s
                    .try_clone()
                    .and_then(|s| {
                        s.set_nonblocking(true)?;
                        UdpSocket::from_std(s)
                    })
                    .map(|s| rt.spawn(relay_udp(Arc::new(s), to)).abort_handle()),
                HeldSocket::TcpBound(_) => continue,
            };
            match task {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!(rule = id, "cannot relay on {}: {e}", r.claim.bind),
            }
        }
        self.stop(id);
        self.tasks.insert(id, (handles, cell));
    }

    /// Points the rule's relays at a new address (a container moved).
    pub fn retarget(&mut self, id: RuleId, target: Option<IpAddr>) {
        if let Some((_, cell)) = self.tasks.get(&id) {
            *cell.write().unwrap_or_else(|e| e.into_inner()) = target;
        }
    }

    /// Stops the rule's relays (their socket copies close with them).
    pub fn stop(&mut self, id: RuleId) {
        if let Some((handles, _)) = self.tasks.remove(&id) {
            for h in handles {
                h.abort();
            }
        }
    }
}

/// A relay's destination: the rule's current address and this socket's port.
#[derive(Clone)]
struct Target {
    cell: TargetCell,
    port: u16,
}

impl Target {
    fn get(&self) -> Option<SocketAddr> {
        let ip = *self.cell.read().unwrap_or_else(|e| e.into_inner());
        ip.map(|ip| SocketAddr::new(ip, self.port))
    }
}

async fn relay_tcp(listener: TcpListener, to: Target) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_PER_PORT));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue; // over the bound: drop the connection
        };
        let Some(target) = to.get() else {
            continue; // the target is down: refuse by closing
        };
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(mut upstream)) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Ok(Err(e)) => tracing::debug!("relay to {target}: {e}"),
                Err(_) => tracing::debug!("relay to {target}: connect timed out"),
            }
        });
    }
}

/// Aborts its task when dropped: a UDP relay's per-client tasks hold the
/// reserved socket, so they must end with the relay, not when they idle out.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn relay_udp(socket: Arc<UdpSocket>, to: Target) {
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, AbortOnDrop)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        clients.retain(|_, (_, task)| !task.0.is_finished());
        let Some(target) = to.get() else {
            continue;
        };
        if clients
            .get(&client)
            .is_some_and(|(up, _)| up.peer_addr().ok() != Some(target))
        {
            // The target moved: this client gets a fresh upstream socket.
            clients.remove(&client);
        }
        if !clients.contains_key(&client) {
            if clients.len() >= MAX_UDP_CLIENTS {
                continue;
            }
            let bind: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let Ok(upstream) = UdpSocket::bind(bind).await else {
                continue;
            };
            if upstream.connect(target).await.is_err() {
                continue;
            }
            let upstream = Arc::new(upstream);
            let task = tokio::spawn(udp_replies(upstream.clone(), socket.clone(), client));
            clients.insert(client, (upstream, AbortOnDrop(task)));
        }
        if let Some((upstream, _)) = clients.get(&client) {
            let _ = upstream.send(&buf[..n]).await;
        }
    }
}

/// Sends the target's replies back to one client until it has been idle.
async fn udp_replies(upstream: Arc<UdpSocket>, listener: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = listener.send_to(&buf[..n], client).await;
    }
}
