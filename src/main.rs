//! `lab-ops`: parse the command line, run, print the error, exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = match natmap::cli::Opts::try_parse() {
        Ok(opts) => opts,
        // Under --json a bad command line is a JSON error too.
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--json") => {
            let message = e.kind().to_string();
            let detail = e.to_string();
            let first = detail.lines().next().unwrap_or(&message);
            return natmap::cli::usage_error(true, first.trim_start_matches("error: "));
        }
        Err(e) => e.exit(),
    };
    match natmap::cli::run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
