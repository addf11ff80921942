//! The status page: what the expert cache is doing, as a picture. `GET /`
//! serves one HTML file (its CSS and JavaScript inline, no build step) that
//! polls `GET /api/status`: the daemon's `stats`, and where every expert is.

use axum::Json;
use axum::extract::State as Extract;
use axum::response::Html;
use serde::Serialize;
use serde_json::{Value, json};

use super::Http;
use crate::dispatch;
use crate::scheduler::{ModelMode, Served};

/// The page, embedded in the binary.
const PAGE: &str = include_str!("status.html");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /api/status`: `{"stats": ..., "experts": ...}`.
pub async fn json(Extract(http): Extract<Http>) -> Json<Value> {
    let stats = dispatch::stats(&http.state);
    let experts = http
        .state
        .scheduler
        .served()
        .and_then(|served| experts(&served));
    Json(json!({"stats": stats, "experts": experts}))
}

/// Where every expert is: a string per layer, a character per expert (`r` in memory, `l`
/// being read, `.` on disk), and the hits of each since the model loaded.
#[derive(Debug, Serialize, PartialEq)]
struct Experts {
    layers: usize,
    per_layer: usize,
    state: Vec<String>,
    hits: Vec<Vec<u64>>,
}

fn experts(served: &Served) -> Option<Experts> {
    let (layers, per_layer) = (served.info.layers, served.info.experts_per_layer);
    if per_layer == 0 {
        return None;
    }
    let mut state = vec![vec![b'.'; per_layer]; layers];
    let mut hits = vec![vec![0; per_layer]; layers];
    match (&served.store, served.info.mode) {
        (Some(store), _) => {
            let residency = store.residency();
            for ((layer, expert), loading) in residency.present {
                if let Some(cell) = state.get_mut(layer).and_then(|row| row.get_mut(expert)) {
                    *cell = if loading { b'l' } else { b'r' };
                }
            }
            for ((layer, expert), count) in residency.hits {
                if let Some(cell) = hits.get_mut(layer).and_then(|row| row.get_mut(expert)) {
                    *cell = count;
                }
            }
        }
        (None, ModelMode::Resident) => state.iter_mut().for_each(|row| row.fill(b'r')),
        (None, _) => return None,
    }
    Some(Experts {
        layers,
        per_layer,
        state: state
            .into_iter()
            .map(|row| String::from_utf8(row).expect("ASCII"))
            .collect(),
        hits,
    })
}
