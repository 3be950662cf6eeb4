//! `nkapp`: the standalone `nanokit` executable under the name Nanokit's docs
//! use (`nkapp deploy`, `nkapp infra unlock`). Same commands, output and exit
//! codes; `--help` and `--version` say `nkapp`.

#[allow(dead_code)] // its `main` is the `nanokit` executable's
#[path = "nanokit.rs"]
mod nanokit_bin;

#[cfg(not(feature = "node"))]
fn main() {
    nanokit_bin::standalone_main(nanokit::cli::ALIAS)
}

#[cfg(feature = "node")]
fn main() {
    nanokit_bin::built_with_node()
}
