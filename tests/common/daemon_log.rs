//! Checking a daemon's log: a happy-path test fails on any WARN/ERROR line
//! (or panic) it did not declare.

use super::*;

/// WARN/ERROR lines that come from the host around the test, not from the
/// test's daemon doing something wrong: a daemon in a namespace still talks
/// to the host's Docker engine, which another test may restart.
pub const AMBIENT_LOG_NOISE: &[&str] = &["lost Docker"];

/// The lines of a daemon log that a happy-path test must not see: every
/// line logged at WARN or ERROR whose text contains none of `allowed` (nor
/// of [`AMBIENT_LOG_NOISE`]), and every panic (never allowed). Harness lines
/// (`=== harness: …`) are skipped.
pub fn log_problems(log: &str, allowed: &[String]) -> Vec<String> {
    log.lines()
        .filter(|line| !line.starts_with("=== harness:"))
        .filter(|line| {
            if line.contains("panicked at") {
                return true;
            }
            // tracing's fmt layout: `<time>  WARN target: message`, or
            // `WARN target: message` without time (under systemd).
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            let second = words.next().unwrap_or("");
            let leveled = |w: &str| w == "WARN" || w == "ERROR";
            (leveled(first) || leveled(second))
                && !allowed.iter().any(|a| line.contains(a.as_str()))
                && !AMBIENT_LOG_NOISE.iter().any(|a| line.contains(a))
        })
        .map(str::to_string)
        .collect()
}

impl Daemon {
    /// WARN/ERROR lines (and panics) in the log that were not declared.
    pub fn unexpected_log_lines(&self) -> Vec<String> {
        log_problems(&self.log(), self.allowed_log())
    }

    /// Fails the test if the daemon logged a WARN or ERROR the test did not
    /// declare with [`Daemon::allow_log`], or panicked. Call it at the end of
    /// every happy-path test (the log covers every start on this state dir).
    #[track_caller]
    pub fn assert_clean_log(&self) {
        let problems = self.unexpected_log_lines();
        assert!(
            problems.is_empty(),
            "the daemon logged {} unexpected WARN/ERROR line(s) (declare expected ones with \
             Daemon::allow_log):\n{}\n--- full daemon log ---\n{}",
            problems.len(),
            problems.join("\n"),
            self.log()
        );
    }

    /// [`Daemon::assert_clean_log`] with `expected` declared as allowed for
    /// this check (the WARN/ERROR lines the test provokes on purpose).
    #[track_caller]
    pub fn assert_clean_log_except(&self, expected: &[&str]) {
        let mut allowed = self.allowed_log().to_vec();
        allowed.extend(expected.iter().map(|e| e.to_string()));
        let problems = log_problems(&self.log(), &allowed);
        assert!(
            problems.is_empty(),
            "the daemon logged {} unexpected WARN/ERROR line(s) (expected only lines \
             containing {expected:?}):\n{}\n--- full daemon log ---\n{}",
            problems.len(),
            problems.join("\n"),
            self.log()
        );
    }
}
