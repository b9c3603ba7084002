//! The daemon: `lab-ops natmap daemon`.
//!
//! - `server`: the Unix socket, peer credentials, one task per connection.
//! - `engine`: the single owner of state, rules and reservations.
//! - `reserve`: sockets that hold forwarded ports.
//! - `relay`: loopback traffic relayed from reserved sockets to targets.
//! - `host`: sysctls, routes and conntrack.
//! - `conntrack`: cutting tracked connections over ctnetlink.
//! - `bridge`: br_netfilter, the bridge port of a container, hairpin mode.
//! - `local`: which addresses are this host's right now.
//! - `fds`: the file-descriptor budget of reservations.
//! - `metrics`: Prometheus metrics over HTTP (`--metrics-listen`).

pub mod bridge;
pub mod conntrack;
pub mod engine;
pub mod fds;
pub mod host;
pub mod local;
pub mod metrics;
pub mod relay;
pub mod reserve;
pub mod server;

use std::collections::VecDeque;
use std::fs;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::{Config, EngineConfig};
use crate::docker::{self, DockerClient};
use crate::firewall;
use crate::proto::Response;

use engine::{Engine, Peer};
use local::AddressSource;
use relay::Relays;

/// Where the daemon keeps its files and who may talk to it.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `state.json`.
    pub state_path: PathBuf,
    /// The control socket.
    pub socket_path: PathBuf,
    /// Group that may use the socket (mode 0660).
    pub socket_group: String,
    /// Docker's API socket.
    pub docker_socket: PathBuf,
    /// The config file, and whether the operator named it (then it must exist).
    pub config_path: PathBuf,
    /// See `config_path`.
    pub config_explicit: bool,
    /// `--metrics-listen`: where to serve `/metrics` (wins over the config).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `--backend`: the firewall driver (wins over the config's `backend`).
    pub backend: Option<firewall::Backend>,
}

/// How long the daemon waits for Docker before it starts serving.
const FIRST_DOCKER_WAIT: Duration = Duration::from_secs(3);

/// How often the engine does its periodic work: drift check and repair,
/// forwarding check, retrying busy ports. Bounds the repair delay.
const TICK: Duration = Duration::from_secs(2);

/// A message to the engine thread.
pub(crate) enum EngineMsg {
    /// Handle a request and answer on `reply`.
    Request {
        request: crate::proto::Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    },
    /// Remove natmap's rules, release ports, and stop.
    Shutdown { done: oneshot::Sender<()> },
    /// Docker answers (again).
    DockerUp(DockerClient),
    /// Docker stopped answering.
    DockerDown(String),
    /// Something happened to a container.
    DockerEvent(docker::Event),
    /// What Docker answered for mappings the engine asked about.
    DockerObserved(Vec<engine::Observation>),
    /// Docker's answer for a `docker add` waiting on it.
    DockerResolved(Box<engine::PendingAdd>),
    /// Docker's answers for the containers of an `apply` waiting on them.
    ApplyResolved(Box<engine::PendingApply>),
    /// An auto-discover engine's labelled containers.
    AutoSnapshot {
        /// The engine's name.
        engine: String,
        /// Its containers carrying the label.
        containers: Vec<docker::LabeledContainer>,
    },
    /// An auto-discover engine does not answer.
    AutoEngineDown {
        /// The engine's name.
        engine: String,
        /// Why.
        reason: String,
    },
    /// SIGHUP: read the config again.
    Reload,
    /// A `/metrics` scrape: answer with the engine's snapshot.
    Metrics {
        reply: oneshot::Sender<Box<(engine::MetricsSnapshot, engine::CounterReader)>>,
    },
    /// The firewall thread finished a transaction (engine::offload).
    FirewallDone(Box<engine::FirewallDone>),
    /// Someone else changed natmap's nftables state of a family
    /// (firewall::nftables::events): check it and repair now.
    FirewallChanged(firewall::nftables::events::Change),
}

impl EngineMsg {
    /// A short name for logs: the request's command or the event's kind.
    fn kind(&self) -> &'static str {
        match self {
            EngineMsg::Request { request, .. } => request.name(),
            EngineMsg::Shutdown { .. } => "shutdown",
            EngineMsg::DockerUp(_) => "docker-up",
            EngineMsg::DockerDown(_) => "docker-down",
            EngineMsg::DockerEvent(_) => "docker-event",
            EngineMsg::DockerObserved(_) => "docker-observed",
            EngineMsg::DockerResolved(_) => "docker-resolved",
            EngineMsg::ApplyResolved(_) => "apply-resolved",
            EngineMsg::AutoSnapshot { .. } => "auto-snapshot",
            EngineMsg::AutoEngineDown { .. } => "auto-down",
            EngineMsg::Reload => "reload",
            EngineMsg::Metrics { .. } => "metrics",
            EngineMsg::FirewallDone(_) => "firewall-done",
            EngineMsg::FirewallChanged(_) => "firewall-changed",
        }
    }

    /// Whether the engine handles it while its firewall driver is out on a
    /// transaction: what only reads the rules, and the transaction's end.
    /// Everything else waits, in order, for the driver (engine::offload).
    fn serves_while_lent(&self, stopping: bool) -> bool {
        use crate::proto::Request;
        match self {
            // Refused at once ("shutting down"), touching nothing.
            EngineMsg::Request { .. } if stopping => true,
            EngineMsg::Request { request, .. } => match request {
                Request::Ping(_) | Request::Export(_) => true,
                Request::Ls(ls) => !ls.counters,
                Request::Apply(a) => a.dry_run,
                _ => false,
            },
            EngineMsg::ApplyResolved(pending) => pending.is_dry_run(),
            EngineMsg::FirewallDone(_) => true,
            // The check needs the driver: it runs once the driver is back.
            EngineMsg::FirewallChanged(_) => false,
            _ => false,
        }
    }
}

/// Runs the daemon until `shutdown` completes, then removes natmap's rules
/// (the state stays for the next start) and the socket.
pub async fn run(config: DaemonConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    // A broken config stops the start, naming the key and the line.
    let file_config = Config::load(&config.config_path, config.config_explicit)?;
    let backend = config.backend.or(file_config.backend).unwrap_or_default();
    let _lock = lock_state(&config)?;
    let _netns_lock = lock_network_namespace()?;
    let fw = firewall::detect(backend, file_config.nftables.marks()).map_err(|e| e.to_string())?;
    // Before any rule is installed: an address that cannot be served stops
    // the start with nothing to undo.
    let metrics_listener = bind_metrics(&config, &file_config).await?;
    let latency = metrics::Latency::new();

    // Before anything is installed: a daemon that gives up must leave nothing.
    server::refuse_if_answered(&config.socket_path)?;
    let mut engine = open_engine(&config, &file_config, fw).await?;
    // Under the locks (never another running daemon's rules), and only
    // once this backend serves the state.
    tokio::task::spawn_blocking(move || firewall::remove_other_backends(backend))
        .await
        .map_err(|e| format!("removing the other backend's rules panicked: {e}"))?;
    let (tx, rx) = mpsc::channel::<EngineMsg>();
    engine.start_discovery(
        file_config,
        Some((config.config_path.clone(), config.config_explicit)),
        tokio::runtime::Handle::current(),
        tx.clone(),
    );
    let nft_events = match backend {
        firewall::Backend::Nftables => watch_nftables(&mut engine, tx.clone()),
        firewall::Backend::Iptables => None,
    };

    let listener = match server::bind(&config.socket_path, &config.socket_group) {
        Ok(l) => l,
        Err(e) => {
            // Giving up (e.g. another daemon answers on the socket): take
            // back the chains and reservations `Engine::open` installed.
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
            return Err(e);
        }
    };
    let mut tasks = vec![tokio::spawn(reload_on_sighup(tx.clone()))];
    tasks.extend(
        metrics_listener.map(|l| tokio::spawn(metrics::serve(l, tx.clone(), latency.clone()))),
    );
    let stopping = Arc::new(AtomicBool::new(false));
    let engine_thread = spawn_engine_thread(engine, rx, stopping.clone())?;
    tracing::info!(socket = %config.socket_path.display(), "natmap daemon ready");
    let first = first_docker(&config.docker_socket, &tx).await;
    tasks.push(tokio::spawn(watch_docker(
        config.docker_socket.clone(),
        tx.clone(),
        first,
    )));

    server::serve(listener, tx.clone(), shutdown, latency).await;
    drop(nft_events);
    stop(&stopping, tasks, &tx, engine_thread).await;
    let _ = fs::remove_file(&config.socket_path);
    tracing::info!("natmap daemon stopped");
    Ok(())
}

/// Stops the daemon once the server has stopped: the background tasks,
/// then the engine, which removes natmap's rules.
async fn stop(
    stopping: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tx: &mpsc::Sender<EngineMsg>,
    engine_thread: std::thread::JoinHandle<()>,
) {
    // Requests still queued are answered "shutting down" instead of being
    // handled, so the rules come down within the unit's TimeoutStopSec
    // however many clients were waiting.
    stopping.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let (done, wait) = oneshot::channel();
    let _ = tx.send(EngineMsg::Shutdown { done });
    let _ = wait.await;
    let _ = engine_thread.join();
}

/// Binds the metrics listener, if metrics are asked for.
async fn bind_metrics(
    config: &DaemonConfig,
    file_config: &Config,
) -> Result<Option<tokio::net::TcpListener>, String> {
    Ok(match metrics_address(config, file_config) {
        Some((addr, source)) => Some(metrics::bind(addr, &source).await?),
        None => None,
    })
}

/// Opens the engine from the state file, with the config's relay limits
/// (off the async runtime: it installs the rules and binds the ports).
async fn open_engine(
    config: &DaemonConfig,
    file_config: &Config,
    fw: Box<dyn firewall::FirewallDriver>,
) -> Result<Engine, String> {
    let state_path = config.state_path.clone();
    fds::set_relayed_connections(file_config.relay.limits().max_connections);
    let relays = Relays::new(
        tokio::runtime::Handle::current(),
        file_config.relay.limits(),
    );
    tokio::task::spawn_blocking(move || Engine::open(state_path, fw, relays, AddressSource::Kernel))
        .await
        .map_err(|e| format!("engine start panicked: {e}"))?
}

/// Starts the engine thread.
fn spawn_engine_thread(
    engine: Engine,
    rx: mpsc::Receiver<EngineMsg>,
    stopping: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("natmap-engine".into())
        .spawn(move || {
            // A bug must not leave a daemon that accepts requests nobody
            // handles: abort, so the service manager restarts natmap, which
            // rebuilds its rules from the state on disk.
            let run = std::panic::AssertUnwindSafe(|| engine_loop(engine, rx, &stopping));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("the engine panicked; aborting so natmap restarts from its state");
                std::process::abort();
            }
        })
        .map_err(|e| format!("cannot start engine thread: {e}"))
}

/// One bounded attempt to reach Docker before serving, so the first
/// `docker add` after a start does not race the connection; the engine
/// hears the outcome, and the watcher takes over from there with the
/// client returned.
async fn first_docker(
    socket: &std::path::Path,
    tx: &mpsc::Sender<EngineMsg>,
) -> Option<DockerClient> {
    match tokio::time::timeout(FIRST_DOCKER_WAIT, DockerClient::connect(socket)).await {
        Ok(Ok(client)) => {
            let _ = tx.send(EngineMsg::DockerUp(client.clone()));
            Some(client)
        }
        Ok(Err(e)) => {
            let _ = tx.send(EngineMsg::DockerDown(e));
            None
        }
        Err(_) => None,
    }
}

/// Where to serve metrics, if anywhere, and which setting said so: the
/// flag wins over the config key.
fn metrics_address(config: &DaemonConfig, file: &Config) -> Option<(std::net::SocketAddr, String)> {
    match (config.metrics_listen, file.metrics_listen) {
        (Some(addr), _) => Some((addr, "--metrics-listen".to_owned())),
        (None, Some(m)) => Some((
            m.0,
            format!("metrics_listen in {}", config.config_path.display()),
        )),
        (None, None) => None,
    }
}

fn engine_loop(mut engine: Engine, rx: mpsc::Receiver<EngineMsg>, stopping: &AtomicBool) {
    // Periodic work runs on a fixed schedule even while requests keep coming.
    let mut next_tick = Instant::now() + TICK;
    let mut inbox = Inbox {
        rx,
        stashed: None,
        waiting: VecDeque::new(),
    };
    loop {
        let now = Instant::now();
        let lent = engine.firewall_lent();
        if now >= next_tick {
            // A tick while the driver is out is skipped, not queued: the
            // next one comes TICK later.
            if !lent {
                engine.tick();
                tracing::debug!(
                    kind = "tick",
                    held_ms = now.elapsed().as_secs_f64() * 1e3,
                    "engine turn"
                );
            }
            next_tick = now + TICK;
        }
        let msg = match inbox.next(lent, next_tick.saturating_duration_since(now)) {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            // Never while the driver is out: its transaction holds a
            // sender to answer with.
            Err(mpsc::RecvError) => {
                engine.shutdown();
                return;
            }
        };
        if engine.firewall_lent() && !msg.serves_while_lent(stopping.load(Ordering::Relaxed)) {
            inbox.waiting.push_back(msg);
            continue;
        }
        // How long each message holds the engine (docs/reliability.md, item 8):
        // every other client and the drift check wait that long.
        let kind = msg.kind();
        let turn = Instant::now();
        let stop = handle_message(&mut engine, msg, &mut inbox, stopping);
        tracing::debug!(
            kind,
            held_ms = turn.elapsed().as_secs_f64() * 1e3,
            "engine turn"
        );
        if stop {
            return;
        }
    }
}

/// The engine's incoming messages, in order: those waiting for the
/// firewall driver (engine::offload), one read ahead of its turn, then the
/// channel.
struct Inbox {
    rx: mpsc::Receiver<EngineMsg>,
    stashed: Option<EngineMsg>,
    waiting: VecDeque<EngineMsg>,
}

/// A rule change to answer: the request, who sent it, where the answer goes.
type QueuedChange = (crate::proto::Request, Peer, oneshot::Sender<Response>);

impl Inbox {
    /// The next message in order: one read ahead, else (unless the driver
    /// is `lent`, when they keep waiting) the first waiting, else one from
    /// the channel within `wait`. None when `wait` passes; an error once
    /// every sender has gone.
    fn next(&mut self, lent: bool, wait: Duration) -> Result<Option<EngineMsg>, mpsc::RecvError> {
        let next = self
            .stashed
            .take()
            .or_else(|| if lent { None } else { self.waiting.pop_front() });
        if next.is_some() {
            return Ok(next);
        }
        match self.rx.recv_timeout(wait) {
            Ok(msg) => Ok(Some(msg)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(mpsc::RecvError),
        }
    }

    /// The next message in order if it is a rule change that can join a
    /// batch; anything else stays where it is, first in line.
    fn next_batchable(&mut self) -> Option<QueuedChange> {
        let batchable = |m: &EngineMsg| matches!(m, EngineMsg::Request { request, .. } if Engine::batchable(request));
        let msg = if let Some(front) = self.waiting.front() {
            if !batchable(front) {
                return None;
            }
            self.waiting.pop_front()?
        } else {
            let msg = self.rx.try_recv().ok()?;
            if !batchable(&msg) {
                self.stashed = Some(msg);
                return None;
            }
            msg
        };
        match msg {
            EngineMsg::Request {
                request,
                peer,
                reply,
            } => Some((request, peer, reply)),
            _ => unreachable!("checked above"),
        }
    }
}

/// Handles one engine message; true once the engine has shut down.
fn handle_message(
    engine: &mut Engine,
    msg: EngineMsg,
    inbox: &mut Inbox,
    stopping: &AtomicBool,
) -> bool {
    match msg {
        EngineMsg::Request {
            request,
            peer,
            reply,
        } => handle_request(engine, request, peer, reply, inbox, stopping),
        EngineMsg::Shutdown { done } => {
            engine.shutdown();
            let _ = done.send(());
            return true;
        }
        EngineMsg::DockerUp(client) => engine.docker_connected(client),
        EngineMsg::DockerDown(reason) => engine.docker_lost(reason),
        EngineMsg::DockerEvent(event) => engine.docker_event(&event),
        EngineMsg::DockerObserved(seen) => engine.docker_observed(seen),
        EngineMsg::DockerResolved(pending) => engine.docker_add_finish(pending),
        EngineMsg::ApplyResolved(pending) => engine.apply_finish(*pending),
        EngineMsg::AutoSnapshot {
            engine: name,
            containers,
        } => engine.auto_snapshot(name, containers),
        EngineMsg::AutoEngineDown {
            engine: name,
            reason,
        } => engine.auto_engine_down(name, reason),
        EngineMsg::Reload => {
            let _ = engine.reload();
        }
        EngineMsg::Metrics { reply } => {
            let _ = reply.send(Box::new(engine.metrics_snapshot()));
        }
        EngineMsg::FirewallDone(done) => engine.firewall_done(*done),
        EngineMsg::FirewallChanged(change) => engine.firewall_changed(&change),
    }
    false
}

/// Handles one client request: refused while stopping, a rule change with
/// every change queued behind it as one batch, `docker add` and `apply`
/// begun (they wait for Docker), anything else answered in its turn.
fn handle_request(
    engine: &mut Engine,
    request: crate::proto::Request,
    peer: Peer,
    reply: oneshot::Sender<Response>,
    inbox: &mut Inbox,
    stopping: &AtomicBool,
) {
    use crate::proto::Request;
    if stopping.load(Ordering::Relaxed) {
        let _ = reply.send(Response::err(
            crate::proto::ErrorCode::Internal,
            "the daemon is shutting down",
        ));
        return;
    }
    match request {
        request if Engine::batchable(&request) => {
            // Fold every rule change already queued into one transaction.
            let mut batch = vec![(request, peer, reply)];
            while batch.len() < engine::MAX_BATCH {
                match inbox.next_batchable() {
                    Some(change) => batch.push(change),
                    None => break,
                }
            }
            engine.handle_batch_later(batch);
        }
        Request::DockerAdd(req) => engine.docker_add_begin(req, peer, reply),
        request @ (Request::Apply(_) | Request::DryRun(_)) => {
            engine.apply_begin(request, peer, reply)
        }
        request => engine.handle_later(request, peer, reply),
    }
}

/// Starts the watcher of nf_tables events (nftables backend): changes of
/// natmap's tables or its `DOCKER-USER` accept by anyone else become
/// [`EngineMsg::FirewallChanged`], and the periodic drift check becomes a
/// slow safety net. Without it (no socket), the check stays on every tick.
fn watch_nftables(
    engine: &mut Engine,
    tx: mpsc::Sender<EngineMsg>,
) -> Option<firewall::nftables::events::Watcher> {
    use firewall::nftables::events::Watcher;
    match Watcher::start(move |change| tx.send(EngineMsg::FirewallChanged(change)).is_ok()) {
        Ok(watcher) => {
            engine.drift_by_events(watcher.running());
            Some(watcher)
        }
        Err(e) => {
            tracing::warn!(
                "cannot watch nftables events ({e}); natmap's rules are checked every {} s instead",
                TICK.as_secs()
            );
            None
        }
    }
}

/// SIGHUP (`systemctl reload natmap`) re-reads the config.
async fn reload_on_sighup(tx: mpsc::Sender<EngineMsg>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        if tx.send(EngineMsg::Reload).is_err() {
            return;
        }
    }
}

/// Keeps a connection to Docker: connect, report it to the engine, forward
/// container events; on failure report it and retry with backoff (1 s up to
/// 10 s). Docker being away never blocks static rules.
async fn watch_docker(
    socket: PathBuf,
    engine: mpsc::Sender<EngineMsg>,
    mut first: Option<DockerClient>,
) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_secs(1);
    loop {
        let connected = match first.take() {
            Some(client) => Ok((client, true)),
            None => DockerClient::connect(&socket).await.map(|c| (c, false)),
        };
        match connected {
            Ok((client, announced)) => {
                backoff = Duration::from_secs(1);
                let mut events = Box::pin(client.events());
                if !announced && engine.send(EngineMsg::DockerUp(client)).is_err() {
                    return;
                }
                let reason = loop {
                    match events.next().await {
                        Some(Ok(event)) => {
                            if engine.send(EngineMsg::DockerEvent(event)).is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => break format!("Docker events stream failed: {e}"),
                        None => break "Docker closed the events stream".to_owned(),
                    }
                };
                if engine.send(EngineMsg::DockerDown(reason)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if engine.send(EngineMsg::DockerDown(e)).is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Watches one auto-discover engine: a snapshot of its labelled containers
/// at connect and after every container event; reports when it goes away,
/// and reconnects with backoff (1 s up to 10 s). Each engine has its own
/// task, so one failing never blocks the others.
pub(crate) async fn watch_engine(engine: EngineConfig, label: String, tx: mpsc::Sender<EngineMsg>) {
    use futures_util::StreamExt;
    let name = engine.name.to_string();
    let down = |reason: String| EngineMsg::AutoEngineDown {
        engine: name.clone(),
        reason,
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let reason = match DockerClient::connect_endpoint(&engine.endpoint).await {
            Ok(client) => {
                backoff = Duration::from_secs(1);
                let mut events = Box::pin(client.events());
                loop {
                    match client.labeled(&label).await {
                        Ok(containers) => {
                            let snapshot = EngineMsg::AutoSnapshot {
                                engine: name.clone(),
                                containers,
                            };
                            if tx.send(snapshot).is_err() {
                                return;
                            }
                        }
                        Err(e) => break e,
                    }
                    // Wait for the next event that can change a mapping.
                    let next = loop {
                        match events.next().await {
                            Some(Ok(event)) if event.matters() || event.action == "create" => {
                                break Ok(())
                            }
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => break Err(format!("events stream failed: {e}")),
                            None => break Err("the engine closed the events stream".to_owned()),
                        }
                    };
                    if let Err(e) = next {
                        break e;
                    }
                }
            }
            Err(e) => e,
        };
        if tx.send(down(reason)).is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One daemon per network namespace: two would rewrite each other's chains
/// every repair cycle. An abstract Unix socket is per network namespace and
/// vanishes with the process, so it is a lock that a crash cannot leave behind.
fn lock_network_namespace() -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(b"natmap-daemon")
        .map_err(|e| format!("cannot create the namespace lock: {e}"))?;
    std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another natmap daemon already runs in this network namespace \
             (it owns the NATMAP chains here); stop it first"
                .to_owned()
        }
        _ => format!("cannot create the namespace lock: {e}"),
    })
}

/// One daemon per state file: an exclusive lock beside it, held for life.
/// Also the first check of the state directory (owner, mode), and the lock
/// file is never opened through a link ([`crate::state::lock`]).
fn lock_state(config: &DaemonConfig) -> Result<fs::File, String> {
    crate::state::lock(&config.state_path).map_err(|e| e.to_string())
}

/// Fixes glibc's mmap threshold at its default (128 KiB): a client line
/// near the 4 MiB limit is read into a buffer that large, and glibc would
/// otherwise raise the threshold when that buffer is freed and keep the
/// next ones in the heap, so a few hostile clients left the daemon ~8 MiB
/// larger for good. Above the fixed threshold a buffer is its own mapping,
/// returned to the kernel when it is freed.
fn keep_large_buffers_out_of_the_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Prepares the process for many reservations; call before any thread starts.
///
/// Every reservation is a file descriptor: the soft limit goes up to the
/// hard one. And the descriptor table is grown once, now: in a
/// multi-threaded process each later doubling (at 256, 512, 1024, …
/// descriptors) waits out an RCU grace period, 7-16 ms each, measured as
/// half the time of an `apply` of 1000 mappings (docs/performance.md).
pub fn prepare_fd_table() {
    keep_large_buffers_out_of_the_heap();
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => soft = hard,
            Err(e) => eprintln!("natmap: cannot raise the open-file limit to {hard}: {e}"),
        }
    }
    // 16384 slots cost 128 KiB of kernel memory and cover 10,000 reservations.
    let slots = soft.min(16_384);
    if slots > 1024 {
        let high = i32::try_from(slots - 1).unwrap_or(16_383);
        // SAFETY: only if `high` is not open (F_GETFD fails), dup2 onto it
        // and close it right away; no other thread exists yet.
        unsafe {
            if libc::fcntl(high, libc::F_GETFD) == -1
                && libc::dup2(libc::STDERR_FILENO, high) == high
            {
                libc::close(high);
            }
        }
    }
}
