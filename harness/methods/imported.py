"""Bring your own method: an unmodified LibContinual-interface class, run as an arm.

``method: {import: path/to/gem.py:GEM, kwargs: {...}, steps_itself: false}`` (or a LibContinual method
file whose ``classifier:`` block says ``import:``) runs the class with LibContinual's trainer contract:

- ``Cls(backbone, feat_dim, num_class, **kwargs)``, with ``kwargs['device']`` and the block's kwargs; the
  backbone is the arm's, returning ``{'features': tensor}``; the class brings its own classifier;
- ``get_parameters(config)`` gives the optimizer's parameter groups (else all of the class's parameters);
- each step: ``zero_grad → observe(data) → loss.backward() → step``, with ``data = {'image', 'label'}`` and
  ``observe`` returning ``(pred, acc, loss)``. A class that runs ``backward`` inside ``observe`` (LibContinual's
  own-backward path, GEM's projection) declares ``steps_itself: true`` and gets ``zero_grad → observe →
  step``. A class that changes the parameters inside ``observe`` (an optimizer step of its own) while the
  trainer would step as well is stopped with one line: that is the double step;
- ``before_task`` / ``after_task(task_idx, buffer, train_loader, test_loaders)`` with real DataLoaders over
  the identical split (the harness has no rehearsal buffer: ``buffer`` is None);
- evaluation through ``inference(data) → (pred, acc)``, the class's own decision rule; if ``inference``
  accepts ``task_id``, it also gives the task-incremental predictions (else TIL accuracy is not measured).

The imported file and the Python files beside it are recorded with the run (``provenance``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.errors import UserError
from harness.methods.base import Batch, Context, Method, StepResult
from harness.methods.registry import register_method

REQUIRED = ("observe", "inference")


def split_target(target: str) -> tuple[Path, str]:
    """``path/to/file.py:ClassName`` -> (path, class name)."""
    path, sep, name = target.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise UserError(f"import {target!r}: must be path/to/file.py:ClassName")
    return Path(path), name


def package_root(path: Path) -> Path:
    """The folder above the outermost package holding ``path`` (the file's own folder outside packages)."""
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    return root


def load_class(target: str) -> type:
    """Import the class the way its own framework would: its package root on ``sys.path``, the file as its
    dotted module, so its relative and absolute imports of sibling modules work unchanged."""
    path, name = split_target(target)
    if not path.is_file():
        raise UserError(f"{path}: no such file (import {target!r})")
    root = package_root(path.resolve())
    module_name = ".".join(path.resolve().relative_to(root).with_suffix("").parts)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the user's file raises while importing
        raise UserError(f"{path}: does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise UserError(f"{path}: no class {name!r} (classes in the file: {', '.join(found) or 'none'})")
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"{path}: class {name} has no {' or '.join(missing)}() (the LibContinual interface needs "
                        f"{', '.join(REQUIRED)})")
    return cls


class FeatureBackbone(nn.Module):
    """The arm's backbone as LibContinual's classes call it: ``backbone(x)['features']``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.backbone(x)}


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@register_method("import")
class ImportedMethod(Method):
    """Adapter from the harness's ``Method`` to a LibContinual-interface class (module docstring)."""

    owns_head = True

    @dataclass
    class Options:
        """``target``: ``path/to/file.py:ClassName``; ``kwargs``: the class's keyword arguments;
        ``steps_itself``: its ``observe`` runs ``backward`` itself."""

        target: str = ""
        kwargs: dict = field(default_factory=dict)
        steps_itself: bool = False

    def __init__(self, net: nn.Module, options: Any, ctx: Context) -> None:
        super().__init__(net, options, ctx)
        self.backbone = net.backbone
        self.cls = load_class(options.target)
        self.where = f"{split_target(options.target)[0]}:{self.cls.__name__}"
        self.instance = self.cls(FeatureBackbone(net.backbone), net.backbone.feat_dim, ctx.split.num_classes,
                                 device=ctx.device, **options.kwargs)
        # The class's whole model is what trains and evaluates (its classifier lives outside the backbone).
        self.net = self.instance if isinstance(self.instance, nn.Module) else net
        self.til = _accepts(self.instance.inference, "task_id")
        # DataLoaders draw their workers' seeds from this generator, never from the global one: building and
        # iterating them leaves the run's random stream exactly as a built-in arm's.
        self.loader_rng = torch.Generator().manual_seed(0)
        # The test set goes to the device once, not with every batch of every test loader.
        self.test_images = ctx.split.dataset.test_x.to(ctx.device)
        self.test_labels = ctx.split.test_y.to(ctx.device)

    # -- the LibContinual trainer contract ------------------------------------------------------------
    def _loader(self, index: torch.Tensor, train: bool) -> DataLoader:
        transform = self.ctx.train_transform if train else self.ctx.eval_transform

        def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            rows = torch.stack(items).to(self.ctx.device)
            return {"image": transform(self.ctx.train_images[rows] if train else self.test_images[rows], train=train),
                    "label": (self.ctx.train_labels if train else self.test_labels)[rows]}

        return DataLoader(list(index.cpu()), batch_size=128, shuffle=train, collate_fn=collate, generator=self.loader_rng)

    def _loaders(self, task: int) -> tuple[DataLoader, list[DataLoader]]:
        tasks = self.ctx.split.tasks
        return self._loader(tasks[task].train, True), [self._loader(tasks[k].test, False) for k in range(task + 1)]

    def before_task(self, task: int) -> None:
        super().before_task(task)
        hook = getattr(self.instance, "before_task", None)
        if callable(hook):
            hook(task, None, *self._loaders(task))

    def after_task(self, task: int) -> None:
        hook = getattr(self.instance, "after_task", None)
        if callable(hook):
            hook(task, None, *self._loaders(task))

    def optimizer_params(self, recipe: dict[str, Any]) -> Any:
        get = getattr(self.instance, "get_parameters", None)
        return get(recipe) if callable(get) else self.net.parameters()

    def _parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def observe(self, batch: Batch, optimizer: torch.optim.Optimizer) -> StepResult:
        optimizer.zero_grad(set_to_none=False)
        before = [p.detach().clone() for p in self._parameters()]
        out = self.instance.observe({"image": batch.inputs, "label": batch.labels})
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor) and out[2].dim() == 0):
            raise UserError(f"{self.where}.observe returned {type(out).__name__}"
                            f"{f' of {len(out)}' if isinstance(out, tuple) else ''}; the interface is (pred, acc, loss) "
                            "with loss a scalar tensor")
        pred, _, loss = out
        if any(not torch.equal(b, p) for b, p in zip(before, self._parameters(), strict=True)):
            raise UserError(f"{self.where}.observe changed the parameters itself and the trainer would step them "
                            "again: a double step (remove the step inside observe)")
        has_grad = any(p.grad is not None and bool(p.grad.any()) for p in self._parameters())
        if self.options.steps_itself and not has_grad:
            raise UserError(f"{self.where}: steps_itself is true but observe computed no gradient")
        if not self.options.steps_itself:
            if has_grad:
                raise UserError(f"{self.where}.observe ran backward itself and the trainer would run it again: "
                                "declare steps_itself: true for an own-backward observe")
            loss.backward()
        optimizer.step()
        return StepResult(loss.detach(), (torch.as_tensor(pred, device=batch.labels.device) == batch.labels).sum())

    @torch.no_grad()
    def _infer(self, inputs: torch.Tensor, **task: int) -> torch.Tensor:
        out = self.instance.inference({"image": inputs, "label": torch.zeros(len(inputs), dtype=torch.long,
                                                                              device=inputs.device)}, **task)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise UserError(f"{self.where}.inference returned {type(out).__name__}; the interface is (pred, acc)")
        return torch.as_tensor(out[0], device=inputs.device).reshape(-1).long()

    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": self._infer(inputs)}

    def predict_til(self, inputs: torch.Tensor, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.til:
            return {}
        labels = torch.empty(len(inputs), dtype=torch.long, device=inputs.device)
        for t in tasks.unique().tolist():
            rows = tasks == t
            labels[rows] = self._infer(inputs[rows], task_id=t)
        return {"cnn": labels}

    # -- resume and provenance ------------------------------------------------------------------------
    @property
    def resumable(self) -> bool:
        """Exact only for a class that defines its own state_dict: nn.Module's covers parameters and
        buffers, not state a method keeps in plain attributes (a GEM's memories)."""
        own = getattr(type(self.instance), "state_dict", None)
        return own is not None and own is not nn.Module.state_dict

    def state_dict(self) -> dict[str, Any]:
        return {"instance": self.instance.state_dict()} if self.resumable else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "instance" in state:
            self.instance.load_state_dict(state["instance"])

    def provenance(self) -> dict[str, Any]:
        """The imported file and the Python files beside it, by name."""
        path = split_target(self.options.target)[0].resolve()
        return {p.name: p for p in sorted(path.parent.glob("*.py"))}
