//! Helpers for the end-to-end tests: where the fixtures and the built binaries are.
//!
//! The binaries come from the same `cargo build`/`cargo test` of the workspace (`scripts/test.sh`
//! builds them first); a missing one is reported with the command that builds it.
//!
//! [`Daemon`] runs `odmoed --foreground` on a temporary socket for the tests that talk to one.

pub mod cgroup;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use odmoe_client::Client;
use odmoe_protocol::StatsResult;
use tokio::net::UnixStream;
use tokio::time::timeout;

/// A committed fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The demo model, SmolLM2-135M-Instruct as a Q4_1 GGUF (a real dense Llama), fetched by
/// scripts/setup.sh into `$ODMOE_DEMO_DIR` (default `~/.cache/odmoe/demo`).
pub fn demo_gguf() -> PathBuf {
    let dir = std::env::var_os("ODMOE_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/odmoe/demo"));
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/setup.sh (it fetches the demo model)",
        gguf.display()
    );
    gguf
}

/// A workspace binary built beside this test executable (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The Python of the test environment `scripts/setup.sh` makes (`$ODMOE_TEST_VENV`, default
/// `~/.cache/odmoe/testvenv`), checked to import `modules`.
pub fn test_python(modules: &[&str]) -> PathBuf {
    let venv = std::env::var_os("ODMOE_TEST_VENV").map_or_else(
        || {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".cache/odmoe/testvenv")
        },
        PathBuf::from,
    );
    let python = venv.join("bin/python");
    let imports = Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        imports,
        "{} with {} not found: run scripts/setup.sh",
        python.display(),
        modules.join(", ")
    );
    python
}

/// Runs `odmoe` with `args`; panics (with stderr) if it fails or panics.
pub fn odmoe(args: &[&str]) -> Output {
    let output = Command::new(binary("odmoe"))
        .args(args)
        .output()
        .expect("spawn odmoe");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "odmoe panicked: {stderr}");
    output
}

/// Runs `odmoe` and returns stdout, asserting success.
pub fn odmoe_ok(args: &[&str]) -> String {
    let output = odmoe(args);
    assert!(
        output.status.success(),
        "odmoe {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 stdout")
}

/// A running `odmoed --foreground` with its own temporary directory (config home, socket, log),
/// killed and reaped when dropped, so that a test ending early leaves nothing behind.
///
/// Every end-to-end test that needs a daemon starts it here, so that a fix to how one is started,
/// waited for or stopped reaches all of them.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    limit: Duration,
    spec: DaemonBuilder,
}

/// How an `odmoed --foreground` is started; see [`Daemon::builder`].
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    program: Option<PathBuf>,
    model: Option<PathBuf>,
    config: Option<String>,
    args: Vec<OsString>,
    wrapper: Option<String>,
    limit: Duration,
    follows_memory_pressure: bool,
}

impl Daemon {
    /// How long a step of the daemon's life (starting, answering, exiting) may take unless
    /// [`DaemonBuilder::limit`] says otherwise.
    pub const LIMIT: Duration = Duration::from_secs(120);

    /// An `odmoed` serving no model, with the default config, started directly.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            program: None,
            model: None,
            config: None,
            args: Vec::new(),
            wrapper: None,
            limit: Daemon::LIMIT,
            follows_memory_pressure: false,
        }
    }

    /// The socket it listens on, `<dir>/run/odmoed.sock`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its temporary directory, removed when it is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file `--config` names (written unless no config was given and the daemon follows
    /// memory pressure).
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("odmoed.toml")
    }

    /// Replaces its config file with `text`, under the rule the first one was written by
    /// (see [`DaemonBuilder::follow_memory_pressure`]); a SIGHUP makes it read the file.
    pub fn rewrite_config(&self, text: &str) {
        let text = self.spec.config_text(Some(text)).unwrap();
        fs::write(self.config_file(), text).unwrap();
    }

    /// The process id of the child: odmoed itself, or the wrapper until it `exec`s odmoed.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to [`Daemon::pid`].
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for it to exit, failing with its log after the limit.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + self.limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "odmoed did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until it answers `hello`, failing with its log if it exits first or takes longer
    /// than the limit.
    pub async fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + self.limit;
        loop {
            if let Ok(Ok(mut client)) =
                timeout(Duration::from_secs(1), Client::connect(&self.socket)).await
                && let Ok(Ok(_)) = timeout(self.limit, client.hello()).await
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("odmoed exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "odmoed did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `stats` until `done` holds, failing with the last stats and the log after the limit.
    pub async fn stats_until(
        &self,
        what: &str,
        done: impl Fn(&StatsResult) -> bool,
    ) -> StatsResult {
        let deadline = Instant::now() + self.limit;
        loop {
            let stats = timeout(self.limit, self.client().await.stats())
                .await
                .unwrap()
                .unwrap();
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {stats:#?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Blocks until its socket accepts connections, failing with its log if it exits first or
    /// takes longer than the limit; for tests without an async runtime.
    pub fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + self.limit;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("odmoed exited ({status}) before listening:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "odmoed never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `odmoe ARGS --socket SOCKET` for it, with its home in the daemon's directory (see
    /// [`isolate`]), not yet started.
    pub fn odmoe_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("odmoe"));
        isolate(&mut command, self.dir());
        command.args(args).arg("--socket").arg(&self.socket);
        command
    }

    /// `odmoe ARGS --socket SOCKET` for it with `stdin`; its output, whatever the status,
    /// failing if odmoe panicked.
    pub fn odmoe_with_input(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .odmoe_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn odmoe");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "odmoe panicked: {stderr}");
        output
    }

    /// A client connected to it.
    pub async fn client(&self) -> Client {
        timeout(self.limit, Client::connect(&self.socket))
            .await
            .unwrap()
            .unwrap()
    }

    /// A plain connection to it, for bytes no client would send.
    pub async fn raw(&self) -> UnixStream {
        timeout(self.limit, UnixStream::connect(&self.socket))
            .await
            .unwrap()
            .unwrap()
    }

    /// Starts it again as it was first started, on the same socket and logging to a fresh
    /// file, once the previous process has exited; does not wait for it.
    pub fn respawn(&mut self) {
        self.child = self
            .spec
            .command(self.dir.path(), &self.socket)
            .spawn()
            .unwrap();
    }
}

impl DaemonBuilder {
    /// Runs `program` instead of the `odmoed` built beside the test executable.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Serves the model at `path` (`--model`).
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model = Some(path.into());
        self
    }

    /// Reads `text` as its config (`--config`, naming [`Daemon::config_file`]).
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }

    /// Passes `args` after the others.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Starts it through `script`, a shell command line run with `$0` = `odmoed` that ends by
    /// running `"$@"` (the odmoed command line).
    pub fn wrapper(mut self, script: impl Into<String>) -> Self {
        self.wrapper = Some(script.into());
        self
    }

    /// How long starting, each request of [`Daemon::client`] and [`Daemon::raw`], and exiting
    /// may take; [`Daemon::LIMIT`] unless set.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Lets it follow the machine's memory pressure, as a deployed daemon does. Otherwise a
    /// config without a `[memory]` table gets `adapt = false`: on a shared machine another
    /// process's pressure would drop a test's sessions and shrink its budget mid-test.
    pub fn follow_memory_pressure(mut self) -> Self {
        self.follows_memory_pressure = true;
        self
    }

    /// The config file's text, if one is written: `given`, with pressure left alone unless
    /// [`DaemonBuilder::follow_memory_pressure`] or its own `[memory]` table says so.
    fn config_text(&self, given: Option<&str>) -> Option<String> {
        const STEADY: &str = "[memory]\nadapt = false\n";
        if self.follows_memory_pressure || given.is_some_and(|text| text.contains("[memory]")) {
            return given.map(str::to_owned);
        }
        Some(match given {
            Some(text) => format!("{text}\n{STEADY}"),
            None => STEADY.to_owned(),
        })
    }

    /// Starts it in a new temporary directory, without waiting for it to serve.
    pub fn spawn(self) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("odmoed.sock");
        let child = self.command(dir.path(), &socket).spawn().unwrap();
        Daemon {
            child,
            dir,
            socket,
            limit: self.limit,
            spec: self,
        }
    }

    /// The command line, with the config file written into `dir` and stderr going to
    /// `dir/stderr`.
    fn command(&self, dir: &Path, socket: &Path) -> Command {
        let program = match &self.program {
            Some(program) => program.clone(),
            None => binary("odmoed"),
        };
        let mut command = match &self.wrapper {
            Some(script) => {
                let mut command = Command::new("sh");
                command.arg("-c").arg(script).arg("odmoed").arg(program);
                command
            }
            None => Command::new(program),
        };
        command.arg("--foreground").arg("--socket").arg(socket);
        if let Some(model) = &self.model {
            command.arg("--model").arg(model);
        }
        if let Some(config) = self.config_text(self.config.as_deref()) {
            let file = dir.join("odmoed.toml");
            fs::write(&file, config).unwrap();
            command.arg("--config").arg(file);
        }
        command.args(&self.args);
        isolate(&mut command, dir);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr")).unwrap());
        command
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points `command`'s home, config, state and runtime directories into `home` and drops the
/// variables that would change where it logs, which socket it uses or what it was passed, so
/// that the developer's own setup cannot leak in.
pub fn isolate(command: &mut Command, home: &Path) {
    command
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("runtime"))
        .env_remove("ODMOE_SOCKET")
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS");
}
