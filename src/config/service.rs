//! One service's block (its runtime's block merged under it) as a
//! [`Service`]: what its provider needs to run it is present and valid, and
//! settings a provider does not use are warned about, not silently dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::cx::{shown, Cx};
use super::yaml::{self, Key, Node, Value};
use super::{
    ConfigError, Dep, Hooks, ProviderKind, RestartPolicy, Service, UpdateStrategy, Volume,
    VolumeMount, MAX_DURATION, MAX_INHERITED_NODES, RESTART_BACKOFF_MAX,
};

pub(super) const SERVICE_KEYS: &[&str] = &[
    "image",
    "runtime",
    "start",
    "port",
    "expose",
    "path",
    "depends_on",
    "env",
    "volumes",
    "instances",
    "updateStrategy",
    "provisioning",
    "hooks",
    "healthcheck",
    "cpu",
    "memory",
    "restart",
    "restart_backoff_max",
];
const HOOK_KEYS: &[&str] = &[
    "prestart",
    "prestart_container",
    "poststart",
    "prestop",
    "poststop",
];

impl Cx<'_> {
    /// The service `key` declares with `body`; `runtime_index` holds the
    /// declared runtimes, `volumes` the top-level volumes.
    pub(super) fn service(
        &mut self,
        key: &Key,
        body: &Node,
        runtime_index: &HashMap<&str, &Node>,
        volumes: &BTreeMap<String, Volume>,
        provider: ProviderKind,
        dir: &Path,
    ) -> Result<Service, ConfigError> {
        let name = key.name.clone();
        let ctx = format!("service `{name}`");
        if !matches!(body.value, Value::Map(_)) && !body.is_null() {
            return Err(self.err(
                body.loc,
                format!("{ctx} must be a mapping of settings, found {}", body.kind()),
            ));
        }
        let own = self.map(body, &format!("services.{name}"))?;
        self.check_keys(own, SERVICE_KEYS, &ctx);

        let (runtime, merged, runtime_deps) =
            self.inherit_runtime(key, body, runtime_index, &ctx)?;
        let b = &merged;

        let (image, start) = self.command(key, b, provider, &ctx)?;
        let port = match b.get("port") {
            Some(n) if !n.is_null() => Some(self.int(n, "port", 1, 65535)? as u16),
            _ => None,
        };
        let expose = match b.get("expose") {
            Some(n) if !n.is_null() => Some(self.int(n, "expose", 1, 65535)? as u16),
            _ => port,
        };
        let (path, path_given) = self.work_path(key, b, dir, &ctx)?;
        let depends_on = self.depends_on(body, runtime_deps, &name, &ctx)?;
        let env = self.env_vars(b)?;
        let mounts = self.mounts(b, volumes, provider, &ctx)?;
        let instances = self.instances(key, b, provider, port, &ctx)?;
        let update_strategy = self.update_strategy(key, b, provider, port, &ctx)?;
        let (install, install_image) = self.provisioning(key, b, provider, &ctx)?;
        let (manifests, manifest_digest) = if install.is_some() {
            manifests(&path)
        } else {
            (Vec::new(), None)
        };
        let hooks = self.hooks(b, &ctx)?;
        let healthcheck = match b.get("healthcheck") {
            Some(h) if !h.is_null() => Some(self.healthcheck(h, &ctx)?),
            _ => None,
        };
        let (cpu, memory) = self.limits(b, provider, &ctx)?;
        let restart = self.restart_policy(b)?;
        let restart_backoff_max = match b.get("restart_backoff_max") {
            Some(n) if !n.is_null() => self.duration(
                n,
                "restart_backoff_max",
                std::time::Duration::from_millis(100),
                MAX_DURATION,
                false,
            )?,
            _ => RESTART_BACKOFF_MAX,
        };
        Ok(Service {
            name,
            loc: key.loc,
            image,
            runtime,
            start,
            port,
            expose,
            path,
            path_given,
            depends_on,
            env,
            volumes: mounts,
            instances,
            update_strategy,
            install,
            install_image,
            manifests,
            manifest_digest,
            hooks,
            healthcheck,
            cpu,
            memory,
            restart,
            restart_backoff_max,
        })
    }

    /// `restart`: `always` (the default), `on-failure[:N]`,
    /// `unless-stopped` or `no`, as Docker Compose writes them.
    fn restart_policy(&self, b: &Node) -> Result<RestartPolicy, ConfigError> {
        let Some(n) = b.get("restart").filter(|n| !n.is_null()) else {
            return Ok(RestartPolicy::default());
        };
        let text = self.string(n, "restart")?;
        let bad = || {
            self.err(
                n.loc,
                format!(
                    "`restart` is {}: use `always`, `on-failure`, `on-failure:<max restarts>`, `unless-stopped` or `no`",
                    self.val(n, &text)
                ),
            )
        };
        Ok(match text.trim() {
            "always" => RestartPolicy::Always,
            "unless-stopped" => RestartPolicy::UnlessStopped,
            "no" | "false" => RestartPolicy::No,
            "on-failure" => RestartPolicy::OnFailure { max: None },
            t => match t
                .strip_prefix("on-failure:")
                .map(|m| m.trim().parse::<u32>())
            {
                // Docker's `on-failure:0` is no limit.
                Some(Ok(0)) => RestartPolicy::OnFailure { max: None },
                Some(Ok(m)) => RestartPolicy::OnFailure { max: Some(m) },
                _ => return Err(bad()),
            },
        })
    }

    /// `runtime` (when the service names one) and the block the service
    /// runs with: the runtime's block merged under the service's own, and
    /// the runtime's `depends_on`.
    fn inherit_runtime(
        &mut self,
        key: &Key,
        body: &Node,
        runtime_index: &HashMap<&str, &Node>,
        ctx: &str,
    ) -> Result<(Option<String>, Node, Vec<Dep>), ConfigError> {
        // Runtime inheritance: the runtime's block under the service's own.
        let runtime = self.opt_string(body.get("runtime"), "runtime")?;
        let mut runtime_deps = Vec::new();
        let merged = match &runtime {
            None => body.clone(),
            Some(rt) => {
                let Some(rnode) = runtime_index.get(rt.as_str()).copied() else {
                    let mut known: Vec<&str> = runtime_index.keys().copied().collect();
                    known.sort_unstable();
                    return Err(self.err(
                        body.get("runtime").map_or(key.loc, |n| n.loc),
                        format!(
                            "{ctx} uses runtime {}, which is not defined under `runtimes` (defined: {})",
                            body.get("runtime").map_or_else(|| shown(rt), |n| self.val(n, rt)),
                            if known.is_empty() { "none".into() } else { known.join(", ") }
                        ),
                    ));
                };
                if let Some(d) = rnode.get("depends_on") {
                    runtime_deps = self.deps(d)?;
                }
                // Every service copies its runtime: bounded in total, or a
                // large runtime used by many services multiplies.
                self.inherited += yaml::count_nodes(rnode);
                if self.inherited > MAX_INHERITED_NODES {
                    return Err(self.err(
                        body.get("runtime").map_or(key.loc, |n| n.loc),
                        format!("runtime inheritance copies more than {MAX_INHERITED_NODES} values into services in total (runtime {} is copied into each service that uses it): make the runtime smaller", body.get("runtime").map_or_else(|| shown(rt), |n| self.val(n, rt))),
                    ));
                }
                yaml::deep_merge(rnode.clone(), body.clone())
            }
        };
        Ok((runtime, merged, runtime_deps))
    }

    /// `image` and `start`, as far as the provider needs them.
    fn command(
        &mut self,
        key: &Key,
        b: &Node,
        provider: ProviderKind,
        ctx: &str,
    ) -> Result<(Option<String>, Option<String>), ConfigError> {
        let image = self.opt_string(b.get("image"), "image")?;
        let start = self.opt_string(b.get("start"), "start")?;
        // Which provider needs what: the process provider runs `start` (it
        // has nothing else to run); Docker runs `image`, and `start` only
        // replaces the image's command. Whether an image has a command of
        // its own is not checked here (`validate` does not talk to the
        // daemon): an image without one fails at `up`, naming the service.
        if provider == ProviderKind::Process && start.is_none() {
            return Err(self.err(
                key.loc,
                format!("{ctx} has no `start` command: the process provider runs `start` as a local process; add `start: <command>`"),
            ));
        }
        if let (Some(s), Some(n)) = (&start, b.get("start")) {
            if s.trim().is_empty() {
                return Err(self.err(
                    n.loc,
                    match provider {
                        ProviderKind::Process => format!("`start` of {ctx} is empty: the process provider runs it as the service's command; write one, such as `start: node server.js`"),
                        ProviderKind::Docker => format!("`start` of {ctx} is empty: omit `start` to run the image's own command, or write one"),
                    },
                ));
            }
        }
        if provider == ProviderKind::Docker && image.is_none() {
            return Err(self.err(
                key.loc,
                format!("{ctx} has no `image`: the docker provider needs one"),
            ));
        }
        if let (ProviderKind::Docker, Some(i), Some(n)) = (provider, &image, b.get("image")) {
            if i.trim().is_empty() || i.chars().any(char::is_whitespace) {
                return Err(self.err(
                    n.loc,
                    format!("`image` of {ctx} is {}: name the image to run, such as `image: node:22-alpine` (no spaces)", self.val(n, i)),
                ));
            }
        }
        if provider == ProviderKind::Process {
            if let Some(n) = b.get("image") {
                self.warn(
                    n.loc,
                    format!("`image` of {ctx} is not used by the process provider"),
                );
            }
        }
        Ok((image, start))
    }

    /// The absolute working directory, and whether `path` was given.
    fn work_path(
        &self,
        key: &Key,
        b: &Node,
        dir: &Path,
        ctx: &str,
    ) -> Result<(PathBuf, bool), ConfigError> {
        let path_given = b.get("path").is_some_and(|n| !n.is_null());
        let path = match self.opt_string(b.get("path"), "path")? {
            None => dir.to_path_buf(),
            Some(p) => {
                let abs = dir.join(&p);
                if !abs.is_dir() {
                    return Err(self.err(
                        b.get("path").map_or(key.loc, |n| n.loc),
                        format!("`path` of {ctx} is {}, which is not a directory (relative paths start at the nanokit.yml's folder)", b.get("path").map_or_else(|| shown(&p), |n| self.val(n, &p))),
                    ));
                }
                abs
            }
        };
        Ok((path, path_given))
    }

    /// The runtime's dependencies, then the service's own (`body`, not
    /// merged), each once; a service that depends on itself is refused.
    fn depends_on(
        &mut self,
        body: &Node,
        runtime_deps: Vec<Dep>,
        name: &str,
        ctx: &str,
    ) -> Result<Vec<Dep>, ConfigError> {
        let mut depends_on = runtime_deps;
        let mut dep_names: std::collections::HashSet<String> =
            depends_on.iter().map(|d| d.name.clone()).collect();
        if let Some(d) = body.get("depends_on") {
            for dep in self.deps(d)? {
                if dep_names.insert(dep.name.clone()) {
                    depends_on.push(dep);
                } else if let Some(same) = depends_on.iter_mut().find(|d| d.name == dep.name) {
                    // The service's own entry beats its runtime's.
                    same.restart = dep.restart;
                }
            }
        }
        if let Some(d) = depends_on.iter().find(|d| d.name == name) {
            return Err(ConfigError {
                code: "ENKCYCLE",
                file: self.file.clone(),
                loc: Some(d.loc),
                message: format!("{ctx} depends on itself: dependency cycle {name} → {name}"),
            });
        }
        Ok(depends_on)
    }

    /// `env`, as a list of `KEY=value` or a mapping.
    fn env_vars(&self, b: &Node) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut env = BTreeMap::new();
        if let Some(e) = b.get("env") {
            match &e.value {
                Value::Seq(items) => {
                    for item in items {
                        let s = self.string(item, "env entry")?;
                        let (k, v) = s.split_once('=').ok_or_else(|| {
                            self.err(item.loc, "an `env` list entry must be `KEY=value`")
                        })?;
                        env.insert(k.to_string(), v.to_string());
                    }
                }
                _ => {
                    for (k, v) in self.map(e, "env")? {
                        let value = match &v.value {
                            Value::Scalar { .. } if v.is_null() => String::new(),
                            Value::Scalar { text, .. } => text.clone(),
                            _ => {
                                return Err(self.err(
                                    v.loc,
                                    format!(
                                        "env `{}` must be a string, number or boolean, found {}",
                                        k.name,
                                        v.kind()
                                    ),
                                ))
                            }
                        };
                        env.insert(k.name.clone(), value);
                    }
                }
            }
            for k in env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(self.err(
                        e.loc,
                        format!("`{k}` is not a valid environment variable name"),
                    ));
                }
            }
        }
        Ok(env)
    }

    /// `volumes`: `source:target` entries, each a path or a declared volume.
    fn mounts(
        &self,
        b: &Node,
        volumes: &BTreeMap<String, Volume>,
        provider: ProviderKind,
        ctx: &str,
    ) -> Result<Vec<VolumeMount>, ConfigError> {
        let mut mounts = Vec::new();
        if let Some(v) = b.get("volumes") {
            let Value::Seq(items) = &v.value else {
                return Err(self.err(
                    v.loc,
                    format!("`volumes` of {ctx} must be a list of `source:target`"),
                ));
            };
            for item in items {
                let s = self.string(item, "volume")?;
                let (source, target) = s.split_once(':').ok_or_else(|| {
                    self.err(item.loc, format!("volume {} must be `source:target` (a named volume or a path, then where it appears)", self.val(item, &s)))
                })?;
                let is_path =
                    source.starts_with('.') || source.starts_with('/') || source.starts_with('~');
                if provider == ProviderKind::Docker && !target.starts_with('/') {
                    return Err(self.err(
                        item.loc,
                        format!("volume {} of {ctx}: the target must be an absolute path inside the container, such as `/data`", self.val(item, &s)),
                    ));
                }
                if !is_path && !volumes.contains_key(source) {
                    return Err(self.err(
                        item.loc,
                        format!("{ctx} mounts volume {}, which is not declared under top-level `volumes`; declare it, or write a path such as `./data:/data`", self.val(item, source)),
                    ));
                }
                mounts.push(VolumeMount {
                    source: source.to_string(),
                    target: target.to_string(),
                    named: !is_path,
                });
            }
        }
        Ok(mounts)
    }

    /// `instances`, as many as the provider runs.
    fn instances(
        &mut self,
        key: &Key,
        b: &Node,
        provider: ProviderKind,
        port: Option<u16>,
        ctx: &str,
    ) -> Result<u32, ConfigError> {
        let mut instances = match b.get("instances") {
            Some(n) if !n.is_null() => self.int(n, "instances", 0, 1000)? as u32,
            _ => 1,
        };
        if instances > 1 && provider == ProviderKind::Process {
            self.warn(
                b.get("instances").map_or(key.loc, |n| n.loc),
                format!("`instances: {instances}` of {ctx}: the process provider runs one instance per service"),
            );
            instances = 1;
        }
        if instances > 1 && provider == ProviderKind::Docker && port.is_some() {
            return Err(self.err(
                b.get("instances").map_or(key.loc, |n| n.loc),
                format!("{ctx} has `instances: {instances}` and publishes host `port` {}: only one container can bind a host port; drop `port` and keep `expose` (replicas are reachable by the service name on the project network)", port.unwrap_or_default()),
            ));
        }
        Ok(instances)
    }

    /// `updateStrategy`: `rolling` where the provider and `port` allow it.
    fn update_strategy(
        &mut self,
        key: &Key,
        b: &Node,
        provider: ProviderKind,
        port: Option<u16>,
        ctx: &str,
    ) -> Result<UpdateStrategy, ConfigError> {
        let update_strategy = match self
            .opt_string(b.get("updateStrategy"), "updateStrategy")?
            .as_deref()
        {
            None | Some("recreate") => UpdateStrategy::Recreate,
            Some("rolling") => {
                if provider == ProviderKind::Process {
                    self.warn(
                        b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                        format!("`updateStrategy: rolling` of {ctx} is not supported by the process provider; it recreates"),
                    );
                    UpdateStrategy::Recreate
                } else if port.is_some() {
                    self.warn(
                        b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                        format!("`updateStrategy: rolling` of {ctx} needs two containers at once, but only one can bind host `port`; it recreates (drop `port` and keep `expose` to roll)"),
                    );
                    UpdateStrategy::Recreate
                } else {
                    UpdateStrategy::Rolling
                }
            }
            Some(other) => {
                return Err(self.err(
                    b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                    format!(
                        "`updateStrategy` is {}: use `recreate` or `rolling`",
                        b.get("updateStrategy")
                            .map_or_else(|| shown(other), |n| self.val(n, other))
                    ),
                ))
            }
        };
        Ok(update_strategy)
    }

    /// `provisioning.install` and `provisioning.image`.
    fn provisioning(
        &mut self,
        key: &Key,
        b: &Node,
        provider: ProviderKind,
        ctx: &str,
    ) -> Result<(Option<String>, Option<String>), ConfigError> {
        let mut install = None;
        let mut install_image = None;
        if let Some(p) = b.get("provisioning") {
            let e = self.map(p, "provisioning")?.to_vec();
            self.check_keys(&e, &["install", "image"], &format!("provisioning of {ctx}"));
            install = self.opt_string(p.get("install"), "provisioning.install")?;
            if let (Some(i), Some(n)) = (&install, p.get("install")) {
                if i.trim().is_empty() {
                    return Err(self.err(
                        n.loc,
                        format!("`provisioning.install` of {ctx} is empty: write the install command, or drop the key"),
                    ));
                }
            }
            install_image = self.opt_string(p.get("image"), "provisioning.image")?;
            if install_image.is_some() && provider == ProviderKind::Process {
                self.warn(
                    p.get("image").map_or(key.loc, |n| n.loc),
                    format!("`provisioning.image` of {ctx} is not used by the process provider"),
                );
            }
        }
        Ok((install, install_image))
    }

    fn hooks(&mut self, b: &Node, ctx: &str) -> Result<Hooks, ConfigError> {
        let mut hooks = Hooks::default();
        if let Some(h) = b.get("hooks") {
            let e = self.map(h, "hooks")?.to_vec();
            self.check_keys(&e, HOOK_KEYS, &format!("hooks of {ctx}"));
            hooks.prestart = self.commands(h.get("prestart"), "hooks.prestart")?;
            hooks.prestart_container =
                self.commands(h.get("prestart_container"), "hooks.prestart_container")?;
            hooks.poststart = self.commands(h.get("poststart"), "hooks.poststart")?;
            hooks.prestop = self.commands(h.get("prestop"), "hooks.prestop")?;
            hooks.poststop = self.commands(h.get("poststop"), "hooks.poststop")?;
        }
        Ok(hooks)
    }

    /// `cpu` and `memory`.
    fn limits(
        &mut self,
        b: &Node,
        provider: ProviderKind,
        ctx: &str,
    ) -> Result<(Option<f64>, Option<u64>), ConfigError> {
        let cpu = self.limit(
            b,
            "cpu",
            provider,
            ctx,
            |s| {
                s.trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| (0.01..=1024.0).contains(v))
            },
            "a number of CPUs between 0.01 (Docker's least) and 1024, such as `0.5`",
        )?;
        let memory = self.limit(
            b,
            "memory",
            provider,
            ctx,
            |s| parse_memory(s).filter(|v| (MIN_MEMORY..=MAX_MEMORY).contains(v)),
            "a size between 6mb (Docker's least) and 16tb, such as `512mb` or `1gb`",
        )?;
        Ok((cpu, memory))
    }

    /// The resource limit `key` of a service, parsed by `parse`; `must`
    /// says what it must be. The process provider does not enforce it: a
    /// warning says so.
    fn limit<T>(
        &mut self,
        b: &Node,
        key: &str,
        provider: ProviderKind,
        ctx: &str,
        parse: impl Fn(&str) -> Option<T>,
        must: &str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(n) = b.get(key).filter(|n| !n.is_null()) else {
            return Ok(None);
        };
        let s = self.string(n, key)?;
        let v = parse(&s).ok_or_else(|| {
            self.err(
                n.loc,
                format!("`{key}` must be {must}, found {}", self.val(n, &s)),
            )
        })?;
        if provider == ProviderKind::Process {
            self.warn(
                n.loc,
                format!("`{key}` of {ctx} is not enforced by the process provider"),
            );
        }
        Ok(Some(v))
    }

    pub(super) fn deps(&mut self, node: &Node) -> Result<Vec<Dep>, ConfigError> {
        let mut out = Vec::new();
        match &node.value {
            _ if node.is_null() => {}
            Value::Seq(items) => {
                for i in items {
                    out.push(Dep {
                        name: self.string(i, "depends_on entry")?,
                        loc: i.loc,
                        restart: false,
                    });
                }
            }
            // Compose's long form:
            // `depends_on: { db: { condition: service_healthy, restart: true } }`.
            Value::Map(entries) => {
                for (k, v) in entries {
                    out.push(Dep {
                        name: k.name.clone(),
                        loc: k.loc,
                        restart: self.dep_options(&k.name, v)?,
                    });
                }
            }
            Value::Scalar { .. } => {
                return Err(self.err(
                    node.loc,
                    "`depends_on` must be a list of service names, e.g. `depends_on: [db]`",
                ))
            }
        }
        Ok(out)
    }
}

impl Cx<'_> {
    /// The options of one long-form `depends_on` entry; returns `restart`.
    /// `condition: service_healthy` is what nanokit always waits for;
    /// `service_started` is accepted and waits for healthy too (with a
    /// warning); `service_completed_successfully` needs a one-shot job,
    /// which nanokit does not run as a service.
    fn dep_options(&mut self, dep: &str, v: &Node) -> Result<bool, ConfigError> {
        if v.is_null() {
            return Ok(false);
        }
        let ctx = format!("depends_on.{dep}");
        let entries = self.map(v, &ctx)?.to_vec();
        self.check_keys(
            &entries,
            &["condition", "restart", "required"],
            &format!("`{ctx}`"),
        );
        if let Some(c) = v.get("condition").filter(|n| !n.is_null()) {
            match self.string(c, &format!("{ctx}.condition"))?.trim() {
                "service_healthy" => {}
                "service_started" => self.warn(
                    c.loc,
                    format!("`{ctx}.condition: service_started`: nanokit starts a service once what it depends on is healthy, so this waits for `{dep}` to be healthy"),
                ),
                "service_completed_successfully" => return Err(self.err(
                    c.loc,
                    format!("`{ctx}.condition: service_completed_successfully` is not supported: nanokit's services run until stopped; run a one-shot job as the dependent's `hooks.prestart`"),
                )),
                other => return Err(self.err(
                    c.loc,
                    format!("`{ctx}.condition` is {}: use `service_healthy` (or `service_started`)", self.val(c, other)),
                )),
            }
        }
        if let Some(r) = v.get("required").filter(|n| !n.is_null()) {
            if !self.boolean(r, &format!("{ctx}.required"))? {
                self.warn(
                    r.loc,
                    format!("`{ctx}.required: false` is not supported: nanokit always starts `{dep}` first"),
                );
            }
        }
        match v.get("restart").filter(|n| !n.is_null()) {
            Some(r) => self.boolean(r, &format!("{ctx}.restart")),
            None => Ok(false),
        }
    }

    /// `true` or `false`.
    fn boolean(&self, node: &Node, what: &str) -> Result<bool, ConfigError> {
        match self.string(node, what)?.trim() {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            other => Err(self.err(
                node.loc,
                format!(
                    "`{what}` must be `true` or `false`, found {}",
                    self.val(node, other)
                ),
            )),
        }
    }
}

/// Docker's smallest memory limit, and a bound far past any host.
const MIN_MEMORY: u64 = 6 << 20;
const MAX_MEMORY: u64 = 16 << 40;

/// `512mb`, `1gb`, `1024k`, `100` (bytes).
fn parse_memory(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = n * mult;
    (bytes > 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The manifests an install in `path` installs from (`package.json`,
/// `package-lock.json`, those that exist) and a digest of their content.
fn manifests(path: &Path) -> (Vec<PathBuf>, Option<String>) {
    let mut manifests = Vec::new();
    let mut manifest_digest = None;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for m in ["package.json", "package-lock.json"] {
        let p = path.join(m);
        if let Ok(bytes) = std::fs::read(&p) {
            h.update(m.as_bytes());
            h.update([0]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
            manifests.push(p);
        }
    }
    if !manifests.is_empty() {
        manifest_digest = Some(hex::encode(&h.finalize()[..12]));
    }
    (manifests, manifest_digest)
}
