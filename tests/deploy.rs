//! The Kubernetes deliverables: the Helm chart (lint, render, schema
//! validation for Kubernetes 1.30+), what it renders against what the binaries
//! expect, the plain manifests in deploy/ kept in step with it, and the
//! Dockerfile against the workspace's binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.is_file(),
        "{} is missing; run scripts/setup.sh",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.current_dir(root()).output().expect("the tool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const CHART: &str = "helm/nexus-fleet";
const VALUES: [&str; 3] = ["default", "gpu", "keda"];

fn render(values: &str) -> String {
    run(Command::new(tool(".tools/bin/helm")).args([
        "template",
        "nexus-fleet",
        CHART,
        "--namespace",
        "nexus",
        "--include-crds",
        "-f",
        &format!("{CHART}/ci/{values}-values.yaml"),
    ]))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("<from>").to_owned(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs helm and kubernetes-validate (scripts/setup.sh)"]
fn the_chart_lints_renders_and_validates_for_default_gpu_and_keda_values() {
    for v in VALUES {
        let values = format!("{CHART}/ci/{v}-values.yaml");
        run(Command::new(tool(".tools/bin/helm")).args(["lint", "--strict", CHART, "-f", &values]));
        let out = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(out.path(), render(v)).unwrap();
        for k8s in ["1.30.0", "1.33.0"] {
            let report = run(Command::new(tool(".venv/bin/kubernetes-validate")).args([
                "--strict",
                "--quiet",
                "-k",
                k8s,
                out.path().to_str().unwrap(),
            ]));
            // Custom resources of other projects (KEDA, the Prometheus operator)
            // have no schema there; they are checked below instead.
            for line in report.lines() {
                assert!(
                    line.contains("Couldn't find schema for kind ScaledObject")
                        || line.contains("Couldn't find schema for kind ServiceMonitor"),
                    "{v} values, Kubernetes {k8s}: {line}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs helm (scripts/setup.sh)"]
fn admin_ports_and_an_open_api_stay_inside_the_cluster() {
    let with = |sets: &[&str]| {
        let mut cmd = Command::new(tool(".tools/bin/helm"));
        cmd.args(["template", "nexus-fleet", CHART, "--namespace", "nexus"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        docs(&run(&mut cmd))
    };
    let ports = |svc: &Value| -> Vec<u64> {
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect()
    };
    let rules = |d: &[Value]| -> Vec<Value> {
        find(d, "NetworkPolicy", "nexus-fleet-ingest")["spec"]["ingress"]
            .as_array()
            .unwrap()
            .clone()
    };
    let in_cluster = serde_json::json!([{"namespaceSelector": {}}]);
    // No keys: the public Service carries the API alone, the admin port has a
    // cluster-internal Service, and both take traffic from inside the cluster only.
    let open = with(&[]);
    let public = find(&open, "Service", "nexus-fleet-ingest");
    assert!(!ports(public).contains(&9090), "{public}");
    let admin = find(&open, "Service", "nexus-fleet-ingest-admin");
    assert_eq!(ports(admin), [9090]);
    assert_eq!(admin["spec"]["type"], "ClusterIP");
    for rule in rules(&open) {
        assert_eq!(rule["from"], in_cluster, "{rule}");
    }
    // With keys the API is public; the admin port still is not, and every
    // process gets the admin token that PUT /log needs.
    let keyed = with(&["auth.keysToml=x", "admin.token=a-token-of-16-chars"]);
    let r = rules(&keyed);
    assert!(r[0]["from"].is_null(), "{}", r[0]);
    assert_eq!(r[1]["from"], in_cluster);
    assert_eq!(r[1]["ports"][0]["port"], 9090);
    for dep in of_kind(&keyed, "Deployment") {
        let name = dep["metadata"]["name"].as_str().unwrap();
        if name.ends_with("-operator") {
            continue;
        }
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env(c).get("NEXUS_ADMIN_TOKEN").map(String::as_str),
            Some("<from>"),
            "{name}"
        );
    }
    let secret = find(&keyed, "Secret", "nexus-fleet-admin-token");
    assert_eq!(secret["stringData"]["token"], "a-token-of-16-chars");
}

#[test]
#[ignore = "needs helm (scripts/setup.sh)"]
fn the_rendered_fleet_matches_what_the_binaries_expect() {
    let grace = nexus_core::grpc::DrainOptions::default().grace.as_secs();
    for v in VALUES {
        let d = docs(&render(v));
        for dep in of_kind(&d, "Deployment") {
            let name = dep["metadata"]["name"].as_str().unwrap();
            let pod = &dep["spec"]["template"]["spec"];
            let tgp = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                tgp > grace,
                "{name}: grace period {tgp} s is not above the drain grace {grace} s"
            );
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
            for c in pod["containers"].as_array().unwrap() {
                assert_eq!(
                    c["securityContext"]["allowPrivilegeEscalation"], false,
                    "{name}"
                );
                let ports: Vec<&Value> = c["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| &p["containerPort"])
                    .collect();
                if let Some(port) = c["readinessProbe"]["grpc"]["port"].as_u64() {
                    assert!(
                        ports.iter().any(|p| p.as_u64() == Some(port)),
                        "{name}: gRPC probe on {port}, not a container port"
                    );
                    let listen = env(c)["NEXUS_LISTEN"].clone();
                    assert!(
                        listen.ends_with(&format!(":{port}")),
                        "{name}: listens on {listen}, probed on {port}"
                    );
                }
            }
        }
        // The CRD in the chart is the one the operator's types describe.
        let crd = find(
            &d,
            "CustomResourceDefinition",
            "transcriptionjobs.speech.nexus-fleet.dev",
        );
        let ours = docs(&nexus_operator::crd_yaml().unwrap());
        assert_eq!(
            crd, &ours[0],
            "the chart's CRD is stale: run scripts/render-deploy.sh"
        );

        let gpu = v == "gpu";
        for stage in ["encoder", "decoder"] {
            let dep = find(&d, "Deployment", &format!("nexus-fleet-{stage}"));
            let pod = &dep["spec"]["template"]["spec"];
            let c = &pod["containers"][0];
            assert_eq!(
                c["image"].as_str().unwrap().contains("-cuda:"),
                gpu,
                "{v} {stage}"
            );
            assert_eq!(env(c)["NEXUS_DEVICE"], if gpu { "cuda" } else { "cpu" });
            assert_eq!(
                c["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
                gpu.then_some(1),
                "{v} {stage}"
            );
            assert_eq!(pod["tolerations"].is_array(), gpu, "{v} {stage}");
            // Its weights are pulled before it starts.
            let init = &pod["initContainers"][0];
            assert_eq!(init["args"][0], "models");
            assert_eq!(init["args"][2], "base");
        }

        let keda = v == "keda";
        assert_eq!(
            of_kind(&d, "HorizontalPodAutoscaler").is_empty(),
            keda,
            "{v}"
        );
        assert_eq!(of_kind(&d, "ScaledObject").is_empty(), !keda, "{v}");
        if keda {
            let keys = nexus_bus::Keys::new("nexus").unwrap();
            for (target, stage, group, min) in [
                ("encoder", "audio", "encoder", 1),
                ("decoder", "encoded", "decoder", 1),
                ("vocoder", "synthesize", "vocoder", 1),
                ("batch", "jobs", "jobs", 0),
            ] {
                let so = find(&d, "ScaledObject", &format!("nexus-fleet-{target}"));
                assert_eq!(so["spec"]["minReplicaCount"], min, "{target}");
                let trig = &so["spec"]["triggers"][0];
                assert_eq!(trig["type"], "redis-streams");
                assert_eq!(
                    trig["metadata"]["stream"],
                    keys.stage_stream(stage, 0),
                    "{target}"
                );
                assert_eq!(trig["metadata"]["consumerGroup"], group, "{target}");
                assert!(
                    trig["metadata"]["lagCount"]
                        .as_str()
                        .unwrap()
                        .parse::<u32>()
                        .unwrap()
                        > 0
                );
                // KEDA reads the address from the target's container environment.
                let dep = find(&d, "Deployment", &format!("nexus-fleet-{target}"));
                let from = trig["metadata"]["addressFromEnv"].as_str().unwrap();
                assert_eq!(
                    env(&dep["spec"]["template"]["spec"]["containers"][0])[from],
                    "nexus-fleet-redis:6379"
                );
            }
            let dec = find(&d, "ScaledObject", "nexus-fleet-decoder");
            assert!(
                dec["spec"]["triggers"][1]["metadata"]["query"]
                    .as_str()
                    .unwrap()
                    .contains("nexus_decoder_slots_used")
            );
            assert!(!of_kind(&d, "ServiceMonitor").is_empty());
            // WebRTC media ports reach the pods through the Service.
            let svc = find(&d, "Service", "nexus-fleet-ingest");
            let udp = svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["protocol"] == "UDP")
                .count();
            assert_eq!(udp, 16);
        }
        assert_eq!(of_kind(&d, "PodDisruptionBudget").len(), 4, "{v}");
        // The vocoder pulls its voice and serves what ingest offers.
        let voc = find(&d, "Deployment", "nexus-fleet-vocoder");
        let pod = &voc["spec"]["template"]["spec"];
        assert_eq!(
            pod["initContainers"][0]["args"][2],
            "piper-en-us-joe-medium"
        );
        assert_eq!(
            env(&pod["containers"][0])["NEXUS_VOICES"],
            "piper-en-us-joe-medium"
        );
        let ing = find(&d, "Deployment", "nexus-fleet-ingest");
        assert_eq!(
            env(&ing["spec"]["template"]["spec"]["containers"][0])["NEXUS_VOICES"],
            "piper-en-us-joe-medium"
        );
        let redis = find(&d, "StatefulSet", "nexus-fleet-redis");
        assert!(
            redis["spec"]["template"]["spec"]["containers"][0]["args"]
                .to_string()
                .contains("appendonly")
        );
    }
}

#[test]
#[ignore = "needs helm and kubectl (scripts/setup.sh)"]
fn deploy_manifests_are_in_step_with_the_chart() {
    let base = std::fs::read_to_string(root().join("deploy/base/nexus-fleet.yaml")).unwrap();
    let body = base.split_once('\n').map(|(_, b)| b).unwrap();
    assert!(
        body == render("default"),
        "deploy/base is stale: run scripts/render-deploy.sh"
    );
    let kustomize = |overlay: &str| {
        docs(&run(Command::new(tool(".tools/bin/kubectl"))
            .args(["kustomize", &format!("deploy/overlays/{overlay}")])))
    };
    for (overlay, values) in [("cpu", "default"), ("gpu", "gpu")] {
        let got = kustomize(overlay);
        let want = docs(&render(values));
        assert_eq!(got.len(), want.len(), "{overlay}");
        for w in &want {
            let (kind, name) = (
                w["kind"].as_str().unwrap(),
                w["metadata"]["name"].as_str().unwrap(),
            );
            let mut w = w.clone();
            if kind != "CustomResourceDefinition" && !kind.starts_with("Cluster") {
                w["metadata"]["namespace"] = "nexus".into();
            }
            assert_eq!(
                norm(find(&got, kind, name)),
                norm(&w),
                "deploy/overlays/{overlay}: {kind} {name} differs from the chart with {values} values"
            );
        }
    }
}

/// Numbers as kustomize writes them (0.0 becomes 0), and environment lists in
/// name order (a strategic-merge patch moves the variables it sets first).
fn norm(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Value::from(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) => a.iter().map(norm).collect(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let mut v = norm(v);
                if let (true, Value::Array(a)) = (k == "env", &mut v) {
                    a.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
                }
                (k.clone(), v)
            })
            .collect(),
        _ => v.clone(),
    }
}

/// The arms of the first `case "$SERVICE" in` table after `marker` in the
/// Dockerfile: each arm's service names and what follows `)` up to `;;`.
fn case_arms<'a>(text: &'a str, marker: &str) -> Vec<(Vec<&'a str>, &'a str)> {
    let from = text
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the Dockerfile"));
    let table = &text[from..];
    let table = &table[table
        .find("case \"$SERVICE\" in")
        .expect("a case on $SERVICE")..];
    let table = &table[..table.find("esac").expect("esac")];
    table
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_end_matches('\\').trim();
            let (names, rest) = l.split_once(") ")?;
            let names: Vec<&str> = names.split('|').collect();
            names
                .iter()
                .all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase()))
                .then(|| (names, rest.trim_end_matches(";;").trim()))
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_every_service_the_workspace_has() {
    let meta: Value = serde_json::from_str(&run(Command::new(env!("CARGO")).args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ])))
    .unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let build = case_arms(&text, "FROM toolchain-${FLAVOR} AS build");
    let cuda = case_arms(&text, "if [ \"$FLAVOR\" = cuda ]");
    let services: Vec<String> = std::fs::read_dir(root().join("services"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
        .collect();
    let mut built = Vec::new();
    for service in &services {
        let dir = root().join("services").join(service);
        let stray: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .filter(|n| n.starts_with("Dockerfile"))
            .collect();
        assert!(
            stray.is_empty(),
            "{service}: {stray:?} beside the one Dockerfile"
        );
        let (_, arm) = build
            .iter()
            .find(|(names, _)| names.contains(&service.as_str()))
            .unwrap_or_else(|| panic!("the Dockerfile does not build {service}"));
        let word = |key: &str| {
            arm.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("{service}: no {key} in {arm:?}"))
                .replace("$SERVICE", service)
        };
        let (pkg, bin) = (word("pkg="), word("bin="));
        let p = packages
            .iter()
            .find(|p| p["name"] == pkg.as_str())
            .unwrap_or_else(|| panic!("{service}: no package {pkg}"));
        let manifest = Path::new(p["manifest_path"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_owned();
        assert_eq!(
            manifest.canonicalize().unwrap(),
            dir.canonicalize().unwrap(),
            "{service}: builds another service's package"
        );
        assert!(
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == bin.as_str() && t["kind"][0] == "bin"),
            "{service}: {pkg} has no binary {bin}"
        );
        built.push(format!("nexus-fleet/{bin}"));
        if let Some((_, arm)) = cuda
            .iter()
            .find(|(names, _)| names.contains(&service.as_str()))
        {
            let feature = arm.strip_prefix("features=").expect("features=");
            assert!(
                p["features"][feature].is_array(),
                "{service}: {pkg} has no feature {feature}"
            );
            built.push(format!("nexus-fleet/{bin}-cuda"));
        }
    }
    // Every arm names services that exist.
    for (names, _) in build.iter().chain(&cuda) {
        for n in names {
            assert!(
                services.iter().any(|s| s == n),
                "the Dockerfile names {n}, which services/ lacks"
            );
        }
    }
    // Multi-stage, and the image runs its binary as a user other than root.
    let last = text.rsplit("\nFROM ").next().unwrap();
    assert!(
        last.contains("COPY --from=build /out/ /usr/local/bin/"),
        "{last}"
    );
    assert!(
        text.contains("ln -s \"$bin\" /out/entrypoint")
            && last.contains("ENTRYPOINT [\"/usr/local/bin/entrypoint\"]"),
        "the entrypoint is not the built binary"
    );
    let user = last
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER in the runtime stage");
    assert!(
        !user.contains("root") && !user.starts_with("USER 0"),
        "{user}"
    );
    // Every image the chart runs is one the Dockerfile builds.
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join(CHART).join("values.yaml")).unwrap(),
    )
    .unwrap();
    for key in ["ingest", "encoder", "decoder", "vocoder", "operator", "cli"] {
        let repo = values["image"][key].as_str().unwrap();
        assert!(
            built.iter().any(|b| b == repo),
            "image {repo} is not built by the Dockerfile (built: {built:?})"
        );
        if key == "encoder" || key == "decoder" {
            let cuda = format!("{repo}{}", values["image"]["cudaSuffix"].as_str().unwrap());
            assert!(built.contains(&cuda), "no CUDA build of {cuda}");
        }
    }
}

#[test]
fn the_example_transcription_job_is_valid() {
    let text =
        std::fs::read_to_string(root().join("deploy/examples/transcriptionjob.yaml")).unwrap();
    let job: nexus_operator::TranscriptionJob = serde_saphyr::from_str(&text).unwrap();
    job.spec.validate(0).unwrap();
    assert_eq!(job.spec.formats().len(), 3);
}
