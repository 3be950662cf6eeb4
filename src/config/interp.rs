//! `${VAR}`, `${VAR:-default}` and `${VAR:?message}` interpolation.
//!
//! Variables come from the process environment first, then the `.env` file
//! beside nanokit.yml (as in Docker Compose: the shell wins). `$$` is a
//! literal `$`; a `$` not followed by `{` is kept as is. Values are never
//! echoed in errors, so a secret cannot leak through a message.

use std::collections::HashMap;

/// Where variables come from.
#[derive(Debug, Default)]
pub struct Vars {
    process: HashMap<String, String>,
    dotenv: HashMap<String, String>,
    /// Every value [`Vars::get`] handed out: what interpolation took from
    /// the environment or `.env` (masked as secrets, see
    /// `crate::trace::mask`).
    used: std::sync::Mutex<Vec<String>>,
}

impl Clone for Vars {
    fn clone(&self) -> Self {
        Vars {
            process: self.process.clone(),
            dotenv: self.dotenv.clone(),
            used: std::sync::Mutex::new(self.used_values()),
        }
    }
}

impl Vars {
    pub fn new(process: HashMap<String, String>, dotenv: HashMap<String, String>) -> Self {
        Vars {
            process,
            dotenv,
            used: Default::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let v = self
            .process
            .get(name)
            .or_else(|| self.dotenv.get(name))
            .map(String::as_str);
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            if !used.iter().any(|u| u == v) {
                used.push(v.to_string());
            }
        }
        v
    }

    /// A variable of the process environment (or of the variables given in
    /// its place), not of `.env`, without marking it used.
    pub fn process(&self, name: &str) -> Option<&str> {
        self.process.get(name).map(String::as_str)
    }

    /// The values interpolation took (see [`Vars::get`]) and every value of
    /// the `.env` file: what may be a secret.
    pub fn secret_values(&self) -> Vec<String> {
        let mut v = self.used_values();
        v.extend(self.dotenv.values().filter(|v| !v.is_empty()).cloned());
        v
    }

    fn used_values(&self) -> Vec<String> {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An interpolation error; `offset` is the byte offset of the `${` in the
/// input so the caller can point at the exact column.
#[derive(Debug, PartialEq, Eq)]
pub struct InterpError {
    pub offset: usize,
    pub message: String,
}

/// How deep `${A:-${B:-…}}` defaults may nest.
pub const MAX_NESTING: usize = 16;

/// Interpolates `input`.
pub fn interpolate(input: &str, vars: &Vars) -> Result<String, InterpError> {
    interpolate_capped(input, vars, usize::MAX)
}

/// Interpolates `input`, failing once the result would pass `max_len`
/// bytes (so one scalar cannot repeat a large variable without bound).
pub fn interpolate_capped(input: &str, vars: &Vars, max_len: usize) -> Result<String, InterpError> {
    interpolate_at(input, vars, max_len, 0)
}

fn interpolate_at(
    input: &str,
    vars: &Vars,
    max_len: usize,
    depth: usize,
) -> Result<String, InterpError> {
    if !input.contains('$') {
        return Ok(input.to_string());
    }
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            let next = input[i..].find('$').map_or(bytes.len(), |n| i + n);
            out.push_str(&input[i..next]);
            i = next;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let end = matching_brace(input, i + 2).ok_or_else(|| InterpError {
                    offset: i,
                    message: "unclosed `${`: add the closing `}` (or write `$$` for a literal `$`)"
                        .into(),
                })?;
                if depth >= MAX_NESTING {
                    return Err(InterpError {
                        offset: i,
                        message: format!("`${{…}}` defaults are nested more than {MAX_NESTING} levels deep: flatten them"),
                    });
                }
                out.push_str(&expand(&input[i + 2..end], vars, i, max_len, depth)?);
                if out.len() > max_len {
                    return Err(InterpError {
                        offset: i,
                        message: format!(
                            "interpolating this value makes it longer than {} MiB: a variable is repeated too often or is too large",
                            max_len >> 20
                        ),
                    });
                }
                i = end + 1;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Index of the `}` closing a `${` whose body starts at `from`, allowing
/// nested `${…}` in defaults.
fn matching_brace(s: &str, from: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'$' if b.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
                continue;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn expand(
    body: &str,
    vars: &Vars,
    offset: usize,
    max_len: usize,
    depth: usize,
) -> Result<String, InterpError> {
    let err = |message: String| InterpError { offset, message };
    let name_end = body
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(body.len());
    let (name, rest) = body.split_at(name_end);
    if name.is_empty() {
        return Err(err(format!(
            "`${{{body}}}` has no variable name: write `${{NAME}}`, `${{NAME:-default}}` or `${{NAME:?message}}`"
        )));
    }
    if !valid_name(name) {
        return Err(err(format!(
            "`{name}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"
        )));
    }
    let value = vars.get(name);
    if rest.is_empty() {
        return Ok(value.unwrap_or("").to_string());
    }
    if let Some(default) = rest.strip_prefix(":-") {
        return match value {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => interpolate_at(default, vars, max_len, depth + 1).map_err(|e| InterpError {
                offset,
                message: e.message,
            }),
        };
    }
    if let Some(message) = rest.strip_prefix(":?") {
        return match value {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => {
                let why = if message.is_empty() {
                    "it is required".to_string()
                } else {
                    message.to_string()
                };
                Err(err(format!(
                    "required variable `{name}` is not set: {why} (set it in the environment or in .env)"
                )))
            }
        };
    }
    Err(err(format!(
        "unsupported form `${{{body}}}`: use `${{{name}}}`, `${{{name}:-default}}` or `${{{name}:?message}}`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::new(
            [
                ("A".to_string(), "1".to_string()),
                ("E".to_string(), String::new()),
            ]
            .into(),
            [
                ("A".to_string(), "dot".to_string()),
                ("B".to_string(), "2".to_string()),
            ]
            .into(),
        )
    }

    #[test]
    fn forms() {
        let v = vars();
        assert_eq!(interpolate("x${A}y", &v).unwrap(), "x1y");
        assert_eq!(interpolate("${B}", &v).unwrap(), "2");
        assert_eq!(interpolate("${C:-d}", &v).unwrap(), "d");
        assert_eq!(interpolate("${E:-d}", &v).unwrap(), "d");
        assert_eq!(interpolate("${C:-${B}x}", &v).unwrap(), "2x");
        assert_eq!(interpolate("$$A $A", &v).unwrap(), "$A $A");
        assert_eq!(interpolate("${A:?need}", &v).unwrap(), "1");
        assert_eq!(interpolate("${C}", &v).unwrap(), "");
    }

    #[test]
    fn errors() {
        let v = vars();
        let e = interpolate("ab${C:?set C please}", &v).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("set C please"), "{}", e.message);
        assert!(interpolate("${A", &v)
            .unwrap_err()
            .message
            .contains("unclosed"));
        assert!(interpolate("${}", &v)
            .unwrap_err()
            .message
            .contains("no variable name"));
        assert!(interpolate("${1A}", &v)
            .unwrap_err()
            .message
            .contains("not a valid"));
        assert!(interpolate("${A:+x}", &v)
            .unwrap_err()
            .message
            .contains("unsupported"));
    }
}
