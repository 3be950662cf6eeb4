//! Fuzz target for the config loader (`config::load_str`).
//!
//! Inputs: YAML-ish documents from a small grammar (keys nanokit knows and
//! junk, every scalar style, anchors and aliases, deep and wide nesting,
//! broken indentation), the example and broken configurations, and byte
//! mutations and splices of all of these. For each input:
//! * the loader returns (no panic; a stack overflow aborts the binary, so
//!   it fails the run too; the harness runs tests on 2 MiB stacks);
//! * an error has a known code, names `nanokit.yml`, and its line and
//!   column lie inside the input;
//! * no message shows the value of a variable (`${SECRET}`);
//! * an accepted configuration keeps what validation promises `up`
//!   (durations within bounds, names that fit container and file names,
//!   a non-empty `start` for the process provider, …).
//!
//! Bounded: `NANOKIT_FUZZ_SECS` seconds (default 3) from seed
//! `NANOKIT_FUZZ_SEED` (default fixed, so the normal suite is
//! reproducible). The long run, e.g.
//! `NANOKIT_FUZZ_SECS=600 NANOKIT_FUZZ_SEED=$RANDOM cargo test --release --test config_fuzz -- --nocapture`,
//! also writes each input to `$CARGO_TARGET_TMPDIR/config_fuzz_current.yml`
//! before loading it, so an abort leaves the input behind.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use nanokit::config::{self, interp::Vars, load_str, Config, ConfigError, ProviderKind};

const SECRET: &str = "s3cr3t-Zq9-value";

const KEYS: &[&str] = &[
    "name",
    "version",
    "infra",
    "provider",
    "state",
    "runtimes",
    "services",
    "volumes",
    "networks",
    "environments",
    "image",
    "runtime",
    "start",
    "port",
    "expose",
    "path",
    "depends_on",
    "env",
    "instances",
    "updateStrategy",
    "provisioning",
    "install",
    "hooks",
    "prestart",
    "prestart_container",
    "poststart",
    "prestop",
    "poststop",
    "healthcheck",
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "cpu",
    "memory",
    "local",
    "prod",
    "api",
    "db",
    "web",
    "node",
    "data",
    "<<",
    "x-a",
    "K",
    "A_B",
    "",
    "a b",
    "é",
    "UPPER",
    "-lead",
    "x.y",
];

const SCALARS: &[&str] = &[
    "run",
    "node server.js",
    "exec sleep 600",
    "''",
    "\"\"",
    "'  '",
    "~",
    "null",
    "true",
    "false",
    "0",
    "1",
    "-1",
    "2",
    "1000",
    "1001",
    "65535",
    "65536",
    "1e23",
    "2.5",
    "0x10",
    "1e300",
    "nan",
    ".inf",
    "0s",
    "1ms",
    "500us",
    "5s",
    "24h",
    "25h",
    "99999999999999h",
    "1s 500ms",
    "0.5",
    "512mb",
    "6mb",
    "1kb",
    "99999tb",
    "process",
    "docker",
    "kubernetes",
    "recreate",
    "rolling",
    "data:/data",
    "./x:/x",
    "/abs:rel",
    ":",
    "db",
    "api",
    "[db]",
    "[api, db]",
    "{}",
    "[]",
    "${A}",
    "${SECRET}",
    "x${SECRET}y",
    "${PORT}",
    "${PORT:-8080}",
    "${U:-${V:-${A}}}",
    "${MISSING:?set it}",
    "${SECRET:?x}",
    "${",
    "${}",
    "${9}",
    "${A:+x}",
    "$$A",
    "${BIG}",
    "${BIG}${BIG}${BIG}${BIG}",
    "'${SECRET}'",
    "\"${SECRET}\"",
    "\"\\u00e9\\t\"",
    "|\n  block\n",
    ">-\n  folded\n",
    "!!str 5",
    "!custom x",
    "&a1 v",
    "*a1",
    "*nope",
    "CMD-SHELL",
    "# comment",
    "é",
    "a: b",
    "- x",
    "? k",
    "---",
    "...",
    "%YAML 1.2",
    "\t",
];

/// A random config-shaped document from the grammar.
struct Gen<'r> {
    rng: &'r mut fastrand::Rng,
    anchors: Vec<String>,
    out: String,
}

impl Gen<'_> {
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.rng.usize(..xs.len())]
    }

    fn key(&mut self) -> String {
        match self.rng.u8(..20) {
            0 => format!("k{}", self.rng.u32(..1000)),
            1 => "s".repeat(self.rng.usize(30..80)),
            2 => format!("'{}'", self.pick(KEYS)),
            _ => self.pick(KEYS).to_string(),
        }
    }

    fn scalar(&mut self) -> String {
        match self.rng.u8(..30) {
            0 if !self.anchors.is_empty() => {
                let a = self.anchors[self.rng.usize(..self.anchors.len())].clone();
                format!("*{a}")
            }
            1 => "x".repeat(self.rng.usize(0..300)),
            2 => format!("{}", self.rng.i64(..)),
            3 => format!("{}ms", self.rng.u64(..)),
            4 => format!("{}", self.rng.f64() * 10f64.powi(self.rng.i32(-5..30))),
            _ => self.pick(SCALARS).to_string(),
        }
    }

    fn anchor(&mut self) -> String {
        if self.rng.u8(..8) == 0 {
            let a = format!("a{}", self.anchors.len());
            self.anchors.push(a.clone());
            format!("&{a} ")
        } else {
            String::new()
        }
    }

    /// A block node at `indent`; `inline` when it follows `key:` on the
    /// same line.
    fn block(&mut self, indent: usize, depth: usize) {
        let pad = |n: usize| " ".repeat(n);
        let wrong = self.rng.u8(..40) == 0;
        let step = if wrong { self.rng.usize(0..4) } else { 2 };
        match self.rng.u8(..10) {
            _ if depth == 0 => {
                let s = self.scalar();
                self.out.push(' ');
                self.out.push_str(&s);
                self.out.push('\n');
            }
            0..=4 => {
                let a = self.anchor();
                self.out.push(' ');
                self.out.push_str(&a);
                self.out.push('\n');
                for _ in 0..self.rng.usize(0..6) {
                    let k = self.key();
                    self.out.push_str(&pad(indent + step));
                    self.out.push_str(&k);
                    self.out.push(':');
                    self.block(indent + step, depth - 1);
                }
            }
            5..=6 => {
                let a = self.anchor();
                self.out.push(' ');
                self.out.push_str(&a);
                self.out.push('\n');
                for _ in 0..self.rng.usize(0..5) {
                    self.out.push_str(&pad(indent + step));
                    self.out.push('-');
                    self.block(indent + step, depth - 1);
                }
            }
            7 => {
                let f = self.flow(depth);
                self.out.push(' ');
                self.out.push_str(&f);
                self.out.push('\n');
            }
            _ => {
                let s = self.scalar();
                self.out.push(' ');
                self.out.push_str(&s);
                self.out.push('\n');
            }
        }
    }

    fn flow(&mut self, depth: usize) -> String {
        if depth == 0 {
            return self.scalar().replace('\n', " ");
        }
        let a = self.anchor();
        let n = self.rng.usize(0..5);
        if self.rng.bool() {
            let items: Vec<String> = (0..n).map(|_| self.flow(depth - 1)).collect();
            format!("{a}[{}]", items.join(", "))
        } else {
            let items: Vec<String> = (0..n)
                .map(|_| format!("{}: {}", self.key(), self.flow(depth - 1)))
                .collect();
            format!("{a}{{{}}}", items.join(", "))
        }
    }

    /// A mostly valid config: the shape validation walks through.
    fn config(&mut self) {
        self.out.push_str("name: ");
        let n = match self.rng.u8(..10) {
            0 => self.scalar(),
            1 => "p".repeat(self.rng.usize(1..60)),
            _ => "demo".into(),
        };
        self.out.push_str(&n);
        self.out.push('\n');
        if self.rng.bool() {
            let p = self.pick(&["process", "docker", "docker", "other"]);
            self.out.push_str(&format!("infra:\n  provider: {p}\n"));
        }
        if self.rng.u8(..3) == 0 {
            self.out
                .push_str("x-defaults: &defaults\n  start: run\n  image: node\n");
            self.anchors.push("defaults".into());
        }
        if self.rng.u8(..3) == 0 {
            self.out.push_str("runtimes:\n  node:");
            self.block(2, 3);
        }
        if self.rng.u8(..3) == 0 {
            self.out.push_str("volumes:\n  data: {}\n");
        }
        self.out.push_str("services:\n");
        for _ in 0..self.rng.usize(1..5) {
            let k = self.key();
            self.out.push_str(&format!("  {k}:\n"));
            for _ in 0..self.rng.usize(0..8) {
                let k = self.pick(&[
                    "start",
                    "image",
                    "runtime",
                    "port",
                    "expose",
                    "instances",
                    "env",
                    "volumes",
                    "depends_on",
                    "healthcheck",
                    "hooks",
                    "cpu",
                    "memory",
                    "updateStrategy",
                    "provisioning",
                    "<<",
                ]);
                self.out.push_str(&format!("    {k}:"));
                if k == "healthcheck" && self.rng.bool() {
                    self.out.push('\n');
                    for hk in ["test", "interval", "timeout", "start_period", "retries"] {
                        if self.rng.bool() {
                            let v = self.scalar().replace('\n', " ");
                            self.out.push_str(&format!("      {hk}: {v}\n"));
                        }
                    }
                } else {
                    self.block(4, 2);
                }
            }
        }
        if self.rng.u8(..3) == 0 {
            self.out.push_str("environments:\n  prod:");
            self.block(2, 3);
        }
    }
}

/// Something large or deep, cheap to write: where limits matter.
fn big(rng: &mut fastrand::Rng) -> String {
    let tail = "name: x\nservices:\n  s:\n    start: run\n";
    let n = rng.usize(1..3000);
    match rng.u8(..7) {
        0 => format!("x:\n  {}v\n{tail}", "- ".repeat(n)),
        1 => format!(
            "x: {}{}\n{tail}",
            "[".repeat(n),
            "]".repeat(rng.usize(0..=n))
        ),
        2 => format!(
            "x: {}{}\n{tail}",
            "{a: ".repeat(n),
            "}".repeat(rng.usize(0..=n))
        ),
        3 => {
            let mut s = String::new();
            for i in 0..n.min(400) {
                s.push_str(&" ".repeat(i));
                s.push_str("k:\n");
            }
            s
        }
        4 => {
            // Alias chains of random width and depth.
            let w = rng.usize(1..12);
            let mut s = format!("x0: &l0 [{}]\n", vec!["a"; w].join(", "));
            for i in 1..rng.usize(2..12) {
                s.push_str(&format!(
                    "x{i}: &l{i} [{}]\n",
                    vec![format!("*l{}", i - 1); w].join(", ")
                ));
            }
            s + tail
        }
        5 => format!(
            "{tail}    env: {{ K: \"{}\" }}\n",
            "${U:-".repeat(n.min(200)) + &"}".repeat(n.min(200))
        ),
        _ => format!(
            "x-a: &a [{}]\nx: [{}]\n{tail}",
            "v, ".repeat(n),
            "*a, ".repeat(n)
        ),
    }
}

const PUNCT: &[u8] = b":-&*[]{},#'\"$!|>?%@` \t\n\\";

fn mutate(rng: &mut fastrand::Rng, input: &str, seeds: &[String]) -> String {
    let mut b = input.as_bytes().to_vec();
    for _ in 0..rng.usize(1..6) {
        let len = b.len();
        let at = if len == 0 { 0 } else { rng.usize(..len) };
        match rng.u8(..8) {
            0 if len > 0 => b[at] = PUNCT[rng.usize(..PUNCT.len())],
            1 if len > 0 => {
                let end = (at + rng.usize(1..40)).min(len);
                b.drain(at..end);
            }
            2 if len > 0 => {
                let end = (at + rng.usize(1..60)).min(len);
                let chunk = b[at..end].to_vec();
                for _ in 0..rng.usize(1..8) {
                    b.splice(at..at, chunk.iter().copied());
                }
            }
            3 => {
                let t = if rng.bool() {
                    SCALARS[rng.usize(..SCALARS.len())]
                } else {
                    KEYS[rng.usize(..KEYS.len())]
                };
                b.splice(at..at, t.bytes());
            }
            4 => {
                let other = seeds[rng.usize(..seeds.len())].as_bytes();
                if !other.is_empty() {
                    let s = rng.usize(..other.len());
                    let e = (s + rng.usize(1..200)).min(other.len());
                    b.splice(at..at, other[s..e].iter().copied());
                }
            }
            5 => {
                // Re-indent the line at `at`.
                let start = b[..at]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |i| i + 1);
                if rng.bool() {
                    b.splice(start..start, std::iter::repeat_n(b' ', rng.usize(1..4)));
                } else if b.get(start) == Some(&b' ') {
                    b.remove(start);
                }
            }
            6 => b.splice(at..at, [b'\n']).for_each(drop),
            _ => b.insert(at, rng.u8(..)),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn seeds() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for f in ["examples/basic/nanokit.yml", "examples/docker/nanokit.yml"] {
        out.push(std::fs::read_to_string(root.join(f)).unwrap());
    }
    let broken = root.join("tests/fixtures/broken");
    let mut files: Vec<_> = std::fs::read_dir(broken)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        out.push(std::fs::read_to_string(f).unwrap());
    }
    out
}

fn vars() -> Vars {
    let v = |pairs: &[(&str, String)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    Vars::new(
        v(&[
            ("A", "1".into()),
            ("SECRET", SECRET.into()),
            ("PORT", "8080".into()),
            ("EMPTY", String::new()),
        ]),
        v(&[("BIG", "b".repeat(1 << 20)), ("A", "dot".into())]),
    )
}

fn check_error(src: &str, e: &ConfigError) {
    assert!(
        ["ENKCONFIG", "ENKCYCLE", "ENKDEP"].contains(&e.code),
        "unexpected code: {e}"
    );
    let shown = e.to_string();
    assert!(shown.starts_with("nanokit.yml"), "{shown}");
    assert!(!shown.contains(SECRET), "a variable's value in: {shown}");
    if let Some(l) = e.loc {
        // YAML's line breaks: `\n`, `\r\n`, a lone `\r`.
        let lines: Vec<&str> = src
            .split("\r\n")
            .flat_map(|l| l.split(['\r', '\n']))
            .collect();
        assert!(
            l.line >= 1 && l.line <= lines.len(),
            "line {} outside the input's {} lines: {shown}",
            l.line,
            lines.len()
        );
        let width = lines[l.line - 1].chars().count();
        assert!(
            l.col >= 1 && l.col <= width + 2,
            "column {} outside line {} ({width} characters): {shown}",
            l.col,
            l.line
        );
    }
}

fn check_config(c: &Config) {
    for w in &c.warnings {
        assert!(!w.to_string().contains(SECRET), "{w}");
    }
    for (name, s) in &c.services {
        let longest = format!("nk-{}-{}-{name}-install-abcdef", c.name, c.env);
        assert!(
            longest.len() <= config::MAX_CONTAINER_NAME,
            "{longest} is too long"
        );
        if c.provider == ProviderKind::Process {
            assert!(s.start.as_deref().is_some_and(|x| !x.trim().is_empty()));
        }
        if let Some(x) = &s.start {
            assert!(!x.trim().is_empty(), "empty start of {name}");
        }
        assert!(s.instances >= 1 && s.instances <= 1000);
        if let Some(h) = &s.healthcheck {
            for d in [h.interval, h.timeout] {
                assert!(
                    d >= config::MIN_DURATION && d <= config::MAX_DURATION,
                    "{h:?}"
                );
            }
            assert!(h.start_period <= config::MAX_DURATION, "{h:?}");
            assert!(!h.test.is_empty());
        }
    }
    for v in c.volumes.values() {
        let derived = format!("nk-{}-{}-{}", c.name, c.env, v.name);
        assert!(derived.len() <= config::MAX_FILE_NAME);
    }
}

#[test]
fn config_loader_fuzz() {
    let secs: f64 = std::env::var("NANOKIT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let long = std::env::var("NANOKIT_FUZZ_SECS").is_ok();
    let seed: u64 = std::env::var("NANOKIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e6b_6675_7a7a);
    let current = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config_fuzz_current.yml");
    let mut rng = fastrand::Rng::with_seed(seed);
    let seeds = seeds();
    let vars = vars();
    let mut corpus = seeds.clone();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut n, mut accepted) = (0u64, 0u64);
    let mut slowest = (Duration::ZERO, String::new());
    while Instant::now() < deadline {
        let input = match rng.u8(..10) {
            0..=2 => {
                let mut g = Gen {
                    rng: &mut rng,
                    anchors: Vec::new(),
                    out: String::new(),
                };
                g.config();
                g.out
            }
            3 => {
                let mut g = Gen {
                    rng: &mut rng,
                    anchors: Vec::new(),
                    out: String::new(),
                };
                g.out.push_str("x:");
                let d = g.rng.usize(1..8);
                g.block(0, d);
                g.out.push_str("name: x\nservices:\n  s:\n    start: run\n");
                g.out
            }
            4 => big(&mut rng),
            _ => {
                let base = &corpus[rng.usize(..corpus.len())];
                mutate(&mut rng, base, &seeds)
            }
        };
        if long {
            std::fs::write(&current, &input).unwrap();
        }
        let env = if rng.u8(..4) == 0 { "prod" } else { "local" };
        let t0 = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| {
            load_str(
                &input,
                Path::new("nanokit.yml"),
                Path::new("/tmp"),
                env,
                &vars,
            )
        }));
        let took = t0.elapsed();
        if took > slowest.0 {
            slowest = (took, input.clone());
        }
        let checked = catch_unwind(AssertUnwindSafe(|| match &r {
            Err(_) => panic!("the loader panicked"),
            Ok(Err(e)) => check_error(&input, e),
            Ok(Ok(c)) => check_config(c),
        }));
        if checked.is_err() {
            let saved = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("config_fuzz_fail_{seed}_{n}.yml"));
            std::fs::write(&saved, &input).unwrap();
            panic!(
                "input #{n} (seed {seed}, env {env}) failed; saved to {}",
                saved.display()
            );
        }
        if matches!(r, Ok(Ok(_))) {
            accepted += 1;
            // Accepted inputs are good bases for further mutation.
            if corpus.len() < 2000 && input.len() < 20_000 {
                corpus.push(input);
            }
        }
        n += 1;
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config_fuzz_slowest.yml");
    std::fs::write(&path, &slowest.1).unwrap();
    println!(
        "config fuzz: seed {seed}, {secs} s, {n} inputs, {accepted} accepted; slowest {:?} ({} bytes, saved to {})",
        slowest.0,
        slowest.1.len(),
        path.display()
    );
    assert!(n > 0);
}
