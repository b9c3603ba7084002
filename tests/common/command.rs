//! Running external commands with a bounded time (`ip`, `iptables`, the
//! natmap CLI, `docker`): every command the harness starts is killed when it
//! runs too long, so a wedged tool fails the test instead of hanging it.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for any external command the harness runs (`ip`, `iptables`,
/// the natmap CLI). A command running longer is killed and the test panics.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it and
/// panicking if it runs longer than `timeout`.
#[track_caller]
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_quiet(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_with_timeout`] that never panics, for `Drop` paths: a command that
/// cannot start or runs too long (it is killed) is an `Err` describing it,
/// with what it printed before it was killed.
pub fn run_quiet(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    // Read both pipes while the command runs, so a command that prints
    // more than a pipe holds does not block (and time out) on the write.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out_reader = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let err_reader = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "command timed out after {timeout:?} and was killed: {desc}\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ));
            }
            Err(e) => return Err(format!("waiting for {desc}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Panics with the command line, status, stdout and stderr unless `out` succeeded.
pub fn check_output(what: &str, out: &Output) {
    if !out.status.success() {
        panic!(
            "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub(super) fn describe<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
