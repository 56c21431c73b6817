//! The pieces of the `keel` command-line tool that are not argument parsing: the error type
//! that decides the exit code, value formats (durations, escaped keys, the dump line format),
//! one function per command, and `keel migrate`'s
//! wrapper around [`keel::migrate`]. Only `src/main.rs` uses this module; the library crate does
//! not compile it.

pub mod commands;
pub mod demo;
pub mod dump;
pub mod duration;
pub mod escape;
pub mod failure;
pub mod flags;
pub mod migrate;
