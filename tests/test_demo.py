"""The shipped demo speech corpus and the mixture datasets built from it (layouts of the real corpora)."""

import numpy as np
import pytest
import soundfile as sf

from speechbrain_mamba.separation.demo import DEMO_SPEECH_DIR, MIX_PEAK, _mix, build_demo_dataset, demo_speakers

COUNTS = (8, 4, 4)
LSB = 1 / 32768
EXPECTED = {
    # layout: (split folders, subfolders without the sources, sources folder -> mixture it sums to)
    "wsj0mix": (("tr", "cv", "tt"), ("mix",), "mix"),
    "librimix": (("train-360", "dev", "test"), ("mix_clean", "mix_both", "noise"), "mix_clean"),
    "wham": (("tr", "cv", "tt"), ("mix_clean", "mix_both", "noise"), "mix_clean"),
}
VARIANTS = [("wsj0mix", 2), ("wsj0mix", 3), ("librimix", 2), ("librimix", 3), ("wham", 2)]


def _read(path):
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16"), path
    return sf.read(str(path), dtype="float64")[0]


def _utterances(name, layout):
    """(speaker, utterance) of each source, from the mixture name (WSJ0-2mix / LibriMix conventions)."""
    if layout == "librimix":
        return [(part.split("-")[0], part) for part in name.split("_")]
    stems = name.split("_")[0::2]
    return [(stem[:3], stem) for stem in stems]


def _min_root(demo, layout, num_spks):
    if layout == "wsj0mix":
        return demo.data_folder / f"{num_spks}speakers" / "wav8k" / "min"
    return demo.data_folder / "wav8k" / "min"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, {variant: build_demo_dataset(root, *variant, num_mixtures=COUNTS) for variant in VARIANTS}


def test_shipped_corpus():
    speakers = demo_speakers()
    assert len(speakers) >= 12
    assert (DEMO_SPEECH_DIR / "README.md").is_file()
    for spk, paths in speakers.items():
        assert len(spk) == 3 and len(paths) >= 10
        for path in paths:
            assert path.parent.name == spk and path.suffix == ".flac"
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.format) == (8000, 1, "FLAC"), path
            wav = sf.read(str(path), dtype="int16")[0]
            assert np.count_nonzero(wav) > 0.9 * len(wav), path  # dithered: hardly any exact zeros
            assert 1.5 <= len(wav) / 8000 <= 4.0


@pytest.mark.parametrize("layout,num_spks", VARIANTS)
def test_layout(built, layout, num_spks):
    root, demos = built
    demo = demos[(layout, num_spks)]
    name = {"wsj0mix": "wsj0-mix", "librimix": f"Libri{num_spks}Mix", "wham": "wham"}[layout]
    assert demo.data_folder == root / name
    splits, others, mix_folder = EXPECTED[layout]
    sources = [f"s{k}" for k in range(1, num_spks + 1)]
    min_root = _min_root(demo, layout, num_spks)
    assert sorted(p.name for p in min_root.iterdir() if p.is_dir()) == sorted(splits)

    used = {}
    for split, count in zip(splits, COUNTS):
        assert sorted(p.name for p in (min_root / split).iterdir()) == sorted(others + tuple(sources))
        names = sorted(p.name for p in (min_root / split / mix_folder).iterdir())
        assert len(names) == count and all(n.endswith(".wav") for n in names)
        for sub in others + tuple(sources):
            assert sorted(p.name for p in (min_root / split / sub).iterdir()) == names
        used[split] = set()
        for file_name in names:
            utts = _utterances(file_name[:-4], layout)
            assert len({spk for spk, _ in utts}) == num_spks, file_name
            used[split].update(utt for _, utt in utts)
            srcs = [_read(min_root / split / s / file_name) for s in sources]
            mix = _read(min_root / split / mix_folder / file_name)
            assert 1.5 <= len(mix) / 8000 <= 4.0
            assert np.abs(mix - np.sum(srcs, axis=0)).max() <= num_spks * LSB
            peak = max(np.abs(signal).max() for signal in [mix, *srcs])  # of everything written
            if layout != "librimix":  # the gains in the name are the source levels
                gains = [float(g) for g in file_name[:-4].split("_")[1::2]]
                levels = [10 * np.log10(np.mean(s**2)) for s in srcs]
                assert np.allclose(np.diff(levels), np.diff(gains), atol=0.02), file_name
            if "noise" in others:
                noise = _read(min_root / split / "noise" / file_name)
                both = _read(min_root / split / "mix_both" / file_name)
                assert np.abs(both - (mix + noise)).max() <= LSB
                snr = 10 * np.log10(np.sum(mix**2) / np.sum(noise**2))
                assert -0.05 <= snr <= 6.05
                peak = max(peak, np.abs(both).max(), np.abs(noise).max())
            assert abs(peak - 0.9) <= (num_spks + 1) * LSB  # scaled to 0.9, nothing clips or wraps
    assert not used[splits[0]] & (used[splits[1]] | used[splits[2]])
    assert not used[splits[1]] & used[splits[2]]

    # Dynamic mixing folder: the corpus's own layout, training utterances only.
    if layout == "librimix":
        assert demo.dm_folder == root / "LibriSpeech" / "train-clean-360"
        dm_files = sorted(demo.dm_folder.glob("*/*/*.flac"))
        for path in dm_files:
            spk, chapter, _ = path.stem.split("-")
            assert (path.parent.parent.name, path.parent.name) == (spk, chapter) and spk.isdigit()
        dm_speakers = {path.parent.parent.name for path in dm_files}
    else:
        assert demo.dm_folder == root / "wsj0" / "si_tr_s"
        dm_files = sorted(demo.dm_folder.glob("*/*.wav"))
        assert all(path.stem[:3] == path.parent.name for path in dm_files)
        dm_speakers = {path.parent.name for path in dm_files}
    dm_utts = {path.stem for path in dm_files}
    assert len(dm_speakers) >= 12
    assert used[splits[0]] <= dm_utts
    assert not dm_utts & (used[splits[1]] | used[splits[2]])
    assert sf.info(str(dm_files[0])).samplerate == 8000


def test_idempotent_and_rebuilt_on_new_arguments(tmp_path):
    demo = build_demo_dataset(tmp_path, "wham", num_mixtures=(3, 2, 2))
    mix_dir = demo.data_folder / "wav8k" / "min" / "tr" / "mix_both"
    before = {p.name: p.stat().st_mtime_ns for p in mix_dir.iterdir()}
    assert build_demo_dataset(tmp_path, "wham", num_mixtures=(3, 2, 2)) == demo
    assert {p.name: p.stat().st_mtime_ns for p in mix_dir.iterdir()} == before

    build_demo_dataset(tmp_path, "wham", seed=7, num_mixtures=(5, 2, 2))
    after = {p.name for p in mix_dir.iterdir()}
    assert len(after) == 5 and after != set(before)  # rebuilt, with no stale files left


def test_deterministic(tmp_path):
    first = build_demo_dataset(tmp_path / "a", "librimix", num_mixtures=(2, 1, 1))
    second = build_demo_dataset(tmp_path / "b", "librimix", num_mixtures=(2, 1, 1))
    for path in sorted(first.data_folder.rglob("*.wav")):
        assert path.read_bytes() == (second.data_folder / path.relative_to(first.data_folder)).read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path, "wham", num_spks=3)
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path, "whamr")
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path, num_mixtures=(4, 0, 2))
    (tmp_path / "wsj0-mix" / "2speakers" / "wav8k" / "min" / "tr").mkdir(parents=True)
    with pytest.raises(FileExistsError):  # a folder it did not make is never overwritten
        build_demo_dataset(tmp_path)


def test_cancelling_sources_are_scaled_without_wrapping():
    # Two nearly opposite sources: their sum is far quieter than either, so scaling to the mixture's peak
    # would push the sources past the int16 range (astype(np.int16) wraps).
    x = np.sin(np.linspace(0, 200, 4000)) * (1 + np.linspace(0, 1, 4000))
    for with_noise in (False, True):
        sources, noise = _mix([x, -x], np.array([0.0, -0.5]), np.random.default_rng(0), with_noise)
        exact = [x / np.sqrt(np.mean(x**2)), -x / np.sqrt(np.mean(x**2)) * 10 ** (-0.5 / 20)]
        factor = float(sources[0].astype(np.float64) @ exact[0] / (exact[0] @ exact[0]))
        assert factor > 0
        for written, signal in zip(sources, exact):  # the float signal scaled and rounded; a wrap is 65536 off
            assert np.abs(written - signal * factor).max() <= 1  # (factor is estimated: 1, not 0.5)
        loudest = max(np.abs(s.astype(np.int64)).max() for s in [*sources, sum(s.astype(np.int64) for s in sources)])
        assert loudest <= round(MIX_PEAK * 32768)


def test_no_written_file_exceeds_the_peak(built):
    # A wrapped sample lands near the other end of the int16 range, far beyond MIX_PEAK.
    root, _ = built
    peaks = {path: np.abs(sf.read(str(path), dtype="int16")[0].astype(np.int64)).max()
             for path in root.rglob("*.wav")}
    assert len(peaks) > 100
    assert {path: peak for path, peak in peaks.items() if peak > round(MIX_PEAK * 32768) + 1} == {}
