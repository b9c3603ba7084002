//! The loopback relay: the host's own connections to 127.0.0.1 / ::1 on a
//! published port, relayed to the mapping's target.
//!
//! Kernel DNAT cannot forward a loopback connection to another host: the
//! kernel drops 127.0.0.0/8-sourced packets on the wire unless
//! `route_localnet` is on, which re-opens CVE-2020-8558. So, as Docker's
//! userland proxy does, the daemon relays loopback connections itself: TCP
//! streams and UDP datagrams (one upstream socket per client, closed when
//! idle).
//!
//! The relay serves loopback and nothing else (design §4). Its sockets are
//! bound to 127.0.0.1 or ::1, beside the port's reservation (see
//! `daemon::reserve`), and it drops any peer that is not itself on loopback.
//! A mapping published on a loopback address only (`127.0.0.1:8080:80`) is
//! served by the relay alone: no kernel rule forwards it, so it is
//! reachable on that address and nowhere else. Its UDP ports are read
//! through the reservation itself (one socket, not a second one beside it).
//! Connections to the host's other addresses never reach it: the kernel's
//! rules translate them, or the reservation refuses them like a closed port.
//! A mapping without a confirmed target has no relay socket at all, so
//! loopback gets "connection refused" too.
//!
//! Bounds: one cap on relayed connections and UDP clients across all rules
//! (each costs descriptors), an idle timeout on TCP connections, and
//! stopping a rule's relay cuts its connections, as a removed or moved
//! mapping's conntrack entries are cut.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::model::{PortClaim, Proto, RuleId};

use super::reserve::{self, LoopbackSocket};

/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client with no traffic for this long loses its upstream socket.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// The relay's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// A relayed TCP connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// Relayed TCP connections plus UDP clients, across every rule.
    pub max_connections: usize,
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits {
            idle_timeout: Duration::from_secs(300),
            max_connections: 1024,
        }
    }
}

/// The relay tasks of every rule that serves loopback.
pub struct Relays {
    runtime: Option<Handle>,
    limits: RelayLimits,
    /// Shared by every rule: the global cap.
    permits: Arc<Semaphore>,
    tasks: BTreeMap<RuleId, Vec<JoinHandle<()>>>,
}

impl Relays {
    /// Relays run on `runtime`, within `limits`.
    pub fn new(runtime: Handle, limits: RelayLimits) -> Relays {
        Relays {
            runtime: Some(runtime),
            limits,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            tasks: BTreeMap::new(),
        }
    }

    /// No relaying (unit tests of the engine).
    pub fn disabled() -> Relays {
        Relays {
            runtime: None,
            limits: RelayLimits::default(),
            permits: Arc::new(Semaphore::new(0)),
            tasks: BTreeMap::new(),
        }
    }

    /// (Re)starts the rule's relay: the loopback address of each claim that
    /// covers one (a wildcard or loopback bind) relays to the claim's
    /// target. Existing relayed connections are cut first. A claim without
    /// a target (a down mapping, a container without an address of that
    /// family) gets no relay, so its loopback is refused too. `held` are
    /// the rule's reservations: a UDP port reserved on a loopback address
    /// is served through its reservation itself (see
    /// [`reserve::Reservation::open_udp_for_relay`]).
    pub fn serve(
        &mut self,
        id: RuleId,
        claims: &[PortClaim],
        held: &[reserve::Reservation],
    ) -> std::io::Result<()> {
        self.stop(id);
        let Some(rt) = self.runtime.clone() else {
            return Ok(());
        };
        // Inside the runtime: sockets are registered with its reactor.
        let _guard = rt.enter();
        let mut handles = Vec::new();
        for claim in claims {
            match self.relay_claim(&rt, claim, held) {
                Ok(Some(handle)) => handles.push(handle),
                Ok(None) => {}
                Err(e) => {
                    self.tasks.insert(id, handles);
                    self.stop(id);
                    return Err(e);
                }
            }
        }
        self.tasks.insert(id, handles);
        Ok(())
    }

    /// Starts the relay of one claim, if it covers a loopback address and
    /// has a target: through its own reservation (a UDP port reserved on a
    /// loopback address), else on a loopback socket of its own.
    fn relay_claim(
        &self,
        rt: &Handle,
        claim: &PortClaim,
        held: &[reserve::Reservation],
    ) -> std::io::Result<Option<JoinHandle<()>>> {
        let Some(lo) = loopback_of(claim.bind) else {
            return Ok(None);
        };
        if claim.target.ip().is_unspecified() {
            return Ok(None);
        }
        let to = claim.target;
        let own = held.iter().find(|r| {
            claim.proto == Proto::Udp
                && claim.bind.ip().is_loopback()
                && r.claim.bind == claim.bind
                && r.claim.proto == claim.proto
        });
        if let Some(reservation) = own {
            let shared = self.shared();
            let socket = Arc::new(UdpSocket::from_std(reservation.open_udp_for_relay()?)?);
            // Dropped with the task (polled or not) when the relay
            // stops: the port answers nothing again.
            let refilter = Refilter(socket.clone());
            return Ok(Some(rt.spawn(async move {
                let _refilter = refilter;
                relay_udp(socket, to, shared).await
            })));
        }
        Ok(Some(match reserve::bind_loopback(claim.proto, lo)? {
            LoopbackSocket::Tcp(l) => {
                let relay = relay_tcp(TcpListener::from_std(l)?, to, self.shared());
                rt.spawn(relay)
            }
            LoopbackSocket::Udp(s) => {
                let relay = relay_udp(Arc::new(UdpSocket::from_std(s)?), to, self.shared());
                rt.spawn(relay)
            }
        }))
    }

    /// Stops the rule's relay and cuts its connections. Returns once its
    /// sockets are closed, so the port can be bound again right away.
    pub fn stop(&mut self, id: RuleId) {
        let Some(handles) = self.tasks.remove(&id) else {
            return;
        };
        for h in &handles {
            h.abort();
        }
        if let Some(rt) = &self.runtime {
            // The engine runs on its own thread, never inside the runtime.
            rt.block_on(async {
                for h in handles {
                    let _ = h.await;
                }
            });
        }
    }

    fn shared(&self) -> Shared {
        Shared {
            permits: self.permits.clone(),
            idle: self.limits.idle_timeout,
        }
    }
}

/// What every relay task of the daemon shares.
#[derive(Clone)]
struct Shared {
    permits: Arc<Semaphore>,
    idle: Duration,
}

/// The loopback address a claim's relay listens on: the claim's own when it
/// is loopback, the family's loopback for a wildcard, none otherwise.
fn loopback_of(bind: SocketAddr) -> Option<SocketAddr> {
    let ip = bind.ip();
    if ip.is_loopback() {
        return Some(bind);
    }
    if !ip.is_unspecified() {
        return None;
    }
    let lo = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    Some(SocketAddr::new(lo, bind.port()))
}

async fn relay_tcp(listener: TcpListener, target: SocketAddr, shared: Shared) {
    // Dropped with this task when the rule's relay stops: cuts every connection.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::debug!("relay accept on {target}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Bound to loopback, so only this host can connect; checked anyway.
        if !peer.ip().is_loopback() {
            continue;
        }
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            tracing::warn!("relay limit reached; refusing a loopback connection to {target}");
            continue;
        };
        connections.spawn(relay_one(client, target, shared.idle, permit));
    }
}

/// Relays one accepted loopback connection until both sides are done or it
/// has been idle for `idle`.
async fn relay_one(
    client: TcpStream,
    target: SocketAddr,
    idle: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => return tracing::debug!("relay to {target}: {e}"),
        Err(_) => return tracing::debug!("relay to {target}: connect timed out"),
    };
    if let Err(e) = pipe(client, upstream, idle).await {
        tracing::debug!("relay to {target}: {e}");
    }
}

/// Buffer per direction of a relayed TCP connection. 16 KiB per direction,
/// and one direction waiting while the other wrote, moved about half of
/// docker-proxy's loopback throughput (`scripts/parity.sh`).
const PIPE_BUFFER: usize = 64 * 1024;

/// Copies both ways at once, with half-close, until both directions ended;
/// any stretch of `idle` without a byte read either way ends it.
async fn pipe(a: TcpStream, b: TcpStream, idle: Duration) -> std::io::Result<()> {
    let activity = Activity::new();
    let (mut a, mut b) = (activity.track(a), activity.track(b));
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PIPE_BUFFER, PIPE_BUFFER);
    tokio::pin!(copy);
    // One timer, moved forward only when it fires: re-arming a timer per
    // read cost more than the copy itself on small reads.
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::select! {
            done = &mut copy => return done.map(|_| ()),
            _ = tokio::time::sleep_until(deadline.into()) => {
                let quiet_until = activity.last() + idle;
                if quiet_until <= Instant::now() {
                    tracing::debug!("relayed connection idle for {idle:?}; closed");
                    return Ok(());
                }
                deadline = quiet_until;
            }
        }
    }
}

/// When a relayed connection last read a byte, shared by its two streams.
#[derive(Clone)]
struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read that returned data.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn track(&self, stream: TcpStream) -> Tracked {
        Tracked {
            stream,
            activity: self.clone(),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream that records its reads in an [`Activity`].
struct Tracked {
    stream: TcpStream,
    activity: Activity,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Closes a loopback UDP reservation the relay served through its own
/// socket again when dropped (with the relay task): see
/// [`reserve::Reservation::open_udp_for_relay`].
struct Refilter(Arc<UdpSocket>);

impl Drop for Refilter {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        reserve::refilter(self.0.as_fd());
    }
}

/// Aborts its task when dropped: a UDP relay's per-client tasks hold the
/// loopback socket, so they must end with the relay, not when they idle out.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One UDP client of the relay: its upstream socket, reply task and permit.
struct UdpClient {
    upstream: Arc<UdpSocket>,
    replies: AbortOnDrop,
    _permit: OwnedSemaphorePermit,
}

async fn relay_udp(socket: Arc<UdpSocket>, target: SocketAddr, shared: Shared) {
    let mut clients: HashMap<SocketAddr, UdpClient> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !client.ip().is_loopback() {
            continue;
        }
        clients.retain(|_, c| !c.replies.0.is_finished());
        if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry(client) {
            let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
                continue;
            };
            let Some(upstream) = connect_udp(target).await else {
                continue;
            };
            let task = tokio::spawn(udp_replies(upstream.clone(), socket.clone(), client));
            slot.insert(UdpClient {
                upstream,
                replies: AbortOnDrop(task),
                _permit: permit,
            });
        }
        if let Some(c) = clients.get(&client) {
            let _ = c.upstream.send(&buf[..n]).await;
        }
    }
}

/// A fresh socket connected to `target`.
async fn connect_udp(target: SocketAddr) -> Option<Arc<UdpSocket>> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = UdpSocket::bind(any).await.ok()?;
    upstream.connect(target).await.ok()?;
    Some(Arc::new(upstream))
}

/// Sends the target's replies back to one client until it has been idle.
async fn udp_replies(upstream: Arc<UdpSocket>, listener: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = listener.send_to(&buf[..n], client).await;
    }
}
