//! Another user cannot pass their own program off as odmoed through the socket path: the daemon
//! refuses a socket directory that someone else could swap (a link, or a directory in a
//! directory they can write), and a client refuses a server run by another user before it sends
//! a byte.
//!
//! The attacks need a second user: the tests run as root, give the attacker's files to `nobody`
//! and run the fake server as `nobody`; they are skipped otherwise. A private sticky directory
//! stands in for /tmp.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, chown, lchown, symlink};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::User;
use odmoe_e2e::{Daemon, binary, isolate};

/// Environment variable that turns [`fake_server_helper`] on: the socket it listens on.
const FAKE_SERVER_VAR: &str = "ODMOE_TEST_FAKE_SERVER";

/// The user playing the attacker, `nobody`; `None`, with the reason printed, when the test
/// cannot act as a second user.
fn attacker() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can act as a second user");
        return None;
    }
    match User::from_name("nobody") {
        Ok(Some(user)) => Some(user),
        _ => {
            eprintln!("skipped: there is no user `nobody` to act as the attacker");
            None
        }
    }
}

/// A directory everyone can write, sticky like /tmp.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// `path`, given to `user` with `mode`, as if they had made it.
fn give(path: &Path, user: &User, mode: u32) {
    chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A link at `link` to `target`, made by `user`.
fn link_as(user: &User, target: &Path, link: &Path) {
    symlink(target, link).unwrap();
    lchown(link, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
}

/// Starts `odmoed --socket socket` and returns what it said when it exited, failing if it
/// serves instead.
fn refused_start(socket: &Path) -> String {
    let home = tempfile::tempdir().unwrap();
    let stderr = home.path().join("stderr");
    let mut command = Command::new(binary("odmoed"));
    command.arg("--foreground").arg("--socket").arg(socket);
    isolate(&mut command, home.path());
    let mut daemon = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Daemon::LIMIT;
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            let _ = daemon.kill();
            let _ = daemon.wait();
            panic!("odmoed started on {}", socket.display());
        }
        assert!(
            Instant::now() < deadline,
            "odmoed neither served nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = fs::read_to_string(stderr).unwrap();
    assert!(!status.success(), "{said}");
    said
}

/// A fake odmoed run by `user` at `socket` ([`fake_server_helper`]); `None` when the test
/// executable cannot be run as `user`.
fn fake_server(user: &User, socket: &Path) -> Option<Child> {
    let spawned = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fake_server_helper", "--nocapture"])
        .env(FAKE_SERVER_VAR, socket)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .stdout(Stdio::piped())
        .spawn();
    let mut server = match spawned {
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "skipped: the test executable cannot be run as {}",
                user.name
            );
            return None;
        }
        other => other.unwrap(),
    };
    let deadline = Instant::now() + Daemon::LIMIT;
    while fs::symlink_metadata(socket).is_err() {
        if let Some(status) = server.try_wait().unwrap() {
            panic!("the fake server exited ({status}) before listening");
        }
        assert!(Instant::now() < deadline, "the fake server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

/// What the fake server reported once it exited.
fn report(mut server: Child) -> String {
    let deadline = Instant::now() + Daemon::LIMIT;
    while server.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = server.kill();
            let _ = server.wait();
            panic!("the fake server never saw the client");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut said = String::new();
    server
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    said
}

/// The review's first attack begins with a link in /tmp, made by another user, that leads to a
/// directory of root's and is given to root's odmoed as its socket directory; once odmoed runs,
/// the attacker can re-point the link at a directory of their own.
#[test]
fn a_link_given_as_the_socket_directory_is_refused() {
    let Some(attacker) = attacker() else {
        return;
    };
    let shared = shared_dir();
    let roots = tempfile::tempdir().unwrap();
    fs::set_permissions(roots.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let link = shared.path().join("x");
    link_as(&attacker, roots.path(), &link);
    let said = refused_start(&link.join("odmoed.sock"));
    assert!(
        said.contains(&format!(
            "socket directory {} is a symbolic link",
            link.display()
        )),
        "{said}"
    );
}

/// The review's first attack, once the link is re-pointed: a fake server of the attacker's
/// listens where root's client looks for odmoed, and must not get root's prompt.
#[test]
fn a_client_sends_nothing_to_another_users_server() {
    let Some(attacker) = attacker() else {
        return;
    };
    let shared = shared_dir();
    let theirs = shared.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    give(&theirs, &attacker, 0o755);
    let link = shared.path().join("x");
    link_as(&attacker, &theirs, &link);
    let socket = link.join("odmoed.sock");
    let Some(server) = fake_server(&attacker, &socket) else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let mut client = Command::new(binary("odmoe"));
    client
        .args(["complete", "--socket"])
        .arg(&socket)
        .arg("password=hunter2");
    isolate(&mut client, home.path());
    let output = client.stdin(Stdio::null()).output().unwrap();
    let server_said = report(server);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        server_said.contains("received 0 bytes"),
        "the fake server got the request: {server_said}"
    );
    let refusal = format!(
        "refusing to use {}: the process listening there runs as uid {}, not as this user (uid 0)",
        socket.display(),
        attacker.uid
    );
    assert!(stderr.contains(&refusal), "{stderr}");
}

/// The review's second attack: root's odmoed is given a socket directory to create inside a
/// directory another user can write, who would rename it away and put their own in its place.
#[test]
fn a_socket_directory_that_another_user_could_rename_is_refused() {
    let Some(attacker) = attacker() else {
        return;
    };
    let shared = shared_dir();

    let theirs = shared.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    give(&theirs, &attacker, 0o777);
    let said = refused_start(&theirs.join("sub/odmoed.sock"));
    let owned = format!("{} belongs to uid {}", theirs.display(), attacker.uid);
    assert!(said.contains(&owned), "{said}");
    assert!(!theirs.join("sub").exists(), "nothing is made in it");

    // Open to all, even if root's own.
    let open = shared.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let said = refused_start(&open.join("sub/odmoed.sock"));
    let writable = format!(
        "{} can be written by other users and is not sticky",
        open.display()
    );
    assert!(said.contains(&writable), "{said}");
    assert!(!open.join("sub").exists(), "nothing is made in it");
}

/// Run by [`a_client_sends_nothing_to_another_users_server`] as the attacker; does
/// nothing otherwise. Listens at the socket named by [`FAKE_SERVER_VAR`], takes one connection
/// and prints how many bytes came before the client hung up (and what they said).
#[test]
fn fake_server_helper() {
    let Some(socket) = std::env::var_os(FAKE_SERVER_VAR).map(PathBuf::from) else {
        return;
    };
    // Bound under another name and then renamed, so that the socket appears already listening.
    let binding = socket.with_extension("binding");
    let listener = UnixListener::bind(&binding).unwrap();
    fs::rename(&binding, &socket).unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(Daemon::LIMIT)).unwrap();
    let mut received = [0; 4096];
    // Returns as soon as anything arrives, or with 0 when the client hangs up.
    let count = stream.read(&mut received).unwrap();
    println!(
        "received {count} bytes: {}",
        String::from_utf8_lossy(&received[..count])
    );
}
