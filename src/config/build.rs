//! The top level of the effective tree as a [`Config`]: project name,
//! `infra`, volumes, networks, runtimes and services (each one through
//! [`Cx::service`]). Names are checked to fit every container and file
//! name the providers derive from them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::cx::{docker_name, shown, valid_name, Cx};
use super::service::SERVICE_KEYS;
use super::yaml::{Key, Node};
use super::{
    url_scheme, Config, ConfigError, ProviderKind, Service, Volume, DEFAULT_ENV,
    MAX_CONTAINER_NAME, MAX_FILE_NAME, MAX_NAME_TOTAL, STATE_SCHEMES, STATE_URL_ENV,
};

/// What `infra` says.
pub(super) struct Infra {
    provider: ProviderKind,
    state_file: PathBuf,
    state_url: Option<String>,
    encryption: Option<super::StateEncryption>,
    history: usize,
}

pub(super) const TOP_KEYS: &[&str] = &[
    "name",
    "version",
    "infra",
    "runtimes",
    "services",
    "volumes",
    "networks",
    "environments",
];

impl Cx<'_> {
    pub(super) fn build(
        mut self,
        root: &Node,
        env: &str,
        dir: &Path,
        vars: &super::interp::Vars,
    ) -> Result<Config, ConfigError> {
        let name = self.project_name(root, env)?;
        let infra = self.infra(root, env, dir, vars)?;
        let volumes = self.volumes(root, &name, env)?;
        let provider = infra.provider;
        let networks = self.networks(root, provider)?;
        let runtimes = self.runtimes(root)?;

        // services
        let services_node = root.get("services").ok_or_else(|| {
            self.err(
                root.loc,
                "missing required key `services`: declare at least one service under `services:`",
            )
        })?;
        let entries = self.map(services_node, "services")?;
        if entries.is_empty() {
            self.warn(
                services_node.loc,
                "`services` is empty: there is nothing to run",
            );
        }
        let runtime_index: HashMap<&str, &Node> =
            runtimes.iter().map(|(k, v)| (k.name.as_str(), v)).collect();
        let mut services = BTreeMap::new();
        let mut disabled = Vec::new();
        for (k, body) in entries {
            self.check_service_name(k, &name, env)?;
            let svc = self.service(k, body, &runtime_index, &volumes, provider, dir)?;
            if svc.instances == 0 {
                disabled.push(svc.name);
            } else {
                services.insert(svc.name.clone(), svc);
            }
        }
        self.check_enabled_deps(&services, &disabled, env)?;
        Ok(Config {
            name,
            env: env.to_string(),
            file: self.file.clone(),
            dir: dir.to_path_buf(),
            provider: infra.provider,
            state_file: infra.state_file,
            state_url: infra.state_url,
            state_encryption: infra.encryption,
            state_history: infra.history,
            services,
            disabled,
            volumes,
            networks,
            warnings: self.warnings,
            secrets: Vec::new(),
        })
    }

    /// `name`: a valid project name that leaves room for service names.
    /// Also checks the top level's keys.
    fn project_name(&mut self, root: &Node, env: &str) -> Result<String, ConfigError> {
        let top = self.map(root, "the file")?;
        self.check_keys(top, TOP_KEYS, "the top level");
        let name_node = root.get("name").ok_or_else(|| {
            self.err(
                root.loc,
                "missing required key `name`: add `name: <project>` at the top level",
            )
        })?;
        let name = self.string(name_node, "name")?;
        if !valid_name(&name) {
            return Err(self.err(
                name_node.loc,
                format!("project name {} must be lowercase letters, digits, `-` or `_`, starting with a letter or digit", self.val(name_node, &name)),
            ));
        }
        if name.len() + env.len() >= MAX_NAME_TOTAL {
            return Err(self.err(
                self.env_loc.filter(|_| env.len() > name.len()).unwrap_or(name_node.loc),
                format!(
                    "project name `{}` and environment `{}` are {} characters together, which leaves no room for service names: Docker container names `nk-<project>-<env>-<service>-install-<suffix>` have at most {MAX_CONTAINER_NAME} characters, so project, environment and service names have {MAX_NAME_TOTAL} together; shorten them",
                    shown(&name), shown(env), name.len() + env.len()
                ),
            ));
        }
        if let Some((k, _)) = top.iter().find(|(k, _)| k.name == "version") {
            self.warn(k.loc, "key `version` is not used by nanokit and is ignored");
        }
        Ok(name)
    }

    /// `infra`: the provider, the state file and the state URL (from
    /// `infra.state`, else from `NANOKIT_STATE_URL` among `vars`: a load
    /// given its variables reads nothing else).
    fn infra(
        &mut self,
        root: &Node,
        env: &str,
        dir: &Path,
        vars: &super::interp::Vars,
    ) -> Result<Infra, ConfigError> {
        let mut provider = ProviderKind::Process;
        let mut state_file = None;
        let mut state_url = None;
        let mut state_set = false;
        let mut encryption = None;
        let mut history = super::DEFAULT_STATE_HISTORY;
        if let Some(infra) = root.get("infra") {
            let entries = self.map(infra, "infra")?;
            self.check_keys(
                entries,
                &["provider", "state", "state_encryption", "state_history"],
                "infra",
            );
            if let Some(h) = infra.get("state_history") {
                history = self.int(h, "infra.state_history", 0, 10_000)? as usize;
            }
            if let Some(e) = infra.get("state_encryption") {
                encryption = self.state_encryption(e, dir, vars)?;
            }
            if let Some(p) = infra.get("provider") {
                let shown_p = self.val(p, &self.string(p, "infra.provider")?);
                provider = match self.string(p, "infra.provider")?.as_str() {
                    "process" => ProviderKind::Process,
                    "docker" => ProviderKind::Docker,
                    other => {
                        return Err(self.err(
                            p.loc,
                            format!(
                                "unknown provider {}: use `process` (local processes) or `docker`",
                                if other.is_empty() {
                                    "``".into()
                                } else {
                                    shown_p
                                }
                            ),
                        ))
                    }
                };
            }
            if let Some(s) = self.opt_string(infra.get("state"), "infra.state")? {
                state_set = true;
                match url_scheme(&s) {
                    Some(scheme) if STATE_SCHEMES.contains(&scheme) => state_url = Some(s),
                    Some(scheme) => {
                        let loc = infra.get("state").map_or(infra.loc, |n| n.loc);
                        return Err(self.err(loc, unknown_scheme("infra.state", scheme)));
                    }
                    None => state_file = Some(dir.join(s)),
                }
            }
        }
        // `infra.state` wins; NANOKIT_STATE_URL applies only when it is unset.
        if !state_set {
            state_url = vars
                .process(STATE_URL_ENV)
                .filter(|u| !u.trim().is_empty())
                .map(str::to_string);
            if let Some(url) = &state_url {
                match url_scheme(url) {
                    Some(scheme) if STATE_SCHEMES.contains(&scheme) => {}
                    other => {
                        return Err(ConfigError {
                            code: "ENKCONFIG",
                            file: self.file.clone(),
                            loc: None,
                            message: match other {
                                Some(scheme) => unknown_scheme(STATE_URL_ENV, scheme),
                                None => format!("{STATE_URL_ENV} is not a URL: give a state store URL (postgres://, s3://, gs://, vault://), or unset it and name a file with `infra.state`"),
                            },
                        })
                    }
                }
            }
        }
        let state_file = state_file.unwrap_or_else(|| {
            let n = if env == DEFAULT_ENV {
                "state.json".to_string()
            } else {
                format!("state.{env}.json")
            };
            dir.join(".nanokit").join(n)
        });
        Ok(Infra {
            provider,
            state_file,
            state_url,
            encryption,
            history,
        })
    }

    /// `infra.state_encryption`: one key provider (`passphrase` or
    /// `transit`) and an optional `fallback` holding one.
    fn state_encryption(
        &mut self,
        node: &Node,
        dir: &Path,
        vars: &super::interp::Vars,
    ) -> Result<Option<super::StateEncryption>, ConfigError> {
        if node.is_null() {
            return Ok(None);
        }
        let entries = self.map(node, "infra.state_encryption")?;
        self.check_keys(
            entries,
            &["passphrase", "transit", "fallback"],
            "infra.state_encryption",
        );
        let key = self
            .key_source(node, "infra.state_encryption", dir, vars)?
            .ok_or_else(|| {
                self.err(
                    node.loc,
                    "`infra.state_encryption` needs a key provider: `passphrase: { env: NAME }` (or `{ file: PATH }`), or `transit: { key: NAME }`",
                )
            })?;
        let fallback = match node.get("fallback") {
            Some(f) if !f.is_null() => {
                let entries = self.map(f, "infra.state_encryption.fallback")?;
                self.check_keys(
                    entries,
                    &["passphrase", "transit"],
                    "infra.state_encryption.fallback",
                );
                Some(
                    self.key_source(f, "infra.state_encryption.fallback", dir, vars)?
                        .ok_or_else(|| {
                            self.err(
                                f.loc,
                                "`fallback` needs a key provider: `passphrase` or `transit`",
                            )
                        })?,
                )
            }
            _ => None,
        };
        Ok(Some(super::StateEncryption { key, fallback }))
    }

    /// The `passphrase` or `transit` under `node` (`None`: neither).
    fn key_source(
        &mut self,
        node: &Node,
        what: &str,
        dir: &Path,
        vars: &super::interp::Vars,
    ) -> Result<Option<super::KeySource>, ConfigError> {
        let (p, t) = (node.get("passphrase"), node.get("transit"));
        if p.is_some() && t.is_some() {
            return Err(self.err(
                node.loc,
                format!("`{what}` has both `passphrase` and `transit`: give one key provider"),
            ));
        }
        if let Some(p) = p {
            let w = format!("{what}.passphrase");
            let entries = self.map(p, &w)?;
            self.check_keys(entries, &["env", "file"], &w);
            let source = match (
                self.opt_string(p.get("env"), &format!("{w}.env"))?,
                self.opt_string(p.get("file"), &format!("{w}.file"))?,
            ) {
                (Some(name), None) => super::PassphraseSource::Env {
                    value: vars.process(&name).map(str::to_string),
                    name,
                },
                (None, Some(file)) => super::PassphraseSource::File(dir.join(file)),
                _ => {
                    return Err(self.err(
                        p.loc,
                        format!("`{w}` must name exactly one of `env: VARIABLE` or `file: PATH`"),
                    ))
                }
            };
            return Ok(Some(super::KeySource::Passphrase(source)));
        }
        if let Some(t) = t {
            let w = format!("{what}.transit");
            let entries = self.map(t, &w)?;
            self.check_keys(entries, &["key", "mount", "address"], &w);
            let key = self
                .opt_string(t.get("key"), &format!("{w}.key"))?
                .ok_or_else(|| {
                    self.err(t.loc, format!("`{w}` needs `key`: the Transit key's name"))
                })?;
            return Ok(Some(super::KeySource::Transit {
                key,
                mount: self
                    .opt_string(t.get("mount"), &format!("{w}.mount"))?
                    .unwrap_or_else(|| "transit".into()),
                address: self.opt_string(t.get("address"), &format!("{w}.address"))?,
            }));
        }
        Ok(None)
    }

    /// The top-level `volumes`, with names that fit what the providers
    /// derive from them.
    fn volumes(
        &mut self,
        root: &Node,
        name: &str,
        env: &str,
    ) -> Result<BTreeMap<String, Volume>, ConfigError> {
        let mut volumes = BTreeMap::new();
        if let Some(v) = root.get("volumes") {
            for (k, body) in self.map(v, "volumes")? {
                if !valid_name(&k.name) {
                    return Err(self.err(
                        k.loc,
                        format!(
                            "volume name `{}` must be lowercase letters, digits, `-` or `_`, starting with a letter or digit",
                            shown(&k.name)
                        ),
                    ));
                }
                // `nk-<project>-<env>-<volume>` is Docker's volume name and a
                // directory of Docker's; `<volume>` a directory of nanokit's.
                let derived = "nk---".len() + name.len() + env.len() + k.name.len();
                if derived > MAX_FILE_NAME {
                    return Err(self.err(
                        k.loc,
                        format!(
                            "volume name `{}` is too long: the Docker volume `nk-<project>-<env>-<volume>` would have {derived} characters, and a volume name is a directory name of at most {MAX_FILE_NAME}; use at most {} characters",
                            shown(&k.name),
                            MAX_FILE_NAME.saturating_sub(derived - k.name.len())
                        ),
                    ));
                }
                let mut external_name = None;
                if !body.is_null() {
                    let e = self.map(body, &format!("volumes.{}", k.name))?;
                    self.check_keys(e, &["name"], &format!("volume `{}`", k.name));
                    if let Some(n) = body.get("name") {
                        let v = self.string(n, "name")?;
                        let ok = docker_name(&v) && (2..=MAX_FILE_NAME).contains(&v.len());
                        if !ok {
                            return Err(self.err(
                                n.loc,
                                format!("`volumes.{}.name` is {}: a Docker volume name is 2 to {MAX_FILE_NAME} letters, digits, `_`, `.` or `-`, starting with a letter or digit", k.name, self.val(n, &v)),
                            ));
                        }
                        external_name = Some(v);
                    }
                }
                volumes.insert(
                    k.name.clone(),
                    Volume {
                        name: k.name.clone(),
                        external_name,
                        loc: k.loc,
                    },
                );
            }
        }
        Ok(volumes)
    }

    /// The top-level `networks` (names only; no provider uses them yet).
    fn networks(
        &mut self,
        root: &Node,
        provider: ProviderKind,
    ) -> Result<Vec<String>, ConfigError> {
        let mut networks = Vec::new();
        if let Some(n) = root.get("networks") {
            for (k, _) in self.map(n, "networks")? {
                networks.push(k.name.clone());
            }
            if !networks.is_empty() {
                match provider {
                    ProviderKind::Process => self.warn(n.loc, "`networks` are not used by the process provider (every service shares the host network)"),
                    ProviderKind::Docker => self.warn(n.loc, "`networks` are not used yet by the docker provider: every service joins the network `nanokit-net-<env>`, where services reach each other by name"),
                }
            }
        }
        Ok(networks)
    }

    /// The declared `runtimes`, each checked to be a block of service keys.
    fn runtimes<'a>(&mut self, root: &'a Node) -> Result<&'a [(Key, Node)], ConfigError> {
        let runtimes: &[(Key, Node)] = match root.get("runtimes") {
            Some(r) => self.map(r, "runtimes")?,
            None => &[],
        };
        for (k, body) in runtimes {
            let e = self.map(body, &format!("runtimes.{}", k.name))?;
            self.check_keys(e, SERVICE_KEYS, &format!("runtime `{}`", k.name));
        }
        Ok(runtimes)
    }

    /// A service's name is valid and fits its longest container name.
    fn check_service_name(&self, k: &Key, name: &str, env: &str) -> Result<(), ConfigError> {
        if !valid_name(&k.name) {
            return Err(self.err(
                k.loc,
                format!("service name `{}` must be lowercase letters, digits, `-` or `_`, starting with a letter or digit", shown(&k.name)),
            ));
        }
        // Checked for every provider, so a file that validates with one
        // works with the other.
        let room = MAX_NAME_TOTAL - name.len() - env.len();
        if k.name.len() > room {
            return Err(self.err(
                k.loc,
                format!(
                    "service name `{}` is too long ({} characters): its Docker container `nk-{name}-{env}-<service>-install-<suffix>` may have at most {MAX_CONTAINER_NAME} characters, so with project `{name}` and environment `{env}` a service name has at most {room}",
                    shown(&k.name),
                    k.name.len()
                ),
            ));
        }
        Ok(())
    }

    /// No enabled service depends on a disabled one.
    fn check_enabled_deps(
        &self,
        services: &BTreeMap<String, Service>,
        disabled: &[String],
        env: &str,
    ) -> Result<(), ConfigError> {
        let disabled_set: std::collections::HashSet<&str> =
            disabled.iter().map(String::as_str).collect();
        for svc in services.values() {
            for d in &svc.depends_on {
                if disabled_set.contains(d.name.as_str()) {
                    return Err(ConfigError {
                        code: "ENKDEP",
                        file: self.file.clone(),
                        loc: Some(d.loc),
                        message: format!(
                            "service `{}` depends on `{}`, which is disabled in environment `{env}` (instances: 0); enable it or drop the dependency",
                            svc.name, d.name
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The message for a state URL whose scheme nanokit does not know (the URL
/// itself is not shown: it may hold a password).
fn unknown_scheme(what: &str, scheme: &str) -> String {
    format!(
        "{what} names a state store of unknown kind `{scheme}://`: use a file path, or a URL starting with {}",
        STATE_SCHEMES
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
