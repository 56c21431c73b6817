//! The comparison harness's building blocks, kept apart from the workloads in `compare.rs`:
//! the backends and how each is opened ([`backends`]), measuring a cell ([`measure`]),
//! printing tables ([`report`]) and the servers the harness starts or prepares ([`servers`]).

pub mod backends;
pub mod measure;
pub mod report;
pub mod servers;
