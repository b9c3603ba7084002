//! The client side of the protocol: connect, send one request line, read one
//! response line. Blocking std I/O: a CLI call needs no async runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::{Envelope, ErrorCode, Request, Response, PROTOCOL_VERSION};

/// How long the client waits for the daemon's answer. Generous: a change may
/// wait for the firewall's lock held by another tool (the xtables lock).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `request` to the daemon at `socket` and returns its response. Failing
/// to reach or understand the daemon is itself returned as an error response
/// (`daemon_unreachable`, `bad_response`), so callers print one kind of thing.
///
/// With `-vv` the client logs each request and how long the answer took;
/// with `-vvv` the exact lines sent and received.
pub fn call(socket: &Path, request: Request) -> Response {
    let started = std::time::Instant::now();
    let cmd = request.name();
    tracing::debug!(socket = %socket.display(), cmd, "sending request");
    let response = match try_call(socket, request) {
        Ok(r) => r,
        Err(r) => r,
    };
    tracing::debug!(
        cmd,
        ok = response.ok,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "answer received"
    );
    response
}

fn try_call(socket: &Path, request: Request) -> Result<Response, Response> {
    let unreachable = |e: std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is the daemon running? start it with `lab-ops natmap daemon` or `systemctl start natmap`"
            }
            std::io::ErrorKind::PermissionDenied => {
                "you need to be root or in the daemon's socket group (natmap unless the daemon was started with --socket-group)"
            }
            _ => "check --socket",
        };
        Response::err(
            ErrorCode::DaemonUnreachable,
            format!("cannot talk to natmap at {}: {e}; {hint}", socket.display()),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(unreachable)?;
    // A daemon that stops reading (stuck, or a server that is not natmap)
    // must not hang the CLI either.
    stream
        .set_write_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(&Envelope {
        version: PROTOCOL_VERSION,
        request,
    })
    .expect("request serializes");
    tracing::trace!("sent: {}", String::from_utf8_lossy(&line));
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    tracing::trace!("received: {}", answer.trim_end());
    serde_json::from_str(&answer).map_err(|e| {
        Response::err(
            ErrorCode::BadResponse,
            format!("the daemon's answer could not be read ({e}); are lab-ops and the daemon the same version?"),
        )
    })
}
