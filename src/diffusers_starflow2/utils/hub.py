# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The Hugging Face Hub side of the package: how diffusers finds our components, and the model card.

A pipeline folder names each component by ``[library, class]`` in ``model_index.json``. diffusers only accepts
libraries it knows (``diffusers``, ``transformers``, ...) or code files inside the repository; a repository id whose
components live in an installed third-party package is refused before anything is downloaded. Registering
``diffusers_starflow2`` as a loadable library (done once, when the package is imported) makes ``save_pretrained``
write ``["diffusers_starflow2", "PretzelModel"]`` and lets both ``StarFlow2Pipeline.from_pretrained("user/repo")`` and
``DiffusionPipeline.from_pretrained("user/repo")`` resolve the classes from the installed package: no code from the
repository is ever executed, so ``trust_remote_code`` is accepted but not needed.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Optional

LIBRARY = "diffusers_starflow2"
# The embedded model: a tiny STARFlow2 (32x32 images) trained on the synthetic shapes world, shipped in the package.
EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")
INSTALL_LINE = "pip install diffusers-starflow2"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pipeline_source(path: str, name: str = "--model") -> str:
    """Check that ``path`` is a pipeline folder (one with ``model_index.json``) or, when no such path exists, a Hub
    repository id (``user/name``, loaded through the Hugging Face cache); returns it unchanged."""
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{name} {path} is not a STARFlow2 pipeline folder (no model_index.json)")
        return path
    if not REPO_ID.match(path):
        raise ValueError(f"{name} {path} is neither a STARFlow2 pipeline folder nor a Hub repo id (user/name)")
    return path


def register_with_diffusers(package) -> None:
    """Make ``package`` (the imported ``diffusers_starflow2``) a library diffusers saves to and loads from.

    diffusers looks up the base classes (``ModelMixin``, ``SchedulerMixin``) as attributes of the library to pick
    the save/load methods, and resolves a ``_class_name`` that is not its own as an attribute of ``diffusers``.
    """
    import diffusers
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
    from diffusers.pipelines import pipeline_loading_utils

    package.ModelMixin, package.SchedulerMixin = ModelMixin, SchedulerMixin
    methods = {
        "ModelMixin": ["save_pretrained", "from_pretrained"],
        "SchedulerMixin": ["save_pretrained", "from_pretrained"],
    }
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY, methods)
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(methods)
    for name in dir(package):
        obj = getattr(package, name)
        if isinstance(obj, type) and issubclass(obj, DiffusionPipeline):
            # where diffusers' own pipelines are found: `diffusers.X` and `diffusers.pipelines.X`
            for namespace in (diffusers, diffusers.pipelines):
                if not hasattr(namespace, name):
                    setattr(namespace, name, obj)


def model_card(
    repo_id: str,
    pipeline_class: str,
    trained_on: Optional[str] = None,
    base_model: Optional[str] = None,
    description: Optional[str] = None,
    tags=(),
):
    """A :class:`huggingface_hub.ModelCard` for a STARFlow2 / STARFlow pipeline repository.

    Args:
        repo_id: the repository the card describes (used in the usage example).
        pipeline_class: the pipeline class name (``StarFlow2Pipeline``, ``StarFlowPipeline``, ...).
        trained_on: what the model was trained on (one sentence); "not stated" when unknown.
        base_model: the repository this model was fine-tuned from, if any.
        description: free text placed under the title.
        tags: extra tags.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        base_model=base_model,
        pipeline_tag="text-to-image",
        tags=["diffusers", LIBRARY, "normalizing-flow", "starflow", "text-to-image", *tags],
    )
    text = f"""---
{data.to_yaml()}
---

# {repo_id}

{description or f"A {pipeline_class} (autoregressive normalizing flow) for diffusers."}

**Trained on:** {trained_on or "not stated"}.

## Use

```bash
{INSTALL_LINE}
```

```python
import torch
from diffusers_starflow2 import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{repo_id}")
image = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0)).images[0]
```

`DiffusionPipeline.from_pretrained("{repo_id}")` works too once `diffusers_starflow2` is imported; the repository holds
no code, the classes come from the installed package.
"""
    return ModelCard(text)


class StarFlowHubMixin:
    """``push_to_hub`` for our pipelines: the folder ``save_pretrained`` writes, plus a model card of our own."""

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        trained_on: Optional[str] = None,
        base_model: Optional[str] = None,
        description: Optional[str] = None,
    ) -> str:
        r"""Upload the pipeline folder and a model card (``README.md``) to the Hub repository ``repo_id``.

        Args:
            repo_id: ``"user/name"`` (created if missing).
            commit_message, private, token, create_pr, safe_serialization, variant: as in diffusers.
            trained_on, base_model, description: written into the model card (see :func:`model_card`).
        """
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, safe_serialization=safe_serialization, variant=variant)
            card = model_card(
                repo_id, type(self).__name__, trained_on=trained_on, base_model=base_model, description=description
            )
            card.save(os.path.join(tmpdir, "README.md"))
            return self._upload_folder(tmpdir, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)
