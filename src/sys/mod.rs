//! The OS layer: files, processes and host identity, with no knowledge of
//! packages, services or state. Everything above uses it; it uses nothing
//! of the crate but [`crate::error`].

pub mod beneath;
pub mod command;
pub mod fs;
pub mod host;
pub mod private;
pub mod proc;
