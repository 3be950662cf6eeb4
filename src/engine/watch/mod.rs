//! `nanokit watch`: the reconciliation loop. Its status and events, as
//! other processes read them, are defined in [`status`].

pub mod status;
