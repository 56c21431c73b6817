//! [`Failure`]: how a command ends when it does not succeed, and therefore which exit code the
//! process returns. Exit codes: 0 success, 1 a "missing / not set" outcome the caller may
//! script on (like `test` or `grep`), 2 an error (bad input, a damaged or locked store, I/O).

use std::fmt;
use std::io;
use std::process::ExitCode;

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// An expected negative outcome, e.g. `get` on a missing key or a refused `set --nx`.
    /// Exit code 1.
    Negative(String),
    /// Anything that went wrong: bad input, an engine error, an I/O error. Exit code 2.
    Error(String),
    /// Standard output was closed by its reader (`keel scan | head`). Not an error for the
    /// user: the process stops writing and exits 0 without a message.
    BrokenPipe,
}

impl Failure {
    /// A [`Failure::Error`] from anything displayable.
    pub fn error(message: impl fmt::Display) -> Self {
        Failure::Error(message.to_string())
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Negative(_) => ExitCode::from(1),
            Failure::Error(_) => ExitCode::from(2),
            Failure::BrokenPipe => ExitCode::SUCCESS,
        }
    }
}

impl From<keel_engine::Error> for Failure {
    fn from(e: keel_engine::Error) -> Self {
        Failure::Error(e.to_string())
    }
}

impl From<keel::Error> for Failure {
    fn from(e: keel::Error) -> Self {
        Failure::Error(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure::BrokenPipe
        } else {
            Failure::Error(format!("I/O error: {e}"))
        }
    }
}

/// The result of a command.
pub type CmdResult = Result<(), Failure>;
