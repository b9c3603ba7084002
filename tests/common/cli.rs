//! The natmap CLI against a test daemon (`lab-ops natmap --socket …`), and
//! [`RuleArgs`], the one way tests spell a rule's command line.

use std::fmt::Display;
use std::process::{ExitStatus, Output};

use super::*;

impl Daemon {
    /// Runs `ip netns exec NS lab-ops natmap --socket SOCK args…` (bounded by
    /// [`COMMAND_TIMEOUT`]); returns the output whatever the exit status.
    /// `args` are `&str`s, `String`s or a [`RuleArgs`].
    pub fn cli(&self, args: &[impl AsRef<str>]) -> Output {
        self.cli_with(&[], args)
    }

    fn cli_with(&self, global: &[&str], args: &[impl AsRef<str>]) -> Output {
        run_with_timeout(
            self.command_in_ns(LAB_OPS_BIN)
                .args(["natmap", "--socket"])
                .arg(self.socket_path())
                .args(global)
                .args(args.iter().map(AsRef::as_ref))
                .env("NO_COLOR", "1"),
            COMMAND_TIMEOUT,
        )
    }

    /// [`Daemon::cli`] that panics (with stdout/stderr) unless the command
    /// succeeds; returns stdout.
    #[track_caller]
    pub fn cli_ok(&self, args: &[impl AsRef<str>]) -> String {
        let out = self.cli(args);
        check_output(&format!("lab-ops natmap {}", joined(args)), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json` and returns the parsed JSON, also when the
    /// command failed (errors are JSON too under `--json`). Parses stdout,
    /// or stderr if stdout is empty; panics if neither is JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[impl AsRef<str>]) -> serde_json::Value {
        self.cli_json_output(args).1
    }

    /// [`Daemon::cli_json`] plus the exit status.
    #[track_caller]
    pub fn cli_json_output(&self, args: &[impl AsRef<str>]) -> (ExitStatus, serde_json::Value) {
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
                joined(args),
                out.status
            ),
        }
    }
}

/// `args` joined with spaces, for messages.
fn joined(args: &[impl AsRef<str>]) -> String {
    args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ")
}

/// The command line of one static rule, `dnat`, `hairpin` or `snat`, built
/// from what the tests vary (addresses, ports, a few options) instead of
/// spelling `"--ext-ip", …, "--int-ip", …` out again in every test. Pass it
/// to [`Daemon::cli`] and friends as `&dnat_args(…)`: it dereferences to the
/// argument list, in the order the methods were called.
///
/// ```ignore
/// d.cli_ok(&dnat_args(ROUTER_EXT_V4, SERVER_V4, "25,465"));
/// d.cli_json(&dnat_args(ROUTER_EXT_V4, SERVER_V4, 53).proto("udp").ext_if("ext0"));
/// d.cli_ok(&snat_args("198.51.100.0/24", "ext0", ROUTER_EXT_V4).delete());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleArgs(Vec<String>);

/// `dnat --ext-ip EXT --int-ip INT --ports PORTS`.
pub fn dnat_args(ext_ip: impl Display, int_ip: impl Display, ports: impl Display) -> RuleArgs {
    RuleArgs::forward("dnat", ext_ip, int_ip, ports)
}

/// `hairpin --ext-ip EXT --int-ip INT --ports PORTS`.
pub fn hairpin_args(ext_ip: impl Display, int_ip: impl Display, ports: impl Display) -> RuleArgs {
    RuleArgs::forward("hairpin", ext_ip, int_ip, ports)
}

/// `snat --int-ip INT --ext-if IF --ext-ip EXT`.
pub fn snat_args(int_ip: impl Display, ext_if: impl Display, ext_ip: impl Display) -> RuleArgs {
    RuleArgs(vec!["snat".into()])
        .opt("--int-ip", int_ip)
        .opt("--ext-if", ext_if)
        .opt("--ext-ip", ext_ip)
}

impl RuleArgs {
    /// `dnat` and `hairpin` take the same three flags.
    fn forward(cmd: &str, ext_ip: impl Display, int_ip: impl Display, ports: impl Display) -> Self {
        RuleArgs(vec![cmd.into()])
            .opt("--ext-ip", ext_ip)
            .opt("--int-ip", int_ip)
            .opt("--ports", ports)
    }

    /// Adds `--proto PROTO`.
    pub fn proto(self, proto: impl Display) -> Self {
        self.opt("--proto", proto)
    }

    /// Adds `--ext-if IF`.
    pub fn ext_if(self, ext_if: impl Display) -> Self {
        self.opt("--ext-if", ext_if)
    }

    /// Adds `--delete`.
    pub fn delete(self) -> Self {
        self.arg("--delete")
    }

    /// Adds `NAME VALUE`, e.g. `.opt("--int-net", "0.0.0.0/0")`.
    pub fn opt(self, name: &str, value: impl Display) -> Self {
        self.arg(name).arg(value)
    }

    /// Adds one argument as it is, e.g. a flag like `--forward`.
    pub fn arg(mut self, arg: impl Display) -> Self {
        self.0.push(arg.to_string());
        self
    }
}

impl std::ops::Deref for RuleArgs {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0
    }
}
