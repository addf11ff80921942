//! Memory pressure end to end: `odmoed` serving the Qwen3-MoE fixture with experts on demand
//! while memory runs short, really (a memory cgroup with a limit, and a second process taking
//! what is left) and simulated (`odmoe pressure simulate`).
//!
//! The cgroup test needs writable memory cgroups (v2 at /sys/fs/cgroup, else v1 at
//! /sys/fs/cgroup/memory) and python3 for the memory hog; without them it prints SKIPPED and
//! passes. The fixture is tiny, so the cgroup's limit is sized from the daemon's own resident
//! memory, measured first, rather than in gigabytes.
//!
//! Every step is bounded by a timeout; no test asserts how long anything took.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use odmoe_e2e::cgroup::{Cgroup, Version};
use odmoe_e2e::{Daemon, fixture, odmoe_ok};
use odmoe_protocol::{GenerateParams, GenerateResult, MemoryStats, Method, StatsResult};
use tokio::time::timeout;

/// How long any single step may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// A prompt the fixture's tokenizer reads.
const PROMPT: &str = "The quick brown fox";

/// Tokens generated per request.
const TOKENS: u32 = 24;

/// Grow back after 2 s of quiet, one step a second; size `auto` with a small KV reserve, as
/// the fixture's KV cache is tiny.
const FAST_MEMORY: &str =
    "[memory]\nquiet_secs = 2\ngrow_interval_secs = 1\nkv_reserve = \"4MiB\"\n";

/// Says something on the test's stderr even when the harness captures output.
fn report(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// What these tests add to the shared [`Daemon`].
trait DaemonExt: Sized {
    /// Serves the fixture with `config`, started through `wrapper` (a shell command line that
    /// ends by running `"$@"`), or directly.
    async fn start(config: &str, wrapper: Option<&str>) -> Self;

    /// Its socket, as a command-line argument.
    fn socket_arg(&self) -> &str;

    async fn stats(&self) -> StatsResult;

    /// Greedy tokens after [`PROMPT`], optionally kept in `session`.
    async fn generate(&self, session: Option<&str>) -> GenerateResult;
}

impl DaemonExt for Daemon {
    async fn start(config: &str, wrapper: Option<&str>) -> Daemon {
        let mut builder = Daemon::builder()
            .model(fixture("qwen3_moe"))
            .config(config)
            .limit(LIMIT);
        if let Some(script) = wrapper {
            builder = builder.wrapper(script);
        }
        let mut daemon = builder.spawn();
        daemon.wait_until_serving().await;
        daemon
    }

    fn socket_arg(&self) -> &str {
        self.socket().to_str().unwrap()
    }

    async fn stats(&self) -> StatsResult {
        let mut client = self.client().await;
        timeout(LIMIT, client.stats()).await.unwrap().unwrap()
    }

    async fn generate(&self, session: Option<&str>) -> GenerateResult {
        let params = GenerateParams {
            prompt: Some(PROMPT.into()),
            max_tokens: Some(TOKENS),
            temperature: Some(0.0),
            top_k: Some(0),
            top_p: Some(1.0),
            min_p: Some(0.0),
            repetition_penalty: Some(1.0),
            seed: Some(0),
            ignore_eos: true,
            session: session.map(str::to_owned),
            ..GenerateParams::default()
        };
        let mut client = self.client().await;
        let generated =
            client.generate_streaming(Method::Generate, &params, |_| {}, std::future::pending());
        let result = timeout(LIMIT, generated).await.unwrap().unwrap();
        assert_eq!(result.tokens.len(), TOKENS as usize);
        result
    }
}

fn memory(stats: &StatsResult) -> &MemoryStats {
    stats.memory.as_ref().expect("stats has a memory section")
}

fn budget(stats: &StatsResult) -> u64 {
    stats
        .store
        .as_ref()
        .expect("experts on demand")
        .budget_bytes
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Both tests watch the machine's own memory pressure (PSI is system-wide): the hog's real
/// pressure showed up as critical in the simulated test when they ran at once, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn simulated_critical_pressure_shrinks_the_budget_at_once_and_it_grows_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let daemon = Daemon::start(FAST_MEMORY, None).await;
    let expected = daemon.generate(Some("kept")).await;
    // A request without a session leaves its KV cache in the prefix cache.
    daemon.generate(None).await;
    let stats = daemon.stats().await;
    let total = stats.model.as_ref().unwrap().total_expert_bytes;
    // `auto` on this machine holds every expert of the fixture.
    assert_eq!(budget(&stats), total);
    assert_eq!(memory(&stats).ceiling_bytes, Some(total));
    assert_eq!((stats.sessions.count, stats.sessions.prefixes), (1, 1));

    let output = odmoe_ok(&[
        "pressure",
        "simulate",
        "critical",
        "--json",
        "--socket",
        daemon.socket_arg(),
    ]);
    let answer: MemoryStats = serde_json::from_str(&output).unwrap();
    assert!(answer.simulated && answer.level == "critical", "{answer:?}");
    // 40% less at once.
    let first = answer.target_bytes.unwrap();
    assert!(
        first < total && first.abs_diff(total * 6 / 10) <= 1,
        "{answer:?}"
    );
    let adjustment = answer.adjustments.last().expect("an adjustment");
    assert_eq!((adjustment.from_bytes, adjustment.to_bytes), (total, first));
    assert!(adjustment.reason.contains("critical"), "{adjustment:?}");

    // The idle engine applies it at once; the kept session and the prefix cache go with
    // critical pressure.
    let stats = daemon
        .stats_until("the budget shrinks and the session goes", |stats| {
            budget(stats) <= first && stats.sessions.count == 0 && stats.sessions.prefixes == 0
        })
        .await;
    let store = stats.store.as_ref().unwrap();
    assert!(store.resident_bytes <= budget(&stats), "{store:?}");
    // Critical pressure goes on: one more step a second, down to the floor.
    let floor = memory(&stats).floor_bytes.unwrap();
    daemon
        .stats_until("the budget reaches the floor", |stats| {
            budget(stats) == floor
        })
        .await;
    let under_pressure = daemon.generate(None).await;
    assert_eq!(under_pressure.tokens, expected.tokens);

    // Back to the machine's real level. PSI is system-wide, so a busy machine may itself be
    // under pressure for a moment: the release must end the simulation, and the budget must
    // grow back once the machine is quiet, however long that takes within the limit.
    let output = odmoe_ok(&[
        "pressure",
        "release",
        "--json",
        "--socket",
        daemon.socket_arg(),
    ]);
    let released: MemoryStats = serde_json::from_str(&output).unwrap();
    assert!(!released.simulated, "{released:?}");
    let stats = daemon
        .stats_until("the budget grows back", |stats| budget(stats) == total)
        .await;
    let grown: Vec<_> = memory(&stats)
        .adjustments
        .iter()
        .filter(|a| a.to_bytes > a.from_bytes)
        .collect();
    assert!(grown.len() >= 2, "growth is stepwise: {grown:#?}");
    assert!(
        grown
            .iter()
            .all(|a| a.reason.starts_with("no pressure for"))
    );
    let log = daemon.log();
    assert!(log.contains("expert budget shrunk"), "{log}");
    assert!(log.contains("expert budget grown"), "{log}");
    let status = odmoe_ok(&["pressure", "status", "--socket", daemon.socket_arg()]);
    assert!(status.contains("adjusted"), "{status}");
    let ps = odmoe_ok(&["ps", "--socket", daemon.socket_arg()]);
    assert!(ps.contains("PRESSURE"), "{ps}");
}

/// The memory hog: takes 1 MiB at a time (touching every page) until the memory left under
/// the cgroup's limit falls below `stop_at` bytes, prints how much it took, and holds it until
/// its stdin closes. Memory left is the limit less usage less inactive page cache, as odmoed
/// reads it.
const HOG: &str = r#"
import sys, time
cgroup, limit_file, usage_file, inactive_key, stop_at = sys.argv[1:6]
stop_at = int(stop_at)
def read(name):
    with open(cgroup + "/" + name) as f:
        return f.read()
def left():
    inactive = 0
    for line in read("memory.stat").splitlines():
        key, value = line.split()
        if key == inactive_key:
            inactive = int(value)
    return int(read(limit_file)) - (int(read(usage_file)) - inactive)
held = []
while left() > stop_at:
    held.append(b"\x01" * (1 << 20))
    time.sleep(0.05)
print(len(held), flush=True)
sys.stdin.read()
"#;

/// A running hog, stopped by closing its stdin.
struct Hog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Hog {
    fn start(python: &str, cgroup: &Cgroup, stop_at: u64) -> Hog {
        let version = cgroup.version;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cgroup.wrapper("hog"))
            .arg("hog")
            .arg(python)
            .arg("-c")
            .arg(HOG)
            .arg(&cgroup.dir)
            .arg(version.limit_file())
            .arg(version.usage_file())
            .arg(version.stat_keys().0)
            .arg(stop_at.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Hog { child, stdin }
    }

    /// Waits for the hog to say how many MiB it holds.
    fn held_mib(&mut self) -> u64 {
        use std::io::BufRead;
        let stdout = self.child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("the hog said {line:?}"))
    }

    fn release(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real interpreter behind `python3` (not a shim), or why there is none.
fn python() -> Result<String, String> {
    let output = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .map_err(|error| format!("python3: {error}"))?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && !path.is_empty() {
        Ok(path)
    } else {
        Err("python3 does not run".into())
    }
}

/// Samples the daemon's resident memory plus its cgroup's page cache until stopped; keeps the
/// peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, cgroup: &Cgroup) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let statm = PathBuf::from(format!("/proc/{pid}/statm"));
        let stat = cgroup.dir.join("daemon").join("memory.stat");
        let cache_key = cgroup.version.stat_keys().1;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .unwrap()
            .unwrap() as u64;
        let thread = std::thread::spawn({
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let rss = fs::read_to_string(&statm)
                        .ok()
                        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .map_or(0, |pages| pages * page);
                    let cache = fs::read_to_string(&stat)
                        .ok()
                        .and_then(|text| {
                            text.lines().find_map(|line| {
                                line.strip_prefix(cache_key)?
                                    .strip_prefix(' ')?
                                    .parse()
                                    .ok()
                            })
                        })
                        .unwrap_or(0u64);
                    peak.fetch_max(rss + cache, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn skipped(why: &str) {
    report(&format!(
        "\n**********************************************************************\n\
         SKIPPED: the memory-cgroup pressure test did not run: {why}\n\
         **********************************************************************\n"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_in_the_daemons_cgroup_shrinks_the_budget_and_it_grows_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(version) = Version::detect() else {
        return skipped("no memory cgroup controller at /sys/fs/cgroup");
    };
    let python = match python() {
        Ok(python) => python,
        Err(why) => return skipped(&why),
    };
    // Thresholds as shares of the cgroup's limit: warn below 30% left, critical below 20%.
    let config = format!("{FAST_MEMORY}warn_headroom = \"30%\"\ncritical_headroom = \"20%\"\n");

    // Unpressured: the reference tokens and the daemon's resident memory.
    let daemon = Daemon::start(&config, None).await;
    let expected = daemon.generate(None).await;
    let rss = daemon.stats().await.rss_bytes;
    drop(daemon);

    // Room for the daemon and 32 MiB more, of which the hog (the interpreter included) takes
    // all it can: the daemon and the hog together would want more than the limit.
    let limit = rss + (32 << 20);
    let cgroup = match Cgroup::create(version, "pressure", limit) {
        Ok(cgroup) => cgroup,
        Err(why) => return skipped(&format!("cgroups are not writable here ({why})")),
    };
    let mut daemon = Daemon::start(&config, Some(&cgroup.wrapper("daemon"))).await;
    let procs = cgroup.read(Some("daemon"), "cgroup.procs");
    assert_eq!(procs.trim(), daemon.pid().to_string());
    let sampler = Sampler::start(daemon.pid(), &cgroup);

    let stats = daemon.stats().await;
    let total = stats.model.as_ref().unwrap().total_expert_bytes;
    let start = memory(&stats);
    assert_eq!(start.limit_bytes, Some(limit), "{start:#?}");
    assert_eq!(start.level, "normal", "{start:#?}");
    assert_eq!(
        budget(&stats),
        total,
        "auto holds every expert under this limit"
    );
    let ceiling = start.ceiling_bytes.unwrap();
    let promise = start.base_bytes.unwrap() + start.kv_reserve_bytes + ceiling;
    let tokens = daemon.generate(None).await;
    assert_eq!(tokens.tokens, expected.tokens);

    // The hog takes memory until less than 10% of the limit is left: critical for odmoed.
    let mut hog = Hog::start(&python, &cgroup, limit / 10);
    let hog_mib = tokio::task::block_in_place(|| hog.held_mib());
    let mut generations = 0;
    let deadline = Instant::now() + LIMIT;
    let shrunk = loop {
        let result = daemon.generate(None).await;
        assert_eq!(
            result.tokens, expected.tokens,
            "greedy tokens under pressure"
        );
        generations += 1;
        let stats = daemon.stats().await;
        if budget(&stats) < total && generations >= 3 {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the budget did not shrink: {:#?}\n{}",
            stats.memory,
            daemon.log()
        );
    };
    let floor = memory(&shrunk).floor_bytes.unwrap();
    let lowest = daemon
        .stats_until("the budget reaches the floor", |stats| {
            budget(stats) == floor
        })
        .await;
    let under_pressure = daemon.generate(None).await;
    assert_eq!(under_pressure.tokens, expected.tokens);
    let pressed = memory(&lowest).clone();
    assert_ne!(pressed.level, "normal", "{pressed:#?}");

    hog.release();
    let grown = daemon
        .stats_until("the budget grows back", |stats| budget(stats) == total)
        .await;
    let after = daemon.generate(None).await;
    assert_eq!(after.tokens, expected.tokens);
    let peak = sampler.finish();
    assert!(daemon.alive(), "odmoed died:\n{}", daemon.log());
    assert_eq!(cgroup.oom_kills(), 0, "the cgroup saw OOM kills");

    let adjustments = &memory(&grown).adjustments;
    report(&format!(
        "memory pressure in a cgroup v{} limited to {}: odmoed rss before {}, hog took {hog_mib} MiB",
        if version == Version::V1 { 1 } else { 2 },
        mib(limit),
        mib(rss)
    ));
    report(&format!(
        "  level under the hog: {} ({}); budget {} -> {} (floor) -> {} again",
        pressed.level,
        pressed.reason,
        mib(total),
        mib(floor),
        mib(budget(&grown))
    ));
    for adjustment in adjustments {
        report(&format!(
            "  at {:6.2}s: {} -> {}: {}",
            adjustment.at_s,
            mib(adjustment.from_bytes),
            mib(adjustment.to_bytes),
            adjustment.reason
        ));
    }
    report(&format!(
        "  peak rss + page cache of odmoed's cgroup: {}; promise (base {} + KV reserve {} + \
         expert budget {}): {}",
        mib(peak),
        mib(memory(&grown).base_bytes.unwrap()),
        mib(memory(&grown).kv_reserve_bytes),
        mib(ceiling),
        mib(promise)
    ));
    assert!(
        adjustments.iter().any(|a| a.to_bytes < a.from_bytes),
        "{adjustments:#?}"
    );
    assert!(
        adjustments
            .iter()
            .any(|a| a.to_bytes > a.from_bytes && a.reason.starts_with("no pressure")),
        "{adjustments:#?}"
    );
    assert!(peak <= promise, "peak {peak} over the promise {promise}");
    assert!(
        daemon.log().contains("expert budget shrunk"),
        "{}",
        daemon.log()
    );
}
