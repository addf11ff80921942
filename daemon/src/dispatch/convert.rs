//! What the scheduler, the memory controller and the engine answer, as
//! protocol values: results, model descriptions, the models folder, counts,
//! memory and errors. The layers below dispatch never see
//! a protocol type.

use odmoe_engine::generate::FinishReason;
use odmoe_protocol::{
    AvailableModel, BudgetAdjustment, ErrorCode, GenerateResult, MemoryStats, ModelInfo,
    QueueStats, RpcError, SessionStats, Timings, Usage,
};

use crate::models_dir;
use crate::pressure::MemoryReport;
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
        prefixes: count(sessions.prefixes),
        prefix_bytes: sessions.prefix_bytes,
    }
}

/// The `memory` section of `stats`, and the answer to `pressure`.
pub fn memory_stats(report: MemoryReport) -> MemoryStats {
    MemoryStats {
        level: report.level.as_str().to_owned(),
        reason: report.reason,
        source: report.source,
        simulated: report.simulated,
        adapt: report.adapt,
        headroom_bytes: report.headroom.as_ref().map(|h| h.available),
        limit_bytes: report.headroom.as_ref().map(|h| h.limit),
        budget_bytes: report.budget_bytes,
        target_bytes: report.target_bytes,
        floor_bytes: report.floor_bytes,
        ceiling_bytes: report.ceiling_bytes,
        base_bytes: report.base_bytes,
        kv_reserve_bytes: report.kv_reserve_bytes,
        kv_bytes: report.kv_bytes,
        grow_in_s: report.grow_in.map(|due| due.as_secs_f64()),
        adjustments: report
            .adjustments
            .into_iter()
            .map(|adjustment| BudgetAdjustment {
                at_s: adjustment.at.as_secs_f64(),
                from_bytes: adjustment.from_bytes,
                to_bytes: adjustment.to_bytes,
                reason: adjustment.reason,
            })
            .collect(),
    }
}

/// A model of the models folder, for `models`.
pub fn available_model(entry: models_dir::Entry) -> AvailableModel {
    AvailableModel {
        name: entry.name,
        path: entry.path.display().to_string(),
        format: entry.format,
        size_bytes: entry.size_bytes,
        architecture: entry.architecture,
        layers: count(entry.layers),
        experts_per_layer: count(entry.experts_per_layer),
        experts_per_token: count(entry.experts_per_token),
        error: entry.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_of_the_model_is_the_daemons_and_a_bad_request_the_callers() {
        let model = engine_error(odmoe_engine::Error::InvalidModel("no router".into()));
        assert_eq!(model.code, ErrorCode::Internal);
        assert!(model.message.contains("no router"), "{}", model.message);
        let request = engine_error(odmoe_engine::Error::InvalidRequest("bad token".into()));
        assert_eq!(request.code, ErrorCode::InvalidParams);
    }
}
