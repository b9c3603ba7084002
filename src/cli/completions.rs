//! `completions` and `man`: shell completions and manual pages generated from
//! the clap definitions, so they always match the real command line.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use color_eyre::eyre::{Result, WrapErr};

use super::Opts;

/// `completions`: print a shell completion script.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lab-ops completions bash > /etc/bash_completion.d/lab-ops
  lab-ops completions zsh > /usr/local/share/zsh/site-functions/_lab-ops
  lab-ops completions fish > ~/.config/fish/completions/lab-ops.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `man`: print the manual page, or write one page per command.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lab-ops man | man -l -
  lab-ops man --dir /usr/local/share/man/man1   # lab-ops.1, lab-ops-natmap.1, lab-ops-natmap-dnat.1, ...")]
pub struct ManArgs {
    /// Write lab-ops.1 and a page for every subcommand into DIR instead of
    /// printing lab-ops.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Opts::command(), "lab-ops", &mut buf);
    if shell == Shell::Bash {
        // clap_complete's bash script names the states of a hyphenated binary
        // two ways: the dispatch loop says `lab__ops__subcmd__natmap`, the case
        // arms `lab__subcmd__ops__subcmd__natmap`, so nothing after the first
        // word ever completes (clap-rs/clap#6421). Spell the arms the loop's
        // way; a no-op once clap_complete is fixed. tests/install.rs drives the
        // script in bash to prove it completes.
        let text = String::from_utf8(buf).expect("clap_complete writes UTF-8");
        buf = text.replace("lab__subcmd__ops", "lab__ops").into_bytes();
    }
    buf
}

/// The top-level manual page, lab-ops(1), in roff.
pub fn man_page() -> Vec<u8> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Opts::command())
        .render(&mut buf)
        .expect("writing to a Vec cannot fail");
    buf
}

/// Runs `completions`.
pub fn run_completions(args: CompletionsArgs) -> Result<ExitCode> {
    print(&completion_script(args.shell))
}

/// Runs `man`.
pub fn run_man(args: ManArgs) -> Result<ExitCode> {
    let Some(dir) = args.dir else {
        return print(&man_page());
    };
    std::fs::create_dir_all(&dir).wrap_err_with(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Opts::command(), &dir)
        .wrap_err_with(|| format!("writing manual pages into {}", dir.display()))?;
    let mut pages: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lab-ops") && n.ends_with(".1"))
        .collect();
    pages.sort();
    for page in pages {
        println!("{}", dir.join(page).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print(bytes: &[u8]) -> Result<ExitCode> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).wrap_err("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_cover_the_natmap_commands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            for word in ["lab-ops", "natmap", "dnat", "install", "ext-ip"] {
                assert!(script.contains(word), "{shell} completions lack {word:?}");
            }
        }
    }

    #[test]
    fn man_page_is_roff_for_lab_ops() {
        let page = String::from_utf8(man_page()).unwrap();
        assert!(page.contains(".TH lab-ops 1"), "{page}");
        assert!(page.contains("natmap"), "{page}");
        assert!(page.contains("completions"), "{page}");
    }
}
