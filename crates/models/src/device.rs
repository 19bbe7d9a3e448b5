//! Which device models run on.

use candle_core::Device;

use crate::{ModelError, Result};

/// Parses a device name: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device in
/// a build without the `cuda` feature is refused with a message saying so.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad(name))?,
        None => return Err(bad(name)),
    };
    if !cfg!(feature = "cuda") {
        return Err(ModelError::Load(format!(
            "device {name:?}: this build has no CUDA support; build with `--features cuda` (the -cuda images) or use cpu"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Load(format!(
            "device {name:?} cannot be opened: {e}; an NVIDIA GPU and its driver must be visible here (nvidia-smi lists them)"
        ))
    })
}

fn bad(name: &str) -> ModelError {
    ModelError::Load(format!("device {name:?} is not one of cpu, cuda, cuda:N"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_say_why_not() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda1", ""] {
            let e = parse_device(bad).expect_err(bad).to_string();
            assert!(e.contains("not one of cpu, cuda, cuda:N"), "{e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:0").expect_err("no cuda").to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
