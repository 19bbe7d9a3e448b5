//! Just enough of the ONNX protobuf to take weights out of a model: the
//! graph's nodes (name, operator, inputs) and its initializers. Decoded
//! straight from the wire format; fields this reader does not need are
//! skipped, as protobuf allows.

use std::path::Path;

use crate::error::{Result, WeightsError};

/// A graph node.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// Its name (a module path such as `/flow/flows.6/enc/in_layers.0/Conv`).
    pub name: String,
    /// The operator.
    pub op_type: String,
    /// Input value names.
    pub inputs: Vec<String>,
    /// Integer attributes (`dilations`, `strides`, `pads`, `group`), by name.
    pub attrs: Vec<(String, Vec<i64>)>,
}

/// An initializer, widened to f32.
#[derive(Debug, Clone, Default)]
pub struct Initializer {
    /// Its name.
    pub name: String,
    /// Dimensions.
    pub dims: Vec<usize>,
    /// ONNX element type (1 = float, 7 = int64, …).
    pub data_type: i32,
    /// Elements, when the type is float; empty otherwise.
    pub data: Vec<f32>,
}

/// The parts of a model this reader keeps.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Nodes in graph order.
    pub nodes: Vec<Node>,
    /// Initializers.
    pub initializers: Vec<Initializer>,
}

struct Wire<'a> {
    b: &'a [u8],
    at: usize,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Wire<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }
    fn varint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.varint()? as usize;
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    /// The next (field, wire type).
    fn key(&mut self) -> R<(u64, u8)> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }
    fn skip(&mut self, wire: u8) -> R<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => self.at += 8,
            2 => {
                self.bytes()?;
            }
            5 => self.at += 4,
            w => return Err(format!("wire type {w} is not supported")),
        }
        if self.at > self.b.len() {
            return Err("truncated field".into());
        }
        Ok(())
    }
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn node(b: &[u8]) -> R<Node> {
    let mut w = Wire::new(b);
    let mut n = Node::default();
    while !w.done() {
        match w.key()? {
            (1, 2) => n.inputs.push(string(w.bytes()?)),
            (3, 2) => n.name = string(w.bytes()?),
            (4, 2) => n.op_type = string(w.bytes()?),
            (5, 2) => {
                if let Some(a) = attribute(w.bytes()?)? {
                    n.attrs.push(a);
                }
            }
            (_, t) => w.skip(t)?,
        }
    }
    Ok(n)
}

/// An integer or integer-list attribute; others are `None`.
fn attribute(b: &[u8]) -> R<Option<(String, Vec<i64>)>> {
    let mut w = Wire::new(b);
    let mut name = String::new();
    let mut ints = Vec::new();
    while !w.done() {
        match w.key()? {
            (1, 2) => name = string(w.bytes()?),
            (3, 0) | (8, 0) => ints.push(w.varint()? as i64),
            (8, 2) => {
                let mut p = Wire::new(w.bytes()?);
                while !p.done() {
                    ints.push(p.varint()? as i64);
                }
            }
            (_, t) => w.skip(t)?,
        }
    }
    Ok((!ints.is_empty()).then_some((name, ints)))
}

fn tensor(b: &[u8]) -> R<Initializer> {
    let mut w = Wire::new(b);
    let mut t = Initializer::default();
    let mut raw: &[u8] = &[];
    let mut floats = Vec::new();
    while !w.done() {
        match w.key()? {
            (1, 0) => t.dims.push(w.varint()? as usize),
            (1, 2) => {
                let mut p = Wire::new(w.bytes()?);
                while !p.done() {
                    t.dims.push(p.varint()? as usize);
                }
            }
            (2, 0) => t.data_type = w.varint()? as i32,
            (4, 2) => floats.extend(
                w.bytes()?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            (4, 5) => {
                let s = w.at;
                w.skip(5)?;
                let c = &w.b[s..s + 4];
                floats.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            (8, 2) => t.name = string(w.bytes()?),
            (9, 2) => raw = w.bytes()?,
            (13, 2) | (14, 0) => {
                return Err(format!("tensor {} keeps its data outside the file", t.name));
            }
            (_, k) => w.skip(k)?,
        }
    }
    if t.data_type == 1 {
        t.data = if raw.is_empty() {
            floats
        } else {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let n: usize = t.dims.iter().product();
        if t.data.len() != n {
            return Err(format!(
                "tensor {} holds {} floats for dims {:?}",
                t.name,
                t.data.len(),
                t.dims
            ));
        }
    }
    Ok(t)
}

fn graph(b: &[u8]) -> R<Graph> {
    let mut w = Wire::new(b);
    let mut g = Graph::default();
    while !w.done() {
        match w.key()? {
            (1, 2) => g.nodes.push(node(w.bytes()?)?),
            (5, 2) => g.initializers.push(tensor(w.bytes()?)?),
            (_, t) => w.skip(t)?,
        }
    }
    Ok(g)
}

/// Reads a model's graph (ModelProto field 7).
pub fn read(path: &Path) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(WeightsError::io(path))?;
    let mut w = Wire::new(&bytes);
    let mut out = None;
    let r: R<()> = (|| {
        while !w.done() {
            match w.key()? {
                (7, 2) => out = Some(graph(w.bytes()?)?),
                (_, t) => w.skip(t)?,
            }
        }
        Ok(())
    })();
    r.map_err(|m| WeightsError::format(path, format!("not a readable ONNX model: {m}")))?;
    out.ok_or_else(|| WeightsError::format(path, "an ONNX model without a graph"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, wire: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((n << 3) | wire) as u8];
        if wire == 2 {
            v.push(payload.len() as u8);
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_nodes_and_float_initializers() {
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let mut t = field(1, 0, &[2]);
        t.extend(field(2, 0, &[1]));
        t.extend(field(8, 2, b"w"));
        t.extend(field(9, 2, &raw));
        let mut n = field(1, 2, b"x");
        n.extend(field(1, 2, b"w"));
        n.extend(field(3, 2, b"/a/Conv"));
        n.extend(field(4, 2, b"Conv"));
        let mut g = field(1, 2, &n);
        g.extend(field(5, 2, &t));
        let mut m = field(1, 0, &[8]); // ir_version, skipped
        m.extend(field(7, 2, &g));
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &m).unwrap();
        let g = read(tmp.path()).unwrap();
        assert_eq!(g.nodes[0].op_type, "Conv");
        assert_eq!(g.nodes[0].inputs, vec!["x", "w"]);
        assert_eq!(g.initializers[0].data, vec![1.5, -2.0]);
        std::fs::write(tmp.path(), &m[..m.len() - 3]).unwrap();
        assert!(
            read(tmp.path())
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
