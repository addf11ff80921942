//! Store telemetry: counters kept under the store's lock, and a snapshot type for `stats`.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How many recent read latencies the percentiles are computed over.
const LATENCY_WINDOW: usize = 4096;

/// A point-in-time view of the store: the protocol's type, so `stats` reports it as it is.
pub use odmoe_protocol::StoreStats;

/// What speculative reads achieved so far, and how long compute waited for reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchCounts {
    pub issued: u64,
    pub used: u64,
    pub wasted: u64,
    pub dropped: u64,
    pub cancelled: u64,
    /// Experts a prefetch evicted that their layer's next routing wanted.
    pub evicted_hits: u64,
    pub stall_us: u64,
}

/// The counters behind [`StoreStats`]: its counting fields live in `counts`; stall time,
/// latency percentiles and the resident and budget figures are filled in by [`Self::snapshot`].
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    pub counts: StoreStats,
    /// Summed at full precision; reported in whole microseconds.
    pub stall: Duration,
    latencies_us: VecDeque<u64>,
}

impl Telemetry {
    pub fn record_read(&mut self, bytes: u64, latency: Duration) {
        self.counts.reads += 1;
        self.counts.bytes_read += bytes;
        if self.latencies_us.len() == LATENCY_WINDOW {
            self.latencies_us.pop_front();
        }
        self.latencies_us.push_back(latency.as_micros() as u64);
    }

    pub fn record_evictions(&mut self, evicted: &[((usize, usize), bool)]) {
        self.counts.evictions += evicted.len() as u64;
        self.counts.prefetch_wasted += evicted.iter().filter(|(_, unused)| *unused).count() as u64;
    }

    pub fn prefetch_counts(&self) -> PrefetchCounts {
        PrefetchCounts {
            issued: self.counts.prefetch_issued,
            used: self.counts.prefetch_used,
            wasted: self.counts.prefetch_wasted,
            dropped: self.counts.prefetch_dropped,
            cancelled: self.counts.prefetch_cancelled,
            evicted_hits: self.counts.prefetch_evicted_hits,
            stall_us: self.stall.as_micros() as u64,
        }
    }

    pub fn snapshot(
        &self,
        resident_bytes: u64,
        budget_bytes: u64,
        resident_experts: usize,
    ) -> StoreStats {
        let mut sorted: Vec<u64> = self.latencies_us.iter().copied().collect();
        sorted.sort_unstable();
        let percentile = |p: f64| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        StoreStats {
            read_latency_p50_us: percentile(50.0),
            read_latency_p90_us: percentile(90.0),
            read_latency_p99_us: percentile(99.0),
            stall_us: self.stall.as_micros() as u64,
            resident_bytes,
            budget_bytes,
            resident_experts: resident_experts as u64,
            ..self.counts.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut t = Telemetry::default();
        for us in 1..=100 {
            t.record_read(10, Duration::from_micros(us));
        }
        let s = t.snapshot(0, 0, 0);
        assert_eq!(
            (
                s.read_latency_p50_us,
                s.read_latency_p90_us,
                s.read_latency_p99_us
            ),
            (50, 90, 99)
        );
        assert_eq!((s.reads, s.bytes_read), (100, 1000));
    }
}
