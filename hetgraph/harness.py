r"""A backend for EleutherAI's `lm-evaluation-harness <https://github.com/EleutherAI/lm-evaluation-harness>`_.

Registers the model type ``hetgraph`` with lm-eval 0.4's model registry, so any harness task
— perplexity (``loglikelihood_rolling``), multiple choice (``loglikelihood``) or generation
(``generate_until``) — runs on the base LM, kNN-LM, GNN-LM or GNN-LM + kNN::

    hetgraph-lm-eval --model hetgraph \
        --model_args model=DIR,datastore=DS,adapter=ADAPTER,method=gnn_knn \
        --tasks TASK ...

``hetgraph-lm-eval`` is lm-eval's own command line with this module imported first: lm-eval
0.4 looks models up in a registry filled by ``@register_model`` on import and (up to 0.4.13)
has no option or entry point that imports a backend from another package, so the stock
``lm_eval`` script cannot see ``hetgraph``. From Python, ``import hetgraph.harness`` and
then ``lm_eval.simple_evaluate(model="hetgraph", model_args=...)``, or pass a
:class:`HetGraphHarnessLM` instance as ``model``.

Every score goes through the same code as ``hetgraph eval``
(:func:`~hetgraph.evaluation.collect_lm_outputs` with the same windows, the same kNN-LM
mixture), so a rolling perplexity from the harness equals ``hetgraph eval``'s on the same
tokens. ``model_args`` (all but ``model`` optional):

- ``model``: a local model directory, a ``.gguf`` file or ``default`` (embedded SmolLM2).
- ``datastore``: a datastore directory with its index (needed by every method but ``base``).
- ``adapter``: an adapter directory from ``hetgraph train`` (needed by ``gnn``, ``gnn_knn``).
- ``method``: ``base``, ``knn``, ``gnn`` or ``gnn_knn`` (default: ``gnn_knn`` with an adapter,
  ``knn`` with a datastore, else ``base``).
- ``lam``, ``temperature``: the kNN-LM mixture; default: what ``hetgraph eval`` tuned for
  this adapter (or datastore), else the adapter's fusion config.
- ``k``: neighbours per position for the kNN-LM distribution (default: the tuned ``k``, else
  the adapter's).
- ``context_length``, ``stride``: the strided windows (defaults: :class:`EvalConfig`'s,
  capped by the model's positions).
- ``device``, ``dtype``, ``threads``, ``batch_size``, ``max_gen_toks``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetgraph.configuration import ConfigError
from hetgraph.corpus.tokenized import TokenizedSplit
from hetgraph.datastore import Datastore
from hetgraph.evaluation.gnn import gnn_forward
from hetgraph.evaluation.lm import EvalConfig, LMOutputs, collect_lm_outputs
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex
from hetgraph.io import ADAPTER_CONFIG, INDEX_DIR, sha256_hex
from hetgraph.knnlm import (
    interpolate_log_probs,
    knn_mixture_argmax,
    knn_target_log_probs,
    read_knn_tuning,
)
from hetgraph.models.checks import max_positions
from hetgraph.models.loading import load_model

try:  # lm-eval is an optional extra: `pip install hetgraph[lm-eval]`
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hetgraph.harness needs lm-evaluation-harness; install it with "
        "`pip install 'hetgraph[lm-eval]'`"
    ) from error

logger = logging.getLogger(__name__)

#: The methods a harness run can score with.
METHODS = ("base", "knn", "gnn", "gnn_knn")


@dataclasses.dataclass(frozen=True)
class Scored:
    """What one scored token sequence gives: per predicted token its log-probability under
    the method and whether it was the method's most likely token."""

    log_probs: np.ndarray
    greedy: np.ndarray


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("hetgraph")
class HetGraphHarnessLM(LM):
    r"""lm-eval's ``LM`` over a frozen HF causal LM with hetgraph's retrieval methods.

    Args:
        model: model directory, ``.gguf`` file or ``"default"``.
        datastore: datastore directory (with ``index/``); ``None`` for ``method="base"``.
        adapter: adapter directory; needed by ``gnn`` and ``gnn_knn``.
        method: one of :data:`METHODS`; ``None`` chooses the richest the arguments allow.
        lam, temperature, k: the kNN-LM mixture (see the module docstring for defaults).
        context_length, stride: strided windows of the scoring (``None``: EvalConfig's,
            capped by the model's positions).
        device, dtype, threads: where and how the model runs.
        batch_size: windows per forward pass.
        max_gen_toks: new tokens per ``generate_until`` request unless the request says.
        max_batch_size: accepted for lm-eval's command line; unused (requests are scored one
            at a time, each through ``batch_size`` windows per forward).
    """

    def __init__(
        self,
        model: str = "default",
        datastore: str | None = None,
        adapter: str | None = None,
        method: str | None = None,
        lam: float | None = None,
        temperature: float | None = None,
        k: int | None = None,
        context_length: int | None = None,
        stride: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        batch_size: int | str | None = 1,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from hetgraph.pipeline import resolve_device, set_threads

        self.method = self._choose_method(method, datastore, adapter)
        set_threads(None if threads is None else int(threads))
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line says cuda:0 unless told otherwise; like its own HF
            # backend, fall back to the CPU rather than refuse.
            logger.warning("device %s is not available; running on the CPU", device)
            device = "cpu"
        self.model, self.tokenizer = load_model(
            model,
            device=resolve_device(device, "model_args device"),
            dtype=getattr(torch, str(dtype)),
        )
        self.lm = self._fused_lm(datastore, adapter)
        positions = max_positions(self.model)
        defaults = EvalConfig()
        context = int(context_length or min(defaults.context_length, positions or sys.maxsize))
        self.eval_config = EvalConfig(
            context_length=context,
            stride=int(stride or max(1, context // 2)),
            batch_size=int(
                1 if batch_size is None or str(batch_size).startswith("auto") else batch_size
            ),
        )
        self.max_gen_toks = int(max_gen_toks)
        self.mixture = self._mixture(lam, temperature, k, adapter)

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def _choose_method(method: str | None, datastore: str | None, adapter: str | None) -> str:
        if method is None:
            return "gnn_knn" if adapter else "knn" if datastore else "base"
        if method not in METHODS:
            raise ConfigError(
                f"model_args method={method!r} is not one of {', '.join(METHODS)}", "method"
            )
        if method != "base" and datastore is None:
            raise ConfigError(
                f"model_args method={method} needs datastore=DIR (a datastore "
                "built by `hetgraph datastore build`)",
                "datastore",
            )
        if method.startswith("gnn") and adapter is None:
            raise ConfigError(
                f"model_args method={method} needs adapter=DIR (the --out "
                "directory of `hetgraph train`)",
                "adapter",
            )
        return method

    def _fused_lm(self, datastore: str | None, adapter: str | None) -> HetGraphLM | None:
        if datastore is None:
            return None
        store = Datastore.open(datastore, model=self.model, tokenizer=self.tokenizer)
        index = DatastoreIndex.load(Path(datastore) / INDEX_DIR, store)
        if adapter is not None:
            return HetGraphLM.from_pretrained(
                adapter, self.model, store, index, tokenizer=self.tokenizer
            )
        return HetGraphLM(self.model, store, index, FusionConfig(), tokenizer=self.tokenizer)

    def _mixture(
        self, lam: float | None, temperature: float | None, k: int | None, adapter: str | None
    ) -> tuple[float, float, int] | None:
        if not self.method.endswith("knn"):
            return None
        assert self.lm is not None
        tuned = (
            read_knn_tuning(
                Path(adapter)
                if adapter and self.method == "gnn_knn"
                else self.lm.engine.datastore.path,
                {
                    "datastore": self.lm.engine.datastore.fingerprint,
                    "adapter": sha256_hex((Path(adapter) / ADAPTER_CONFIG).read_bytes())
                    if adapter and self.method == "gnn_knn"
                    else None,
                },
            )
            or {}
        )
        lam = lam if lam is not None else tuned.get("lambda", self.lm.config.knn_lambda)
        temperature = (
            temperature
            if temperature is not None
            else tuned.get("temperature", self.lm.config.knn_temperature)
        )
        if lam is None or temperature is None:
            raise ConfigError(
                f"model_args method={self.method} needs the kNN-LM λ and temperature and none "
                "are recorded; run `hetgraph eval` on this datastore (and adapter) first, or "
                "give lam=… and temperature=…",
                "lam",
            )
        k = int(k if k is not None else tuned.get("k", self.lm.config.k))
        rows = len(self.lm.engine.datastore)
        if not 1 <= k < rows:
            raise ConfigError(
                f"model_args k={k} must be in [1, {rows}) (the datastore's size)",
                "k",
            )
        return float(lam), float(temperature), k

    # -- scoring -----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_tokens(self, tokens: Iterable[int]) -> Scored:
        r"""Score every token of ``tokens`` after the first, given those before it, with the
        backend's method, through ``hetgraph eval``'s windows and mixture."""
        ids = np.asarray(list(tokens), dtype=np.int64)
        split = TokenizedSplit("harness", ids, np.zeros(len(ids), dtype=np.int32), ["request"])
        config = self.eval_config
        base_knn = self.method in ("knn", "gnn_knn")
        outputs = collect_lm_outputs(
            self.model,
            split,
            dataclasses.replace(config, k=self.mixture[2]) if base_knn else config,
            show_progress=False,
            search=self.lm.engine.retriever if base_knn else None,
        )
        if self.method.startswith("gnn"):
            outputs = collect_lm_outputs(
                self.model,
                split,
                config,
                forward=gnn_forward(self.lm),
                neighbours_from=outputs if base_knn else None,
                show_progress=False,
            )
        return self._method_scores(outputs)

    def _method_scores(self, outputs: LMOutputs) -> Scored:
        if self.mixture is None:
            return Scored(outputs.lm_log_probs.numpy(), outputs.lm_correct.numpy())
        lam, temperature, _ = self.mixture
        knn = knn_target_log_probs(
            outputs.knn_distances, outputs.knn_tokens, outputs.targets, temperature
        )
        mix = interpolate_log_probs(outputs.lm_log_probs, knn, lam)
        pred = knn_mixture_argmax(
            outputs.lm_argmax,
            outputs.lm_neighbour_log_probs,
            outputs.knn_distances,
            outputs.knn_tokens,
            lam,
            temperature,
            lm_argmax_log_probs=outputs.lm_argmax_log_probs,
        )
        return Scored(mix.numpy(), (pred == outputs.targets).numpy())

    # -- lm-eval's interface -----------------------------------------------------------

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), greedy)`` per request."""
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids = self.tok_encode(context) if context else [self.prefix_token_id]
            continuation_ids = self.tok_encode(continuation)
            scored = self.score_tokens(context_ids + continuation_ids)
            n = len(continuation_ids)
            results.append(
                (
                    float(scored.log_probs[-n:].sum()) if n else 0.0,
                    bool(scored.greedy[-n:].all()) if n else True,
                )
            )
            self.cache_hook.add_partial("loglikelihood", request.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log P(text) per request: every token, the first given the prefix token."""
        results = []
        for request in requests:
            (text,) = request.args
            scored = self.score_tokens([self.prefix_token_id, *self.tok_encode(text)])
            results.append(float(scored.log_probs.sum()))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context up to its first stop string."""
        results = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tokenizer(context, return_tensors="pt").to(self.model.device)
            text = self._generate(prompt, max_new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results

    def _generate(self, prompt: Any, max_new_tokens: int) -> str:
        common = dict(
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        if self.lm is None:
            out = self.model.generate(**prompt, **common)
        else:  # "knn" runs an untrained (zero-gate) shell: the base model plus the mixture
            lam, temperature, _ = self.mixture or (None, None, None)
            out = self.lm.generate(
                **prompt,
                **common,
                knn=self.mixture is not None,
                knn_lambda=lam,
                knn_temperature=temperature,
            )
        return self.tokenizer.decode(
            out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True
        )


def main(argv: list[str] | None = None) -> None:
    """``hetgraph-lm-eval``: lm-eval's command line with the ``hetgraph`` backend registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
