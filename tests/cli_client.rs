//! The `odmoe` client commands against a real `odmoed` on a temporary socket, serving the
//! committed Qwen3-MoE fixture.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use odmoe_e2e::{Daemon, binary, fixture, isolate, odmoe_ok};
use serde_json::Value;

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// What these tests add to the shared [`Daemon`].
trait DaemonExt {
    /// An `odmoed --foreground` serving the qwen3_moe fixture, its config and home in a
    /// temporary directory, listening.
    fn start() -> Self;

    /// `odmoe ARGS --socket SOCKET`, which must succeed; its stdout.
    fn odmoe_ok(&self, args: &[&str]) -> String;
}

impl DaemonExt for Daemon {
    fn start() -> Daemon {
        // Bounded so that a daemon that never listens fails the test instead of hanging it.
        let mut daemon = Daemon::builder()
            .model(fixture("qwen3_moe"))
            .limit(Duration::from_secs(300))
            .spawn();
        daemon.wait_until_listening();
        daemon
    }

    fn odmoe_ok(&self, args: &[&str]) -> String {
        let output = self.odmoe_with_input(args, "");
        assert!(
            output.status.success(),
            "odmoe {args:?} failed: {}\nodmoed log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

/// `command` with the user's config, history and socket kept out of the way.
fn isolated(mut command: Command, home: &Path) -> Command {
    isolate(&mut command, home);
    command
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{error}: {text}"))
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// `odmoe run` on the fixture in this process, as the reference for the daemon's answers.
fn run_json(args: &[&str]) -> Value {
    let model = fixture("qwen3_moe");
    let mut all = vec!["run", "--model", s(&model), "--json"];
    all.extend_from_slice(args);
    json(&odmoe_ok(&all))
}

#[test]
fn stats_json_has_the_stable_keys() {
    let daemon = Daemon::start();
    let stats = json(&daemon.odmoe_ok(&["stats", "--json"]));
    assert_eq!(
        keys(&stats),
        [
            "memory",
            "model",
            "pid",
            "queue",
            "requests",
            "rss_bytes",
            "server_version",
            "sessions",
            "store",
            "uptime_s",
        ]
    );
    assert_eq!(stats["pid"], daemon.pid());
    assert_eq!(keys(&stats["queue"]), ["running", "waiting"]);
    assert_eq!(
        keys(&stats["sessions"]),
        ["count", "kv_bytes", "prefix_bytes", "prefixes"]
    );
    assert_eq!(
        keys(&stats["memory"]),
        [
            "adapt",
            "adjustments",
            "base_bytes",
            "budget_bytes",
            "ceiling_bytes",
            "floor_bytes",
            "grow_in_s",
            "headroom_bytes",
            "kv_bytes",
            "kv_reserve_bytes",
            "level",
            "limit_bytes",
            "reason",
            "simulated",
            "source",
            "target_bytes",
        ]
    );
    let model = &stats["model"];
    assert_eq!(model["architecture"], "qwen3_moe", "{stats}");
    assert_eq!(model["layers"], 3);
    assert_eq!(model["experts_per_layer"], 8);
    assert_eq!(model["experts_per_token"], 3);

    let summary = daemon.odmoe_ok(&["stats"]);
    for part in ["odmoed", "qwen3_moe", "queue", "sessions"] {
        assert!(summary.contains(part), "{part:?} missing from\n{summary}");
    }
}

/// One expert's bytes are the mean over the layers that have experts: DeepSeek-V3's first
/// layer is dense and holds none (counted, it made the figure two thirds of the fixture's).
#[test]
fn stats_give_one_experts_bytes_over_the_layers_with_experts() {
    let model = fixture("gguf/deepseek_v3-bf16.gguf");
    let inspected = json(&odmoe_ok(&["inspect", s(&model), "--json"]));
    assert!(inspected["moe_layers"].as_u64() < inspected["layers"].as_u64());
    let mut daemon = Daemon::builder()
        .model(&model)
        .limit(Duration::from_secs(300))
        .spawn();
    daemon.wait_until_listening();
    let stats = json(&daemon.odmoe_ok(&["stats", "--json"]));
    let described = &stats["model"];
    assert_eq!(described["architecture"], "deepseek_v3", "{stats}");
    assert_eq!(
        described["expert_bytes"], inspected["expert_bytes_in_memory"],
        "{stats}"
    );
    assert_eq!(
        described["total_expert_bytes"], inspected["total_expert_bytes_in_memory"],
        "{stats}"
    );
}

#[test]
fn ps_shows_the_loaded_model() {
    let daemon = Daemon::start();
    let ps = json(&daemon.odmoe_ok(&["ps", "--json"]));
    assert_eq!(
        keys(&ps),
        [
            "budget_bytes",
            "mode",
            "model",
            "pressure",
            "queue",
            "resident_bytes",
            "sessions",
            "simulated",
            "target_bytes",
            "unloads_in_s"
        ]
    );
    assert!(ps["model"].as_str().unwrap().ends_with("qwen3_moe"), "{ps}");
    // The default keep_alive keeps the model loaded.
    assert!(ps["unloads_in_s"].is_null(), "{ps}");
    let table = daemon.odmoe_ok(&["ps"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("MODEL") && lines[1].contains("qwen3_moe"));
}

#[test]
fn complete_gives_the_tokens_run_gives() {
    let daemon = Daemon::start();
    let prompt = "The quick brown fox";
    let expected = run_json(&["--prompt", prompt, "--greedy", "--max-tokens", "8"]);
    let got = json(&daemon.odmoe_ok(&[
        "complete",
        prompt,
        "--greedy",
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert_eq!(got["tokens"], expected["tokens"], "{got}");
    assert_eq!(got["text"], expected["text"]);
    assert_eq!(got["finish_reason"], expected["finish_reason"]);

    // Streamed, and from stdin: the same text, then a line break.
    let streamed = daemon.odmoe_with_input(
        &["complete", "--greedy", "--max-tokens", "8"],
        &format!("{prompt}\n"),
    );
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8(streamed.stdout).unwrap(),
        format!("{}\n", expected["text"].as_str().unwrap())
    );
}

#[test]
fn chat_with_piped_stdin_prints_the_reply() {
    let daemon = Daemon::start();
    let expected = run_json(&[
        "--prompt",
        "Hello there",
        "--chat",
        "--system",
        "Be brief.",
        "--greedy",
        "--max-tokens",
        "8",
    ]);
    let output = daemon.odmoe_with_input(
        &[
            "chat",
            "--system",
            "Be brief.",
            "--greedy",
            "--max-tokens",
            "8",
        ],
        "Hello there\n",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("{}\n", expected["text"].as_str().unwrap())
    );
}

#[test]
fn interrupting_a_completion_cancels_it() {
    let daemon = Daemon::start();
    let mut child = daemon
        .odmoe_command(&[
            "complete",
            "Once upon a time",
            "--ignore-eos",
            "--max-tokens",
            "3500",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first streamed bytes show the generation has started.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    // The daemon is free again, and says how the request ended.
    let stats = json(&daemon.odmoe_ok(&["stats", "--json"]));
    assert_eq!(stats["queue"]["running"], 0, "{stats}");
}

#[test]
fn unload_then_load_changes_what_ps_shows() {
    let daemon = Daemon::start();
    daemon.odmoe_ok(&["unload"]);
    let ps = json(&daemon.odmoe_ok(&["ps", "--json"]));
    assert!(ps["model"].is_null(), "{ps}");
    let model = fixture("qwen3_moe");
    let loaded = daemon.odmoe_ok(&["load", s(&model), "--expert-budget", "50%"]);
    assert!(loaded.starts_with("loaded "), "{loaded}");
    let ps = json(&daemon.odmoe_ok(&["ps", "--json"]));
    assert!(ps["model"].as_str().unwrap().ends_with("qwen3_moe"), "{ps}");
    assert_eq!(ps["mode"], "on_demand", "{ps}");
}

#[test]
fn stop_makes_the_daemon_exit_cleanly() {
    let mut daemon = Daemon::start();
    let out = daemon.odmoe_ok(&["stop"]);
    assert_eq!(out, "odmoed stopped\n");
    let status = daemon.wait_for_exit();
    assert!(status.success(), "odmoed exited with {status}");
    assert!(!daemon.socket().exists());
}

#[test]
fn a_missing_daemon_is_named_with_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let model = fixture("qwen3_moe");
    let commands: [&[&str]; 8] = [
        &["stats"],
        &["stats", "--json"],
        &["ps"],
        &["complete", "hi"],
        &["chat"],
        &["load", s(&model)],
        &["unload"],
        &["stop"],
    ];
    for args in commands {
        for by_env in [false, true] {
            let mut command = isolated(Command::new(binary("odmoe")), dir.path());
            command.args(args).stdin(Stdio::piped());
            if by_env {
                command.env("ODMOE_SOCKET", &socket);
            } else {
                command.args(["--socket", s(&socket)]);
            }
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Commands that connect first may exit before reading it.
            let _ = child.stdin.take().unwrap().write_all(b"hello");
            let output = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{args:?}");
            assert!(
                stderr.contains("is odmoed running?")
                    && stderr.contains(s(&socket))
                    && stderr.contains("start it with `odmoed` or `odmoe service install`"),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn service_install_dry_run_prints_the_units() {
    let home = tempfile::tempdir().unwrap();
    let socket = "/tmp/odmoe-test/odmoed.sock";
    let model = fixture("qwen3_moe");
    let run = |args: &[&str]| {
        let output = isolated(Command::new(binary("odmoe")), home.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let out = run(&[
        "service",
        "install",
        "--dry-run",
        "--socket",
        socket,
        "--model",
        s(&model),
    ]);
    let odmoed = binary("odmoed").canonicalize().unwrap();
    let daemon_line = format!(
        "{} --foreground --socket {socket} --model {}",
        odmoed.display(),
        model.display()
    );
    assert!(
        out.contains(&daemon_line),
        "{daemon_line:?} missing from\n{out}"
    );
    if cfg!(target_os = "linux") {
        let units = home.path().join("config/systemd/user");
        for part in [
            format!("==> {} <==\n", units.join("odmoed.service").display()),
            format!("==> {} <==\n", units.join("odmoed.socket").display()),
            format!("ExecStart={daemon_line}\n"),
            format!("ListenStream={socket}\n"),
            "systemctl --user daemon-reload\n".into(),
            "systemctl --user enable --now odmoed.socket\n".into(),
        ] {
            assert!(out.contains(&part), "{part:?} missing from\n{out}");
        }
        let out = run(&["service", "uninstall", "--dry-run"]);
        assert!(
            out.contains("systemctl --user disable --now odmoed.socket"),
            "{out}"
        );
        assert!(out.contains(&format!("rm -f {}", units.join("odmoed.socket").display())));
        let out = run(&["service", "status", "--dry-run", "--socket", socket]);
        assert!(out.contains("systemctl --user status"), "{out}");
    } else {
        assert!(out.contains(&format!("<string>{socket}</string>")), "{out}");
        assert!(out.contains("launchctl bootstrap gui/"), "{out}");
    }
    // Nothing was written.
    let left: Vec<_> = std::fs::read_dir(home.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn every_command_has_help() {
    let commands: [&[&str]; 18] = [
        &[],
        &["run"],
        &["logits"],
        &["convert"],
        &["verify"],
        &["inspect"],
        &["bench"],
        &["chat"],
        &["complete"],
        &["stats"],
        &["ps"],
        &["load"],
        &["unload"],
        &["stop"],
        &["service"],
        &["service", "install"],
        &["service", "uninstall"],
        &["service", "status"],
    ];
    let client = [
        "chat",
        "complete",
        "stats",
        "ps",
        "load",
        "unload",
        "stop",
        "install",
        "uninstall",
        "status",
    ];
    for args in commands {
        let out = odmoe_ok(&[args, &["--help"]].concat());
        assert!(out.contains("Usage:"), "{args:?}:\n{out}");
        if args.last().is_some_and(|name| client.contains(name)) {
            assert!(
                out.contains("--socket <PATH>") && out.contains("ODMOE_SOCKET"),
                "{args:?}:\n{out}"
            );
        }
    }
    let top = odmoe_ok(&["--help"]);
    for name in [
        "chat", "complete", "stats", "ps", "load", "unload", "stop", "service",
    ] {
        assert!(
            top.lines().any(|line| line.trim_start().starts_with(name)),
            "{name} missing from\n{top}"
        );
    }
}
