//! `keel demo`: the command-line side of the demo web service. The service itself lives in
//! `src/demo/`; this file turns the parsed options into the service's [`Options`] (which store,
//! which port, serve or tour) and reports a build without the `demo` feature.

use std::io::Write;
use std::path::Path;

use super::failure::CmdResult;
#[cfg(not(feature = "demo"))]
use super::failure::Failure;

/// What `keel demo` was asked to do.
#[derive(Debug)]
#[cfg_attr(not(feature = "demo"), allow(dead_code))]
pub struct DemoOptions {
    /// The port on 127.0.0.1 (0: any free port). Ignored by the tour, which always takes a free
    /// one.
    pub port: u16,
    /// A backend URL replacing the `--db` directory.
    pub url: Option<String>,
    /// Run the tour instead of serving until Ctrl-C.
    pub tour: bool,
}

/// Serves the demo (or runs its tour) on the store in `dir`, or on `--url`'s backend.
#[cfg(feature = "demo")]
pub fn run(options: DemoOptions, dir: &Path, out: &mut dyn Write) -> CmdResult {
    use crate::demo::{Options, StoreChoice};

    let store = match (options.url, options.tour) {
        (Some(url), _) => StoreChoice::Url(url),
        (None, true) => StoreChoice::Temporary,
        (None, false) => StoreChoice::Dir(dir.to_path_buf()),
    };
    crate::demo::run(
        Options {
            port: options.port,
            store,
            tour: options.tour,
        },
        out,
    )
}

/// Without the `demo` feature there is no service to run.
#[cfg(not(feature = "demo"))]
pub fn run(_options: DemoOptions, _dir: &Path, _out: &mut dyn Write) -> CmdResult {
    Err(Failure::Error(
        "keel was built without the `demo` feature (a default feature); rebuild with it to \
         run the demo service"
            .into(),
    ))
}
