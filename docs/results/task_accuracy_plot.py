"""Bar chart of masked-token accuracy per task for generative workdirs (docs/RESULTS.md).

    python docs/results/task_accuracy_plot.py OUT.png LABEL=WORKDIR [LABEL=WORKDIR ...]

Reads each workdir's ``eval.json`` (``python -m mmgen eval``) and draws, for every task
any of them evaluated, one bar per workdir plus the unigram baseline of the first
workdir that scored the task.
"""

import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from evals import read_evals


def main(out: str, pairs: list[str]) -> None:
    runs = [(label, {r["task"]: r for r in e["token_accuracy"]}) for label, e in read_evals(pairs)]
    tasks = [t for t in dict.fromkeys(t for _, by_task in runs for t in by_task)
             if sum(t in by_task for _, by_task in runs) > 1]
    width = 0.8 / (len(runs) + 1)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 3.6))
    for i, (label, by_task) in enumerate(runs):
        ax.bar(x + i * width, [100 * by_task[t]["accuracy"] if t in by_task else 0 for t in tasks], width, label=label)
    unigram = [100 * next(by_task[t]["unigram"] for _, by_task in runs if t in by_task) for t in tasks]
    ax.bar(x + len(runs) * width, unigram, width, label="unigram", color="grey")
    ax.set_xticks(x + width * len(runs) / 2, tasks, rotation=15)
    ax.set_ylabel("masked-token accuracy (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
