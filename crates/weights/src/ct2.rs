//! Reader of CTranslate2 `model.bin` (binary version 6).
//!
//! Layout: u32 version, spec name, u32 spec revision, u32 variable count; per
//! variable: name, u8 rank, u32 x rank shape, u8 dtype (0 f32, 1 i8, 2 i16,
//! 3 i32, 4 f16, 5 bf16), u32 byte count, raw little-endian data; then u32 alias
//! count and (alias, target) name pairs. Strings are a u16 length that counts a
//! trailing NUL. Every field is checked, so a truncated or corrupt file fails
//! with the offset and the variable named.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Result, WeightsError};

/// The binary version this reader understands.
pub const SUPPORTED_VERSION: u32 = 6;

/// Element type of a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 8-bit signed integer (quantised weights).
    I8,
    /// 16-bit signed integer (scalars).
    I16,
    /// 32-bit signed integer.
    I32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => DType::F32,
            1 => DType::I8,
            2 => DType::I16,
            3 => DType::I32,
            4 => DType::F16,
            5 => DType::BF16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }
}

/// A variable's metadata and where its bytes are.
#[derive(Debug, Clone)]
struct Variable {
    shape: Vec<usize>,
    dtype: DType,
    data: Range<usize>,
}

/// A borrowed view of one variable.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub data: &'a [u8],
}

/// A parsed `model.bin`, holding its bytes.
#[derive(Debug)]
pub struct Ct2Model {
    path: PathBuf,
    /// Model specification, e.g. `WhisperSpec`.
    pub spec: String,
    /// Revision of the specification.
    pub spec_revision: u32,
    bytes: Vec<u8>,
    order: Vec<String>,
    vars: HashMap<String, Variable>,
    aliases: HashMap<String, String>,
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| {
                WeightsError::format(
                    self.path,
                    format!(
                        "truncated: {what} needs {n} bytes at offset {} but the file is {} bytes",
                        self.pos,
                        self.bytes.len()
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let n = self.u16(what)? as usize;
        let raw = self.take(n, what)?;
        match raw.split_last() {
            Some((0, text)) => std::str::from_utf8(text).map(str::to_owned).map_err(|_| {
                WeightsError::format(self.path, format!("{what} at offset {at} is not UTF-8"))
            }),
            _ => Err(WeightsError::format(
                self.path,
                format!("{what} at offset {at} is not NUL-terminated; the file is corrupt"),
            )),
        }
    }
}

impl Ct2Model {
    /// Reads and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(WeightsError::io(path))?;
        Self::parse(bytes, path)
    }

    /// Parses the bytes of a `model.bin`; `path` only names it in errors.
    pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let mut c = Cursor {
            path,
            bytes: &bytes,
            pos: 0,
        };
        let version = c.u32("format version")?;
        if version != SUPPORTED_VERSION {
            return Err(WeightsError::format(
                path,
                format!(
                    "CTranslate2 binary version {version} is not supported (expected {SUPPORTED_VERSION}); \
                     is this a CTranslate2 model.bin? Re-convert it with a current ct2 converter"
                ),
            ));
        }
        let spec = c.string("spec name")?;
        let spec_revision = c.u32("spec revision")?;
        let n_vars = c.u32("variable count")? as usize;
        let mut vars = HashMap::with_capacity(n_vars.min(1 << 16));
        let mut order = Vec::with_capacity(n_vars.min(1 << 16));
        for i in 0..n_vars {
            let name = c.string(&format!("name of variable {i}"))?;
            let rank = c.u8(&format!("rank of {name}"))? as usize;
            if rank > 8 {
                return Err(WeightsError::format(
                    path,
                    format!("{name}: rank {rank} is not plausible; the file is corrupt"),
                ));
            }
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(c.u32(&format!("shape of {name}"))? as usize);
            }
            let code = c.u8(&format!("dtype of {name}"))?;
            let dtype = DType::from_code(code).ok_or_else(|| {
                WeightsError::format(path, format!("{name}: unknown dtype code {code}"))
            })?;
            let nbytes = c.u32(&format!("byte count of {name}"))? as usize;
            let expected = shape
                .iter()
                .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
                .unwrap_or(usize::MAX);
            if nbytes != expected {
                return Err(WeightsError::format(
                    path,
                    format!(
                        "{name}: {nbytes} data bytes do not match shape {shape:?} of {dtype:?} ({expected} bytes)"
                    ),
                ));
            }
            let start = c.pos;
            c.take(nbytes, &format!("data of {name}"))?;
            if vars
                .insert(
                    name.clone(),
                    Variable {
                        shape,
                        dtype,
                        data: start..start + nbytes,
                    },
                )
                .is_some()
            {
                return Err(WeightsError::format(
                    path,
                    format!("variable {name} appears twice"),
                ));
            }
            order.push(name);
        }
        let n_aliases = c.u32("alias count")? as usize;
        let mut aliases = HashMap::new();
        for i in 0..n_aliases {
            let alias = c.string(&format!("alias {i}"))?;
            let target = c.string(&format!("target of alias {alias}"))?;
            if !vars.contains_key(&target) {
                return Err(WeightsError::format(
                    path,
                    format!("alias {alias} points to missing variable {target}"),
                ));
            }
            aliases.insert(alias, target);
        }
        if c.pos != bytes.len() {
            return Err(WeightsError::format(
                path,
                format!(
                    "{} unexpected bytes after the end of the model at offset {}",
                    bytes.len() - c.pos,
                    c.pos
                ),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            spec,
            spec_revision,
            bytes,
            order,
            vars,
            aliases,
        })
    }

    /// The file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Variable names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// A variable by name or alias.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let name = self.aliases.get(name).map_or(name, String::as_str);
        self.vars.get(name).map(|v| TensorRef {
            dtype: v.dtype,
            shape: &v.shape,
            data: &self.bytes[v.data.clone()],
        })
    }

    /// A variable that must exist.
    pub fn require(&self, name: &str) -> Result<TensorRef<'_>> {
        self.get(name).ok_or_else(|| {
            WeightsError::format(&self.path, format!("{} has no variable {name}", self.spec))
        })
    }

    /// An integer scalar (e.g. `encoder/num_heads`).
    pub fn scalar(&self, name: &str) -> Result<i64> {
        let t = self.require(name)?;
        let d = t.data;
        let v = match (t.dtype, d.len()) {
            (DType::I8, 1) => i64::from(d[0] as i8),
            (DType::I16, 2) => i64::from(i16::from_le_bytes([d[0], d[1]])),
            (DType::I32, 4) => i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]])),
            _ => {
                return Err(WeightsError::format(
                    &self.path,
                    format!(
                        "{name} is not an integer scalar ({:?} {:?})",
                        t.dtype, t.shape
                    ),
                ));
            }
        };
        Ok(v)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a model.bin the way CTranslate2 does.
    pub(crate) struct Writer(pub Vec<u8>);

    impl Writer {
        pub(crate) fn new(spec: &str, n_vars: u32) -> Self {
            let mut w = Writer(Vec::new());
            w.0.extend(6u32.to_le_bytes());
            w.string(spec);
            w.0.extend(3u32.to_le_bytes());
            w.0.extend(n_vars.to_le_bytes());
            w
        }
        pub(crate) fn string(&mut self, s: &str) {
            self.0.extend(((s.len() + 1) as u16).to_le_bytes());
            self.0.extend(s.as_bytes());
            self.0.push(0);
        }
        pub(crate) fn var(&mut self, name: &str, shape: &[u32], code: u8, data: &[u8]) {
            self.string(name);
            self.0.push(shape.len() as u8);
            for d in shape {
                self.0.extend(d.to_le_bytes());
            }
            self.0.push(code);
            self.0.extend((data.len() as u32).to_le_bytes());
            self.0.extend(data);
        }
        pub(crate) fn aliases(&mut self, pairs: &[(&str, &str)]) {
            self.0.extend((pairs.len() as u32).to_le_bytes());
            for (a, t) in pairs {
                self.string(a);
                self.string(t);
            }
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new("WhisperSpec", 2);
        w.var("encoder/num_heads", &[], 2, &6i16.to_le_bytes());
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.var("decoder/embeddings/weight", &[3, 2], 0, &data);
        w.aliases(&[("decoder/projection/weight", "decoder/embeddings/weight")]);
        w.0
    }

    #[test]
    fn parses_variables_scalars_and_aliases() {
        let m = Ct2Model::parse(sample(), Path::new("m.bin")).unwrap();
        assert_eq!(m.spec, "WhisperSpec");
        assert_eq!(m.scalar("encoder/num_heads").unwrap(), 6);
        let t = m.get("decoder/projection/weight").unwrap();
        assert_eq!((t.dtype, t.shape), (DType::F32, &[3usize, 2][..]));
        assert_eq!(&t.data[4..8], &2.0f32.to_le_bytes());
        assert_eq!(
            m.names().collect::<Vec<_>>(),
            ["encoder/num_heads", "decoder/embeddings/weight"]
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = sample();
        for cut in 0..full.len() {
            let err = Ct2Model::parse(full[..cut].to_vec(), Path::new("m.bin"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("m.bin: "), "{err}");
        }
        let err = Ct2Model::parse(full[..40].to_vec(), Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn corruptions_are_named() {
        let mut bad_version = sample();
        bad_version[0] = 5;
        let e = Ct2Model::parse(bad_version, Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary version 5 is not supported"), "{e}");

        let mut w = Writer::new("WhisperSpec", 1);
        w.var("x", &[2], 9, &[0, 0]);
        w.aliases(&[]);
        let e = Ct2Model::parse(w.0, Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x: unknown dtype code 9"), "{e}");

        let mut w = Writer::new("WhisperSpec", 1);
        w.var("x", &[3], 0, &[0; 8]);
        w.aliases(&[]);
        let e = Ct2Model::parse(w.0, Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x: 8 data bytes do not match shape [3]"), "{e}");

        let mut extra = sample();
        extra.extend([1, 2, 3]);
        let e = Ct2Model::parse(extra, Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 unexpected bytes after the end"), "{e}");

        let mut w = Writer::new("WhisperSpec", 0);
        w.aliases(&[("a", "missing")]);
        let e = Ct2Model::parse(w.0, Path::new("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("alias a points to missing variable missing"),
            "{e}"
        );

        let e = Ct2Model::parse(b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec(), Path::new("x.wav"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not supported") && e.contains("is this a CTranslate2 model.bin"),
            "{e}"
        );
    }
}
