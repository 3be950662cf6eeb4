//! Commands that nanokit prints as hints (`` see `nanokit timeline 1a2b` ``,
//! `` clear it with `nanokit infra unlock` ``) work when pasted into the same
//! shell: the program is named as it was started (`npx nanokit`,
//! `./target/release/nanokit`, `nkapp`), and the options that chose what
//! this run worked on and that the shell would not supply again (`-f`/`-e`
//! given on the command line; `--agent`, `--state-url`, `--state-dir`
//! for `state`) are added to a hint for a command that takes them. Everything
//! the CLI prints on stderr, and its hint lines on stdout, go through
//! [`complete`].

use std::sync::Mutex;

use clap::parser::ValueSource;
use clap::ArgMatches;

/// How this run was started, and the options that hints must repeat.
#[derive(Debug, Default, Clone)]
struct Context {
    /// The program as the shell would start it again.
    program: String,
    /// `-f …`, `-e …` (for commands about a project).
    project: Vec<String>,
    /// `--agent …`, `--state-url …`, `--state-dir …` (for `state`).
    state: Vec<String>,
}

static CONTEXT: Mutex<Option<Context>> = Mutex::new(None);

/// Commands whose options include the project's `-f`/`-e`.
const PROJECT_COMMANDS: &[&str] = &[
    "validate", "graph", "plan", "up", "deploy", "down", "status", "logs", "drift", "infra",
    "timeline",
];

/// Records how this run was started (`program`: the name, or the path, it
/// was started as) and which options of `matches` were given on the
/// command line.
pub(super) fn record(program: &str, matches: &ArgMatches) {
    let mut cx = Context {
        program: program.to_string(),
        ..Context::default()
    };
    let top = matches.subcommand_name().unwrap_or_default();
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
        if PROJECT_COMMANDS.contains(&top) {
            given(m, "file", "-f", &mut cx.project);
            given(m, "env", "-e", &mut cx.project);
        } else if top == "state" {
            given(m, "agent", "--agent", &mut cx.state);
            given(m, "state_url", "--state-url", &mut cx.state);
            given(m, "state_dir", "--state-dir", &mut cx.state);
        }
    }
    *CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx);
}

/// Adds `flag value` to `out` when the argument `id` of `m` was given on
/// the command line (from the environment, the same shell supplies it
/// again; a default needs no repeating).
fn given(m: &ArgMatches, id: &str, flag: &str, out: &mut Vec<String>) {
    let on_line = m
        .try_get_raw(id)
        .ok()
        .flatten()
        .is_some_and(|_| m.value_source(id) == Some(ValueSource::CommandLine));
    if !on_line || out.iter().any(|o| o == flag) {
        return;
    }
    if let Some(v) = m.get_raw(id).and_then(|mut v| v.next()) {
        out.push(flag.to_string());
        out.push(quote(&v.to_string_lossy()));
    }
}

/// `s` as one shell word.
pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `text` with every `` `nanokit …` `` in it made a command that works as
/// printed (see the module); unchanged outside a CLI run.
pub fn complete(text: &str) -> String {
    let cx = CONTEXT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match cx {
        Some(cx) if text.contains("`nanokit ") => rewrite(text, &cx),
        _ => text.to_string(),
    }
}

fn rewrite(text: &str, cx: &Context) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(at) = rest.find("`nanokit ") {
        let body = &rest[at + 1..];
        let Some(end) = body.find('`') else { break };
        out.push_str(&rest[..at + 1]);
        out.push_str(&command(&body["nanokit ".len()..end], cx));
        out.push('`');
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `args` (a command line after the program) as the program with the
/// options this run was given that the command takes.
fn command(args: &str, cx: &Context) -> String {
    let words: Vec<&str> = args.split_whitespace().collect();
    let first = words.first().copied().unwrap_or_default();
    let has = |flags: &[&str]| {
        words.iter().any(|w| {
            flags
                .iter()
                .any(|f| w == f || w.starts_with(&format!("{f}=")))
        })
    };
    let mut extra: Vec<&str> = Vec::new();
    if PROJECT_COMMANDS.contains(&first) && !has(&["-f", "--file", "-e", "--env"]) {
        extra.extend(cx.project.iter().map(String::as_str));
    }
    if first == "state" && !has(&["--agent", "--state-url", "--state-dir"]) {
        extra.extend(cx.state.iter().map(String::as_str));
    }
    let mut s = format!("{} {args}", cx.program);
    for e in extra {
        s.push(' ');
        s.push_str(e);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context {
        Context {
            program: "npx nanokit".into(),
            project: vec!["-f".into(), "'../my app/nanokit.yml'".into()],
            state: vec!["--agent".into(), "ci".into()],
        }
    }

    #[test]
    fn hints_name_the_program_and_repeat_the_options_their_command_takes() {
        let cx = cx();
        assert_eq!(
            rewrite("see `nanokit timeline 1a2b`, then `nanokit lock break x.lock`.", &cx),
            "see `npx nanokit timeline 1a2b -f '../my app/nanokit.yml'`, then `npx nanokit lock break x.lock`."
        );
        assert_eq!(
            rewrite(
                "clear a stale one with `nanokit state unlock job --force`",
                &cx
            ),
            "clear a stale one with `npx nanokit state unlock job --force --agent ci`"
        );
        // Given already, or not a hint: as is.
        assert_eq!(
            rewrite("`nanokit up -f a.yml` and `nanokitten`", &cx),
            "`npx nanokit up -f a.yml` and `nanokitten`"
        );
        assert_eq!(rewrite("unclosed `nanokit up", &cx), "unclosed `nanokit up");
    }

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("a/b-c_d.yml"), "a/b-c_d.yml");
        assert_eq!(quote("my app"), "'my app'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
