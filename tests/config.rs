//! Ingestion: interpolation (every form and error), environment merge
//! precedence, runtime inheritance, warnings, graph errors, and the corpus
//! of broken files.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use nanokit::config::{self, interp::Vars, load_str, Config, ConfigError};
use nanokit::graph::{Dag, GraphError};

fn vars(pairs: &[(&str, &str)]) -> Vars {
    Vars::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        HashMap::new(),
    )
}

fn load(src: &str, env: &str, v: &Vars) -> Result<Config, ConfigError> {
    load_str(src, Path::new("nanokit.yml"), Path::new("/tmp"), env, v)
}

const BASE: &str = r#"
name: demo
runtimes:
  node:
    env: { NODE_ENV: development, SHARED: from-runtime, LEVEL: runtime }
    depends_on: [db]
    start: node index.js
services:
  db:
    start: "exec sleep 600"
    port: ${DB_PORT:-5432}
  api:
    runtime: node
    env: { LEVEL: service, TOKEN: "${API_TOKEN:?set API_TOKEN to the api token}" }
    depends_on: [cache]
  cache:
    start: redis-server
environments:
  prod:
    services:
      api:
        env: { LEVEL: prod }
        port: 8080
      cache:
        instances: 0
        start: unused
"#;

#[test]
fn interpolation_forms() {
    let c = load(BASE, "local", &vars(&[("API_TOKEN", "s3cret")])).unwrap();
    assert_eq!(
        c.services["db"].port,
        Some(5432),
        "default applies and becomes a number"
    );
    assert_eq!(c.services["api"].env["TOKEN"], "s3cret");
    let c = load(
        BASE,
        "local",
        &vars(&[("API_TOKEN", "x"), ("DB_PORT", "6000")]),
    )
    .unwrap();
    assert_eq!(c.services["db"].port, Some(6000));
    // .env values are used when the process env lacks them; the process env wins.
    let v = Vars::new(
        [("A".to_string(), "proc".to_string())].into(),
        [
            ("A".to_string(), "dot".to_string()),
            ("B".to_string(), "dot".to_string()),
        ]
        .into(),
    );
    let c = load(
        "name: x\nservices:\n  s:\n    start: run\n    env: { A: '${A}', B: '${B}', C: '$${A}' }\n",
        "local",
        &v,
    )
    .unwrap();
    assert_eq!(c.services["s"].env["A"], "proc");
    assert_eq!(c.services["s"].env["B"], "dot");
    assert_eq!(c.services["s"].env["C"], "${A}", "$$ escapes");
}

#[test]
fn interpolation_errors_name_the_location_and_never_the_value() {
    let e = load(BASE, "local", &vars(&[])).unwrap_err();
    assert_eq!(e.code, "ENKCONFIG");
    let loc = e.loc.unwrap();
    assert_eq!(loc.line, 14);
    assert!(e.to_string().starts_with("nanokit.yml:14:"), "{e}");
    assert!(
        e.message.contains("API_TOKEN") && e.message.contains("set API_TOKEN to the api token"),
        "{e}"
    );
    let cases = [
        ("start: \"x ${A\"", "unclosed"),
        ("start: \"${}\"", "no variable name"),
        ("start: \"${9X}\"", "not a valid variable name"),
        ("start: \"${A:+alt}\"", "unsupported form"),
        ("start: \"${MISSING:?}\"", "required variable `MISSING`"),
    ];
    for (line, want) in cases {
        let src = format!("name: x\nservices:\n  s:\n    {line}\n");
        let e = load(&src, "local", &vars(&[("A", "topsecret")])).unwrap_err();
        assert!(e.message.contains(want), "{line}: {e}");
        assert_eq!(e.loc.unwrap().line, 4, "{line}: {e}");
        assert!(e.loc.unwrap().col > 5, "column points into the value: {e}");
        assert!(!e.to_string().contains("topsecret"));
    }
    // Exactly at the `${`, inside the quotes.
    let src = "name: x\nservices:\n  s:\n    start: \"x ${A\"\n";
    let loc = load(src, "local", &vars(&[])).unwrap_err().loc.unwrap();
    assert_eq!((loc.line, loc.col), (4, 15));
    // A plain scalar folded over lines (found by the fuzz target): its value
    // is not its source text, so the error points at the scalar's start.
    let src =
        "name: x\nservices:\n  s:\n    start: run\n    env:\n      K: a long\n        value ${U\n";
    let e = load(src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("unclosed"), "{e}");
    let loc = e.loc.unwrap();
    assert_eq!((loc.line, loc.col), (6, 10), "{e}");
    // Unused environments are not interpolated: a prod-only required var does not fail local.
    let src = "name: x\nservices:\n  s:\n    start: run\nenvironments:\n  prod:\n    services:\n      s:\n        env: { K: '${PROD_ONLY:?needed in prod}' }\n";
    assert!(load(src, "local", &vars(&[])).is_ok());
    assert!(load(src, "prod", &vars(&[]))
        .unwrap_err()
        .message
        .contains("needed in prod"));
}

#[test]
fn merge_precedence_env_over_global_service_over_runtime() {
    let c = load(BASE, "local", &vars(&[("API_TOKEN", "t")])).unwrap();
    let api = &c.services["api"];
    assert_eq!(
        api.start.as_deref(),
        Some("node index.js"),
        "inherited from runtime"
    );
    assert_eq!(api.env["LEVEL"], "service", "service beats runtime");
    assert_eq!(api.env["SHARED"], "from-runtime", "maps merge key by key");
    let deps: Vec<&str> = api.dep_names().collect();
    assert_eq!(deps, ["db", "cache"], "runtime depends_on is inherited");
    assert_eq!(api.port, None);

    let c = load(BASE, "prod", &vars(&[("API_TOKEN", "t")])).unwrap_err();
    // prod disables cache, which api depends on.
    assert_eq!(c.code, "ENKDEP");
    assert!(c.message.contains("disabled"), "{c}");

    let fixed = BASE.replace("    depends_on: [cache]\n", "");
    let c = load(&fixed, "prod", &vars(&[("API_TOKEN", "t")])).unwrap();
    let api = &c.services["api"];
    assert_eq!(api.env["LEVEL"], "prod", "environment beats service");
    assert_eq!(api.env["TOKEN"], "t", "untouched keys stay");
    assert_eq!(api.port, Some(8080));
    assert!(!c.services.contains_key("cache"));
    assert_eq!(c.disabled, vec!["cache".to_string()]);
    assert_eq!(c.env, "prod");
    assert!(c.state_file.ends_with(".nanokit/state.prod.json"));

    let e = load(&fixed, "staging", &vars(&[("API_TOKEN", "t")])).unwrap_err();
    assert!(
        e.message.contains("environment `staging` is not defined") && e.message.contains("prod"),
        "{e}"
    );
}

#[test]
fn unknown_and_unsupported_keys_warn_by_name() {
    let src = "name: x\nversion: '3'\nservices:\n  s:\n    start: run\n    depens_on: [t]\n    cpu: 0.5\n    memory: 512mb\n    instances: 2\n    healthcheck: { test: 'true', intervall: 1s }\nnetworks:\n  n: {}\nfoo: 1\n";
    let c = load(src, "local", &vars(&[])).unwrap();
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    let has = |s: &str| w.iter().any(|x| x.contains(s));
    assert!(
        has("unknown key `depens_on` in service `s` is ignored; did you mean `depends_on`?"),
        "{w:#?}"
    );
    assert!(has("nanokit.yml:6:5"), "{w:#?}");
    assert!(has("unknown key `foo` in the top level"), "{w:#?}");
    assert!(has("`version` is not used"), "{w:#?}");
    assert!(has("`cpu` of service `s` is not enforced"), "{w:#?}");
    assert!(has("`memory` of service `s` is not enforced"), "{w:#?}");
    assert!(has("`instances: 2`"), "{w:#?}");
    assert!(has("unknown key `intervall` in healthcheck"), "{w:#?}");
    assert!(
        has("`networks` are not used by the process provider"),
        "{w:#?}"
    );
    let docker =
        "name: x\ninfra: { provider: docker }\nservices:\n  s: { image: i }\nnetworks:\n  n: {}\n";
    let c = load(docker, "local", &vars(&[])).unwrap();
    assert!(
        c.warnings.iter().any(|w| w
            .to_string()
            .contains("every service joins the network `nanokit-net-<env>`")),
        "{:#?}",
        c.warnings
    );
}

#[test]
fn cycles_print_the_path_and_unknown_dependencies_name_both_services() {
    let src = "name: x\nservices:\n  a: { start: r, depends_on: [b] }\n  b: { start: r, depends_on: [c] }\n  c: { start: r, depends_on: [a] }\n  d: { start: r }\n";
    let c = load(src, "local", &vars(&[])).unwrap();
    let e = Dag::build(&c).unwrap_err();
    assert!(matches!(e, GraphError::Cycle { .. }));
    assert!(
        e.to_string().contains("dependency cycle a → b → c → a"),
        "{e}"
    );
    assert!(e.to_string().starts_with("nanokit.yml:3:"), "{e}");
    assert_eq!(nanokit::error::ErrorCode::code(&e), "ENKCYCLE");

    let src = "name: x\nservices:\n  api: { start: r, depends_on: [dbb] }\n  db: { start: r }\n";
    let e = Dag::build(&load(src, "local", &vars(&[])).unwrap()).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("service `api` depends on `dbb`") && m.contains("did you mean `db`?"),
        "{m}"
    );
    assert!(m.starts_with("nanokit.yml:3:33"), "{m}");
    assert_eq!(nanokit::error::ErrorCode::code(&e), "ENKDEP");
}

#[test]
fn layers_order_and_dot() {
    let src = "name: x\nservices:\n  web: { start: r, depends_on: [api] }\n  api: { start: r, depends_on: [db, cache] }\n  db: { start: r }\n  cache: { start: r }\n  lone: { start: r }\n";
    let c = load(src, "local", &vars(&[])).unwrap();
    let d = Dag::build(&c).unwrap();
    assert_eq!(
        d.layers(),
        vec![vec!["cache", "db", "lone"], vec!["api"], vec!["web"]]
    );
    assert_eq!(d.order(), ["cache", "db", "api", "lone", "web"]);
    assert_eq!(d.reverse_order(), ["web", "lone", "api", "db", "cache"]);
    assert_eq!(d.closure(&["api".into()]), ["cache", "db", "api"]);
    assert!(d.to_dot("x").contains("\"api\" -> \"db\";"));
}

/// Every file in tests/fixtures/broken/ fails with exit 1 and a located
/// message (`file:line:col:`), and nothing panics.
#[tokio::test(flavor = "multi_thread")]
async fn broken_corpus_each_fails_with_a_location() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 30, "only {} broken fixtures", files.len());
    for f in files {
        let r = std::panic::catch_unwind(|| {
            config::load(&config::LoadOptions {
                file: f.clone(),
                env: "local".into(),
                vars: Some(HashMap::new()),
            })
            .map_err(|e| e.to_string())
            .and_then(|c| Dag::build(&c).map(|_| ()).map_err(|e| e.to_string()))
        });
        let msg = match r {
            Err(_) => panic!("{}: panicked", f.display()),
            Ok(Ok(())) => panic!("{}: loaded without error", f.display()),
            Ok(Err(m)) => m,
        };
        let shown = f.display().to_string();
        let rest = msg
            .strip_prefix(&format!("{shown}:"))
            .unwrap_or_else(|| panic!("{}: no file in {msg}", f.display()));
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{}: no line in {msg}", f.display()));
        let col: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{}: no column in {msg}", f.display()));
        assert!(line >= 1 && col >= 1, "{msg}");
        if let Ok(expect) = std::fs::read_to_string(&f) {
            if let Some(want) = expect
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
            {
                assert!(
                    msg.contains(want.trim()),
                    "{}: expected `{}` in {msg}",
                    f.display(),
                    want.trim()
                );
            }
        }
        let code = nanokit::cli::run(vec!["validate".into(), "-f".into(), shown.clone()]).await;
        assert_eq!(code, 1, "{}", f.display());
    }
}

// ---------------------------------------------------------------------------
// Parser limits: hostile files end in ENKCONFIG at the place of the breach.
// Run on the test harness's threads (2 MiB stacks), so a deep recursion
// anywhere (parse, merge, interpolation, validation, Drop) crashes the test.

fn ok_tail() -> &'static str {
    "name: x\nservices:\n  s:\n    start: run\n"
}

fn at(src: &str, e: &ConfigError) -> (usize, usize) {
    let l = e.loc.unwrap_or_else(|| panic!("no location: {e}"));
    assert_eq!(e.code, "ENKCONFIG", "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("nanokit.yml:{}:{}: ", l.line, l.col)),
        "{e}"
    );
    let _ = src;
    (l.line, l.col)
}

/// The character at a 1-based line and column.
fn char_at(src: &str, line: usize, col: usize) -> char {
    src.lines()
        .nth(line - 1)
        .and_then(|l| l.chars().nth(col - 1))
        .unwrap_or_else(|| panic!("no character at {line}:{col}"))
}

/// The classic bomb: 9 items a level, 10 levels of anchors (9^10 values).
fn alias_bomb() -> String {
    let mut s = String::from("x-bomb:\n  l0: &l0 [a, a, a, a, a, a, a, a, a]\n");
    for i in 1..10 {
        let p = format!("*l{}", i - 1);
        s.push_str(&format!(
            "  l{i}: &l{i} [{}]\n",
            std::iter::repeat_n(p.as_str(), 9)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s.push_str(ok_tail());
    s
}

#[test]
fn alias_bomb_is_refused_at_the_alias_that_passes_the_limit() {
    let src = alias_bomb();
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    let (line, col) = at(&src, &e);
    assert!(e.message.contains("alias bomb"), "{e}");
    assert!(
        e.message.contains(&format!("{}", config::yaml::MAX_NODES)),
        "{e}"
    );
    // Level 5 (line 7) is where 200 000 values are passed: levels 0..4 with
    // their anchor copies cost about 150 000.
    assert_eq!(line, 7, "{e}");
    assert_eq!(char_at(&src, line, col), '*', "points at an alias: {e}");
}

#[test]
fn alias_count_and_copied_text_are_capped() {
    // Many aliases of a scalar: cheap each, capped in number.
    let n = config::yaml::MAX_ALIASES + 1;
    let src = format!(
        "x-a: &a v\nx-list: [{}]\n{}",
        vec!["*a"; n].join(", "),
        ok_tail()
    );
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    let (line, col) = at(&src, &e);
    assert!(e.message.contains("aliases"), "{e}");
    assert_eq!(line, 2);
    assert_eq!(col, 10 + 4 * (n - 1), "the alias past the count: {e}");
    // Few aliases of a large scalar: capped in copied text.
    let big = "y".repeat(100_000);
    let src = format!(
        "x-a: &a {big}\nx-list:\n{}{}",
        "  - *a\n".repeat(100),
        ok_tail()
    );
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    let (line, col) = at(&src, &e);
    assert!(e.message.contains("MiB of text"), "{e}");
    // 8 MiB / 100 000 bytes: the anchor's copy and 82 aliases fit, the
    // 83rd (on line 2 + 83) does not.
    assert_eq!((line, col), (2 + 83, 5), "{e}");
    // A reasonable use of anchors still loads.
    let src = "x-env: &env { A: '1', B: '2' }\nname: x\nservices:\n  s: { start: run, env: *env }\n  t: { start: run, env: { <<: *env, C: '3' } }\n";
    let c = load(src, "local", &vars(&[])).unwrap();
    assert_eq!(c.services["t"].env.len(), 3);
}

#[test]
fn ten_thousand_levels_of_block_nesting_stop_at_the_depth_limit() {
    let max = config::yaml::MAX_DEPTH;
    // Compact block sequences: 10 000 levels on one line.
    let src = format!("x-deep:\n  {}x\n{}", "- ".repeat(10_000), ok_tail());
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    let (line, col) = at(&src, &e);
    assert!(e.message.contains("nested more than"), "{e}");
    // The root mapping is level 1; the (max)th `- ` opens level max + 1.
    assert_eq!((line, col), (2, 3 + 2 * (max - 1)), "{e}");
    // Block mappings, one space of indentation a level, 1 000 levels.
    let mut src = String::new();
    for i in 0..1000 {
        src.push_str(&" ".repeat(i));
        src.push_str("k:\n");
    }
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("nested more than"), "{e}");
    // yaml-rust2 marks a block mapping at its first key's `:`.
    assert_eq!(at(&src, &e), (max + 1, max + 2), "{e}");
    // Flow style.
    let src = format!("x: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert_eq!(at(&src, &e).0, 1, "{e}");
    // Exactly the limit is fine.
    let src = format!("x-deep:\n  {}x\n{}", "- ".repeat(max - 1), ok_tail());
    load(&src, "local", &vars(&[])).unwrap();
}

#[test]
fn ten_thousand_level_block_mapping_is_refused_by_size_then_depth() {
    // 10 000 levels of block mappings need ~50 MB of indentation: refused
    // before parsing, at the line and column of the 1 MiB mark.
    let mut src = String::new();
    for i in 0..10_000 {
        src.push_str(&" ".repeat(i));
        src.push_str("k:\n");
    }
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("larger than 1 MiB"), "{e}");
    let (line, col) = at(&src, &e);
    let prefix = &src.as_bytes()[..config::yaml::MAX_FILE_BYTES];
    let want_line = prefix.iter().filter(|&&b| b == b'\n').count() + 1;
    assert_eq!(line, want_line);
    assert_eq!(
        col,
        prefix.len() - prefix.iter().rposition(|&b| b == b'\n').unwrap()
    );
    // The same from a file, which is not read past the limit.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("nanokit.yml");
    std::fs::write(&f, &src).unwrap();
    let e = config::load(&config::LoadOptions {
        file: f.clone(),
        env: "local".into(),
        vars: Some(HashMap::new()),
    })
    .unwrap_err();
    assert_eq!(e.code, "ENKCONFIG");
    assert_eq!(e.loc.map(|l| (l.line, l.col)), Some((line, col)), "{e}");
    // An endless file is not read to its end either.
    let e = config::load(&config::LoadOptions {
        file: "/dev/zero".into(),
        env: "local".into(),
        vars: Some(HashMap::new()),
    })
    .unwrap_err();
    assert!(e.message.contains("larger than 1 MiB"), "{e}");
    assert_eq!(e.loc.map(|l| l.line), Some(1));
}

#[test]
fn aliases_cannot_nest_past_the_depth_limit() {
    let max = config::yaml::MAX_DEPTH;
    // An anchored list 40 deep, used inside 30 more levels.
    let src = format!(
        "x-a: &a\n  {}x\nx-b:\n  {}*a\n{}",
        "- ".repeat(40),
        "- ".repeat(30),
        ok_tail()
    );
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    let (line, col) = at(&src, &e);
    assert!(e.message.contains("alias nests"), "{e}");
    assert_eq!((line, char_at(&src, line, col)), (4, '*'), "{e}");
    assert!(40 + 30 + 1 > max);
}

#[test]
fn interpolation_is_bounded_in_nesting_and_size() {
    let nested = format!("{}x{}", "${U:-".repeat(20), "}".repeat(20));
    let src = format!("name: x\nservices:\n  s:\n    start: \"{nested}\"\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("nested more than"), "{e}");
    assert_eq!(e.loc.unwrap().line, 4);
    let ok = format!("{}x{}", "${U:-".repeat(8), "}".repeat(8));
    let src = format!("name: x\nservices:\n  s:\n    start: \"{ok}\"\n");
    assert_eq!(
        load(&src, "local", &vars(&[])).unwrap().services["s"]
            .start
            .as_deref(),
        Some("x")
    );
    // A 64 KiB variable repeated 300 times in a value (19 MB).
    let big = "v".repeat(64 << 10);
    let src = format!(
        "name: x\nservices:\n  s:\n    start: run\n    env: {{ K: \"{}\" }}\n",
        "${BIG}".repeat(300)
    );
    let e = load(&src, "local", &vars(&[("BIG", &big)])).unwrap_err();
    assert!(e.message.contains("MiB"), "{e}");
    assert_eq!(e.loc.unwrap().line, 5);
    assert!(!e.to_string().contains(&big[..100]), "never the value");
    // … and spread over many values.
    let src = format!(
        "name: x\nservices:\n  s:\n    start: run\n    env:\n{}",
        (0..300)
            .map(|i| format!("      K{i}: ${{BIG}}\n"))
            .collect::<String>()
    );
    let e = load(&src, "local", &vars(&[("BIG", &big)])).unwrap_err();
    assert!(e.message.contains("16 MiB in total"), "{e}");
    // The 256th value reaches 16 MiB with the file's other few bytes.
    assert_eq!(e.loc.unwrap().line, 6 + (16 << 20) / (64 << 10) - 1, "{e}");
}

#[test]
fn runtime_inheritance_is_bounded() {
    let env: String = (0..10_000).map(|i| format!("      K{i}: v\n")).collect();
    let services: String = (0..20)
        .map(|i| format!("  s{i}: {{ runtime: big }}\n"))
        .collect();
    let src =
        format!("name: x\nruntimes:\n  big:\n    start: run\n    env:\n{env}services:\n{services}");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("runtime inheritance"), "{e}");
    // Each use copies 20 004 values; the 10th passes 200 000.
    let line = 5 + 10_000 + 1 + 10;
    assert_eq!(e.loc.map(|l| l.line), Some(line), "{e}");
}

// ---------------------------------------------------------------------------
// Validation covers what `up` needs.

fn svc(body: &str) -> String {
    format!("name: demo\nservices:\n  api:\n{body}")
}

#[test]
fn durations_are_between_1ms_and_24h_and_timeouts_are_positive() {
    let hc = |k: &str, v: &str| {
        svc(&format!(
            "    start: run\n    healthcheck:\n      test: 'true'\n      {k}: {v}\n"
        ))
    };
    for (k, v) in [
        ("interval", "99999999999999h"),
        ("interval", "25h"),
        ("interval", "0s"),
        ("interval", "500us"),
        ("interval", "1e300"),
        ("interval", "-1"),
        ("interval", "nan"),
        ("interval", "inf"),
        ("timeout", "0s"),
        ("timeout", "0"),
        ("timeout", "86401"),
        ("start_period", "24h 1s"),
        ("start_period", "0.5ms"),
    ] {
        let src = hc(k, v);
        let e = load(&src, "local", &vars(&[]))
            .map(|_| ())
            .expect_err(&format!("{k}: {v} must be refused"));
        assert_eq!(e.code, "ENKCONFIG");
        assert_eq!(
            e.loc.map(|l| (l.line, l.col)),
            Some((7, 9 + k.len())),
            "{k}: {v}: {e}"
        );
        assert!(
            e.message.contains(&format!("healthcheck.{k}")) && e.message.contains("1ms and 24h"),
            "{k}: {v}: {e}"
        );
    }
    for (k, v, ms) in [
        ("interval", "1ms", 1),
        ("interval", "24h", 86_400_000),
        ("timeout", "0.25", 250),
        ("start_period", "0", 0),
        ("start_period", "2m", 120_000),
    ] {
        let c = load(&hc(k, v), "local", &vars(&[])).unwrap_or_else(|e| panic!("{k}: {v}: {e}"));
        let h = c.services["api"].healthcheck.clone().unwrap();
        let got = match k {
            "interval" => h.interval,
            "timeout" => h.timeout,
            _ => h.start_period,
        };
        assert_eq!(got.as_millis(), ms, "{k}: {v}");
    }
}

#[test]
fn service_names_fit_docker_container_names_and_files() {
    // Project `demo` and environment `local`: room for 34 characters, so
    // that the longest container name nanokit makes has 63.
    let room = config::MAX_NAME_TOTAL - "demo".len() - "local".len();
    assert_eq!(room, 34);
    let longest = format!("nk-demo-local-{}-install-abcdef", "a".repeat(room));
    assert_eq!(longest.len(), config::MAX_CONTAINER_NAME);
    let named = |n: &str| format!("name: demo\nservices:\n  {n}:\n    start: run\n");
    load(&named(&"a".repeat(room)), "local", &vars(&[])).unwrap();
    for n in ["a".repeat(room + 1), "a".repeat(300)] {
        let src = named(&n);
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e), (3, 3), "{e}");
        assert!(
            e.message.contains("too long")
                && e.message.contains("at most 34")
                && e.message.contains("63"),
            "{e}"
        );
        assert!(e.message.len() < 400, "a long name is cut: {e}");
    }
    // A longer environment leaves less room, and is pointed at when it is
    // the one that leaves none.
    let src = format!(
        "name: demo\nservices:\n  {}:\n    start: run\nenvironments:\n  production: {{}}\n",
        "a".repeat(room)
    );
    let e = load(&src, "production", &vars(&[])).unwrap_err();
    assert!(e.message.contains("at most 29"), "{e}");
    let src = format!(
        "name: demo\nservices:\n  a:\n    start: run\nenvironments:\n  {}: {{}}\n",
        "e".repeat(40)
    );
    let e = load(&src, &"e".repeat(40), &vars(&[])).unwrap_err();
    assert_eq!(at(&src, &e), (6, 3), "{e}");
    // Environment names become file, container and network names.
    let src = "name: demo\nservices:\n  a:\n    start: run\nenvironments:\n  \"pr/od\": {}\n";
    let e = load(src, "pr/od", &vars(&[])).unwrap_err();
    assert_eq!(at(src, &e), (6, 3), "{e}");
    assert!(e.message.contains("letters, digits"), "{e}");
    let src = "name: demo\nservices:\n  a:\n    start: run\nenvironments:\n  Prod.eu-1: {}\n";
    load(src, "Prod.eu-1", &vars(&[])).unwrap();
}

#[test]
fn volume_names_fit_docker_and_the_file_system() {
    let src = format!(
        "name: demo\nvolumes:\n  {}: {{}}\nservices:\n  a:\n    start: run\n",
        "v".repeat(250)
    );
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert_eq!(at(&src, &e), (3, 3), "{e}");
    assert!(e.message.contains("at most 241"), "{e}");
    let src = format!(
        "name: demo\nvolumes:\n  {}: {{}}\nservices:\n  a:\n    start: run\n",
        "v".repeat(241)
    );
    load(&src, "local", &vars(&[])).unwrap();
    for bad in ["a", "-x", "a b", &"n".repeat(256)] {
        let src = format!(
            "name: demo\nvolumes:\n  v:\n    name: \"{bad}\"\nservices:\n  a:\n    start: run\n"
        );
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e), (4, 11), "{bad}: {e}");
    }
}

#[test]
fn start_must_be_a_command_where_the_provider_runs_it() {
    for v in ["\"\"", "'   '"] {
        let src = svc(&format!("    start: {v}\n"));
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e), (4, 12), "{e}");
        assert!(
            e.message.contains("`start` of service `api` is empty"),
            "{e}"
        );
        // Docker runs the image's command without `start`, but an empty
        // one is still a mistake.
        let src = format!(
            "name: demo\ninfra: {{ provider: docker }}\nservices:\n  api:\n    image: node\n    start: {v}\n"
        );
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e), (6, 12), "{e}");
        assert!(e.message.contains("omit `start`"), "{e}");
    }
    // Inherited from a runtime: pointed at where it is written.
    let src = "name: demo\nruntimes:\n  r: { start: '' }\nservices:\n  api: { runtime: r }\n";
    let e = load(src, "local", &vars(&[])).unwrap_err();
    assert_eq!(at(src, &e), (3, 15), "{e}");
    let docker = |body: &str| {
        format!("name: demo\ninfra: {{ provider: docker }}\nservices:\n  api:\n{body}")
    };
    let c = load(&docker("    image: node\n"), "local", &vars(&[])).unwrap();
    assert_eq!(c.services["api"].start, None, "Docker: the image's command");
    let src = docker("    image: ''\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert_eq!(at(&src, &e), (5, 12), "{e}");
    let src = svc("    start: run\n    healthcheck: { test: '  ' }\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("empty command"), "{e}");
    let src = svc("    start: run\n    provisioning: { install: '' }\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("`provisioning.install`"), "{e}");
    // A hook that runs nothing, alone or in a list, is refused where it is
    // written; no hook is the key left out, null or [].
    let src = svc("    start: run\n    hooks:\n      prestart: ''\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert_eq!(at(&src, &e), (6, 17), "{e}");
    assert!(
        e.message.contains("`hooks.prestart` is an empty command"),
        "{e}"
    );
    let src = svc("    start: run\n    hooks: { poststop: [echo bye, '  '] }\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert_eq!(char_at(&src, at(&src, &e).0, at(&src, &e).1), '\'', "{e}");
    assert!(e.message.contains("`hooks.poststop`"), "{e}");
    let src = svc("    start: run\n    hooks: { prestart: null, poststop: [] }\n");
    let c = load(&src, "local", &vars(&[])).unwrap();
    assert!(c.services["api"].hooks.prestart.is_empty());
}

#[test]
fn numbers_say_the_range_they_must_be_in() {
    for (k, v) in [("instances", "1e23"), ("instances", "2.5"), ("port", "1e3")] {
        let src = svc(&format!("    start: run\n    {k}: {v}\n"));
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e), (5, 7 + k.len()), "{e}");
        assert!(
            e.message.contains("must be a whole number between")
                && e.message.contains(&format!("`{v}` is not"))
                && !e.message.contains("found a number"),
            "{e}"
        );
    }
    let src = svc("    start: run\n    instances: 1e23\n");
    let e = load(&src, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("between 0 and 1000"), "{e}");
    for (k, v) in [
        ("cpu", "1e300"),
        ("cpu", "0.001"),
        ("memory", "1kb"),
        ("memory", "99999tb"),
    ] {
        let src = svc(&format!("    start: run\n    {k}: {v}\n"));
        let e = load(&src, "local", &vars(&[])).unwrap_err();
        assert_eq!(at(&src, &e).0, 5, "{e}");
    }
}

fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    config::load(&config::LoadOptions {
        file: dir.join("nanokit.yml"),
        env: "local".into(),
        vars: Some(HashMap::new()),
    })
}

#[test]
fn dotenv_errors_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nanokit.yml"), ok_tail()).unwrap();
    let cases: [(&[u8], (usize, usize)); 5] = [
        (b"A=1\n# comment\n\nB=2\nthis is garbage\nC=3\n", (5, 6)),
        (b"A=1\nB=\"multi\nline\"\nC D\n", (4, 3)),
        (b"A=1\nB='never closed\nC=2\nD=3\n", (2, 1)),
        (b"A=1\n\n  \nthis\n", (4, 1)),
        (b"A=1\nB=\xff\xfe\n", (2, 3)),
    ];
    for (content, want) in cases {
        std::fs::write(dir.path().join(".env"), content).unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert_eq!(e.code, "ENKCONFIG");
        assert!(e.file.ends_with(".env"), "{e}");
        assert_eq!(
            e.loc.map(|l| (l.line, l.col)),
            Some(want),
            "{:?}: {e}",
            String::from_utf8_lossy(content)
        );
    }
    std::fs::write(dir.path().join(".env"), "A=1\nB=\"two\nlines\"\n").unwrap();
    load_dir(dir.path()).unwrap();
}

#[test]
fn messages_do_not_show_values_from_variables() {
    let secret = "hunter2-very-secret";
    let v = vars(&[("S", secret)]);
    for body in [
        "    start: run\n    healthcheck: { test: 'true', interval: '${S}' }\n",
        "    start: run\n    instances: '${S}'\n",
        "    start: run\n    updateStrategy: 'x${S}'\n",
        "    start: run\n    cpu: '${S}'\n",
        "    start: run\n    memory: '${S}'\n",
        "    start: run\n    volumes: ['${S}']\n",
        "    runtime: '${S}'\n",
    ] {
        let src = svc(body);
        let e = load(&src, "local", &v).unwrap_err();
        assert!(!e.to_string().contains(secret), "{e}");
        assert_eq!(e.loc.map(|l| l.line), Some(src.lines().count()), "{e}");
    }
    // Written in the file, a value is shown.
    let src = svc("    start: run\n    healthcheck: { test: 'true', interval: soon }\n");
    let e = load(&src, "local", &v).unwrap_err();
    assert!(e.message.contains("found `soon`"), "{e}");
}

#[test]
fn an_infra_state_url_of_an_unknown_scheme_is_enkconfig_at_its_line() {
    let src = |state: &str| {
        format!("name: demo\ninfra:\n  provider: process\n  state: \"{state}\"\nservices:\n  a:\n    start: \"exec sleep 600\"\n")
    };
    let e = load(&src("nosuch://x/y"), "local", &vars(&[])).unwrap_err();
    assert_eq!(e.code, "ENKCONFIG");
    assert_eq!(e.loc.map(|l| l.line), Some(4), "{e}");
    assert!(
        e.message.contains("nosuch://") && e.message.contains("s3://"),
        "{e}"
    );
    // The known stores are URLs; anything else without a scheme is a file.
    for url in [
        "s3://bucket/team/state.json?region=eu-west-1",
        "gs://bucket/state.json",
        "vault://127.0.0.1:8200/secret/nanokit/state",
        "postgres://nk@127.0.0.1/nk",
    ] {
        let c = load(&src(url), "local", &vars(&[])).unwrap();
        assert_eq!(c.state_url.as_deref(), Some(url));
    }
    let c = load(&src("states/prod.json"), "local", &vars(&[])).unwrap();
    assert_eq!(c.state_url, None);
    assert_eq!(c.state_file, Path::new("/tmp/states/prod.json"));
    // NANOKIT_STATE_URL of an unknown kind is refused too, naming it.
    let plain = "name: demo\nservices:\n  a:\n    start: \"exec sleep 600\"\n";
    let e = load(
        plain,
        "local",
        &vars(&[("NANOKIT_STATE_URL", "nosuch://x/y")]),
    )
    .unwrap_err();
    assert_eq!(e.code, "ENKCONFIG");
    assert!(e.message.contains("NANOKIT_STATE_URL"), "{e}");
}

#[test]
fn restart_policies_in_composes_words() {
    use nanokit::config::RestartPolicy;
    let policy = |p: &str| {
        load(
            &svc(&format!("    start: run\n    restart: {p}\n")),
            "local",
            &vars(&[]),
        )
        .map(|c| c.services["api"].restart)
    };
    assert_eq!(policy("always").unwrap(), RestartPolicy::Always);
    assert_eq!(policy("\"no\"").unwrap(), RestartPolicy::No);
    assert_eq!(policy("no").unwrap(), RestartPolicy::No);
    assert_eq!(
        policy("unless-stopped").unwrap(),
        RestartPolicy::UnlessStopped
    );
    assert_eq!(
        policy("on-failure").unwrap(),
        RestartPolicy::OnFailure { max: None }
    );
    assert_eq!(
        policy("on-failure:3").unwrap(),
        RestartPolicy::OnFailure { max: Some(3) }
    );
    assert_eq!(
        policy("on-failure:0").unwrap(),
        RestartPolicy::OnFailure { max: None },
        "Docker's 0: no limit"
    );
    assert_eq!(policy("on-failure:3").unwrap().to_string(), "on-failure:3");
    for bad in ["sometimes", "on-failure:x", "on-failure:-1"] {
        let e = policy(bad).unwrap_err();
        assert!(e.message.contains("`restart` is"), "{bad}: {e}");
        assert!(e.message.contains("unless-stopped"), "{bad}: {e}");
    }
    // Default under watch: always; backoff cap 60 s unless set.
    let c = load(&svc("    start: run\n"), "local", &vars(&[])).unwrap();
    assert_eq!(c.services["api"].restart, RestartPolicy::Always);
    assert_eq!(
        c.services["api"].restart_backoff_max,
        Duration::from_secs(60)
    );
    let c = load(
        &svc("    start: run\n    restart_backoff_max: 5s\n"),
        "local",
        &vars(&[]),
    )
    .unwrap();
    assert_eq!(
        c.services["api"].restart_backoff_max,
        Duration::from_secs(5)
    );
    let e = load(
        &svc("    start: run\n    restart_backoff_max: 1ms\n"),
        "local",
        &vars(&[]),
    )
    .unwrap_err();
    assert!(e.message.contains("restart_backoff_max"), "{e}");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn depends_on_long_form_with_restart_and_condition() {
    let src = r#"
name: demo
runtimes:
  node:
    start: node index.js
    depends_on: { db: { condition: service_healthy } }
services:
  db: { start: "exec sleep 600" }
  cache: { start: "exec sleep 600" }
  api:
    runtime: node
    depends_on:
      db: { condition: service_healthy, restart: true }
      cache: { condition: service_started }
  worker:
    start: "exec sleep 600"
    depends_on: [api]
"#;
    let c = load(src, "local", &vars(&[])).unwrap();
    let deps = |s: &str| -> Vec<(String, bool)> {
        c.services[s]
            .depends_on
            .iter()
            .map(|d| (d.name.clone(), d.restart))
            .collect()
    };
    assert_eq!(
        deps("api"),
        [("db".to_string(), true), ("cache".to_string(), false)],
        "the service's own entry beats its runtime's"
    );
    assert_eq!(deps("worker"), [("api".to_string(), false)], "short form");
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter()
            .any(|w| w.contains("service_started") && w.contains("healthy")),
        "{w:?}"
    );
    let bad = src.replace("service_started", "service_completed_successfully");
    let e = load(&bad, "local", &vars(&[])).unwrap_err();
    assert!(e.message.contains("not supported"), "{e}");
    let bad = src.replace("restart: true", "restart: maybe");
    let e = load(&bad, "local", &vars(&[])).unwrap_err();
    assert!(
        e.message
            .contains("`depends_on.db.restart` must be `true` or `false`"),
        "{e}"
    );
    let odd = src.replace("restart: true", "restart: true, wait: 1");
    let c = load(&odd, "local", &vars(&[])).unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.message.contains("unknown key `wait`")),
        "{:?}",
        c.warnings
    );
}
