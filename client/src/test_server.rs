//! A stand-in daemon for the client's tests: one connection at a fresh
//! socket, answered by a function of the test's.

use std::path::PathBuf;

use odmoe_protocol::{
    GenerateResult, HelloResult, Message, MessageReader, Notification, Request, TOKEN_NOTIFICATION,
    TokenEvent, write_message,
};
use tokio::net::UnixListener;

/// Serves one connection at a fresh socket: `answer` gets each request and
/// returns the messages to send back; an empty answer hangs up.
pub fn serve(
    answer: impl Fn(Request) -> Vec<Message> + Send + 'static,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odmoed.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = UnixListener::from_std(listener).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut reader = MessageReader::new(read, 1 << 20);
            while let Ok(Some(Message::Request(request))) = reader.read_message().await {
                let messages = answer(request);
                if messages.is_empty() {
                    break;
                }
                for message in messages {
                    write_message(&mut write, &message).await.unwrap();
                }
            }
        });
    });
    (dir, path)
}

/// What the test server answers to `hello`.
pub fn hello_result() -> HelloResult {
    HelloResult {
        protocol_version: 1,
        server_version: "9.9.9".into(),
        model: Some("/models/m.odmoe".into()),
    }
}

/// A result of `text`, stopped for `finish_reason`.
pub fn generated(text: &str, finish_reason: &str) -> GenerateResult {
    GenerateResult {
        text: text.into(),
        tokens: vec![7; text.len()],
        finish_reason: finish_reason.into(),
        usage: odmoe_protocol::Usage::default(),
        timings: odmoe_protocol::Timings::default(),
    }
}

/// A `token` notification for request `id`.
pub fn token(id: u32, text: &str) -> Message {
    Notification::new(
        TOKEN_NOTIFICATION,
        &TokenEvent {
            id,
            text: text.into(),
            token: 7,
        },
    )
    .unwrap()
    .into()
}
