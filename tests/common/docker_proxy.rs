//! A proxy in front of the host's Docker socket, to make Docker unavailable,
//! slow or hanging for the daemon and bring it back without touching the
//! engine. One implementation with two fronts: a Unix socket
//! ([`DockerProxy`], for `--docker-socket`) and a loopback TCP port in the
//! root namespace or a test namespace ([`TcpDockerProxy`], for a remote
//! engine's `endpoint`). Both forward to [`DOCKER_SOCKET`], a filesystem
//! path and so reachable from every namespace.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use super::docker::{sa, DOCKER_SOCKET};
use super::*;

/// The proxy both fronts share: [`SocketProxy::stop`] stops listening and
/// cuts every relayed connection (so the daemon's events stream ends),
/// [`SocketProxy::start`] listens at the same place again; the `set_*`
/// knobs change how new connections are treated.
pub struct SocketProxy {
    front: Front,
    running: Option<ProxyRun>,
    knobs: Arc<Knobs>,
}

/// Where a proxy listens.
enum Front {
    /// A socket file in a temporary directory (removed with the proxy).
    Unix {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    /// A loopback TCP address in the namespace at `netns` (`None`: the
    /// test process's own).
    Tcp {
        addr: SocketAddr,
        netns: Option<PathBuf>,
    },
}

/// How new connections are treated; shared with the proxy's threads.
#[derive(Default)]
struct Knobs {
    /// Milliseconds each new connection waits before it is relayed.
    delay_ms: AtomicU64,
    /// Milliseconds each chunk a client sends (a request, also on a
    /// kept-alive connection) waits before it reaches Docker.
    request_delay_ms: AtomicU64,
    /// New connections are held open and never relayed.
    hang: AtomicBool,
    /// New connections are closed at once.
    close: AtomicBool,
    /// When each connection was accepted, over every start.
    accept_times: Mutex<Vec<Instant>>,
}

struct ProxyRun {
    stop: Arc<AtomicBool>,
    /// Every relayed or held stream (both ends), shut down by stop().
    conns: Arc<Mutex<Vec<Stream>>>,
    accepted: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

/// One end of a relayed connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A blocking stream to the accepted client.
    fn accept(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Stream::Unix(s)
            }
        })
    }
}

/// Binds a TCP listener to `addr` in the namespace at `netns` (the
/// caller's namespace if `None`), from a thread that entered it: the
/// listener stays in that namespace whichever thread uses it later.
fn bind_tcp_in(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<TcpListener> {
    match netns {
        None => TcpListener::bind(addr),
        Some(path) => std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(path)?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                TcpListener::bind(addr)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))
        }),
    }
}

impl SocketProxy {
    fn new(front: Front) -> SocketProxy {
        SocketProxy {
            front,
            running: None,
            knobs: Arc::default(),
        }
    }

    /// Makes every request wait `delay` before it reaches Docker, also on
    /// connections the client keeps open (a Docker engine that hangs).
    pub fn set_request_delay(&self, delay: Duration) {
        self.knobs
            .request_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Makes every new connection wait `delay` before it is relayed (a slow
    /// Docker engine); zero by default.
    pub fn set_delay(&self, delay: Duration) {
        self.knobs
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// `true`: new connections are accepted and held open, never relayed
    /// (a hanging engine). Connections already relayed keep working.
    pub fn set_hang(&self, hang: bool) {
        self.knobs.hang.store(hang, Ordering::Relaxed);
    }

    /// `true`: new connections are accepted and closed at once, unanswered
    /// (an engine that fails fast). Connections already relayed keep working.
    pub fn set_close(&self, close: bool) {
        self.knobs.close.store(close, Ordering::Relaxed);
    }

    /// When each connection was accepted (since the proxy was created).
    pub fn accept_times(&self) -> Vec<Instant> {
        self.knobs
            .accept_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True while listening.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Connections accepted since the last start.
    pub fn accepted(&self) -> usize {
        self.running
            .as_ref()
            .map_or(0, |r| r.accepted.load(Ordering::Relaxed))
    }

    /// Listens at its place again: the socket file (replaced if left over),
    /// or the TCP port (the bind is retried for up to 5 s, as a just-closed
    /// listener's port may not be free at once).
    fn listen(&self) -> Listener {
        match &self.front {
            Front::Unix { path, .. } => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .unwrap_or_else(|e| panic!("proxy bind {}: {e}", path.display()));
                l.set_nonblocking(true).expect("set_nonblocking");
                Listener::Unix(l)
            }
            Front::Tcp { addr, netns } => {
                let deadline = Instant::now() + Duration::from_secs(5);
                let l = loop {
                    match bind_tcp_in(netns.as_deref(), *addr) {
                        Ok(l) => break l,
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => panic!("TcpDockerProxy: bind {addr} in {netns:?}: {e}"),
                    }
                };
                l.set_nonblocking(true).expect("set_nonblocking");
                Listener::Tcp(l)
            }
        }
    }

    /// Starts listening (no-op if running).
    pub fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let listener = self.listen();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Stream>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, conns, accepted) = (stop.clone(), conns.clone(), accepted.clone());
            let knobs = self.knobs.clone();
            std::thread::Builder::new()
                .name("docker-proxy".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok(client) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                knobs
                                    .accept_times
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(Instant::now());
                                serve(client, &stop, &conns, &knobs);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(10))
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                    // The listener is dropped here: new connections are refused.
                })
                .expect("spawn proxy thread")
        };
        self.running = Some(ProxyRun {
            stop,
            conns,
            accepted,
            thread,
        });
    }

    /// Stops listening (a Unix front also removes its socket file) and cuts
    /// every relayed or held connection (no-op if stopped).
    pub fn stop(&mut self) {
        let Some(run) = self.running.take() else {
            return;
        };
        run.stop.store(true, Ordering::Relaxed);
        let _ = run.thread.join();
        if let Front::Unix { path, .. } = &self.front {
            let _ = std::fs::remove_file(path);
        }
        for s in run
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Handles one accepted connection as the knobs say: close it, hold it, or
/// relay it to Docker (after the connection delay) on its own threads.
fn serve(
    client: Stream,
    stop: &Arc<AtomicBool>,
    conns: &Arc<Mutex<Vec<Stream>>>,
    knobs: &Arc<Knobs>,
) {
    if knobs.close.load(Ordering::Relaxed) {
        client.shutdown(Shutdown::Both);
        return;
    }
    if knobs.hang.load(Ordering::Relaxed) {
        // Held open, never answered, cut by stop().
        conns.lock().unwrap_or_else(|e| e.into_inner()).push(client);
        return;
    }
    let delay = Duration::from_millis(knobs.delay_ms.load(Ordering::Relaxed));
    let (stop, conns, knobs) = (stop.clone(), conns.clone(), knobs.clone());
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let Ok(server) = UnixStream::connect(DOCKER_SOCKET) else {
            return; // the client sees EOF
        };
        let server = Stream::Unix(server);
        {
            let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
            // Registered under the lock stop() drains with, so a stopped
            // proxy relays nothing new.
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                c.push(a);
                c.push(b);
            }
        }
        relay(client, server, knobs);
    });
}

/// Copies both directions between the client and Docker on two threads;
/// when one direction ends, the other side's write half is shut down. What
/// the client sends waits the knobs' request delay per chunk.
fn relay(client: Stream, server: Stream, knobs: Arc<Knobs>) {
    let pipe = |mut from: Stream, mut to: Stream, delay: Option<Arc<Knobs>>| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(k) = &delay {
                    let ms = k.request_delay_ms.load(Ordering::Relaxed);
                    if ms > 0 {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            to.shutdown(Shutdown::Write);
            from.shutdown(Shutdown::Read);
        });
    };
    match (client.try_clone(), server.try_clone()) {
        (Ok(client2), Ok(server2)) => {
            pipe(client, server2, Some(knobs));
            pipe(server, client2, None);
        }
        _ => {
            client.shutdown(Shutdown::Both);
            server.shutdown(Shutdown::Both);
        }
    }
}

/// The Unix-socket front: listens on a fresh temporary path, to pass as the
/// daemon's `--docker-socket`. Not started until [`SocketProxy::start`].
pub struct DockerProxy(SocketProxy);

impl DockerProxy {
    /// A proxy to [`DOCKER_SOCKET`] on a fresh temporary path, not started.
    pub fn new() -> DockerProxy {
        let dir = tempfile::Builder::new()
            .prefix("natmap-docker-proxy-")
            .tempdir()
            .expect("tempdir");
        DockerProxy(SocketProxy::new(Front::Unix {
            path: dir.path().join("docker.sock"),
            _dir: dir,
        }))
    }

    /// Where it listens (pass as `--docker-socket`).
    pub fn path(&self) -> &Path {
        match &self.0.front {
            Front::Unix { path, .. } => path,
            Front::Tcp { .. } => unreachable!("a DockerProxy listens on a Unix socket"),
        }
    }
}

impl Default for DockerProxy {
    fn default() -> Self {
        Self::new()
    }
}

/// The TCP front: the host's Docker engine on `127.0.0.1:<port>`, in the
/// root namespace or inside a test namespace, for an engine's `endpoint`.
/// The port is picked when the proxy is made, so the endpoint is known
/// before the first [`SocketProxy::start`] and stays the same over restarts.
pub struct TcpDockerProxy(SocketProxy);

impl TcpDockerProxy {
    /// A proxy on a free loopback port of the root namespace, not started.
    pub fn new() -> TcpDockerProxy {
        Self::new_in(None)
    }

    /// A proxy on 127.0.0.1 inside `ns`, not started.
    pub fn new_in_netns(ns: &Netns) -> TcpDockerProxy {
        Self::new_in(Some(ns.path()))
    }

    fn new_in(netns: Option<PathBuf>) -> TcpDockerProxy {
        let probe = bind_tcp_in(netns.as_deref(), sa(Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("TcpDockerProxy: bind 127.0.0.1:0 in {netns:?}: {e}"));
        let addr = probe.local_addr().expect("local_addr");
        drop(probe);
        TcpDockerProxy(SocketProxy::new(Front::Tcp { addr, netns }))
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        match &self.0.front {
            Front::Tcp { addr, .. } => *addr,
            Front::Unix { .. } => unreachable!("a TcpDockerProxy listens on TCP"),
        }
    }

    /// `tcp://127.0.0.1:<port>`, for the engine's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("tcp://{}", self.addr())
    }
}

impl Default for TcpDockerProxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for DockerProxy {
    type Target = SocketProxy;

    fn deref(&self) -> &SocketProxy {
        &self.0
    }
}

impl DerefMut for DockerProxy {
    fn deref_mut(&mut self) -> &mut SocketProxy {
        &mut self.0
    }
}

impl Deref for TcpDockerProxy {
    type Target = SocketProxy;

    fn deref(&self) -> &SocketProxy {
        &self.0
    }
}

impl DerefMut for TcpDockerProxy {
    fn deref_mut(&mut self) -> &mut SocketProxy {
        &mut self.0
    }
}
