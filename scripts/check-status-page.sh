#!/usr/bin/env bash
# Renders odmoed's status page (GET /) in headless Chromium, saves a screenshot of it, and checks
# what it shows:
#   - the heatmap has one cell per expert, layers x per_layer as GET /api/status says, with as
#     many resident, loading and absent cells as the state strings of the document it drew;
#   - every value carrying data-field equals, raw (data-value) and as displayed text, the value at
#     that JSON path in the document the page last rendered (which it keeps in
#     <script id="rendered">, so values that change between polls compare exactly).
#
#   scripts/check-status-page.sh http://127.0.0.1:8080 /tmp/status.png
#
# Needs chromium (scripts/setup.sh installs it) and python3. $CHROMIUM overrides the browser,
# $ODMOE_STATUS_WINDOW the screenshot's size (default 1280,800). Exits 0 when the page agrees,
# 1 on any mismatch, 2 when it cannot run.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 BASE_URL OUT.png   (e.g. $0 http://127.0.0.1:8080 /tmp/status.png)" >&2
  exit 2
fi
base="${1%/}"
out="$2"
window="${ODMOE_STATUS_WINDOW:-1280,800}"
chromium="${CHROMIUM:-chromium}"
command -v "$chromium" >/dev/null || { echo "check-status-page: $chromium not found (scripts/setup.sh installs it)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "check-status-page: python3 not found" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Virtual time runs the page's one-second polls without waiting for them: 4 s of it is four
# polls, enough for hits to rise between two of them, in well under a second of real time.
browse() {
  # The network is closed here: without these flags Chromium waits on services it cannot reach.
  if ! timeout -k 5 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync \
      --user-data-dir="$(mktemp -d "$work/profile.XXXXXX")" --virtual-time-budget=4000 \
      "$@" "$base/" 2>>"$work/chromium.log"; then
    echo "check-status-page: chromium failed on $base/; its last messages:" >&2
    grep -v -e dbus -e 'unexpected operator' "$work/chromium.log" | tail -n 15 >&2
    exit 2
  fi
}

fetch_status() {
  python3 - "$base/api/status" "$1" <<'EOF' || exit 2
import sys, urllib.request
url, path = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=10) as res:
        open(path, "wb").write(res.read())
except Exception as err:
    sys.exit(f"check-status-page: cannot fetch {url}: {err}")
EOF
}

# The page is checked against /api/status fetched just before and just after it was rendered.
# A model loaded or unloaded in between changes the shape under the check: then it runs again.
for attempt in 1 2 3; do
  fetch_status "$work/before.json"
  browse --dump-dom >"$work/page.html"
  fetch_status "$work/after.json"
  rc=0
  python3 - "$work/page.html" "$work/before.json" "$work/after.json" >"$work/report.txt" <<'EOF' || rc=$?
import json, sys
from decimal import Decimal, ROUND_HALF_UP
from html.parser import HTMLParser

page_path, before_path, after_path = sys.argv[1:4]
RETRY = 75

def fail(msg):
    print(f"check-status-page: {msg}", file=sys.stderr)
    sys.exit(1)

class Page(HTMLParser):
    """The elements the check reads, with their attributes and text."""
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []          # open elements: (tag, record or None)
        self.fields = []         # data-field elements: {"attrs", "text"}
        self.by_id = {}          # id -> record
        self.body = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        rec = None
        if "data-field" in a or "id" in a:
            rec = {"tag": tag, "attrs": a, "text": ""}
            if "data-field" in a:
                self.fields.append(rec)
            if "id" in a:
                self.by_id[a["id"]] = rec
        if tag not in self.VOID:
            self.stack.append((tag, rec))

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for _, rec in self.stack:
            if rec is not None:
                rec["text"] += data

page = Page()
page.feed(open(page_path, encoding="utf-8").read())
before = json.load(open(before_path))
after = json.load(open(after_path))

# --- The page's own state --------------------------------------------------------------------
status = page.body.get("data-status")
if status != "ok":
    banner = page.by_id.get("banner", {}).get("text", "").strip()
    fail(f"the page's state is {status!r}, not 'ok'" + (f"; its banner says: {banner}" if banner else
         " (it never rendered a status: a script error, or /api/status did not answer in time)"))
if "rendered" not in page.by_id:
    fail('the page has no <script id="rendered"> holding the document it shows')
try:
    doc = json.loads(page.by_id["rendered"]["text"])
except ValueError as err:
    fail(f'<script id="rendered"> is not JSON: {err}')
polls = page.body.get("data-polls", "?")

# --- The same daemon, the same moment ------------------------------------------------------
def shape(d):
    ex = d.get("experts")
    return None if ex is None else (ex["layers"], ex["per_layer"])

if before["stats"]["pid"] != after["stats"]["pid"] or shape(before) != shape(after):
    sys.exit(RETRY)
if doc["stats"]["pid"] != before["stats"]["pid"]:
    fail(f"the page shows pid {doc['stats']['pid']}, /api/status says {before['stats']['pid']}")
t0, t, t1 = before["stats"]["uptime_s"], doc["stats"]["uptime_s"], after["stats"]["uptime_s"]
if not t0 <= t <= t1:
    fail(f"the page's document (uptime {t} s) is not one fetched during this check ({t0}..{t1} s)")

# --- Heatmap: one cell per expert ----------------------------------------------------------
canvas = page.by_id.get("heatmap")
if canvas is None:
    fail('the page has no <canvas id="heatmap">')
ca = canvas["attrs"]

def attr_int(name):
    try:
        return int(ca.get(name, ""))
    except ValueError:
        fail(f"the heatmap's {name} is {ca.get(name)!r}, not a number")

live = shape(before)
if shape(doc) != live:
    fail(f"the page drew experts of shape {shape(doc)}, /api/status has {live} (layers, per_layer)")
cells = attr_int("data-cells")
ex = doc.get("experts")
if ex is None:
    if cells != 0:
        fail(f"the document has no experts but the heatmap has {cells} cells")
    heat = "no experts in the document, heatmap empty"
    if doc["stats"]["model"] is None and "no model loaded" not in page.by_id.get("model", {}).get("text", "").lower():
        fail('the model is null but the header does not say "no model loaded"')
else:
    L, E = ex["layers"], ex["per_layer"]
    if len(ex["state"]) != L or any(len(row) != E for row in ex["state"]):
        fail(f"/api/status is inconsistent: experts.state is not {L} strings of {E} characters")
    if len(ex["hits"]) != L or any(len(row) != E for row in ex["hits"]):
        fail(f"/api/status is inconsistent: experts.hits is not {L} rows of {E} numbers")
    want = {"data-layers": L, "data-per-layer": E, "data-cells": L * E,
            "data-resident": sum(r.count("r") for r in ex["state"]),
            "data-loading": sum(r.count("l") for r in ex["state"])}
    want["data-absent"] = L * E - want["data-resident"] - want["data-loading"]
    for name, value in want.items():
        if attr_int(name) != value:
            fail(f"heatmap {name} is {ca.get(name)}, the document it drew gives {value}")
    hot = attr_int("data-hot")
    if not 0 <= hot <= L * E:
        fail(f"heatmap data-hot is {hot}, outside 0..{L * E}")
    heat = (f"{cells} cells = {L} layers x {E} experts ({want['data-resident']} resident, "
            f"{want['data-loading']} loading, {want['data-absent']} absent, {hot} hit recently)")

# --- Displayed values ----------------------------------------------------------------------
# These mirror FORMATS in daemon/src/http/status.html.
def js_number(v):
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)

def to_fixed(v, digits):
    # Number.prototype.toFixed rounds the exact binary value, ties away from zero.
    return format(Decimal(v).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP), "f")

def fmt_bytes(v):
    if abs(v) < 1024:
        return f"{js_number(v)} B"
    units = ["KiB", "MiB", "GiB", "TiB", "PiB"]
    x, i = v / 1024, 0
    while abs(x) >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    return f"{to_fixed(x, 1)} {units[i]}"

def fmt_dur(v):
    if v < 60:
        return f"{to_fixed(v, 1)} s"
    t = int(v // 1)
    d, h, m, s = t // 86400, t % 86400 // 3600, t % 3600 // 60, t % 60
    if d:
        return f"{d}d {h:02}h {m:02}m"
    return f"{h}h {m:02}m {s:02}s" if h else f"{m}m {s:02}s"

def fmt_us(v):
    if v < 1000:
        return f"{js_number(v)} µs"
    return f"{to_fixed(v / 1e3, 1)} ms" if v < 1e6 else f"{to_fixed(v / 1e6, 1)} s"

def fmt_int(v):
    return f"{int(v):,}" if float(v).is_integer() else js_number(v)

FORMATS = {
    "text": lambda v: v if isinstance(v, str) else js_number(v),
    "int": fmt_int, "bool": lambda v: "yes" if v else "no",
    "bytes": fmt_bytes, "dur": fmt_dur, "us": fmt_us,
}

MISSING = object()
def lookup(d, path):
    for key in path.split("."):
        if isinstance(d, list) and key.isdigit() and int(key) < len(d):
            d = d[int(key)]
        elif isinstance(d, dict) and key in d:
            d = d[key]
        else:
            return MISSING
    return d

def same(a, b):
    # JSON has one number type, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b

compared = set()
for rec in page.fields:
    a = rec["attrs"]
    path, kind, raw = a["data-field"], a.get("data-format"), a.get("data-value")
    value = lookup(doc, path)
    if value is MISSING:
        fail(f"the page shows {path}, which the document does not have")
    if raw is None:
        fail(f"{path} has no data-value")
    try:
        shown = json.loads(raw)
    except ValueError:
        fail(f"{path}: data-value {raw!r} is not JSON")
    if not same(shown, value):
        fail(f"{path}: the page holds {raw}, the document has {json.dumps(value)}")
    if kind not in FORMATS:
        fail(f"{path}: unknown data-format {kind!r}")
    text = "—" if value is None else FORMATS[kind](value)
    if rec["text"] != text:
        fail(f"{path}: the page displays {rec['text']!r}, {json.dumps(value)} reads {text!r}")
    compared.add(path)

# Fields the page must show whenever the document has them.
required = ["stats.server_version", "stats.pid", "stats.uptime_s", "stats.rss_bytes", "stats.requests",
            "stats.queue.waiting", "stats.queue.running", "stats.sessions.count", "stats.sessions.kv_bytes"]
sections = {
    "model": ["path", "architecture", "mode", "layers", "experts_per_layer", "experts_per_token",
              "expert_bytes", "total_expert_bytes", "budget_bytes"],
    "store": ["hits", "misses", "evictions", "reads", "read_errors", "bytes_read", "stall_us",
              "read_latency_p50_us", "read_latency_p90_us", "read_latency_p99_us", "prefetch_issued",
              "prefetch_used", "prefetch_wasted", "prefetch_dropped", "resident_bytes", "budget_bytes",
              "resident_experts"],
    "memory": ["level", "reason", "source", "adapt", "headroom_bytes", "limit_bytes", "budget_bytes",
               "target_bytes", "floor_bytes", "ceiling_bytes", "base_bytes", "kv_reserve_bytes", "grow_in_s"],
}
for section, keys in sections.items():
    if doc["stats"].get(section) is not None:
        required += [f"stats.{section}.{k}" for k in keys if k in doc["stats"][section]]
adjustments = (doc["stats"].get("memory") or {}).get("adjustments") or []
if adjustments:
    newest = f"stats.memory.adjustments.{len(adjustments) - 1}"
    required += [f"{newest}.{k}" for k in ("at_s", "from_bytes", "to_bytes", "reason")]
missing = [p for p in required if p not in compared]
if missing:
    fail("the page does not show " + ", ".join(missing))

print(f"  heatmap: {heat}; /api/status: " + (f"{live[0]} x {live[1]}" if live else "no experts"))
print(f"  fields: {len(page.fields)} values at {len(compared)} JSON paths compared, raw and as text, "
      f"with the document rendered at uptime {t:.1f} s ({polls} polls)")
EOF
  if [ "$rc" -eq 75 ]; then
    echo "check-status-page: the daemon's model or pid changed during the check (attempt $attempt of 3)" >&2
    continue
  fi
  [ "$rc" -eq 0 ] || exit 1
  break
done
[ "$rc" -eq 0 ] || { echo "check-status-page: the daemon kept changing; gave up" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
rm -f "$out"
browse --hide-scrollbars --window-size="$window" --screenshot="$out" >/dev/null
[ -s "$out" ] || { echo "check-status-page: chromium wrote no screenshot to $out" >&2; exit 2; }
size="$(python3 - "$out" <<'EOF'
import struct, sys
head = open(sys.argv[1], "rb").read(24)
if head[:8] != b"\x89PNG\r\n\x1a\n":
    sys.exit(f"check-status-page: {sys.argv[1]} is not a PNG")
print("%dx%d" % struct.unpack(">II", head[16:24]))
EOF
)" || exit 1

echo "status page OK: $base/"
cat "$work/report.txt"
echo "  screenshot: $out ($size)"
