//! The loading context every stage after parsing shares, and its typed
//! readers of YAML nodes. Each reader returns a [`ConfigError`] at the
//! node's line and column, and never shows a value that came from `${…}`
//! (it may be a secret).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::yaml::{Key, Loc, Node, Value};
use super::{ConfigError, Warning};

pub(super) struct Cx<'s> {
    pub(super) file: PathBuf,
    /// The file's text, to place errors inside a scalar.
    pub(super) src: &'s str,
    pub(super) warnings: Vec<Warning>,
    /// Where the chosen environment is declared (`environments.<env>`).
    pub(super) env_loc: Option<Loc>,
    /// Text produced by interpolation so far.
    pub(super) interpolated: std::cell::Cell<usize>,
    /// Values copied into services by runtime inheritance so far.
    pub(super) inherited: usize,
    /// Where scalars that interpolation changed are: their text may hold
    /// a secret, so messages do not show it.
    pub(super) interpolated_at: std::cell::RefCell<std::collections::HashSet<Loc>>,
}

impl<'s> Cx<'s> {
    pub(super) fn new(file: &Path, src: &'s str) -> Self {
        Cx {
            file: file.to_path_buf(),
            src,
            warnings: Vec::new(),
            env_loc: None,
            interpolated: std::cell::Cell::new(0),
            inherited: 0,
            interpolated_at: Default::default(),
        }
    }
}

pub(super) fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_lowercase() || f.is_ascii_digit())
        && c.all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_')
}

/// Docker's rule for container, volume and network names
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), which also keeps them plain file names.
pub(super) fn docker_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphanumeric())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
}

/// A name or value for a message: long ones are cut.
pub(super) fn shown(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… ({} characters)", &s[..i], s.chars().count()),
    }
}

/// `1ms`, `5s`, `24h`: a bound as a user would write it.
fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) && ms > 0 => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) && ms > 0 => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) && ms > 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

impl Cx<'_> {
    pub(super) fn err(&self, loc: Loc, message: impl Into<String>) -> ConfigError {
        ConfigError::at(&self.file, loc, message)
    }

    /// `text` (read from `node`) for a message, in backticks and cut when
    /// long; a value that came from `${…}` is not shown.
    pub(super) fn val(&self, node: &Node, text: &str) -> String {
        if self.interpolated_at.borrow().contains(&node.loc) {
            "the value from `${…}` (not shown)".into()
        } else {
            format!("`{}`", shown(text))
        }
    }

    pub(super) fn warn(&mut self, loc: Loc, message: impl Into<String>) {
        self.warnings.push(Warning {
            file: self.file.clone(),
            line: loc.line,
            col: loc.col,
            message: message.into(),
        });
    }

    pub(super) fn map<'a>(
        &self,
        node: &'a Node,
        what: &str,
    ) -> Result<&'a [(Key, Node)], ConfigError> {
        match &node.value {
            Value::Map(e) => Ok(e),
            _ if node.is_null() => Ok(&[]),
            _ => Err(self.err(
                node.loc,
                format!(
                    "`{what}` must be a mapping (key: value), found {}",
                    node.kind()
                ),
            )),
        }
    }

    /// Warns about keys not in `known`, with a suggestion when one is close.
    pub(super) fn check_keys(&mut self, entries: &[(Key, Node)], known: &[&str], context: &str) {
        for (k, _) in entries {
            if known.contains(&k.name.as_str()) {
                continue;
            }
            let best = known
                .iter()
                .map(|c| (strsim::jaro_winkler(c, &k.name), *c))
                .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
            let hint = if best.0 > 0.8 {
                format!("; did you mean `{}`?", best.1)
            } else {
                String::new()
            };
            self.warn(
                k.loc,
                format!("unknown key `{}` in {context} is ignored{hint}", k.name),
            );
        }
    }

    pub(super) fn string(&self, node: &Node, what: &str) -> Result<String, ConfigError> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Ok(text.clone()),
            _ => Err(self.err(
                node.loc,
                format!("`{what}` must be a string, found {}", node.kind()),
            )),
        }
    }

    pub(super) fn opt_string(
        &self,
        node: Option<&Node>,
        what: &str,
    ) -> Result<Option<String>, ConfigError> {
        match node {
            None => Ok(None),
            Some(n) if n.is_null() => Ok(None),
            Some(n) => self.string(n, what).map(Some),
        }
    }

    pub(super) fn int(
        &self,
        node: &Node,
        what: &str,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let (v, text) = match &node.value {
            Value::Scalar { text, plain: true } => (text.trim().parse::<i64>().ok(), Some(text)),
            _ => (None, None),
        };
        let range = format!("a whole number between {min} and {max}");
        match v {
            Some(v) if v >= min && v <= max => Ok(v),
            Some(v) => Err(self.err(
                node.loc,
                format!(
                    "`{what}` is {}, it must be between {min} and {max}",
                    self.val(node, &v.to_string()).trim_matches('`')
                ),
            )),
            None => Err(self.err(
                node.loc,
                match text {
                    // A number, but not a whole one in i64 (`1e23`, `2.5`).
                    Some(t) if node.kind() == "a number" => {
                        format!(
                            "`{what}` must be {range}; {} is not",
                            self.val(node, t.trim())
                        )
                    }
                    _ => format!("`{what}` must be {range}, found {}", node.kind()),
                },
            )),
        }
    }

    /// A duration within `[min, max]`; `allow_zero` also admits 0 (off).
    pub(super) fn duration(
        &self,
        node: &Node,
        what: &str,
        min: Duration,
        max: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let text = self.string(node, what)?;
        let t = text.trim();
        let range = format!(
            "between {} and {}{}",
            short_duration(min),
            short_duration(max),
            if allow_zero { " (or 0 for none)" } else { "" }
        );
        let d = match t.parse::<f64>() {
            // A bare number is seconds; NaN, negatives and values too large
            // for a Duration fail here, never panic.
            Ok(secs) => Duration::try_from_secs_f64(secs).ok(),
            Err(_) => humantime::parse_duration(t).ok(),
        };
        let Some(d) = d else {
            return Err(self.err(
                node.loc,
                format!(
                    "`{what}` must be a duration such as `500ms`, `5s` or `2m` ({range}), found {}",
                    self.val(node, t)
                ),
            ));
        };
        if (allow_zero && d.is_zero()) || (d >= min && d <= max) {
            return Ok(d);
        }
        Err(self.err(
            node.loc,
            format!("`{what}` is {}: it must be {range}", self.val(node, t)),
        ))
    }

    /// One command (string) or several (list of strings).
    pub(super) fn commands(
        &self,
        node: Option<&Node>,
        what: &str,
    ) -> Result<Vec<String>, ConfigError> {
        // A command that runs nothing is a mistake where it is written; no
        // command at all is the key left out, null or [].
        let command = |n: &Node| {
            let c = self.string(n, what)?;
            if c.trim().is_empty() {
                return Err(self.err(
                    n.loc,
                    format!("`{what}` is an empty command: give the command to run, or leave `{what}` out"),
                ));
            }
            Ok(c)
        };
        match node {
            None => Ok(Vec::new()),
            Some(n) if n.is_null() => Ok(Vec::new()),
            Some(Node {
                value: Value::Seq(items),
                ..
            }) => items.iter().map(command).collect(),
            Some(n) => Ok(vec![command(n)?]),
        }
    }
}
