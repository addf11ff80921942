//! The soak: `odmoed` serving the Qwen3-MoE fixture with experts on demand for an hour, inside a
//! memory cgroup a little above what it needs, while clients come and go (streamed and whole
//! replies, chat sessions, cancels, clients that leave mid-reply) and the memory-pressure level
//! moves between normal, warn and critical. Resident memory is sampled every 10 s.
//!
//! Slow: `scripts/soak.sh` runs it (`ODMOE_SOAK_SECS`, default 3600). It needs writable memory
//! cgroups (root); without them it runs without a limit and says so. It fails when the daemon
//! dies or is OOM-killed, when a request that waited for its answer got none, or when resident
//! memory after the warm-up drifts by more than 5%.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use odmoe_client::Client;
use odmoe_e2e::cgroup::{Cgroup, Version};
use odmoe_e2e::{Daemon, fixture};
use odmoe_protocol::{ChatMessage, GenerateParams, Method};
use tokio::time::timeout;

const SAMPLE: Duration = Duration::from_secs(10);
const ANSWER_LIMIT: Duration = Duration::from_secs(120);

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// What the clients did, counted.
#[derive(Default)]
struct Tally {
    /// Requests whose client waited for the answer.
    asked: AtomicU64,
    /// Of those, answered with a result.
    answered: AtomicU64,
    /// Requests whose client left or cancelled on purpose.
    abandoned: AtomicU64,
}

/// One client's life: connect, send a few requests of one kind, leave.
async fn client_session(daemon_socket: std::path::PathBuf, seed: u64, tally: Arc<Tally>) {
    let Ok(mut client) = Client::connect(&daemon_socket).await else {
        return;
    };
    let kind = seed % 5;
    let greedy = |prompt: &str, max_tokens: u32, stream: bool| GenerateParams {
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.7),
        seed: Some(seed),
        stream,
        ..GenerateParams::default()
    };
    for turn in 0..3 {
        let (method, params) = match kind {
            0 => (Method::Generate, greedy("The quick brown fox", 24, true)),
            1 => (Method::Generate, greedy("Once upon a time", 16, false)),
            2 => (
                Method::Chat,
                GenerateParams {
                    messages: Some(vec![ChatMessage {
                        role: "user".into(),
                        content: format!("Turn {turn}: tell me more."),
                    }]),
                    session: Some(format!("soak-{}", seed % 7)),
                    max_tokens: Some(12),
                    ..GenerateParams::default()
                },
            ),
            3 => {
                // Cancelled after a few tokens.
                tally.abandoned.fetch_add(1, Ordering::Relaxed);
                let cancel = tokio::time::sleep(Duration::from_millis(20));
                let params = greedy("Cancel me", 200, true);
                let _ = timeout(
                    ANSWER_LIMIT,
                    client.generate_streaming(Method::Generate, &params, |_| {}, cancel),
                )
                .await;
                continue;
            }
            _ => {
                // Leaves in the middle of a reply.
                tally.abandoned.fetch_add(1, Ordering::Relaxed);
                let params = greedy("Leave early", 200, true);
                let pending = std::future::pending();
                let _ = timeout(
                    Duration::from_millis(30),
                    client.generate_streaming(Method::Generate, &params, |_| {}, pending),
                )
                .await;
                return;
            }
        };
        tally.asked.fetch_add(1, Ordering::Relaxed);
        let answered = timeout(
            ANSWER_LIMIT,
            client.generate_streaming(method, &params, |_| {}, std::future::pending()),
        )
        .await;
        if matches!(answered, Ok(Ok(_))) {
            tally.answered.fetch_add(1, Ordering::Relaxed);
        } else {
            eprintln!("unanswered: {answered:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by scripts/soak.sh"]
async fn an_hour_of_clients_under_a_memory_limit() {
    let seconds: u64 = std::env::var("ODMOE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    // Measure what the daemon needs idle first, then give it that and the headroom six busy
    // clients take (`ODMOE_SOAK_HEADROOM_MIB`, default 256: threads' allocator arenas, buffers).
    let probe = Daemon::builder().model(fixture("qwen3_moe")).spawn();
    let mut probe = probe;
    probe.wait_until_serving().await;
    let need = resident_bytes(probe.pid());
    drop(probe);
    let headroom: u64 = std::env::var("ODMOE_SOAK_HEADROOM_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let limit = need + (headroom << 20);
    let cgroup = Version::detect()
        .ok_or_else(|| "no memory cgroup controller".to_owned())
        .and_then(|version| Cgroup::create(version, "soak", limit));
    let builder = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .follow_memory_pressure()
        // A context of 1,024: chat sessions fill it and are trimmed within the hour, and
        // their prompts stay short enough that prefill memory is not what is measured.
        .args(["--expert-budget", "50%", "--context-length", "1024"])
        .limit(ANSWER_LIMIT);
    let mut daemon = match &cgroup {
        Ok(cgroup) => builder.wrapper(cgroup.wrapper("daemon")).spawn(),
        Err(why) => {
            eprintln!("no memory limit: {why}");
            builder.spawn()
        }
    };
    daemon.wait_until_serving().await;
    let pid = daemon.pid();
    println!(
        "soak: {seconds} s, limit {} MiB ({} MiB resident at start)",
        limit >> 20,
        need >> 20
    );

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let socket = daemon.socket().to_owned();
    let clients = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            let mut seed = 1u64;
            let mut running = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                while running.len() < 6 {
                    seed += 1;
                    running.spawn(client_session(socket.clone(), seed, Arc::clone(&tally)));
                }
                running.join_next().await;
            }
            while running.join_next().await.is_some() {}
        })
    };
    let mut control = daemon.client().await;
    let levels = ["warn", "normal", "critical", "normal"];
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut tick = 0usize;
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE).await;
        tick += 1;
        assert!(daemon.alive(), "odmoed died:\n{}", daemon.log());
        let rss = resident_bytes(pid);
        samples.push((started.elapsed().as_secs(), rss));
        if tick.is_multiple_of(3) {
            println!(
                "{:>5} s  rss {:.1} MiB  asked {} answered {} abandoned {}",
                started.elapsed().as_secs(),
                rss as f64 / (1 << 20) as f64,
                tally.asked.load(Ordering::Relaxed),
                tally.answered.load(Ordering::Relaxed),
                tally.abandoned.load(Ordering::Relaxed)
            );
        }
        // Every two minutes the pressure level moves, a minute in each of four.
        if tick.is_multiple_of(6) {
            let level = levels[(tick / 6) % levels.len()];
            let moved = if level == "normal" {
                control.release_pressure().await
            } else {
                control.simulate_pressure(level).await
            };
            moved.expect("the pressure method answers");
        }
    }
    clients.await.unwrap();
    assert!(daemon.alive(), "odmoed died:\n{}", daemon.log());
    let (asked, answered) = (
        tally.asked.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
    );
    println!(
        "soak: {asked} requests waited for, {answered} answered, {} abandoned on purpose",
        tally.abandoned.load(Ordering::Relaxed)
    );
    assert_eq!(asked, answered, "every request waited for is answered");
    if let Ok(cgroup) = &cgroup {
        assert_eq!(cgroup.oom_kills(), 0, "OOM kills in the soak's cgroup");
    }
    // After the warm-up (the first tenth), resident memory stays within 5%: the median of the
    // last sixth of the samples against the median of the first sixth after warm-up. Medians,
    // because a prompt computed while a sample is taken lifts that one sample for a moment;
    // what must not happen is a trend.
    let warm: Vec<u64> = samples
        .iter()
        .filter(|(at, _)| *at >= seconds / 10)
        .map(|(_, rss)| *rss)
        .collect();
    assert!(
        warm.len() >= 12,
        "too short a soak to judge: {} samples",
        warm.len()
    );
    let median = |xs: &[u64]| {
        let mut xs = xs.to_vec();
        xs.sort_unstable();
        xs[xs.len() / 2] as f64
    };
    let window = warm.len() / 6;
    let first = median(&warm[..window]);
    let last = median(&warm[warm.len() - window..]);
    let peak = *warm.iter().max().unwrap();
    println!(
        "soak: rss after warm-up {:.1} MiB, at the end {:.1} MiB ({:+.1}%), peak {:.1} MiB",
        first / (1 << 20) as f64,
        last / (1 << 20) as f64,
        (last / first - 1.0) * 100.0,
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        (last / first - 1.0).abs() <= 0.05,
        "resident memory drifted from {first} to {last} bytes"
    );
}
