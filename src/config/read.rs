//! Reading nanokit.yml and `.env` from disk: at most
//! [`yaml::MAX_FILE_BYTES`] of UTF-8 is read, and a file that is too long,
//! not UTF-8 or (for `.env`) does not parse is refused at the line and
//! column where it goes wrong.

use std::collections::HashMap;
use std::path::Path;

use super::yaml::{self, Loc};
use super::ConfigError;

pub(super) enum ReadError {
    Io(std::io::Error),
    Located(Loc, String),
}

/// Reads a UTF-8 text file of at most [`yaml::MAX_FILE_BYTES`]; a longer
/// file (or `/dev/zero`) is refused at the byte where the limit is passed,
/// invalid UTF-8 at its first bad byte.
pub(super) fn read_capped(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut bytes = Vec::new();
    f.take(yaml::MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() > yaml::MAX_FILE_BYTES {
        return Err(ReadError::Located(
            yaml::loc_of_offset(&bytes, yaml::MAX_FILE_BYTES),
            format!(
                "the file is larger than {} MiB, where nanokit stops reading: this is not a configuration file",
                yaml::MAX_FILE_BYTES >> 20
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        ReadError::Located(
            yaml::loc_of_offset(e.as_bytes(), at),
            "the file is not valid UTF-8 here: save it as UTF-8 text".into(),
        )
    })
}

/// Reads `.env` (Docker Compose's format, parsed by dotenvy). A line that
/// does not parse is reported at its own line (and the column dotenvy
/// points at), a multi-line quoted value that never closes at its opening
/// line.
pub(super) fn read_dotenv(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    let content = match read_capped(path) {
        Ok(c) => c,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(ReadError::Io(e)) => {
            return Err(ConfigError {
                code: "ENKCONFIG",
                file: path.to_path_buf(),
                loc: None,
                message: format!("cannot read the .env file: {e}"),
            })
        }
        Err(ReadError::Located(loc, message)) => {
            return Err(ConfigError::at(
                path,
                loc,
                message.replace("file", ".env file"),
            ))
        }
    };
    for item in dotenvy::from_read_iter(content.as_bytes()) {
        match item {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            Err(dotenvy::Error::LineParse(_, _)) => {
                let loc = dotenv_error_loc(&content);
                return Err(ConfigError::at(
                    path,
                    loc,
                    "cannot parse this line of the .env file: write KEY=value (quote values with spaces or `#`, close every quote)",
                ));
            }
            Err(e) => {
                return Err(ConfigError {
                    code: "ENKCONFIG",
                    file: path.to_path_buf(),
                    loc: None,
                    message: format!("cannot read the .env file: {e}"),
                })
            }
        }
    }
    Ok(out)
}

/// Where the first line of `content` that dotenvy refuses is. dotenvy
/// reports only the text of the (logical, possibly multi-line) line, so
/// the file is split into logical lines the way dotenvy does and each is
/// parsed alone (syntax does not depend on earlier lines) until one fails.
fn dotenv_error_loc(content: &str) -> Loc {
    for (first_line, text) in dotenv_logical_lines(content) {
        if let Some(Err(dotenvy::Error::LineParse(_, pos))) =
            dotenvy::from_read_iter(text.as_bytes()).find(|r| r.is_err())
        {
            let pos = pos.min(text.len());
            // An unclosed quote: dotenvy points at the end; the quote's
            // line is more useful, so stay on the first line.
            let inner = if pos >= text.trim_end().len() && text.contains('\n') {
                Loc { line: 1, col: 1 }
            } else {
                yaml::loc_of_offset(text.as_bytes(), pos)
            };
            return Loc {
                line: first_line + inner.line - 1,
                col: inner.col,
            };
        }
    }
    Loc { line: 1, col: 1 }
}

/// `.env`'s logical lines with the 1-based number of their first physical
/// line: a line continues while a quote is open or it ends in `\`
/// (dotenvy's rule); comment and blank lines are skipped.
fn dotenv_logical_lines(content: &str) -> Vec<(usize, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Complete,
        Escape,
        Strong,
        StrongEsc,
        Weak,
        WeakEsc,
        White,
    }
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut start = 0;
    let mut st = St::Complete;
    for (i, line) in content.split_inclusive('\n').enumerate() {
        if buf.is_empty() {
            start = i + 1;
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
        }
        buf.push_str(line);
        for c in line.chars() {
            st = match st {
                St::White => match c {
                    '#' => {
                        st = St::Complete;
                        break;
                    }
                    '\\' => St::Escape,
                    '"' => St::Weak,
                    '\'' => St::Strong,
                    _ => St::Complete,
                },
                St::Escape => St::Complete,
                St::Complete => match c {
                    c if c.is_whitespace() && c != '\n' && c != '\r' => St::White,
                    '\\' => St::Escape,
                    '"' => St::Weak,
                    '\'' => St::Strong,
                    _ => St::Complete,
                },
                St::Weak => match c {
                    '\\' => St::WeakEsc,
                    '"' => St::Complete,
                    _ => St::Weak,
                },
                St::WeakEsc => St::Weak,
                St::Strong => match c {
                    '\\' => St::StrongEsc,
                    '\'' => St::Complete,
                    _ => St::Strong,
                },
                St::StrongEsc => St::Strong,
            };
        }
        if st == St::Complete {
            out.push((start, std::mem::take(&mut buf)));
        }
    }
    if !buf.is_empty() {
        out.push((start, buf));
    }
    out
}
