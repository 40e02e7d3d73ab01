"""Backprop's and another estimator's fg-bench accuracy reports, run apart (each at its own rate and epochs), read
together: each of the other's seeds' test accuracy at the training seconds backprop's run of the same seed took for
all its epochs (fg_lightning.bench.accuracy.accuracy_at_time, as the leaderboard's test_acc_at_backprop_time; `fg-bench
accuracy --backprop-from` does the same for a run made after backprop's, where these two ran at the same time).

usage: python equal_time.py BACKPROP_DIR LOCAL_DIR"""

import json
import statistics
import sys

from fg_lightning.bench.accuracy import accuracy_at_time


def runs(folder: str) -> list[dict]:
    with open(f"{folder}/accuracy.json") as f:
        return [r for r in json.load(f)["records"] if "curve" in r]


backprop, local = runs(sys.argv[1]), runs(sys.argv[2])
name = local[0]["estimator"]
budget = {r["seed"]: r["wall_s"] for r in backprop}
final = {r["seed"]: r["test_acc"] for r in backprop}
for r in sorted(local, key=lambda r: r["seed"]):
    at = accuracy_at_time(r["curve"], budget[r["seed"]])
    reached = max(p["epoch"] for p in r["curve"] if p["wall_s"] <= budget[r["seed"]])
    print(f"seed {r['seed']}: backprop {final[r['seed']]:.4f} after {budget[r['seed']]:.0f} s; {name} at that "
          f"time {at:.4f} (epoch {reached:.1f} of {r['curve'][-1]['epoch']:g}), at the end {r['test_acc']:.4f} "
          f"after {r['wall_s']:.0f} s")
mean_bp, mean_at = statistics.fmean(final.values()), statistics.fmean(
    accuracy_at_time(r["curve"], budget[r["seed"]]) for r in local)
print(f"mean: backprop {mean_bp:.4f}, {name} at backprop's time {mean_at:.4f}, gap "
      f"{100 * (mean_at - mean_bp):+.2f} points")
