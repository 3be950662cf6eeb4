//! `nanokit hub`: serves the dashboard on 127.0.0.1 until Ctrl-C.

use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{exit, CliResult};
use crate::hub::{Hub, HubOptions, DEFAULT_PORT};

#[derive(Debug, Args)]
#[command(
    after_help = "The page is served on 127.0.0.1 only, behind a random token in the printed URL. \
From another machine, forward the port over SSH and open the printed URL there:\n  \
ssh -N -L 7420:127.0.0.1:7420 user@host\nNever bind it to a public address."
)]
pub struct HubArgs {
    /// Path to the nanokit.yml
    #[arg(
        short = 'f',
        long = "file",
        default_value = "nanokit.yml",
        env = "NANOKIT_FILE"
    )]
    pub file: PathBuf,
    /// An environment to show (repeatable; default: the default environment and every other one
    /// with a state file beside the nanokit.yml), grouped on the page
    #[arg(short = 'e', long = "env")]
    pub envs: Vec<String>,
    /// A shared package repository to show: installed packages, installs in progress with their
    /// holder and waiters, staging leftovers (repeatable)
    #[arg(long = "repo", value_name = "DIR")]
    pub repos: Vec<PathBuf>,
    /// Port on 127.0.0.1 (0: any free port)
    // Parsed by clap's parser of a u32 in range (which the binary has for
    // `watch --keep-traces`), not a second one for u16.
    #[arg(long, default_value_t = DEFAULT_PORT.into(), value_parser = clap::value_parser!(u32).range(0..=65535))]
    pub port: u32,
    /// Open the page in the default browser
    #[arg(long)]
    pub open: bool,
}

pub async fn run(args: HubArgs) -> CliResult {
    let hub = Hub::start(HubOptions {
        file: args.file,
        envs: args.envs,
        repos: args.repos,
        port: u16::try_from(args.port).expect("clap keeps it in 0..=65535"),
        ..HubOptions::default()
    })
    .await?;
    outln!("{}", hub.url());
    errln!(
        "nanokit hub: serving on 127.0.0.1:{} only (Ctrl-C to stop). From another machine: ssh -N -L {0}:127.0.0.1:{0} <this host>, then open the URL above there.",
        hub.port()
    );
    if args.open {
        crate::hub::open_browser(hub.url());
    }
    let stop = CancellationToken::new();
    let _sigint = crate::sys::signal::install(stop.clone(), "stopping the hub…");
    let hub_stop = hub.stop_token();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = hub_stop.cancelled() => {}
    }
    hub.close().await;
    Ok(exit::OK)
}
