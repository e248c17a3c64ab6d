"""Draw a run's loss, learning rate and data-mixture weights over tokens seen (from metrics.jsonl) to a PNG.

Both paths go through the path layer (``nanbeige_jax.paths``): a run on ``gs://`` is plotted in place.
"""
from __future__ import annotations

import io

from nanbeige_jax import paths
from nanbeige_jax.metrics import read_metrics


def plot_run(metrics_path: str, out_path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in read_metrics(metrics_path) if "tokens_seen" in r]
  if not rows:
    raise ValueError(f"{metrics_path}: no rows with tokens_seen to plot")
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
  t = [r["tokens_seen"] / 1e6 for r in train]
  axes[0].plot(t, [r["loss"] for r in train], label="train loss")
  sources = sorted({k[len("loss/"):] for r in train for k in r if k.startswith("loss/")})
  for s in sources:
    pts = [(r["tokens_seen"] / 1e6, r[f"loss/{s}"]) for r in train if f"loss/{s}" in r]
    axes[0].plot(*zip(*pts), alpha=0.6, lw=0.8, label=f"train loss: {s}")
  if evals:
    axes[0].plot([r["tokens_seen"] / 1e6 for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval loss")
  axes[0].set_ylabel("loss (nats/token)")
  axes[0].legend(fontsize=8)
  axes[1].plot(t, [r["lr"] for r in train])
  axes[1].set_ylabel("learning rate")
  mix_keys = sorted({k for r in train for k in r if k.startswith("mixture/")})
  for k in mix_keys:
    axes[2].plot(t, [r.get(k, 0.0) for r in train], label=k[len("mixture/"):])
  axes[2].set_ylabel("mixture weight")
  axes[2].set_xlabel("tokens seen (millions)")
  if mix_keys:
    axes[2].legend(fontsize=8)
  phases = []
  for r in train:
    if not phases or phases[-1][1] != r.get("phase"):
      phases.append((r["tokens_seen"] / 1e6, r.get("phase")))
  for ax in axes:
    for x, _ in phases[1:]:
      ax.axvline(x, color="gray", ls=":", lw=0.8)
  for x, name in phases:
    axes[0].annotate(str(name), (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  paths.write_bytes(out_path, buffer.getvalue())
  return out_path
