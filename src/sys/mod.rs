//! The OS layer: files, processes and host identity, with no knowledge of
//! packages, services or state. Everything above uses it; it uses nothing
//! of the crate but [`crate::error`].

pub mod beneath;
pub(crate) mod command;
pub(crate) mod fs;
pub(crate) mod host;
pub(crate) mod net;
#[cfg(feature = "hub")]
pub(crate) mod notify;
pub(crate) mod private;
pub(crate) mod proc;
pub(crate) mod signal;
pub(crate) mod tls;
