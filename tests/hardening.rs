//! What a hostile or careless local client tried against `odmoed`, each kept as a test: stalled
//! and idle connections, requests pipelined without reading, a half-closed socket, msgids used
//! twice, forged log lines, degenerate sampling and files that are not models.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use odmoe_e2e::{Daemon, fixture};
use odmoe_protocol::{
    ErrorCode, GenerateParams, GenerateResult, Message, Method, Request, Response, decode, encode,
};

const LIMIT: Duration = Duration::from_secs(300);

/// A plain connection, reading with a timeout so that a test cannot hang.
fn connect(daemon: &Daemon) -> UnixStream {
    let stream = UnixStream::connect(daemon.socket()).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream
}

fn send<T: serde::Serialize>(stream: &mut UnixStream, msgid: u32, method: &str, params: &T) {
    let request = Request::new(msgid, method, params).unwrap();
    stream.write_all(&encode(&request.into())).unwrap();
}

/// Reads messages until a response arrives; `None` if the daemon hung up first.
fn response(stream: &mut UnixStream, buffer: &mut Vec<u8>) -> Option<Response> {
    loop {
        if let Some((message, used)) = decode(buffer, 64 << 20).unwrap() {
            buffer.drain(..used);
            match message {
                Message::Response(response) => return Some(response),
                _ => continue,
            }
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the daemon has closed `stream` (reads end), waiting at most `wait`.
fn closed_within(stream: &mut UnixStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    // A socket closed with our bytes unread reads as reset rather than ended.
    let closed = match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    };
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    closed
}

/// An `odmoed` serving the Qwen3-MoE fixture, listening.
fn serving_fixture() -> Daemon {
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_listening();
    daemon
}

/// Says `hello` on `stream` and asserts that it is answered.
fn assert_hello(stream: &mut UnixStream) {
    send(stream, 1, "hello", &serde_json::json!({}));
    let answer = response(stream, &mut Vec::new()).expect("an answer");
    assert!(answer.outcome.is_ok(), "{answer:?}");
}

fn greedy(prompt: &str, max_tokens: u32) -> GenerateParams {
    GenerateParams {
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        stream: false,
        ..GenerateParams::default()
    }
}

fn result_of(response: Response) -> GenerateResult {
    let value = response.outcome.expect("a result");
    odmoe_protocol::from_value(value).unwrap()
}

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

const LIMITED: &str = "[server]\nmax_connections = 4\nmessage_timeout_secs = 2\n";

#[test]
fn stalled_connections_cannot_lock_out_a_client_and_are_dropped() {
    // The default limits, but for a short message timeout.
    let config = "[server]\nmessage_timeout_secs = 2\n";
    let mut daemon = Daemon::builder().config(config).limit(LIMIT).spawn();
    daemon.wait_until_listening();
    // 200 connections that send the first byte of a message and stall: they
    // take no place among the clients served.
    let mut stalled: Vec<UnixStream> = (0..200)
        .map(|_| {
            let mut stream = connect(&daemon);
            let _ = stream.write_all(&[0x94]);
            stream
        })
        .collect();
    let started = Instant::now();
    let mut client = connect(&daemon);
    assert_hello(&mut client);
    println!(
        "answered after {:?} beside 200 stalled connections",
        started.elapsed()
    );
    // The stalled ones are dropped once their message is late (2 s here).
    let dropped = stalled
        .iter_mut()
        .filter_map(|stream| closed_within(stream, Duration::from_secs(20)).then_some(()))
        .count();
    assert_eq!(dropped, 200);
    assert!(daemon.alive());
}

#[test]
fn a_client_beyond_the_limit_is_told_the_daemon_is_busy() {
    let mut daemon = Daemon::builder().config(LIMITED).limit(LIMIT).spawn();
    daemon.wait_until_listening();
    let mut idle: Vec<UnixStream> = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(&daemon);
        assert_hello(&mut stream);
        idle.push(stream);
    }
    let mut fifth = connect(&daemon);
    // The daemon may have said no and hung up before this is written.
    let hello = Request::new(1, "hello", &serde_json::json!({})).unwrap();
    let _ = fifth.write_all(&encode(&hello.into()));
    let refused = response(&mut fifth, &mut Vec::new()).expect("a refusal");
    let error = refused.outcome.unwrap_err();
    assert_eq!(error.code, ErrorCode::Busy, "{error:?}");
    assert!(closed_within(&mut fifth, Duration::from_secs(10)));
    // One leaves: the next client is served.
    drop(idle.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut next = connect(&daemon);
    assert_hello(&mut next);
}

#[test]
fn requests_pipelined_without_reading_do_not_grow_the_daemon() {
    let mut daemon = Daemon::builder().limit(LIMIT).spawn();
    daemon.wait_until_listening();
    let pid = daemon.pid();
    let before = resident_bytes(pid);
    let stream = connect(&daemon);
    let mut writer = stream.try_clone().unwrap();
    let pipelining = std::thread::spawn(move || {
        let request = |msgid| encode(&Request::new(msgid, "stats", &()).unwrap().into());
        let mut sent = 0u32;
        for msgid in 1..=300_000 {
            if writer.write_all(&request(msgid)).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut peak = before;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(resident_bytes(pid));
    }
    stream.shutdown(Shutdown::Both).unwrap();
    let sent = pipelining.join().unwrap();
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "rss {:.1} MiB before, peak {:.1} MiB while {sent} requests were pipelined",
        mib(before),
        mib(peak)
    );
    assert!(
        sent < 300_000,
        "the daemon read every request without answering"
    );
    assert!(peak <= before + (64 << 20), "peak {:.1} MiB", mib(peak));
    assert!(daemon.alive());
}

#[test]
fn a_half_closed_client_still_gets_its_answers() {
    let daemon = serving_fixture();
    for _ in 0..5 {
        let mut stream = connect(&daemon);
        send(&mut stream, 1, "hello", &serde_json::json!({}));
        send(&mut stream, 2, "generate", &greedy("Hello", 8));
        stream.shutdown(Shutdown::Write).unwrap();
        let mut buffer = Vec::new();
        let mut answered = Vec::new();
        while let Some(response) = response(&mut stream, &mut buffer) {
            answered.push(response.msgid);
            if response.msgid == 2 {
                assert_eq!(result_of(response).usage.completion_tokens, 8);
            }
        }
        answered.sort_unstable();
        assert_eq!(answered, [1, 2]);
    }
}

#[test]
fn a_msgid_in_flight_is_not_reused_and_cancel_reaches_its_generation() {
    let daemon = serving_fixture();
    let mut stream = connect(&daemon);
    let mut long = greedy("Once upon a time", 3000);
    long.ignore_eos = true;
    send(&mut stream, 7, "generate", &long);
    send(&mut stream, 7, "generate", &long);
    let mut buffer = Vec::new();
    let refused = response(&mut stream, &mut buffer).unwrap();
    assert_eq!(refused.msgid, 7);
    assert_eq!(refused.outcome.unwrap_err().code, ErrorCode::InvalidRequest);
    send(&mut stream, 8, "cancel", &serde_json::json!({"id": 7}));
    let mut finish = None;
    while let Some(response) = response(&mut stream, &mut buffer) {
        if response.msgid == 7 {
            finish = Some(result_of(response).finish_reason);
            break;
        }
    }
    assert_eq!(finish.as_deref(), Some("cancelled"));
}

#[test]
fn client_text_cannot_forge_or_flood_the_log() {
    let mut daemon = Daemon::builder()
        .config("[log]\nlevel = \"debug\"\n")
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_listening();
    let forged = "\n2026-12-03T00:00:00.000000Z  INFO odmoed: FORGED ENTRY\n";
    let method = format!("{forged}{}", "x".repeat(4 << 20));
    let mut stream = connect(&daemon);
    send(&mut stream, 1, &method, &serde_json::json!({}));
    let answer = response(&mut stream, &mut Vec::new()).unwrap();
    let error = answer.outcome.unwrap_err();
    assert_eq!(error.code, ErrorCode::MethodNotFound);
    assert!(error.message.len() < 1024, "{} bytes", error.message.len());
    let log = daemon.log();
    assert!(
        !log.lines()
            .any(|line| line.contains("FORGED") && line.starts_with("2026-12-03T00")),
        "{log}"
    );
    assert!(log.len() < 64 << 10, "the log grew by {} bytes", log.len());
}

#[test]
fn degenerate_sampling_and_files_that_are_not_models_get_clear_answers() {
    let mut daemon = Daemon::builder()
        .model(fixture("qwen3_moe"))
        .wrapper("RUST_BACKTRACE=1 exec \"$@\"")
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_listening();
    let mut stream = connect(&daemon);
    let mut buffer = Vec::new();
    send(&mut stream, 1, "generate", &greedy("Hello", 8));
    let greedy_tokens = result_of(response(&mut stream, &mut buffer).unwrap()).tokens;
    let mut tiny = greedy("Hello", 8);
    tiny.temperature = Some(1e-40);
    send(&mut stream, 2, "generate", &tiny);
    let tiny_tokens = result_of(response(&mut stream, &mut buffer).unwrap()).tokens;
    assert_eq!(tiny_tokens, greedy_tokens);

    let before = resident_bytes(daemon.pid());
    send(
        &mut stream,
        3,
        Method::Load.name(),
        &serde_json::json!({"path": "/etc/passwd"}),
    );
    let error = response(&mut stream, &mut buffer)
        .unwrap()
        .outcome
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidParams);
    assert!(error.message.contains("not a model"), "{}", error.message);
    assert!(error.message.len() < 512, "{}", error.message);
    let grown = resident_bytes(daemon.pid()).saturating_sub(before);
    assert!(grown < 16 << 20, "grew by {grown} bytes");
    // The model is still served.
    send(&mut stream, 4, "generate", &greedy("Hello", 8));
    assert_eq!(
        result_of(response(&mut stream, &mut buffer).unwrap()).tokens,
        greedy_tokens
    );
}

#[test]
fn a_client_may_connect_long_before_its_first_request() {
    // As an editor does at start-up: silent past the message timeout, with room to spare.
    let mut daemon = Daemon::builder().config(LIMITED).limit(LIMIT).spawn();
    daemon.wait_until_listening();
    let mut early = connect(&daemon);
    std::thread::sleep(Duration::from_secs(4));
    assert_hello(&mut early);
}

#[test]
fn a_corrupt_expert_is_an_error_naming_its_file_never_output() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("qwen3.odmoe");
    odmoe_e2e::odmoe_ok(&[
        "convert",
        fixture("qwen3_moe").to_str().unwrap(),
        layout.to_str().unwrap(),
    ]);
    let mut experts: Vec<_> = std::fs::read_dir(layout.join("experts"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    experts.sort();
    // Every expert of the first MoE layer, so that any prompt meets one.
    let broken: Vec<_> = experts
        .iter()
        .filter(|path| path.to_string_lossy().contains("layer_00_"))
        .collect();
    assert!(!broken.is_empty(), "{experts:?}");
    for path in &broken {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        let end = (middle + 4096).min(bytes.len());
        bytes[middle..end].fill(0xFF);
        std::fs::write(path, bytes).unwrap();
    }
    let mut daemon = Daemon::builder()
        .model(&layout)
        .args(["--expert-budget", "50%"])
        .limit(LIMIT)
        .spawn();
    daemon.wait_until_listening();
    let mut stream = connect(&daemon);
    let mut buffer = Vec::new();
    send(&mut stream, 1, "generate", &greedy("Hello", 8));
    let error = response(&mut stream, &mut buffer)
        .unwrap()
        .outcome
        .expect_err("a corrupt expert gives an error, not output");
    assert!(
        error.message.contains("checksum mismatch"),
        "{}",
        error.message
    );
    assert!(error.message.contains("layer_00_"), "{}", error.message);
    // Quarantined: asked again, the same error without a new read; the daemon serves on.
    send(&mut stream, 2, "generate", &greedy("Hello", 8));
    let again = response(&mut stream, &mut buffer).unwrap().outcome;
    assert!(again.is_err());
    send(&mut stream, 3, "stats", &serde_json::json!({}));
    let stats: odmoe_protocol::StatsResult =
        odmoe_protocol::from_value(response(&mut stream, &mut buffer).unwrap().outcome.unwrap())
            .unwrap();
    let store = stats.store.expect("experts on demand");
    assert!(store.read_errors >= 1, "{store:?}");
    assert!(daemon.alive());
}

/// CPU seconds the process has used (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    ticks / per_second
}

#[test]
fn a_bad_field_is_refused_before_a_long_prompt_is_tokenized() {
    let daemon = serving_fixture();
    let mut stream = connect(&daemon);
    let mut buffer = Vec::new();
    let huge = "the quick brown fox jumps over the lazy dog ".repeat(340_000);
    let mut bad = greedy(&huge, 8);
    bad.temperature = Some(-1.0);
    let before = cpu_seconds(daemon.pid());
    send(&mut stream, 1, "generate", &bad);
    let error = response(&mut stream, &mut buffer)
        .unwrap()
        .outcome
        .unwrap_err();
    let spent = cpu_seconds(daemon.pid()) - before;
    assert!(
        error.message.starts_with("temperature: "),
        "{}",
        error.message
    );
    // Tokenizing 15 MB takes seconds of CPU; reading and checking it, a small part of one.
    println!("refusing a 15 MB prompt's bad temperature took {spent:.2} CPU seconds");
    assert!(
        spent < 1.0,
        "{spent:.2} CPU seconds: the prompt was tokenized first"
    );

    // While a long prompt is tokenized, another client is answered.
    let mut long = greedy(&huge, 8);
    long.max_tokens = Some(1);
    send(&mut stream, 2, "generate", &long);
    let mut other = connect(&daemon);
    assert_hello(&mut other);
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let still_working = matches!(
        stream.read(&mut byte),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
    );
    println!("hello answered while the long prompt was still being tokenized: {still_working}");
    stream.set_nonblocking(false).unwrap();
    let refused = response(&mut stream, &mut buffer)
        .unwrap()
        .outcome
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ContextLengthExceeded);
}
