//! The daemon's control socket spoken raw (JSON lines), for tests that
//! need what the CLI hides: partial writes, concurrent clients, unanswered
//! requests.

use std::io::{ErrorKind, Write};
use std::path::Path;
use std::time::Duration;

use super::*;

impl Daemon {
    /// A raw connection to the daemon's socket ([`SocketClient`]).
    pub fn connect(&self) -> SocketClient {
        SocketClient::connect(&self.socket_path())
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket_path().display()))
    }

    /// One request over a fresh raw connection; `request` is the inner
    /// object (`{"cmd":"ls"}`). Panics if the daemon does not answer.
    #[track_caller]
    pub fn call(&self, request: serde_json::Value) -> serde_json::Value {
        self.connect()
            .call(&request)
            .unwrap_or_else(|e| panic!("request {request}: {e}"))
    }
}

/// How long a [`SocketClient`] waits for one response line. Longer than
/// two xtables lock waits (a change may wait for the lock twice).
pub const SOCKET_RESPONSE_TIMEOUT: Duration = Duration::from_secs(45);

/// A raw client of the daemon's control socket: sends bytes, reads response
/// lines. Unix path sockets are reachable from any network namespace.
pub struct SocketClient {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl SocketClient {
    /// Connects to `path` (read timeout [`SOCKET_RESPONSE_TIMEOUT`]).
    pub fn connect(path: &Path) -> std::io::Result<SocketClient> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(SOCKET_RESPONSE_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_RESPONSE_TIMEOUT))?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(SocketClient { stream, reader })
    }

    /// Closes the sending side (the daemon then sees end of input).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Writes raw bytes (no newline added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response line; `Ok(None)` when the daemon closed the connection.
    /// A line that is not JSON is an `InvalidData` error.
    pub fn read_response(&mut self) -> std::io::Result<Option<serde_json::Value>> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, format!("{e}: {line:?}")))
    }

    /// Sends `{"version":1,"request":REQUEST}` and reads the answer. A closed
    /// connection is an `UnexpectedEof` error.
    pub fn call(&mut self, request: &serde_json::Value) -> std::io::Result<serde_json::Value> {
        let mut line = serde_json::to_vec(&serde_json::json!({"version": 1, "request": request}))
            .expect("serializes");
        line.push(b'\n');
        self.send_raw(&line)?;
        self.read_response()?.ok_or_else(|| {
            std::io::Error::new(ErrorKind::UnexpectedEof, "daemon closed the connection")
        })
    }
}

/// The `dnat` request object for the socket (`delete` true: remove it).
pub fn dnat_request(
    ext_ip: &str,
    int_ip: &str,
    ports: &str,
    proto: &str,
    delete: bool,
) -> serde_json::Value {
    serde_json::json!({
        "cmd": "dnat", "ext_ip": ext_ip, "int_ip": int_ip, "ports": ports,
        "proto": proto, "delete": delete,
    })
}
