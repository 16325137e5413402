"""The model card a training run writes: ``<output_dir>/README.md``, at every checkpoint.

TRL's trainers fill one fixed template that links the base model and the quick-start model to the
hub; trained from a local folder and pushed nowhere, both links read ``huggingface.co/None``, and
its quick start (a text-generation pipeline on ``output_dir``) loads nothing, since the adapters sit
in ``best/``, ``final/`` and ``checkpoint-N/``. :class:`ModelCardMixin` overrides the trainer's
``create_model_card`` (the hook TRL's ``_save_checkpoint`` calls before each checkpoint) so the card
is right when written: the base model is named as given and linked only when it is a hub id, and
the quick start loads the run's adapter with tagfer. The adapter folders keep PEFT's own cards.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ModelCardMixin", "model_card", "is_hub_id"]

TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

A LoRA adapter for {{ base_text }}, trained by tagfer (TAG: Thinking with Action Unit Grounding for
facial expression recognition) with TRL's {{ trainer_name }} trainer{% if paper_id %}, the method of
[{{ paper_title }}](https://huggingface.co/papers/{{ paper_id }}){% endif %}{% if dataset_name %}, on {{ dataset_name }}{% endif %}.

## Quick start

```bash
tagfer analyze face.jpg --model {{ model_ref }}
```

```python
from tagfer.models.vlm import load_vlm

vlm = load_vlm("{{ model_ref }}")  # base model + adapter, ready for TAG traces
```

### Framework versions
{% for name, v in versions %}
- {{ name }}: {{ v }}{% endfor %}

## Citations
{% if trainer_citation %}
Cite {{ trainer_name }} as:

```bibtex
{{ trainer_citation }}
```
{% endif %}
Cite TRL as:

```bibtex
{% raw %}@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}{% endraw %}
```
"""

_PACKAGES = ("tagfer", "trl", "transformers", "peft", "torch", "datasets")


def is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path: a model the hub can link to."""
    return bool(name) and not Path(str(name)).exists() and str(name).count("/") == 1


def _versions() -> list[tuple[str, str]]:
    out = []
    for p in _PACKAGES:
        try:
            out.append((p, metadata.version(p)))
        except metadata.PackageNotFoundError:
            continue
    return out


def model_card(*, base_model: str | None, model_name: str, model_ref: str, trainer_name: str,
               tags: Sequence[str] = (), dataset_name: str | None = None, paper: dict[str, str] | None = None) -> Any:
    """A ``huggingface_hub.ModelCard``: ``base_model`` linked when it is a hub id (and then in the
    metadata), else named in code; ``model_ref`` is what the quick start loads; ``paper`` is a TRL
    trainer's ``_paper`` (``title``, ``id``, ``citation``)."""
    from huggingface_hub import ModelCard, ModelCardData  # lazy (start-up time): huggingface_hub, jinja2

    hub = is_hub_id(base_model)
    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if hub else f"`{base_model}`" if base_model else "its base model"
    paper = paper or {}
    data = ModelCardData(base_model=base_model if hub else None, datasets=dataset_name, library_name="peft",
                         model_name=model_name, tags=["generated_from_trainer", *dict.fromkeys(tags)])
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=model_name, base_text=base_text, model_ref=model_ref,
        trainer_name=trainer_name, dataset_name=dataset_name, paper_title=paper.get("title"),
        paper_id=paper.get("id"), trainer_citation=paper.get("citation"), versions=_versions(),
    )


class ModelCardMixin:
    """Mixed into a TRL trainer (before it in the bases): its ``create_model_card`` writes
    :func:`model_card` to ``<output_dir>/README.md`` (rank 0 only, like TRL's). ``card_adapter``:
    the folder under ``output_dir`` the quick start loads when the run has no ``hub_model_id``."""

    card_adapter = "final"

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | Sequence[str] | None = None) -> None:
        if not self.is_world_process_zero():
            return
        extra = [tags] if isinstance(tags, str) else list(tags or ())
        base = getattr(self.model.config, "_name_or_path", "") or None
        out = self.args.output_dir
        card = model_card(
            base_model=base, model_name=model_name or Path(out).name,
            model_ref=self.hub_model_id or str(Path(out) / self.card_adapter), trainer_name=self._name,
            tags=[*self._tag_names, *extra], dataset_name=dataset_name, paper=self._paper,
        )
        card.save(os.path.join(out, "README.md"))
