//! `crdgen`: prints the TranscriptionJob CustomResourceDefinition as YAML
//! (`crdgen > helm/nexus-fleet/crds/transcriptionjobs.yaml`).

fn main() -> anyhow::Result<()> {
    print!("{}", nexus_operator::crd_yaml()?);
    Ok(())
}
