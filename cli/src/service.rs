//! `odmoe service install|uninstall|status`: odmoed as a per-user service that starts when a
//! client first connects to its socket, under systemd (Linux) or launchd (macOS).
//!
//! The unit files are rendered from the templates in `launchd/` (see its README). `--dry-run`
//! prints the files and the commands instead of writing and running them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::daemon::{self, SocketArgs};

const SYSTEMD_SERVICE: &str = include_str!("../../launchd/odmoed.service");
const SYSTEMD_SOCKET: &str = include_str!("../../launchd/odmoed.socket");
const LAUNCHD_PLIST: &str = include_str!("../../launchd/dev.odmoe.odmoed.plist");
/// The launchd label, also the plist's file name.
const LAUNCHD_LABEL: &str = "dev.odmoe.odmoed";

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Install odmoed as a user service started on the first connection to its socket
    /// (systemd user units on Linux, a launchd agent on macOS) and start listening.
    Install(InstallArgs),
    /// Stop the service and remove its files.
    Uninstall(CommonArgs),
    /// Show the service manager's view of odmoed, then whether the daemon answers.
    Status(CommonArgs),
}

#[derive(Args)]
pub struct CommonArgs {
    /// Print the files and commands instead of writing and running them.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct InstallArgs {
    /// The model the daemon serves from start [default: `model.path` from the config file].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Memory for cached experts: `auto`, bytes (8GiB) or a percentage (25%) [default:
    /// `model.expert_budget` from the config file].
    #[arg(long, value_name = "SIZE|PCT|auto", value_parser = crate::manage::parse_budget)]
    expert_budget: Option<String>,
    /// The odmoed binary [default: the one beside this odmoe, else the first on PATH].
    #[arg(long, value_name = "PATH")]
    odmoed: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// The service manager of this platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Manager {
    Systemd,
    Launchd,
}

const MANAGER: Manager = if cfg!(target_os = "macos") {
    Manager::Launchd
} else {
    Manager::Systemd
};

/// What a command does: files to write or remove, then commands to run.
#[derive(Debug, Default)]
struct Plan {
    /// Files and their contents, written after their directories are made.
    writes: Vec<(PathBuf, String)>,
    /// Directories to make (private) before anything runs, e.g. for logs.
    dirs: Vec<PathBuf>,
    /// Commands whose failure ends the plan.
    commands: Vec<Step>,
    /// Files removed after the commands.
    removes: Vec<PathBuf>,
    /// Commands run after the removals.
    after: Vec<Step>,
}

#[derive(Debug)]
struct Step {
    argv: Vec<String>,
    /// Whether a failure is expected and ignored (e.g. stopping what is not running).
    may_fail: bool,
}

fn step(argv: &[&str]) -> Step {
    Step {
        argv: argv.iter().map(|&arg| arg.to_owned()).collect(),
        may_fail: false,
    }
}

fn lenient(argv: &[&str]) -> Step {
    Step {
        may_fail: true,
        ..step(argv)
    }
}

pub fn run(command: ServiceCommand) -> Result<()> {
    match command {
        ServiceCommand::Install(args) => {
            let socket = absolute(&args.common.socket.path()?)?;
            let odmoed = match &args.odmoed {
                Some(path) => absolute(path)?,
                None => find_odmoed()?,
            };
            let model = match &args.model {
                Some(model) => {
                    let model = absolute(model)?;
                    if !model.exists() {
                        bail!("model {} does not exist", model.display());
                    }
                    Some(model)
                }
                None => None,
            };
            let mut argv = vec![
                odmoed.to_string_lossy().into_owned(),
                "--foreground".into(),
                "--socket".into(),
                socket.to_string_lossy().into_owned(),
            ];
            if let Some(model) = &model {
                argv.extend(["--model".into(), model.to_string_lossy().into_owned()]);
            }
            if let Some(budget) = &args.expert_budget {
                argv.extend(["--expert-budget".into(), budget.clone()]);
            }
            let plan = install_plan(MANAGER, &home()?, &socket, &argv)?;
            execute(&plan, args.common.dry_run)?;
            if !args.common.dry_run {
                println!(
                    "odmoed will start on the first connection to {}",
                    socket.display()
                );
            }
            Ok(())
        }
        ServiceCommand::Uninstall(args) => {
            let plan = uninstall_plan(MANAGER, &home()?)?;
            execute(&plan, args.dry_run)
        }
        ServiceCommand::Status(args) => status(&args),
    }
}

/// The files and commands that install the service.
fn install_plan(manager: Manager, home: &Path, socket: &Path, argv: &[String]) -> Result<Plan> {
    let mut plan = Plan::default();
    match manager {
        Manager::Systemd => {
            let units = systemd_unit_dir(home);
            plan.writes = vec![
                (units.join("odmoed.service"), systemd_service(argv)?),
                (units.join("odmoed.socket"), systemd_socket(socket)?),
            ];
            plan.commands = vec![
                step(&["systemctl", "--user", "daemon-reload"]),
                step(&["systemctl", "--user", "enable", "--now", "odmoed.socket"]),
            ];
        }
        Manager::Launchd => {
            let log = home.join("Library/Logs/odmoe/odmoed.log");
            let plist = launch_agent_path(home);
            plan.writes = vec![(plist.clone(), launchd_plist(argv, socket, &log)?)];
            // launchd makes the socket but not the directories above it or the log.
            plan.dirs = [socket.parent(), log.parent()]
                .into_iter()
                .flatten()
                .map(Path::to_owned)
                .collect();
            let domain = launchd_domain();
            let plist = plist.to_string_lossy().into_owned();
            plan.commands = vec![
                // A previous install is replaced.
                lenient(&["launchctl", "bootout", &format!("{domain}/{LAUNCHD_LABEL}")]),
                step(&["launchctl", "bootstrap", &domain, &plist]),
            ];
        }
    }
    Ok(plan)
}

/// The commands and removals that uninstall the service.
fn uninstall_plan(manager: Manager, home: &Path) -> Result<Plan> {
    let mut plan = Plan::default();
    match manager {
        Manager::Systemd => {
            let units = systemd_unit_dir(home);
            plan.commands = vec![lenient(&[
                "systemctl",
                "--user",
                "disable",
                "--now",
                "odmoed.socket",
                "odmoed.service",
            ])];
            plan.removes = vec![units.join("odmoed.service"), units.join("odmoed.socket")];
            plan.after = vec![step(&["systemctl", "--user", "daemon-reload"])];
        }
        Manager::Launchd => {
            let domain = launchd_domain();
            plan.commands = vec![lenient(&[
                "launchctl",
                "bootout",
                &format!("{domain}/{LAUNCHD_LABEL}"),
            ])];
            plan.removes = vec![launch_agent_path(home)];
        }
    }
    Ok(plan)
}

/// Prints the plan (`dry_run`) or carries it out.
fn execute(plan: &Plan, dry_run: bool) -> Result<()> {
    if dry_run {
        print!("{}", describe(plan));
        return Ok(());
    }
    for dir in &plan.dirs {
        private_dir(dir)?;
    }
    for (path, text) in &plan.writes {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    for step in &plan.commands {
        run_step(step)?;
    }
    for path in &plan.removes {
        match std::fs::remove_file(path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("cannot remove {}", path.display()));
            }
        }
    }
    for step in &plan.after {
        run_step(step)?;
    }
    Ok(())
}

/// What `--dry-run` prints: each file under a `==> PATH <==` line, then the commands as a
/// shell would run them.
fn describe(plan: &Plan) -> String {
    let mut out = String::from("# dry run: nothing is written, removed or run\n");
    for (path, text) in &plan.writes {
        let _ = writeln!(out, "\n==> {} <==", path.display());
        out.push_str(text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    let _ = writeln!(out, "\n==> commands <==");
    for dir in &plan.dirs {
        let _ = writeln!(
            out,
            "mkdir -p -m 700 {}",
            shell_word(&dir.to_string_lossy())
        );
    }
    for step in &plan.commands {
        let _ = writeln!(out, "{}", shell_words(&step.argv));
    }
    for path in &plan.removes {
        let _ = writeln!(out, "rm -f {}", shell_word(&path.to_string_lossy()));
    }
    for step in &plan.after {
        let _ = writeln!(out, "{}", shell_words(&step.argv));
    }
    out
}

fn run_step(step: &Step) -> Result<()> {
    let shown = shell_words(&step.argv);
    println!("running {shown}");
    let status = Command::new(&step.argv[0])
        .args(&step.argv[1..])
        .status()
        .with_context(|| format!("cannot run {}", step.argv[0]))?;
    if !status.success() && !step.may_fail {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// `systemctl --user status` or `launchctl print`, then a `hello` over the socket. Fails when
/// the daemon does not answer.
fn status(args: &CommonArgs) -> Result<()> {
    let socket = args.socket.path()?;
    let manager_step = match MANAGER {
        Manager::Systemd => step(&[
            "systemctl",
            "--user",
            "status",
            "--no-pager",
            "odmoed.socket",
            "odmoed.service",
        ]),
        Manager::Launchd => step(&[
            "launchctl",
            "print",
            &format!("{}/{LAUNCHD_LABEL}", launchd_domain()),
        ]),
    };
    if args.dry_run {
        println!("{}", shell_words(&manager_step.argv));
        println!("# then: hello over {}", socket.display());
        return Ok(());
    }
    // Not installed, or no user session manager: say so, then ask the daemon anyway (it may
    // have been started by hand).
    match Command::new(&manager_step.argv[0])
        .args(&manager_step.argv[1..])
        .status()
    {
        Ok(_) => {}
        Err(error) => eprintln!("odmoe: cannot run {}: {error}", manager_step.argv[0]),
    }
    println!();
    let runtime = daemon::runtime()?;
    let hello = runtime.block_on(async {
        let mut client = odmoe_client::Client::connect(&socket)
            .await
            .map_err(daemon::explain)?;
        client.hello().await.map_err(daemon::explain)
    })?;
    println!(
        "odmoed {} answers on {} (protocol {}), model: {}",
        hello.server_version,
        socket.display(),
        hello.protocol_version,
        hello.model.as_deref().unwrap_or("none loaded")
    );
    let _ = std::io::stdout().flush();
    Ok(())
}

/// `odmoed.service` for `argv` (the daemon and its arguments).
fn systemd_service(argv: &[String]) -> Result<String> {
    let exec_start = argv
        .iter()
        .map(|arg| systemd_word(arg))
        .collect::<Vec<_>>()
        .join(" ");
    render(SYSTEMD_SERVICE, &[("EXEC_START", &exec_start)])
}

/// `odmoed.socket` listening at `socket`.
fn systemd_socket(socket: &Path) -> Result<String> {
    let path = socket.to_string_lossy();
    if path.contains('\n') {
        bail!("socket path {path:?} holds a line break");
    }
    render(SYSTEMD_SOCKET, &[("SOCKET", &path.replace('%', "%%"))])
}

/// The launchd agent for `argv`, listening at `socket`, logging to `log`.
fn launchd_plist(argv: &[String], socket: &Path, log: &Path) -> Result<String> {
    let arguments = argv
        .iter()
        .map(|arg| format!("\t\t<string>{}</string>", xml_escape(arg)))
        .collect::<Vec<_>>()
        .join("\n");
    render(
        LAUNCHD_PLIST,
        &[
            ("PROGRAM_ARGUMENTS", &arguments),
            ("SOCKET", &xml_escape(&socket.to_string_lossy())),
            ("LOG", &xml_escape(&log.to_string_lossy())),
        ],
    )
}

/// `template` with every `{{NAME}}` replaced; a placeholder left over is a bug in the template.
fn render(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let end = rest.find("}}").map_or(rest.len(), |end| end + 2);
        bail!("unit template has no value for {}", &rest[..end]);
    }
    Ok(text)
}

/// One word of an `ExecStart=` line: quoted when it must be, `%` and `$` escaped.
fn systemd_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    let plain = !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'));
    if plain {
        escaped
    } else {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// `word` as a POSIX shell reads it back.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|word| shell_word(word))
        .collect::<Vec<_>>()
        .join(" ")
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|home| home.is_absolute())
        .context("$HOME is not set to an absolute path")
}

/// `$XDG_CONFIG_HOME/systemd/user`, else `~/.config/systemd/user`.
fn systemd_unit_dir(home: &Path) -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .unwrap_or_else(|| home.join(".config"))
        .join("systemd/user")
}

fn launch_agent_path(home: &Path) -> PathBuf {
    home.join("Library/LaunchAgents")
        .join(format!("{LAUNCHD_LABEL}.plist"))
}

/// `gui/UID`: the launchd domain of this user's login session.
fn launchd_domain() -> String {
    format!("gui/{}", nix::unistd::getuid())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// The `odmoed` installed with this `odmoe` (same directory), else the first on `PATH`.
fn find_odmoed() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.canonicalize().ok())
        .map(|exe| exe.with_file_name("odmoed"));
    if let Some(path) = &beside
        && path.is_file()
    {
        return Ok(path.clone());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("odmoed"))
            .find(|path| path.is_file() && path.is_absolute())
    });
    on_path.with_context(|| {
        let beside = beside.map_or_else(String::new, |path| format!("{} nor ", path.display()));
        format!("odmoed not found: neither {beside}on PATH; give it with --odmoed PATH")
    })
}

/// Makes `dir` (and its parents) with the new directory only the user can enter.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv() -> Vec<String> {
        [
            "/opt/odmoe bin/odmoed",
            "--foreground",
            "--socket",
            "/run/user/1000/odmoe/odmoed.sock",
            "--model",
            "/models/100%.odmoe",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn systemd_units_name_the_daemon_and_the_socket() {
        let socket = Path::new("/run/user/1000/odmoe/odmoed.sock");
        let plan = install_plan(Manager::Systemd, Path::new("/home/ada"), socket, &argv()).unwrap();
        let (service_path, service) = &plan.writes[0];
        assert!(service_path.ends_with("systemd/user/odmoed.service"));
        assert!(
            service.contains(
                "ExecStart=\"/opt/odmoe bin/odmoed\" --foreground --socket \
                 /run/user/1000/odmoe/odmoed.sock --model /models/100%%.odmoe\n"
            ),
            "{service}"
        );
        let (socket_path, unit) = &plan.writes[1];
        assert!(socket_path.ends_with("systemd/user/odmoed.socket"));
        assert!(unit.contains("ListenStream=/run/user/1000/odmoe/odmoed.sock\n"));
        let shown = describe(&plan);
        assert!(shown.contains("systemctl --user enable --now odmoed.socket"));
        assert!(!shown.contains("{{"));
    }

    #[test]
    fn the_launchd_agent_names_the_daemon_socket_and_log() {
        let socket = Path::new("/var/folders/x/T/odmoe/odmoed.sock");
        let plan =
            install_plan(Manager::Launchd, Path::new("/Users/ada"), socket, &argv()).unwrap();
        let (path, plist) = &plan.writes[0];
        assert_eq!(
            path,
            Path::new("/Users/ada/Library/LaunchAgents/dev.odmoe.odmoed.plist")
        );
        for part in [
            "<string>/opt/odmoe bin/odmoed</string>",
            "<string>/models/100%.odmoe</string>",
            "<key>SockPathName</key>\n\t\t\t<string>/var/folders/x/T/odmoe/odmoed.sock</string>",
            "<string>/Users/ada/Library/Logs/odmoe/odmoed.log</string>",
            "<key>RunAtLoad</key>",
        ] {
            assert!(plist.contains(part), "{part:?} missing from\n{plist}");
        }
        assert!(plan.dirs.contains(&PathBuf::from("/var/folders/x/T/odmoe")));
        assert!(describe(&plan).contains("launchctl bootstrap gui/"));
    }

    #[test]
    fn uninstalling_removes_what_installing_wrote() {
        let home = Path::new("/home/ada");
        let socket = Path::new("/run/user/1000/odmoe/odmoed.sock");
        for manager in [Manager::Systemd, Manager::Launchd] {
            let install = install_plan(manager, home, socket, &argv()).unwrap();
            let uninstall = uninstall_plan(manager, home).unwrap();
            let written: Vec<&PathBuf> = install.writes.iter().map(|(path, _)| path).collect();
            let removed: Vec<&PathBuf> = uninstall.removes.iter().collect();
            assert_eq!(written, removed, "{manager:?}");
        }
    }

    #[test]
    fn words_are_quoted_for_their_readers() {
        assert_eq!(systemd_word("/usr/bin/odmoed"), "/usr/bin/odmoed");
        assert_eq!(systemd_word("a b"), "\"a b\"");
        assert_eq!(systemd_word("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(systemd_word("$HOME"), "$$HOME");
        assert_eq!(shell_word("gui/501"), "gui/501");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(xml_escape("a<b&c"), "a&lt;b&amp;c");
    }

    #[test]
    fn templates_need_every_value() {
        assert!(
            render("x={{A}}", &[])
                .unwrap_err()
                .to_string()
                .contains("{{A}}")
        );
        assert_eq!(render("x={{A}}", &[("A", "1")]).unwrap(), "x=1");
    }
}
