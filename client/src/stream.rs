//! Generations as they happen: [`Client::generate_streaming`] and
//! [`Client::generate_with_events`] hand each event of a request to the
//! caller and send `cancel` when the caller's future completes first.

use odmoe_protocol::{
    CancelParams, GenerateParams, GenerateResult, Message, Method, Notification,
    QUEUED_NOTIFICATION, QueuedEvent, STARTED_NOTIFICATION, StartedEvent, TOKEN_NOTIFICATION,
    TokenEvent,
};

use crate::client::decode;
use crate::{Client, ClientError};

/// What happens to a generation before its result, as the daemon tells it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GenerateEvent<'a> {
    /// It waits behind `position` others.
    Queued { position: u32 },
    /// It left the queue: its prompt of this many tokens is computed now.
    Started { prompt_tokens: u32 },
    /// Text generated.
    Token(&'a TokenEvent),
}

/// Hands `notification` to `on_event` when it is about request `msgid`; false
/// when it is not (it is kept for [`Client::take_notifications`]).
fn notify_event(
    msgid: u32,
    notification: &Notification,
    on_event: &mut impl FnMut(GenerateEvent<'_>),
) -> bool {
    let params = || notification.params.clone();
    match notification.method.as_str() {
        TOKEN_NOTIFICATION => match odmoe_protocol::from_value::<TokenEvent>(params()) {
            Ok(token) if token.id == msgid => on_event(GenerateEvent::Token(&token)),
            _ => return false,
        },
        QUEUED_NOTIFICATION => match odmoe_protocol::from_value::<QueuedEvent>(params()) {
            Ok(queued) if queued.id == msgid => on_event(GenerateEvent::Queued {
                position: queued.position,
            }),
            _ => return false,
        },
        STARTED_NOTIFICATION => match odmoe_protocol::from_value::<StartedEvent>(params()) {
            Ok(started) if started.id == msgid => on_event(GenerateEvent::Started {
                prompt_tokens: started.prompt_tokens,
            }),
            _ => return false,
        },
        _ => return false,
    }
    true
}

impl Client {
    /// Calls `generate` or `chat` (`method`) and returns its result, calling
    /// `on_token` for each `token` notification of this request as it arrives
    /// (when `params.stream` is true, the default).
    ///
    /// If `cancel` completes before the result, a `cancel` request is sent and
    /// reading goes on until the result, whose `finish_reason` is then
    /// "cancelled". Pass `std::future::pending()` to never cancel.
    pub async fn generate_streaming<F, C>(
        &mut self,
        method: Method,
        params: &GenerateParams,
        mut on_token: F,
        cancel: C,
    ) -> Result<GenerateResult, ClientError>
    where
        F: FnMut(&TokenEvent),
        C: Future<Output = ()>,
    {
        let on_event = |event: GenerateEvent<'_>| {
            if let GenerateEvent::Token(token) = event {
                on_token(token);
            }
        };
        self.generate_with_events(method, params, on_event, cancel)
            .await
    }

    /// [`Client::generate_streaming`], telling `on_event` also when the
    /// request waits in the queue and when its prompt starts computing.
    pub async fn generate_with_events<F, C>(
        &mut self,
        method: Method,
        params: &GenerateParams,
        mut on_event: F,
        cancel: C,
    ) -> Result<GenerateResult, ClientError>
    where
        F: FnMut(GenerateEvent<'_>),
        C: Future<Output = ()>,
    {
        let msgid = self.send_request(method.name(), params).await?;
        let mut cancel = std::pin::pin!(cancel);
        let mut cancel_sent = false;
        loop {
            let message = tokio::select! {
                message = self.reader.read_message() => message?,
                () = &mut cancel, if !cancel_sent => {
                    cancel_sent = true;
                    // Its answer is skipped like any response to another msgid.
                    self.send_request(Method::Cancel.name(), &CancelParams { id: msgid })
                        .await?;
                    continue;
                }
            };
            match message {
                Some(Message::Response(response)) if response.msgid == msgid => {
                    let result = response.outcome.map_err(ClientError::Rpc)?;
                    return decode(method.name(), result);
                }
                Some(Message::Notification(notification)) => {
                    if !notify_event(msgid, &notification, &mut on_event) {
                        self.notifications.push_back(notification);
                    }
                }
                other => self.keep_or_fail(other)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use odmoe_protocol::{Response, Value, to_value};

    use super::*;
    use crate::test_server::{generated, serve, token};

    #[tokio::test]
    async fn streamed_tokens_reach_the_callback_in_order() {
        let (_dir, path) = serve(|request| {
            assert_eq!(request.method, "generate");
            let params: GenerateParams = request.parse_params().unwrap();
            assert_eq!(params.prompt.as_deref(), Some("Hi"));
            let id = request.msgid;
            vec![
                token(id, "a"),
                // Another request's token is not this one's.
                token(id + 50, "x"),
                token(id, "b"),
                Response::ok(id, to_value(&generated("ab", "length")).unwrap()).into(),
            ]
        });
        let mut client = Client::connect(&path).await.unwrap();
        let params = GenerateParams {
            prompt: Some("Hi".into()),
            ..GenerateParams::default()
        };
        let mut texts = Vec::new();
        let result = client
            .generate_streaming(
                Method::Generate,
                &params,
                |event| texts.push(event.text.clone()),
                std::future::pending(),
            )
            .await
            .unwrap();
        assert_eq!(texts, ["a", "b"]);
        assert_eq!(result, generated("ab", "length"));
        assert_eq!(client.take_notifications().len(), 1);
    }

    #[tokio::test]
    async fn a_completed_cancel_future_sends_cancel_and_waits_for_the_result() {
        let generate_id = std::sync::Mutex::new(0);
        let (_dir, path) = serve(move |request| match request.method.as_str() {
            "chat" => {
                *generate_id.lock().unwrap() = request.msgid;
                vec![token(request.msgid, "a")]
            }
            "cancel" => {
                let params: CancelParams = request.parse_params().unwrap();
                let id = *generate_id.lock().unwrap();
                assert_eq!(params.id, id);
                vec![
                    Response::ok(request.msgid, Value::Map(vec![])).into(),
                    token(id, "b"),
                    Response::ok(id, to_value(&generated("ab", "cancelled")).unwrap()).into(),
                ]
            }
            other => panic!("unexpected {other}"),
        });
        let mut client = Client::connect(&path).await.unwrap();
        let (first, first_seen) = tokio::sync::oneshot::channel();
        let mut first = Some(first);
        let mut texts = String::new();
        let result = client
            .generate_streaming(
                Method::Chat,
                &GenerateParams::default(),
                |event| {
                    texts.push_str(&event.text);
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                },
                async {
                    let _ = first_seen.await;
                },
            )
            .await
            .unwrap();
        assert_eq!(result.finish_reason, "cancelled");
        assert_eq!(texts, "ab");
    }
}
