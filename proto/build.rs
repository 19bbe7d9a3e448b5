//! Compiles `nexus/**.proto` with protox (pure Rust, no system protoc) and
//! writes the descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "nexus/speech/v1/audio.proto",
    "nexus/speech/v1/recognition.proto",
    "nexus/speech/v1/translation.proto",
    "nexus/speech/v1/synthesis.proto",
    "nexus/speech/v1/jobs.proto",
    "nexus/speech/v1/models.proto",
    "nexus/pipeline/v1/pipeline.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("nexus_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".nexus")
        .compile_fds(fds)?;
    Ok(())
}
