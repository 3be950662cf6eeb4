//! The standalone `nanokit` executable (also installed as `nkapp`): the npm
//! CLI without Node. Both hand argv to [`nanokit::cli::run_as`], so they have
//! the same commands, output and exit codes. What `bin/nanokit.js` and the
//! napi `cli()` do around it is done here too:
//! - the exit code is the one `run_as` returns (the shim's `process.exitCode`);
//!   a panic prints `nanokit: <message>` and exits 1, like a rejected `cli()`;
//! - stdout and stderr are flushed, then the process exits without waiting for
//!   background tasks (Node does not wait for the addon's runtime either);
//! - tracing, the OTLP flush and Ctrl-C handling happen inside `run_as`, as
//!   under Node; leases still held at exit are released (none normally are).
//!
//! Start-up is kept small: commands that only read files and print (`plan`,
//! `validate`, `graph`, `timeline`, `lock`, `--help`, `--version`) run on a
//! single-threaded runtime; the others get napi's multi-threaded one.

#[cfg(not(feature = "node"))]
fn main() {
    standalone_main(nanokit::cli::NAME)
}

#[cfg(feature = "node")]
fn main() {
    built_with_node()
}

/// Runs the command line as `default_name` (`nanokit`, or `nkapp` for the
/// alias's own executable); a link named `nanokit` or `nkapp` to either runs
/// under its own name.
#[cfg(not(feature = "node"))]
pub fn standalone_main(default_name: &'static str) -> ! {
    use std::io::Write;

    let mut argv = std::env::args_os();
    let argv0 = argv
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let invoked = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
    let name = match invoked {
        "nanokit" => nanokit::cli::NAME,
        "nkapp" => nanokit::cli::ALIAS,
        _ => default_name,
    };
    // How the shell starts it again (for the hints it prints): the path it
    // was started by, or its name when the shell found it on PATH.
    let program = if argv0.contains('/') && invoked == name {
        nanokit::cli::shell_word(&argv0)
    } else {
        name.to_string()
    };

    let runtime = if single_threaded(&args) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    let code = match runtime {
        Ok(rt) => {
            let run =
                std::panic::AssertUnwindSafe(|| rt.block_on(nanokit::cli::run_as(&program, args)));
            match std::panic::catch_unwind(run) {
                Ok(code) => code,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "the command panicked".into());
                    eprintln!("{name}: {msg}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            1
        }
    };
    nanokit::lock::release_all();
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}

/// Whether the command only reads files and prints, so one thread does it
/// (no worker threads to start). Anything else, or a command this does not
/// recognise, gets the multi-threaded runtime the npm CLI runs on.
#[cfg(not(feature = "node"))]
fn single_threaded(args: &[String]) -> bool {
    match args.iter().find(|a| !a.starts_with('-')) {
        None => true, // --help, --version, or a usage error
        Some(cmd) => matches!(
            cmd.as_str(),
            "validate" | "graph" | "plan" | "timeline" | "lock" | "help"
        ),
    }
}

/// Built with the `node` feature (`napi build` builds every target), the
/// executable cannot work: the engine would pull in Node-API symbols that only
/// Node provides, and the link would fail. So this variant does not touch the
/// `nanokit` library at all (rustc then does not link it) and only says how to
/// build the real executable.
#[cfg(feature = "node")]
pub fn built_with_node() -> ! {
    eprintln!(
        "nanokit: this executable was built with the `node` feature; build the standalone one with `cargo build --release --bin nanokit`"
    );
    std::process::exit(1);
}
