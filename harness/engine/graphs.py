"""The whole training step as one CUDA graph: batch gather and augmentation, the method's ``observe`` (for
GEM: every memory pass, the current pass, the QP and the projection) and the optimizer step.

An eager ResNet-32 step at batch 128 is bound by kernel launches, not by arithmetic: replaying a recorded
graph launches the same kernels with one call. What a replay does is fixed at capture time, so a graphed
step must have static shapes and keep all of its state in tensors it updates in place:

- shapes are static per task: the batch size is fixed, and GEM's past-task memories do not change while a
  task trains. A new task (t past tasks instead of t - 1, a new optimizer) is captured afresh;
- the ragged last batch of an epoch (e.g. 10,000 images at batch 128 leave 16) has another shape: it runs
  eagerly, through the same code, on the same parameters, so nothing is dropped or padded;
- host bookkeeping (step counts, how full the memory is) lives in ``Method.count_step``, which runs for
  every step whether it is replayed or not; ``observe`` itself only enqueues device work;
- the learning rate is a device tensor that the schedule fills in place, and the optimizer is the fused
  kernel that reads it there (``harness.engine.optim.build_optimizer(graph_ready=True)``);
- random numbers (crops, flips, jitter, A-GEM's sample) come from the CUDA generator, which a graph
  advances on every replay, so each replay draws new ones.

The first ``warmup`` full steps of a task run eagerly on a side stream (cuDNN picks its algorithms,
optimizer state is created), then the step is captured and replayed. A method that synchronises with the
host by design (the PyCIL-style arm: quadprog on the CPU) is not ``Method.graph_safe``, says why and runs
eagerly; so does any step whose capture fails, with one logged line saying why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.methods.base import StepResult

StepFn = Callable[[torch.Tensor], StepResult]


class GraphedStep:
    """Runs ``step_fn(index)`` for a batch of training indices: eagerly, or by replaying its CUDA graph.

    ``enabled`` False (or a non-CUDA device) means always eager. ``blocker`` is why the method's step cannot
    be captured (None if it can). ``note`` receives the single line logged when the step runs eagerly
    although graphs were asked for. The returned ``StepResult`` of a replay lives in the graph's static
    memory: read it (enqueue work on it) before the next step, as the trainer does."""

    def __init__(self, step_fn: StepFn, batch_size: int, device: torch.device, *, enabled: bool,
                 blocker: str | None, note: Callable[[str], None], warmup: int = 3) -> None:
        self.step_fn, self.batch_size, self.device, self.warmup = step_fn, batch_size, device, warmup
        self.note = note
        self.eager_reason: str | None = None
        if enabled and device.type != "cuda":
            self.eager_reason = f"no CUDA device ({device.type})"
        elif enabled and blocker is not None:
            self.eager_reason = blocker
        self.enabled = enabled and self.eager_reason is None
        if enabled and self.eager_reason is not None:
            note(f"cuda_graph: steps run eagerly: {self.eager_reason}")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.index: torch.Tensor | None = None
        self.result: StepResult | None = None
        self.warm = 0
        self.captures = 0
        self.replays = 0

    @property
    def mode(self) -> str:
        """``graph`` or ``eager: <why>`` (recorded as a run tag)."""
        return "graph" if self.enabled else f"eager: {self.eager_reason or 'cuda_graph off'}"

    def reset(self) -> None:
        """Forget the captured step: a new task changes its shapes and its optimizer."""
        self.graph, self.index, self.result, self.warm = None, None, None, 0

    def __call__(self, index: torch.Tensor) -> StepResult:
        if not self.enabled or len(index) != self.batch_size:
            return self.step_fn(index)
        if self.graph is not None:
            self.index.copy_(index)
            self.graph.replay()
            self.replays += 1
            return self.result
        if self.warm < self.warmup:
            self.warm += 1
            return self._side_stream(index)
        return self._capture(index)

    def _side_stream(self, index: torch.Tensor) -> StepResult:
        # Warm-up on a side stream, as capture itself runs on one: lazily created state (cuDNN workspaces,
        # autograd's buffers) then belongs to the stream the graph records on.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            result = self.step_fn(index)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return result

    def _capture(self, index: torch.Tensor) -> StepResult:
        self.index = index.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                result = self.step_fn(self.index)
        except Exception as exc:  # any capture failure has one remedy: run the same step eagerly
            first_line = (str(exc).splitlines() or [""])[0][:200]
            self.enabled, self.eager_reason = False, f"capture failed ({type(exc).__name__}: {first_line})"
            self.note(f"cuda_graph: steps run eagerly: {self.eager_reason}")
            self.reset()
            return self.step_fn(index)
        self.graph, self.result = graph, result
        self.captures += 1
        # Capture only records the kernels: replaying performs this step.
        graph.replay()
        self.replays += 1
        return result
