"""How much can knowing the main shape's height say about the sound's tokens? A count-model bound.

    python docs/results/height_information.py TOKEN_CACHE_DIR DATA_DIR [DATASET]

For each residual level of the cached sound tokens, fits counts (add-0.1 smoothing) of
the token given (a) nothing, (b) the true height of the main shape at that sound step
(8 bins, interpolated from the frames), (c) the height and the shape's kind (which sets
the tone's harmonics), on the cache's train split, and prints the cross-entropy on its
test split in nats per token. (a) - (b) is what a model that reads the height perfectly
from the picture could save per sound token with no other knowledge: the size of the
signal that ``video_to_audio``'s paired dependence gain is looking for. The same for
the video tokens given their position, and given their position and the height (at the
frames each latent frame covers, causal 1 + 4k): ``audio_to_video``'s side. Used in
docs/RESULTS.md ("Agreement: more distinct clips").
"""

import sys

import numpy as np

from mmgen.data.builders import moving_shapes_av, sources

BINS = 8


def heights(data_dir: str, dataset: str, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """(main_y [num, frames], label [num]) of the first ``num`` clips of ``split``, in stored order."""
    source, _ = sources.open_split(dataset, split, data_dir)
    rows = [source[i] for i in range(num)]
    return np.stack([r["main_y"] for r in rows]), np.array([r["label"] for r in rows])


def step_bins(main_y: np.ndarray, steps: int) -> np.ndarray:
    """Height bin of the main shape at each of ``steps`` sound steps spread over the clip."""
    frames = main_y.shape[1]
    at = np.linspace(0, frames - 1, steps)
    y = np.stack([np.interp(at, np.arange(frames), row) for row in main_y])
    return np.clip((y * BINS).astype(int), 0, BINS - 1)


def latent_frame_bins(main_y: np.ndarray, latent_frames: int) -> np.ndarray:
    """Height bin of the main shape at each latent frame of a causal tokenizer (frame 0, then groups)."""
    frames = main_y.shape[1]
    factor = (frames - 1) // (latent_frames - 1) if latent_frames > 1 else 1
    groups = [main_y[:, :1]] + [main_y[:, 1 + factor * (t - 1):1 + factor * t] for t in range(1, latent_frames)]
    return np.clip((np.stack([g.mean(axis=1) for g in groups], axis=1) * BINS).astype(int), 0, BINS - 1)


def cross_entropy(train_tokens, train_context, test_tokens, test_context, vocab: int, alpha: float = 0.1) -> float:
    counts = np.full((max(train_context.max(), test_context.max()) + 1, vocab), alpha)
    np.add.at(counts, (train_context.ravel(), train_tokens.ravel()), 1.0)
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log(p[test_context.ravel(), test_tokens.ravel()]).mean())


def main(cache_dir: str, data_dir: str, dataset: str = "moving_shapes_av/tiny") -> None:
    train, test = (np.load(f"{cache_dir}/{split}.npz") for split in ("train", "test"))
    y_train, label_train = heights(data_dir, dataset, "train", len(train["label"]))
    y_test, label_test = heights(data_dir, dataset, "test", len(test["label"]))
    if not ((label_train == train["label"]).all() and (label_test == test["label"]).all()):
        raise SystemExit("the cache's clips are not the dataset's, in order: wrong DATA_DIR or DATASET?")
    shapes = len(moving_shapes_av.SHAPES)
    for level in range(train["audio_tokens"].shape[-1]):
        tr, te = train["audio_tokens"][..., level], test["audio_tokens"][..., level]
        vocab = int(max(tr.max(), te.max())) + 1
        h_tr, h_te = step_bins(y_train, tr.shape[1]), step_bins(y_test, te.shape[1])
        kind_tr = np.broadcast_to((label_train % shapes)[:, None], tr.shape)
        kind_te = np.broadcast_to((label_test % shapes)[:, None], te.shape)
        none = cross_entropy(tr, np.zeros_like(tr), te, np.zeros_like(te), vocab)
        height = cross_entropy(tr, h_tr, te, h_te, vocab)
        both = cross_entropy(tr, h_tr * shapes + kind_tr, te, h_te * shapes + kind_te, vocab)
        print(f"sound level {level} ({vocab} codes): nothing {none:.3f}, height {height:.3f} "
              f"(saves {none - height:.3f}), height + shape {both:.3f} (saves {none - both:.3f}) nats/token")
    tr, te = train["video_tokens"], test["video_tokens"]  # [n, t, h, w]
    vocab = int(max(tr.max(), te.max())) + 1
    positions = np.arange(np.prod(tr.shape[1:])).reshape(tr.shape[1:])
    pos_tr, pos_te = (np.broadcast_to(positions, a.shape) for a in (tr, te))
    spread = lambda bins, a: np.broadcast_to(bins[:, :, None, None], a.shape)
    h_tr, h_te = spread(latent_frame_bins(y_train, tr.shape[1]), tr), spread(latent_frame_bins(y_test, te.shape[1]), te)
    none = cross_entropy(tr, np.zeros_like(tr), te, np.zeros_like(te), vocab)
    position = cross_entropy(tr, pos_tr, te, pos_te, vocab)
    height = cross_entropy(tr, pos_tr * BINS + h_tr, te, pos_te * BINS + h_te, vocab)
    print(f"video ({vocab} codes): nothing {none:.3f}, position {position:.3f}, position + height {height:.3f} "
          f"(saves {position - height:.3f}) nats/token")


if __name__ == "__main__":
    main(*sys.argv[1:])
