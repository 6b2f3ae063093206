#!/usr/bin/env python3
"""Regenerate the embedded multi-speaker demo corpus (``speechbrain_mamba/data/demo_speech``).

The corpus holds short single-speaker English utterances synthesised with the Debian
``flite`` and ``espeak-ng`` speech synthesisers reading the public-domain text of
*Alice's Adventures in Wonderland* that ships with flite. It lets the separation
recipes, their tests and the documentation run without any licensed corpus.

This script is run by hand once and its output is committed; it is not run in CI.
It needs the Debian packages (``apt-get install -y flite espeak-ng``), numpy, torch,
torchaudio and soundfile. The output is deterministic for given package versions.

Usage::

    python tools/make_demo_corpus.py [--utts-per-voice 20] [--seed 20240611]
"""

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO_ROOT / "speechbrain_mamba" / "data" / "demo_speech"
TEXT_SOURCE = Path("/usr/share/doc/flite/examples/alice")
REGEN_COMMAND = "python tools/make_demo_corpus.py"

SAMPLE_RATE = 8000
MIN_DURATION = 1.5  # seconds, after trimming
MAX_DURATION = 4.0
PEAK_LEVEL_DB = -3.0  # dBFS of the normalised utterance peak
DITHER_LEVEL_DB = -70.0  # dBFS standard deviation of the Gaussian dither
TRIM_THRESHOLD_DB = -40.0  # frame energy re the loudest frame
TRIM_MARGIN = 0.04  # seconds of context kept around the detected speech


class Voice(NamedTuple):
    """One synthetic speaker: its 3-character id, gender and how to synthesise it."""

    spk: str
    gender: str
    engine: str  # "flite" or "espeak-ng"
    voice: str
    options: Tuple[str, ...]
    description: str


# flite "kal" is left out: it is the same (diphone) speaker as "kal16", only at 8 kHz, and two
# voices of one person would break the "distinct speakers per mixture" assumption. "awb_time" is
# a limited-domain voice that can only say the time.
# The espeak-ng voices combine accents with variants and pitch/speed options so that they differ
# in F0 range, formants and pronunciation, not only in pitch. (espeak-ng 1.51 ignores a variant
# appended to "en-gb", so the British voice is named "en", which is British English.)
VOICES: Tuple[Voice, ...] = (
    Voice("m01", "M", "flite", "awb", (), "flite awb: clustergen voice of a Scottish-English male (Alan W Black)"),
    Voice("m02", "M", "flite", "rms", (), "flite rms: clustergen voice of a US-English male"),
    Voice("f01", "F", "flite", "slt", (), "flite slt: clustergen voice of a US-English female"),
    Voice("m03", "M", "flite", "kal16", (), "flite kal16: 16 kHz diphone voice of a US-English male"),
    Voice("f02", "F", "espeak-ng", "en-us+f3", ("-s", "165"), "espeak-ng US accent, variant female3"),
    Voice("f03", "F", "espeak-ng", "en+f2", ("-s", "170"), "espeak-ng British accent (voice en), variant female2"),
    Voice("f04", "F", "espeak-ng", "en-gb-scotland+f4", ("-s", "160"), "espeak-ng Scottish accent, variant female4"),
    Voice("f05", "F", "espeak-ng", "en-029+Alicia", ("-s", "175"), "espeak-ng Caribbean accent, variant Alicia"),
    Voice("f06", "F", "espeak-ng", "en-us+anika", ("-s", "155"), "espeak-ng US accent, variant anika"),
    Voice("m04", "M", "espeak-ng", "en-us+m3", ("-s", "170"), "espeak-ng US accent, variant male3"),
    Voice(
        "m05", "M", "espeak-ng", "en-gb-x-rp+m2", ("-s", "165", "-p", "30"),
        "espeak-ng British RP accent, variant male2, pitch 30",
    ),
    Voice(
        "m06", "M", "espeak-ng", "en-gb-scotland+m7", ("-s", "160", "-p", "70"),
        "espeak-ng Scottish accent, variant male7, pitch 70",
    ),
    Voice("m07", "M", "espeak-ng", "en-us-nyc+m8", ("-s", "175"), "espeak-ng New York accent, variant male8"),
    Voice(
        "m08", "M", "espeak-ng", "en-gb-x-gbclan+Andy", ("-s", "155", "-p", "40"),
        "espeak-ng Lancaster accent, variant Andy, pitch 40",
    ),
)


def load_chunks(text_path: Path, min_words: int = 5, max_words: int = 11) -> List[str]:
    """Split the book into short phrases (clauses merged up to ``max_words``) that speak in 1.5-4 s."""
    lines = []
    for line in text_path.read_text(encoding="latin-1").splitlines():
        # Title, chapter headings and the "* * *" separators are not prose.
        if "CHAPTER" in line or "ADVENTURES IN WONDERLAND" in line or line.strip().startswith("*"):
            continue
        lines.append(line)
    text = " ".join(lines)
    text = text.replace("--", ", ")
    # Quote marks go; apostrophes inside words (contractions such as "there's") stay.
    text = re.sub(r"(?<![A-Za-z])'|'(?![A-Za-z])|[`\"()_]", " ", text)
    # All-caps emphasis ("VERY") is sometimes spelled out letter by letter by the synthesisers.
    text = re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).lower(), text)
    text = re.sub(r"\s+", " ", text)
    clauses = [c.strip(" ,;:") for c in re.findall(r"[^,;:.!?]+[,;:.!?]?", text)]
    clauses = [c for c in clauses if re.search(r"[A-Za-z]", c)]

    chunks: List[str] = []
    current: List[str] = []
    for clause in clauses:
        words = clause.split()
        if len(current) + len(words) > max_words:
            if len(current) >= min_words:
                chunks.append(" ".join(current))
            current = []
        while len(words) > max_words:  # a long clause is cut into halves
            chunks.append(" ".join(words[: len(words) // 2]))
            words = words[len(words) // 2 :]
        current += words
        if len(current) >= min_words and clause[-1:] in ".!?":
            chunks.append(" ".join(current))
            current = []
    if len(current) >= min_words:
        chunks.append(" ".join(current))
    return [c[0].upper() + c[1:] + ("" if c[-1] in ".!?" else ".") for c in chunks]


def synthesise(voice: Voice, text: str, wav_path: Path) -> Tuple[np.ndarray, int]:
    """Run the synthesiser and return the waveform (float, mono) and its sample rate."""
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.voice, "-t", text, "-o", str(wav_path)]
    else:
        cmd = ["espeak-ng", "-v", voice.voice, *voice.options, "-w", str(wav_path), text]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wav, sr = sf.read(str(wav_path), dtype="float64", always_2d=True)
    return wav.mean(axis=1), sr


def trim_silence(wav: np.ndarray, sr: int) -> np.ndarray:
    """Cut leading/trailing parts whose 10 ms frame energy is 40 dB below the loudest frame."""
    hop = sr // 100
    n_frames = len(wav) // hop
    energy = (wav[: n_frames * hop].reshape(n_frames, hop) ** 2).mean(axis=1)
    active = np.flatnonzero(10 * np.log10(energy + 1e-20) > 10 * np.log10(energy.max()) + TRIM_THRESHOLD_DB)
    margin = int(TRIM_MARGIN * sr)
    start = max(active[0] * hop - margin, 0)
    stop = min((active[-1] + 1) * hop + margin, len(wav))
    return wav[start:stop]


def process(wav: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Resample to 8 kHz, trim, peak-normalise, then dither (espeak-ng writes exact zeros)."""
    if sr != SAMPLE_RATE:
        wav = AF.resample(torch.from_numpy(wav), sr, SAMPLE_RATE).numpy()
    wav = trim_silence(wav - wav.mean(), SAMPLE_RATE)
    wav = wav * (10 ** (PEAK_LEVEL_DB / 20) / np.abs(wav).max())
    wav = wav + rng.normal(0.0, 10 ** (DITHER_LEVEL_DB / 20), size=wav.shape)
    return np.clip(wav, -1.0, 32767 / 32768)


def package_version(package: str) -> str:
    """Debian package version, for the provenance notes."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def build(utts_per_voice: int, seed: int) -> Dict[str, List[Tuple[str, str, float]]]:
    """Synthesise the corpus into ``OUTPUT_DIR``; returns ``{spk: [(stem, text, seconds)]}``."""
    for tool in ("flite", "espeak-ng"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y flite espeak-ng")
    if not TEXT_SOURCE.is_file():
        raise SystemExit(f"{TEXT_SOURCE} not found (it is part of the Debian flite package)")

    chunks = load_chunks(TEXT_SOURCE)
    order = np.random.default_rng(seed).permutation(len(chunks))
    if OUTPUT_DIR.exists():
        shutil.rmtree(OUTPUT_DIR)
    OUTPUT_DIR.mkdir(parents=True)

    manifest: Dict[str, List[Tuple[str, str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v_idx, voice in enumerate(VOICES):
            # Each voice reads its own disjoint share of the shuffled phrases.
            pool = [chunks[i] for i in order[v_idx :: len(VOICES)]]
            (OUTPUT_DIR / voice.spk).mkdir()
            manifest[voice.spk] = []
            for p_idx, text in enumerate(pool):
                if len(manifest[voice.spk]) == utts_per_voice:
                    break
                wav, sr = synthesise(voice, text, Path(tmp) / "utt.wav")
                wav = process(wav, sr, np.random.default_rng([seed, v_idx, p_idx]))
                seconds = len(wav) / SAMPLE_RATE
                if not MIN_DURATION <= seconds <= MAX_DURATION:
                    continue
                stem = f"{voice.spk}{len(manifest[voice.spk]) + 1:03d}"
                sf.write(
                    str(OUTPUT_DIR / voice.spk / f"{stem}.flac"), wav, SAMPLE_RATE, subtype="PCM_16", format="FLAC"
                )
                manifest[voice.spk].append((stem, text, seconds))
            if len(manifest[voice.spk]) < utts_per_voice:
                print(f"warning: {voice.spk} has only {len(manifest[voice.spk])} utterances")
    return manifest


def write_provenance(manifest: Dict[str, List[Tuple[str, str, float]]], utts_per_voice: int, seed: int) -> None:
    """Write transcripts.tsv and README.md (provenance, processing, licences) next to the audio."""
    with open(OUTPUT_DIR / "transcripts.tsv", "w", encoding="utf-8") as f:
        f.write("utterance\tseconds\ttext\n")
        for spk in sorted(manifest):
            for stem, text, seconds in manifest[spk]:
                f.write(f"{stem}\t{seconds:.3f}\t{text}\n")

    n_utts = sum(len(v) for v in manifest.values())
    total = sum(s for v in manifest.values() for _, _, s in v)
    rows = "\n".join(
        f"| `{v.spk}` | {v.gender} | {v.engine} | `{v.voice}` | `{' '.join(v.options) or '-'}` "
        f"| {len(manifest[v.spk])} | {v.description} |"
        for v in VOICES
    )
    versions = {p: package_version(p) for p in ("flite", "libflite1", "espeak-ng", "espeak-ng-data")}
    readme = f"""# Demo speech corpus (synthetic, redistributable)

Short single-speaker English utterances from {len(VOICES)} synthetic voices, used by
`speechbrain_mamba.separation.demo` to build small WSJ0-2mix/3mix-, LibriMix- and WHAM!-shaped
mixture datasets so that the separation recipes and tests run without a licensed corpus.
It is **not** a substitute for real speech when training or evaluating a separation model.

* {len(VOICES)} speakers, {n_utts} utterances, {total / 60:.1f} minutes in total.
* 8 kHz, mono, 16-bit FLAC; {MIN_DURATION}-{MAX_DURATION} s per utterance.
* Layout: `<spk>/<spk><nnn>.flac`; the speaker id is the first 3 characters of the file
  name (the WSJ0 convention). `transcripts.tsv` gives the text of every utterance.

## Voices

| speaker | gender | engine | voice | options | utterances | description |
|---|---|---|---|---|---|---|
{rows}

Gender is that of the voice definition (flite: the recorded speaker; espeak-ng: the variant).
The flite voices awb, rms and slt are built from recordings of real speakers (CMU ARCTIC);
kal16 is a diphone voice; espeak-ng voices are formant synthesis. The flite voice `kal` is left
out because it is the same speaker as `kal16`.

## Source text

Phrases of *Alice's Adventures in Wonderland* by Lewis Carroll, chapters I-II, as shipped by the
Debian flite package in `{TEXT_SOURCE}` (public domain; from Project Gutenberg). The text is split
into clauses, merged to phrases of 5-11 words, shuffled with seed {seed}, and dealt out so that
every voice reads a different set of phrases.

## Processing

1. Synthesis with the Debian packages flite {versions['flite']} (libflite1 {versions['libflite1']})
   and espeak-ng {versions['espeak-ng']} (espeak-ng-data {versions['espeak-ng-data']}), with the
   voices and options above (espeak-ng `-s` is the rate in words per minute, `-p` the pitch, 0-99).
2. Mono, DC removed, resampled to 8 kHz with `torchaudio.functional.resample`.
3. Leading/trailing silence trimmed: 10 ms frames more than {-TRIM_THRESHOLD_DB:.0f} dB below the
   loudest frame are cut, keeping {TRIM_MARGIN * 1000:.0f} ms of margin.
4. Peak-normalised to {PEAK_LEVEL_DB:.0f} dBFS.
5. Gaussian dither at {DITHER_LEVEL_DB:.0f} dBFS (seeded per utterance) added, because espeak-ng
   writes exact digital silence between words: a training crop that falls on it is all zeros, for
   which SI-SNR (a log energy ratio) is undefined.
6. Utterances outside {MIN_DURATION}-{MAX_DURATION} s are dropped; the first {utts_per_voice}
   that remain per voice are kept, written as 16-bit FLAC with soundfile.

## Regenerating

```bash
apt-get install -y flite espeak-ng
{REGEN_COMMAND} --utts-per-voice {utts_per_voice} --seed {seed}
```

The output is deterministic for the same package versions (other synthesiser versions produce
slightly different audio).

## Licences

* **flite** (CMU Flite, Carnegie Mellon University; parts with the University of Edinburgh
  and Cepstral, LLC) is distributed under a BSD-style free licence that permits use,
  modification and redistribution without restriction, subject to keeping the copyright
  notice, marking modifications and not using the authors' names for endorsement. The voice
  data (CMU ARCTIC based awb, rms, slt; the kal diphone set) is distributed under the same
  free licence as flite. Speech generated with flite is, as we understand it, free to use and
  redistribute; we credit Carnegie Mellon University and the flite authors here.
* **espeak-ng** is a GPL-3.0-or-later program; its voice and phoneme data (espeak-ng-data)
  are distributed under the same licence. The usual understanding is that audio *produced by
  running* the program is not a derivative work of the program and not covered by the GPL:
  GPL-3.0 section 2 says that "the output from running a covered work is covered by this
  License only if the output, given its content, constitutes a covered work". The waveforms
  here are computed by formant synthesis and contain no code or data files of espeak-ng, and
  no espeak-ng code or data is shipped here. This is the common reading, not legal advice.
* **Alice's Adventures in Wonderland** (Lewis Carroll, 1865) is in the public domain.
* The processed recordings in this folder are distributed with this package under its licence
  (Apache-2.0), with the attributions above.
"""
    (OUTPUT_DIR / "README.md").write_text(readme, encoding="utf-8")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utts-per-voice", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args()
    manifest = build(args.utts_per_voice, args.seed)
    write_provenance(manifest, args.utts_per_voice, args.seed)
    n_utts = sum(len(v) for v in manifest.values())
    print(f"wrote {n_utts} utterances of {len(manifest)} speakers to {OUTPUT_DIR}")


if __name__ == "__main__":
    main()
