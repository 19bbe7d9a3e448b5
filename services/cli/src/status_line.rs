//! One progress line on standard error: rewritten in place on a terminal,
//! one line per update otherwise (logs).

use std::io::{IsTerminal, Write};

/// A progress line.
#[derive(Debug)]
pub struct StatusLine {
    tty: bool,
}

impl StatusLine {
    /// A line on standard error.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `line`.
    pub fn show(&self, line: &str) {
        let mut e = std::io::stderr();
        let _ = if self.tty {
            write!(e, "\r{line}\x1b[K")
        } else {
            writeln!(e, "{line}")
        };
    }

    /// Ends the line on a terminal, so that what follows starts on its own.
    pub fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Default for StatusLine {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds as h:mm:ss.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
