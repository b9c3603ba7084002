//! The control socket: a Unix stream socket speaking one JSON line per
//! request and per response (see [`crate::proto`]).

use std::fs;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};

use crate::proto::{
    ErrorCode, Request, Response, MAX_FILTER_LEN, MAX_LINE_BYTES, PROTOCOL_VERSION,
};

use super::engine::Peer;
use super::metrics::Latency;
use super::EngineMsg;

/// Bound on simultaneous client connections.
/// With [`MAX_LINE_BYTES`], bounds what clients can make the daemon buffer.
const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

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

/// Accepts connections until `shutdown` completes.
pub(crate) async fn serve(
    listener: UnixListener,
    engine: mpsc::Sender<EngineMsg>,
    shutdown: impl Future<Output = ()>,
    latency: Latency,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                let (engine, latency) = (engine.clone(), latency.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = connection(stream, engine, latency).await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
        }
    }
}

/// Serves one client: any number of request lines, one response line each.
async fn connection(
    stream: UnixStream,
    engine: mpsc::Sender<EngineMsg>,
    latency: Latency,
) -> std::io::Result<()> {
    let peer = stream
        .peer_cred()
        .map(|c| Peer {
            uid: c.uid(),
            pid: c.pid(),
        })
        .unwrap_or_default();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = match tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader).take(limit).read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_LINE_BYTES {
            let response = Response::err(
                ErrorCode::LineTooLong,
                format!("request line longer than {MAX_LINE_BYTES} bytes; connection closed"),
            );
            send(&mut write, &response).await?;
            return Ok(());
        }
        let response = match parse_request(&line) {
            Ok(request) => {
                let (command, asked) = (request.name(), std::time::Instant::now());
                let response = ask_engine(&engine, request, peer).await;
                latency.observe(command, asked.elapsed());
                response
            }
            Err(response) => response,
        };
        send(&mut write, &response).await?;
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).expect("response serializes");
    out.push(b'\n');
    write.write_all(&out).await
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
    let invalid = |m: String| Response::err(ErrorCode::InvalidRequest, m);
    let text =
        std::str::from_utf8(line).map_err(|_| invalid("request is not valid UTF-8".into()))?;
    let value: serde_json::Value = serde_json::from_str(text.trim_end_matches(['\n', '\r']))
        .map_err(|e| invalid(format!("request is not a JSON object: {e}")))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Response::err(
                ErrorCode::VersionMismatch,
                format!("protocol version {v} is not supported, this daemon speaks {PROTOCOL_VERSION}: use a matching lab-ops"),
            ))
        }
        None => return Err(invalid("request needs a numeric \"version\" field".into())),
    }
    let serde_json::Value::Object(mut envelope) = value else {
        return Err(invalid("request line must be a JSON object".into()));
    };
    let request = envelope
        .remove("request")
        .ok_or_else(|| invalid("missing field \"request\"".into()))?;
    if let Some(unknown) = envelope.keys().find(|k| *k != "version") {
        return Err(invalid(format!(
            "unknown field {unknown:?}; expected version and request"
        )));
    }
    let request = Request::from_value(request).map_err(|m| invalid(format!("request.{m}")))?;
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
