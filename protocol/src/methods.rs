//! Method names and the params and results of the methods defined so far.

use serde::{Deserialize, Serialize};

/// The protocol version a server reports in [`HelloResult::protocol_version`].
/// It changes when a message or method changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every method the protocol names. A server that does not serve one yet
/// answers it with `not_implemented`; a name outside this list gets
/// `method_not_found`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Handshake: versions and the loaded model.
    Hello,
    /// Generate a completion for a prompt.
    Generate,
    /// Generate the next turn of a chat.
    Chat,
    /// Cancel a request in flight.
    Cancel,
    /// Telemetry of the server and its expert store.
    Stats,
    /// The models the server can serve.
    Models,
    /// Load a model.
    Load,
    /// Unload the model.
    Unload,
    /// Stop the server gracefully.
    Shutdown,
    /// Simulate a memory-pressure level, or go back to the real one.
    Pressure,
}

impl Method {
    /// All methods, in the order the protocol lists them.
    pub const ALL: [Method; 10] = [
        Method::Hello,
        Method::Generate,
        Method::Chat,
        Method::Cancel,
        Method::Stats,
        Method::Models,
        Method::Load,
        Method::Unload,
        Method::Shutdown,
        Method::Pressure,
    ];

    /// The method's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Method::Hello => "hello",
            Method::Generate => "generate",
            Method::Chat => "chat",
            Method::Cancel => "cancel",
            Method::Stats => "stats",
            Method::Models => "models",
            Method::Load => "load",
            Method::Unload => "unload",
            Method::Shutdown => "shutdown",
            Method::Pressure => "pressure",
        }
    }

    /// The method called `name` on the wire, if the protocol has one.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|method| method.name() == name)
    }
}

/// Params of `hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloParams {
    /// Who is calling, e.g. `"odmoe 0.1.0"` or `"nvim"`; for the server's log.
    #[serde(default)]
    pub client: Option<String>,
}

/// Result of `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResult {
    /// The server's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The server's own version, e.g. `"0.1.0"`.
    pub server_version: String,
    /// The model the server serves, if one is configured.
    #[serde(default)]
    pub model: Option<String>,
}

/// A chat message of `chat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

fn yes() -> bool {
    true
}

/// Params of `generate` and `chat`. `generate` takes `prompt` (text) or `tokens` (ids); `chat`
/// takes `messages`, rendered with the model's chat template. Sampling fields left out take the
/// server's configured defaults; `temperature` 0 is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Text that ends the generation; not part of the result.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Send `token` notifications while generating (default true).
    #[serde(default = "yes")]
    pub stream: bool,
    /// Send a `started` notification when the request leaves the queue and
    /// its prompt starts computing (default false: clients that do not expect
    /// it, such as Neovim's rpcrequest, are not sent it).
    #[serde(default)]
    pub progress: bool,
    /// Keep this conversation's KV cache under this name, so the next turn prefills only what is
    /// new (longest common prefix).
    ///
    /// With `chat`, the session also keeps the conversation: each request's
    /// `messages` are the new turn, added after the messages and replies
    /// already kept, so a client sends only what is new.
    #[serde(default)]
    pub session: Option<String>,
    /// With `chat` and `session`: forget the session's conversation and start
    /// a new one with this request's `messages`.
    #[serde(default)]
    pub new_conversation: bool,
    /// How long the model stays loaded after this request, as Ollama's
    /// `keep_alive`: a duration ("5m"), a number of seconds, 0 to unload after
    /// the reply, -1 to keep it; absent, the daemon's `model.keep_alive`.
    #[serde(default)]
    pub keep_alive: Option<KeepAliveParam>,
    /// Keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Send this generation's events as calls of a method of the client's own (see [`Relay`]).
    #[serde(default)]
    pub relay: Option<Relay>,
}

/// Where a client that cannot take odmoed's own notifications wants a generation's events:
/// Neovim, for one, runs only its API methods. Each event (`queued`, `started`, `token`) goes
/// as the notification `method` with params `args` followed by `[name, event]`; with
/// `{method = "nvim_exec_lua", args = {"return require('odmoe')._event(...)"}}` Neovim runs that
/// Lua with the event's name and fields.
///
/// With `id`, the request may come as a notification, which Neovim sends without waiting:
/// its result is relayed as the event `done` (a [`GenerateResult`] with `id`) or `error`
/// (`{id, code, message}`), and the notification `cancel {id}` stops it. `id` shares the
/// connection's msgids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relay {
    pub method: String,
    #[serde(default)]
    pub args: Vec<rmpv::Value>,
    #[serde(default)]
    pub id: Option<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: None,
            tokens: None,
            messages: None,
            max_tokens: None,
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
            stop: Vec::new(),
            stream: true,
            progress: false,
            session: None,
            new_conversation: false,
            keep_alive: None,
            ignore_eos: false,
            relay: None,
        }
    }
}

/// A `keep_alive` as a client writes it: text or a number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeepAliveParam {
    Seconds(i64),
    Text(String),
}

/// Name of the notification carrying one generated token.
pub const TOKEN_NOTIFICATION: &str = "token";
/// Name of the notification telling that a request left the queue and its
/// prompt is being computed (prefill), with its length.
pub const STARTED_NOTIFICATION: &str = "started";
/// Name of the notification telling a queued request its place.
pub const QUEUED_NOTIFICATION: &str = "queued";

/// Params of a `token` notification: `["token", [{id, text, token}]]`.
///
/// The texts of a request's events add up to the final result's `text`. When
/// the generation ends with text still held back (an incomplete character, or
/// the start of a possible stop string), one last event releases it and
/// repeats the last token's id: count tokens from the final result, not from
/// the events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The msgid of the request generating.
    pub id: u32,
    /// Text that became final with this token (may be empty mid-character).
    pub text: String,
    pub token: u32,
}

/// Params of a `queued` notification: requests ahead of this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedEvent {
    pub id: u32,
    pub position: u32,
}

/// Params of the `started` notification: request `id` runs, computing a
/// prompt of `prompt_tokens` tokens before its first token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedEvent {
    pub id: u32,
    pub prompt_tokens: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV entries were reused from the session.
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Result of `generate` and `chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResult {
    pub text: String,
    pub tokens: Vec<u32>,
    /// "stop" (end of sequence or stop text), "length" (max_tokens) or "cancelled".
    pub finish_reason: String,
    pub usage: Usage,
    pub timings: Timings,
}

/// Params of `cancel`: the msgid of a request sent on the same connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelParams {
    pub id: u32,
}

/// Result of `cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResult {
    /// False when no such request was queued or running.
    pub cancelled: bool,
}

/// A loaded model, as `models`, `load` and `stats` describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub layers: u32,
    pub experts_per_layer: u32,
    pub experts_per_token: u32,
    /// Bytes of one expert in memory: the mean over the layers that have experts (a layer's
    /// experts may be stored in another type than the next layer's).
    pub expert_bytes: u64,
    /// Bytes of all experts in memory.
    pub total_expert_bytes: u64,
    /// "resident", "on_demand" or "dense" (a model without experts).
    pub mode: String,
    /// The expert budget when on demand.
    #[serde(default)]
    pub budget_bytes: Option<u64>,
    /// Seconds until the idle model is unloaded (its keep_alive); absent while
    /// it stays loaded or a request runs.
    #[serde(default)]
    pub unloads_in_s: Option<f64>,
}

/// Result of `models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsResult {
    /// The model loaded, if any.
    pub models: Vec<ModelInfo>,
    /// The configured `model.models_dir`, if any.
    #[serde(default)]
    pub models_dir: Option<String>,
    /// The models found in `models_dir`, by name; `load` takes these names.
    #[serde(default)]
    pub available: Vec<AvailableModel>,
}

/// A model in the daemon's `models_dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AvailableModel {
    /// The file or directory name, which `load` accepts in place of a path.
    pub name: String,
    pub path: String,
    /// "gguf", "odmoe" or "huggingface".
    pub format: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    pub architecture: String,
    pub layers: u32,
    /// 0 for a dense model.
    pub experts_per_layer: u32,
    pub experts_per_token: u32,
    /// Why the entry could not be read as a model, when it could not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Params of `load`: replaces the loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadParams {
    pub path: String,
    /// "auto", a size ("8GiB") or a percentage of all experts ("25%"); absent: the configured one.
    #[serde(default)]
    pub expert_budget: Option<String>,
}

/// The expert store's telemetry, as the engine's store reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Experts found ready or already loading when acquired.
    pub hits: u64,
    /// Experts that had to be read when acquired.
    pub misses: u64,
    pub prefetch_issued: u64,
    /// Prefetched experts acquired before being evicted.
    pub prefetch_used: u64,
    /// Prefetched experts evicted before any use.
    pub prefetch_wasted: u64,
    /// Prefetches not issued: no room but by evicting what is worth more, or the share of the
    /// budget that unused prefetches may hold is full.
    pub prefetch_dropped: u64,
    /// Prefetches cancelled when their layer's routing chose other experts: queued ones before
    /// their reads started, and ones being read at their next piece.
    #[serde(default)]
    pub prefetch_cancelled: u64,
    /// Prefetch reads started while several may go at once, as they may while guesses are
    /// nearly always right.
    #[serde(default)]
    pub prefetch_wide_reads: u64,
    /// Experts a prefetch evicted that their layer's next routing then wanted: hits it cost.
    #[serde(default)]
    pub prefetch_evicted_hits: u64,
    pub evictions: u64,
    pub reads: u64,
    pub read_errors: u64,
    pub bytes_read: u64,
    pub read_latency_p50_us: u64,
    pub read_latency_p90_us: u64,
    pub read_latency_p99_us: u64,
    /// Total time acquires waited for reads.
    pub stall_us: u64,
    /// Bytes reserved by cached and loading experts.
    pub resident_bytes: u64,
    pub budget_bytes: u64,
    pub resident_experts: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub waiting: u32,
    pub running: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {
    pub count: u32,
    /// Bytes of all kept KV caches.
    pub kv_bytes: u64,
    /// KV caches kept by their tokens for requests without a session.
    #[serde(default)]
    pub prefixes: u32,
    /// Their bytes.
    #[serde(default)]
    pub prefix_bytes: u64,
}

/// Result of `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsResult {
    pub server_version: String,
    pub pid: u32,
    pub uptime_s: f64,
    /// Resident set size of the daemon.
    pub rss_bytes: u64,
    #[serde(default)]
    pub model: Option<ModelInfo>,
    #[serde(default)]
    pub store: Option<StoreStats>,
    pub queue: QueueStats,
    pub sessions: SessionStats,
    /// Requests served since start.
    pub requests: u64,
    /// Memory pressure and the expert budget that follows it.
    #[serde(default)]
    pub memory: Option<MemoryStats>,
}

/// Params of `pressure`: `{level}` simulates that memory-pressure level until
/// `{release: true}` goes back to the real one. Only the daemon's own user (or
/// root) may call it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PressureParams {
    /// "normal", "warn" or "critical".
    #[serde(default)]
    pub level: Option<String>,
    /// Stop simulating.
    #[serde(default)]
    pub release: bool,
}

/// Memory pressure and the expert budget that follows it: the `memory` section
/// of `stats`, and the result of `pressure`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// "normal", "warn" or "critical": the level of the last reading.
    pub level: String,
    /// Why that level: what fired or what was measured.
    pub reason: String,
    /// What is watched, e.g. "PSI triggers on /proc/pressure/memory".
    pub source: String,
    /// True while `pressure` simulates the level.
    pub simulated: bool,
    /// Whether the budget follows pressure (`memory.adapt`).
    pub adapt: bool,
    /// Memory that can still be taken before the tightest limit.
    #[serde(default)]
    pub headroom_bytes: Option<u64>,
    /// That limit: the machine's memory or the cgroup's limit, whichever is lower.
    #[serde(default)]
    pub limit_bytes: Option<u64>,
    /// The expert budget the store has now (applied between tokens).
    #[serde(default)]
    pub budget_bytes: Option<u64>,
    /// The budget the controller wants.
    #[serde(default)]
    pub target_bytes: Option<u64>,
    /// The budget never goes below this: two layers' routed experts.
    #[serde(default)]
    pub floor_bytes: Option<u64>,
    /// Nor above this: the configured budget (or `memory.max_budget`).
    #[serde(default)]
    pub ceiling_bytes: Option<u64>,
    /// The daemon's resident memory once the model was loaded, before any expert.
    #[serde(default)]
    pub base_bytes: Option<u64>,
    /// Memory kept aside for KV caches and activations (`memory.kv_reserve`).
    pub kv_reserve_bytes: u64,
    /// What the KV caches hold: kept sessions, the prefix cache and the request running. Beyond
    /// the reserve it comes out of an `auto` expert budget.
    #[serde(default)]
    pub kv_bytes: u64,
    /// Seconds until the budget may grow back, when it is below its ceiling.
    #[serde(default)]
    pub grow_in_s: Option<f64>,
    /// The latest changes of the budget, oldest first.
    #[serde(default)]
    pub adjustments: Vec<BudgetAdjustment>,
}

/// One change of the expert budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetAdjustment {
    /// When, as the daemon's uptime in seconds (compare with `uptime_s`).
    pub at_s: f64,
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// Why, e.g. "critical pressure: 3.1 MiB left of cgroup /x, below 11.2 MiB".
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for method in Method::ALL {
            assert_eq!(Method::from_name(method.name()), Some(method));
        }
        assert_eq!(Method::from_name("Hello"), None);
        assert_eq!(Method::from_name("frobnicate"), None);
    }

    #[test]
    fn pressure_params_take_a_level_or_a_release() {
        let value = rmpv::Value::Map(vec![(
            rmpv::Value::from("level"),
            rmpv::Value::from("critical"),
        )]);
        let params: PressureParams = rmpv::ext::from_value(value).unwrap();
        assert_eq!(params.level.as_deref(), Some("critical"));
        assert!(!params.release);
        let value = rmpv::Value::Map(vec![(
            rmpv::Value::from("release"),
            rmpv::Value::from(true),
        )]);
        let params: PressureParams = rmpv::ext::from_value(value).unwrap();
        assert_eq!((params.level, params.release), (None, true));
    }

    #[test]
    fn memory_stats_round_trip_and_may_be_absent() {
        let memory = MemoryStats {
            level: "warn".into(),
            budget_bytes: Some(1 << 20),
            adjustments: vec![BudgetAdjustment {
                at_s: 1.5,
                from_bytes: 2 << 20,
                to_bytes: 1 << 20,
                reason: "critical pressure".into(),
            }],
            ..MemoryStats::default()
        };
        let value = rmpv::ext::to_value(&memory).unwrap();
        assert_eq!(rmpv::ext::from_value::<MemoryStats>(value).unwrap(), memory);
        // A daemon without the section still gives readable stats.
        let stats = rmpv::Value::Map(
            [
                ("server_version", rmpv::Value::from("0.1.0")),
                ("pid", rmpv::Value::from(1)),
                ("uptime_s", rmpv::Value::from(1.0)),
                ("rss_bytes", rmpv::Value::from(1)),
                ("queue", rmpv::ext::to_value(QueueStats::default()).unwrap()),
                (
                    "sessions",
                    rmpv::ext::to_value(SessionStats::default()).unwrap(),
                ),
                ("requests", rmpv::Value::from(0)),
            ]
            .into_iter()
            .map(|(key, value)| (rmpv::Value::from(key), value))
            .collect(),
        );
        let stats: StatsResult = rmpv::ext::from_value(stats).unwrap();
        assert_eq!(stats.memory, None);
    }

    #[test]
    fn generate_params_default_what_is_left_out() {
        let value = rmpv::Value::Map(vec![(
            rmpv::Value::from("prompt"),
            rmpv::Value::from("Hello"),
        )]);
        let params: GenerateParams = rmpv::ext::from_value(value).unwrap();
        assert_eq!(params.prompt.as_deref(), Some("Hello"));
        assert!(params.stream && params.stop.is_empty() && params.temperature.is_none());
    }
}
