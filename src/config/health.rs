//! A service's `healthcheck` (Docker Compose's form) as a [`Healthcheck`]:
//! a non-empty command (`CMD` / `CMD-SHELL` lists as Compose reads them)
//! and times within [`MIN_DURATION`]..=[`MAX_DURATION`].

use std::time::Duration;

use super::cx::Cx;
use super::yaml::{Node, Value};
use super::{ConfigError, Healthcheck, MAX_DURATION, MIN_DURATION};

const HEALTH_KEYS: &[&str] = &["test", "interval", "timeout", "retries", "start_period"];

impl Cx<'_> {
    pub(super) fn healthcheck(&mut self, h: &Node, ctx: &str) -> Result<Healthcheck, ConfigError> {
        let e = self.map(h, "healthcheck")?.to_vec();
        self.check_keys(&e, HEALTH_KEYS, &format!("healthcheck of {ctx}"));
        let test_node = h.get("test").ok_or_else(|| {
            self.err(
                h.loc,
                format!(
                    "healthcheck of {ctx} has no `test`: add `test: <command>` (exit 0 = healthy)"
                ),
            )
        })?;
        let test = match &test_node.value {
            Value::Seq(items) => {
                let mut argv: Vec<String> = items
                    .iter()
                    .map(|i| self.string(i, "healthcheck.test"))
                    .collect::<Result<_, _>>()?;
                match argv.first().map(String::as_str) {
                    Some("CMD") => {
                        argv.remove(0);
                    }
                    Some("CMD-SHELL") => {
                        argv = vec!["sh".into(), "-c".into(), argv[1..].join(" ")];
                    }
                    _ => {}
                }
                argv
            }
            _ => vec![
                "sh".into(),
                "-c".into(),
                self.string(test_node, "healthcheck.test")?,
            ],
        };
        if test.is_empty() {
            return Err(self.err(test_node.loc, "`healthcheck.test` is empty"));
        }
        let shell = test.len() == 3 && test[0] == "sh" && test[1] == "-c";
        if (shell && test[2].trim().is_empty()) || test.iter().all(|a| a.trim().is_empty()) {
            return Err(self.err(
                test_node.loc,
                format!("`healthcheck.test` of {ctx} is an empty command: write the command that exits 0 when the service is healthy"),
            ));
        }
        // Docker takes 0 (inherit) or at least 1 ms for each; a day is far
        // past any sane wait, and a longer one would make `up` look hung.
        let dur =
            |key: &str, default: Duration, allow_zero: bool| -> Result<Duration, ConfigError> {
                match h.get(key) {
                    Some(n) if !n.is_null() => self.duration(
                        n,
                        &format!("healthcheck.{key}"),
                        MIN_DURATION,
                        MAX_DURATION,
                        allow_zero,
                    ),
                    _ => Ok(default),
                }
            };
        Ok(Healthcheck {
            test,
            interval: dur("interval", Duration::from_millis(500), false)?,
            timeout: dur("timeout", Duration::from_secs(5), false)?,
            start_period: dur("start_period", Duration::ZERO, true)?,
            retries: match h.get("retries") {
                Some(n) if !n.is_null() => self.int(n, "healthcheck.retries", 1, 10_000)? as u32,
                _ => 3,
            },
        })
    }
}
