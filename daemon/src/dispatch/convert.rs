//! What the scheduler and the engine answer, as protocol values: results,
//! model descriptions, counts and errors. The layers below dispatch never see
//! a protocol type.

use odmoe_engine::generate::FinishReason;
use odmoe_protocol::{
    ErrorCode, GenerateResult, ModelInfo, QueueStats, RpcError, SessionStats, Timings, Usage,
};

use crate::scheduler::{Finished, ModelDescription, QueueLength, SchedulerError, SessionsKept};

/// A count on the wire, saturating.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The engine's error as an answer: the caller's fault for bad requests,
/// the daemon's otherwise.
pub fn engine_error(error: odmoe_engine::Error) -> RpcError {
    match error {
        odmoe_engine::Error::InvalidRequest(message) => {
            RpcError::new(ErrorCode::InvalidParams, message)
        }
        odmoe_engine::Error::ContextLengthExceeded(message) => {
            RpcError::new(ErrorCode::ContextLengthExceeded, message)
        }
        other => RpcError::new(ErrorCode::Internal, other.to_string()),
    }
}

impl From<SchedulerError> for RpcError {
    fn from(error: SchedulerError) -> RpcError {
        let code = match error {
            SchedulerError::Engine(error) => return engine_error(error),
            SchedulerError::NoModel => ErrorCode::NoModel,
            SchedulerError::Cancelled(_) => ErrorCode::Cancelled,
            SchedulerError::Invalid(_) => ErrorCode::InvalidParams,
            SchedulerError::Stopped => ErrorCode::Internal,
        };
        RpcError::new(code, error.to_string())
    }
}

/// The result of a finished generation.
pub fn generate_result(finished: Finished) -> GenerateResult {
    let Finished {
        generation,
        queue_ms,
    } = finished;
    GenerateResult {
        finish_reason: match generation.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
        .into(),
        usage: Usage {
            prompt_tokens: count(generation.prompt_tokens),
            completion_tokens: count(generation.tokens.len()),
            cached_tokens: count(generation.cached_tokens),
        },
        timings: Timings {
            queue_ms,
            prefill_ms: generation.timings.prefill_ms,
            decode_ms: generation.timings.decode_ms,
        },
        text: generation.text,
        tokens: generation.tokens,
    }
}

/// `ModelInfo` of a loaded model, its budget as at load and no unload due.
pub fn model_info(model: &ModelDescription) -> ModelInfo {
    ModelInfo {
        path: model.path.display().to_string(),
        architecture: model.architecture.clone(),
        layers: count(model.layers),
        experts_per_layer: count(model.experts_per_layer),
        experts_per_token: count(model.experts_per_token),
        expert_bytes: model.expert_bytes,
        total_expert_bytes: model.total_expert_bytes,
        mode: model.mode.to_string(),
        budget_bytes: model.budget_bytes,
        unloads_in_s: None,
    }
}

/// The queue section of `stats`.
pub fn queue_stats(queue: QueueLength) -> QueueStats {
    QueueStats {
        waiting: count(queue.waiting),
        running: u32::from(queue.running),
    }
}

/// The sessions section of `stats`.
pub fn session_stats(sessions: SessionsKept) -> SessionStats {
    SessionStats {
        count: count(sessions.count),
        kv_bytes: sessions.kv_bytes,
    }
}
