//! Package specifiers (`name@version`) and the names derived from them.
//!
//! Everything that becomes part of a path is validated here, so that no
//! specifier, however hostile, can name a file outside the repository.

use std::fmt;

/// A validated `name@version`, e.g. `@openfn/language-http@7.2.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    /// The npm package name, possibly scoped (`@scope/name`).
    pub name: String,
    /// An exact version (no ranges, no tags with path characters).
    pub version: String,
}

/// Why a specifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl std::error::Error for SpecError {}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid package specifier {:?}: {} (expected name@version, e.g. @openfn/language-http@7.2.0)",
            self.spec, self.reason
        )
    }
}

const MAX_NAME: usize = 214;
const MAX_VERSION: usize = 256;

fn name_part_ok(part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err("a name part is empty".into());
    }
    if part.starts_with('.') || part.starts_with('_') {
        return Err(format!("{part:?} may not start with '.' or '_'"));
    }
    if let Some(c) = part.chars().find(char::is_ascii_uppercase) {
        return Err(format!(
            "npm names are lowercase ({c:?} is not); write {:?}",
            part.to_ascii_lowercase()
        ));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!("the name may not contain {c:?}"));
    }
    if matches!(part, "node_modules" | "favicon.ico") {
        return Err(format!("{part:?} is not a valid npm name"));
    }
    Ok(())
}

/// Whether `id` is a dot-separated list of non-empty `[0-9A-Za-z-]`
/// identifiers, numeric ones without leading zeros when `numeric_strict`.
fn semver_idents_ok(ids: &str, numeric_strict: bool) -> bool {
    ids.split('.').all(|id| {
        !id.is_empty()
            && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !(numeric_strict
                && id.len() > 1
                && id.starts_with('0')
                && id.chars().all(|c| c.is_ascii_digit()))
    })
}

/// Whether `v` is an exact SemVer 2.0 version: `MAJOR.MINOR.PATCH`, then
/// optionally `-<pre-release>` and `+<build>`.
fn exact_version(v: &str) -> bool {
    let (rest, build) = match v.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (v, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 16
                && p.chars().all(|c| c.is_ascii_digit())
                && !(p.len() > 1 && p.starts_with('0'))
        })
        && pre.is_none_or(|p| semver_idents_ok(p, true))
        && build.is_none_or(|b| semver_idents_ok(b, false))
}

impl PackageSpec {
    /// Parses and validates `name@version`.
    pub fn parse(spec: &str) -> Result<PackageSpec, SpecError> {
        let fail = |reason: String| SpecError {
            spec: spec.to_string(),
            reason,
        };
        if spec.contains('\0') {
            return Err(fail("it contains a NUL byte".into()));
        }
        // The version separator is the first '@' after a leading scope '@'.
        let search_from = usize::from(spec.starts_with('@'));
        let at = spec[search_from..]
            .find('@')
            .map(|i| i + search_from)
            .ok_or_else(|| fail("the version is missing".into()))?;
        let (name, version) = (&spec[..at], &spec[at + 1..]);
        if name.is_empty() {
            return Err(fail("the name is missing".into()));
        }
        if version.is_empty() {
            return Err(fail("the version is missing".into()));
        }
        if name.len() > MAX_NAME {
            return Err(fail(format!(
                "the name is longer than {MAX_NAME} characters"
            )));
        }
        match name.strip_prefix('@') {
            Some(scoped) => {
                let (scope, pkg) = scoped
                    .split_once('/')
                    .ok_or_else(|| fail("a scoped name must look like @scope/name".into()))?;
                name_part_ok(scope).map_err(&fail)?;
                name_part_ok(pkg).map_err(&fail)?;
            }
            None => name_part_ok(name).map_err(&fail)?,
        }
        if version.len() > MAX_VERSION {
            return Err(fail(format!(
                "the version is longer than {MAX_VERSION} characters"
            )));
        }
        if let Some(c) = version
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')))
        {
            return Err(fail(format!(
                "the version may not contain {c:?} (an exact version such as 1.2.3 is expected)"
            )));
        }
        if version.starts_with(['.', '-', '+']) || version.contains("..") {
            return Err(fail(format!("{version:?} is not a version")));
        }
        if !exact_version(version) {
            return Err(fail(format!(
                "{version:?} is not an exact version (MAJOR.MINOR.PATCH such as 1.2.3; tags and ranges such as latest or ^1.2.0 are not accepted)"
            )));
        }
        Ok(PackageSpec {
            name: name.to_string(),
            version: version.to_string(),
        })
    }

    /// The alias OpenFn's runtime uses: `<name>_<version>`. It is the
    /// directory under `node_modules` and the key in the repo's `package.json`.
    pub fn alias(&self) -> String {
        format!("{}_{}", self.name, self.version)
    }

    /// The alias as a single path component (`/` of a scope becomes `+`,
    /// which npm names never contain), for lock and sentinel file names.
    pub fn file_key(&self) -> String {
        self.alias().replace('/', "+")
    }

    /// What npm is asked to install: `<alias>@npm:<name>@<version>`.
    pub fn npm_install_arg(&self) -> String {
        format!("{}@npm:{}@{}", self.alias(), self.name, self.version)
    }
}

impl fmt::Display for PackageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_scoped() {
        let s = PackageSpec::parse("@openfn/language-http@7.2.0").unwrap();
        assert_eq!(s.name, "@openfn/language-http");
        assert_eq!(s.version, "7.2.0");
        assert_eq!(s.alias(), "@openfn/language-http_7.2.0");
        assert_eq!(s.file_key(), "@openfn+language-http_7.2.0");
        assert_eq!(
            s.npm_install_arg(),
            "@openfn/language-http_7.2.0@npm:@openfn/language-http@7.2.0"
        );
        let s = PackageSpec::parse("lodash@4.17.21").unwrap();
        assert_eq!(s.alias(), "lodash_4.17.21");
        for good in [
            "x@1.0.0-beta.1+build.5",
            "x@0.0.0",
            "x@10.20.30-rc.0+001",
            "x@1.0.0-x-y.7",
            "a.b-c_d@1.0.0",
        ] {
            assert!(PackageSpec::parse(good).is_ok(), "{good:?} should parse");
        }
    }

    #[test]
    fn rejects_hostile_and_malformed() {
        for bad in [
            "",
            "@",
            "lodash",
            "lodash@",
            "@1.0.0",
            "@scope@1.0.0",
            "@scope/@1.0.0",
            "@/x@1.0.0",
            "../../etc/x@1.0.0",
            "..@1.0.0",
            ".hidden@1.0.0",
            "_x@1.0.0",
            "a/b@1.0.0",
            "@s/a/b@1.0.0",
            "/etc/passwd@1.0.0",
            "x@../../1",
            "x@1/2",
            "x@..",
            "x@.1",
            "x@-1",
            "x@1_0",
            "x@^1.0.0",
            "x@~1.0.0",
            "x@1 || 2",
            "x;rm -rf /@1.0.0",
            "x@1.0.0;rm -rf /",
            "x@$(id)",
            "x`id`@1.0.0",
            "x@1.0.0\0",
            "x\0y@1.0.0",
            "x y@1.0.0",
            "x@1.0.0\n",
            // Not valid npm names.
            "A@1.0.0",
            "@Scope/x@1.0.0",
            "@s/X@1.0.0",
            "x~y@1.0.0",
            "node_modules@1.0.0",
            // Not exact versions.
            "a@latest",
            "a@1",
            "a@1.0",
            "a@1.0.0.0",
            "a@01.0.0",
            "a@1.0.0-",
            "a@1.0.0-01",
            "a@1.0.0+",
            "a@1.0.0-a..b",
            "a@v1.0.0",
            "a@x.y.z",
        ] {
            assert!(
                PackageSpec::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let long = format!("{}@1.0.0", "a".repeat(300));
        assert!(PackageSpec::parse(&long).is_err());
    }
}
