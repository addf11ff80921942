#!/usr/bin/env python3
"""How much of a layer's next routing its own history tells: the bound on eviction from history.

An eviction policy with no knowledge of the future decides which experts of a layer to hold
before that layer's next visit routes; with k of them held, its hits there are at most what the
best guess of k experts from the layer's history gets. This script measures that guess on a
routing file (the JSONL that `odmoe trace import` reads, one line per token and layer) for the
best of a family of history estimators (a decayed rate of use plus a weight on the latest
visit, over a grid of both), k = 1..6, with no cache constraints: it is an upper estimate of what
any history-based policy holding k experts a layer can hit.

With --learned it also fits a logistic regression per layer and expert on everything routing
tells before a layer runs (the layer's decayed rates, its last two visits and their gating
weights, this token's three previous layers, the last token's next layer) and scores it two
ways: trained on the other sequences (what a learned policy could do), and trained on the very
tokens it guesses (which sees the future, so it only shows how far the features could reach).
That needs numpy and scikit-learn (`pip install numpy scikit-learn`).

Usage: routing_ceiling.py ROUTING.jsonl [--learned]
"""

import collections
import json
import sys


def load(path):
    """Tokens in order (sequences in order of first appearance), each a list of per-layer
    (experts, gating weights), and each token's sequence."""
    tokens, order = {}, {}
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        seq = r.get("problem_id", r.get("sequence", r.get("prompt", 0)))
        order.setdefault(seq, len(order))
        key = (order[seq], r.get("token_idx", r.get("token")))
        weights = r.get("gating_probs", r.get("weights", [1.0] * len(r["experts"])))
        tokens.setdefault(key, {})[r["layer"]] = (r["experts"], weights)
    layers = 1 + max(l for t in tokens.values() for l in t)
    experts = 1 + max(e for t in tokens.values() for routed, _ in t.values() for e in routed)
    complete = [k for k in sorted(tokens) if len(tokens[k]) == layers]
    trace = [[tokens[k][l] for l in range(layers)] for k in complete]
    return trace, [k[0] for k in complete], layers, experts


def hits(trace, layers, experts, k, decay, recency):
    found = routed = 0
    rate = collections.defaultdict(float)
    last = {}
    for token in trace:
        for layer in range(layers):
            truth = set(token[layer][0])
            if layer in last:
                score = lambda e: rate[layer, e] + recency * (e in last[layer])
                guess = sorted(range(experts), key=lambda e: (-score(e), e))[:k]
                found += len(truth.intersection(guess))
            routed += len(truth)
            for e in range(experts):
                rate[layer, e] = decay * rate[layer, e] + (1 - decay) * (e in truth)
            last[layer] = truth
    return found / routed


def history_table(trace, layers, experts):
    print("| experts held a layer | best hit share | decay | recency weight |")
    print("|---|---|---|---|")
    for k in range(1, min(experts, 7)):
        best = max((hits(trace, layers, experts, k, d, w), d, w)
                   for d in (0.5, 0.8, 0.9, 0.95, 0.99) for w in (0.0, 0.1, 0.3, 1.0))
        print(f"| {k} | {best[0]:.3f} | {best[1]} | {best[2]} |")


def routing_features(trace, sequences, layers, experts):
    """Per layer: (sequence, features known before the layer runs, experts it routed) rows."""
    import numpy as np

    def routed(experts_and_weights, weighted=False):
        v = np.zeros(experts)
        for e, w in zip(*experts_and_weights):
            v[e] = w if weighted else 1.0
        return v

    none = np.zeros(experts)
    rows = {layer: [] for layer in range(layers)}
    rate = np.zeros((layers, experts))
    for t, token in enumerate(trace):
        for layer in range(layers):
            visits = [trace[u][layer] for u in range(max(0, t - 2), t)]
            if visits:
                features = [rate[layer], routed(visits[-1]), routed(visits[-1], weighted=True),
                            routed(visits[-2]) if len(visits) > 1 else none]
                features += [routed(token[layer - d]) if layer >= d else none for d in (1, 2, 3)]
                features.append(routed(trace[t - 1][layer + 1]) if layer + 1 < layers else none)
                rows[layer].append((sequences[t], np.concatenate(features), routed(token[layer])))
            rate[layer] = 0.95 * rate[layer] + 0.05 * routed(token[layer])
    return rows


def learned_table(trace, sequences, layers, experts):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rows = routing_features(trace, sequences, layers, experts)
    held = range(1, min(experts, 7))
    print("| fit | regularization C | " + " | ".join(f"{k} held" for k in held) + " |")
    print("|---|---|" + "---|" * len(held))
    for train_on in ("other sequences", "the tokens guessed (sees the future)"):
        for c in (0.05, 0.3, 3.0):
            found, routed = collections.Counter(), 0
            for layer in range(layers):
                seq = np.array([r[0] for r in rows[layer]])
                x = np.array([r[1] for r in rows[layer]])
                y = np.array([r[2] for r in rows[layer]])
                if train_on == "other sequences":
                    folds = [(seq != s, seq == s) for s in sorted(set(seq))]
                else:
                    folds = [(seq == seq, seq == seq)]
                score = np.zeros_like(y)
                for train, test in folds:
                    for e in range(experts):
                        target = y[train, e]
                        if target.min() == target.max():
                            score[test, e] = target[0] if len(target) else 0.0
                            continue
                        model = LogisticRegression(C=c, max_iter=2000).fit(x[train], target)
                        score[test, e] = model.predict_proba(x[test])[:, 1]
                order = np.argsort(-score, axis=1, kind="stable")
                for k in held:
                    found[k] += np.take_along_axis(y, order[:, :k], axis=1).sum()
                routed += y.sum()
            print(f"| {train_on} | {c} | " + " | ".join(f"{found[k] / routed:.3f}" for k in held) + " |")


def main():
    args = sys.argv[1:]
    learned = "--learned" in args
    paths = [a for a in args if a != "--learned"]
    if len(paths) != 1:
        sys.exit(__doc__)
    trace, sequences, layers, experts = load(paths[0])
    print(f"{len(trace)} tokens, {layers} layers, {experts} experts, {len(set(sequences))} sequences")
    history_table(trace, layers, experts)
    if learned:
        if len(set(sequences)) < 2:
            sys.exit("--learned needs at least two sequences, to train on one and guess another")
        print()
        learned_table(trace, sequences, layers, experts)


if __name__ == "__main__":
    main()
