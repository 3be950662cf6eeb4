//! Ingestion: interpolation (every form and error), environment merge
//! precedence, runtime inheritance, warnings, graph errors, and the corpus
//! of broken files.

use std::collections::HashMap;
use std::path::Path;

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
