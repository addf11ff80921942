#!/usr/bin/env python3
"""How much of a layer's next routing its own history tells: the bound on eviction from history.

An eviction policy with no knowledge of the future decides which experts of a layer to hold
before that layer's next visit routes; with k of them held, its hits there are at most what the
best guess of k experts from the layer's history gets. This script measures that guess on a
routing file (the JSONL that `odmoe trace import` reads, one line per token and layer) for the
best of a family of history estimators (a decayed rate of use plus a weight on the latest
visit, over a grid of both), k = 1..6, with no cache constraints: it is an upper estimate of what
any history-based policy holding k experts a layer can hit.

Usage: routing_ceiling.py ROUTING.jsonl
"""

import collections
import json
import sys


def load(path):
    """Tokens in order (sequences in order of first appearance), each a list of per-layer sets."""
    tokens, order = {}, {}
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        seq = r.get("problem_id", r.get("sequence", r.get("prompt", 0)))
        order.setdefault(seq, len(order))
        key = (order[seq], r.get("token_idx", r.get("token")))
        tokens.setdefault(key, {})[r["layer"]] = set(r["experts"])
    layers = 1 + max(l for t in tokens.values() for l in t)
    experts = 1 + max(e for t in tokens.values() for s in t.values() for e in s)
    complete = [[tokens[k][l] for l in range(layers)] for k in sorted(tokens) if len(tokens[k]) == layers]
    return complete, layers, experts


def hits(trace, layers, experts, k, decay, recency):
    found = routed = 0
    rate = collections.defaultdict(float)
    last = {}
    for token in trace:
        for layer in range(layers):
            truth = token[layer]
            if layer in last:
                score = lambda e: rate[layer, e] + recency * (e in last[layer])
                guess = sorted(range(experts), key=lambda e: (-score(e), e))[:k]
                found += len(truth.intersection(guess))
            routed += len(truth)
            for e in range(experts):
                rate[layer, e] = decay * rate[layer, e] + (1 - decay) * (e in truth)
            last[layer] = truth
    return found / routed


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    trace, layers, experts = load(sys.argv[1])
    print(f"{len(trace)} tokens, {layers} layers, {experts} experts")
    print("| experts held a layer | best hit share | decay | recency weight |")
    print("|---|---|---|---|")
    for k in range(1, min(experts, 7)):
        best = max((hits(trace, layers, experts, k, d, w), d, w)
                   for d in (0.5, 0.8, 0.9, 0.95, 0.99) for w in (0.0, 0.1, 0.3, 1.0))
        print(f"| {k} | {best[0]:.3f} | {best[1]} | {best[2]} |")


if __name__ == "__main__":
    main()
