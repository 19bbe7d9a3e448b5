//! Helpers shared by the end-to-end tests.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A listener on a free loopback port.
pub async fn bind_local() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// A client channel to a server on `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// Fleet processes for end-to-end tests: real binaries, real Redis.
pub mod fleet {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
    use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
    use nexus_proto::speech::*;
    use tonic::Status;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    /// A binary of this workspace, built beside the test (`cargo nextest run
    /// --workspace` builds every binary first).
    pub fn bin(name: &str) -> PathBuf {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/<profile>/deps");
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing; build it with `cargo build --workspace --bins`",
            path.display()
        );
        path
    }

    /// The model the fleet tests serve.
    pub const MODEL: &str = "tiny.en";

    /// The Redis the tests use.
    pub fn redis_url() -> String {
        std::env::var("NEXUS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// Where `scripts/fetch-testdata.sh` put the test speech.
    pub fn testdata() -> PathBuf {
        std::env::var_os("NEXUS_TESTDATA").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/testdata"),
            PathBuf::from,
        )
    }

    /// Three LibriVox utterances with pauses between them: 17 s of 16 kHz mono.
    pub fn speech() -> Vec<f32> {
        let mut out = vec![0.0; 8_000];
        for id in ["0870", "0880", "0890"] {
            let path = testdata().join(format!(
                "librivox/sense_and_sensibility_01_austen_64kb-{id}.wav"
            ));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.extend(model_rate(bytes));
            out.extend(std::iter::repeat_n(0.0, 20_000));
        }
        out
    }

    /// A WAV file's speech as the model hears it: 16 kHz mono samples.
    pub fn model_rate(wav: Vec<u8>) -> Vec<f32> {
        let audio = nexus_audio::decode_bytes(wav, Some("wav"), &Default::default())
            .expect("test speech decodes");
        nexus_audio::to_model_rate(&audio.channels, audio.sample_rate)
            .expect("test speech resamples")
    }

    /// A key prefix of its own for one test in this process.
    pub fn prefix(test: &str) -> String {
        format!("t{}{test}", std::process::id())
    }

    /// `nexus serve` for one role on Redis, serving [`MODEL`].
    pub fn stage(name: &str, role: &str, redis: &str, prefix: &str, extra: &[&str]) -> Proc {
        let mut args = vec![
            "serve",
            "--redis",
            redis,
            "--role",
            role,
            "--model",
            MODEL,
            "--key-prefix",
            prefix,
        ];
        if !extra.contains(&"--http-listen") {
            args.extend_from_slice(&["--http-listen", "none"]);
        }
        args.extend_from_slice(extra);
        Proc::start(name, "nexus", &args)
    }

    /// The Python of `.venv`, where `scripts/setup.sh` installs the
    /// independent clients (openai, websockets, srt, webvtt-py).
    pub fn python() -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        assert!(
            p.exists(),
            "{} is missing: scripts/setup.sh installs the Python test clients",
            p.display()
        );
        p
    }

    /// An API keys file in `dir` giving each `(tenant, key)` its tenant.
    pub fn keys_file(dir: &std::path::Path, keys: &[(&str, &str)]) -> PathBuf {
        let mut toml = String::new();
        for (tenant, key) in keys {
            let out = std::process::Command::new(bin("nexus"))
                .args(["keys", "hash", key])
                .output()
                .expect("nexus keys hash runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            toml += &format!(
                "[[keys]]\ntenant = \"{tenant}\"\nsha256 = \"{}\"\n\n",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        let path = dir.join("keys.toml");
        std::fs::write(&path, toml).expect("keys file written");
        path
    }

    /// A free loopback port (bound, read, released).
    pub fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    /// `n` distinct free loopback ports: all held until every one is read
    /// (one after another, a released port can come back at once).
    pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
        let held: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        held.iter().map(|l| l.local_addr().expect("addr")).collect()
    }

    /// Log lines a process shows when the test holding it fails.
    const PANIC_LOG_LINES: usize = 120;

    /// A running process whose stderr is collected; killed when dropped.
    pub struct Proc {
        /// Its name in test output.
        pub name: String,
        /// Its health or API address.
        pub addr: SocketAddr,
        child: Child,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Proc {
        /// The names of the process's threads (Linux: `/proc/PID/task/*/comm`).
        pub fn thread_names(&self) -> Vec<String> {
            let dir = format!("/proc/{}/task", self.child.id());
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{dir}: {e}"))
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        }

        /// Starts `program` with `args` plus `--listen ADDR` on a free port.
        pub fn start(name: &str, program: &str, args: &[&str]) -> Self {
            let addr = free_addr();
            let mut child = Command::new(bin(program))
                .args(args)
                .arg("--listen")
                .arg(addr.to_string())
                .env("NEXUS_LOG", "info,nexus_fleet=debug")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {program}: {e}"));
            let log = Arc::new(Mutex::new(Vec::new()));
            let stderr = child.stderr.take().expect("piped stderr");
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
            Self {
                name: name.to_owned(),
                addr,
                child,
                log,
            }
        }

        /// `nexus serve` of [`MODEL`] without its HTTP API, its admin port
        /// on `admin`, plus `extra` options.
        pub fn serve(admin: &str, extra: &[&str]) -> Self {
            let mut args = vec![
                "serve",
                "--model",
                MODEL,
                "--http-listen",
                "none",
                "--admin-listen",
                admin,
            ];
            args.extend_from_slice(extra);
            Self::start("serve", "nexus", &args)
        }

        /// Lines logged so far.
        pub fn log(&self) -> Vec<String> {
            self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Waits until the process reports SERVING on its health endpoint.
        pub async fn wait_serving(&mut self, timeout: Duration) {
            let t0 = Instant::now();
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "{} exited with {status} before serving:\n{}",
                        self.name,
                        self.log().join("\n")
                    );
                }
                if let Ok(ch) = super::connect(self.addr).await
                    && let Ok(r) = HealthClient::new(ch)
                        .check(HealthCheckRequest::default())
                        .await
                    && r.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
                assert!(
                    t0.elapsed() < timeout,
                    "{} not serving after {timeout:?}:\n{}",
                    self.name,
                    self.log().join("\n")
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// SIGKILL: no drain, no goodbye.
        pub fn kill9(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// The process's peak resident memory so far (VmHWM), in bytes.
        pub fn peak_rss(&self) -> u64 {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .expect("the process's status is readable");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .expect("VmHWM in /proc/PID/status")
                * 1024
        }

        /// The process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Waits for the process to exit on its own.
        pub fn wait(&mut self) -> std::process::ExitStatus {
            self.child.wait().expect("wait")
        }

        /// SIGTERM, then waits for the exit.
        pub fn terminate(&mut self) -> std::process::ExitStatus {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            self.child.wait().expect("wait")
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            // A failing test shows what its processes logged last: the
            // service's side of the failure, in the test's own output.
            if std::thread::panicking() {
                let log = self.log();
                let tail = &log[log.len().saturating_sub(PANIC_LOG_LINES)..];
                eprintln!(
                    "--- last {} of {} lines {} logged ---\n{}",
                    tail.len(),
                    log.len(),
                    self.name,
                    tail.join("\n")
                );
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// What a live session returned.
    #[derive(Debug, Default)]
    pub struct SessionOutcome {
        /// Every response, in order.
        pub responses: Vec<StreamingRecognizeResponse>,
        /// How the stream ended.
        pub status: Option<Status>,
        /// When each final arrived, and when its utterance's endpoint was announced.
        pub final_latency_ms: Vec<u64>,
        /// When each final arrived.
        pub final_at: Vec<Instant>,
    }

    impl SessionOutcome {
        /// Final results, in arrival order.
        pub fn finals(&self) -> Vec<&StreamingRecognitionResult> {
            self.responses
                .iter()
                .flat_map(|r| &r.results)
                .filter(|r| r.is_final)
                .collect()
        }

        /// Interim results, in arrival order.
        pub fn interims(&self) -> Vec<&StreamingRecognitionResult> {
            self.responses
                .iter()
                .flat_map(|r| &r.results)
                .filter(|r| !r.is_final)
                .collect()
        }

        /// The transcript of the finals, ordered by segment.
        pub fn text(&self) -> String {
            let mut f = self.finals();
            f.sort_by_key(|r| r.segment_id);
            f.iter()
                .filter_map(|r| r.alternatives.first())
                .map(|a| a.transcript.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        }

        /// Whether the server said the session ended.
        pub fn ended(&self) -> bool {
            self.responses
                .iter()
                .any(|r| r.speech_event == SpeechEvent::EndOfSession as i32)
        }
    }

    /// A Redis server of a test's own (append-only, fsync always), to restart.
    pub struct RedisServer {
        child: std::process::Child,
        /// Its port on 127.0.0.1.
        pub port: u16,
        dir: Option<tempfile::TempDir>,
    }

    impl RedisServer {
        /// Starts one on `port` keeping its data in `dir`.
        pub fn start(port: u16, dir: tempfile::TempDir) -> Self {
            Self::start_with(port, dir, &[])
        }

        /// [`RedisServer::start`] with more server options (`--maxmemory 20mb` ...).
        pub fn start_with(port: u16, dir: tempfile::TempDir, extra: &[&str]) -> Self {
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ])
                .args(extra)
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (scripts/setup.sh installs it)");
            let t0 = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Self {
                child,
                port,
                dir: Some(dir),
            }
        }

        /// SIGKILL; returns its data folder for a restart.
        pub fn kill9(mut self) -> tempfile::TempDir {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.dir.take().expect("the data folder")
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Every final names a distinct segment, segments run 0..n without holes, and
    /// the server announced the end of the session.
    pub fn assert_complete(out: &SessionOutcome) {
        assert!(out.status.is_none(), "session failed: {:?}", out.status);
        assert!(out.ended(), "no END_OF_SESSION event");
        let mut ids: Vec<u64> = out.finals().iter().map(|r| r.segment_id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "a segment's final arrived twice: {ids:?}");
        assert!(!ids.is_empty(), "no final results");
        let indexes: Vec<u64> = out
            .responses
            .iter()
            .flat_map(|r| &r.results)
            .map(|r| r.result_index)
            .collect();
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "result_index not increasing: {indexes:?}"
        );
    }

    /// One Recognize call to the fleet at `fleet` (messages up to 256 MiB).
    pub async fn recognize(
        fleet: &Proc,
        config: RecognitionConfig,
        source: recognize_request::AudioSource,
    ) -> Result<RecognizeResponse, Status> {
        let ch = super::connect(fleet.addr)
            .await
            .expect("the fleet accepts connections");
        SpeechRecognitionClient::new(ch)
            .max_encoding_message_size(256 << 20)
            .recognize(RecognizeRequest {
                config: Some(config),
                audio_source: Some(source),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The transcript of a Recognize response, segments joined by spaces.
    pub fn text(r: &RecognizeResponse) -> String {
        r.results
            .iter()
            .map(|s| s.alternatives[0].transcript.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A streaming config for 16 kHz mono S16LE audio.
    pub fn pcm16_config(model: &str) -> StreamingRecognitionConfig {
        StreamingRecognitionConfig {
            config: Some(RecognitionConfig {
                model: model.into(),
                language: "en".into(),
                audio_format: Some(AudioFormat {
                    encoding: AudioEncoding::LinearPcmS16le as i32,
                    sample_rate_hz: 16_000,
                    channels: 1,
                }),
                ..Default::default()
            }),
            interim_results: true,
            ..Default::default()
        }
    }

    /// 16 kHz mono `samples` as 16-bit little-endian PCM chunks of
    /// `chunk` samples each.
    pub fn pcm16_chunks(samples: &[f32], chunk: usize) -> Vec<Vec<u8>> {
        samples
            .chunks(chunk)
            .map(|c| {
                c.iter()
                    .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
                    .collect()
            })
            .collect()
    }

    /// The transcript of the audio file at `path` by `nexus transcribe` with
    /// [`MODEL`], the offline reference of the fleet tests; `extra` adds
    /// options (`--beam-size 1` for greedy search).
    pub fn transcribe_file(path: &std::path::Path, extra: &[&str]) -> String {
        let out = std::process::Command::new(bin("nexus"))
            .arg("transcribe")
            .arg(path)
            .args(["--model", MODEL])
            .args(extra)
            .output()
            .expect("nexus transcribe runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A recognition config for [`MODEL`] in English with word times.
    pub fn english_config() -> nexus_proto::speech::RecognitionConfig {
        nexus_proto::speech::RecognitionConfig {
            model: MODEL.into(),
            language: "en".into(),
            enable_word_time_offsets: true,
            ..Default::default()
        }
    }

    /// Streams 16 kHz mono `samples` in 100 ms chunks at `pace` times real time
    /// and collects every response. `on_chunk(i)` runs before chunk `i` is sent.
    pub async fn stream(
        addr: SocketAddr,
        cfg: StreamingRecognitionConfig,
        samples: &[f32],
        pace: f64,
        mut on_chunk: impl FnMut(usize) + Send,
    ) -> Result<SessionOutcome, Status> {
        let ch = super::connect(addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut client = SpeechRecognitionClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
        })
        .await
        .map_err(|_| Status::internal("send"))?;
        let chunks = pcm16_chunks(samples, 1600);
        let mut inbound = client
            .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let period = Duration::from_secs_f64(0.1 / pace);
        let sender = async move {
            let start = tokio::time::Instant::now();
            for (i, c) in chunks.into_iter().enumerate() {
                on_chunk(i);
                tokio::time::sleep_until(start + period * i as u32).await;
                if tx
                    .send(StreamingRecognizeRequest {
                        streaming_request: Some(StreamingRequest::AudioContent(c.into())),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        let receiver = async {
            let mut out = SessionOutcome::default();
            let mut endpoint_at: std::collections::VecDeque<Instant> = Default::default();
            loop {
                match inbound.message().await {
                    Ok(Some(r)) => {
                        if r.speech_event == SpeechEvent::EndOfUtterance as i32 {
                            endpoint_at.push_back(Instant::now());
                        }
                        for res in &r.results {
                            if res.is_final {
                                out.final_at.push(Instant::now());
                            }
                            if res.is_final
                                && let Some(t) = endpoint_at.pop_front()
                            {
                                out.final_latency_ms.push(t.elapsed().as_millis() as u64);
                            }
                        }
                        out.responses.push(r);
                    }
                    Ok(None) => break,
                    Err(s) => {
                        out.status = Some(s);
                        break;
                    }
                }
            }
            out
        };
        let ((), out) = tokio::join!(sender, receiver);
        Ok(out)
    }
}

/// A minimal HTTP/1.1 client over one TCP connection per call, enough for
/// the tests' checks of status lines and bodies.
pub mod http_client {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client of one server.
    pub struct Client(SocketAddr);

    impl Client {
        /// A client of the server at `addr`.
        pub fn new(addr: SocketAddr) -> Self {
            Self(addr)
        }

        async fn send(&self, head: String, body: &[u8]) -> (u16, String) {
            let mut s = tokio::net::TcpStream::connect(self.0)
                .await
                .expect("the server accepts");
            s.write_all(head.as_bytes()).await.expect("request sent");
            // A server may answer from the head alone (too large, no key) and
            // close before the body is written: read its answer all the same.
            let _ = s.write_all(body).await;
            let mut buf = Vec::new();
            // Such a server may also reset the connection after its answer.
            let mut chunk = [0u8; 8192];
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(_) if !buf.is_empty() => break,
                    Err(e) => panic!("response read: {e}"),
                }
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let body = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                dechunk(body)
            } else {
                body.to_owned()
            };
            (status, body)
        }

        /// Any request: `method path` with `headers` and `body`.
        pub async fn request(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> (u16, String) {
            let mut head = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            self.send(head, body).await
        }

        fn auth(key: Option<&str>) -> String {
            key.map(|k| format!("Authorization: Bearer {k}\r\n"))
                .unwrap_or_default()
        }

        /// `GET path`, with a bearer key if given.
        pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
            let head = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
                Self::auth(key)
            );
            self.send(head, b"").await
        }

        /// A multipart upload of `file` with `fields`.
        pub async fn post_file(
            &self,
            path: &str,
            key: Option<&str>,
            fields: &[(&str, &str)],
            file: &[u8],
        ) -> (u16, String) {
            let mut body = Vec::new();
            for (k, v) in fields {
                body.extend_from_slice(
                    format!("--b\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                        .as_bytes(),
                );
            }
            body.extend_from_slice(
                b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n",
            );
            body.extend_from_slice(file);
            body.extend_from_slice(b"\r\n--b--\r\n");
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n{}\r\n",
                body.len(),
                Self::auth(key)
            );
            self.send(head, &body).await
        }

        /// A multipart form of one field.
        pub async fn post_form(
            &self,
            path: &str,
            key: Option<&str>,
            name: &str,
            value: &str,
        ) -> (u16, String) {
            let body = format!(
                "--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n--b--\r\n"
            );
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n{}\r\n",
                body.len(),
                Self::auth(key)
            );
            self.send(head, body.as_bytes()).await
        }
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < n {
                break;
            }
            out.push_str(&rest[..n]);
            s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
        }
        out
    }
}
