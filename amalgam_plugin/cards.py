"""Model cards: the one place a student's README.md is rendered (:func:`render_card`, from a :class:`Card`) and
where ``amalgam evaluate --card`` puts its section into an existing card (:func:`embed_evaluation`).

Every card writer (``save_student``, the students' ``save_pretrained``, ``amalgamate``, the bundled paper
students' script) gives :func:`render_card` a :class:`Card` or a dict of its fields, checked the same way. This
module knows no student type: the caller passes the config fields of the card's architecture line (the student
type's ``card_fields``), so the students' folder format can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from .files import copy_atomically, write_text_atomically

PAPER_URL = "https://arxiv.org/abs/2203.06474"
PAPER_CITATION = """@inproceedings{huang2022optimizer,
  title     = {Optimizer Amalgamation},
  author    = {Huang, Tianshu and Chen, Tianlong and Liu, Sijia and Chang, Shiyu and Amini, Lisa
               and Wang, Zhangyang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2203.06474}
}"""
BASE_TAGS = [
    "amalgam-plugin",
    "optimizer",
    "learned-optimizer",
    "optimizer-amalgamation",
    "pytorch",
    "arxiv:2203.06474",
]
DEFAULT_INTENDED_USE = (
    "A learned, coordinate-wise optimizer for PyTorch: `AmalgamOptimizer(model.parameters(), student=...)` "
    "in an ordinary training loop, in place of Adam or SGD. Best suited to small and medium networks and "
    "tasks close to its training problem (image classifiers of MNIST scale)."
)
DEFAULT_LIMITATIONS = (
    "Learned optimizers generalise imperfectly: far from the training problem (other architectures, much "
    "longer runs, very different loss scales) the student may be slower than a tuned Adam or diverge. "
    "The student keeps per-parameter state (RNNProp: 82 floats per parameter, far more than Adam's 2; the lean "
    "and normalized students: 4)."
)
DEFAULT_LR_NOTE = "lr multiplies the student's update (1.0 = as trained); weight_decay is in AdamW units"
TRAINING_SECTION = [  # (card field, label) in the order the Training section shows them
    ("pool", "Teacher pool"),
    ("mechanism", "Mechanism"),
    ("problem", "Training problem"),
    ("data_split", "Data split"),
    ("recipe", "Recipe"),
    ("perturbation", "Perturbation (docs/method.md#perturbations)"),
    ("seeds", "Seeds"),
]


def _key(description: str) -> Any:
    return field(default=None, metadata={"description": description})


@dataclass(frozen=True)
class Card:
    """What a model card says beyond the student's config. Every field is optional: ``None`` leaves it out, or
    shows the default text."""

    title: Any = _key("heading of the card (default: the student type)")
    description: Any = _key("one paragraph: what this student is")
    pool: Any = _key("the teacher pool: a preset name, or a list of teacher specs (strings or dicts)")
    mechanism: Any = _key("amalgamation mechanism: mean, minmax or choice (or a sentence)")
    problem: Any = _key("the training (meta-training) problem")
    data_split: Any = _key("which data the student saw and which it never saw")
    recipe: Any = _key("the meta-training recipe (text, or a dict of settings shown as a list)")
    perturbation: Any = _key("the perturbation of the student's weights during meta-training (dict or text)")
    seeds: Any = _key("the seeds used (meta-training and evaluation)")
    command: Any = _key("the command that reproduces this folder")
    intended_use: Any = _key("intended use (default text provided)")
    limitations: Any = _key("limits (default text provided)")
    evaluation_notes: Any = _key("how the evaluation was run, e.g. reduced protocol, how baselines were chosen")
    notes: Any = _key("anything else (provenance, selection, caveats)")
    license_notice: Any = _key("a license notice to carry (e.g. the MIT notice of the original weights)")
    citation: Any = _key("BibTeX (default: the paper)")
    tags: Any = _key("extra Hub tags (list of strings)")

    @classmethod
    def of(cls, card: Card | Mapping[str, Any] | None) -> Card:
        """``card`` as a Card; a dict's keys are checked first (a ValueError names the unknown and the valid ones)."""
        if isinstance(card, Card):
            return card
        unknown = sorted(set(card or {}) - set(CARD_KEYS))
        if unknown:
            raise ValueError(f"unknown model-card keys {', '.join(unknown)}; valid keys: {', '.join(CARD_KEYS)}")
        return cls(**(card or {}))


CARD_KEYS = {f.name: f.metadata["description"] for f in fields(Card)}


def _md_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "\n".join(f"- `{k}`: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, Mapping):
                v = ", ".join(f"{k}={x}" for k, x in v.items())
            items.append(f"- {v}")
        return "\n".join(items)
    return str(value)


def _front_matter(tags: list[str]) -> str:
    data = ModelCardData(library_name="amalgam-plugin", license="mit", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def architecture_line(config: Mapping[str, Any], card_fields: Sequence[str]) -> str:
    """``**Architecture**: `TYPE` k=v, ...``: the config fields of the student type's architecture."""
    shown = ", ".join(f"{k}={config[k]}" for k in card_fields if k in config)
    return f"**Architecture**: `{config.get('student_type', '?')}` {shown}"


def render_card(
    config: Mapping[str, Any],
    card: Card | Mapping[str, Any] | None = None,
    evaluation: Any = None,
    plot_name: str | None = None,
    reference: str | None = None,
    card_fields: Sequence[str] = (),
    lr_note: str = DEFAULT_LR_NOTE,
) -> str:
    """The README.md model card of a student with ``config`` (its config.json): YAML metadata (library_name,
    license, tags incl. ``arxiv:2203.06474``) and the sections Intended use, Limits, How to use, Training (teacher
    pool, mechanism, problem, data split, recipe, seeds, architecture: the ``card_fields`` of the config),
    Reproduce, Evaluation (table + plot), Notes, License, Citation. ``card``: a :class:`Card` or a dict of its
    fields (:data:`CARD_KEYS`). ``lr_note``: what ``lr`` means for the student type (How to use)."""
    card = Card.of(card)
    student_type = config.get("student_type", "?")
    tags = list(dict.fromkeys(BASE_TAGS + [f"student-{student_type}"] + list(card.tags or [])))
    out = [_front_matter(tags), f"# {card.title or f'amalgam-plugin {student_type} student'}\n"]
    if card.description:
        out.append(f"{card.description}\n")
    out.append(
        f"A learned optimizer trained by [Optimizer Amalgamation]({PAPER_URL}) (Huang et al., ICLR 2022): a "
        "student optimizer distilled from a pool of analytical teacher optimizers. Saved by amalgam-plugin "
        "in the Hub format "
        "(`config.json` with `student_type` and `format_version`, `model.safetensors`). References of the form "
        "`docs/method.md#section` point to the method document of the amalgam-plugin repository, which states "
        "every formula, value and deviation from the paper.\n"
    )
    out.append(f"## Intended use\n\n{card.intended_use or DEFAULT_INTENDED_USE}\n")
    out.append(f"## Limits\n\n{card.limitations or DEFAULT_LIMITATIONS}\n")
    out.append(
        "## How to use\n\n```python\nfrom amalgam_plugin.optim import AmalgamOptimizer\n\n"
        'optimizer = AmalgamOptimizer(model.parameters(), student="<this folder, bundled name or repo id>")\n'
        f"# {lr_note}\n```\n\n"
        + (f"Warm-up: the first {config['warmup_steps']} steps are plain SGD at lr {config.get('warmup_lr', 0)} "
           "with the student's recurrent state frozen (as the student was evaluated); override with "
           "`warmup_steps=`.\n" if config.get("warmup_steps", 0) else
           "No fixed warm-up: the student runs from the first step (add the warm-up of your LR schedule).\n")
    )
    training = []
    for key, label in TRAINING_SECTION:
        if getattr(card, key) is not None:
            value = _md_value(getattr(card, key))
            training.append(f"**{label}**:" + ("\n\n" + value if "\n" in value else f" {value}"))
    training.append(architecture_line(config, card_fields))
    out.append("## Training\n\n" + "\n\n".join(training) + "\n")
    if card.command:
        out.append(f"## Reproduce\n\n```bash\n{card.command}\n```\n")
    if evaluation is not None:
        section = ["## Evaluation\n", evaluation.protocol() + "\n", evaluation.table("markdown", reference) + "\n"]
        if evaluation.notes:
            section.append("How the baselines were chosen:\n\n" + evaluation.notes_text() + "\n")
        if card.evaluation_notes:
            section.append(f"{card.evaluation_notes}\n")
        if plot_name:
            section.append(f"![held-out loss against steps]({plot_name})\n")
        out.append("\n".join(section))
    elif card.evaluation_notes:
        out.append(f"## Evaluation\n\n{card.evaluation_notes}\n")
    if card.notes:
        out.append(f"## Notes\n\n{_md_value(card.notes)}\n")
    license_text = "MIT."
    if card.license_notice:
        license_text += f"\n\n```\n{card.license_notice.strip()}\n```"
    out.append(f"## License\n\n{license_text}\n")
    out.append(f"## Citation\n\n```bibtex\n{card.citation or PAPER_CITATION}\n```\n")
    return "\n".join(out)


# --- the section of ``amalgam evaluate --card`` ------------------------------------------------------------------

CARD_BEGIN, CARD_END = "<!-- amalgam evaluate: begin -->", "<!-- amalgam evaluate: end -->"
EVALUATE_PLOTS = (("held-out loss against steps", "curves"),
                  ("best log held-out loss per optimizer", "bars"),
                  ("held-out loss against training time", "time"))


def embed_evaluation(folder: Path, plots_dir: Path, problems: Iterable[str],
                     markdown: Callable[[Mapping[str, Mapping[str, str]]], str]) -> Path:
    """Put an evaluation into the model card of the student in ``folder``: each problem's plots in ``plots_dir``
    are copied beside the card as ``evaluate-PROBLEM-KIND.png`` (a link under that name is replaced, never written
    through), and ``markdown(plots)`` (``{problem: {caption: file name}}``) replaces the section between the
    markers, or is appended when the card has none. Returns the card's path."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        raise ValueError(f"--card {str(folder)!r} holds no model card (README.md)")
    plots = {}
    for problem in problems:
        plots[problem] = {}
        for caption, suffix in EVALUATE_PLOTS:
            name = f"evaluate-{problem}-{suffix}.png"
            copy_atomically(Path(plots_dir) / f"{problem}-{suffix}.png", Path(folder) / name)
            plots[problem][caption] = name
    body = markdown(plots).replace("\n## ", "\n### ")
    body = body.replace("# amalgam evaluate", "## Evaluation across problems (`amalgam evaluate`)", 1)
    section = f"{CARD_BEGIN}\n{body}\n{CARD_END}"
    text = card.read_text()
    if CARD_BEGIN in text and CARD_END in text:
        text = text[: text.index(CARD_BEGIN)] + section + text[text.index(CARD_END) + len(CARD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text_atomically(card, text)
    return card
