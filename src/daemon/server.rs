//! The control socket: a Unix stream socket speaking one JSON line per
//! request and per response (see [`crate::proto`]).

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::proto::{Envelope, ErrorCode, Request, Response, MAX_FILTER_LEN, MAX_LINE_BYTES};

use super::engine::Peer;
use super::metrics::Latency;
use super::EngineMsg;

/// Bound on simultaneous client connections (each holds a socket and up to
/// [`MAX_LINE_BYTES`] of buffer). When all are taken, a new client takes the
/// slot of the one that has waited on its peer the longest.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that starts no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request line that has begun must be complete within this time.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer the client does not take within this time closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers a client may leave unread while it sends more requests: then
/// the daemon reads no more of its requests until it has read them.
const MAX_UNREAD_ANSWERS: usize = 32;
/// A connection waiting on its peer this long may lose its slot to a new
/// client; shorter waits are the normal gap between connect and request.
const EVICTABLE_AFTER: Duration = Duration::from_millis(250);
/// Longest pause of the accept loop after an error (e.g. out of fds).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Creates the socket with mode 0660 and group `group` without a moment in
/// which anyone else could connect: it is bound inside a private (0700)
/// directory, given its owner and mode there, then renamed into place.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, String> {
    refuse_if_answered(path)?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let private = parent.join(format!(".natmap-sock.{}", std::process::id()));
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("cannot create {}: {e}", private.display()))?;
    let staged = private.join("sock");
    let result = (|| {
        let std_listener = std::os::unix::net::UnixListener::bind(&staged)
            .map_err(|e| format!("cannot bind {}: {e}", staged.display()))?;
        let gid = match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid,
            _ => {
                tracing::warn!(
                    "group {group:?} does not exist: the socket is usable by root only \
                     (`lab-ops natmap install` creates the group)"
                );
                nix::unistd::getegid()
            }
        };
        nix::unistd::chown(&staged, Some(nix::unistd::geteuid()), Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", staged.display()))?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o660))
            .map_err(|e| format!("cannot chmod {}: {e}", staged.display()))?;
        fs::rename(&staged, path)
            .map_err(|e| format!("cannot move socket to {}: {e}", path.display()))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;
        UnixListener::from_std(std_listener).map_err(|e| format!("socket: {e}"))
    })();
    let _ = fs::remove_dir_all(&private);
    result
}

/// Fails when a daemon already answers on `path`: checked before anything
/// is installed, and again when binding.
pub fn refuse_if_answered(path: &Path) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "a natmap daemon already answers on {}; stop it first",
            path.display()
        ));
    }
    Ok(())
}

/// Accepts connections until `shutdown` completes, then closes them.
///
/// Neither waiting for a slot nor an accept error keeps SIGTERM waiting:
/// both are raced against `shutdown`. Accept errors (EMFILE at the fd
/// limit leaves the connection queued, so the socket stays readable) back
/// off from 10 ms to [`MAX_ACCEPT_BACKOFF`] instead of spinning.
pub(crate) async fn serve(
    listener: UnixListener,
    engine: mpsc::Sender<EngineMsg>,
    shutdown: impl Future<Output = ()>,
    latency: Latency,
) {
    let slots = Slots::new();
    tokio::pin!(shutdown);
    let mut backoff = Duration::ZERO;
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff = accept_backoff(backoff, &e);
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            },
        };
        backoff = Duration::ZERO;
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.admit() => slot,
        };
        let (engine, latency) = (engine.clone(), latency.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, slot, engine, latency).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    slots.close_all();
}

/// The next pause after a failed `accept`; the first failure of a run is
/// logged as a warning, the rest at debug level.
fn accept_backoff(previous: Duration, e: &std::io::Error) -> Duration {
    if previous.is_zero() {
        tracing::warn!("cannot accept a client connection: {e}; retrying with backoff");
        Duration::from_millis(10)
    } else {
        tracing::debug!("accept: {e}");
        (previous * 2).min(MAX_ACCEPT_BACKOFF)
    }
}

/// Serves one client: any number of request lines, one response line each.
/// Every wait on the client is bounded ([`IDLE_TIMEOUT`], [`LINE_TIMEOUT`],
/// [`WRITE_TIMEOUT`]) and gives the slot up to a new client when asked.
async fn connection(
    stream: UnixStream,
    slot: Slot,
    engine: mpsc::Sender<EngineMsg>,
    latency: Latency,
) -> std::io::Result<()> {
    let peer = peer_of(&stream);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut unread = 0;
    loop {
        let Some(line) = read_line(&slot, &mut reader).await? else {
            return Ok(());
        };
        if line.last() != Some(&b'\n') && line.len() > MAX_LINE_BYTES {
            let response = Response::err(
                ErrorCode::LineTooLong,
                format!("request line longer than {MAX_LINE_BYTES} bytes; connection closed"),
            );
            send(&slot, &mut write, &response).await?;
            return Ok(());
        }
        let response = answer(line, &engine, peer, &latency).await;
        // Answers the client may not have read, this one included: counted
        // before writing, as right after it even a prompt reader is behind.
        unread = if unread_bytes(&write) > 0 {
            unread + 1
        } else {
            1
        };
        send(&slot, &mut write, &response).await?;
        if unread >= MAX_UNREAD_ANSWERS {
            // Pipelining is bounded: read nothing more until the client
            // has taken its answers (or drop it, if it never does).
            if slot
                .on_peer(WRITE_TIMEOUT, answers_read(&write))
                .await
                .is_none()
            {
                tracing::debug!(?peer, "client does not read its answers; closed");
                return Ok(());
            }
            unread = 0;
        }
    }
}

/// Who is at the other end of `stream` (nobody in particular if the
/// kernel cannot tell).
fn peer_of(stream: &UnixStream) -> Peer {
    stream
        .peer_cred()
        .map(|c| Peer {
            uid: c.uid(),
            pid: c.pid(),
        })
        .unwrap_or_default()
}

/// The answer to one request line: the engine's, timed per command, or the
/// parse error's.
async fn answer(
    line: Vec<u8>,
    engine: &mpsc::Sender<EngineMsg>,
    peer: Peer,
    latency: &Latency,
) -> Response {
    match parse_request(&line) {
        Ok(request) => {
            drop(line);
            let (command, asked) = (request.name(), std::time::Instant::now());
            let response = ask_engine(engine, request, peer).await;
            latency.observe(command, asked.elapsed());
            response
        }
        Err(response) => response,
    }
}

/// The next request line (at most [`MAX_LINE_BYTES`] + 1 bytes, so an
/// overlong one is seen as such); `None` when the client closed, sent
/// nothing for [`IDLE_TIMEOUT`], did not finish its line within
/// [`LINE_TIMEOUT`], or lost its slot.
async fn read_line(
    slot: &Slot,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::io::Result<Option<Vec<u8>>> {
    match slot.on_peer(IDLE_TIMEOUT, reader.fill_buf()).await {
        Some(Ok([])) | None => return Ok(None),
        Some(r) => r.map(|_| ())?,
    }
    let mut line = Vec::new();
    let mut bounded = reader.take(MAX_LINE_BYTES as u64 + 1);
    let read = bounded.read_until(b'\n', &mut line);
    match slot.on_peer(LINE_TIMEOUT, read).await {
        Some(r) => r.map(|_| Some(line)),
        None => Ok(None),
    }
}

/// Writes one response line within [`WRITE_TIMEOUT`]; a client that does
/// not read is a `TimedOut` error (the connection is then closed).
async fn send(
    slot: &Slot,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).expect("response serializes");
    out.push(b'\n');
    match slot.on_peer(WRITE_TIMEOUT, write.write_all(&out)).await {
        Some(r) => r,
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its answer",
        )),
    }
}

/// Bytes written to the client that it has not read yet (`SIOCOUTQ`).
fn unread_bytes(write: &tokio::net::unix::OwnedWriteHalf) -> libc::c_int {
    use std::os::fd::AsRawFd;
    let stream: &UnixStream = write.as_ref();
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (== SIOCOUTQ) writes one c_int; the fd is open.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        queued
    } else {
        0
    }
}

/// Completes once the client has read every answer. The kernel has no
/// wake-up for "the peer read", so this polls (only while a client is
/// [`MAX_UNREAD_ANSWERS`] behind).
async fn answers_read(write: &tokio::net::unix::OwnedWriteHalf) {
    while unread_bytes(write) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The connection slots. A connection is either busy (its request is
/// being parsed or handled) or waiting on its peer (for a request, for the
/// rest of a line, for the client to take an answer). When all slots are
/// taken, a new client evicts the connection that has waited on its peer
/// the longest (at least [`EVICTABLE_AFTER`]): idle, half-sent or unread
/// connections then cannot lock clients out, and no request that reached
/// the daemon is cut off.
struct Slots {
    free: Arc<Semaphore>,
    table: Arc<Mutex<SlotTable>>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    /// Per connection: since when it waits on its peer, and how to stop it.
    waiting: HashMap<u64, (Option<Instant>, Arc<Stop>)>,
}

/// Tells a connection to give up its slot. The flag makes it final: a
/// connection told while its wait was completing closes all the same
/// (before handling anything more), and never on a stale wake-up later.
#[derive(Default)]
struct Stop {
    wake: Notify,
    stopped: AtomicBool,
}

impl Stop {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// One connection's slot; freed when dropped.
struct Slot {
    id: u64,
    table: Arc<Mutex<SlotTable>>,
    stop: Arc<Stop>,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            free: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            table: Arc::default(),
        }
    }

    /// A slot for a new connection: a free one, else the slot of the
    /// connection that has waited on its peer the longest, else the first
    /// that frees up.
    async fn admit(&self) -> Slot {
        loop {
            if let Ok(permit) = self.free.clone().try_acquire_owned() {
                return self.slot(permit);
            }
            self.evict_longest_waiting();
            tokio::select! {
                permit = self.free.clone().acquire_owned() => {
                    return self.slot(permit.expect("the semaphore is never closed"));
                }
                _ = tokio::time::sleep(EVICTABLE_AFTER) => {}
            }
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        let mut table = lock(&self.table);
        let id = table.next_id;
        table.next_id += 1;
        let stop = Arc::new(Stop::default());
        table.waiting.insert(id, (None, stop.clone()));
        Slot {
            id,
            table: self.table.clone(),
            stop,
            _permit: permit,
        }
    }

    fn evict_longest_waiting(&self) {
        let mut table = lock(&self.table);
        let now = Instant::now();
        let victim = table
            .waiting
            .iter_mut()
            .filter_map(|(_, (since, stop))| since.map(|t| (t, since, stop)))
            .filter(|(t, _, _)| now.duration_since(*t) >= EVICTABLE_AFTER)
            .min_by_key(|(t, _, _)| *t);
        if let Some((_, since, stop)) = victim {
            // Not waiting any more as far as eviction goes: picked once.
            *since = None;
            stop.stop();
            tracing::debug!("all connection slots taken: closing the longest-waiting one");
        }
    }

    /// Closes every connection (shutdown).
    fn close_all(&self) {
        for (_, stop) in lock(&self.table).waiting.values() {
            stop.stop();
        }
    }
}

impl Slot {
    /// Runs `wait`, a wait on the client, bounded by `timeout` and ended
    /// early if the slot is taken for a new client or the daemon stops;
    /// `None` then (the caller closes the connection).
    async fn on_peer<F: Future>(&self, timeout: Duration, wait: F) -> Option<F::Output> {
        self.mark(Some(Instant::now()));
        let out = tokio::select! {
            r = tokio::time::timeout(timeout, wait) => r.ok(),
            _ = self.stop.wake.notified() => None,
        };
        self.mark(None);
        // Told to stop while the wait completed: stop all the same. Only
        // waits on the peer end here, so no handled request is cut off.
        out.filter(|_| !self.stop.stopped.load(Ordering::Relaxed))
    }

    fn mark(&self, since: Option<Instant>) {
        if let Some(entry) = lock(&self.table).waiting.get_mut(&self.id) {
            entry.0 = since;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).waiting.remove(&self.id);
    }
}

fn lock(table: &Mutex<SlotTable>) -> std::sync::MutexGuard<'_, SlotTable> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

async fn ask_engine(engine: &mpsc::Sender<EngineMsg>, request: Request, peer: Peer) -> Response {
    let (reply, answer) = oneshot::channel();
    if engine
        .send(EngineMsg::Request {
            request,
            peer,
            reply,
        })
        .is_err()
    {
        return Response::err(ErrorCode::Internal, "the daemon is shutting down");
    }
    answer
        .await
        .unwrap_or_else(|_| Response::err(ErrorCode::Internal, "the daemon is shutting down"))
}

/// Parses and validates one request line; a bad line yields the error response.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let request = Envelope::parse_line(line).map_err(|e| Response::err(e.code, e.message))?;
    if let Request::Ls(ls) = &request {
        if let Some(f) = &ls.filter {
            if f.len() > MAX_FILTER_LEN || f.chars().any(char::is_control) {
                return Err(Response::err(
                    ErrorCode::InvalidArgument,
                    format!("ls filter: at most {MAX_FILTER_LEN} printable characters"),
                ));
            }
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> ErrorCode {
        parse_request(line).unwrap_err().error.unwrap().code
    }

    #[test]
    fn hostile_lines_get_error_responses() {
        assert_eq!(code(b"\xff\xfe\n"), ErrorCode::InvalidRequest);
        assert_eq!(code(b"not json\n"), ErrorCode::InvalidRequest);
        assert_eq!(
            code(b"{\"request\":{\"cmd\":\"clear\"}}\n"),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(b"{\"version\":2,\"request\":{\"cmd\":\"clear\"}}\n"),
            ErrorCode::VersionMismatch
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(code(deep.as_bytes()), ErrorCode::InvalidRequest);
        let nul = b"{\"version\":1,\"request\":{\"cmd\":\"ls\",\"filter\":\"a\\u0000b\"}}";
        assert_eq!(code(nul), ErrorCode::InvalidArgument);
    }

    #[test]
    fn errors_name_the_path_of_the_bad_field() {
        let line = br#"{"version":1,"request":{"cmd":"snat","int_ip":"10.0.0.0/24","ext_if":"eth0\nX","ext_ip":"192.0.2.1"}}"#;
        let message = parse_request(line).unwrap_err().error.unwrap().message;
        assert!(message.starts_with("request.ext_if"), "{message}");
    }
}
