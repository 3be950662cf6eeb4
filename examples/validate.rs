//! `cargo run --example validate -- <nanokit.yml>…`: the CLI's `validate`
//! without the Node wrapper, for measuring what loading a hostile file costs
//! (`/usr/bin/time -v target/debug/examples/validate bomb.yml`).

#[tokio::main]
async fn main() {
    let mut code = 0;
    for f in std::env::args().skip(1) {
        code = code.max(nanokit::cli::run(vec!["validate".into(), "-f".into(), f]).await);
    }
    std::process::exit(code);
}
