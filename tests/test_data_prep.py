"""Separation data preparation on tiny synthetic corpora: CSVs of each layout, and every bad input it must catch."""

import csv
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import soundfile as sf
from speechbrain.dataio.dataio import load_data_csv

from speechbrain_mamba.separation import data_prep
from speechbrain_mamba.separation.data_prep import (
    DataError,
    list_speaker_utterances,
    prepare_custom,
    prepare_data,
    prepare_librimix,
    prepare_wham,
    prepare_wsj0mix,
)

RATE = 8000
FRAMES = 1600  # 0.2 s
IDS = ("a", "b")


def write(path: Path, frames: int = FRAMES, rate: int = RATE, channels: int = 1, data=None, subtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(0).uniform(-0.1, 0.1, (frames, channels))
    sf.write(path, data, rate, subtype=subtype)
    return path


def build(split_root: Path, splits: Sequence[str], subfolders: Sequence[str], rate: int = RATE) -> Path:
    """Writes <split_root>/<split>/<subfolder>/{a,b}.wav, 0.2 s each."""
    for split in splits:
        for sub in subfolders:
            for utt in IDS:
                write(split_root / split / sub / f"{utt}.wav", frames=FRAMES * rate // RATE, rate=rate)
    return split_root


def read_csv(path: Path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def header(prefixes: Sequence[str]):
    return ["ID", "duration"] + [f"{p}_wav{part}" for p in prefixes for part in ("", "_format", "_opts")]


WSJ = ("tr", "cv", "tt")
LIBRI = ("train-360", "dev", "test")
CUSTOM = ("train", "valid", "test")
S2 = {"s1": "s1", "s2": "s2"}
S3 = {**S2, "s3": "s3"}
NOISE = {"noise": "noise"}
LIBRI_FOLDERS = ("mix_clean", "mix_both", "s1", "s2", "s3", "noise")
WSJ_CSVS = ("wsj_tr.csv", "wsj_cv.csv", "wsj_tt.csv")
LIBRI2_CSVS = ("libri2mix_train.csv", "libri2mix_dev.csv", "libri2mix_test.csv")
LIBRI3_CSVS = ("libri3mix_train.csv", "libri3mix_dev.csv", "libri3mix_test.csv")
WHAM_CSVS = ("whamorg_tr.csv", "whamorg_cv.csv", "whamorg_tt.csv")
CUSTOM_CSVS = ("custom_train.csv", "custom_valid.csv", "custom_test.csv")
# name: (prepare, kwargs, levels under data_folder, split folders, extra subfolders, {column: subfolder}, CSV names)
CASES = {
    "wsj0-2mix": (prepare_wsj0mix, {}, "2speakers/wav8k/min", WSJ, (), {"mix": "mix", **S2}, WSJ_CSVS),
    "wsj0-3mix": (prepare_wsj0mix, {"num_spks": 3}, "3speakers/wav8k/min", WSJ, (), {"mix": "mix", **S3}, WSJ_CSVS),
    "wsj0-2mix-16k-max": (
        prepare_wsj0mix,
        {"sample_rate": 16000, "version": "max"},
        "2speakers/wav16k/max",
        WSJ,
        (),
        {"mix": "mix", **S2},
        WSJ_CSVS,
    ),
    "libri2mix": (
        prepare_librimix,
        {},
        "Libri2Mix/wav8k/min",
        LIBRI,
        LIBRI_FOLDERS,
        {"mix": "mix_clean", **S2},
        LIBRI2_CSVS,
    ),
    "libri3mix": (
        prepare_librimix,
        {"num_spks": 3},
        "Libri3Mix/wav8k/min",
        LIBRI,
        LIBRI_FOLDERS,
        {"mix": "mix_clean", **S3},
        LIBRI3_CSVS,
    ),
    "libri2mix-noisy": (
        prepare_librimix,
        {"condition": "noisy"},
        "Libri2Mix/wav8k/min",
        LIBRI,
        LIBRI_FOLDERS,
        {"mix": "mix_both", **S2, **NOISE},
        LIBRI2_CSVS,
    ),
    "wham": (prepare_wham, {}, "wav8k/min", WSJ, ("mix_clean",), {"mix": "mix_both", **S2, **NOISE}, WHAM_CSVS),
    "custom": (prepare_custom, {}, "", CUSTOM, (), {"mix": "mix", **S2}, CUSTOM_CSVS),
    "custom-3-noise": (prepare_custom, {"num_spks": 3}, "", CUSTOM, (), {"mix": "mix", **S3, **NOISE}, CUSTOM_CSVS),
}


@pytest.mark.parametrize("case", CASES)
def test_layout_csvs(tmp_path, case):
    prepare, kwargs, levels, splits, extra, columns, csv_names = CASES[case]
    rate = kwargs.get("sample_rate", RATE)
    split_root = build(tmp_path / "data" / levels, splits, set(columns.values()) | set(extra), rate)
    paths = prepare(tmp_path / "data", tmp_path / "save", **kwargs)

    assert paths == {key: tmp_path / "save" / name for key, name in zip(("train", "valid", "test"), csv_names)}
    for split, path in zip(splits, paths.values()):
        fields, rows = read_csv(path)
        assert fields == header(columns)
        assert [row["ID"] for row in rows] == list(IDS)
        for row in rows:
            assert float(row["duration"]) == pytest.approx(0.2)
            for prefix, sub in columns.items():
                assert row[f"{prefix}_wav"] == str(split_root / split / sub / f"{row['ID']}.wav")
                assert row[f"{prefix}_wav_format"] == "wav" and row[f"{prefix}_wav_opts"] == ""
        assert set(load_data_csv(str(path))) == set(IDS)  # SpeechBrain reads it


def test_custom_flac_and_format_column(tmp_path):
    for split in CUSTOM:
        for sub in ("mix", "s1", "s2"):
            write(tmp_path / split / sub / "x.flac", frames=3200, rate=16000)
    paths = prepare_custom(tmp_path, tmp_path / "save", sample_rate=16000)
    _, rows = read_csv(paths["test"])
    assert rows[0]["mix_wav"] == str(tmp_path / "test/mix/x.flac") and rows[0]["s2_wav_format"] == "flac"


def test_custom_noise_folder_in_one_split_only_is_an_error(tmp_path):
    build(tmp_path, CUSTOM, ("mix", "s1", "s2"))
    build(tmp_path, ("train",), ("noise",))
    with pytest.raises(DataError) as error:
        prepare_custom(tmp_path, tmp_path / "save")
    assert f"{tmp_path / 'valid'}: missing subfolder noise; expected mix/, s1/, s2/, noise/" in str(error.value)


@pytest.mark.parametrize("depth", ["", "2speakers", "2speakers/wav8k", "2speakers/wav8k/min"])
def test_wsj0mix_data_folder_at_any_depth(tmp_path, depth):
    split_root = build(tmp_path / "2speakers/wav8k/min", WSJ, ("mix", "s1", "s2"))
    build(tmp_path / "3speakers/wav8k/min", WSJ, ("mix", "s1", "s2", "s3"))
    build(tmp_path / "2speakers/wav8k/max", WSJ, ("mix", "s1", "s2"))
    paths = prepare_wsj0mix(tmp_path / depth, tmp_path / "save")
    assert read_csv(paths["valid"])[1][0]["mix_wav"] == str(split_root / "cv/mix/a.wav")


@pytest.mark.parametrize("depth", ["", "Libri2Mix", "Libri2Mix/wav8k/min"])
def test_librimix_data_folder_at_any_depth_and_train_100(tmp_path, depth):
    split_root = build(tmp_path / "Libri2Mix/wav8k/min", ("train-100", "dev", "test"), ("mix_clean", "s1", "s2"))
    paths = prepare_librimix(tmp_path / depth, tmp_path / "save")
    assert read_csv(paths["train"])[1][1]["s2_wav"] == str(split_root / "train-100/s2/b.wav")


def test_prepare_data_dispatches(tmp_path):
    build(tmp_path / "wav8k/min", WSJ, ("mix_both", "s1", "s2", "noise"))
    assert prepare_data("wham", tmp_path, tmp_path / "save", 2, 8000)["test"] == tmp_path / "save/whamorg_tt.csv"
    build(tmp_path / "3speakers/wav8k/min", WSJ, ("mix", "s1", "s2", "s3"))
    paths = prepare_data("wsj0mix", tmp_path, tmp_path / "save", num_spks=3, sample_rate=8000, check_content=False)
    assert read_csv(paths["train"])[0] == header(["mix", "s1", "s2", "s3"])
    with pytest.raises(ValueError, match="unknown dataset 'wsj0'; expected one of wsj0mix, librimix, wham, custom"):
        prepare_data("wsj0", tmp_path, tmp_path / "save", 2, 8000)
    with pytest.raises(ValueError, match="num_spks=3"):
        prepare_data("wham", tmp_path, tmp_path / "save", 3, 8000)
    with pytest.raises(ValueError, match="sample_rate=44100"):
        prepare_wsj0mix(tmp_path, tmp_path / "save", sample_rate=44100)


# ---------------------------------------------------------------------------------------------- bad input


def nan_audio(path: Path):
    data = np.zeros(FRAMES)
    data[100] = np.nan
    write(path, data=data, subtype="FLOAT")


def inf_audio(path: Path):
    data = np.zeros(FRAMES)
    data[-1] = np.inf
    write(path, data=data, subtype="DOUBLE")


# name: (how to break a good custom corpus at data_folder d, substrings of the message; {d} is data_folder)
BAD_INPUTS = {
    "unreadable": (
        lambda d: (d / "train/s1/a.wav").write_bytes(b"RIFF not really"),
        ["{d}/train/s1/a.wav: unreadable audio, expected a WAV or FLAC file"],
    ),
    "empty audio": (
        lambda d: write(d / "train/s2/b.wav", frames=0),
        ["{d}/train/s2/b.wav: empty audio (0 samples), expected speech"],
    ),
    "sample rate": (
        lambda d: write(d / "valid/mix/a.wav", rate=16000),
        ["{d}/valid/mix/a.wav: sample rate 16000 Hz, expected 8000 Hz (set sample_rate or resample the corpus)"],
    ),
    "multi-channel": (
        lambda d: write(d / "test/s1/a.wav", channels=2),
        ["{d}/test/s1/a.wav: 2 channels, expected 1 (mono)"],
    ),
    "nan": (lambda d: nan_audio(d / "train/mix/b.wav"), ["{d}/train/mix/b.wav: NaN or infinite samples, expected"]),
    "inf": (lambda d: inf_audio(d / "test/s2/a.wav"), ["{d}/test/s2/a.wav: NaN or infinite samples, expected finite"]),
    "length": (
        lambda d: write(d / "train/s2/a.wav", frames=1500),
        ["{d}/train/s2/a.wav: 1500 samples, expected 1600 like its mixture {d}/train/mix/a.wav"],
    ),
    "missing source": (
        lambda d: (d / "valid/s2/b.wav").unlink(),
        ["{d}/valid/s2: missing 1 file(s) present in {d}/valid/mix: b.wav"],
    ),
    "source without mixture": (
        lambda d: write(d / "test/s1/zz.wav"),
        ["{d}/test/s1: 1 file(s) with no mixture in {d}/test/mix: zz.wav"],
    ),
    "duplicate id": (
        lambda d: write(d / "train/mix/a.flac"),
        ["{d}/train/mix/a.wav: duplicate ID 'a' (also a.flac), expected one file per ID"],
    ),
    "split without files": (
        lambda d: [path.unlink() for path in d.glob("valid/*/*.wav")],
        ["{d}/valid/mix: no audio files, expected mixtures (.wav/.flac)"],
    ),
    "missing subfolder": (
        lambda d: shutil.rmtree(d / "test/s2"),
        ["{d}/test: missing subfolder s2; expected mix/, s1/, s2/; found: mix/, s1/"],
    ),
    "missing split": (
        lambda d: shutil.rmtree(d / "valid"),
        ["{d}: missing split folder valid/; expected <data_folder>/{train,valid,test}/{mix,s1,s2,[noise]}/<ID>.wav",
         "found: test/, train/"],
    ),
    "missing data folder": (
        lambda d: shutil.rmtree(d),
        ["{d}: data folder does not exist; expected <data_folder>/{train,valid,test}/{mix,s1,s2,[noise]}/<ID>.wav"],
    ),
    "empty data folder": (
        lambda d: [shutil.rmtree(d), d.mkdir()],
        ["{d}: data folder is empty; expected <data_folder>/{train,valid,test}"],
    ),
    "no split folders": (
        lambda d: [shutil.rmtree(d), write(d / "stuff/mix/a.wav")],
        ["{d}: no custom separation data split folders found; tried {d}", "{d} contains: stuff/"],
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_reported_before_any_csv(tmp_path, name):
    data = build(tmp_path / "data", CUSTOM, ("mix", "s1", "s2"))
    corrupt, expected = BAD_INPUTS[name]
    corrupt(data)
    with pytest.raises(DataError) as error:
        prepare_custom(data, tmp_path / "save")
    for text in expected:
        assert text.replace("{d}", str(data)) in str(error.value)
    assert not (tmp_path / "save").exists()


def test_all_problems_are_collected_and_capped(tmp_path):
    data = build(tmp_path, CUSTOM, ("mix", "s1", "s2"))
    bad = [write(tmp_path / split / sub / "a.wav", rate=16000) for split in CUSTOM for sub in ("mix", "s1", "s2")]
    bad += [write(tmp_path / split / "s1/b.wav", channels=2) for split in CUSTOM]
    with pytest.raises(DataError) as error:
        prepare_custom(data, tmp_path / "save")
    message = str(error.value)
    assert f"custom separation data in {data}: 12 problem(s), no CSV written" in message
    assert message.count("\n  - ") == 10 and message.endswith("... and 2 more")
    assert f"{bad[0]}: sample rate 16000 Hz" in message


def test_wsj0mix_wrong_sample_rate_at_split_level(tmp_path):
    split_root = build(tmp_path / "2speakers/wav16k/min", WSJ, ("mix", "s1", "s2"), rate=16000)
    with pytest.raises(DataError, match="sample rate 16000 Hz, expected 8000 Hz") as error:
        prepare_wsj0mix(split_root, tmp_path / "save")
    assert f"{split_root}/tr/mix/a.wav: sample rate" in str(error.value)


def test_wsj0mix_layout_not_found_says_what_was_tried(tmp_path):
    build(tmp_path / "3speakers/wav8k/min", WSJ, ("mix", "s1", "s2", "s3"))
    with pytest.raises(DataError) as error:
        prepare_wsj0mix(tmp_path, tmp_path / "save", num_spks=2)
    message = str(error.value)
    tried = [tmp_path / "2speakers/wav8k/min", tmp_path / "wav8k/min", tmp_path / "min", tmp_path]
    assert f"tried {', '.join(map(str, tried))}" in message
    assert "<data_folder>/2speakers/wav8k/min/{tr,cv,tt}/{mix,s1,s2}/<ID>.wav" in message
    assert f"{tmp_path} contains: 3speakers/" in message


def test_check_content_false_skips_the_sample_check(tmp_path):
    data = build(tmp_path, CUSTOM, ("mix", "s1", "s2"))
    nan_audio(data / "train/s1/a.wav")
    prepare_custom(data, tmp_path / "save", check_content=False)


# ---------------------------------------------------------------------------------------------- reuse, skip_prep


def test_skip_prep(tmp_path):
    data = build(tmp_path / "data", CUSTOM, ("mix", "s1", "s2"))
    with pytest.raises(DataError, match="skip_prep=True") as error:
        prepare_custom(data, tmp_path / "save", skip_prep=True)
    assert str(tmp_path / "save/custom_train.csv") in str(error.value)
    paths = prepare_custom(data, tmp_path / "save")
    shutil.rmtree(data)
    assert prepare_custom(data, tmp_path / "save", skip_prep=True) == paths


def test_existing_csvs_are_reused_unless_stale_or_overwrite(tmp_path, caplog):
    data = build(tmp_path, CUSTOM, ("mix", "s1", "s2", "s3"))
    paths = prepare_custom(data, tmp_path / "save")
    marked = paths["train"].read_text().replace("0.2", "9.9")
    paths["train"].write_text(marked)
    with caplog.at_level("INFO", logger=data_prep.__name__):
        prepare_custom(data, tmp_path / "save")
    assert "Reusing the existing CSVs" in caplog.text
    assert paths["train"].read_text() == marked
    prepare_custom(data, tmp_path / "save", overwrite=True)
    assert "9.9" not in paths["train"].read_text()
    prepare_custom(data, tmp_path / "save", num_spks=3)  # other columns: rebuilt, not reused
    assert read_csv(paths["valid"])[0] == header(["mix", "s1", "s2", "s3"])


def test_csvs_checked_with_other_settings_are_checked_again(tmp_path, caplog):
    """CSVs of 8 kHz files are not reused for sample_rate=16000: the files are checked again (and refused)."""
    data = build(tmp_path, CUSTOM, ("mix", "s1", "s2"))
    prepare_custom(data, tmp_path / "save")
    with pytest.raises(DataError, match="sample rate 8000 Hz, expected 16000 Hz"):
        prepare_custom(data, tmp_path / "save", sample_rate=16000)
    nan_audio(data / "train/s1/a.wav")
    prepare_custom(data, tmp_path / "save", check_content=False)  # rebuilt without the sample check
    with pytest.raises(DataError, match="a.wav"):
        prepare_custom(data, tmp_path / "save")  # check_content again: the NaN file is found


def test_interrupted_write_leaves_the_old_csvs(tmp_path, monkeypatch):
    data = build(tmp_path, CUSTOM, ("mix", "s1", "s2"))
    paths = prepare_custom(data, tmp_path / "save")
    before = {path: path.read_text() for path in paths.values()}

    def interrupted(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_custom(data, tmp_path / "save", overwrite=True)
    assert {path: path.read_text() for path in paths.values()} == before
    assert sorted(p.name for p in (tmp_path / "save").iterdir()) == sorted(p.name for p in paths.values())


# ---------------------------------------------------------------------------------------------- speakers


def test_list_speaker_utterances_wsj0(tmp_path):
    for name in ("01a/01aa0101.wav", "01a/01aa0102.wav", "02b/sub/02bc0101.flac", "02b/notes.txt"):
        (tmp_path / "si_tr_s" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "si_tr_s" / name).write_bytes(b"")
    speakers = list_speaker_utterances(tmp_path / "si_tr_s", "wsj0")
    assert speakers == {
        "01a": [tmp_path / "si_tr_s/01a/01aa0101.wav", tmp_path / "si_tr_s/01a/01aa0102.wav"],
        "02b": [tmp_path / "si_tr_s/02b/sub/02bc0101.flac"],
    }


def test_list_speaker_utterances_librispeech(tmp_path):
    for name in ("19/198/19-198-0001.flac", "19/227/19-227-0000.flac", "26/495/26-495-0000.flac", "README.TXT"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    speakers = list_speaker_utterances(tmp_path, "librispeech")
    assert list(speakers) == ["19", "26"]
    assert speakers["19"] == [tmp_path / "19/198/19-198-0001.flac", tmp_path / "19/227/19-227-0000.flac"]


def test_list_speaker_utterances_errors(tmp_path):
    with pytest.raises(DataError, match="folder does not exist") as error:
        list_speaker_utterances(tmp_path / "missing", "wsj0")
    assert str(tmp_path / "missing") in str(error.value)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/19-198-0001.flac").write_bytes(b"")
    with pytest.raises(DataError) as error:
        list_speaker_utterances(tmp_path / "flat", "librispeech")
    assert f"{tmp_path / 'flat'}: no audio found matching {tmp_path / 'flat'}/*/*/*" in str(error.value)
    assert "<folder>/<spk>/<chapter>/<utt>.flac" in str(error.value)
    with pytest.raises(DataError) as error:
        list_speaker_utterances(tmp_path / "flat", "wsj0")
    assert f"{tmp_path / 'flat'}: only 1 speaker (19-), expected at least 2 to mix" in str(error.value)
    with pytest.raises(ValueError, match="unknown corpus 'timit'"):
        list_speaker_utterances(tmp_path, "timit")
