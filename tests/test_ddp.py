"""DDP through the recipe on CPU (gloo, 2 processes): ranks stay identical, skip together, never hang, and see
different dynamic-mixing mixtures.

The test launches this same file under ``torch.distributed.run``; run as a script (``__main__``), it is the
recipe's ``main()`` with a probing Brain that records, on every rank, the mixtures of each batch, whether the
optimizer stepped, and the parameters after every epoch, and that forces on ONE rank at a time:

* batch 2: every item of rank 1 "already solved" (below the loss threshold): no rank may step;
* batch 3: one NaN item (NaN in its mixture) on rank 0: both ranks step, on the finite items of rank 0;
* batch 4: every item of rank 0 non-finite: no rank may step.

A rank that skipped ``backward()`` while the other did not would leave the other waiting in the gradient
all-reduce for ever (gloo timeout: 2 hours): the test gives the run a time limit and fails when it is exceeded.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO_ROOT / "recipes" / "WSJ0Mix" / "separation" / "train.py"
TINY_HPARAMS = REPO_ROOT / "tests" / "hparams" / "tiny_separation.yaml"
RATE = 8000
WORLD_SIZE = 2
EPOCHS = 2
MIXTURES_PER_EPOCH = 8  # 4 per rank: 2 batches of 2 per rank and epoch
BATCH_SIZE = 2
FORCED = {2: ("solved", 1), 3: ("nan_item", 0), 4: ("nan_batch", 0)}  # batch number (from 1) -> (what, rank)
TIME_LIMIT = 240  # seconds for the whole 2-process run (about 30-60 s on a loaded 2-core CPU)


# ----------------------------------------------------------------------------------------------------------------
# The worker: runs on every rank under torch.distributed.run
# ----------------------------------------------------------------------------------------------------------------


def _worker() -> None:
    import speechbrain as sb

    from speechbrain_mamba.separation import recipe

    class ProbedSeparation(recipe.Separation):
        """Separation that records what this rank does and forces the skips of ``FORCED``."""

        trace: list = []
        batch_number = 0  # Brain sets self.rank under torchrun

        def fit_batch(self, batch):
            self.batch_number += 1
            what, rank = FORCED.get(self.batch_number, (None, None))
            self.forcing = what if rank == self.rank else None
            if self.forcing == "nan_item":
                batch.mixture.data[0, 100] = float("nan")
            elif self.forcing == "nan_batch":
                batch.mixture.data[:, 100] = float("nan")
            record = {
                "batch": self.batch_number,
                "epoch": self.hparams.epoch_counter.current,
                "ids": list(batch.id),
                "mixture_sums": [float(x) for x in batch.mixture.data.double().nan_to_num().sum(-1)],
            }
            steps_before = self.optimizer_step
            loss = super().fit_batch(batch)
            record.update(stepped=self.optimizer_step > steps_before, loss=float(loss))
            self.trace.append(record)
            self.forcing = None
            return loss

        def compute_objectives(self, estimates, targets):
            losses = super().compute_objectives(estimates, targets)
            if getattr(self, "forcing", None) == "solved":  # as if the model were perfect on every item
                losses = losses * 0 + (self.hparams.loss_threshold - 10)
            return losses

        def on_stage_end(self, stage, stage_loss, epoch=None):
            if stage == sb.Stage.TRAIN:
                self._dump(f"epoch{epoch}")
            super().on_stage_end(stage, stage_loss, epoch)

        def on_fit_start(self):
            super().on_fit_start()
            self._dump("start")

        def _dump(self, tag: str) -> None:
            folder = Path(self.hparams.output_folder)
            state = {k: v.detach().cpu().clone() for k, v in self.modules.state_dict().items()}
            torch.save(state, folder / f"params_rank{self.rank}_{tag}.pt")
            (folder / f"trace_rank{self.rank}.json").write_text(json.dumps(self.trace))

    recipe.Separation = ProbedSeparation
    recipe.main()


# ----------------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------------


def _write_corpus(root: Path) -> dict:
    """wsj0-2mix layout with 2 mixtures of 0.25 s per split, and 6 speakers x 2 utterances for dynamic mixing."""
    rng = np.random.default_rng(1)

    def voice(f0: float, length: int) -> np.ndarray:
        t = np.arange(length) / RATE
        wave = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
        wave = wave * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2) + 0.02 * rng.standard_normal(length)
        return np.round(0.3 * wave / np.abs(wave).max() * 32767) / 32767

    speakers = {f"s{i:02d}": 100.0 + 37.0 * i for i in range(6)}
    for spk, f0 in speakers.items():
        for utt in range(2):
            (root / "si_tr_s" / spk).mkdir(parents=True, exist_ok=True)
            sf.write(root / "si_tr_s" / spk / f"{spk}{utt:02d}.wav", voice(f0, 3000), RATE, subtype="PCM_16")
    for split in ("tr", "cv", "tt"):
        for index in range(2):
            spk1, spk2 = rng.choice(sorted(speakers), 2, replace=False)
            s1, s2 = voice(speakers[spk1], 2000), voice(speakers[spk2], 2000)
            name = f"{spk1}{index:02d}_0.5_{spk2}{index:02d}_-0.5"
            for sub, wave in (("s1", s1), ("s2", s2), ("mix", s1 + s2)):
                folder = root / "wsj0-mix" / "2speakers" / "wav8k" / "min" / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(folder / f"{name}.wav", wave, RATE, subtype="PCM_16")
    return {"data_folder": root / "wsj0-mix", "dm_folder": root / "si_tr_s"}


def test_ddp_ranks_stay_in_sync_through_skipped_batches(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        str(Path(__file__).resolve()), str(TINY_HPARAMS),
        "--distributed_backend", "gloo", "--device", "cpu", "--noprogressbar",
        "--output_folder", str(out), "--data_folder", str(corpus["data_folder"]),
        "--dm_folder", str(corpus["dm_folder"]), "--number_of_epochs", str(EPOCHS),
        "--mixtures_per_epoch", str(MIXTURES_PER_EPOCH), "--batch_size", str(BATCH_SIZE),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log = tmp_path / "ddp.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=TIME_LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"DDP run still going after {TIME_LIMIT} s (hung?):\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert returncode == 0, output[-4000:]

    traces = [json.loads((out / f"trace_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    batches = EPOCHS * MIXTURES_PER_EPOCH // (WORLD_SIZE * BATCH_SIZE)
    assert [[r["batch"] for r in trace] for trace in traces] == [list(range(1, batches + 1))] * WORLD_SIZE

    # Both ranks step, or neither: exactly the batches where one rank had nothing to learn from were skipped.
    for number in range(1, batches + 1):
        stepped = [trace[number - 1]["stepped"] for trace in traces]
        expected = FORCED.get(number, ("",))[0] not in ("solved", "nan_batch")
        assert stepped == [expected] * WORLD_SIZE, (number, stepped)
        losses = [trace[number - 1]["loss"] for trace in traces]
        assert all(np.isfinite(losses)) == expected, (number, losses)  # a skipped batch returns NaN

    # The ranks trained on different mixtures: a partition of each epoch's mixtures, with different audio.
    for epoch in range(1, EPOCHS + 1):
        ids = [[i for r in trace if r["epoch"] == epoch for i in r["ids"]] for trace in traces]
        assert not set(ids[0]) & set(ids[1]), ids
        assert sorted(ids[0] + ids[1]) == sorted(f"dm_e{epoch}_{i}" for i in range(MIXTURES_PER_EPOCH)), ids
        sums = [[s for r in trace if r["epoch"] == epoch for s in r["mixture_sums"]] for trace in traces]
        assert not set(np.round(sums[0], 6)) & set(np.round(sums[1], 6)), sums

    # Identical parameters on both ranks after every epoch, finite, and changed by training.
    tags = ["start"] + [f"epoch{epoch}" for epoch in range(1, EPOCHS + 1)]
    states = {tag: [torch.load(out / f"params_rank{r}_{tag}.pt") for r in range(WORLD_SIZE)] for tag in tags}
    for tag, (rank0, rank1) in states.items():
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{tag}: {name} differs between the ranks"
            assert torch.isfinite(rank0[name]).all(), f"{tag}: {name} is not finite"
    for before, after in zip(tags, tags[1:]):
        assert any(not torch.equal(states[before][0][k], states[after][0][k]) for k in states[before][0]), after

    # The counts of the skips, as logged (rank 0), and the end of the recipe.
    train_log = (out / "train_log.txt").read_text().splitlines()
    assert "train skipped_batches: 1" in train_log[0] and "train solved_items: 2" in train_log[0], train_log[0]
    assert "train skipped_batches: 1" in train_log[1] and "train nonfinite_items: 3" in train_log[1], train_log[1]
    assert (out / "test_results.csv").read_text().splitlines()[-1].startswith("avg,")


if __name__ == "__main__":
    _worker()
