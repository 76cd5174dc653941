//! What the three programs share at their edges: logging setup and turning errors into exits.

use std::io::IsTerminal;

/// Starts logging to stderr at the level in `RUST_LOG` (default `info`), in short lines.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    env_logger::Builder::from_env(env)
        .format_target(false)
        .format_timestamp_millis()
        .init();
}

/// Prints an error chain as one line, `program: error: outer: inner`, and exits with `code`.
pub fn exit_with_error(program: &str, err: &anyhow::Error, code: i32) -> ! {
    eprintln!("{program}: error: {err:#}");
    std::process::exit(code)
}

/// Progress of a long job on stderr: a bar on a terminal, a few plain lines otherwise. Quiet for
/// small jobs, where it would only be noise.
pub struct StderrProgress {
    label: String,
    total: u64,
    tty: bool,
    shown: bool,
    last_step: u64,
}

impl StderrProgress {
    pub const QUIET_BELOW: u64 = 16 << 20;

    pub fn new(label: &str) -> Self {
        StderrProgress {
            label: label.into(),
            total: 0,
            tty: std::io::stderr().is_terminal(),
            shown: false,
            last_step: 0,
        }
    }

    fn mib(n: u64) -> f64 {
        n as f64 / (1 << 20) as f64
    }
}

impl crate::build::Progress for StderrProgress {
    fn start(&mut self, total: u64) {
        self.total = total;
        self.shown = total >= Self::QUIET_BELOW;
    }

    fn advance(&mut self, done: u64) {
        if !self.shown || self.total == 0 {
            return;
        }
        let pct = done.min(self.total) * 100 / self.total;
        if self.tty {
            // Redraw at most once a percent.
            if pct != self.last_step || done == 0 {
                self.last_step = pct;
                let filled = (pct / 4) as usize;
                eprint!(
                    "\r{} [{}{}] {pct:3}% {:.1}/{:.1} MiB",
                    self.label,
                    "#".repeat(filled),
                    " ".repeat(25 - filled),
                    Self::mib(done),
                    Self::mib(self.total)
                );
            }
        } else {
            let step = pct / 25;
            if step > self.last_step && step < 4 {
                self.last_step = step;
                eprintln!(
                    "{}: {pct}% ({:.1} of {:.1} MiB)",
                    self.label,
                    Self::mib(done),
                    Self::mib(self.total)
                );
            }
        }
    }

    fn finish(&mut self) {
        if !self.shown {
            return;
        }
        if self.tty {
            eprintln!();
        }
        eprintln!("{}: done ({:.1} MiB)", self.label, Self::mib(self.total));
    }
}
