#!/usr/bin/env python
"""Plot a CompreSSM run from its ``compression_history.json``.

    python scripts/plot_compression.py outputs/compressssm-kjv/compression_history.json [--output_dir DIR]

Writes two PNGs next to the JSON (or into --output_dir):
  * ``state_sizes.png``: state size of every layer against the optimisation step;
  * ``spectra.png``: for every layer, each attempt's importance scores sorted in decreasing order (normalised to
    sum 1, log scale) with the cut (the number of states kept) marked.
Needs matplotlib (``pip install matplotlib``).
"""

import argparse
import json
import os
import sys


def _fail(message: str) -> int:
    print(f"plot_compression.py: error: {message}", file=sys.stderr)
    return 2


def load_history(path: str) -> list[dict]:
    """The attempts of a history file (a list of report dicts), checked for the keys the plots use."""
    with open(path) as f:
        history = json.load(f)
    if not isinstance(history, list):
        raise ValueError(f"{path} must hold a list of reduction reports")
    for i, entry in enumerate(history):
        missing = {"step", "sizes_before", "sizes_after", "layers"} - set(entry)
        if missing:
            raise ValueError(f"entry {i} of {path} lacks {sorted(missing)}")
        for layer in entry["layers"]:
            if not {"layer", "scores", "new_size", "old_size"} <= set(layer):
                raise ValueError(f"entry {i} of {path} has a layer record without scores/new_size/old_size")
    return history


def _total_steps(folder: str) -> int | None:
    path = os.path.join(folder, "trainer_state.json")
    try:
        with open(path) as f:
            return int(json.load(f).get("global_step") or 0) or None
    except (OSError, ValueError):
        return None


def plot_state_sizes(history: list[dict], path: str, last_step: int | None = None) -> None:
    import matplotlib.pyplot as plt

    applied = [e for e in history if not e.get("rolled_back")]
    num_layers = len(history[0]["sizes_before"])
    steps = [0] + [int(e["step"] or 0) for e in applied]
    sizes = [history[0]["sizes_before"]] + [e["sizes_after"] for e in applied]
    if last_step and last_step > steps[-1]:
        steps.append(last_step)
        sizes.append(sizes[-1])
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(num_layers):
        ax.plot(
            steps, [s[layer] for s in sizes], drawstyle="steps-post", marker="o", markersize=3, label=f"layer {layer}"
        )
    for entry in history:
        if entry.get("rolled_back"):
            ax.axvline(int(entry["step"] or 0), color="red", linestyle=":", linewidth=1)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("state size N")
    ax.set_ylim(bottom=0)
    ax.set_title("CompreSSM: state size per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if num_layers > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(history: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    attempts = [e for e in history if e["layers"]]
    num_layers = len(history[0]["sizes_before"])
    cols = min(4, num_layers)
    rows = -(-num_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for layer in range(num_layers):
        ax = axes[layer // cols][layer % cols]
        for k, entry in enumerate(attempts):
            record = next((d for d in entry["layers"] if d["layer"] == layer), None)
            if record is None:
                continue
            scores = sorted((max(float(s), 0.0) for s in record["scores"]), reverse=True)
            total = sum(scores) or 1.0
            values = [max(s / total, 1e-12) for s in scores]
            color = colors[k % len(colors)]
            ax.semilogy(
                range(1, len(values) + 1),
                values,
                color=color,
                linewidth=1.2,
                label=f"step {entry['step']}: {record['old_size']}→{record['new_size']}",
            )
            if record["new_size"] < record["old_size"]:
                ax.axvline(record["new_size"] + 0.5, color=color, linestyle="--", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("state (sorted by score)")
        ax.set_ylabel("normalised score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for extra in range(num_layers, rows * cols):
        axes[extra // cols][extra % cols].axis("off")
    fig.suptitle("Sorted state-importance spectra (dashed: cut, states to the right removed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", help="compression_history.json")
    parser.add_argument("--output_dir", help="where to write the PNGs (default: the JSON's folder)")
    parser.add_argument("--last_step", type=int, help="extend the size plot to this step (default: trainer_state.json)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.history):
        return _fail(f"history file {args.history} does not exist.")
    try:
        history = load_history(args.history)
    except (ValueError, KeyError, TypeError) as err:
        return _fail(str(err))
    if not history:
        return _fail(f"{args.history} records no reduction attempt: nothing to plot.")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return _fail("plotting needs matplotlib: `pip install matplotlib`.")
    folder = os.path.dirname(os.path.abspath(args.history))
    out = args.output_dir or folder
    if args.output_dir and not os.path.isdir(os.path.dirname(os.path.abspath(out)) or "."):
        return _fail(f"the parent of --output_dir {out} does not exist.")
    os.makedirs(out, exist_ok=True)
    sizes_png, spectra_png = os.path.join(out, "state_sizes.png"), os.path.join(out, "spectra.png")
    plot_state_sizes(history, sizes_png, args.last_step or _total_steps(folder))
    plot_spectra(history, spectra_png)
    print(f"Wrote {sizes_png} and {spectra_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
