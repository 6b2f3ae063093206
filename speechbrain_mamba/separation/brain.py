"""The one separation Brain shared by every recipe."""

import csv
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import speechbrain as sb
from speechbrain.nnet.losses import get_si_snr_with_pitwrapper
from speechbrain.utils.distributed import if_main_process

from speechbrain_mamba.separation.metrics import separation_scores
from speechbrain_mamba.separation.separator import SeparationForward, separate_mixture
from speechbrain_mamba.utils.cuda_graphs import TrainingCUDAGraphs

logger = logging.getLogger(__name__)
RESULT_COLUMNS = ["snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"]


def check_loss_threshold(threshold: Optional[float]) -> None:
    """Refuses a ``loss_threshold`` above 0 (or NaN): the loss is the negative SI-SNR, so -40 drops items
    already above 40 dB, while a positive value would drop nearly every item and train on almost nothing.

    Arguments
    ---------
    threshold : float, optional
        The hyperparameter (None: no threshold).

    Example
    -------
    >>> check_loss_threshold(-40)
    >>> check_loss_threshold(30)
    Traceback (most recent call last):
    ...
    ValueError: loss_threshold must be a negative SI-SNR in dB (e.g. -40) or absent; got 30.
    """
    if threshold is not None and not threshold <= 0:
        raise ValueError(f"loss_threshold must be a negative SI-SNR in dB (e.g. -40) or absent; got {threshold!r}.")


class Separation(sb.Brain):
    """Trains and evaluates a separation model with the PIT SI-SNR loss.

    Works with masking models (``encoder``/``masknet``/``decoder`` modules) and
    direct waveform models (a ``model`` module), always called through
    ``self.modules`` so that DDP synchronises their gradients. Batches are
    ``PaddedBatch`` objects with ``mixture`` [B, T] and ``sources`` [B, T, S].

    Training: per-item negative SI-SNR with the best permutation; items already
    better than ``-loss_threshold`` dB, and non-finite items, are dropped from
    the mean and counted (if some items are non-finite, the others are run
    through the model again without them, whose NaN would otherwise reach the
    gradient of the whole batch). A batch left empty is skipped, and under DDP the
    decision is shared, so either every rank steps or none does (no rank waits
    for a backward that never comes). With gradient accumulation, a skipped
    micro-batch keeps the gradients accumulated so far, except at the step
    itself, where the unsynchronised window is dropped. The optional ``lr_step_scheduler``
    (per optimizer step) and ``lr_epoch_scheduler`` (per epoch, on the
    validation loss) set the learning rate; gradient clipping is Brain's
    ``max_grad_norm``. Validation: mean loss; if any item's loss is non-finite (counted in the valid stats), the
    epoch's validation loss is inf, so that a diverged model never becomes the best checkpoint. Test: writes
    ``test_results.csv`` (SDR, SDRi, SI-SNR, SI-SNRi per utterance and their average over the finite values)
    into the output folder; an utterance BSS-eval cannot score (a silent source) gets NaN and a warning naming it.

    With ``cuda_graphs: True`` (CUDA, one process), the training forward and
    backward of each segment shape seen twice are recorded once and then
    replayed from CUDA graphs (:class:`~speechbrain_mamba.utils.cuda_graphs.TrainingCUDAGraphs`):
    the same step without the launch overhead that dominates Mamba models on
    short segments. It pays off with fixed-length segments (``training_signal_len``);
    it is refused with gradient accumulation, under DDP and off CUDA.

    Hyperparameters read: ``num_spks``, ``loss_threshold`` (optional),
    ``training_signal_len`` (optional; each item is cropped at random within its own length, from a generator
    seeded by ``seed``, the epoch, the step and the DDP rank), ``epoch_counter``, ``checkpointer``,
    ``train_logger``, ``output_folder``, ``save_audio`` (optional),
    ``lr_step_scheduler``/``lr_epoch_scheduler`` (optional), ``cuda_graphs`` (optional, default False).

    Arguments
    ---------
    See ``speechbrain.Brain``; additionally ``train_dataset`` may be set after
    construction to a dataset with ``set_epoch`` (dynamic mixing).

    Example
    -------
    >>> from speechbrain.dataio.batch import PaddedBatch
    >>> from speechbrain.lobes.models.dual_path import Decoder, Encoder
    >>> from speechbrain_mamba.lobes import MambaTasNetMaskNet
    >>> modules = {"encoder": Encoder(16, 8), "masknet": MambaTasNetMaskNet(8, 1),
    ...            "decoder": Decoder(8, 1, 16, stride=8, bias=False)}
    >>> brain = Separation(modules, lambda p: torch.optim.Adam(p), {"num_spks": 2})
    >>> batch = PaddedBatch([{"id": "a", "mixture": torch.randn(800), "sources": torch.randn(800, 2)}])
    >>> brain.compute_forward(batch.mixture.data).shape
    torch.Size([1, 800, 2])
    """

    train_dataset = None
    training_graphs = None

    def compute_forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """[B, T] mixture -> [B, T, num_spks] estimates, in fp32."""
        if self.training_graphs is not None:  # eager itself where no graph applies (evaluation, other shapes)
            return self.training_graphs(mixture).float()
        return separate_mixture(self.modules, mixture, self.hparams.num_spks).float()

    def on_fit_start(self):
        check_loss_threshold(getattr(self.hparams, "loss_threshold", None))
        super().on_fit_start()
        if getattr(self.hparams, "cuda_graphs", False) and self.training_graphs is None:
            if self.grad_accumulation_factor > 1:
                # A replayed backward hands out the graph's own buffers as gradients: they cannot accumulate.
                raise ValueError("cuda_graphs: True does not combine with grad_accumulation_factor > 1 "
                                 f"(got {self.grad_accumulation_factor}); raise the batch size instead.")
            if self.device_type != "cuda":
                raise ValueError(f"cuda_graphs: True needs a CUDA device; this run is on {self.device!r}.")
            if dist.is_available() and dist.is_initialized():
                raise ValueError("cuda_graphs: True works in one process only; set it to False under DDP.")
            if getattr(self.hparams, "training_signal_len", None) is None:
                logger.warning("cuda_graphs: True with full-length training utterances: only lengths that "
                               "repeat are captured; set training_signal_len for fixed-length segments.")
            self.training_graphs = TrainingCUDAGraphs(SeparationForward(self.modules, self.hparams.num_spks))

    def compute_objectives(self, estimates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-item negative SI-SNR under the best permutation: [B]."""
        return get_si_snr_with_pitwrapper(targets, estimates).reshape(-1)

    def _mixture_and_sources(self, batch, stage):
        mixture = batch.mixture.data.to(self.device)
        sources = batch.sources.data.to(self.device)
        max_len = getattr(self.hparams, "training_signal_len", None)
        if stage == sb.Stage.TRAIN and max_len and mixture.shape[-1] > max_len:
            # Each item is cropped within its own length (a window in another item's padding would train on
            # silence); an item shorter than the window starts at 0. The starts depend on (seed, epoch, step,
            # rank) only, not on the global RNG, which is not checkpointed: a resumed run crops the same windows.
            lengths = (batch.mixture.lengths * mixture.shape[-1]).round().long().tolist()
            epoch_counter = getattr(self.hparams, "epoch_counter", None)
            epoch = epoch_counter.current if epoch_counter is not None else 0
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            rng = np.random.default_rng([getattr(self.hparams, "seed", 0), epoch, self.step, rank])
            starts = [int(rng.integers(max(n - max_len, 0) + 1)) for n in lengths]
            mixture = torch.stack([mixture[i, s : s + max_len] for i, s in enumerate(starts)])
            sources = torch.stack([sources[i, s : s + max_len] for i, s in enumerate(starts)])
        return mixture, sources

    def fit_batch(self, batch):
        """One training step, robust to non-finite and already-solved items (see class doc)."""
        mixture, sources = self._mixture_and_sources(batch, sb.Stage.TRAIN)
        should_step = self.step % self.grad_accumulation_factor == 0
        with self.no_sync(not should_step):
            with self.training_ctx:
                estimates = self.compute_forward(mixture)
            item_losses = self.compute_objectives(estimates, sources)
            keep = torch.isfinite(item_losses)
            self.nonfinite_items += int((~keep).sum())
            threshold = getattr(self.hparams, "loss_threshold", None)
            if threshold is not None:
                solved = keep & (item_losses < threshold)
                self.solved_items += int(solved.sum())
                keep &= ~solved
            if self._any_rank(not bool(keep.any())):
                self.skipped_batches += 1
                if should_step:
                    # Under DDP the gradients accumulated in no_sync() are all-reduced by this step's
                    # backward; without it they were never synchronised, so the window is dropped.
                    self.zero_grad(set_to_none=True)  # (None, not zeros: a graph's gradients are its buffers)
                return torch.tensor(float("nan"))
            if bool(torch.isfinite(item_losses).all()):
                loss = item_losses[keep].mean()
            else:
                # A non-finite item poisons the backward of the whole batch even when dropped from the mean
                # (its zero upstream gradient meets NaN local derivatives: 0 * NaN = NaN), so the kept items
                # go through the model again without it. Local to this rank: no collective. Eagerly: the first
                # forward's autograd graph is still alive, which a CUDA-graph capture must not meet.
                with self.training_ctx:
                    estimates = separate_mixture(self.modules, mixture[keep], self.hparams.num_spks).float()
                loss = self.compute_objectives(estimates, sources[keep]).mean()
            self.scaler.scale(loss / self.grad_accumulation_factor).backward()
        if should_step:
            step_scheduler = getattr(self.hparams, "lr_step_scheduler", None)
            if step_scheduler is not None:
                step_scheduler(self.optimizer)
            self.optimizers_step()
        return loss.detach().cpu()

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any DDP rank (just ``flag`` without DDP)."""
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        shared = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        return bool(shared.item())

    def _sum_over_ranks(self, counts: List[int]) -> List[int]:
        """Element-wise sums over the DDP ranks (``counts`` itself without DDP)."""
        if not (dist.is_available() and dist.is_initialized()):
            return counts
        shared = torch.tensor(counts, dtype=torch.float64, device=self.device)
        dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        return [int(x) for x in shared.tolist()]

    def evaluate_batch(self, batch, stage):
        """Validation: mean loss. Test: also the metrics of every utterance."""
        mixture, sources = self._mixture_and_sources(batch, stage)
        with torch.no_grad(), self.evaluation_ctx:
            estimates = self.compute_forward(mixture)
        item_losses = self.compute_objectives(estimates, sources)
        if stage == sb.Stage.TEST:
            lengths = (batch.mixture.lengths * mixture.shape[-1]).round().long()
            for i, snt_id in enumerate(batch.id):
                n = int(lengths[i])
                try:
                    scores = separation_scores(mixture[i, :n].cpu(), sources[i, :n].cpu(), estimates[i, :n].cpu())
                except ValueError as error:  # BSS-eval on a silent source or estimate (LinAlgError: singular)
                    logger.warning(f"{snt_id}: no scores ({type(error).__name__}: {error}); NaN in test_results.csv")
                    scores = dict.fromkeys(RESULT_COLUMNS[1:], float("nan"))
                self.test_rows.append({"snt_id": snt_id, **scores})
                if getattr(self.hparams, "save_audio", False) and if_main_process():
                    self._save_audio(snt_id, mixture[i, :n], estimates[i, :n])
        finite = item_losses[torch.isfinite(item_losses)]
        if stage == sb.Stage.VALID:
            self.valid_nonfinite_items += item_losses.numel() - finite.numel()
        return (finite.mean() if finite.numel() else torch.tensor(float("nan"))).detach().cpu()

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.nonfinite_items = self.solved_items = self.skipped_batches = 0
            if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
                self.train_dataset.set_epoch(epoch)
        if stage == sb.Stage.VALID:
            self.valid_nonfinite_items = 0
        if stage == sb.Stage.TEST:
            self.test_rows: List[Dict[str, float]] = []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"si-snr": stage_loss}
        if stage == sb.Stage.TRAIN:
            # Item counts of all ranks (skipped batches are the same on every rank: the decision is shared).
            self.nonfinite_items, self.solved_items = self._sum_over_ranks([self.nonfinite_items, self.solved_items])
            self.train_stats = {
                **stats,
                "skipped_batches": self.skipped_batches,
                "nonfinite_items": self.nonfinite_items,
                "solved_items": self.solved_items,
            }
            if self.nonfinite_items:
                logger.warning(f"epoch {epoch}: {self.nonfinite_items} items had a non-finite loss and were skipped")
        elif stage == sb.Stage.VALID:
            (self.valid_nonfinite_items,) = self._sum_over_ranks([self.valid_nonfinite_items])
            if self.valid_nonfinite_items:
                # The mean of the finite items (0.0 when none is: update_average skips NaN) would flatter a
                # diverging model: it would become the best checkpoint and stall the plateau scheduler.
                logger.warning(f"epoch {epoch}: {self.valid_nonfinite_items} validation items had a non-finite "
                               "loss; the validation loss counts as inf")
                stage_loss = float("inf")
            stats = {"si-snr": stage_loss, "nonfinite_items": self.valid_nonfinite_items}
            lr = self.optimizer.param_groups[0]["lr"]
            epoch_scheduler = getattr(self.hparams, "lr_epoch_scheduler", None)
            if epoch_scheduler is not None:
                _, lr = epoch_scheduler([self.optimizer], epoch, stage_loss)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr}, train_stats=self.train_stats, valid_stats=stats
            )
            self.checkpointer.save_and_keep_only(meta={"si-snr": stage_loss}, min_keys=["si-snr"])
        else:
            self._write_test_results()

    def _write_test_results(self) -> None:
        """test_results.csv: one row per utterance and an ``avg`` row, as SpeechBrain's recipes."""
        if not self.test_rows:
            return
        # The average of the finite values: one failed or silent (-inf) utterance must not hide all the others.
        finite = {k: [row[k] for row in self.test_rows if math.isfinite(row[k])] for k in RESULT_COLUMNS[1:]}
        means = {k: sum(values) / len(values) if values else float("nan") for k, values in finite.items()}
        left_out = {k: len(self.test_rows) - len(values) for k, values in finite.items()}
        if any(left_out.values()):
            counts = ", ".join(f"{k} {count}" for k, count in left_out.items() if count)
            logger.warning(f"Non-finite scores left out of the averages (utterances per metric): {counts}")
        path = Path(self.hparams.output_folder) / "test_results.csv"
        if if_main_process():  # under DDP every rank evaluates the whole test set: one writes
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
                writer.writeheader()
                writer.writerows(self.test_rows)
                writer.writerow({"snt_id": "avg", **means})
        summary = ", ".join(f"{k} {v:.2f} dB" for k, v in means.items())
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
            test_stats={k.replace("-", "_"): round(v, 2) for k, v in means.items()},
        )
        logger.info(f"Test on {len(self.test_rows)} mixtures: {summary} (per utterance: {path})")

    def _save_audio(self, snt_id: str, mixture: torch.Tensor, estimates: torch.Tensor) -> None:
        import soundfile  # audio is written with soundfile: torchaudio.save needs torchcodec

        folder = Path(self.hparams.output_folder) / "audio_results"
        folder.mkdir(parents=True, exist_ok=True)
        peak = max(estimates.abs().max().item(), 1e-8)
        rate = getattr(self.hparams, "sample_rate", 8000)
        for i in range(estimates.shape[-1]):
            source = (estimates[:, i] / peak * 0.9).cpu().numpy()
            soundfile.write(folder / f"{snt_id}_source{i + 1}hat.wav", source, rate)
        soundfile.write(folder / f"{snt_id}_mix.wav", mixture.cpu().numpy(), rate)
