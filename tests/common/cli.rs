//! The natmap CLI against a test daemon (`lab-ops natmap --socket …`).

use std::process::{ExitStatus, Output};

use super::*;

impl Daemon {
    /// Runs `ip netns exec NS lab-ops natmap --socket SOCK args…` (bounded by
    /// [`COMMAND_TIMEOUT`]); returns the output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(&[], args)
    }

    fn cli_with(&self, global: &[&str], args: &[&str]) -> Output {
        run_with_timeout(
            self.command_in_ns(LAB_OPS_BIN)
                .args(["natmap", "--socket"])
                .arg(self.socket_path())
                .args(global)
                .args(args)
                .env("NO_COLOR", "1"),
            COMMAND_TIMEOUT,
        )
    }

    /// [`Daemon::cli`] that panics (with stdout/stderr) unless the command
    /// succeeds; returns stdout.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        check_output(&format!("lab-ops natmap {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json` and returns the parsed JSON, also when the
    /// command failed (errors are JSON too under `--json`). Parses stdout,
    /// or stderr if stdout is empty; panics if neither is JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_json_output(args).1
    }

    /// [`Daemon::cli_json`] plus the exit status.
    #[track_caller]
    pub fn cli_json_output(&self, args: &[&str]) -> (ExitStatus, serde_json::Value) {
        let out = self.cli_with(&["--json"], args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = if stdout.trim().is_empty() {
            stderr.trim()
        } else {
            stdout.trim()
        };
        match serde_json::from_str(text) {
            Ok(v) => (out.status, v),
            Err(e) => panic!(
                "lab-ops natmap --json {}: output is not JSON ({e}; {})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                args.join(" "),
                out.status
            ),
        }
    }
}
