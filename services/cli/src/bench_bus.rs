//! `nexus bench bus`: what one hop between stages costs, in memory and on Redis.
//! A hop is what every stage does per entry: append, read through the consumer
//! group, acknowledge. Measured with the two payload sizes the fleet carries: a
//! 3 s audio window (192 KB of f32) and Whisper base encoder features (3 MB).

use std::time::{Duration, Instant};

use clap::Args;
use nexus_bus::{Bus, Fields, MemoryBus, RedisBus, StreamLimits};

/// Bus benchmark settings.
#[derive(Debug, Args)]
pub struct BusArgs {
    /// Redis to measure against.
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Hops per payload size.
    #[arg(long, default_value_t = 200)]
    hops: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn hops<B: Bus>(
    bus: &B,
    stream: &str,
    payload: usize,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    bus.ensure_group(stream, "bench").await?;
    let fields: Fields = [("p".to_string(), vec![7u8; payload])]
        .into_iter()
        .collect();
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        bus.add(stream, fields.clone(), StreamLimits::default())
            .await?;
        let got = bus
            .read_group(stream, "bench", "c", 1, Duration::from_secs(1))
            .await?;
        anyhow::ensure!(got.len() == 1, "the entry did not come back");
        bus.ack(stream, "bench", &[got[0].id]).await?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

/// Runs the benchmark and prints a table.
pub fn run(args: BusArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let redis = RedisBus::connect(&args.redis).await?;
            let memory = MemoryBus::new();
            println!("| payload | bus | p50 ms | p99 ms |");
            println!("|---|---|---|---|");
            for (name, size) in [
                ("audio window 192 KB", 192_000),
                ("base features 3 MB", 3_072_000),
            ] {
                let stream = format!("bench:{}:{size}", std::process::id());
                let (p50, p99) = hops(&memory, &stream, size, args.hops).await?;
                println!("| {name} | in-memory | {p50:.3} | {p99:.3} |");
                let (p50, p99) = hops(&redis, &stream, size, args.hops).await?;
                println!("| {name} | Redis | {p50:.3} | {p99:.3} |");
                let client = redis::Client::open(args.redis.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let _: i64 = redis::cmd("DEL").arg(&stream).query_async(&mut c).await?;
            }
            Ok(())
        })
}
