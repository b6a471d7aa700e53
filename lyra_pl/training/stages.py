"""The four training stages of Lyra (docs/method.md, "Training stages"), one LightningModule each on a
shared base, :class:`LyraStage`.

| stage | class | trainable | lr | model defaults |
|---|---|---|---|---|
| 0 base VLM (tiny only) | :class:`BaseVLMStage` | decoder, lm_head, ViT | 1e-3 | LCMR off |
| 1 speech alignment | :class:`SpeechAlignStage` | speech projector | 1e-3 | LCMR off |
| 2 joint SFT | :class:`JointSFTStage` | speech projector + ``speech`` LoRA (r64, a16); sound projector + ``sound`` LoRA | 2e-4 | LCMR 0.5 |
| 3 long speech SFT | :class:`LongSpeechStage` | projector + ``long_speech`` LoRA (r128, a256) | 1e-4 | LMME(4, 0.7) |
| 4 speech generation | :class:`SpeechGenStage` | speech generator | 2e-4 | warmup 9% |

All stages: AdamW (weight decay 0), cosine schedule with linear warmup (3%, 9% in stage 4),
stepped per optimizer step. Precision (bf16) is the Trainer's ``precision`` setting.

**Sound is part of stage 2.** The paper trains sound understanding in a separate SFT on
AudioCaps (46K samples). Here the sound samples (AudioCaps-style captions, official JSON with
``sound`` items) join the stage-2 mix, and stage 2 also trains the sound projector and a
``sound`` LoRA adapter (the same LoRA spec as ``speech``), which MLoRA runs on every batch
holding sound (:func:`lyra_pl.model.lora.select_adapters`); Whisper stays frozen. One stage
rather than a separate one: the sound parts share no weight with the speech parts, so they
train in the same pass over the data with no extra hand-off or run; the price is that a batch
mixing sound with other samples runs the sound adapter on all of them (adapters are chosen per
batch). ``sound=False`` leaves the sound parts out, for a mix without sound.

**Batches.** A batch is a :class:`~lyra_pl.model.LyraInputs`, or a dict
``{"inputs": LyraInputs, "units": (B, U) long, "unit_lengths": (B,) long}``; stage 4 needs the
dict (its loss is the speech generator's CTC against ``units``), the other stages accept both
and ignore the units.

**Constructor = config schema.** Every constructor argument is a plain typed value, so the
LightningCLI and the YAML files in ``configs/`` map 1:1 to it. ``model_overrides`` are
:class:`~lyra_pl.model.LyraConfig` field overrides applied on top of the stage's own defaults
(:attr:`LyraStage.model_defaults`).

**Hand-off between stages.** :meth:`LyraStage.save_model` writes a directory with the projectors
and the speech generator (:func:`lyra_pl.model.loading.save_parts`), every LoRA adapter
(``adapter_<name>/``, peft format) and ``config.json``; the next stage's ``init_from`` loads it
into its freshly built model before choosing what trains. Lightning's own checkpoints
(``ckpt_path=...``) resume a stage as usual.

**Multi-modality LoRA.** A batch runs the adapters of its modalities
(:meth:`~lyra_pl.model.LyraModel.adapters_for`): the ``speech`` adapter for speech up to one
30 s window, ``long_speech`` for longer speech when that adapter exists, ``sound`` for sound.
Text and image batches run the base model. A stage warns once when a training batch with speech
does not reach the speech adapter it trains (short clips in stage 3).

**A batch that uses nothing trainable** (a text batch in a LoRA stage) has a loss without a
graph: on one process its step has no backward and moves no weight (AdamW skips parameters
without a gradient, as it does for any part a batch leaves unused). Under FSDP2 every rank's
graph holds every trainable parameter instead, unused ones with zero gradients
(:mod:`lyra_pl.training.uniform_graph`), so that all ranks reduce the same gradients.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lyra_pl.model import loading, lora
from lyra_pl.model.checkpoints import check_checkpoints
from lyra_pl.model.info import parameter_rows
from lyra_pl.model.config import LyraConfig
from lyra_pl.model.inputs import LyraInputs
from lyra_pl.model.lyra import LyraModel, LyraOutput
from lyra_pl.training import context_parallel as cp
from lyra_pl.training import precision
from lyra_pl.training.epoch_means import EpochMeans
from lyra_pl.training.parallelize import (data_parallel_mesh, materialize, parallelize,
                                          parameter_share, unsharded_root)


BASE_FILE = "base.json"
RUN_FILE = "run.json"  # what made an export (lyra_pl.export reads it)


# ----------------------------------------------------------------------------- batches
def split_batch(batch: LyraInputs | dict) -> tuple[LyraInputs, Tensor | None, Tensor | None]:
    """``(inputs, units, unit_lengths)`` of a batch in either accepted form."""
    if isinstance(batch, LyraInputs):
        return batch, None, None
    if isinstance(batch, dict) and isinstance(batch.get("inputs"), LyraInputs):
        return batch["inputs"], batch.get("units"), batch.get("unit_lengths")
    raise TypeError("a batch must be a LyraInputs or a dict {'inputs': LyraInputs, 'units': ..., "
                    f"'unit_lengths': ...}}, got {type(batch).__name__}")


# ----------------------------------------------------------------------------- reporting
def parameter_table(model: LyraModel, title: str = "parameters") -> str:
    """A text table of trainable vs frozen parameters per component and LoRA adapter."""
    counts = parameter_rows(model)
    width = max(len(r) for r in [*counts, "component"]) + 2
    lines = [title, f"{'component':<{width}}{'trainable':>14}{'frozen':>16}"]
    for row, (t, f) in counts.items():
        lines.append(f"{row:<{width}}{t:>14,}{f:>16,}" + ("  <- trains" if t else ""))
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    lines.append(f"{'total':<{width}}{total_t:>14,}{total_f:>16,}")
    return "\n".join(lines)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use e.g. 'bfloat16', 'float32' or null)")
    return dtype


# ----------------------------------------------------------------------------- base
class LyraStage(L.LightningModule):
    """Shared base of the four stages: builds the model, chooses what trains, steps, logs.

    Args:
        preset: :class:`LyraConfig` preset (``tiny``, ``mini``, ``base``, ``pro``).
        model_overrides: LyraConfig fields, applied over the stage's :attr:`model_defaults`.
        init_from: a directory written by :meth:`save_model` (a previous stage): its parts and
            LoRA adapters are loaded into the new model.
        qwen2vl / whisper: local checkpoint directories of the pretrained LLM + ViT and of
            the Whisper encoder (anything not given keeps its random initialization).
        lr, weight_decay, warmup_ratio, betas: AdamW and the cosine schedule (linear warmup
            over ``warmup_ratio`` of the optimizer steps).
        hybrid_shard: under FSDP2 on several nodes, shard within a node and replicate across
            nodes (HSDP) instead of sharding over every rank.
        context_parallel: under FSDP2, split each sample's sequence over groups of this many
            consecutive ranks (context parallelism, :mod:`lyra_pl.training.context_parallel`;
            it must divide the ranks of a node). The ranks of a group read the same batches:
            the global batch is ``batch_size x world / context_parallel`` per step.
        max_new_tokens: answer length limit of ``predict`` (greedy generation).
        activation_checkpointing, compile, param_dtype, reduce_dtype: passed to
            :func:`~lyra_pl.training.parallelize.parallelize` (the dtypes are FSDP2's mixed
            precision, allowed only under ``ModelParallelStrategy``, where the shipped configs
            set bfloat16 / float32; None keeps the weights' dtype). One setting owns the
            precision (:mod:`lyra_pl.training.precision`), checked again in
            :meth:`configure_model`.

    Subclasses set :attr:`model_defaults`, :attr:`trainable_parts` (and, for LoRA stages, an
    adapter) or override :meth:`setup_trainable` and :meth:`compute_loss`.
    """

    model_defaults: ClassVar[dict[str, Any]] = {}
    """LyraConfig overrides this stage applies before the user's ``model_overrides``."""
    trainable_parts: tuple[str, ...] = ()
    """Attributes of :class:`LyraModel` that train (everything else is frozen)."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters that train (:class:`_LoraStage`), the speech one first."""

    def __init__(
        self,
        preset: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        qwen2vl: str | None = None,
        whisper: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        activation_checkpointing: bool = False,
        compile: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        hybrid_shard: bool = False,
        context_parallel: int = 1,
        max_new_tokens: int = 32,
    ):
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        self.preset = preset
        self.model_overrides = dict(model_overrides or {})
        self.init_from = init_from
        self.qwen2vl = qwen2vl
        self.whisper = whisper
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.betas = tuple(betas)
        self.activation_checkpointing = activation_checkpointing
        self.compile_layers = compile
        self.param_dtype = _dtype(param_dtype)
        self.reduce_dtype = _dtype(reduce_dtype)
        self.hybrid_shard = hybrid_shard
        if context_parallel < 1:
            raise ValueError(f"context_parallel must be >= 1, got {context_parallel}")
        if context_parallel > 1 and compile:
            raise ValueError("context_parallel does not run with compile=True yet: the split "
                             "attention's collectives are outside the compiled layer graphs")
        self.context_parallel = context_parallel
        self.max_new_tokens = max_new_tokens
        self.config = self.model_config()  # validated now, not in the middle of a launch
        self.model: LyraModel | None = None
        self._warned_adapter = False
        self._val_means = EpochMeans()
        self.step_metrics: dict[str, Any] = {}  # the last training step's, by logged name

    # ------------------------------------------------------------------ building
    def model_config(self) -> LyraConfig:
        """The stage defaults, then the user's overrides, on the preset."""
        return LyraConfig.from_preset(self.preset, **{**self.model_defaults, **self.model_overrides})

    def configure_model(self) -> None:
        """Builds the model once (Lightning may call this hook more than once). One process:
        build, load the weights, choose what trains, AC / compile. Sharded (FSDP2): build on the
        meta device, add adapters, choose what trains, AC / compile / FSDP2, allocate each
        rank's shards (:func:`materialize`), then load the weights slice by slice."""
        if self.model is not None:
            return
        if self._trainer is not None:  # the preflight checked CLI runs; this, runs set up in Python
            precision.check(self.trainer.precision, self.param_dtype, self.reduce_dtype,
                            fsdp2=self.device_mesh is not None)
        # The checkpoints against the config, before the model is built (Pro is 74B).
        check_checkpoints(self.config, self.qwen2vl, self.whisper, self.preset)
        if self.device_mesh is None:
            if self.context_parallel > 1:
                raise ValueError(f"context_parallel {self.context_parallel} needs the FSDP2 "
                                 "strategy (lyra_pl.training.parallelize.FSDP2Strategy)")
            model = LyraModel(self.config)
            self._load_weights(model)
            self.setup_trainable(model)
            parallelize(model, None, activation_checkpointing=self.activation_checkpointing,
                        compile=self.compile_layers)
        else:
            # Sharded: build on the meta device, add the adapters (structure only), shard,
            # then each rank allocates and loads only its shards: no rank ever holds the
            # whole model (Pro is 74B parameters).
            with torch.device("meta"):
                model = LyraModel(self.config)
            if self.init_from is not None:
                for sub in sorted(Path(self.init_from).glob("adapter_*")):
                    lora.inject_saved_adapter(model.llm, sub, sub.name.removeprefix("adapter_"))
            self.setup_trainable(model)
            mesh = data_parallel_mesh(self.device_mesh, self.trainer.num_nodes,
                                      hybrid=self.hybrid_shard)
            split = None
            if self.context_parallel > 1:
                split = cp.context_parallel_split(self.device_mesh, self.context_parallel,
                                                  self.trainer.num_devices)
            parallelize(model, mesh, activation_checkpointing=self.activation_checkpointing,
                        compile=self.compile_layers, param_dtype=self.param_dtype,
                        reduce_dtype=self.reduce_dtype, sequence_split=split)
            materialize(model, self.device)
            self._load_weights(model)
        self.model = model

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this rank's data-parallel replica for training and validation: the
        ranks of a context-parallel group read the same batches. Prediction (generation runs
        on whole sequences) shares its samples over every rank instead."""
        if self._trainer is None:
            return 0, 1
        return cp.data_parallel_rank(self.global_rank, self.trainer.world_size,
                                     self.context_parallel)

    def _load_weights(self, model: LyraModel) -> None:
        if self.qwen2vl is not None:
            loading.load_qwen2vl(model, self.qwen2vl)
        if self.whisper is not None:
            loading.load_whisper(model, self.whisper)
        if self.init_from is not None:
            self.load_model(model, self.init_from)

    def setup_trainable(self, model: LyraModel) -> None:
        """Freezes everything, then unfreezes :attr:`trainable_parts`."""
        model.requires_grad_(False)
        lora.trainable_adapter_parameters(model.llm, [])  # every adapter frozen as well
        for part in self.trainable_parts:
            getattr(model, part).requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def on_train_start(self) -> None:
        """Fully frozen components run in eval mode while training: no dropout in what does not
        learn (e.g. the frozen LLM's LoRA dropout feeding the speech generator in stage 4).
        Lightning keeps these modes across validation."""
        for module in self._require_model().components().values():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    # ------------------------------------------------------------------ hand-off
    def save_model(self, directory: str | Path) -> Path:
        """Writes what the next stage needs: ``<part>.safetensors`` for the projectors and the
        speech generator, ``adapter_<name>/`` per LoRA adapter, ``config.json``, and
        ``base.json`` (the ``qwen2vl`` / ``whisper`` directories this stage loaded).

        Under FSDP2 every rank must call it (sharded weights are gathered part by part; the
        encoders and the LLM, which no stage hands on, never are); global rank 0 writes."""
        model = self._require_model()
        write = self._writes_files
        d = Path(directory)
        loading.save_parts(model, d, write=write)
        for name in lora.adapter_names(model.llm):
            lora.save_adapter(model.llm, name, d / f"adapter_{name}", write=write)
        if write:
            (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
            base = {k: str(Path(v).resolve()) for k, v in
                    (("qwen2vl", self.qwen2vl), ("whisper", self.whisper)) if v is not None}
            if base:  # where the frozen weights came from, for `lyra-pl eval --ckpt`
                (d / BASE_FILE).write_text(json.dumps(base, indent=2))
            (d / RUN_FILE).write_text(json.dumps(self._run_record(), indent=2))
        return d

    def _run_record(self) -> dict[str, Any]:
        """What made this export, for ``lyra-pl export``'s model card: the stage, the export
        it started from, the run folder, steps, data and the MLflow run that holds its
        metrics."""
        record: dict[str, Any] = {
            "stage": type(self).__name__, "preset": self.preset,
            "init_from": None if self.init_from is None else str(Path(self.init_from).resolve())}
        if self._trainer is None:
            return record
        trainer = self.trainer
        record.update(run_dir=str(Path(trainer.default_root_dir).resolve()),
                      global_step=trainer.global_step, epochs=trainer.current_epoch)
        paths = getattr(trainer.datamodule, "paths", None) or {}
        data = {k: str(v) for k, v in paths.items() if v is not None}
        if getattr(trainer.datamodule, "tokenizer", None):
            data["tokenizer"] = str(trainer.datamodule.tokenizer)
        if data:
            record["data"] = data
        for logger in trainer.loggers:  # our MLflow logger, by what it has
            if hasattr(logger, "tracking_uri") and hasattr(logger, "run_id"):
                record["mlflow"] = {"tracking_uri": logger.tracking_uri,
                                    "experiment": getattr(logger, "experiment_name", None),
                                    "run_id": logger.run_id}
        return record

    @property
    def _writes_files(self) -> bool:
        """Whether this process writes exported files (global rank 0, or no Trainer)."""
        return self._trainer is None or self.trainer.is_global_zero

    @staticmethod
    def load_model(model: LyraModel, directory: str | Path) -> list[str]:
        """Loads a :meth:`save_model` directory into ``model``: the part files present and
        every ``adapter_*`` directory. Returns what was loaded."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"init_from directory {str(d)!r} does not exist")
        saved = d / "config.json"
        if saved.is_file():
            theirs = json.loads(saved.read_text())
            ours = model.config.to_dict()
            shape_fields = ("hidden_size", "num_layers", "audio_dim", "generator_hidden", "n_units")
            diff = [f"{k}: {theirs[k]} vs {ours[k]}" for k in shape_fields
                    if k in theirs and theirs[k] != ours[k]]
            if diff:
                raise ValueError(f"{saved} describes a different model ({'; '.join(diff)})")
        loaded = loading.load_parts(model, d)
        for sub in sorted(d.glob("adapter_*")):
            name = sub.name.removeprefix("adapter_")
            loaded.append("lora:" + lora.load_adapter(model.llm, sub, name=name))
        return loaded

    def _require_model(self) -> LyraModel:
        if self.model is None:
            raise RuntimeError("the model is built in configure_model(); call it (or fit) first")
        return self.model

    # ------------------------------------------------------------------ steps
    def forward(self, batch: LyraInputs | dict) -> LyraOutput:
        inputs, units, unit_lengths = split_batch(batch)
        return self._require_model()(inputs, units=units, unit_lengths=unit_lengths)

    def compute_loss(self, out: LyraOutput) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The loss to optimize and the metrics to log with it (names without prefix)."""
        metrics = {"ce": out.ce_loss, "lcmr": out.lcmr_loss, "generator": out.generator_loss}
        return out.loss, {k: v.detach() for k, v in metrics.items() if v is not None}

    def _step(self, batch: LyraInputs | dict) -> tuple[Tensor | None, LyraOutput, dict[str, Tensor]]:
        """(loss, output, the metrics to log: loss, its parts, token counts)."""
        out = self(batch)
        loss, metrics = self.compute_loss(out)
        if loss is not None:
            metrics = {"loss": loss.detach(), **metrics}
        metrics.update(token_metrics(out))
        return loss, out, metrics

    def training_step(self, batch: LyraInputs | dict, batch_idx: int) -> Tensor | None:
        """The step's loss; None (Lightning skips the backward) when nothing trainable ran."""
        loss, out, metrics = self._step(batch)
        size = split_batch(batch)[0].batch_size
        # kept for EdgeStepLogs, which logs the first and last step whatever the interval
        self.step_metrics = {f"train/{name}": value for name, value in metrics.items()}
        for name, value in metrics.items():
            self.log(f"train/{name}", value, batch_size=size, on_step=True, on_epoch=False,
                     prog_bar=name in ("loss", "lcmr"))  # on the progress bar
        if loss is None:
            raise ValueError(f"training batch {batch_idx} gives no loss (no answer labels"
                             + (" or unit targets" if isinstance(self, SpeechGenStage) else "")
                             + ")")
        self._check_adapter_used(split_batch(batch)[0], out)
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.step_metrics["train/lr"] = lr
            self.log("train/lr", lr, batch_size=size, on_step=True, on_epoch=False,
                     prog_bar=True)
        if not loss.requires_grad:
            # Nothing trainable ran (one process: e.g. a text-only batch in a LoRA stage, which
            # MLoRA sends through the base model): no backward; the optimizer step finds no
            # gradient and moves nothing. Sharded, the uniform-graph hooks put every trainable
            # parameter in the graph, so this does not happen there.
            return None
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_means = EpochMeans()

    def validation_step(self, batch: LyraInputs | dict, batch_idx: int) -> Tensor | None:
        """Padding batches (which keep the ranks in step, :mod:`lyra_pl.data.stream`) run but
        are not counted; nor are the other ranks' copies of a context-parallel group's batch."""
        loss, _, metrics = self._step(batch)
        padding = isinstance(batch, dict) and batch.get("padding")
        # A context-parallel group validates each sample together: one rank counts it.
        if not padding and cp.is_group_leader(self.global_rank, self.context_parallel):
            self._val_means.add(metrics, split_batch(batch)[0].batch_size)
        return loss

    def on_validation_epoch_end(self) -> None:
        """``val/<metric>``: sample-weighted means over every rank's samples (one reduction,
        :class:`~lyra_pl.training.epoch_means.EpochMeans`), and ``val/samples`` validated."""
        means, samples = self._val_means.compute(self.device)
        if samples:
            self.log_dict({**{f"val/{k}": v for k, v in means.items()},
                           "val/samples": float(samples)}, sync_dist=False)

    def predict_step(self, batch: LyraInputs | dict, batch_idx: int) -> dict[str, Any]:
        """Greedy answers to prompt batches (``LyraDataModule`` prediction): the generated ids
        per sample, how its instruction came (``speech``, ``sound`` or ``text``), and the
        batch's keys / reference answers / choices / extra fields / padding flag passed through for
        :class:`~lyra_pl.training.callbacks.AnswerAccuracy` and the eval tasks
        (:class:`~lyra_pl.eval.runner.EvalTask`)."""
        inputs = split_batch(batch)[0]
        with unsharded_root(self._require_model()) as model:
            out = model.generate(inputs, max_new_tokens=self.max_new_tokens,
                                 synced=self.device_mesh is not None)
        extra = {k: batch[k] for k in ("keys", "answers", "choices", "extras", "padding")
                 if isinstance(batch, dict) and k in batch}
        counts = inputs.media_counts  # (B, 4): image, video, speech, sound items per sample
        kinds = (["speech" if c[2] else "sound" if c[3] else "text" for c in counts.tolist()]
                 if counts is not None else ["?"] * inputs.batch_size)
        return {"tokens": out.tokens, "instruction": kinds, **extra}

    def _check_adapter_used(self, inputs: LyraInputs, out: LyraOutput) -> None:
        """Warns once when a batch with speech does not run the speech adapter this stage
        trains (e.g. short clips in stage 3). Text/image batches run the base model by design."""
        adapter = next(iter(self.adapters), None)
        speech = {"speech", "long_speech"} & inputs.modalities()
        if adapter and speech and adapter not in out.adapters and not self._warned_adapter:
            self._warned_adapter = True
            rank_zero_warn(f"{type(self).__name__} trains LoRA adapter {adapter!r} but a training "
                           f"batch with {sorted(speech)} ran adapters {out.adapters} (chosen from "
                           "its modalities); such batches do not train the adapter")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, LyraInputs):
            return batch.to(device)
        if isinstance(batch, dict):
            return {k: self.transfer_batch_to_device(v, device, dataloader_idx)
                    for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_cosine_schedule_with_warmup

        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("the cosine schedule needs a finite number of steps: set max_steps "
                             "or max_epochs on the Trainer")
        total = int(total)
        warmup = math.ceil(self.warmup_ratio * total)
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ reporting
    def on_fit_start(self) -> None:
        model = self._require_model()
        rank_zero_info(parameter_table(model, f"{type(self).__name__}: trainable vs frozen "
                                              "parameters"))
        held, sharded, whole = parameter_share(model)
        if sharded:  # every rank says what it holds
            print(f"[rank {self.global_rank}] holds {held:,} of {sharded:,} sharded parameter "
                  f"values ({held / sharded:.1%}) under FSDP2, plus {whole:,} replicated "
                  "(frozen encoders)", flush=True)


def token_metrics(out: LyraOutput) -> dict[str, Tensor]:
    """``tokens``: valid tokens entering the decoder; ``kept_ratio_block{j}``: the fraction of
    the valid tokens before LMME pruning step j that it kept. Keep masks are False on padding,
    so step j-1's kept count is step j's input."""
    before = out.state.valid.new_tensor(float(out.tokens), dtype=torch.float32)
    metrics = {"tokens": before}
    for j, keep in enumerate(out.keeps):
        kept = keep.sum().float()
        metrics[f"kept_ratio_block{j}"] = kept / before.clamp(min=1)
        before = kept
    return metrics


# ----------------------------------------------------------------------------- stages
class _LoraStage(LyraStage):
    """A stage that trains the speech projector and its :attr:`adapters` on the LLM, each
    added with ``lora_spec`` unless ``init_from`` already brought it."""

    trainable_parts = ("speech_projector",)

    def __init__(self, lora_r: int, lora_alpha: float, lora_dropout: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.lora_spec = lora.LoraSpec(lora_r, lora_alpha, lora_dropout)

    def setup_trainable(self, model: LyraModel) -> None:
        super().setup_trainable(model)
        for name in self.adapters:
            if name not in lora.adapter_names(model.llm):
                lora.add_adapter(model.llm, name, self.lora_spec)
        lora.trainable_adapter_parameters(model.llm, list(self.adapters))


class BaseVLMStage(LyraStage):
    """Stage 0, tiny preset only: trains the decoder, lm_head and ViT on typed image questions,
    standing in for the pretrained Qwen2-VL that the real presets load. Its hand-off is a
    Qwen2-VL checkpoint (``export/qwen2vl``) and the frozen audio encoder as a Whisper
    checkpoint (``export/whisper``), which the later stages load as ``qwen2vl`` / ``whisper``."""

    model_defaults = {"lcmr_weight": 0.0}
    trainable_parts = ("llm", "lm_head", "visual")

    def __init__(self, lr: float = 1e-3, **kwargs: Any):
        super().__init__(lr=lr, **kwargs)

    def save_model(self, directory: str | Path) -> Path:
        d = super().save_model(directory)
        loading.save_qwen2vl(self._require_model(), d / "qwen2vl", write=self._writes_files)
        loading.save_whisper(self._require_model(), d / "whisper", write=self._writes_files)
        return d


class SpeechAlignStage(LyraStage):
    """Stage 1, speech alignment on ASR pairs: only the speech projector trains; LCMR off."""

    model_defaults = {"lcmr_weight": 0.0}
    trainable_parts = ("speech_projector",)

    def __init__(self, lr: float = 1e-3, **kwargs: Any):
        super().__init__(lr=lr, **kwargs)


class JointSFTStage(_LoraStage):
    """Stage 2, joint text-image-speech SFT: speech projector + ``speech`` LoRA (r 64,
    alpha 16), loss CE + 0.5 LCMR (batches need ``transcript_ids`` for the LCMR term).

    ``sound``: the mix's sound samples also train the sound projector and a ``sound`` adapter
    (the same LoRA spec), the paper's separate sound SFT folded into this stage (see the module
    docstring)."""

    model_defaults = {"lcmr_weight": 0.5}
    adapters = ("speech",)

    def __init__(self, lr: float = 2e-4, lora_r: int = 64, lora_alpha: float = 16,
                 lora_dropout: float = 0.05, sound: bool = True, **kwargs: Any):
        super().__init__(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lr=lr, **kwargs)
        self.sound = sound
        if sound:
            self.adapters = (*self.adapters, "sound")
            self.trainable_parts = (*self.trainable_parts, "sound_projector")


class LongSpeechStage(_LoraStage):
    """Stage 3, long speech SFT: projector + ``long_speech`` LoRA (r 128, alpha 256), with
    LMME(4, 0.7) (fewer blocks when the model has fewer than 4 layers); LCMR off. The
    ``long_speech`` adapter runs on batches with speech longer than one 30 s window."""

    model_defaults = {"lmme_blocks": 4, "lmme_keep_ratio": 0.7, "lcmr_weight": 0.0}
    adapters = ("long_speech",)

    def __init__(self, lr: float = 1e-4, lora_r: int = 128, lora_alpha: float = 256,
                 lora_dropout: float = 0.05, **kwargs: Any):
        super().__init__(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lr=lr, **kwargs)

    def model_config(self) -> LyraConfig:
        if "lmme_blocks" in self.model_overrides:
            return super().model_config()
        layers = LyraConfig.from_preset(self.preset, **{
            k: v for k, v in self.model_overrides.items() if k != "lmme_blocks"}).num_layers
        blocks = min(self.model_defaults["lmme_blocks"], layers)
        return LyraConfig.from_preset(
            self.preset, **{**self.model_defaults, "lmme_blocks": blocks, **self.model_overrides})


class SpeechGenStage(LyraStage):
    """Stage 4, speech generation: only the speech generator trains, on CTC against unit
    targets (batches are dicts with ``units`` / ``unit_lengths``).

    The LLM runs without building a graph, with no ``torch.no_grad`` of its own: every
    parameter before the generator is frozen and the generator reads the LLM's hidden states
    detached (:meth:`LyraModel.speech_generator_loss`), so autograd records nothing for the
    LLM (no activations kept) while the generator's loss stays inside the model's forward,
    where FSDP2 needs it."""

    model_defaults = {"lcmr_weight": 0.0}
    trainable_parts = ("speech_generator",)

    def __init__(self, lr: float = 2e-4, warmup_ratio: float = 0.09, **kwargs: Any):
        super().__init__(lr=lr, warmup_ratio=warmup_ratio, **kwargs)
        if self.context_parallel > 1:
            raise ValueError("SpeechGenStage trains the speech generator on whole sequences: "
                             f"context_parallel must be 1, got {self.context_parallel}")

    def forward(self, batch: LyraInputs | dict) -> LyraOutput:
        if split_batch(batch)[1] is None:
            raise ValueError("SpeechGenStage batches are dicts with 'inputs', 'units' and "
                             "'unit_lengths'")
        return super().forward(batch)

    def compute_loss(self, out: LyraOutput) -> tuple[Tensor | None, dict[str, Tensor]]:
        _, metrics = super().compute_loss(out)
        return out.generator_loss, metrics


STAGES: dict[int, type[LyraStage]] = {
    0: BaseVLMStage, 1: SpeechAlignStage, 2: JointSFTStage, 3: LongSpeechStage, 4: SpeechGenStage,
}
