//! The system under load: an address given, or processes this tool starts
//! (`nexus serve`, every stage in one process; or the three stage binaries
//! on Redis), found beside this binary.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// Processes started for a run, stopped (SIGTERM, then kill) on drop.
pub struct Target {
    /// The public gRPC address.
    pub addr: SocketAddr,
    /// The HTTP API (the Realtime WebSocket), when known.
    pub http: Option<SocketAddr>,
    /// Admin ports whose `/metrics` hold the encoder's and decoder's model time.
    pub admin: Vec<SocketAddr>,
    children: Vec<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.children {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the binary's folder")?;
    let p = dir.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} is missing; build the workspace's binaries (cargo build --release --bins)",
        p.display()
    );
    Ok(p)
}

fn spawn(program: &str, args: &[String]) -> anyhow::Result<Child> {
    Command::new(sibling(program)?)
        .args(args)
        .env(
            "NEXUS_LOG",
            std::env::var("NEXUS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {program}"))
}

/// An address someone else serves.
pub fn external(addr: SocketAddr, http: Option<SocketAddr>, admin: Vec<SocketAddr>) -> Target {
    Target {
        addr,
        http,
        admin,
        children: Vec::new(),
    }
}

/// `nexus serve`: every stage in one process over in-memory channels, with
/// the text translation model `translation` when given.
pub fn embedded(model: &str, translation: Option<&str>) -> anyhow::Result<Target> {
    let (addr, admin, http) = (free()?, free()?, free()?);
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &addr.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--http-listen",
        &http.to_string(),
        "--model",
        model,
        // Admission must not be what limits a level: the run finds the number.
        "--decoder-sessions",
        "512",
        "--ingest-sessions",
        "512",
        "--drain-grace-s",
        "5",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(t) = translation {
        args.extend(["--translation-model".into(), t.to_owned()]);
    }
    Ok(Target {
        addr,
        http: Some(http),
        admin: vec![admin],
        children: vec![spawn("nexus", &args)?],
    })
}

/// The three stage processes on Redis, under a key prefix of their own;
/// the decoder with the text translation model `translation` when given.
pub fn fleet(model: &str, translation: Option<&str>, redis: &str) -> anyhow::Result<Target> {
    let prefix = format!("load{}", uuid::Uuid::new_v4().simple());
    let common = |admin: SocketAddr| -> Vec<String> {
        [
            "--redis",
            redis,
            "--model",
            model,
            "--key-prefix",
            &prefix[..20],
            "--admin-listen",
            &admin.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let (enc_admin, dec_admin, ing_admin) = (free()?, free()?, free()?);
    let mut enc = common(enc_admin);
    enc.extend(["--listen".into(), free()?.to_string()]);
    let mut dec = common(dec_admin);
    dec.extend([
        "--listen".into(),
        free()?.to_string(),
        "--decoder-sessions".into(),
        "512".into(),
    ]);
    if let Some(t) = translation {
        dec.extend(["--translation-model".into(), t.to_owned()]);
    }
    let (addr, http) = (free()?, free()?);
    let mut ing = common(ing_admin);
    ing.extend([
        "--listen".into(),
        addr.to_string(),
        "--http-listen".into(),
        http.to_string(),
        "--ingest-sessions".into(),
        "512".into(),
    ]);
    let mut children = vec![spawn("nexus-encoder", &enc)?];
    children.push(spawn("nexus-decoder", &dec)?);
    children.push(spawn("nexus-ingest", &ing)?);
    Ok(Target {
        addr,
        http: Some(http),
        admin: vec![enc_admin, dec_admin],
        children,
    })
}

/// WhisperLive's server, the live anchor (loadtest/anchors/whisperlive.py),
/// started with `python` on a free port over the CTranslate2 weights in
/// `model`, admitting as many clients as the largest level. Its CPU threads
/// are capped at the machine's cores, as the fleet's are.
pub fn whisperlive(
    python: &std::path::Path,
    model: &std::path::Path,
    levels: &[usize],
) -> anyhow::Result<Target> {
    const SCRIPT: &str = include_str!("../anchors/whisperlive.py");
    anyhow::ensure!(
        model.join("model.bin").is_file(),
        "{} holds no CTranslate2 model.bin: pull the scenario's model (nexus models pull) or give --anchor-model",
        model.display()
    );
    let script = std::env::temp_dir().join(format!(
        "nexus-loadtest-whisperlive-{}.py",
        std::process::id()
    ));
    std::fs::write(&script, SCRIPT)?;
    let addr = free()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clients = levels.iter().copied().max().unwrap_or(1).max(1) + 1;
    let child = Command::new(python)
        .arg(&script)
        .arg(addr.port().to_string())
        .arg(model)
        .arg(clients.to_string())
        .env("OMP_NUM_THREADS", cores.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting WhisperLive with {}", python.display()))?;
    Ok(Target {
        addr,
        http: None,
        admin: Vec::new(),
        children: vec![child],
    })
}

/// Sums of the model-time histograms on the admin ports:
/// (encoder seconds, decoder seconds).
pub async fn model_seconds(admin: &[SocketAddr]) -> (f64, f64) {
    let mut enc = 0.0;
    let mut dec = 0.0;
    for a in admin {
        let Ok(text) = scrape(*a).await else { continue };
        for line in text.lines() {
            let Some((name, v)) = line.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = v.parse().unwrap_or(0.0);
            match name {
                "nexus_encoder_inference_seconds_sum" => enc += v,
                "nexus_decoder_inference_seconds_sum" => dec += v,
                _ => {}
            }
        }
    }
    (enc, dec)
}

async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
