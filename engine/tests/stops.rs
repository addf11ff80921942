//! Where stop strings are sought: in all of a completion, in a chat reply's answer only.

mod common;

use candle_core::Device;
use common::fixture;
use odmoe_engine::generate::{FinishReason, GenerateRequest, ReplyForm, SamplingParams, Session};
use odmoe_engine::tokenizer::Tokenizer;

/// A chat whose template marks reasoning with `<think>`, asked with the tag opened: everything
/// the model writes is reasoning (the fixture's byte-level vocabulary has no `</think>` token to
/// close it). A stop string taken from that reasoning ends a completion there, but not a chat
/// reply, whose reasoning is passed through whole.
#[test]
fn stop_strings_are_sought_in_a_chat_replys_answer_not_its_reasoning() {
    let source = fixture("qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        source.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for message in messages %}{{ message.content }}{% endfor %}<think>",
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let model = odmoe_engine::open::resident(&source, &Device::Cpu).unwrap();
    let generate = |stop: &[String], reply: ReplyForm| {
        let request = GenerateRequest {
            prompt: tokenizer.encode("Say something<think>", false).unwrap(),
            max_tokens: 24,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: stop.to_vec(),
            ignore_eos: true,
            reply,
            ..Default::default()
        };
        Session::new(&model)
            .generate(&model, Some(&tokenizer), &request, |_| true)
            .unwrap()
    };
    let whole = generate(&[], ReplyForm::Chat);
    assert_eq!(whole.finish_reason, FinishReason::Length);
    // Two characters from the middle of the reasoning.
    let chars: Vec<char> = whole.text.chars().collect();
    assert!(chars.len() >= 8, "{:?}", whole.text);
    let stop: String = chars[chars.len() / 2..][..2].iter().collect();
    let at = whole.text.find(&stop).unwrap();

    let completion = generate(std::slice::from_ref(&stop), ReplyForm::Completion);
    assert_eq!(completion.finish_reason, FinishReason::Stop);
    assert_eq!(completion.text, whole.text[..at]);

    let chat = generate(std::slice::from_ref(&stop), ReplyForm::Chat);
    assert_eq!(chat.finish_reason, FinishReason::Length);
    assert_eq!((chat.text, chat.tokens), (whole.text, whole.tokens));

    // Shown the answer only, the reply has no text: all of it was reasoning.
    let answer = generate(std::slice::from_ref(&stop), ReplyForm::ChatAnswer);
    assert_eq!(answer.finish_reason, FinishReason::Length);
    assert_eq!(answer.text, "");
}
