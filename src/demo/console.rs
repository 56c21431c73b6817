//! The service's output: one ordered stream of lines (the banner, the "mail" carrying sign-in
//! codes, job and shutdown notes, the tour's narration) that the command's thread writes to
//! standard output, and the [`Outbox`] that stands in for an e-mail provider.
//!
//! Request handlers run on the runtime's worker threads while the command's thread holds
//! standard output, so they never print: they queue a line here, and the command's thread
//! writes and flushes it.

use tokio::sync::{broadcast, mpsc};

/// Most lines waiting to be written. Lines beyond it are dropped (and counted in the next
/// line that fits) rather than growing memory while nobody reads standard output.
const CONSOLE_LINES_MAX: usize = 4096;
/// Most sent codes kept for a slow [`Outbox::subscribe`]r before the oldest is dropped.
const OUTBOX_MAILS_MAX: usize = 256;

/// A handle for queueing output lines. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Console {
    lines: mpsc::Sender<String>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Console {
    /// A console and the receiving end the command's thread drains.
    pub fn new() -> (Console, mpsc::Receiver<String>) {
        let (lines, rx) = mpsc::channel(CONSOLE_LINES_MAX);
        let console = Console {
            lines,
            dropped: Default::default(),
        };
        (console, rx)
    }

    /// Queues one line (without its newline).
    pub fn line(&self, line: impl Into<String>) {
        use std::sync::atomic::Ordering;
        let mut line = line.into();
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            line = format!(
                "({dropped} line(s) of output dropped: standard output was not read)\n{line}"
            );
        }
        if self.lines.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A sign-in code "sent" to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mail {
    /// The address.
    pub to: String,
    /// The one-time code.
    pub code: String,
}

/// Where sign-in codes go instead of an e-mail provider: a line on the console (which a person
/// reads, and which the browser test parses), and a channel the tour subscribes to. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    console: Console,
    sent: broadcast::Sender<Mail>,
}

impl Outbox {
    /// An outbox printing to `console`.
    pub fn new(console: Console) -> Outbox {
        let (sent, _) = broadcast::channel(OUTBOX_MAILS_MAX);
        Outbox { console, sent }
    }

    /// "Sends" `code` to `to`: prints `mail to {to}: your sign-in code is {code} (valid {ttl_s} s)`.
    pub fn send_code(&self, to: &str, code: &str, ttl_s: u64) {
        self.console.line(format!(
            "mail to {to}: your sign-in code is {code} (valid {ttl_s} s)"
        ));
        // Nobody listening (the service without its tour) is the normal case.
        let _ = self.sent.send(Mail {
            to: to.to_owned(),
            code: code.to_owned(),
        });
    }

    /// Every code sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Mail> {
        self.sent.subscribe()
    }
}
