//! `lab-ops`: parse the command line, run, print the error, exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = natmap::cli::Opts::parse();
    match natmap::cli::run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
