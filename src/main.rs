//! `lab-ops`: parse the command line, run, print the error, exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = match natmap::cli::Opts::try_parse() {
        Ok(opts) => opts,
        // Under --json a bad command line is a JSON error too.
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--json") => {
            // clap's text without the usage and help hints, on one line.
            let detail = e.to_string();
            let message: Vec<&str> = detail
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            return natmap::cli::usage_error(true, message.join(" ").trim_start_matches("error: "));
        }
        Err(e) => e.exit(),
    };
    let json = opts.global.json;
    match natmap::cli::run(opts) {
        Ok(code) => code,
        Err(failure) => failure.report(json),
    }
}
