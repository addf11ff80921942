//! `odmoe chat`: a conversation with the daemon's model.
//!
//! On a terminal it is interactive: a line editor with history, replies streamed as they are
//! generated, and a few slash commands. Otherwise the whole of stdin is one user message and the
//! reply goes to stdout, for scripts. The conversation lives in one daemon session: each turn
//! sends only its new message, and the daemon prefills only what is new since the last turn. A
//! named session (`--session NAME`) goes on across runs, piped or interactive.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use odmoe_client::{Client, ClientError};
use odmoe_protocol::{ChatMessage, GenerateParams, GenerateResult, Method};
use rustyline::error::ReadlineError;

use crate::daemon::{self, SamplingArgs, SocketArgs};

#[derive(Args)]
#[command(after_help = "Interactive commands (on a terminal):\n\
    \x20 /reset        start a new conversation (the system message stays)\n\
    \x20 /system TEXT  set the system message; /system alone shows it\n\
    \x20 /stats        the daemon's stats\n\
    \x20 /help         this list\n\
    \x20 /exit         leave (as does Ctrl-D)\n\n\
    Ctrl-C while a reply streams cancels the reply; at the prompt it clears the line.\n\
    With stdin not a terminal, all of stdin is one message and the reply is printed:\n\
    \x20 echo \"Why is the sky blue?\" | odmoe chat --max-tokens 200")]
pub struct ChatArgs {
    /// System message that opens the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Name of the daemon session that keeps this conversation (its messages and KV cache), to go
    /// on with it in a later run; with --system it starts over [default: a new conversation].
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    socket: SocketArgs,
}

/// The conversation so far and how to continue it.
struct Chat {
    system: Option<String>,
    /// User and assistant turns of this run, oldest first, sent again when the conversation
    /// starts over under a new system message.
    turns: Vec<ChatMessage>,
    session: String,
    /// The next request starts the daemon's conversation over: the system message and this
    /// run's turns, then the new message.
    restart: bool,
    sampling: SamplingArgs,
}

impl Chat {
    fn new(args: &ChatArgs) -> Chat {
        let session = args.session.clone().unwrap_or_else(|| {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("chat-{}-{}", std::process::id(), since_epoch.as_millis())
        });
        Chat {
            system: args.system.clone(),
            turns: Vec::new(),
            session,
            restart: args.session.is_none() || args.system.is_some(),
            sampling: args.sampling.clone(),
        }
    }

    /// The request for the next reply, after the user's `text`.
    fn request(&self, text: &str) -> GenerateParams {
        let mut messages = Vec::new();
        if self.restart {
            messages.extend(self.system.iter().map(|system| message("system", system)));
            messages.extend(self.turns.iter().cloned());
        }
        messages.push(message("user", text));
        GenerateParams {
            messages: Some(messages),
            session: Some(self.session.clone()),
            new_conversation: self.restart,
            ..self.sampling.params()
        }
    }

    /// Keeps a finished turn, which the daemon kept too. A cancelled reply is kept as far as it
    /// went, as it was shown.
    fn record(&mut self, text: &str, reply: &GenerateResult) {
        self.turns.push(message("user", text));
        self.turns.push(message("assistant", &reply.text));
        self.restart = false;
    }

    /// Starts a new conversation at the next turn.
    fn reset(&mut self) {
        self.turns.clear();
        self.restart = true;
    }

    /// Sets the system message; the conversation so far is sent again under it.
    fn set_system(&mut self, system: &str) {
        self.system = Some(system.to_owned());
        self.restart = true;
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    if std::io::stdin().is_terminal() {
        interactive(&args)
    } else {
        one_shot(&args)
    }
}

/// stdin is one message; the reply goes to stdout.
fn one_shot(args: &ChatArgs) -> Result<()> {
    let text = crate::complete::read_stdin()?;
    let text = text.trim();
    if text.is_empty() {
        bail!("stdin is empty: nothing to say");
    }
    let mut params = Chat::new(args).request(text);
    // One turn needs nothing kept after it, unless the session is named.
    params.session = args.session.clone();
    let runtime = daemon::runtime()?;
    let reply = runtime.block_on(async {
        let mut client = args.socket.connect().await?;
        reply(&mut client, &params).await
    })?;
    if reply.finish_reason == "cancelled" {
        std::process::exit(130);
    }
    Ok(())
}

/// Streams the reply to `params` to stdout, ending the line; Ctrl-C cancels it.
async fn reply(client: &mut Client, params: &GenerateParams) -> Result<GenerateResult> {
    let mut stdout = std::io::stdout().lock();
    let mut closed = false;
    let result = daemon::generate(
        client,
        Method::Chat,
        params,
        |event| {
            if !closed && !event.text.is_empty() {
                closed = write!(stdout, "{}", event.text)
                    .and_then(|()| stdout.flush())
                    .is_err();
            }
        },
        daemon::ctrl_c(),
    )
    .await?;
    let _ = writeln!(stdout);
    Ok(result)
}

const HELP: &str = "\
/reset        start a new conversation (the system message stays)
/system TEXT  set the system message; /system alone shows it
/stats        the daemon's stats
/help         this list
/exit         leave (as does Ctrl-D)
Ctrl-C cancels a reply while it streams, and clears the line at the prompt.";

/// A line editor loop until /exit or Ctrl-D.
fn interactive(args: &ChatArgs) -> Result<()> {
    let runtime = daemon::runtime()?;
    // Connect first, so a daemon that is not running is said at once.
    let mut client = Some(runtime.block_on(args.socket.connect())?);
    let hello = runtime
        .block_on(client.as_mut().expect("just connected").hello())
        .map_err(daemon::explain)?;
    let model = hello.model.as_deref().unwrap_or("no model loaded");
    println!(
        "odmoed {} ({model}). /help lists commands, Ctrl-D leaves.",
        hello.server_version
    );

    let config = rustyline::Config::builder()
        .max_history_size(1000)
        .context("history size")?
        .history_ignore_dups(true)
        .context("history settings")?
        .history_ignore_space(true)
        .build();
    let mut editor =
        rustyline::DefaultEditor::with_config(config).context("cannot start the line editor")?;
    let history = history_path();
    if let Some(path) = &history {
        // No history yet is fine.
        let _ = editor.load_history(path);
    }
    let mut chat = Chat::new(args);
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(error).context("cannot read a line"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        if let Some(command) = text.strip_prefix('/') {
            let (name, rest) = command
                .split_once(char::is_whitespace)
                .unwrap_or((command, ""));
            let rest = rest.trim();
            match name {
                "exit" | "quit" | "bye" => break,
                "help" | "?" => println!("{HELP}"),
                "reset" | "clear" => {
                    chat.reset();
                    println!("(new conversation)");
                }
                "system" if rest.is_empty() => match &chat.system {
                    Some(system) => println!("{system}"),
                    None => println!("(no system message)"),
                },
                "system" => {
                    chat.set_system(rest);
                    println!("(system message set)");
                }
                "stats" => {
                    let stats = runtime.block_on(async {
                        let client = connected(&mut client, &args.socket).await?;
                        crate::stats::fetch(client).await
                    });
                    match stats {
                        Ok(stats) => print!("{}", crate::stats::summary(&stats)),
                        Err(error) => report(&mut client, &error),
                    }
                }
                _ => println!("unknown command /{name}; /help lists them"),
            }
            continue;
        }
        let params = chat.request(text);
        let result = runtime.block_on(async {
            let client = connected(&mut client, &args.socket).await?;
            reply(client, &params).await
        });
        match result {
            Ok(result) => {
                if result.finish_reason == "cancelled" {
                    eprintln!("(cancelled)");
                }
                chat.record(text, &result);
            }
            Err(error) => report(&mut client, &error),
        }
    }
    if let Some(path) = &history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(error) = editor.save_history(path) {
            eprintln!(
                "odmoe: cannot save the history to {}: {error}",
                path.display()
            );
        }
    }
    Ok(())
}

/// The connection, made again if the last one broke.
async fn connected<'a>(
    client: &'a mut Option<Client>,
    socket: &SocketArgs,
) -> Result<&'a mut Client> {
    if client.is_none() {
        *client = Some(socket.connect().await?);
    }
    Ok(client.as_mut().expect("connected above"))
}

/// Shows an error and drops a connection it may have broken; the chat goes on.
fn report(client: &mut Option<Client>, error: &anyhow::Error) {
    eprintln!("odmoe: error: {error:#}");
    let broken = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ClientError>(),
            Some(ClientError::Closed | ClientError::Io(_) | ClientError::Protocol(_))
        )
    });
    if broken {
        *client = None;
    }
}

/// Where the chat history lives: `$XDG_STATE_HOME/odmoe/chat_history` (else
/// `~/.local/state/...`) on Linux, `~/Library/Application Support/odmoe/chat_history` on macOS.
fn history_path() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    let home = env("HOME");
    let dir = if cfg!(target_os = "macos") {
        home?.join("Library/Application Support")
    } else {
        env("XDG_STATE_HOME").or_else(|| Some(home?.join(".local/state")))?
    };
    Some(dir.join("odmoe").join("chat_history"))
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::{Timings, Usage};

    use super::*;

    fn args(system: Option<&str>, session: Option<&str>) -> ChatArgs {
        ChatArgs {
            system: system.map(str::to_owned),
            session: session.map(str::to_owned),
            sampling: SamplingArgs {
                max_tokens: Some(5),
                ..SamplingArgs::default()
            },
            socket: SocketArgs { socket: None },
        }
    }

    fn roles(params: &GenerateParams) -> Vec<String> {
        let messages = params.messages.as_ref().unwrap();
        messages.iter().map(|m| m.role.clone()).collect()
    }

    fn reply(text: &str) -> GenerateResult {
        GenerateResult {
            text: text.into(),
            tokens: vec![1, 2],
            finish_reason: "stop".into(),
            usage: Usage::default(),
            timings: Timings::default(),
        }
    }

    #[test]
    fn each_turn_sends_only_what_is_new_to_the_session() {
        let mut chat = Chat::new(&args(Some("Be brief."), None));
        let first = chat.request("Hi");
        assert_eq!(roles(&first), ["system", "user"]);
        assert!(first.new_conversation);
        assert_eq!(first.max_tokens, Some(5));
        chat.record("Hi", &reply("Hello."));
        let second = chat.request("And?");
        assert_eq!(roles(&second), ["user"]);
        assert!(!second.new_conversation);
        assert_eq!(first.session, second.session);
        assert!(first.session.as_ref().unwrap().starts_with("chat-"));
    }

    #[test]
    fn a_new_system_message_starts_over_with_the_turns_so_far() {
        let mut chat = Chat::new(&args(None, None));
        chat.record("Hi", &reply("Hello."));
        chat.set_system("Be brief.");
        let next = chat.request("And?");
        assert_eq!(roles(&next), ["system", "user", "assistant", "user"]);
        assert_eq!(next.messages.as_ref().unwrap()[2].content, "Hello.");
        assert!(next.new_conversation);
        chat.reset();
        assert_eq!(roles(&chat.request("Again")), ["system", "user"]);
    }

    #[test]
    fn a_named_session_goes_on_unless_a_system_message_is_given() {
        let going_on = Chat::new(&args(None, Some("bob"))).request("Hi");
        assert!(!going_on.new_conversation);
        assert_eq!(going_on.session.as_deref(), Some("bob"));
        let over = Chat::new(&args(Some("Be brief."), Some("bob"))).request("Hi");
        assert!(over.new_conversation);
    }
}
