//! From the parsed tree to the effective one for one environment:
//! `environments.<env>` is merged over the global blocks first, then
//! `${VAR}` is interpolated (so a variable only another environment uses
//! never fails this one). Interpolated text is bounded in total
//! ([`MAX_INTERPOLATED_BYTES`]).

use super::build::TOP_KEYS;
use super::cx::{docker_name, shown, Cx};
use super::yaml::{self, Loc, Node, Value};
use super::{interp, ConfigError, DEFAULT_ENV, MAX_INTERPOLATED_BYTES};

impl Cx<'_> {
    pub(super) fn merge_env(&mut self, root: Node, env: &str) -> Result<Node, ConfigError> {
        let entries = match root.value {
            Value::Map(e) => e,
            _ => {
                return Err(self.err(
                    root.loc,
                    format!(
                        "the file must be a mapping with `name` and `services`, found {}",
                        root.kind()
                    ),
                ))
            }
        };
        let mut rest = Vec::new();
        let mut envs = None;
        for (k, v) in entries {
            if k.name == "environments" {
                envs = Some(v);
            } else {
                rest.push((k, v));
            }
        }
        let base = Node {
            value: Value::Map(rest),
            loc: root.loc,
        };
        let Some(envs) = envs else {
            return if env == DEFAULT_ENV {
                Ok(base)
            } else {
                Err(ConfigError {
                    code: "ENKCONFIG",
                    file: self.file.clone(),
                    loc: None,
                    message: format!("environment `{env}` is not defined: add `environments.{env}` or choose another with -e"),
                })
            };
        };
        let list = self.map(&envs, "environments")?;
        let names: Vec<String> = list.iter().map(|(k, _)| k.name.clone()).collect();
        let Some((env_key, block)) = list.iter().find(|(k, _)| k.name == env) else {
            return if env == DEFAULT_ENV {
                Ok(base)
            } else {
                Err(self.err(
                    envs.loc,
                    format!(
                        "environment `{env}` is not defined; defined here: {}",
                        if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        }
                    ),
                ))
            };
        };
        if !docker_name(env) {
            return Err(self.err(
                env_key.loc,
                format!("environment name `{}` must be letters, digits, `_`, `.` or `-`, starting with a letter or digit: it becomes part of file, container and network names", shown(env)),
            ));
        }
        self.env_loc = Some(env_key.loc);
        let block = block.clone();
        let keys = self.map(&block, &format!("environments.{env}"))?.to_vec();
        let allowed: Vec<&str> = TOP_KEYS
            .iter()
            .copied()
            .filter(|k| *k != "environments")
            .collect();
        self.check_keys(&keys, &allowed, &format!("environments.{env}"));
        if block.is_null() {
            return Ok(base);
        }
        Ok(yaml::deep_merge(base, block))
    }

    /// Where in the file the scalar starting at `loc` reaches the end of
    /// `prefix` (its value up to a point): exact when that part is written
    /// verbatim on the scalar's first line; otherwise (folded lines, escapes,
    /// block scalars) the scalar's start.
    pub(super) fn loc_in_scalar(&self, loc: Loc, prefix: &str, plain: bool) -> Loc {
        let quote = usize::from(!plain);
        let line = self
            .src
            .split("\r\n")
            .flat_map(|l| l.split(['\r', '\n']))
            .nth(loc.line.saturating_sub(1));
        let verbatim = line.is_some_and(|line| {
            let mut rest = line.chars().skip(loc.col.saturating_sub(1) + quote);
            prefix.chars().all(|c| rest.next() == Some(c))
        });
        if !verbatim {
            return loc;
        }
        Loc {
            col: loc.col + quote + prefix.chars().count(),
            ..loc
        }
    }

    pub(super) fn interpolate(&self, node: Node, vars: &interp::Vars) -> Result<Node, ConfigError> {
        let loc = node.loc;
        let value = match node.value {
            Value::Scalar { text, plain } => {
                let new = interp::interpolate_capped(&text, vars, MAX_INTERPOLATED_BYTES).map_err(
                    |e| self.err(self.loc_in_scalar(loc, &text[..e.offset], plain), e.message),
                )?;
                let total = self.interpolated.get() + new.len();
                if total > MAX_INTERPOLATED_BYTES {
                    return Err(self.err(
                        loc,
                        format!(
                            "interpolating `${{…}}` makes the file's values larger than {} MiB in total here: a variable is repeated too often or is too large",
                            MAX_INTERPOLATED_BYTES >> 20
                        ),
                    ));
                }
                self.interpolated.set(total);
                if new != text {
                    self.interpolated_at.borrow_mut().insert(loc);
                }
                Value::Scalar { text: new, plain }
            }
            Value::Seq(items) => Value::Seq(
                items
                    .into_iter()
                    .map(|n| self.interpolate(n, vars))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| Ok((k, self.interpolate(v, vars)?)))
                    .collect::<Result<_, ConfigError>>()?,
            ),
        };
        Ok(Node { value, loc })
    }
}
