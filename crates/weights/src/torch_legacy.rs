//! Reader of PyTorch's legacy (non-zip) checkpoint format.
//!
//! `torch.save(obj, f, _use_new_zipfile_serialization=False)`, the format of
//! checkpoints written before PyTorch 1.6, is five pickles in a row and then
//! raw storages: the magic number, the protocol version (1001), a system-info
//! dict, the object itself (tensors appear as persistent ids naming a storage
//! by key), the list of storage keys, and for each key in that order an i64
//! element count followed by the elements. Only the pickle opcodes torch's
//! pickler emits for nested dicts of tensors are understood; anything else is
//! refused by name. Nothing is imported or executed: classes are names.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Result, WeightsError};

const MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const PROTOCOL: i64 = 1001;

/// A tensor read from a checkpoint, widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements in row-major order.
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Call(Box<Value>, Box<Value>),
    Persistent(Box<Value>),
    Mark,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("unterminated GLOBAL name")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}

fn pop(stack: &mut Vec<Value>) -> std::result::Result<Value, String> {
    stack
        .pop()
        .ok_or_else(|| "pickle stack underflow".to_string())
}

fn pop_mark(stack: &mut Vec<Value>) -> std::result::Result<Vec<Value>, String> {
    let at = stack
        .iter()
        .rposition(|v| *v == Value::Mark)
        .ok_or("no MARK on the pickle stack")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items)
}

fn set_items(target: &mut Value, items: Vec<Value>) -> std::result::Result<(), String> {
    let Value::Dict(d) = target else {
        return Err("SETITEM(S) on something not a dict".into());
    };
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

/// Runs one pickle up to its STOP and returns its value.
fn unpickle(r: &mut Reader<'_>) -> std::result::Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO n
            }
            b'.' => return pop(&mut stack),
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(module, name));
            }
            b'q' => {
                let k = u32::from(r.u8()?);
                memo.insert(k, stack.last().ok_or("BINPUT on empty stack")?.clone());
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(k, stack.last().ok_or("LONG_BINPUT on empty stack")?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    u32::from(r.u8()?)
                } else {
                    r.u32()?
                };
                stack.push(memo.get(&k).cloned().ok_or(format!("memo {k} unset"))?);
            }
            b'(' => stack.push(Value::Mark),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut d = Value::Dict(Vec::new());
                set_items(&mut d, items)?;
                stack.push(d);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("TUPLE on a short stack".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(
                    stack.last_mut().ok_or("SETITEM without a dict")?,
                    vec![k, v],
                )?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(stack.last_mut().ok_or("SETITEMS without a dict")?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("APPEND without a list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("APPENDS without a list".into()),
                }
            }
            b'J' => {
                let v = r.u32()? as i32;
                stack.push(Value::Int(i128::from(v)));
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(i128::from(v)));
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Value::Int(i128::from(v)));
            }
            0x8a => {
                let n = usize::from(r.u8()?);
                if n > 16 {
                    return Err(format!("LONG1 of {n} bytes is too long"));
                }
                let b = r.take(n)?;
                let mut v: i128 = 0;
                for (i, byte) in b.iter().enumerate() {
                    v |= i128::from(*byte) << (8 * i);
                }
                // Two's complement: the top bit of the last byte is the sign.
                if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                    v -= 1i128 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let b = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                stack.push(Value::Float(f64::from_be_bytes(a)));
            }
            b'X' | 0x8c | b'T' | b'U' => {
                let n = match op {
                    b'X' | b'T' => r.u32()? as usize,
                    _ => usize::from(r.u8()?),
                };
                let s = String::from_utf8_lossy(r.take(n)?).into_owned();
                stack.push(Value::Str(s));
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'Q' => {
                let id = pop(&mut stack)?;
                stack.push(Value::Persistent(Box::new(id)));
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                let v = match &callable {
                    Value::Global(m, n) if m == "collections" && n == "OrderedDict" => {
                        Value::Dict(Vec::new())
                    }
                    _ => Value::Call(Box::new(callable), Box::new(args)),
                };
                stack.push(v);
            }
            b'b' => {
                // BUILD sets attributes (an OrderedDict's `_metadata`): not needed.
                pop(&mut stack)?;
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {at} is not one torch's checkpoint writer uses"
                ));
            }
        }
    }
}

struct TensorRef {
    key: String,
    dtype: &'static str,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(as_usize).collect(),
        _ => None,
    }
}

fn tensor_ref(v: &Value) -> Option<TensorRef> {
    let Value::Call(f, args) = v else { return None };
    let (Value::Global(m, n), Value::Tuple(args)) = (f.as_ref(), args.as_ref()) else {
        return None;
    };
    if m == "torch._utils" && n == "_rebuild_parameter" {
        return args.first().and_then(tensor_ref);
    }
    if !(m == "torch._utils" && n == "_rebuild_tensor_v2") || args.len() < 4 {
        return None;
    }
    let Value::Persistent(id) = &args[0] else {
        return None;
    };
    let Value::Tuple(id) = id.as_ref() else {
        return None;
    };
    // ('storage', torch.FloatStorage, key, location, numel[, view_metadata])
    let (Some(Value::Global(_, class)), Some(Value::Str(key))) = (id.get(1), id.get(2)) else {
        return None;
    };
    let dtype = match class.as_str() {
        "FloatStorage" => "f32",
        "HalfStorage" => "f16",
        "DoubleStorage" => "f64",
        "BFloat16Storage" => "bf16",
        _ => "unsupported",
    };
    Some(TensorRef {
        key: key.clone(),
        dtype,
        offset: as_usize(&args[1])?,
        shape: usizes(&args[2])?,
        stride: usizes(&args[3])?,
    })
}

fn collect(prefix: &str, v: &Value, out: &mut Vec<(String, TensorRef)>) {
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                collect(&name, v, out);
            }
        }
        other => {
            if let Some(t) = tensor_ref(other) {
                out.push((prefix.to_string(), t));
            }
        }
    }
}

fn elem_size(dtype: &str) -> usize {
    match dtype {
        "f64" => 8,
        "f32" => 4,
        _ => 2,
    }
}

fn widen(dtype: &str, b: &[u8]) -> f32 {
    match dtype {
        "f64" => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
        "f32" => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        "bf16" => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        _ => half_to_f32(u16::from_le_bytes([b[0], b[1]])),
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m * 2^-24.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Reads every tensor of a legacy checkpoint, named by its path through
/// nested dicts joined with dots (`generator.conv_pre.weight_g`).
pub fn read(path: &Path) -> Result<Vec<(String, LegacyTensor)>> {
    let bytes = std::fs::read(path).map_err(WeightsError::io(path))?;
    read_bytes(&bytes).map_err(|m| WeightsError::format(path, m))
}

fn read_bytes(bytes: &[u8]) -> std::result::Result<Vec<(String, LegacyTensor)>, String> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Err("a zip checkpoint (torch >= 1.6), not the legacy format".into());
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    match unpickle(&mut r)? {
        Value::Int(m) if m as u128 == MAGIC => {}
        _ => return Err("not a torch checkpoint (no magic number)".into()),
    }
    match unpickle(&mut r)? {
        Value::Int(p) if p == i128::from(PROTOCOL) => {}
        other => return Err(format!("protocol version {other:?}, expected {PROTOCOL}")),
    }
    let sys_info = unpickle(&mut r)?;
    if let Value::Dict(items) = &sys_info {
        for (k, v) in items {
            if *k == Value::Str("little_endian".into()) && *v == Value::Bool(false) {
                return Err("written on a big-endian machine".into());
            }
        }
    }
    let root = unpickle(&mut r)?;
    let keys = match unpickle(&mut r)? {
        Value::List(k) => k,
        _ => return Err("storage key list missing".into()),
    };
    let mut refs = Vec::new();
    collect("", &root, &mut refs);
    if refs.is_empty() {
        return Err("no tensors in the checkpoint".into());
    }
    let dtype_of: HashMap<&str, &str> = refs
        .iter()
        .map(|(_, t)| (t.key.as_str(), t.dtype))
        .collect();
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    for k in keys {
        let Value::Str(key) = k else {
            return Err("storage key is not a string".into());
        };
        let b = r.take(8)?;
        let n = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize;
        let dtype = dtype_of.get(key.as_str()).copied().unwrap_or("f32");
        if dtype == "unsupported" {
            return Err(format!(
                "storage {key} has a type this reader does not widen to f32"
            ));
        }
        let size = elem_size(dtype);
        let raw = r.take(n.checked_mul(size).ok_or("storage size overflows")?)?;
        storages.insert(
            key,
            raw.chunks_exact(size).map(|c| widen(dtype, c)).collect(),
        );
    }
    let mut out = Vec::with_capacity(refs.len());
    for (name, t) in refs {
        let s = storages
            .get(&t.key)
            .ok_or_else(|| format!("{name}: storage {} not in the file", t.key))?;
        let numel: usize = t.shape.iter().product();
        // Gather through the strides (checkpoints may hold views).
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let off = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(
                *s.get(off)
                    .ok_or_else(|| format!("{name}: reads past its storage"))?,
            );
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out.push((
            name,
            LegacyTensor {
                shape: t.shape,
                data,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn refuses_what_is_not_a_legacy_checkpoint() {
        let e = read_bytes(b"PK\x03\x04rest").unwrap_err();
        assert!(e.contains("zip"), "{e}");
        // A pickle of the integer 7: no magic number.
        let e = read_bytes(b"\x80\x02K\x07.").unwrap_err();
        assert!(e.contains("magic"), "{e}");
        // An opcode torch never writes (INST).
        let e = read_bytes(b"\x80\x02i").unwrap_err();
        assert!(e.contains("0x69"), "{e}");
    }
}
