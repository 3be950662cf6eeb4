//! How nanokit's installer runs: npm's executable and arguments, and how
//! failed installs are retried. Plain options, shared by npm's runner and
//! the direct installer.

use std::path::PathBuf;
use std::time::Duration;

/// How nanokit's own installer runs npm.
#[derive(Debug, Clone)]
pub struct NpmOptions {
    /// The npm executable (default `npm`, found on `PATH`).
    pub npm: PathBuf,
    /// Extra arguments appended to `npm install` (e.g. `--registry=…`).
    pub extra_args: Vec<String>,
    pub retry: RetryOptions,
}

impl Default for NpmOptions {
    fn default() -> Self {
        NpmOptions {
            npm: PathBuf::from("npm"),
            extra_args: Vec::new(),
            retry: RetryOptions::default(),
        }
    }
}

/// How failed npm runs are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryOptions {
    /// Attempts in all (1: no retry). Default 3.
    pub attempts: u32,
    /// No retry is started whose wait would end later than this after the
    /// first attempt started. Default 30 s.
    pub budget: Duration,
    /// The wait before the first retry; it doubles for each next one, each
    /// drawn with ±50 % jitter. Default 1 s.
    pub first_delay: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            attempts: 3,
            budget: Duration::from_secs(30),
            first_delay: Duration::from_secs(1),
        }
    }
}
